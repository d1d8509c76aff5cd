//! On-disk structures of the extent store, as pure functions over bytes (docs/FORMAT.md).
//!
//! Every structure is fixed-size and little-endian, starts with a magic number and the
//! format version, and ends with a crc32 salted per structure type, so that a block of one
//! type can never validate as another. Decoders return a validated value or a
//! [`FormatError`]; nothing here panics or allocates more than its input's size.

use std::fmt;

/// Version of every on-disk structure written by this build. Bump on any change and keep
/// older versions readable (docs/FORMAT.md lists them).
pub const FORMAT_VERSION: u16 = 2;

/// Size of the header block at the start of every `.dat` file; payloads follow it.
pub const DAT_HEADER_BYTES: u64 = 4096;
/// Size of every `.idx` slot: the header slot and every entry.
pub const ENTRY_BYTES: usize = 64;
/// Largest payload of one write record. Longer writes become several records, which
/// bounds the work to verify a record's checksum on its first read.
pub const MAX_RECORD_BYTES: usize = 128 * 1024;
/// Payloads start at multiples of this; payloads whose length is a multiple of 4096 start
/// at multiples of 4096 so that they occupy whole pages (and whole file-system blocks,
/// which compaction can punch out).
pub const PAYLOAD_ALIGN_BYTES: u64 = 512;
pub const PAGE_BYTES: u64 = 4096;
/// Largest catalog body accepted when decoding.
pub const MAX_CATALOG_BYTES: u64 = 256 << 20;

pub const DAT_MAGIC: [u8; 8] = *b"BLKDDAT\0";
pub const IDX_MAGIC: [u8; 8] = *b"BLKDIDX\0";
pub const CATALOG_MAGIC: [u8; 8] = *b"BLKDCAT\0";
pub const LOG_MAGIC: [u8; 8] = *b"BLKDCLG\0";
pub const LOG_RECORD_MAGIC: [u8; 8] = *b"BLKDCLR\0";
/// First four bytes of every index entry ("BLKE").
pub const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"BLKE");

// Salts: the initial crc32 state per structure type.
const SALT_DAT_HEADER: u32 = 0x6461_7431;
const SALT_IDX_HEADER: u32 = 0x6964_7831;
const SALT_ENTRY: u32 = 0x656e_7431;
const SALT_PAYLOAD: u32 = 0x7061_7931;
const SALT_BATCH: u32 = 0x6261_7431;
const SALT_CATALOG_HEADER: u32 = 0x6361_7431;
const SALT_CATALOG_BODY: u32 = 0x6362_6431;
const SALT_LOG_HEADER: u32 = 0x636c_6731;
const SALT_LOG_RECORD_HEADER: u32 = 0x636c_7231;
const SALT_LOG_RECORD_BODY: u32 = 0x636c_6231;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_BATCH_BEGIN: u8 = 3;
const KIND_BATCH_END: u8 = 4;

const FLAG_IN_BATCH: u8 = 1 << 0;
const FLAG_KEEP_ALLOCATED: u8 = 1 << 1;
const FLAG_SEAL: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_IN_BATCH | FLAG_KEEP_ALLOCATED | FLAG_SEAL;

/// Why a structure did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    Truncated,
    BadMagic,
    /// Written by a newer blockd.
    UnsupportedVersion(u16),
    BadChecksum,
    /// Decoded, checksummed, but a field is impossible.
    Invalid(&'static str),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated => write!(f, "structure truncated"),
            FormatError::BadMagic => write!(f, "bad magic number"),
            FormatError::UnsupportedVersion(v) => write!(
                f,
                "format version {v} is newer than this blockd supports ({FORMAT_VERSION}); upgrade blockd"
            ),
            FormatError::BadChecksum => write!(f, "checksum mismatch"),
            FormatError::Invalid(what) => write!(f, "invalid field: {what}"),
        }
    }
}

impl std::error::Error for FormatError {}

fn crc(salt: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(salt);
    h.update(bytes);
    h.finalize()
}

/// Checksum of a write payload.
pub fn payload_crc(bytes: &[u8]) -> u32 {
    crc(SALT_PAYLOAD, bytes)
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn check_version(v: u16) -> Result<(), FormatError> {
    if v == 0 {
        Err(FormatError::Invalid("version 0"))
    } else if v > FORMAT_VERSION {
        Err(FormatError::UnsupportedVersion(v))
    } else {
        Ok(())
    }
}

/// Checks that bytes `from..to`, reserved (or unused by this kind of structure), are zero,
/// as every encoder writes them: a decoded value then re-encodes to exactly its bytes.
fn check_reserved(b: &[u8], from: usize, to: usize) -> Result<(), FormatError> {
    if b[from..to].iter().all(|&x| x == 0) {
        Ok(())
    } else {
        Err(FormatError::Invalid("reserved bytes are not zero"))
    }
}

// ---------------------------------------------------------------- file headers

/// The first 64 bytes of a `.dat` file (the rest of its 4096-byte header block is zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatHeader {
    pub segment_id: u64,
    pub created_unix: u64,
}

/// The first slot of an `.idx` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdxHeader {
    pub segment_id: u64,
    /// Sequence number the segment's first entry will carry.
    pub first_seq: u64,
}

fn encode_file_header(magic: [u8; 8], salt: u32, a: u64, b: u64) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    out[0..8].copy_from_slice(&magic);
    put_u16(&mut out, 8, FORMAT_VERSION);
    put_u64(&mut out, 16, a);
    put_u64(&mut out, 24, b);
    let c = crc(salt, &out[..60]);
    put_u32(&mut out, 60, c);
    out
}

fn decode_file_header(bytes: &[u8], magic: [u8; 8], salt: u32) -> Result<(u64, u64), FormatError> {
    let b = bytes.get(..ENTRY_BYTES).ok_or(FormatError::Truncated)?;
    if b[0..8] != magic {
        return Err(FormatError::BadMagic);
    }
    if crc(salt, &b[..60]) != get_u32(b, 60) {
        return Err(FormatError::BadChecksum);
    }
    check_version(get_u16(b, 8))?;
    check_reserved(b, 10, 16)?;
    check_reserved(b, 32, 60)?;
    Ok((get_u64(b, 16), get_u64(b, 24)))
}

impl DatHeader {
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        encode_file_header(
            DAT_MAGIC,
            SALT_DAT_HEADER,
            self.segment_id,
            self.created_unix,
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<DatHeader, FormatError> {
        let (segment_id, created_unix) = decode_file_header(bytes, DAT_MAGIC, SALT_DAT_HEADER)?;
        Ok(DatHeader {
            segment_id,
            created_unix,
        })
    }
}

impl IdxHeader {
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        encode_file_header(IDX_MAGIC, SALT_IDX_HEADER, self.segment_id, self.first_seq)
    }

    pub fn decode(bytes: &[u8]) -> Result<IdxHeader, FormatError> {
        let (segment_id, first_seq) = decode_file_header(bytes, IDX_MAGIC, SALT_IDX_HEADER)?;
        Ok(IdxHeader {
            segment_id,
            first_seq,
        })
    }
}

// ---------------------------------------------------------------- index entries

/// A record of the log: what happened to a range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `len` bytes at `logical` now hold the payload stored at `data_off` in the `.dat`.
    Write {
        seq: u64,
        logical: u64,
        len: u32,
        data_off: u64,
        data_crc: u32,
    },
    /// `len` bytes at `logical` now read as zeroes. Without `keep_allocated` the range is
    /// a hole (trim, or write-zeroes that may unmap); with it, allocated zeroes (NO_HOLE).
    Zero {
        seq: u64,
        logical: u64,
        len: u64,
        keep_allocated: bool,
    },
}

impl Record {
    pub fn seq(&self) -> u64 {
        match self {
            Record::Write { seq, .. } | Record::Zero { seq, .. } => *seq,
        }
    }

    pub fn logical(&self) -> (u64, u64) {
        match self {
            Record::Write { logical, len, .. } => (*logical, u64::from(*len)),
            Record::Zero { logical, len, .. } => (*logical, *len),
        }
    }
}

/// One decoded `.idx` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A record; `in_batch` tells a commit-batch copy from the provisional copy written
    /// when the record was appended.
    Record { record: Record, in_batch: bool },
    /// Opens a commit batch of `count` record copies with sequence numbers
    /// `first_seq..=last_seq`. A seal batch holds every record of its segment.
    BatchBegin {
        first_seq: u64,
        last_seq: u64,
        count: u32,
        seal: bool,
    },
    /// Closes a batch; `batch_crc` covers the encoded copies between begin and end.
    BatchEnd {
        first_seq: u64,
        last_seq: u64,
        count: u32,
        batch_crc: u32,
        seal: bool,
    },
}

fn finish_entry(mut out: [u8; ENTRY_BYTES]) -> [u8; ENTRY_BYTES] {
    put_u32(&mut out, 0, ENTRY_MAGIC);
    put_u16(&mut out, 6, FORMAT_VERSION);
    let c = crc(SALT_ENTRY, &out[..60]);
    put_u32(&mut out, 60, c);
    out
}

/// Encodes a record slot.
pub fn encode_record(r: &Record, in_batch: bool) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    let mut flags = if in_batch { FLAG_IN_BATCH } else { 0 };
    match *r {
        Record::Write {
            seq,
            logical,
            len,
            data_off,
            data_crc,
        } => {
            out[4] = KIND_WRITE;
            put_u64(&mut out, 8, seq);
            put_u64(&mut out, 16, logical);
            put_u64(&mut out, 24, u64::from(len));
            put_u64(&mut out, 32, data_off);
            put_u32(&mut out, 40, data_crc);
        }
        Record::Zero {
            seq,
            logical,
            len,
            keep_allocated,
        } => {
            out[4] = KIND_ZERO;
            if keep_allocated {
                flags |= FLAG_KEEP_ALLOCATED;
            }
            put_u64(&mut out, 8, seq);
            put_u64(&mut out, 16, logical);
            put_u64(&mut out, 24, len);
        }
    }
    out[5] = flags;
    finish_entry(out)
}

fn encode_batch_mark(
    kind: u8,
    first: u64,
    last: u64,
    count: u32,
    batch_crc: u32,
    seal: bool,
) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    out[4] = kind;
    out[5] = if seal { FLAG_SEAL } else { 0 };
    put_u64(&mut out, 8, first);
    put_u64(&mut out, 16, last);
    put_u64(&mut out, 24, u64::from(count));
    put_u32(&mut out, 40, batch_crc);
    finish_entry(out)
}

/// Encodes a whole commit batch: begin, a copy of every record, end.
pub fn encode_batch(records: &[Record], seal: bool) -> Vec<u8> {
    let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
    let first = records.first().map(Record::seq).unwrap_or(0);
    let last = records.last().map(Record::seq).unwrap_or(0);
    let mut out = Vec::with_capacity((records.len() + 2) * ENTRY_BYTES);
    out.extend_from_slice(&encode_batch_mark(
        KIND_BATCH_BEGIN,
        first,
        last,
        count,
        0,
        seal,
    ));
    let copies_at = out.len();
    for r in records {
        out.extend_from_slice(&encode_record(r, true));
    }
    let batch_crc = crc(SALT_BATCH, &out[copies_at..]);
    out.extend_from_slice(&encode_batch_mark(
        KIND_BATCH_END,
        first,
        last,
        count,
        batch_crc,
        seal,
    ));
    out
}

/// Checksum a batch end must carry for the given encoded copies.
pub fn batch_crc(copies: &[u8]) -> u32 {
    crc(SALT_BATCH, copies)
}

/// Decodes one slot. Every field is checked: a slot that decodes is internally consistent.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, FormatError> {
    let b = bytes.get(..ENTRY_BYTES).ok_or(FormatError::Truncated)?;
    if get_u32(b, 0) != ENTRY_MAGIC {
        return Err(FormatError::BadMagic);
    }
    if crc(SALT_ENTRY, &b[..60]) != get_u32(b, 60) {
        return Err(FormatError::BadChecksum);
    }
    check_version(get_u16(b, 6))?;
    let kind = b[4];
    let flags = b[5];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FormatError::Invalid("unknown entry flags"));
    }
    check_reserved(b, 44, 60)?;
    let in_batch = flags & FLAG_IN_BATCH != 0;
    let seq = get_u64(b, 8);
    match kind {
        KIND_WRITE => {
            let logical = get_u64(b, 16);
            let len = get_u64(b, 24);
            let data_off = get_u64(b, 32);
            if len == 0 || len > MAX_RECORD_BYTES as u64 {
                return Err(FormatError::Invalid("write length"));
            }
            if logical
                .checked_add(len)
                .is_none_or(|end| end > super::MAX_VOLUME_BYTES)
            {
                return Err(FormatError::Invalid(
                    "write range beyond the largest volume",
                ));
            }
            if data_off < DAT_HEADER_BYTES || !data_off.is_multiple_of(PAYLOAD_ALIGN_BYTES) {
                return Err(FormatError::Invalid("payload offset"));
            }
            if data_off.checked_add(len).is_none() {
                return Err(FormatError::Invalid("payload range overflows"));
            }
            if flags & (FLAG_KEEP_ALLOCATED | FLAG_SEAL) != 0 {
                return Err(FormatError::Invalid("flags on a write"));
            }
            let record = Record::Write {
                seq,
                logical,
                len: len as u32,
                data_off,
                data_crc: get_u32(b, 40),
            };
            Ok(Entry::Record { record, in_batch })
        }
        KIND_ZERO => {
            check_reserved(b, 32, 44)?;
            let logical = get_u64(b, 16);
            let len = get_u64(b, 24);
            if len == 0
                || logical
                    .checked_add(len)
                    .is_none_or(|end| end > super::MAX_VOLUME_BYTES)
            {
                return Err(FormatError::Invalid("zero range"));
            }
            if flags & FLAG_SEAL != 0 {
                return Err(FormatError::Invalid("seal flag on a record"));
            }
            let keep_allocated = flags & FLAG_KEEP_ALLOCATED != 0;
            Ok(Entry::Record {
                record: Record::Zero {
                    seq,
                    logical,
                    len,
                    keep_allocated,
                },
                in_batch,
            })
        }
        KIND_BATCH_BEGIN | KIND_BATCH_END => {
            if flags & (FLAG_IN_BATCH | FLAG_KEEP_ALLOCATED) != 0 {
                return Err(FormatError::Invalid("flags on a batch mark"));
            }
            // Unused: bytes 32..40, and 40..44 too in a begin (only an end has a checksum).
            check_reserved(b, 32, if kind == KIND_BATCH_BEGIN { 44 } else { 40 })?;
            let first_seq = seq;
            let last_seq = get_u64(b, 16);
            let count = get_u64(b, 24);
            let count = u32::try_from(count).map_err(|_| FormatError::Invalid("batch count"))?;
            if count > 0 && last_seq.checked_sub(first_seq) != Some(u64::from(count) - 1) {
                return Err(FormatError::Invalid(
                    "batch sequence range does not match its count",
                ));
            }
            let seal = flags & FLAG_SEAL != 0;
            Ok(if kind == KIND_BATCH_BEGIN {
                Entry::BatchBegin {
                    first_seq,
                    last_seq,
                    count,
                    seal,
                }
            } else {
                Entry::BatchEnd {
                    first_seq,
                    last_seq,
                    count,
                    batch_crc: get_u32(b, 40),
                    seal,
                }
            })
        }
        _ => Err(FormatError::Invalid("unknown entry kind")),
    }
}

/// Where a payload of `len` bytes goes if the `.dat` tail is at `tail`.
pub fn payload_offset(tail: u64, len: u64) -> u64 {
    let align = if len.is_multiple_of(PAGE_BYTES) {
        PAGE_BYTES
    } else {
        PAYLOAD_ALIGN_BYTES
    };
    tail.max(DAT_HEADER_BYTES).next_multiple_of(align)
}

// ---------------------------------------------------------------- catalog envelope

/// The 64-byte header in front of the catalog's JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogHeader {
    pub generation: u64,
    pub body_len: u64,
    pub body_crc: u32,
}

pub const CATALOG_HEADER_BYTES: usize = 64;

/// A 64-byte header (magic, version, generation, body length, body checksum, header
/// checksum) followed by the body: the catalog file and each catalog log record.
fn encode_envelope(magic: [u8; 8], salts: (u32, u32), generation: u64, body: &[u8]) -> Vec<u8> {
    let (salt_header, salt_body) = salts;
    let mut out = vec![0u8; CATALOG_HEADER_BYTES];
    out[0..8].copy_from_slice(&magic);
    put_u16(&mut out, 8, FORMAT_VERSION);
    put_u64(&mut out, 16, generation);
    put_u64(&mut out, 24, body.len() as u64);
    put_u32(&mut out, 32, crc(salt_body, body));
    let c = crc(salt_header, &out[..60]);
    put_u32(&mut out, 60, c);
    out.extend_from_slice(body);
    out
}

/// Encodes the catalog file: header then body.
pub fn encode_catalog(generation: u64, body: &[u8]) -> Vec<u8> {
    encode_envelope(
        CATALOG_MAGIC,
        (SALT_CATALOG_HEADER, SALT_CATALOG_BODY),
        generation,
        body,
    )
}

/// Verifies the header of an envelope ([`encode_envelope`]); returns (generation, body
/// length). The body's checksum is at bytes 32..36 of the header.
fn decode_envelope_header(
    h: &[u8],
    magic: [u8; 8],
    salt_header: u32,
) -> Result<(u64, u64), FormatError> {
    let h = h
        .get(..CATALOG_HEADER_BYTES)
        .ok_or(FormatError::Truncated)?;
    if h[0..8] != magic {
        return Err(FormatError::BadMagic);
    }
    if crc(salt_header, &h[..60]) != get_u32(h, 60) {
        return Err(FormatError::BadChecksum);
    }
    check_version(get_u16(h, 8))?;
    check_reserved(h, 10, 16)?;
    check_reserved(h, 36, 60)?;
    let len = get_u64(h, 24);
    if len > MAX_CATALOG_BYTES {
        return Err(FormatError::Invalid("catalog body length"));
    }
    Ok((get_u64(h, 16), len))
}

/// Decodes and verifies the catalog file; returns the generation and the body.
pub fn decode_catalog(bytes: &[u8]) -> Result<(u64, &[u8]), FormatError> {
    let (generation, len) = decode_envelope_header(bytes, CATALOG_MAGIC, SALT_CATALOG_HEADER)?;
    let h = &bytes[..CATALOG_HEADER_BYTES];
    let body = bytes
        .get(CATALOG_HEADER_BYTES..CATALOG_HEADER_BYTES + len as usize)
        .ok_or(FormatError::Truncated)?;
    if crc(SALT_CATALOG_BODY, body) != get_u32(h, 32) {
        return Err(FormatError::BadChecksum);
    }
    Ok((generation, body))
}

// ---------------------------------------------------------------- catalog log

/// The catalog log (`catalog.log`, format version 2) is written in units of this size: its
/// header fills the first one and every record starts at a multiple of it. A disk writes a
/// sector whole or not at all, which is what tells a torn record from a damaged one.
pub const LOG_SECTOR_BYTES: usize = 512;
/// A record starts with the same 64-byte header as the catalog file ([`encode_envelope`]).
const LOG_RECORD_HEADER_BYTES: usize = CATALOG_HEADER_BYTES;

/// The log's first sector: the catalog generation its first record follows.
pub fn encode_log_header(base_generation: u64) -> Vec<u8> {
    let mut out = vec![0u8; LOG_SECTOR_BYTES];
    out[..ENTRY_BYTES].copy_from_slice(&encode_file_header(
        LOG_MAGIC,
        SALT_LOG_HEADER,
        base_generation,
        0,
    ));
    out
}

/// One record: a 64-byte header, the JSON body, and spaces up to the next sector boundary
/// (so that no sector of a record is all zeroes, as a sector that never reached the disk
/// is).
pub fn encode_log_record(generation: u64, body: &[u8]) -> Vec<u8> {
    let mut out = encode_envelope(
        LOG_RECORD_MAGIC,
        (SALT_LOG_RECORD_HEADER, SALT_LOG_RECORD_BODY),
        generation,
        body,
    );
    let end = out.len().next_multiple_of(LOG_SECTOR_BYTES);
    out.resize(end, b' ');
    out
}

/// A record header that checks out: (generation, body length).
fn decode_log_record_header(h: &[u8]) -> Result<(u64, u64), FormatError> {
    decode_envelope_header(h, LOG_RECORD_MAGIC, SALT_LOG_RECORD_HEADER)
}

/// What a scan of the catalog log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogScan<'a> {
    pub base_generation: u64,
    /// (generation, JSON body) of every intact record, in order; generations are
    /// consecutive from `base_generation + 1`.
    pub records: Vec<(u64, &'a [u8])>,
    /// Offset just past the last intact record: where the next record goes.
    pub end: u64,
    /// Offset of a torn record cut from the end (written, never completed by its sync).
    pub torn_at: Option<u64>,
}

/// Where the log is damaged and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDamage {
    pub offset: u64,
    pub error: FormatError,
}

impl fmt::Display for LogDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at offset {}: {}", self.offset, self.error)
    }
}

fn zero_sector(bytes: &[u8], at: usize) -> bool {
    bytes[at..(at + LOG_SECTOR_BYTES).min(bytes.len())]
        .iter()
        .all(|&b| b == 0)
}

/// Reads the catalog log. Records are read while they are intact; the log ends at the
/// first all-zero sector (the rest of the preallocated file). A record with a valid header
/// whose body or padding fails and one of whose sectors is all zeroes was torn by a crash
/// before its sync completed (its change was never acknowledged): the log ends there.
/// Anything else that fails is damage, as is an intact record header anywhere after the
/// end: the caller must refuse the log rather than lose a change it acknowledged.
pub fn scan_log(bytes: &[u8]) -> Result<LogScan<'_>, LogDamage> {
    let damage = |offset: usize, error| LogDamage {
        offset: offset as u64,
        error,
    };
    let head = bytes
        .get(..LOG_SECTOR_BYTES)
        .ok_or(damage(0, FormatError::Truncated))?;
    let (base_generation, zero) =
        decode_file_header(head, LOG_MAGIC, SALT_LOG_HEADER).map_err(|e| damage(0, e))?;
    if zero != 0 || !head[ENTRY_BYTES..].iter().all(|&b| b == 0) {
        return Err(damage(
            0,
            FormatError::Invalid("reserved bytes are not zero"),
        ));
    }
    let mut scan = LogScan {
        base_generation,
        records: Vec::new(),
        end: LOG_SECTOR_BYTES as u64,
        torn_at: None,
    };
    let mut p = LOG_SECTOR_BYTES;
    let mut next_gen = base_generation.wrapping_add(1);
    let mut rest_from = bytes.len();
    while p < bytes.len() {
        if zero_sector(bytes, p) {
            rest_from = p + LOG_SECTOR_BYTES;
            break;
        }
        let h = bytes
            .get(p..p + LOG_RECORD_HEADER_BYTES)
            .ok_or(damage(p, FormatError::Truncated))?;
        // A header sector is written whole or not at all: a bad one is damage.
        let (generation, len) = decode_log_record_header(h).map_err(|e| damage(p, e))?;
        if generation != next_gen {
            return Err(damage(
                p,
                FormatError::Invalid("catalog log generations are not consecutive"),
            ));
        }
        let body_at = p + LOG_RECORD_HEADER_BYTES;
        let span = (LOG_RECORD_HEADER_BYTES + len as usize).next_multiple_of(LOG_SECTOR_BYTES);
        let intact = bytes.get(body_at..p + span).and_then(|b| {
            let (body, pad) = b.split_at(len as usize);
            (crc(SALT_LOG_RECORD_BODY, body) == get_u32(h, 32) && pad.iter().all(|&c| c == b' '))
                .then_some(body)
        });
        match intact {
            Some(body) => {
                scan.records.push((generation, body));
                p += span;
                scan.end = p as u64;
                next_gen = next_gen.wrapping_add(1);
            }
            None => {
                let torn = p + span > bytes.len()
                    || (p..p + span)
                        .step_by(LOG_SECTOR_BYTES)
                        .any(|s| zero_sector(bytes, s));
                if !torn {
                    return Err(damage(p, FormatError::BadChecksum));
                }
                scan.torn_at = Some(p as u64);
                rest_from = p + LOG_SECTOR_BYTES;
                break;
            }
        }
    }
    // Past the end only zeroes and sectors of the torn record may follow, never a record.
    let mut q = rest_from.next_multiple_of(LOG_SECTOR_BYTES);
    while q + LOG_RECORD_HEADER_BYTES <= bytes.len() {
        if decode_log_record_header(&bytes[q..q + LOG_RECORD_HEADER_BYTES]).is_ok() {
            return Err(damage(
                q,
                FormatError::Invalid("a record follows the end of the catalog log"),
            ));
        }
        q += LOG_SECTOR_BYTES;
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_beyond_the_largest_volume_are_invalid() {
        let max = crate::store::MAX_VOLUME_BYTES;
        let write = |logical| Record::Write {
            seq: 1,
            logical,
            len: 4096,
            data_off: 8192,
            data_crc: 0,
        };
        let zero = |logical, len| Record::Zero {
            seq: 1,
            logical,
            len,
            keep_allocated: false,
        };
        for ok in [write(max - 4096), zero(0, max)] {
            assert!(decode_entry(&encode_record(&ok, false)).is_ok(), "{ok:?}");
        }
        // The fuzz finding: a zero range ending at 2^64 - 1.
        for bad in [write(max - 4095), zero(1, max), zero(u64::MAX - 10, 10)] {
            assert!(
                decode_entry(&encode_record(&bad, false)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn records_round_trip_and_any_flipped_bit_is_caught() {
        let records = [
            Record::Write {
                seq: 7,
                logical: 4096,
                len: 4096,
                data_off: 8192,
                data_crc: 0xdead_beef,
            },
            Record::Zero {
                seq: 8,
                logical: 0,
                len: 1 << 40,
                keep_allocated: true,
            },
            Record::Zero {
                seq: 9,
                logical: 5,
                len: 3,
                keep_allocated: false,
            },
        ];
        for r in records {
            for in_batch in [false, true] {
                let slot = encode_record(&r, in_batch);
                assert_eq!(
                    decode_entry(&slot),
                    Ok(Entry::Record {
                        record: r,
                        in_batch
                    })
                );
                for bit in 0..ENTRY_BYTES * 8 {
                    let mut bad = slot;
                    bad[bit / 8] ^= 1 << (bit % 8);
                    assert!(decode_entry(&bad).is_err(), "bit {bit} of {r:?}");
                }
            }
        }
    }

    #[test]
    fn salts_keep_structure_types_apart() {
        let h = DatHeader {
            segment_id: 3,
            created_unix: 9,
        }
        .encode();
        assert_eq!(IdxHeader::decode(&h), Err(FormatError::BadMagic));
        assert!(decode_entry(&h).is_err());
        let mut relabelled = h;
        relabelled[0..8].copy_from_slice(&IDX_MAGIC);
        assert_eq!(
            IdxHeader::decode(&relabelled),
            Err(FormatError::BadChecksum)
        );
    }

    #[test]
    fn batches_round_trip() {
        let rs: Vec<Record> = (10..14)
            .map(|seq| Record::Zero {
                seq,
                logical: seq * 512,
                len: 512,
                keep_allocated: false,
            })
            .collect();
        let b = encode_batch(&rs, true);
        assert_eq!(b.len(), 6 * ENTRY_BYTES);
        assert_eq!(
            decode_entry(&b[..64]),
            Ok(Entry::BatchBegin {
                first_seq: 10,
                last_seq: 13,
                count: 4,
                seal: true
            })
        );
        let copies = &b[64..5 * 64];
        match decode_entry(&b[5 * 64..]) {
            Ok(Entry::BatchEnd {
                count: 4,
                batch_crc,
                ..
            }) => assert_eq!(batch_crc, batch_crc_of(copies)),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn batch_crc_of(copies: &[u8]) -> u32 {
        batch_crc(copies)
    }

    #[test]
    fn newer_versions_are_refused_with_a_clear_error() {
        let mut slot = encode_record(
            &Record::Zero {
                seq: 1,
                logical: 0,
                len: 1,
                keep_allocated: false,
            },
            false,
        );
        put_u16(&mut slot, 6, FORMAT_VERSION + 1);
        let c = crc(SALT_ENTRY, &slot[..60]);
        put_u32(&mut slot, 60, c);
        let e = decode_entry(&slot).expect_err("newer version");
        assert!(e.to_string().contains("upgrade blockd"), "{e}");
    }

    #[test]
    fn catalog_envelope_detects_damage() {
        let body = br#"{"volumes":[]}"#;
        let file = encode_catalog(42, body);
        assert_eq!(decode_catalog(&file), Ok((42, &body[..])));
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode_catalog(&bad), Err(FormatError::BadChecksum));
        assert_eq!(decode_catalog(&file[..70]), Err(FormatError::Truncated));
    }

    fn log_of(records: &[(u64, Vec<u8>)], base: u64, capacity: usize) -> Vec<u8> {
        let mut log = encode_log_header(base);
        for (g, body) in records {
            log.extend_from_slice(&encode_log_record(*g, body));
        }
        log.resize(capacity, 0);
        log
    }

    #[test]
    fn catalog_log_round_trips_and_ends_at_zeroes() {
        let long = vec![b'x'; 1500];
        let log = log_of(&[(8, b"{}".to_vec()), (9, long.clone())], 7, 8192);
        let scan = scan_log(&log).expect("valid log");
        assert_eq!(scan.base_generation, 7);
        assert_eq!(scan.records, vec![(8, &b"{}"[..]), (9, &long[..])]);
        assert_eq!(scan.end, 512 + 512 + 2048);
        assert_eq!(scan.torn_at, None);
        let empty = log_of(&[], 3, 4096);
        assert_eq!(scan_log(&empty).expect("empty log").records, vec![]);
    }

    #[test]
    fn catalog_log_tells_a_torn_record_from_a_damaged_one() {
        let long = vec![b'x'; 1500];
        let log = log_of(&[(8, b"{}".to_vec()), (9, long)], 7, 8192);
        // Torn: the last record's third sector never reached the disk.
        let mut torn = log.clone();
        torn[2048..2560].fill(0);
        let scan = scan_log(&torn).expect("a torn tail is not damage");
        assert_eq!(scan.records.len(), 1);
        assert_eq!((scan.end, scan.torn_at), (1024, Some(1024)));
        // Torn the other way: its first sector is missing, later ones arrived.
        let mut torn = log.clone();
        torn[1024..1536].fill(0);
        assert_eq!(scan_log(&torn).expect("torn").records.len(), 1);
        // A flipped bit in a body whose sectors all arrived: damage, at that record.
        let mut bad = log.clone();
        bad[1700] ^= 1;
        assert_eq!(scan_log(&bad).map(|_| ()).expect_err("damage").offset, 1024);
        // A flipped bit in a header: damage.
        let mut bad = log.clone();
        bad[512 + 20] ^= 1;
        assert_eq!(scan_log(&bad).map(|_| ()).expect_err("damage").offset, 512);
        // The first record lost its header sector but the second is intact: damage.
        let mut bad = log.clone();
        bad[512..1024].fill(0);
        assert_eq!(scan_log(&bad).map(|_| ()).expect_err("damage").offset, 1024);
        // Generations must follow the base.
        let gap = log_of(&[(8, b"{}".to_vec()), (10, b"{}".to_vec())], 7, 4096);
        assert!(scan_log(&gap).is_err());
        assert!(scan_log(&log[..100]).is_err());
    }

    #[test]
    fn payloads_are_aligned() {
        assert_eq!(payload_offset(0, 4096), 4096);
        assert_eq!(payload_offset(4096 + 512, 4096), 8192);
        assert_eq!(payload_offset(4096 + 512, 100), 4096 + 512);
        assert_eq!(payload_offset(4096 + 513, 100), 4096 + 1024);
    }
}
