//! The catalog log: `scan_log` over log bytes, then the replay `read_catalog` does (each
//! record's JSON parsed as a `Change` and applied to the catalog file's contents, then
//! `Catalog::validate`).
//!
//! Input: `ctl: u8, base: u8, then chunks of (len: u16, body)`. Bit 0 of `ctl`: the rest
//! is the log file itself, raw. Otherwise every chunk becomes a record with a valid
//! envelope (`encode_log_record`, consecutive generations from `base + 1`) after a valid
//! header, so that the fuzzer explores replay without solving checksums; bits 1..=3 then
//! damage it as a crash or the disk would: zero one sector (`base` picks which), flip one
//! byte, cut the file short.
//!
//! Properties: no panic, heap growth bounded by a multiple of the input; `scan_log`
//! returns records with consecutive generations from the header's base, each of them
//! the exact bytes `encode_log_record` makes, ending where the next record starts; an
//! undamaged log scans to every record it was built from; a torn record is reported only
//! where a sector is all zeroes or the file ends inside it; `read_catalog` returns a valid
//! catalog or an error.
#![no_main]

use std::path::Path;

use blockd::store::catalog::{Catalog, catalog_path, log_path, read_catalog};
use blockd::store::format::{
    LOG_SECTOR_BYTES, encode_catalog, encode_log_header, encode_log_record, scan_log,
};
use blockd::store::io::Fs;
use blockd::store::io::mem::MemFs;
use libfuzzer_sys::fuzz_target;
use store_fuzz::{Budget, Counting, Cursor};

#[global_allocator]
static ALLOC: Counting = Counting;

const RAW: u8 = 1 << 0;
const ZERO_SECTOR: u8 = 1 << 1;
const FLIP: u8 = 1 << 2;
const CUT: u8 = 1 << 3;

fuzz_target!(|data: &[u8]| {
    let budget = Budget::start();
    let mut c = Cursor::new(data);
    let ctl = c.u8();
    let base = u64::from(c.u8());
    let mut bodies = Vec::new();
    let log = if ctl & RAW != 0 {
        c.rest.to_vec()
    } else {
        let mut log = encode_log_header(base);
        while !c.rest.is_empty() {
            let len = usize::from(c.u16());
            let body = c.bytes(len);
            log.extend_from_slice(&encode_log_record(base + 1 + bodies.len() as u64, body));
            bodies.push(body);
        }
        log.resize(log.len() + LOG_SECTOR_BYTES, 0);
        log
    };
    let built = log.clone();
    let mut log = log;
    let mut damaged = false;
    if ctl & RAW == 0 && !log.is_empty() {
        let pick = usize::from(ctl >> 4) * 131 + base as usize;
        if ctl & ZERO_SECTOR != 0 {
            let sectors = log.len() / LOG_SECTOR_BYTES;
            let s = pick % sectors.max(1) * LOG_SECTOR_BYTES;
            log[s..(s + LOG_SECTOR_BYTES).min(built.len())].fill(0);
            damaged = true;
        }
        if ctl & FLIP != 0 {
            let at = pick * 7919 % log.len();
            log[at] ^= 1 << (pick % 8);
            damaged = true;
        }
        if ctl & CUT != 0 {
            log.truncate(pick * 31 % log.len());
            damaged = true;
        }
    }

    match scan_log(&log) {
        Ok(scan) => {
            let mut at = LOG_SECTOR_BYTES;
            for (i, &(generation, body)) in scan.records.iter().enumerate() {
                assert_eq!(generation, scan.base_generation + 1 + i as u64);
                let rec = encode_log_record(generation, body);
                assert_eq!(
                    &log[at..at + rec.len()],
                    &rec[..],
                    "record is not its encoding"
                );
                at += rec.len();
            }
            assert_eq!(scan.end, at as u64, "end is not after the last record");
            if let Some(t) = scan.torn_at {
                assert_eq!(t, scan.end, "torn record not at the end");
            }
            if !damaged && ctl & RAW == 0 {
                assert_eq!(scan.records.len(), bodies.len(), "undamaged records lost");
                assert_eq!(scan.torn_at, None);
            }
        }
        Err(e) => {
            assert!(
                damaged || ctl & RAW != 0,
                "an undamaged log was refused: {e}"
            );
        }
    }

    // Replay onto an empty catalog at generation `base`, as the store reads it.
    let fs = MemFs::new();
    let dir = Path::new("/data");
    fs.create_dir_all(dir).expect("mkdir on MemFs");
    let empty = serde_json::to_vec(&Catalog {
        next_segment_id: 1,
        ..Catalog::default()
    })
    .expect("encode");
    fs.write_atomic(&catalog_path(dir), &encode_catalog(base, &empty))
        .expect("write on MemFs");
    fs.write_atomic(&log_path(dir), &log)
        .expect("write on MemFs");
    if let Ok(Some(r)) = read_catalog(&fs, dir) {
        assert!(
            r.cat.validate().is_ok(),
            "replay returned an invalid catalog"
        );
        assert!(r.generation >= base);
    }
    // Records are padded to whole sectors, so the log can be far larger than the input;
    // the in-memory file system holds a few copies of it. The budget counts the log as
    // built, before any cut: this harness holds that copy itself (`built`).
    let log_bytes = built.len().max(log.len());
    budget.check(16 * log_bytes + 64 * data.len() + 256 * 1024, "catalog_log");
});
