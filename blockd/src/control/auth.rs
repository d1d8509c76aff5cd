//! Bearer tokens: stored as SHA-256 hashes, checked on every API request once any token
//! exists. Roles: `admin` (everything) and `user` (only the clones it created, and reading
//! images).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::plane::ControlPlane;

pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares without an early exit, so timing does not reveal how much of a hash matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Paths that need no token.
fn is_public(path: &str) -> bool {
    path == "/v1/health" || path == "/metrics"
}

/// Resolves the caller from the `Authorization` header and stores it in the request's
/// extensions; answers 401 when a token is needed and missing or wrong.
pub async fn middleware(
    State(plane): State<Arc<ControlPlane>>,
    mut req: Request,
    next: Next,
) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .map(str::to_owned);
    match plane.authenticate(bearer.as_deref()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(msg) => (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": { "kind": "unauthorized", "message": msg } })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_compares() {
        let h = hash_token("bd_secret");
        assert_eq!(h.len(), 64);
        assert!(constant_time_eq(
            h.as_bytes(),
            hash_token("bd_secret").as_bytes()
        ));
        assert!(!constant_time_eq(
            h.as_bytes(),
            hash_token("bd_secreT").as_bytes()
        ));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
