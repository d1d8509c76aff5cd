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
//! Recovery ([`load`]) trusts committed records (their payloads were durable before the
//! batch was written, so a bad payload checksum later means corruption: reads of that
//! range fail with EIO) and accepts provisional records after the last batch only while
//! their payload checksums hold (a torn tail is cut there).

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
}

impl Active {
    /// Creates the files of a new segment. The caller syncs the directory (and records the
    /// segment in the catalog) before relying on it.
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
        Ok(Active {
            seg: Arc::new(Segment::new(id, dat)),
            idx,
            dat_tail: DAT_HEADER_BYTES,
            idx_slots: 1,
            records: Vec::new(),
            committed: 0,
            next_seq: first_seq,
        })
    }

    /// Appends a write: payload first, then its provisional entry. On error nothing is
    /// recorded (a payload written without its entry is dead space, never data).
    pub fn append_write(&mut self, logical: u64, payload: &[u8], crc: u32) -> Result<Record> {
        let len = payload.len() as u64;
        let data_off = format::payload_offset(self.dat_tail, len);
        self.seg
            .dat
            .write_all_at(payload, data_off)
            .map_err(|e| StoreError::io(format!("appending to segment {:016x}", self.seg.id), e))?;
        let record = Record::Write {
            seq: self.next_seq,
            logical,
            len: len as u32,
            data_off,
            data_crc: crc,
        };
        self.append_entry(record)?;
        self.dat_tail = data_off + len;
        Ok(record)
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
        self.idx
            .write_all_at(
                &format::encode_record(&record, false),
                self.idx_slots * ENTRY_BYTES as u64,
            )
            .map_err(|e| StoreError::io(format!("appending to segment {:016x}", self.seg.id), e))?;
        self.idx_slots += 1;
        self.records.push(record);
        self.next_seq += 1;
        Ok(())
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
        })
    }

    /// Records the payload table once the seal batch is durable; this session's payloads
    /// are trusted.
    pub fn mark_sealed(&self) {
        let _ = self
            .seg
            .payloads
            .set(Payloads::new(payloads_of(&self.records), GOOD));
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
}

impl Pending {
    /// Makes the payloads durable, then writes and syncs the batch. Only after this
    /// returns are the records committed.
    pub fn write(&self) -> std::io::Result<()> {
        self.dat.sync_data()?;
        self.idx.write_all_at(
            &format::encode_batch(&self.records, self.seal),
            self.slot * ENTRY_BYTES as u64,
        )?;
        self.idx.sync_data()
    }
}

/// What recovery found in a segment.
pub struct LoadedSegment {
    pub seg: Arc<Segment>,
    /// The records to replay, in order.
    pub records: Vec<Record>,
    /// True if the segment carried a valid seal batch.
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

/// Reads a segment's index and decides which records it holds (see the module docs).
/// `check_tail` verifies the payload checksums of provisional records (recovery does;
/// it costs a read of those payloads).
pub fn load(fs: &dyn Fs, dir: &Path, id: SegmentId) -> Result<LoadedSegment> {
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
    let mut committed: BTreeMap<u64, Record> = BTreeMap::new();
    let mut seal: Option<Vec<Record>> = None;
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
            Ok(Entry::BatchBegin {
                first_seq,
                last_seq,
                count,
                seal: is_seal,
            }) => match parse_batch(&slots, i, first_seq, last_seq, count, is_seal) {
                Some(records) => {
                    for r in &records {
                        if let Some(prev) = committed.insert(r.seq(), *r)
                            && prev != *r
                        {
                            return Err(damaged(
                                id,
                                format!("two committed versions of seq {}", r.seq()),
                            ));
                        }
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
                    i += 1;
                }
            },
            // Copies inside a damaged batch, stray batch ends, zero padding: skipped.
            Ok(_) => i += 1,
            Err(FormatError::BadMagic) if slots[i].iter().all(|&b| b == 0) => i += 1,
            Err(e) => {
                notes.push(format!("slot {}: unreadable entry ({e})", i + 1));
                i += 1;
            }
        }
    }
    let seg_with = |payloads: Vec<(u64, u32, u32)>| {
        let seg = Segment::new(id, dat.clone());
        let _ = seg.payloads.set(Payloads::new(payloads, UNVERIFIED));
        Arc::new(seg)
    };
    if let Some(records) = seal {
        let payloads = payloads_of(&records);
        return Ok(LoadedSegment {
            seg: seg_with(payloads),
            records,
            sealed: true,
            dropped_tail: 0,
            notes,
        });
    }
    // Not sealed: committed records, with provisional copies filling any gap (a damaged
    // batch), then the provisional tail while its payloads check out.
    let last_committed = committed.keys().next_back().copied();
    let mut records = Vec::new();
    let mut seq = ih.first_seq;
    if let Some(last) = last_committed {
        while seq <= last {
            match committed.get(&seq).or_else(|| provisional.get(&seq)) {
                Some(r) => records.push(*r),
                None => {
                    return Err(damaged(
                        id,
                        format!("committed record seq {seq} is unreadable in both of its copies"),
                    ));
                }
            }
            seq += 1;
        }
    }
    let mut dropped_tail = 0;
    while let Some(r) = provisional.get(&seq) {
        if let Record::Write {
            data_off,
            len,
            data_crc,
            ..
        } = r
        {
            let mut payload = vec![0u8; *len as usize];
            let ok = dat.read_exact_at(&mut payload, *data_off).is_ok()
                && format::payload_crc(&payload) == *data_crc;
            if !ok {
                break;
            }
        }
        records.push(*r);
        seq += 1;
    }
    if let Some(max) = max_seq_seen
        && max >= seq
    {
        dropped_tail = provisional.range(seq..).count();
        notes.push(format!(
            "torn tail: {dropped_tail} unflushed record(s) from seq {seq} dropped"
        ));
    }
    let payloads = payloads_of(&records);
    Ok(LoadedSegment {
        seg: seg_with(payloads),
        records,
        sealed: false,
        dropped_tail,
        notes,
    })
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
