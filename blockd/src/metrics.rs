//! Prometheus metrics: every metric blockd exports is defined in this module and listed in
//! docs/METRICS.md (a test keeps the two in step).
//!
//! Three kinds of metric, updated three ways:
//!
//! - **Per export (NBD data path).** Each connection resolves its export's handles once
//!   ([`NbdMetrics::export`]) and counts into connection-local copies
//!   ([`ConnMetrics`]): a request costs a few non-atomic adds and one clock read. The local
//!   values are published to the shared ones once per reply batch (just before the
//!   connection blocks on the socket again), so connections never contend per request.
//! - **Events** (store flushes, compaction, GC, clone creation, expiry): counters and
//!   histograms owned by the component ([`StoreMetrics`], [`ControlMetrics`]) and updated
//!   where the event happens.
//! - **State** (space, volumes, clones by state): computed at scrape time from the store and
//!   the control plane by [`Metrics::render`].
//!
//! The families for database sources (refresh lag, last refresh) live in
//! [`ControlMetrics`] and are filled by the sources feature.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use nbd_proto::consts::{EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};
use nbd_proto::transmission::Command;
use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets for NBD requests, in seconds: 10 µs to 10 s.
const REQUEST_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for fdatasync and group commits, in seconds: 25 µs to 10 s.
const SYNC_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 10.0,
];
/// Buckets for clone-to-ready time, in seconds.
const CLONE_READY_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Commands in label order; [`command_index`] maps a command to its slot.
const COMMANDS: [Command; 9] = [
    Command::Read,
    Command::Write,
    Command::Disc,
    Command::Flush,
    Command::Trim,
    Command::Cache,
    Command::WriteZeroes,
    Command::BlockStatus,
    Command::Unknown(0),
];

fn command_index(c: Command) -> usize {
    match c {
        Command::Read => 0,
        Command::Write => 1,
        Command::Disc => 2,
        Command::Flush => 3,
        Command::Trim => 4,
        Command::Cache => 5,
        Command::WriteZeroes => 6,
        Command::BlockStatus => 7,
        Command::Unknown(_) => 8,
    }
}

/// NBD errnos in label order, then `other`.
const ERRNOS: [(u32, &str); 8] = [
    (EPERM, "EPERM"),
    (EIO, "EIO"),
    (ENOMEM, "ENOMEM"),
    (EINVAL, "EINVAL"),
    (ENOSPC, "ENOSPC"),
    (EOVERFLOW, "EOVERFLOW"),
    (ENOTSUP, "ENOTSUP"),
    (ESHUTDOWN, "ESHUTDOWN"),
];

fn errno_index(errno: u32) -> usize {
    ERRNOS
        .iter()
        .position(|(n, _)| *n == errno)
        .unwrap_or(ERRNOS.len())
}

// The constructors below only fail on invalid names, labels or buckets, which are
// constants of this module (the unit tests build every family).
fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric definition")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn float_gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric definition")
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric definition")
}

/// `Debug` (name only: the handles are many and say little) and `Default` (`new`) for
/// the families structs.
macro_rules! families_impls {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).finish_non_exhaustive()
            }
        }

        impl Default for $t {
            fn default() -> Self {
                Self::new()
            }
        }
    )*};
}

families_impls!(NbdMetrics, StoreMetrics, ControlMetrics);

// ------------------------------------------------------------------ NBD

/// Per-export families of the NBD server.
pub struct NbdMetrics {
    requests: IntCounterVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
    in_flight: IntGaugeVec,
    connections: IntGaugeVec,
    connections_total: IntCounterVec,
    /// Resolved handles per export, so a connection looks its export up once.
    exports: Mutex<HashMap<String, Arc<ExportMetrics>>>,
}

/// One export's shared handles.
pub struct ExportMetrics {
    requests: Vec<IntCounter>,
    latency: Vec<Histogram>,
    read_bytes: IntCounter,
    write_bytes: IntCounter,
    errors: Vec<IntCounter>,
    pub in_flight: IntGauge,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
}

impl NbdMetrics {
    pub fn new() -> NbdMetrics {
        NbdMetrics {
            requests: counter_vec(
                "blockd_export_requests_total",
                "NBD requests received, by export and command.",
                &["export", "command"],
            ),
            bytes: counter_vec(
                "blockd_export_bytes_total",
                "Payload bytes moved by successful NBD reads (direction=read) and writes \
                 (direction=write).",
                &["export", "direction"],
            ),
            errors: counter_vec(
                "blockd_export_errors_total",
                "NBD requests answered with an error, by errno.",
                &["export", "errno"],
            ),
            latency: histogram_vec(
                "blockd_export_request_duration_seconds",
                "Time from a request being read from the socket to its reply being ready \
                 (for FLUSH and FUA: after the data is durable).",
                &["export", "command"],
                REQUEST_BUCKETS,
            ),
            in_flight: gauge_vec(
                "blockd_export_requests_in_flight",
                "Requests read and not yet answered (waiting for durability or in an \
                 unsent reply batch).",
                &["export"],
            ),
            connections: gauge_vec(
                "blockd_export_connections",
                "NBD connections open in the transmission phase.",
                &["export"],
            ),
            connections_total: counter_vec(
                "blockd_export_connections_total",
                "NBD connections that completed the handshake.",
                &["export"],
            ),
            exports: Mutex::new(HashMap::new()),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.latency.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.connections.clone()),
            Box::new(self.connections_total.clone()),
        ]
    }

    /// The handles of `export`, resolved once and shared by its connections.
    pub fn export(&self, export: &str) -> Arc<ExportMetrics> {
        let mut map = self.exports.lock();
        if let Some(m) = map.get(export) {
            return m.clone();
        }
        let m = Arc::new(ExportMetrics {
            requests: COMMANDS
                .iter()
                .map(|c| self.requests.with_label_values(&[export, c.name()]))
                .collect(),
            latency: COMMANDS
                .iter()
                .map(|c| self.latency.with_label_values(&[export, c.name()]))
                .collect(),
            read_bytes: self.bytes.with_label_values(&[export, "read"]),
            write_bytes: self.bytes.with_label_values(&[export, "write"]),
            errors: ERRNOS
                .iter()
                .map(|(_, name)| *name)
                .chain(["other"])
                .map(|name| self.errors.with_label_values(&[export, name]))
                .collect(),
            in_flight: self.in_flight.with_label_values(&[export]),
            connections: self.connections.with_label_values(&[export]),
            connections_total: self.connections_total.with_label_values(&[export]),
        });
        map.insert(export.to_owned(), m.clone());
        m
    }

    /// Forgets exports that no longer exist and have no connection, so that deleted
    /// volumes (clones come and go) do not keep their series forever.
    pub fn prune(&self, existing: &HashSet<String>) {
        let mut map = self.exports.lock();
        map.retain(|name, m| {
            if existing.contains(name) || m.connections.get() > 0 || Arc::strong_count(m) > 1 {
                return true;
            }
            for c in COMMANDS {
                let _ = self.requests.remove_label_values(&[name, c.name()]);
                let _ = self.latency.remove_label_values(&[name, c.name()]);
            }
            for dir in ["read", "write"] {
                let _ = self.bytes.remove_label_values(&[name, dir]);
            }
            for errno in ERRNOS.iter().map(|(_, n)| *n).chain(["other"]) {
                let _ = self.errors.remove_label_values(&[name, errno]);
            }
            let _ = self.in_flight.remove_label_values(&[name]);
            let _ = self.connections.remove_label_values(&[name]);
            let _ = self.connections_total.remove_label_values(&[name]);
            false
        });
    }
}

impl ExportMetrics {
    /// Connection-local copies of the hot counters (one per connection thread).
    pub fn local(self: &Arc<Self>) -> ConnMetrics {
        ConnMetrics {
            export: self.clone(),
            requests: self.requests.iter().map(IntCounter::local).collect(),
            latency: self.latency.iter().map(Histogram::local).collect(),
            read_bytes: self.read_bytes.local(),
            write_bytes: self.write_bytes.local(),
        }
    }

    /// Counts an error reply (rare: straight into the shared counter).
    pub fn error(&self, errno: u32) {
        self.errors[errno_index(errno)].inc();
    }

    /// Records the latency of a request answered off the connection thread (after a flush).
    pub fn observe_shared(&self, command: Command, took: Duration) {
        self.latency[command_index(command)].observe(took.as_secs_f64());
    }
}

/// What one connection thread counts locally; [`ConnMetrics::publish`] adds it to the
/// export's shared metrics.
pub struct ConnMetrics {
    export: Arc<ExportMetrics>,
    requests: Vec<LocalIntCounter>,
    latency: Vec<LocalHistogram>,
    read_bytes: LocalIntCounter,
    write_bytes: LocalIntCounter,
}

impl ConnMetrics {
    pub fn shared(&self) -> &Arc<ExportMetrics> {
        &self.export
    }

    #[inline]
    pub fn request(&mut self, command: Command) {
        self.requests[command_index(command)].inc();
    }

    #[inline]
    pub fn observe(&mut self, command: Command, took: Duration) {
        self.latency[command_index(command)].observe(took.as_secs_f64());
    }

    #[inline]
    pub fn read_bytes(&mut self, n: u64) {
        self.read_bytes.inc_by(n);
    }

    #[inline]
    pub fn write_bytes(&mut self, n: u64) {
        self.write_bytes.inc_by(n);
    }

    /// Adds what was counted since the last call to the shared metrics.
    pub fn publish(&mut self) {
        for c in &self.requests {
            c.flush();
        }
        for h in &self.latency {
            h.flush();
        }
        self.read_bytes.flush();
        self.write_bytes.flush();
    }
}

// ------------------------------------------------------------------ store

/// Every fdatasync either I/O engine makes. A process-wide family because an
/// engine is a stateless value shared by every file it opens.
static FDATASYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "blockd_store_fdatasync_seconds",
        "Time each fdatasync of a segment file took.",
        SYNC_BUCKETS,
    )
});

/// The fdatasync latency histogram (observed by `store::io::sync` and `store::io::uring`).
pub fn fdatasync_seconds() -> &'static Histogram {
    &FDATASYNC_SECONDS
}

/// Events of the extent store, counted where they happen.
#[derive(Clone)]
pub struct StoreMetrics {
    pub flushes: IntCounter,
    pub commits: IntCounter,
    pub commit_seconds: Histogram,
    pub compaction_runs: IntCounter,
    pub compaction_reclaimed_bytes: IntCounter,
    pub compaction_copied_bytes: IntCounter,
    pub gc_runs: IntCounter,
    pub gc_segments_removed: IntCounter,
    pub gc_reclaimed_bytes: IntCounter,
}

impl StoreMetrics {
    pub fn new() -> StoreMetrics {
        StoreMetrics {
            flushes: counter(
                "blockd_store_flushes_total",
                "Volume flushes requested (NBD FLUSH, FUA, disconnects, shutdown).",
            ),
            commits: counter(
                "blockd_store_group_commits_total",
                "Group commits performed: one serves every flush waiting when it starts.",
            ),
            commit_seconds: histogram(
                "blockd_store_group_commit_seconds",
                "Time a group commit took: fdatasync of payloads, commit batch, fdatasync \
                 of the index.",
                SYNC_BUCKETS,
            ),
            compaction_runs: counter(
                "blockd_store_compaction_runs_total",
                "Compaction passes run (background and `blockd compact`).",
            ),
            compaction_reclaimed_bytes: counter(
                "blockd_store_compaction_reclaimed_bytes_total",
                "Disk bytes freed by compaction (punched holes, rewritten or dropped \
                 segments).",
            ),
            compaction_copied_bytes: counter(
                "blockd_store_compaction_copied_bytes_total",
                "Live payload bytes compaction copied into new segments.",
            ),
            gc_runs: counter(
                "blockd_store_gc_runs_total",
                "Deletions that freed segments (volume and snapshot deletes, resets, \
                 collection of hidden snapshots).",
            ),
            gc_segments_removed: counter(
                "blockd_store_gc_segments_removed_total",
                "Segments removed by deletions.",
            ),
            gc_reclaimed_bytes: counter(
                "blockd_store_gc_reclaimed_bytes_total",
                "Disk bytes freed by deletions.",
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.flushes.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.commit_seconds.clone()),
            Box::new(self.compaction_runs.clone()),
            Box::new(self.compaction_reclaimed_bytes.clone()),
            Box::new(self.compaction_copied_bytes.clone()),
            Box::new(self.gc_runs.clone()),
            Box::new(self.gc_segments_removed.clone()),
            Box::new(self.gc_reclaimed_bytes.clone()),
            Box::new(fdatasync_seconds().clone()),
        ]
    }
}

/// The store's state, set at scrape time.
struct SpaceMetrics {
    logical: IntGauge,
    referenced: IntGauge,
    stored: IntGauge,
    shared: IntGauge,
    physical: IntGauge,
    segments: IntGauge,
    volumes: IntGauge,
    snapshots: IntGauge,
    volume_unique: IntGaugeVec,
    volume_shared: IntGaugeVec,
    recovery_seconds: prometheus::Gauge,
}

impl SpaceMetrics {
    fn new() -> SpaceMetrics {
        SpaceMetrics {
            logical: gauge(
                "blockd_store_logical_bytes",
                "Sum of the sizes of all volumes.",
            ),
            referenced: gauge(
                "blockd_store_referenced_bytes",
                "Data bytes as volumes and snapshots see them: what full copies would \
                 store.",
            ),
            stored: gauge(
                "blockd_store_stored_bytes",
                "Data bytes actually stored (live payloads in segments).",
            ),
            shared: gauge(
                "blockd_store_shared_bytes",
                "Bytes saved by sharing: referenced minus stored.",
            ),
            physical: gauge(
                "blockd_store_physical_bytes",
                "Disk bytes the segment files occupy.",
            ),
            segments: gauge("blockd_store_segments", "Segment files in the store."),
            volumes: gauge("blockd_store_volumes", "Writable volumes."),
            snapshots: gauge("blockd_store_snapshots", "Named snapshots."),
            volume_unique: gauge_vec(
                "blockd_volume_unique_bytes",
                "Data bytes only this volume holds (its own write log).",
                &["volume"],
            ),
            volume_shared: gauge_vec(
                "blockd_volume_shared_bytes",
                "Data bytes this volume shares with its origin snapshot.",
                &["volume"],
            ),
            recovery_seconds: prometheus::Gauge::new(
                "blockd_store_recovery_seconds",
                "Time opening the store (recovery) took at start.",
            )
            .expect("valid metric definition"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.logical.clone()),
            Box::new(self.referenced.clone()),
            Box::new(self.stored.clone()),
            Box::new(self.shared.clone()),
            Box::new(self.physical.clone()),
            Box::new(self.segments.clone()),
            Box::new(self.volumes.clone()),
            Box::new(self.snapshots.clone()),
            Box::new(self.volume_unique.clone()),
            Box::new(self.volume_shared.clone()),
            Box::new(self.recovery_seconds.clone()),
        ]
    }

    fn update(&self, store: &crate::store::engine::Store) {
        let s = store.stats();
        let g = |g: &IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g(&self.logical, s.logical_bytes);
        g(&self.referenced, s.referenced_bytes);
        g(&self.stored, s.stored_bytes);
        g(
            &self.shared,
            s.referenced_bytes.saturating_sub(s.stored_bytes),
        );
        g(&self.physical, s.physical_bytes);
        g(&self.segments, s.segments as u64);
        g(&self.volumes, s.volumes as u64);
        g(&self.snapshots, s.snapshots as u64);
        // Reset first so deleted volumes disappear.
        self.volume_unique.reset();
        self.volume_shared.reset();
        for v in store.list_volumes() {
            g(
                &self.volume_unique.with_label_values(&[&v.name]),
                v.unique_bytes,
            );
            g(
                &self.volume_shared.with_label_values(&[&v.name]),
                v.shared_bytes,
            );
        }
        self.recovery_seconds.set(store.recovery_seconds);
    }
}

// ------------------------------------------------------------------ control plane

/// Clone and image states the control plane reports (label values of the state gauges).
pub const CLONE_STATES: [&str; 4] = ["running", "starting", "down", "stopped"];
pub const IMAGE_STATES: [&str; 2] = ["building", "ready"];

/// Families of the control plane. Events are counted where they happen; the state gauges
/// are set at scrape time from the control state; the `source_*` gauges are set by the
/// sources thread (every 10 s), `source show`, and each successful refresh.
#[derive(Clone)]
pub struct ControlMetrics {
    pub images: IntGaugeVec,
    pub clones: IntGaugeVec,
    pub clone_ready_seconds: Histogram,
    pub image_builds: IntCounterVec,
    pub expired_deletions: IntCounterVec,
    /// Seconds a source's standby is behind production (0 when caught up).
    pub source_lag_seconds: GaugeVec,
    /// Bytes of WAL (or other change stream) a source is behind production.
    pub source_lag_bytes: GaugeVec,
    /// Unix time of a source's last successful refresh.
    pub source_last_refresh_timestamp_seconds: GaugeVec,
    /// 1 while a source's standby streams from its primary, 0 otherwise.
    pub source_streaming: GaugeVec,
}

impl ControlMetrics {
    pub fn new() -> ControlMetrics {
        ControlMetrics {
            images: gauge_vec(
                "blockd_images",
                "Database images, by state (building, ready).",
                &["state"],
            ),
            clones: gauge_vec(
                "blockd_clones",
                "Database clones, by state (running, starting, down, stopped).",
                &["state"],
            ),
            clone_ready_seconds: histogram(
                "blockd_clone_ready_seconds",
                "Time from a clone request to its database accepting connections.",
                CLONE_READY_BUCKETS,
            ),
            image_builds: counter_vec(
                "blockd_image_builds_total",
                "Image builds finished, by result (ok, failed).",
                &["result"],
            ),
            expired_deletions: counter_vec(
                "blockd_expired_deletions_total",
                "Clones and images deleted because their lifetime ran out, by kind.",
                &["kind"],
            ),
            source_lag_seconds: float_gauge_vec(
                "blockd_source_lag_seconds",
                "How far a source's standby is behind production, in seconds since the last \
                 replayed commit (0 when caught up).",
                &["source"],
            ),
            source_lag_bytes: float_gauge_vec(
                "blockd_source_lag_bytes",
                "How far a source's standby is behind production, in bytes of WAL.",
                &["source"],
            ),
            source_last_refresh_timestamp_seconds: float_gauge_vec(
                "blockd_source_last_refresh_timestamp_seconds",
                "Unix time of a source's last successful refresh.",
                &["source"],
            ),
            source_streaming: float_gauge_vec(
                "blockd_source_streaming",
                "1 while a source's standby streams WAL from its primary, 0 otherwise.",
                &["source"],
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.images.clone()),
            Box::new(self.clones.clone()),
            Box::new(self.clone_ready_seconds.clone()),
            Box::new(self.image_builds.clone()),
            Box::new(self.expired_deletions.clone()),
            Box::new(self.source_lag_seconds.clone()),
            Box::new(self.source_lag_bytes.clone()),
            Box::new(self.source_last_refresh_timestamp_seconds.clone()),
            Box::new(self.source_streaming.clone()),
        ]
    }

    /// Sets the state gauges; every known state is reported, zero included.
    pub fn set_states(&self, images: &[(&str, usize)], clones: &[(&str, usize)]) {
        for (vec, states, counts) in [
            (&self.images, &IMAGE_STATES[..], images),
            (&self.clones, &CLONE_STATES[..], clones),
        ] {
            for s in states {
                let n: usize = counts.iter().filter(|(k, _)| k == s).map(|(_, n)| n).sum();
                vec.with_label_values(&[s])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

// ------------------------------------------------------------------ registry

/// The daemon's registry: every family above plus process metrics.
pub struct Metrics {
    registry: Registry,
    pub nbd: Arc<NbdMetrics>,
    space: SpaceMetrics,
    names: Vec<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers the families of the NBD server, the store and the control plane.
    pub fn new(
        nbd: Arc<NbdMetrics>,
        store: &StoreMetrics,
        control: &ControlMetrics,
    ) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let space = SpaceMetrics::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "blockd_build_info",
                "Always 1; the label is the blockd version.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let mut collectors = nbd.collectors();
        collectors.extend(store.collectors());
        collectors.extend(space.collectors());
        collectors.extend(control.collectors());
        collectors.push(Box::new(build_info));
        collectors.push(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let mut names = Vec::new();
        for c in collectors {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c)?;
        }
        names.sort();
        Ok(Metrics {
            registry,
            nbd,
            space,
            names,
        })
    }

    /// Every metric family name this registry can expose (with or without samples yet).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The exposition: refreshes the scrape-time gauges from the store and the control
    /// plane, then encodes every family in the Prometheus text format.
    pub fn render(
        &self,
        store: &crate::store::engine::Store,
        plane: &crate::control::plane::ControlPlane,
    ) -> Result<String, prometheus::Error> {
        self.space.update(store);
        let existing: HashSet<String> = store.exports().into_iter().map(|e| e.0).collect();
        self.nbd.prune(&existing);
        plane.update_metrics();
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The Content-Type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(
            Arc::new(NbdMetrics::new()),
            &StoreMetrics::new(),
            &ControlMetrics::new(),
        )
        .expect("registry")
    }

    #[test]
    fn every_metric_is_documented_and_every_documented_metric_exists() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md"))
                .expect("docs/METRICS.md");
        // Documented names are the first backquoted word of a table row.
        let documented: HashSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_owned)
            .collect();
        let m = metrics();
        let names: HashSet<String> = m.names().iter().cloned().collect();
        let undocumented: Vec<_> = names.difference(&documented).collect();
        let missing: Vec<_> = documented.difference(&names).collect();
        assert!(
            undocumented.is_empty(),
            "add these to docs/METRICS.md: {undocumented:?}"
        );
        assert!(
            missing.is_empty(),
            "docs/METRICS.md lists metrics that do not exist: {missing:?}"
        );
    }

    #[test]
    fn names_have_the_prefix_and_a_unit() {
        for n in metrics().names() {
            if n.starts_with("process_") {
                continue;
            }
            assert!(n.starts_with("blockd_"), "{n} lacks the blockd_ prefix");
        }
    }

    #[test]
    fn local_counts_reach_the_shared_metrics_on_publish() {
        let nbd = NbdMetrics::new();
        let e = nbd.export("vol");
        let mut c = e.local();
        c.request(Command::Read);
        c.request(Command::Read);
        c.read_bytes(4096);
        c.observe(Command::Read, Duration::from_micros(30));
        assert_eq!(e.requests[0].get(), 0, "nothing shared before publish");
        c.publish();
        assert_eq!(e.requests[0].get(), 2);
        assert_eq!(e.read_bytes.get(), 4096);
        assert_eq!(e.latency[0].get_sample_count(), 1);
        e.error(EIO);
        e.error(12345);
        assert_eq!(e.errors[errno_index(EIO)].get(), 1);
        assert_eq!(e.errors[ERRNOS.len()].get(), 1);
    }

    #[test]
    fn pruning_forgets_deleted_exports_without_connections() {
        let nbd = NbdMetrics::new();
        nbd.export("gone").requests[0].inc();
        nbd.export("kept").requests[0].inc();
        let keep: HashSet<String> = ["kept".to_string()].into();
        nbd.prune(&keep);
        let names: Vec<String> = nbd
            .requests
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().to_vec())
            .flat_map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(names.contains(&"kept".to_string()));
        assert!(!names.contains(&"gone".to_string()));
    }
}
