//! A small blocking HTTP client for the daemon's REST API.

use std::time::Duration;

use anyhow::{Result, anyhow};
use serde_json::Value;

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// Percent-encodes one path segment (names are restricted, but be safe with user input).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Turns `127.0.0.1:7480` or `http://host:port/` into a base URL without trailing slash.
pub fn base_url(api: &str) -> String {
    let api = api.trim().trim_end_matches('/');
    if api.starts_with("http://") || api.starts_with("https://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

impl Client {
    pub fn new(api: &str, token: Option<String>) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build();
        Client {
            base: base_url(api),
            token,
            agent: config.into(),
        }
    }

    fn finish(
        &self,
        what: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut resp = resp.map_err(|e| {
            anyhow!(
                "cannot reach the blockd API at {}: {e}; is `blockd serve` running? \
                 Point --api (or BLOCKD_API) at its --api address",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
        };
        if status.is_success() {
            return Ok(body);
        }
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{what} failed with HTTP {status}: {text}"));
        Err(anyhow!(message))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        let resp = self.auth(self.agent.get(self.url(path))).call();
        self.finish(&format!("GET {path}"), resp)
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        let resp = self.auth(self.agent.delete(self.url(path))).call();
        self.finish(&format!("DELETE {path}"), resp)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self.auth(self.agent.post(self.url(path))).send_json(body);
        self.finish(&format!("POST {path}"), resp)
    }
}
