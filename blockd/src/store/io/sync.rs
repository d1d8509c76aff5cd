//! The plain-syscall engine: `pread`, `pwrite`, `fdatasync`, `fallocate` on real files.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use super::{AlignedBuf, DIRECT_ALIGN_BYTES, FileIo, Fs};

#[derive(Debug, Default, Clone, Copy)]
pub struct SyncFs;

#[derive(Debug)]
pub struct SyncFile {
    file: File,
    /// A second descriptor of the same file opened with `O_DIRECT`, opened on the first
    /// direct write; `None` inside when the file system refuses `O_DIRECT`.
    direct: OnceLock<Option<File>>,
}

impl SyncFile {
    /// Opens an existing file for reading and writing.
    pub fn open(path: &Path) -> io::Result<SyncFile> {
        Ok(SyncFile::new(
            OpenOptions::new().read(true).write(true).open(path)?,
        ))
    }

    /// Creates a new file; fails if it exists.
    pub fn create(path: &Path) -> io::Result<SyncFile> {
        Ok(SyncFile::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?,
        ))
    }

    #[cfg(test)]
    pub fn open_read_only(path: &Path) -> io::Result<SyncFile> {
        Ok(SyncFile::new(File::open(path)?))
    }

    fn new(file: File) -> SyncFile {
        SyncFile {
            file,
            direct: OnceLock::new(),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The `O_DIRECT` descriptor, opened through `/proc/self/fd` (the same open file, even
    /// if it was renamed), or `None` if the file system does not do direct I/O.
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .as_ref()
    }
}

/// The bounce buffer a direct write copies its data through, per thread.
const BOUNCE_BYTES: usize = 1 << 20;

/// Buffers per `pwritev` (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

thread_local! {
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Writes `buf` at `off` through the `O_DIRECT` descriptor `f`: straight from `buf` if it
/// is aligned, else copied through this thread's aligned bounce buffer one piece at a time.
fn write_direct(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    if (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN_BYTES) {
        return f.write_all_at(buf, off);
    }
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let bounce = b
            .get_or_insert_with(|| AlignedBuf::new(BOUNCE_BYTES))
            .as_mut_slice();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(bounce.len());
            bounce[..n].copy_from_slice(&buf[done..done + n]);
            f.write_all_at(&bounce[..n], off + done as u64)?;
            done += n;
        }
        Ok(())
    })
}

impl FileIo for SyncFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    /// With `O_DIRECT` when the range is page-aligned and the file system allows it: the
    /// data goes from `buf` (or, if `buf` is not page-aligned in memory, a bounce buffer)
    /// to the device instead of into page-cache pages (no page allocation, no writeback
    /// later). Otherwise, or if the file system refuses the
    /// direct write with EINVAL, a plain buffered write.
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let aligned = off.is_multiple_of(DIRECT_ALIGN_BYTES as u64)
            && buf.len().is_multiple_of(DIRECT_ALIGN_BYTES);
        if let Some(f) = self.direct_file().filter(|_| aligned) {
            match write_direct(f, buf, off) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.file.write_all_at(buf, off)
    }

    /// `pwritev`, continued after short writes.
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut at = off;
        while !rest.is_empty() {
            let Ok(pos) = libc::off64_t::try_from(at) else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            let count = rest.len().min(IOV_MAX) as libc::c_int;
            // SAFETY: `rest` holds `count` valid IoSlices (iovec-compatible) whose buffers
            // outlive the call.
            let n = unsafe {
                libc::pwritev64(
                    self.file.as_raw_fd(),
                    rest.as_ptr().cast::<libc::iovec>(),
                    count,
                    pos,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev returned 0",
                ));
            }
            at += n as u64;
            io::IoSlice::advance_slices(&mut rest, n as usize);
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let started = std::time::Instant::now();
        let result = self.file.sync_data();
        crate::metrics::fdatasync_seconds().observe(started.elapsed().as_secs_f64());
        result
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor owned by this file; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
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
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks().saturating_mul(512))
    }

    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.file.as_raw_fd())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// A vectored write lands as the concatenation of its buffers, also with more buffers
    /// than one `pwritev` takes and with empty ones among them.
    #[test]
    fn vectored_writes_are_the_concatenation_of_their_buffers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = SyncFs.create(&dir.path().join("v")).expect("create");
        let bufs: Vec<Vec<u8>> = (0..IOV_MAX * 2 + 7)
            .map(|i| pattern(i % 700, i as u8))
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        f.write_vectored_at(&slices, 1000).expect("write");
        let want: Vec<u8> = bufs.concat();
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, 1000).expect("read");
        assert!(got == want, "vectored write read back differently");
        assert_eq!(f.len().expect("len"), 1000 + want.len() as u64);
    }

    /// A direct write replaces what buffered readers see, even pages they cached just
    /// before, and an unaligned one falls back to a buffered write.
    #[test]
    fn direct_writes_are_read_back_through_the_page_cache() {
        // /tmp on these machines is ext4; on a file system without O_DIRECT the writes
        // fall back to buffered ones and must read back the same.
        let dir = tempfile::tempdir().expect("tempdir");
        let f = SyncFile::create(&dir.path().join("seg.dat")).expect("create");
        f.write_all_at(&pattern(3 * 4096, 1), 0)
            .expect("buffered write");
        let mut cached = vec![0u8; 3 * 4096];
        f.read_exact_at(&mut cached, 0)
            .expect("read into the page cache");

        // Not page-aligned in memory and larger than the bounce buffer, so it is copied
        // through it in several pieces.
        let big = pattern(BOUNCE_BYTES + 2 * 4096, 2);
        let mut held = vec![0u8; big.len() + 1];
        let skew = usize::from((held.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN_BYTES));
        held[skew..skew + big.len()].copy_from_slice(&big);
        let unaligned_memory = &held[skew..skew + big.len()];
        assert!(!(unaligned_memory.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN_BYTES));
        f.write_direct_at(unaligned_memory, 4096)
            .expect("direct write");
        // Page-aligned in memory: written straight from the buffer.
        let mut aligned = AlignedBuf::new(2 * 4096);
        aligned
            .as_mut_slice()
            .copy_from_slice(&pattern(2 * 4096, 4));
        let after_big = 4096 + big.len() as u64;
        f.write_direct_at(aligned.as_slice(), after_big + 4096)
            .expect("aligned direct write");
        let unaligned = pattern(1000, 3);
        f.write_direct_at(&unaligned, after_big + 10)
            .expect("unaligned write");
        f.sync_data().expect("sync");

        let mut head = vec![0u8; 4096];
        f.read_exact_at(&mut head, 0).expect("read head");
        assert_eq!(
            head,
            pattern(3 * 4096, 1)[..4096],
            "bytes before the write changed"
        );
        let mut back = vec![0u8; big.len()];
        f.read_exact_at(&mut back, 4096).expect("read back");
        assert!(
            back == big,
            "a buffered read after a direct write returned other bytes"
        );
        let mut tail = vec![0u8; 1000];
        f.read_exact_at(&mut tail, after_big + 10)
            .expect("read unaligned");
        assert_eq!(tail, unaligned);
        let mut from_aligned = vec![0u8; 2 * 4096];
        f.read_exact_at(&mut from_aligned, after_big + 4096)
            .expect("read aligned");
        assert_eq!(from_aligned, pattern(2 * 4096, 4));
        if is_ext4(dir.path()) {
            assert!(f.direct_file().is_some(), "ext4 refused O_DIRECT");
        }
    }

    fn is_ext4(p: &Path) -> bool {
        // SAFETY: statfs fills the struct; the path is NUL-terminated.
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::EXT4_SUPER_MAGIC }
    }
}
