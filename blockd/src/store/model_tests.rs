//! Model-based and fault-injection tests of the extent store.
//!
//! Every test drives a [`Store`] on the in-memory file system with random operation
//! sequences drawn from a seed, and checks it against a simple model: per volume and
//! snapshot, its contents as a byte array (and, per byte, hole / allocated zero / data),
//! which objects exist and how they depend on each other, what must survive a crash, and
//! which operations must fail with which [`ErrorKind`].
//!
//! * [`model_based_operation_sequences`]: every store operation, reads and block status
//!   against the model, clean reopens (stats unchanged, `verify` clean).
//! * [`crashes_keep_every_flushed_write`]: power loss between operations and in the
//!   middle of one (a wrapper file system takes the crash image at its n-th I/O call),
//!   including during recovery; every flushed write, snapshot and control operation
//!   survives, and nothing else appears.
//! * [`payload_bit_flips_fail_only_the_affected_reads`],
//!   [`index_bit_flips_never_return_wrong_data`] and [`catalog_bit_flips_fail_the_open`]:
//!   damage at rest is reported as EIO (`ErrorKind::Corrupt`) and by `verify`, never
//!   returned as data.
//! * [`failed_fsyncs_fail_every_later_flush`]: a failed fdatasync fails that flush and
//!   every later one until reopen, and nothing flushed before it is lost.
//! * Regression tests for the bugs these found, at the end.
//!
//! A failure prints its seed and the last operations. `BLOCKD_SEED=<n>` replays one seed,
//! `BLOCKD_SEEDS=<count>` runs that many, `BLOCKD_TRACE=1` prints every operation.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use parking_lot::Mutex;

use super::catalog::{self, Config};
use super::compact::Policy;
use super::engine::{SnapshotDeletion, Store};
use super::format::{self, DAT_HEADER_BYTES, ENTRY_BYTES, MAX_RECORD_BYTES};
use super::io::mem::{MemFs, Rng};
use super::io::{FileIo, Fs, IoEngine};
use super::map::Target;
use super::volume::STATUS_SECTOR_BYTES;
use super::{ErrorKind, ExtentState, Result, ZeroMode, segment, verify};
use crate::names::Name;

const DIR: &str = "/data";

// ------------------------------------------------------------------ seeds and traces

/// The seeds to run: `BLOCKD_SEED` alone, or `0..BLOCKD_SEEDS`, or `0..default_count`.
fn seeds(default_count: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("BLOCKD_SEED") {
        return vec![
            s.trim()
                .parse()
                .expect("BLOCKD_SEED must be an unsigned integer"),
        ];
    }
    let n = match std::env::var("BLOCKD_SEEDS") {
        Ok(s) => s
            .trim()
            .parse()
            .expect("BLOCKD_SEEDS must be an unsigned integer"),
        Err(_) => default_count,
    };
    (0..n).collect()
}

const TRACE_LINES: usize = 150;

/// The recent operations of one seed; printed with the seed if the test panics.
struct Trace {
    test: &'static str,
    seed: u64,
    lines: VecDeque<String>,
    verbose: bool,
}

impl Trace {
    fn new(test: &'static str, seed: u64) -> Trace {
        Trace {
            test,
            seed,
            lines: VecDeque::new(),
            verbose: std::env::var_os("BLOCKD_TRACE").is_some(),
        }
    }

    fn note(&mut self, line: String) {
        if self.verbose {
            eprintln!("[seed {}] {line}", self.seed);
        }
        if self.lines.len() == TRACE_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("last operations of {} with seed {}:", self.test, self.seed);
            for l in &self.lines {
                eprintln!("    {l}");
            }
            eprintln!(
                "{} FAILED with seed {}; replay with: BLOCKD_SEED={} cargo test -p blockd --lib \
                 store::model_tests::{} -- --nocapture",
                self.test, self.seed, self.seed, self.test
            );
        }
    }
}

// ------------------------------------------------------------------ the model

const HOLE: u8 = 0;
const ZERO: u8 = 1;
const DATA: u8 = 2;

/// Contents of a volume or snapshot: bytes, and per byte hole / allocated zero / data.
/// Copy-on-write, so snapshots and model copies are cheap.
#[derive(Clone)]
struct Image {
    bytes: Arc<Vec<u8>>,
    state: Arc<Vec<u8>>,
}

impl Image {
    fn new(size: u64) -> Image {
        Image {
            bytes: Arc::new(vec![0; size as usize]),
            state: Arc::new(vec![HOLE; size as usize]),
        }
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let r = off as usize..off as usize + data.len();
        Arc::make_mut(&mut self.bytes)[r.clone()].copy_from_slice(data);
        Arc::make_mut(&mut self.state)[r].fill(DATA);
    }

    fn zero(&mut self, off: u64, len: u64, state: u8) {
        let r = off as usize..(off + len) as usize;
        Arc::make_mut(&mut self.bytes)[r.clone()].fill(0);
        Arc::make_mut(&mut self.state)[r].fill(state);
    }

    fn data_bytes(&self) -> u64 {
        self.state.iter().filter(|&&s| s == DATA).count() as u64
    }
}

/// A change not yet covered by a flush: after a crash each of its bytes may or may not be
/// there.
#[derive(Clone)]
enum Unflushed {
    Write { off: u64, data: Arc<Vec<u8>> },
    Zero { off: u64, len: u64 },
}

impl Unflushed {
    fn value_at(&self, i: u64) -> Option<u8> {
        match self {
            Unflushed::Write { off, data } => {
                (i >= *off && i < off + data.len() as u64).then(|| data[(i - off) as usize])
            }
            Unflushed::Zero { off, len } => (i >= *off && i < off + len).then_some(0),
        }
    }
}

#[derive(Clone)]
struct MVol {
    name: String,
    size: u64,
    cur: Image,
    /// False once a failed write left some bytes undefined: reads are then not checked.
    known: bool,
    /// Contents as of the last flush (or snapshot, reset, reopen, creation).
    durable: Arc<Vec<u8>>,
    unflushed: Vec<Unflushed>,
    /// Changes that failed part-way: their bytes may hold the old or the new values, also
    /// after later flushes, until the contents are read back.
    undefined: Vec<Unflushed>,
    origin: Option<u64>,
    clone_of: Option<u64>,
    /// A flush failed since the last open: every later one must fail.
    flush_failed: bool,
}

impl MVol {
    fn new(name: &str, img: Image, known: bool, origin: Option<u64>) -> MVol {
        MVol {
            name: name.to_owned(),
            size: img.len(),
            durable: img.bytes.clone(),
            cur: img,
            known,
            unflushed: Vec::new(),
            undefined: Vec::new(),
            origin,
            clone_of: origin,
            flush_failed: false,
        }
    }

    /// Everything written so far is durable.
    fn settle(&mut self) {
        self.durable = self.cur.bytes.clone();
        self.unflushed.clear();
    }

    fn apply(&mut self, op: &DataOp, off: u64, len: u64, data: &Arc<Vec<u8>>) {
        match op {
            DataOp::Write => {
                self.cur.write(off, data);
                self.unflushed.push(Unflushed::Write {
                    off,
                    data: data.clone(),
                });
            }
            DataOp::Trim => {
                self.cur.zero(off, len, HOLE);
                self.unflushed.push(Unflushed::Zero { off, len });
            }
            DataOp::Zero { may_trim } => {
                self.cur.zero(off, len, if *may_trim { HOLE } else { ZERO });
                self.unflushed.push(Unflushed::Zero { off, len });
            }
        }
    }

    /// A change that failed: some of it may have happened.
    fn failed(&mut self, op: &DataOp, off: u64, len: u64, data: &Arc<Vec<u8>>) {
        self.known = false;
        self.undefined.push(match op {
            DataOp::Write => Unflushed::Write {
                off,
                data: data.clone(),
            },
            _ => Unflushed::Zero { off, len },
        });
    }

    /// Whether `actual` could be this volume's contents after a crash: every byte holds
    /// its durable value or one written since.
    fn check_candidates(&self, actual: &[u8]) -> std::result::Result<(), String> {
        if actual.len() as u64 != self.size {
            return Err(format!(
                "volume {}: read {} bytes, size is {}",
                self.name,
                actual.len(),
                self.size
            ));
        }
        for (i, (&a, &d)) in actual.iter().zip(self.durable.iter()).enumerate() {
            if a == d {
                continue;
            }
            let i = i as u64;
            if !self
                .unflushed
                .iter()
                .chain(&self.undefined)
                .any(|u| u.value_at(i) == Some(a))
            {
                return Err(format!(
                    "volume {}: byte {i} is {a:#04x}; it was {d:#04x} at the last flush and no \
                     write since stored {a:#04x} there ({} unflushed changes)",
                    self.name,
                    self.unflushed.len()
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct MSnap {
    key: u64,
    /// None once deleted but kept (hidden) for dependents.
    name: Option<String>,
    volume: String,
    parent: Option<u64>,
    img: Image,
    known: bool,
    /// The volume's failed writes at snapshot time: their bytes may be in the snapshot,
    /// so a clone or reset from it may hold them too.
    undefined: Vec<Unflushed>,
}

/// What the store should hold: volumes and snapshots in catalog order, with the same
/// dependency rules (origin, parent, clone_of) and hidden-snapshot collection.
#[derive(Clone, Default)]
struct Model {
    vols: Vec<MVol>,
    snaps: Vec<MSnap>,
    next_key: u64,
}

type Want = std::result::Result<(), ErrorKind>;

impl Model {
    fn vol(&self, name: &str) -> Option<&MVol> {
        self.vols.iter().find(|v| v.name == name)
    }

    fn vol_mut(&mut self, name: &str) -> Option<&mut MVol> {
        self.vols.iter_mut().find(|v| v.name == name)
    }

    fn snap_key(&self, vol: &str, snap: &str) -> Option<u64> {
        self.snaps
            .iter()
            .find(|s| s.volume == vol && s.name.as_deref() == Some(snap))
            .map(|s| s.key)
    }

    fn snap(&self, key: u64) -> Option<&MSnap> {
        self.snaps.iter().find(|s| s.key == key)
    }

    fn hidden(&self) -> usize {
        self.snaps.iter().filter(|s| s.name.is_none()).count()
    }

    /// Export names: volumes and visible snapshots.
    fn exports(&self) -> Vec<String> {
        let mut out: Vec<String> = self.vols.iter().map(|v| v.name.clone()).collect();
        out.extend(
            self.snaps
                .iter()
                .filter_map(|s| s.name.as_ref().map(|n| format!("{}@{n}", s.volume))),
        );
        out
    }

    /// The image behind an export and whether it is exactly known.
    fn image(&self, export: &str) -> Option<(&Image, bool)> {
        match export.split_once('@') {
            None => self.vol(export).map(|v| (&v.cur, v.known)),
            Some((v, s)) => self
                .snap_key(v, s)
                .and_then(|k| self.snap(k))
                .map(|s| (&s.img, s.known)),
        }
    }

    fn name_free(&self, name: &str) -> Want {
        if self.vol(name).is_some() {
            return Err(ErrorKind::AlreadyExists);
        }
        if self
            .snaps
            .iter()
            .any(|s| s.volume == name && s.name.is_some())
        {
            return Err(ErrorKind::InvalidArgument);
        }
        Ok(())
    }

    fn create_volume(&mut self, name: &str, size: u64) -> Want {
        if super::check_volume_size(size).is_err() {
            return Err(ErrorKind::InvalidArgument);
        }
        self.name_free(name)?;
        self.vols
            .push(MVol::new(name, Image::new(size), true, None));
        Ok(())
    }

    fn create_snapshot(&mut self, vol: &str, snap: &str) -> Want {
        let v = self.vol(vol).ok_or(ErrorKind::NotFound)?;
        if self.snap_key(vol, snap).is_some() {
            return Err(ErrorKind::AlreadyExists);
        }
        let (parent, img, known) = (v.origin, v.cur.clone(), v.known);
        let undefined = v.undefined.clone();
        let key = self.next_key;
        self.next_key += 1;
        let s = MSnap {
            key,
            name: Some(snap.to_owned()),
            volume: vol.to_owned(),
            parent,
            img,
            known,
            undefined,
        };
        self.snaps.push(s);
        let v = self.vol_mut(vol).expect("checked above");
        v.origin = Some(key);
        v.settle();
        Ok(())
    }

    fn clone_volume(&mut self, vol: &str, snap: &str, name: &str) -> Want {
        self.name_free(name)?;
        let key = self.snap_key(vol, snap).ok_or(ErrorKind::NotFound)?;
        let s = self.snap(key).expect("found by key");
        let mut v = MVol::new(name, s.img.clone(), s.known, Some(key));
        v.undefined = s.undefined.clone();
        self.vols.push(v);
        Ok(())
    }

    fn reset(&mut self, vol: &str) -> Want {
        let v = self.vol(vol).ok_or(ErrorKind::NotFound)?;
        let (img, known, undefined) = match v.origin {
            Some(k) => {
                let s = self.snap(k).expect("origins exist");
                (s.img.clone(), s.known, s.undefined.clone())
            }
            None => (Image::new(v.size), true, Vec::new()),
        };
        let v = self.vol_mut(vol).expect("checked above");
        v.cur = img;
        v.known = known;
        v.undefined = undefined;
        v.settle();
        Ok(())
    }

    fn delete_volume(&mut self, vol: &str) -> Want {
        let i = self
            .vols
            .iter()
            .position(|v| v.name == vol)
            .ok_or(ErrorKind::NotFound)?;
        self.vols.remove(i);
        self.gc();
        Ok(())
    }

    /// Ok(clones that defer it) on success.
    fn delete_snapshot(
        &mut self,
        vol: &str,
        snap: &str,
        defer: bool,
    ) -> std::result::Result<Vec<String>, ErrorKind> {
        let key = self.snap_key(vol, snap).ok_or(ErrorKind::NotFound)?;
        let clones: Vec<String> = self
            .vols
            .iter()
            .filter(|v| v.clone_of == Some(key))
            .map(|v| v.name.clone())
            .collect();
        if !clones.is_empty() && !defer {
            return Err(ErrorKind::InUse);
        }
        if let Some(s) = self.snaps.iter_mut().find(|s| s.key == key) {
            s.name = None;
        }
        self.gc();
        Ok(clones)
    }

    /// Hidden snapshots with no dependent go; with one, they merge into it.
    fn gc(&mut self) {
        'again: loop {
            for i in 0..self.snaps.len() {
                if self.snaps[i].name.is_some() {
                    continue;
                }
                let key = self.snaps[i].key;
                let parent = self.snaps[i].parent;
                let vd: Vec<usize> = (0..self.vols.len())
                    .filter(|&j| self.vols[j].origin == Some(key))
                    .collect();
                let sd: Vec<usize> = (0..self.snaps.len())
                    .filter(|&j| self.snaps[j].parent == Some(key))
                    .collect();
                match (vd.as_slice(), sd.as_slice()) {
                    ([], []) => {}
                    ([v], []) => self.vols[*v].origin = parent,
                    ([], [c]) => self.snaps[*c].parent = parent,
                    _ => continue,
                }
                self.snaps.remove(i);
                continue 'again;
            }
            return;
        }
    }

    /// Referenced data bytes as `stats()` counts them: every volume and every snapshot,
    /// hidden ones included.
    fn referenced_bytes(&self) -> u64 {
        self.vols.iter().map(|v| v.cur.data_bytes()).sum::<u64>()
            + self.snaps.iter().map(|s| s.img.data_bytes()).sum::<u64>()
    }
}

// ------------------------------------------------------------------ crash points

/// Takes a crash image of the file system at its `at`-th mutating I/O call (before the
/// call runs), so that power loss can strike in the middle of an operation.
struct CrashPoint {
    calls: u64,
    at: Option<u64>,
    rng: Rng,
    image: Option<MemFs>,
}

impl CrashPoint {
    fn tick(&mut self, fs: &MemFs) {
        if self.image.is_none() && self.at == Some(self.calls) {
            self.image = Some(fs.crash(&mut self.rng));
        }
        self.calls += 1;
    }
}

struct CrashFs {
    inner: MemFs,
    point: Arc<Mutex<CrashPoint>>,
}

struct CrashFile {
    inner: Arc<dyn FileIo>,
    fs: MemFs,
    point: Arc<Mutex<CrashPoint>>,
}

impl CrashFile {
    fn tick(&self) {
        self.point.lock().tick(&self.fs);
    }
}

impl FileIo for CrashFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.tick();
        self.inner.write_all_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.tick();
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.tick();
        self.inner.set_len(len)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.tick();
        self.inner.punch_hole(off, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

impl CrashFs {
    fn tick(&self) {
        self.point.lock().tick(&self.inner);
    }

    fn wrap(&self, f: Arc<dyn FileIo>) -> Arc<dyn FileIo> {
        Arc::new(CrashFile {
            inner: f,
            fs: self.inner.clone(),
            point: self.point.clone(),
        })
    }
}

impl Fs for CrashFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.tick();
        self.inner.create_dir_all(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        self.inner.open(path).map(|f| self.wrap(f))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        self.tick();
        self.inner.create(path).map(|f| self.wrap(f))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.tick();
        self.inner.write_atomic(path, bytes)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.tick();
        self.inner.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.tick();
        self.inner.sync_dir(dir)
    }
}

// ------------------------------------------------------------------ the world

#[derive(Clone, Copy)]
struct Params {
    vol_names: &'static [&'static str],
    snap_names: &'static [&'static str],
    min_vol_bytes: u64,
    max_vol_bytes: u64,
    max_write_bytes: u64,
    segment_bytes: u64,
    /// Small, so that the catalog log fills up and the catalog is rewritten often.
    catalog_log_bytes: u64,
    /// Small, so that many writes take the direct-write path (no zeroes filled ahead).
    direct_write_min_bytes: u64,
}

const MODEL_PARAMS: Params = Params {
    vol_names: &["v0", "v1", "v2", "v3", "v4"],
    snap_names: &["a", "b", "c"],
    min_vol_bytes: 512 << 10,
    max_vol_bytes: 3 << 20,
    max_write_bytes: 400 << 10,
    segment_bytes: 256 << 10,
    catalog_log_bytes: 4096,
    direct_write_min_bytes: 16 << 10,
};

const CRASH_PARAMS: Params = Params {
    vol_names: &["v0", "v1", "v2"],
    snap_names: &["a", "b"],
    min_vol_bytes: 64 << 10,
    max_vol_bytes: 512 << 10,
    max_write_bytes: 200 << 10,
    segment_bytes: 256 << 10,
    catalog_log_bytes: 4096,
    direct_write_min_bytes: 16 << 10,
};

#[derive(Debug, Clone, Copy)]
enum DataOp {
    Write,
    Trim,
    Zero { may_trim: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    /// A client's pipelined writes in one `write_many` (one append for the small ones).
    WriteMany,
    Trim,
    Zero,
    Read,
    Flush,
    Snapshot,
    Clone,
    Reset,
    DeleteVolume,
    DeleteSnapshot,
    Compact,
    Reopen,
    BlockStatus,
    CreateVolume,
    InUse,
    ReadOnly,
}

const MODEL_MIX: &[(Op, u64)] = &[
    (Op::Write, 26),
    (Op::WriteMany, 8),
    (Op::Trim, 5),
    (Op::Zero, 5),
    (Op::Read, 12),
    (Op::Flush, 6),
    (Op::Snapshot, 5),
    (Op::Clone, 4),
    (Op::Reset, 2),
    (Op::DeleteVolume, 2),
    (Op::DeleteSnapshot, 4),
    (Op::Compact, 4),
    (Op::Reopen, 2),
    (Op::BlockStatus, 6),
    (Op::CreateVolume, 3),
    (Op::InUse, 1),
    (Op::ReadOnly, 1),
];

const CRASH_MIX: &[(Op, u64)] = &[
    (Op::Write, 30),
    (Op::WriteMany, 10),
    (Op::Trim, 5),
    (Op::Zero, 5),
    (Op::Read, 3),
    (Op::Flush, 12),
    (Op::Snapshot, 5),
    (Op::Clone, 4),
    (Op::Reset, 2),
    (Op::DeleteVolume, 2),
    (Op::DeleteSnapshot, 4),
    (Op::Compact, 5),
    (Op::Reopen, 2),
    (Op::CreateVolume, 3),
];

const FSYNC_MIX: &[(Op, u64)] = &[
    (Op::Write, 30),
    (Op::WriteMany, 10),
    (Op::Trim, 5),
    (Op::Zero, 5),
    (Op::Flush, 15),
    (Op::Snapshot, 4),
    (Op::Clone, 2),
    (Op::Reset, 1),
    (Op::DeleteVolume, 1),
    (Op::DeleteSnapshot, 3),
    (Op::Compact, 3),
    (Op::CreateVolume, 2),
];

fn name(s: &str) -> Name {
    Name::parse("volume", s).expect("test names are valid")
}

fn first_diff(want: &[u8], got: &[u8]) -> Option<usize> {
    if want.len() != got.len() {
        return Some(want.len().min(got.len()));
    }
    want.iter().zip(got).position(|(a, b)| a != b)
}

fn read_export(store: &Store, export: &str, off: u64, len: u64) -> Result<Vec<u8>> {
    let v = store.open_export(export)?;
    let mut buf = vec![0u8; len as usize];
    v.read(off, &mut buf)?;
    Ok(buf)
}

fn max_state(state: &[u8]) -> ExtentState {
    match state.iter().copied().max() {
        Some(DATA) => ExtentState::Data,
        Some(ZERO) => ExtentState::Zero,
        _ => ExtentState::Hole,
    }
}

struct World {
    fs: MemFs,
    /// Set by the `*_on_files_*` tests: the store runs on real files in a temporary
    /// directory through a production I/O engine instead of on `fs`.
    files: Option<(tempfile::TempDir, Arc<dyn Fs>)>,
    /// Set in crash tests: the store runs on a [`CrashFs`] over `fs`.
    point: Option<Arc<Mutex<CrashPoint>>>,
    store: Option<Store>,
    m: Model,
    rng: Rng,
    t: Trace,
    p: Params,
    /// Hole/zero/data of every byte is known (false after a crash: recovered contents are
    /// taken from the store).
    states_known: bool,
    /// Operations may fail with an I/O error (fsync failure tests).
    allow_io: bool,
    /// I/O errors seen so far.
    io_errors: u64,
    /// Control operations that failed with an I/O error. The one whose catalog record was
    /// written but not synced may show as done after a reopen or a crash (at most one:
    /// after a failed catalog write no change is written until the store is reopened).
    uncertain: Vec<ModelOp>,
}

/// A control operation as applied to the model.
type ModelOp = Rc<dyn Fn(&mut Model) -> Want>;

impl World {
    fn new(test: &'static str, seed: u64, salt: u64, p: Params, crash_points: bool) -> World {
        let mut rng = Rng::new(seed ^ salt);
        let point = crash_points.then(|| {
            Arc::new(Mutex::new(CrashPoint {
                calls: 0,
                at: None,
                rng: Rng::new(rng.next_u64()),
                image: None,
            }))
        });
        let mut w = World {
            fs: MemFs::new(),
            files: None,
            point,
            store: None,
            m: Model::default(),
            rng,
            t: Trace::new(test, seed),
            p,
            states_known: true,
            allow_io: false,
            io_errors: 0,
            uncertain: Vec::new(),
        };
        w.store = Some(w.open_store().expect("open a new store"));
        w
    }

    /// A world whose store lives in a temporary directory, served by `engine` (no fault
    /// injection: for the model-based sequences only).
    fn on_files(test: &'static str, seed: u64, salt: u64, p: Params, engine: IoEngine) -> World {
        let mut w = World::new(test, seed, salt, p, false);
        w.store = None;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let fs = engine.fs().expect("the I/O engine is available");
        w.files = Some((dir, fs));
        w.store = Some(w.open_store().expect("open a new store on files"));
        w
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    fn open_store(&self) -> Result<Store> {
        if let Some((dir, fs)) = &self.files {
            return Store::open(
                fs.clone(),
                dir.path(),
                Config {
                    segment_bytes: self.p.segment_bytes,
                    catalog_log_bytes: self.p.catalog_log_bytes,
                    direct_write_min_bytes: self.p.direct_write_min_bytes,
                },
            );
        }
        let fs: Arc<dyn Fs> = match &self.point {
            Some(p) => Arc::new(CrashFs {
                inner: self.fs.clone(),
                point: p.clone(),
            }),
            None => Arc::new(self.fs.clone()),
        };
        Store::open(
            fs,
            Path::new(DIR),
            Config {
                segment_bytes: self.p.segment_bytes,
                catalog_log_bytes: self.p.catalog_log_bytes,
                direct_write_min_bytes: self.p.direct_write_min_bytes,
            },
        )
    }

    fn pick(&mut self, xs: &[&'static str]) -> &'static str {
        xs[self.rng.below(xs.len() as u64) as usize]
    }

    /// A volume name: usually an existing volume, sometimes any name of the pool.
    fn vol_target(&mut self) -> String {
        if !self.m.vols.is_empty() && !self.rng.chance(8) {
            let i = self.rng.below(self.m.vols.len() as u64) as usize;
            return self.m.vols[i].name.clone();
        }
        self.pick(self.p.vol_names).to_owned()
    }

    /// (volume, snapshot): usually an existing visible snapshot.
    fn snap_target(&mut self) -> (String, String) {
        let visible: Vec<(String, String)> = self
            .m
            .snaps
            .iter()
            .filter_map(|s| s.name.as_ref().map(|n| (s.volume.clone(), n.clone())))
            .collect();
        if !visible.is_empty() && !self.rng.chance(10) {
            return visible[self.rng.below(visible.len() as u64) as usize].clone();
        }
        let v = self.pick(self.p.vol_names).to_owned();
        let s = self.pick(self.p.snap_names).to_owned();
        (v, s)
    }

    /// A name for a new volume: usually a free one.
    fn new_vol_name(&mut self) -> &'static str {
        let free: Vec<&'static str> = self
            .p
            .vol_names
            .iter()
            .copied()
            .filter(|n| self.m.vol(n).is_none())
            .collect();
        if !free.is_empty() && self.rng.chance(70) {
            return free[self.rng.below(free.len() as u64) as usize];
        }
        self.pick(self.p.vol_names)
    }

    fn vol_size(&mut self) -> u64 {
        match self.rng.below(40) {
            0 => 0,
            1 => 1000,
            _ => {
                let span = (self.p.max_vol_bytes - self.p.min_vol_bytes) / 512;
                self.p.min_vol_bytes + self.rng.below(span + 1) * 512
            }
        }
    }

    /// A random range in a volume of `size` bytes: small, medium or large, aligned to
    /// 4096, 512 or not at all, now and then beyond the end.
    fn range(&mut self, size: u64, max_len: u64) -> (u64, u64) {
        let r = &mut self.rng;
        let mut len = match r.below(10) {
            0..=3 => 1 + r.below(4096),
            4..=6 => 1 + r.below(64 << 10),
            7 => MAX_RECORD_BYTES as u64 - 512 + r.below(1024),
            _ => 1 + r.below(max_len),
        };
        let align = match r.below(4) {
            0 => 4096,
            1 => 512,
            _ => 1,
        };
        len = len.next_multiple_of(align).min(size).max(1);
        let mut off = r.below(size - len + 1) / align * align;
        if r.chance(3) {
            off = size - len + 1 + r.below(8192);
        }
        (off, len)
    }

    fn data(&mut self, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize + 8);
        if self.rng.chance(25) {
            out.resize(len as usize, 1 + self.rng.below(255) as u8);
        } else {
            while (out.len() as u64) < len {
                out.extend_from_slice(&self.rng.next_u64().to_le_bytes());
            }
            out.truncate(len as usize);
        }
        out
    }

    /// Checks a store result against the model's expectation; returns the value when both
    /// agree on success. With `allow_io`, an I/O error (or the failed-flush error that
    /// follows one) is accepted in place of success, returned as `Err(())`.
    fn outcome<T>(
        &mut self,
        what: &str,
        got: Result<T>,
        want: Want,
    ) -> std::result::Result<Option<T>, ()> {
        match (got, want) {
            (Ok(v), Ok(())) => Ok(Some(v)),
            (Err(e), Err(k)) if e.kind() == k => Ok(None),
            (Err(e), Ok(()))
                if self.allow_io && matches!(e.kind(), ErrorKind::Io | ErrorKind::FlushFailed) =>
            {
                self.io_errors += 1;
                Err(())
            }
            (Ok(_), Err(k)) => panic!("{what}: succeeded; the model expected {k:?}"),
            (Err(e), _) => panic!(
                "{what}: failed with {:?} ({e}); the model expected {want:?}",
                e.kind()
            ),
        }
    }

    /// Runs a control operation on the store and on a copy of the model; keeps the copy
    /// if the store succeeded.
    fn control<T>(
        &mut self,
        what: String,
        model: impl Fn(&mut Model) -> Want + 'static,
        store: impl FnOnce(&Store) -> Result<T>,
    ) -> Option<T> {
        self.t.note(what.clone());
        let mut next = self.m.clone();
        let want = model(&mut next);
        let got = store(self.store());
        match self.outcome(&what, got, want) {
            Ok(Some(v)) => {
                self.m = next;
                Some(v)
            }
            Ok(None) => {
                self.t.note(format!("  -> {want:?}"));
                None
            }
            Err(()) => {
                self.t.note(format!("  -> I/O error: {what} failed"));
                self.uncertain.push(Rc::new(model));
                None
            }
        }
    }

    fn random_op(&mut self, mix: &[(Op, u64)]) {
        let total: u64 = mix.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(total);
        let mut op = mix[0].0;
        for &(o, w) in mix {
            if x < w {
                op = o;
                break;
            }
            x -= w;
        }
        self.do_op(op);
    }

    fn do_op(&mut self, op: Op) {
        match op {
            Op::Write => self.op_data(DataOp::Write),
            Op::WriteMany => self.op_write_many(),
            Op::Trim => self.op_data(DataOp::Trim),
            Op::Zero => {
                let may_trim = self.rng.chance(50);
                self.op_data(DataOp::Zero { may_trim })
            }
            Op::Read => self.op_read(),
            Op::Flush => self.op_flush(),
            Op::Snapshot => self.op_snapshot(),
            Op::Clone => self.op_clone(),
            Op::Reset => self.op_reset(),
            Op::DeleteVolume => self.op_delete_volume(),
            Op::DeleteSnapshot => self.op_delete_snapshot(),
            Op::Compact => self.op_compact(),
            Op::Reopen => self.op_reopen(),
            Op::BlockStatus => self.op_block_status(),
            Op::CreateVolume => self.op_create_volume(),
            Op::InUse => self.op_in_use(),
            Op::ReadOnly => self.op_read_only(),
        }
    }

    // -------------------------------------------------------------- data operations

    fn op_data(&mut self, op: DataOp) {
        let vol = self.vol_target();
        let size = self.m.vol(&vol).map(|v| v.size);
        let (off, len) = self.range(size.unwrap_or(1 << 20), self.p.max_write_bytes);
        let data = Arc::new(match op {
            DataOp::Write => self.data(len),
            _ => Vec::new(),
        });
        let want = match size {
            None => Err(ErrorKind::NotFound),
            Some(s) if off + len > s => Err(ErrorKind::OutOfRange),
            Some(_) => Ok(()),
        };
        let fast_only = self.rng.chance(50);
        let what = format!("{op:?} {vol} {off}+{len}");
        self.t.note(what.clone());
        let got = self.store().open_export(&vol).and_then(|v| match op {
            DataOp::Write => v.write(off, &data),
            DataOp::Trim => v.trim(off, len),
            DataOp::Zero { may_trim } => v.write_zeroes(
                off,
                len,
                ZeroMode {
                    may_trim,
                    fast_only,
                },
            ),
        });
        match self.outcome(&what, got, want) {
            Ok(Some(())) => {
                let v = self.m.vol_mut(&vol).expect("exists");
                v.apply(&op, off, len, &data);
            }
            Ok(None) => {}
            Err(()) => {
                // Failed part-way: each byte of the range is old or new.
                self.t
                    .note("  -> I/O error: the range is now undefined".into());
                let v = self.m.vol_mut(&vol).expect("exists");
                v.failed(&op, off, len, &data);
            }
        }
        if self.rng.chance(40) {
            self.check_read_at(&vol, off.min(size.unwrap_or(0)), len);
        }
    }

    /// 2 to 8 writes to one volume in one `write_many`, mostly small and often overlapping
    /// each other (a later one wins), now and then one out of range (then none happens).
    fn op_write_many(&mut self) {
        let vol = self.vol_target();
        let size = self.m.vol(&vol).map(|v| v.size);
        let n = 2 + self.rng.below(7);
        let mut writes = Vec::new();
        for _ in 0..n {
            let (mut off, len) = self.range(size.unwrap_or(1 << 20), self.p.max_write_bytes);
            if let Some(&(prev, _)) = writes.last()
                && self.rng.chance(30)
            {
                off = prev;
            }
            writes.push((off, Arc::new(self.data(len))));
        }
        let want = match size {
            None => Err(ErrorKind::NotFound),
            Some(s) if writes.iter().any(|(o, d)| o + d.len() as u64 > s) => {
                Err(ErrorKind::OutOfRange)
            }
            Some(_) => Ok(()),
        };
        let what = format!(
            "write_many {vol} {:?}",
            writes
                .iter()
                .map(|(o, d)| (*o, d.len()))
                .collect::<Vec<_>>()
        );
        self.t.note(what.clone());
        let args: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        let got = self
            .store()
            .open_export(&vol)
            .and_then(|v| v.write_many(&args));
        match self.outcome(&what, got, want) {
            Ok(Some(())) => {
                let v = self.m.vol_mut(&vol).expect("exists");
                for (off, data) in &writes {
                    v.apply(&DataOp::Write, *off, data.len() as u64, data);
                }
            }
            Ok(None) => {}
            Err(()) => {
                self.t
                    .note("  -> I/O error: the ranges are now undefined".into());
                let v = self.m.vol_mut(&vol).expect("exists");
                for (off, data) in &writes {
                    v.failed(&DataOp::Write, *off, data.len() as u64, data);
                }
            }
        }
        if let Some((off, data)) = writes.first()
            && self.rng.chance(40)
        {
            self.check_read_at(&vol, (*off).min(size.unwrap_or(0)), data.len() as u64);
        }
    }

    fn op_flush(&mut self) {
        let vol = self.vol_target();
        // Now and then flush a snapshot export: always fine, nothing to do.
        let export = match self.m.snaps.iter().find(|s| s.name.is_some()) {
            Some(s) if self.rng.chance(5) => {
                format!("{}@{}", s.volume, s.name.as_deref().unwrap_or(""))
            }
            _ => vol.clone(),
        };
        self.t.note(format!("flush {export}"));
        let got = self.store().open_export(&export).and_then(|v| v.flush());
        let Some(v) = self.m.vols.iter_mut().find(|v| v.name == export) else {
            let want = if export.contains('@') {
                Ok(())
            } else {
                Err(ErrorKind::NotFound)
            };
            let _ = self.outcome(&format!("flush {export}"), got, want);
            return;
        };
        match got {
            Ok(()) => {
                assert!(
                    !v.flush_failed,
                    "flush {export} succeeded after an earlier flush failed"
                );
                v.settle();
            }
            Err(e) if self.allow_io => {
                let k = e.kind();
                if v.flush_failed {
                    assert_eq!(
                        k,
                        ErrorKind::FlushFailed,
                        "flush {export} after a failed flush: {e}"
                    );
                } else {
                    assert!(
                        matches!(k, ErrorKind::Io | ErrorKind::FlushFailed),
                        "flush {export}: {e}"
                    );
                }
                self.t.note(format!("  -> flush failed: {k:?}"));
                v.flush_failed = true;
                self.io_errors += 1;
            }
            Err(e) => panic!("flush {export}: {e}"),
        }
    }

    fn op_read(&mut self) {
        let exports = self.m.exports();
        if exports.is_empty() {
            return;
        }
        let e = exports[self.rng.below(exports.len() as u64) as usize].clone();
        let size = self.m.image(&e).map(|(i, _)| i.len()).unwrap_or(0);
        let (off, len) = self.range(size, 512 << 10);
        self.check_read_at(&e, off, len);
    }

    /// Reads `len` bytes at `off` of an export and compares with the model.
    fn check_read_at(&mut self, export: &str, off: u64, len: u64) {
        let Some((img, known)) = self.m.image(export) else {
            return;
        };
        let size = img.len();
        let got = read_export(self.store(), export, off, len);
        if off + len > size {
            assert_eq!(
                got.map(|_| ()).map_err(|e| e.kind()),
                Err(ErrorKind::OutOfRange),
                "read {export} {off}+{len} beyond the end ({size})"
            );
            return;
        }
        let got = got.unwrap_or_else(|e| panic!("read {export} {off}+{len}: {e}"));
        if !known {
            return;
        }
        let want = &img.bytes[off as usize..(off + len) as usize];
        if let Some(i) = first_diff(want, &got) {
            panic!(
                "read {export} {off}+{len}: byte {} is {:#04x}, the model has {:#04x}",
                off + i as u64,
                got[i],
                want[i]
            );
        }
    }

    fn op_block_status(&mut self) {
        let exports = self.m.exports();
        if exports.is_empty() {
            return;
        }
        let e = exports[self.rng.below(exports.len() as u64) as usize].clone();
        let size = self.m.image(&e).map(|(i, _)| i.len()).unwrap_or(0);
        let (off, len) = self.range(size, size);
        let max = [1, 2, 3, 8, 64, 100_000][self.rng.below(6) as usize];
        self.check_block_status(&e, off, len, max);
    }

    /// Block status of a range: well formed, exact per 512-byte sector (the highest state
    /// in a sector wins), and holes and zeroes read as zeroes.
    fn check_block_status(&mut self, export: &str, off: u64, len: u64, max: usize) {
        let Some((img, known)) = self.m.image(export) else {
            return;
        };
        let img = img.clone();
        let size = img.len();
        self.t
            .note(format!("block_status {export} {off}+{len} max {max}"));
        let got = self
            .store()
            .open_export(export)
            .and_then(|v| v.block_status(off, len, max));
        if off + len > size {
            assert_eq!(
                got.map(|_| ()).map_err(|e| e.kind()),
                Err(ErrorKind::OutOfRange)
            );
            return;
        }
        let ext = got.unwrap_or_else(|e| panic!("block_status {export} {off}+{len}: {e}"));
        let what = format!("block_status {export} {off}+{len} max {max}: {ext:?}");
        assert!(!ext.is_empty() && ext.len() <= max.max(1), "{what}");
        assert!(ext.iter().all(|e| e.len > 0), "{what}");
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert!(total >= 1 && total <= len, "{what}");
        if max >= 100_000 {
            assert_eq!(total, len, "{what}");
        }
        let actual = read_export(self.store(), export, off, total)
            .unwrap_or_else(|e| panic!("read after {what}: {e}"));
        let g = STATUS_SECTOR_BYTES;
        let mut pos = off;
        for e in &ext {
            let end = pos + e.len;
            if e.state != ExtentState::Data {
                let bytes = &actual[(pos - off) as usize..(end - off) as usize];
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "{what}: {pos}..{end} is reported {:?} but does not read as zeroes",
                    e.state
                );
            }
            if known && self.states_known {
                let mut s = pos;
                while s < end {
                    let t = ((s / g + 1) * g).min(end);
                    let want = max_state(&img.state[s as usize..t as usize]);
                    assert_eq!(
                        e.state, want,
                        "{what}: bytes {s}..{t} are {want:?} in the model"
                    );
                    s = t;
                }
            }
            pos = end;
        }
    }

    // -------------------------------------------------------------- control operations

    fn op_create_volume(&mut self) {
        let vol = self.new_vol_name();
        let size = self.vol_size();
        self.control(
            format!("create_volume {vol} {size}"),
            move |m| m.create_volume(vol, size),
            |s| s.create_volume(&name(vol), size),
        );
    }

    fn op_snapshot(&mut self) {
        let vol = self.vol_target();
        let snap = self.pick(self.p.snap_names);
        self.control(
            format!("create_snapshot {vol}@{snap}"),
            {
                let vol = vol.clone();
                move |m| m.create_snapshot(&vol, snap)
            },
            |s| s.create_snapshot(&name(&vol), &name(snap)),
        );
    }

    fn op_clone(&mut self) {
        let (vol, snap) = self.snap_target();
        let new = self.new_vol_name();
        self.control(
            format!("clone {vol}@{snap} -> {new}"),
            {
                let (vol, snap) = (vol.clone(), snap.clone());
                move |m| m.clone_volume(&vol, &snap, new)
            },
            |s| s.clone_volume(&format!("{vol}@{snap}"), &name(new)),
        );
    }

    fn op_reset(&mut self) {
        let vol = self.vol_target();
        self.control(
            format!("reset {vol}"),
            {
                let vol = vol.clone();
                move |m| m.reset(&vol)
            },
            |s| s.reset_volume(&vol),
        );
    }

    fn op_delete_volume(&mut self) {
        let vol = self.vol_target();
        self.control(
            format!("delete_volume {vol}"),
            {
                let vol = vol.clone();
                move |m| m.delete_volume(&vol)
            },
            |s| s.delete_volume(&vol),
        );
    }

    fn op_delete_snapshot(&mut self) {
        let (vol, snap) = self.snap_target();
        let defer = self.rng.chance(50);
        let found = Rc::new(RefCell::new(Vec::new()));
        let got = self.control(
            format!("delete_snapshot {vol}@{snap} defer={defer}"),
            {
                let (vol, snap, found) = (vol.clone(), snap.clone(), found.clone());
                move |m| {
                    *found.borrow_mut() = m.delete_snapshot(&vol, &snap, defer)?;
                    Ok(())
                }
            },
            |s| s.delete_snapshot(&format!("{vol}@{snap}"), defer),
        );
        let mut clones = found.take();
        match got {
            None => {}
            Some(SnapshotDeletion::Deleted) => assert!(
                clones.is_empty(),
                "delete {vol}@{snap}: deleted, but clones {clones:?} exist"
            ),
            Some(SnapshotDeletion::Deferred { clones: mut got }) => {
                got.sort();
                clones.sort();
                assert_eq!(got, clones, "delete {vol}@{snap}: deferred by");
            }
        }
    }

    fn op_compact(&mut self) {
        let policy = Policy {
            rewrite_below_live_fraction: [0.0, 0.25, 0.6, 0.95][self.rng.below(4) as usize],
            punch_min_dead_bytes: [0, 4096, 64 << 10][self.rng.below(3) as usize],
        };
        self.t.note(format!("compact {policy:?}"));
        match self.store().compact(&policy) {
            Ok(report) => self.t.note(format!("  -> {report:?}")),
            Err(e)
                if self.allow_io && matches!(e.kind(), ErrorKind::Io | ErrorKind::FlushFailed) =>
            {
                self.io_errors += 1;
                self.t.note(format!("  -> {e}"))
            }
            Err(e) => panic!("compact: {e}"),
        }
    }

    /// Clean reopen on the same file system: everything written is still there (and now
    /// durable), the stats do not change, `verify` finds nothing wrong.
    fn op_reopen(&mut self) {
        self.t.note("reopen".into());
        let before = self.store().stats();
        self.store = None;
        self.store = Some(
            self.open_store()
                .unwrap_or_else(|e| panic!("clean reopen: {e}")),
        );
        let after = self.store().stats();
        assert_eq!(before, after, "stats changed across a clean reopen");
        for v in &mut self.m.vols {
            v.settle();
            v.flush_failed = false;
        }
        self.check_names();
        self.check_verify();
    }

    /// Holding an export open blocks deleting and resetting it.
    fn op_in_use(&mut self) {
        if self.rng.chance(50) {
            let Some(v) = self.m.vols.first().map(|v| v.name.clone()) else {
                return;
            };
            self.t.note(format!("in use: {v}"));
            let h = self.store().open_export(&v).expect("open volume");
            let e = self
                .store()
                .delete_volume(&v)
                .expect_err("delete while open");
            assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
            let e = self.store().reset_volume(&v).expect_err("reset while open");
            assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
            drop(h);
        } else {
            let Some(e) = self.m.exports().into_iter().find(|e| e.contains('@')) else {
                return;
            };
            self.t.note(format!("in use: {e}"));
            let h = self.store().open_export(&e).expect("open snapshot");
            let err = self
                .store()
                .delete_snapshot(&e, true)
                .expect_err("delete while open");
            assert_eq!(err.kind(), ErrorKind::InUse, "{err}");
            drop(h);
        }
    }

    fn op_read_only(&mut self) {
        let Some(e) = self.m.exports().into_iter().find(|e| e.contains('@')) else {
            return;
        };
        self.t.note(format!("read-only: {e}"));
        let h = self.store().open_export(&e).expect("open snapshot");
        assert!(h.is_read_only());
        let kinds = [
            h.write(0, &[1]).map_err(|e| e.kind()),
            h.trim(0, 512).map_err(|e| e.kind()),
            h.write_zeroes(0, 512, ZeroMode::default())
                .map_err(|e| e.kind()),
        ];
        for k in kinds {
            assert_eq!(k, Err(ErrorKind::ReadOnly));
        }
        h.flush().expect("flushing a snapshot is a no-op");
    }

    // -------------------------------------------------------------- whole-store checks

    /// How `list_volumes` names a snapshot: `VOLUME@SNAP`, or `VOLUME@(deleted #id)` once
    /// hidden (the id is the store's; only the prefix is compared), or nothing once gone.
    fn label(&self, key: Option<u64>) -> Option<String> {
        let s = self.m.snap(key?)?;
        Some(match &s.name {
            Some(n) => format!("{}@{n}", s.volume),
            None => format!("{}@(deleted", s.volume),
        })
    }

    fn check_names(&self) {
        let store = self.store();
        let infos = store.list_volumes();
        let got: BTreeSet<String> = infos.iter().map(|v| v.name.clone()).collect();
        let want: BTreeSet<String> = self.m.vols.iter().map(|v| v.name.clone()).collect();
        assert_eq!(got, want, "volumes");
        let same = |got: &Option<String>, want: Option<String>| match (got, want) {
            (Some(g), Some(w)) => g.starts_with(&w),
            (g, w) => g.is_none() && w.is_none(),
        };
        for info in &infos {
            let v = self.m.vol(&info.name).expect("compared above");
            assert_eq!(info.size_bytes, v.size, "{info:?}");
            assert!(same(&info.clone_of, self.label(v.clone_of)), "{info:?}");
            assert!(same(&info.origin, self.label(v.origin)), "{info:?}");
        }
        for info in store.list_snapshots(None) {
            let (vol, snap) = info.name.split_once('@').expect("VOLUME@SNAP");
            let key = self.m.snap_key(vol, snap);
            let Some(s) = key.and_then(|k| self.m.snap(k)) else {
                panic!("unexpected snapshot {info:?}");
            };
            assert_eq!(info.size_bytes, s.img.len(), "{info:?}");
            let mut clones: Vec<String> = self
                .m
                .vols
                .iter()
                .filter(|v| v.clone_of == key)
                .map(|v| v.name.clone())
                .collect();
            clones.sort();
            let mut got = info.clones.clone();
            got.sort();
            assert_eq!(got, clones, "{info:?}");
            if self.states_known && s.known {
                assert_eq!(info.data_bytes, s.img.data_bytes(), "{info:?}");
            }
        }
        let got: BTreeSet<String> = store
            .list_snapshots(None)
            .into_iter()
            .map(|s| s.name)
            .collect();
        let want: BTreeSet<String> = self
            .m
            .exports()
            .into_iter()
            .filter(|e| e.contains('@'))
            .collect();
        assert_eq!(got, want, "snapshots");
    }

    fn check_verify(&self) {
        let rep = match &self.files {
            Some((dir, fs)) => verify::check(&**fs, dir.path()),
            None => verify::check(&self.fs, Path::new(DIR)),
        };
        assert_eq!(
            rep.errors(),
            0,
            "verify found errors in a healthy store: {:?}",
            rep.findings
        );
    }

    fn check_stats(&self) {
        let s = self.store().stats();
        assert_eq!(s.volumes, self.m.vols.len(), "{s:?}");
        assert_eq!(s.snapshots, self.m.snaps.len() - self.m.hidden(), "{s:?}");
        assert_eq!(s.hidden_snapshots, self.m.hidden(), "{s:?}");
        assert_eq!(
            s.logical_bytes,
            self.m.vols.iter().map(|v| v.size).sum::<u64>(),
            "{s:?}"
        );
        if self.states_known {
            assert_eq!(s.referenced_bytes, self.m.referenced_bytes(), "{s:?}");
        }
        assert!(s.stored_bytes <= s.referenced_bytes, "{s:?}");
        assert!(s.physical_bytes >= s.stored_bytes, "{s:?}");
    }

    /// Reads every export whole (in random pieces) and checks its block status.
    fn full_check(&mut self) {
        self.t.note("full check".into());
        self.check_names();
        for e in self.m.exports() {
            let size = self.m.image(&e).map(|(i, _)| i.len()).unwrap_or(0);
            let mut off = 0;
            while off < size {
                let len = (1 + self.rng.below(1 << 20)).min(size - off);
                self.check_read_at(&e, off, len);
                off += len;
            }
            self.check_block_status(&e, 0, size, 100_000);
        }
        self.check_stats();
    }

    /// Flushes every volume (must succeed).
    fn flush_all(&mut self) {
        self.t.note("flush_all".into());
        self.store().flush_all().expect("flush all");
        for v in &mut self.m.vols {
            v.settle();
        }
    }

    // -------------------------------------------------------------- crashes

    /// Checks the store just recovered from a crash against a model of what was there
    /// before: the same objects, snapshots exact, volumes within their candidates.
    /// Returns the model updated to the recovered contents.
    fn check_recovered(&self, m: &Model) -> std::result::Result<Model, String> {
        let store = self.store();
        let got: BTreeSet<String> = store.list_volumes().into_iter().map(|v| v.name).collect();
        let want: BTreeSet<String> = m.vols.iter().map(|v| v.name.clone()).collect();
        if got != want {
            return Err(format!("volumes {got:?}, expected {want:?}"));
        }
        let got: BTreeSet<String> = store
            .list_snapshots(None)
            .into_iter()
            .map(|s| s.name)
            .collect();
        let want: BTreeSet<String> = m
            .exports()
            .into_iter()
            .filter(|e| e.contains('@'))
            .collect();
        if got != want {
            return Err(format!("snapshots {got:?}, expected {want:?}"));
        }
        let hidden = store.stats().hidden_snapshots;
        if hidden != m.hidden() {
            return Err(format!(
                "{hidden} hidden snapshots, expected {}",
                m.hidden()
            ));
        }
        let mut next = m.clone();
        for v in &mut next.vols {
            let actual = read_export(store, &v.name, 0, v.size)
                .map_err(|e| format!("reading volume {}: {e}", v.name))?;
            v.check_candidates(&actual)?;
            v.cur = Image {
                bytes: Arc::new(actual),
                state: v.cur.state.clone(),
            };
            v.known = true;
            v.flush_failed = false;
            v.undefined.clear();
            v.settle();
        }
        for s in &next.snaps {
            let Some(n) = &s.name else { continue };
            let export = format!("{}@{n}", s.volume);
            let actual = read_export(store, &export, 0, s.img.len())
                .map_err(|e| format!("reading snapshot {export}: {e}"))?;
            if s.known
                && let Some(i) = first_diff(&s.img.bytes, &actual)
            {
                return Err(format!(
                    "snapshot {export}: byte {i} is {:#04x}, expected {:#04x}",
                    actual[i], s.img.bytes[i]
                ));
            }
        }
        Ok(next)
    }

    /// Replaces the file system by `image` (the disk after a power loss) and recovers,
    /// now and then crashing again during the recovery. Then checks the result against
    /// the alternatives (the model before and after an operation the crash interrupted).
    fn recover_from(&mut self, image: MemFs, alternatives: Vec<Model>) {
        self.store = None;
        self.fs = image;
        if let Some(p) = &self.point
            && self.rng.chance(30)
        {
            {
                let mut cp = p.lock();
                cp.image = None;
                cp.at = Some(cp.calls + self.rng.below(12));
            }
            let first = self.open_store();
            let again = p.lock().image.take();
            p.lock().at = None;
            drop(first);
            if let Some(again) = again {
                self.t.note("  crash again during recovery".into());
                self.fs = again;
            }
        }
        self.store = Some(
            self.open_store()
                .unwrap_or_else(|e| panic!("opening the store after a crash: {e}")),
        );
        for n in self.store().recovery_notes.clone() {
            self.t.note(format!("  recovery: {n}"));
        }
        self.states_known = false;
        let mut errors = Vec::new();
        for m in &alternatives {
            match self.check_recovered(m) {
                Ok(next) => {
                    self.m = next;
                    self.check_verify();
                    return;
                }
                Err(e) => errors.push(e),
            }
        }
        panic!("the recovered store matches no allowed state: {errors:#?}");
    }

    /// Runs up to `n_ops` operations with a crash armed at one of the first I/O calls of a
    /// random operation (or of the round), or none (the crash then comes after the last
    /// operation); then recovers and checks.
    fn crash_round(&mut self, n_ops: u64, mix: &[(Op, u64)]) {
        let p = self.point.clone().expect("a crash world");
        // Which operation to interrupt, and how many of its I/O calls happen first.
        let target = match self.rng.below(4) {
            0 => None,
            1 => {
                let mut cp = p.lock();
                cp.at = Some(cp.calls + self.rng.below(n_ops * 3 + 1));
                None
            }
            _ => {
                let depth = [2, 4, 10, 40][self.rng.below(4) as usize];
                Some((self.rng.below(n_ops), self.rng.below(depth)))
            }
        };
        p.lock().image = None;
        let mut alternatives = None;
        for i in 0..n_ops {
            if let Some((k, skip)) = target
                && k == i
            {
                let mut cp = p.lock();
                cp.at = Some(cp.calls + skip);
            }
            let pre = self.m.clone();
            self.random_op(mix);
            if p.lock().image.is_some() {
                alternatives = Some(vec![pre, self.m.clone()]);
                break;
            }
        }
        let image = p.lock().image.take();
        p.lock().at = None;
        match (image, alternatives) {
            (Some(image), Some(alts)) => {
                self.t.note("CRASH during the last operation".into());
                self.recover_from(image, alts);
            }
            _ => {
                self.t.note("CRASH between operations".into());
                let image = self.fs.crash(&mut self.rng);
                let m = self.m.clone();
                self.recover_from(image, vec![m]);
            }
        }
    }
}

// ------------------------------------------------------------------ 1. model-based

fn model_seed(seed: u64) {
    let w = World::new(
        "model_based_operation_sequences",
        seed,
        0x6d6f_6465_6c00,
        MODEL_PARAMS,
        false,
    );
    model_run(w);
}

fn model_run(mut w: World) {
    for _ in 0..1 + w.rng.below(2) {
        w.op_create_volume();
    }
    let ops = 150 + w.rng.below(150);
    for i in 0..ops {
        w.random_op(MODEL_MIX);
        if w.rng.chance(60) {
            w.op_read();
        }
        if i % 40 == 39 {
            w.full_check();
        }
    }
    w.full_check();
    w.op_reopen();
    w.full_check();
}

#[test]
fn model_based_operation_sequences() {
    for seed in seeds(50) {
        model_seed(seed);
    }
}

/// The same sequences on real files, through each production I/O engine (fewer seeds:
/// real fdatasyncs are slow).
fn model_on_files(engine: IoEngine, test: &'static str) {
    for seed in seeds(6) {
        model_run(World::on_files(
            test,
            seed,
            0x6d6f_6465_6c00,
            MODEL_PARAMS,
            engine,
        ));
    }
}

#[test]
fn model_based_operation_sequences_on_files_sync() {
    model_on_files(
        IoEngine::Sync,
        "model_based_operation_sequences_on_files_sync",
    );
}

#[test]
fn model_based_operation_sequences_on_files_uring() {
    model_on_files(
        IoEngine::Uring,
        "model_based_operation_sequences_on_files_uring",
    );
}

// ------------------------------------------------------------------ 2. crashes

fn crash_seed(seed: u64) {
    let mut w = World::new(
        "crashes_keep_every_flushed_write",
        seed,
        0x6372_6173_6800,
        CRASH_PARAMS,
        true,
    );
    for _ in 0..1 + w.rng.below(2) {
        w.op_create_volume();
    }
    for _ in 0..3 {
        let n = 4 + w.rng.below(24);
        w.crash_round(n, CRASH_MIX);
    }
}

#[test]
fn crashes_keep_every_flushed_write() {
    for seed in seeds(3000) {
        crash_seed(seed);
    }
}

// ------------------------------------------------------------------ 3. bit flips

/// A store with some history, everything flushed and closed cleanly (sometimes after a
/// crash and recovery).
fn damaged_store_world(test: &'static str, seed: u64, salt: u64) -> World {
    let mut w = World::new(test, seed, salt, CRASH_PARAMS, false);
    for _ in 0..1 + w.rng.below(2) {
        w.op_create_volume();
    }
    for _ in 0..10 + w.rng.below(40) {
        w.random_op(CRASH_MIX);
    }
    if w.rng.chance(30) {
        w.t.note("CRASH".into());
        let image = w.fs.crash(&mut w.rng);
        let m = w.m.clone();
        w.recover_from(image, vec![m]);
        for _ in 0..w.rng.below(10) {
            w.random_op(CRASH_MIX);
        }
    }
    w.flush_all();
    w.t.note("close".into());
    w.store = None;
    w
}

/// For every object (by export name, or `#id` for hidden snapshots), the logical ranges
/// whose data lives in a damaged payload.
fn affected_ranges(store: &Store, flips: &[(PathBuf, u64)]) -> HashMap<String, Vec<(u64, u64)>> {
    let (volumes, snapshots) = store.objects();
    let mut segs = HashMap::new();
    for v in &volumes {
        for s in &v.log.lock().segments {
            segs.insert(s.id, s.clone());
        }
    }
    for s in &snapshots {
        for seg in s.segments.lock().iter() {
            segs.insert(seg.id, seg.clone());
        }
    }
    // Damaged payloads: (segment, offset, length).
    let mut damaged = Vec::new();
    for (path, off) in flips {
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some((id, _)) = file.as_deref().and_then(segment::parse_file_name) else {
            continue;
        };
        let Some(seg) = segs.get(&id) else { continue };
        if let Some(&(o, n)) = seg
            .payload_ranges()
            .iter()
            .find(|&&(o, n)| o <= *off && *off < o + n)
        {
            damaged.push((id, o, n));
        }
    }
    let cat = store.ctx.catalog();
    let mut objects: Vec<(String, super::volume::Map)> = volumes
        .iter()
        .map(|v| (v.name.clone(), v.state.read().map.clone()))
        .collect();
    for s in &snapshots {
        let label = cat
            .snapshots
            .iter()
            .find(|r| r.id == s.id)
            .and_then(|r| r.name.as_ref().map(|n| format!("{}@{n}", r.volume)))
            .unwrap_or_else(|| format!("#{}", s.id));
        objects.push((label, s.state.read().map.clone()));
    }
    let mut out = HashMap::new();
    for (label, map) in objects {
        let mut ranges = Vec::new();
        for (logical, len, t) in map.iter() {
            let Target::Data(loc) = t else { continue };
            for &(id, o, n) in &damaged {
                if loc.seg.id != id {
                    continue;
                }
                let a = loc.off.max(o);
                let b = (loc.off + len).min(o + n);
                if a < b {
                    ranges.push((logical + (a - loc.off), logical + (b - loc.off)));
                }
            }
        }
        out.insert(label, ranges);
    }
    out
}

fn payload_flip_seed(seed: u64) {
    let mut w = damaged_store_world(
        "payload_bit_flips_fail_only_the_affected_reads",
        seed,
        0x6461_7400,
    );
    let count = 1 + w.rng.below(4) as usize;
    let flips = w.fs.flip_bytes(&mut w.rng, ".dat", DAT_HEADER_BYTES, count);
    w.t.note(format!("flipped payload bits at {flips:?}"));
    let rep = verify::check(&w.fs, Path::new(DIR));
    w.store = Some(
        w.open_store()
            .unwrap_or_else(|e| panic!("payload damage must not stop the store opening: {e}")),
    );
    let affected = affected_ranges(w.store(), &flips);
    let any = affected.values().any(|r| !r.is_empty());
    assert_eq!(
        rep.errors() > 0,
        any,
        "verify must report damage exactly when live data is hit: {:?}",
        rep.findings
    );
    for e in w.m.exports() {
        let Some((img, known)) = w.m.image(&e) else {
            continue;
        };
        let img = img.clone();
        let hit = affected.get(&e).cloned().unwrap_or_default();
        let size = img.len();
        let mut off = 0;
        while off < size {
            let len = (1 + w.rng.below(96 << 10)).min(size - off);
            let overlaps = hit.iter().any(|&(a, b)| a < off + len && off < b);
            match read_export(w.store(), &e, off, len) {
                Ok(got) => {
                    assert!(
                        !overlaps,
                        "read {e} {off}+{len} succeeded over damaged data {hit:?}"
                    );
                    if known {
                        let want = &img.bytes[off as usize..(off + len) as usize];
                        if let Some(i) = first_diff(want, &got) {
                            panic!(
                                "read {e} {off}+{len}: WRONG DATA at byte {}",
                                off + i as u64
                            );
                        }
                    }
                }
                Err(err) => {
                    assert_eq!(
                        err.kind(),
                        ErrorKind::Corrupt,
                        "read {e} {off}+{len}: {err}"
                    );
                    assert!(
                        overlaps,
                        "read {e} {off}+{len} failed ({err}) but touches no damaged payload \
                         {hit:?}"
                    );
                }
            }
            off += len;
        }
    }
}

#[test]
fn payload_bit_flips_fail_only_the_affected_reads() {
    for seed in seeds(1500) {
        payload_flip_seed(seed);
    }
}

fn index_flip_seed(seed: u64) {
    let mut w = damaged_store_world("index_bit_flips_never_return_wrong_data", seed, 0x6964_7800);
    let count = 1 + w.rng.below(3) as usize;
    let skip = if w.rng.chance(20) {
        0
    } else {
        ENTRY_BYTES as u64
    };
    let flips = w.fs.flip_bytes(&mut w.rng, ".idx", skip, count);
    w.t.note(format!("flipped index bits at {flips:?}"));
    let rep = verify::check(&w.fs, Path::new(DIR));
    assert!(
        flips.is_empty() || !rep.findings.is_empty(),
        "verify reports nothing after index damage at {flips:?}"
    );
    let store = match w.open_store() {
        Ok(s) => s,
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "open after index damage: {e}");
            assert!(
                rep.errors() > 0,
                "the store does not open ({e}) but verify reports no error: {:?}",
                rep.findings
            );
            return;
        }
    };
    w.store = Some(store);
    for e in w.m.exports() {
        let Some((img, known)) = w.m.image(&e) else {
            continue;
        };
        let img = img.clone();
        let size = img.len();
        let mut off = 0;
        while off < size {
            let len = (1 + w.rng.below(96 << 10)).min(size - off);
            match read_export(w.store(), &e, off, len) {
                Ok(got) => {
                    if known {
                        let want = &img.bytes[off as usize..(off + len) as usize];
                        if let Some(i) = first_diff(want, &got) {
                            panic!(
                                "read {e} {off}+{len}: WRONG DATA at byte {} after index damage",
                                off + i as u64
                            );
                        }
                    }
                }
                Err(err) => {
                    assert_eq!(
                        err.kind(),
                        ErrorKind::Corrupt,
                        "read {e} {off}+{len}: {err}"
                    )
                }
            }
            off += len;
        }
    }
}

#[test]
fn index_bit_flips_never_return_wrong_data() {
    for seed in seeds(1500) {
        index_flip_seed(seed);
    }
}

fn catalog_flip_seed(seed: u64) {
    let mut w = damaged_store_world("catalog_bit_flips_fail_the_open", seed, 0x6361_7400);
    let log = catalog::log_path(Path::new(DIR));
    let log_end = format::scan_log(&w.fs.read(&log).expect("the catalog log"))
        .expect("an intact log")
        .end;
    let flips = w.fs.flip_bytes(&mut w.rng, "catalog", 0, 1);
    w.t.note(format!(
        "flipped catalog bits at {flips:?} (log records end at {log_end})"
    ));
    assert_eq!(flips.len(), 1);
    if flips[0].0 == log && flips[0].1 >= log_end + format::LOG_SECTOR_BYTES as u64 {
        // Beyond the sector after the log's records: unused space, which a torn record may
        // also leave non-zero. Nothing is lost and the store opens as it was. (The sector
        // right after the records is where the next record's header would be: a non-zero,
        // invalid one there may be an acknowledged record damaged, so it fails the open.)
        assert_eq!(verify::check(&w.fs, Path::new(DIR)).errors(), 0);
        w.store = Some(w.open_store().expect("the store opens"));
        w.full_check();
        return;
    }
    let rep = verify::check(&w.fs, Path::new(DIR));
    assert!(rep.errors() > 0, "{:?}", rep.findings);
    let e = w.open_store().map(|_| ()).expect_err("a damaged catalog");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

/// A damaged catalog or catalog log: the store refuses to open (Corrupt) and `verify`
/// reports it; a flip in the unused end of the log changes nothing.
#[test]
fn catalog_bit_flips_fail_the_open() {
    for seed in seeds(200) {
        catalog_flip_seed(seed);
    }
}

// ------------------------------------------------------------------ 4. fsync failures

fn fsync_seed(seed: u64) {
    let mut w = World::new(
        "failed_fsyncs_fail_every_later_flush",
        seed,
        0x6673_796e_6300,
        CRASH_PARAMS,
        false,
    );
    for _ in 0..1 + w.rng.below(2) {
        w.op_create_volume();
    }
    for _ in 0..w.rng.below(30) {
        w.random_op(FSYNC_MIX);
    }
    // From here on, fdatasync fails after a few more successes. Transient: the kernel
    // reports the error once and later syncs succeed (as after Linux drops dirty pages).
    let n = w.rng.below(6) as i64;
    let transient = w.rng.chance(40);
    w.t.note(format!("fail_syncs_after({n}) transient={transient}"));
    w.fs.fail_syncs_after(n);
    w.allow_io = true;
    for _ in 0..5 + w.rng.below(30) {
        let seen = w.io_errors;
        w.random_op(FSYNC_MIX);
        if transient && w.io_errors > seen {
            w.fs.fail_syncs_after(-1);
        }
    }
    w.fs.fail_syncs_after(-1);
    // Everything acknowledged by a flush that succeeded must be there, after a clean
    // reopen or after a crash.
    let image = if w.rng.chance(50) {
        w.t.note("reopen".into());
        w.fs.clone()
    } else {
        w.t.note("CRASH".into());
        w.fs.crash(&mut w.rng)
    };
    let m = w.m.clone();
    let mut alternatives = vec![m.clone()];
    for op in std::mem::take(&mut w.uncertain) {
        let mut done = m.clone();
        if op(&mut done).is_ok() {
            alternatives.push(done);
        }
    }
    w.recover_from(image, alternatives);
    // And the store works normally again.
    w.allow_io = false;
    for _ in 0..10 {
        w.random_op(FSYNC_MIX);
    }
    w.op_reopen();
    w.full_check();
}

#[test]
fn failed_fsyncs_fail_every_later_flush() {
    for seed in seeds(1500) {
        fsync_seed(seed);
    }
}

// ------------------------------------------------------------------ regressions

fn small_store(fs: &MemFs) -> Store {
    Store::open(
        Arc::new(fs.clone()),
        Path::new(DIR),
        Config {
            segment_bytes: 256 << 10,
            ..Config::default()
        },
    )
    .expect("open store")
}

fn read_all(v: &Arc<dyn super::Volume>, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    v.read(0, &mut buf)?;
    Ok(buf)
}

/// Compaction punched the dead pages inside a payload that was still partly live; the
/// payload checksum covers all of it, so after a reopen every read of its live part
/// failed with EIO (and `verify` reported the store damaged).
#[test]
fn punching_never_touches_a_partly_live_payload() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    let mut want: Vec<u8> = (0..128u32 << 10).map(|i| (i % 251) as u8 + 1).collect();
    v.write(0, &want).expect("write one full record");
    // Overwrite whole pages in the middle of it, then fill the segment so it is sealed.
    v.write(32 << 10, &[7u8; 16 << 10]).expect("overwrite");
    want[32 << 10..48 << 10].fill(7);
    // A payload that dies whole: still punched. Overwriting it rolls the segment.
    v.write(256 << 10, &[3u8; 64 << 10]).expect("write");
    v.write(256 << 10, &[4u8; 64 << 10])
        .expect("overwrite and roll");
    v.flush().expect("flush");
    drop(v);
    let policy = Policy {
        rewrite_below_live_fraction: 0.0,
        punch_min_dead_bytes: 0,
    };
    // In the session that wrote the data (payloads trusted), then after a reopen (payloads
    // verified on first read).
    let mut store = Some(store);
    for round in 0..2 {
        let s = store.take().unwrap_or_else(|| small_store(&fs));
        let report = s.compact(&policy).expect("compact");
        assert!(round > 0 || report.bytes_punched > 0, "{report:?}");
        drop(s);
        let s = small_store(&fs);
        let v = s.open_export("v").expect("open");
        let got = read_all(&v, 128 << 10).expect("live data stays readable after punching");
        assert_eq!(got, want);
        assert_eq!(verify::check(&fs, Path::new(DIR)).errors(), 0);
    }
}

/// A crash after a segment was created (and named by the catalog) but before anything
/// synced its files left a `.dat`/`.idx` without a header: the store no longer opened.
#[test]
fn a_crash_right_after_a_segment_roll_leaves_an_openable_store() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 4096]).expect("write");
    v.flush().expect("flush");
    for seed in 0..50 {
        let crashed = fs.crash(&mut Rng::new(seed));
        let store = small_store(&crashed);
        let v = store.open_export("v").expect("open");
        assert_eq!(read_all(&v, 4096).expect("read"), vec![1u8; 4096]);
    }
    // The next write starts a new segment (after a snapshot sealed the old one).
    store
        .create_snapshot(&name("v"), &name("s"))
        .expect("snapshot");
    v.write(8192, &[2u8; 4096])
        .expect("write into a new segment");
    for seed in 0..50 {
        let crashed = fs.crash(&mut Rng::new(seed));
        let store = Store::open(
            Arc::new(crashed.clone()),
            Path::new(DIR),
            Config {
                segment_bytes: 256 << 10,
                ..Config::default()
            },
        )
        .unwrap_or_else(|e| panic!("seed {seed}: open after a crash: {e}"));
        let v = store.open_export("v").expect("open");
        let got = read_all(&v, 4096).expect("read");
        assert_eq!(got, vec![1u8; 4096]);
    }
}

/// Merging a deleted snapshot into its dependent recounted the live bytes of every segment
/// the dependent owned, not just the adopted ones: `stored_bytes` (and the live counts
/// compaction decides by) were inflated until the next reopen.
#[test]
fn merging_a_deleted_snapshot_keeps_the_space_accounting_exact() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    store.create_volume(&name("w"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 64 << 10]).expect("write");
    store.create_snapshot(&name("v"), &name("a")).expect("snap");
    v.write(64 << 10, &[2u8; 64 << 10])
        .expect("write after the snapshot");
    let w = store.open_export("w").expect("open");
    w.write(0, &[3u8; 8192]).expect("write");
    store.create_snapshot(&name("w"), &name("a")).expect("snap");
    store.create_snapshot(&name("w"), &name("b")).expect("snap");
    w.write(0, &[4u8; 4096]).expect("write");
    drop((v, w));
    // v@a merges into v; w@a merges into w@b.
    store.delete_snapshot("v@a", false).expect("delete");
    store.delete_snapshot("w@a", false).expect("delete");
    let before = store.stats();
    assert_eq!(before.stored_bytes, (128 << 10) + 8192 + 4096, "{before:?}");
    drop(store);
    assert_eq!(small_store(&fs).stats(), before);
}

/// A failed fdatasync while sealing a segment (on a roll or a snapshot) did not fail the
/// volume's later flushes. With a transient failure (the kernel reports it once), a later
/// flush succeeded, and its sync made the failed seal batch durable: recovery then trusted
/// that seal batch and dropped a record written and flushed after it.
#[test]
fn a_failed_seal_fails_every_later_flush() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 4096]).expect("write");
    v.flush().expect("flush");
    // Everything is committed, so the seal's first sync is the .idx one, after its batch
    // was written: it fails.
    fs.fail_syncs_after(0);
    let e = store
        .create_snapshot(&name("v"), &name("s"))
        .expect_err("the seal fails");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    fs.fail_syncs_after(-1);
    v.trim(0, 4096).expect("trim");
    match v.flush() {
        Ok(()) => {
            // Acknowledged: it must survive.
            drop((v, store));
            for seed in 0..20 {
                let store = small_store(&fs.crash(&mut Rng::new(seed)));
                let v = store.open_export("v").expect("open");
                let got = read_all(&v, 4096).expect("read");
                assert!(
                    got.iter().all(|&b| b == 0),
                    "seed {seed}: a flushed trim was lost"
                );
            }
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::FlushFailed, "{e}");
            let e = store
                .create_snapshot(&name("v"), &name("s"))
                .expect_err("no new durability claims after a failed sync");
            assert_eq!(e.kind(), ErrorKind::FlushFailed, "{e}");
        }
    }
}

/// Compaction judged liveness on the in-memory map, which includes writes not yet flushed:
/// flushed data they shadow was punched or rewritten away, and a crash that lost the
/// unflushed writes brought back nothing (zeroes, or EIO) instead of the flushed data.
#[test]
fn compaction_keeps_flushed_data_that_only_unflushed_writes_shadow() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 64 << 10]).expect("write");
    v.write(128 << 10, &[2u8; 128 << 10]).expect("write");
    v.write(256 << 10, &[4u8; 128 << 10])
        .expect("write and roll");
    v.flush().expect("flush");
    // Shadows the first write, unflushed.
    v.write(0, &[3u8; 64 << 10]).expect("overwrite");
    for policy in [
        // Rewrites the segment without the shadowed piece...
        Policy {
            rewrite_below_live_fraction: 0.95,
            punch_min_dead_bytes: 0,
        },
        // ...or punches it.
        Policy {
            rewrite_below_live_fraction: 0.0,
            punch_min_dead_bytes: 0,
        },
    ] {
        store.compact(&policy).expect("compact");
        for seed in 0..30 {
            let store = small_store(&fs.crash(&mut Rng::new(seed)));
            let v = store.open_export("v").expect("open");
            let got =
                read_all(&v, 64 << 10).unwrap_or_else(|e| panic!("seed {seed}: {policy:?}: {e}"));
            assert!(
                got.iter().all(|&b| b == 1 || b == 3),
                "seed {seed}: {policy:?}: flushed data lost: {:?}",
                &got[..8]
            );
        }
    }
}

/// Deleting a snapshot (or a volume) that had to be merged into its dependent returned the
/// merge's I/O error although the deletion itself was already durable: the caller was
/// told it failed, and the snapshot was gone.
#[test]
fn a_deletion_that_happened_reports_success() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 4096]).expect("write");
    store
        .create_snapshot(&name("v"), &name("a"))
        .expect("snapshot");
    v.write(0, &[2u8; 512]).expect("write");
    // The deletion's catalog update succeeds, merging a into v does not.
    fs.fail_syncs_after(1);
    assert_eq!(
        store.delete_snapshot("v@a", false).expect("deleted"),
        SnapshotDeletion::Deleted
    );
    assert!(store.list_snapshots(None).is_empty());
    assert_eq!(store.stats().hidden_snapshots, 1);
    fs.fail_syncs_after(-1);
    let mut want = vec![1u8; 4096];
    want[..512].fill(2);
    assert_eq!(read_all(&v, 4096).expect("read"), want);
    drop((v, store));
    let store = small_store(&fs);
    assert_eq!(
        store.stats().hidden_snapshots,
        0,
        "merged at the next start"
    );
    let v = store.open_export("v").expect("open");
    assert_eq!(read_all(&v, 4096).expect("read"), want);
}

/// Overwrites slots of a closed store's segment index with garbage (damage at rest).
fn damage_slots(fs: &MemFs, id: u64, slots: &[usize]) {
    let path = segment::idx_path(&Path::new(DIR).join("segments"), id);
    let mut bytes = fs.read(&path).expect("read index");
    for &s in slots {
        bytes[s * ENTRY_BYTES + 20] ^= 0x10;
    }
    fs.write_atomic(&path, &bytes).expect("write index");
}

/// Two damaged slots in one segment index (the seal batch's begin mark and the other copy
/// of a record) made recovery take the sealed records for a torn tail and drop them all:
/// reads returned older data. A surviving batch mark and the batch's record copies now
/// recover them.
#[test]
fn a_damaged_seal_batch_is_recovered_from_its_other_copies() {
    let fs = MemFs::new();
    let store = small_store(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 4096]).expect("write");
    v.write(8192, &[2u8; 4096]).expect("write");
    // Seals segment 1: [header, prov 1, prov 2, seal begin, copy 1, copy 2, seal end].
    store
        .create_snapshot(&name("v"), &name("s"))
        .expect("snapshot");
    drop((v, store));
    damage_slots(&fs, 1, &[1, 3]);
    assert!(verify::check(&fs, Path::new(DIR)).findings.len() >= 2);
    let store = small_store(&fs);
    let s = store.open_export("v@s").expect("open snapshot");
    let got = read_all(&s, 12288).expect("read");
    assert_eq!(&got[..4096], &[1u8; 4096][..]);
    assert_eq!(&got[8192..], &[2u8; 4096][..]);
}

/// Both copies of a flushed record damaged, in the last segment of a volume (where a
/// crash may leave a torn tail): recovery cut the segment there as if torn and silently
/// served older data. A record a batch claims cannot be torn away when the index holds
/// damaged slots, so the store now refuses to open (EIO-class Corrupt error) and `verify`
/// reports it; with one copy damaged everything is still recovered.
#[test]
fn losing_both_copies_of_a_flushed_record_is_an_error_not_a_torn_tail() {
    for both in [false, true] {
        let fs = MemFs::new();
        let store = small_store(&fs);
        store.create_volume(&name("v"), 1 << 20).expect("create");
        let v = store.open_export("v").expect("open");
        v.write(0, &[1u8; 4096]).expect("write");
        v.write(8192, &[2u8; 4096]).expect("write");
        // [header, prov 1, prov 2, begin, copy 1, copy 2, end]
        v.flush().expect("flush");
        drop((v, store));
        damage_slots(&fs, 1, if both { &[1, 4] } else { &[4] });
        let rep = verify::check(&fs, Path::new(DIR));
        match Store::open(
            Arc::new(fs.clone()),
            Path::new(DIR),
            Config {
                segment_bytes: 256 << 10,
                ..Config::default()
            },
        ) {
            Ok(store) => {
                assert!(!both, "opened although a flushed record is unreadable");
                assert_eq!(rep.errors(), 0, "{:?}", rep.findings);
                let v = store.open_export("v").expect("open");
                let got = read_all(&v, 12288).expect("read");
                assert_eq!(&got[..4096], &[1u8; 4096][..]);
                assert_eq!(&got[8192..], &[2u8; 4096][..]);
            }
            Err(e) => {
                assert!(both, "one damaged copy must be recovered: {e}");
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
                assert!(rep.errors() > 0, "{:?}", rep.findings);
            }
        }
    }
}
