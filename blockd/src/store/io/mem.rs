//! An in-memory file system with fault injection, for tests.
//!
//! Each file keeps its current contents and its durable contents (as of its last
//! `sync_data`), plus the writes made since. File names are durable once their directory
//! is synced. [`MemFs::crash`] returns the disk as it could look after a power loss:
//! durable contents, plus a random subset of the unsynced writes applied in order, the
//! last applied one possibly torn at 512-byte granularity; names not yet made durable are
//! gone. [`MemFs::flip_bytes`] damages durable bytes at rest; [`MemFs::fail_syncs_after`]
//! makes fdatasync fail with EIO. Every random choice comes from a seed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

use super::{FileIo, Fs};

/// Small deterministic generator (splitmix64) so tests replay exactly from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileState {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Op>,
}

fn apply(buf: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { off, data } => {
            let end = *off as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

#[derive(Debug)]
pub struct MemFile {
    state: Mutex<FileState>,
    fs: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Syncs left before fdatasync starts failing; negative = never fail.
    syncs_before_failure: AtomicI64,
}

impl Shared {
    fn sync_allowed(&self) -> bool {
        let left = self.syncs_before_failure.load(Ordering::SeqCst);
        if left < 0 {
            return true;
        }
        if left == 0 {
            return false;
        }
        self.syncs_before_failure.fetch_sub(1, Ordering::SeqCst);
        true
    }
}

impl FileIo for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let st = self.state.lock();
        let len = st.current.len() as u64;
        if off >= len {
            return Ok(0);
        }
        let n = ((len - off) as usize).min(buf.len());
        buf[..n].copy_from_slice(&st.current[off as usize..off as usize + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let op = Op::Write {
            off,
            data: buf.to_vec(),
        };
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        if !self.fs.sync_allowed() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut st = self.state.lock();
        st.durable = st.current.clone();
        st.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let op = Op::SetLen(len);
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let size = st.current.len() as u64;
        if off >= size {
            return Ok(());
        }
        let n = len.min(size - off);
        let op = Op::Write {
            off,
            data: vec![0; n as usize],
        };
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        // Count non-zero 4 KiB blocks, like a sparse file after hole punching.
        let st = self.state.lock();
        Ok(st
            .current
            .chunks(4096)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64
            * 4096)
    }
}

#[derive(Debug, Default)]
struct Tree {
    files: BTreeMap<PathBuf, Arc<MemFile>>,
    /// Names as they survive a crash: the directory entries as of each directory's last sync.
    durable_names: BTreeMap<PathBuf, Arc<MemFile>>,
    dirs: BTreeSet<PathBuf>,
}

/// The in-memory file system. Cheap to clone: clones share the same files.
#[derive(Debug, Clone, Default)]
pub struct MemFs {
    tree: Arc<Mutex<Tree>>,
    shared: Arc<Shared>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl MemFs {
    pub fn new() -> MemFs {
        let fs = MemFs::default();
        fs.shared.syncs_before_failure.store(-1, Ordering::SeqCst);
        fs
    }

    /// After `n` more successful fdatasyncs, every fdatasync fails with EIO.
    pub fn fail_syncs_after(&self, n: i64) {
        self.shared.syncs_before_failure.store(n, Ordering::SeqCst);
    }

    /// The disk after a power loss at this moment (see the module docs). The returned file
    /// system is independent of this one.
    pub fn crash(&self, rng: &mut Rng) -> MemFs {
        let tree = self.tree.lock();
        let out = MemFs::new();
        let mut new_tree = out.tree.lock();
        new_tree.dirs = tree.dirs.clone();
        for (path, file) in &tree.durable_names {
            let st = file.state.lock();
            let mut content = st.durable.clone();
            // Drop a random subset of the unsynced operations; tear the last applied write.
            let keep: Vec<bool> = st.pending.iter().map(|_| rng.chance(60)).collect();
            let last_kept = keep.iter().rposition(|&k| k);
            for (i, op) in st.pending.iter().enumerate() {
                if !keep[i] {
                    continue;
                }
                if Some(i) == last_kept
                    && rng.chance(50)
                    && let Op::Write { off, data } = op
                {
                    // Torn: only some 512-byte sectors reach the disk.
                    for (s, chunk) in data.chunks(512).enumerate() {
                        if rng.chance(50) {
                            let o = *off + (s * 512) as u64;
                            apply(
                                &mut content,
                                &Op::Write {
                                    off: o,
                                    data: chunk.to_vec(),
                                },
                            );
                        }
                    }
                    continue;
                }
                apply(&mut content, op);
            }
            let f = Arc::new(MemFile {
                state: Mutex::new(FileState {
                    current: content.clone(),
                    durable: content,
                    pending: Vec::new(),
                }),
                fs: out.shared.clone(),
            });
            new_tree.files.insert(path.clone(), f.clone());
            new_tree.durable_names.insert(path.clone(), f);
        }
        drop(new_tree);
        out
    }

    /// Flips `count` random bits in the durable contents of files whose path contains
    /// `filter`, avoiding the first `skip_bytes` of each file. Returns (path, offset) of
    /// each flip.
    pub fn flip_bytes(
        &self,
        rng: &mut Rng,
        filter: &str,
        skip_bytes: u64,
        count: usize,
    ) -> Vec<(PathBuf, u64)> {
        let tree = self.tree.lock();
        let candidates: Vec<(&PathBuf, &Arc<MemFile>)> = tree
            .files
            .iter()
            .filter(|(p, f)| {
                let st = f.state.lock();
                p.to_string_lossy().contains(filter)
                    && st.durable.len().min(st.current.len()) as u64 > skip_bytes
            })
            .collect();
        let mut flips = Vec::new();
        if candidates.is_empty() {
            return flips;
        }
        for _ in 0..count {
            let (path, file) = candidates[rng.below(candidates.len() as u64) as usize];
            let mut st = file.state.lock();
            // Bytes both views hold: a file truncated since its last sync (zeroes cut off a
            // sealed segment) no longer has the rest, whatever a crash would bring back.
            let len = st.durable.len().min(st.current.len()) as u64;
            let off = skip_bytes + rng.below(len - skip_bytes);
            let bit = 1u8 << rng.below(8);
            st.durable[off as usize] ^= bit;
            // At rest means on disk: the current view of a file open after a crash equals
            // its durable view, so flip both where they agree.
            st.current[off as usize] ^= bit;
            flips.push((path.clone(), off));
        }
        flips
    }

    /// Paths of all files, for tests.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.tree.lock().files.keys().cloned().collect()
    }
}

impl Fs for MemFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut t = self.tree.lock();
        let mut p = dir.to_path_buf();
        loop {
            t.dirs.insert(p.clone());
            if !p.pop() {
                break;
            }
        }
        Ok(())
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        let t = self.tree.lock();
        let f = t.files.get(path).cloned().ok_or_else(|| not_found(path))?;
        Ok(f)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        let mut t = self.tree.lock();
        if t.files.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        if let Some(parent) = path.parent()
            && !t.dirs.contains(parent)
        {
            return Err(not_found(parent));
        }
        let f = Arc::new(MemFile {
            state: Mutex::new(FileState::default()),
            fs: self.shared.clone(),
        });
        t.files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let t = self.tree.lock();
        let f = t.files.get(path).ok_or_else(|| not_found(path))?;
        Ok(f.state.lock().current.clone())
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        if !self.shared.sync_allowed() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let f = Arc::new(MemFile {
            state: Mutex::new(FileState {
                current: bytes.to_vec(),
                durable: bytes.to_vec(),
                pending: Vec::new(),
            }),
            fs: self.shared.clone(),
        });
        let mut t = self.tree.lock();
        t.files.insert(path.to_path_buf(), f.clone());
        t.durable_names.insert(path.to_path_buf(), f);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut t = self.tree.lock();
        t.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let t = self.tree.lock();
        Ok(t.files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut t = self.tree.lock();
        let Tree {
            files,
            durable_names,
            ..
        } = &mut *t;
        durable_names.retain(|p, _| p.parent() != Some(dir));
        for (p, f) in files.iter() {
            if p.parent() == Some(dir) {
                durable_names.insert(p.clone(), f.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_a_crash_and_unsynced_may_not() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).expect("mkdir");
        let f = fs.create(&dir.join("a")).expect("create");
        f.write_all_at(b"hello", 0).expect("write");
        f.sync_data().expect("sync");
        fs.sync_dir(dir).expect("sync dir");
        f.write_all_at(b"WORLD", 5).expect("write");
        let mut lost = 0;
        for seed in 0..200 {
            let after = fs.crash(&mut Rng::new(seed));
            let bytes = after.read(&dir.join("a")).expect("file survives");
            assert_eq!(&bytes[..5], b"hello");
            if bytes.len() == 5 || &bytes[5..] != b"WORLD" {
                lost += 1;
            }
        }
        assert!(
            lost > 0 && lost < 200,
            "unsynced write should sometimes survive, sometimes not: {lost}"
        );
    }

    #[test]
    fn names_need_a_directory_sync() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).expect("mkdir");
        let f = fs.create(&dir.join("new")).expect("create");
        f.write_all_at(b"x", 0).expect("write");
        f.sync_data().expect("sync");
        assert!(fs.crash(&mut Rng::new(1)).read(&dir.join("new")).is_err());
        fs.sync_dir(dir).expect("sync dir");
        assert_eq!(
            fs.crash(&mut Rng::new(1))
                .read(&dir.join("new"))
                .expect("durable"),
            b"x"
        );
    }

    #[test]
    fn failing_syncs_report_eio() {
        let fs = MemFs::new();
        fs.create_dir_all(Path::new("/d")).expect("mkdir");
        let f = fs.create(Path::new("/d/a")).expect("create");
        fs.fail_syncs_after(1);
        assert!(f.sync_data().is_ok());
        assert_eq!(
            f.sync_data().expect_err("eio").raw_os_error(),
            Some(libc::EIO)
        );
    }
}
