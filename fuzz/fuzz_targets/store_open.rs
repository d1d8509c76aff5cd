//! Opening a whole store (`Store::open`: catalog, orphan removal, segment recovery and
//! sealing, map rebuild, hidden-snapshot collection) on a `MemFs` holding a fuzzer-chosen
//! catalog and segment files.
//!
//! Input: `ctl: u8, catalog_len: u16, catalog, then up to 4 of (id: u8, SegmentSpec)`
//! (see `fuzz/src/lib.rs`; each segment is written as `<id>.dat` / `<id>.idx`). Control
//! bits: bit 0 wraps the catalog bytes as a JSON body in a valid envelope
//! (`encode_catalog`); bit 1 leaves the catalog file out (a fresh store).
//!
//! Properties: `Store::open` returns a store or a `StoreError`, never panics or hangs;
//! reads and block status of every export return data or an error, never panic; once a
//! store has opened, opening it again (after recovery sealed its segments and collected
//! hidden snapshots) succeeds and shows the same exports with the same contents; heap
//! growth is bounded by a multiple of the input.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use blockd::store::catalog::{Config, catalog_path};
use blockd::store::engine::Store;
use blockd::store::format::encode_catalog;
use blockd::store::io::Fs;
use blockd::store::io::mem::MemFs;
use blockd::store::segment;
use blockd::store::{ErrorKind, Extent, ExtentState};
use libfuzzer_sys::fuzz_target;
use store_fuzz::{Budget, Counting, Cursor, SegmentSpec};

#[global_allocator]
static ALLOC: Counting = Counting;

const WRAP_CATALOG: u8 = 1 << 0;
const NO_CATALOG: u8 = 1 << 1;
const MAX_SEGMENTS: usize = 4;
/// Exports looked at per open.
const MAX_EXPORTS: usize = 4;
/// Bytes read per piece looked at.
const READ_BYTES: u64 = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let budget = Budget::start();
    let mut c = Cursor::new(data);
    let ctl = c.u8();
    let cat_len = usize::from(c.u16());
    let cat = c.bytes(cat_len);
    let mut segments = Vec::new();
    while !c.rest.is_empty() && segments.len() < MAX_SEGMENTS {
        let id = u64::from(c.u8());
        segments.push((id, SegmentSpec::parse(&mut c, false)));
    }

    let fs = MemFs::new();
    let dir = Path::new("/data");
    let seg_dir = dir.join("segments");
    fs.create_dir_all(&seg_dir).expect("mkdir on MemFs");
    if ctl & NO_CATALOG == 0 {
        let file = if ctl & WRAP_CATALOG != 0 {
            encode_catalog(1, cat)
        } else {
            cat.to_vec()
        };
        fs.write_atomic(&catalog_path(dir), &file)
            .expect("write on MemFs");
    }
    for (id, spec) in &segments {
        if fs.open(&segment::idx_path(&seg_dir, *id)).is_err() {
            spec.write(&fs, &seg_dir, *id);
        }
    }
    fs.sync_dir(&seg_dir).expect("sync on MemFs");

    let store = match Store::open(Arc::new(fs.clone()), dir, Config::default()) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !matches!(e.kind(), ErrorKind::FlushFailed | ErrorKind::InUse),
                "open failed with {e:?}"
            );
            return budget.check(limit(data.len()), "store_open (error)");
        }
    };
    let first = observe(&store);
    drop(store);
    let again = Store::open(Arc::new(fs), dir, Config::default())
        .unwrap_or_else(|e| panic!("a store that opened fails to open again: {e:?}"));
    assert_eq!(
        observe(&again),
        first,
        "reopening changed what the store shows"
    );
    drop(again);
    budget.check(limit(data.len()), "store_open");
});

fn limit(input: usize) -> usize {
    64 * input + (8 << 20)
}

/// What clients could see of an export: reads of a few places and its block status.
#[derive(Debug, PartialEq, Eq)]
struct ExportView {
    name: String,
    size: u64,
    read_only: bool,
    opened: Result<(), ErrorKind>,
    status: Option<Result<Vec<Extent>, ErrorKind>>,
    reads: Vec<(u64, Result<Vec<u8>, ErrorKind>)>,
}

fn observe(store: &Store) -> Vec<ExportView> {
    let mut views = Vec::new();
    for (name, size, read_only) in store.exports().into_iter().take(MAX_EXPORTS) {
        let mut view = ExportView {
            name: name.clone(),
            size,
            read_only,
            opened: Ok(()),
            status: None,
            reads: Vec::new(),
        };
        let v = match store.open_export(&name) {
            Ok(v) => v,
            Err(e) => {
                view.opened = Err(e.kind());
                views.push(view);
                continue;
            }
        };
        assert_eq!(v.size(), size);
        assert_eq!(v.is_read_only(), read_only);
        let mut offsets = vec![0, size.saturating_sub(READ_BYTES)];
        if size > 0 {
            let len = size.min(1 << 40);
            let status = v.block_status(0, len, 16).map_err(|e| e.kind());
            if let Ok(extents) = &status {
                assert!(!extents.is_empty() && extents.len() <= 16, "{extents:?}");
                assert!(extents.iter().all(|e| e.len > 0));
                assert!(extents.iter().map(|e| e.len).sum::<u64>() <= len);
                let mut at = 0;
                for e in extents {
                    if e.state == ExtentState::Data && offsets.len() < 6 {
                        offsets.push(at);
                    }
                    at += e.len;
                }
            }
            view.status = Some(status);
        }
        offsets.sort_unstable();
        offsets.dedup();
        for off in offsets {
            let len = READ_BYTES.min(size - off);
            let mut buf = vec![0u8; len as usize];
            let r = v.read(off, &mut buf).map(|()| buf).map_err(|e| e.kind());
            if let Err(k) = &r {
                assert!(
                    matches!(k, ErrorKind::Corrupt | ErrorKind::Io),
                    "read at {off} of {name} failed with {k:?}"
                );
            }
            view.reads.push((off, r));
        }
        views.push(view);
    }
    views
}
