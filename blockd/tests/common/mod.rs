//! Shared harness for the integration tests: a real `blockd serve` on free ports, real
//! client programs, and guards that release daemons, FUSE mounts, loop devices and mounts
//! even when a test fails.
//!
//! Every external tool is required: the test command (scripts/test.sh) installs them. A
//! missing tool fails the test with a message saying so, it is never skipped silently.
#![allow(dead_code)]

pub mod nbd;
pub mod pg;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn blockd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockd"))
}

/// Fails the test if `tool` is not on PATH.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new(tool).is_file();
    assert!(
        found,
        "{tool} is not installed; run scripts/test.sh, which installs the test dependencies"
    );
}

/// The python3 that has the libnbd module (Debian's, not a pyenv one).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Runs a command to completion with a time limit; returns its output.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs a command, asserts it succeeded, returns stdout as text.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run_with_timeout(cmd, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Shorthand: `cmd("nbdinfo", &["--list", uri])`.
pub fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// A running `blockd serve` with its own data directory, on free ports. Stopped with
/// SIGTERM (then SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    /// NBD TCP address, `127.0.0.1:PORT`.
    pub nbd: String,
    pub socket: PathBuf,
    /// REST API address, `127.0.0.1:PORT`.
    pub api: String,
    pub pid: u32,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts a daemon with extra `serve` arguments.
    pub fn start_with(extra: &[&str]) -> Daemon {
        Daemon::start_with_env(extra, &[])
    }

    /// Starts a daemon with extra `serve` arguments and environment variables (e.g.
    /// `RUST_LOG`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("blockd-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        Daemon::spawn(dir, data_dir, extra, env)
    }

    /// Starts a daemon on an existing data directory (for restart tests).
    pub fn start_in(dir: tempfile::TempDir, data_dir: PathBuf, extra: &[&str]) -> Daemon {
        Daemon::spawn(dir, data_dir, extra, &[])
    }

    fn spawn(
        dir: tempfile::TempDir,
        data_dir: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let ready = dir.path().join("ready.json");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("daemon.log"))
            .expect("log file");
        let mut child = Command::new(blockd_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start blockd serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        let info: serde_json::Value = loop {
            if let Ok(bytes) = fs::read(&ready)
                && let Ok(v) = serde_json::from_slice(&bytes)
            {
                break v;
            }
            if let Some(st) = child.try_wait().expect("wait") {
                let log = fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
                panic!("blockd serve exited early with {st}:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "blockd serve did not become ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let s = |k: &str| info[k].as_str().map(str::to_owned).unwrap_or_default();
        Daemon {
            pid: child.id(),
            child: Some(child),
            nbd: s("nbd"),
            socket: PathBuf::from(s("socket")),
            api: s("api"),
            data_dir,
            dir,
        }
    }

    pub fn port(&self) -> &str {
        self.nbd.rsplit(':').next().unwrap_or("")
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.nbd, export)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.socket.display())
    }

    /// Runs a client subcommand against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(blockd_bin());
        c.arg("--api")
            .arg(&self.api)
            .args(args)
            .env_remove("BLOCKD_TOKEN");
        run_with_timeout(&mut c, Duration::from_secs(600))
    }

    /// Runs a client subcommand and asserts success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "blockd {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a client subcommand, asserts it failed, returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "blockd {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Like [`Daemon::cli_ok`], for a command the daemon refuses while NBD connections are
    /// open (volume delete and reset, snapshot delete): retried for up to 10 s while the refusal says so, since
    /// the server counts a client until it has noticed the client's close.
    pub fn cli_ok_once_disconnected(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.cli(args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                (err.contains("NBD connection") || err.contains("exported to NBD clients"))
                    && Instant::now() < deadline,
                "blockd {args:?} failed: {err}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child this struct started and has not reaped.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) };
    }

    /// SIGTERM and wait (up to `limit`); returns the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon still running");
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "blockd did not stop within {limit:?} after SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon and hands back its directories for a restart.
    pub fn into_dirs(mut self, graceful: bool) -> (tempfile::TempDir, PathBuf) {
        if graceful {
            self.terminate(Duration::from_secs(30));
        } else {
            self.kill();
        }
        let data_dir = self.data_dir.clone();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (dir, data_dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An `nbdfuse` process exposing an export as a file. Unmounted and reaped when dropped.
pub struct FuseFile {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub file: PathBuf,
}

impl FuseFile {
    /// Mounts `uri` at a fresh file and waits until it has the export's size.
    pub fn mount(uri: &str, size: u64) -> FuseFile {
        require("nbdfuse");
        let dir = tempfile::Builder::new()
            .prefix("blockd-fuse-")
            .tempdir()
            .expect("tempdir");
        let file = dir.path().join("disk");
        fs::write(&file, b"").expect("mountpoint file");
        let child = Command::new("nbdfuse")
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdfuse");
        let mut guard = FuseFile {
            child: Some(child),
            dir,
            file,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if fs::metadata(&guard.file)
                .map(|m| m.len() == size)
                .unwrap_or(false)
            {
                return guard;
            }
            if let Some(c) = guard.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("nbdfuse exited with {st} before the mount appeared");
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse mount did not appear in 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.file)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !unmounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.file)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loop device over a file; detached when dropped.
pub struct LoopDev {
    pub dev: String,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        LoopDev::attach_with(file, &[])
    }

    /// A read-only loop device (for read-only exports such as snapshots).
    pub fn attach_read_only(file: &Path) -> LoopDev {
        LoopDev::attach_with(file, &["--read-only"])
    }

    fn attach_with(file: &Path, extra: &[&str]) -> LoopDev {
        require("losetup");
        let out = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(extra)
                .arg(file),
        );
        LoopDev {
            dev: out.trim().to_string(),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("losetup")
                .args(["-d", &self.dev])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A mounted file system; unmounted when dropped.
pub struct Mount {
    pub target: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mount {
    #[allow(clippy::self_named_constructors)]
    pub fn mount(dev: &str, options: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("blockd-mnt-")
            .tempdir()
            .expect("tempdir");
        let target = dir.path().to_path_buf();
        let mut c = Command::new("mount");
        c.args(options).arg(dev).arg(&target);
        run_ok(&mut c);
        Mount { target, _dir: dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.target)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests can regenerate expected data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
