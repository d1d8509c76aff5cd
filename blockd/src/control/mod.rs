//! The control plane: the REST API, and databases on volumes: images, clones attached to
//! running PostgreSQL instances, API tokens. It manages the catalog and processes; it never
//! sits on the I/O path.

pub mod api;
pub mod auth;
pub mod db_api;
pub mod host;
pub mod model;
pub mod plane;
pub mod postgres;
pub mod sources;
