//! The store's I/O engine: the only place where the store touches files.
//!
//! Everything the store does to disk goes through [`Fs`] and [`FileIo`], so the same store
//! code runs on real files ([`sync::SyncFs`], plain system calls, or [`uring::UringFs`],
//! io_uring; chosen at start-up with [`IoEngine`]) and, in tests, on an
//! in-memory file system that injects faults ([`mem::MemFs`]: lost unsynced writes, torn
//! writes, flipped bytes at rest, EIO).

pub mod mem;
pub mod sync;
pub mod uring;

use std::io;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

/// Offsets, lengths and buffer addresses of direct writes are multiples of this (the
/// page size: a multiple of every logical block size and DMA alignment Linux uses).
/// Direct writes from a buffer at another address are copied through an aligned one.
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// A zeroed heap buffer whose address is a multiple of [`DIRECT_ALIGN_BYTES`], so that a
/// direct write can go from it without a copy.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer owns its memory exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (`as_slice`), like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN_BYTES)
            .expect("aligned buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Which engine serves the store's files (`blockd serve --io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// `pread`, `pwrite`, `fdatasync`.
    Sync,
    /// io_uring, one restricted ring per thread; same bytes on disk.
    Uring,
}

impl IoEngine {
    /// The file system for this engine; for io_uring, checks that a ring can be created.
    pub fn fs(self) -> io::Result<Arc<dyn Fs>> {
        Ok(match self {
            IoEngine::Sync => Arc::new(sync::SyncFs),
            IoEngine::Uring => Arc::new(uring::UringFs::probe()?),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Sync => "sync",
            IoEngine::Uring => "uring",
        }
    }
}

/// An open file, used with positional I/O only.
#[allow(clippy::len_without_is_empty)] // files are sized, never "empty" collections
pub trait FileIo: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Writes `buf` at `off` around the page cache where the engine and file system can
    /// (`O_DIRECT`), else like [`FileIo::write_all_at`]. Durable, like any write, only
    /// after [`FileIo::sync_data`]. For large appends that nobody is about to read.
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)
    }
    /// Writes `bufs` back to back from `off`, as one write of their concatenation (one
    /// system call where the engine can: a burst of log appends).
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let mut at = off;
        for b in bufs {
            self.write_all_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
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

    /// Writes `a` at `a_off` of this file and then `b` at `b_off` of `other` (a log append:
    /// payload, then its index entry). `b` is written only if `a` was written in full.
    /// Engines that can submit both at once (io_uring) override this.
    fn write_pair(
        &self,
        a: &[u8],
        a_off: u64,
        other: &dyn FileIo,
        b: &[u8],
        b_off: u64,
    ) -> io::Result<()> {
        self.write_all_at(a, a_off)?;
        other.write_all_at(b, b_off)
    }

    /// Writes `buf` at `off`, then makes the file's data durable (a commit batch).
    fn write_all_at_and_sync(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)?;
        self.sync_data()
    }

    /// The descriptor of a real file (lets an engine submit I/O on two files at once).
    fn raw_fd(&self) -> Option<RawFd> {
        None
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
