//! REST routes of the database control plane: images, sources, jobs, clones, tokens.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::ApiError;
use super::model::{ImageRequest, Role, SourceRequest};
use super::plane::{Caller, CloneView, ControlError, ControlPlane, ImageView, Job, Kind};
use super::sources::{RevisionView, SourceView};

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let (status, kind) = match e.kind {
            Kind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Kind::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
            Kind::Invalid => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Kind::InUse => (StatusCode::CONFLICT, "in_use"),
            Kind::Busy => (StatusCode::CONFLICT, "busy"),
            Kind::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Kind::Failed => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        };
        ApiError {
            status,
            kind,
            message: e.message,
        }
    }
}

type P = State<Arc<ControlPlane>>;
type ApiResult<T> = Result<T, ApiError>;

pub fn routes(plane: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v1/images", get(list_images).post(create_image))
        .route("/v1/images/{name}", get(show_image).delete(delete_image))
        .route("/v1/jobs/{id}", get(show_job))
        .route("/v1/sources", get(list_sources).post(create_source))
        .route("/v1/sources/{name}", get(show_source).delete(delete_source))
        .route("/v1/sources/{name}/refresh", post(refresh_source))
        .route("/v1/clones", get(list_clones).post(create_clone))
        .route("/v1/clones/{name}", get(show_clone).delete(delete_clone))
        .route("/v1/clones/{name}/stop", post(stop_clone))
        .route("/v1/clones/{name}/start", post(start_clone))
        .route("/v1/clones/{name}/reset", post(reset_clone))
        .route("/v1/clones/{name}/save", post(save_clone))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", axum::routing::delete(delete_token))
        .with_state(plane)
}

/// Runs a control-plane call on the blocking pool (it runs programs and waits for them).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            message: e.to_string(),
        })?
        .map_err(ApiError::from)
}

fn body<T>(
    b: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    example: &str,
) -> ApiResult<T> {
    b.map(|Json(t)| t).map_err(|e| {
        ApiError::bad_request(format!(
            "request body must be JSON like {example}: {}",
            e.body_text()
        ))
    })
}

// ---------------------------------------------------------------- images

async fn list_images(State(p): P) -> ApiResult<Json<Vec<ImageView>>> {
    blocking(move || Ok(p.list_images())).await.map(Json)
}

async fn create_image(
    State(p): P,
    Extension(c): Extension<Caller>,
    b: Result<Json<ImageRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let req = body(
        b,
        r#"{"name": "pg", "sourceType": "empty", "engine": "postgres", "version": 15, "size": "4G"}"#,
    )?;
    let name = req.name.clone();
    let id = blocking(move || p.create_image(&c, req)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": id, "image": name })),
    ))
}

async fn show_image(State(p): P, Path(name): Path<String>) -> ApiResult<Json<ImageView>> {
    blocking(move || p.show_image(&name)).await.map(Json)
}

async fn delete_image(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(move || p.delete_image(&c, &name))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

async fn show_job(State(p): P, Path(id): Path<u64>) -> ApiResult<Json<Job>> {
    blocking(move || p.job(id)).await.map(Json)
}

// ---------------------------------------------------------------- sources

async fn list_sources(State(p): P) -> ApiResult<Json<Vec<SourceView>>> {
    blocking(move || Ok(p.list_sources())).await.map(Json)
}

async fn create_source(
    State(p): P,
    Extension(c): Extension<Caller>,
    b: Result<Json<SourceRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let req = body(
        b,
        r#"{"name": "prod", "engine": "postgres", "version": 15, "size": "64G", "primary": {"host": "db1", "user": "replicator", "passwordFile": "/etc/blockd/prod.pass"}, "refresh": "every 15m"}"#,
    )?;
    let name = req.name.clone();
    let id = blocking(move || p.create_source(&c, req)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": id, "source": name })),
    ))
}

async fn show_source(State(p): P, Path(name): Path<String>) -> ApiResult<Json<SourceView>> {
    blocking(move || p.show_source(&name)).await.map(Json)
}

async fn delete_source(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(move || p.delete_source(&c, &name))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

async fn refresh_source(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<RevisionView>)> {
    blocking(move || p.refresh_source(&c, &name))
        .await
        .map(|r| (StatusCode::CREATED, Json(r)))
}

// ---------------------------------------------------------------- clones

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateClone {
    /// An image, or a source revision: `SOURCE`, `SOURCE@N`, `SOURCE@TIME`.
    #[serde(alias = "from")]
    image: String,
    name: String,
    port: Option<u16>,
    lifetime: Option<String>,
}

async fn list_clones(
    State(p): P,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<Vec<CloneView>>> {
    blocking(move || Ok(p.list_clones(&c))).await.map(Json)
}

async fn create_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    b: Result<Json<CreateClone>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<CloneView>)> {
    let r = body(
        b,
        r#"{"image": "pg", "name": "dev1", "port": 15432, "lifetime": "8h"}"#,
    )?;
    let v = blocking(move || p.create_clone(&c, &r.image, &r.name, r.port, r.lifetime.as_deref()))
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn show_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<CloneView>> {
    blocking(move || p.show_clone(&c, &name)).await.map(Json)
}

async fn delete_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(move || p.delete_clone(&c, &name))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

async fn stop_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<CloneView>> {
    blocking(move || p.stop_clone(&c, &name)).await.map(Json)
}

async fn start_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<CloneView>> {
    blocking(move || p.start_clone(&c, &name)).await.map(Json)
}

async fn reset_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<CloneView>> {
    blocking(move || p.reset_clone(&c, &name)).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveClone {
    image: String,
}

async fn save_clone(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    b: Result<Json<SaveClone>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<ImageView>)> {
    let r = body(b, r#"{"image": "pg-branch"}"#)?;
    let v = blocking(move || p.save_clone(&c, &name, &r.image)).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

// ---------------------------------------------------------------- tokens

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    role: Role,
}

async fn create_token(
    State(p): P,
    Extension(c): Extension<Caller>,
    b: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let r = body(b, r#"{"name": "ci", "role": "user"}"#)?;
    let (name, role) = (r.name.clone(), r.role);
    let token = blocking(move || p.create_token(&c, &r.name, r.role)).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": name, "role": role, "token": token })),
    ))
}

async fn list_tokens(State(p): P, Extension(c): Extension<Caller>) -> ApiResult<Json<Value>> {
    let list = blocking(move || p.list_tokens(&c)).await?;
    Ok(Json(Value::Array(
        list.into_iter()
            .map(|(n, r, t)| json!({ "name": n, "role": r, "created_unix": t }))
            .collect(),
    )))
}

async fn delete_token(
    State(p): P,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(move || p.delete_token(&c, &name))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}
