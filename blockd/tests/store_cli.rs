//! The copy-on-write store through the CLI, as a user would run it: snapshots exported
//! read-only and taken at one point in time under writes, O(1) clones, clone isolation,
//! reset, the snapshot deletion rules, raw image import/export, `df` and `volume show`
//! accounting, `blockd verify`, compaction, space given back when clones go, and ext4 on a
//! clone.
//!
//! Data goes in and out through the tests' raw NBD client (common::nbd) over the daemon's
//! Unix socket, and through the real tools (libnbd, nbdinfo, nbdfuse, losetup, mount,
//! e2fsck, cmp, du) where the user-visible result is theirs.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::nbd::Client;
use common::{
    Daemon, FuseFile, LoopDev, Mount, SYSTEM_PYTHON, blockd_bin, cmd, pattern, require,
    run_with_timeout,
};
use nbd_proto::consts::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const QUICK: Duration = Duration::from_secs(60);
const SLOW: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------- helpers

/// `blockd --output json ARGS...`, parsed.
fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let out = d.cli_ok(&full);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("blockd {args:?}: not JSON ({e}): {out}"))
}

fn df(d: &Daemon) -> Value {
    json(d, &["df"])
}

fn show(d: &Daemon, volume: &str) -> Value {
    json(d, &["volume", "show", volume])
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .filter_map(|x| x["name"].as_str().map(str::to_owned))
        .collect()
}

/// A plain client on `export` over the Unix socket.
fn client(d: &Daemon, export: &str) -> Client {
    let mut c = Client::unix(&d.socket);
    c.handshake(export);
    c
}

/// Writes `data` at `offset` of `export` in pieces of at most 1 MiB, then flushes.
fn put(d: &Daemon, export: &str, offset: u64, data: &[u8]) {
    let mut c = client(d, export);
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        c.write(offset + i as u64 * MIB, piece, 0);
    }
    c.flush();
    c.disconnect();
}

fn get(d: &Daemon, export: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut c = client(d, export);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(8 * MIB as usize);
        out.extend(c.read(offset + out.len() as u64, n));
    }
    c.disconnect();
    out
}

/// Asserts that `export` holds `want` at `offset`.
fn expect(d: &Daemon, export: &str, offset: u64, want: &[u8], what: &str) {
    let got = get(d, export, offset, want.len());
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: {export} differs at byte {} (got {:#04x}, expected {:#04x})",
            offset + at as u64,
            got[at],
            want[at]
        );
    }
}

fn zeroes(len: u64) -> Vec<u8> {
    vec![0; len as usize]
}

/// Runs a command, asserts success, returns stdout; shows the daemon log on failure.
fn ok(d: &Daemon, c: &mut Command, limit: Duration) -> String {
    let desc = format!("{c:?}");
    let out = run_with_timeout(c, limit);
    assert!(
        out.status.success(),
        "{desc} failed: {}\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `blockd verify --data-dir DIR`: (success, stdout + stderr).
fn verify(data_dir: &Path) -> (bool, String) {
    let out = run_with_timeout(
        Command::new(blockd_bin())
            .args(["verify", "--data-dir"])
            .arg(data_dir),
        QUICK,
    );
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Bytes of disk a directory's files occupy (du's default), and their apparent size
/// (du -b).
fn du(path: &Path) -> (u64, u64) {
    let allocated = run_with_timeout(cmd("du", &["-s", "--block-size=1"]).arg(path), QUICK);
    let apparent = run_with_timeout(cmd("du", &["-sb"]).arg(path), QUICK);
    let first = |o: &std::process::Output| -> u64 {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("du output: {o:?}"))
    };
    (first(&allocated), first(&apparent))
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("blockd-store-cli-")
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------- snapshots

#[test]
fn a_snapshot_is_listed_and_exported_read_only_with_the_contents_it_was_taken_with() {
    require("nbdinfo");
    require(SYSTEM_PYTHON);
    let d = Daemon::start();
    d.create_volume("vol", "64M");
    let a = pattern(1, MIB as usize);
    put(&d, "vol", 0, &a);
    put(&d, "vol", 32 * MIB, &pattern(2, 4096));

    let out = d.cli_ok(&["snapshot", "create", "vol@monday"]);
    assert!(
        out.contains("created snapshot vol@monday") && out.contains("export name vol@monday"),
        "{out}"
    );
    let err = d.cli_err(&["snapshot", "create", "vol@monday"]);
    assert!(err.contains("already exists"), "{err}");
    // Later writes to the volume do not reach the snapshot.
    let b = pattern(3, MIB as usize);
    put(&d, "vol", 0, &b);

    let table = d.cli_ok(&["snapshot", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("vol@monday") && table.contains("64 MiB"),
        "{table}"
    );
    let list = json(&d, &["snapshot", "list", "vol"]);
    assert_eq!(names(&list), vec!["vol@monday"]);
    let s = &list[0];
    assert_eq!(s["volume"], "vol");
    assert_eq!(u(s, "size_bytes"), 64 * MIB);
    assert_eq!(u(s, "data_bytes"), MIB + 4096);
    assert_eq!(s["clones"], serde_json::json!([]));
    assert_eq!(show(&d, "vol")["origin"], "vol@monday");

    // nbdinfo: listed, and read-only (the volume itself is not).
    let listing = ok(&d, &mut cmd("nbdinfo", &["--list", &d.uri("")]), QUICK);
    assert!(listing.contains("export=\"vol@monday\""), "{listing}");
    let info = ok(&d, &mut cmd("nbdinfo", &[&d.uri("vol@monday")]), QUICK);
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("export-size: 67108864"), "{info}");
    let info = ok(&d, &mut cmd("nbdinfo", &[&d.uri("vol")]), QUICK);
    assert!(info.contains("is_read_only: false"), "{info}");

    // Contents: as of the snapshot.
    expect(&d, "vol@monday", 0, &a, "snapshot");
    expect(&d, "vol@monday", 32 * MIB, &pattern(2, 4096), "snapshot");
    expect(&d, "vol", 0, &b, "volume after the snapshot");

    // Writes through libnbd fail with EPERM: refused by libnbd itself by default, and by
    // the server when libnbd's strict mode is off.
    let script = r#"
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("read_only", h.is_read_only())
def attempt(what, f):
    try:
        f()
        print(what, "succeeded")
    except nbd.Error as e:
        print(what, errno.errorcode.get(e.errnum, e.errnum), "|", e.string)
attempt("strict-pwrite", lambda: h.pwrite(b"x" * 512, 0))
h.set_strict_mode(0)
attempt("pwrite", lambda: h.pwrite(b"x" * 512, 0))
attempt("pwrite-fua", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA))
attempt("trim", lambda: h.trim(512, 0))
attempt("zero", lambda: h.zero(512, 0))
"#;
    let out = ok(
        &d,
        &mut cmd(SYSTEM_PYTHON, &["-c", script, &d.uri("vol@monday")]),
        QUICK,
    );
    assert!(out.contains("read_only True"), "{out}");
    for what in ["strict-pwrite", "pwrite", "pwrite-fua", "trim", "zero"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{what} EPERM |"))),
            "{what} must fail with EPERM:\n{out}"
        );
    }
    // The ones that reached the server were answered by it.
    assert_eq!(out.matches("command failed").count(), 4, "{out}");
    // nbdsh, as a user would type it.
    let out = run_with_timeout(
        cmd(
            "nbdsh",
            &["-u", &d.uri("vol@monday"), "-c", "h.pwrite(b'x' * 512, 0)"],
        )
        .env(
            "PATH",
            format!(
                "/usr/bin:/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        ),
        QUICK,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    // And the raw client gets EPERM from the server for every kind of write.
    let mut c = client(&d, "vol@monday");
    for (command, data) in [
        (CMD_WRITE, vec![9u8; 512]),
        (CMD_TRIM, vec![]),
        (CMD_WRITE_ZEROES, vec![]),
    ] {
        let cookie = c.request(command, 0, 0, 512, &data);
        assert_eq!(c.reply(), (cookie, EPERM), "command {command}");
    }
    expect(&d, "vol@monday", 0, &a, "snapshot after refused writes");
    assert_eq!(
        get(&d, "vol@monday", 8 * MIB, 4096),
        zeroes(4096),
        "never-written space reads as zeroes"
    );
}

/// A snapshot taken while clients write is one point in time: every write acknowledged
/// before `snapshot create` started is in it, none sent after it returned is. With each
/// writer writing its blocks in order, one at a time, every writer's part of the snapshot
/// is a prefix of what it wrote.
#[test]
fn a_snapshot_taken_during_writes_is_one_point_in_time() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const WRITERS: u64 = 4;
    const BLOCKS: u64 = 4096; // per writer, 4 KiB each: 16 MiB
    let d = Daemon::start();
    d.create_volume("live", "64M");
    let stop = AtomicBool::new(false);
    let acked: Vec<AtomicU64> = (0..WRITERS).map(|_| AtomicU64::new(0)).collect();
    let sent: Vec<AtomicU64> = (0..WRITERS).map(|_| AtomicU64::new(0)).collect();
    let block = |w: u64, i: u64| pattern(w << 32 | (i + 1), 4096);
    let (before, after) = std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (stop, acked, sent, d) = (&stop, &acked[w as usize], &sent[w as usize], &d);
            s.spawn(move || {
                let mut c = client(d, "live");
                for i in 0..BLOCKS {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    sent.store(i + 1, Ordering::SeqCst);
                    c.write((w * BLOCKS + i) * 4096, &block(w, i), 0);
                    acked.store(i + 1, Ordering::SeqCst);
                }
                c.disconnect();
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        d.cli_ok(&["snapshot", "create", "live@t"]);
        let after: Vec<u64> = sent.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        (before, after)
    });
    d.cli_ok(&["volume", "clone", "live@t", "frozen"]);
    for export in ["live@t", "frozen"] {
        let data = get(&d, export, 0, (WRITERS * BLOCKS * 4096) as usize);
        for w in 0..WRITERS {
            let mine = |i: u64| {
                let at = ((w * BLOCKS + i) * 4096) as usize;
                &data[at..at + 4096]
            };
            let k = (0..BLOCKS)
                .find(|&i| mine(i) != block(w, i).as_slice())
                .unwrap_or(BLOCKS);
            assert!(
                (k..BLOCKS).all(|i| mine(i).iter().all(|&b| b == 0)),
                "{export}: writer {w}'s blocks are not a prefix: block {k} is not its write \
                 but a later one is there"
            );
            let (lo, hi) = (before[w as usize], after[w as usize]);
            assert!(
                lo <= k && k <= hi,
                "{export}: writer {w} has {k} blocks in the snapshot; {lo} were acknowledged \
                 before the snapshot and {hi} sent before it returned"
            );
            assert!(lo > 0, "writer {w} made no progress before the snapshot");
        }
    }
}

#[test]
fn cloning_a_1_tib_volume_is_instant_and_stores_nothing_new() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("big", "1T");
    let head = pattern(10, 4 * MIB as usize);
    let tail = pattern(11, 4 * MIB as usize);
    put(&d, "big", 0, &head);
    put(&d, "big", TIB - 4 * MIB, &tail);
    put(&d, "big", TIB / 2, &pattern(12, MIB as usize));
    let before = df(&d);

    let started = Instant::now();
    d.cli_ok(&["snapshot", "create", "big@base"]);
    let snapshot_took = started.elapsed();
    let started = Instant::now();
    let out = d.cli_ok(&["volume", "clone", "big@base", "big2"]);
    let clone_took = started.elapsed();
    assert!(out.contains("created clone big2 of big@base"), "{out}");
    // Metadata only: a CLI round trip, whatever the volume size.
    for (what, took) in [("snapshot", snapshot_took), ("clone", clone_took)] {
        assert!(
            took < Duration::from_secs(3),
            "{what} of a 1 TiB volume took {took:?}"
        );
    }

    let after = df(&d);
    let data = 9 * MIB;
    assert_eq!(u(&before, "stored_bytes"), data, "{before}");
    assert_eq!(
        u(&after, "stored_bytes"),
        u(&before, "stored_bytes"),
        "no new stored bytes: {before} -> {after}"
    );
    // (A few blocks of slack: the file system's allocation is not the store's.)
    assert!(
        u(&after, "physical_bytes") <= u(&before, "physical_bytes") + 64 * KIB,
        "no new disk use: {before} -> {after}"
    );
    assert_eq!(u(&after, "logical_bytes"), 2 * TIB);
    assert_eq!(
        u(&after, "referenced_bytes"),
        3 * data,
        "volume, snapshot and clone each see the data: {after}"
    );
    assert_eq!((u(&after, "volumes"), u(&after, "snapshots")), (2, 1));

    let v = show(&d, "big2");
    assert_eq!(u(&v, "size_bytes"), TIB);
    assert_eq!(v["clone_of"], "big@base");
    assert_eq!(v["origin"], "big@base");
    assert_eq!((u(&v, "unique_bytes"), u(&v, "shared_bytes")), (0, data));
    let list = d.cli_ok(&["volume", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("big2 ") && l.contains("1 TiB") && l.contains("big@base")),
        "{list}"
    );

    expect(&d, "big2", 0, &head, "clone");
    expect(&d, "big2", TIB - 4 * MIB, &tail, "clone");
    expect(&d, "big2", TIB / 2, &pattern(12, MIB as usize), "clone");
    assert_eq!(get(&d, "big2", GIB, 4096), zeroes(4096));
}

#[test]
fn a_clone_is_isolated_from_its_origin_and_from_other_clones() {
    let d = Daemon::start();
    d.create_volume("vol", "64M");
    let a = pattern(20, 2 * MIB as usize);
    put(&d, "vol", 0, &a);
    d.cli_ok(&["snapshot", "create", "vol@s"]);
    d.cli_ok(&["volume", "clone", "vol@s", "c1"]);
    d.cli_ok(&["volume", "clone", "vol@s", "c2"]);

    // c1: overwrite the first half MiB, trim the next, zero (keeping it allocated) the
    // one after.
    let b = pattern(21, 512 * KIB as usize);
    put(&d, "c1", 0, &b);
    {
        let mut c = client(&d, "c1");
        let t = c.request(CMD_TRIM, 0, 512 * KIB, 512 * KIB as u32, &[]);
        c.expect_ok(t, "trim on c1");
        let z = c.request(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE,
            MIB,
            512 * KIB as u32,
            &[],
        );
        c.expect_ok(z, "write zeroes on c1");
        c.flush();
    }
    // The origin volume goes on: its writes reach neither the snapshot nor the clones.
    let c = pattern(22, 2 * MIB as usize);
    put(&d, "vol", 0, &c);
    // c2 writes elsewhere.
    let e = pattern(23, MIB as usize);
    put(&d, "c2", 8 * MIB, &e);

    let check = |d: &Daemon, when: &str| {
        expect(d, "vol@s", 0, &a, when);
        assert_eq!(
            get(d, "vol@s", 8 * MIB, MIB as usize),
            zeroes(MIB),
            "{when}"
        );
        expect(d, "vol", 0, &c, when);
        expect(d, "c1", 0, &b, when);
        expect(d, "c1", 512 * KIB, &zeroes(MIB), when);
        expect(d, "c1", 1536 * KIB, &a[1536 * KIB as usize..], when);
        expect(d, "c2", 0, &a, when);
        expect(d, "c2", 8 * MIB, &e, when);
        assert_eq!(get(d, "c1", 8 * MIB, MIB as usize), zeroes(MIB), "{when}");
    };
    check(&d, "while running");
    // And all of it after a restart.
    let (dir, data_dir) = d.into_dirs(true);
    let d = Daemon::start_in(dir, data_dir, &[]);
    check(&d, "after a restart");
    let list = json(&d, &["snapshot", "list"]);
    assert_eq!(list[0]["clones"], serde_json::json!(["c1", "c2"]));
}

#[test]
fn reset_throws_away_what_was_written_since_the_origin_snapshot() {
    let d = Daemon::start();
    d.create_volume("vol", "64M");
    let a = pattern(30, MIB as usize);
    put(&d, "vol", 0, &a);
    d.cli_ok(&["snapshot", "create", "vol@s"]);
    d.cli_ok(&["volume", "clone", "vol@s", "dev"]);
    put(&d, "dev", 0, &pattern(31, MIB as usize));
    put(&d, "dev", 16 * MIB, &pattern(32, MIB as usize));
    assert_eq!(u(&show(&d, "dev"), "unique_bytes"), 2 * MIB);

    // Refused while a client has it open.
    let open = client(&d, "dev");
    let err = d.cli_err(&["volume", "reset", "dev"]);
    assert!(
        err.contains("NBD connection") && err.contains("disconnect"),
        "{err}"
    );
    drop(open);
    let out = d.cli_ok_once_disconnected(&["volume", "reset", "dev"]);
    assert!(out.contains("reset volume dev to vol@s"), "{out}");
    expect(&d, "dev", 0, &a, "clone after reset");
    assert_eq!(get(&d, "dev", 16 * MIB, MIB as usize), zeroes(MIB));
    let v = show(&d, "dev");
    assert_eq!((u(&v, "unique_bytes"), u(&v, "shared_bytes")), (0, MIB));

    // The origin volume resets to its own latest snapshot.
    put(&d, "vol", 0, &pattern(33, MIB as usize));
    d.cli_ok_once_disconnected(&["volume", "reset", "vol"]);
    expect(&d, "vol", 0, &a, "volume after reset");
    expect(&d, "vol@s", 0, &a, "snapshot after resets");

    // A volume without any snapshot is emptied.
    d.create_volume("plain", "8M");
    put(&d, "plain", 0, &pattern(34, MIB as usize));
    let out = d.cli_ok_once_disconnected(&["volume", "reset", "plain"]);
    assert!(
        out.contains("no origin snapshot, so it is empty again"),
        "{out}"
    );
    assert_eq!(get(&d, "plain", 0, MIB as usize), zeroes(MIB));
    assert_eq!(u(&show(&d, "plain"), "unique_bytes"), 0);

    // A reset survives a restart (the thrown-away data does not come back).
    let (dir, data_dir) = d.into_dirs(true);
    let d = Daemon::start_in(dir, data_dir, &[]);
    expect(&d, "dev", 0, &a, "clone after reset and restart");
    assert_eq!(get(&d, "dev", 16 * MIB, MIB as usize), zeroes(MIB));
    assert_eq!(get(&d, "plain", 0, MIB as usize), zeroes(MIB));
}

#[test]
fn a_snapshot_with_clones_is_deleted_only_with_defer_and_freed_with_its_last_clone() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("vol", "64M");
    let a = pattern(40, 8 * MIB as usize);
    put(&d, "vol", 0, &a);
    d.cli_ok(&["snapshot", "create", "vol@s"]);
    d.cli_ok(&["volume", "clone", "vol@s", "c1"]);
    d.cli_ok(&["volume", "clone", "vol@s", "c2"]);

    let err = d.cli_err(&["snapshot", "delete", "vol@s"]);
    assert!(
        err.contains("vol@s has clones: c1, c2") && err.contains("--defer"),
        "{err}"
    );
    assert_eq!(names(&json(&d, &["snapshot", "list"])), vec!["vol@s"]);

    // The volume it was taken of can go; the snapshot stays for its clones.
    d.cli_ok_once_disconnected(&["volume", "delete", "vol"]);
    assert_eq!(names(&json(&d, &["snapshot", "list"])), vec!["vol@s"]);

    let out = d.cli_ok_once_disconnected(&["snapshot", "delete", "vol@s", "--defer"]);
    assert!(
        out.contains("snapshot vol@s is hidden") && out.contains("c1, c2"),
        "{out}"
    );
    assert_eq!(
        names(&json(&d, &["snapshot", "list"])),
        Vec::<String>::new()
    );
    let st = df(&d);
    assert_eq!((u(&st, "snapshots"), u(&st, "hidden_snapshots")), (0, 1));
    // Hidden means gone for users: no export, no second delete, no clone from it.
    let out = run_with_timeout(&mut cmd("nbdinfo", &[&d.uri("vol@s")]), QUICK);
    assert!(!out.status.success(), "a hidden snapshot is not exported");
    let err = d.cli_err(&["snapshot", "delete", "vol@s"]);
    assert!(err.contains("not found"), "{err}");
    let err = d.cli_err(&["volume", "clone", "vol@s", "c3"]);
    assert!(err.contains("not found"), "{err}");
    expect(&d, "c1", 0, &a, "clone of a hidden snapshot");
    expect(&d, "c2", 0, &a, "clone of a hidden snapshot");

    // c1 goes: the hidden snapshot now has one dependent and merges into it.
    put(&d, "c2", 0, &pattern(41, 2 * MIB as usize));
    let physical_two_clones = u(&df(&d), "physical_bytes");
    d.cli_ok_once_disconnected(&["volume", "delete", "c1"]);
    let st = df(&d);
    assert_eq!(u(&st, "hidden_snapshots"), 0, "{st}");
    expect(
        &d,
        "c2",
        0,
        &pattern(41, 2 * MIB as usize),
        "clone after the merge",
    );
    expect(
        &d,
        "c2",
        2 * MIB,
        &a[2 * MIB as usize..],
        "clone after the merge",
    );
    // All of its data is its own now.
    let v = show(&d, "c2");
    assert_eq!(
        (u(&v, "unique_bytes"), u(&v, "shared_bytes")),
        (8 * MIB, 0),
        "{v}"
    );
    assert!(u(&st, "physical_bytes") <= physical_two_clones);

    // The last clone goes: everything is freed.
    d.cli_ok_once_disconnected(&["volume", "delete", "c2"]);
    let st = df(&d);
    for key in [
        "stored_bytes",
        "physical_bytes",
        "segments",
        "volumes",
        "snapshots",
    ] {
        assert_eq!(u(&st, key), 0, "{key} after deleting everything: {st}");
    }
    let left: Vec<_> = fs::read_dir(d.data_dir.join("segments"))
        .expect("segments dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "segment files left: {left:?}");

    // Without clones a snapshot is deleted at once and merged into its volume.
    d.create_volume("solo", "16M");
    put(&d, "solo", 0, &pattern(42, MIB as usize));
    d.cli_ok(&["snapshot", "create", "solo@a"]);
    put(&d, "solo", MIB, &pattern(43, MIB as usize));
    let out = d.cli_ok_once_disconnected(&["snapshot", "delete", "solo@a"]);
    assert!(out.contains("deleted snapshot solo@a"), "{out}");
    let st = df(&d);
    assert_eq!((u(&st, "snapshots"), u(&st, "hidden_snapshots")), (0, 0));
    expect(&d, "solo", 0, &pattern(42, MIB as usize), "after the merge");
    expect(
        &d,
        "solo",
        MIB,
        &pattern(43, MIB as usize),
        "after the merge",
    );
    assert_eq!(u(&show(&d, "solo"), "unique_bytes"), 2 * MIB);
}

// ---------------------------------------------------------------- import and export

/// A 256 MiB sparse image: data at a few places, an allocated run of zeroes, holes.
fn sparse_image(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let pieces = vec![
        (0, pattern(50, MIB as usize)),
        (100 * MIB + 12 * KIB, pattern(51, 64 * KIB as usize)),
        (256 * MIB - 4 * KIB, pattern(52, 4 * KIB as usize)),
    ];
    let f = fs::File::create(path).expect("create image");
    f.set_len(256 * MIB).expect("size image");
    for (off, data) in &pieces {
        f.write_all_at(data, *off).expect("write image");
    }
    // Allocated zeroes: must not take space in the store either.
    f.write_all_at(&zeroes(8 * MIB), 50 * MIB)
        .expect("write zeroes");
    f.sync_all().expect("sync image");
    pieces
}

#[test]
fn import_and_export_of_a_sparse_raw_image_keep_the_bytes_and_the_holes() {
    require("cmp");
    let d = Daemon::start();
    let tmp = scratch();
    let image = tmp.path().join("disk.raw");
    let pieces = sparse_image(&image);
    let data: u64 = pieces.iter().map(|(_, p)| p.len() as u64).sum();

    let out = d.cli_ok(&[
        "volume",
        "import",
        "img",
        "--from",
        image.to_str().expect("utf-8"),
    ]);
    assert!(
        out.contains("into volume img") && out.contains("sparse") && !out.contains("rounded"),
        "{out}"
    );
    let v = show(&d, "img");
    assert_eq!(u(&v, "size_bytes"), 256 * MIB);
    assert_eq!(u(&v, "unique_bytes"), data, "only the data is stored: {v}");
    for (off, piece) in &pieces {
        expect(&d, "img", *off, piece, "imported volume");
    }

    let exported = tmp.path().join("out.raw");
    let out = d.cli_ok(&[
        "volume",
        "export",
        "img",
        "--to",
        exported.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("exported img to"), "{out}");
    ok(&d, cmd("cmp", &[]).arg(&image).arg(&exported), QUICK);
    let (allocated, apparent) = du(&exported);
    assert_eq!(apparent, 256 * MIB);
    assert!(
        allocated < 4 * MIB,
        "the exported image should be sparse: {allocated} bytes allocated"
    );
    assert!(
        fs::metadata(&exported).expect("stat").blocks() * 512 < 4 * MIB,
        "holes stay holes"
    );

    // An existing file is only overwritten with --force.
    let err = d.cli_err(&[
        "volume",
        "export",
        "img",
        "--to",
        exported.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    // A snapshot exports as of its creation.
    d.cli_ok(&["snapshot", "create", "img@orig"]);
    put(&d, "img", 0, &pattern(53, MIB as usize));
    d.cli_ok(&[
        "volume",
        "export",
        "img@orig",
        "--to",
        exported.to_str().expect("utf-8"),
        "--force",
    ]);
    ok(&d, cmd("cmp", &[]).arg(&image).arg(&exported), QUICK);

    // A size that is not a multiple of 512 is rounded up, and the CLI says so.
    let odd = tmp.path().join("odd.raw");
    fs::write(&odd, pattern(54, 1_000_000)).expect("write odd image");
    let out = d.cli_ok(&[
        "volume",
        "import",
        "odd",
        "--from",
        odd.to_str().expect("utf-8"),
    ]);
    assert!(
        out.contains("size rounded up to a multiple of 512 bytes"),
        "{out}"
    );
    assert_eq!(u(&show(&d, "odd"), "size_bytes"), 1_000_448);
    let odd_out = tmp.path().join("odd.out");
    d.cli_ok(&[
        "volume",
        "export",
        "odd",
        "--to",
        odd_out.to_str().expect("utf-8"),
    ]);
    let back = fs::read(&odd_out).expect("read export");
    assert_eq!(back.len(), 1_000_448);
    assert!(back[..1_000_000] == pattern(54, 1_000_000)[..]);
    assert!(back[1_000_000..].iter().all(|&b| b == 0));

    // A missing file: a clear error and no volume left behind.
    let missing = tmp.path().join("no-such.raw");
    let err = d.cli_err(&[
        "volume",
        "import",
        "ghost",
        "--from",
        missing.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("cannot open") && err.contains("no-such.raw"),
        "{err}"
    );
    // Not a regular file: refused before anything is created.
    let err = d.cli_err(&[
        "volume",
        "import",
        "ghost",
        "--from",
        tmp.path().to_str().expect("utf-8"),
    ]);
    assert!(err.contains("not a regular file"), "{err}");
    // A name that is taken: refused, and the existing volume is left alone.
    let err = d.cli_err(&[
        "volume",
        "import",
        "img",
        "--from",
        odd.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("already exists"), "{err}");
    let mut vols = names(&json(&d, &["volume", "list"]));
    vols.sort();
    assert_eq!(vols, vec!["img", "odd"]);
    expect(
        &d,
        "img",
        0,
        &pattern(53, MIB as usize),
        "after a refused import",
    );
}

// ---------------------------------------------------------------- accounting

#[test]
fn df_separates_logical_referenced_stored_and_physical_bytes() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    let st = df(&d);
    for key in [
        "logical_bytes",
        "referenced_bytes",
        "stored_bytes",
        "physical_bytes",
    ] {
        assert_eq!(u(&st, key), 0, "empty store: {st}");
    }
    d.create_volume("vol", "1G");
    let st = df(&d);
    assert_eq!(u(&st, "logical_bytes"), GIB, "sparse: {st}");
    assert_eq!(u(&st, "physical_bytes"), 0, "sparse: {st}");

    put(&d, "vol", 0, &pattern(60, 8 * MIB as usize));
    let st = df(&d);
    assert_eq!(u(&st, "referenced_bytes"), 8 * MIB, "{st}");
    assert_eq!(u(&st, "stored_bytes"), 8 * MIB, "{st}");
    let physical = u(&st, "physical_bytes");
    assert!(
        (8 * MIB..8 * MIB + 64 * KIB).contains(&physical),
        "8 MiB written: {st}"
    );
    // Overwriting in place does not add referenced bytes, but stores the new copy until
    // compaction.
    put(&d, "vol", 0, &pattern(61, MIB as usize));
    let st = df(&d);
    assert_eq!(u(&st, "referenced_bytes"), 8 * MIB, "{st}");
    assert_eq!(u(&st, "stored_bytes"), 8 * MIB, "{st}");
    assert!(u(&st, "physical_bytes") >= 9 * MIB, "{st}");

    d.cli_ok(&["snapshot", "create", "vol@s"]);
    d.cli_ok(&["volume", "clone", "vol@s", "c"]);
    let st = df(&d);
    assert_eq!(u(&st, "logical_bytes"), 2 * GIB, "{st}");
    assert_eq!(u(&st, "referenced_bytes"), 24 * MIB, "{st}");
    assert_eq!(u(&st, "stored_bytes"), 8 * MIB, "{st}");
    put(&d, "c", 0, &pattern(62, 2 * MIB as usize));
    let st = df(&d);
    assert_eq!(u(&st, "referenced_bytes"), 24 * MIB, "{st}");
    assert_eq!(u(&st, "stored_bytes"), 10 * MIB, "{st}");

    let table = d.cli_ok(&["df"]);
    for needle in [
        "logical (volume sizes)",
        "2 GiB",
        "referenced",
        "24 MiB",
        "stored",
        "10 MiB",
        "physical",
        "sharing saves",
        "2 volumes, 1 snapshots (0 hidden)",
    ] {
        assert!(table.contains(needle), "{needle:?} missing from:\n{table}");
    }
}

#[test]
fn volume_show_reports_unique_and_shared_bytes_of_a_clone() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("vol", "64M");
    put(&d, "vol", 0, &pattern(70, 8 * MIB as usize));
    d.cli_ok(&["snapshot", "create", "vol@s"]);
    d.cli_ok(&["volume", "clone", "vol@s", "c"]);
    let v = show(&d, "c");
    assert_eq!((u(&v, "unique_bytes"), u(&v, "shared_bytes")), (0, 8 * MIB));

    // 2 MiB over shared data, 1 MiB where there was none.
    put(&d, "c", 0, &pattern(71, 2 * MIB as usize));
    put(&d, "c", 32 * MIB, &pattern(72, MIB as usize));
    let v = show(&d, "c");
    assert_eq!(
        (u(&v, "unique_bytes"), u(&v, "shared_bytes")),
        (3 * MIB, 6 * MIB),
        "{v}"
    );
    // Trimming shared data removes it from the clone only.
    {
        let mut c = client(&d, "c");
        let t = c.request(CMD_TRIM, 0, 4 * MIB, MIB as u32, &[]);
        c.expect_ok(t, "trim");
        c.flush();
    }
    let v = show(&d, "c");
    assert_eq!(
        (u(&v, "unique_bytes"), u(&v, "shared_bytes")),
        (3 * MIB, 5 * MIB),
        "{v}"
    );
    let origin = show(&d, "vol");
    assert_eq!(
        (u(&origin, "unique_bytes"), u(&origin, "shared_bytes")),
        (0, 8 * MIB),
        "{origin}"
    );
    let table = d.cli_ok(&["volume", "show", "c"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SIZE",
            "UNIQUE",
            "SHARED",
            "ORIGIN",
            "CONNECTIONS",
            "CREATED"
        ]
    );
    let row = table.lines().nth(1).unwrap_or("");
    assert!(
        row.contains("3 MiB") && row.contains("5 MiB") && row.contains("vol@s"),
        "{table}"
    );
    // The accounting is the same after a restart (rebuilt from the log).
    let (dir, data_dir) = d.into_dirs(true);
    let d = Daemon::start_in(dir, data_dir, &[]);
    let v = show(&d, "c");
    assert_eq!(
        (u(&v, "unique_bytes"), u(&v, "shared_bytes")),
        (3 * MIB, 5 * MIB),
        "after a restart: {v}"
    );
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_is_clean_on_a_healthy_store_and_finds_a_flipped_byte_which_then_reads_as_eio() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("vol", "64M");
    let first = pattern(80, MIB as usize);
    let second = pattern(81, MIB as usize);
    put(&d, "vol", 0, &first);
    put(&d, "vol", 8 * MIB, &second);
    let (ok_running, out) = verify(&d.data_dir);
    assert!(
        !ok_running && out.contains("stop it first"),
        "verify refuses to run beside a daemon: {out}"
    );
    let (dir, data_dir) = d.into_dirs(true);

    let (clean, out) = verify(&data_dir);
    assert!(clean && out.contains(": 0 errors, 0 warnings"), "{out}");

    // The first payload of the (only) segment is the first 128 KiB record of `first`.
    let seg_dir = data_dir.join("segments");
    let mut dats: Vec<PathBuf> = fs::read_dir(&seg_dir)
        .expect("segments")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .collect();
    dats.sort();
    assert_eq!(dats.len(), 1, "{dats:?}");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dats[0])
        .expect("open .dat");
    let at = 4096 + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    assert_eq!(b[0], first[100], "the payload region starts at 4096");
    b[0] ^= 0xff;
    f.write_all_at(&b, at).expect("flip a byte");
    f.sync_all().expect("sync");

    let (clean, out) = verify(&data_dir);
    assert!(!clean, "verify must fail on damaged data:\n{out}");
    // It names the volume, the logical range from the start of the damaged record's extent
    // and the record that fails its checksum.
    assert!(
        out.contains("volume vol: bytes 0..")
            && out.contains("read from damaged data")
            && out.contains("payload of 131072 bytes at offset 4096 fails its checksum")
            && out.contains("1 errors"),
        "{out}"
    );

    // The daemon still starts; the damaged range reads as EIO, the rest as written.
    let d = Daemon::start_in(dir, data_dir, &[]);
    let mut c = client(&d, "vol");
    assert_eq!(c.try_read(0, 4096), Err(EIO), "read of the damaged record");
    assert_eq!(
        c.try_read(64 * KIB, 512),
        Err(EIO),
        "anywhere in that record"
    );
    assert!(
        c.try_read(128 * KIB, 128 * KIB as usize)
            == Ok(first[128 * KIB as usize..256 * KIB as usize].to_vec())
    );
    assert!(c.try_read(8 * MIB, MIB as usize) == Ok(second.clone()));
    assert!(c.try_read(32 * MIB, 4096) == Ok(zeroes(4096)));
    // Overwriting the damaged range makes it readable again.
    let fresh = pattern(82, 128 * KIB as usize);
    c.write(0, &fresh, CMD_FLAG_FUA);
    assert!(c.try_read(0, 128 * KIB as usize) == Ok(fresh));
    assert!(d.log().contains("payload checksum mismatch"), "{}", d.log());
}

// ---------------------------------------------------------------- compaction

/// Writes `len` bytes of pattern `seed` at `offset` in 1 MiB requests, 32 in flight.
fn fill(d: &Daemon, export: &str, offset: u64, len: u64, seed: u64) {
    let mut c = client(d, export);
    let data = pattern(seed, MIB as usize);
    let mut batch = Vec::new();
    let mut sent = 0;
    let total = len / MIB;
    while sent < total {
        batch.clear();
        let n = (total - sent).min(32);
        for i in 0..n {
            let cookie = c.cookie();
            batch.extend(common::nbd::encode_request(
                CMD_WRITE,
                0,
                cookie,
                offset + (sent + i) * MIB,
                MIB as u32,
                &data,
            ));
        }
        let sender = c.send_in_background(std::mem::take(&mut batch));
        for _ in 0..n {
            let (cookie, error) = c.reply();
            assert_eq!(error, 0, "write {cookie}");
        }
        sender.join().expect("sender").expect("send");
        sent += n;
    }
    c.flush();
}

#[test]
fn compaction_returns_the_space_of_overwritten_data() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("vol", "64M");
    // Five passes over the volume, the last over its first half only: 288 MiB written,
    // 64 MiB live. The first segment fills up (256 MiB) and is sealed.
    for pass in 0..4u64 {
        fill(&d, "vol", 0, 64 * MIB, 90 + pass);
    }
    fill(&d, "vol", 0, 32 * MIB, 94);
    let before = df(&d);
    assert!(
        u(&before, "physical_bytes") >= 288 * MIB,
        "before compaction: {before}"
    );
    assert_eq!(u(&before, "stored_bytes"), 64 * MIB, "{before}");

    let out = d.cli_ok(&["compact"]);
    assert!(out.starts_with("compaction:"), "{out}");
    let after = df(&d);
    let physical = u(&after, "physical_bytes");
    // The active segment, flushed, also holds up to 1 MiB + 64 KiB of zeroes filled ahead
    // of its tails (docs/FORMAT.md).
    assert!(
        physical < 64 * MIB + 2 * MIB,
        "compaction should leave about the 64 MiB of live data: {before} -> {after} ({out})"
    );
    assert_eq!(u(&after, "stored_bytes"), 64 * MIB, "{after}");
    let (allocated, _) = du(&d.data_dir.join("segments"));
    assert!(allocated < 66 * MIB, "du of segments/: {allocated}");

    let check = |d: &Daemon, when: &str| {
        let mut c = client(d, "vol");
        for i in 0..64u64 {
            let seed = if i < 32 { 94 } else { 93 };
            assert!(
                c.read(i * MIB, MIB as usize) == pattern(seed, MIB as usize),
                "{when}: MiB {i}"
            );
        }
    };
    check(&d, "after compaction");
    let (dir, data_dir) = d.into_dirs(true);
    let (clean, report) = verify(&data_dir);
    assert!(clean, "verify after compaction: {report}");
    let d = Daemon::start_in(dir, data_dir, &["--compact-interval", "0"]);
    check(&d, "after compaction and a restart");
}

/// Compaction frees dead data in sealed segments a snapshot owns (it cannot move it: the
/// snapshot's map is shared) by punching holes. What is still live must read back, also
/// from records that are partly overwritten, and also after a restart (when payloads are
/// checked against their checksums on first read); what is wholly dead is freed.
#[test]
fn compaction_frees_dead_snapshot_data_and_keeps_partly_overwritten_records_readable() {
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("v", "64M");
    // 4 MiB (32 records of 128 KiB) whose first 64 KiB of every record is overwritten,
    // and 4 MiB whose first half is overwritten whole.
    let old = pattern(100, 4 * MIB as usize);
    put(&d, "v", 0, &old);
    let second = pattern(102, 4 * MIB as usize);
    put(&d, "v", 4 * MIB, &second);
    let new = pattern(101, 64 * KIB as usize);
    let replaced = pattern(103, 2 * MIB as usize);
    {
        let mut c = client(&d, "v");
        for i in 0..32u64 {
            c.write(i * 128 * KIB, &new, 0);
        }
        c.flush();
    }
    put(&d, "v", 4 * MIB, &replaced);
    d.cli_ok(&["snapshot", "create", "v@s"]);
    let before = u(&df(&d), "physical_bytes");
    let out = d.cli_ok(&["compact"]);
    let after = u(&df(&d), "physical_bytes");
    // (Allow a few blocks of slack: the file system's own allocation is not exact.)
    assert!(
        after + 2 * MIB <= before + 64 * KIB,
        "the 2 MiB of wholly overwritten records are freed: {before} -> {after} ({out})"
    );
    let check = |d: &Daemon, export: &str, when: &str| {
        let mut c = client(d, export);
        for i in 0..32u64 {
            let at = i * 128 * KIB;
            assert!(
                c.try_read(at, 64 * KIB as usize) == Ok(new.clone()),
                "{when}: {export} record {i}, overwritten half"
            );
            let live = &old[(at + 64 * KIB) as usize..(at + 128 * KIB) as usize];
            assert!(
                c.try_read(at + 64 * KIB, 64 * KIB as usize) == Ok(live.to_vec()),
                "{when}: {export} record {i}: the live half of a partly overwritten record \
                 must read back"
            );
        }
        assert!(
            c.try_read(4 * MIB, 2 * MIB as usize) == Ok(replaced.clone()),
            "{when}"
        );
        assert!(
            c.try_read(6 * MIB, 2 * MIB as usize) == Ok(second[2 * MIB as usize..].to_vec()),
            "{when}"
        );
    };
    check(&d, "v@s", "right after compaction");
    let (dir, data_dir) = d.into_dirs(true);
    let (clean, report) = verify(&data_dir);
    let d = Daemon::start_in(dir, data_dir, &["--compact-interval", "0"]);
    check(&d, "v@s", "after a restart");
    check(&d, "v", "after a restart");
    assert!(clean, "verify after compaction: {report}");
}

// ---------------------------------------------------------------- space of many clones

#[test]
fn a_hundred_clones_written_and_deleted_give_all_their_space_back() {
    const CLONES: usize = 100;
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("base", "64M");
    put(&d, "base", 0, &pattern(110, 4 * MIB as usize));
    d.cli_ok(&["snapshot", "create", "base@gold"]);
    let segments = d.data_dir.join("segments");
    let (du_before, du_b_before) = du(&segments);
    let physical_before = u(&df(&d), "physical_bytes");

    let names: Vec<String> = (0..CLONES).map(|i| format!("c{i:03}")).collect();
    let run_all = |f: &(dyn Fn(&str) + Sync)| {
        std::thread::scope(|s| {
            for chunk in names.chunks(CLONES / 4) {
                s.spawn(move || chunk.iter().for_each(|n| f(n)));
            }
        })
    };
    run_all(&|n| {
        d.cli_ok(&["volume", "clone", "base@gold", n]);
        put(
            &d,
            n,
            MIB * (n[1..].parse::<u64>().expect("number") % 60),
            &pattern(111, MIB as usize),
        );
    });
    let st = df(&d);
    assert_eq!(u(&st, "volumes"), CLONES as u64 + 1);
    assert!(
        u(&st, "physical_bytes") >= physical_before + CLONES as u64 * MIB,
        "{st}"
    );
    expect(&d, "c042", 42 * MIB, &pattern(111, MIB as usize), "a clone");
    expect(
        &d,
        "c042",
        0,
        &pattern(110, 4 * MIB as usize)[..(4 * MIB) as usize],
        "a clone",
    );

    run_all(&|n| {
        d.cli_ok_once_disconnected(&["volume", "delete", n]);
    });
    let st = df(&d);
    assert_eq!(u(&st, "volumes"), 1, "{st}");
    let physical_after = u(&st, "physical_bytes");
    let (du_after, du_b_after) = du(&segments);
    let within = |a: u64, b: u64| a.abs_diff(b) * 100 <= b.max(1);
    assert!(
        within(physical_after, physical_before),
        "df physical_bytes: {physical_before} before, {physical_after} after"
    );
    assert!(
        within(du_after, du_before),
        "du of segments/: {du_before} before, {du_after} after"
    );
    assert!(
        within(du_b_after, du_b_before),
        "du -sb of segments/: {du_b_before} before, {du_b_after} after"
    );
    expect(
        &d,
        "base@gold",
        0,
        &pattern(110, 4 * MIB as usize),
        "the snapshot",
    );
}

// ---------------------------------------------------------------- ext4 on a clone

fn ext4_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", b"hello from the origin\n".to_vec()),
        ("keep.bin", pattern(120, 3 * MIB as usize + 17)),
        ("change.bin", pattern(121, 2 * MIB as usize)),
        ("dir/nested/delete-me.bin", pattern(122, 5 * MIB as usize)),
        ("empty", Vec::new()),
    ]
}

fn write_file(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let mut f = fs::File::create(&path).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn check_file(root: &Path, rel: &str, want: &[u8], when: &str) {
    let got = fs::read(root.join(rel)).unwrap_or_else(|e| panic!("{when}: {rel}: {e}"));
    assert!(
        got == want,
        "{when}: {rel} differs ({} bytes, expected {})",
        got.len(),
        want.len()
    );
}

fn fsck_clean(d: &Daemon, dev: &str, when: &str) {
    require("e2fsck");
    let out = run_with_timeout(&mut cmd("e2fsck", &["-fn", dev]), SLOW);
    assert!(
        out.status.success(),
        "{when}: e2fsck -fn found problems ({}):\n{}{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
}

#[test]
fn ext4_on_a_clone_leaves_the_origin_snapshot_untouched() {
    require("mkfs.ext4");
    let d = Daemon::start();
    let size = 256 * MIB;
    d.create_volume("fs", "256M");
    let files = ext4_files();

    // 1. ext4 on the volume, files written, unmounted and detached.
    {
        let fuse = FuseFile::mount(&d.unix_uri("fs"), size);
        let dev = LoopDev::attach(&fuse.file);
        ok(
            &d,
            &mut cmd(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    &dev.dev,
                ],
            ),
            SLOW,
        );
        let mnt = Mount::mount(&dev.dev, &[]);
        for (rel, data) in &files {
            write_file(&mnt.target, rel, data);
        }
    }
    d.cli_ok(&["snapshot", "create", "fs@golden"]);
    d.cli_ok(&["volume", "clone", "fs@golden", "fs-dev"]);

    // 2. On the clone: change a file, delete one, add one.
    let changed = pattern(123, 2 * MIB as usize);
    let added = pattern(124, 7 * MIB as usize);
    {
        let fuse = FuseFile::mount(&d.unix_uri("fs-dev"), size);
        let dev = LoopDev::attach(&fuse.file);
        let mnt = Mount::mount(&dev.dev, &[]);
        for (rel, data) in &files {
            check_file(&mnt.target, rel, data, "clone before changes");
        }
        write_file(&mnt.target, "change.bin", &changed);
        fs::remove_file(mnt.target.join("dir/nested/delete-me.bin")).expect("rm");
        write_file(&mnt.target, "dir/added.bin", &added);
        drop(mnt);
        fsck_clean(&d, &dev.dev, "clone after changes");
    }
    assert!(
        u(&show(&d, "fs-dev"), "unique_bytes") >= 9 * MIB,
        "the clone's changes are its own data"
    );

    // 3. The snapshot, mounted read-only (no journal replay: the export is read-only), has
    //    the original files; e2fsck finds it clean.
    {
        let fuse = FuseFile::mount(&d.uri("fs@golden"), size);
        let dev = LoopDev::attach_read_only(&fuse.file);
        fsck_clean(&d, &dev.dev, "snapshot");
        let mnt = Mount::mount(&dev.dev, &["-o", "ro,noload"]);
        for (rel, data) in &files {
            check_file(&mnt.target, rel, data, "snapshot after the clone changed");
        }
        assert!(!mnt.target.join("dir/added.bin").exists());
    }
    // 4. The clone, on a fresh attach: its own changes, clean.
    {
        let fuse = FuseFile::mount(&d.uri("fs-dev"), size);
        let dev = LoopDev::attach(&fuse.file);
        fsck_clean(&d, &dev.dev, "clone on a fresh attach");
        let mnt = Mount::mount(&dev.dev, &[]);
        check_file(&mnt.target, "change.bin", &changed, "clone");
        check_file(&mnt.target, "dir/added.bin", &added, "clone");
        check_file(&mnt.target, "keep.bin", &files[1].1, "clone");
        assert!(!mnt.target.join("dir/nested/delete-me.bin").exists());
    }
}
