//! Support code shared by the store fuzz targets (`store_records`, `catalog`,
//! `segment_replay`, `store_open`) and by the seed generator (`examples/gen_seeds.rs`).
//!
//! - [`Counting`]: a global allocator that records the peak of live heap bytes, so a target
//!   can assert that what it allocates is bounded by its input's size, never by a length or
//!   count claimed inside the input.
//! - [`fix_crc`] and the salts of docs/FORMAT.md: a target can repair checksums so that the
//!   fuzzer, which cannot solve a crc32, still explores what lies behind them.
//! - [`SegmentSpec`]: the input encoding of one segment (its `.dat` and `.idx`), shared by
//!   `segment_replay` and `store_open`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockd::store::format::{
    self, DAT_HEADER_BYTES, DatHeader, ENTRY_BYTES, ENTRY_MAGIC, FORMAT_VERSION, IdxHeader,
};
use blockd::store::io::Fs;
use blockd::store::io::mem::MemFs;
use blockd::store::segment::{self, SegmentId};

// ---------------------------------------------------------------- allocation budget

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and their peak. Install it in a target with
/// `#[global_allocator] static ALLOC: store_fuzz::Counting = store_fuzz::Counting;`.
#[derive(Debug)]
pub struct Counting;

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// updates counters besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Measures the peak heap growth of one run (needs [`Counting`] installed).
#[derive(Debug)]
pub struct Budget {
    base: usize,
}

impl Budget {
    pub fn start() -> Budget {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        Budget { base }
    }

    /// Heap bytes allocated at the peak since [`Budget::start`], beyond what was live then.
    pub fn peak(&self) -> usize {
        PEAK.load(Ordering::Relaxed).saturating_sub(self.base)
    }

    /// Panics if the peak exceeded `limit` bytes.
    pub fn check(&self, limit: usize, what: &str) {
        let peak = self.peak();
        assert!(
            peak <= limit,
            "{what}: peak heap growth {peak} bytes exceeds the budget of {limit} bytes"
        );
    }
}

// ---------------------------------------------------------------- checksums

/// Salts (initial crc32 states) per structure type, from docs/FORMAT.md.
pub const SALT_DAT_HEADER: u32 = 0x6461_7431;
pub const SALT_IDX_HEADER: u32 = 0x6964_7831;
pub const SALT_ENTRY: u32 = 0x656e_7431;
pub const SALT_BATCH: u32 = 0x6261_7431;
pub const SALT_CATALOG_HEADER: u32 = 0x6361_7431;
pub const SALT_CATALOG_BODY: u32 = 0x6362_6431;

pub fn crc(salt: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(salt);
    h.update(bytes);
    h.finalize()
}

/// The checksum stored in bytes 60..64 of a 64-byte structure.
pub fn stored_crc(slot: &[u8]) -> u32 {
    u32::from_le_bytes([slot[60], slot[61], slot[62], slot[63]])
}

/// Rewrites bytes 60..64 of a 64-byte structure with the crc32 of bytes 0..60.
pub fn fix_crc(slot: &mut [u8], salt: u32) {
    let c = crc(salt, &slot[..60]);
    slot[60..64].copy_from_slice(&c.to_le_bytes());
}

pub const KIND_WRITE: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_BATCH_BEGIN: u8 = 3;
pub const KIND_BATCH_END: u8 = 4;
pub const FLAG_SEAL: u8 = 1 << 2;

/// A batch begin or end slot laid out by docs/FORMAT.md (format.rs keeps its encoder for
/// single marks private; `store_records` checks this one against `encode_batch`).
pub fn spec_mark(
    kind: u8,
    first: u64,
    last: u64,
    count: u32,
    batch_crc: u32,
    seal: bool,
) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    out[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    out[4] = kind;
    out[5] = if seal { FLAG_SEAL } else { 0 };
    out[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[8..16].copy_from_slice(&first.to_le_bytes());
    out[16..24].copy_from_slice(&last.to_le_bytes());
    out[24..32].copy_from_slice(&u64::from(count).to_le_bytes());
    if kind == KIND_BATCH_END {
        out[40..44].copy_from_slice(&batch_crc.to_le_bytes());
    }
    fix_crc(&mut out, SALT_ENTRY);
    out
}

// ---------------------------------------------------------------- input cursor

/// Reads an input front to back; reads past the end give zeroes / empty slices.
#[derive(Debug)]
pub struct Cursor<'a> {
    pub rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { rest: data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = b;
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let b = self.bytes(2);
        let mut a = [0u8; 2];
        a[..b.len()].copy_from_slice(b);
        u16::from_le_bytes(a)
    }

    pub fn u64(&mut self) -> u64 {
        let b = self.bytes(8);
        let mut a = [0u8; 8];
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }
}

// ---------------------------------------------------------------- segments

/// Prepend a valid `IdxHeader { segment_id, first_seq }` to the `.idx` bytes (the input
/// then carries `first_seq` as 8 bytes).
pub const SEG_IDX_HEADER: u8 = 1 << 0;
/// Recompute the checksum of every `.idx` slot that starts with the entry magic.
pub const SEG_FIX_ENTRY_CRCS: u8 = 1 << 1;
/// Set the payload checksum of every write slot whose payload lies in the `.dat` to the
/// checksum of those bytes (before the entry checksums are fixed).
pub const SEG_FIX_PAYLOAD_CRCS: u8 = 1 << 2;
/// Set the batch checksum of every batch end slot to the checksum of the `count` slots
/// before it (after the other fixes, then fix the end's own checksum).
pub const SEG_FIX_BATCH_CRCS: u8 = 1 << 3;
/// Use the `.dat` bytes as the whole file instead of putting a valid header block
/// (`DatHeader { segment_id, created_unix: 0 }`, zero-padded to 4096 bytes) in front.
pub const SEG_RAW_DAT: u8 = 1 << 4;

/// One segment as a fuzz input describes it:
/// `ctl: u8, [first_seq: u64 if SEG_IDX_HEADER], dat_len: u16, dat, idx_len: u16, idx`
/// (`idx_len` absent when the segment takes the rest of the input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpec {
    pub ctl: u8,
    pub first_seq: u64,
    pub dat: Vec<u8>,
    pub idx: Vec<u8>,
}

impl SegmentSpec {
    pub fn parse(c: &mut Cursor<'_>, idx_takes_rest: bool) -> SegmentSpec {
        let ctl = c.u8();
        let first_seq = if ctl & SEG_IDX_HEADER != 0 {
            c.u64()
        } else {
            0
        };
        let dat_len = usize::from(c.u16());
        let dat = c.bytes(dat_len).to_vec();
        let idx = if idx_takes_rest {
            c.bytes(c.rest.len()).to_vec()
        } else {
            let idx_len = usize::from(c.u16());
            c.bytes(idx_len).to_vec()
        };
        SegmentSpec {
            ctl,
            first_seq,
            dat,
            idx,
        }
    }

    /// The inverse of [`SegmentSpec::parse`] (lengths are capped at `u16::MAX`).
    pub fn encode(&self, idx_takes_rest: bool) -> Vec<u8> {
        let mut out = vec![self.ctl];
        if self.ctl & SEG_IDX_HEADER != 0 {
            out.extend_from_slice(&self.first_seq.to_le_bytes());
        }
        let dat = &self.dat[..self.dat.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(dat.len() as u16).to_le_bytes());
        out.extend_from_slice(dat);
        let idx = if idx_takes_rest {
            &self.idx[..]
        } else {
            let idx = &self.idx[..self.idx.len().min(usize::from(u16::MAX))];
            out.extend_from_slice(&(idx.len() as u16).to_le_bytes());
            idx
        };
        out.extend_from_slice(idx);
        out
    }

    /// A spec reproducing real segment files: headers valid for `id` are stripped and
    /// regenerated by [`SegmentSpec::files`] (their creation time becomes 0).
    pub fn from_files(id: SegmentId, dat: &[u8], idx: &[u8]) -> SegmentSpec {
        let mut ctl = 0;
        let mut first_seq = 0;
        let mut idx_body = idx;
        if let Ok(h) = IdxHeader::decode(idx)
            && h.segment_id == id
        {
            ctl |= SEG_IDX_HEADER;
            first_seq = h.first_seq;
            idx_body = &idx[ENTRY_BYTES..];
        }
        let header_ok = DatHeader::decode(dat).is_ok_and(|h| h.segment_id == id)
            && dat.len() >= DAT_HEADER_BYTES as usize
            && dat[ENTRY_BYTES..DAT_HEADER_BYTES as usize]
                .iter()
                .all(|&b| b == 0);
        let dat_body = if header_ok {
            &dat[DAT_HEADER_BYTES as usize..]
        } else {
            ctl |= SEG_RAW_DAT;
            dat
        };
        SegmentSpec {
            ctl,
            first_seq,
            dat: dat_body.to_vec(),
            idx: idx_body.to_vec(),
        }
    }

    /// The `.dat` and `.idx` contents for segment `id`, fixes applied.
    pub fn files(&self, id: SegmentId) -> (Vec<u8>, Vec<u8>) {
        let dat = if self.ctl & SEG_RAW_DAT != 0 {
            self.dat.clone()
        } else {
            let mut d = vec![0u8; DAT_HEADER_BYTES as usize];
            d[..ENTRY_BYTES].copy_from_slice(
                &DatHeader {
                    segment_id: id,
                    created_unix: 0,
                }
                .encode(),
            );
            d.extend_from_slice(&self.dat);
            d
        };
        let mut idx = Vec::with_capacity(self.idx.len() + ENTRY_BYTES);
        if self.ctl & SEG_IDX_HEADER != 0 {
            idx.extend_from_slice(
                &IdxHeader {
                    segment_id: id,
                    first_seq: self.first_seq,
                }
                .encode(),
            );
        }
        let body_at = idx.len();
        idx.extend_from_slice(&self.idx);
        let body = &mut idx[body_at..];
        if self.ctl & SEG_FIX_PAYLOAD_CRCS != 0 {
            fix_payload_crcs(body, &dat);
        }
        if self.ctl & (SEG_FIX_ENTRY_CRCS | SEG_FIX_PAYLOAD_CRCS) != 0 {
            for slot in body.chunks_exact_mut(ENTRY_BYTES) {
                if is_entry(slot) {
                    fix_crc(slot, SALT_ENTRY);
                }
            }
        }
        if self.ctl & SEG_FIX_BATCH_CRCS != 0 {
            fix_batch_crcs(body);
        }
        (dat, idx)
    }

    /// Writes the segment's files into `dir` (which must exist) on `fs`.
    pub fn write(&self, fs: &MemFs, dir: &Path, id: SegmentId) -> (Vec<u8>, Vec<u8>) {
        let (dat, idx) = self.files(id);
        for (path, bytes) in [
            (segment::dat_path(dir, id), &dat),
            (segment::idx_path(dir, id), &idx),
        ] {
            let f = fs.create(&path).expect("create a file on MemFs");
            if !bytes.is_empty() {
                f.write_all_at(bytes, 0).expect("write to MemFs");
            }
        }
        (dat, idx)
    }
}

fn is_entry(slot: &[u8]) -> bool {
    slot.len() >= 4 && slot[..4] == ENTRY_MAGIC.to_le_bytes()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn fix_payload_crcs(body: &mut [u8], dat: &[u8]) {
    for slot in body.chunks_exact_mut(ENTRY_BYTES) {
        if !is_entry(slot) || slot[4] != KIND_WRITE {
            continue;
        }
        let len = u64_at(slot, 24);
        let off = u64_at(slot, 32);
        let range = usize::try_from(off)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, n)| dat.get(o..o.checked_add(n)?));
        if let Some(payload) = range {
            slot[40..44].copy_from_slice(&format::payload_crc(payload).to_le_bytes());
        }
    }
}

fn fix_batch_crcs(body: &mut [u8]) {
    let slots = body.len() / ENTRY_BYTES;
    for j in 0..slots {
        let at = j * ENTRY_BYTES;
        if !is_entry(&body[at..]) || body[at + 4] != KIND_BATCH_END {
            continue;
        }
        let Ok(count) = usize::try_from(u64_at(body, at + 24)) else {
            continue;
        };
        if count > j {
            continue;
        }
        let c = crc(SALT_BATCH, &body[at - count * ENTRY_BYTES..at]);
        body[at + 40..at + 44].copy_from_slice(&c.to_le_bytes());
        fix_crc(&mut body[at..at + ENTRY_BYTES], SALT_ENTRY);
    }
}
