//! The control plane: database images built on volumes, and clones of them attached to
//! running PostgreSQL instances.
//!
//! An image is a volume `img.NAME` holding a file system with a stopped PostgreSQL data
//! directory, frozen as the snapshot `img.NAME@image`. A clone is a volume `cln.NAME`
//! cloned from an image snapshot (O(1)), attached as a block device, mounted, and served
//! by PostgreSQL on a port from the configured range.
//!
//! Records are persisted before and after every step that creates something on the host,
//! so that after a crash the next start can undo what a half-finished operation made and
//! bring back every clone that should be running ([`ControlPlane::reconcile`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use super::host::{self, Attachment, HostError, NbdEndpoint};
use super::model::*;
use super::postgres::{self, PGDATA_DIR, Pg};
use crate::metrics::ControlMetrics;
use crate::names::Name;
use crate::store::engine::Store;
use crate::store::{ErrorKind, StoreError};

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a control-plane operation failed. `kind` decides the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    NotFound,
    AlreadyExists,
    Invalid,
    InUse,
    Busy,
    Forbidden,
    Failed,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub kind: Kind,
    pub message: String,
}

pub fn cerr(kind: Kind, message: impl Into<String>) -> ControlError {
    ControlError {
        kind,
        message: message.into(),
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        let kind = match e.kind() {
            ErrorKind::NotFound => Kind::NotFound,
            ErrorKind::AlreadyExists => Kind::AlreadyExists,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => Kind::Invalid,
            ErrorKind::InUse | ErrorKind::ReadOnly => Kind::InUse,
            _ => Kind::Failed,
        };
        cerr(kind, e.to_string())
    }
}

impl From<HostError> for ControlError {
    fn from(e: HostError) -> Self {
        cerr(Kind::Failed, e.to_string())
    }
}

pub type CResult<T> = Result<T, ControlError>;

/// Who is calling: the token's name and role (no name when the API has no tokens).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: Option<String>,
    pub role: Role,
}

impl Caller {
    pub fn anonymous_admin() -> Caller {
        Caller {
            name: None,
            role: Role::Admin,
        }
    }

    pub fn require_admin(&self, what: &str) -> CResult<()> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(cerr(
                Kind::Forbidden,
                format!(
                    "{what} needs an admin token; user tokens may only manage their own clones"
                ),
            ))
        }
    }

    fn may_use(&self, c: &CloneRec) -> bool {
        self.role == Role::Admin || (c.owner.is_some() && c.owner == self.name)
    }
}

#[derive(Debug, Clone)]
pub struct PlaneConfig {
    pub data_dir: PathBuf,
    pub nbd: NbdEndpoint,
    /// Inclusive port range for clones.
    pub ports: (u16, u16),
    /// Address clones listen on.
    pub listen_address: String,
    pub expiry_interval: Duration,
}

/// A build in progress or finished.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: u64,
    /// image or source
    pub kind: &'static str,
    /// The image or source the job makes.
    pub name: String,
    /// running, done, failed
    pub state: &'static str,
    pub step: String,
    pub steps: Vec<String>,
    pub error: Option<String>,
    pub started_unix: u64,
    pub seconds: f64,
}

/// An image as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageView {
    pub name: String,
    pub state: ImageState,
    pub engine: Engine,
    pub version: u32,
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub filesystem: String,
    pub source: String,
    pub tags: Vec<String>,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
    pub clones: Vec<String>,
}

/// A clone as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CloneView {
    pub name: String,
    pub image: String,
    /// running, stopped, starting, down
    pub state: &'static str,
    pub port: u16,
    pub connection: String,
    pub owner: Option<String>,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
    pub lifetime_left_seconds: Option<u64>,
    pub unique_bytes: u64,
    pub device: Option<String>,
}

pub struct ControlPlane {
    pub(super) store: Arc<Store>,
    cfg: PlaneConfig,
    paths: Paths,
    pub(super) state: Mutex<ControlState>,
    /// Names with an operation in progress.
    busy: Mutex<HashSet<String>>,
    /// Clones [`ControlPlane::reconcile`] has not dealt with yet since the start: whatever
    /// their records say is attached (and running) is left from the previous run.
    recovering: Mutex<HashSet<String>>,
    jobs: Mutex<BTreeMap<u64, Job>>,
    /// When each source's replication lag was last measured (for its gauges).
    pub(super) lag_measured: Mutex<std::collections::HashMap<String, Instant>>,
    next_job: AtomicU64,
    stopping: AtomicBool,
    metrics: ControlMetrics,
}

/// Marks a name busy while it lives.
pub(super) struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

pub fn image_volume(image: &str) -> String {
    format!("img.{image}")
}

pub fn clone_volume(clone: &str) -> String {
    format!("cln.{clone}")
}

const IMAGE_SNAPSHOT: &str = "image";

/// The longest Unix socket path PostgreSQL can listen on (sun_path without its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl ControlPlane {
    pub fn open(store: Arc<Store>, cfg: PlaneConfig) -> CResult<Arc<ControlPlane>> {
        let paths = Paths::new(&cfg.data_dir);
        for d in [&paths.run, &paths.mnt, &paths.attach, &paths.scripts] {
            std::fs::create_dir_all(d)
                .map_err(|e| cerr(Kind::Failed, format!("creating {}: {e}", d.display())))?;
        }
        let state = match std::fs::read(&paths.state) {
            Ok(b) => {
                let s: ControlState = serde_json::from_slice(&b).map_err(|e| {
                    cerr(
                        Kind::Failed,
                        format!("{} is unreadable: {e}", paths.state.display()),
                    )
                })?;
                if s.version > STATE_VERSION {
                    return Err(cerr(
                        Kind::Failed,
                        format!(
                            "{} was written by a newer blockd; upgrade",
                            paths.state.display()
                        ),
                    ));
                }
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ControlState {
                version: STATE_VERSION,
                ..Default::default()
            },
            Err(e) => {
                return Err(cerr(
                    Kind::Failed,
                    format!("reading {}: {e}", paths.state.display()),
                ));
            }
        };
        // Every clone is busy until reconcile has brought it back (or cleaned it up): the
        // API serves before that, and must neither report a previous run's server as
        // running nor operate on it.
        let names: Vec<String> = state.clones.keys().cloned().collect();
        Ok(Arc::new(ControlPlane {
            store,
            cfg,
            paths,
            state: Mutex::new(state),
            busy: Mutex::new(names.iter().map(|n| format!("clone:{n}")).collect()),
            recovering: Mutex::new(names.into_iter().collect()),
            jobs: Mutex::new(BTreeMap::new()),
            lag_measured: Mutex::new(std::collections::HashMap::new()),
            next_job: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            metrics: ControlMetrics::new(),
        }))
    }

    /// Applies `f` to the state and persists it; memory changes only if that succeeds.
    pub(super) fn update<R>(&self, f: impl FnOnce(&mut ControlState) -> CResult<R>) -> CResult<R> {
        let mut st = self.state.lock();
        let mut next = st.clone();
        let r = f(&mut next)?;
        next.version = STATE_VERSION;
        let bytes =
            serde_json::to_vec_pretty(&next).map_err(|e| cerr(Kind::Failed, e.to_string()))?;
        crate::fsutil::write_atomic(&self.paths.state, &bytes).map_err(|e| {
            cerr(
                Kind::Failed,
                format!("writing {}: {e}", self.paths.state.display()),
            )
        })?;
        *st = next;
        Ok(r)
    }

    fn snapshot_state(&self) -> ControlState {
        self.state.lock().clone()
    }

    pub(super) fn claim(&self, key: String, what: &str) -> CResult<BusyGuard<'_>> {
        let mut b = self.busy.lock();
        if !b.insert(key.clone()) {
            return Err(cerr(
                Kind::Busy,
                format!("{what} is busy with another operation; retry in a moment"),
            ));
        }
        Ok(BusyGuard {
            set: &self.busy,
            key,
        })
    }

    pub(super) fn run_dir(&self, name: &str) -> PathBuf {
        self.paths.run.join(name)
    }

    pub(super) fn mountpoint(&self, name: &str) -> PathBuf {
        self.paths.mnt.join(name)
    }

    pub(super) fn work_dir(&self, name: &str) -> PathBuf {
        self.paths.attach.join(name)
    }

    pub(super) fn nbd(&self) -> &NbdEndpoint {
        &self.cfg.nbd
    }

    pub(super) fn scripts_dir(&self) -> &Path {
        &self.paths.scripts
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Checks the directories databases live in can be reached by the postgres user.
    pub(super) fn check_reachable(&self) -> CResult<()> {
        for d in [&self.paths.mnt, &self.paths.run, &self.paths.scripts] {
            postgres::check_reachable(d).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        }
        Ok(())
    }

    /// Runs `work` on a thread of its own as job `kind` on `name` (busy under `busy_key`
    /// meanwhile); returns the job id to poll with `GET /v1/jobs/ID`.
    pub(super) fn start_job(
        self: &Arc<Self>,
        kind: &'static str,
        name: &str,
        busy_key: String,
        work: impl FnOnce(u64) -> CResult<()> + Send + 'static,
    ) -> CResult<u64> {
        if !self.busy.lock().insert(busy_key.clone()) {
            return Err(cerr(
                Kind::Busy,
                format!("{kind} {name} is busy with another operation; retry in a moment"),
            ));
        }
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        self.jobs.lock().insert(
            id,
            Job {
                id,
                kind,
                name: name.to_string(),
                state: "running",
                step: "queued".into(),
                steps: Vec::new(),
                error: None,
                started_unix: now_unix(),
                seconds: 0.0,
            },
        );
        let me = self.clone();
        let key = busy_key.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{kind}-job"))
            .spawn(move || {
                let started = Instant::now();
                let result = work(id);
                let mut jobs = me.jobs.lock();
                if let Some(j) = jobs.get_mut(&id) {
                    j.seconds = started.elapsed().as_secs_f64();
                    match result {
                        Ok(()) => {
                            j.state = "done";
                            j.step = "done".into();
                        }
                        Err(e) => {
                            // The message names the step that failed (not the clean-up).
                            j.state = "failed";
                            j.error = Some(e.message);
                        }
                    }
                }
                drop(jobs);
                me.busy.lock().remove(&busy_key);
            });
        if let Err(e) = spawned {
            self.jobs.lock().remove(&id);
            self.busy.lock().remove(&key);
            return Err(cerr(
                Kind::Failed,
                format!("cannot start the {kind} job: {e}"),
            ));
        }
        Ok(id)
    }

    /// Detaches a volume and waits (up to 10 s) until the server has let go of every NBD
    /// connection the attachment had: nbdfuse exits before the server has seen all of its
    /// connections close, and the volume cannot be deleted or reset while one is open.
    pub(super) fn detach(&self, a: &Attachment, volume: &str) -> host::HostResult<()> {
        let r = host::detach(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.store.open_handles(volume).is_ok_and(|n| n > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        r
    }

    /// Refuses a name whose PostgreSQL socket path (in the run directory of `volume`) would
    /// be longer than Unix allows: the server could not start.
    pub(super) fn check_socket_path(&self, what: &str, name: &str, volume: &str) -> CResult<()> {
        // The longest socket name: a five-digit port.
        let path = self.run_dir(volume).join(".s.PGSQL.65535");
        let len = path.as_os_str().len();
        if len <= MAX_SOCKET_PATH {
            return Ok(());
        }
        let fix = match name.len().checked_sub(len - MAX_SOCKET_PATH) {
            Some(max) if max > 0 => format!("use a name of at most {max} characters"),
            _ => "start blockd with a shorter --data-dir".to_string(),
        };
        Err(cerr(
            Kind::Invalid,
            format!(
                "{what} name {name:?} is too long for this data directory: PostgreSQL's socket \
                 {} would be {len} bytes, more than the {MAX_SOCKET_PATH} Unix allows; {fix}",
                path.display()
            ),
        ))
    }

    // ------------------------------------------------------------ tokens

    /// Resolves a bearer token. With no tokens configured, everyone is an admin.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, &'static str> {
        let st = self.state.lock();
        if st.tokens.is_empty() {
            return Ok(Caller::anonymous_admin());
        }
        let Some(token) = bearer else {
            return Err("this API requires a bearer token: pass --token or set BLOCKD_TOKEN");
        };
        let hash = super::auth::hash_token(token);
        st.tokens
            .iter()
            .find(|t| super::auth::constant_time_eq(t.sha256.as_bytes(), hash.as_bytes()))
            .map(|t| Caller {
                name: Some(t.name.clone()),
                role: t.role,
            })
            .ok_or("the bearer token is not valid; ask an admin for a token (blockd token create)")
    }

    /// Creates a token; returns it in clear (shown once). The first token must be an admin.
    pub fn create_token(&self, caller: &Caller, name: &str, role: Role) -> CResult<String> {
        Name::parse("token", name).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        let token = format!("bd_{}", postgres::random_secret(24)?);
        let hash = super::auth::hash_token(&token);
        self.update(|st| {
            if st.tokens.is_empty() {
                if role != Role::Admin {
                    return Err(cerr(Kind::Invalid, "the first token must have the admin role (--role admin), or nobody could manage tokens"));
                }
            } else {
                caller.require_admin("creating tokens")?;
            }
            if st.tokens.iter().any(|t| t.name == name) {
                return Err(cerr(Kind::AlreadyExists, format!("token {name} already exists; delete it first or pick another name")));
            }
            st.tokens.push(TokenRec { name: name.into(), role, sha256: hash, created_unix: now_unix() });
            Ok(())
        })?;
        Ok(token)
    }

    pub fn list_tokens(&self, caller: &Caller) -> CResult<Vec<(String, Role, u64)>> {
        caller.require_admin("listing tokens")?;
        Ok(self
            .state
            .lock()
            .tokens
            .iter()
            .map(|t| (t.name.clone(), t.role, t.created_unix))
            .collect())
    }

    pub fn delete_token(&self, caller: &Caller, name: &str) -> CResult<()> {
        caller.require_admin("deleting tokens")?;
        self.update(|st| {
            let before = st.tokens.len();
            st.tokens.retain(|t| t.name != name);
            if st.tokens.len() == before {
                return Err(cerr(
                    Kind::NotFound,
                    format!("token {name} not found; list them with `blockd token list`"),
                ));
            }
            if !st.tokens.is_empty() && !st.tokens.iter().any(|t| t.role == Role::Admin) {
                return Err(cerr(
                    Kind::Invalid,
                    "that is the last admin token; create another admin token first",
                ));
            }
            Ok(())
        })
    }

    // ------------------------------------------------------------ images

    fn image_view(&self, st: &ControlState, i: &ImageRec) -> ImageView {
        let data_bytes = self
            .store
            .list_snapshots(Some(&i.volume))
            .into_iter()
            .find(|s| s.name == i.snapshot)
            .map(|s| s.data_bytes)
            .unwrap_or(0);
        ImageView {
            name: i.name.clone(),
            state: i.state,
            engine: i.engine,
            version: i.version,
            size_bytes: i.size_bytes,
            data_bytes,
            filesystem: i.filesystem.clone(),
            source: i.source.clone(),
            tags: i.tags.clone(),
            created_unix: i.created_unix,
            expires_unix: i.expires_unix,
            clones: st
                .clones
                .values()
                .filter(|c| c.image == i.name)
                .map(|c| c.name.clone())
                .collect(),
        }
    }

    pub fn list_images(&self) -> Vec<ImageView> {
        let st = self.snapshot_state();
        st.images
            .values()
            .map(|i| self.image_view(&st, i))
            .collect()
    }

    pub fn show_image(&self, name: &str) -> CResult<ImageView> {
        let st = self.snapshot_state();
        let i = st.images.get(name).ok_or_else(|| image_not_found(name))?;
        Ok(self.image_view(&st, i))
    }

    pub fn job(&self, id: u64) -> CResult<Job> {
        self.jobs.lock().get(&id).cloned().ok_or_else(|| {
            cerr(
                Kind::NotFound,
                format!("no build job {id} (jobs are kept until the daemon restarts)"),
            )
        })
    }

    /// Starts building an image in the background; returns the job id.
    pub fn create_image(self: &Arc<Self>, caller: &Caller, req: ImageRequest) -> CResult<u64> {
        caller.require_admin("creating images")?;
        let (size, lifetime, fs) = validate_request(&req).map_err(|e| cerr(Kind::Invalid, e))?;
        Pg::find(req.version).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        self.check_reachable()?;
        if let Some(b) = &req.backup
            && !Path::new(b).exists()
        {
            return Err(cerr(
                Kind::Invalid,
                format!(
                    "backup {b} does not exist on the daemon's host; give the path of a pg_basebackup directory or tar file"
                ),
            ));
        }
        let volume = image_volume(&req.name);
        self.check_socket_path("image", &req.name, &volume)?;
        {
            let st = self.state.lock();
            if st.sources.contains_key(&req.name) {
                return Err(cerr(
                    Kind::AlreadyExists,
                    format!(
                        "a source named {} exists; images and sources share one name space, pick another name",
                        req.name
                    ),
                ));
            }
            if st.images.contains_key(&req.name) {
                return Err(cerr(
                    Kind::AlreadyExists,
                    format!(
                        "image {} already exists; delete it first or pick another name",
                        req.name
                    ),
                ));
            }
        }
        if self.store.show_volume(&volume).is_ok() {
            return Err(cerr(
                Kind::AlreadyExists,
                format!("volume {volume} already exists; delete it or pick another image name"),
            ));
        }
        let me = self.clone();
        let name = req.name.clone();
        self.start_job("image", &name, format!("image:{name}"), move |id| {
            let result = me.build_image(id, &req, size, lifetime, &fs);
            let outcome = if result.is_ok() { "ok" } else { "failed" };
            me.metrics.image_builds.with_label_values(&[outcome]).inc();
            result
        })
    }

    pub(super) fn step(&self, job: u64, what: &str) {
        tracing::info!(job, step = what, "job step");
        if let Some(j) = self.jobs.lock().get_mut(&job) {
            j.step = what.to_string();
            j.steps.push(what.to_string());
        }
    }

    fn build_image(
        &self,
        job: u64,
        req: &ImageRequest,
        size: u64,
        lifetime: Option<Duration>,
        fs: &str,
    ) -> CResult<()> {
        let volume = image_volume(&req.name);
        let pg = Pg::find(req.version)?;
        let source = match (&req.source_type, &req.backup) {
            (SourceType::Backup, Some(b)) => format!("backup {b}"),
            _ => "empty".to_string(),
        };
        self.update(|st| {
            st.images.insert(
                req.name.clone(),
                ImageRec {
                    name: req.name.clone(),
                    state: ImageState::Building,
                    volume: volume.clone(),
                    snapshot: format!("{volume}@{IMAGE_SNAPSHOT}"),
                    engine: req.engine,
                    version: req.version,
                    size_bytes: size,
                    filesystem: fs.to_string(),
                    source: source.clone(),
                    tags: req.tags.clone(),
                    created_unix: now_unix(),
                    expires_unix: None,
                },
            );
            Ok(())
        })?;
        let result = self.build_steps(job, req, &pg, &volume, size, fs);
        if let Err(e) = result {
            let failed = self
                .jobs
                .lock()
                .get(&job)
                .map(|j| j.step.clone())
                .unwrap_or_default();
            self.step(job, "cleaning up after the failure");
            self.discard_build(&req.name, &pg);
            if let Some(j) = self.jobs.lock().get_mut(&job) {
                j.step = failed.clone();
            }
            return Err(cerr(
                e.kind,
                format!("step {failed:?} failed: {}", e.message),
            ));
        }
        self.update(|st| {
            if let Some(i) = st.images.get_mut(&req.name) {
                i.state = ImageState::Ready;
                i.created_unix = now_unix();
                i.expires_unix = lifetime.map(|d| now_unix() + d.as_secs());
            }
            Ok(())
        })?;
        tracing::info!(image = %req.name, "image ready");
        Ok(())
    }

    fn build_steps(
        &self,
        job: u64,
        req: &ImageRequest,
        pg: &Pg,
        volume: &str,
        size: u64,
        fs: &str,
    ) -> CResult<()> {
        let vname = internal_name(volume)?;
        self.step(job, "creating the volume");
        self.store.create_volume(&vname, size)?;
        self.step(job, "attaching the volume");
        let att = host::attach(&self.cfg.nbd, volume, size, &self.work_dir(volume))?;
        let mnt = self.mountpoint(volume);
        let run_dir = self.run_dir(volume);
        let inner = (|| -> CResult<()> {
            self.step(job, &format!("making the {fs} file system"));
            host::mkfs(att.device(), fs, &req.name)?;
            host::mount(att.device(), &mnt, false)?;
            let pgdata = mnt.join(PGDATA_DIR);
            postgres::own_dir(&pgdata, 0o700)?;
            postgres::own_dir(&run_dir, 0o700)?;
            match (&req.source_type, &req.backup) {
                (SourceType::Empty, _) => {
                    self.step(job, "initdb");
                    pg.initdb(&pgdata)?;
                }
                (SourceType::Backup, Some(b)) => {
                    self.step(job, "restoring the backup");
                    restore_backup(Path::new(b), &pgdata)?;
                }
                (SourceType::Backup, None) => return Err(cerr(Kind::Invalid, "no backup given")),
            }
            postgres::prepare_data_dir(&pgdata)?;
            self.step(job, "starting PostgreSQL privately");
            // No TCP while building: scripts reach it through the private socket.
            pg.start(&pgdata, &run_dir, 5432, "")?;
            let scripts = self.paths.scripts.join(format!("job-{job}"));
            let run_scripts = || -> CResult<()> {
                for (label, s) in [
                    ("pre-script", &req.pre_script),
                    ("post-script", &req.post_script),
                ] {
                    if let Some(s) = s {
                        self.step(job, &format!("running the {label} {}", s.name));
                        postgres::own_dir(&scripts, 0o755)?;
                        let path = scripts.join(&s.name);
                        let mode = if s.name.ends_with(".sql") {
                            0o644
                        } else {
                            0o755
                        };
                        postgres::write_owned(&path, s.content.as_bytes(), mode)?;
                        pg.run_script(&run_dir, 5432, &path)
                            .map_err(|e| cerr(Kind::Failed, format!("{label} {}: {e}", s.name)))?;
                    }
                }
                Ok(())
            };
            let scripted = run_scripts();
            let _ = std::fs::remove_dir_all(&scripts);
            scripted?;
            self.step(job, "stopping PostgreSQL");
            pg.stop(&pgdata, "fast")?;
            Ok(())
        })();
        if inner.is_err() {
            let _ = pg.stop(&mnt.join(PGDATA_DIR), "immediate");
        }
        let unmounted = host::unmount(&mnt);
        let detached = self.detach(&att, volume);
        inner?;
        unmounted?;
        detached?;
        self.step(job, "taking the image snapshot");
        self.store
            .create_snapshot(&vname, &internal_name(IMAGE_SNAPSHOT)?)?;
        Ok(())
    }

    /// Removes what a failed or interrupted build made.
    fn discard_build(&self, image: &str, pg: &Pg) {
        let volume = image_volume(image);
        let mnt = self.mountpoint(&volume);
        let _ = pg.stop(&mnt.join(PGDATA_DIR), "immediate");
        let _ = host::unmount(&mnt);
        cleanup_fuse_dir(&self.work_dir(&volume));
        let _ = self
            .store
            .delete_snapshot(&format!("{volume}@{IMAGE_SNAPSHOT}"), false);
        let _ = self.store.delete_volume(&volume);
        let _ = self.update(|st| {
            st.images.remove(image);
            Ok(())
        });
    }

    pub fn delete_image(&self, caller: &Caller, name: &str) -> CResult<()> {
        caller.require_admin("deleting images")?;
        let _busy = self.claim(format!("image:{name}"), &format!("image {name}"))?;
        let st = self.snapshot_state();
        let img = st
            .images
            .get(name)
            .ok_or_else(|| image_not_found(name))?
            .clone();
        let users: Vec<&str> = st
            .clones
            .values()
            .filter(|c| c.image == name)
            .map(|c| c.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(cerr(
                Kind::InUse,
                format!(
                    "image {name} is used by clones {}; delete them first",
                    users.join(", ")
                ),
            ));
        }
        match self.store.delete_snapshot(&img.snapshot, false) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            // Clones saved from clones of this image keep its snapshot alive until they go.
            Err(e) if e.kind() == ErrorKind::InUse => {
                self.store.delete_snapshot(&img.snapshot, true)?;
            }
            Err(e) => return Err(e.into()),
        }
        match self.store.delete_volume(&img.volume) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.update(|st| {
            st.images.remove(name);
            Ok(())
        })?;
        tracing::info!(image = %name, "image deleted");
        Ok(())
    }

    // ------------------------------------------------------------ clones

    /// running, starting, down or stopped (the values of `metrics::CLONE_STATES`).
    fn clone_state(&self, c: &CloneRec) -> &'static str {
        let pgdata = self.mountpoint(&c.volume).join(PGDATA_DIR);
        // Running means accepting connections: a server still starting up (or recovering
        // after a crash) is "starting".
        let recovering = self.recovering.lock().contains(&c.name);
        let ready = !recovering && c.attachment.is_some() && postgres::is_ready(&pgdata);
        match (c.desired, ready) {
            (Desired::Running, true) => "running",
            (Desired::Running, false) if recovering => "starting",
            (Desired::Running, false)
                if (c.attachment.is_some() && postgres::running_pid(&pgdata).is_some())
                    || self.busy.lock().contains(&format!("clone:{}", c.name)) =>
            {
                "starting"
            }
            (Desired::Running, false) => "down",
            (Desired::Stopped, _) => "stopped",
        }
    }

    fn clone_view(&self, c: &CloneRec) -> CloneView {
        let state = self.clone_state(c);
        let host = if self.cfg.listen_address == "0.0.0.0" || self.cfg.listen_address == "*" {
            "127.0.0.1".to_string()
        } else {
            self.cfg.listen_address.clone()
        };
        let now = now_unix();
        CloneView {
            name: c.name.clone(),
            image: c.image.clone(),
            state,
            port: c.port,
            connection: format!(
                "postgresql://{}:{}@{host}:{}/postgres",
                postgres::SUPERUSER,
                c.password,
                c.port
            ),
            owner: c.owner.clone(),
            created_unix: c.created_unix,
            expires_unix: c.expires_unix,
            lifetime_left_seconds: c.expires_unix.map(|e| e.saturating_sub(now)),
            unique_bytes: self
                .store
                .show_volume(&c.volume)
                .map(|v| v.unique_bytes)
                .unwrap_or(0),
            device: c.attachment.as_ref().map(|a| a.device().to_string()),
        }
    }

    pub fn list_clones(&self, caller: &Caller) -> Vec<CloneView> {
        let st = self.snapshot_state();
        st.clones
            .values()
            .filter(|c| caller.may_use(c))
            .map(|c| self.clone_view(c))
            .collect()
    }

    fn clone_rec(&self, caller: &Caller, name: &str) -> CResult<CloneRec> {
        let c = self
            .state
            .lock()
            .clones
            .get(name)
            .cloned()
            .ok_or_else(|| clone_not_found(name))?;
        if !caller.may_use(&c) {
            // Don't reveal other users' clones.
            return Err(clone_not_found(name));
        }
        Ok(c)
    }

    pub fn show_clone(&self, caller: &Caller, name: &str) -> CResult<CloneView> {
        Ok(self.clone_view(&self.clone_rec(caller, name)?))
    }

    /// Picks a port: the requested one if free, else the first free one in the range.
    fn pick_port(&self, st: &ControlState, requested: Option<u16>) -> CResult<u16> {
        let used: HashSet<u16> = st.clones.values().map(|c| c.port).collect();
        let addr = self.bind_addr();
        if let Some(p) = requested {
            if used.contains(&p) {
                let who = st
                    .clones
                    .values()
                    .find(|c| c.port == p)
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                return Err(cerr(
                    Kind::InUse,
                    format!("port {p} is used by clone {who}; pick another --port or leave it out"),
                ));
            }
            if p < 1024 {
                return Err(cerr(
                    Kind::Invalid,
                    format!("port {p} is privileged; pick one above 1023"),
                ));
            }
            if !host::port_free(&addr, p) {
                return Err(cerr(
                    Kind::InUse,
                    format!(
                        "port {p} is taken by another program on this host; pick another --port"
                    ),
                ));
            }
            return Ok(p);
        }
        let (lo, hi) = self.cfg.ports;
        (lo..=hi)
            .find(|p| !used.contains(p) && host::port_free(&addr, *p))
            .ok_or_else(|| {
                cerr(
                    Kind::InUse,
                    format!("no free port left in {lo}-{hi}; delete clones or widen --clone-ports"),
                )
            })
    }

    fn bind_addr(&self) -> String {
        match self.cfg.listen_address.as_str() {
            "*" => "0.0.0.0".into(),
            a => a.into(),
        }
    }

    /// Creates a clone of an image and starts PostgreSQL on it.
    pub fn create_clone(
        &self,
        caller: &Caller,
        image: &str,
        name: &str,
        port: Option<u16>,
        lifetime: Option<&str>,
    ) -> CResult<CloneView> {
        let started = Instant::now();
        Name::parse("clone", name).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        let lifetime = match lifetime {
            Some(l) => parse_lifetime(l).map_err(|e| cerr(Kind::Invalid, e))?,
            None => None,
        };
        let volume = clone_volume(name);
        self.check_socket_path("clone", name, &volume)?;
        let _busy = self.claim(format!("clone:{name}"), &format!("clone {name}"))?;
        let rec = self.update(|st| {
            let origin = resolve_origin(st, image)?;
            if st.clones.contains_key(name) {
                return Err(cerr(
                    Kind::AlreadyExists,
                    format!("clone {name} already exists; pick another name or delete it"),
                ));
            }
            let port = self.pick_port(st, port)?;
            let rec = CloneRec {
                name: name.into(),
                image: origin.label,
                volume: volume.clone(),
                port,
                owner: caller.name.clone(),
                password: postgres::random_secret(12)?,
                desired: Desired::Running,
                attachment: None,
                created_unix: now_unix(),
                expires_unix: lifetime.map(|d| now_unix() + d.as_secs()),
                snapshot: origin.snapshot,
                promote: origin.promote,
            };
            st.clones.insert(name.into(), rec.clone());
            Ok(rec)
        })?;
        let snapshot = rec.snapshot.clone();
        let made = (|| -> CResult<()> {
            self.store
                .clone_volume(&snapshot, &internal_name(&volume)?)?;
            self.bring_up(&rec, true)
        })();
        if let Err(e) = made {
            let _ = self.tear_down(name);
            let _ = self.store.delete_volume(&volume);
            let _ = self.update(|st| {
                st.clones.remove(name);
                Ok(())
            });
            return Err(e);
        }
        let ready = started.elapsed();
        self.metrics
            .clone_ready_seconds
            .observe(ready.as_secs_f64());
        tracing::info!(clone = %name, from = %rec.image, port = rec.port,
            seconds = ready.as_secs_f64(), "clone running");
        self.show_clone(caller, name)
    }

    /// The PostgreSQL version of a clone: its image's or its source's.
    fn clone_version(&self, rec: &CloneRec) -> CResult<u32> {
        let st = self.state.lock();
        if let Some(i) = st.images.get(&rec.image) {
            return Ok(i.version);
        }
        let source = rec.image.split('@').next().unwrap_or_default();
        st.sources
            .get(source)
            .map(|s| s.version)
            .ok_or_else(|| image_not_found(&rec.image))
    }

    /// Attaches, mounts and starts a clone's database. `first` (a fresh copy of its
    /// snapshot) promotes a standby copy and sets the password.
    fn bring_up(&self, rec: &CloneRec, first: bool) -> CResult<()> {
        let pg = Pg::find(self.clone_version(rec)?)?;
        let size = self.store.show_volume(&rec.volume)?.size_bytes;
        let att = host::attach(
            &self.cfg.nbd,
            &rec.volume,
            size,
            &self.work_dir(&rec.volume),
        )?;
        let name = rec.name.clone();
        self.update(|st| {
            if let Some(c) = st.clones.get_mut(&name) {
                c.attachment = Some(att.clone());
            }
            Ok(())
        })?;
        let mnt = self.mountpoint(&rec.volume);
        host::mount(att.device(), &mnt, false)?;
        let run_dir = self.run_dir(&rec.volume);
        postgres::own_dir(&run_dir, 0o700)?;
        let pgdata = mnt.join(PGDATA_DIR);
        postgres::remove_stale_pid_file(&pgdata)?;
        if first && rec.promote {
            pg.start_promoted(&pgdata, &run_dir, rec.port, &self.cfg.listen_address)?;
        } else {
            pg.start(&pgdata, &run_dir, rec.port, &self.cfg.listen_address)?;
        }
        if first {
            let sql = format!(
                "ALTER ROLE {} PASSWORD '{}'",
                postgres::SUPERUSER,
                rec.password
            );
            pg.psql(&run_dir, rec.port, "postgres", &sql)?;
        }
        Ok(())
    }

    /// Stops a clone's database cleanly and detaches its volume.
    fn tear_down(&self, name: &str) -> CResult<()> {
        let Some(rec) = self.state.lock().clones.get(name).cloned() else {
            return Ok(());
        };
        let mnt = self.mountpoint(&rec.volume);
        let version = self.clone_version(&rec).ok();
        let mut first_err = None;
        if let Some(v) = version
            && let Ok(pg) = Pg::find(v)
            && let Err(e) = pg.stop(&mnt.join(PGDATA_DIR), "fast")
        {
            first_err = Some(ControlError::from(e));
        }
        if let Err(e) = host::unmount(&mnt) {
            first_err.get_or_insert(e.into());
        }
        if let Some(att) = &rec.attachment
            && let Err(e) = self.detach(att, &rec.volume)
        {
            first_err.get_or_insert(e.into());
        }
        self.update(|st| {
            if let Some(c) = st.clones.get_mut(name) {
                c.attachment = None;
            }
            Ok(())
        })?;
        first_err.map_or(Ok(()), Err)
    }

    pub fn stop_clone(&self, caller: &Caller, name: &str) -> CResult<CloneView> {
        self.clone_rec(caller, name)?;
        let _busy = self.claim(format!("clone:{name}"), &format!("clone {name}"))?;
        self.tear_down(name)?;
        self.update(|st| {
            if let Some(c) = st.clones.get_mut(name) {
                c.desired = Desired::Stopped;
            }
            Ok(())
        })?;
        self.show_clone(caller, name)
    }

    pub fn start_clone(&self, caller: &Caller, name: &str) -> CResult<CloneView> {
        self.clone_rec(caller, name)?;
        let _busy = self.claim(format!("clone:{name}"), &format!("clone {name}"))?;
        // Read again now that nothing else can change it.
        let mut rec = self.clone_rec(caller, name)?;
        let pgdata = self.mountpoint(&rec.volume).join(PGDATA_DIR);
        if rec.attachment.is_some() && postgres::postmaster_of(&pgdata).is_none() {
            // Attached, but its server is gone (it crashed or was killed): start afresh.
            tracing::warn!(clone = %name, "restarting a clone whose database is down");
            self.tear_down(name)?;
            rec.attachment = None;
        }
        if rec.attachment.is_none() {
            if !host::port_free(&self.bind_addr(), rec.port) {
                return Err(cerr(
                    Kind::InUse,
                    format!(
                        "port {} of clone {name} is taken by another program; free it and retry",
                        rec.port
                    ),
                ));
            }
            if let Err(e) = self.bring_up(&rec, false) {
                let _ = self.tear_down(name);
                return Err(e);
            }
        }
        self.update(|st| {
            if let Some(c) = st.clones.get_mut(name) {
                c.desired = Desired::Running;
            }
            Ok(())
        })?;
        self.show_clone(caller, name)
    }

    /// Throws away everything the clone changed: back to its image, same name and port.
    pub fn reset_clone(&self, caller: &Caller, name: &str) -> CResult<CloneView> {
        let rec = self.clone_rec(caller, name)?;
        let _busy = self.claim(format!("clone:{name}"), &format!("clone {name}"))?;
        self.tear_down(name)?;
        let snapshot = if rec.snapshot.is_empty() {
            // Recorded before clones kept their snapshot: the image's.
            self.state
                .lock()
                .images
                .get(&rec.image)
                .map(|i| i.snapshot.clone())
                .ok_or_else(|| image_not_found(&rec.image))?
        } else {
            rec.snapshot.clone()
        };
        self.store.delete_volume(&rec.volume)?;
        self.store
            .clone_volume(&snapshot, &internal_name(&rec.volume)?)?;
        if rec.desired == Desired::Running
            && let Err(e) = self.bring_up(&rec, true)
        {
            let _ = self.tear_down(name);
            return Err(e);
        }
        tracing::info!(clone = %name, to = %rec.image, "clone reset");
        self.show_clone(caller, name)
    }

    /// Makes a new image from a clone's current contents (the clone keeps running after a
    /// short stop: the image must be a cleanly stopped database).
    pub fn save_clone(&self, caller: &Caller, name: &str, image: &str) -> CResult<ImageView> {
        caller.require_admin("saving a clone as an image")?;
        Name::parse("image", image).map_err(|e| cerr(Kind::Invalid, e.to_string()))?;
        let rec = self.clone_rec(caller, name)?;
        let _busy = self.claim(format!("clone:{name}"), &format!("clone {name}"))?;
        let _busy_img = self.claim(format!("image:{image}"), &format!("image {image}"))?;
        let src = self
            .state
            .lock()
            .images
            .get(&rec.image)
            .cloned()
            .ok_or_else(|| image_not_found(&rec.image))?;
        if self.state.lock().images.contains_key(image) {
            return Err(cerr(
                Kind::AlreadyExists,
                format!("image {image} already exists; pick another name"),
            ));
        }
        let was_running = rec.attachment.is_some();
        self.tear_down(name)?;
        let new_volume = image_volume(image);
        let tmp_snap = format!("save-{}", now_unix());
        let made = (|| -> CResult<()> {
            let cv = internal_name(&rec.volume)?;
            self.store
                .create_snapshot(&cv, &internal_name(&tmp_snap)?)?;
            let from = format!("{}@{tmp_snap}", rec.volume);
            self.store
                .clone_volume(&from, &internal_name(&new_volume)?)?;
            self.store.create_snapshot(
                &internal_name(&new_volume)?,
                &internal_name(IMAGE_SNAPSHOT)?,
            )?;
            // The clone's intermediate snapshot is only needed by the new image: hide it.
            self.store.delete_snapshot(&from, true)?;
            self.update(|st| {
                st.images.insert(
                    image.into(),
                    ImageRec {
                        name: image.into(),
                        state: ImageState::Ready,
                        volume: new_volume.clone(),
                        snapshot: format!("{new_volume}@{IMAGE_SNAPSHOT}"),
                        engine: src.engine,
                        version: src.version,
                        size_bytes: src.size_bytes,
                        filesystem: src.filesystem.clone(),
                        source: format!("clone {name} of {}", rec.image),
                        tags: src.tags.clone(),
                        created_unix: now_unix(),
                        expires_unix: None,
                    },
                );
                Ok(())
            })
        })();
        let restarted = if was_running {
            self.bring_up(&rec, false)
        } else {
            Ok(())
        };
        made?;
        restarted?;
        tracing::info!(clone = %name, image = %image, "clone saved as an image");
        self.show_image(image)
    }

    pub fn delete_clone(&self, caller: &Caller, name: &str) -> CResult<()> {
        let rec = self.clone_rec(caller, name)?;
        let _busy = self.claim(format!("clone:{name}"), &format!("clone {name}"))?;
        self.delete_clone_inner(&rec)
    }

    fn delete_clone_inner(&self, rec: &CloneRec) -> CResult<()> {
        self.tear_down(&rec.name)?;
        match self.store.delete_volume(&rec.volume) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let _ = std::fs::remove_dir_all(self.run_dir(&rec.volume));
        let _ = std::fs::remove_dir(self.mountpoint(&rec.volume));
        let _ = std::fs::remove_dir_all(self.work_dir(&rec.volume));
        self.update(|st| {
            st.clones.remove(&rec.name);
            Ok(())
        })?;
        tracing::info!(clone = %rec.name, "clone deleted");
        Ok(())
    }

    // ------------------------------------------------------------ lifecycle

    /// After a start: undoes half-finished image builds, cleans up what a previous run
    /// left attached, and brings back every clone that should be running.
    pub fn reconcile(&self) {
        let st = self.snapshot_state();
        for img in st
            .images
            .values()
            .filter(|i| i.state == ImageState::Building)
        {
            tracing::warn!(image = %img.name, "removing an image whose build was interrupted");
            if let Ok(pg) = Pg::find(img.version) {
                self.discard_build(&img.name, &pg);
            }
        }
        self.reconcile_sources();
        for c in st.clones.values() {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            // Claimed in `open`; released when this clone is done.
            let _busy = BusyGuard {
                set: &self.busy,
                key: format!("clone:{}", c.name),
            };
            let mnt = self.mountpoint(&c.volume);
            if c.attachment.is_some() || host::is_mounted(&mnt) {
                tracing::warn!(clone = %c.name, "cleaning up a stale attachment");
                release_stale(&mnt, c.attachment.as_ref(), &self.work_dir(&c.volume));
                let name = c.name.clone();
                let _ = self.update(|st| {
                    if let Some(x) = st.clones.get_mut(&name) {
                        x.attachment = None;
                    }
                    Ok(())
                });
            }
            self.recovering.lock().remove(&c.name);
            if c.desired == Desired::Running {
                let rec = self.state.lock().clones.get(&c.name).cloned();
                if let Some(rec) = rec {
                    match self.bring_up(&rec, false) {
                        Ok(()) => {
                            tracing::info!(clone = %c.name, port = c.port, "clone adopted: running again")
                        }
                        Err(e) => {
                            tracing::error!(clone = %c.name, error = %e, "could not restart clone");
                            let _ = self.tear_down(&c.name);
                        }
                    }
                }
            }
        }
    }

    /// Stops every clone and source cleanly before the daemon exits; they come back at
    /// the next start.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.shutdown_sources();
        let names: Vec<String> = self
            .state
            .lock()
            .clones
            .values()
            .filter(|c| c.attachment.is_some())
            .map(|c| c.name.clone())
            .collect();
        for n in names {
            if let Err(e) = self.tear_down(&n) {
                tracing::warn!(clone = %n, error = %e, "clone did not stop cleanly");
            }
        }
    }

    /// Deletes expired clones, and expired images no clone uses.
    pub fn expire(&self) {
        let now = now_unix();
        let st = self.snapshot_state();
        for c in st
            .clones
            .values()
            .filter(|c| c.expires_unix.is_some_and(|e| e <= now))
        {
            let Ok(_busy) = self.claim(format!("clone:{}", c.name), "clone") else {
                continue;
            };
            match self.delete_clone_inner(c) {
                Ok(()) => self.expired("clone", &c.name),
                Err(e) => {
                    tracing::warn!(clone = %c.name, error = %e, "could not delete expired clone")
                }
            }
        }
        let st = self.snapshot_state();
        for i in st
            .images
            .values()
            .filter(|i| i.expires_unix.is_some_and(|e| e <= now))
        {
            if st.clones.values().any(|c| c.image == i.name) {
                continue;
            }
            match self.delete_image(&Caller::anonymous_admin(), &i.name) {
                Ok(()) => self.expired("image", &i.name),
                Err(e) => {
                    tracing::warn!(image = %i.name, error = %e, "could not delete expired image")
                }
            }
        }
    }

    /// Counts and logs a deletion made because a lifetime ran out.
    fn expired(&self, kind: &str, name: &str) {
        self.metrics
            .expired_deletions
            .with_label_values(&[kind])
            .inc();
        tracing::info!(kind, name, "expired {kind} deleted");
    }

    /// Runs `expire` periodically and reconciles once at start.
    pub fn start_background(self: &Arc<Self>) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                me.reconcile();
                let sources = me.clone();
                let _ = std::thread::Builder::new()
                    .name("sources".into())
                    .spawn(move || {
                        while !sources.stopping.load(Ordering::Relaxed) {
                            sources.tick_sources();
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    });
                while !me.stopping.load(Ordering::Relaxed) {
                    let deadline = Instant::now() + me.cfg.expiry_interval;
                    while Instant::now() < deadline && !me.stopping.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if !me.stopping.load(Ordering::Relaxed) {
                        me.expire();
                    }
                }
            });
    }

    /// The control plane's metric families, for the daemon's registry.
    pub fn metrics(&self) -> &ControlMetrics {
        &self.metrics
    }

    /// Sets the state gauges (images and clones by state) from the control state: called at
    /// scrape time.
    pub fn update_metrics(&self) {
        let st = self.snapshot_state();
        let mut images: Vec<(&str, usize)> = Vec::new();
        for i in st.images.values() {
            let s = match i.state {
                ImageState::Building => "building",
                ImageState::Ready => "ready",
            };
            bump(&mut images, s);
        }
        let mut clones: Vec<(&str, usize)> = Vec::new();
        for c in st.clones.values() {
            bump(&mut clones, self.clone_state(c));
        }
        self.metrics.set_states(&images, &clones);
    }

    pub fn counts(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.images.len(), st.clones.len())
    }
}

fn bump<'a>(counts: &mut Vec<(&'a str, usize)>, key: &'a str) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

fn image_not_found(name: &str) -> ControlError {
    cerr(
        Kind::NotFound,
        format!("image {name} not found; list images with `blockd image list`"),
    )
}

fn clone_not_found(name: &str) -> ControlError {
    cerr(
        Kind::NotFound,
        format!("clone {name} not found; list clones with `blockd clone list`"),
    )
}

/// A store name for a control-plane object (`img.NAME`, `cln.NAME`, snapshot names).
pub(super) fn internal_name(s: &str) -> CResult<Name> {
    Name::internal(s).map_err(|e| cerr(Kind::Invalid, e.to_string()))
}

/// Releases what a killed daemon left of a volume that was attached and mounted at
/// `mnt`: the PostgreSQL server on it (its storage died with the daemon: stopped hard, and
/// waited for before its file system is unmounted), the mount, the attachment.
pub(super) fn release_stale(mnt: &Path, attachment: Option<&Attachment>, work_dir: &Path) {
    if let Some(pid) = postgres::postmaster_of(&mnt.join(PGDATA_DIR)) {
        // SAFETY: kill(2) on the postmaster serving this volume's data directory.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) };
        if !host::wait_exit(pid, Duration::from_secs(10)) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            host::wait_exit(pid, Duration::from_secs(10));
        }
    }
    let _ = host::unmount(mnt);
    if let Some(a) = attachment {
        let _ = host::detach(a);
    }
    cleanup_fuse_dir(work_dir);
}

/// What `clone create FROM` names: an image, or a source revision.
struct Origin {
    label: String,
    snapshot: String,
    promote: bool,
}

fn resolve_origin(st: &ControlState, from: &str) -> CResult<Origin> {
    if let Some(img) = st.images.get(from) {
        if img.state != ImageState::Ready {
            return Err(cerr(
                Kind::Busy,
                format!("image {from} is still being built; wait for it to finish"),
            ));
        }
        return Ok(Origin {
            label: from.to_string(),
            snapshot: img.snapshot.clone(),
            promote: false,
        });
    }
    match super::sources::resolve_revision(st, from)? {
        Some(r) => Ok(Origin {
            label: r.label,
            snapshot: r.snapshot,
            promote: r.promote,
        }),
        None => Err(cerr(
            Kind::NotFound,
            format!(
                "no image or source named {from}; list them with `blockd image list` and `blockd source list`"
            ),
        )),
    }
}

/// Releases a leftover nbdfuse file in `dir`, if any: the loop devices over it first (while
/// one holds it, it cannot be unmounted), then the FUSE mount (its nbdfuse then exits).
pub(super) fn cleanup_fuse_dir(dir: &Path) {
    let file = dir.join("disk");
    for dev in host::loop_devices_backed_by(&file) {
        tracing::warn!(device = %dev, file = %file.display(), "detaching a leftover loop device");
        let _ = host::run_s("losetup", &["-d", &dev], host::QUICK);
    }
    if host::is_mounted(&file) {
        let f = file.display().to_string();
        if host::run_s("fusermount3", &["-u", &f], host::QUICK).is_err() {
            let _ = host::run_s("umount", &["-l", &f], host::QUICK);
        }
    }
}

/// Restores a pg_basebackup output into `pgdata`: a plain directory, or tar files
/// (base.tar[.gz] with pg_wal.tar[.gz] beside it).
fn restore_backup(src: &Path, pgdata: &Path) -> CResult<()> {
    if src.is_dir() {
        let tar = ["base.tar", "base.tar.gz", "base.tgz"]
            .iter()
            .map(|n| src.join(n))
            .find(|p| p.exists());
        if let Some(base) = tar {
            extract(&base, pgdata)?;
            for w in ["pg_wal.tar", "pg_wal.tar.gz"] {
                let p = src.join(w);
                if p.exists() {
                    let wal = pgdata.join("pg_wal");
                    std::fs::create_dir_all(&wal).map_err(|e| cerr(Kind::Failed, e.to_string()))?;
                    extract(&p, &wal)?;
                }
            }
        } else {
            if !src.join("PG_VERSION").exists() {
                return Err(cerr(
                    Kind::Invalid,
                    format!(
                        "{} has no PG_VERSION: it is not a pg_basebackup directory",
                        src.display()
                    ),
                ));
            }
            let from = format!("{}/.", src.display());
            host::run_s(
                "cp",
                &["-a", &from, &pgdata.display().to_string()],
                host::LONG,
            )?;
        }
    } else {
        extract(src, pgdata)?;
    }
    if !pgdata.join("PG_VERSION").exists() {
        return Err(cerr(
            Kind::Invalid,
            format!(
                "{} does not contain a PostgreSQL data directory (no PG_VERSION)",
                src.display()
            ),
        ));
    }
    host::run_s(
        "chown",
        &["-R", "postgres:postgres", &pgdata.display().to_string()],
        host::LONG,
    )?;
    host::run_s(
        "chmod",
        &["0700", &pgdata.display().to_string()],
        host::QUICK,
    )?;
    Ok(())
}

fn extract(tar: &Path, into: &Path) -> CResult<()> {
    host::run_s(
        "tar",
        &[
            "-xf",
            &tar.display().to_string(),
            "-C",
            &into.display().to_string(),
        ],
        host::LONG,
    )?;
    Ok(())
}
