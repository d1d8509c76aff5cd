//! The REST API (`/v1/...`), served by axum on the daemon's tokio runtime.
//!
//! Every error body is `{"error": {"kind": "...", "message": "..."}}` with an HTTP status
//! chosen by the error kind; messages say what was wrong and what to do. Store operations
//! run on the blocking pool: they take locks and sync files.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::names::Name;
use crate::size::parse_size;
use crate::store::compact::Policy;
use crate::store::engine::{
    SnapshotDeletion, SnapshotInfo, Store, VolumeInfo, split_snapshot_name,
};
use crate::store::{ErrorKind, StoreError};

pub struct AppState {
    pub store: Arc<Store>,
    /// The registry `/metrics` renders.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub plane: Arc<super::plane::ControlPlane>,
    /// Where NBD clients connect (for `volume import/export` and users).
    pub nbd_tcp: Option<String>,
    pub nbd_socket: Option<String>,
}

/// The whole API: storage routes (admin only once tokens exist), database routes, and the
/// token check in front of everything but health and metrics.
/// Volume name prefixes the control plane uses for its own volumes.
const RESERVED_PREFIXES: [&str; 4] = ["img.", "cln.", "src.", "rev."];

pub fn router(state: Arc<AppState>) -> Router {
    let plane = state.plane.clone();
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    let storage = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/df", get(df))
        .route("/v1/compact", post(compact))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/reset", post(reset_volume))
        .route("/v1/snapshots", get(list_snapshots).post(create_snapshot))
        .route(
            "/v1/snapshots/{name}",
            get(show_snapshot).delete(delete_snapshot),
        )
        .route_layer(axum::middleware::from_fn(admin_only))
        .with_state(state);
    Router::new()
        .route("/v1/health", get(health))
        .merge(metrics)
        .merge(storage)
        .merge(super::db_api::routes(plane.clone()))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            plane,
            super::auth::middleware,
        ))
}

/// Prometheus exposition (no token needed, like health). Gathering reads the store's
/// state and the clones' pid files, so it runs on the blocking pool.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let rendered =
        tokio::task::spawn_blocking(move || st.metrics.render(&st.store, &st.plane)).await;
    match rendered {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            message: format!("could not encode the metrics: {e}; please report this as a bug"),
        }
        .into_response(),
        Err(e) => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            message: format!("gathering the metrics failed: {e}; see the daemon's log"),
        }
        .into_response(),
    }
}

/// Storage-level routes manage every volume: admins only.
async fn admin_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match req.extensions().get::<super::plane::Caller>() {
        Some(c) if c.role == super::model::Role::Admin => next.run(req).await,
        _ => ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "forbidden",
            message: "volumes and snapshots need an admin token; user tokens manage their own clones (blockd clone ...)".into(),
        }
        .into_response(),
    }
}

/// An API error: status plus stable kind plus message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_argument",
            message: message.into(),
        }
    }
}

/// The HTTP status for each store error kind.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::InUse | ErrorKind::ReadOnly => StatusCode::CONFLICT,
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange => StatusCode::BAD_REQUEST,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::NotSupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::FlushFailed | ErrorKind::Corrupt | ErrorKind::Io => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let kind = e.kind();
        ApiError {
            status: status_for(kind),
            kind: kind.as_str(),
            message: e.to_string(),
        }
    }
}

impl From<crate::names::NameError> for ApiError {
    fn from(e: crate::names::NameError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "kind": self.kind, "message": self.message } }));
        (self.status, body).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found",
        message: "no such API endpoint; see docs/API.md".into(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "internal",
        message: format!("request handler failed: {e}"),
    })?
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    example: &str,
) -> ApiResult<T> {
    body.map(|Json(t)| t).map_err(|e| {
        ApiError::bad_request(format!(
            "request body must be JSON like {example}: {}",
            e.body_text()
        ))
    })
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn info(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "nbd": st.nbd_tcp,
        "socket": st.nbd_socket,
    }))
}

async fn df(State(st): State<Arc<AppState>>) -> ApiResult<Json<crate::store::engine::StoreStats>> {
    blocking(move || Ok(Json(st.store.stats()))).await
}

async fn compact(
    State(st): State<Arc<AppState>>,
) -> ApiResult<Json<crate::store::compact::Report>> {
    blocking(move || Ok(Json(st.store.compact(&Policy::default())?))).await
}

// ---------------------------------------------------------------- volumes

/// A volume as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub clone_of: Option<String>,
    pub origin: Option<String>,
    pub unique_bytes: u64,
    pub shared_bytes: u64,
    pub created: String,
    pub nbd_connections: usize,
}

impl From<VolumeInfo> for VolumeView {
    fn from(v: VolumeInfo) -> VolumeView {
        VolumeView {
            created: rfc3339(v.created_unix),
            name: v.name,
            size_bytes: v.size_bytes,
            clone_of: v.clone_of,
            origin: v.origin,
            unique_bytes: v.unique_bytes,
            shared_bytes: v.shared_bytes,
            nbd_connections: v.nbd_connections,
        }
    }
}

/// A size given as a number of bytes or a string such as "10G".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeField {
    Bytes(u64),
    Text(String),
}

impl SizeField {
    fn bytes(&self) -> ApiResult<u64> {
        match self {
            SizeField::Bytes(n) => Ok(*n),
            SizeField::Text(s) => parse_size(s).map_err(ApiError::bad_request),
        }
    }
}

/// `{"name", "size"}` creates an empty volume; `{"name", "from": "VOLUME@SNAP"}` clones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: Option<SizeField>,
    pub from: Option<String>,
}

async fn list_volumes(State(st): State<Arc<AppState>>) -> ApiResult<Json<Vec<VolumeView>>> {
    blocking(move || {
        Ok(Json(
            st.store
                .list_volumes()
                .into_iter()
                .map(VolumeView::from)
                .collect(),
        ))
    })
    .await
}

async fn create_volume(
    State(st): State<Arc<AppState>>,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let req = json_body(
        body,
        r#"{"name": "db", "size": "10G"} or {"name": "dev1", "from": "db@monday"}"#,
    )?;
    let name = Name::parse("volume", &req.name)?;
    if RESERVED_PREFIXES.iter().any(|p| req.name.starts_with(p)) {
        return Err(ApiError::bad_request(format!(
            "volume names starting with {} are reserved for database images, clones, sources \
             and revisions; pick another name than {}",
            RESERVED_PREFIXES.join(", "),
            req.name
        )));
    }
    let created = match (req.size, req.from) {
        (Some(size), None) => {
            let size = size.bytes()?;
            blocking(move || Ok(st.store.create_volume(&name, size)?)).await?
        }
        (None, Some(from)) => blocking(move || Ok(st.store.clone_volume(&from, &name)?)).await?,
        _ => {
            return Err(ApiError::bad_request(
                "give either \"size\" (a new empty volume) or \"from\": \"VOLUME@SNAP\" (a clone)",
            ));
        }
    };
    tracing::info!(volume = %created.name, clone_of = ?created.clone_of, size = created.size_bytes, "volume created");
    Ok((StatusCode::CREATED, Json(created.into())))
}

async fn show_volume(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VolumeView>> {
    blocking(move || Ok(Json(st.store.show_volume(&name)?.into()))).await
}

async fn delete_volume(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(move || {
        st.store.delete_volume(&name)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn reset_volume(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VolumeView>> {
    blocking(move || {
        let v = st.store.reset_volume(&name)?;
        tracing::info!(volume = %name, "volume reset to its origin");
        Ok(Json(v.into()))
    })
    .await
}

// ---------------------------------------------------------------- snapshots

#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotView {
    pub name: String,
    pub volume: String,
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub unique_bytes: u64,
    pub created: String,
    pub clones: Vec<String>,
}

impl From<SnapshotInfo> for SnapshotView {
    fn from(s: SnapshotInfo) -> SnapshotView {
        SnapshotView {
            created: rfc3339(s.created_unix),
            name: s.name,
            volume: s.volume,
            size_bytes: s.size_bytes,
            data_bytes: s.data_bytes,
            unique_bytes: s.unique_bytes,
            clones: s.clones,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct SnapshotFilter {
    pub volume: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// `VOLUME@SNAP`
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct DeleteSnapshotQuery {
    #[serde(default)]
    pub defer: bool,
}

async fn list_snapshots(
    State(st): State<Arc<AppState>>,
    Query(f): Query<SnapshotFilter>,
) -> ApiResult<Json<Vec<SnapshotView>>> {
    blocking(move || {
        Ok(Json(
            st.store
                .list_snapshots(f.volume.as_deref())
                .into_iter()
                .map(SnapshotView::from)
                .collect(),
        ))
    })
    .await
}

async fn create_snapshot(
    State(st): State<Arc<AppState>>,
    body: Result<Json<CreateSnapshot>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let req = json_body(body, r#"{"name": "db@monday"}"#)?;
    let (vol, snap) = split_snapshot_name(&req.name)?;
    blocking(move || {
        let s = st.store.create_snapshot(&vol, &snap)?;
        tracing::info!(snapshot = %s.name, "snapshot created");
        Ok((StatusCode::CREATED, Json(s.into())))
    })
    .await
}

async fn show_snapshot(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<SnapshotView>> {
    blocking(move || {
        let (vol, _) = split_snapshot_name(&name)?;
        st.store
            .list_snapshots(Some(vol.as_str()))
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| Json(s.into()))
            .ok_or_else(|| {
                StoreError::NotFound {
                    what: format!("snapshot {name}"),
                    hint: "list snapshots with `blockd snapshot list`",
                }
                .into()
            })
    })
    .await
}

async fn delete_snapshot(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<DeleteSnapshotQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    blocking(move || {
        let outcome = st.store.delete_snapshot(&name, q.defer)?;
        tracing::info!(snapshot = %name, ?outcome, "snapshot deleted");
        Ok(Json(match outcome {
            SnapshotDeletion::Deleted => json!({ "deleted": name }),
            SnapshotDeletion::Deferred { clones } => {
                json!({ "deleted": name, "deferred_until_deleted": clones })
            }
        }))
    })
    .await
}
