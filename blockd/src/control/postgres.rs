//! Running PostgreSQL on a mounted volume, always as the `postgres` OS user.
//!
//! Layout on a database volume: `/pgdata` is the data directory. Outside the volume, every
//! instance has a private run directory (mode 0700, owned by `postgres`) holding its Unix
//! socket and its server log; blockd talks to the instance only through that socket.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::host::{self, HostResult, err};

pub const PGDATA_DIR: &str = "pgdata";
pub const SUPERUSER: &str = "postgres";
const OS_USER: &str = "postgres";

/// pg_hba.conf blockd installs on every database it manages: the private socket trusts
/// (only root and the postgres user can reach it), TCP needs a password.
pub const HBA: &str = "\
# Written by blockd. Local connections come through blockd's private socket directory.
local   all   all                 trust
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
host    all   all   0.0.0.0/0     scram-sha-256
host    all   all   ::/0          scram-sha-256
";

/// One installed PostgreSQL major version.
#[derive(Debug, Clone)]
pub struct Pg {
    pub version: u32,
    bin: PathBuf,
}

/// Major versions installed under /usr/lib/postgresql.
pub fn installed() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .filter(|n: &u32| {
                    Path::new(&format!("/usr/lib/postgresql/{n}/bin/postgres")).exists()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The uid and gid of the `postgres` OS user.
pub fn os_user_ids() -> HostResult<(u32, u32)> {
    let out = host::run_s("id", &["-u", OS_USER], host::QUICK)?;
    let uid = out
        .trim()
        .parse()
        .map_err(|_| err("id -u postgres", out.clone()))?;
    let out = host::run_s("id", &["-g", OS_USER], host::QUICK)?;
    let gid = out
        .trim()
        .parse()
        .map_err(|_| err("id -g postgres", out.clone()))?;
    Ok((uid, gid))
}

/// Makes `dir` exist, owned by postgres, with `mode`.
pub fn own_dir(dir: &Path, mode: u32) -> HostResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| err("creating a directory", format!("{}: {e}", dir.display())))?;
    chown(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("chmod", format!("{}: {e}", dir.display())))
}

pub fn chown(path: &Path) -> HostResult<()> {
    let (uid, gid) = os_user_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| err("chown", format!("{}: {e}", path.display())))
}

/// Checks that the postgres user can reach `dir` (every directory on the way must be
/// searchable by it); the error names the first directory that is not.
pub fn check_reachable(dir: &Path) -> HostResult<()> {
    let searchable = |p: &Path| {
        host::run(
            "runuser",
            &[
                OsStr::new("-u"),
                OsStr::new(OS_USER),
                OsStr::new("--"),
                OsStr::new("test"),
                OsStr::new("-x"),
                p.as_os_str(),
            ],
            host::QUICK,
            &[],
        )
        .is_ok()
    };
    if searchable(dir) {
        return Ok(());
    }
    let mut culprit = dir.to_path_buf();
    for a in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
        if !searchable(a) {
            culprit = a.to_path_buf();
            break;
        }
    }
    let mode = std::fs::metadata(&culprit)
        .map(|m| format!("mode {:04o}", m.permissions().mode() & 0o7777))
        .unwrap_or_else(|e| e.to_string());
    Err(err(
        format!("the {OS_USER} user reaching {}", dir.display()),
        format!(
            "{} ({mode}) is not searchable by the {OS_USER} user, which runs the databases; \
             make it searchable (e.g. chmod o+x {}) or give blockd a --data-dir whose parent \
             directories are",
            culprit.display(),
            culprit.display()
        ),
    ))
}

/// Writes a file owned by postgres.
pub fn write_owned(path: &Path, content: &[u8], mode: u32) -> HostResult<()> {
    std::fs::write(path, content)
        .map_err(|e| err("writing", format!("{}: {e}", path.display())))?;
    chown(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("chmod", format!("{}: {e}", path.display())))
}

impl Pg {
    pub fn find(version: u32) -> HostResult<Pg> {
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if !bin.join("postgres").exists() {
            let have = installed();
            return Err(err(
                format!("PostgreSQL {version}"),
                if have.is_empty() {
                    "no PostgreSQL is installed under /usr/lib/postgresql; install the postgresql package".to_string()
                } else {
                    format!(
                        "it is not installed; installed versions: {}",
                        have.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            ));
        }
        Ok(Pg { version, bin })
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Runs one of this version's programs as the postgres user.
    fn run_as(
        &self,
        tool: &str,
        args: &[&OsStr],
        limit: Duration,
        env: &[(&str, &str)],
    ) -> HostResult<String> {
        let prog = self.tool(tool);
        let mut a: Vec<&OsStr> = vec![
            OsStr::new("-u"),
            OsStr::new(OS_USER),
            OsStr::new("--"),
            prog.as_os_str(),
        ];
        a.extend_from_slice(args);
        host::run("runuser", &a, limit, env)
    }

    pub fn initdb(&self, pgdata: &Path) -> HostResult<()> {
        self.run_as(
            "initdb",
            &[
                OsStr::new("-D"),
                pgdata.as_os_str(),
                OsStr::new("-U"),
                OsStr::new(SUPERUSER),
                OsStr::new("--auth-local=trust"),
                OsStr::new("--auth-host=scram-sha-256"),
                OsStr::new("-E"),
                OsStr::new("UTF8"),
                OsStr::new("--no-instructions"),
            ],
            host::LONG,
            &[],
        )
        .map(|_| ())
    }

    /// Starts the server and waits until it accepts connections. `listen` empty means
    /// the private socket only.
    pub fn start(&self, pgdata: &Path, run_dir: &Path, port: u16, listen: &str) -> HostResult<()> {
        self.start_with(pgdata, run_dir, port, listen, "")
    }

    /// Starts the server with `extra` appended to its command-line options.
    fn start_with(
        &self,
        pgdata: &Path,
        run_dir: &Path,
        port: u16,
        listen: &str,
        extra: &str,
    ) -> HostResult<()> {
        let opts = format!(
            "-p {port} -c listen_addresses='{listen}' -c unix_socket_directories='{}' \
             -c archive_mode=off -c hba_file='{}/pg_hba.conf' {extra}",
            run_dir.display(),
            pgdata.display()
        );
        let log = run_dir.join("postgres.log");
        self.run_as(
            "pg_ctl",
            &[
                OsStr::new("-D"),
                pgdata.as_os_str(),
                OsStr::new("-o"),
                OsStr::new(&opts),
                OsStr::new("-l"),
                log.as_os_str(),
                OsStr::new("-w"),
                OsStr::new("-t"),
                OsStr::new("600"),
                OsStr::new("start"),
            ],
            Duration::from_secs(610),
            &[],
        )
        .map_err(|e| {
            let log_tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last: Vec<&str> = log_tail.lines().rev().take(10).collect();
            err(
                e.what,
                format!(
                    "{}; server log {}:\n{}",
                    e.detail,
                    log.display(),
                    last.into_iter().rev().collect::<Vec<_>>().join("\n")
                ),
            )
        })
        .map(|_| ())
    }

    /// Stops the server: `fast` rolls back sessions and checkpoints; `immediate` does not.
    pub fn stop(&self, pgdata: &Path, mode: &str) -> HostResult<()> {
        if running_pid(pgdata).is_none() {
            return Ok(());
        }
        self.run_as(
            "pg_ctl",
            &[
                OsStr::new("-D"),
                pgdata.as_os_str(),
                OsStr::new("-m"),
                OsStr::new(mode),
                OsStr::new("-w"),
                OsStr::new("-t"),
                OsStr::new("120"),
                OsStr::new("stop"),
            ],
            Duration::from_secs(130),
            &[],
        )
        .map(|_| ())
    }

    /// Starts a copy of a standby as a primary of its own: it must never reach the
    /// production primary its settings name, so it starts with no `primary_conninfo`, is
    /// promoted (ending recovery at the end of the WAL it holds, on a new timeline), and
    /// the standby settings are removed for good.
    pub fn start_promoted(
        &self,
        pgdata: &Path,
        run_dir: &Path,
        port: u16,
        listen: &str,
    ) -> HostResult<()> {
        self.start_with(
            pgdata,
            run_dir,
            port,
            listen,
            "-c primary_conninfo='' -c primary_slot_name=''",
        )?;
        if pgdata.join("standby.signal").exists() {
            self.run_as(
                "pg_ctl",
                &[
                    OsStr::new("-D"),
                    pgdata.as_os_str(),
                    OsStr::new("-w"),
                    OsStr::new("-t"),
                    OsStr::new("600"),
                    OsStr::new("promote"),
                ],
                Duration::from_secs(610),
                &[],
            )?;
        }
        for setting in ["primary_conninfo", "primary_slot_name"] {
            self.psql(
                run_dir,
                port,
                "postgres",
                &format!("ALTER SYSTEM RESET {setting}"),
            )?;
        }
        Ok(())
    }

    /// Copies a running primary into `pgdata` with `pg_basebackup`, streaming the WAL it
    /// needs, configured as its standby (`-R`). The password comes from `passfile`.
    pub fn basebackup(&self, conninfo: &str, passfile: &Path, pgdata: &Path) -> HostResult<()> {
        let pass = passfile.display().to_string();
        self.run_as(
            "pg_basebackup",
            &[
                OsStr::new("-d"),
                OsStr::new(conninfo),
                OsStr::new("-D"),
                pgdata.as_os_str(),
                OsStr::new("-X"),
                OsStr::new("stream"),
                OsStr::new("-R"),
                OsStr::new("-c"),
                OsStr::new("fast"),
                OsStr::new("-w"),
            ],
            Duration::from_secs(24 * 3600),
            &[("PGPASSFILE", pass.as_str())],
        )
        .map(|_| ())
    }

    /// Runs one query over the private socket; returns its rows unaligned, `|`-separated.
    pub fn query(&self, run_dir: &Path, port: u16, sql: &str) -> HostResult<String> {
        self.psql_with(
            run_dir,
            port,
            "postgres",
            "-tA",
            sql,
            Duration::from_secs(30),
        )
        .map(|s| s.trim().to_string())
    }

    /// Runs one command on a connection string (e.g. a replication connection to the
    /// primary); returns its rows unaligned, `|`-separated.
    pub fn query_conn(&self, conninfo: &str, sql: &str) -> HostResult<String> {
        self.run_as(
            "psql",
            &[
                OsStr::new("-X"),
                OsStr::new("-tA"),
                OsStr::new("-w"),
                OsStr::new("-d"),
                OsStr::new(conninfo),
                OsStr::new("-c"),
                OsStr::new(sql),
            ],
            Duration::from_secs(30),
            &[],
        )
        .map(|s| s.trim().to_string())
    }

    /// Runs SQL through psql over the private socket, stopping at the first error.
    pub fn psql(&self, run_dir: &Path, port: u16, db: &str, sql: &str) -> HostResult<String> {
        self.psql_with(run_dir, port, db, "-q", sql, host::LONG)
    }

    fn psql_with(
        &self,
        run_dir: &Path,
        port: u16,
        db: &str,
        output: &str,
        sql: &str,
        limit: Duration,
    ) -> HostResult<String> {
        self.run_as(
            "psql",
            &[
                OsStr::new("-X"),
                OsStr::new(output),
                OsStr::new("-v"),
                OsStr::new("ON_ERROR_STOP=1"),
                OsStr::new("-h"),
                run_dir.as_os_str(),
                OsStr::new("-p"),
                OsStr::new(&port.to_string()),
                OsStr::new("-U"),
                OsStr::new(SUPERUSER),
                OsStr::new("-d"),
                OsStr::new(db),
                OsStr::new("-c"),
                OsStr::new(sql),
            ],
            limit,
            &[],
        )
    }

    /// Runs a user script: `.sql` files through psql (one transaction, stopping at the
    /// first error), anything else as an executable, as the postgres user, with PGHOST,
    /// PGPORT, PGUSER and PGDATABASE pointing at the instance.
    pub fn run_script(&self, run_dir: &Path, port: u16, script: &Path) -> HostResult<String> {
        let port_s = port.to_string();
        let host_s = run_dir.display().to_string();
        let bin_path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env = [
            ("PGHOST", host_s.as_str()),
            ("PGPORT", port_s.as_str()),
            ("PGUSER", SUPERUSER),
            ("PGDATABASE", "postgres"),
            ("PATH", bin_path.as_str()),
        ];
        let is_sql = script
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("sql"));
        if is_sql {
            self.run_as(
                "psql",
                &[
                    OsStr::new("-X"),
                    OsStr::new("-q"),
                    OsStr::new("-v"),
                    OsStr::new("ON_ERROR_STOP=1"),
                    OsStr::new("--single-transaction"),
                    OsStr::new("-f"),
                    script.as_os_str(),
                ],
                host::LONG,
                &env,
            )
        } else {
            let a = [
                OsStr::new("-u"),
                OsStr::new(OS_USER),
                OsStr::new("--"),
                script.as_os_str(),
            ];
            host::run("runuser", &a, host::LONG, &env)
        }
    }
}

/// The pid of the server running on `pgdata`, if any (from postmaster.pid).
pub fn running_pid(pgdata: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    host::alive(pid).then_some(pid)
}

/// The postmaster serving `pgdata`, if one runs: the pid in postmaster.pid, checked
/// against that process's command line (after a crash the pid may belong to another
/// program by now).
pub fn postmaster_of(pgdata: &Path) -> Option<u32> {
    use std::os::unix::ffi::OsStrExt;
    let pid = running_pid(pgdata)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = pgdata.as_os_str().as_bytes();
    cmdline
        .windows(needle.len())
        .any(|w| w == needle)
        .then_some(pid)
}

/// Removes the postmaster.pid a crash left in a data directory that was just mounted (no
/// server can be using it): PostgreSQL refuses to start while its pid is taken, which after
/// a crash may be by any process.
pub fn remove_stale_pid_file(pgdata: &Path) -> HostResult<()> {
    let p = pgdata.join("postmaster.pid");
    match std::fs::remove_file(&p) {
        Ok(()) => {
            tracing::info!(file = %p.display(), "removed a stale postmaster.pid");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(
            "removing a stale postmaster.pid",
            format!("{}: {e}", p.display()),
        )),
    }
}

/// Whether the server on `pgdata` runs and accepts connections: postmaster.pid's status
/// line says `ready` (it says `starting` during start-up and crash recovery).
pub fn is_ready(pgdata: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return false;
    };
    let mut lines = text.lines();
    let alive = lines
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
        .is_some_and(host::alive);
    alive && lines.nth(6).map(str::trim) == Some("ready")
}

/// Installs blockd's pg_hba.conf and removes settings a restored backup may carry that
/// would stop it from starting here.
pub fn prepare_data_dir(pgdata: &Path) -> HostResult<()> {
    write_owned(&pgdata.join("pg_hba.conf"), HBA.as_bytes(), 0o600)?;
    // Debian keeps a cluster's configuration in /etc, so a pg_basebackup of it has none:
    // start from the built-in defaults.
    for f in ["postgresql.conf", "pg_ident.conf"] {
        let p = pgdata.join(f);
        if !p.exists() {
            write_owned(&p, b"# Written by blockd: the backup had none.\n", 0o600)?;
        }
    }
    // A data directory from pg_basebackup may carry a standby signal; a database image is
    // a primary of its own.
    for f in ["standby.signal", "recovery.signal"] {
        let p = pgdata.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| {
                err(
                    "preparing the data directory",
                    format!("{}: {e}", p.display()),
                )
            })?;
        }
    }
    Ok(())
}

/// Makes a fresh copy of a primary a standby that blockd runs: blockd's pg_hba.conf, an
/// empty configuration file if the primary kept its own elsewhere (Debian keeps it in
/// /etc), `standby.signal`, and `primary_conninfo` set to `conninfo`.
pub fn prepare_standby(pgdata: &Path, conninfo: &str) -> HostResult<()> {
    write_owned(&pgdata.join("pg_hba.conf"), HBA.as_bytes(), 0o600)?;
    for f in ["postgresql.conf", "pg_ident.conf"] {
        let p = pgdata.join(f);
        if !p.exists() {
            write_owned(
                &p,
                b"# Written by blockd: the primary had none here.\n",
                0o600,
            )?;
        }
    }
    let _ = std::fs::remove_file(pgdata.join("recovery.signal"));
    write_owned(&pgdata.join("standby.signal"), b"", 0o600)?;
    let auto = pgdata.join("postgresql.auto.conf");
    let old = std::fs::read_to_string(&auto).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!(
        "primary_conninfo = '{}'\n",
        conninfo.replace('\\', "\\\\").replace('\'', "''")
    ));
    write_owned(&auto, text.as_bytes(), 0o600)
}

/// A random password (32 hex digits from /dev/urandom).
pub fn random_secret(bytes: usize) -> HostResult<String> {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| err("reading /dev/urandom", e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A psql process kept connected to one server, for queries that must not wait on the
/// file system: a new connection may write files (a backend rebuilds the relation cache
/// file), which blocks while the file system is frozen; an open one only reads.
pub struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
}

impl Pg {
    /// Connects over the private socket; the connection is open when this returns.
    pub fn session(&self, run_dir: &Path, port: u16) -> HostResult<Session> {
        use std::process::{Command, Stdio};
        let mut child = Command::new("runuser")
            .args(["-u", OS_USER, "--"])
            .arg(self.tool("psql"))
            .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(run_dir)
            .args(["-p", &port.to_string(), "-U", SUPERUSER, "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err("starting psql", e.to_string()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err("starting psql", "no pipes to it"));
        };
        let mut s = Session {
            child,
            stdin,
            stdout,
        };
        s.query_row("SELECT 1", Duration::from_secs(30))?;
        Ok(s)
    }
}

impl Session {
    /// Runs a query returning one row; returns it unaligned, `|`-separated.
    pub fn query_row(&mut self, sql: &str, limit: Duration) -> HostResult<String> {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let what = || format!("psql: {sql}");
        writeln!(self.stdin, "{};", sql.trim_end_matches(';'))
            .and_then(|()| self.stdin.flush())
            .map_err(|e| err(what(), format!("{e}{}", self.stderr())))?;
        let deadline = std::time::Instant::now() + limit;
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(err(what(), format!("no answer within {limit:?}")));
            }
            let mut pfd = libc::pollfd {
                fd: self.stdout.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid descriptor we own, for at most `left`.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as i32) };
            if n <= 0 {
                continue;
            }
            let mut b = [0u8; 1];
            match self.stdout.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => line.push(b[0]),
                Ok(_) => return Err(err(what(), format!("psql ended{}", self.stderr()))),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(what(), e.to_string())),
            }
        }
        Ok(String::from_utf8_lossy(&line).trim().to_string())
    }

    /// What psql said on its way out (it has exited when this is called).
    fn stderr(&mut self) -> String {
        use std::io::Read;
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        if s.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", s.trim())
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
