//! The extent store: recovery and the control operations on volumes and snapshots.
//!
//! Control operations are serialised by one lock (`ops`); each prepares its change,
//! makes the catalog change durable, and only then changes the in-memory state, so a
//! failure leaves memory and disk agreeing. Space is returned when a volume or snapshot
//! goes (its own segments are removed), when a deleted snapshot is merged into its only
//! dependent, and by compaction ([`super::compact`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use super::catalog::{Catalog, Config, Ctx, SnapshotRec, VolumeRec};
use super::io::Fs;
use super::segment::{self, Segment, SegmentId};
use super::volume::{Log, MapState, SnapshotCore, SnapshotHandle, VolumeCore, VolumeHandle};
use super::{Result, StoreError, Volume};
use crate::names::Name;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What `volume list/show` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// `VOLUME@SNAP` this volume was cloned from, if it is a clone.
    pub clone_of: Option<String>,
    /// The snapshot whose contents this volume builds on (its origin), if any.
    pub origin: Option<String>,
    /// Bytes of data only this volume holds (its own log).
    pub unique_bytes: u64,
    /// Bytes of data it shares with its origin snapshot.
    pub shared_bytes: u64,
    pub created_unix: u64,
    pub nbd_connections: usize,
}

/// What `snapshot list` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// `VOLUME@SNAP`
    pub name: String,
    pub volume: String,
    pub size_bytes: u64,
    /// Bytes of data in the snapshot.
    pub data_bytes: u64,
    /// Bytes held only in this snapshot's own segments.
    pub unique_bytes: u64,
    pub created_unix: u64,
    /// Volumes cloned from it.
    pub clones: Vec<String>,
}

/// `blockd df`: the whole store.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StoreStats {
    pub volumes: usize,
    pub snapshots: usize,
    pub hidden_snapshots: usize,
    pub segments: usize,
    /// Sum of volume sizes.
    pub logical_bytes: u64,
    /// Data bytes as volumes and snapshots see them (what full copies would need).
    pub referenced_bytes: u64,
    /// Data bytes actually stored (live payloads in segments).
    pub stored_bytes: u64,
    /// Bytes of disk the segment files occupy.
    pub physical_bytes: u64,
}

/// What deleting a snapshot did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub enum SnapshotDeletion {
    /// Gone; its space is reclaimed (merged into its dependent or freed).
    Deleted,
    /// Hidden until these clones are gone.
    Deferred { clones: Vec<String> },
}

struct State {
    volumes: BTreeMap<u64, Arc<VolumeCore>>,
    snapshots: BTreeMap<u64, Arc<SnapshotCore>>,
}

pub struct Store {
    pub(crate) ctx: Arc<Ctx>,
    ops: Mutex<()>,
    state: RwLock<State>,
    /// Time the last open took (recovery), for metrics.
    pub recovery_seconds: f64,
    /// Notes from recovery (torn tails cut, damaged batches), for logs and `verify`.
    pub recovery_notes: Vec<String>,
    /// Set at shutdown: background work (compaction) stops at its next safe point.
    stopping: std::sync::atomic::AtomicBool,
}

fn not_found(what: &str, name: &str, hint: &'static str) -> StoreError {
    StoreError::NotFound {
        what: format!("{what} {name}"),
        hint,
    }
}

/// Splits `VOLUME@SNAP`.
pub fn split_snapshot_name(s: &str) -> Result<(Name, Name)> {
    let (v, snap) = s.split_once('@').ok_or_else(|| {
        StoreError::invalid(format!(
            "{s:?} is not a snapshot name; write VOLUME@SNAPSHOT"
        ))
    })?;
    let v = Name::parse("volume", v).map_err(|e| StoreError::invalid(e.to_string()))?;
    let snap = Name::parse("snapshot", snap).map_err(|e| StoreError::invalid(e.to_string()))?;
    Ok((v, snap))
}

impl Store {
    /// Opens the store in `dir` on the given I/O engine, recovering from any crash.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, config: Config) -> Result<Store> {
        let started = Instant::now();
        config.validate()?;
        let ctx = Arc::new(Ctx::open(fs, dir, config)?);
        let cat = ctx.catalog();
        let mut notes = ctx.recovery_notes.clone();
        remove_orphans(&ctx, &cat, &mut notes)?;

        // Load every segment; seal the ones a crash left open.
        let mut loaded: HashMap<SegmentId, segment::LoadedSegment> = HashMap::new();
        let maybe_unsealed = cat.maybe_unsealed();
        for id in cat.segment_ids() {
            let must_be_sealed = !maybe_unsealed.contains(&id);
            let l = segment::load_checked(&*ctx.fs, &ctx.seg_dir, id, must_be_sealed)?;
            for n in &l.notes {
                notes.push(format!("segment {id:016x}: {n}"));
            }
            if !l.sealed {
                segment::seal_recovered(&*ctx.fs, &ctx.seg_dir, &l)?;
            }
            loaded.insert(id, l);
        }
        let built = build_maps(&cat, &loaded)?;
        let mut snapshots = BTreeMap::new();
        for s in &cat.snapshots {
            if let Some((state, segs)) = built.snapshots.get(&s.id) {
                snapshots.insert(
                    s.id,
                    Arc::new(SnapshotCore {
                        id: s.id,
                        size: s.size_bytes,
                        created_unix: s.created_unix,
                        state: RwLock::new(state.clone()),
                        segments: Mutex::new(segs.clone()),
                        handles: Default::default(),
                    }),
                );
            }
        }
        let mut volumes = BTreeMap::new();
        for v in &cat.volumes {
            if let Some((state, segs)) = built.volumes.get(&v.id) {
                volumes.insert(
                    v.id,
                    Arc::new(VolumeCore::new(ctx.clone(), v, state.clone(), segs.clone())),
                );
            }
        }
        let store = Store {
            ctx,
            ops: Mutex::new(()),
            state: RwLock::new(State { volumes, snapshots }),
            recovery_seconds: started.elapsed().as_secs_f64(),
            recovery_notes: notes,
            stopping: std::sync::atomic::AtomicBool::new(false),
        };
        {
            let _ops = store.ops.lock();
            store.gc_hidden()?;
        }
        Ok(store)
    }

    fn volume_by_name(&self, name: &str) -> Result<Arc<VolumeCore>> {
        self.state
            .read()
            .volumes
            .values()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| not_found("volume", name, "list volumes with `blockd volume list`"))
    }

    fn snapshot_id(&self, cat: &Catalog, volume: &str, snap: &str) -> Result<u64> {
        cat.snapshots
            .iter()
            .find(|s| s.volume == volume && s.name.as_deref() == Some(snap))
            .map(|s| s.id)
            .ok_or_else(|| {
                not_found(
                    "snapshot",
                    &format!("{volume}@{snap}"),
                    "list snapshots with `blockd snapshot list`",
                )
            })
    }

    fn snapshot_label(cat: &Catalog, id: u64) -> Option<String> {
        cat.snapshots
            .iter()
            .find(|s| s.id == id)
            .map(|s| match &s.name {
                Some(n) => format!("{}@{}", s.volume, n),
                None => format!("{}@(deleted #{})", s.volume, s.id),
            })
    }

    fn volume_info(&self, cat: &Catalog, v: &VolumeCore) -> VolumeInfo {
        let st = v.state.read();
        let unique = st.unique_bytes();
        VolumeInfo {
            name: v.name.clone(),
            size_bytes: v.size,
            clone_of: v.clone_of.and_then(|id| Self::snapshot_label(cat, id)),
            origin: (*v.origin.lock()).and_then(|id| Self::snapshot_label(cat, id)),
            unique_bytes: unique,
            shared_bytes: st.data_bytes.saturating_sub(unique),
            created_unix: v.created_unix,
            nbd_connections: v.handles.load(Ordering::Acquire),
        }
    }

    // ------------------------------------------------------------ volumes

    pub fn create_volume(&self, name: &Name, size_bytes: u64) -> Result<VolumeInfo> {
        super::check_volume_size(size_bytes)?;
        let _ops = self.ops.lock();
        self.check_volume_name_free(name.as_str())?;
        let rec = self.ctx.persist(|c| {
            let id = c.alloc_object_id();
            let rec = VolumeRec {
                id,
                name: name.to_string(),
                size_bytes,
                origin: None,
                clone_of: None,
                segments: Vec::new(),
                created_unix: now_unix(),
            };
            c.volumes.push(rec.clone());
            Ok(rec)
        })?;
        let core = Arc::new(VolumeCore::new(
            self.ctx.clone(),
            &rec,
            MapState::default(),
            Vec::new(),
        ));
        let info = self.volume_info(&self.ctx.catalog(), &core);
        self.state.write().volumes.insert(rec.id, core);
        Ok(info)
    }

    fn check_volume_name_free(&self, name: &str) -> Result<()> {
        let cat = self.ctx.catalog();
        if cat.volumes.iter().any(|v| v.name == name) {
            return Err(StoreError::AlreadyExists {
                what: format!("volume {name}"),
            });
        }
        if let Some(s) = cat
            .snapshots
            .iter()
            .find(|s| s.volume == name && s.name.is_some())
        {
            return Err(StoreError::InvalidArgument(format!(
                "snapshots of an earlier volume named {name} still exist ({name}@{}); pick another \
                 name or delete those snapshots first",
                s.name.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let cat = self.ctx.catalog();
        let mut out: Vec<VolumeInfo> = self
            .state
            .read()
            .volumes
            .values()
            .map(|v| self.volume_info(&cat, v))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn show_volume(&self, name: &str) -> Result<VolumeInfo> {
        let v = self.volume_by_name(name)?;
        Ok(self.volume_info(&self.ctx.catalog(), &v))
    }

    fn check_unused(v: &VolumeCore, action: &str) -> Result<()> {
        let n = v.handles.load(Ordering::Acquire);
        if n > 0 {
            return Err(StoreError::InUse(format!(
                "cannot {action} volume {}: it is exported to {n} NBD connection(s); disconnect them \
                 first (unmount and `nbd-client -d`, or stop nbdfuse) and retry",
                v.name
            )));
        }
        Ok(())
    }

    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let _ops = self.ops.lock();
        let v = self.volume_by_name(name)?;
        Self::check_unused(&v, "delete")?;
        let _sync = v.sync_lock.lock();
        let mut log = v.log.lock();
        let segs: Vec<SegmentId> = log.segments.iter().map(|s| s.id).collect();
        self.ctx.persist(|c| {
            c.volumes.retain(|r| r.id != v.id);
            Ok(())
        })?;
        log.active = None;
        log.segments.clear();
        drop(log);
        self.state.write().volumes.remove(&v.id);
        self.remove_segments(&segs);
        self.gc_after_change();
        Ok(())
    }

    /// Throws away everything written since the volume's origin snapshot.
    pub fn reset_volume(&self, name: &str) -> Result<VolumeInfo> {
        let _ops = self.ops.lock();
        let v = self.volume_by_name(name)?;
        Self::check_unused(&v, "reset")?;
        // What the volume goes back to depends on whether a deleted snapshot has been
        // merged into it yet: finish any merge a failed catalog write left pending first,
        // so a reset always means the same thing.
        self.gc_hidden()?;
        let origin = *v.origin.lock();
        let base = match origin {
            Some(o) => {
                let s = self.state.read().snapshots.get(&o).cloned();
                s.map(|s| base_of(&s.state.read())).unwrap_or_default()
            }
            None => MapState::default(),
        };
        let _sync = v.sync_lock.lock();
        let mut log = v.log.lock();
        let segs: Vec<SegmentId> = log.segments.iter().map(|s| s.id).collect();
        self.ctx.persist(|c| {
            c.volume_mut(v.id)?.segments.clear();
            Ok(())
        })?;
        *log = Log {
            segments: Vec::new(),
            active: None,
        };
        *v.state.write() = base;
        drop(log);
        self.remove_segments(&segs);
        Ok(self.volume_info(&self.ctx.catalog(), &v))
    }

    /// A new writable volume starting from a snapshot: metadata only, O(1).
    pub fn clone_volume(&self, source: &str, name: &Name) -> Result<VolumeInfo> {
        let (vol, snap) = split_snapshot_name(source)?;
        let _ops = self.ops.lock();
        self.check_volume_name_free(name.as_str())?;
        let cat = self.ctx.catalog();
        let sid = self.snapshot_id(&cat, vol.as_str(), snap.as_str())?;
        let s = self
            .state
            .read()
            .snapshots
            .get(&sid)
            .cloned()
            .ok_or_else(|| {
                not_found(
                    "snapshot",
                    source,
                    "list snapshots with `blockd snapshot list`",
                )
            })?;
        let rec = self.ctx.persist(|c| {
            let id = c.alloc_object_id();
            let rec = VolumeRec {
                id,
                name: name.to_string(),
                size_bytes: s.size,
                origin: Some(sid),
                clone_of: Some(sid),
                segments: Vec::new(),
                created_unix: now_unix(),
            };
            c.volumes.push(rec.clone());
            Ok(rec)
        })?;
        let core = Arc::new(VolumeCore::new(
            self.ctx.clone(),
            &rec,
            base_of(&s.state.read()),
            Vec::new(),
        ));
        let info = self.volume_info(&self.ctx.catalog(), &core);
        self.state.write().volumes.insert(rec.id, core);
        Ok(info)
    }

    // ------------------------------------------------------------ snapshots

    /// Freezes the volume's current contents as `VOLUME@SNAP`: seals its active segment
    /// and hands its own segments and a clone of its map to the snapshot. O(1) in the
    /// volume size.
    pub fn create_snapshot(&self, volume: &Name, snap: &Name) -> Result<SnapshotInfo> {
        let _ops = self.ops.lock();
        let v = self.volume_by_name(volume.as_str())?;
        let cat = self.ctx.catalog();
        if cat
            .snapshots
            .iter()
            .any(|s| s.volume == volume.as_str() && s.name.as_deref() == Some(snap.as_str()))
        {
            return Err(StoreError::AlreadyExists {
                what: format!("snapshot {volume}@{snap}"),
            });
        }
        let _sync = v.sync_lock.lock();
        let mut log = v.log.lock();
        v.seal_active(&mut log)?;
        let mut st = v.state.write();
        let origin = *v.origin.lock();
        let seg_ids: Vec<SegmentId> = log.segments.iter().map(|s| s.id).collect();
        let rec = self.ctx.persist(|c| {
            let id = c.alloc_object_id();
            let rec = SnapshotRec {
                id,
                name: Some(snap.to_string()),
                volume: volume.to_string(),
                parent: origin,
                segments: seg_ids.clone(),
                size_bytes: v.size,
                created_unix: now_unix(),
            };
            c.snapshots.push(rec.clone());
            let vr = c.volume_mut(v.id)?;
            vr.origin = Some(id);
            vr.segments.clear();
            Ok(rec)
        })?;
        let snap_state = MapState {
            map: st.map.clone(),
            own_live: std::mem::take(&mut st.own_live),
            data_bytes: st.data_bytes,
        };
        let core = Arc::new(SnapshotCore {
            id: rec.id,
            size: rec.size_bytes,
            created_unix: rec.created_unix,
            state: RwLock::new(snap_state),
            segments: Mutex::new(std::mem::take(&mut log.segments)),
            handles: Default::default(),
        });
        *v.origin.lock() = Some(rec.id);
        drop(st);
        drop(log);
        self.state.write().snapshots.insert(rec.id, core.clone());
        Ok(self.snapshot_info(&self.ctx.catalog(), &rec, &core))
    }

    fn snapshot_info(&self, cat: &Catalog, rec: &SnapshotRec, core: &SnapshotCore) -> SnapshotInfo {
        let st = core.state.read();
        SnapshotInfo {
            name: format!("{}@{}", rec.volume, rec.name.as_deref().unwrap_or("")),
            volume: rec.volume.clone(),
            size_bytes: rec.size_bytes,
            data_bytes: st.data_bytes,
            unique_bytes: st.unique_bytes(),
            created_unix: rec.created_unix,
            clones: cat
                .volumes
                .iter()
                .filter(|v| v.clone_of == Some(rec.id))
                .map(|v| v.name.clone())
                .collect(),
        }
    }

    /// Visible snapshots, of one volume or of all.
    pub fn list_snapshots(&self, volume: Option<&str>) -> Vec<SnapshotInfo> {
        let cat = self.ctx.catalog();
        let st = self.state.read();
        let mut out: Vec<SnapshotInfo> = cat
            .snapshots
            .iter()
            .filter(|s| s.name.is_some() && volume.is_none_or(|v| s.volume == v))
            .filter_map(|s| {
                st.snapshots
                    .get(&s.id)
                    .map(|core| self.snapshot_info(&cat, s, core))
            })
            .collect();
        out.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
        out
    }

    /// Deletes `VOLUME@SNAP`. Refused while clones of it exist, unless `defer`, in which
    /// case it is hidden now and freed when the last clone goes.
    pub fn delete_snapshot(&self, name: &str, defer: bool) -> Result<SnapshotDeletion> {
        let (vol, snap) = split_snapshot_name(name)?;
        let _ops = self.ops.lock();
        let cat = self.ctx.catalog();
        let sid = self.snapshot_id(&cat, vol.as_str(), snap.as_str())?;
        let clones: Vec<String> = cat
            .volumes
            .iter()
            .filter(|v| v.clone_of == Some(sid))
            .map(|v| v.name.clone())
            .collect();
        if !clones.is_empty() && !defer {
            return Err(StoreError::InUse(format!(
                "snapshot {name} has clones: {}; delete them first, or pass --defer to hide the \
                 snapshot now and free it when the last clone is deleted",
                clones.join(", ")
            )));
        }
        if let Some(core) = self.state.read().snapshots.get(&sid)
            && core.handles.load(Ordering::Acquire) > 0
        {
            return Err(StoreError::InUse(format!(
                "snapshot {name} is exported to NBD clients; disconnect them first and retry"
            )));
        }
        self.ctx.persist(|c| {
            c.snapshot_mut(sid)?.name = None;
            Ok(())
        })?;
        self.gc_after_change();
        Ok(if clones.is_empty() {
            SnapshotDeletion::Deleted
        } else {
            SnapshotDeletion::Deferred { clones }
        })
    }

    /// Collects hidden snapshots after a deletion that is already durable: the deletion
    /// has happened whatever this does, so a failure is logged, not returned (a caller
    /// told "failed" would believe the volume or snapshot still exists). Whatever is left
    /// is collected by the next deletion or at the next start. Caller holds `ops`.
    fn gc_after_change(&self) {
        if let Err(e) = self.gc_hidden() {
            tracing::warn!(error = %e, "could not free a deleted snapshot yet; retrying at the next deletion or start");
        }
    }

    /// Removes hidden snapshots nothing depends on, and merges hidden snapshots with one
    /// dependent into it, until neither applies. Caller holds `ops`.
    fn gc_hidden(&self) -> Result<()> {
        loop {
            let cat = self.ctx.catalog();
            let mut changed = false;
            for s in cat.snapshots.iter().filter(|s| s.name.is_none()) {
                let vol_deps: Vec<u64> = cat
                    .volumes
                    .iter()
                    .filter(|v| v.origin == Some(s.id))
                    .map(|v| v.id)
                    .collect();
                let snap_deps: Vec<u64> = cat
                    .snapshots
                    .iter()
                    .filter(|c| c.parent == Some(s.id))
                    .map(|c| c.id)
                    .collect();
                match (vol_deps.as_slice(), snap_deps.as_slice()) {
                    ([], []) => {
                        self.ctx.persist(|c| {
                            c.snapshots.retain(|x| x.id != s.id);
                            Ok(())
                        })?;
                        self.state.write().snapshots.remove(&s.id);
                        self.remove_segments(&s.segments);
                    }
                    ([v], []) => self.merge_into_volume(s, *v)?,
                    ([], [c]) => self.merge_into_snapshot(s, *c)?,
                    _ => continue,
                }
                changed = true;
                break;
            }
            if !changed {
                return Ok(());
            }
        }
    }

    fn merge_into_volume(&self, s: &SnapshotRec, vid: u64) -> Result<()> {
        let (v, snap) = {
            let st = self.state.read();
            (
                st.volumes.get(&vid).cloned(),
                st.snapshots.get(&s.id).cloned(),
            )
        };
        let (Some(v), Some(snap)) = (v, snap) else {
            return Err(StoreError::invalid("internal: merge of unknown objects"));
        };
        let _sync = v.sync_lock.lock();
        let mut log = v.log.lock();
        self.ctx.persist(|c| {
            let vr = c.volume_mut(vid)?;
            vr.origin = s.parent;
            let mut segs = s.segments.clone();
            segs.extend(vr.segments.iter().copied());
            vr.segments = segs;
            c.snapshots.retain(|x| x.id != s.id);
            Ok(())
        })?;
        let mut segs = std::mem::take(&mut *snap.segments.lock());
        segs.append(&mut log.segments);
        log.segments = segs;
        v.state.write().adopt(&s.segments);
        *v.origin.lock() = s.parent;
        self.state.write().snapshots.remove(&s.id);
        Ok(())
    }

    fn merge_into_snapshot(&self, s: &SnapshotRec, cid: u64) -> Result<()> {
        let (child, snap) = {
            let st = self.state.read();
            (
                st.snapshots.get(&cid).cloned(),
                st.snapshots.get(&s.id).cloned(),
            )
        };
        let (Some(child), Some(snap)) = (child, snap) else {
            return Err(StoreError::invalid("internal: merge of unknown objects"));
        };
        self.ctx.persist(|c| {
            let cr = c.snapshot_mut(cid)?;
            cr.parent = s.parent;
            let mut segs = s.segments.clone();
            segs.extend(cr.segments.iter().copied());
            cr.segments = segs;
            c.snapshots.retain(|x| x.id != s.id);
            Ok(())
        })?;
        let mut segs = std::mem::take(&mut *snap.segments.lock());
        let mut cs = child.segments.lock();
        segs.append(&mut cs);
        *cs = segs;
        drop(cs);
        child.state.write().adopt(&s.segments);
        self.state.write().snapshots.remove(&s.id);
        Ok(())
    }

    /// Removes segment files; failures are logged (the files are orphans, removed at the
    /// next start).
    fn remove_segments(&self, ids: &[SegmentId]) {
        let m = &self.ctx.metrics;
        for id in ids {
            m.gc_reclaimed_bytes
                .inc_by(segment::file_bytes(&*self.ctx.fs, &self.ctx.seg_dir, *id));
            if let Err(e) = segment::remove_files(&*self.ctx.fs, &self.ctx.seg_dir, *id) {
                tracing::warn!(error = %e, "could not remove a segment; it will be removed at the next start");
            }
        }
        if !ids.is_empty() {
            m.gc_runs.inc();
            m.gc_segments_removed.inc_by(ids.len() as u64);
            let _ = self.ctx.fs.sync_dir(&self.ctx.seg_dir);
        }
    }

    // ------------------------------------------------------------ exports

    /// Opens `VOLUME` (read-write) or `VOLUME@SNAP` (read-only) for I/O.
    pub fn open_export(&self, name: &str) -> Result<Arc<dyn Volume>> {
        if name.contains('@') {
            let (vol, snap) = split_snapshot_name(name)?;
            let cat = self.ctx.catalog();
            let sid = self.snapshot_id(&cat, vol.as_str(), snap.as_str())?;
            let core = self
                .state
                .read()
                .snapshots
                .get(&sid)
                .cloned()
                .ok_or_else(|| {
                    not_found(
                        "snapshot",
                        name,
                        "list snapshots with `blockd snapshot list`",
                    )
                })?;
            Ok(Arc::new(SnapshotHandle::new(core, name.to_owned())))
        } else {
            let v = self.volume_by_name(name)?;
            Ok(Arc::new(VolumeHandle::new(v)))
        }
    }

    /// How many NBD connections hold volume `name` open.
    pub fn open_handles(&self, name: &str) -> Result<u64> {
        let v = self.volume_by_name(name)?;
        Ok(v.handles.load(Ordering::Acquire) as u64)
    }

    /// (name, size, read-only) of every export: volumes and visible snapshots.
    pub fn exports(&self) -> Vec<(String, u64, bool)> {
        let mut out: Vec<(String, u64, bool)> = self
            .list_volumes()
            .into_iter()
            .map(|v| (v.name, v.size_bytes, false))
            .collect();
        out.extend(
            self.list_snapshots(None)
                .into_iter()
                .map(|s| (s.name, s.size_bytes, true)),
        );
        out
    }

    /// Flushes every volume (shutdown).
    pub fn flush_all(&self) -> Result<()> {
        let vols: Vec<Arc<VolumeCore>> = self.state.read().volumes.values().cloned().collect();
        let mut first_err = None;
        for v in vols {
            if let Err(e) = v.flush_volume() {
                tracing::error!(volume = %v.name, error = %e, "flush failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Counters of store events, for the daemon's registry.
    pub fn metrics(&self) -> &crate::metrics::StoreMetrics {
        &self.ctx.metrics
    }

    pub fn stats(&self) -> StoreStats {
        let cat = self.ctx.catalog();
        let st = self.state.read();
        let mut segs: Vec<Arc<Segment>> = Vec::new();
        let mut stored = 0;
        let mut referenced = 0;
        for v in st.volumes.values() {
            segs.extend(v.log.lock().segments.iter().cloned());
            let s = v.state.read();
            stored += s.unique_bytes();
            referenced += s.data_bytes;
        }
        for s in st.snapshots.values() {
            segs.extend(s.segments.lock().iter().cloned());
            let ms = s.state.read();
            stored += ms.unique_bytes();
            referenced += ms.data_bytes;
        }
        let idx_bytes: u64 = segs.len() as u64 * 4096;
        StoreStats {
            volumes: st.volumes.len(),
            snapshots: cat.snapshots.iter().filter(|s| s.name.is_some()).count(),
            hidden_snapshots: cat.snapshots.iter().filter(|s| s.name.is_none()).count(),
            segments: segs.len(),
            logical_bytes: st.volumes.values().map(|v| v.size).sum(),
            referenced_bytes: referenced,
            stored_bytes: stored,
            physical_bytes: segs.iter().map(|s| s.allocated_bytes()).sum::<u64>() + idx_bytes,
        }
    }

    /// Asks background work to stop at its next safe point (shutdown).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The lock that serialises control operations (compaction takes it to swap segments).
    pub(crate) fn ops_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.ops.lock()
    }

    /// Whether `v` is still one of the store's volumes.
    pub(crate) fn has_volume(&self, v: &Arc<VolumeCore>) -> bool {
        self.state
            .read()
            .volumes
            .get(&v.id)
            .is_some_and(|x| Arc::ptr_eq(x, v))
    }

    /// All volumes and snapshots (for compaction).
    pub(crate) fn objects(&self) -> (Vec<Arc<VolumeCore>>, Vec<Arc<SnapshotCore>>) {
        let st = self.state.read();
        (
            st.volumes.values().cloned().collect(),
            st.snapshots.values().cloned().collect(),
        )
    }
}

/// Maps rebuilt from the catalog and the loaded segments: per object id, its map state and
/// its own segments.
pub(crate) struct Built {
    pub snapshots: HashMap<u64, (MapState, Vec<Arc<Segment>>)>,
    pub volumes: HashMap<u64, (MapState, Vec<Arc<Segment>>)>,
}

/// Replays every object's own segments on top of its origin's map: snapshots parents
/// first, then volumes.
pub(crate) fn build_maps(
    cat: &Catalog,
    loaded: &HashMap<SegmentId, segment::LoadedSegment>,
) -> Result<Built> {
    let replay = |state: &mut MapState, segs: &[SegmentId]| -> Result<Vec<Arc<Segment>>> {
        let mut out = Vec::with_capacity(segs.len());
        for id in segs {
            let l = loaded.get(id).ok_or_else(|| StoreError::Corrupt {
                what: format!("segment {id:016x}"),
                detail: "named by the catalog but not loaded".into(),
            })?;
            state.own_live.entry(*id).or_insert(0);
            for r in &l.records {
                state.apply(r, &l.seg);
            }
            out.push(l.seg.clone());
        }
        Ok(out)
    };
    let mut built = Built {
        snapshots: HashMap::new(),
        volumes: HashMap::new(),
    };
    let mut pending: Vec<&SnapshotRec> = cat.snapshots.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::new();
        for s in pending {
            let base = match s.parent {
                None => Some(MapState::default()),
                Some(p) => built.snapshots.get(&p).map(|(ps, _)| base_of(ps)),
            };
            let Some(mut state) = base else {
                rest.push(s);
                continue;
            };
            let segs = replay(&mut state, &s.segments)?;
            built.snapshots.insert(s.id, (state, segs));
        }
        if rest.len() == before {
            return Err(StoreError::Corrupt {
                what: "catalog".into(),
                detail: "snapshot parents do not form a tree".into(),
            });
        }
        pending = rest;
    }
    for v in &cat.volumes {
        let mut state = match v.origin {
            None => MapState::default(),
            Some(o) => built
                .snapshots
                .get(&o)
                .map(|(s, _)| base_of(s))
                .unwrap_or_default(),
        };
        let segs = replay(&mut state, &v.segments)?;
        built.volumes.insert(v.id, (state, segs));
    }
    Ok(built)
}

/// A fresh map state for an owner building on `parent`: the same map (shared), no own
/// segments yet.
fn base_of(parent: &MapState) -> MapState {
    MapState {
        map: parent.map.clone(),
        own_live: HashMap::new(),
        data_bytes: parent.data_bytes,
    }
}

/// Removes segment files that the catalog does not reference (left by a crash between
/// creating a segment and recording it, or between unrecording and removing it).
fn remove_orphans(ctx: &Ctx, cat: &Catalog, notes: &mut Vec<String>) -> Result<()> {
    let known: std::collections::HashSet<SegmentId> = cat.segment_ids().into_iter().collect();
    let names = ctx
        .fs
        .list(&ctx.seg_dir)
        .map_err(|e| StoreError::io("listing segments", e))?;
    let mut removed = false;
    for n in names {
        if let Some((id, _)) = segment::parse_file_name(&n)
            && !known.contains(&id)
        {
            ctx.fs
                .remove(&ctx.seg_dir.join(&n))
                .map_err(|e| StoreError::io(format!("removing orphan {n}"), e))?;
            notes.push(format!("removed orphan segment file {n}"));
            removed = true;
        }
    }
    if removed {
        ctx.fs
            .sync_dir(&ctx.seg_dir)
            .map_err(|e| StoreError::io("syncing the segment directory", e))?;
    }
    Ok(())
}
