//! Crash consistency: `kill -9` of `blockd serve` in the middle of a write workload, then a
//! restart on the same data directory, many times over.
//!
//! The contract under test: every write acknowledged before a completed NBD FLUSH, and
//! every write acknowledged with FUA, is there after the restart; anything else a sector
//! holds is one of the values written to it later (a torn tail is cut, never returned as
//! data). Snapshots whose creation was acknowledged are exact.
//!
//! How: several connections (TCP and Unix) each write, trim, zero, read and flush their own
//! quarter of a 64 MiB volume, pipelined, with no two requests in flight on the same sector.
//! Every sector written carries (write id, sector number) and bytes derived from them, so a
//! read tells exactly which write a sector holds, or that it is garbage. A model keeps, per
//! 512-byte sector, the value durable as of the last completed flush (or FUA write) and the
//! values written after it; after the restart every sector must hold one of those. Now and
//! then all I/O pauses for a snapshot (through the CLI), whose expected contents are then
//! exactly known; while I/O goes on, some snapshots are cloned and older ones deleted with
//! --defer (merged into the volume or the next snapshot, or hidden while a clone uses
//! them). Another thread sends SIGKILL after a random delay. After the restart, snapshots
//! and clones whose creation was acknowledged must read exactly as expected, deletions that
//! were acknowledged must stick, and once the clones are deleted no hidden snapshot may be
//! left. `blockd verify` checks the crashed store (daemon down) every tenth cycle and the
//! store at the end.
//!
//! A `kill -9` leaves the page cache intact, so it never tears a record by itself. To test
//! that a torn tail is cut, some cycles also play power loss after the kill: one payload of
//! the unflushed tail of an unsealed segment (a provisional record after every record any
//! commit batch holds) gets a flipped byte, as if its page never reached the disk. The
//! restart must then report a torn tail from that record on, and the model still holds:
//! nothing after the last completed flush was promised. After a plain kill -9, though,
//! nothing acknowledged may be lost at all (docs/FORMAT.md: the page cache survives the
//! process), and the test checks that too.
//!
//! Seeded: the seed is printed; BLOCKD_CRASH_SEED repeats a run (thread timing aside) and
//! BLOCKD_CRASH_CYCLES sets the number of kill/restart cycles (default 50). Every other
//! restart runs background compaction passes every 150 ms, so kills also land in and
//! after compaction; BLOCKD_CRASH_COMPACT=0 turns that off.

mod common;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockd::store::catalog::{Catalog, read_catalog};
use blockd::store::format::{ENTRY_BYTES, Entry, Record, decode_entry};
use blockd::store::io::sync::SyncFs;
use common::nbd::{Client, encode_request};
use common::{Daemon, blockd_bin, run_with_timeout};
use nbd_proto::consts::*;
use parking_lot::{Mutex, RwLock};

const VOLUME: &str = "crash";
const VOLUME_BYTES: u64 = 64 << 20;
const SECTOR: usize = 512;
const SECTORS: usize = VOLUME_BYTES as usize / SECTOR;
const WORKERS: usize = 4;
/// Snapshots taken per cycle, at most.
const SNAPSHOTS_PER_CYCLE: usize = 2;
/// Snapshots kept from earlier cycles (each is read in full after every restart).
const KEEP_SNAPSHOTS: usize = 2;
/// Reads of the whole volume go in pieces of this size.
const READ_CHUNK: usize = 8 << 20;
/// The whole test must finish well within this.
const BUDGET: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------- randomness

/// SplitMix64: small, fast, good enough to pick sizes and delays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

// ---------------------------------------------------------------- sector contents

/// The 512 bytes write `id` puts in sector `sector`: the id, the sector number, then bytes
/// derived from both.
fn fill_sector(buf: &mut [u8], id: u32, sector: u32) {
    buf[0..4].copy_from_slice(&id.to_le_bytes());
    buf[4..8].copy_from_slice(&sector.to_le_bytes());
    let mut x = (u64::from(id) << 32 | u64::from(sector)) ^ 0xD1B5_4A32_D192_ED03;
    for word in buf[8..SECTOR].chunks_exact_mut(8) {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        word.copy_from_slice(&(x ^ (x >> 29)).to_le_bytes());
    }
}

/// Which write a sector holds (0: zeroes), or what is wrong with it.
fn decode_sector(buf: &[u8], sector: u32) -> Result<u32, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let id = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let at = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if id == 0 || at != sector {
        return Err(format!(
            "garbage: header says write {id} of sector {at}; first bytes {:02x?}",
            &buf[..16]
        ));
    }
    let mut want = [0u8; SECTOR];
    fill_sector(&mut want, id, sector);
    if buf != want {
        let first = buf.iter().zip(want.iter()).position(|(a, b)| a != b);
        return Err(format!(
            "torn or corrupt copy of write {id}: first wrong byte at {first:?}"
        ));
    }
    Ok(id)
}

fn payload(id: u32, first_sector: usize, sectors: usize) -> Vec<u8> {
    let mut out = vec![0u8; sectors * SECTOR];
    for (k, buf) in out.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(buf, id, (first_sector + k) as u32);
    }
    out
}

// ---------------------------------------------------------------- the model

const NOT_ACKED: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Version {
    /// What the sector reads as: the write id, 0 for zeroes.
    value: u32,
    /// The operation (unique per request; for writes equal to `value`).
    op: u32,
    /// Model clock when the reply was read, or NOT_ACKED.
    acked: u64,
}

/// Per sector: the value durable as of the last completed flush (or FUA write), and the
/// versions written after it, oldest first. Requests never overlap in flight, so each
/// sector's versions are totally ordered.
struct Model {
    clock: u64,
    floor: Vec<u32>,
    pending: Vec<Vec<Version>>,
    dirty: Vec<u32>,
    in_dirty: Vec<bool>,
}

impl Model {
    fn new() -> Model {
        Model {
            clock: 0,
            floor: vec![0; SECTORS],
            pending: vec![Vec::new(); SECTORS],
            dirty: Vec::new(),
            in_dirty: vec![false; SECTORS],
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Called before the request is sent.
    fn sent(&mut self, op: u32, value: u32, sectors: Range<usize>) {
        for s in sectors {
            self.pending[s].push(Version {
                value,
                op,
                acked: NOT_ACKED,
            });
            if !self.in_dirty[s] {
                self.in_dirty[s] = true;
                self.dirty.push(s as u32);
            }
        }
    }

    /// Called after its successful reply was read.
    fn acked(&mut self, op: u32, sectors: Range<usize>, fua: bool) {
        let t = self.tick();
        for s in sectors {
            let p = &mut self.pending[s];
            let i = p
                .iter()
                .rposition(|v| v.op == op)
                .unwrap_or_else(|| panic!("model: op {op} not pending on sector {s}"));
            p[i].acked = t;
            if fua {
                self.floor[s] = p[i].value;
                p.drain(..=i);
            }
        }
    }

    /// Called before a FLUSH is sent; returns its time.
    fn flush_sent(&mut self) -> u64 {
        self.tick()
    }

    /// Called after a FLUSH sent at `sent_at` completed: every write acknowledged before
    /// then is durable.
    fn flush_done(&mut self, sent_at: u64) {
        let mut still = Vec::with_capacity(self.dirty.len());
        for &s in &self.dirty {
            let s = s as usize;
            let p = &mut self.pending[s];
            if let Some(i) = p.iter().rposition(|v| v.acked < sent_at) {
                self.floor[s] = p[i].value;
                p.drain(..=i);
            }
            if p.is_empty() {
                self.in_dirty[s] = false;
            } else {
                still.push(s as u32);
            }
        }
        self.dirty = still;
    }

    /// The newest acknowledged value of a sector.
    fn latest_acked(&self, s: usize) -> u32 {
        self.pending[s]
            .iter()
            .rev()
            .find(|v| v.acked != NOT_ACKED)
            .map_or(self.floor[s], |v| v.value)
    }

    fn allowed(&self, s: usize, value: u32) -> bool {
        self.floor[s] == value || self.pending[s].iter().any(|v| v.value == value)
    }

    fn describe(&self, s: usize) -> String {
        format!(
            "durable value {}, later versions {:?}",
            self.floor[s], self.pending[s]
        )
    }

    /// After a restart: what the volume holds now is the starting point.
    fn reset_to(&mut self, observed: &[u32]) {
        self.floor.copy_from_slice(observed);
        for &s in &self.dirty {
            self.pending[s as usize].clear();
            self.in_dirty[s as usize] = false;
        }
        self.dirty.clear();
    }
}

// ---------------------------------------------------------------- the workload

#[derive(Debug, Clone)]
enum Op {
    Write {
        id: u32,
        sectors: Range<usize>,
        fua: bool,
    },
    Zero {
        op: u32,
        sectors: Range<usize>,
        fua: bool,
    },
    Read {
        sectors: Range<usize>,
    },
    Flush {
        sent_at: u64,
    },
}

/// What one cycle's threads share.
struct Shared {
    model: Mutex<Model>,
    /// Workers hold it (shared) for each batch; the snapshot taker (exclusive) so that
    /// nothing is in flight while it snapshots.
    gate: RwLock<()>,
    /// Set just before SIGKILL: from then on, I/O errors are expected.
    killed: AtomicBool,
    next_op: AtomicU64,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    fua: AtomicU64,
    zeroes: AtomicU64,
    flushes: AtomicU64,
    reads: AtomicU64,
    bytes_written: AtomicU64,
}

impl Shared {
    fn op_id(&self) -> u32 {
        let id = self.next_op.fetch_add(1, Ordering::Relaxed);
        u32::try_from(id).expect("fewer than 2^32 operations")
    }

    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// A request length in sectors: mostly small, sometimes up to 4 MiB.
fn pick_len(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..60 => 1 + rng.below(8) as usize,
        60..85 => 8 + rng.below(120) as usize,
        85..97 => 128 + rng.below(1920) as usize,
        _ => 2048 + rng.below(6144) as usize,
    }
}

/// Runs batches of pipelined requests on the worker's own region until the daemon dies.
/// Panics on any error reply, wrong read data, or I/O error before the kill.
fn worker(sh: &Shared, mut c: Client, region: Range<usize>, mut rng: Rng) {
    let mut cookie = 0u64;
    loop {
        let _gate = sh.gate.read();
        if sh.killed() {
            return;
        }
        let n = 1 + rng.below(8);
        let mut busy: Vec<Range<usize>> = Vec::new();
        let mut ops: HashMap<u64, Op> = HashMap::new();
        let mut bytes = Vec::new();
        for _ in 0..n {
            cookie += 1;
            let kind = rng.below(100);
            if kind < 10 {
                let sent_at = sh.model.lock().flush_sent();
                bytes.extend(encode_request(CMD_FLUSH, 0, cookie, 0, 0, &[]));
                ops.insert(cookie, Op::Flush { sent_at });
                continue;
            }
            let len = pick_len(&mut rng).min(region.len());
            let mut start = region.start + rng.below((region.len() - len + 1) as u64) as usize;
            if rng.percent(70) && !start.is_multiple_of(8) && start - start % 8 >= region.start {
                start -= start % 8;
            }
            let sectors = start..start + len;
            if busy
                .iter()
                .any(|b| b.start < sectors.end && sectors.start < b.end)
            {
                continue;
            }
            busy.push(sectors.clone());
            let offset = (start * SECTOR) as u64;
            let nbytes = (len * SECTOR) as u32;
            if kind < 22 {
                bytes.extend(encode_request(CMD_READ, 0, cookie, offset, nbytes, &[]));
                ops.insert(cookie, Op::Read { sectors });
            } else if kind < 36 {
                let op = sh.op_id();
                let fua = rng.percent(15);
                let mut flags = if fua { CMD_FLAG_FUA } else { 0 };
                let command = if kind < 28 {
                    CMD_TRIM
                } else {
                    if rng.percent(50) {
                        flags |= CMD_FLAG_NO_HOLE;
                    }
                    CMD_WRITE_ZEROES
                };
                sh.model.lock().sent(op, 0, sectors.clone());
                bytes.extend(encode_request(command, flags, cookie, offset, nbytes, &[]));
                ops.insert(cookie, Op::Zero { op, sectors, fua });
            } else {
                let id = sh.op_id();
                let fua = rng.percent(15);
                let data = payload(id, start, len);
                sh.model.lock().sent(id, id, sectors.clone());
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                bytes.extend(encode_request(
                    CMD_WRITE, flags, cookie, offset, nbytes, &data,
                ));
                ops.insert(cookie, Op::Write { id, sectors, fua });
            }
        }
        let sender = c.send_in_background(bytes);
        while !ops.is_empty() {
            let r = match c.try_simple_reply() {
                Ok(r) => r,
                Err(e) if sh.killed() => {
                    let _ = e;
                    let _ = sender.join();
                    return;
                }
                Err(e) => panic!("I/O error before the kill: {e}"),
            };
            let op = ops
                .remove(&r.cookie)
                .unwrap_or_else(|| panic!("reply to unknown or answered cookie {}", r.cookie));
            assert_eq!(r.error, 0, "{op:?} failed with NBD error {}", r.error);
            match op {
                Op::Write { id, sectors, fua } => {
                    sh.stats.writes.fetch_add(1, Ordering::Relaxed);
                    sh.stats
                        .bytes_written
                        .fetch_add((sectors.len() * SECTOR) as u64, Ordering::Relaxed);
                    if fua {
                        sh.stats.fua.fetch_add(1, Ordering::Relaxed);
                    }
                    sh.model.lock().acked(id, sectors, fua);
                }
                Op::Zero { op, sectors, fua } => {
                    sh.stats.zeroes.fetch_add(1, Ordering::Relaxed);
                    sh.model.lock().acked(op, sectors, fua);
                }
                Op::Flush { sent_at } => {
                    sh.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    sh.model.lock().flush_done(sent_at);
                }
                Op::Read { sectors } => {
                    let data = match c.try_read_n(sectors.len() * SECTOR) {
                        Ok(d) => d,
                        Err(_) if sh.killed() => {
                            let _ = sender.join();
                            return;
                        }
                        Err(e) => panic!("I/O error before the kill: {e}"),
                    };
                    sh.stats.reads.fetch_add(1, Ordering::Relaxed);
                    let m = sh.model.lock();
                    for (k, buf) in data.chunks_exact(SECTOR).enumerate() {
                        let s = sectors.start + k;
                        let got = decode_sector(buf, s as u32)
                            .unwrap_or_else(|e| panic!("live read of sector {s}: {e}"));
                        assert_eq!(
                            got,
                            m.latest_acked(s),
                            "live read of sector {s} does not return the last write ({})",
                            m.describe(s)
                        );
                    }
                }
            }
        }
        match sender.join().expect("sender thread") {
            Ok(()) => {}
            Err(_) if sh.killed() => return,
            Err(e) => panic!("sending a batch failed before the kill: {e}"),
        }
    }
}

// ---------------------------------------------------------------- snapshots

struct Snap {
    name: String,
    /// Value of every sector.
    expected: Vec<u32>,
    /// Whether its creation was acknowledged (else the kill came during the call).
    acked: bool,
    /// Whether a deletion was requested: None, Some(acknowledged).
    deleted: Option<bool>,
}

/// A clone of a snapshot, made while I/O goes on; it must read as the snapshot did.
struct CloneOf {
    name: String,
    expected: Vec<u32>,
    acked: bool,
}

/// What the snapshot thread did in one cycle.
#[derive(Default)]
struct SnapshotWork {
    created: Vec<Snap>,
    /// Deletions of snapshots from earlier cycles: (name, acknowledged).
    deleted: Vec<(String, bool)>,
    clones: Vec<CloneOf>,
}

/// Runs a CLI command that may be cut short by the kill; returns whether it succeeded.
/// A refusal because a reader of the last check is still counted as connected is retried.
fn cli_until_kill(sh: &Shared, d: &Daemon, args: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let result = d.cli(args);
        if result.status.success() {
            return true;
        }
        if sh.killed() {
            return false;
        }
        let err = String::from_utf8_lossy(&result.stderr);
        if !err.contains("exported to") || Instant::now() > deadline {
            panic!("blockd {args:?} failed before the kill: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes up to SNAPSHOTS_PER_CYCLE snapshots at random moments, each with all I/O paused.
/// After some of them, while I/O goes on: clones the new snapshot, and deletes (with
/// --defer, as clones may use it) a snapshot of an earlier cycle, which merges into the
/// volume or the next snapshot under the writers' feet, or is hidden while clones use it.
fn snapshotter(
    sh: &Shared,
    d: &Daemon,
    cycle: u64,
    mut rng: Rng,
    mut deletable: Vec<String>,
    out: &Mutex<SnapshotWork>,
) {
    for k in 0..SNAPSHOTS_PER_CYCLE {
        let wait = Duration::from_millis(20 + rng.below(200));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if sh.killed() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _paused = sh.gate.write();
        if sh.killed() {
            return;
        }
        let expected: Vec<u32> = {
            let m = sh.model.lock();
            (0..SECTORS).map(|s| m.latest_acked(s)).collect()
        };
        let name = format!("c{cycle}s{k}");
        let full = format!("{VOLUME}@{name}");
        let acked = cli_until_kill(sh, d, &["snapshot", "create", &full]);
        out.lock().created.push(Snap {
            name: name.clone(),
            expected: expected.clone(),
            acked,
            deleted: None,
        });
        drop(_paused);
        if !acked {
            return;
        }
        if rng.percent(30) {
            let clone = format!("k{cycle}s{k}");
            let acked = cli_until_kill(sh, d, &["volume", "clone", &full, &clone]);
            out.lock().clones.push(CloneOf {
                name: clone,
                expected,
                acked,
            });
            if !acked {
                return;
            }
        }
        if rng.percent(50)
            && let Some(old) = deletable.pop()
        {
            let old_full = format!("{VOLUME}@{old}");
            let acked = cli_until_kill(sh, d, &["snapshot", "delete", &old_full, "--defer"]);
            out.lock().deleted.push((old, acked));
            if !acked {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- simulated power loss

/// Flips a byte in the payload of one unflushed record of an unsealed segment that the
/// catalog names (segments it does not name, such as a compaction output the kill
/// interrupted, are removed at start-up): a record whose provisional entry comes after
/// every record held by any commit batch of that segment (complete or not), so no
/// completed flush or FUA write covered it. Returns (segment id, sequence number of the
/// torn record), or None if no segment has such a record.
fn tear_unflushed_record(data_dir: &Path, rng: &mut Rng) -> Option<(u64, u64)> {
    let seg_dir = data_dir.join("segments");
    let catalog: Catalog = read_catalog(&SyncFs, data_dir)
        .expect("a valid catalog")
        .expect("a catalog")
        .cat;
    let mut candidates: Vec<(u64, u64, u64, u32)> = Vec::new(); // (segment, seq, data_off, len)
    for id in catalog.segment_ids() {
        let bytes = std::fs::read(seg_dir.join(format!("{id:016x}.idx"))).expect("read .idx");
        let mut sealed = false;
        let mut in_batches = 0u64;
        let mut provisional = Vec::new();
        for slot in bytes
            .get(ENTRY_BYTES..)
            .unwrap_or(&[])
            .chunks_exact(ENTRY_BYTES)
        {
            match decode_entry(slot) {
                Ok(Entry::Record {
                    record,
                    in_batch: true,
                }) => in_batches = in_batches.max(record.seq()),
                Ok(Entry::Record {
                    record:
                        Record::Write {
                            seq, data_off, len, ..
                        },
                    in_batch: false,
                }) => provisional.push((seq, data_off, len)),
                Ok(Entry::BatchBegin { seal: true, .. } | Entry::BatchEnd { seal: true, .. }) => {
                    sealed = true
                }
                _ => {}
            }
        }
        if !sealed {
            candidates.extend(
                provisional
                    .into_iter()
                    .filter(|&(seq, _, _)| seq > in_batches)
                    .map(|(seq, off, len)| (id, seq, off, len)),
            );
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let (id, seq, off, len) = candidates[rng.below(candidates.len() as u64) as usize];
    let path = seg_dir.join(format!("{id:016x}.dat"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open .dat");
    let at = off + rng.below(u64::from(len));
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).expect("read payload byte");
    b[0] ^= 0x5a;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, at).expect("write payload byte");
    Some((id, seq))
}

// ---------------------------------------------------------------- checks after a restart

/// Reads the whole export and decodes every sector.
fn read_all(d: &Daemon, export: &str) -> Result<Vec<u32>, String> {
    let mut c = Client::unix(&d.socket);
    let (size, _) = c.handshake(export);
    assert_eq!(size, VOLUME_BYTES, "size of {export}");
    let mut values = Vec::with_capacity(SECTORS);
    let mut problems = Vec::new();
    for chunk in 0..VOLUME_BYTES as usize / READ_CHUNK {
        let offset = chunk * READ_CHUNK;
        let data = c
            .try_read(offset as u64, READ_CHUNK)
            .map_err(|e| format!("{export}: read at {offset} failed with NBD error {e}"))?;
        for (k, buf) in data.chunks_exact(SECTOR).enumerate() {
            let s = offset / SECTOR + k;
            match decode_sector(buf, s as u32) {
                Ok(v) => values.push(v),
                Err(e) => {
                    if problems.len() < 10 {
                        problems.push(format!("{export}: sector {s}: {e}"));
                    }
                    values.push(u32::MAX);
                }
            }
        }
    }
    c.disconnect();
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(problems.join("\n"))
    }
}

fn snapshot_names(d: &Daemon) -> Vec<String> {
    let out = d.cli_ok(&["--output", "json", "snapshot", "list", VOLUME]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("snapshot list json");
    v.as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .filter_map(|n| n.strip_prefix(&format!("{VOLUME}@")).map(str::to_owned))
        .collect()
}

/// Runs `blockd verify` on a stopped daemon's data directory; returns (errors, warnings).
fn verify(data_dir: &Path) -> (u64, u64, String) {
    let out = run_with_timeout(
        Command::new(blockd_bin())
            .args(["--output", "json", "verify", "--data-dir"])
            .arg(data_dir),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "blockd verify printed no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    let errors = findings.iter().filter(|f| f["severity"] == "error").count() as u64;
    assert_eq!(
        out.status.success(),
        errors == 0,
        "verify's exit status agrees with its findings: {stdout}"
    );
    (errors, findings.len() as u64 - errors, stdout)
}

/// Fails the test, keeping a copy of the data directory and the daemon log for a post
/// mortem (the originals are removed with the test's temporary directory).
fn fail(seed: u64, cycle: u64, d: &Daemon, msg: String) -> ! {
    let log = d.log();
    let keep = std::env::temp_dir().join(format!("blockd-crash-failure-{seed}-{cycle}"));
    let _ = std::fs::remove_dir_all(&keep);
    let kept = std::fs::create_dir_all(&keep).is_ok()
        && std::fs::write(keep.join("daemon.log"), &log).is_ok()
        && Command::new("cp")
            .arg("-a")
            .arg(&d.data_dir)
            .arg(keep.join("data"))
            .status()
            .is_ok_and(|s| s.success());
    let lines: Vec<&str> = log.lines().collect();
    panic!(
        "seed {seed}, cycle {cycle}: {msg}\n{}\n-- daemon log (tail) --\n{}",
        if kept {
            format!("(data directory and daemon log kept in {})", keep.display())
        } else {
            String::new()
        },
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

// ---------------------------------------------------------------- the test

#[derive(Default, Debug)]
struct Totals {
    writes: u64,
    fua: u64,
    zeroes: u64,
    flushes: u64,
    reads: u64,
    mib_written: u64,
    snapshots_acked: u64,
    snapshots_unacked: u64,
    snapshots_unacked_present: u64,
    snapshot_reads: u64,
    snapshots_deleted_under_io: u64,
    clone_reads: u64,
    /// Unflushed records torn by the test (simulated power loss) ...
    tails_torn: u64,
    /// ... and torn tails the restarts reported cutting.
    torn_tails_cut: u64,
    /// Sectors whose newest acknowledged (but not yet flushed) value was lost to a
    /// simulated power loss (allowed; after a plain kill -9 it fails the test).
    acked_unflushed_lost_power_loss: u64,
    /// Sectors holding a value whose write was in flight at the kill.
    in_flight_landed: u64,
    verify_runs: u64,
    verify_warnings: u64,
}

#[test]
fn kill_9_during_writes_loses_nothing_flushed_and_keeps_acknowledged_snapshots() {
    let started = Instant::now();
    let seed = env_u64("BLOCKD_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let cycles = env_u64("BLOCKD_CRASH_CYCLES").unwrap_or(50);
    let compaction = env_u64("BLOCKD_CRASH_COMPACT") != Some(0);
    println!("crash test: seed {seed}, {cycles} cycles (repeat with BLOCKD_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);

    let mut d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume(VOLUME, &VOLUME_BYTES.to_string());
    let mut model = Model::new();
    let mut snaps: Vec<Snap> = Vec::new();
    let mut clones: Vec<CloneOf> = Vec::new();
    let mut totals = Totals::default();
    let mut next_op = 1u64;

    for cycle in 0..cycles {
        let fail = |d: &Daemon, msg: String| fail(seed, cycle, d, msg);

        // 1. The workload, killed after a random delay.
        let sh = Shared {
            model: Mutex::new(std::mem::replace(&mut model, Model::new())),
            gate: RwLock::new(()),
            killed: AtomicBool::new(false),
            next_op: AtomicU64::new(next_op),
            stats: Stats::default(),
        };
        let clients: Vec<Client> = (0..WORKERS)
            .map(|w| {
                let mut c = if w % 2 == 0 {
                    Client::tcp(&d.nbd)
                } else {
                    Client::unix(&d.socket)
                };
                let (size, flags) = c.handshake(VOLUME);
                assert_eq!(size, VOLUME_BYTES);
                let need = FLAG_SEND_FLUSH
                    | FLAG_SEND_FUA
                    | FLAG_SEND_TRIM
                    | FLAG_SEND_WRITE_ZEROES
                    | FLAG_CAN_MULTI_CONN;
                assert_eq!(flags & need, need, "transmission flags {flags:#x}");
                c
            })
            .collect();
        let kill_after = Duration::from_millis(60 + rng.below(600));
        let work = Mutex::new(SnapshotWork::default());
        let deletable: Vec<String> = snaps.iter().map(|s| s.name.clone()).collect();
        let worker_seeds: Vec<u64> = (0..WORKERS).map(|_| rng.next()).collect();
        let snap_seed = rng.next();
        std::thread::scope(|s| {
            for (w, c) in clients.into_iter().enumerate() {
                let region = w * SECTORS / WORKERS..(w + 1) * SECTORS / WORKERS;
                let (sh, seed) = (&sh, worker_seeds[w]);
                s.spawn(move || worker(sh, c, region, Rng::new(seed)));
            }
            s.spawn(|| {
                let rng = Rng::new(snap_seed);
                snapshotter(&sh, &d, cycle, rng, deletable, &work)
            });
            std::thread::sleep(kill_after);
            sh.killed.store(true, Ordering::SeqCst);
            d.signal(libc::SIGKILL);
        });
        model = sh.model.into_inner();
        next_op = sh.next_op.load(Ordering::Relaxed);
        let st = &sh.stats;
        totals.writes += st.writes.load(Ordering::Relaxed);
        totals.fua += st.fua.load(Ordering::Relaxed);
        totals.zeroes += st.zeroes.load(Ordering::Relaxed);
        totals.flushes += st.flushes.load(Ordering::Relaxed);
        totals.reads += st.reads.load(Ordering::Relaxed);
        totals.mib_written += st.bytes_written.load(Ordering::Relaxed) >> 20;
        let work = work.into_inner();
        for (name, acked) in work.deleted {
            let snap = snaps
                .iter_mut()
                .find(|s| s.name == name)
                .expect("deleted a known snapshot");
            snap.deleted = Some(acked);
            totals.snapshots_deleted_under_io += 1;
        }
        clones.extend(work.clones);
        for snap in work.created {
            if snap.acked {
                totals.snapshots_acked += 1;
            } else {
                totals.snapshots_unacked += 1;
            }
            snaps.push(snap);
        }

        // 2. Sometimes power loss on top, an offline check of the crashed store now and
        //    then, and the restart.
        let (dir, data_dir) = d.into_dirs(false);
        let torn = if rng.percent(35) {
            tear_unflushed_record(&data_dir, &mut rng)
        } else {
            None
        };
        if cycle % 10 == 9 {
            let (errors, warnings, report) = verify(&data_dir);
            totals.verify_runs += 1;
            totals.verify_warnings += warnings;
            assert_eq!(
                errors, 0,
                "seed {seed}, cycle {cycle}: blockd verify on the crashed store: {report}"
            );
        }
        let log_before = std::fs::read_to_string(dir.path().join("daemon.log"))
            .unwrap_or_default()
            .len();
        let extra: &[&str] = if cycle % 2 == 0 || !compaction {
            &["--compact-interval", "0"]
        } else {
            // Background compaction passes while the next workload runs (and dies).
            &["--compact-interval", "150ms"]
        };
        d = Daemon::start_in(dir, data_dir, extra);
        let log = d.log();
        let recovery_log = &log[log_before.min(log.len())..];
        totals.torn_tails_cut += recovery_log.matches("torn tail").count() as u64;
        if let Some((segment, seq)) = torn {
            totals.tails_torn += 1;
            let note = format!("segment {segment:016x}: torn tail: ");
            let from = format!("record(s) from seq {seq} dropped");
            if !recovery_log
                .lines()
                .any(|l| l.contains(&note) && l.contains(&from))
            {
                fail(
                    &d,
                    format!(
                        "record {seq} of segment {segment:016x} was torn, but recovery did not report cutting the tail there"
                    ),
                );
            }
        }

        // 3. Every sector holds its durable value or one written after it.
        let observed = read_all(&d, VOLUME).unwrap_or_else(|e| fail(&d, e));
        for (s, &v) in observed.iter().enumerate() {
            if !model.allowed(s, v) {
                fail(
                    &d,
                    format!(
                        "sector {s} (byte {}) holds write {v} after the restart; allowed: {}",
                        s * SECTOR,
                        model.describe(s)
                    ),
                );
            }
            if v != model.latest_acked(s) {
                if model.pending[s]
                    .iter()
                    .any(|x| x.value == v && x.acked == NOT_ACKED)
                {
                    totals.in_flight_landed += 1;
                } else if torn.is_some() {
                    totals.acked_unflushed_lost_power_loss += 1;
                } else {
                    // docs/FORMAT.md: "an orderly process exit or `kill -9` loses nothing
                    // even without a flush" (the page cache survives the process).
                    fail(
                        &d,
                        format!(
                            "sector {s} lost its last acknowledged write {} to a plain kill -9 \
                             (holds {v}; {})",
                            model.latest_acked(s),
                            model.describe(s)
                        ),
                    );
                }
            }
        }
        model.reset_to(&observed);

        // 4. Acknowledged snapshots are exact; unacknowledged ones exact if they exist;
        //    acknowledged deletions stick.
        let listed = snapshot_names(&d);
        for name in &listed {
            if !snaps.iter().any(|s| &s.name == name) {
                fail(&d, format!("unexpected snapshot {VOLUME}@{name}"));
            }
        }
        let mut kept = Vec::new();
        for snap in snaps.drain(..) {
            if !listed.contains(&snap.name) {
                if snap.acked && snap.deleted.is_none() {
                    fail(
                        &d,
                        format!("acknowledged snapshot {VOLUME}@{} is gone", snap.name),
                    );
                }
                continue;
            }
            if snap.deleted == Some(true) {
                fail(
                    &d,
                    format!(
                        "snapshot {VOLUME}@{} is back after its deletion was acknowledged",
                        snap.name
                    ),
                );
            }
            let export = format!("{VOLUME}@{}", snap.name);
            let got = read_all(&d, &export).unwrap_or_else(|e| fail(&d, e));
            totals.snapshot_reads += 1;
            if let Some(s) = (0..SECTORS).find(|&s| got[s] != snap.expected[s]) {
                fail(
                    &d,
                    format!(
                        "snapshot {export}: sector {s} holds write {}, expected {}",
                        got[s], snap.expected[s]
                    ),
                );
            }
            if !snap.acked {
                totals.snapshots_unacked_present += 1;
            }
            kept.push(Snap {
                acked: true,
                deleted: None,
                ..snap
            });
        }
        // Keep the newest; deleting the others merges them into their dependents.
        while kept.len() > KEEP_SNAPSHOTS {
            let old = kept.remove(0);
            let name = format!("{VOLUME}@{}", old.name);
            d.cli_ok_once_disconnected(&["snapshot", "delete", &name, "--defer"]);
        }
        snaps = kept;

        // 5. Clones whose creation was acknowledged exist and read as their snapshot did;
        //    then they go, and with them every snapshot hidden for their sake.
        let volumes: Vec<String> = {
            let v: serde_json::Value =
                serde_json::from_str(&d.cli_ok(&["--output", "json", "volume", "list"]))
                    .expect("volume list json");
            v.as_array()
                .expect("array")
                .iter()
                .filter_map(|x| x["name"].as_str().map(str::to_owned))
                .collect()
        };
        for name in &volumes {
            if name != VOLUME && !clones.iter().any(|c| &c.name == name) {
                fail(&d, format!("unexpected volume {name}"));
            }
        }
        for clone in clones.drain(..) {
            if !volumes.contains(&clone.name) {
                if clone.acked {
                    fail(&d, format!("acknowledged clone {} is gone", clone.name));
                }
                continue;
            }
            let got = read_all(&d, &clone.name).unwrap_or_else(|e| fail(&d, e));
            totals.clone_reads += 1;
            if let Some(s) = (0..SECTORS).find(|&s| got[s] != clone.expected[s]) {
                fail(
                    &d,
                    format!(
                        "clone {}: sector {s} holds write {}, expected {}",
                        clone.name, got[s], clone.expected[s]
                    ),
                );
            }
            d.cli_ok_once_disconnected(&["volume", "delete", &clone.name]);
        }
        let stats: serde_json::Value =
            serde_json::from_str(&d.cli_ok(&["--output", "json", "df"])).expect("df json");
        if stats["hidden_snapshots"] != 0 {
            fail(
                &d,
                format!("hidden snapshots are left with no clone using them: {stats}"),
            );
        }
        assert!(
            started.elapsed() < BUDGET,
            "seed {seed}: {cycle} cycles took {:?}, over the budget of {BUDGET:?}",
            started.elapsed()
        );
    }

    // 6. A clean stop, and the offline check finds nothing wrong.
    let (dir, data_dir) = d.into_dirs(true);
    let (errors, warnings, report) = verify(&data_dir);
    totals.verify_runs += 1;
    totals.verify_warnings += warnings;
    assert_eq!(errors, 0, "seed {seed}: blockd verify at the end: {report}");
    assert_eq!(warnings, 0, "seed {seed}: after a clean stop: {report}");
    drop(dir);

    println!(
        "crash test: seed {seed}: {cycles} kill -9/restart cycles in {:.1?}: {totals:#?}",
        started.elapsed()
    );
    assert!(
        totals.writes > cycles * 20,
        "the workload barely ran: {totals:?}"
    );
    assert!(totals.snapshots_acked > 0, "no snapshot was taken");
}
