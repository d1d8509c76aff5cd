//! The catalog: which volumes and snapshots exist, how they relate, and which segments
//! each owns. Stored as `<data-dir>/catalog` (a checksummed header and a JSON body, see
//! docs/FORMAT.md), replaced atomically on every change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::format;
use super::io::Fs;
use super::segment::SegmentId;
use super::{Result, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeRec {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    /// Snapshot whose map this volume's log applies to.
    pub origin: Option<u64>,
    /// Snapshot this volume was cloned from (for "which clones use this snapshot").
    pub clone_of: Option<u64>,
    /// Own segments in replay order.
    pub segments: Vec<SegmentId>,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRec {
    pub id: u64,
    /// None once deleted by the user but still needed by dependents (hidden).
    pub name: Option<String>,
    /// Name of the volume it was taken of.
    pub volume: String,
    pub parent: Option<u64>,
    pub segments: Vec<SegmentId>,
    pub size_bytes: u64,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub next_segment_id: u64,
    pub next_object_id: u64,
    pub volumes: Vec<VolumeRec>,
    pub snapshots: Vec<SnapshotRec>,
}

impl Catalog {
    pub fn volume_mut(&mut self, id: u64) -> Result<&mut VolumeRec> {
        self.volumes.iter_mut().find(|v| v.id == id).ok_or_else(|| {
            StoreError::invalid(format!("internal: volume id {id} missing from the catalog"))
        })
    }

    pub fn snapshot_mut(&mut self, id: u64) -> Result<&mut SnapshotRec> {
        self.snapshots
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| {
                StoreError::invalid(format!(
                    "internal: snapshot id {id} missing from the catalog"
                ))
            })
    }

    pub fn alloc_object_id(&mut self) -> u64 {
        self.next_object_id += 1;
        self.next_object_id
    }

    /// Every segment id referenced.
    pub fn segment_ids(&self) -> Vec<SegmentId> {
        let mut ids: Vec<SegmentId> = self
            .volumes
            .iter()
            .flat_map(|v| v.segments.iter().copied())
            .chain(
                self.snapshots
                    .iter()
                    .flat_map(|s| s.segments.iter().copied()),
            )
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Segments a crash may have left unsealed: the last one of each volume's log. Every
    /// other segment was sealed (and synced) before the catalog named a later one or a
    /// snapshot took it, so recovery must find it complete.
    pub fn maybe_unsealed(&self) -> std::collections::HashSet<SegmentId> {
        self.volumes
            .iter()
            .filter_map(|v| v.segments.last().copied())
            .collect()
    }

    /// Structural checks: unique ids and names, known parents, no cycles, every segment
    /// owned exactly once.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        for id in self
            .volumes
            .iter()
            .map(|v| v.id)
            .chain(self.snapshots.iter().map(|s| s.id))
        {
            if !ids.insert(id) {
                return Err(format!("object id {id} is used twice"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.volumes {
            if !names.insert(v.name.clone()) {
                return Err(format!("volume name {} is used twice", v.name));
            }
        }
        let mut snap_names = std::collections::HashSet::new();
        for s in &self.snapshots {
            if let Some(n) = &s.name
                && !snap_names.insert((s.volume.clone(), n.clone()))
            {
                return Err(format!("snapshot name {}@{} is used twice", s.volume, n));
            }
        }
        let snap = |id: u64| self.snapshots.iter().find(|s| s.id == id);
        for v in &self.volumes {
            if let Some(o) = v.origin
                && snap(o).is_none()
            {
                return Err(format!("volume {} has unknown origin snapshot {o}", v.name));
            }
        }
        for s in &self.snapshots {
            let mut seen = std::collections::HashSet::new();
            let mut cur = s.parent;
            while let Some(p) = cur {
                if !seen.insert(p) || seen.len() > self.snapshots.len() {
                    return Err(format!("snapshot {} has a cyclic parent chain", s.id));
                }
                cur = snap(p)
                    .ok_or_else(|| format!("snapshot {} has unknown parent {p}", s.id))?
                    .parent;
            }
        }
        let segs = self.segment_ids();
        if let Some(w) = segs.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("segment {:016x} is owned twice", w[0]));
        }
        if segs.last().is_some_and(|&m| m >= self.next_segment_id) {
            return Err("next_segment_id is not above every segment id".into());
        }
        Ok(())
    }
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct Config {
    /// A segment is sealed and a new one started once its payloads reach this size.
    pub segment_bytes: u64,
    /// Size of the preallocated catalog log; when a change no longer fits, the catalog is
    /// rewritten in full and the log started again.
    pub catalog_log_bytes: u64,
    /// Writes of at least this many bytes (page-aligned) go to the segment around the page
    /// cache (`O_DIRECT` where the file system allows it); 0 turns that off. Large
    /// streaming writes then cost no page-cache pages and no writeback; small writes, and
    /// the data readers are likely to ask for back soon, stay cached.
    pub direct_write_min_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            segment_bytes: 256 << 20,
            catalog_log_bytes: 1 << 20,
            direct_write_min_bytes: DEFAULT_DIRECT_WRITE_MIN_BYTES,
        }
    }
}

/// See [`Config::direct_write_min_bytes`]; chosen by measurement (docs/BENCHMARKS.md).
pub const DEFAULT_DIRECT_WRITE_MIN_BYTES: u64 = 256 << 10;

/// The smallest segment that always has room for a maximal record after its header.
pub const MIN_SEGMENT_BYTES: u64 = 2 * super::format::MAX_RECORD_BYTES as u64;
/// The smallest catalog log: its header and one sector of records.
pub const MIN_CATALOG_LOG_BYTES: u64 = 2 * format::LOG_SECTOR_BYTES as u64;

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(StoreError::invalid(format!(
                "segment size {} is below the minimum of {MIN_SEGMENT_BYTES} bytes",
                self.segment_bytes
            )));
        }
        if self.catalog_log_bytes < MIN_CATALOG_LOG_BYTES
            || !self
                .catalog_log_bytes
                .is_multiple_of(format::LOG_SECTOR_BYTES as u64)
        {
            return Err(StoreError::invalid(format!(
                "catalog log size {} must be a multiple of {} bytes and at least \
                 {MIN_CATALOG_LOG_BYTES}",
                self.catalog_log_bytes,
                format::LOG_SECTOR_BYTES
            )));
        }
        Ok(())
    }
}

/// One catalog change as a log record stores it: the objects added or changed (whole),
/// the ids removed, and the id counters after the change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub next_segment_id: u64,
    pub next_object_id: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeRec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_volumes: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_snapshots: Vec<u64>,
}

impl Change {
    /// The change that turns `old` into `new` when replayed by [`Change::apply`], or None
    /// when replay cannot reproduce `new` exactly (objects reordered). O(objects).
    pub fn between(old: &Catalog, new: &Catalog) -> Option<Change> {
        let (volumes, removed_volumes) = diff_by_id(&old.volumes, &new.volumes, |v| v.id)?;
        let (snapshots, removed_snapshots) = diff_by_id(&old.snapshots, &new.snapshots, |s| s.id)?;
        Some(Change {
            next_segment_id: new.next_segment_id,
            next_object_id: new.next_object_id,
            volumes,
            snapshots,
            removed_volumes,
            removed_snapshots,
        })
    }

    /// Removes, then replaces in place (same id) or appends every object listed.
    pub fn apply(&self, cat: &mut Catalog) {
        cat.next_segment_id = self.next_segment_id;
        cat.next_object_id = self.next_object_id;
        cat.volumes
            .retain(|v| !self.removed_volumes.contains(&v.id));
        cat.snapshots
            .retain(|s| !self.removed_snapshots.contains(&s.id));
        for v in &self.volumes {
            match cat.volumes.iter_mut().find(|o| o.id == v.id) {
                Some(o) => *o = v.clone(),
                None => cat.volumes.push(v.clone()),
            }
        }
        for s in &self.snapshots {
            match cat.snapshots.iter_mut().find(|o| o.id == s.id) {
                Some(o) => *o = s.clone(),
                None => cat.snapshots.push(s.clone()),
            }
        }
    }
}

/// (objects of `new` that are added or changed, ids of `old` that are gone), provided that
/// `new` is `old`'s survivors in their order followed by the added objects, which is what
/// [`Change::apply`] produces; None otherwise. Ids are unique (the catalog validates).
fn diff_by_id<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    id: impl Fn(&T) -> u64,
) -> Option<(Vec<T>, Vec<u64>)> {
    let old_by_id: std::collections::HashMap<u64, &T> = old.iter().map(|o| (id(o), o)).collect();
    let new_ids: std::collections::HashSet<u64> = new.iter().map(&id).collect();
    let survivors: Vec<u64> = old
        .iter()
        .map(&id)
        .filter(|i| new_ids.contains(i))
        .collect();
    let removed = old
        .iter()
        .map(&id)
        .filter(|i| !new_ids.contains(i))
        .collect();
    if !new
        .iter()
        .map(&id)
        .take(survivors.len())
        .eq(survivors.iter().copied())
    {
        return None;
    }
    let put = new
        .iter()
        .filter(|n| old_by_id.get(&id(n)).is_none_or(|o| *o != *n))
        .cloned()
        .collect();
    Some((put, removed))
}

pub fn catalog_path(dir: &Path) -> PathBuf {
    dir.join("catalog")
}

pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("catalog.log")
}

/// The catalog as recovered from disk: the catalog file with its log replayed.
#[derive(Debug)]
pub struct Recovered {
    pub cat: Catalog,
    pub generation: u64,
    /// Log records replayed onto the catalog file.
    pub replayed: usize,
    /// Format version of the catalog file.
    pub version: u16,
    /// What recovery noticed that loses nothing acknowledged (a torn last record).
    pub notes: Vec<String>,
}

/// Reads `<dir>/catalog` and replays `<dir>/catalog.log` onto it. `Ok(None)`: no catalog
/// (an empty store). Damage that could hide an acknowledged change is an error.
pub fn read_catalog(fs: &dyn Fs, dir: &Path) -> Result<Option<Recovered>> {
    let path = catalog_path(dir);
    let lpath = log_path(dir);
    let corrupt = |p: &Path, detail: String| StoreError::Corrupt {
        what: p.display().to_string(),
        detail: format!(
            "{detail}; run `blockd verify`, and restore the data directory from a backup \
             if it cannot be repaired"
        ),
    };
    let bytes = match fs.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match fs.read(&lpath) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                _ => Err(corrupt(
                    &path,
                    format!("missing, although {} exists", lpath.display()),
                )),
            };
        }
        Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
    };
    let (mut generation, body) =
        format::decode_catalog(&bytes).map_err(|e| corrupt(&path, e.to_string()))?;
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    let mut cat: Catalog =
        serde_json::from_slice(body).map_err(|e| corrupt(&path, e.to_string()))?;
    let mut notes = Vec::new();
    let mut replayed = 0;
    match fs.read(&lpath) {
        Ok(log) => {
            let scan = format::scan_log(&log).map_err(|e| corrupt(&lpath, e.to_string()))?;
            if scan.base_generation > generation {
                return Err(corrupt(
                    &lpath,
                    format!(
                        "the log continues generation {} but the catalog is at {generation}",
                        scan.base_generation
                    ),
                ));
            }
            for (g, body) in scan.records {
                if g <= generation {
                    continue; // already in the catalog file (rewritten before the log)
                }
                let change: Change = serde_json::from_slice(body)
                    .map_err(|e| corrupt(&lpath, format!("record {g}: {e}")))?;
                change.apply(&mut cat);
                generation = g;
                replayed += 1;
            }
            if let Some(at) = scan.torn_at {
                notes.push(format!(
                    "{}: torn last record at offset {at} dropped (its change was never \
                     acknowledged)",
                    lpath.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io(format!("reading {}", lpath.display()), e)),
    }
    cat.validate().map_err(|e| corrupt(&path, e))?;
    Ok(Some(Recovered {
        cat,
        generation,
        replayed,
        version,
        notes,
    }))
}

/// The open catalog log: where the next record goes.
struct Log {
    file: Arc<dyn super::io::FileIo>,
    end: u64,
}

struct CatalogState {
    cat: Catalog,
    generation: u64,
    log: Option<Log>,
    /// Set when a write of the catalog or its log failed: what reached the disk is unknown
    /// until the store is reopened, so no further change is accepted.
    failed: bool,
}

/// What every part of the store shares: the I/O engine, directories, configuration, and the
/// catalog with its persistence.
pub struct Ctx {
    pub fs: Arc<dyn Fs>,
    pub dir: PathBuf,
    pub seg_dir: PathBuf,
    pub config: Config,
    catalog: Mutex<CatalogState>,
    next_segment: AtomicU64,
    /// Notes from reading the catalog (a torn log record dropped).
    pub recovery_notes: Vec<String>,
    /// Counters of store events (flushes, compaction, GC), registered by the daemon.
    pub metrics: crate::metrics::StoreMetrics,
}

impl Ctx {
    /// Reads the catalog of `dir` (or starts an empty one), then writes it back in full
    /// with an empty log: torn log records are gone, and a version 1 catalog becomes
    /// version 2 (which older blockd refuses, as it would ignore the log).
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, config: Config) -> Result<Ctx> {
        let seg_dir = dir.join("segments");
        fs.create_dir_all(&seg_dir)
            .map_err(|e| StoreError::io(format!("creating {}", seg_dir.display()), e))?;
        let (cat, generation, recovery_notes) = match read_catalog(&*fs, dir)? {
            Some(r) => (r.cat, r.generation, r.notes),
            None => (
                Catalog {
                    next_segment_id: 1,
                    ..Catalog::default()
                },
                0,
                Vec::new(),
            ),
        };
        let next_segment = AtomicU64::new(cat.next_segment_id);
        let ctx = Ctx {
            fs,
            dir: dir.to_owned(),
            seg_dir,
            config,
            catalog: Mutex::new(CatalogState {
                cat,
                generation,
                log: None,
                failed: false,
            }),
            next_segment,
            recovery_notes,
            metrics: crate::metrics::StoreMetrics::new(),
        };
        {
            let mut st = ctx.catalog.lock();
            let (cat, generation) = (st.cat.clone(), st.generation);
            st.log = Some(ctx.rewrite(&cat, generation)?);
        }
        Ok(ctx)
    }

    pub fn alloc_segment_id(&self) -> SegmentId {
        self.next_segment.fetch_add(1, Ordering::Relaxed)
    }

    /// A copy of the catalog as last persisted.
    pub fn catalog(&self) -> Catalog {
        self.catalog.lock().cat.clone()
    }

    /// Writes the whole catalog at `generation`, then a new empty log following it. A
    /// crash in between leaves the new catalog with the old log, whose records it already
    /// holds (replay skips them).
    fn rewrite(&self, cat: &Catalog, generation: u64) -> Result<Log> {
        let body = serde_json::to_vec(cat)
            .map_err(|e| StoreError::invalid(format!("encoding catalog: {e}")))?;
        let path = catalog_path(&self.dir);
        self.fs
            .write_atomic(&path, &format::encode_catalog(generation, &body))
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        let lpath = log_path(&self.dir);
        let mut log = format::encode_log_header(generation);
        log.resize(self.config.catalog_log_bytes as usize, 0);
        let io_err = |e| StoreError::io(format!("writing {}", lpath.display()), e);
        self.fs.write_atomic(&lpath, &log).map_err(io_err)?;
        let file = self.fs.open(&lpath).map_err(io_err)?;
        Ok(Log {
            file,
            end: format::LOG_SECTOR_BYTES as u64,
        })
    }

    /// Applies `f` to a copy of the catalog and makes the result durable; the in-memory
    /// catalog changes only if that succeeds. The change is one record appended to the
    /// preallocated log and one fdatasync; when the log is full, the catalog is rewritten.
    pub fn persist<R>(&self, f: impl FnOnce(&mut Catalog) -> Result<R>) -> Result<R> {
        let mut st = self.catalog.lock();
        if st.failed {
            return Err(StoreError::io(
                "changing the catalog",
                std::io::Error::other(
                    "an earlier write of the catalog failed, so what reached the disk is \
                     unknown; no change is accepted until blockd is restarted (it then \
                     reads the catalog back from disk)",
                ),
            ));
        }
        let mut next = st.cat.clone();
        let r = f(&mut next)?;
        next.next_segment_id = next
            .next_segment_id
            .max(self.next_segment.load(Ordering::Relaxed));
        next.validate()
            .map_err(|e| StoreError::invalid(format!("internal: catalog change rejected: {e}")))?;
        let generation = st.generation + 1;
        // A change that replay would not reproduce exactly (objects reordered) is written
        // as a whole catalog instead.
        let record = Change::between(&st.cat, &next)
            .map(|change| serde_json::to_vec(&change))
            .transpose()
            .map_err(|e| StoreError::invalid(format!("encoding catalog change: {e}")))?
            .map(|body| format::encode_log_record(generation, &body));
        let capacity = self.config.catalog_log_bytes;
        let written = match (record, st.log.as_mut()) {
            (Some(rec), Some(log)) if log.end + rec.len() as u64 <= capacity => {
                let lpath = log_path(&self.dir);
                let at = log.end;
                log.end += rec.len() as u64;
                log.file
                    .write_all_at(&rec, at)
                    .and_then(|()| log.file.sync_data())
                    .map_err(|e| StoreError::io(format!("appending to {}", lpath.display()), e))
            }
            _ => match self.rewrite(&next, generation) {
                Ok(log) => {
                    st.log = Some(log);
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = written {
            st.failed = true;
            return Err(e);
        }
        st.cat = next;
        st.generation = generation;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: u64, name: &str, segments: Vec<SegmentId>) -> VolumeRec {
        VolumeRec {
            id,
            name: name.into(),
            size_bytes: 1 << 20,
            origin: None,
            clone_of: None,
            segments,
            created_unix: 0,
        }
    }

    #[test]
    fn a_change_replays_to_the_new_catalog_or_is_refused() {
        let old = Catalog {
            next_segment_id: 5,
            next_object_id: 3,
            volumes: vec![
                vol(1, "a", vec![1]),
                vol(2, "b", vec![2]),
                vol(3, "c", vec![]),
            ],
            snapshots: Vec::new(),
        };
        // b removed, c changed, d added.
        let mut new = old.clone();
        new.volumes.remove(1);
        new.volumes[1].segments.push(4);
        new.volumes.push(vol(4, "d", vec![]));
        new.next_object_id = 4;
        let change = Change::between(&old, &new).expect("reproducible");
        assert_eq!(change.removed_volumes, vec![2]);
        assert_eq!(
            change.volumes.iter().map(|v| v.id).collect::<Vec<_>>(),
            vec![3, 4],
            "only changed and added objects are logged"
        );
        let mut replayed = old.clone();
        change.apply(&mut replayed);
        assert_eq!(replayed, new);
        // Reordered survivors cannot be replayed: the catalog is rewritten instead.
        let mut reordered = old.clone();
        reordered.volumes.swap(0, 1);
        assert_eq!(Change::between(&old, &reordered), None);
        // An added object before a survivor neither.
        let mut inserted = old.clone();
        inserted.volumes.insert(0, vol(9, "z", vec![]));
        assert_eq!(Change::between(&old, &inserted), None);
    }
}
