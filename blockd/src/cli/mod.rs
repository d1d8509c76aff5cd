//! The client subcommands: each is a call to the daemon's REST API plus formatting.

pub mod client;
pub mod db;
pub mod nbd_client;
pub mod progress;
pub mod source;
pub mod table;
pub mod transfer;

use anyhow::Result;
use serde_json::{Value, json};

use crate::size::{format_size, parse_size};
use client::{Client, path_segment};
use table::Table;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn volume_table(items: &[Value]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "SIZE",
        "UNIQUE",
        "SHARED",
        "ORIGIN",
        "CONNECTIONS",
        "CREATED",
    ]);
    for v in items {
        t.row(vec![
            str_of(v, "name").to_string(),
            format_size(u64_of(v, "size_bytes")),
            format_size(u64_of(v, "unique_bytes")),
            format_size(u64_of(v, "shared_bytes")),
            or_dash(str_of(v, "origin")),
            u64_of(v, "nbd_connections").to_string(),
            str_of(v, "created").to_string(),
        ]);
    }
    t
}

fn snapshot_table(items: &[Value]) -> Table {
    let mut t = Table::new(&["NAME", "SIZE", "DATA", "UNIQUE", "CLONES", "CREATED"]);
    for s in items {
        let clones: Vec<&str> = s
            .get("clones")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        t.row(vec![
            str_of(s, "name").to_string(),
            format_size(u64_of(s, "size_bytes")),
            format_size(u64_of(s, "data_bytes")),
            format_size(u64_of(s, "unique_bytes")),
            or_dash(&clones.join(",")),
            str_of(s, "created").to_string(),
        ]);
    }
    t
}

fn print(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => print_json(v),
        Output::Table => table(v),
    }
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub fn volume_create(c: &Client, out: Output, name: &str, size: &str) -> Result<()> {
    let bytes = parse_size(size).map_err(anyhow::Error::msg)?;
    let v = c.post("/v1/volumes", &json!({ "name": name, "size": bytes }))?;
    print(out, &v, |v| {
        println!(
            "created volume {} ({}, sparse); export name {}",
            str_of(v, "name"),
            format_size(u64_of(v, "size_bytes")),
            str_of(v, "name")
        )
    });
    Ok(())
}

pub fn volume_clone(c: &Client, out: Output, source: &str, name: &str) -> Result<()> {
    let v = c.post("/v1/volumes", &json!({ "name": name, "from": source }))?;
    print(out, &v, |v| {
        println!(
            "created clone {} of {}",
            str_of(v, "name"),
            str_of(v, "clone_of")
        )
    });
    Ok(())
}

pub fn volume_list(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/volumes")?;
    print(out, &v, |v| volume_table(items(v)).print());
    Ok(())
}

pub fn volume_show(c: &Client, out: Output, name: &str) -> Result<()> {
    let v = c.get(&format!("/v1/volumes/{}", path_segment(name)))?;
    print(out, &v, |v| volume_table(std::slice::from_ref(v)).print());
    Ok(())
}

pub fn volume_delete(c: &Client, out: Output, name: &str) -> Result<()> {
    c.delete(&format!("/v1/volumes/{}", path_segment(name)))?;
    print(out, &json!({ "deleted": name }), |_| {
        println!("deleted volume {name}")
    });
    Ok(())
}

pub fn volume_reset(c: &Client, out: Output, name: &str) -> Result<()> {
    let v = c.post(
        &format!("/v1/volumes/{}/reset", path_segment(name)),
        &json!({}),
    )?;
    print(out, &v, |v| {
        let origin = str_of(v, "origin");
        if origin.is_empty() {
            println!("reset volume {name}: it has no origin snapshot, so it is empty again");
        } else {
            println!("reset volume {name} to {origin}");
        }
    });
    Ok(())
}

pub fn snapshot_create(c: &Client, out: Output, name: &str) -> Result<()> {
    let s = c.post("/v1/snapshots", &json!({ "name": name }))?;
    print(out, &s, |s| {
        println!(
            "created snapshot {} ({} of data); export name {}",
            str_of(s, "name"),
            format_size(u64_of(s, "data_bytes")),
            str_of(s, "name")
        )
    });
    Ok(())
}

pub fn snapshot_list(c: &Client, out: Output, volume: Option<&str>) -> Result<()> {
    let path = match volume {
        Some(v) => format!("/v1/snapshots?volume={}", path_segment(v)),
        None => "/v1/snapshots".to_string(),
    };
    let v = c.get(&path)?;
    print(out, &v, |v| snapshot_table(items(v)).print());
    Ok(())
}

pub fn snapshot_delete(c: &Client, out: Output, name: &str, defer: bool) -> Result<()> {
    let path = format!(
        "/v1/snapshots/{}{}",
        path_segment(name),
        if defer { "?defer=true" } else { "" }
    );
    let v = c.delete(&path)?;
    print(out, &v, |v| {
        match v.get("deferred_until_deleted").and_then(Value::as_array) {
            Some(clones) => {
                let names: Vec<&str> = clones.iter().filter_map(Value::as_str).collect();
                println!(
                    "snapshot {name} is hidden; its space is freed once these clones are deleted: {}",
                    names.join(", ")
                )
            }
            None => println!("deleted snapshot {name}"),
        }
    });
    Ok(())
}

pub fn df(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/df")?;
    print(out, &v, |v| {
        let logical = u64_of(v, "logical_bytes");
        let referenced = u64_of(v, "referenced_bytes");
        let stored = u64_of(v, "stored_bytes");
        let physical = u64_of(v, "physical_bytes");
        let mut t = Table::new(&["", "BYTES", ""]);
        t.row(vec![
            "logical (volume sizes)".into(),
            format_size(logical),
            String::new(),
        ]);
        t.row(vec![
            "referenced (data as volumes and snapshots see it)".into(),
            format_size(referenced),
            String::new(),
        ]);
        t.row(vec![
            "stored (live data in segments)".into(),
            format_size(stored),
            String::new(),
        ]);
        let saved = if physical > 0 && referenced > 0 {
            format!("{:.1}x", referenced as f64 / physical as f64)
        } else {
            "-".into()
        };
        t.row(vec![
            "physical (disk used by segments)".into(),
            format_size(physical),
            format!("sharing saves {saved}"),
        ]);
        t.print();
        println!(
            "{} volumes, {} snapshots ({} hidden), {} segments",
            u64_of(v, "volumes"),
            u64_of(v, "snapshots"),
            u64_of(v, "hidden_snapshots"),
            u64_of(v, "segments")
        );
    });
    Ok(())
}

pub fn compact(c: &Client, out: Output) -> Result<()> {
    let v = c.post("/v1/compact", &json!({}))?;
    print(out, &v, |v| {
        println!(
            "compaction: {} segments rewritten ({} copied), {} removed, {} punched, {} freed",
            u64_of(v, "segments_rewritten"),
            format_size(u64_of(v, "bytes_copied")),
            u64_of(v, "segments_removed"),
            format_size(u64_of(v, "bytes_punched")),
            format_size(u64_of(v, "bytes_reclaimed"))
        )
    });
    Ok(())
}
