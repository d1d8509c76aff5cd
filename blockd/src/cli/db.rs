//! `blockd image ...`, `blockd clone ...`, `blockd token ...`.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::client::{Client, path_segment};
use super::progress::Progress;
use super::table::Table;
use super::{Output, print_json};
use crate::control::model::{ImageDefinition, ImageRequest, ScriptBody};
use crate::size::format_size;

pub(super) fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

pub(super) fn when(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn left(v: &Value) -> String {
    match v.get("lifetime_left_seconds").and_then(Value::as_u64) {
        None => "forever".into(),
        Some(secs) => humantime::format_duration(Duration::from_secs(secs)).to_string(),
    }
}

/// Reads a script a definition file names (relative to that file) to send it inline.
pub(super) fn inline_script(def_file: &Path, script: Option<&str>) -> Result<Option<ScriptBody>> {
    let Some(p) = script else { return Ok(None) };
    let dir = def_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let path = dir.join(p);
    let content = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the script {} named in {}",
            path.display(),
            def_file.display()
        )
    })?;
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "script".into());
    Ok(Some(ScriptBody { name, content }))
}

/// Reads an image definition file and inlines its scripts; paths are relative to it.
pub fn read_definition(file: &Path) -> Result<ImageRequest> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let def: ImageDefinition = yaml_serde::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not a valid image definition: {e}. Fields: name, sourceType (empty|backup), \
             engine (postgres), version, size, lifetime, tags, preScript, postScript, backup, filesystem",
            file.display()
        )
    })?;
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let script = |p: &Option<String>| inline_script(file, p.as_deref());
    let backup = def.backup.as_ref().map(|b| {
        let p = dir.join(b);
        std::fs::canonicalize(&p).unwrap_or(p).display().to_string()
    });
    Ok(ImageRequest {
        name: def.name,
        source_type: def.source_type,
        engine: def.engine,
        version: def.version,
        size: def.size,
        lifetime: def.lifetime,
        tags: def.tags,
        pre_script: script(&def.pre_script)?,
        post_script: script(&def.post_script)?,
        backup,
        filesystem: def.filesystem,
    })
}

/// Follows a job (`GET /v1/jobs/ID`) until it ends: its steps on a spinner on a terminal,
/// as plain lines otherwise. Returns the finished job, or its error.
pub(super) fn wait_job(c: &Client, out: Output, job: u64, what: &str) -> Result<Value> {
    let mut pb = Progress::steps(what, out);
    let mut shown = 0;
    let result = loop {
        let j = c.get(&format!("/v1/jobs/{job}"))?;
        let steps: Vec<&str> = j
            .get("steps")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for step in &steps[shown.min(steps.len())..] {
            pb.step(step);
        }
        shown = steps.len();
        match s(&j, "state") {
            "running" => std::thread::sleep(Duration::from_millis(200)),
            "done" => break Ok(j),
            _ => break Err(anyhow!("{what} failed: {}", s(&j, "error"))),
        }
    };
    pb.finish();
    result
}

pub fn image_create(c: &Client, out: Output, file: &Path) -> Result<()> {
    let req = read_definition(file)?;
    let started = c.post("/v1/images", &serde_json::to_value(&req)?)?;
    let j = wait_job(
        c,
        out,
        n(&started, "job"),
        &format!("building image {}", req.name),
    )?;
    let img = c.get(&format!("/v1/images/{}", path_segment(&req.name)))?;
    match out {
        Output::Json => print_json(&img),
        Output::Table => println!(
            "image {} ready in {:.1}s ({} of data); clone it with `blockd clone create {} NAME`",
            req.name,
            j.get("seconds").and_then(Value::as_f64).unwrap_or(0.0),
            format_size(n(&img, "data_bytes")),
            req.name
        ),
    }
    Ok(())
}

fn image_table(items: &[Value]) -> Table {
    let mut t = Table::new(&[
        "NAME", "STATE", "ENGINE", "SIZE", "DATA", "SOURCE", "TAGS", "CREATED", "EXPIRES", "CLONES",
    ]);
    for i in items {
        let tags: Vec<&str> = i
            .get("tags")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let clones: Vec<&str> = i
            .get("clones")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        t.row(vec![
            s(i, "name").into(),
            s(i, "state").into(),
            format!("{} {}", s(i, "engine"), n(i, "version")),
            format_size(n(i, "size_bytes")),
            format_size(n(i, "data_bytes")),
            s(i, "source").into(),
            if tags.is_empty() {
                "-".into()
            } else {
                tags.join(",")
            },
            when(n(i, "created_unix")),
            i.get("expires_unix")
                .and_then(Value::as_u64)
                .map(when)
                .unwrap_or_else(|| "never".into()),
            if clones.is_empty() {
                "-".into()
            } else {
                clones.join(",")
            },
        ]);
    }
    t
}

pub fn image_list(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/images")?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => image_table(v.as_array().map(Vec::as_slice).unwrap_or(&[])).print(),
    }
    Ok(())
}

pub fn image_show(c: &Client, out: Output, name: &str) -> Result<()> {
    let v = c.get(&format!("/v1/images/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => image_table(std::slice::from_ref(&v)).print(),
    }
    Ok(())
}

pub fn image_delete(c: &Client, out: Output, name: &str) -> Result<()> {
    c.delete(&format!("/v1/images/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&json!({ "deleted": name })),
        Output::Table => println!("deleted image {name}"),
    }
    Ok(())
}

fn clone_table(items: &[Value]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "FROM",
        "STATE",
        "PORT",
        "UNIQUE",
        "LIFETIME LEFT",
        "OWNER",
        "CREATED",
    ]);
    for v in items {
        t.row(vec![
            s(v, "name").into(),
            s(v, "image").into(),
            s(v, "state").into(),
            n(v, "port").to_string(),
            format_size(n(v, "unique_bytes")),
            left(v),
            v.get("owner").and_then(Value::as_str).unwrap_or("-").into(),
            when(n(v, "created_unix")),
        ]);
    }
    t
}

fn print_clone(out: Output, v: &Value, verb: &str) {
    match out {
        Output::Json => print_json(v),
        Output::Table => {
            println!(
                "clone {} {verb} ({}, port {})",
                s(v, "name"),
                s(v, "state"),
                n(v, "port")
            );
            println!("  psql \"{}\"", s(v, "connection"));
        }
    }
}

pub fn clone_create(
    c: &Client,
    out: Output,
    image: &str,
    name: &str,
    port: Option<u16>,
    lifetime: Option<&str>,
) -> Result<()> {
    let v = c.post(
        "/v1/clones",
        &json!({ "image": image, "name": name, "port": port, "lifetime": lifetime }),
    )?;
    print_clone(out, &v, "created");
    Ok(())
}

pub fn clone_list(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/clones")?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => clone_table(v.as_array().map(Vec::as_slice).unwrap_or(&[])).print(),
    }
    Ok(())
}

pub fn clone_show(c: &Client, out: Output, name: &str) -> Result<()> {
    let v = c.get(&format!("/v1/clones/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => {
            clone_table(std::slice::from_ref(&v)).print();
            println!("connection: {}", s(&v, "connection"));
        }
    }
    Ok(())
}

pub fn clone_action(c: &Client, out: Output, name: &str, action: &str) -> Result<()> {
    let v = c.post(
        &format!("/v1/clones/{}/{action}", path_segment(name)),
        &json!({}),
    )?;
    let verb = match action {
        "stop" => "stopped",
        "start" => "started",
        "reset" => "reset to its image",
        other => other,
    };
    print_clone(out, &v, verb);
    Ok(())
}

pub fn clone_save(c: &Client, out: Output, name: &str, image: &str) -> Result<()> {
    let v = c.post(
        &format!("/v1/clones/{}/save", path_segment(name)),
        &json!({ "image": image }),
    )?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => println!(
            "saved clone {name} as image {image}; clone it with `blockd clone create {image} NAME`"
        ),
    }
    Ok(())
}

pub fn clone_delete(c: &Client, out: Output, name: &str) -> Result<()> {
    c.delete(&format!("/v1/clones/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&json!({ "deleted": name })),
        Output::Table => println!("deleted clone {name}"),
    }
    Ok(())
}

pub fn token_create(c: &Client, out: Output, name: &str, role: &str) -> Result<()> {
    if role != "admin" && role != "user" {
        bail!("role {role:?} is not known; use admin or user");
    }
    let v = c.post("/v1/tokens", &json!({ "name": name, "role": role }))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => {
            println!("{}", s(&v, "token"));
            eprintln!(
                "token {name} ({role}) created; it is shown only now. Use it with --token or BLOCKD_TOKEN."
            );
        }
    }
    Ok(())
}

pub fn token_list(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/tokens")?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => {
            let mut t = Table::new(&["NAME", "ROLE", "CREATED"]);
            for x in v.as_array().map(Vec::as_slice).unwrap_or(&[]) {
                t.row(vec![
                    s(x, "name").into(),
                    s(x, "role").into(),
                    when(n(x, "created_unix")),
                ]);
            }
            t.print();
        }
    }
    Ok(())
}

pub fn token_delete(c: &Client, out: Output, name: &str) -> Result<()> {
    c.delete(&format!("/v1/tokens/{}", path_segment(name)))?;
    match out {
        Output::Json => print_json(&json!({ "deleted": name })),
        Output::Table => println!("deleted token {name}"),
    }
    Ok(())
}
