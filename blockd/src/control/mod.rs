//! The control plane: the REST API and, in later stages, images, clones and sources.
//! It manages the catalog and processes; it never sits on the I/O path.

pub mod api;
