//! Sources: volumes kept in sync with a production PostgreSQL, and their revisions.
//!
//! A source volume `src.NAME` holds a streaming standby of the primary (made with
//! `pg_basebackup -R`), run by the daemon on a private socket. The primary's password lives
//! in a passfile in the source's run directory, outside the volume, so it never reaches a
//! revision or a clone.
//!
//! A refresh freezes the standby's file system (`fsfreeze`), records how far WAL was
//! received and replayed, snapshots the volume (`src.NAME@rN`) and thaws: the cost does
//! not depend on the database size. Without a post-script that snapshot is the revision;
//! a clone of it starts as a standby without a primary and is promoted (new timeline).
//! With a post-script, a private clone is promoted, masked and frozen as `rev.NAME.N@image`,
//! and the raw snapshot is dropped: masking is applied to revisions, never to the source.
//! Retention keeps the newest `retain` revisions plus any a clone uses.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::host;
use super::model::*;
use super::plane::{CResult, Caller, ControlPlane, Kind, cerr, internal_name};
use super::postgres::{self, PGDATA_DIR, Pg};
use crate::names::Name;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The port of the servers blockd runs privately (standbys, masking): they listen on a
/// Unix socket in their own run directory only.
const STANDBY_PORT: u16 = 5432;

/// How often the sources thread measures each standby's lag for the metrics.
const LAG_INTERVAL: Duration = Duration::from_secs(10);

pub fn source_volume(source: &str) -> String {
    format!("src.{source}")
}

pub fn revision_volume(source: &str, n: u32) -> String {
    format!("rev.{source}.{n}")
}

/// A source as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    pub name: String,
    /// building, streaming, down
    pub state: String,
    pub version: u32,
    pub primary: String,
    pub refresh: String,
    pub retain: u32,
    pub masked: bool,
    pub size_bytes: u64,
    /// Last WAL location replayed by the standby, and the commit time of the last
    /// transaction replayed.
    pub replay_lsn: Option<String>,
    pub replay_timestamp: Option<String>,
    /// How far the standby is behind the primary.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub last_refresh_unix: Option<u64>,
    pub next_refresh_unix: Option<u64>,
    pub last_error: Option<String>,
    pub revisions: Vec<RevisionView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevisionView {
    /// `SOURCE@N`
    pub name: String,
    pub number: u32,
    pub lsn: String,
    pub replay_timestamp: Option<String>,
    pub created_unix: u64,
    pub masked: bool,
    /// How long the source's file system was frozen for the snapshot.
    pub frozen_ms: f64,
    pub clones: Vec<String>,
}

/// Parses `manual`, `none`, or `every 15m`.
pub fn parse_refresh(s: &str) -> Result<RefreshMode, String> {
    let t = s.trim();
    match t {
        "manual" => Ok(RefreshMode::Manual),
        "none" => Ok(RefreshMode::None),
        _ => {
            let every = t.strip_prefix("every ").ok_or_else(|| {
                format!("refresh {s:?} is not understood; write manual, none, or every DURATION (e.g. every 15m)")
            })?;
            let d = humantime::parse_duration(every.trim())
                .map_err(|e| format!("refresh {s:?}: {e}; write e.g. every 15m"))?;
            if d < Duration::from_secs(1) {
                return Err(format!(
                    "refresh {s:?} is too frequent; use at least every 1s"
                ));
            }
            Ok(RefreshMode::Every {
                seconds: d.as_secs(),
            })
        }
    }
}

fn refresh_label(r: &RefreshMode) -> String {
    match r {
        RefreshMode::Manual => "manual".into(),
        RefreshMode::None => "none".into(),
        RefreshMode::Every { seconds } => format!(
            "every {}",
            humantime::format_duration(Duration::from_secs(*seconds))
        ),
    }
}

/// How the daemon gets the primary's password: a file on its host, or one of its
/// environment variables. Never stored by blockd.
fn resolve_password(p: &PrimaryDef) -> CResult<String> {
    match (&p.password_file, &p.password_env) {
        (Some(f), None) => std::fs::read_to_string(f)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| {
                cerr(
                    Kind::Invalid,
                    format!("cannot read passwordFile {f} on the daemon's host: {e}"),
                )
            }),
        (None, Some(v)) => std::env::var(v).map_err(|_| {
            cerr(
                Kind::Invalid,
                format!(
                    "environment variable {v} (passwordEnv) is not set in the daemon's environment"
                ),
            )
        }),
        (None, None) => Err(cerr(
            Kind::Invalid,
            "give primary.passwordFile or primary.passwordEnv (the password itself never goes in the YAML)",
        )),
        (Some(_), Some(_)) => Err(cerr(
            Kind::Invalid,
            "give either primary.passwordFile or primary.passwordEnv, not both",
        )),
    }
}

/// Escapes a field of a .pgpass line.
fn pgpass_field(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

impl ControlPlane {
    fn source_run_dir(&self, s: &str) -> PathBuf {
        self.run_dir(&source_volume(s))
    }

    fn passfile(&self, s: &str) -> PathBuf {
        self.source_run_dir(s).join("primary.pgpass")
    }

    /// Writes the primary's passfile into the source's private run directory.
    fn write_passfile(&self, src: &SourceRec) -> CResult<()> {
        let pw = resolve_password(&src.primary)?;
        let run = self.source_run_dir(&src.name);
        postgres::own_dir(&run, 0o700)?;
        let line = format!(
            "{}:{}:*:{}:{}\n",
            pgpass_field(&src.primary.host),
            src.primary.port,
            pgpass_field(&src.primary.user),
            pgpass_field(&pw)
        );
        postgres::write_owned(&self.passfile(&src.name), line.as_bytes(), 0o600)?;
        Ok(())
    }

    /// How the standby (and blockd) reach the primary; `replication=true` added for
    /// replication commands.
    fn conninfo(&self, src: &SourceRec) -> String {
        format!(
            "host={} port={} user={} passfile={} application_name=blockd_{} connect_timeout=10",
            src.primary.host,
            src.primary.port,
            src.primary.user,
            self.passfile(&src.name).display(),
            src.name
        )
    }

    // ------------------------------------------------------------ create

    /// Starts creating a source in the background; returns the job id.
    pub fn create_source(self: &Arc<Self>, caller: &Caller, req: SourceRequest) -> CResult<u64> {
        caller.require_admin("creating sources")?;
        Name::parse("source", &req.name).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        let size = req.size.bytes().map_err(|e| cerr(Kind::Invalid, e))?;
        crate::store::check_volume_size(size).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        let refresh = parse_refresh(req.refresh.as_deref().unwrap_or("manual"))
            .map_err(|e| cerr(Kind::Invalid, e))?;
        let retain = req.retain.unwrap_or(8);
        if retain == 0 {
            return Err(cerr(
                Kind::Invalid,
                "retain must be at least 1 (the newest revision)",
            ));
        }
        let fs = req.filesystem.clone().unwrap_or_else(|| "ext4".into());
        if fs != "ext4" && fs != "xfs" {
            return Err(cerr(
                Kind::Invalid,
                format!("filesystem {fs:?} is not supported; use ext4 or xfs"),
            ));
        }
        Pg::find(req.version).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        resolve_password(&req.primary)?;
        if self.source_exists(&req.name) {
            return Err(cerr(
                Kind::AlreadyExists,
                format!(
                    "source {} already exists; delete it first or pick another name",
                    req.name
                ),
            ));
        }
        if self.state.lock().images.contains_key(&req.name) {
            return Err(cerr(
                Kind::AlreadyExists,
                format!(
                    "an image named {} exists; sources and images share one name space",
                    req.name
                ),
            ));
        }
        let rec = SourceRec {
            name: req.name.clone(),
            state: SourceState::Building,
            volume: source_volume(&req.name),
            version: req.version,
            primary: req.primary.clone(),
            size_bytes: size,
            filesystem: fs,
            refresh,
            retain,
            post_script: req.post_script.clone(),
            tags: req.tags.clone(),
            revisions: Vec::new(),
            next_revision: 1,
            attachment: None,
            created_unix: now_unix(),
            last_refresh_unix: None,
            last_attempt_unix: None,
            last_error: None,
        };
        self.check_reachable()?;
        self.check_socket_path("source", &req.name, &source_volume(&req.name))?;
        let me = self.clone();
        self.start_job(
            "source",
            &req.name,
            format!("source:{}", req.name),
            move |job| me.build_source(job, rec),
        )
    }

    fn build_source(&self, job: u64, rec: SourceRec) -> CResult<()> {
        let name = rec.name.clone();
        self.update(|st| {
            st.sources.insert(name.clone(), rec.clone());
            Ok(())
        })?;
        let result = (|| -> CResult<()> {
            let pg = Pg::find(rec.version)?;
            let vname = internal_name(&rec.volume)?;
            self.step(job, "creating the volume");
            self.store.create_volume(&vname, rec.size_bytes)?;
            self.step(job, "attaching the volume");
            self.attach_source(&name)?;
            let mnt = self.mountpoint(&rec.volume);
            self.step(job, &format!("making the {} file system", rec.filesystem));
            // attach_source mounted nothing yet for a new volume: make the file system first.
            let dev = self
                .source_attachment(&name)
                .map(|a| a.device().to_string())
                .ok_or_else(|| cerr(Kind::Failed, "not attached"))?;
            host::mkfs(&dev, &rec.filesystem, &name)?;
            host::mount(&dev, &mnt, false)?;
            let pgdata = mnt.join(PGDATA_DIR);
            postgres::own_dir(&pgdata, 0o700)?;
            self.write_passfile(&rec)?;
            self.step(
                job,
                &format!(
                    "pg_basebackup from {}:{}",
                    rec.primary.host, rec.primary.port
                ),
            );
            pg.basebackup(&self.conninfo(&rec), &self.passfile(&name), &pgdata)?;
            postgres::prepare_standby(&pgdata, &self.conninfo(&rec))?;
            self.step(job, "starting the standby");
            pg.start(&pgdata, &self.source_run_dir(&name), STANDBY_PORT, "")?;
            Ok(())
        })();
        if let Err(e) = result {
            self.step(job, "cleaning up after the failure");
            self.discard_source(&name);
            return Err(e);
        }
        self.update(|st| {
            if let Some(s) = st.sources.get_mut(&name) {
                s.state = SourceState::Ready;
            }
            Ok(())
        })?;
        tracing::info!(source = %name, "source streaming");
        if !matches!(rec.refresh, RefreshMode::None) {
            self.step(job, "first refresh");
            self.record_refresh(&name, self.refresh_locked(&name))?;
        }
        Ok(())
    }

    /// Attaches a source's volume (and mounts it if it holds a file system).
    fn attach_source(&self, name: &str) -> CResult<()> {
        let volume = source_volume(name);
        let size = self.store.show_volume(&volume)?.size_bytes;
        let att = host::attach(self.nbd(), &volume, size, &self.work_dir(&volume))?;
        let n = name.to_string();
        self.update(|st| {
            if let Some(s) = st.sources.get_mut(&n) {
                s.attachment = Some(att.clone());
            }
            Ok(())
        })?;
        Ok(())
    }

    fn source_attachment(&self, name: &str) -> Option<host::Attachment> {
        self.state
            .lock()
            .sources
            .get(name)
            .and_then(|s| s.attachment.clone())
    }

    /// Brings a source's standby up: attach, mount, start.
    pub(crate) fn start_source(&self, name: &str) -> CResult<()> {
        let src = self.source_rec(name)?;
        let pg = Pg::find(src.version)?;
        if src.attachment.is_none() {
            self.attach_source(name)?;
        }
        let att = self
            .source_attachment(name)
            .ok_or_else(|| cerr(Kind::Failed, "not attached"))?;
        let mnt = self.mountpoint(&src.volume);
        if !host::is_mounted(&mnt) {
            host::mount(att.device(), &mnt, false)?;
        }
        self.write_passfile(&src)?;
        let pgdata = mnt.join(PGDATA_DIR);
        if postgres::running_pid(&pgdata).is_none() {
            pg.start(&pgdata, &self.source_run_dir(name), STANDBY_PORT, "")?;
        }
        Ok(())
    }

    /// Stops a source's standby and detaches its volume.
    pub(crate) fn stop_source(&self, name: &str) -> CResult<()> {
        let Some(src) = self.state.lock().sources.get(name).cloned() else {
            return Ok(());
        };
        let mnt = self.mountpoint(&src.volume);
        let mut first = None;
        if let Ok(pg) = Pg::find(src.version)
            && let Err(e) = pg.stop(&mnt.join(PGDATA_DIR), "fast")
        {
            first = Some(e.into());
        }
        if let Err(e) = host::unmount(&mnt) {
            first.get_or_insert(e.into());
        }
        if let Some(a) = &src.attachment
            && let Err(e) = self.detach(a, &src.volume)
        {
            first.get_or_insert(e.into());
        }
        let n = name.to_string();
        self.update(|st| {
            if let Some(s) = st.sources.get_mut(&n) {
                s.attachment = None;
            }
            Ok(())
        })?;
        first.map_or(Ok(()), Err)
    }

    /// Removes what a failed or interrupted source creation made.
    fn discard_source(&self, name: &str) {
        let volume = source_volume(name);
        let _ = self.stop_source(name);
        super::plane::cleanup_fuse_dir(&self.work_dir(&volume));
        let _ = self.store.delete_volume(&volume);
        let _ = std::fs::remove_dir_all(self.source_run_dir(name));
        let _ = self.update(|st| {
            st.sources.remove(name);
            Ok(())
        });
    }

    fn source_rec(&self, name: &str) -> CResult<SourceRec> {
        self.state
            .lock()
            .sources
            .get(name)
            .cloned()
            .ok_or_else(|| source_not_found(name))
    }

    pub(crate) fn source_exists(&self, name: &str) -> bool {
        self.state.lock().sources.contains_key(name)
    }

    // ------------------------------------------------------------ status

    /// Runs SQL on the source's standby over its private socket.
    fn standby_query(&self, src: &SourceRec, sql: &str) -> CResult<String> {
        let pg = Pg::find(src.version)?;
        Ok(pg.query(&self.source_run_dir(&src.name), STANDBY_PORT, sql)?)
    }

    /// The primary's current WAL position, over a replication connection.
    fn primary_lsn(&self, src: &SourceRec) -> CResult<String> {
        let pg = Pg::find(src.version)?;
        let conn = format!("{} replication=true", self.conninfo(src));
        let out = pg.query_conn(&conn, "IDENTIFY_SYSTEM")?;
        out.split('|').nth(2).map(str::to_string).ok_or_else(|| {
            cerr(
                Kind::Failed,
                format!("unexpected IDENTIFY_SYSTEM answer: {out}"),
            )
        })
    }

    /// Where the standby is and how far behind the primary; also sets the source's
    /// gauges. Fields are None when the standby is down or does not answer.
    fn replication(&self, src: &SourceRec) -> Replication {
        let mut r = Replication::default();
        if postgres::running_pid(&self.mountpoint(&src.volume).join(PGDATA_DIR)).is_none() {
            self.set_gauges(&src.name, &r);
            return r;
        }
        r.running = true;
        let sql = format!(
            "SELECT pg_last_wal_replay_lsn(), coalesce({}, ''), \
             coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::text, ''), \
             coalesce((SELECT status FROM pg_stat_wal_receiver), 'no receiver')",
            utc_text("pg_last_xact_replay_timestamp()")
        );
        if let Ok(row) = self.standby_query(src, &sql) {
            let f: Vec<&str> = row.trim().split('|').collect();
            r.replay_lsn = f.first().filter(|s| !s.is_empty()).map(|s| s.to_string());
            r.replay_timestamp = f.get(1).filter(|s| !s.is_empty()).map(|s| s.to_string());
            r.lag_seconds = f.get(2).and_then(|s| s.parse::<f64>().ok());
            r.streaming = f.get(3) == Some(&"streaming");
        }
        if let Some(replayed) = r.replay_lsn.as_deref().and_then(lsn_value)
            && let Some(primary) = self.primary_lsn(src).ok().as_deref().and_then(lsn_value)
        {
            r.lag_bytes = Some(primary.saturating_sub(replayed));
            // Caught up: no transaction is waiting, whatever the time since the last one.
            if r.lag_bytes == Some(0) {
                r.lag_seconds = Some(0.0);
            }
        }
        self.set_gauges(&src.name, &r);
        r
    }

    fn set_gauges(&self, name: &str, r: &Replication) {
        let m = self.metrics();
        m.source_streaming
            .with_label_values(&[name])
            .set(if r.streaming { 1.0 } else { 0.0 });
        match r.lag_bytes {
            Some(b) => m.source_lag_bytes.with_label_values(&[name]).set(b as f64),
            None => {
                let _ = m.source_lag_bytes.remove_label_values(&[name]);
            }
        }
        match r.lag_seconds {
            Some(sec) => m.source_lag_seconds.with_label_values(&[name]).set(sec),
            None => {
                let _ = m.source_lag_seconds.remove_label_values(&[name]);
            }
        }
    }

    /// Forgets a deleted source's series.
    fn drop_gauges(&self, name: &str) {
        let m = self.metrics();
        for g in [
            &m.source_streaming,
            &m.source_lag_bytes,
            &m.source_lag_seconds,
            &m.source_last_refresh_timestamp_seconds,
        ] {
            let _ = g.remove_label_values(&[name]);
        }
    }

    pub fn show_source(&self, name: &str) -> CResult<SourceView> {
        let src = self.source_rec(name)?;
        let st = self.state.lock().clone();
        let r = self.replication(&src);
        let running = r.running;
        let receiver = r.streaming.then(|| "streaming".to_string());
        let (replay_lsn, replay_ts, lag_bytes, lag_seconds) =
            (r.replay_lsn, r.replay_timestamp, r.lag_bytes, r.lag_seconds);
        let state = match (src.state, running) {
            (SourceState::Building, _) => "building",
            (SourceState::Ready, true) if receiver.as_deref() == Some("streaming") => "streaming",
            // Running, but not connected: the primary is down or unreachable; the standby
            // keeps retrying (every 5 s by default).
            (SourceState::Ready, true) => "disconnected",
            (SourceState::Ready, false) => "down",
        };
        let next = match (src.refresh, src.last_attempt_unix) {
            (RefreshMode::Every { seconds }, Some(last)) => Some(last + seconds),
            (RefreshMode::Every { .. }, None) => Some(src.created_unix),
            _ => None,
        };
        Ok(SourceView {
            name: src.name.clone(),
            state: state.into(),
            version: src.version,
            primary: format!(
                "{}@{}:{}",
                src.primary.user, src.primary.host, src.primary.port
            ),
            refresh: refresh_label(&src.refresh),
            retain: src.retain,
            masked: src.post_script.is_some(),
            size_bytes: src.size_bytes,
            replay_lsn,
            replay_timestamp: replay_ts,
            lag_bytes,
            lag_seconds,
            last_refresh_unix: src.last_refresh_unix,
            next_refresh_unix: next,
            last_error: src.last_error.clone(),
            revisions: src
                .revisions
                .iter()
                .rev()
                .map(|r| revision_view(&st, &src, r))
                .collect(),
        })
    }

    pub fn list_sources(&self) -> Vec<SourceView> {
        let names: Vec<String> = self.state.lock().sources.keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| self.show_source(n).ok())
            .collect()
    }

    // ------------------------------------------------------------ refresh

    pub fn refresh_source(&self, caller: &Caller, name: &str) -> CResult<RevisionView> {
        caller.require_admin("refreshing sources")?;
        let src = self.source_rec(name)?;
        if matches!(src.refresh, RefreshMode::None) {
            return Err(cerr(
                Kind::Invalid,
                format!("source {name} has refresh: none; it makes no revisions"),
            ));
        }
        if src.state != SourceState::Ready {
            return Err(cerr(
                Kind::Busy,
                format!("source {name} is still being created"),
            ));
        }
        self.refresh_inner(name)
    }

    /// Makes a new revision (see the module docs).
    pub(crate) fn refresh_inner(&self, name: &str) -> CResult<RevisionView> {
        let _busy = self.claim_source(name)?;
        self.record_refresh(name, self.refresh_locked(name))
    }

    /// Notes the outcome of a refresh in the source's record.
    fn record_refresh(&self, name: &str, result: CResult<RevisionView>) -> CResult<RevisionView> {
        if result.is_ok() {
            self.metrics()
                .source_last_refresh_timestamp_seconds
                .with_label_values(&[name])
                .set(now_unix() as f64);
        }
        let err = result.as_ref().err().map(|e| e.message.clone());
        let n = name.to_string();
        let _ = self.update(|st| {
            if let Some(s) = st.sources.get_mut(&n) {
                s.last_error = err.clone();
                s.last_attempt_unix = Some(now_unix());
                if err.is_none() {
                    s.last_refresh_unix = Some(now_unix());
                }
            }
            Ok(())
        });
        result
    }

    fn refresh_locked(&self, name: &str) -> CResult<RevisionView> {
        let src = self.source_rec(name)?;
        let mnt = self.mountpoint(&src.volume);
        let pgdata = mnt.join(PGDATA_DIR);
        if postgres::running_pid(&pgdata).is_none() {
            self.start_source(name)?;
        }
        let n = src.next_revision;
        let raw = format!("r{n}");
        let vname = internal_name(&src.volume)?;
        let snap_name = internal_name(&raw)?;
        // Where the WAL on the frozen file system ends is what a clone of the snapshot
        // replays to. The WAL receiver publishes how far it wrote just after its write
        // returns, so read until two readings agree: once frozen its next write blocks.
        let positions = format!(
            "SELECT coalesce((SELECT written_lsn FROM pg_stat_wal_receiver)::text, \
             pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text), \
             coalesce({}, '')",
            utc_text("pg_last_xact_replay_timestamp()")
        );
        // Connected before the freeze: a new connection could wait on the frozen files.
        let pg = Pg::find(src.version)?;
        let mut session = pg.session(&self.source_run_dir(name), STANDBY_PORT)?;
        let frozen_at = std::time::Instant::now();
        freeze(&mnt)?;
        let taken = (|| -> CResult<(String, Option<String>)> {
            let limit = Duration::from_secs(10);
            let mut row = session.query_row(&positions, limit)?;
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(10));
                let again = session.query_row(&positions, limit)?;
                if again == row {
                    break;
                }
                row = again;
            }
            let f: Vec<&str> = row.trim().split('|').collect();
            let lsn = f.first().map(|s| s.to_string()).unwrap_or_default();
            let ts = f.get(1).filter(|s| !s.is_empty()).map(|s| s.to_string());
            self.store.create_snapshot(&vname, &snap_name)?;
            Ok((lsn, ts))
        })();
        let thawed = thaw(&mnt);
        let frozen_us = frozen_at.elapsed().as_micros() as u64;
        let (lsn, ts) = taken?;
        thawed?;
        let raw_full = format!("{}@{raw}", src.volume);
        let (snapshot, masked) = match &src.post_script {
            None => (raw_full.clone(), false),
            Some(script) => match self.mask_revision(&src, n, &raw_full, script) {
                Ok(s) => (s, true),
                Err(e) => {
                    let _ = self.store.delete_snapshot(&raw_full, true);
                    return Err(e);
                }
            },
        };
        let rev = RevisionRec {
            number: n,
            snapshot,
            lsn,
            replay_timestamp: ts,
            created_unix: now_unix(),
            masked,
            frozen_us,
        };
        let nm = name.to_string();
        self.update(|st| {
            if let Some(s) = st.sources.get_mut(&nm) {
                s.revisions.push(rev.clone());
                s.next_revision = n + 1;
            }
            Ok(())
        })?;
        tracing::info!(source = %name, revision = n, lsn = %rev.lsn, frozen_us, "refreshed");
        self.apply_retention(name);
        let st = self.state.lock().clone();
        let src = self.source_rec(name)?;
        Ok(revision_view(&st, &src, &rev))
    }

    /// Promotes a private clone of the raw snapshot, runs the post-script on it, and freezes
    /// it as `rev.NAME.N@image`. Returns that snapshot's name.
    fn mask_revision(
        &self,
        src: &SourceRec,
        n: u32,
        raw: &str,
        script: &ScriptBody,
    ) -> CResult<String> {
        let pg = Pg::find(src.version)?;
        let volume = revision_volume(&src.name, n);
        let vname = internal_name(&volume)?;
        self.store.clone_volume(raw, &vname)?;
        let size = self.store.show_volume(&volume)?.size_bytes;
        let mnt = self.mountpoint(&volume);
        let run = self.run_dir(&volume);
        let att = host::attach(self.nbd(), &volume, size, &self.work_dir(&volume))?;
        let inner = (|| -> CResult<()> {
            host::mount(att.device(), &mnt, false)?;
            postgres::own_dir(&run, 0o700)?;
            let pgdata = mnt.join(PGDATA_DIR);
            postgres::remove_stale_pid_file(&pgdata)?;
            pg.start_promoted(&pgdata, &run, STANDBY_PORT, "")?;
            let dir = self.scripts_dir().join(format!("mask-{}-{n}", src.name));
            postgres::own_dir(&dir, 0o755)?;
            let path = dir.join(&script.name);
            let mode = if script.name.ends_with(".sql") {
                0o644
            } else {
                0o755
            };
            postgres::write_owned(&path, script.content.as_bytes(), mode)?;
            let ran = pg
                .run_script(&run, STANDBY_PORT, &path)
                .map_err(|e| cerr(Kind::Failed, format!("post-script {}: {e}", script.name)));
            let _ = std::fs::remove_dir_all(&dir);
            ran?;
            pg.stop(&pgdata, "fast")?;
            Ok(())
        })();
        if inner.is_err() {
            let _ = pg.stop(&mnt.join(PGDATA_DIR), "immediate");
        }
        let _ = host::unmount(&mnt);
        let _ = self.detach(&att, &volume);
        let _ = std::fs::remove_dir_all(&run);
        if let Err(e) = inner {
            let _ = self.store.delete_volume(&volume);
            return Err(e);
        }
        self.store
            .create_snapshot(&vname, &internal_name("image")?)?;
        // The raw snapshot holds unmasked data: hide it now; it is merged away once only
        // the masked revision needs it.
        self.store.delete_snapshot(raw, true)?;
        Ok(format!("{volume}@image"))
    }

    /// Deletes the oldest revisions beyond `retain` that no clone uses.
    fn apply_retention(&self, name: &str) {
        let Ok(src) = self.source_rec(name) else {
            return;
        };
        let st = self.state.lock().clone();
        let excess = src.revisions.len().saturating_sub(src.retain as usize);
        let mut removed = Vec::new();
        for r in src.revisions.iter().take(excess) {
            let label = format!("{name}@{}", r.number);
            if st.clones.values().any(|c| c.image == label) {
                continue;
            }
            if let Err(e) = self.delete_revision_data(&src, r) {
                tracing::warn!(revision = %label, error = %e, "could not delete an old revision; retrying at the next refresh");
                continue;
            }
            tracing::info!(revision = %label, "old revision deleted (retention)");
            removed.push(r.number);
        }
        if !removed.is_empty() {
            let n = name.to_string();
            let _ = self.update(|st| {
                if let Some(s) = st.sources.get_mut(&n) {
                    s.revisions.retain(|r| !removed.contains(&r.number));
                }
                Ok(())
            });
        }
    }

    fn delete_revision_data(&self, src: &SourceRec, r: &RevisionRec) -> CResult<()> {
        match self.store.delete_snapshot(&r.snapshot, false) {
            Ok(_) => {}
            Err(e) if e.kind() == crate::store::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if r.masked {
            match self
                .store
                .delete_volume(&revision_volume(&src.name, r.number))
            {
                Ok(()) => {}
                Err(e) if e.kind() == crate::store::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub fn delete_source(&self, caller: &Caller, name: &str) -> CResult<()> {
        caller.require_admin("deleting sources")?;
        let src = self.source_rec(name)?;
        let _busy = self.claim_source(name)?;
        let users: Vec<String> = self
            .state
            .lock()
            .clones
            .values()
            .filter(|c| c.image.split('@').next() == Some(name))
            .map(|c| c.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(cerr(
                Kind::InUse,
                format!(
                    "source {name} has revisions used by clones {}; delete them first",
                    users.join(", ")
                ),
            ));
        }
        self.stop_source(name)?;
        for r in src.revisions.iter().rev() {
            self.delete_revision_data(&src, r)?;
        }
        match self.store.delete_volume(&src.volume) {
            Ok(()) => {}
            Err(e) if e.kind() == crate::store::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let _ = std::fs::remove_dir_all(self.source_run_dir(name));
        self.update(|st| {
            st.sources.remove(name);
            Ok(())
        })?;
        self.drop_gauges(name);
        self.lag_measured.lock().remove(name);
        tracing::info!(source = %name, "source deleted");
        Ok(())
    }

    /// After a start: removes sources whose creation was interrupted, releases what a
    /// killed daemon left attached, and starts every standby again.
    pub(crate) fn reconcile_sources(&self) {
        let sources: Vec<SourceRec> = self.state.lock().sources.values().cloned().collect();
        for s in sources {
            if let Some(t) = s.last_refresh_unix {
                self.metrics()
                    .source_last_refresh_timestamp_seconds
                    .with_label_values(&[&s.name])
                    .set(t as f64);
            }
            let mnt = self.mountpoint(&s.volume);
            if s.attachment.is_some() || host::is_mounted(&mnt) {
                tracing::warn!(source = %s.name, "cleaning up a stale attachment");
                super::plane::release_stale(&mnt, s.attachment.as_ref(), &self.work_dir(&s.volume));
                let _ = self.update(|st| {
                    if let Some(x) = st.sources.get_mut(&s.name) {
                        x.attachment = None;
                    }
                    Ok(())
                });
            }
            if s.state == SourceState::Building {
                tracing::warn!(source = %s.name, "removing a source whose creation was interrupted");
                self.discard_source(&s.name);
                continue;
            }
            match self.start_source(&s.name) {
                Ok(()) => tracing::info!(source = %s.name, "standby running again"),
                Err(e) => {
                    tracing::error!(source = %s.name, error = %e, "could not start the standby; retrying every second")
                }
            }
        }
    }

    /// Stops every standby before the daemon exits (waiting for a refresh in progress).
    pub(crate) fn shutdown_sources(&self) {
        let names: Vec<String> = self.state.lock().sources.keys().cloned().collect();
        for n in names {
            // Waits for a refresh in progress; stops the standby regardless after a minute.
            let _busy = self.claim_source(&n).ok();
            if let Err(e) = self.stop_source(&n) {
                tracing::warn!(source = %n, error = %e, "standby did not stop cleanly");
            }
        }
    }

    /// Holds a source for an operation requested through the API, waiting up to a minute
    /// for one in progress (a scheduled refresh, a standby restart) to finish.
    fn claim_source(&self, name: &str) -> CResult<super::plane::BusyGuard<'_>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.claim(format!("source:{name}"), &format!("source {name}")) {
                Ok(b) => return Ok(b),
                Err(e) if e.kind != Kind::Busy || std::time::Instant::now() >= deadline => {
                    return Err(e);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Scheduled refreshes and standby supervision, from the control thread.
    pub(crate) fn tick_sources(&self) {
        let now = now_unix();
        let sources: Vec<SourceRec> = self.state.lock().sources.values().cloned().collect();
        for s in sources.iter().filter(|s| s.state == SourceState::Ready) {
            if self.is_stopping() {
                return;
            }
            // Lag for the gauges: only queries, so without holding the source.
            let measure = self
                .lag_measured
                .lock()
                .get(&s.name)
                .is_none_or(|t| t.elapsed() >= LAG_INTERVAL);
            if measure {
                self.replication(s);
                self.lag_measured
                    .lock()
                    .insert(s.name.clone(), std::time::Instant::now());
            }
            // Held while restarting or refreshing: a delete or an on-demand refresh waits.
            let Ok(_busy) = self.claim(format!("source:{}", s.name), "source") else {
                continue;
            };
            if postgres::running_pid(&self.mountpoint(&s.volume).join(PGDATA_DIR)).is_none() {
                match self.start_source(&s.name) {
                    Ok(()) => tracing::warn!(source = %s.name, "standby was down: restarted"),
                    Err(e) => {
                        tracing::error!(source = %s.name, error = %e, "standby is down and could not be restarted")
                    }
                }
                continue;
            }
            if let RefreshMode::Every { seconds } = s.refresh {
                // A failed refresh is tried again an interval later, not every second.
                let due = s.last_attempt_unix.map(|l| l + seconds).unwrap_or(0);
                if now >= due
                    && let Err(e) = self.record_refresh(&s.name, self.refresh_locked(&s.name))
                {
                    tracing::warn!(source = %s.name, error = %e, "scheduled refresh failed");
                }
            }
        }
    }
}

/// A source revision `clone create` names.
pub(super) struct Resolved {
    /// `SOURCE@N`
    pub label: String,
    pub snapshot: String,
    /// A raw standby copy: the clone is promoted at its first start.
    pub promote: bool,
}

/// Resolves `SOURCE`, `SOURCE@N` or `SOURCE@TIME` (the latest revision at or before that
/// time, UTC); `None` if no source has that name.
pub(super) fn resolve_revision(st: &ControlState, spec: &str) -> CResult<Option<Resolved>> {
    let (name, rev) = match spec.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (spec, None),
    };
    let Some(src) = st.sources.get(name) else {
        return Ok(None);
    };
    if src.revisions.is_empty() {
        return Err(cerr(
            Kind::NotFound,
            format!(
                "source {name} has no revision yet; make one with `blockd source refresh {name}`"
            ),
        ));
    }
    let r = match rev {
        None => src.revisions.last(),
        Some(r) if !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()) => {
            let n: u32 = r
                .parse()
                .map_err(|_| cerr(Kind::Invalid, format!("revision {r} is not a number")))?;
            src.revisions.iter().find(|x| x.number == n)
        }
        Some(t) => {
            let at = parse_time(t)?;
            src.revisions.iter().rev().find(|x| x.created_unix <= at)
        }
    };
    let r = r.ok_or_else(|| {
        let have: Vec<String> = src
            .revisions
            .iter()
            .map(|x| format!("{name}@{}", x.number))
            .collect();
        cerr(
            Kind::NotFound,
            format!(
                "source {name} has no revision {}; it has {} (see `blockd source show {name}`)",
                rev.unwrap_or(""),
                have.join(", ")
            ),
        )
    })?;
    Ok(Some(Resolved {
        label: format!("{name}@{}", r.number),
        snapshot: r.snapshot.clone(),
        promote: !r.masked,
    }))
}

/// The standby's replication state ([`ControlPlane::replication`]).
#[derive(Debug, Default)]
struct Replication {
    running: bool,
    streaming: bool,
    replay_lsn: Option<String>,
    replay_timestamp: Option<String>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
}

/// `0/3000148` as a number.
fn lsn_value(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn source_not_found(name: &str) -> super::plane::ControlError {
    cerr(
        Kind::NotFound,
        format!("source {name} not found; list sources with `blockd source list`"),
    )
}

/// Parses `2026-11-22T10:00`, `2026-11-22T10:00:30`, `2026-11-22 10:00` (UTC).
fn parse_time(s: &str) -> CResult<u64> {
    let t = s.replace(' ', "T");
    let full = match t.len() {
        16 => format!("{t}:00"),
        10 => format!("{t}T00:00:00"),
        _ => t.trim_end_matches('Z').to_string(),
    };
    humantime::parse_rfc3339_weak(&full)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            cerr(
                Kind::Invalid,
                format!(
                    "{s:?} is neither a revision number nor a time like 2026-11-22T10:00 (UTC)"
                ),
            )
        })
}

fn revision_view(st: &ControlState, src: &SourceRec, r: &RevisionRec) -> RevisionView {
    let label = format!("{}@{}", src.name, r.number);
    RevisionView {
        clones: st
            .clones
            .values()
            .filter(|c| c.image == label)
            .map(|c| c.name.clone())
            .collect(),
        name: label,
        number: r.number,
        lsn: r.lsn.clone(),
        replay_timestamp: r.replay_timestamp.clone(),
        created_unix: r.created_unix,
        masked: r.masked,
        frozen_ms: r.frozen_us as f64 / 1000.0,
    }
}

/// SQL turning a timestamptz expression into RFC 3339 text in UTC.
fn utc_text(expr: &str) -> String {
    format!("to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

fn freeze(mnt: &Path) -> CResult<()> {
    host::run(
        "fsfreeze",
        &[OsStr::new("-f"), mnt.as_os_str()],
        host::QUICK,
        &[],
    )?;
    Ok(())
}

fn thaw(mnt: &Path) -> CResult<()> {
    host::run(
        "fsfreeze",
        &[OsStr::new("-u"), mnt.as_os_str()],
        host::QUICK,
        &[],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_modes_parse() {
        assert_eq!(parse_refresh("manual"), Ok(RefreshMode::Manual));
        assert_eq!(parse_refresh("none"), Ok(RefreshMode::None));
        assert_eq!(
            parse_refresh("every 15m"),
            Ok(RefreshMode::Every { seconds: 900 })
        );
        assert_eq!(
            parse_refresh(" every 1h 30m "),
            Ok(RefreshMode::Every { seconds: 5400 })
        );
        for bad in ["sometimes", "every", "every soon", "every 10ms", "15m"] {
            let e = parse_refresh(bad).expect_err(bad);
            assert!(e.contains("every"), "{bad}: {e}");
        }
    }

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_time("1970-01-01T00:01").ok(), Some(60));
        assert_eq!(parse_time("1970-01-01 00:01:05").ok(), Some(65));
        assert_eq!(parse_time("1970-01-02").ok(), Some(86400));
        assert_eq!(parse_time("1970-01-01T00:00:07Z").ok(), Some(7));
        let e = parse_time("yesterday").expect_err("not a time");
        assert!(e.message.contains("2026-11-22T10:00"), "{}", e.message);
    }

    fn state_with_revisions(created: &[u64]) -> ControlState {
        let mut st = ControlState::default();
        let revisions = created
            .iter()
            .enumerate()
            .map(|(i, &t)| RevisionRec {
                number: i as u32 + 1,
                snapshot: format!("src.p@r{}", i + 1),
                lsn: "0/3000000".into(),
                replay_timestamp: None,
                created_unix: t,
                masked: i == 0,
                frozen_us: 0,
            })
            .collect();
        st.sources.insert(
            "p".into(),
            SourceRec {
                name: "p".into(),
                state: SourceState::Ready,
                volume: "src.p".into(),
                version: 15,
                primary: PrimaryDef {
                    host: "h".into(),
                    port: 5432,
                    user: "u".into(),
                    password_file: Some("/f".into()),
                    password_env: None,
                },
                size_bytes: 1 << 30,
                filesystem: "ext4".into(),
                refresh: RefreshMode::Manual,
                retain: 8,
                post_script: None,
                tags: vec![],
                revisions,
                next_revision: created.len() as u32 + 1,
                attachment: None,
                created_unix: 0,
                last_refresh_unix: None,
                last_attempt_unix: None,
                last_error: None,
            },
        );
        st
    }

    #[test]
    fn revisions_resolve_by_number_time_and_newest() {
        let st = state_with_revisions(&[100, 200, 300]);
        let r = |spec: &str| resolve_revision(&st, spec).map(|o| o.map(|r| r.label));
        assert_eq!(r("p").ok().flatten().as_deref(), Some("p@3"));
        assert_eq!(r("p@2").ok().flatten().as_deref(), Some("p@2"));
        // The newest at or before the time.
        assert_eq!(
            r("p@1970-01-01T00:04:59").ok().flatten().as_deref(),
            Some("p@2")
        );
        assert_eq!(
            r("p@1970-01-01T00:05:00").ok().flatten().as_deref(),
            Some("p@3")
        );
        assert!(r("p@1970-01-01T00:01").is_err());
        assert!(
            r("p@9")
                .expect_err("no 9")
                .message
                .contains("p@1, p@2, p@3")
        );
        assert!(matches!(r("other"), Ok(None)));
        let masked = resolve_revision(&st, "p@1").ok().flatten().expect("p@1");
        assert!(!masked.promote, "a masked revision is already a primary");
        let raw = resolve_revision(&st, "p@2").ok().flatten().expect("p@2");
        assert!(raw.promote);
        let empty = state_with_revisions(&[]);
        let e = resolve_revision(&empty, "p").err().expect("no revisions");
        assert!(e.message.contains("source refresh p"), "{}", e.message);
    }
}
