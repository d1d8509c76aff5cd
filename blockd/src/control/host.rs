//! What the control plane does to the host: run programs, attach volumes as block
//! devices, make file systems, mount, find free ports.
//!
//! Attaching uses the kernel NBD driver (`nbd-client`) where `/dev/nbd0` exists, and
//! otherwise `nbdfuse` (the export appears as a file) plus a loop device. Every step
//! records what it made in an [`Attachment`], so that detaching, or cleaning up after a
//! crash, undoes exactly that.

use std::ffi::OsStr;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A failed host command: what ran and what it printed.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {detail}")]
pub struct HostError {
    pub what: String,
    pub detail: String,
}

pub type HostResult<T> = Result<T, HostError>;

pub fn err(what: impl Into<String>, detail: impl Into<String>) -> HostError {
    HostError {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Last lines of a program's output, for error messages.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a program to completion within `limit`, returning its stdout; a non-zero exit is
/// an error carrying the end of its output.
pub fn run(
    program: &str,
    args: &[&OsStr],
    limit: Duration,
    env: &[(&str, &str)],
) -> HostResult<String> {
    let desc = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| err(&desc, format!("cannot start it: {e} (is it installed?)")))?;
    let mut out = child.stdout.take().map(|mut o| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = o.read_to_string(&mut s);
            s
        })
    });
    let mut errs = child.stderr.take().map(|mut o| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = o.read_to_string(&mut s);
            s
        })
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(
                    &desc,
                    format!("did not finish within {}s", limit.as_secs()),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(err(&desc, e.to_string())),
        }
    };
    let stdout = out.take().and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = errs.take().and_then(|t| t.join().ok()).unwrap_or_default();
    if !status.success() {
        let output = tail(&format!("{stdout}\n{stderr}"), 15);
        return Err(err(&desc, format!("{status}: {output}")));
    }
    Ok(stdout)
}

/// `run` with string arguments.
pub fn run_s(program: &str, args: &[&str], limit: Duration) -> HostResult<String> {
    let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run(program, &a, limit, &[])
}

pub const QUICK: Duration = Duration::from_secs(30);
pub const LONG: Duration = Duration::from_secs(3600);

/// How a volume is attached as a block device, with everything needed to undo it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Attachment {
    /// The kernel NBD driver: `device` is /dev/nbdN.
    Kernel { device: String },
    /// nbdfuse exposes the export as `file`; `loop_device` is a loop device over it.
    Fuse {
        pid: u32,
        file: PathBuf,
        loop_device: String,
    },
}

impl Attachment {
    pub fn device(&self) -> &str {
        match self {
            Attachment::Kernel { device } => device,
            Attachment::Fuse { loop_device, .. } => loop_device,
        }
    }
}

/// Where the daemon's NBD server listens, for attaching.
#[derive(Debug, Clone)]
pub struct NbdEndpoint {
    pub socket: Option<PathBuf>,
    pub tcp: Option<String>,
}

impl NbdEndpoint {
    fn uri(&self, export: &str) -> HostResult<String> {
        match (&self.socket, &self.tcp) {
            (Some(s), _) => Ok(format!("nbd+unix:///{export}?socket={}", s.display())),
            (None, Some(t)) => Ok(format!("nbd://{t}/{export}")),
            (None, None) => Err(err(
                "attach",
                "the NBD server listens nowhere; start blockd with --socket or --listen",
            )),
        }
    }
}

fn kernel_nbd_available() -> bool {
    Path::new("/dev/nbd0").exists() && which("nbd-client")
}

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A free /dev/nbdN (size 0 in sysfs).
fn free_nbd_device() -> Option<String> {
    (0..128).find_map(|i| {
        let size = std::fs::read_to_string(format!("/sys/block/nbd{i}/size")).ok()?;
        (size.trim() == "0").then(|| format!("/dev/nbd{i}"))
    })
}

/// Attaches `export` (of `size` bytes) as a block device; `work` is a private directory
/// for the FUSE file.
pub fn attach(ep: &NbdEndpoint, export: &str, size: u64, work: &Path) -> HostResult<Attachment> {
    if kernel_nbd_available()
        && let Some(device) = free_nbd_device()
    {
        let mut args: Vec<String> = match (&ep.socket, &ep.tcp) {
            (Some(s), _) => vec!["-unix".into(), s.display().to_string()],
            (None, Some(t)) => {
                let (h, p) = t
                    .rsplit_once(':')
                    .ok_or_else(|| err("attach", format!("bad NBD address {t}")))?;
                vec![h.into(), p.into()]
            }
            _ => return Err(err("attach", "the NBD server listens nowhere")),
        };
        args.extend([
            device.clone(),
            "-N".into(),
            export.into(),
            "-b".into(),
            "512".into(),
            "-C".into(),
            "2".into(),
        ]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_s("nbd-client", &a, QUICK)?;
        return Ok(Attachment::Kernel { device });
    }
    std::fs::create_dir_all(work)
        .map_err(|e| err("attach", format!("creating {}: {e}", work.display())))?;
    let file = work.join("disk");
    std::fs::write(&file, b"")
        .map_err(|e| err("attach", format!("creating {}: {e}", file.display())))?;
    let uri = ep.uri(export)?;
    let child = Command::new("nbdfuse")
        .arg(&file)
        .arg(&uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            err(
                "nbdfuse",
                format!("cannot start it: {e} (install libnbd-bin)"),
            )
        })?;
    let pid = child.id();
    // Reap it in the background whenever it exits.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != size {
        if Instant::now() > deadline {
            kill(pid);
            return Err(err(
                "nbdfuse",
                format!("{} did not appear within 20 s", file.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let loop_device = match run(
        "losetup",
        &[OsStr::new("-f"), OsStr::new("--show"), file.as_os_str()],
        QUICK,
        &[],
    ) {
        Ok(out) => out.trim().to_string(),
        Err(e) => {
            let _ = unmount_fuse(&file, pid);
            return Err(e);
        }
    };
    Ok(Attachment::Fuse {
        pid,
        file,
        loop_device,
    })
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on a pid this process started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

/// Whether a process is alive.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// Whether a process is running: alive and not a zombie waiting to be reaped.
pub fn running(pid: u32) -> bool {
    if !alive(pid) {
        return false;
    }
    // /proc/PID/stat: "PID (COMM) STATE ..."; COMM may contain spaces and parentheses.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(true)
}

/// Waits up to `limit` for a process to exit; true if it did.
pub fn wait_exit(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while running(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn unmount_fuse(file: &Path, pid: u32) -> HostResult<()> {
    let r = run(
        "fusermount3",
        &[OsStr::new("-u"), file.as_os_str()],
        QUICK,
        &[],
    );
    if r.is_err() {
        let _ = run("umount", &[OsStr::new("-l"), file.as_os_str()], QUICK, &[]);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(pid) {
        kill(pid);
    }
    Ok(())
}

/// Undoes an attachment. Best effort for each step so that a half-broken attachment
/// (after a crash) is still cleaned up; the first error is returned.
pub fn detach(a: &Attachment) -> HostResult<()> {
    match a {
        Attachment::Kernel { device } => run_s("nbd-client", &["-d", device], QUICK).map(|_| ()),
        Attachment::Fuse {
            pid,
            file,
            loop_device,
        } => {
            let mut first = None;
            if loop_attached_to(loop_device, file) {
                for attempt in 0..50 {
                    match run_s("losetup", &["-d", loop_device], QUICK) {
                        Ok(_) => break,
                        Err(e) if attempt == 49 => first = Some(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            }
            let _ = unmount_fuse(file, *pid);
            first.map_or(Ok(()), Err)
        }
    }
}

/// Loop devices backed by `file` (for cleaning up after a crash, when nothing recorded
/// which device a build attached).
pub fn loop_devices_backed_by(file: &Path) -> Vec<String> {
    let want = file.display().to_string();
    run_s(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
        QUICK,
    )
    .map(|out| {
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, f)| {
                let f = f.trim();
                f == want || f.strip_suffix(" (deleted)") == Some(want.as_str())
            })
            .map(|(d, _)| d.to_string())
            .collect()
    })
    .unwrap_or_default()
}

/// Whether `loop_device` is currently backed by `file`.
fn loop_attached_to(loop_device: &str, file: &Path) -> bool {
    run_s(
        "losetup",
        &["--noheadings", "-O", "BACK-FILE", loop_device],
        QUICK,
    )
    .map(|out| out.trim() == file.display().to_string())
    .unwrap_or(false)
}

/// Makes a file system.
pub fn mkfs(device: &str, fs_type: &str, label: &str) -> HostResult<()> {
    match fs_type {
        "ext4" => run_s(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                &label[..label.len().min(16)],
                "-E",
                "nodiscard",
                device,
            ],
            LONG,
        ),
        "xfs" => run_s(
            "mkfs.xfs",
            &[
                "-q",
                "-f",
                "-K",
                "-L",
                &label[..label.len().min(12)],
                device,
            ],
            LONG,
        ),
        other => {
            return Err(err(
                "mkfs",
                format!("unknown file system {other:?}; use ext4 or xfs"),
            ));
        }
    }
    .map(|_| ())
}

pub fn mount(device: &str, target: &Path, read_only: bool) -> HostResult<()> {
    std::fs::create_dir_all(target)
        .map_err(|e| err("mount", format!("creating {}: {e}", target.display())))?;
    let opts = if read_only {
        "ro,noatime,noload"
    } else {
        "noatime"
    };
    run(
        "mount",
        &[
            OsStr::new("-o"),
            OsStr::new(opts),
            OsStr::new(device),
            target.as_os_str(),
        ],
        QUICK,
        &[],
    )
    .map(|_| ())
}

pub fn is_mounted(target: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(&target.display().to_string()))
        })
        .unwrap_or(false)
}

pub fn unmount(target: &Path) -> HostResult<()> {
    if !is_mounted(target) {
        return Ok(());
    }
    for attempt in 0..20 {
        match run("umount", &[target.as_os_str()], QUICK, &[]) {
            Ok(_) => return Ok(()),
            Err(e) if attempt == 19 => {
                let _ = run(
                    "umount",
                    &[OsStr::new("-l"), target.as_os_str()],
                    QUICK,
                    &[],
                );
                return Err(e);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}

/// Whether a TCP port on `addr` can be bound now.
pub fn port_free(addr: &str, port: u16) -> bool {
    TcpListener::bind((addr, port)).is_ok()
}
