//! The plain-syscall engine: `pread`, `pwrite`, `fdatasync`, `fallocate` on real files.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::{FileIo, Fs};

#[derive(Debug, Default, Clone, Copy)]
pub struct SyncFs;

#[derive(Debug)]
pub struct SyncFile(File);

impl SyncFile {
    /// Opens an existing file for reading and writing.
    pub fn open(path: &Path) -> io::Result<SyncFile> {
        Ok(SyncFile(
            OpenOptions::new().read(true).write(true).open(path)?,
        ))
    }

    /// Creates a new file; fails if it exists.
    pub fn create(path: &Path) -> io::Result<SyncFile> {
        Ok(SyncFile(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?,
        ))
    }

    #[cfg(test)]
    pub fn open_read_only(path: &Path) -> io::Result<SyncFile> {
        Ok(SyncFile(File::open(path)?))
    }

    pub fn file(&self) -> &File {
        &self.0
    }
}

impl FileIo for SyncFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.0.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        let started = std::time::Instant::now();
        let result = self.0.sync_data();
        crate::metrics::fdatasync_seconds().observe(started.elapsed().as_secs_f64());
        result
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor owned by this file; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn start_writeback(&self, off: u64, len: u64) -> io::Result<()> {
        let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: sync_file_range on a descriptor owned by this file; no memory is passed.
        let rc =
            unsafe { libc::sync_file_range(self.0.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.blocks().saturating_mul(512))
    }

    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.0.as_raw_fd())
    }
}

impl Fs for SyncFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        Ok(Arc::new(SyncFile::open(path)?))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        Ok(Arc::new(SyncFile::create(path)?))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        crate::fsutil::write_atomic(path, bytes)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir)? {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        crate::fsutil::sync_dir(dir)
    }
}
