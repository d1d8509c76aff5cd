//! Listeners, the connection cap, and graceful shutdown.
//!
//! Sockets are accepted on the tokio runtime (so that accept loops stop cleanly on
//! shutdown), then each connection gets its own thread with blocking I/O: the handshake
//! under a deadline, then the transmission loop in [`super::conn`].

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::conn::{self, End};
use super::handshake::{self, HandshakeError};
use super::stream::Stream;
use super::{ExportSource, Limits};
use crate::metrics::NbdMetrics;

pub struct Server {
    source: Arc<dyn ExportSource>,
    limits: Limits,
    metrics: Arc<NbdMetrics>,
    /// A handle on every live connection, used to wake them at shutdown.
    live: Mutex<HashMap<u64, Stream>>,
    active: AtomicUsize,
    next_id: AtomicU64,
    stopping: AtomicBool,
}

impl Server {
    pub fn new(
        source: Arc<dyn ExportSource>,
        limits: Limits,
        metrics: Arc<NbdMetrics>,
    ) -> Arc<Server> {
        Arc::new(Server {
            source,
            limits,
            metrics,
            live: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        })
    }

    /// Connections currently open (handshake or transmission).
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((sock, _)) => {
                        let _ = sock.set_nodelay(true);
                        match sock.into_std().and_then(|s| { s.set_nonblocking(false)?; Ok(s) }) {
                            Ok(s) => self.admit(Stream::Tcp(s)),
                            Err(e) => tracing::warn!(error = %e, "could not take over accepted socket"),
                        }
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
    }

    pub async fn serve_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((sock, _)) => {
                        match sock.into_std().and_then(|s| { s.set_nonblocking(false)?; Ok(s) }) {
                            Ok(s) => self.admit(Stream::Unix(s)),
                            Err(e) => tracing::warn!(error = %e, "could not take over accepted socket"),
                        }
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
    }

    /// Applies the connection cap and starts the connection's thread.
    fn admit(self: &Arc<Self>, stream: Stream) {
        let peer = stream.peer();
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let active = self.active.fetch_add(1, Ordering::AcqRel);
        if active >= self.limits.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%peer, limit = self.limits.max_connections,
                "connection refused: connection limit reached (raise --max-connections)");
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(handle) => {
                self.live.lock().insert(id, handle);
            }
            Err(e) => {
                self.active.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%peer, error = %e, "could not register connection");
                return;
            }
        }
        let server = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                server.run_connection(stream, &peer);
                server.live.lock().remove(&id);
                server.active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.live.lock().remove(&id);
            self.active.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(error = %e, "could not start a connection thread");
        }
    }

    fn run_connection(&self, mut stream: Stream, peer: &str) {
        let deadline = Instant::now() + self.limits.handshake_timeout;
        let session = match handshake::negotiate(&mut stream, &*self.source, deadline) {
            Ok(Some(session)) => session,
            Ok(None) => {
                tracing::debug!(%peer, "client ended the handshake");
                return;
            }
            Err(HandshakeError::Closed) => {
                tracing::debug!(%peer, "client closed during the handshake");
                return;
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "handshake failed");
                return;
            }
        };
        if stream.set_read_timeout(None).is_err() || stream.set_write_timeout(None).is_err() {
            return;
        }
        let export = session.export.name.clone();
        tracing::info!(%export, %peer, structured = session.structured, "client connected");
        let metrics = self.metrics.export(&export);
        metrics.connections.inc();
        metrics.connections_total.inc();
        let started = Instant::now();
        let end = conn::serve(stream, session, &self.limits, &metrics);
        metrics.connections.dec();
        let seconds = started.elapsed().as_secs_f64();
        match end {
            End::Disconnect | End::Eof => {
                tracing::info!(%export, %peer, seconds, "client disconnected")
            }
            End::Protocol(e) => {
                tracing::warn!(%export, %peer, seconds, error = %e,
                    "client disconnected: protocol violation")
            }
            End::Io(e) => {
                tracing::info!(%export, %peer, seconds, error = %e,
                    "client disconnected: socket error")
            }
        }
    }

    /// Stops taking connections, lets every connection finish the requests it has read
    /// (their replies are sent and writes flushed), and cuts what is left after the grace
    /// period. Blocking; call from a blocking context.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for s in self.live.lock().values() {
            let _ = s.shutdown(Shutdown::Read);
        }
        let until = Instant::now() + self.limits.shutdown_grace;
        while self.active_connections() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.active_connections() > 0 {
            tracing::warn!(
                left = self.active_connections(),
                "cutting connections after the grace period"
            );
            for s in self.live.lock().values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            let until = Instant::now() + Duration::from_secs(2);
            while self.active_connections() > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Accept errors such as EMFILE are transient: log and back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
