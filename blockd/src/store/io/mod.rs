//! The store's I/O engine: the only place where the store touches files.
//!
//! Everything the store does to disk goes through [`Fs`] and [`FileIo`], so the same store
//! code runs on real files ([`sync::SyncFs`], plain system calls) and, in tests, on an
//! in-memory file system that injects faults ([`mem::MemFs`]: lost unsynced writes, torn
//! writes, flipped bytes at rest, EIO).

pub mod mem;
pub mod sync;

use std::io;
use std::path::Path;
use std::sync::Arc;

/// An open file, used with positional I/O only.
#[allow(clippy::len_without_is_empty)] // files are sized, never "empty" collections
pub trait FileIo: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes every completed write to this file durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Frees the blocks of a range; it reads back as zeroes.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;
    /// Bytes of disk the file occupies.
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Starts writing back dirty pages of a range without waiting (a hint: a later
    /// `sync_data` then has less to do).
    fn start_writeback(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `off`; a short file is an error.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file is shorter than expected",
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Directory-level operations.
pub trait Fs: Send + Sync {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileIo>>;
    /// Creates a new file; fails if it exists. The creation is durable after [`Fs::sync_dir`].
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileIo>>;
    /// Reads a whole (small) file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Replaces `path` atomically and durably (write temporary, sync, rename, sync directory).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Removes a file; durable after [`Fs::sync_dir`].
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}
