//! The database tests' harness: a daemon per test with its own clone ports ([`Site`]), a
//! PostgreSQL primary of the test's own ([`Primary`]), psql and the REST API as clients,
//! and a sweep that removes whatever a killed daemon left under a test's data directory.

use std::net::TcpListener;
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Daemon, require, run_with_timeout};
use serde_json::Value;

pub const PSQL: &str = "/usr/bin/psql";
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Ports per daemon for its clones (`--clone-ports`).
pub const CLONE_PORTS: u16 = 20;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/db")
        .join(name)
}

pub fn demo_yaml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/image.yaml")
}

pub fn require_tools() {
    for t in [
        PSQL,
        "pgbench",
        "pg_basebackup",
        "nbdfuse",
        "fusermount3",
        "losetup",
        "runuser",
        "mkfs.ext4",
    ] {
        require(t);
    }
    assert!(
        Path::new(PG_BIN).join("postgres").exists(),
        "PostgreSQL 15 is not installed under {PG_BIN}; run scripts/deps.sh"
    );
}

// ------------------------------------------------------------------ ports

/// Port ranges handed out to the tests of this process, so parallel tests never share one.
pub static RESERVED: Mutex<Vec<(u16, u16)>> = Mutex::new(Vec::new());

pub fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// Reserves `n` consecutive free ports at a random base in 20000-60000.
pub fn reserve_ports(n: u16) -> u16 {
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    let mut reserved = RESERVED.lock().expect("port lock");
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20000 + (x % u64::from(40000 - n)) as u16;
        let last = base + n - 1;
        if reserved.iter().any(|&(a, b)| base <= b && a <= last) {
            continue;
        }
        if (base..=last).all(port_free) {
            reserved.push((base, last));
            return base;
        }
    }
    panic!("no {n} consecutive free ports found in 20000-60000");
}

// ------------------------------------------------------------------ processes, mounts, loops

#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
}

/// Live (not zombie) processes.
pub fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let zombie = status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'));
            if zombie {
                return None;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(Proc {
                pid,
                comm: comm.trim().to_string(),
                cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
            })
        })
        .collect()
}

/// Live processes named `comm` whose command line contains `needle`.
pub fn procs(comm: &str, needle: &str) -> Vec<Proc> {
    processes()
        .into_iter()
        .filter(|p| p.comm == comm && p.cmdline.contains(needle))
        .collect()
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test found under its own directory.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Waits until none of `pids` is alive; false on timeout.
pub fn wait_gone(pids: &[u32], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Mount targets starting with `prefix` (a directory path ending in '/', or exact).
pub fn mounts_under(prefix: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| format!("{t}/").starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Loop devices (device, backing file) whose backing file starts with `prefix`.
pub fn loops_under(prefix: &str) -> Vec<(String, String)> {
    let out = run_with_timeout(
        Command::new("losetup").args(["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"]),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, f)| f.starts_with(prefix))
        .map(|(d, f)| (d.to_string(), f.to_string()))
        .collect()
}

pub fn quiet(program: &str, args: &[&str]) -> bool {
    run_with_timeout(Command::new(program).args(args), Duration::from_secs(30))
        .status
        .success()
}

/// Removes everything a killed daemon can leave under `data_dir`, and nothing else.
pub fn sweep(data_dir: &Path) {
    let control = data_dir.join("control");
    let mnt = format!("{}/", control.join("mnt").display());
    let attach = format!("{}/", control.join("attach").display());
    // PostgreSQL servers on our mounts: immediate shutdown, then SIGKILL.
    let pg: Vec<u32> = procs("postgres", &mnt).iter().map(|p| p.pid).collect();
    for &p in &pg {
        signal(p, libc::SIGQUIT);
    }
    if !wait_gone(&pg, Duration::from_secs(10)) {
        for &p in &pg {
            signal(p, libc::SIGKILL);
        }
        wait_gone(&pg, Duration::from_secs(5));
    }
    for t in mounts_under(&mnt).iter().rev() {
        if !quiet("umount", &[t]) {
            quiet("umount", &["-l", t]);
        }
    }
    for (dev, _) in loops_under(&attach) {
        for _ in 0..20 {
            if quiet("losetup", &["-d", &dev]) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for t in mounts_under(&attach).iter().rev() {
        if !quiet("fusermount3", &["-u", t]) {
            quiet("umount", &["-l", t]);
        }
    }
    let fuse: Vec<u32> = procs("nbdfuse", &attach).iter().map(|p| p.pid).collect();
    for &p in &fuse {
        signal(p, libc::SIGTERM);
    }
    if !wait_gone(&fuse, Duration::from_secs(5)) {
        for &p in &fuse {
            signal(p, libc::SIGKILL);
        }
    }
}

/// What is still attached, mounted or running for paths starting with `mnt` (mounts,
/// PostgreSQL) and `attach` (FUSE files, loop devices, nbdfuse). Empty when clean.
pub fn leftovers_for(mnt: &str, attach: &str) -> Vec<String> {
    let mut v = Vec::new();
    for m in mounts_under(mnt).into_iter().chain(mounts_under(attach)) {
        v.push(format!("mount {m}"));
    }
    for (d, f) in loops_under(attach) {
        v.push(format!("loop device {d} on {f}"));
    }
    for p in procs("postgres", mnt)
        .into_iter()
        .chain(procs("nbdfuse", attach))
    {
        v.push(format!("process {} {}", p.pid, p.cmdline));
    }
    v
}

// ------------------------------------------------------------------ the daemon guard

/// A daemon for one test, with its own clone port range; see the module comment.
pub struct Site {
    pub daemon: Option<Daemon>,
    pub data_dir: PathBuf,
    /// `serve` arguments, kept for restarts.
    pub extra: Vec<String>,
    pub ports: (u16, u16),
}

impl Deref for Site {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon is running")
    }
}

impl Site {
    pub fn start(extra: &[&str]) -> Site {
        let s = Site::start_in_tempdir(extra);
        s.make_reachable();
        s
    }

    pub fn start_in_tempdir(extra: &[&str]) -> Site {
        require_tools();
        let base = reserve_ports(CLONE_PORTS);
        let last = base + CLONE_PORTS - 1;
        let mut all = vec!["--clone-ports".to_string(), format!("{base}-{last}")];
        all.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let d = Daemon::start_with(&refs);
        Site {
            data_dir: d.data_dir.clone(),
            daemon: Some(d),
            extra: all,
            ports: (base, last),
        }
    }

    /// The databases run as postgres, which must be able to reach the data directory.
    pub fn make_reachable(&self) {
        self.chmod_dir(0o755);
    }

    pub fn chmod_dir(&self, mode: u32) {
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(mode))
            .expect("chmod the test directory");
    }

    /// Stops the daemon (SIGTERM, or SIGKILL when not `graceful`) and starts it again on
    /// the same data directory and clone ports.
    pub fn restart(&mut self, graceful: bool) {
        let d = self.daemon.take().expect("the daemon is running");
        let (dir, data_dir) = d.into_dirs(graceful);
        let refs: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::start_in(dir, data_dir, &refs));
    }

    /// Stops the daemon cleanly and asserts that it left nothing attached or running.
    pub fn stop_and_check_clean(mut self) {
        let d = self.daemon.take().expect("the daemon is running");
        let log = d.log();
        let (dir, _data) = d.into_dirs(true);
        let left = self.leftovers(None);
        assert!(
            left.is_empty(),
            "after SIGTERM the daemon left: {left:#?}\n{log}"
        );
        drop(dir);
    }

    pub fn control(&self) -> PathBuf {
        self.data_dir.join("control")
    }

    /// Leftovers of one volume, or of every volume.
    pub fn leftovers(&self, volume: Option<&str>) -> Vec<String> {
        let c = self.control();
        let (m, a) = match volume {
            Some(v) => (c.join("mnt").join(v), c.join("attach").join(v)),
            None => (c.join("mnt"), c.join("attach")),
        };
        leftovers_for(&format!("{}/", m.display()), &format!("{}/", a.display()))
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("blockd {a:?}: {e}: {out}"))
    }

    pub fn json_as(&self, token: &str, args: &[&str]) -> Value {
        let mut a = vec!["--token", token];
        a.extend_from_slice(args);
        self.json(&a)
    }

    pub fn err_as(&self, token: &str, args: &[&str]) -> String {
        let mut a = vec!["--token", token];
        a.extend_from_slice(args);
        self.cli_err(&a)
    }

    /// Builds an image from a definition file; returns `image show`.
    pub fn build(&self, yaml: &Path) -> Value {
        self.json(&["image", "create", "-f", &yaml.display().to_string()])
    }

    pub fn create_clone(&self, image: &str, name: &str, extra: &[&str]) -> Value {
        let mut a = vec!["clone", "create", image, name];
        a.extend_from_slice(extra);
        let v = self.json(&a);
        assert_eq!(v["state"], "running", "{v}\n{}", self.log_tail());
        v
    }

    pub fn clone_show(&self, name: &str) -> Value {
        self.json(&["clone", "show", name])
    }

    pub fn conn(&self, name: &str) -> String {
        self.clone_show(name)["connection"]
            .as_str()
            .expect("connection string")
            .to_string()
    }

    /// Waits until the clone is `state` (after a restart, reconciling takes a moment).
    pub fn wait_state(&self, name: &str, state: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.clone_show(name);
            if v["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "clone {name} is {} after {limit:?}, not {state}\n{}",
                v["state"],
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn volumes(&self) -> Vec<String> {
        names(&self.json(&["volume", "list"]))
    }

    pub fn image_names(&self) -> Vec<String> {
        names(&self.json(&["image", "list"]))
    }

    pub fn clone_names(&self) -> Vec<String> {
        names(&self.json(&["clone", "list"]))
    }

    /// The pid in a clone's (or image build's) postmaster.pid.
    pub fn postmaster_pid(&self, volume: &str) -> u32 {
        let f = self
            .control()
            .join("mnt")
            .join(volume)
            .join("pgdata/postmaster.pid");
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid in postmaster.pid")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Keep the directory until the sweep is done: removing it while something is
        // still mounted under it would reach into the mounts.
        if std::thread::panicking() && self.daemon.is_some() {
            eprintln!("--- daemon log (end) ---\n{}", self.log_tail());
        }
        let mut dir = None;
        if let Some(d) = self.daemon.as_mut()
            && let Ok(placeholder) = tempfile::tempdir()
        {
            dir = Some(std::mem::replace(&mut d.dir, placeholder));
        }
        drop(self.daemon.take());
        sweep(&self.data_dir);
        drop(dir);
    }
}

pub fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ------------------------------------------------------------------ clients

/// Runs SQL through psql on a connection string; Err carries psql's stderr.
pub fn try_psql(conn: &str, sql: &str) -> Result<String, String> {
    let out = run_with_timeout(
        Command::new(PSQL)
            .args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1"])
            .arg("-d")
            .arg(conn)
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE"),
        Duration::from_secs(120),
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn psql(conn: &str, sql: &str) -> String {
    try_psql(conn, sql).unwrap_or_else(|e| panic!("psql {conn:?} -c {sql:?} failed: {e}"))
}

pub fn postgres_uid() -> u32 {
    let out = run_with_timeout(
        Command::new("id").args(["-u", "postgres"]),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the postgres user exists")
}

pub fn process_uid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("process status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("Uid line")
}

/// A raw API request: (HTTP status, JSON body).
pub fn http(api: &str, method: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    fn auth<B>(r: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
        match token {
            Some(t) => r.header("Authorization", format!("Bearer {t}")),
            None => r,
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let url = format!("http://{api}{path}");
    let resp = match method {
        "GET" => auth(agent.get(&url), token).call(),
        "DELETE" => auth(agent.delete(&url), token).call(),
        _ => auth(agent.post(&url), token).send_json(&body),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in:\n{text}");
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ------------------------------------------------------------------ a primary to back up

/// A PostgreSQL primary of the test's own, in a directory owned by postgres, on a free
/// port with its socket in that directory. Stopped (immediate) when dropped.
pub struct Primary {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
}

pub fn as_postgres(tool: &str, args: &[&str]) -> String {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join(tool))
        .args(args);
    super::run_ok(&mut c)
}

impl Primary {
    pub fn start() -> Primary {
        let dir = tempfile::Builder::new()
            .prefix("blockd-primary-")
            .tempdir()
            .expect("tempdir");
        let uid = postgres_uid();
        std::os::unix::fs::chown(dir.path(), Some(uid), None).expect("chown to postgres");
        let data = dir.path().join("data");
        let port = reserve_ports(1);
        let d = data.display().to_string();
        as_postgres(
            "initdb",
            &[
                "-D",
                &d,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        );
        let p = Primary { dir, data, port };
        p.start_again();
        p
    }

    /// Starts the server (again, after [`Primary::stop`]) on the same port. WAL is kept
    /// (wal_keep_size) so tests can read it back with pg_waldump.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c wal_keep_size=1GB",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("primary.log").display().to_string();
        let d = self.data.display().to_string();
        as_postgres(
            "pg_ctl",
            &["-D", &d, "-o", &opts, "-l", &log, "-w", "-t", "60", "start"],
        );
    }

    /// A clean (fast) shutdown.
    pub fn stop(&self) {
        let d = self.data.display().to_string();
        as_postgres(
            "pg_ctl",
            &["-D", &d, "-m", "fast", "-w", "-t", "60", "stop"],
        );
    }

    /// Requires passwords over TCP (for replication too) and creates `user` with the
    /// REPLICATION attribute and `password`. The local socket stays trusted for the test.
    pub fn require_passwords(&self, user: &str, password: &str) {
        let hba = "local all all trust\n\
                   local replication all trust\n\
                   host all all 127.0.0.1/32 scram-sha-256\n\
                   host replication all 127.0.0.1/32 scram-sha-256\n";
        let f = self.data.join("pg_hba.conf");
        std::fs::write(&f, hba).expect("write pg_hba.conf");
        self.psql(&format!(
            "CREATE ROLE {user} LOGIN REPLICATION PASSWORD '{password}'"
        ));
        self.psql("SELECT pg_reload_conf()");
    }

    /// The WAL position the primary has flushed.
    pub fn flush_lsn(&self) -> String {
        self.psql("SELECT pg_current_wal_flush_lsn()")
    }

    pub fn host(&self) -> String {
        self.dir.path().display().to_string()
    }

    pub fn psql(&self, sql: &str) -> String {
        let conn = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.host(),
            self.port
        );
        psql(&conn, sql)
    }

    pub fn pgbench_init(&self, scale: u32) {
        super::run_ok(Command::new("pgbench").args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            &self.host(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ]));
    }

    /// `pg_basebackup -D out -X stream` with `format` (`p` or `t`).
    pub fn basebackup(&self, out: &Path, format: &str) {
        super::run_ok(
            Command::new("pg_basebackup")
                .arg("-D")
                .arg(out)
                .args(["-F", format, "-X", "stream", "-c", "fast", "-h"])
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", "postgres"]),
        );
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        let d = self.data.display().to_string();
        let stopped = run_with_timeout(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(Path::new(PG_BIN).join("pg_ctl"))
                .args(["-D", &d, "-m", "immediate", "-w", "-t", "30", "stop"]),
            Duration::from_secs(40),
        )
        .status
        .success();
        if !stopped
            && let Ok(pidfile) = std::fs::read_to_string(self.data.join("postmaster.pid"))
            && let Some(pid) = pidfile.lines().next().and_then(|l| l.trim().parse().ok())
            && procs("postgres", &d).iter().any(|p| p.pid == pid)
        {
            signal(pid, libc::SIGKILL);
        }
    }
}
