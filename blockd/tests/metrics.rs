//! Observability end to end: `/metrics` scraped while fio runs against a real daemon, the
//! counters checked against what fio reports it did, `promtool check metrics` on the real
//! output, the Grafana dashboard checked against the metrics that exist, and the connect and
//! disconnect log lines.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// One sample of the text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (the subset blockd writes: no timestamps, label
/// values without escaped quotes).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad exposition line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label k=\"v\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Sum of the samples named `name` whose labels include `want` (0 if there are none).
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn scrape(d: &Daemon) -> Scrape {
    let url = format!("http://{}/metrics", d.api);
    let mut resp = ureq::get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", d.log()));
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "content type {ctype:?}"
    );
    let text = resp.body_mut().read_to_string().expect("metrics body");
    Scrape {
        samples: parse(&text),
        text,
    }
}

/// `promtool check metrics` on `text`; fails the test with promtool's complaints.
fn promtool_check(text: &str) {
    require("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(text.as_bytes()).expect("feed promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const COMMANDS: [&str; 9] = [
    "read",
    "write",
    "disc",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
    "unknown",
];

#[test]
fn scrape_during_fio_shows_what_fio_did_and_promtool_accepts_it() {
    require("fio");
    // No background compaction: the test counts the one pass it asks for.
    let d = Daemon::start_with(&["--compact-interval", "0"]);
    d.create_volume("m", "64M");
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.fio");
    let report = dir.path().join("fio.json");
    // A verified sequential write (writes 16 MiB, then reads it back to check), then two
    // seconds of 4 KiB random reads: long enough to scrape while fio runs.
    fs::write(
        &job,
        format!(
            "[global]\nioengine=nbd\nuri={uri}\n\
             [fill]\nrw=write\nbs=64k\nsize=16m\niodepth=8\nverify=crc32c\ndo_verify=1\n\
             verify_fatal=1\n\
             [randread]\nstonewall\nrw=randread\nbs=4k\nsize=16m\niodepth=16\n\
             time_based=1\nruntime=2\n",
            uri = d.uri("m")
        ),
    )
    .expect("job file");
    let before = scrape(&d);
    assert_eq!(
        before.sum("blockd_export_requests_total", &[("export", "m")]),
        0.0
    );

    let mut fio = Command::new("fio")
        .current_dir(dir.path())
        .arg("--output-format=json")
        .arg(format!("--output={}", report.display()))
        .arg(&job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    // Scrape while fio runs: its connection shows up and the counters move before it ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut during = Vec::new();
    let status = loop {
        if let Some(st) = fio.try_wait().expect("wait for fio") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = fio.kill();
            let _ = fio.wait();
            panic!("fio did not finish in 120 s");
        }
        during.push(scrape(&d));
        std::thread::sleep(Duration::from_millis(100));
    };
    let fio_out = fio.wait_with_output().expect("fio output");
    let text = fs::read_to_string(&report).unwrap_or_default();
    assert!(
        status.success(),
        "fio failed: {}\n{text}",
        String::from_utf8_lossy(&fio_out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("fio JSON");
    let jobs = v["jobs"].as_array().expect("fio jobs");
    let total = |dir: &str, field: &str| -> f64 {
        jobs.iter()
            .map(|j| j[dir][field].as_f64().unwrap_or(0.0))
            .sum()
    };
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job reported an error:\n{text}");
    }
    let fio_written = total("write", "io_bytes");
    let fio_read = total("read", "io_bytes");
    let fio_write_ios = total("write", "total_ios");
    let fio_read_ios = total("read", "total_ios");
    assert!(fio_written >= 16.0 * 1048576.0, "fio wrote {fio_written}");

    // Mid-run scrapes: a connection was open, and some scrape saw counters part way.
    let final_reads = {
        // The connection's counts are published at every reply batch and at its end; the
        // server notices the close right after fio exits.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let s = scrape(&d);
            if s.sum("blockd_export_connections", &[("export", "m")]) == 0.0
                || Instant::now() > until
            {
                break s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let after = final_reads;
    assert!(
        during
            .iter()
            .any(|s| s.sum("blockd_export_connections", &[("export", "m")]) >= 1.0),
        "no scrape during the fio run saw its connection"
    );
    let read_total = after.sum(
        "blockd_export_requests_total",
        &[("export", "m"), ("command", "read")],
    );
    assert!(
        during.iter().any(|s| {
            let r = s.sum(
                "blockd_export_requests_total",
                &[("export", "m"), ("command", "read")],
            );
            r > 0.0 && r < read_total
        }),
        "no scrape during the run saw the read count part way (final {read_total})"
    );

    // What fio did is what the counters say.
    let bytes = |dir: &str| {
        after.sum(
            "blockd_export_bytes_total",
            &[("export", "m"), ("direction", dir)],
        )
    };
    let requests = |cmd: &str| {
        after.sum(
            "blockd_export_requests_total",
            &[("export", "m"), ("command", cmd)],
        )
    };
    assert!(
        bytes("write") >= fio_written,
        "write bytes {} < fio's {fio_written}",
        bytes("write")
    );
    assert!(
        bytes("read") >= fio_read,
        "read bytes {} < fio's {fio_read}",
        bytes("read")
    );
    assert!(requests("write") >= fio_write_ios, "{}", after.text);
    assert!(requests("read") >= fio_read_ios, "{}", after.text);
    // Every request was timed once it was answered.
    for cmd in COMMANDS {
        let count = after.sum(
            "blockd_export_request_duration_seconds_count",
            &[("export", "m"), ("command", cmd)],
        );
        assert_eq!(count, requests(cmd), "latency count of {cmd}");
    }
    let inf = after.sum(
        "blockd_export_request_duration_seconds_bucket",
        &[("export", "m"), ("command", "read"), ("le", "+Inf")],
    );
    assert_eq!(inf, requests("read"));
    assert!(
        after.sum(
            "blockd_export_request_duration_seconds_sum",
            &[("export", "m"), ("command", "read")]
        ) > 0.0
    );
    assert_eq!(
        after.sum("blockd_export_errors_total", &[("export", "m")]),
        0.0,
        "{}",
        after.text
    );
    assert_eq!(
        after.sum("blockd_export_requests_in_flight", &[("export", "m")]),
        0.0
    );
    assert!(
        after.sum("blockd_export_connections_total", &[("export", "m")]) >= jobs.len() as f64,
        "at least one connection per fio job"
    );
    // The writes were made durable (at the latest when the writer disconnected), and the
    // space they take is the volume's own.
    assert!(after.sum("blockd_store_flushes_total", &[]) >= 1.0);
    assert!(after.sum("blockd_store_group_commits_total", &[]) >= 1.0);
    assert!(after.sum("blockd_store_fdatasync_seconds_count", &[]) >= 2.0);
    assert!(after.sum("blockd_volume_unique_bytes", &[("volume", "m")]) >= 16.0 * 1048576.0);
    assert!(after.sum("blockd_store_stored_bytes", &[]) >= 16.0 * 1048576.0);
    assert_eq!(
        after.sum("blockd_store_logical_bytes", &[]),
        64.0 * 1048576.0
    );
    // Control-plane state gauges are there (zero) without any database.
    assert!(after.has("blockd_clones", &[("state", "running")]));
    assert!(after.has("blockd_images", &[("state", "ready")]));
    assert!(after.sum("process_resident_memory_bytes", &[]) > 0.0);
    assert!(after.has("blockd_build_info", &[]));
    promtool_check(&after.text);
    promtool_check(&during[during.len() / 2].text);

    // Compaction and deletion are counted; a deleted volume's series go away.
    d.cli_ok(&["compact"]);
    d.cli_ok_once_disconnected(&["volume", "delete", "m"]);
    let gone = scrape(&d);
    assert_eq!(
        gone.sum("blockd_store_compaction_runs_total", &[]),
        after.sum("blockd_store_compaction_runs_total", &[]) + 1.0
    );
    assert!(gone.sum("blockd_store_gc_runs_total", &[]) >= 1.0);
    assert!(
        gone.sum("blockd_store_gc_reclaimed_bytes_total", &[]) >= 16.0 * 1048576.0,
        "{}",
        gone.text
    );
    assert!(!gone.has("blockd_export_requests_total", &[("export", "m")]));
    assert!(!gone.has("blockd_volume_unique_bytes", &[("volume", "m")]));
    promtool_check(&gone.text);
}

#[test]
fn metrics_need_no_token() {
    let d = Daemon::start();
    d.cli_ok(&["token", "create", "root", "--role", "admin"]);
    // The API now wants a token, /metrics still answers (Prometheus scrapes it).
    assert!(!d.cli(&["volume", "list"]).status.success());
    let s = scrape(&d);
    assert!(s.has("blockd_store_volumes", &[]));
}

#[test]
fn connect_and_disconnect_are_logged_with_export_and_peer_and_rust_log_controls_it() {
    require("nbdinfo");
    let d = Daemon::start();
    d.create_volume("logged", "1M");
    run_ok(&mut cmd("nbdinfo", &[&d.uri("logged")]));
    let until = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("client disconnected") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = d.log();
    for what in ["client connected", "client disconnected"] {
        let line = log
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line in:\n{log}"));
        assert!(line.contains("INFO"), "{line}");
        assert!(line.contains("export=logged"), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }

    // RUST_LOG=warn hides them.
    let quiet = Daemon::start_with_env(&[], &[("RUST_LOG", "warn")]);
    quiet.create_volume("quiet", "1M");
    run_ok(&mut cmd("nbdinfo", &[&quiet.uri("quiet")]));
    std::thread::sleep(Duration::from_millis(300));
    let log = quiet.log();
    assert!(!log.contains("client connected"), "{log}");
}

/// Every metric the dashboard queries is one blockd exports.
#[test]
fn dashboard_parses_and_uses_only_metrics_that_exist() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/blockd.json");
    let text = fs::read_to_string(path).expect("dashboards/blockd.json");
    let dash: serde_json::Value =
        serde_json::from_str(&text).expect("dashboards/blockd.json is not valid JSON");
    let m = blockd::metrics::Metrics::new(
        std::sync::Arc::new(blockd::metrics::NbdMetrics::new()),
        &blockd::metrics::StoreMetrics::new(),
        &blockd::metrics::ControlMetrics::new(),
    )
    .expect("registry");
    let known: HashSet<&str> = m.names().iter().map(String::as_str).collect();

    let mut queries = Vec::new();
    collect_queries(&dash, &mut queries);
    assert!(queries.len() >= 20, "only {} queries found", queries.len());
    let mut used = HashSet::new();
    for q in &queries {
        for name in metric_names(q) {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suf| {
                    name.strip_suffix(suf)
                        .filter(|b| known.contains(b) && !known.contains(name.as_str()))
                })
                .unwrap_or(&name)
                .to_owned();
            assert!(
                known.contains(base.as_str()),
                "the dashboard queries {name}, which blockd does not export (in {q:?})"
            );
            used.insert(base);
        }
    }
    // The panels the issue asks for are there.
    for needed in [
        "blockd_export_requests_total",
        "blockd_export_bytes_total",
        "blockd_export_request_duration_seconds",
        "blockd_store_shared_bytes",
        "blockd_clones",
        "blockd_source_lag_seconds",
        "blockd_source_lag_bytes",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    // Panel ids are unique (Grafana relies on it).
    let ids: Vec<u64> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    let unique: HashSet<&u64> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate panel ids");
}

/// Every PromQL string in the dashboard: panel targets and template variable queries.
fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map {
                match (k.as_str(), val) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    _ => collect_queries(val, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_queries(x, out)),
        _ => {}
    }
}

/// Identifiers in a query that name metrics (blockd's and the process collector's).
fn metric_names(q: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in q.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("blockd_") || word.starts_with("process_") {
                out.push(word.clone());
            }
            word.clear();
        }
    }
    out
}
