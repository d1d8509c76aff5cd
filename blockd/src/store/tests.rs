//! Unit tests of the extent store on the in-memory engine.

use std::path::Path;
use std::sync::Arc;

use super::catalog::Config;
use super::engine::Store;
use super::io::mem::{MemFs, Rng};
use super::{ErrorKind, Volume, ZeroMode};
use crate::names::Name;

fn name(s: &str) -> Name {
    Name::parse("volume", s).expect("valid name")
}

fn open(fs: &MemFs) -> Store {
    Store::open(
        Arc::new(fs.clone()),
        Path::new("/data"),
        Config {
            segment_bytes: 1 << 20,
            ..Config::default()
        },
    )
    .expect("open store")
}

fn read(v: &Arc<dyn Volume>, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    v.read(off, &mut buf).expect("read");
    buf
}

#[test]
fn snapshot_and_clone_are_isolated_and_survive_reopen() {
    let fs = MemFs::new();
    let store = open(&fs);
    store.create_volume(&name("db"), 8 << 20).expect("create");
    let v = store.open_export("db").expect("open");
    v.write(0, &[1u8; 8192]).expect("write");
    v.write(4096, &[2u8; 100]).expect("write");
    store
        .create_snapshot(&name("db"), &name("s1"))
        .expect("snapshot");
    v.write(0, &[3u8; 10]).expect("write after snapshot");
    store.clone_volume("db@s1", &name("c1")).expect("clone");
    let c = store.open_export("c1").expect("open clone");
    c.write(8000, &[9u8; 500]).expect("write clone");

    let snap = store.open_export("db@s1").expect("open snapshot");
    assert!(snap.is_read_only());
    assert_eq!(
        snap.write(0, &[0]).expect_err("ro").kind(),
        ErrorKind::ReadOnly
    );
    let check = |v: &Arc<dyn Volume>, c: &Arc<dyn Volume>, s: &Arc<dyn Volume>| {
        assert_eq!(read(v, 0, 10), vec![3u8; 10]);
        assert_eq!(read(v, 10, 10), vec![1u8; 10]);
        assert_eq!(read(s, 0, 10), vec![1u8; 10]);
        assert_eq!(read(s, 4096, 100), vec![2u8; 100]);
        assert_eq!(read(c, 0, 10), vec![1u8; 10]);
        assert_eq!(read(c, 8000, 500), vec![9u8; 500]);
        assert_eq!(read(s, 8000, 192), vec![1u8; 192]);
        assert_eq!(read(s, 8192, 10), vec![0u8; 10]);
    };
    check(&v, &c, &snap);
    v.flush().expect("flush");
    c.flush().expect("flush");
    drop((v, c, snap));
    drop(store);

    let store = open(&fs);
    let (v, c, s) = (
        store.open_export("db").expect("open"),
        store.open_export("c1").expect("open"),
        store.open_export("db@s1").expect("open"),
    );
    check(&v, &c, &s);

    // Flushed data survives any crash.
    for seed in 0..20 {
        let crashed = fs.crash(&mut Rng::new(seed));
        let store = open(&crashed);
        let (v, c, s) = (
            store.open_export("db").expect("open"),
            store.open_export("c1").expect("open"),
            store.open_export("db@s1").expect("open"),
        );
        check(&v, &c, &s);
    }
}

#[test]
fn trims_and_zeroes_read_back_as_zero_and_report_holes() {
    let fs = MemFs::new();
    let store = open(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[7u8; 65536]).expect("write");
    v.trim(4096, 4096).expect("trim");
    v.write_zeroes(
        8192,
        4096,
        ZeroMode {
            may_trim: false,
            fast_only: true,
        },
    )
    .expect("zero");
    assert_eq!(read(&v, 4096, 8192), vec![0u8; 8192]);
    let st = v.block_status(0, 65536, 100).expect("status");
    let states: Vec<_> = st.iter().map(|e| (e.len, e.state)).collect();
    use super::ExtentState::*;
    assert_eq!(
        states,
        vec![
            (4096, Data),
            (4096, Hole),
            (4096, Zero),
            (65536 - 12288, Data)
        ]
    );
}

#[test]
fn deleting_clones_returns_their_space_and_compaction_reclaims_overwrites() {
    let fs = MemFs::new();
    let store = open(&fs);
    store
        .create_volume(&name("base"), 16 << 20)
        .expect("create");
    let b = store.open_export("base").expect("open");
    b.write(0, &vec![5u8; 4 << 20]).expect("write");
    drop(b);
    store
        .create_snapshot(&name("base"), &name("s"))
        .expect("snap");
    let before = store.stats().physical_bytes;
    for i in 0..10 {
        let n = name(&format!("c{i}"));
        store.clone_volume("base@s", &n).expect("clone");
        let c = store.open_export(n.as_str()).expect("open");
        c.write(0, &vec![i as u8; 1 << 20]).expect("write");
        c.flush().expect("flush");
    }
    assert!(store.stats().physical_bytes > before + (9 << 20));
    for i in 0..10 {
        store.delete_volume(&format!("c{i}")).expect("delete");
    }
    let after = store.stats().physical_bytes;
    assert!(
        after <= before + before / 100,
        "before {before} after {after}"
    );

    // Overwrites in a volume leave dead data in sealed segments; compaction frees it.
    store.create_volume(&name("w"), 4 << 20).expect("create");
    let w = store.open_export("w").expect("open");
    for round in 0..6u8 {
        w.write(0, &vec![round; 2 << 20]).expect("write");
    }
    w.flush().expect("flush");
    let bloated = store.stats().physical_bytes;
    let report = store
        .compact(&super::compact::Policy::default())
        .expect("compact");
    let compacted = store.stats().physical_bytes;
    assert!(compacted < bloated, "{report:?}: {bloated} -> {compacted}");
    assert_eq!(read(&w, 0, 4096), vec![5u8; 4096]);
    drop(w);
    drop(store);
    let store = open(&fs);
    let w = store.open_export("w").expect("open");
    assert_eq!(read(&w, (2 << 20) - 4096, 4096), vec![5u8; 4096]);
}

#[test]
fn snapshot_deletion_rules() {
    let fs = MemFs::new();
    let store = open(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 4096]).expect("write");
    store
        .create_snapshot(&name("v"), &name("a"))
        .expect("snap a");
    v.write(0, &[2u8; 4096]).expect("write");
    store
        .create_snapshot(&name("v"), &name("b"))
        .expect("snap b");
    store.clone_volume("v@a", &name("k")).expect("clone");
    let e = store.delete_snapshot("v@a", false).expect_err("has clones");
    assert_eq!(e.kind(), ErrorKind::InUse);
    assert!(e.to_string().contains('k'), "{e}");
    // b has no clones: deleting it merges it into v.
    store.delete_snapshot("v@b", false).expect("delete b");
    assert_eq!(read(&v, 0, 4), vec![2u8; 4]);
    // a with --defer is hidden until its clone goes.
    store.delete_snapshot("v@a", true).expect("defer a");
    assert!(store.list_snapshots(None).is_empty());
    let k = store.open_export("k").expect("clone still works");
    assert_eq!(read(&k, 0, 4), vec![1u8; 4]);
    drop(k);
    store.delete_volume("k").expect("delete clone");
    drop(v);
    drop(store);
    let store = open(&fs);
    let v = store.open_export("v").expect("open");
    assert_eq!(read(&v, 0, 4), vec![2u8; 4]);
    assert_eq!(store.stats().hidden_snapshots, 0);
}

#[test]
fn a_failed_fsync_fails_every_later_flush() {
    let fs = MemFs::new();
    let store = open(&fs);
    store.create_volume(&name("v"), 1 << 20).expect("create");
    let v = store.open_export("v").expect("open");
    v.write(0, &[1u8; 4096]).expect("write");
    fs.fail_syncs_after(0);
    assert_eq!(v.flush().expect_err("eio").kind(), ErrorKind::Io);
    fs.fail_syncs_after(-1);
    v.write(0, &[2u8; 4096]).expect("write");
    assert_eq!(
        v.flush().expect_err("sticky").kind(),
        ErrorKind::FlushFailed
    );
}
