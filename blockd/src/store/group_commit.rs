//! Group commit: one fdatasync serves every flush that is waiting when it starts.
//!
//! Each caller takes a ticket. The first caller to find no sync running becomes the leader:
//! it records the newest ticket issued so far as its target, syncs without holding the lock,
//! and then marks every ticket up to that target complete. Writes acknowledged before a
//! ticket was taken are therefore covered by the sync that completes it.
//!
//! A failed sync is sticky (Neon's rule: never retry a failed fsync, the kernel may already
//! have dropped the dirty pages): that flush and every later one fail until the owner is
//! reopened.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    issued: u64,
    completed: u64,
    syncing: bool,
    failed: bool,
}

/// Why a flush failed.
#[derive(Debug)]
pub enum FlushError {
    /// This flush's own sync failed with this error.
    Sync(io::Error),
    /// An earlier sync failed; the owner must be reopened.
    Poisoned,
}

#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    cv: Condvar,
    flushes: AtomicU64,
    syncs: AtomicU64,
}

impl GroupCommit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until every write completed before this call is durable. `sync` is run by at
    /// most one caller at a time and must make all completed writes durable.
    pub fn flush(&self, sync: impl FnOnce() -> io::Result<()>) -> Result<(), FlushError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock();
        st.issued += 1;
        let ticket = st.issued;
        let mut sync = Some(sync);
        loop {
            if st.failed {
                return Err(FlushError::Poisoned);
            }
            if st.completed >= ticket {
                return Ok(());
            }
            if !st.syncing
                && let Some(sync) = sync.take()
            {
                st.syncing = true;
                let target = st.issued;
                drop(st);
                self.syncs.fetch_add(1, Ordering::Relaxed);
                let result = sync();
                st = self.state.lock();
                st.syncing = false;
                match result {
                    Ok(()) => st.completed = st.completed.max(target),
                    Err(_) => st.failed = true,
                }
                self.cv.notify_all();
                if let Err(e) = result {
                    return Err(FlushError::Sync(e));
                }
                continue;
            }
            self.cv.wait(&mut st);
        }
    }

    /// Fails this and every later flush, as a failed sync inside [`GroupCommit::flush`]
    /// does: for syncs of the owner's data made elsewhere (sealing a segment).
    pub fn poison(&self) {
        self.state.lock().failed = true;
        self.cv.notify_all();
    }

    /// True once a sync has failed.
    pub fn is_poisoned(&self) -> bool {
        self.state.lock().failed
    }

    /// (flush calls, syncs performed): the ratio shows how well flushes are grouped.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.flushes.load(Ordering::Relaxed),
            self.syncs.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn concurrent_flushes_share_syncs() {
        let gc = Arc::new(GroupCommit::new());
        let running = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let gc = gc.clone();
                let running = running.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        gc.flush(|| {
                            // Never two syncs at once.
                            assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0);
                            std::thread::sleep(Duration::from_millis(1));
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .expect("sync succeeds");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let (flushes, syncs) = gc.counters();
        assert_eq!(flushes, 160);
        assert!(
            syncs < flushes,
            "expected grouping, got {syncs} syncs for {flushes} flushes"
        );
    }

    #[test]
    fn failure_is_sticky() {
        let gc = GroupCommit::new();
        assert!(gc.flush(|| Ok(())).is_ok());
        assert!(matches!(
            gc.flush(|| Err(io::Error::other("EIO"))),
            Err(FlushError::Sync(_))
        ));
        assert!(matches!(gc.flush(|| Ok(())), Err(FlushError::Poisoned)));
        assert!(gc.is_poisoned());
    }
}
