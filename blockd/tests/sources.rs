//! Sources end to end: a PostgreSQL primary started by the test, written to by pgbench; a
//! source following it as a streaming standby on a blockd volume; revisions made by
//! refreshes (on demand and scheduled), clones of them promoted to primaries of their own,
//! retention, masking, and a primary restart. Every test has its own daemon and primary;
//! the guards stop them and sweep mounts, loop devices and servers even when a test fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::*;
use serde_json::Value;

const REPL_USER: &str = "repl";
const REPL_PASSWORD: &str = "s3cret:with\\odd chars";

/// A primary with a replication role, a `ledger` table written one row per transaction,
/// and a password file for the source definition.
struct Setup {
    primary: Primary,
    files: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let primary = Primary::start();
        primary.require_passwords(REPL_USER, &REPL_PASSWORD.replace('\'', "''"));
        primary.psql("CREATE TABLE ledger (id bigint PRIMARY KEY, at timestamptz DEFAULT now())");
        let files = tempfile::tempdir().expect("tempdir");
        let pw = files.path().join("repl.pass");
        std::fs::write(&pw, format!("{REPL_PASSWORD}\n")).expect("write the password file");
        Setup { primary, files }
    }

    /// Writes a source definition; `extra` lines are appended (refresh, retain, ...).
    fn definition(&self, name: &str, password_file: &str, extra: &str) -> PathBuf {
        let f = self.files.path().join(format!("{name}.yaml"));
        let yaml = format!(
            "name: {name}\n\
             engine: postgres\n\
             version: 15\n\
             size: 2G\n\
             primary:\n  host: 127.0.0.1\n  port: {}\n  user: {REPL_USER}\n  passwordFile: {password_file}\n\
             {extra}",
            self.primary.port
        );
        std::fs::write(&f, yaml).expect("write the source definition");
        f
    }

    fn write_file(&self, name: &str, content: &str) -> PathBuf {
        let f = self.files.path().join(name);
        std::fs::write(&f, content).expect("write a file");
        f
    }

    /// Appends `n` rows to the ledger, one transaction each, numbered after the last.
    fn append(&self, n: u32) {
        let sql = "INSERT INTO ledger (id) SELECT coalesce(max(id), 0) + 1 FROM ledger;\n"
            .repeat(n as usize);
        self.primary.psql(&sql);
    }

    fn ledger_max(&self) -> i64 {
        self.primary
            .psql("SELECT coalesce(max(id), 0) FROM ledger")
            .parse()
            .expect("a number")
    }
}

/// Appends ledger rows one transaction at a time in the background until dropped.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(host: String, port: u16) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let script = "INSERT INTO ledger (id) SELECT coalesce(max(id), 0) + 1 FROM ledger;\n";
        let thread = std::thread::spawn(move || {
            let dir = tempfile::tempdir().expect("tempdir");
            let f = dir.path().join("append.sql");
            std::fs::write(&f, script).expect("write the pgbench script");
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                // One client: rows are numbered without gaps, one transaction each.
                let out = Command::new("pgbench")
                    .args(["-n", "-c", "1", "-T", "1", "-f"])
                    .arg(&f)
                    .args([
                        "-h",
                        &host,
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "postgres",
                    ])
                    .output()
                    .expect("run pgbench");
                if !out.status.success() {
                    // The primary may be restarting; try again.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// pgbench's own tables and a few seconds of its standard (TPC-B like) writes.
fn pgbench_run(p: &Primary, seconds: u32) {
    common::run_ok(Command::new("pgbench").args([
        "-n",
        "-c",
        "2",
        "-T",
        &seconds.to_string(),
        "-h",
        &p.host(),
        "-p",
        &p.port.to_string(),
        "-U",
        "postgres",
        "postgres",
    ]));
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .trim()
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    (u64::from_str_radix(hi, 16).expect("LSN") << 32) | u64::from_str_radix(lo, 16).expect("LSN")
}

/// The end of the commit record of transaction `xid` in the primary's WAL (where the record
/// after it starts, less a page header in between), read with pg_waldump between `from`
/// and `to`.
fn commit_end(p: &Primary, xid: &str, from: &str, to: &str) -> u64 {
    let wal = p.data.join("pg_wal").display().to_string();
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join("pg_waldump"))
        .args(["-p", &wal, "-s", from, "-e", to])
        .output()
        .expect("run pg_waldump");
    let text = String::from_utf8_lossy(&out.stdout);
    let records: Vec<(u64, String, bool)> = text
        .lines()
        .filter_map(|l| {
            let at = l.split("lsn: ").nth(1)?.split(',').next()?;
            let tx = l.split("tx:").nth(1)?.split(',').next()?.trim().to_string();
            let commit = l.contains("rmgr: Transaction") && l.contains("desc: COMMIT");
            Some((lsn(at), tx, commit))
        })
        .collect();
    let i = records
        .iter()
        .position(|(_, tx, commit)| *commit && tx == xid)
        .unwrap_or_else(|| {
            panic!(
                "no commit of transaction {xid} between {from} and {to} in pg_waldump's output\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let next = records
        .get(i + 1)
        .map(|r| r.0)
        .unwrap_or_else(|| panic!("the commit of {xid} is the last record before {to}"));
    // A record that fills its page to the end is followed by the next page's header (24
    // bytes, 40 at the start of a 16 MiB segment): then it ended at the page boundary.
    const PAGE: u64 = 8192;
    const SEGMENT: u64 = 16 << 20;
    match (next % SEGMENT, next % PAGE) {
        (40, _) => next - 40,
        (_, 24) => next - 24,
        _ => next,
    }
}

fn revisions(show: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = show["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|r| r["number"].as_u64().expect("number"))
        .collect();
    v.sort();
    v
}

fn revision(show: &Value, n: u64) -> &Value {
    show["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .find(|r| r["number"] == n)
        .unwrap_or_else(|| panic!("no revision {n} in {show}"))
}

fn count(conn: &str, sql: &str) -> i64 {
    psql(conn, sql).parse().expect("a number")
}

/// Waits until `check` holds for `source show`, or fails with what it last saw.
fn wait_source(
    site: &Site,
    name: &str,
    limit: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = site.json(&["source", "show", name]);
        if check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "source {name}: {what} did not happen within {limit:?}; last seen {v:#}\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs SQL on the source's own standby, over its private socket.
fn standby_psql(site: &Site, name: &str, sql: &str) -> String {
    let run = site.control().join("run").join(format!("src.{name}"));
    as_postgres_psql(&run, sql)
}

fn as_postgres_psql(socket_dir: &Path, sql: &str) -> String {
    common::run_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--", PSQL, "-X", "-tA", "-h"])
            .arg(socket_dir)
            .args(["-p", "5432", "-U", "postgres", "-d", "postgres", "-c", sql]),
    )
    .trim()
    .to_string()
}

/// The value of `NAME{source="SOURCE"}` on the daemon's /metrics, if present.
fn source_metric(site: &Site, name: &str, source: &str) -> Option<f64> {
    let url = format!("http://{}/metrics", site.api);
    let text = ureq::get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .expect("metrics body");
    let prefix = format!("{name}{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a number"))
}

// ------------------------------------------------------------------ tests

/// The main path: create a source, write with pgbench, refresh while a writer commits one
/// row per transaction, and check a clone of the revision holds exactly the transactions
/// whose commit records end at or before the revision's LSN; the clone is a writable
/// primary on a new timeline that never talks to production.
#[test]
fn a_revision_holds_exactly_what_was_committed_up_to_its_lsn() {
    let s = Setup::new();
    s.primary.pgbench_init(2);
    s.append(100);
    let site = Site::start(&[]);
    let pw = s.files.path().join("repl.pass").display().to_string();
    let def = s.definition("prod", &pw, "refresh: manual\nretain: 4\n");
    let created = site.json(&["source", "create", "-f", &def.display().to_string()]);
    assert_eq!(created["state"], "streaming", "{created:#}");
    assert_eq!(revisions(&created), vec![1]);
    let first_lsn = revision(&created, 1)["lsn"]
        .as_str()
        .expect("lsn")
        .to_string();

    // No password anywhere in the volume: the passfile lives outside it.
    let auto = site
        .control()
        .join("mnt/src.prod/pgdata/postgresql.auto.conf");
    let auto = std::fs::read_to_string(&auto).expect("postgresql.auto.conf");
    assert!(auto.contains("passfile="), "{auto}");
    assert!(
        !auto.contains("s3cret"),
        "the password leaked into the volume: {auto}"
    );

    // pgbench writes, and a writer commits ledger rows one at a time during the refresh.
    pgbench_run(&s.primary, 3);
    let writer = Writer::start(s.primary.host(), s.primary.port);
    std::thread::sleep(Duration::from_millis(1500));
    let rev = site.json(&["source", "refresh", "prod"]);
    std::thread::sleep(Duration::from_millis(1000));
    drop(writer);
    assert_eq!(rev["name"], "prod@2", "{rev:#}");
    let rev_lsn = rev["lsn"].as_str().expect("lsn").to_string();
    let end = s.primary.flush_lsn();

    let c = site.create_clone("prod@2", "at2", &[]);
    assert_eq!(c["image"], "prod@2");
    let conn = site.conn("at2");
    let k = count(&conn, "SELECT coalesce(max(id), 0) FROM ledger");
    assert_eq!(
        count(&conn, "SELECT count(*) FROM ledger"),
        k,
        "the ledger in the clone has gaps"
    );
    assert!(
        k > 100,
        "no row written during the refresh reached the revision ({k})"
    );
    assert!(
        k < s.ledger_max(),
        "the writer wrote nothing after the refresh; the test proves nothing"
    );
    // The commit of row k ends at or before the revision's LSN, the commit of row k+1 after.
    let xids = s.primary.psql(&format!(
        "SELECT string_agg(xmin::text, ',' ORDER BY id) FROM ledger WHERE id IN ({k}, {})",
        k + 1
    ));
    let (xk, xnext) = xids.split_once(',').expect("two rows");
    let in_end = commit_end(&s.primary, xk, &first_lsn, &end);
    let next_end = commit_end(&s.primary, xnext, &first_lsn, &end);
    assert!(
        in_end <= lsn(&rev_lsn) && next_end > lsn(&rev_lsn),
        "revision LSN {rev_lsn}: commit of row {k} ends at {in_end:X}, of row {} at {next_end:X}",
        k + 1
    );
    // The same holds for pgbench's history table: its rows are whole transactions.
    assert!(count(&conn, "SELECT count(*) FROM pgbench_history") > 0);

    // A writable primary of its own, on a new timeline, with no link to production.
    assert_eq!(psql(&conn, "SELECT pg_is_in_recovery()"), "f");
    let tli = psql(
        &conn,
        "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
    );
    assert_ne!(
        tli, "00000001",
        "the clone was not promoted to a new timeline"
    );
    assert_eq!(psql(&conn, "SHOW primary_conninfo"), "");
    psql(&conn, "INSERT INTO ledger (id) VALUES (-1)");
    assert_eq!(
        s.primary.psql("SELECT count(*) FROM ledger WHERE id = -1"),
        "0"
    );

    // Reset goes back to the revision, still promoted and writable.
    let r = site.json(&["clone", "reset", "at2"]);
    assert_eq!(r["state"], "running", "{r:#}");
    assert_eq!(count(&conn, "SELECT count(*) FROM ledger WHERE id = -1"), 0);
    assert_eq!(count(&conn, "SELECT coalesce(max(id), 0) FROM ledger"), k);
    psql(&conn, "INSERT INTO ledger (id) VALUES (-2)");

    // The source keeps following the primary.
    let target = s.primary.flush_lsn();
    let shown = wait_source(&site, "prod", Duration::from_secs(30), "catch up", |v| {
        v["replay_lsn"]
            .as_str()
            .is_some_and(|r| lsn(r) >= lsn(&target))
    });
    assert_eq!(shown["state"], "streaming");
    assert!(shown["lag_bytes"].as_u64().is_some(), "{shown:#}");
    assert_eq!(
        standby_psql(&site, "prod", "SELECT max(id) FROM ledger"),
        s.ledger_max().to_string()
    );

    // A clone of the source's newest revision by name alone.
    let latest = site.create_clone("prod", "latest", &[]);
    assert_eq!(latest["image"], "prod@2");

    // Deleting the source is refused while clones use its revisions.
    let err = site.cli_err(&["source", "delete", "prod"]);
    assert_contains(&err, &["at2", "delete them first"]);
    site.cli_ok(&["clone", "delete", "at2"]);
    site.cli_ok(&["clone", "delete", "latest"]);
    site.cli_ok(&["source", "delete", "prod"]);
    let vols = site.volumes();
    assert!(
        !vols
            .iter()
            .any(|v| v.starts_with("src.") || v.starts_with("rev.")),
        "volumes left after deleting the source: {vols:?}"
    );
    site.stop_and_check_clean();
}

/// Scheduled refreshes happen by themselves; clones of an old revision are not disturbed;
/// retention deletes the oldest revision no clone uses and keeps the one a clone uses;
/// revisions are addressable by time.
#[test]
fn scheduled_refreshes_retention_and_time_addressing() {
    let s = Setup::new();
    s.append(10);
    let site = Site::start(&[]);
    let pw = s.files.path().join("repl.pass").display().to_string();
    let def = s.definition("sched", &pw, "refresh: every 2s\nretain: 2\n");
    site.json(&["source", "create", "-f", &def.display().to_string()]);
    let old = site.create_clone("sched@1", "old", &[]);
    let old_conn = site.conn("old");
    assert_eq!(old["image"], "sched@1");
    assert_eq!(count(&old_conn, "SELECT count(*) FROM ledger"), 10);
    psql(&old_conn, "INSERT INTO ledger (id) VALUES (1000)");

    s.append(5);
    let shown = wait_source(&site, "sched", Duration::from_secs(60), "revision 4", |v| {
        revisions(v).last().is_some_and(|&n| n >= 4)
    });
    let revs = revisions(&shown);
    // The newest two, and revision 1, which clone old uses; 2 and 3 are gone.
    assert_eq!(revs.first(), Some(&1), "{revs:?}");
    assert!(
        !revs.contains(&2),
        "revision 2 outlived retention: {revs:?}"
    );
    assert_eq!(revs.len(), 3, "{revs:?}");
    assert_eq!(revision(&shown, 1)["clones"][0], "old");
    let snaps = site.cli_ok(&["snapshot", "list", "src.sched"]);
    assert!(!snaps.contains("src.sched@r2"), "{snaps}");

    // The old clone was not disturbed by the refreshes.
    assert_eq!(site.clone_show("old")["state"], "running");
    assert_eq!(count(&old_conn, "SELECT count(*) FROM ledger"), 11);

    // The newest revision has the rows written since; addressable by time too.
    let newest = *revs.last().expect("a revision");
    let r = revision(&shown, newest);
    let made = r["created_unix"].as_u64().expect("created_unix");
    let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(made))
        .to_string()
        .trim_end_matches('Z')
        .to_string();
    let c = site.create_clone(&format!("sched@{at}"), "bytime", &[]);
    assert_eq!(c["image"], format!("sched@{newest}"));
    assert_eq!(
        count(&site.conn("bytime"), "SELECT count(*) FROM ledger"),
        15
    );
    let err = site.cli_err(&["clone", "create", "sched@2001-01-01T00:00", "x"]);
    assert_contains(&err, &["sched", "no revision"]);
    let err = site.cli_err(&["clone", "create", "sched@2", "x"]);
    assert_contains(&err, &["no revision 2", "sched@1"]);

    // A clone of a revision keeps it past retention: deleting the clone lets it go.
    site.cli_ok(&["clone", "delete", "old"]);
    let gone = wait_source(
        &site,
        "sched",
        Duration::from_secs(30),
        "revision 1 to go",
        |v| !revisions(v).contains(&1),
    );
    assert!(revisions(&gone).len() <= 3);
    site.stop_and_check_clean();
}

/// The standby rides out a restart of the primary and a restart of the daemon (clean and
/// killed), and catches up afterwards.
#[test]
fn the_standby_survives_primary_and_daemon_restarts() {
    let s = Setup::new();
    s.append(10);
    let mut site = Site::start(&[]);
    let pw = s.files.path().join("repl.pass").display().to_string();
    let def = s.definition("ha", &pw, "refresh: manual\n");
    site.json(&["source", "create", "-f", &def.display().to_string()]);

    site.json(&["source", "show", "ha"]);
    assert_eq!(
        source_metric(&site, "blockd_source_streaming", "ha"),
        Some(1.0)
    );
    let refreshed = source_metric(&site, "blockd_source_last_refresh_timestamp_seconds", "ha")
        .expect("last refresh time of ha on /metrics");
    assert!((refreshed - now_unix() as f64).abs() < 120.0, "{refreshed}");
    s.primary.stop();
    wait_source(
        &site,
        "ha",
        Duration::from_secs(30),
        "notice the primary is gone",
        |v| v["state"] == "disconnected",
    );
    // `source show` measured it: the gauge says so too.
    assert_eq!(
        source_metric(&site, "blockd_source_streaming", "ha"),
        Some(0.0)
    );
    s.primary.start_again();
    s.append(7);
    let target = s.primary.flush_lsn();
    let v = wait_source(
        &site,
        "ha",
        Duration::from_secs(60),
        "reconnect and catch up",
        |v| {
            v["state"] == "streaming"
                && v["replay_lsn"]
                    .as_str()
                    .is_some_and(|r| lsn(r) >= lsn(&target))
        },
    );
    assert_eq!(v["lag_bytes"], 0, "{v:#}");
    assert_eq!(
        source_metric(&site, "blockd_source_lag_bytes", "ha"),
        Some(0.0)
    );
    assert_eq!(
        source_metric(&site, "blockd_source_streaming", "ha"),
        Some(1.0)
    );
    assert_eq!(
        standby_psql(&site, "ha", "SELECT count(*) FROM ledger"),
        "17"
    );

    for graceful in [true, false] {
        site.restart(graceful);
        s.append(3);
        let target = s.primary.flush_lsn();
        wait_source(
            &site,
            "ha",
            Duration::from_secs(60),
            "come back after a daemon restart",
            |v| {
                v["state"] == "streaming"
                    && v["replay_lsn"]
                        .as_str()
                        .is_some_and(|r| lsn(r) >= lsn(&target))
            },
        );
    }
    let rev = site.json(&["source", "refresh", "ha"]);
    let name = rev["name"].as_str().expect("name").to_string();
    site.create_clone(&name, "after", &[]);
    assert_eq!(
        count(&site.conn("after"), "SELECT count(*) FROM ledger"),
        23
    );
    site.stop_and_check_clean();
}

/// With a post-script, every revision is masked; the source's standby keeps the original
/// data, and the unmasked snapshot the revision was made from cannot be cloned.
#[test]
fn masking_applies_to_revisions_not_to_the_source() {
    let s = Setup::new();
    s.primary.psql(
        "CREATE TABLE customers (id int PRIMARY KEY, email text);\
         INSERT INTO customers SELECT g, 'person' || g || '@real.example' FROM generate_series(1, 50) g",
    );
    s.write_file(
        "mask.sql",
        "UPDATE customers SET email = 'user' || id || '@masked.invalid';\n",
    );
    let site = Site::start(&[]);
    let pw = s.files.path().join("repl.pass").display().to_string();
    let def = s.definition("m", &pw, "postScript: mask.sql\n");
    let shown = site.json(&["source", "create", "-f", &def.display().to_string()]);
    assert_eq!(shown["masked"], true);
    assert_eq!(revision(&shown, 1)["masked"], true);

    site.create_clone("m@1", "dev", &[]);
    let conn = site.conn("dev");
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM customers WHERE email LIKE '%@real.example'"
        ),
        0,
        "a clone of a masked revision shows production e-mail addresses"
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM customers"), 50);
    assert_eq!(
        standby_psql(
            &site,
            "m",
            "SELECT count(*) FROM customers WHERE email LIKE '%@real.example'"
        ),
        "50",
        "the source itself was masked"
    );
    // The raw snapshot is hidden: no clone of it can be made.
    let err = site.cli_err(&["volume", "clone", "src.m@r1", "peek"]);
    assert!(err.contains("src.m@r1"), "{err}");
    // A second revision is masked too, and sees new production rows.
    s.primary
        .psql("INSERT INTO customers VALUES (51, 'new@real.example')");
    let target = s.primary.flush_lsn();
    wait_source(&site, "m", Duration::from_secs(30), "catch up", |v| {
        v["replay_lsn"]
            .as_str()
            .is_some_and(|r| lsn(r) >= lsn(&target))
    });
    site.json(&["source", "refresh", "m"]);
    site.create_clone("m@2", "dev2", &[]);
    let conn2 = site.conn("dev2");
    assert_eq!(count(&conn2, "SELECT count(*) FROM customers"), 51);
    assert_eq!(
        count(
            &conn2,
            "SELECT count(*) FROM customers WHERE email LIKE '%@real.example'"
        ),
        0
    );
    site.stop_and_check_clean();
}

/// Bad definitions and requests get clear errors and leave nothing behind.
#[test]
fn bad_source_input_is_refused_and_leaves_nothing_behind() {
    let s = Setup::new();
    let site = Site::start(&[]);
    let wrong = s.write_file("wrong.pass", "not the password\n");
    let def = s.definition("bad", &wrong.display().to_string(), "");
    let err = site.cli_err(&["source", "create", "-f", &def.display().to_string()]);
    assert_contains(&err, &["pg_basebackup", "password authentication failed"]);
    assert!(
        site.json(&["source", "list"])
            .as_array()
            .expect("list")
            .is_empty()
    );
    assert!(
        !site.volumes().iter().any(|v| v.starts_with("src.")),
        "{:?}",
        site.volumes()
    );
    assert!(
        site.leftovers(None).is_empty(),
        "{:?}",
        site.leftovers(None)
    );

    let def = s.definition("bad", "/nonexistent/pass", "");
    let err = site.cli_err(&["source", "create", "-f", &def.display().to_string()]);
    assert_contains(&err, &["/nonexistent/pass", "passwordFile"]);

    let pw = s.files.path().join("repl.pass").display().to_string();
    let def = s.definition("bad", &pw, "refresh: sometimes\n");
    let err = site.cli_err(&["source", "create", "-f", &def.display().to_string()]);
    assert_contains(&err, &["sometimes", "every"]);

    let def = s.definition("bad", &pw, "password: hunter2\n");
    let err = site.cli_err(&["source", "create", "-f", &def.display().to_string()]);
    assert_contains(&err, &["not a valid source definition", "password"]);

    let def = s.definition("none", &pw, "refresh: none\n");
    let v = site.json(&["source", "create", "-f", &def.display().to_string()]);
    assert!(revisions(&v).is_empty());
    let err = site.cli_err(&["source", "refresh", "none"]);
    assert_contains(&err, &["refresh: none"]);
    let err = site.cli_err(&["clone", "create", "none", "x"]);
    assert_contains(&err, &["no revision yet"]);
    let err = site.cli_err(&["clone", "create", "nosuch@1", "x"]);
    assert_contains(&err, &["no image or source named nosuch"]);
    let err = site.cli_err(&["volume", "create", "src.mine", "--size", "1G"]);
    assert_contains(&err, &["reserved"]);
    let err = site.cli_err(&["source", "show", "nosuch"]);
    assert_contains(&err, &["source nosuch not found"]);
    site.stop_and_check_clean();
}
