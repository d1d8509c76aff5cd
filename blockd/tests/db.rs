//! Database images and clones end to end: a real daemon, real PostgreSQL 15 run as the
//! `postgres` OS user on mounted clones (nbdfuse + loop devices), and real clients (psql
//! over TCP with each clone's password, pgbench, pg_basebackup).
//!
//! Every test runs its own daemon on its own ports and clone port range. [`Site`] owns the
//! daemon; when dropped it stops it (SIGTERM: the daemon stops its clones), and then removes
//! whatever a killed daemon could have left under the test's own data directory: PostgreSQL
//! servers, mounts, loop devices, FUSE files and nbdfuse processes. Nothing outside that
//! directory is touched.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pg::*;
use serde_json::{Value, json};

// ------------------------------------------------------------------ tests

/// The quickstart: the demo image (pgbench data, a customers table, masking post-script),
/// two clones that are independent, reachable over TCP with their password, run by the
/// postgres OS user.
#[test]
fn demo_image_and_two_independent_masked_clones() {
    let site = Site::start(&[]);
    let img = site.build(&demo_yaml());
    assert_eq!(img["name"], "demo");
    assert_eq!(img["state"], "ready", "{img}");

    let list = site.json(&["image", "list"]);
    let demo = &list[0];
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(demo["state"], "ready");
    assert_eq!(demo["source"], "empty");
    assert_eq!(demo["tags"], json!(["demo", "pgbench"]));
    assert_eq!(demo["version"], 15);
    assert_eq!(demo["size_bytes"], 2u64 << 30);
    // pgbench scale 5 plus 10000 customers: tens of MiB at least.
    assert!(
        demo["data_bytes"].as_u64().unwrap_or(0) > 50 << 20,
        "data_bytes: {demo}"
    );
    let table = site.cli_ok(&["image", "list"]);
    assert_contains(
        &table,
        &["NAME", "DATA", "SOURCE", "demo", "ready", "demo,pgbench"],
    );

    let a = site.create_clone("demo", "a", &[]);
    let b = site.create_clone("demo", "b", &[]);
    let (pa, pb) = (
        a["port"].as_u64().expect("port") as u16,
        b["port"].as_u64().expect("port") as u16,
    );
    assert_ne!(pa, pb);
    for p in [pa, pb] {
        assert!(
            (site.ports.0..=site.ports.1).contains(&p),
            "port {p} outside --clone-ports {:?}",
            site.ports
        );
    }
    let (ca, cb) = (site.conn("a"), site.conn("b"));
    assert!(
        ca.starts_with("postgresql://postgres:")
            && ca.ends_with(&format!("@127.0.0.1:{pa}/postgres")),
        "{ca}"
    );
    assert_ne!(ca, cb, "each clone has its own password");

    // Masking ran before the image was frozen, in both clones.
    for c in [&ca, &cb] {
        assert_eq!(
            psql(
                c,
                "SELECT count(*), count(*) FILTER (WHERE email LIKE '%@masked.invalid') FROM customers"
            ),
            "10000|10000"
        );
        assert_eq!(psql(c, "SELECT count(*) FROM pgbench_accounts"), "500000");
    }

    // Clones are independent.
    psql(
        &ca,
        "UPDATE customers SET email = 'changed@a.example' WHERE id = 1",
    );
    assert_eq!(
        psql(&ca, "SELECT email FROM customers WHERE id = 1"),
        "changed@a.example"
    );
    assert_eq!(
        psql(&cb, "SELECT email FROM customers WHERE id = 1"),
        "user1@masked.invalid"
    );

    // TCP needs the password: without it, or with a wrong one, connecting fails.
    let no_pw = format!("host=127.0.0.1 port={pa} user=postgres dbname=postgres");
    let e = try_psql(&no_pw, "SELECT 1").expect_err("no password must be refused");
    assert_contains(&e, &["password"]);
    let wrong = format!("postgresql://postgres:wrong@127.0.0.1:{pa}/postgres");
    let e = try_psql(&wrong, "SELECT 1").expect_err("a wrong password must be refused");
    assert_contains(&e, &["password authentication failed"]);

    // The database runs as the postgres OS user, on the clone's mounted volume.
    let uid = postgres_uid();
    for (name, conn) in [("a", &ca), ("b", &cb)] {
        let volume = format!("cln.{name}");
        let pid = site.postmaster_pid(&volume);
        assert_eq!(process_uid(pid), uid, "postmaster {pid} of clone {name}");
        let data_directory = psql(conn, "SHOW data_directory");
        assert_eq!(
            PathBuf::from(&data_directory),
            site.control().join("mnt").join(&volume).join("pgdata")
        );
        assert_eq!(
            mounts_under(&format!(
                "{}/",
                Path::new(&data_directory).parent().expect("mnt").display()
            ))
            .len(),
            1
        );
    }

    let clones = site.json(&["clone", "list"]);
    assert_eq!(clones.as_array().map(Vec::len), Some(2), "{clones}");
    for c in clones.as_array().into_iter().flatten() {
        assert_eq!(c["state"], "running", "{c}");
        assert_eq!(c["image"], "demo");
        assert!(c["unique_bytes"].as_u64().unwrap_or(0) > 0, "{c}");
        assert!(
            c["device"].as_str().unwrap_or("").starts_with("/dev/loop"),
            "{c}"
        );
    }
    let table = site.cli_ok(&["clone", "list"]);
    assert_contains(
        &table,
        &[
            "PORT",
            "STATE",
            "UNIQUE",
            "running",
            &pa.to_string(),
            &pb.to_string(),
        ],
    );
    let img = site.json(&["image", "show", "demo"]);
    assert_eq!(img["clones"], json!(["a", "b"]));

    site.cli_ok(&["clone", "delete", "a"]);
    assert!(
        site.leftovers(Some("cln.a")).is_empty(),
        "{:?}",
        site.leftovers(Some("cln.a"))
    );
    assert!(!site.volumes().contains(&"cln.a".to_string()));
    assert_eq!(psql(&cb, "SELECT 1"), "1");
    site.stop_and_check_clean();
}

/// Images from a running primary's `pg_basebackup`, plain and tar: the clone has the
/// primary's data and is a writable primary of its own.
#[test]
fn images_from_plain_and_tar_basebackups() {
    let site = Site::start(&[]);
    let primary = Primary::start();
    primary.pgbench_init(1);
    primary.psql("CREATE TABLE marker (v text); INSERT INTO marker VALUES ('from the primary')");

    let backups = tempfile::Builder::new()
        .prefix("blockd-backups-")
        .tempdir()
        .expect("tempdir");
    let plain = backups.path().join("plain");
    let tar = backups.path().join("tar");
    primary.basebackup(&plain, "p");
    primary.basebackup(&tar, "t");
    assert!(plain.join("PG_VERSION").exists());
    assert!(tar.join("base.tar").exists() && tar.join("pg_wal.tar").exists());
    // Written after the backups: must not be in the images.
    primary.psql("INSERT INTO marker VALUES ('after the backup')");

    for (name, dir) in [("fromplain", &plain), ("fromtar", &tar)] {
        let yaml = backups.path().join(format!("{name}.yaml"));
        std::fs::write(
            &yaml,
            format!(
                "name: {name}\nsourceType: backup\nbackup: {}\nengine: postgres\nversion: 15\n\
                 size: 512M\ntags: [backup]\n",
                dir.display()
            ),
        )
        .expect("write yaml");
        let img = site.build(&yaml);
        assert_eq!(img["state"], "ready", "{img}");
        assert_eq!(img["source"], format!("backup {}", dir.display()));

        let clone = format!("{name}-c");
        site.create_clone(name, &clone, &[]);
        let c = site.conn(&clone);
        assert_eq!(psql(&c, "SELECT count(*) FROM pgbench_accounts"), "100000");
        assert_eq!(
            psql(&c, "SELECT string_agg(v, ',') FROM marker"),
            "from the primary"
        );
        assert_eq!(
            psql(&c, "SELECT pg_is_in_recovery()"),
            "f",
            "a primary, not a standby"
        );
        psql(
            &c,
            "INSERT INTO marker VALUES ('written in the clone'); CREATE TABLE t (x int)",
        );
        assert_eq!(psql(&c, "SELECT count(*) FROM marker"), "2");
        assert_eq!(
            process_uid(site.postmaster_pid(&format!("cln.{clone}"))),
            postgres_uid()
        );
    }
    // The primary is untouched by its clones.
    assert_eq!(primary.psql("SELECT count(*) FROM marker"), "2");
    assert_eq!(primary.psql("SELECT to_regclass('t') IS NULL"), "t");
    drop(primary);
    site.stop_and_check_clean();
}

/// `clone reset` throws away the clone's changes; port and password stay.
#[test]
fn reset_discards_changes_and_keeps_port_and_password() {
    let site = Site::start(&[]);
    site.build(&fixture("small.yaml"));
    let before = site.create_clone("small", "dev", &[]);
    let conn = site.conn("dev");
    psql(
        &conn,
        "DELETE FROM items WHERE id <= 500; CREATE TABLE scratch (x int)",
    );
    assert_eq!(psql(&conn, "SELECT count(*) FROM items"), "500");

    let after = site.json(&["clone", "reset", "dev"]);
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["port"], before["port"]);
    assert_eq!(after["connection"], before["connection"]);
    assert_eq!(psql(&conn, "SELECT count(*) FROM items"), "1000");
    assert_eq!(psql(&conn, "SELECT to_regclass('scratch') IS NULL"), "t");
    // Still a working clone after the reset: writable, and reset again.
    psql(&conn, "INSERT INTO items VALUES (1001, 'new')");
    site.json(&["clone", "reset", "dev"]);
    assert_eq!(psql(&conn, "SELECT count(*) FROM items"), "1000");
    site.stop_and_check_clean();
}

/// `clone save A img` then `clone create img C`: C starts from A's state; A keeps running
/// with its data.
#[test]
fn save_makes_an_image_from_a_running_clone() {
    let site = Site::start(&[]);
    site.build(&fixture("small.yaml"));
    site.create_clone("small", "a", &[]);
    let ca = site.conn("a");
    psql(
        &ca,
        "UPDATE items SET v = 'saved' WHERE id = 7; CREATE TABLE extra AS SELECT 42 AS x",
    );

    let img = site.json(&["clone", "save", "a", "small-v2"]);
    assert_eq!(img["name"], "small-v2");
    assert_eq!(img["state"], "ready");
    assert_eq!(img["source"], "clone a of small");
    let a = site.clone_show("a");
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(psql(&ca, "SELECT v FROM items WHERE id = 7"), "saved");

    // A second save right after the first.
    let img3 = site.json(&["clone", "save", "a", "small-v3"]);
    assert_eq!(img3["state"], "ready");

    site.create_clone("small-v2", "c", &[]);
    let cc = site.conn("c");
    assert_eq!(psql(&cc, "SELECT v FROM items WHERE id = 7"), "saved");
    assert_eq!(psql(&cc, "SELECT x FROM extra"), "42");
    // Later changes in A do not reach the image or C, and C's do not reach A.
    psql(&ca, "UPDATE items SET v = 'after save' WHERE id = 7");
    psql(&cc, "UPDATE items SET v = 'in c' WHERE id = 8");
    assert_eq!(psql(&cc, "SELECT v FROM items WHERE id = 7"), "saved");
    assert_eq!(psql(&ca, "SELECT v FROM items WHERE id = 8"), "item 8");
    assert_eq!(psql(&ca, "SELECT v FROM items WHERE id = 7"), "after save");
    // The clone of the original image is unaffected.
    site.create_clone("small", "d", &[]);
    assert_eq!(
        psql(&site.conn("d"), "SELECT v FROM items WHERE id = 7"),
        "item 7"
    );

    // The saved image outlives the clone it came from.
    site.cli_ok(&["clone", "delete", "a"]);
    site.cli_ok(&["clone", "delete", "c"]);
    site.create_clone("small-v2", "e", &[]);
    assert_eq!(
        psql(&site.conn("e"), "SELECT v FROM items WHERE id = 7"),
        "saved"
    );
    site.cli_ok(&["clone", "delete", "e"]);
    site.cli_ok(&["image", "delete", "small-v2"]);
    site.cli_ok(&["image", "delete", "small-v3"]);
    assert_eq!(site.image_names(), vec!["small".to_string()]);
    site.stop_and_check_clean();
}

/// Data persists across `clone stop` / `clone start`; the state shows it.
#[test]
fn stop_and_start_keep_the_data() {
    let site = Site::start(&[]);
    site.build(&fixture("small.yaml"));
    let before = site.create_clone("small", "dev", &[]);
    let conn = site.conn("dev");
    psql(&conn, "INSERT INTO items VALUES (5000, 'kept')");

    let stopped = site.json(&["clone", "stop", "dev"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["device"], Value::Null);
    assert_eq!(site.clone_show("dev")["state"], "stopped");
    assert!(
        try_psql(&conn, "SELECT 1").is_err(),
        "a stopped clone accepts no connections"
    );
    assert!(
        site.leftovers(Some("cln.dev")).is_empty(),
        "{:?}",
        site.leftovers(Some("cln.dev"))
    );
    let table = site.cli_ok(&["clone", "list"]);
    assert_contains(&table, &["dev", "stopped"]);

    let started = site.json(&["clone", "start", "dev"]);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["port"], before["port"]);
    assert_eq!(psql(&conn, "SELECT v FROM items WHERE id = 5000"), "kept");
    // Starting a running clone is harmless.
    assert_eq!(site.json(&["clone", "start", "dev"])["state"], "running");

    // Its database dies (killed like by the OOM killer): the clone is down, and `clone
    // start` brings it back with its data.
    let pid = site.postmaster_pid("cln.dev");
    signal(pid, libc::SIGKILL);
    assert!(wait_gone(&[pid], Duration::from_secs(10)));
    site.wait_state("dev", "down", Duration::from_secs(10));
    let started = site.json(&["clone", "start", "dev"]);
    assert_eq!(
        started["state"],
        "running",
        "{started}\n{}",
        site.log_tail()
    );
    assert_eq!(psql(&conn, "SELECT v FROM items WHERE id = 5000"), "kept");
    site.stop_and_check_clean();
}

/// `--lifetime` clones and `lifetime:` images expire; an image waits for its clones.
#[test]
fn expired_clones_and_images_are_deleted() {
    let site = Site::start(&["--expiry-interval", "1s"]);
    site.build(&fixture("small.yaml"));
    let t = site.create_clone("small", "temp", &["--lifetime", "3s"]);
    let left = t["lifetime_left_seconds"].as_u64().expect("lifetime left");
    assert!((1..=3).contains(&left), "{t}");
    let temp_conn = site.conn("temp");

    // Built right away, and cloned right away: its 3 s start when the build ends.
    let brief = site.build(&fixture("brief.yaml"));
    site.create_clone("brief", "keep", &[]);
    let expires = brief["expires_unix"].as_u64().expect("brief expires");

    let deadline = Instant::now() + Duration::from_secs(30);
    while site.clone_names().contains(&"temp".to_string()) {
        assert!(
            Instant::now() < deadline,
            "clone temp did not expire\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let e = site.cli_err(&["clone", "show", "temp"]);
    assert_contains(&e, &["clone temp not found"]);
    assert!(!site.volumes().contains(&"cln.temp".to_string()));
    assert!(
        site.leftovers(Some("cln.temp")).is_empty(),
        "{:?}",
        site.leftovers(Some("cln.temp"))
    );
    assert!(!site.control().join("mnt/cln.temp").exists());
    assert!(try_psql(&temp_conn, "SELECT 1").is_err());

    // Past the image's expiry (and a few expiry passes): kept while `keep` uses it.
    while now_unix() < expires + 3 {
        std::thread::sleep(Duration::from_millis(250));
    }
    let img = site.json(&["image", "show", "brief"]);
    assert_eq!(img["clones"], json!(["keep"]));
    assert_eq!(
        psql(&site.conn("keep"), "SELECT count(*) FROM items"),
        "1000"
    );

    site.cli_ok(&["clone", "delete", "keep"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while site.image_names().contains(&"brief".to_string()) {
        assert!(
            Instant::now() < deadline,
            "image brief did not expire\n{}",
            site.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!site.volumes().contains(&"img.brief".to_string()));
    // The image without a lifetime stays.
    assert_eq!(site.image_names(), vec!["small".to_string()]);
    site.stop_and_check_clean();
}

/// Tokens: open until the first (admin) token; then 401 without one; user tokens see and
/// manage only their own clones and get 403 on admin routes.
#[test]
fn tokens_roles_and_clone_ownership() {
    let site = Site::start(&[]);
    let api = site.api.clone();
    // No token configured: open.
    site.cli_ok(&["image", "list"]);
    assert_eq!(http(&api, "GET", "/v1/volumes", None, Value::Null).0, 200);

    // The first token must be an admin (the CLI's default role is user).
    let e = site.cli_err(&["token", "create", "first"]);
    assert_contains(
        &e,
        &["first token must have the admin role", "--role admin"],
    );
    let e = site.cli_err(&["token", "create", "first", "--role", "user"]);
    assert_contains(&e, &["first token must have the admin role"]);
    let e = site.cli_err(&["token", "create", "first", "--role", "boss"]);
    assert_contains(&e, &["admin or user"]);
    site.cli_ok(&["image", "list"]);

    let root = site.json(&["token", "create", "root", "--role", "admin"]);
    let root = root["token"].as_str().expect("token").to_string();
    assert!(root.starts_with("bd_"), "{root}");

    // Now a token is needed.
    let e = site.cli_err(&["image", "list"]);
    assert_contains(&e, &["--token", "BLOCKD_TOKEN"]);
    let (st, body) = http(&api, "GET", "/v1/images", None, Value::Null);
    assert_eq!(st, 401, "{body}");
    assert_eq!(body["error"]["kind"], "unauthorized");
    let (st, _) = http(&api, "GET", "/v1/clones", Some("bd_wrong"), Value::Null);
    assert_eq!(st, 401);
    assert_contains(&site.err_as("bd_wrong", &["clone", "list"]), &["not valid"]);
    assert_eq!(http(&api, "GET", "/v1/health", None, Value::Null).0, 200);

    site.json_as(
        &root,
        &[
            "image",
            "create",
            "-f",
            &fixture("small.yaml").display().to_string(),
        ],
    );
    let alice = site.json_as(&root, &["token", "create", "alice", "--role", "user"]);
    let alice = alice["token"].as_str().expect("token").to_string();
    let bob = site.json_as(&root, &["token", "create", "bob", "--role", "user"]);
    let bob = bob["token"].as_str().expect("token").to_string();

    // A user lists images and creates clones; it sees only its own.
    let imgs = site.json_as(&alice, &["image", "list"]);
    assert_eq!(names(&imgs), vec!["small".to_string()]);
    let a1 = site.json_as(&alice, &["clone", "create", "small", "a1"]);
    assert_eq!(a1["owner"], "alice");
    assert_eq!(a1["state"], "running");
    site.json_as(&bob, &["clone", "create", "small", "b1"]);
    assert_eq!(
        names(&site.json_as(&alice, &["clone", "list"])),
        vec!["a1".to_string()]
    );
    assert_eq!(
        names(&site.json_as(&bob, &["clone", "list"])),
        vec!["b1".to_string()]
    );
    let conn = site.json_as(&alice, &["clone", "show", "a1"])["connection"]
        .as_str()
        .expect("connection")
        .to_string();
    assert_eq!(psql(&conn, "SELECT count(*) FROM items"), "1000");

    // Another user's clone does not exist for alice.
    let (st, body) = http(&api, "GET", "/v1/clones/b1", Some(&alice), Value::Null);
    assert_eq!(st, 404, "{body}");
    let (st, _) = http(&api, "DELETE", "/v1/clones/b1", Some(&alice), Value::Null);
    assert_eq!(st, 404);
    let (st, _) = http(&api, "POST", "/v1/clones/b1/reset", Some(&alice), json!({}));
    assert_eq!(st, 404);
    assert_contains(
        &site.err_as(&alice, &["clone", "stop", "b1"]),
        &["clone b1 not found"],
    );

    // Admin routes: 403 with a message.
    let e = site.err_as(
        &alice,
        &[
            "image",
            "create",
            "-f",
            &fixture("brief.yaml").display().to_string(),
        ],
    );
    assert_contains(&e, &["admin token"]);
    let e = site.err_as(&alice, &["volume", "list"]);
    assert_contains(&e, &["admin token"]);
    let e = site.err_as(&alice, &["token", "create", "mallory", "--role", "admin"]);
    assert_contains(&e, &["admin token"]);
    for (method, path, body) in [
        (
            "POST",
            "/v1/images",
            json!({"name": "x", "sourceType": "empty", "engine": "postgres", "version": 15, "size": "256M"}),
        ),
        ("GET", "/v1/volumes", Value::Null),
        (
            "POST",
            "/v1/tokens",
            json!({"name": "mallory", "role": "admin"}),
        ),
        ("GET", "/v1/tokens", Value::Null),
        ("DELETE", "/v1/images/small", Value::Null),
        ("POST", "/v1/clones/a1/save", json!({"image": "mine"})),
    ] {
        let (st, b) = http(&api, method, path, Some(&alice), body);
        assert_eq!(st, 403, "{method} {path}: {b}");
        assert_eq!(b["error"]["kind"], "forbidden", "{b}");
    }
    assert_eq!(
        names(&site.json_as(&root, &["image", "list"])),
        vec!["small".to_string()]
    );

    // The admin sees everything.
    let all = site.json_as(&root, &["clone", "list"]);
    let owners: HashSet<(String, String)> = all
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["owner"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        owners,
        HashSet::from([("a1".into(), "alice".into()), ("b1".into(), "bob".into())])
    );
    assert_eq!(names(&site.json_as(&root, &["token", "list"])).len(), 3);

    // The last admin token cannot go; with a second admin it can.
    let e = site.err_as(&root, &["token", "delete", "root"]);
    assert_contains(&e, &["last admin token"]);
    let root2 = site.json_as(&root, &["token", "create", "root2", "--role", "admin"]);
    let root2 = root2["token"].as_str().expect("token").to_string();
    site.json_as(&root2, &["token", "delete", "root"]);
    assert_eq!(
        http(&api, "GET", "/v1/images", Some(&root), Value::Null).0,
        401
    );

    // Users delete their own clones.
    site.json_as(&alice, &["clone", "delete", "a1"]);
    assert_eq!(
        names(&site.json_as(&root2, &["clone", "list"])),
        vec!["b1".to_string()]
    );
    site.stop_and_check_clean();
}

/// SIGTERM: the daemon stops its clones cleanly; at the next start they run again on the
/// same ports, with their data and passwords.
#[test]
fn clones_come_back_after_a_clean_restart() {
    let mut site = Site::start(&[]);
    site.build(&fixture("small.yaml"));
    let x = site.create_clone("small", "x", &[]);
    let y = site.create_clone("small", "y", &[]);
    site.create_clone("small", "z", &[]);
    site.json(&["clone", "stop", "z"]);
    let (cx, cy) = (site.conn("x"), site.conn("y"));
    psql(&cx, "INSERT INTO items VALUES (2000, 'x before restart')");
    psql(&cy, "DELETE FROM items WHERE id = 1");

    site.restart(true);
    for (name, before) in [("x", &x), ("y", &y)] {
        let v = site.wait_state(name, "running", Duration::from_secs(120));
        assert_eq!(v["port"], before["port"]);
        assert_eq!(v["connection"], before["connection"]);
    }
    assert_eq!(
        psql(&cx, "SELECT v FROM items WHERE id = 2000"),
        "x before restart"
    );
    assert_eq!(psql(&cy, "SELECT count(*) FROM items"), "999");
    // A stopped clone stays stopped.
    assert_eq!(site.clone_show("z")["state"], "stopped");
    assert!(site.leftovers(Some("cln.z")).is_empty());
    site.stop_and_check_clean();
}

/// SIGKILL: PostgreSQL, mounts, loop devices and nbdfuse are left behind; the next start
/// cleans them up and runs the clones again; committed rows survive.
#[test]
fn clones_come_back_after_the_daemon_is_killed() {
    let mut site = Site::start(&[]);
    site.build(&fixture("small.yaml"));
    let x = site.create_clone("small", "x", &[]);
    let y = site.create_clone("small", "y", &[]);
    let (cx, cy) = (site.conn("x"), site.conn("y"));
    psql(
        &cx,
        "INSERT INTO items VALUES (3000, 'committed before the kill')",
    );
    psql(&cy, "UPDATE items SET v = 'y changed' WHERE id = 2");

    let attach = format!("{}/", site.control().join("attach").display());
    let mnt = format!("{}/", site.control().join("mnt").display());
    let old_pg: Vec<u32> = ["cln.x", "cln.y"]
        .iter()
        .map(|v| site.postmaster_pid(v))
        .collect();
    let old_fuse: Vec<u32> = procs("nbdfuse", &attach).iter().map(|p| p.pid).collect();
    assert_eq!(old_fuse.len(), 2, "one nbdfuse per clone");

    site.restart(false);
    // Until the daemon has cleaned up after the crash, the old servers (on storage that
    // died with the daemon) are not reported as running, and the clones are not touched.
    // (On a loaded machine reconcile may already be done with y: then the log says so.)
    let adopted = |site: &Site| site.log().contains("clone adopted: running again clone=y");
    let early = site.clone_show("y");
    if early["state"] != "starting" {
        assert!(
            adopted(&site),
            "y is {} before reconcile adopted it",
            early["state"]
        );
    }
    let stop = site.cli(&["clone", "stop", "y"]);
    if stop.status.success() {
        assert!(
            adopted(&site),
            "clone stop y went through before reconcile adopted it"
        );
        site.cli_ok(&["clone", "start", "y"]);
    } else {
        assert_contains(&String::from_utf8_lossy(&stop.stderr), &["busy", "retry"]);
    }
    for (name, before) in [("x", &x), ("y", &y)] {
        let v = site.wait_state(name, "running", Duration::from_secs(120));
        assert_eq!(v["port"], before["port"]);
    }
    assert_eq!(
        psql(&cx, "SELECT v FROM items WHERE id = 3000"),
        "committed before the kill"
    );
    assert_eq!(psql(&cy, "SELECT v FROM items WHERE id = 2"), "y changed");
    // The old servers and nbdfuse processes are gone; exactly one of each per clone is left.
    assert!(
        old_pg
            .iter()
            .all(|&p| !alive(p) || !procs("postgres", &mnt).iter().any(|q| q.pid == p)),
        "old postmasters {old_pg:?} still run"
    );
    assert!(
        wait_gone(&old_fuse, Duration::from_secs(10)),
        "old nbdfuse {old_fuse:?} still run"
    );
    let new_pg: Vec<u32> = ["cln.x", "cln.y"]
        .iter()
        .map(|v| site.postmaster_pid(v))
        .collect();
    assert!(new_pg.iter().all(|p| !old_pg.contains(p)));
    let mounts = mounts_under(&mnt);
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    let loops = loops_under(&attach);
    assert_eq!(loops.len(), 2, "{loops:?}");
    let fuse_mounts = mounts_under(&attach);
    assert_eq!(fuse_mounts.len(), 2, "{fuse_mounts:?}");
    assert_eq!(procs("nbdfuse", &attach).len(), 2);
    for name in ["x", "y"] {
        let dev = site.clone_show(name)["device"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            loops.iter().any(|(d, _)| *d == dev),
            "{name}: {dev} not in {loops:?}"
        );
    }
    // The restarted clones work as clones: writes, reset.
    site.json(&["clone", "reset", "y"]);
    assert_eq!(psql(&cy, "SELECT v FROM items WHERE id = 2"), "item 2");
    site.stop_and_check_clean();
}

/// Bad input is refused with a message that says what to fix, and leaves nothing behind.
#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    let site = Site::start(&[]);
    let f = |n: &str| fixture(n).display().to_string();

    // With the test directory private (0700) the postgres user could not reach the data
    // directory: the daemon says so up front.
    site.chmod_dir(0o700);
    let e = site.cli_err(&["image", "create", "-f", &f("small.yaml")]);
    assert_contains(&e, &["not searchable by the postgres user", "chmod o+x"]);
    assert!(site.image_names().is_empty());
    site.make_reachable();

    for (file, expected) in [
        (
            "bad-syntax.yaml",
            &["bad-syntax.yaml is not a valid image definition", "line"][..],
        ),
        (
            "bad-unknown-field.yaml",
            &["unknown field `colour`", "Fields: name, sourceType"],
        ),
        ("bad-missing-field.yaml", &["missing field `version`"]),
        (
            "bad-backup-missing.yaml",
            &["sourceType backup needs `backup:`"],
        ),
        (
            "bad-version.yaml",
            &["PostgreSQL 99", "not installed", "installed versions: 15"],
        ),
        ("bad-size.yaml", &["too small", "at least 64M"]),
        (
            "bad-name-space.yaml",
            &["invalid image name \"my image\"", "only letters, digits"],
        ),
        (
            "bad-name-at.yaml",
            &["invalid image name \"img@monday\"", "'@'"],
        ),
        (
            "bad-name-digits.yaml",
            &["invalid image name \"1234\"", "not be all digits"],
        ),
        (
            "bad-name-long.yaml",
            &[
                "image name \"long-",
                "is too long for this data directory",
                "at most",
            ],
        ),
    ] {
        let e = site.cli_err(&["image", "create", "-f", &f(file)]);
        assert_contains(&e, expected);
    }
    let e = site.cli_err(&["image", "create", "-f", "/nonexistent/image.yaml"]);
    assert_contains(&e, &["cannot read /nonexistent/image.yaml"]);
    assert!(site.image_names().is_empty());
    assert!(site.volumes().is_empty(), "{:?}", site.volumes());

    // A failing post-script: the build fails naming the step and the SQL error.
    let e = site.cli_err(&["image", "create", "-f", &f("failing-post.yaml")]);
    assert_contains(
        &e,
        &[
            "building image broken failed",
            "running the post-script failing-post.sql",
            "relation \"no_such_table\" does not exist",
        ],
    );
    assert!(!e.contains("step \"cleaning up"), "{e}");
    assert!(site.image_names().is_empty());
    assert!(site.volumes().is_empty(), "{:?}", site.volumes());
    assert!(
        site.leftovers(None).is_empty(),
        "{:?}",
        site.leftovers(None)
    );
    assert!(procs("postgres", &site.data_dir.display().to_string()).is_empty());
    let e = site.cli_err(&["image", "show", "broken"]);
    assert_contains(&e, &["image broken not found"]);

    // Clones.
    site.build(&fixture("small.yaml"));
    let c1 = site.create_clone("small", "c1", &[]);
    let p1 = c1["port"].as_u64().expect("port").to_string();
    let used_by_c1 = format!("port {p1} is used by clone c1");
    for (args, expected) in [
        (
            &["clone", "create", "small", "my clone"][..],
            &["invalid clone name \"my clone\""][..],
        ),
        (
            &["clone", "create", "small", "c@1"],
            &["invalid clone name \"c@1\"", "'@'"],
        ),
        (
            &["clone", "create", "small", "42"],
            &["invalid clone name \"42\"", "all digits"],
        ),
        (
            &["clone", "create", "nosuch", "c2"],
            &["no image or source named nosuch", "blockd image list"],
        ),
        (
            &["clone", "create", "small", "c1"],
            &["clone c1 already exists"],
        ),
        (
            &["clone", "create", "small", "c2", "--port", &p1],
            &[used_by_c1.as_str()][..],
        ),
        (
            &["clone", "create", "small", "c2", "--lifetime", "soon"],
            &["invalid lifetime", "e.g. 30m"],
        ),
        (
            &["clone", "create", "small", "c2", "--port", "80"],
            &["privileged"],
        ),
        (&["clone", "show", "nosuch"], &["clone nosuch not found"]),
        (&["clone", "delete", "nosuch"], &["clone nosuch not found"]),
        (
            &["clone", "save", "c1", "small"],
            &["image small already exists"],
        ),
        (&["image", "delete", "small"], &["used by clones c1"]),
    ] {
        let e = site.cli_err(args);
        assert_contains(&e, expected);
    }
    // A name whose PostgreSQL socket path would be too long: refused with the longest
    // name that fits, which works.
    let long = "c".repeat(63);
    let e = site.cli_err(&["clone", "create", "small", &long]);
    assert_contains(&e, &["is too long for this data directory", "at most"]);
    let max: usize = e
        .split("at most ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the longest name that fits");
    let fits = "c".repeat(max);
    site.create_clone("small", &fits, &[]);
    assert_eq!(
        psql(&site.conn(&fits), "SELECT count(*) FROM items"),
        "1000"
    );
    site.cli_ok(&["clone", "delete", &fits]);

    // A port another program holds.
    let held_port = site.ports.1;
    let _held = TcpListener::bind(("127.0.0.1", held_port)).expect("bind a clone port");
    let e = site.cli_err(&[
        "clone",
        "create",
        "small",
        "c3",
        "--port",
        &held_port.to_string(),
    ]);
    assert_contains(
        &e,
        &[&format!("port {held_port} is taken by another program")],
    );
    // The internal names of clones are not available as volume names.
    let e = site.cli_err(&["volume", "create", "cln.c4", "--size", "1M"]);
    assert_contains(&e, &["reserved for database images, clones"]);

    // Nothing of the refused clones exists; c1 is unharmed.
    assert_eq!(site.clone_names(), vec!["c1".to_string()]);
    let mut vols = site.volumes();
    vols.sort();
    assert_eq!(vols, vec!["cln.c1".to_string(), "img.small".to_string()]);
    for v in ["cln.c2", "cln.c3", "cln.c4", "cln.42"] {
        assert!(
            site.leftovers(Some(v)).is_empty(),
            "{v}: {:?}",
            site.leftovers(Some(v))
        );
    }
    assert_eq!(site.clone_show("c1")["state"], "running");
    assert_eq!(psql(&site.conn("c1"), "SELECT count(*) FROM items"), "1000");
    site.stop_and_check_clean();
}

/// Ten clones of one image, each answering over TCP right after `clone create` returns.
/// The time to the first `SELECT 1` is printed for information only: the figure that counts
/// comes from `bench/bench.py db-clone` on a release build (docs/BENCHMARKS.md).
#[test]
fn ten_clones_of_one_image_answer() {
    let site = Site::start(&[]);
    site.build(&demo_yaml());
    let mut samples = Vec::new();
    for i in 0..10 {
        let name = format!("t{i}");
        let started = Instant::now();
        let v = site.json(&["clone", "create", "demo", &name]);
        let conn = v["connection"].as_str().expect("connection").to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        while try_psql(&conn, "SELECT 1").as_deref() != Ok("1") {
            assert!(Instant::now() < deadline, "clone {name} never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
        samples.push(started.elapsed());
    }
    let mut sorted = samples.clone();
    sorted.sort();
    let median = (sorted[4] + sorted[5]) / 2;
    let ms: Vec<String> = samples
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .collect();
    println!(
        "clone-to-ready (clone create -> SELECT 1), 10 clones of demo: median {:.0} ms; samples ms: {}",
        median.as_secs_f64() * 1000.0,
        ms.join(", ")
    );
    assert_eq!(site.clone_names().len(), 10);
    site.stop_and_check_clean();
}

/// The daemon is killed in the middle of an image build: the next start removes what the
/// build made (volume, mount, loop device, nbdfuse, server) and the image can be built again.
#[test]
fn a_build_interrupted_by_a_crash_is_undone_at_restart() {
    let mut site = Site::start(&[]);
    let demo = demo_yaml();
    let dir = demo.parent().expect("examples/demo");
    let script = |f: &str| json!({"name": f, "content": std::fs::read_to_string(dir.join(f)).expect("demo script")});
    let req = json!({
        "name": "demo", "sourceType": "empty", "engine": "postgres", "version": 15,
        "size": "2G", "tags": ["demo"], "preScript": script("load.sh"),
        "postScript": script("mask.sql"),
    });
    let (st, body) = http(&site.api, "POST", "/v1/images", None, req);
    assert_eq!(st, 202, "{body}");
    let job = body["job"].as_u64().expect("job id");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = http(
            &site.api,
            "GET",
            &format!("/v1/jobs/{job}"),
            None,
            Value::Null,
        );
        if j["step"].as_str().unwrap_or("").contains("pre-script") {
            break;
        }
        assert_eq!(j["state"], "running", "{j}");
        assert!(
            Instant::now() < deadline,
            "the build never reached its pre-script"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(site.json(&["image", "show", "demo"])["state"], "building");
    assert!(
        !site.leftovers(Some("img.demo")).is_empty(),
        "the build is attached"
    );

    site.restart(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !site.image_names().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the interrupted build is still listed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(site.volumes().is_empty(), "{:?}", site.volumes());
    let left = site.leftovers(None);
    assert!(
        left.is_empty(),
        "left after the interrupted build: {left:#?}"
    );

    let img = site.build(&demo);
    assert_eq!(img["state"], "ready");
    site.create_clone("demo", "after", &[]);
    assert_eq!(
        psql(&site.conn("after"), "SELECT count(*) FROM customers"),
        "10000"
    );
    site.stop_and_check_clean();
}
