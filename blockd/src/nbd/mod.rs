//! The NBD server: listeners, handshake, and the transmission loop.
//!
//! Data path: a connection thread reads requests in batches from its socket
//! ([`conn`]), validates each one ([`conn::check_request`]), runs reads and writes
//! inline against the shared [`Volume`](crate::store::Volume), and writes the batch
//! of replies with one socket write. Work that must wait for durability (FLUSH and
//! FUA) goes to the connection's commit thread, which serves everything queued with
//! one volume flush (group commit) and replies out of order.
//!
//! This module depends on the store only through [`ExportSource`] and the
//! `Volume` trait; the daemon (`crate::exports`) provides both.

pub mod conn;
pub mod errno;
pub mod handshake;
pub mod server;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use nbd_proto::consts::MAX_PAYLOAD_BYTES;
use nbd_proto::handshake::BlockSize;

use crate::store::Volume;

/// Block size constraints blockd advertises: byte-granular, 4 KiB preferred, 32 MiB maximum.
pub const BLOCK_SIZE: BlockSize = BlockSize {
    minimum: 1,
    preferred: 4096,
    maximum: MAX_PAYLOAD_BYTES,
};

/// An export as the handshake lists and describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

/// An export opened for transmission. Every connection to the same export shares one
/// `OpenExport`, so they share the volume's state and its flushes.
pub struct OpenExport {
    pub name: String,
    pub volume: Arc<dyn Volume>,
}

impl std::fmt::Debug for OpenExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenExport")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why an export could not be opened or described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// No export of that name (NBD_REP_ERR_UNKNOWN).
    Unknown(String),
    /// It exists but cannot be served now (NBD_REP_ERR_POLICY with this message).
    Unavailable(String),
}

/// Where the server finds its exports. Implemented by the daemon over the store.
pub trait ExportSource: Send + Sync {
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportInfo>;
    /// One export's details, for NBD_OPT_INFO.
    fn describe(&self, name: &str) -> Result<ExportInfo, ExportError>;
    /// Opens an export for transmission, sharing state with other connections to it.
    fn open(&self, name: &str) -> Result<Arc<OpenExport>, ExportError>;
}

/// Tunables of the NBD server, each a named limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Requests per connection waiting for a flush at once; more block the reader
    /// (backpressure).
    pub max_pending_commits: usize,
    /// Replies are written once this many bytes are batched, even if more requests wait.
    pub reply_batch_bytes: usize,
    /// Time connections get to finish in-flight requests at shutdown before being cut.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_pending_commits: 256,
            reply_batch_bytes: 1 << 20,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
