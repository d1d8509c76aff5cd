//! `volume import` and `volume export`: raw images in and out through NBD, holes kept.
//!
//! Import reads only the data ranges of the file (SEEK_DATA/SEEK_HOLE) and skips all-zero
//! 4 KiB blocks, so neither holes nor zeroes take space in the store. Export asks the
//! server which ranges hold data (block status), reads only those, and leaves the rest of
//! the output file sparse.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::client::{Client, path_segment};
use super::nbd_client::{NbdClient, WINDOW};
use super::progress::Progress;
use super::{Output, print_json};
use crate::size::format_size;

/// Bytes read from the file or the server per request.
const CHUNK_BYTES: usize = 1 << 20;
const BLOCK_BYTES: usize = 4096;

fn endpoints(c: &Client) -> Result<(Option<String>, Option<String>)> {
    let info = c.get("/v1/info")?;
    let s = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_owned);
    Ok((s("nbd"), s("socket")))
}

/// The data ranges of a file, from SEEK_DATA/SEEK_HOLE (the whole file if unsupported).
fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor we own; the file is read only with pread.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r < 0 { None } else { Some(r as u64) }
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(pos, libc::SEEK_DATA) else {
            if out.is_empty()
                && pos == 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
            {
                return vec![(0, size)];
            }
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE).unwrap_or(size).min(size);
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    out
}

pub fn import(c: &Client, out: Output, name: &str, from: &Path) -> Result<()> {
    let f = File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file; give a raw disk image",
            from.display()
        );
    }
    let size = meta.len();
    if size == 0 {
        bail!("{} is empty; nothing to import", from.display());
    }
    let vol_size = size.next_multiple_of(512);
    c.post("/v1/volumes", &json!({ "name": name, "size": vol_size }))?;
    let result = (|| -> Result<u64> {
        let (tcp, socket) = endpoints(c)?;
        let mut nbd = NbdClient::connect(tcp.as_deref(), socket.as_deref(), name, false)?;
        let mut pb = Progress::bytes(size, &format!("importing {name}"), out);
        let mut written = 0u64;
        let mut done = 0u64;
        for (start, len) in data_ranges(&f, size) {
            pb.set_position(start);
            let end = start + len;
            let mut pos = start;
            while pos < end {
                // Read a window of chunks, then send their non-zero blocks.
                let mut bufs = Vec::new();
                while pos < end && bufs.len() < WINDOW {
                    let n = ((end - pos) as usize).min(CHUNK_BYTES);
                    let mut buf = vec![0u8; n];
                    f.read_exact_at(&mut buf, pos)
                        .with_context(|| format!("reading {}", from.display()))?;
                    bufs.push((pos, buf));
                    pos += n as u64;
                }
                let mut writes: Vec<(u64, &[u8])> = Vec::new();
                for (off, buf) in &bufs {
                    let mut i = 0;
                    while i < buf.len() {
                        let zero = |j: usize| {
                            buf[j..(j + BLOCK_BYTES).min(buf.len())]
                                .iter()
                                .all(|&b| b == 0)
                        };
                        if zero(i) {
                            i += BLOCK_BYTES;
                            continue;
                        }
                        let mut j = i;
                        while j < buf.len() && !zero(j) {
                            j += BLOCK_BYTES;
                        }
                        let j = j.min(buf.len());
                        writes.push((off + i as u64, &buf[i..j]));
                        written += (j - i) as u64;
                        i = j;
                    }
                }
                nbd.write_all(&writes)?;
                done = pos;
                pb.set_position(done);
            }
        }
        nbd.flush()?;
        nbd.disconnect();
        pb.finish();
        let _ = done;
        Ok(written)
    })();
    match result {
        Ok(written) => {
            match out {
                Output::Json => print_json(
                    &json!({ "imported": name, "size_bytes": vol_size, "data_bytes": written }),
                ),
                Output::Table => println!(
                    "imported {} into volume {name}: {} of data, {} sparse{}",
                    from.display(),
                    format_size(written),
                    format_size(vol_size - written.min(vol_size)),
                    if vol_size != size {
                        " (size rounded up to a multiple of 512 bytes)"
                    } else {
                        ""
                    }
                ),
            }
            Ok(())
        }
        Err(e) => {
            let cleanup = c.delete(&format!("/v1/volumes/{}", path_segment(name)));
            let note = match cleanup {
                Ok(_) => "the partial volume was removed".to_string(),
                Err(d) => format!(
                    "the partial volume {name} could not be removed ({d}); delete it by hand"
                ),
            };
            Err(anyhow!(
                "import of {} failed: {e:#}; {note}",
                from.display()
            ))
        }
    }
}

pub fn export(c: &Client, out: Output, name: &str, to: &Path, force: bool) -> Result<()> {
    if to.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            to.display()
        );
    }
    let (tcp, socket) = endpoints(c)?;
    let mut nbd = NbdClient::connect(tcp.as_deref(), socket.as_deref(), name, true)?;
    let size = nbd.size;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    f.set_len(size)?;
    let mut pb = Progress::bytes(size, &format!("exporting {name}"), out);
    let mut pos = 0u64;
    let mut data_bytes = 0u64;
    while pos < size {
        let ask = (size - pos).min(1 << 30) as u32;
        let extents = nbd.block_status(pos, ask)?;
        if extents.is_empty() {
            bail!("the server returned no block status at offset {pos}");
        }
        for (len, flags) in extents {
            let len = len.min(size - pos);
            if flags & nbd_proto::consts::STATE_ZERO == 0 {
                let mut reads = Vec::new();
                let mut o = pos;
                while o < pos + len {
                    let n = ((pos + len - o) as usize).min(CHUNK_BYTES);
                    reads.push((o, n));
                    o += n as u64;
                }
                for batch in reads.chunks(WINDOW) {
                    let bufs = nbd.read_all(batch)?;
                    for (&(off, _), buf) in batch.iter().zip(&bufs) {
                        // Leave all-zero blocks as holes.
                        for (k, block) in buf.chunks(BLOCK_BYTES).enumerate() {
                            if block.iter().any(|&b| b != 0) {
                                f.write_all_at(block, off + (k * BLOCK_BYTES) as u64)?;
                                data_bytes += block.len() as u64;
                            }
                        }
                        pb.set_position(off + buf.len() as u64);
                    }
                }
            }
            pos += len;
            pb.set_position(pos);
            if pos >= size {
                break;
            }
        }
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", to.display()))?;
    nbd.disconnect();
    pb.finish();
    match out {
        Output::Json => print_json(
            &json!({ "exported": name, "to": to.display().to_string(), "size_bytes": size, "data_bytes": data_bytes }),
        ),
        Output::Table => {
            println!(
                "exported {name} to {}: {} ({} of data)",
                to.display(),
                format_size(size),
                format_size(data_bytes)
            )
        }
    }
    Ok(())
}
