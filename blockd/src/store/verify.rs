//! `blockd verify`: checks a store offline and reports what is wrong.
//!
//! It reads the catalog, every segment's index and every payload that some volume or
//! snapshot still refers to, and checks every checksum and every reference. It changes
//! nothing: torn tails that the next start would cut are reported, not cut. It refuses to
//! run while a daemon holds the data directory.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use super::catalog::{self, Catalog};
use super::engine::build_maps;
use super::io::Fs;
use super::io::sync::SyncFs;
use super::map::Target;
use super::segment::{self, SegmentId};
use crate::fsutil::LockFile;

#[derive(Debug, Serialize)]
pub struct Finding {
    /// "error" (data or metadata is damaged) or "warning" (nothing committed is lost).
    pub severity: &'static str,
    pub what: String,
    pub detail: String,
}

#[derive(Debug, Serialize, Default)]
pub struct VerifyReport {
    pub volumes: usize,
    pub snapshots: usize,
    pub segments: usize,
    pub records: usize,
    /// Bytes of live data whose checksums were checked.
    pub live_bytes_checked: u64,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == "error")
            .count()
    }

    fn push(&mut self, severity: &'static str, what: impl Into<String>, detail: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            what: what.into(),
            detail: detail.into(),
        });
    }
}

/// Checks the store in `dir` through `fs`.
pub fn check(fs: &dyn Fs, dir: &Path) -> VerifyReport {
    let mut rep = VerifyReport::default();
    let path = catalog::catalog_path(dir);
    let cat: Catalog = match catalog::read_catalog(fs, dir) {
        Ok(Some(r)) => {
            for n in r.notes {
                rep.push("warning", catalog::log_path(dir).display().to_string(), n);
            }
            r.cat
        }
        Ok(None) => {
            rep.push(
                "warning",
                path.display().to_string(),
                "no catalog: the store is empty",
            );
            return rep;
        }
        Err(e) => {
            rep.push(
                "error",
                path.display().to_string(),
                format!("catalog is unreadable: {e}"),
            );
            return rep;
        }
    };
    rep.volumes = cat.volumes.len();
    rep.snapshots = cat.snapshots.len();
    let seg_dir = dir.join("segments");
    let known: BTreeSet<SegmentId> = cat.segment_ids().into_iter().collect();
    rep.segments = known.len();
    if let Ok(names) = fs.list(&seg_dir) {
        for n in names {
            if let Some((id, _)) = segment::parse_file_name(&n)
                && !known.contains(&id)
            {
                rep.push(
                    "warning",
                    format!("segments/{n}"),
                    "not referenced by the catalog (removed at the next start)",
                );
            }
        }
    }
    let mut loaded = HashMap::new();
    let maybe_unsealed = cat.maybe_unsealed();
    for id in &known {
        match segment::load_checked(fs, &seg_dir, *id, !maybe_unsealed.contains(id)) {
            Ok(l) => {
                rep.records += l.records.len();
                for n in &l.notes {
                    rep.push("warning", format!("segment {id:016x}"), n.clone());
                }
                loaded.insert(*id, l);
            }
            Err(e) => rep.push("error", format!("segment {id:016x}"), e.to_string()),
        }
    }
    if rep.errors() > 0 {
        return rep;
    }
    let built = match build_maps(&cat, &loaded) {
        Ok(b) => b,
        Err(e) => {
            rep.push("error", "catalog", e.to_string());
            return rep;
        }
    };
    // Every live extent of every map: its payloads must check out. Each range is checked
    // once even when many maps share it.
    let name_of = |id: u64| -> String {
        cat.volumes
            .iter()
            .find(|v| v.id == id)
            .map(|v| format!("volume {}", v.name))
            .or_else(|| {
                cat.snapshots
                    .iter()
                    .find(|s| s.id == id)
                    .map(|s| match &s.name {
                        Some(n) => format!("snapshot {}@{}", s.volume, n),
                        None => format!("hidden snapshot #{id} of {}", s.volume),
                    })
            })
            .unwrap_or_else(|| format!("object #{id}"))
    };
    let mut seen: BTreeSet<(SegmentId, u64, u64)> = BTreeSet::new();
    let owners = built.volumes.iter().chain(built.snapshots.iter());
    for (id, (state, _)) in owners {
        for (logical, len, t) in state.map.iter() {
            let Target::Data(loc) = t else { continue };
            if !seen.insert((loc.seg.id, loc.off, len)) {
                continue;
            }
            match loc.seg.verify_range(loc.off, len) {
                Ok(()) => rep.live_bytes_checked += len,
                Err(e) => rep.push(
                    "error",
                    name_of(*id),
                    format!(
                        "bytes {logical}..{} read from damaged data: {e}",
                        logical + len
                    ),
                ),
            }
        }
    }
    rep
}

/// The `blockd verify` command.
pub fn run(dir: &Path, json: bool) -> Result<()> {
    if !dir.join("catalog").exists() && !dir.join("segments").exists() {
        bail!(
            "{} does not look like a blockd data directory (no catalog, no segments)",
            dir.display()
        );
    }
    let _lock = LockFile::acquire(&dir.join("blockd.lock")).map_err(|e| {
        anyhow!("cannot lock {}: {e}; a daemon is probably serving it: stop it first (verify runs offline)", dir.display())
    })?;
    let fs: Arc<dyn Fs> = Arc::new(SyncFs);
    let rep = check(&*fs, dir);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).context("encoding the report")?
        );
    } else {
        for f in &rep.findings {
            println!("{:7} {}: {}", f.severity, f.what, f.detail);
        }
        println!(
            "checked {} volumes, {} snapshots, {} segments, {} records, {} of live data: {} errors, {} warnings",
            rep.volumes,
            rep.snapshots,
            rep.segments,
            rep.records,
            crate::size::format_size(rep.live_bytes_checked),
            rep.errors(),
            rep.findings.len() - rep.errors()
        );
    }
    if rep.errors() > 0 {
        bail!("the store has {} error(s); see above", rep.errors());
    }
    Ok(())
}
