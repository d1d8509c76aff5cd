//! `blockd serve`: opens the data directory, starts the NBD listeners and the REST API,
//! and shuts everything down in order on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use tokio::sync::watch;

use crate::control::api::{self, AppState};
use crate::control::host::NbdEndpoint;
use crate::control::plane::{ControlPlane, PlaneConfig};
use crate::exports::Exports;
use crate::fsutil::{self, LockFile};
use crate::metrics::{Metrics, NbdMetrics};
use crate::nbd::Limits;
use crate::nbd::server::Server;
use crate::store::catalog::Config;
use crate::store::compact::Policy;
use crate::store::engine::Store;
use crate::store::io::IoEngine;

/// Everything `serve` needs, already parsed.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// TCP address for NBD, or None to serve only the Unix socket.
    pub listen: Option<String>,
    /// Unix socket for NBD, or None.
    pub socket: Option<PathBuf>,
    pub api: String,
    pub limits: Limits,
    pub ready_file: Option<PathBuf>,
    /// Time between background compaction passes (zero disables them).
    pub compact_interval: Duration,
    /// Ports for database clones (inclusive).
    pub clone_ports: (u16, u16),
    /// Address database clones listen on.
    pub clone_listen: String,
    /// Time between checks for expired clones and images.
    pub expiry_interval: Duration,
    /// The store's I/O engine.
    pub io_engine: IoEngine,
    /// See `Config::direct_write_min_bytes`.
    pub direct_write_min_bytes: u64,
}

fn parse_addr(what: &str, s: &str) -> Result<SocketAddr> {
    let s = s.trim().trim_start_matches("http://").trim_end_matches('/');
    s.parse()
        .with_context(|| format!("{what} {s:?} is not an IP:PORT address such as 127.0.0.1:10809"))
}

pub fn run(cfg: ServeConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}; pass a writable --data-dir",
            cfg.data_dir.display()
        )
    })?;
    let _lock = LockFile::acquire(&cfg.data_dir.join("blockd.lock")).map_err(|e| {
        anyhow!(
            "cannot lock {}: {e}; another blockd is probably serving this data directory \
             (stop it or pick another --data-dir)",
            cfg.data_dir.display()
        )
    })?;
    let fs = cfg.io_engine.fs().with_context(|| {
        format!(
            "cannot use the {} I/O engine; start with --io-engine sync",
            cfg.io_engine.name()
        )
    })?;
    tracing::info!(engine = cfg.io_engine.name(), "I/O engine");
    let config = Config {
        direct_write_min_bytes: cfg.direct_write_min_bytes,
        ..Config::default()
    };
    let store = Store::open(fs, &cfg.data_dir, config)
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
    for note in &store.recovery_notes {
        tracing::warn!(%note, "recovery");
    }
    tracing::info!(seconds = store.recovery_seconds, "store opened");
    let store = Arc::new(store);
    let compactor = start_compactor(store.clone(), cfg.compact_interval);
    let exports = Arc::new(Exports::new(store));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("blockd-rt")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(cfg, exports, compactor))
}

async fn serve(
    cfg: ServeConfig,
    exports: Arc<Exports>,
    compactor: Option<std::thread::JoinHandle<()>>,
) -> Result<()> {
    let nbd_metrics = Arc::new(NbdMetrics::new());
    let server = Server::new(exports.clone(), cfg.limits.clone(), nbd_metrics.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut nbd_addr = None;
    if let Some(listen) = &cfg.listen {
        let addr = parse_addr("--listen", listen)?;
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen for NBD on {addr}; is the port taken? pick another with --listen"
            )
        })?;
        nbd_addr = Some(l.local_addr()?);
        tasks.push(tokio::spawn(server.clone().serve_tcp(l, stop_rx.clone())));
    }
    if let Some(path) = &cfg.socket {
        let l = bind_unix(path)?;
        tasks.push(tokio::spawn(server.clone().serve_unix(l, stop_rx.clone())));
    }
    if nbd_addr.is_none() && cfg.socket.is_none() {
        bail!("nothing to serve on: give --listen ADDR or --socket PATH");
    }

    let api_addr = parse_addr("--api", &cfg.api)?;
    let api_listener = tokio::net::TcpListener::bind(api_addr).await.with_context(|| {
        format!("cannot listen for the REST API on {api_addr}; is the port taken? pick another with --api")
    })?;
    let api_addr = api_listener.local_addr()?;
    let plane = ControlPlane::open(
        exports.store().clone(),
        PlaneConfig {
            data_dir: cfg.data_dir.clone(),
            nbd: NbdEndpoint {
                socket: cfg.socket.clone(),
                tcp: nbd_addr.map(|a| a.to_string()),
            },
            ports: cfg.clone_ports,
            listen_address: cfg.clone_listen.clone(),
            expiry_interval: cfg.expiry_interval,
        },
    )
    .map_err(|e| anyhow!("opening the control plane: {e}"))?;
    let metrics = Metrics::new(nbd_metrics, exports.store().metrics(), plane.metrics())
        .context("registering the metrics")?;
    let app = api::router(Arc::new(AppState {
        metrics: Arc::new(metrics),
        store: exports.store().clone(),
        plane: plane.clone(),
        nbd_tcp: nbd_addr.map(|a| a.to_string()),
        nbd_socket: cfg.socket.as_ref().map(|p| p.display().to_string()),
    }));
    let mut api_stop = stop_rx.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.changed().await;
            })
            .await
    });

    tracing::info!(
        nbd = ?nbd_addr, socket = ?cfg.socket, api = %api_addr, data_dir = %cfg.data_dir.display(),
        "blockd serving"
    );
    if let Some(ready) = &cfg.ready_file {
        let info = json!({
            "pid": std::process::id(),
            "nbd": nbd_addr.map(|a| a.to_string()),
            "socket": cfg.socket.as_ref().map(|p| p.display().to_string()),
            "api": api_addr.to_string(),
        });
        fsutil::write_atomic(ready, info.to_string().as_bytes())
            .with_context(|| format!("writing --ready-file {}", ready.display()))?;
    }

    // Bring back the clones a previous run left (the NBD server is already listening).
    plane.start_background();

    wait_for_signal().await?;
    tracing::info!("shutting down: stopping database clones");
    {
        let p = plane.clone();
        tokio::task::spawn_blocking(move || p.shutdown()).await?;
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let srv = server.clone();
    tokio::task::spawn_blocking(move || srv.shutdown()).await?;
    let store = exports.store().clone();
    // Let a compaction pass reach a safe point (a half-written segment would be an orphan).
    store.begin_shutdown();
    if let Some(c) = compactor {
        let _ = tokio::task::spawn_blocking(move || c.join()).await;
    }
    if let Err(e) = tokio::task::spawn_blocking(move || store.flush_all()).await? {
        tracing::error!(error = %e, "flush at shutdown failed");
    }
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "API server ended with an error"),
        _ => tracing::warn!("API server did not stop in time"),
    }
    if let Some(path) = &cfg.socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("blockd stopped");
    Ok(())
}

/// Binds the Unix socket, replacing a stale socket file left by a crashed daemon but never
/// one another daemon is still listening on.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a running server; pick another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| {
        format!(
            "cannot listen on Unix socket {}; pick another --socket",
            path.display()
        )
    })
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Runs compaction passes in the background, on a thread of its own (it reads and writes
/// segments; the data path never waits for it).
fn start_compactor(store: Arc<Store>, interval: Duration) -> Option<std::thread::JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    std::thread::Builder::new()
        .name("compactor".into())
        .spawn(move || {
            while !store.is_stopping() {
                let until = std::time::Instant::now() + interval;
                while std::time::Instant::now() < until && !store.is_stopping() {
                    std::thread::sleep(Duration::from_millis(50).min(interval));
                }
                if store.is_stopping() {
                    break;
                }
                match store.compact(&Policy::default()) {
                    Ok(r) if r != Default::default() => {
                        tracing::info!(report = ?r, "compaction pass")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "compaction pass failed"),
                }
            }
        })
        .ok()
}
