//! Writes the seed inputs of the store fuzz targets to fuzz/seeds/<target>/, from real
//! encodings: segments written by `segment::Active` and stores written by `Store` on a
//! `MemFs`, and the format-v1 fixture of blockd/tests/fixtures/store-v1.
//!
//!     cd fuzz && cargo run --example gen_seeds
//!
//! Deterministic: creation times are replaced by a constant. Reproducers of fixed
//! findings are kept beside the generated seeds (under names this generator does not use).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockd::names::Name;
use blockd::store::ZeroMode;
use blockd::store::catalog::{Catalog, Config, log_path, read_catalog};
use blockd::store::engine::Store;
use blockd::store::format::{self, ENTRY_BYTES, decode_catalog, encode_catalog, payload_crc};
use blockd::store::io::Fs;
use blockd::store::io::mem::MemFs;
use blockd::store::segment::{self, Active, SegmentId};
use store_fuzz::{
    SEG_FIX_BATCH_CRCS, SEG_FIX_ENTRY_CRCS, SEG_FIX_PAYLOAD_CRCS, SEG_RAW_DAT, SegmentSpec,
};

const CREATED_UNIX: u64 = 1_700_000_000;

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn name(s: &str) -> Name {
    Name::parse("seed", s).expect("valid name")
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn save(target: &str, seed: &str, data: &[u8]) {
    let dir = fuzz_dir().join("seeds").join(target);
    std::fs::create_dir_all(&dir).expect("mkdir seeds");
    std::fs::write(dir.join(seed), data).expect("write seed");
    println!("seeds/{target}/{seed}: {} bytes", data.len());
}

// ------------------------------------------------------------ segments

struct SegFiles {
    first_seq: u64,
    dat: Vec<u8>,
    idx: Vec<u8>,
}

const SEG_ID: SegmentId = 0x1d;

/// Builds a segment with `Active` and returns its files.
fn segment(first_seq: u64, build: impl FnOnce(&mut Active)) -> SegFiles {
    let fs = MemFs::new();
    let dir = Path::new("/s");
    fs.create_dir_all(dir).expect("mkdir");
    let mut a = Active::create(&fs, dir, SEG_ID, first_seq).expect("create segment");
    build(&mut a);
    SegFiles {
        first_seq,
        dat: fs.read(&segment::dat_path(dir, SEG_ID)).expect("read .dat"),
        idx: fs.read(&segment::idx_path(dir, SEG_ID)).expect("read .idx"),
    }
}

fn write(a: &mut Active, logical: u64, data: &[u8]) {
    a.append_write(logical, data, payload_crc(data))
        .expect("append write");
}

fn commit(a: &mut Active) {
    let p = a.prepare_commit().expect("something to commit");
    p.write().expect("write batch");
    a.committed = p.upto;
}

fn seal(a: &mut Active) {
    a.prepare_seal().write().expect("write seal");
}

fn segment_seeds() -> Vec<(&'static str, SegFiles)> {
    let committed_tail = segment(1, |a| {
        write(a, 0, &bytes(1, 4096));
        a.append_zero(8192, 4096, false).expect("zero");
        write(a, 100, &bytes(2, 700));
        commit(a);
        write(a, 4096, &bytes(3, 512));
        a.append_zero(0, 100, true).expect("zero");
        write(a, 4000, &bytes(4, 300));
    });
    let sealed = segment(7, |a| {
        write(a, 0, &bytes(5, 4096));
        write(a, 2048, &bytes(6, 1000));
        a.append_zero(1 << 30, 1 << 20, true).expect("zero");
        commit(a);
        write(a, 10_000, &bytes(7, 512));
        seal(a);
    });
    let mut torn_tail = segment(1, |a| {
        write(a, 0, &bytes(8, 512));
        commit(a);
        write(a, 512, &bytes(9, 512));
        write(a, 1024, &bytes(10, 4096));
        write(a, 8192, &bytes(11, 512));
    });
    // The second provisional payload never reached the disk in full.
    let at = torn_tail.dat.len() - 600;
    torn_tail.dat[at] ^= 0xff;
    let mut damaged_batch = segment(3, |a| {
        write(a, 0, &bytes(12, 1024));
        a.append_zero(4096, 8192, false).expect("zero");
        write(a, 65536, &bytes(13, 4096));
        commit(a);
        write(a, 1 << 20, &bytes(14, 512));
        commit(a);
    });
    // Damage the second copy of the first batch (slot 0 header, 3 provisional, begin, copies).
    let copy = (1 + 3 + 1 + 1) * ENTRY_BYTES + 20;
    damaged_batch.idx[copy] ^= 1;
    let empty = segment(1, |_| {});
    let big_write = segment(1, |a| {
        write(a, 1 << 40, &bytes(15, format::MAX_RECORD_BYTES / 4));
        commit(a);
    });
    vec![
        ("committed_tail", committed_tail),
        ("sealed", sealed),
        ("torn_tail", torn_tail),
        ("damaged_batch", damaged_batch),
        ("empty", empty),
        ("big_write", big_write),
    ]
}

fn spec(f: &SegFiles) -> SegmentSpec {
    let s = SegmentSpec::from_files(SEG_ID, &f.dat, &f.idx);
    assert_eq!(s.first_seq, f.first_seq);
    s
}

// ------------------------------------------------------------ stores

struct StoreFiles {
    catalog: Vec<u8>,
    segments: Vec<(SegmentId, Vec<u8>, Vec<u8>)>,
}

/// The files of a store directory on `fs`, with creation times normalised.
fn store_files(fs: &MemFs, dir: &Path) -> StoreFiles {
    // The catalog with its log replayed, as one catalog file (what `store_open` takes).
    let recovered = read_catalog(fs, dir)
        .expect("valid catalog")
        .expect("a catalog");
    let (generation, mut cat) = (recovered.generation, recovered.cat);
    for v in &mut cat.volumes {
        v.created_unix = CREATED_UNIX;
    }
    for s in &mut cat.snapshots {
        s.created_unix = CREATED_UNIX;
    }
    let body = serde_json::to_vec(&cat).expect("encode catalog");
    let seg_dir = dir.join("segments");
    let segments = cat
        .segment_ids()
        .into_iter()
        .map(|id| {
            let dat = fs.read(&segment::dat_path(&seg_dir, id)).expect(".dat");
            let idx = fs.read(&segment::idx_path(&seg_dir, id)).expect(".idx");
            (id, dat, idx)
        })
        .collect();
    StoreFiles {
        catalog: encode_catalog(generation, &body),
        segments,
    }
}

/// A store with a snapshot, a clone, a hidden snapshot, zeroes, trims and an unflushed
/// write (left for recovery).
fn busy_store() -> StoreFiles {
    let fs = MemFs::new();
    let dir = Path::new("/data");
    let store = Store::open(Arc::new(fs.clone()), dir, Config::default()).expect("new store");
    store.create_volume(&name("vol"), 1 << 20).expect("create");
    let vol = store.open_export("vol").expect("open");
    vol.write(0, &bytes(1, 8192)).expect("write");
    vol.write(300_000, &bytes(2, 700)).expect("write");
    vol.flush().expect("flush");
    store
        .create_snapshot(&name("vol"), &name("s1"))
        .expect("snapshot");
    store.clone_volume("vol@s1", &name("c1")).expect("clone");
    let clone = store.open_export("c1").expect("open clone");
    clone.write(4096, &bytes(3, 4096)).expect("write");
    clone.trim(300_000, 100).expect("trim");
    clone.flush().expect("flush");
    vol.write_zeroes(
        0,
        4096,
        ZeroMode {
            may_trim: false,
            fast_only: false,
        },
    )
    .expect("zero");
    vol.flush().expect("flush");
    vol.write(500_000, &bytes(4, 3000))
        .expect("unflushed write");
    drop(clone);
    store
        .delete_snapshot("vol@s1", true)
        .expect("deferred delete");
    let files = store_files(&fs, dir);
    drop(vol);
    drop(store);
    files
}

fn small_store() -> StoreFiles {
    let fs = MemFs::new();
    let dir = Path::new("/data");
    let store = Store::open(Arc::new(fs.clone()), dir, Config::default()).expect("new store");
    store.create_volume(&name("a"), 64 * 1024).expect("create");
    let a = store.open_export("a").expect("open");
    a.write(512, &bytes(5, 1024)).expect("write");
    a.flush().expect("flush");
    let files = store_files(&fs, dir);
    drop(a);
    drop(store);
    files
}

fn fixture_store() -> StoreFiles {
    let dir = fuzz_dir().join("../blockd/tests/fixtures/store-v1");
    let catalog = std::fs::read(dir.join("catalog")).expect("fixture catalog");
    let (_, body) = decode_catalog(&catalog).expect("fixture catalog decodes");
    let cat: Catalog = serde_json::from_slice(body).expect("fixture JSON");
    let seg_dir = dir.join("segments");
    let segments = cat
        .segment_ids()
        .into_iter()
        .map(|id| {
            let dat = std::fs::read(segment::dat_path(&seg_dir, id)).expect("fixture .dat");
            let idx = std::fs::read(segment::idx_path(&seg_dir, id)).expect("fixture .idx");
            (id, dat, idx)
        })
        .collect();
    StoreFiles { catalog, segments }
}

/// The `store_open` input for a store: control byte, catalog, then its segments.
fn store_open_input(s: &StoreFiles, wrap: bool) -> Vec<u8> {
    let catalog = if wrap {
        decode_catalog(&s.catalog)
            .expect("valid catalog")
            .1
            .to_vec()
    } else {
        s.catalog.clone()
    };
    let mut out = vec![u8::from(wrap)];
    out.extend_from_slice(
        &u16::try_from(catalog.len())
            .expect("small catalog")
            .to_le_bytes(),
    );
    out.extend_from_slice(&catalog);
    assert!(s.segments.len() <= 4, "store_open takes at most 4 segments");
    for (id, dat, idx) in &s.segments {
        out.push(u8::try_from(*id).expect("segment ids of seeds fit in a byte"));
        let spec = SegmentSpec::from_files(*id, dat, idx);
        assert!(spec.dat.len() <= usize::from(u16::MAX) && spec.idx.len() <= 65535);
        out.extend_from_slice(&spec.encode(false));
    }
    out
}

fn main() {
    let segs = segment_seeds();
    for (n, f) in &segs {
        save("segment_replay", n, &spec(f).encode(true));
    }
    let (_, first) = &segs[0];
    let mut fix_all = spec(first);
    fix_all.ctl |= SEG_FIX_ENTRY_CRCS | SEG_FIX_PAYLOAD_CRCS | SEG_FIX_BATCH_CRCS;
    save(
        "segment_replay",
        "committed_tail_fixups",
        &fix_all.encode(true),
    );
    let raw = SegmentSpec {
        ctl: SEG_RAW_DAT,
        first_seq: 0,
        dat: first.dat.clone(),
        idx: first.idx.clone(),
    };
    save("segment_replay", "committed_tail_raw", &raw.encode(true));

    // store_records: real slots at 64-byte strides (an .idx, then a .dat header), raw and
    // with fixes; and the same at every offset.
    for (n, f) in &segs[..2] {
        let mut slots = f.idx.clone();
        slots.extend_from_slice(&f.dat[..ENTRY_BYTES]);
        let mut input = vec![0u8];
        input.extend_from_slice(&slots);
        save("store_records", &format!("{n}_slots"), &input);
        input[0] = 0b1100;
        save("store_records", &format!("{n}_slots_fixed"), &input);
    }
    let mut every = vec![0b0101u8];
    every.extend_from_slice(&segs[1].1.idx[..4 * ENTRY_BYTES]);
    save("store_records", "every_offset", &every);

    let stores = [
        ("busy", busy_store()),
        ("small", small_store()),
        ("fixture_v1", fixture_store()),
    ];
    for (n, s) in &stores {
        let mut file = vec![0u8];
        file.extend_from_slice(&s.catalog);
        save("catalog", &format!("{n}_file"), &file);
        let mut body = vec![1u8];
        body.extend_from_slice(decode_catalog(&s.catalog).expect("valid").1);
        save("catalog", &format!("{n}_body"), &body);
        save("store_open", n, &store_open_input(s, false));
        save(
            "store_open",
            &format!("{n}_wrapped"),
            &store_open_input(s, true),
        );
    }
    save("store_open", "fresh", &[2]);
    let empty = br#"{"next_segment_id":1,"next_object_id":0,"volumes":[],"snapshots":[]}"#;
    let mut input = vec![1u8];
    input.extend_from_slice(&(empty.len() as u16).to_le_bytes());
    input.extend_from_slice(empty);
    save("store_open", "empty_catalog", &input);

    // catalog_log: the log of a store after a few changes, raw (control byte 1, base byte
    // unused) and cut after its records; and the same changes as structured records.
    let (log, bodies) = catalog_log_of_changes();
    let mut raw = vec![1u8, 0];
    raw.extend_from_slice(&log);
    save("catalog_log", "store_raw", &raw);
    let mut structured = vec![0u8, 0];
    for b in &bodies {
        structured.extend_from_slice(&u16::try_from(b.len()).expect("small").to_le_bytes());
        structured.extend_from_slice(b);
    }
    save("catalog_log", "store_records", &structured);
}

/// The catalog log of a fresh store after creating, writing, snapshotting, cloning and
/// deleting (cut one sector after its records), and the JSON bodies of its records.
fn catalog_log_of_changes() -> (Vec<u8>, Vec<Vec<u8>>) {
    let fs = MemFs::new();
    let dir = Path::new("/data");
    let store = Store::open(Arc::new(fs.clone()), dir, Config::default()).expect("new store");
    store.create_volume(&name("vol"), 1 << 20).expect("create");
    let vol = store.open_export("vol").expect("open");
    vol.write(0, &bytes(1, 4096)).expect("write");
    vol.flush().expect("flush");
    store
        .create_snapshot(&name("vol"), &name("s1"))
        .expect("snapshot");
    store.clone_volume("vol@s1", &name("c1")).expect("clone");
    store.delete_volume("c1").expect("delete");
    drop(vol);
    let log = fs.read(&log_path(dir)).expect("catalog log");
    let scan = format::scan_log(&log).expect("valid log");
    let bodies = scan.records.iter().map(|(_, b)| b.to_vec()).collect();
    let end = scan.end as usize + format::LOG_SECTOR_BYTES;
    drop(store);
    (log[..end].to_vec(), bodies)
}
