//! Compaction: returns the space of data no map refers to any more.
//!
//! Two tools, both on sealed segments only:
//!
//! * **Punching**: the page-aligned parts of a segment's dead payloads are freed with
//!   `fallocate(PUNCH_HOLE)`. Offsets do not move, so no map changes and nothing needs to
//!   be recovered differently; this works for segments owned by snapshots, whose maps are
//!   shared and never change. Only whole payloads are punched: a payload's checksum
//!   covers all of it, so one that is still partly live stays intact (rewriting reclaims
//!   its dead part).
//! * **Rewriting** (segments a writable volume owns, with a low live fraction): the live
//!   parts of its writes are copied into a new segment, together with all of its zero
//!   records (they may still shadow older data), and the new segment takes the old one's
//!   place in the volume's replay order. The copy runs without any volume lock; only the
//!   final redirect of the map takes the volume's map lock, briefly. If the volume changed
//!   shape meanwhile (snapshot, reset, delete), the rewrite is abandoned.
//!
//! Crash safety: the new segment is complete and durable before the catalog names it;
//! the old one is removed only after the catalog no longer does (a crash in between
//! leaves an orphan, removed at the next start).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::engine::Store;
use super::format::{self, DAT_HEADER_BYTES, PAGE_BYTES, Record};
use super::map::Target;
use super::segment::{self, Active, Segment, SegmentId};
use super::volume::{MapState, SegLoc, VolumeCore};
use super::{Result, StoreError};

/// When to compact.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Rewrite a volume's sealed segment whose live payload is below this fraction.
    pub rewrite_below_live_fraction: f64,
    /// Punch a sealed segment once this many payload bytes are dead.
    pub punch_min_dead_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rewrite_below_live_fraction: 0.5,
            punch_min_dead_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub segments_rewritten: u64,
    /// Live payload bytes copied by rewrites.
    pub bytes_copied: u64,
    /// Segments removed because nothing in them was needed any more.
    pub segments_removed: u64,
    /// Bytes freed by punching.
    pub bytes_punched: u64,
    /// Disk bytes freed in all: punched, plus what rewritten or dropped segments gave back.
    pub bytes_reclaimed: u64,
}

/// Live (offset, len) ranges per segment, sorted, from one pass over a map.
fn live_ranges(state: &MapState, ids: &[SegmentId]) -> HashMap<SegmentId, Vec<(u64, u64)>> {
    let mut out: HashMap<SegmentId, Vec<(u64, u64)>> =
        ids.iter().map(|id| (*id, Vec::new())).collect();
    for (_, len, t) in state.map.iter() {
        if let Target::Data(loc) = t
            && let Some(v) = out.get_mut(&loc.seg.id)
        {
            v.push((loc.off, len));
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// Frees the page-aligned parts of `seg` between the payloads that `live` (sorted) still
/// touches: whole dead payloads and the padding around them. A payload that is even partly
/// live is kept whole, because its checksum covers all of it: punching its dead pages
/// would make every later read of its live part fail verification (EIO) once the segment
/// is loaded from disk again.
fn punch_dead(seg: &Segment, live: &[(u64, u64)]) -> Result<u64> {
    let payloads = seg.payload_ranges();
    let end = payloads
        .iter()
        .map(|&(o, n)| o + n)
        .max()
        .unwrap_or(DAT_HEADER_BYTES);
    let mut freed = 0;
    let mut punch = |from: u64, to: u64| -> Result<()> {
        let a = from.next_multiple_of(PAGE_BYTES);
        let b = to / PAGE_BYTES * PAGE_BYTES;
        if b > a {
            seg.punch(a, b - a)?;
            freed += b - a;
        }
        Ok(())
    };
    // Both lists are sorted by offset and payloads do not overlap: walk them together.
    let mut pos = DAT_HEADER_BYTES;
    let mut l = 0;
    for &(o, n) in &payloads {
        while l < live.len() && live[l].0 + live[l].1 <= o {
            l += 1;
        }
        let is_live = l < live.len() && live[l].0 < o + n;
        if is_live {
            if o > pos {
                punch(pos, o)?;
            }
            pos = pos.max(o + n);
        }
    }
    if end > pos {
        punch(pos, end)?;
    }
    Ok(freed)
}

/// Whether a sealed segment has enough dead payload, new since it was last punched.
fn wants_punch(seg: &Segment, state: &MapState, policy: &Policy) -> bool {
    let live = state.own_live.get(&seg.id).copied().unwrap_or(0);
    let dead = seg.payload_bytes().saturating_sub(live);
    dead >= policy.punch_min_dead_bytes && seg.punched_at_live.load(Ordering::Relaxed) != live
}

impl Store {
    /// One compaction pass over every volume and snapshot.
    pub fn compact(&self, policy: &Policy) -> Result<Report> {
        let result = self.compact_pass(policy);
        let m = &self.ctx.metrics;
        m.compaction_runs.inc();
        if let Ok(r) = &result {
            m.compaction_reclaimed_bytes.inc_by(r.bytes_reclaimed);
            m.compaction_copied_bytes.inc_by(r.bytes_copied);
        }
        result
    }

    fn compact_pass(&self, policy: &Policy) -> Result<Report> {
        let mut report = Report::default();
        let (volumes, snapshots) = self.objects();
        for v in volumes {
            if self.is_stopping() {
                return Ok(report);
            }
            self.compact_volume(&v, policy, &mut report)?;
        }
        for s in snapshots {
            if self.is_stopping() {
                return Ok(report);
            }
            let segs: Vec<Arc<Segment>> = s.segments.lock().clone();
            let state = s.state.read().clone();
            self.punch_segments(&segs, &state, policy, &mut report)?;
        }
        Ok(report)
    }

    fn punch_segments(
        &self,
        segs: &[Arc<Segment>],
        state: &MapState,
        policy: &Policy,
        report: &mut Report,
    ) -> Result<()> {
        let ids: Vec<SegmentId> = segs
            .iter()
            .filter(|s| s.is_sealed())
            .map(|s| s.id)
            .collect();
        let ranges = live_ranges(state, &ids);
        for seg in segs.iter().filter(|s| s.is_sealed()) {
            if !wants_punch(seg, state, policy) {
                continue;
            }
            let live = state.own_live.get(&seg.id).copied().unwrap_or(0);
            let punched = punch_dead(seg, ranges.get(&seg.id).map(Vec::as_slice).unwrap_or(&[]))?;
            report.bytes_punched += punched;
            report.bytes_reclaimed += punched;
            seg.punched_at_live.store(live, Ordering::Relaxed);
        }
        Ok(())
    }

    fn compact_volume(
        &self,
        v: &Arc<VolumeCore>,
        policy: &Policy,
        report: &mut Report,
    ) -> Result<()> {
        let (segs, state) = {
            let log = v.log.lock();
            let segs: Vec<Arc<Segment>> = log
                .segments
                .iter()
                .filter(|s| s.is_sealed())
                .cloned()
                .collect();
            (segs, v.state.read().clone())
        };
        let rewrite = |seg: &Segment| {
            let payload = seg.payload_bytes();
            let live = state.own_live.get(&seg.id).copied().unwrap_or(0);
            payload > 0 && (live as f64) < policy.rewrite_below_live_fraction * payload as f64
        };
        if !segs
            .iter()
            .any(|seg| rewrite(seg) || wants_punch(seg, &state, policy))
        {
            return Ok(());
        }
        // Liveness is judged on this copy of the map, which may reflect writes not flushed
        // yet: data they shadow is still what a crash would bring back. Flushing makes
        // every record the copy reflects durable, so what is dead in it stays dead. A
        // volume that cannot be flushed is left alone.
        if let Err(e) = v.flush_volume() {
            tracing::warn!(volume = %v.name, error = %e, "not compacting a volume that cannot be flushed");
            return Ok(());
        }
        let mut punch = Vec::new();
        for seg in segs {
            if self.is_stopping() {
                break;
            }
            if rewrite(&seg) {
                let before = segment::file_bytes(&*self.ctx.fs, &self.ctx.seg_dir, seg.id);
                match self.rewrite_segment(v, &seg, &state) {
                    Ok(Some((copied, removed, after))) => {
                        report.bytes_copied += copied;
                        report.bytes_reclaimed += before.saturating_sub(after);
                        if removed {
                            report.segments_removed += 1;
                        } else {
                            report.segments_rewritten += 1;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(volume = %v.name, segment = %format!("{:016x}", seg.id), error = %e,
                        "compaction of a segment failed; it is left as it was")
                    }
                }
            } else {
                punch.push(seg);
            }
        }
        self.punch_segments(&punch, &state, policy, report)
    }

    /// Rewrites `seg` of volume `v` keeping only what `state` (a recent copy of the
    /// volume's map) still refers to. Returns (bytes copied, whether the segment was
    /// dropped without a replacement, disk bytes of the replacement), or None if the volume
    /// changed meanwhile.
    fn rewrite_segment(
        &self,
        v: &Arc<VolumeCore>,
        seg: &Arc<Segment>,
        state: &MapState,
    ) -> Result<Option<(u64, bool, u64)>> {
        let ctx = &self.ctx;
        let loaded = segment::load(&*ctx.fs, &ctx.seg_dir, seg.id)?;
        if !loaded.sealed {
            return Ok(None);
        }
        let live = live_ranges(state, &[seg.id])
            .remove(&seg.id)
            .unwrap_or_default();
        // What the new segment gets, in the old one's record order: the live pieces of its
        // writes and all of its zero records.
        enum Step {
            Copy {
                logical: u64,
                len: u64,
                old_off: u64,
            },
            Zero {
                logical: u64,
                len: u64,
                keep_allocated: bool,
            },
        }
        let mut steps = Vec::new();
        for r in &loaded.records {
            match *r {
                Record::Write {
                    logical,
                    len,
                    data_off,
                    ..
                } => {
                    let end = data_off + u64::from(len);
                    let first = live.partition_point(|&(o, n)| o + n <= data_off);
                    for &(o, n) in &live[first..] {
                        if o >= end {
                            break;
                        }
                        let a = o.max(data_off);
                        let b = (o + n).min(end);
                        steps.push(Step::Copy {
                            logical: logical + (a - data_off),
                            len: b - a,
                            old_off: a,
                        });
                    }
                }
                Record::Zero {
                    logical,
                    len,
                    keep_allocated,
                    ..
                } => {
                    steps.push(Step::Zero {
                        logical,
                        len,
                        keep_allocated,
                    });
                }
            }
        }
        let new_id = ctx.alloc_segment_id();
        let mut out: Option<Active> = None;
        // (logical, len, old payload offset, new payload offset)
        let mut moved: Vec<(u64, u64, u64, u64)> = Vec::new();
        let mut copied = 0;
        for step in steps {
            let a = match out.as_mut() {
                Some(a) => a,
                None => {
                    let mut a = Active::create(&*ctx.fs, &ctx.seg_dir, new_id, 1)?;
                    a.set_fill_limit(0); // written in one go and sealed at once
                    out.insert(a)
                }
            };
            match step {
                Step::Zero {
                    logical,
                    len,
                    keep_allocated,
                } => {
                    a.append_zero(logical, len, keep_allocated)?;
                }
                Step::Copy {
                    logical,
                    len,
                    old_off,
                } => {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(format::MAX_RECORD_BYTES as u64);
                        let mut buf = vec![0u8; n as usize];
                        seg.read(&mut buf, old_off + done)?;
                        let rec =
                            a.append_write(logical + done, &buf, format::payload_crc(&buf))?;
                        if let Record::Write { data_off, .. } = rec {
                            moved.push((logical + done, n, old_off + done, data_off));
                        }
                        copied += n;
                        done += n;
                    }
                }
            }
        }
        let replacement = match out {
            Some(mut a) => {
                let pending = a.prepare_seal();
                pending
                    .write()
                    .map_err(|e| StoreError::io("sealing a compacted segment", e))?;
                a.mark_sealed();
                ctx.fs
                    .sync_dir(&ctx.seg_dir)
                    .map_err(|e| StoreError::io("syncing the segment directory", e))?;
                Some(a.seg.clone())
            }
            None => None,
        };
        // Swap it in, if the volume still owns the old segment.
        let _ops = self.ops_lock();
        let still_owned =
            v.log.lock().segments.iter().any(|s| Arc::ptr_eq(s, seg)) && self.has_volume(v);
        if !still_owned {
            if replacement.is_some() {
                let _ = segment::remove_files(&*ctx.fs, &ctx.seg_dir, new_id);
            }
            return Ok(None);
        }
        let vid = v.id;
        let old = seg.id;
        ctx.persist(|c| {
            let vr = c.volume_mut(vid)?;
            match replacement {
                Some(_) => vr
                    .segments
                    .iter_mut()
                    .filter(|s| **s == old)
                    .for_each(|s| *s = new_id),
                None => vr.segments.retain(|s| *s != old),
            }
            Ok(())
        })?;
        {
            let mut log = v.log.lock();
            match &replacement {
                Some(new) => log
                    .segments
                    .iter_mut()
                    .filter(|s| Arc::ptr_eq(s, seg))
                    .for_each(|s| *s = new.clone()),
                None => log.segments.retain(|s| !Arc::ptr_eq(s, seg)),
            }
            let mut st = v.state.write();
            if let Some(new) = &replacement {
                st.own_live.insert(new.id, 0);
                for &(logical, len, old_off, new_off) in &moved {
                    st.redirect(
                        logical,
                        len,
                        seg.id,
                        old_off,
                        SegLoc {
                            seg: new.clone(),
                            off: new_off,
                        },
                    );
                }
            }
            st.own_live.remove(&old);
        }
        segment::remove_files(&*ctx.fs, &ctx.seg_dir, old)?;
        let _ = ctx.fs.sync_dir(&ctx.seg_dir);
        let new_bytes = replacement
            .as_ref()
            .map_or(0, |s| segment::file_bytes(&*ctx.fs, &ctx.seg_dir, s.id));
        Ok(Some((copied, replacement.is_none(), new_bytes)))
    }
}
