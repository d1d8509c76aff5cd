//! The REST API (`/v1/...`), served by axum on the daemon's tokio runtime.
//!
//! Every error body is `{"error": {"kind": "...", "message": "..."}}` with an HTTP status
//! chosen by the error kind; messages say what was wrong and what to do.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::exports::Exports;
use crate::names::Name;
use crate::size::parse_size;
use crate::store::file::VolumeInfo;
use crate::store::{ErrorKind, StoreError};

pub struct AppState {
    pub exports: Arc<Exports>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .fallback(not_found)
        .with_state(state)
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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let kind = e.kind();
        let status = match kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists | ErrorKind::InUse | ErrorKind::ReadOnly => {
                StatusCode::CONFLICT
            }
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => StatusCode::BAD_REQUEST,
            ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::NotSupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::FlushFailed | ErrorKind::Corrupt | ErrorKind::Io => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError {
            status,
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

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// A volume as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub created: String,
    pub nbd_connections: usize,
}

fn view(v: VolumeInfo, exports: &Exports) -> VolumeView {
    let created =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(v.created_unix));
    VolumeView {
        nbd_connections: exports.connections(&v.name),
        name: v.name,
        size_bytes: v.size_bytes,
        allocated_bytes: v.allocated_bytes,
        created: created.to_string(),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: SizeField,
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

async fn list_volumes(State(st): State<Arc<AppState>>) -> ApiResult<Json<Vec<VolumeView>>> {
    blocking(move || {
        let vols = st.exports.store().list_volumes();
        Ok(Json(
            vols.into_iter().map(|v| view(v, &st.exports)).collect(),
        ))
    })
    .await
}

async fn create_volume(
    State(st): State<Arc<AppState>>,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "request body must be JSON like {{\"name\": \"db\", \"size\": \"10G\"}}: {}",
            e.body_text()
        ))
    })?;
    let name = Name::parse("volume", &req.name)?;
    let size = req.size.bytes()?;
    blocking(move || {
        let v = st.exports.store().create_volume(&name, size)?;
        tracing::info!(volume = %name, size, "volume created");
        Ok((StatusCode::CREATED, Json(view(v, &st.exports))))
    })
    .await
}

async fn show_volume(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VolumeView>> {
    blocking(move || {
        Ok(Json(view(
            st.exports.store().volume_info(&name)?,
            &st.exports,
        )))
    })
    .await
}

async fn delete_volume(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(move || {
        st.exports.delete_volume(&name)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
