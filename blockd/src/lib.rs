//! blockd: a userspace copy-on-write block device server.
//!
//! Layers point one way: `nbd-proto` (bytes) <- [`nbd`] (server) -> [`store::Volume`]
//! <- [`store`] (data). [`exports`] joins the server to the store; [`control`] is the
//! REST API; [`cli`] its command-line client. See docs/ARCHITECTURE.md.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod exports;
pub mod fsutil;
pub mod metrics;
pub mod names;
pub mod nbd;
pub mod size;
pub mod store;
