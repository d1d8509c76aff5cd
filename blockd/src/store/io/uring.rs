//! The io_uring engine: log appends, segment reads and fdatasync through io_uring.
//!
//! Every thread that does store I/O gets its own small ring (thread-local, created on the
//! first I/O of that thread), so no lock is taken on the data path and the ring can be set
//! up for one issuer with deferred task work (completions are reaped only when this
//! thread enters the kernel, which it does to wait for them anyway). Each ring is created
//! disabled, restricted to the three opcodes the store needs (`READ`, `WRITE`, `FSYNC`)
//! and the one flag (`IO_LINK`), then enabled, so a bug cannot turn it into anything else.
//!
//! What it saves over [`super::sync`]: a log append (payload into `.dat`, provisional
//! entry into `.idx`) is one `io_uring_enter` instead of two `pwrite`s, and a commit batch
//! (write into `.idx`, then `fdatasync` it) is one instead of two. The pairs are linked
//! (`IOSQE_IO_LINK`), so the second operation starts only after the first completed in
//! full, exactly the order the syscall engine uses; the bytes written and the on-disk
//! format are the same. Single reads and syncs cost one `io_uring_enter` each, like the
//! system call they replace.
//!
//! Memory safety: a buffer handed to the kernel must stay valid until its completion has
//! been reaped. Every call below submits, then waits until every operation it submitted
//! has completed before returning, and returns an error early only when the kernel took
//! none of them.
//!
//! Directory operations, `len`, `set_len`, hole punching and writeback hints stay plain
//! system calls (they are rare or have no benefit from a ring).

use std::cell::RefCell;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, opcode, register::Restriction, squeue, types};

use super::sync::{SyncFile, SyncFs};
use super::{FileIo, Fs};

/// Submission queue entries per ring: the most one call submits is two.
const RING_ENTRIES: u32 = 8;

thread_local! {
    /// This thread's ring; `None` inside once creating it failed (the thread then falls
    /// back to plain system calls, see [`with_ring`]).
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
}

/// Logged once per process when a thread could not get a ring.
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

fn new_ring() -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_r_disabled()
        .setup_single_issuer()
        .setup_defer_taskrun();
    let ring = match b.build(RING_ENTRIES) {
        Ok(r) => r,
        // Kernels before 6.1 lack DEFER_TASKRUN; the ring still works without it.
        Err(_) => IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?,
    };
    let sub = ring.submitter();
    sub.register_restrictions(&mut [
        Restriction::sqe_op(opcode::Read::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        // Pairs are linked (payload then entry; batch then fdatasync).
        Restriction::sqe_flags_allowed(squeue::Flags::IO_LINK.bits()),
    ])?;
    sub.register_enable_rings()?;
    Ok(ring)
}

/// Runs `f` with this thread's ring, or returns `None` if the thread has none (creating
/// it failed: the caller then uses the plain system call).
fn with_ring<T>(f: impl FnOnce(&mut IoUring) -> T) -> Option<T> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let ring = match new_ring() {
                Ok(r) => Some(r),
                Err(e) => {
                    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e,
                            "cannot create an io_uring for this thread; it uses plain system calls");
                    }
                    None
                }
            };
            *slot = Some(ring);
        }
        slot.as_mut()
            .and_then(|r| r.as_mut())
            .map(f)
    })
}

/// Submits the entries and waits for all their completions; returns their results in
/// submission order (by `user_data` = index).
///
/// # Safety
/// Every buffer the entries point to must stay valid and unaliased until this returns.
unsafe fn run(ring: &mut IoUring, entries: &[squeue::Entry]) -> io::Result<[i32; 2]> {
    debug_assert!(!entries.is_empty() && entries.len() <= 2);
    {
        let mut sq = ring.submission();
        for e in entries {
            // SAFETY: the caller keeps the buffers alive until we return, and we return
            // only after every submitted entry completed (below).
            unsafe { sq.push(e) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
    }
    let mut results = [0i32; 2];
    let mut left = entries.len();
    let mut submitted = false;
    while left > 0 {
        match ring.submit_and_wait(left) {
            Ok(_) => submitted = true,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                // The kernel may have taken the entries before the wait was interrupted:
                // if the queue is empty, they are in flight.
                if ring.submission().is_empty() {
                    submitted = true;
                }
            }
            Err(e) => {
                if !submitted && ring.submission().len() == entries.len() {
                    // Nothing was taken, so no buffer is in the kernel. The entries are
                    // still queued; the crate cannot take them back, so this ring is
                    // replaced by a fresh one before the next call (`check_poisoned`).
                    RING_POISONED.with(|p| p.set(true));
                    return Err(e);
                }
                // Something is in flight: keep waiting for it (the buffers must outlive it).
                submitted = true;
            }
        }
        for cqe in ring.completion() {
            if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                *slot = cqe.result();
                left = left.saturating_sub(1);
            }
        }
    }
    Ok(results)
}

thread_local! {
    static RING_POISONED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn check_poisoned() {
    if RING_POISONED.with(|p| p.replace(false)) {
        RING.with(|cell| *cell.borrow_mut() = None);
    }
}

fn result(r: i32) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(r as usize)
    }
}

fn len32(n: usize) -> u32 {
    // Store buffers are at most a few MiB (MAX_RECORD_BYTES); a longer one is written in
    // several calls by the loops below.
    u32::try_from(n).unwrap_or(!4095)
}

fn write_entry(fd: RawFd, buf: &[u8], off: u64, user_data: u64) -> squeue::Entry {
    opcode::Write::new(types::Fd(fd), buf.as_ptr(), len32(buf.len()))
        .offset(off)
        .build()
        .user_data(user_data)
}

fn fdatasync_entry(fd: RawFd, user_data: u64) -> squeue::Entry {
    opcode::Fsync::new(types::Fd(fd))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(user_data)
}

/// Engine for directory operations (plain system calls) whose files do their reads,
/// writes and syncs through io_uring.
#[derive(Debug, Default, Clone, Copy)]
pub struct UringFs;

impl UringFs {
    /// Checks that this process can create a restricted io_uring (kernel support, seccomp,
    /// memlock limits), so that `--io-engine uring` fails at start-up, not at the first I/O.
    pub fn probe() -> io::Result<UringFs> {
        new_ring()?;
        Ok(UringFs)
    }
}

#[derive(Debug)]
pub struct UringFile(SyncFile);

impl UringFile {
    fn fd(&self) -> RawFd {
        self.0.file().as_raw_fd()
    }

    /// A write and an fdatasync of this file as one linked submission (counted as one
    /// fdatasync whose time includes the write; the fallbacks count their own).
    fn write_and_sync(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let started = std::time::Instant::now();
        let w = write_entry(self.fd(), buf, off, 0).flags(squeue::Flags::IO_LINK);
        let s = fdatasync_entry(self.fd(), 1);
        // SAFETY: `buf` outlives the call, which waits for both completions.
        let Some(r) = with_ring(|ring| unsafe { run(ring, &[w, s]) }) else {
            self.0.write_all_at(buf, off)?;
            return self.0.sync_data();
        };
        let [rw, rs] = r?;
        let n = result(rw)?;
        if n < buf.len() {
            // The sync was cancelled with the short write: finish, then sync.
            self.write_rest(&buf[n..], off + n as u64)?;
            return self.sync_data();
        }
        crate::metrics::fdatasync_seconds().observe(started.elapsed().as_secs_f64());
        result(rs).map(|_| ())
    }

    /// One write through the ring; short writes continue with the rest.
    fn write_rest(&self, mut buf: &[u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            check_poisoned();
            let e = write_entry(self.fd(), buf, off, 0);
            // SAFETY: `buf` outlives the call, which waits for the completion.
            let r = with_ring(|ring| unsafe { run(ring, &[e]) });
            let n = match r {
                Some(r) => result(r?[0])?,
                None => return self.0.write_all_at(buf, off),
            };
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            buf = &buf[n..];
            off += n as u64;
        }
        Ok(())
    }
}

impl FileIo for UringFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        check_poisoned();
        let e = opcode::Read::new(types::Fd(self.fd()), buf.as_mut_ptr(), len32(buf.len()))
            .offset(off)
            .build()
            .user_data(0);
        // SAFETY: `buf` is borrowed mutably for the whole call, which waits for the
        // completion.
        match with_ring(|ring| unsafe { run(ring, &[e]) }) {
            Some(r) => result(r?[0]),
            None => self.0.read_at(buf, off),
        }
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_rest(buf, off)
    }

    /// A direct write blocks in the device either way; it goes through the plain engine.
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_direct_at(buf, off)
    }

    /// Through the plain-syscall file: ext4 hands buffered ring writes to a worker thread
    /// anyway (docs/BENCHMARKS.md, `engines`), so one `pwritev` is the cheaper way.
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        self.0.write_vectored_at(bufs, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        check_poisoned();
        let started = std::time::Instant::now();
        let e = fdatasync_entry(self.fd(), 0);
        // SAFETY: no buffer.
        let r = match with_ring(|ring| unsafe { run(ring, &[e]) }) {
            Some(r) => result(r?[0]).map(|_| ()),
            None => self.0.sync_data(),
        };
        crate::metrics::fdatasync_seconds().observe(started.elapsed().as_secs_f64());
        r
    }

    fn write_pair(
        &self,
        a: &[u8],
        a_off: u64,
        other: &dyn FileIo,
        b: &[u8],
        b_off: u64,
    ) -> io::Result<()> {
        let Some(other_fd) = other.raw_fd() else {
            self.write_all_at(a, a_off)?;
            return other.write_all_at(b, b_off);
        };
        check_poisoned();
        let first = write_entry(self.fd(), a, a_off, 0).flags(squeue::Flags::IO_LINK);
        let second = write_entry(other_fd, b, b_off, 1);
        // SAFETY: `a` and `b` outlive the call, which waits for both completions.
        let Some(r) = with_ring(|ring| unsafe { run(ring, &[first, second]) }) else {
            self.0.write_all_at(a, a_off)?;
            return other.write_all_at(b, b_off);
        };
        let [ra, rb] = r?;
        let na = result(ra)?;
        if na < a.len() {
            // A short first write breaks the link: the second was cancelled. Finish both
            // in order.
            self.write_rest(&a[na..], a_off + na as u64)?;
            return other.write_all_at(b, b_off);
        }
        let nb = result(rb)?;
        if nb < b.len() {
            other.write_all_at(&b[nb..], b_off + nb as u64)?;
        }
        Ok(())
    }

    fn write_all_at_and_sync(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_poisoned();
        self.write_and_sync(buf, off)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }

    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(off, len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.0.allocated_bytes()
    }

    fn start_writeback(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.start_writeback(off, len)
    }
}

impl Fs for UringFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        SyncFs.create_dir_all(dir)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        Ok(Arc::new(UringFile(SyncFile::open(path)?)))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        Ok(Arc::new(UringFile(SyncFile::create(path)?)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        SyncFs.read(path)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        SyncFs.write_atomic(path, bytes)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        SyncFs.remove(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        SyncFs.list(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        SyncFs.sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_pairs_and_syncs_through_the_ring() {
        let fs = UringFs::probe().expect("io_uring available");
        let dir = tempfile::tempdir().expect("tempdir");
        let a = fs.create(&dir.path().join("a")).expect("create a");
        let b = fs.create(&dir.path().join("b")).expect("create b");
        a.write_all_at(b"hello", 4096).expect("write");
        a.sync_data().expect("sync");
        let mut buf = [0u8; 5];
        a.read_exact_at(&mut buf, 4096).expect("read");
        assert_eq!(&buf, b"hello");
        a.write_pair(b"payload", 0, &*b, b"entry", 64)
            .expect("pair");
        b.write_all_at_and_sync(b"batch", 128).expect("write+sync");
        let mut p = [0u8; 7];
        a.read_exact_at(&mut p, 0).expect("read a");
        assert_eq!(&p, b"payload");
        let mut e = [0u8; 5];
        b.read_exact_at(&mut e, 64).expect("read b");
        assert_eq!(&e, b"entry");
        b.read_exact_at(&mut e, 128).expect("read b");
        assert_eq!(&e, b"batch");
        // Reads past the end are short, not errors.
        let mut tail = [0u8; 16];
        assert_eq!(b.read_at(&mut tail, 130).expect("short read"), 3);
        // A large buffer (several MiB) round-trips.
        let big: Vec<u8> = (0..(5 << 20)).map(|i| (i % 251) as u8).collect();
        a.write_all_at(&big, 1 << 20).expect("big write");
        let mut back = vec![0u8; big.len()];
        a.read_exact_at(&mut back, 1 << 20).expect("big read");
        assert!(back == big);
    }

    #[test]
    fn errors_come_back_as_errors() {
        let fs = UringFs::probe().expect("io_uring available");
        let dir = tempfile::tempdir().expect("tempdir");
        let a = fs.create(&dir.path().join("a")).expect("create");
        // A read-only descriptor makes the write fail with EBADF through the ring.
        let ro = UringFile(SyncFile::open_read_only(&dir.path().join("a")).expect("open ro"));
        let err = ro
            .write_all_at(b"x", 0)
            .expect_err("write to a read-only fd");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let err = ro
            .write_pair(b"x", 0, &*a, b"y", 0)
            .expect_err("pair on a read-only fd");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        // The second write was cancelled with the first: nothing landed in `a`.
        assert_eq!(a.len().expect("len"), 0);
        // The ring still works afterwards.
        a.write_all_at_and_sync(b"ok", 0)
            .expect("write after errors");
    }
}
