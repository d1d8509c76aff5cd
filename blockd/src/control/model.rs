//! What the control plane records: images, clones and API tokens, persisted as
//! `<data-dir>/control.json` (replaced atomically on every change), and the image
//! definition users write in YAML.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::host::Attachment;
use crate::names::Name;

pub const STATE_VERSION: u32 = 1;

/// Parses a lifetime: `30m`, `12h`, `90s`, `2d`, or `0` (forever). Returns None for forever.
pub fn parse_lifetime(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t == "0" || t.is_empty() {
        return Ok(None);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("invalid lifetime {s:?}: {e}; write a number with a unit (s, m, h, d), e.g. 30m or 12h, or 0 for forever"))?;
    if d.is_zero() { Ok(None) } else { Ok(Some(d)) }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    Empty,
    Backup,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
}

/// A size as a number of bytes or a string like "10G".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeSpec {
    Bytes(u64),
    Text(String),
}

impl SizeSpec {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeSpec::Bytes(n) => Ok(*n),
            SizeSpec::Text(s) => crate::size::parse_size(s),
        }
    }
}

/// A lifetime written as `0`, `30m` or `12h` (YAML may give a bare number).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum LifetimeSpec {
    Number(u64),
    Text(String),
}

impl LifetimeSpec {
    pub fn duration(&self) -> Result<Option<Duration>, String> {
        match self {
            LifetimeSpec::Number(0) => Ok(None),
            LifetimeSpec::Number(n) => Err(format!(
                "lifetime {n} has no unit; write e.g. {n}m or {n}h (0 means forever)"
            )),
            LifetimeSpec::Text(s) => parse_lifetime(s),
        }
    }
}

/// The image definition file (`blockd image create -f image.yaml`). Script and backup
/// paths are relative to the file's directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageDefinition {
    pub name: String,
    pub source_type: SourceType,
    pub engine: Engine,
    pub version: u32,
    pub size: SizeSpec,
    #[serde(default)]
    pub lifetime: Option<LifetimeSpec>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub pre_script: Option<String>,
    #[serde(default)]
    pub post_script: Option<String>,
    /// For `sourceType: backup`: a pg_basebackup output, a plain directory or a tar file
    /// (base.tar, base.tar.gz), on the daemon's host.
    #[serde(default)]
    pub backup: Option<String>,
    /// `ext4` (default) or `xfs`.
    #[serde(default)]
    pub filesystem: Option<String>,
}

/// A script sent with an image request: its file name (the extension decides how it
/// runs: `.sql` through psql, anything else as an executable) and its contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScriptBody {
    pub name: String,
    pub content: String,
}

/// `POST /v1/images`: the definition with scripts inlined (so the API works from
/// anywhere); `backup` stays a path on the daemon's host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageRequest {
    pub name: String,
    pub source_type: SourceType,
    pub engine: Engine,
    pub version: u32,
    pub size: SizeSpec,
    #[serde(default)]
    pub lifetime: Option<LifetimeSpec>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub pre_script: Option<ScriptBody>,
    #[serde(default)]
    pub post_script: Option<ScriptBody>,
    #[serde(default)]
    pub backup: Option<String>,
    #[serde(default)]
    pub filesystem: Option<String>,
}

/// Checks the parts of a request that need no I/O; the message says what to fix.
pub fn validate_request(r: &ImageRequest) -> Result<(u64, Option<Duration>, String), String> {
    Name::parse("image", &r.name).map_err(|e| e.to_string())?;
    let size = r.size.bytes()?;
    crate::store::check_volume_size(size).map_err(|e| e.to_string())?;
    if size < 64 << 20 {
        return Err(format!(
            "image size {size} bytes is too small for a database; give at least 64M"
        ));
    }
    let lifetime = match &r.lifetime {
        Some(l) => l.duration()?,
        None => None,
    };
    let fs = r.filesystem.clone().unwrap_or_else(|| "ext4".into());
    if fs != "ext4" && fs != "xfs" {
        return Err(format!(
            "filesystem {fs:?} is not supported; use ext4 or xfs"
        ));
    }
    match (r.source_type, &r.backup) {
        (SourceType::Backup, None) => {
            return Err(
                "sourceType backup needs `backup:` (a pg_basebackup directory or tar file)".into(),
            );
        }
        (SourceType::Empty, Some(_)) => {
            return Err(
                "`backup:` is only for sourceType backup; remove it or set sourceType: backup"
                    .into(),
            );
        }
        _ => {}
    }
    for t in &r.tags {
        if t.is_empty() || t.len() > 63 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "tag {t:?} must be 1 to 63 characters without spaces"
            ));
        }
    }
    for s in [&r.pre_script, &r.post_script].into_iter().flatten() {
        if s.name.is_empty() || s.name.contains('/') {
            return Err(format!(
                "script name {:?} must be a plain file name",
                s.name
            ));
        }
    }
    Ok((size, lifetime, fs))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// Being built: a crash leaves this behind, and the next start removes what it made.
    Building,
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRec {
    pub name: String,
    pub state: ImageState,
    /// The volume holding it and its snapshot (the image itself): `volume@image`.
    pub volume: String,
    pub snapshot: String,
    pub engine: Engine,
    pub version: u32,
    pub size_bytes: u64,
    pub filesystem: String,
    /// "empty", "backup <path>", or "clone <name> of <image>".
    pub source: String,
    pub tags: Vec<String>,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloneRec {
    pub name: String,
    pub image: String,
    pub volume: String,
    pub port: u16,
    /// Token name of the user that created it (None when the API has no tokens).
    pub owner: Option<String>,
    /// Password of the `postgres` role, set when the clone was created.
    pub password: String,
    pub desired: Desired,
    /// How the volume is attached now, if it is.
    pub attachment: Option<Attachment>,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
    /// The snapshot the clone was made from (and is reset to); empty in records written
    /// before sources existed, where it is the image's `img.NAME@image`.
    #[serde(default)]
    pub snapshot: String,
    /// Made from a raw source revision: a standby to promote at its first start.
    #[serde(default)]
    pub promote: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRec {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ControlState {
    pub version: u32,
    pub images: BTreeMap<String, ImageRec>,
    pub clones: BTreeMap<String, CloneRec>,
    pub tokens: Vec<TokenRec>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceRec>,
}

/// The production primary a source follows. The password comes from a file on the
/// daemon's host or from one of the daemon's environment variables, never from the YAML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrimaryDef {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// A role with the REPLICATION attribute.
    pub user: String,
    #[serde(default)]
    pub password_file: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
}

fn default_pg_port() -> u16 {
    5432
}

/// The source definition file (`blockd source create -f source.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceDefinition {
    pub name: String,
    pub engine: Engine,
    pub version: u32,
    pub primary: PrimaryDef,
    pub size: SizeSpec,
    /// `manual` (default), `every 15m`, or `none`.
    #[serde(default)]
    pub refresh: Option<String>,
    /// Revisions kept (default 8); older ones are deleted unless clones use them.
    #[serde(default)]
    pub retain: Option<u32>,
    /// Masking applied to every revision (never to the source itself).
    #[serde(default)]
    pub post_script: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub filesystem: Option<String>,
}

/// `POST /v1/sources`: the definition with the post-script inlined.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceRequest {
    pub name: String,
    pub engine: Engine,
    pub version: u32,
    pub primary: PrimaryDef,
    pub size: SizeSpec,
    #[serde(default)]
    pub refresh: Option<String>,
    #[serde(default)]
    pub retain: Option<u32>,
    #[serde(default)]
    pub post_script: Option<ScriptBody>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub filesystem: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum RefreshMode {
    Manual,
    Every { seconds: u64 },
    None,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Building,
    Ready,
}

/// One point-in-time revision of a source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevisionRec {
    pub number: u32,
    /// The snapshot clones are made from: `src.NAME@rN`, or `rev.NAME.N@image` if masked.
    pub snapshot: String,
    /// End of the WAL the revision holds: a clone replays exactly up to here.
    pub lsn: String,
    /// Commit time of the last transaction the standby had replayed.
    pub replay_timestamp: Option<String>,
    pub created_unix: u64,
    /// Masked by the post-script (already a primary), or a raw standby (clones promote).
    pub masked: bool,
    /// How long the source's file system was frozen for the snapshot, in microseconds.
    #[serde(default)]
    pub frozen_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceRec {
    pub name: String,
    pub state: SourceState,
    pub volume: String,
    pub version: u32,
    pub primary: PrimaryDef,
    pub size_bytes: u64,
    pub filesystem: String,
    pub refresh: RefreshMode,
    pub retain: u32,
    pub post_script: Option<ScriptBody>,
    pub tags: Vec<String>,
    pub revisions: Vec<RevisionRec>,
    pub next_revision: u32,
    pub attachment: Option<Attachment>,
    pub created_unix: u64,
    pub last_refresh_unix: Option<u64>,
    /// The last refresh tried, successful or not (scheduled refreshes count from here).
    #[serde(default)]
    pub last_attempt_unix: Option<u64>,
    pub last_error: Option<String>,
}

/// Where the control plane keeps its files under the data directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state: PathBuf,
    /// Per instance: socket and server log (owned by postgres, 0700).
    pub run: PathBuf,
    /// Mount points.
    pub mnt: PathBuf,
    /// nbdfuse files.
    pub attach: PathBuf,
    /// Scripts of image builds.
    pub scripts: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &std::path::Path) -> Paths {
        let cp = data_dir.join("control");
        Paths {
            state: cp.join("control.json"),
            run: cp.join("run"),
            mnt: cp.join("mnt"),
            attach: cp.join("attach"),
            scripts: cp.join("scripts"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("0"), Ok(None));
        assert_eq!(parse_lifetime("30m"), Ok(Some(Duration::from_secs(1800))));
        assert_eq!(parse_lifetime("12h"), Ok(Some(Duration::from_secs(43200))));
        assert!(
            parse_lifetime("soon")
                .expect_err("bad")
                .contains("e.g. 30m")
        );
        assert!(
            LifetimeSpec::Number(5)
                .duration()
                .expect_err("no unit")
                .contains("5m")
        );
    }

    #[test]
    fn yaml_definition_parses_and_rejects_unknown_fields() {
        let y = "name: demo\nsourceType: empty\nengine: postgres\nversion: 15\nsize: 1G\nlifetime: 0\ntags: [a, b]\npostScript: mask.sql\n";
        let d: ImageDefinition = yaml_serde::from_str(y).expect("parses");
        assert_eq!(d.source_type, SourceType::Empty);
        assert_eq!(d.lifetime, Some(LifetimeSpec::Number(0)));
        let bad = format!("{y}colour: blue\n");
        let e = yaml_serde::from_str::<ImageDefinition>(&bad).expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
