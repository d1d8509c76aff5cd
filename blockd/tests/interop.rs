//! Interoperability: a real `blockd serve` driven by the real NBD clients a user would
//! run (libnbd's nbdinfo/nbdcopy/nbdfuse/nbdsh, nbd-client, qemu-img/qemu-io/qemu-nbd, fio)
//! and, through nbdfuse and a loop device, by the kernel's ext4.
//!
//! Each test asserts what the user would look at: listings, sizes, flags, allocation maps,
//! byte-identical copies, pattern checks, fio's error counts, `e2fsck` results.
//!
//! There is no kernel nbd module on the test machines, so block-device tests go through
//! nbdfuse (which exposes the export as a file) plus `losetup`.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Daemon, FuseFile, LoopDev, Mount, cmd, require, run_with_timeout};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Limit for one client command; generous for a loaded 2-core machine, short enough that a
/// hung client fails the test instead of the whole suite.
const QUICK: Duration = Duration::from_secs(60);
const SLOW: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn show(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a client with a time limit, asserts it succeeded (showing the daemon log if not),
/// returns stdout.
fn ok(d: &Daemon, c: &mut Command, limit: Duration) -> String {
    let desc = format!("{c:?}");
    let out = run_with_timeout(c, limit);
    assert!(
        out.status.success(),
        "{desc} failed\n{}\ndaemon log:\n{}",
        show(&out),
        plain_log(d)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The daemon log without terminal colour codes.
fn plain_log(d: &Daemon) -> String {
    let log = d.log();
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Number of lines in the daemon log so far, to look only at what comes after.
fn log_mark(d: &Daemon) -> usize {
    plain_log(d).lines().count()
}

/// NBD connections to `export` logged after line `mark`: how many were opened, and the
/// most that were open at the same time. `peer` filters on the peer field (`unix` for the
/// Unix socket, `127.0.0.1:` for TCP). Disconnects of connections opened before the mark
/// (logged late) are ignored.
fn connections_since(d: &Daemon, mark: usize, export: &str, peer: &str) -> (usize, usize) {
    let log = plain_log(d);
    assert!(
        log.contains("client connected"),
        "the daemon log has no connection lines; run the tests with RUST_LOG unset or at \
         info level:\n{log}"
    );
    let (mut opened, mut most) = (0, 0);
    let mut open: HashMap<String, usize> = HashMap::new();
    let exp = format!("export={export} ");
    let peer = format!("peer={peer}");
    for line in log.lines().skip(mark) {
        if !line.contains(&exp) || !line.contains(&peer) {
            continue;
        }
        let who = line
            .split_whitespace()
            .find(|w| w.starts_with("peer="))
            .unwrap_or("")
            .to_string();
        if line.contains("client connected") {
            opened += 1;
            *open.entry(who).or_default() += 1;
            most = most.max(open.values().sum());
        } else if line.contains("client disconnected")
            && let Some(n) = open.get_mut(&who)
        {
            *n = n.saturating_sub(1);
        }
    }
    (opened, most)
}

/// `nbdsh` is a shell script running `python3 -m nbd`; make sure it finds the system python
/// (the one with the libnbd module) rather than a pyenv shim.
fn nbdsh(d: &Daemon, uri: &str, script: &str) -> String {
    require("nbdsh");
    let path = format!(
        "/usr/bin:/bin:/usr/sbin:/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = cmd("nbdsh", &["-u", uri, "-c", script]);
    c.env("PATH", path);
    ok(d, &mut c, QUICK)
}

/// Runs qemu-io commands against an NBD URI; every one must succeed and every `read -P`
/// must match.
fn qemu_io(d: &Daemon, uri: &str, commands: &[String]) -> String {
    require("qemu-io");
    let mut c = cmd("qemu-io", &["-f", "raw"]);
    for command in commands {
        c.arg("-c").arg(command);
    }
    c.arg(uri);
    let out = ok(d, &mut c, SLOW);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// One extent of `nbdinfo --map`: offset, length, type (bit 0 hole, bit 1 zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ext {
    offset: u64,
    len: u64,
    kind: u64,
}

const DATA: u64 = 0;
const HOLE: u64 = 3;

fn ext(offset: u64, len: u64, kind: u64) -> Ext {
    Ext { offset, len, kind }
}

/// `nbdinfo --map --json`, with adjacent extents of the same type merged.
fn nbd_map(d: &Daemon, uri: &str) -> Vec<Ext> {
    require("nbdinfo");
    let out = ok(d, &mut cmd("nbdinfo", &["--map", "--json", uri]), QUICK);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json printed invalid JSON ({e}):\n{out}"));
    let mut exts: Vec<Ext> = Vec::new();
    for e in v.as_array().expect("array of extents") {
        let (Some(offset), Some(len), Some(kind)) = (
            e["offset"].as_u64(),
            e["length"].as_u64(),
            e["type"].as_u64(),
        ) else {
            panic!("bad extent {e} in\n{out}");
        };
        match exts.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.len == offset => last.len += len,
            _ => exts.push(ext(offset, len, kind)),
        }
    }
    exts
}

fn data_bytes(map: &[Ext]) -> u64 {
    map.iter().filter(|e| e.kind & 1 == 0).map(|e| e.len).sum()
}

/// `qemu-img map --output=json` merged into (start, length, data, zero).
fn qemu_map(d: &Daemon, uri: &str) -> Vec<(u64, u64, bool, bool)> {
    require("qemu-img");
    let out = ok(
        d,
        &mut cmd("qemu-img", &["map", "--output=json", "-f", "raw", uri]),
        QUICK,
    );
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img map printed invalid JSON ({e}):\n{out}"));
    let mut m: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().expect("array") {
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        let data = e["data"].as_bool().expect("data");
        let zero = e["zero"].as_bool().expect("zero");
        match m.last_mut() {
            Some(last) if (last.2, last.3) == (data, zero) && last.0 + last.1 == start => {
                last.1 += len
            }
            _ => m.push((start, len, data, zero)),
        }
    }
    m
}

/// Writes `len` bytes of `common::pattern` data (in 4 MiB pieces) to a new file.
fn pattern_file(path: &Path, seed: u64, len: u64) {
    let mut f = fs::File::create(path).expect("create pattern file");
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let n = (len - done).min(4 * MIB);
        f.write_all(&common::pattern(seed * 100_000 + i, n as usize))
            .expect("write pattern file");
        done += n;
        i += 1;
    }
    f.sync_all().expect("sync pattern file");
}

fn same_files(d: &Daemon, a: &Path, b: &Path) {
    require("cmp");
    let out = run_with_timeout(Command::new("cmp").arg(a).arg(b), QUICK);
    assert!(
        out.status.success(),
        "{} and {} differ:\n{}\ndaemon log:\n{}",
        a.display(),
        b.display(),
        show(&out),
        plain_log(d)
    );
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("blockd-interop-")
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------------------------------
// Discovery: nbdinfo, nbd-client, qemu-nbd
// ---------------------------------------------------------------------------------------

#[test]
fn nbdinfo_lists_exports_and_reports_their_capabilities() {
    require("nbdinfo");
    let d = Daemon::start();
    let server = format!("nbd://{}", d.nbd);

    // A server without volumes lists nothing (and does not fail).
    let out = ok(
        &d,
        &mut cmd("nbdinfo", &["--list", "--json", &server]),
        QUICK,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    assert_eq!(v["exports"], serde_json::json!([]), "{out}");

    d.create_volume("alpha", "64M");
    d.create_volume("beta", "1G");

    // --list, as text and JSON, over TCP and over the Unix socket.
    let text = ok(&d, &mut cmd("nbdinfo", &["--list", &server]), QUICK);
    for needle in [
        "export=\"alpha\":",
        "export-size: 67108864",
        "export=\"beta\":",
        "export-size: 1073741824",
    ] {
        assert!(
            text.contains(needle),
            "no {needle:?} in nbdinfo --list:\n{text}"
        );
    }
    let unix_server = format!("nbd+unix:///?socket={}", d.socket.display());
    for uri in [&server, &unix_server] {
        let out = ok(&d, &mut cmd("nbdinfo", &["--list", "--json", uri]), QUICK);
        let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
        let mut exports: Vec<(String, u64)> = v["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| {
                (
                    e["export-name"].as_str().unwrap_or("?").to_string(),
                    e["export-size"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        exports.sort();
        assert_eq!(
            exports,
            vec![
                ("alpha".to_string(), 64 * MIB),
                ("beta".to_string(), 1 << 30)
            ],
            "nbdinfo --list --json {uri}:\n{out}"
        );
    }

    // Details of one export.
    let uri = d.uri("alpha");
    let out = ok(&d, &mut cmd("nbdinfo", &["--json", &uri]), QUICK);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    assert_eq!(v["structured"], true, "{out}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "alpha", "{out}");
    assert_eq!(e["export-size"], 64 * MIB, "{out}");
    for flag in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} should be true:\n{out}");
    }
    assert_eq!(e["is_read_only"], false, "{out}");
    assert_eq!(e["block_size_minimum"], 1, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], 33_554_432, "{out}");
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(contexts, vec!["base:allocation"], "{out}");

    // The one-question forms scripts use.
    let size = ok(&d, &mut cmd("nbdinfo", &["--size", &uri]), QUICK);
    assert_eq!(size.trim(), "67108864");
    ok(
        &d,
        &mut cmd("nbdinfo", &["--can", "multi-conn", &uri]),
        QUICK,
    );
    ok(
        &d,
        &mut cmd("nbdinfo", &["--can", "trim", &d.unix_uri("alpha")]),
        QUICK,
    );
    let ro = run_with_timeout(&mut cmd("nbdinfo", &["--is", "read-only", &uri]), QUICK);
    assert_eq!(
        ro.status.code(),
        Some(2),
        "export should not be read-only\n{}",
        show(&ro)
    );

    // An unknown export is an error that points at --list, not a hang or a crash.
    let bad = run_with_timeout(&mut cmd("nbdinfo", &[&d.uri("nope")]), QUICK);
    assert!(!bad.status.success(), "{}", show(&bad));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--list"), "{err}");
}

#[test]
fn nbd_client_lists_and_negotiates_exports() {
    require("nbd-client");
    let d = Daemon::start();
    d.create_volume("alpha", "64M");
    d.create_volume("beta", "8M");

    // `-l HOST PORT`: NBD_OPT_LIST, needs no kernel module.
    let out = ok(
        &d,
        &mut cmd("nbd-client", &["-l", "127.0.0.1", d.port()]),
        QUICK,
    );
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim()))
        .filter(|n| !n.is_empty() && *n != "Negotiation")
        .collect();
    assert_eq!(names, vec!["alpha", "beta"], "nbd-client -l:\n{out}");
    assert!(
        out.contains("alpha: blockd volume, 67108864 bytes"),
        "{out}"
    );

    // A full connect negotiates (GO, and EXPORT_NAME with -g) and then stops at the kernel
    // step: a regular file is not an nbd device, so the ioctl fails harmlessly (-L = ioctl
    // instead of netlink). What the server decides is visible before that.
    let dir = scratch();
    let notadev = dir.path().join("not-a-device");
    fs::write(&notadev, b"").expect("file");
    let dev = notadev.to_str().expect("utf-8 path");
    for extra in [&[][..], &["-g"][..]] {
        let mut c = cmd(
            "nbd-client",
            &["-N", "alpha", "127.0.0.1", d.port(), dev, "-L"],
        );
        c.args(extra);
        let out = run_with_timeout(&mut c, QUICK);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.contains("size = 64MB"),
            "nbd-client {extra:?} did not negotiate the export:\n{}",
            show(&out)
        );
        assert!(!stderr.contains("Server said"), "{}", show(&out));
        let len = fs::metadata(&notadev).map(|m| m.len()).ok();
        assert_eq!(len, Some(0), "nbd-client must not write to {dev}");
    }

    // An unknown export: nbd-client shows the server's message.
    let out = run_with_timeout(
        &mut cmd(
            "nbd-client",
            &["-N", "nope", "127.0.0.1", d.port(), dev, "-L"],
        ),
        QUICK,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no volume or snapshot named") && stderr.contains("--list"),
        "{}",
        show(&out)
    );
    let log = plain_log(&d);
    assert!(
        log.contains("client connected export=alpha") && log.contains("structured=false"),
        "nbd-client's connections should reach transmission:\n{log}"
    );
}

#[test]
fn qemu_nbd_lists_exports_with_block_sizes() {
    require("qemu-nbd");
    let d = Daemon::start();
    d.create_volume("alpha", "64M");
    let out = ok(
        &d,
        &mut cmd("qemu-nbd", &["-L", "-b", "127.0.0.1", "-p", d.port()]),
        QUICK,
    );
    for needle in [
        "exports available: 1",
        "export: 'alpha'",
        "size:  67108864",
        "multi",
        "min block: 1",
        "opt block: 4096",
        "max block: 33554432",
        "base:allocation",
    ] {
        assert!(out.contains(needle), "no {needle:?} in qemu-nbd -L:\n{out}");
    }
    assert!(!out.contains("readonly"), "{out}");
}

// ---------------------------------------------------------------------------------------
// Allocation maps
// ---------------------------------------------------------------------------------------

#[test]
fn block_status_shows_holes_data_and_holes_again_after_trim_and_zero() {
    require("nbdinfo");
    require("qemu-io");
    let d = Daemon::start();
    d.create_volume("m", "64M");
    let uri = d.uri("m");
    let size = 64 * MIB;
    // Block status is reported in 512-byte sectors: a sector holding any data is data.
    let blk = 512;

    // Fresh: one hole, reading as zeroes, as both libnbd and qemu see it.
    assert_eq!(nbd_map(&d, &uri), vec![ext(0, size, HOLE)]);
    assert_eq!(qemu_map(&d, &uri), vec![(0, size, false, true)]);

    // Writes through qemu-io and nbdsh (aligned, FUA, and a 3-byte unaligned one).
    qemu_io(&d, &uri, &["write -P 0x5a 1M 1M".into()]);
    nbdsh(
        &d,
        &uri,
        &format!(
            "h.pwrite(b'\\x77' * 4096, {}, nbd.CMD_FLAG_FUA)\nh.pwrite(b'abc', {})\nh.flush()",
            8 * MIB + 4 * KIB,
            20 * MIB + 5
        ),
    );
    let tiny_at = 20 * MIB;
    let expected = vec![
        ext(0, MIB, HOLE),
        ext(MIB, MIB, DATA),
        ext(2 * MIB, 6 * MIB + 4 * KIB, HOLE),
        ext(8 * MIB + 4 * KIB, 4 * KIB, DATA),
        ext(8 * MIB + 8 * KIB, tiny_at - 8 * MIB - 8 * KIB, HOLE),
        ext(tiny_at, blk, DATA),
        ext(tiny_at + blk, size - tiny_at - blk, HOLE),
    ];
    assert_eq!(nbd_map(&d, &uri), expected, "nbdinfo --map after writes");
    let q = qemu_map(&d, &uri);
    let q_expected: Vec<(u64, u64, bool, bool)> = expected
        .iter()
        .map(|e| (e.offset, e.len, e.kind == DATA, e.kind == HOLE))
        .collect();
    assert_eq!(q, q_expected, "qemu-img map after writes");

    // Trim, write-zeroes (holes allowed) through nbdsh and qemu-io: all holes again, and
    // the ranges read back as zeroes.
    nbdsh(
        &d,
        &uri,
        &format!(
            "h.trim({mib}, {mib})\nh.zero(4096, {z})\n\
             assert h.pread({mib}, {mib}) == bytes({mib})\n\
             assert h.pread(4096, {z}) == bytes(4096)\nh.cache({mib}, 0)\nh.shutdown()",
            mib = MIB,
            z = 8 * MIB + 4 * KIB
        ),
    );
    qemu_io(
        &d,
        &uri,
        &[
            format!("write -z -u {tiny_at} {blk}"),
            format!("read -P 0 {tiny_at} {blk}"),
        ],
    );
    assert_eq!(
        nbd_map(&d, &uri),
        vec![ext(0, size, HOLE)],
        "map after trim/zero"
    );

    // Zeroing with NO_HOLE must read back as zeroes (whether the file system keeps the
    // blocks allocated is its business, so the map is not checked here).
    qemu_io(
        &d,
        &uri,
        &[
            "write -P 0x66 30M 2M".into(),
            "write -z 30M 1M".into(),
            "read -P 0 30M 1M".into(),
            "read -P 0x66 31M 1M".into(),
        ],
    );
    let map = nbd_map(&d, &uri);
    assert!(
        map.iter()
            .any(|e| e.kind == DATA && e.offset <= 31 * MIB && e.offset + e.len >= 32 * MIB),
        "{map:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Bulk copies: nbdcopy with multi-conn, qemu-img convert/compare
// ---------------------------------------------------------------------------------------

#[test]
fn nbdcopy_256mib_round_trip_with_four_connections_over_tcp_and_unix() {
    require("nbdcopy");
    let d = Daemon::start();
    let size = 256 * MIB;
    d.create_volume("copy", "256M");
    d.create_volume("copy2", "256M");
    let dir = scratch();
    let src = dir.path().join("src.img");
    let out = dir.path().join("out.img");
    pattern_file(&src, 7, size);

    // nbdcopy uses min(--connections, --threads) connections and its thread default is the
    // core count, so ask for 4 threads as well to really get 4 connections on 2 cores.
    let nbdcopy = |from: &str, to: &str| {
        let mut c = cmd(
            "nbdcopy",
            &["--connections=4", "--threads=4", "--flush", from, to],
        );
        ok(&d, &mut c, SLOW);
    };
    let src_s = src.to_str().expect("utf-8");
    let out_s = out.to_str().expect("utf-8");

    // File -> volume over TCP, 4 connections at once.
    let mark = log_mark(&d);
    nbdcopy(src_s, &d.uri("copy"));
    let (opened, most) = connections_since(&d, mark, "copy", "127.0.0.1:");
    assert_eq!(
        (opened, most),
        (4, 4),
        "nbdcopy into the volume should use 4 concurrent connections:\n{}",
        plain_log(&d)
    );

    // Volume -> file over TCP.
    let mark = log_mark(&d);
    nbdcopy(&d.uri("copy"), out_s);
    same_files(&d, &src, &out);
    let (opened, most) = connections_since(&d, mark, "copy", "127.0.0.1:");
    assert!(
        opened >= 2 && most >= 2,
        "multi-conn read side: {opened} opened, {most} at once"
    );
    fs::remove_file(&out).expect("rm");

    // Volume (TCP) -> volume (Unix socket), then volume (Unix) -> file.
    let mark = log_mark(&d);
    nbdcopy(&d.uri("copy"), &d.unix_uri("copy2"));
    let (opened, most) = connections_since(&d, mark, "copy2", "unix");
    assert_eq!(
        (opened, most),
        (4, 4),
        "Unix-socket destination:\n{}",
        plain_log(&d)
    );
    nbdcopy(&d.unix_uri("copy2"), out_s);
    same_files(&d, &src, &out);

    // The volume really holds the data (and is not, say, a sparse file of zeroes).
    assert_eq!(nbd_map(&d, &d.uri("copy2")), vec![ext(0, size, DATA)]);
    let info: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["--output", "json", "volume", "show", "copy2"]))
            .expect("json");
    assert!(info["unique_bytes"].as_u64().unwrap_or(0) >= size, "{info}");
}

/// A 64 MiB sparse raw image: data at these (offset, length) ranges, zero bytes written
/// explicitly at `ZEROED`, holes elsewhere.
const QEMU_DATA: [(u64, u64); 4] = [
    (0, MIB),
    (5 * MIB, 3 * MIB),
    (20 * MIB + 4 * KIB, 8 * KIB),
    (63 * MIB, MIB),
];
const ZEROED: (u64, u64) = (30 * MIB, MIB);

fn expected_qemu_map(size: u64) -> Vec<(u64, u64, bool, bool)> {
    let mut m = Vec::new();
    let mut pos = 0;
    for (off, len) in QEMU_DATA {
        if off > pos {
            m.push((pos, off - pos, false, true));
        }
        m.push((off, len, true, false));
        pos = off + len;
    }
    if pos < size {
        m.push((pos, size - pos, false, true));
    }
    m
}

#[test]
fn qemu_img_convert_compare_and_map() {
    require("qemu-img");
    let d = Daemon::start();
    let size = 64 * MIB;
    d.create_volume("img", "64M");
    let uri = d.uri("img");
    let dir = scratch();
    let src = dir.path().join("src.raw");
    {
        let f = fs::File::create(&src).expect("create");
        f.set_len(size).expect("size");
        for (i, (off, len)) in QEMU_DATA.iter().enumerate() {
            let data = common::pattern(100 + i as u64, *len as usize);
            std::os::unix::fs::FileExt::write_all_at(&f, &data, *off).expect("write");
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0; ZEROED.1 as usize], ZEROED.0)
            .expect("write zeroes");
        f.sync_all().expect("sync");
    }
    let src_s = src.to_str().expect("utf-8");
    let expected = expected_qemu_map(size);

    // Into a fresh volume (-n: the export exists, qemu-img must not try to create it).
    ok(
        &d,
        &mut cmd(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
        ),
        SLOW,
    );
    let cmp = ok(
        &d,
        &mut cmd(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
        ),
        SLOW,
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_eq!(
        qemu_map(&d, &uri),
        expected,
        "qemu-img map after convert into a fresh volume"
    );

    // Over a dirty volume: qemu-img must zero what is not data, and the map must again
    // show exactly the source's data (qemu zeroes with "may unmap", so holes come back).
    qemu_io(&d, &uri, &["write -P 0xee 0 64M".into()]);
    assert_eq!(nbd_map(&d, &uri), vec![ext(0, size, DATA)]);
    ok(
        &d,
        &mut cmd(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
        ),
        SLOW,
    );
    let cmp = ok(
        &d,
        &mut cmd(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
        ),
        SLOW,
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_eq!(
        qemu_map(&d, &uri),
        expected,
        "qemu-img map after convert over old data"
    );

    // And back out to a file: byte-identical and sparse again.
    let back = dir.path().join("back.raw");
    let back_s = back.to_str().expect("utf-8");
    ok(
        &d,
        &mut cmd(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &uri, back_s],
        ),
        SLOW,
    );
    same_files(&d, &src, &back);
    let allocated = fs::metadata(&back)
        .map(|m| m.blocks() * 512)
        .unwrap_or(u64::MAX);
    assert!(
        allocated <= 16 * MIB,
        "converted-back image is not sparse: {allocated} bytes"
    );

    // A changed byte is noticed by qemu-img compare (the check above is not vacuous).
    qemu_io(&d, &uri, &["write -P 0x01 40M 1".into()]);
    let diff = run_with_timeout(
        &mut cmd(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
        ),
        SLOW,
    );
    assert_eq!(diff.status.code(), Some(1), "{}", show(&diff));
    assert!(
        String::from_utf8_lossy(&diff.stdout).contains("41943040"),
        "{}",
        show(&diff)
    );
}

// ---------------------------------------------------------------------------------------
// Pattern I/O: qemu-io and fio
// ---------------------------------------------------------------------------------------

#[test]
fn qemu_io_pattern_writes_and_reads_including_unaligned_small_and_zeroing() {
    require("qemu-io");
    let d = Daemon::start();
    d.create_volume("pat", "64M");
    let uri = d.uri("pat");
    let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();

    qemu_io(
        &d,
        &uri,
        &s(&[
            "write -P 0xa1 0 4k",
            "write -P 0xa2 4095 2",      // across a 4 KiB boundary
            "write -P 0xa3 1 1",         // one byte
            "write -P 0xa4 12345 777",   // odd offset and length
            "write -P 0xa5 1M 3M",       // large
            "write -P 0xa6 8388508 200", // unaligned around 8 MiB
            "write -f -P 0xa7 10M 64k",  // FUA
            "aio_write -P 0xa8 12M 64k",
            "aio_write -P 0xa9 12352k 64k",
            "aio_flush",
            "write -P 0xaa 20M 33M", // larger than the 32 MiB maximum: qemu splits it
            "flush",
        ]),
    );
    // Read back in a new process (nothing cached on the client side).
    qemu_io(
        &d,
        &uri,
        &s(&[
            "read -P 0xa1 0 1",
            "read -P 0xa3 1 1",
            "read -P 0xa1 2 4093",
            "read -P 0xa2 4095 2",
            "read -P 0 4097 8248",
            "read -P 0xa4 12345 777",
            "read -P 0 13122 1035454",
            "read -P 0xa5 1M 3M",
            "read -P 0 4M 4194204",
            "read -P 0xa6 8388508 200",
            "read -P 0 8388708 2097052",
            "read -P 0xa7 10M 64k",
            "read -P 0xa8 12M 64k",
            "read -P 0xa9 12352k 64k",
            "read -P 0xaa 20M 33M",
            "read -P 0 53M 11M",
        ]),
    );
    // Zeroing and discarding, aligned and not; the neighbours keep their data.
    qemu_io(
        &d,
        &uri,
        &s(&[
            "write -z 1M 1M",
            "write -z -u 2M 512k",
            "discard 3M 1M",
            "discard 12300 100",
            "write -z 8388608 50",
            "discard 30M 4M", // in the middle of the 33 MiB write
        ]),
    );
    qemu_io(
        &d,
        &uri,
        &s(&[
            "read -P 0 1M 1M",
            "read -P 0 2M 512k",
            "read -P 0xa5 2560k 512k",
            "read -P 0 3M 1M",
            "read -P 0 12300 100",
            "read -P 0xa4 12400 722",
            "read -P 0xa6 8388508 100",
            "read -P 0 8388608 50",
            "read -P 0xa6 8388658 50",
            "read -P 0xaa 20M 10M",
            "read -P 0 30M 4M",
            "read -P 0xaa 34M 19M",
            "read -P 0xa1 0 1",
        ]),
    );
}

#[test]
fn fio_random_io_with_crc32c_verify_reports_no_errors() {
    require("fio");
    let d = Daemon::start();
    d.create_volume("fio", "256M");
    let dir = scratch();
    let job = dir.path().join("verify.fio");
    let out = dir.path().join("fio.json");
    // Five jobs at once (one NBD connection each), random offsets, sizes from 512 bytes to
    // 1 MiB, each verifying what it wrote; then a trim pass over the first region.
    fs::write(
        &job,
        format!(
            "[global]\n\
             ioengine=nbd\n\
             uri={uri}\n\
             rw=randwrite\n\
             iodepth=8\n\
             verify=crc32c\n\
             do_verify=1\n\
             verify_fatal=1\n\
             size=32m\n\
             [bs512]\nbs=512\noffset=0\nsize=4m\n\
             [bs4k]\nbs=4k\noffset=32m\n\
             [bs64k]\nbs=64k\noffset=64m\n\
             [bs1m]\nbs=1m\noffset=96m\n\
             [bsrange]\nbsrange=512-1m\noffset=128m\nsize=64m\n\
             [trim]\nstonewall\nrw=trim\nverify=0\ndo_verify=0\nbs=1m\noffset=0\nsize=32m\n",
            uri = d.uri("fio")
        ),
    )
    .expect("job file");
    let mark = log_mark(&d);
    let mut c = cmd("fio", &["--output-format=json"]);
    // fio writes its verify state files into the working directory: keep them in the
    // test's temporary directory.
    c.current_dir(dir.path());
    c.arg(format!("--output={}", out.display())).arg(&job);
    let res = run_with_timeout(&mut c, SLOW);
    let report = fs::read_to_string(&out).unwrap_or_default();
    assert!(
        res.status.success(),
        "fio failed\n{}\nreport:\n{report}\ndaemon log:\n{}",
        show(&res),
        plain_log(&d)
    );
    let v: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("fio JSON ({e}):\n{report}\n{}", show(&res)));
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 6, "{report}");
    for j in jobs {
        let name = j["jobname"].as_str().unwrap_or("?");
        assert_eq!(j["error"], 0, "fio job {name} reported an error:\n{report}");
        for dir in ["read", "write", "trim"] {
            assert_eq!(j[dir]["short_ios"], 0, "{name} {dir}");
            assert_eq!(j[dir]["drop_ios"], 0, "{name} {dir}");
        }
        let written = j["write"]["io_bytes"].as_u64().unwrap_or(0);
        if name == "trim" {
            assert_eq!(j["trim"]["io_bytes"], 32 * MIB, "{report}");
        } else {
            // Everything written was read back and checked.
            assert!(written > 0, "{name} wrote nothing:\n{report}");
            assert_eq!(
                j["read"]["io_bytes"].as_u64(),
                Some(written),
                "{name}:\n{report}"
            );
        }
    }
    let (opened, most) = connections_since(&d, mark, "fio", "127.0.0.1:");
    assert!(
        opened >= 6 && most >= 2,
        "fio: {opened} connections, {most} at once"
    );
    // The trim pass left holes reading as zeroes.
    let map = nbd_map(&d, &d.uri("fio"));
    assert_eq!(map.first(), Some(&ext(0, 32 * MIB, HOLE)), "{map:?}");
    qemu_io(&d, &d.uri("fio"), &["read -P 0 0 32M".into()]);
}

// ---------------------------------------------------------------------------------------
// ext4 end to end, through nbdfuse and a loop device, across a daemon restart
// ---------------------------------------------------------------------------------------

/// Files written to the file system: path, content.
fn ext4_files() -> Vec<(PathBuf, Vec<u8>)> {
    vec![
        (PathBuf::from("hello.txt"), b"hello from blockd\n".to_vec()),
        (PathBuf::from("empty"), Vec::new()),
        (PathBuf::from("odd.bin"), common::pattern(11, 4097)),
        (
            PathBuf::from("dir/nested/one-mib.bin"),
            common::pattern(12, MIB as usize),
        ),
        (
            PathBuf::from("big.bin"),
            common::pattern(13, 96 * MIB as usize),
        ),
    ]
}

fn write_files(root: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (rel, data) in files {
        let path = root.join(rel);
        let parent = path.parent().expect("parent");
        fs::create_dir_all(parent).expect("mkdir");
        let mut f = fs::File::create(&path).expect("create");
        f.write_all(data).expect("write");
        f.sync_all().expect("fsync");
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .expect("fsync dir");
    }
}

fn check_files(root: &Path, files: &[(PathBuf, Vec<u8>)], when: &str) {
    for (rel, data) in files {
        let got = fs::read(root.join(rel))
            .unwrap_or_else(|e| panic!("{when}: cannot read {}: {e}", rel.display()));
        assert_eq!(got.len(), data.len(), "{when}: size of {}", rel.display());
        assert!(got == *data, "{when}: content of {} differs", rel.display());
    }
}

fn fsck_clean(d: &Daemon, dev: &str, when: &str) {
    require("e2fsck");
    let out = run_with_timeout(&mut cmd("e2fsck", &["-fn", dev]), SLOW);
    assert!(
        out.status.success(),
        "{when}: e2fsck -fn found problems\n{}\ndaemon log:\n{}",
        show(&out),
        plain_log(d)
    );
}

#[test]
fn ext4_on_nbdfuse_loop_survives_remount_and_daemon_restart() {
    require("mkfs.ext4");
    require("fstrim");
    let d = Daemon::start();
    let size = 512 * MIB;
    d.create_volume("fs", "512M");
    let files = ext4_files();

    // 1. mkfs, write, fsync, trim a deleted file, unmount, fsck.
    {
        let fuse = FuseFile::mount(&d.uri("fs"), size);
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
        write_files(&mnt.target, &files);
        let scratch_file = mnt.target.join("scratch.bin");
        write_files(
            &mnt.target,
            &[(
                PathBuf::from("scratch.bin"),
                common::pattern(14, 64 * MIB as usize),
            )],
        );
        check_files(&mnt.target, &files, "just written");

        let before = data_bytes(&nbd_map(&d, &d.uri("fs")));
        assert!(
            before >= 160 * MIB,
            "only {before} bytes allocated after writing 161 MiB"
        );
        fs::remove_file(&scratch_file).expect("rm scratch");
        // ext4 only discards blocks whose freeing is committed to the journal.
        let target = mnt.target.to_str().expect("utf-8");
        ok(&d, &mut cmd("sync", &["-f", target]), QUICK);
        let trimmed = ok(&d, &mut cmd("fstrim", &["-v", target]), SLOW);
        let after = data_bytes(&nbd_map(&d, &d.uri("fs")));
        assert!(
            after + 48 * MIB <= before,
            "fstrim of a deleted 64 MiB file did not free space in the volume: \
             {before} -> {after} bytes of data ({trimmed})"
        );

        drop(mnt);
        fsck_clean(&d, &dev.dev, "after unmount");
    }

    // 2. A fresh nbdfuse (over the Unix socket this time) and loop device: nothing cached
    //    on the client side, so this reads what the server stored.
    {
        let fuse = FuseFile::mount(&d.unix_uri("fs"), size);
        let dev = LoopDev::attach(&fuse.file);
        fsck_clean(&d, &dev.dev, "on a fresh attach");
        let mnt = Mount::mount(&dev.dev, &[]);
        check_files(&mnt.target, &files, "after remount");
        assert!(!mnt.target.join("scratch.bin").exists());
    }

    // 3. Restart the daemon on the same data directory and read everything again.
    let (dir, data_dir) = d.into_dirs(true);
    let d = Daemon::start_in(dir, data_dir, &[]);
    {
        let fuse = FuseFile::mount(&d.uri("fs"), size);
        let dev = LoopDev::attach(&fuse.file);
        fsck_clean(&d, &dev.dev, "after daemon restart");
        let mnt = Mount::mount(&dev.dev, &[]);
        check_files(&mnt.target, &files, "after daemon restart");
    }
}
