//! The volume commands of the CLI against a running daemon, as a user would run them.

mod common;

use common::Daemon;

#[test]
fn volume_lifecycle_through_the_cli() {
    let d = Daemon::start();
    let out = d.cli_ok(&["volume", "create", "db1", "--size", "1G"]);
    assert!(out.contains("created volume db1"), "{out}");

    let list = d.cli_ok(&["volume", "list"]);
    assert!(
        list.lines().next().unwrap_or("").starts_with("NAME"),
        "{list}"
    );
    assert!(list.contains("db1") && list.contains("1 GiB"), "{list}");

    let json: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["--output", "json", "volume", "show", "db1"]))
            .expect("json");
    assert_eq!(json["size_bytes"], 1u64 << 30);
    assert_eq!(json["unique_bytes"], 0);
    assert_eq!(json["shared_bytes"], 0);

    d.cli_ok(&["volume", "delete", "db1"]);
    let list: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["--output", "json", "volume", "list"])).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}

#[test]
fn bad_input_is_rejected_with_a_message_that_says_what_to_fix() {
    let d = Daemon::start();
    d.create_volume("db", "64M");
    let cases: &[(&[&str], &str)] = &[
        (
            &["volume", "create", "db", "--size", "1G"],
            "already exists",
        ),
        (
            &["volume", "create", "bad name", "--size", "1G"],
            "only letters, digits",
        ),
        (
            &["volume", "create", "x@y", "--size", "1G"],
            "'@' separates",
        ),
        (&["volume", "create", "12345", "--size", "1G"], "all digits"),
        (
            &["volume", "create", "x", "--size", "10Q"],
            "unknown suffix",
        ),
        (
            &["volume", "create", "x", "--size", "1000"],
            "multiple of 512",
        ),
        (&["volume", "create", "x", "--size", "17T"], "16 TiB"),
        (
            &["volume", "create", "x", "--size", "0"],
            "greater than zero",
        ),
        (&["volume", "show", "nope"], "volume nope not found"),
        (&["volume", "delete", "nope"], "not found"),
    ];
    for (args, needle) in cases {
        let err = d.cli_err(args);
        assert!(
            err.contains(needle),
            "blockd {args:?}: expected {needle:?} in {err:?}"
        );
    }
    // Nothing was lost or half-made by the failures.
    let list: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["--output", "json", "volume", "list"])).expect("json");
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, vec!["db"]);
}

#[test]
fn cli_without_a_daemon_says_how_to_reach_one() {
    let out = common::run_with_timeout(
        std::process::Command::new(common::blockd_bin()).args([
            "--api",
            "127.0.0.1:1",
            "volume",
            "list",
        ]),
        std::time::Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the blockd API") && err.contains("BLOCKD_API"),
        "{err}"
    );
}

#[test]
fn volumes_survive_a_daemon_restart() {
    let d = Daemon::start();
    d.create_volume("keep", "8M");
    let (dir, data) = d.into_dirs(true);
    let d = Daemon::start_in(dir, data, &[]);
    assert!(d.cli_ok(&["volume", "list"]).contains("keep"));
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let d = Daemon::start();
    let out = common::run_with_timeout(
        std::process::Command::new(common::blockd_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--socket",
                "none",
                "--data-dir",
            ])
            .arg(&d.data_dir),
        std::time::Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another blockd") && err.contains("--data-dir"),
        "{err}"
    );
}

/// A bad size for `--direct-writes-from` is refused before anything starts, naming the
/// option and what to give instead.
#[test]
fn bad_direct_write_threshold_is_refused_with_what_to_give() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (value, hint) in [("1000", "256K"), ("lots", "or `off`"), ("0", "256K")] {
        let out = common::run_with_timeout(
            std::process::Command::new(common::blockd_bin())
                .args(["serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
                .args([
                    "--socket",
                    "none",
                    "--direct-writes-from",
                    value,
                    "--data-dir",
                ])
                .arg(dir.path().join("data")),
            std::time::Duration::from_secs(30),
        );
        assert!(
            !out.status.success(),
            "--direct-writes-from {value} accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--direct-writes-from") && err.contains(hint),
            "--direct-writes-from {value}: {err}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "a refused start created the data directory"
    );
}

#[test]
fn import_and_export_print_plain_output_when_not_on_a_terminal() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("in.raw");
    std::fs::write(&raw, common::pattern(7, 4 << 20)).expect("image");
    let out_file = dir.path().join("out.raw");
    for args in [
        vec![
            "volume",
            "import",
            "plain",
            "--from",
            raw.to_str().expect("utf-8"),
        ],
        vec![
            "volume",
            "export",
            "plain",
            "--to",
            out_file.to_str().expect("utf-8"),
        ],
    ] {
        // The harness pipes stdout and stderr: no bar, no escape sequences, just the result.
        let out = d.cli(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        for text in [&stdout, &stderr] {
            assert!(
                !text.contains('\x1b') && !text.contains("=>"),
                "{args:?}: {text:?}"
            );
            assert!(!text.contains('\r'), "{args:?}: {text:?}");
        }
        assert!(stdout.contains("plain"), "{args:?}: {stdout}");
    }
    assert_eq!(
        std::fs::read(&out_file).expect("exported"),
        std::fs::read(&raw).expect("imported")
    );
}
