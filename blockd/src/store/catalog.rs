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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            segment_bytes: 256 << 20,
        }
    }
}

/// The smallest segment that always has room for a maximal record after its header.
pub const MIN_SEGMENT_BYTES: u64 = 2 * super::format::MAX_RECORD_BYTES as u64;

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(StoreError::invalid(format!(
                "segment size {} is below the minimum of {MIN_SEGMENT_BYTES} bytes",
                self.segment_bytes
            )));
        }
        Ok(())
    }
}

struct CatalogState {
    cat: Catalog,
    generation: u64,
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
    /// Counters of store events (flushes, compaction, GC), registered by the daemon.
    pub metrics: crate::metrics::StoreMetrics,
}

pub fn catalog_path(dir: &Path) -> PathBuf {
    dir.join("catalog")
}

impl Ctx {
    /// Reads the catalog of `dir`, or starts an empty one if there is none.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, config: Config) -> Result<Ctx> {
        let seg_dir = dir.join("segments");
        fs.create_dir_all(&seg_dir)
            .map_err(|e| StoreError::io(format!("creating {}", seg_dir.display()), e))?;
        let path = catalog_path(dir);
        let (cat, generation) = match fs.read(&path) {
            Ok(bytes) => {
                let corrupt = |detail: String| StoreError::Corrupt {
                    what: path.display().to_string(),
                    detail,
                };
                let (generation, body) =
                    format::decode_catalog(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let cat: Catalog =
                    serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
                cat.validate().map_err(corrupt)?;
                (cat, generation)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Catalog {
                    next_segment_id: 1,
                    ..Catalog::default()
                },
                0,
            ),
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
        };
        let next_segment = AtomicU64::new(cat.next_segment_id);
        Ok(Ctx {
            fs,
            dir: dir.to_owned(),
            seg_dir,
            config,
            catalog: Mutex::new(CatalogState { cat, generation }),
            next_segment,
            metrics: crate::metrics::StoreMetrics::new(),
        })
    }

    pub fn alloc_segment_id(&self) -> SegmentId {
        self.next_segment.fetch_add(1, Ordering::Relaxed)
    }

    /// A copy of the catalog as last persisted.
    pub fn catalog(&self) -> Catalog {
        self.catalog.lock().cat.clone()
    }

    /// Applies `f` to a copy of the catalog and makes the result durable; the in-memory
    /// catalog changes only if that succeeds.
    pub fn persist<R>(&self, f: impl FnOnce(&mut Catalog) -> Result<R>) -> Result<R> {
        let mut st = self.catalog.lock();
        let mut next = st.cat.clone();
        let r = f(&mut next)?;
        next.next_segment_id = next
            .next_segment_id
            .max(self.next_segment.load(Ordering::Relaxed));
        next.validate()
            .map_err(|e| StoreError::invalid(format!("internal: catalog change rejected: {e}")))?;
        let body = serde_json::to_vec(&next)
            .map_err(|e| StoreError::invalid(format!("encoding catalog: {e}")))?;
        let bytes = format::encode_catalog(st.generation + 1, &body);
        let path = catalog_path(&self.dir);
        self.fs
            .write_atomic(&path, &bytes)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        st.cat = next;
        st.generation += 1;
        Ok(r)
    }
}
