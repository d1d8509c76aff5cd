//! The catalog file: `decode_catalog` (checksummed envelope), then the JSON body
//! (`serde_json::from_slice::<Catalog>`), then `Catalog::validate`, as `Ctx::open` does.
//!
//! The first input byte picks what the rest is:
//! - even: the whole catalog file;
//! - odd: the JSON body, put in a valid envelope with `encode_catalog` (the generation is
//!   the control byte), so that the fuzzer explores the JSON without solving checksums.
//!
//! Properties: no panic; heap growth bounded by a multiple of the input size (the body
//! length in the header is never trusted for an allocation); the envelope returns exactly
//! the body bytes its header describes and round-trips through `encode_catalog`; a parsed
//! catalog round-trips through JSON; a catalog that validates has unique segment ids below
//! `next_segment_id`, unique object ids and volume names, and parents that exist.
#![no_main]

use std::collections::HashSet;

use blockd::store::catalog::Catalog;
use blockd::store::format::{
    CATALOG_HEADER_BYTES, CATALOG_MAGIC, FORMAT_VERSION, FormatError, MAX_CATALOG_BYTES,
    decode_catalog, encode_catalog,
};
use libfuzzer_sys::fuzz_target;
use store_fuzz::{Budget, Counting, SALT_CATALOG_BODY, SALT_CATALOG_HEADER, crc, stored_crc};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let budget = Budget::start();
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let wrapped;
    let file: &[u8] = if ctl & 1 != 0 {
        wrapped = encode_catalog(u64::from(ctl), rest);
        &wrapped
    } else {
        rest
    };
    let body = match decode_catalog(file) {
        Ok((generation, body)) => {
            check_envelope(file, generation, body);
            body
        }
        Err(e) => {
            check_error(file, &e);
            return budget.check(4 * data.len() + 4096, "decode_catalog error");
        }
    };
    let Ok(cat) = serde_json::from_slice::<Catalog>(body) else {
        return budget.check(16 * data.len() + 64 * 1024, "catalog JSON error");
    };
    let json = serde_json::to_vec(&cat).expect("a parsed catalog encodes");
    let again: Catalog = serde_json::from_slice(&json).expect("its encoding parses");
    assert_eq!(again, cat, "catalog does not round-trip through JSON");
    if cat.validate().is_ok() {
        check_valid(&cat);
    }
    // JSON numbers are at least one byte each and become 8-byte integers in vectors that
    // grow by doubling; strings and records cost a small multiple of their text.
    budget.check(64 * data.len() + 64 * 1024, "catalog");
});

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_envelope(file: &[u8], generation: u64, body: &[u8]) {
    let h = &file[..CATALOG_HEADER_BYTES];
    assert_eq!(h[..8], CATALOG_MAGIC);
    assert_eq!(crc(SALT_CATALOG_HEADER, &h[..60]), stored_crc(h));
    assert!((1..=FORMAT_VERSION).contains(&u16::from_le_bytes([h[8], h[9]])));
    assert_eq!(generation, u64_at(h, 16));
    let len = u64_at(h, 24);
    assert!(len <= MAX_CATALOG_BYTES);
    assert_eq!(body.len() as u64, len);
    assert_eq!(
        body.as_ptr(),
        file[CATALOG_HEADER_BYTES..].as_ptr(),
        "body is not the bytes after the header"
    );
    assert_eq!(
        crc(SALT_CATALOG_BODY, body),
        u32::from_le_bytes(h[32..36].try_into().expect("4 bytes"))
    );
    let again = encode_catalog(generation, body);
    assert_eq!(decode_catalog(&again), Ok((generation, body)));
}

fn check_error(file: &[u8], e: &FormatError) {
    let Some(h) = file.get(..CATALOG_HEADER_BYTES) else {
        assert_eq!(*e, FormatError::Truncated);
        return;
    };
    let magic_ok = h[..8] == CATALOG_MAGIC;
    let crc_ok = crc(SALT_CATALOG_HEADER, &h[..60]) == stored_crc(h);
    let version = u16::from_le_bytes([h[8], h[9]]);
    match e {
        FormatError::BadMagic => assert!(!magic_ok),
        FormatError::BadChecksum => {
            // The header's, or else the body's.
            assert!(magic_ok);
            if crc_ok {
                assert!((1..=FORMAT_VERSION).contains(&version));
            }
        }
        FormatError::UnsupportedVersion(v) => {
            assert!(magic_ok && crc_ok && *v == version && *v > FORMAT_VERSION)
        }
        FormatError::Invalid(_) => assert!(magic_ok && crc_ok),
        FormatError::Truncated => {
            assert!(magic_ok && crc_ok);
            let len = u64_at(h, 24);
            assert!(len <= MAX_CATALOG_BYTES);
            assert!(
                (file.len() - CATALOG_HEADER_BYTES) < len as usize,
                "a body that is there was reported truncated"
            );
        }
    }
}

fn check_valid(cat: &Catalog) {
    let segs = cat.segment_ids();
    assert!(segs.windows(2).all(|w| w[0] < w[1]), "segment owned twice");
    assert!(segs.iter().all(|&s| s < cat.next_segment_id));
    let mut ids = HashSet::new();
    for id in cat
        .volumes
        .iter()
        .map(|v| v.id)
        .chain(cat.snapshots.iter().map(|s| s.id))
    {
        assert!(ids.insert(id), "object id {id} used twice");
    }
    let mut names = HashSet::new();
    for v in &cat.volumes {
        assert!(names.insert(v.name.as_str()), "volume name used twice");
        if let Some(o) = v.origin {
            assert!(cat.snapshots.iter().any(|s| s.id == o), "unknown origin");
        }
    }
    for s in &cat.snapshots {
        // Parent chains end (no cycle) within the number of snapshots.
        let mut cur = s.parent;
        let mut steps = 0;
        while let Some(p) = cur {
            steps += 1;
            assert!(
                steps <= cat.snapshots.len(),
                "cyclic parent chain validated"
            );
            cur = cat
                .snapshots
                .iter()
                .find(|x| x.id == p)
                .expect("validated parent exists")
                .parent;
        }
    }
}
