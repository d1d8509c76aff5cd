//! `blockd source ...`: sources kept in sync with a production primary, and their revisions.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use super::client::{Client, path_segment};
use super::db::{inline_script, n, s, wait_job, when};
use super::table::Table;
use super::{Output, print_json};
use crate::control::model::{SourceDefinition, SourceRequest};
use crate::size::format_size;

/// Reads a source definition file; the post-script is inlined, a relative `passwordFile`
/// is taken relative to the definition file.
pub fn read_definition(file: &Path) -> Result<SourceRequest> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let def: SourceDefinition = yaml_serde::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not a valid source definition: {e}. Fields: name, engine (postgres), version, \
             size, primary (host, port, user, passwordFile or passwordEnv), refresh (manual | \
             every DURATION | none), retain, postScript, tags, filesystem",
            file.display()
        )
    })?;
    let mut primary = def.primary.clone();
    if let Some(p) = &primary.password_file
        && Path::new(p).is_relative()
    {
        let full = file.parent().unwrap_or(Path::new(".")).join(p);
        primary.password_file = Some(
            std::fs::canonicalize(&full)
                .unwrap_or(full)
                .display()
                .to_string(),
        );
    }
    Ok(SourceRequest {
        name: def.name,
        engine: def.engine,
        version: def.version,
        primary,
        size: def.size,
        refresh: def.refresh,
        retain: def.retain,
        post_script: inline_script(file, def.post_script.as_deref())?,
        tags: def.tags,
        filesystem: def.filesystem,
    })
}

pub fn create(c: &Client, out: Output, file: &Path) -> Result<()> {
    let req = read_definition(file)?;
    let started = c.post("/v1/sources", &serde_json::to_value(&req)?)?;
    let what = format!("creating source {}", req.name);
    let j = wait_job(c, out, n(&started, "job"), &what)?;
    let v = c.get(&format!("/v1/sources/{}", path_segment(&req.name)))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => {
            println!(
                "source {} streaming from {} (made in {:.1}s)",
                req.name,
                s(&v, "primary"),
                j.get("seconds").and_then(Value::as_f64).unwrap_or(0.0)
            );
            if let Some(r) = first_revision(&v) {
                println!(
                    "revision {} at LSN {}; clone it with `blockd clone create {} NAME`",
                    s(r, "name"),
                    s(r, "lsn"),
                    s(r, "name")
                );
            }
        }
    }
    Ok(())
}

fn first_revision(v: &Value) -> Option<&Value> {
    v.get("revisions").and_then(Value::as_array)?.first()
}

fn opt_f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn lag(v: &Value) -> String {
    match (
        v.get("lag_bytes").and_then(Value::as_u64),
        opt_f(v, "lag_seconds"),
    ) {
        (Some(b), Some(sec)) => format!("{} / {sec:.1}s", format_size(b)),
        (Some(b), None) => format_size(b),
        (None, Some(sec)) => format!("{sec:.1}s"),
        (None, None) => "-".into(),
    }
}

fn source_table(items: &[Value]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "STATE",
        "PRIMARY",
        "REPLAY LSN",
        "LAG",
        "REFRESH",
        "REVISIONS",
        "LAST REFRESH",
    ]);
    for v in items {
        let revs = v
            .get("revisions")
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(0);
        t.row(vec![
            s(v, "name").into(),
            s(v, "state").into(),
            s(v, "primary").into(),
            v.get("replay_lsn")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .into(),
            lag(v),
            s(v, "refresh").into(),
            format!("{revs} (keep {})", n(v, "retain")),
            v.get("last_refresh_unix")
                .and_then(Value::as_u64)
                .map(when)
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

fn revision_table(items: &[Value]) -> Table {
    let mut t = Table::new(&["REVISION", "LSN", "LAST COMMIT", "MADE", "MASKED", "CLONES"]);
    for r in items {
        let clones: Vec<&str> = r
            .get("clones")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        t.row(vec![
            s(r, "name").into(),
            s(r, "lsn").into(),
            r.get("replay_timestamp")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .into(),
            when(n(r, "created_unix")),
            if r.get("masked").and_then(Value::as_bool) == Some(true) {
                "yes".into()
            } else {
                "no".into()
            },
            if clones.is_empty() {
                "-".into()
            } else {
                clones.join(",")
            },
        ]);
    }
    t
}

pub fn list(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/sources")?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => source_table(v.as_array().map(Vec::as_slice).unwrap_or(&[])).print(),
    }
    Ok(())
}

pub fn show(c: &Client, out: Output, name: &str) -> Result<()> {
    let v = c.get(&format!("/v1/sources/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => {
            source_table(std::slice::from_ref(&v)).print();
            if let Some(t) = v.get("replay_timestamp").and_then(Value::as_str) {
                println!("last transaction replayed: committed {t}");
            }
            if let Some(e) = v.get("last_error").and_then(Value::as_str) {
                println!("last refresh failed: {e}");
            }
            println!();
            revision_table(
                v.get("revisions")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            )
            .print();
        }
    }
    Ok(())
}

pub fn refresh(c: &Client, out: Output, name: &str) -> Result<()> {
    let r = c.post(
        &format!("/v1/sources/{}/refresh", path_segment(name)),
        &json!({}),
    )?;
    match out {
        Output::Json => print_json(&r),
        Output::Table => println!(
            "revision {} at LSN {}; clone it with `blockd clone create {} NAME`",
            s(&r, "name"),
            s(&r, "lsn"),
            s(&r, "name")
        ),
    }
    Ok(())
}

pub fn delete(c: &Client, out: Output, name: &str) -> Result<()> {
    c.delete(&format!("/v1/sources/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&json!({ "deleted": name })),
        Output::Table => println!("deleted source {name} and its revisions"),
    }
    Ok(())
}
