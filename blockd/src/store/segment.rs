//! Segments: the files that hold a log's records.
//!
//! A segment is a pair of files named by its id: `<id>.dat` holds a 4 KiB header block
//! and then the write payloads; `<id>.idx` holds a header slot and then 64-byte entries
//! (docs/FORMAT.md). Each record's entry is written twice: a provisional copy when the
//! record is appended, and a copy inside a commit batch, written only after the `.dat`
//! was synced (flush). A segment is sealed by a final batch holding every record; sealed
//! segments never change again, except that compaction may punch out payloads no map
//! refers to any more.
//!
//! Recovery ([`load_checked`]) trusts committed records (their payloads were durable before
//! the batch was written, so a bad payload checksum later means corruption: reads of that
//! range fail with EIO) and accepts provisional records after the last batch only while
//! their payload checksums hold (a torn tail is cut there). Every record copy found inside
//! a batch counts as committed, also in a damaged batch, and a seal batch with a damaged
//! mark or copy is rebuilt from its other copies, so that damage to one copy of an entry
//! is never mistaken for a torn tail (which would silently bring back older data). A
//! segment the catalog shows was sealed cannot have a torn tail at all: damage that leaves
//! its records uncertain fails recovery with a Corrupt error instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::{
    self, DAT_HEADER_BYTES, DatHeader, ENTRY_BYTES, Entry, FormatError, IdxHeader, Record,
};
use super::io::{FileIo, Fs};
use super::{Result, StoreError};

pub type SegmentId = u64;

pub fn dat_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("{id:016x}.dat"))
}

pub fn idx_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("{id:016x}.idx"))
}

/// Parses `<16 hex digits>.dat` / `.idx` file names.
pub fn parse_file_name(name: &str) -> Option<(SegmentId, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    if stem.len() != 16 || !(ext == "dat" || ext == "idx") {
        return None;
    }
    u64::from_str_radix(stem, 16).ok().map(|id| (id, ext))
}

const UNVERIFIED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// The payloads of a sealed segment. Payloads found on disk at start-up are verified on
/// their first read; payloads this process wrote are trusted (they came from memory).
#[derive(Debug)]
struct Payloads {
    /// (payload offset, length, checksum), sorted by offset.
    list: Vec<(u64, u32, u32)>,
    state: Vec<AtomicU8>,
    /// End of the last payload.
    end: u64,
}

impl Payloads {
    fn new(list: Vec<(u64, u32, u32)>, initial: u8) -> Payloads {
        let end = list.last().map(|&(o, n, _)| o + u64::from(n)).unwrap_or(0);
        let state = list.iter().map(|_| AtomicU8::new(initial)).collect();
        Payloads { list, state, end }
    }
}

/// A segment as readers see it: its data file and, once sealed, its payload table.
pub struct Segment {
    pub id: SegmentId,
    dat: Arc<dyn FileIo>,
    payloads: OnceLock<Payloads>,
    /// Live bytes when compaction last punched it (to skip unchanged segments).
    pub punched_at_live: AtomicU64,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Segment {
    /// Reads `buf.len()` bytes at payload offset `off`, verifying the checksums of the
    /// loaded records they belong to.
    pub fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if let Some(l) = self.payloads.get()
            && off < l.end
        {
            self.verify(l, off, buf.len() as u64)?;
        }
        self.dat
            .read_exact_at(buf, off)
            .map_err(|e| StoreError::io(format!("reading segment {:016x}", self.id), e))
    }

    fn verify(&self, l: &Payloads, off: u64, len: u64) -> Result<()> {
        let end = off + len;
        // First payload that ends after `off`.
        let mut i = l.list.partition_point(|&(o, n, _)| o + u64::from(n) <= off);
        while i < l.list.len() {
            let (o, n, crc) = l.list[i];
            if o >= end {
                break;
            }
            match l.state[i].load(Ordering::Acquire) {
                GOOD => {}
                BAD => return Err(self.corrupt(o, n)),
                _ => {
                    let mut payload = vec![0u8; n as usize];
                    self.dat.read_exact_at(&mut payload, o).map_err(|e| {
                        StoreError::io(format!("reading segment {:016x}", self.id), e)
                    })?;
                    if format::payload_crc(&payload) == crc {
                        l.state[i].store(GOOD, Ordering::Release);
                    } else {
                        l.state[i].store(BAD, Ordering::Release);
                        tracing::error!(segment = %format!("{:016x}", self.id), offset = o, len = n,
                            "payload checksum mismatch: data is corrupt, reads of it fail with EIO");
                        return Err(self.corrupt(o, n));
                    }
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// Verifies the checksums of the payloads covering a range without reading it out.
    pub fn verify_range(&self, off: u64, len: u64) -> Result<()> {
        match self.payloads.get() {
            Some(l) => self.verify(l, off, len),
            None => Ok(()),
        }
    }

    fn corrupt(&self, off: u64, len: u32) -> StoreError {
        StoreError::Corrupt {
            what: format!("segment {:016x}", self.id),
            detail: format!(
                "payload of {len} bytes at offset {off} fails its checksum; run `blockd verify`"
            ),
        }
    }

    /// Frees the blocks of a range no map refers to (compaction).
    pub fn punch(&self, off: u64, len: u64) -> Result<()> {
        self.dat
            .punch_hole(off, len)
            .map_err(|e| StoreError::io(format!("punching segment {:016x}", self.id), e))
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.dat.allocated_bytes().unwrap_or(0)
    }

    /// True once sealed (or loaded, which seals).
    pub fn is_sealed(&self) -> bool {
        self.payloads.get().is_some()
    }

    /// (offset, length) of every payload, sorted by offset; empty until sealed.
    pub fn payload_ranges(&self) -> Vec<(u64, u64)> {
        self.payloads
            .get()
            .map(|p| p.list.iter().map(|&(o, n, _)| (o, u64::from(n))).collect())
            .unwrap_or_default()
    }

    /// Total payload bytes; zero until sealed.
    pub fn payload_bytes(&self) -> u64 {
        self.payloads
            .get()
            .map(|p| p.list.iter().map(|&(_, n, _)| u64::from(n)).sum())
            .unwrap_or(0)
    }

    fn new(id: SegmentId, dat: Arc<dyn FileIo>) -> Segment {
        Segment {
            id,
            dat,
            payloads: OnceLock::new(),
            punched_at_live: AtomicU64::new(u64::MAX),
        }
    }
}

/// One write of a burst appended at once ([`Active::append_burst`]): `payload` at
/// `logical`, one checksum per `MAX_RECORD_BYTES` piece.
pub struct WriteIn<'a> {
    pub logical: u64,
    pub payload: &'a [u8],
    pub crcs: &'a [u32],
}

/// The writable end of a log: the segment being appended to.
pub struct Active {
    pub seg: Arc<Segment>,
    idx: Arc<dyn FileIo>,
    /// End of the last payload.
    pub dat_tail: u64,
    /// Slots used in the `.idx`, including its header.
    idx_slots: u64,
    /// Every record of the segment, in order.
    pub records: Vec<Record>,
    /// Records covered by a commit batch.
    pub committed: usize,
    pub next_seq: u64,
    /// Payload bytes below this were handed to writeback already.
    writeback_from: u64,
    /// Bytes of the `.dat` / `.idx` written so far, zeroes ahead of the tail included.
    dat_filled: u64,
    idx_filled: u64,
    /// The `.dat` is never filled past this (the segment size; 0 for a segment written
    /// once and sealed at once, such as a compaction output).
    fill_limit: u64,
    /// Set by the first commit batch: only segments that are flushed fill ahead (a writer
    /// that never flushes would pay for the zeroes and gain nothing).
    flushed: bool,
    /// Payloads of at least this many bytes (page-aligned) are written around the page
    /// cache ([`FileIo::write_direct_at`]); 0: never.
    direct_min: u64,
}

/// Writeback of an active segment's payloads is started every this many bytes.
const WRITEBACK_CHUNK_BYTES: u64 = 8 << 20;

/// Once an active segment has been flushed, its files are filled with zeroes this far
/// ahead of their tails (in whole steps), so that appends overwrite blocks and pages that
/// already exist: the fdatasync of the next flushes then writes data only, with no block
/// allocation or size change for the file system to journal (about 40 % less per sync on
/// ext4 here; see docs/BENCHMARKS.md). Sealing cuts the zeroes off again.
const DAT_FILL_STEP_BYTES: u64 = 1 << 20;
const IDX_FILL_STEP_BYTES: u64 = 64 << 10;
static ZEROES: [u8; DAT_FILL_STEP_BYTES as usize] = [0; DAT_FILL_STEP_BYTES as usize];

/// Writes zeroes over `[from, to)` of `file`.
fn fill_zeroes(file: &dyn FileIo, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROES.len() as u64);
        file.write_all_at(&ZEROES[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Makes sure `file` holds written bytes (data or zeroes) up to `end`, filling the next
/// whole `step` with zeroes when it does not; returns the new filled length.
fn fill_ahead(
    file: &dyn FileIo,
    filled: u64,
    end: u64,
    step: u64,
    limit: u64,
) -> std::io::Result<u64> {
    if end <= filled {
        return Ok(filled);
    }
    let to = end.next_multiple_of(step).min(limit).max(end);
    // The caller writes [.., end) itself: only the part after it needs zeroes.
    fill_zeroes(file, end.max(filled), to)?;
    Ok(to)
}

impl Active {
    /// Creates the files of a new segment, headers synced. The caller syncs the directory
    /// (and records the segment in the catalog) before relying on it.
    pub fn create(fs: &dyn Fs, dir: &Path, id: SegmentId, first_seq: u64) -> Result<Active> {
        let io_err = |what: &str, e| StoreError::io(format!("{what} segment {id:016x}"), e);
        let dat = fs
            .create(&dat_path(dir, id))
            .map_err(|e| io_err("creating", e))?;
        let idx = fs
            .create(&idx_path(dir, id))
            .map_err(|e| io_err("creating", e))?;
        let created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut header = vec![0u8; DAT_HEADER_BYTES as usize];
        header[..ENTRY_BYTES].copy_from_slice(
            &DatHeader {
                segment_id: id,
                created_unix,
            }
            .encode(),
        );
        dat.write_all_at(&header, 0)
            .map_err(|e| io_err("writing", e))?;
        idx.write_all_at(
            &IdxHeader {
                segment_id: id,
                first_seq,
            }
            .encode(),
            0,
        )
        .map_err(|e| io_err("writing", e))?;
        // The headers are durable before anyone names the segment: recovery refuses a
        // segment the catalog names whose header is missing or torn, so a crash between the
        // catalog update and the first flush would otherwise leave a store that cannot open.
        dat.sync_data().map_err(|e| io_err("syncing", e))?;
        idx.sync_data().map_err(|e| io_err("syncing", e))?;
        Ok(Active {
            seg: Arc::new(Segment::new(id, dat)),
            idx,
            dat_tail: DAT_HEADER_BYTES,
            idx_slots: 1,
            records: Vec::new(),
            committed: 0,
            next_seq: first_seq,
            writeback_from: DAT_HEADER_BYTES,
            dat_filled: DAT_HEADER_BYTES,
            idx_filled: ENTRY_BYTES as u64,
            fill_limit: u64::MAX,
            flushed: false,
            direct_min: 0,
        })
    }

    /// Fill the `.dat` with zeroes ahead of its tail only up to `bytes` (see
    /// `DAT_FILL_STEP_BYTES`); 0 turns filling off (the `.idx` is filled either way).
    pub fn set_fill_limit(&mut self, bytes: u64) {
        self.fill_limit = bytes;
    }

    /// Write payloads of at least `bytes` bytes around the page cache (0: never). See
    /// `Config::direct_write_min_bytes`.
    pub fn set_direct_writes(&mut self, bytes: u64) {
        self.direct_min = bytes;
    }

    /// Fills the `.idx` with zeroes ahead of a write of `slots` slots at the tail.
    fn fill_idx(&mut self, slots: u64) -> Result<()> {
        if !self.flushed {
            return Ok(());
        }
        let end = (self.idx_slots + slots) * ENTRY_BYTES as u64;
        self.idx_filled = fill_ahead(
            &*self.idx,
            self.idx_filled,
            end,
            IDX_FILL_STEP_BYTES,
            u64::MAX,
        )
        .map_err(|e| StoreError::io(self.what(), e))?;
        Ok(())
    }

    /// Appends a write: payload first, then its provisional entry. On error nothing is
    /// recorded (a payload written without its entry is dead space, never data).
    pub fn append_write(&mut self, logical: u64, payload: &[u8], crc: u32) -> Result<Record> {
        let mut one = self.append_writes(logical, payload, &[crc])?;
        one.pop()
            .ok_or_else(|| StoreError::io(self.what(), std::io::Error::other("no record appended")))
    }

    /// Appends a write of several records: `payload` cut into pieces of
    /// `MAX_RECORD_BYTES`, one checksum per piece in `crcs`. The pieces are laid out back
    /// to back in `.dat` and their entries in consecutive `.idx` slots, exactly as one
    /// `append_write` per piece would lay them out, but with one write for all payloads
    /// and one for all entries. On error nothing is recorded.
    pub fn append_writes(
        &mut self,
        logical: u64,
        payload: &[u8],
        crcs: &[u32],
    ) -> Result<Vec<Record>> {
        self.append_burst(&[WriteIn {
            logical,
            payload,
            crcs,
        }])
    }

    /// Appends a burst of writes (a client's pipelined requests), in order, laid out as
    /// one [`Active::append_writes`] each would lay them out, with one vectored write for
    /// all payloads (alignment gaps between them written as zeroes) and one write for all
    /// entries. On error nothing is recorded.
    pub fn append_burst(&mut self, writes: &[WriteIn<'_>]) -> Result<Vec<Record>> {
        let Some(first) = writes.first() else {
            return Ok(Vec::new());
        };
        let first_off = format::payload_offset(
            self.dat_tail,
            first.payload.len().min(format::MAX_RECORD_BYTES) as u64,
        );
        let count: usize = writes.iter().map(|w| w.crcs.len()).sum();
        let mut records = Vec::with_capacity(count);
        let mut entries = Vec::with_capacity(count * ENTRY_BYTES);
        // The vectored write's buffers: only a burst of several writes needs them (one
        // write's pieces are its payload, back to back).
        let vectored = writes.len() > 1;
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(if vectored { count * 2 } else { 0 });
        let mut off = first_off;
        for w in writes {
            let pieces = w.payload.chunks(format::MAX_RECORD_BYTES);
            if pieces.len() != w.crcs.len() || w.payload.is_empty() {
                return Err(StoreError::io(
                    self.what(),
                    std::io::Error::other("one checksum per record piece expected"),
                ));
            }
            for (i, (piece, &crc)) in pieces.zip(w.crcs).enumerate() {
                let len = piece.len() as u64;
                // Every piece but the last is a multiple of 4096 long, so each next piece
                // starts right where the previous one ended (its aligned offset).
                let data_off = format::payload_offset(off, len);
                if data_off != off && i > 0 {
                    return Err(StoreError::io(
                        self.what(),
                        std::io::Error::other("record pieces are not contiguous"),
                    ));
                }
                if vectored {
                    if data_off > off {
                        // The gap in front of an aligned payload (under a page): dead bytes.
                        bufs.push(&ZEROES[..(data_off - off) as usize]);
                    }
                    bufs.push(piece);
                }
                let record = Record::Write {
                    seq: self.next_seq + records.len() as u64,
                    logical: w.logical + (i * format::MAX_RECORD_BYTES) as u64,
                    len: len as u32,
                    data_off,
                    data_crc: crc,
                };
                entries.extend_from_slice(&format::encode_record(&record, false));
                records.push(record);
                off = data_off + len;
            }
        }
        let payload = match writes {
            [one] => Some(one.payload),
            _ => None,
        };
        let direct = payload.filter(|p| {
            self.direct_min > 0
                && p.len() as u64 >= self.direct_min
                && first_off.is_multiple_of(format::PAGE_BYTES)
                && (p.len() as u64).is_multiple_of(format::PAGE_BYTES)
        });
        if direct.is_some() {
            // No zeroes ahead of a direct write: they would be cached pages that the kernel
            // must write back before the direct write may overwrite them.
            self.dat_filled = self.dat_filled.max(off);
        } else if self.flushed {
            self.dat_filled = fill_ahead(
                &*self.seg.dat,
                self.dat_filled,
                off,
                DAT_FILL_STEP_BYTES,
                self.fill_limit,
            )
            .map_err(|e| StoreError::io(self.what(), e))?;
        }
        self.fill_idx(records.len() as u64)?;
        let idx_off = self.idx_slots * ENTRY_BYTES as u64;
        let written = match (direct, payload) {
            // Payloads, then entries, as in `write_pair`.
            (Some(p), _) => self
                .seg
                .dat
                .write_direct_at(p, first_off)
                .and_then(|()| self.idx.write_all_at(&entries, idx_off)),
            // One submission on engines that can link the two writes.
            (None, Some(p)) => self
                .seg
                .dat
                .write_pair(p, first_off, &*self.idx, &entries, idx_off),
            (None, None) => self
                .seg
                .dat
                .write_vectored_at(&bufs, first_off)
                .and_then(|()| self.idx.write_all_at(&entries, idx_off)),
        };
        written
            .map_err(|e| StoreError::io(format!("appending to segment {:016x}", self.seg.id), e))?;
        for r in &records {
            self.entry_appended(*r);
        }
        self.dat_tail = off;
        // Keep the dirty payload bytes of the active segment small, so that the sync
        // when it is sealed (and every flush) finds little left to write.
        if self.dat_tail - self.writeback_from >= WRITEBACK_CHUNK_BYTES {
            let _ = self
                .seg
                .dat
                .start_writeback(self.writeback_from, self.dat_tail - self.writeback_from);
            self.writeback_from = self.dat_tail;
        }
        Ok(records)
    }

    fn what(&self) -> String {
        format!("appending to segment {:016x}", self.seg.id)
    }

    pub fn append_zero(&mut self, logical: u64, len: u64, keep_allocated: bool) -> Result<Record> {
        let record = Record::Zero {
            seq: self.next_seq,
            logical,
            len,
            keep_allocated,
        };
        self.append_entry(record)?;
        Ok(record)
    }

    fn append_entry(&mut self, record: Record) -> Result<()> {
        self.fill_idx(1)?;
        self.idx
            .write_all_at(
                &format::encode_record(&record, false),
                self.idx_slots * ENTRY_BYTES as u64,
            )
            .map_err(|e| StoreError::io(format!("appending to segment {:016x}", self.seg.id), e))?;
        self.entry_appended(record);
        Ok(())
    }

    fn entry_appended(&mut self, record: Record) {
        self.idx_slots += 1;
        self.records.push(record);
        self.next_seq += 1;
    }

    pub fn uncommitted(&self) -> usize {
        self.records.len() - self.committed
    }

    /// Reserves room for a commit batch of the uncommitted records and returns what the
    /// committer needs; the batch is written by [`Pending::write`] after the `.dat` sync.
    pub fn prepare_commit(&mut self) -> Option<Pending> {
        if self.uncommitted() == 0 {
            return None;
        }
        let records = self.records[self.committed..].to_vec();
        // Zeroes ahead of the batch: a failure here only means a larger sync later.
        self.flushed = true;
        let _ = self.fill_idx(records.len() as u64 + 2);
        let slot = self.idx_slots;
        self.idx_slots += records.len() as u64 + 2;
        Some(Pending {
            seg_id: self.seg.id,
            dat: self.seg.dat.clone(),
            idx: self.idx.clone(),
            slot,
            upto: self.records.len(),
            records,
            seal: false,
            sync_dat: true,
        })
    }

    /// Records the payload table once the seal batch is durable; this session's payloads
    /// are trusted.
    pub fn mark_sealed(&self) {
        let _ = self
            .seg
            .payloads
            .set(Payloads::new(payloads_of(&self.records), GOOD));
        // The zeroes filled ahead are not needed any more. Best effort: a crash before the
        // new sizes are durable only leaves the zeroes there, which readers ignore. Only
        // when there are some (a segment that was never flushed has none).
        if self.dat_filled > self.dat_tail {
            let _ = self.seg.dat.set_len(self.dat_tail);
        }
        let idx_used = self.idx_slots * ENTRY_BYTES as u64;
        if self.idx_filled > idx_used {
            let _ = self.idx.set_len(idx_used);
        }
    }

    /// A seal batch: every record of the segment. After it is written the segment never
    /// changes.
    pub fn prepare_seal(&mut self) -> Pending {
        let slot = self.idx_slots;
        self.idx_slots += self.records.len() as u64 + 2;
        Pending {
            seg_id: self.seg.id,
            dat: self.seg.dat.clone(),
            idx: self.idx.clone(),
            slot,
            upto: self.records.len(),
            records: self.records.clone(),
            seal: true,
            // Payloads of committed records were synced before their batch was written.
            sync_dat: self.committed < self.records.len(),
        }
    }
}

/// A commit batch waiting to be written.
pub struct Pending {
    pub seg_id: SegmentId,
    dat: Arc<dyn FileIo>,
    idx: Arc<dyn FileIo>,
    slot: u64,
    /// Records covered once written.
    pub upto: usize,
    records: Vec<Record>,
    seal: bool,
    /// Whether payloads not yet covered by a synced batch exist.
    sync_dat: bool,
}

impl Pending {
    /// Makes the payloads durable, then writes and syncs the batch. Only after this
    /// returns are the records committed.
    pub fn write(&self) -> std::io::Result<()> {
        if self.sync_dat {
            self.dat.sync_data()?;
        }
        self.idx.write_all_at_and_sync(
            &format::encode_batch(&self.records, self.seal),
            self.slot * ENTRY_BYTES as u64,
        )
    }
}

/// What recovery found in a segment.
pub struct LoadedSegment {
    pub seg: Arc<Segment>,
    /// The records to replay, in order.
    pub records: Vec<Record>,
    /// True if the segment carried a seal batch whose every record copy is intact (false
    /// for a seal batch rebuilt from provisional copies: recovery seals it again).
    pub sealed: bool,
    /// Provisional records after the last batch that were dropped (torn tail).
    pub dropped_tail: usize,
    /// Problems worth reporting (`blockd verify`), none of which lose committed data.
    pub notes: Vec<String>,
}

fn damaged(id: SegmentId, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: format!("segment {id:016x}"),
        detail: detail.into(),
    }
}

/// Reads a segment's index and decides which records it holds (see the module docs), for
/// a segment that may legitimately be unsealed: the last segment of a volume's log, which
/// a crash can leave with a torn tail. Same as [`load_checked`] with `must_be_sealed`
/// false.
pub fn load(fs: &dyn Fs, dir: &Path, id: SegmentId) -> Result<LoadedSegment> {
    load_checked(fs, dir, id, false)
}

/// Reads a segment's index and decides which records it holds.
///
/// * A complete seal batch lists them all.
/// * Every record copy found inside a batch is trusted, also in a damaged or torn batch: a
///   batch is written only after the payloads of its records were synced.
/// * A seal batch with a damaged mark or copy is rebuilt from a mark that survived (its
///   sequence range) and either copy of each record. If some record was found only in its
///   provisional copy, the segment is reported unsealed so that recovery seals it again.
/// * Otherwise: every record up to the last complete batch (either copy, or the segment is
///   corrupt), then records up to the last batch copy found, then the provisional tail
///   while its payload checksums hold (a torn tail is cut there). A record some batch
///   claims can only be missing because of damage (the index is append-only and a torn
///   write leaves whole zero slots, never unreadable ones), so that is an error too.
///
/// `must_be_sealed` says the segment is known to have been sealed and synced (the catalog
/// names a later segment after it, or a snapshot owns it), so nothing in it can be torn:
/// damage that leaves its records uncertain is then an error, never a shorter segment.
pub fn load_checked(
    fs: &dyn Fs,
    dir: &Path,
    id: SegmentId,
    must_be_sealed: bool,
) -> Result<LoadedSegment> {
    let io_err = |what: &str, e| StoreError::io(format!("{what} segment {id:016x}"), e);
    let dat = fs
        .open(&dat_path(dir, id))
        .map_err(|e| io_err("opening", e))?;
    let idx_bytes = fs
        .read(&idx_path(dir, id))
        .map_err(|e| io_err("reading", e))?;
    let mut head = [0u8; ENTRY_BYTES];
    dat.read_exact_at(&mut head, 0)
        .map_err(|e| io_err("reading", e))?;
    let dh = DatHeader::decode(&head).map_err(|e| damaged(id, format!(".dat header: {e}")))?;
    let ih = IdxHeader::decode(&idx_bytes).map_err(|e| damaged(id, format!(".idx header: {e}")))?;
    if dh.segment_id != id || ih.segment_id != id {
        return Err(damaged(id, "file headers name another segment"));
    }
    let slots: Vec<&[u8]> = idx_bytes[ENTRY_BYTES..].chunks_exact(ENTRY_BYTES).collect();
    let mut notes = Vec::new();
    let mut provisional: BTreeMap<u64, Record> = BTreeMap::new();
    // Record copies inside batches, complete or not.
    let mut copies: BTreeMap<u64, Record> = BTreeMap::new();
    let add_copy = |copies: &mut BTreeMap<u64, Record>, r: Record| -> Result<()> {
        match copies.insert(r.seq(), r) {
            Some(prev) if prev != r => Err(damaged(
                id,
                format!("two committed versions of seq {}", r.seq()),
            )),
            _ => Ok(()),
        }
    };
    // Highest sequence number of a complete batch.
    let mut last_complete: Option<u64> = None;
    // The last complete seal batch, and the (first, last, count) of the last seal batch
    // seen only through one of its marks.
    let mut seal: Option<Vec<Record>> = None;
    let mut seal_mark: Option<(u64, u64, u32)> = None;
    // Highest sequence number any batch mark (of a complete batch or not) claims.
    let mut max_mark: Option<u64> = None;
    // Slots holding something unreadable. The index is append-only and written in whole
    // 64-byte slots, and a torn write leaves whole sectors unwritten (zeroes), so these are
    // damage, never a torn write.
    let mut damaged_slots = 0;
    let mut max_seq_seen = None::<u64>;
    let mut i = 0;
    while i < slots.len() {
        match format::decode_entry(slots[i]) {
            Ok(Entry::Record {
                record,
                in_batch: false,
            }) => {
                max_seq_seen = max_seq_seen.max(Some(record.seq()));
                if provisional.insert(record.seq(), record).is_some() {
                    notes.push(format!(
                        "slot {}: duplicate provisional entry for seq {}",
                        i + 1,
                        record.seq()
                    ));
                }
                i += 1;
            }
            // A copy outside a complete batch: its batch is damaged (or torn).
            Ok(Entry::Record {
                record,
                in_batch: true,
            }) => {
                add_copy(&mut copies, record)?;
                i += 1;
            }
            Ok(Entry::BatchBegin {
                first_seq,
                last_seq,
                count,
                seal: is_seal,
            }) => {
                if count > 0 {
                    max_mark = max_mark.max(Some(last_seq));
                }
                match parse_batch(&slots, i, first_seq, last_seq, count, is_seal) {
                    Some(records) => {
                        for r in &records {
                            add_copy(&mut copies, *r)?;
                        }
                        if count > 0 {
                            last_complete = last_complete.max(Some(last_seq));
                        }
                        if is_seal {
                            seal = Some(records);
                        }
                        i += count as usize + 2;
                    }
                    None => {
                        notes.push(format!(
                            "slot {}: incomplete commit batch (torn write or damage)",
                            i + 1
                        ));
                        if is_seal {
                            seal_mark = Some((first_seq, last_seq, count));
                        }
                        i += 1;
                    }
                }
            }
            // The end of a batch whose begin is damaged.
            Ok(Entry::BatchEnd {
                first_seq,
                last_seq,
                count,
                seal: is_seal,
                ..
            }) => {
                if count > 0 {
                    max_mark = max_mark.max(Some(last_seq));
                }
                if is_seal {
                    seal_mark = Some((first_seq, last_seq, count));
                }
                i += 1;
            }
            // Zero padding (slots reserved for a batch that was never written): skipped.
            Err(FormatError::BadMagic) if slots[i].iter().all(|&b| b == 0) => i += 1,
            Err(e) => {
                notes.push(format!("slot {}: unreadable entry ({e})", i + 1));
                damaged_slots += 1;
                i += 1;
            }
        }
    }
    let seg_with = |payloads: Vec<(u64, u32, u32)>| {
        let seg = Segment::new(id, dat.clone());
        let _ = seg.payloads.set(Payloads::new(payloads, UNVERIFIED));
        Arc::new(seg)
    };
    let loaded = |records: Vec<Record>, sealed: bool, dropped_tail: usize, notes: Vec<String>| {
        LoadedSegment {
            seg: seg_with(payloads_of(&records)),
            records,
            sealed,
            dropped_tail,
            notes,
        }
    };
    if let Some(records) = seal {
        return Ok(loaded(records, true, 0, notes));
    }
    let payload_ok = |r: &Record| match *r {
        Record::Write {
            data_off,
            len,
            data_crc,
            ..
        } => {
            let mut payload = vec![0u8; len as usize];
            dat.read_exact_at(&mut payload, data_off).is_ok()
                && format::payload_crc(&payload) == data_crc
        }
        Record::Zero { .. } => true,
    };
    // Up to the last batch copy, payloads were synced before that batch was written: a bad
    // one is damage (reads of it fail), not a torn write.
    let max_copy = copies.keys().next_back().copied();
    let synced = |seq: u64| must_be_sealed || max_copy.is_some_and(|m| seq <= m);
    if let Some((first, last, count)) = seal_mark
        && (count == 0 || (first == ih.first_seq && count as usize <= slots.len()))
    {
        let mut records = Vec::with_capacity(count as usize);
        let mut from_provisional = 0;
        if count > 0 {
            for seq in first..=last {
                if let Some(r) = copies.get(&seq) {
                    records.push(*r);
                } else if let Some(r) = provisional
                    .get(&seq)
                    .filter(|r| synced(seq) || payload_ok(r))
                {
                    records.push(*r);
                    from_provisional += 1;
                } else {
                    break;
                }
            }
        }
        if records.len() == count as usize {
            notes.push(format!(
                "damaged seal batch: its {count} record(s) recovered from their other copies"
            ));
            // Sealed only if every record has an intact batch copy; otherwise recovery
            // seals it again.
            return Ok(loaded(records, from_provisional == 0, 0, notes));
        }
    }
    if must_be_sealed {
        return Err(damaged(
            id,
            "the segment was sealed, but its seal batch and another copy of a record in it are \
             unreadable",
        ));
    }
    // Not sealed.
    let mut records = Vec::new();
    let mut seq = ih.first_seq;
    if let Some(last) = last_complete {
        while seq <= last {
            match copies.get(&seq).or_else(|| provisional.get(&seq)) {
                Some(r) => records.push(*r),
                None => {
                    return Err(damaged(
                        id,
                        format!("committed record seq {seq} is unreadable in both of its copies"),
                    ));
                }
            }
            // Nothing can follow a record with seq u64::MAX.
            let Some(next) = seq.checked_add(1) else {
                return Ok(loaded(records, false, 0, notes));
            };
            seq = next;
        }
    }
    // Then records some batch holds, then the provisional tail. Where a batch claims a
    // record, its payload was synced before the batch was written, so neither a missing
    // record (with damaged slots around) nor a bad payload can be a torn write: that is
    // damage, and cutting the segment there would silently bring back older data.
    let claimed = |seq: u64| max_mark.max(max_copy).is_some_and(|m| seq <= m);
    loop {
        let r = match copies.get(&seq) {
            Some(r) => *r,
            None => match provisional.get(&seq) {
                Some(r) if synced(seq) || payload_ok(r) => *r,
                Some(_) if claimed(seq) => {
                    return Err(damaged(
                        id,
                        format!(
                            "the payload of record seq {seq}, which a commit batch holds, fails \
                             its checksum and the batch is damaged"
                        ),
                    ));
                }
                None if claimed(seq) && damaged_slots > 0 => {
                    return Err(damaged(
                        id,
                        format!(
                            "record seq {seq}, which a commit batch holds, is unreadable in both \
                             of its copies"
                        ),
                    ));
                }
                _ => break,
            },
        };
        records.push(r);
        let Some(next) = seq.checked_add(1) else {
            return Ok(loaded(records, false, 0, notes));
        };
        seq = next;
    }
    let mut dropped_tail = 0;
    if let Some(max) = max_seq_seen.max(max_copy)
        && max >= seq
    {
        dropped_tail = provisional.range(seq..).count();
        notes.push(format!(
            "torn tail: {dropped_tail} unflushed record(s) from seq {seq} dropped"
        ));
    }
    Ok(loaded(records, false, dropped_tail, notes))
}

fn payloads_of(records: &[Record]) -> Vec<(u64, u32, u32)> {
    let mut p: Vec<(u64, u32, u32)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Write {
                data_off,
                len,
                data_crc,
                ..
            } => Some((*data_off, *len, *data_crc)),
            Record::Zero { .. } => None,
        })
        .collect();
    p.sort_unstable_by_key(|&(o, _, _)| o);
    p
}

/// Validates a batch starting at slot `i`; returns its records.
fn parse_batch(
    slots: &[&[u8]],
    i: usize,
    first: u64,
    last: u64,
    count: u32,
    seal: bool,
) -> Option<Vec<Record>> {
    let n = count as usize;
    let end_slot = i.checked_add(n)?.checked_add(1)?;
    if end_slot >= slots.len() {
        return None;
    }
    let copies: Vec<u8> = slots[i + 1..=i + n].concat();
    match format::decode_entry(slots[end_slot]) {
        Ok(Entry::BatchEnd {
            first_seq,
            last_seq,
            count: c,
            batch_crc,
            seal: s,
        }) if first_seq == first
            && last_seq == last
            && c == count
            && s == seal
            && batch_crc == format::batch_crc(&copies) => {}
        _ => return None,
    }
    let mut records = Vec::with_capacity(n);
    for (k, slot) in slots[i + 1..=i + n].iter().enumerate() {
        match format::decode_entry(slot) {
            Ok(Entry::Record {
                record,
                in_batch: true,
            }) if record.seq() == first + k as u64 => records.push(record),
            _ => return None,
        }
    }
    Some(records)
}

/// Seals a segment recovered from disk: syncs its payloads and writes a seal batch of the
/// records recovery accepted, so that later loads ignore any torn provisional entries.
pub fn seal_recovered(fs: &dyn Fs, dir: &Path, loaded: &LoadedSegment) -> Result<()> {
    let id = loaded.seg.id;
    let io_err = |e| StoreError::io(format!("sealing segment {id:016x}"), e);
    let idx = fs.open(&idx_path(dir, id)).map_err(io_err)?;
    let slots = idx.len().map_err(io_err)?.div_ceil(ENTRY_BYTES as u64);
    loaded.seg.dat.sync_data().map_err(io_err)?;
    idx.write_all_at(
        &format::encode_batch(&loaded.records, true),
        slots * ENTRY_BYTES as u64,
    )
    .map_err(io_err)?;
    idx.sync_data().map_err(io_err)
}

/// Removes a segment's files.
/// Disk bytes a segment's files occupy (0 for what cannot be opened): what removing them
/// frees.
pub fn file_bytes(fs: &dyn Fs, dir: &Path, id: SegmentId) -> u64 {
    [dat_path(dir, id), idx_path(dir, id)]
        .iter()
        .filter_map(|p| fs.open(p).ok())
        .filter_map(|f| f.allocated_bytes().ok())
        .sum()
}

pub fn remove_files(fs: &dyn Fs, dir: &Path, id: SegmentId) -> Result<()> {
    for p in [dat_path(dir, id), idx_path(dir, id)] {
        match fs.remove(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("removing {}", p.display()), e)),
        }
    }
    Ok(())
}
