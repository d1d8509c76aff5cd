//! The client subcommands: each is a call to the daemon's REST API plus formatting.

pub mod client;
pub mod table;

use anyhow::Result;
use serde_json::{Value, json};

use crate::size::{format_size, parse_size};
use client::Client;
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

fn volume_table(items: &[Value]) -> Table {
    let mut t = Table::new(&["NAME", "SIZE", "ALLOCATED", "CONNECTIONS", "CREATED"]);
    for v in items {
        t.row(vec![
            str_of(v, "name").to_string(),
            format_size(u64_of(v, "size_bytes")),
            format_size(u64_of(v, "allocated_bytes")),
            u64_of(v, "nbd_connections").to_string(),
            str_of(v, "created").to_string(),
        ]);
    }
    t
}

pub fn volume_create(c: &Client, out: Output, name: &str, size: &str) -> Result<()> {
    let bytes = parse_size(size).map_err(anyhow::Error::msg)?;
    let v = c.post("/v1/volumes", &json!({ "name": name, "size": bytes }))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => println!(
            "created volume {} ({}); export it as nbd://HOST:PORT/{}",
            str_of(&v, "name"),
            format_size(u64_of(&v, "size_bytes")),
            str_of(&v, "name")
        ),
    }
    Ok(())
}

pub fn volume_list(c: &Client, out: Output) -> Result<()> {
    let v = c.get("/v1/volumes")?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => volume_table(v.as_array().map(Vec::as_slice).unwrap_or(&[])).print(),
    }
    Ok(())
}

pub fn volume_show(c: &Client, out: Output, name: &str) -> Result<()> {
    let v = c.get(&format!("/v1/volumes/{}", client::path_segment(name)))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => volume_table(std::slice::from_ref(&v)).print(),
    }
    Ok(())
}

pub fn volume_delete(c: &Client, out: Output, name: &str) -> Result<()> {
    c.delete(&format!("/v1/volumes/{}", client::path_segment(name)))?;
    match out {
        Output::Json => print_json(&json!({ "deleted": name })),
        Output::Table => println!("deleted volume {name}"),
    }
    Ok(())
}
