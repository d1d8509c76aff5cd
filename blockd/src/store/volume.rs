//! Live volumes and snapshots: the data path of the extent store.
//!
//! A writable volume owns a log (its own segments; the last one is being appended to) and
//! a complete extent map. A write appends the payload and its provisional index entry to
//! the active segment, then points the map at it. A read looks the range up in the map (one
//! lookup, whatever the snapshot depth) and reads the segments it names. A flush is a
//! group commit: sync the payloads, write a commit batch, sync the index.
//!
//! A snapshot is a frozen map plus the segments the volume had written since its previous
//! snapshot. Nothing shared is ever modified: every write goes to the writing volume's own
//! active segment.
//!
//! Lock order (outermost first): `sync_lock`, `log`, `state`, then the catalog (inside
//! `Ctx::persist`).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

use super::catalog::Ctx;
use super::format::{self, MAX_RECORD_BYTES, Record};
use super::group_commit::{FlushError, GroupCommit};
use super::map::{ExtentMap, Location, Target};
use super::segment::{Active, Segment, SegmentId, WriteIn};
use super::{Extent, ExtentState, Result, StoreError, Volume, ZeroMode, check_range};

/// A location in a segment.
#[derive(Clone)]
pub struct SegLoc {
    pub seg: Arc<Segment>,
    pub off: u64,
}

impl std::fmt::Debug for SegLoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}+{}", self.seg.id, self.off)
    }
}

impl Location for SegLoc {
    fn advance(&self, delta: u64) -> SegLoc {
        SegLoc {
            seg: self.seg.clone(),
            off: self.off + delta,
        }
    }

    fn continues(&self, len: u64, next: &SegLoc) -> bool {
        Arc::ptr_eq(&self.seg, &next.seg) && self.off + len == next.off
    }
}

pub type Map = ExtentMap<SegLoc>;

/// A map plus the accounting that changes with it.
#[derive(Clone, Default)]
pub struct MapState {
    pub map: Map,
    /// Live payload bytes per segment this volume (or snapshot) owns.
    pub own_live: HashMap<SegmentId, u64>,
    /// Bytes of the volume that are data (not holes or zeroes).
    pub data_bytes: u64,
}

impl MapState {
    /// Applies one record of segment `seg` (owned by whoever owns this state).
    pub fn apply(&mut self, record: &Record, seg: &Arc<Segment>) {
        let (logical, len, target) = match *record {
            Record::Write {
                logical,
                len,
                data_off,
                ..
            } => (
                logical,
                u64::from(len),
                Some(Target::Data(SegLoc {
                    seg: seg.clone(),
                    off: data_off,
                })),
            ),
            Record::Zero {
                logical,
                len,
                keep_allocated: true,
                ..
            } => (logical, len, Some(Target::Zero)),
            Record::Zero {
                logical,
                len,
                keep_allocated: false,
                ..
            } => (logical, len, None),
        };
        let MapState {
            map,
            own_live,
            data_bytes,
        } = self;
        map.set(logical, len, target, |_, l, t| {
            if let Target::Data(loc) = t {
                *data_bytes -= l;
                if let Some(v) = own_live.get_mut(&loc.seg.id) {
                    *v -= l;
                }
            }
        });
        if let Record::Write { .. } = record {
            *data_bytes += len;
            *own_live.entry(seg.id).or_insert(0) += len;
        }
    }

    /// Points `len` bytes at `logical` to `to`, where they still point to `from_seg` at
    /// `from_off` (compaction moved that data; parts overwritten since are left alone).
    pub fn redirect(
        &mut self,
        logical: u64,
        len: u64,
        from_seg: SegmentId,
        from_off: u64,
        to: SegLoc,
    ) {
        let mut still: Vec<(u64, u64)> = Vec::new();
        self.map.visit(logical, len, |o, l, t| {
            if let Some(Target::Data(loc)) = t
                && loc.seg.id == from_seg
                && loc.off == from_off + (o - logical)
            {
                still.push((o, l));
            }
        });
        for (o, l) in still {
            let target = Target::Data(to.advance(o - logical));
            let MapState { map, own_live, .. } = self;
            map.set(o, l, Some(target), |_, rl, t| {
                if let Target::Data(loc) = t
                    && let Some(v) = own_live.get_mut(&loc.seg.id)
                {
                    *v -= rl;
                }
            });
            *own_live.entry(to.seg.id).or_insert(0) += l;
        }
    }

    /// Bytes of data stored in this owner's segments.
    pub fn unique_bytes(&self) -> u64 {
        self.own_live.values().sum()
    }

    /// Computes the live bytes of `segs` (just taken over by this owner) from the map. The
    /// counts of the segments it already owned are up to date and left alone.
    pub fn adopt(&mut self, segs: &[SegmentId]) {
        let mut adopted: HashMap<SegmentId, u64> = segs.iter().map(|id| (*id, 0)).collect();
        for (_, len, t) in self.map.iter() {
            if let Target::Data(loc) = t
                && let Some(v) = adopted.get_mut(&loc.seg.id)
            {
                *v += len;
            }
        }
        self.own_live.extend(adopted);
    }

    /// (offset, len) of every data extent in segment `id`, sorted by offset in the segment.
    pub fn live_ranges(&self, id: SegmentId) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter_map(|(_, len, t)| match t {
                Target::Data(loc) if loc.seg.id == id => Some((loc.off, len)),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out
    }
}

/// A piece of a read: where in the buffer, and what fills it.
type Piece = (u64, u64, Option<Target<SegLoc>>);

/// The pieces covering a range, looked up while the caller holds the map lock. The lock is
/// released before any data is read, and the map is not cloned: a live clone would make
/// every concurrent write copy the B-tree nodes it touches.
fn pieces(map: &Map, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(2);
    map.visit(offset, len, |o, l, t| out.push((o, l, t)));
    out
}

/// Fills `buf` (which starts at `offset`) from `pieces`.
///
/// Consecutive pieces stored back to back in the same segment are read with one call: a
/// volume filled with 4 KiB writes maps a 1 MiB range as 256 pieces, but sequential
/// writes are also sequential in the log, so that is usually one read, not 256.
fn read_pieces(pieces: Vec<Piece>, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut i = 0;
    while i < pieces.len() {
        let (o, l, t) = &pieces[i];
        let start = (o - offset) as usize;
        match t {
            Some(Target::Data(loc)) => {
                let mut end = o + l;
                let mut j = i + 1;
                while let Some((o2, l2, Some(Target::Data(next)))) = pieces.get(j) {
                    if *o2 != end
                        || !Arc::ptr_eq(&next.seg, &loc.seg)
                        || next.off != loc.off + (end - o)
                    {
                        break;
                    }
                    end += l2;
                    j += 1;
                }
                loc.seg
                    .read(&mut buf[start..(end - offset) as usize], loc.off)?;
                i = j;
            }
            Some(Target::Zero) | None => {
                buf[start..(o - offset + l) as usize].fill(0);
                i += 1;
            }
        }
    }
    Ok(())
}

/// Granularity of block status replies: the spec asks for multiples of 512 bytes, so a
/// sector that is partly data is reported as data (and partly zero, partly hole as zero).
pub const STATUS_SECTOR_BYTES: u64 = 512;

fn rank(s: ExtentState) -> u8 {
    match s {
        ExtentState::Hole => 0,
        ExtentState::Zero => 1,
        ExtentState::Data => 2,
    }
}

fn status_map(map: &Map, offset: u64, len: u64, max: usize) -> Vec<Extent> {
    let g = STATUS_SECTOR_BYTES;
    let end = offset + len;
    // Runs of (start, end, state) on sector boundaries, except at the ends of the range.
    let mut runs: Vec<(u64, u64, ExtentState)> = Vec::new();
    map.visit(offset, len, |o, l, t| {
        if runs.len() > max + 1 {
            return;
        }
        let state = match t {
            Some(Target::Data(_)) => ExtentState::Data,
            Some(Target::Zero) => ExtentState::Zero,
            None => ExtentState::Hole,
        };
        let mut start = (o / g * g).max(offset);
        let stop = (o + l).next_multiple_of(g).min(end);
        if let Some(last) = runs.last_mut()
            && last.1 > start
        {
            // The sector at `start` is shared with the previous run: the higher state wins.
            if rank(last.2) >= rank(state) {
                start = last.1;
            } else {
                last.1 = start;
            }
        }
        if runs.last().is_some_and(|r| r.0 >= r.1) {
            runs.pop();
        }
        if start >= stop {
            return;
        }
        match runs.last_mut() {
            Some(r) if r.2 == state && r.1 == start => r.1 = stop,
            _ => runs.push((start, stop, state)),
        }
    });
    let mut out: Vec<Extent> = runs
        .into_iter()
        .map(|(s, e, state)| Extent { len: e - s, state })
        .collect();
    out.truncate(max.max(1));
    out
}

/// Segment room one write of a burst may take: its payload and the alignment gap in
/// front of it (under a page).
fn burst_room(payload: &[u8]) -> u64 {
    payload.len() as u64 + format::PAGE_BYTES
}

/// The append side of a volume.
pub struct Log {
    /// Own segments in replay order; the active one, if any, is last.
    pub segments: Vec<Arc<Segment>>,
    pub active: Option<Active>,
}

/// A writable volume.
pub struct VolumeCore {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub created_unix: u64,
    ctx: Arc<Ctx>,
    /// The snapshot this volume started from (or was last snapshotted as).
    pub origin: Mutex<Option<u64>>,
    /// The snapshot this volume was cloned from, if it is a clone.
    pub clone_of: Option<u64>,
    pub log: Mutex<Log>,
    pub state: RwLock<MapState>,
    /// Held by the flush leader, segment rolls and snapshots: one of them at a time.
    pub sync_lock: Mutex<()>,
    commit: GroupCommit,
    /// Open NBD handles.
    pub handles: AtomicUsize,
    pub stats: VolumeStats,
}

#[derive(Debug, Default)]
pub struct VolumeStats {
    pub writes: AtomicU64,
    pub commits: AtomicU64,
    pub rolls: AtomicU64,
}

impl VolumeCore {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        rec: &super::catalog::VolumeRec,
        state: MapState,
        segments: Vec<Arc<Segment>>,
    ) -> VolumeCore {
        VolumeCore {
            id: rec.id,
            name: rec.name.clone(),
            size: rec.size_bytes,
            created_unix: rec.created_unix,
            ctx,
            origin: Mutex::new(rec.origin),
            clone_of: rec.clone_of,
            log: Mutex::new(Log {
                segments,
                active: None,
            }),
            state: RwLock::new(state),
            sync_lock: Mutex::new(()),
            commit: GroupCommit::new(),
            handles: AtomicUsize::new(0),
            stats: VolumeStats::default(),
        }
    }

    fn what(&self) -> String {
        format!("volume {}", self.name)
    }

    /// Makes sure there is an active segment with room for `len` more payload bytes,
    /// sealing a full one and creating a new one as needed. Returns with `log` locked.
    fn log_with_room(&self, len: u64) -> Result<parking_lot::MutexGuard<'_, Log>> {
        loop {
            let log = self.log.lock();
            let full = log
                .active
                .as_ref()
                .is_some_and(|a| a.dat_tail + len > self.ctx.config.segment_bytes);
            if !full && log.active.is_some() {
                return Ok(log);
            }
            drop(log);
            let _sync = self.sync_lock.lock();
            let mut log = self.log.lock();
            if log
                .active
                .as_ref()
                .is_some_and(|a| a.dat_tail + len > self.ctx.config.segment_bytes)
            {
                self.seal_active(&mut log)?;
            }
            if log.active.is_none() {
                self.start_segment(&mut log)?;
            }
        }
    }

    /// Seals the active segment (caller holds `sync_lock` and `log`).
    ///
    /// Sealing syncs the volume's data, so it follows the flush rule: after a failed sync
    /// nothing is sealed any more (a seal would claim durability for writes the failed
    /// sync may have lost), and a failed seal fails every later flush. Otherwise a later
    /// sync could succeed and make the failed seal batch durable, and recovery would trust
    /// it over records flushed after it.
    pub(crate) fn seal_active(&self, log: &mut Log) -> Result<()> {
        if self.commit.is_poisoned() && log.active.is_some() {
            return Err(StoreError::FlushFailed { what: self.what() });
        }
        if let Some(mut a) = log.active.take() {
            let pending = a.prepare_seal();
            if let Err(e) = pending.write() {
                self.commit.poison();
                log.active = Some(a);
                return Err(StoreError::io(
                    format!("sealing a segment of {}", self.what()),
                    e,
                ));
            }
            a.mark_sealed();
            self.stats.rolls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn start_segment(&self, log: &mut Log) -> Result<()> {
        let id = self.ctx.alloc_segment_id();
        let mut active = Active::create(&*self.ctx.fs, &self.ctx.seg_dir, id, 1)?;
        active.set_fill_limit(self.ctx.config.segment_bytes);
        active.set_direct_writes(self.ctx.config.direct_write_min_bytes);
        self.ctx
            .fs
            .sync_dir(&self.ctx.seg_dir)
            .map_err(|e| StoreError::io("syncing the segment directory", e))?;
        let vid = self.id;
        // On failure the files stay: the catalog record may have reached the disk although
        // its sync failed, and then the segment must exist at the next start; if it did
        // not, they are orphans, removed at the next start.
        self.ctx.persist(|c| {
            c.volume_mut(vid)?.segments.push(id);
            Ok(())
        })?;
        self.state.write().own_live.insert(id, 0);
        log.segments.push(active.seg.clone());
        log.active = Some(active);
        Ok(())
    }

    fn append<R: AsRef<[Record]>>(
        &self,
        records: impl FnOnce(&mut Active) -> Result<R>,
        len: u64,
    ) -> Result<()> {
        let mut log = self.log_with_room(len)?;
        let active = log
            .active
            .as_mut()
            .ok_or_else(|| StoreError::io(self.what(), io::Error::other("no active segment")))?;
        let recs = records(active)?;
        let seg = active.seg.clone();
        let mut st = self.state.write();
        for rec in recs.as_ref() {
            st.apply(rec, &seg);
        }
        drop(st);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `payload` at `logical` as one append (one record per `MAX_RECORD_BYTES`
    /// piece, checksummed before the log lock is taken).
    fn write_records(&self, logical: u64, payload: &[u8]) -> Result<()> {
        if payload.len() <= MAX_RECORD_BYTES {
            let crc = format::payload_crc(payload);
            return self.append(
                |a| a.append_write(logical, payload, crc).map(|r| [r]),
                payload.len() as u64,
            );
        }
        let crcs: Vec<u32> = payload
            .chunks(MAX_RECORD_BYTES)
            .map(format::payload_crc)
            .collect();
        self.append(
            |a| a.append_writes(logical, payload, &crcs),
            payload.len() as u64,
        )
    }

    /// Writes a burst of small writes (each at most `MAX_RECORD_BYTES`) as one append: one
    /// record each, checksummed before the log lock is taken, applied in order.
    fn write_burst(&self, writes: &[(u64, &[u8])]) -> Result<()> {
        let crcs: Vec<u32> = writes.iter().map(|(_, p)| format::payload_crc(p)).collect();
        let burst: Vec<WriteIn<'_>> = writes
            .iter()
            .zip(&crcs)
            .map(|((logical, payload), crc)| WriteIn {
                logical: *logical,
                payload,
                crcs: std::slice::from_ref(crc),
            })
            .collect();
        let len = writes.iter().map(|(_, p)| burst_room(p)).sum();
        self.append(|a| a.append_burst(&burst), len)
    }

    fn zero_range(&self, logical: u64, len: u64, keep_allocated: bool) -> Result<()> {
        if !keep_allocated {
            // A trim of what is already a hole changes nothing: don't grow the log.
            let mut mapped = false;
            self.state
                .read()
                .map
                .visit(logical, len, |_, _, t| mapped |= t.is_some());
            if !mapped {
                return Ok(());
            }
        }
        self.append(
            |a| a.append_zero(logical, len, keep_allocated).map(|r| [r]),
            0,
        )
    }

    /// Commits everything appended so far: the flush leader's work.
    fn commit_now(&self) -> io::Result<()> {
        let _sync = self.sync_lock.lock();
        let pending = match self.log.lock().active.as_mut() {
            Some(a) => a.prepare_commit(),
            None => None,
        };
        let Some(pending) = pending else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        pending.write()?;
        let m = &self.ctx.metrics;
        m.commit_seconds.observe(started.elapsed().as_secs_f64());
        m.commits.inc();
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock();
        if let Some(a) = log.active.as_mut()
            && a.seg.id == pending.seg_id
        {
            a.committed = a.committed.max(pending.upto);
        }
        Ok(())
    }

    pub fn flush_volume(&self) -> Result<()> {
        self.ctx.metrics.flushes.inc();
        self.commit
            .flush(|| self.commit_now())
            .map_err(|e| match e {
                FlushError::Sync(source) => {
                    StoreError::io(format!("flushing {}", self.what()), source)
                }
                FlushError::Poisoned => StoreError::FlushFailed { what: self.what() },
            })
    }

    pub fn unique_bytes(&self) -> u64 {
        self.state.read().unique_bytes()
    }

    pub fn data_bytes(&self) -> u64 {
        self.state.read().data_bytes
    }

    pub fn segment_ids(&self) -> Vec<SegmentId> {
        self.log.lock().segments.iter().map(|s| s.id).collect()
    }

    pub fn seg_dir(&self) -> &PathBuf {
        &self.ctx.seg_dir
    }
}

/// A snapshot: an immutable map and the segments it owns.
pub struct SnapshotCore {
    pub id: u64,
    pub size: u64,
    pub created_unix: u64,
    /// The map and accounting. Never changes after creation except when a deleted parent
    /// is merged in (its segments become this snapshot's own).
    pub state: RwLock<MapState>,
    pub segments: Mutex<Vec<Arc<Segment>>>,
    /// Open NBD handles.
    pub handles: AtomicUsize,
}

impl SnapshotCore {
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let p = pieces(&self.state.read().map, offset, buf.len() as u64);
        read_pieces(p, offset, buf)
    }
}

/// An NBD handle on a writable volume.
pub struct VolumeHandle {
    pub core: Arc<VolumeCore>,
}

impl VolumeHandle {
    pub fn new(core: Arc<VolumeCore>) -> VolumeHandle {
        core.handles.fetch_add(1, Ordering::AcqRel);
        VolumeHandle { core }
    }
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.core.handles.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Volume for VolumeHandle {
    fn size(&self) -> u64 {
        self.core.size
    }

    fn direct_write_min_bytes(&self) -> u64 {
        self.core.ctx.config.direct_write_min_bytes
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.core.size)?;
        let p = pieces(&self.core.state.read().map, offset, buf.len() as u64);
        read_pieces(p, offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.core.size)?;
        if data.is_empty() {
            return Ok(());
        }
        // One append per segment's worth at most, so a write never needs more room than a
        // segment has.
        let per_append = (self.core.ctx.config.segment_bytes / 2)
            .max(MAX_RECORD_BYTES as u64)
            .next_multiple_of(MAX_RECORD_BYTES as u64) as usize;
        for (i, chunk) in data.chunks(per_append).enumerate() {
            self.core
                .write_records(offset + (i * per_append) as u64, chunk)?;
        }
        Ok(())
    }

    /// Each run of small writes (at most `MAX_RECORD_BYTES`) becomes one append, bounded
    /// by half a segment like `write`; other writes go through `write`.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<()> {
        for (offset, data) in writes {
            check_range(*offset, data.len() as u64, self.core.size)?;
        }
        let budget = self.core.ctx.config.segment_bytes / 2;
        let small =
            |d: &[u8]| !d.is_empty() && d.len() <= MAX_RECORD_BYTES && burst_room(d) <= budget;
        let mut rest = writes;
        while !rest.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            for (_, d) in rest {
                if !small(d) || bytes + burst_room(d) > budget {
                    break;
                }
                bytes += burst_room(d);
                n += 1;
            }
            match n {
                0 | 1 => {
                    let (offset, data) = rest[0];
                    self.write(offset, data)?;
                    rest = &rest[1..];
                }
                _ => {
                    self.core.write_burst(&rest[..n])?;
                    rest = &rest[n..];
                }
            }
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.core.size)?;
        if len == 0 {
            return Ok(());
        }
        self.core.zero_range(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        check_range(offset, len, self.core.size)?;
        if len == 0 {
            return Ok(());
        }
        // Zeroing is a metadata record whatever the length: always fast.
        self.core.zero_range(offset, len, !mode.may_trim)
    }

    fn flush(&self) -> Result<()> {
        self.core.flush_volume()
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        check_range(offset, len, self.core.size)?;
        Ok(status_map(
            &self.core.state.read().map,
            offset,
            len,
            max_extents,
        ))
    }
}

/// An NBD handle on a snapshot (read-only).
pub struct SnapshotHandle {
    pub core: Arc<SnapshotCore>,
    pub name: String,
}

impl SnapshotHandle {
    pub fn new(core: Arc<SnapshotCore>, name: String) -> SnapshotHandle {
        core.handles.fetch_add(1, Ordering::AcqRel);
        SnapshotHandle { core, name }
    }
}

impl Drop for SnapshotHandle {
    fn drop(&mut self) {
        self.core.handles.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Volume for SnapshotHandle {
    fn size(&self) -> u64 {
        self.core.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.core.read(offset, buf)
    }

    fn write(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(StoreError::ReadOnly {
            what: format!("snapshot {}", self.name),
        })
    }

    fn trim(&self, _: u64, _: u64) -> Result<()> {
        Err(StoreError::ReadOnly {
            what: format!("snapshot {}", self.name),
        })
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode) -> Result<()> {
        Err(StoreError::ReadOnly {
            what: format!("snapshot {}", self.name),
        })
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        check_range(offset, len, self.core.size)?;
        Ok(status_map(
            &self.core.state.read().map,
            offset,
            len,
            max_extents,
        ))
    }
}
