//! The store's fixed-size on-disk structures: `.idx` entries (`decode_entry`), the `.dat`
//! header (`DatHeader::decode`) and the `.idx` header (`IdxHeader::decode`), on 64-byte
//! windows of the input.
//!
//! The first input byte is a control byte:
//! - bit 0: windows at every byte offset instead of every 64 bytes;
//! - bit 1: before decoding, put each decoder's magic and the format version in the window;
//! - bit 2: before decoding, fix the window's checksum for each decoder's salt (the fuzzer
//!   cannot solve crc32; this lets it explore the field checks behind the checksum);
//! - bit 3: also read each window as record fields, encode them with `encode_record` and
//!   decode that.
//!
//! Properties: no panic; only the first 64 bytes matter; an error names the first check
//! that fails, in the documented order (magic, checksum, version, fields); every decoded
//! value obeys the documented field rules and re-encodes (`encode_record`, `encode`, the
//! batch layout checked against `encode_batch`) to exactly the window; `encode_record`
//! output decodes to the same record exactly when its fields are valid.
#![no_main]

use blockd::store::format::{
    DAT_HEADER_BYTES, DAT_MAGIC, DatHeader, ENTRY_BYTES, ENTRY_MAGIC, Entry, FORMAT_VERSION,
    FormatError, IDX_MAGIC, IdxHeader, MAX_RECORD_BYTES, PAYLOAD_ALIGN_BYTES, Record, batch_crc,
    decode_entry, encode_batch, encode_record,
};
use libfuzzer_sys::fuzz_target;
use store_fuzz::{
    Budget, Counting, KIND_BATCH_BEGIN, KIND_BATCH_END, SALT_DAT_HEADER, SALT_ENTRY,
    SALT_IDX_HEADER, crc, fix_crc, spec_mark, stored_crc,
};

#[global_allocator]
static ALLOC: Counting = Counting;

const EVERY_OFFSET: u8 = 1 << 0;
const FORCE_MAGIC: u8 = 1 << 1;
const FIX_CRC: u8 = 1 << 2;
const ENCODE_FIELDS: u8 = 1 << 3;

/// Windows per input: bounds the work of one run (many short runs explore faster).
const MAX_WINDOWS: usize = 128;

type Window = [u8; ENTRY_BYTES];

fuzz_target!(|data: &[u8]| {
    let budget = Budget::start();
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    // Anything shorter than a slot is truncated, whatever it holds.
    let short = &rest[..rest.len().min(ENTRY_BYTES - 1)];
    assert_eq!(decode_entry(short), Err(FormatError::Truncated));
    assert_eq!(DatHeader::decode(short), Err(FormatError::Truncated));
    assert_eq!(IdxHeader::decode(short), Err(FormatError::Truncated));

    let stride = if ctl & EVERY_OFFSET != 0 {
        1
    } else {
        ENTRY_BYTES
    };
    let last = rest.len().saturating_sub(ENTRY_BYTES);
    if rest.len() >= ENTRY_BYTES {
        for at in (0..=last).step_by(stride).take(MAX_WINDOWS) {
            let raw: Window = rest[at..at + ENTRY_BYTES]
                .try_into()
                .expect("a 64-byte window");
            // What follows a window must not matter: decode it with up to 64 more bytes.
            let tail = &rest[at + ENTRY_BYTES..rest.len().min(at + 2 * ENTRY_BYTES)];
            check_entry(
                prepare(raw, ctl, &ENTRY_MAGIC.to_le_bytes(), 6, SALT_ENTRY),
                tail,
            );
            check_header(
                prepare(raw, ctl, &DAT_MAGIC, 8, SALT_DAT_HEADER),
                tail,
                Kind::Dat,
            );
            check_header(
                prepare(raw, ctl, &IDX_MAGIC, 8, SALT_IDX_HEADER),
                tail,
                Kind::Idx,
            );
            if ctl & ENCODE_FIELDS != 0 {
                check_encode_fields(&raw);
            }
        }
    }
    // Decoding allocates nothing; the windows are on the stack.
    budget.check(4096, "store_records");
});

/// Applies the control byte's repairs for one decoder (magic, version at `version_at`,
/// checksum salt).
fn prepare(mut w: Window, ctl: u8, magic: &[u8], version_at: usize, salt: u32) -> Window {
    if ctl & FORCE_MAGIC != 0 {
        w[..magic.len()].copy_from_slice(magic);
        w[version_at..version_at + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    }
    if ctl & FIX_CRC != 0 {
        fix_crc(&mut w, salt);
    }
    w
}

/// The window followed by `tail` (at most 64 bytes), in a stack buffer.
struct WithTail {
    buf: [u8; 2 * ENTRY_BYTES],
    len: usize,
}

impl WithTail {
    fn new(w: &Window, tail: &[u8]) -> WithTail {
        let mut buf = [0u8; 2 * ENTRY_BYTES];
        buf[..ENTRY_BYTES].copy_from_slice(w);
        buf[ENTRY_BYTES..ENTRY_BYTES + tail.len()].copy_from_slice(tail);
        WithTail {
            buf,
            len: ENTRY_BYTES + tail.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The window as this version writes it: an older structure (still readable) re-encodes
/// with the current version number, and so with a different checksum.
fn as_current(w: &Window, version_at: usize, salt: u32) -> Window {
    let mut out = *w;
    out[version_at..version_at + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let c = crc(salt, &out[..60]);
    out[60..64].copy_from_slice(&c.to_le_bytes());
    out
}

/// The documented order of checks shared by every structure: magic, checksum, version.
fn check_envelope_error(e: &FormatError, magic_ok: bool, crc_ok: bool, version: u16) {
    match e {
        FormatError::Truncated => panic!("a full 64-byte window reported truncated"),
        FormatError::BadMagic => assert!(!magic_ok, "BadMagic with the right magic"),
        FormatError::BadChecksum => {
            assert!(
                magic_ok && !crc_ok,
                "BadChecksum: magic {magic_ok}, crc {crc_ok}"
            )
        }
        FormatError::UnsupportedVersion(v) => {
            assert!(
                magic_ok && crc_ok,
                "version checked before magic or checksum"
            );
            assert_eq!(*v, version);
            assert!(*v > FORMAT_VERSION);
        }
        FormatError::Invalid(_) => {
            assert!(
                magic_ok && crc_ok,
                "fields checked before magic or checksum"
            );
            assert!(
                version <= FORMAT_VERSION,
                "fields of an unsupported version {version} were judged"
            );
        }
    }
    if magic_ok && crc_ok && (1..=FORMAT_VERSION).contains(&version) {
        assert!(
            matches!(e, FormatError::Invalid(_)),
            "well-formed envelope refused with {e:?}"
        );
    }
}

fn check_entry(w: Window, tail: &[u8]) {
    let decoded = decode_entry(&w);
    assert_eq!(decode_entry(WithTail::new(&w, tail).bytes()), decoded);
    let magic_ok = w[..4] == ENTRY_MAGIC.to_le_bytes();
    let crc_ok = crc(SALT_ENTRY, &w[..60]) == stored_crc(&w);
    let version = u16_at(&w, 6);
    let entry = match decoded {
        Ok(e) => e,
        Err(e) => return check_envelope_error(&e, magic_ok, crc_ok, version),
    };
    assert!(magic_ok && crc_ok && (1..=FORMAT_VERSION).contains(&version));
    let w = as_current(&w, 6, SALT_ENTRY);
    match entry {
        Entry::Record { record, in_batch } => {
            check_record(&record);
            assert_eq!(
                encode_record(&record, in_batch),
                w,
                "{record:?} (in_batch {in_batch}) does not re-encode to its slot"
            );
        }
        Entry::BatchBegin {
            first_seq,
            last_seq,
            count,
            seal,
        } => {
            check_mark(first_seq, last_seq, count);
            assert_eq!(w[4], KIND_BATCH_BEGIN);
            assert_eq!(
                spec_mark(KIND_BATCH_BEGIN, first_seq, last_seq, count, 0, seal),
                w,
                "{entry:?} does not re-encode to its slot"
            );
            // The same begin slot as encode_batch writes for that range.
            if count <= 4 && (count > 0 || first_seq == 0 && last_seq == 0) {
                let b = encode_batch(&zero_records(first_seq, count), seal);
                assert_eq!(b[..ENTRY_BYTES], w, "encode_batch disagrees with {entry:?}");
            }
        }
        Entry::BatchEnd {
            first_seq,
            last_seq,
            count,
            batch_crc: c,
            seal,
        } => {
            check_mark(first_seq, last_seq, count);
            assert_eq!(w[4], KIND_BATCH_END);
            assert_eq!(
                spec_mark(KIND_BATCH_END, first_seq, last_seq, count, c, seal),
                w,
                "{entry:?} does not re-encode to its slot"
            );
            if count <= 4 && (count > 0 || first_seq == 0 && last_seq == 0) {
                let b = encode_batch(&zero_records(first_seq, count), seal);
                let end_at = b.len() - ENTRY_BYTES;
                let copies_crc = batch_crc(&b[ENTRY_BYTES..end_at]);
                let expected =
                    spec_mark(KIND_BATCH_END, first_seq, last_seq, count, copies_crc, seal);
                assert_eq!(b[end_at..], expected, "encode_batch end slot layout");
            }
        }
    }
}

fn zero_records(first_seq: u64, count: u32) -> Vec<Record> {
    (0..u64::from(count))
        .map(|k| Record::Zero {
            seq: first_seq + k,
            logical: k,
            len: 1,
            keep_allocated: false,
        })
        .collect()
}

fn check_mark(first: u64, last: u64, count: u32) {
    if count > 0 {
        assert_eq!(last.checked_sub(first), Some(u64::from(count) - 1));
    }
}

/// The documented field rules of a decoded record.
fn check_record(r: &Record) {
    match *r {
        Record::Write {
            logical,
            len,
            data_off,
            ..
        } => {
            assert!(len > 0 && len as usize <= MAX_RECORD_BYTES, "{r:?}");
            assert!(within_volume(logical, u64::from(len)), "{r:?}");
            assert!(data_off >= DAT_HEADER_BYTES, "{r:?}");
            assert!(data_off.is_multiple_of(PAYLOAD_ALIGN_BYTES), "{r:?}");
            assert!(data_off.checked_add(u64::from(len)).is_some(), "{r:?}");
        }
        Record::Zero { logical, len, .. } => {
            assert!(len > 0 && within_volume(logical, len), "{r:?}");
        }
    }
    let (logical, len) = r.logical();
    assert!(len > 0 && within_volume(logical, len));
}

/// A record's range ends at or before the largest volume (16 TiB).
fn within_volume(logical: u64, len: u64) -> bool {
    logical
        .checked_add(len)
        .is_some_and(|end| end <= blockd::store::MAX_VOLUME_BYTES)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dat,
    Idx,
}

fn check_header(w: Window, tail: &[u8], kind: Kind) {
    let (magic, salt) = match kind {
        Kind::Dat => (DAT_MAGIC, SALT_DAT_HEADER),
        Kind::Idx => (IDX_MAGIC, SALT_IDX_HEADER),
    };
    let magic_ok = w[..8] == magic;
    let crc_ok = crc(salt, &w[..60]) == stored_crc(&w);
    let version = u16_at(&w, 8);
    let (decoded, again, encoded) = match kind {
        Kind::Dat => {
            let d = DatHeader::decode(&w);
            let again = DatHeader::decode(WithTail::new(&w, tail).bytes()) == d;
            (d.clone().map(|_| ()), again, d.ok().map(|h| h.encode()))
        }
        Kind::Idx => {
            let d = IdxHeader::decode(&w);
            let again = IdxHeader::decode(WithTail::new(&w, tail).bytes()) == d;
            (d.clone().map(|_| ()), again, d.ok().map(|h| h.encode()))
        }
    };
    assert!(
        again,
        "{kind:?} header: bytes after the first 64 changed the result"
    );
    match decoded {
        Err(e) => check_envelope_error(&e, magic_ok, crc_ok, version),
        Ok(()) => {
            assert!(magic_ok && crc_ok && (1..=FORMAT_VERSION).contains(&version));
            let encoded = encoded.expect("decoded, so encoded");
            assert_eq!(
                encoded,
                as_current(&w, 8, salt),
                "{kind:?} header does not re-encode to its bytes"
            );
        }
    }
}

/// Reads the window as record fields, encodes them, and checks that the decoder accepts
/// exactly the records whose fields are valid, and returns them unchanged.
fn check_encode_fields(w: &Window) {
    let u64_at = |at: usize| u64::from_le_bytes(w[at..at + 8].try_into().expect("8 bytes"));
    let in_batch = w[0] & 1 != 0;
    let record = if w[0] & 2 != 0 {
        Record::Zero {
            seq: u64_at(8),
            logical: u64_at(16),
            len: u64_at(24),
            keep_allocated: w[0] & 4 != 0,
        }
    } else {
        // Small lengths and offsets are what valid writes have; keep them likely.
        let len = u32::from_le_bytes(w[1..5].try_into().expect("4 bytes"));
        let len = if w[0] & 8 != 0 {
            len % (2 * MAX_RECORD_BYTES as u32)
        } else {
            len
        };
        let data_off = u64_at(32);
        let data_off = if w[0] & 16 != 0 {
            data_off % (1 << 20)
        } else {
            data_off
        };
        Record::Write {
            seq: u64_at(8),
            logical: u64_at(16),
            len,
            data_off,
            data_crc: u32::from_le_bytes(w[40..44].try_into().expect("4 bytes")),
        }
    };
    let (logical, len) = record.logical();
    let valid = len > 0
        && within_volume(logical, len)
        && match record {
            Record::Write { data_off, .. } => {
                len as usize <= MAX_RECORD_BYTES
                    && data_off >= DAT_HEADER_BYTES
                    && data_off.is_multiple_of(PAYLOAD_ALIGN_BYTES)
                    && data_off.checked_add(len).is_some()
            }
            Record::Zero { .. } => true,
        };
    let slot = encode_record(&record, in_batch);
    match decode_entry(&slot) {
        Ok(e) => {
            assert!(valid, "invalid {record:?} was accepted");
            assert_eq!(e, Entry::Record { record, in_batch });
        }
        Err(FormatError::Invalid(_)) => assert!(!valid, "valid {record:?} was refused"),
        Err(e) => panic!("encode_record output of {record:?} gave {e:?}"),
    }
    // A record slot never passes for a batch mark or a header, nor the reverse.
    assert!(DatHeader::decode(&slot).is_err() && IdxHeader::decode(&slot).is_err());
}
