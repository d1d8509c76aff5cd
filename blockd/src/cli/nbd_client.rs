//! A small blocking NBD client for `volume import` and `volume export`, built on the
//! client side of `nbd-proto`. It pipelines batches of requests (replies may come back in
//! any order) and understands structured replies and `base:allocation` block status.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use nbd_proto::consts::*;
use nbd_proto::handshake::{self as hs, ClientFlags, GoRequest, Info, MetaContextRequest};
use nbd_proto::transmission::{self as tx, Command, ReplyKind, Request};

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// One reply message: a simple reply or one structured chunk.
struct Piece {
    cookie: u64,
    /// The last message of its reply.
    done: bool,
    /// Read data: (offset if the chunk names one, bytes).
    data: Option<(Option<u64>, Vec<u8>)>,
    /// A block status chunk's payload.
    status: Option<Vec<u8>>,
}

pub struct NbdClient {
    conn: Box<dyn Conn>,
    pub size: u64,
    pub flags: u16,
    structured: bool,
    meta_id: Option<u32>,
    next_cookie: u64,
}

/// Most requests sent before their replies are read.
pub const WINDOW: usize = 16;

impl NbdClient {
    /// Connects to `export` over the Unix socket if it exists locally, else over TCP.
    pub fn connect(
        tcp: Option<&str>,
        socket: Option<&str>,
        export: &str,
        want_status: bool,
    ) -> Result<NbdClient> {
        let conn: Box<dyn Conn> = match (socket, tcp) {
            (Some(s), _) if Path::new(s).exists() => Box::new(
                UnixStream::connect(s)
                    .with_context(|| format!("connecting to the NBD socket {s}"))?,
            ),
            (_, Some(addr)) => {
                let t = TcpStream::connect(addr)
                    .with_context(|| format!("connecting to NBD at {addr}"))?;
                t.set_nodelay(true).ok();
                Box::new(t)
            }
            _ => bail!(
                "the daemon serves NBD neither on TCP nor on a local Unix socket; start it with --listen or --socket"
            ),
        };
        let mut c = NbdClient {
            conn,
            size: 0,
            flags: 0,
            structured: false,
            meta_id: None,
            next_cookie: 1,
        };
        c.handshake(export, want_status)?;
        Ok(c)
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.conn
            .read_exact(&mut buf)
            .context("reading from the NBD server")?;
        Ok(buf)
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut out = Vec::new();
        hs::encode_option(&mut out, option, data);
        self.conn.write_all(&out)?;
        let mut replies = Vec::new();
        loop {
            let h = hs::decode_option_reply_header(&self.read_exact(OPTION_REPLY_HEADER_BYTES)?)?;
            if h.len > 1 << 20 {
                bail!("NBD option reply of {} bytes is too large", h.len);
            }
            let payload = self.read_exact(h.len as usize)?;
            let last = h.reply_type == REP_ACK || h.is_error();
            replies.push((h.reply_type, payload));
            if last {
                return Ok(replies);
            }
        }
    }

    fn handshake(&mut self, export: &str, want_status: bool) -> Result<()> {
        let flags = hs::decode_greeting(&self.read_exact(GREETING_BYTES)?)?;
        let mut out = Vec::new();
        hs::encode_client_flags(
            &mut out,
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: flags & FLAG_NO_ZEROES != 0,
            },
        );
        self.conn.write_all(&out)?;
        if want_status {
            let r = self.option(OPT_STRUCTURED_REPLY, &[])?;
            self.structured = r.last().is_some_and(|(t, _)| *t == REP_ACK);
            if self.structured {
                let req = MetaContextRequest {
                    export: export.into(),
                    queries: vec![META_BASE_ALLOCATION.into()],
                };
                for (t, p) in self.option(OPT_SET_META_CONTEXT, &req.encode())? {
                    if t == REP_META_CONTEXT {
                        self.meta_id = Some(hs::decode_rep_meta_context(&p)?.0);
                    }
                }
            }
        }
        let go = GoRequest {
            name: export.into(),
            info_requests: vec![],
        };
        for (t, p) in self.option(OPT_GO, &go.encode())? {
            match t {
                REP_INFO => {
                    if let Info::Export { size, flags } = hs::decode_info(&p)? {
                        self.size = size;
                        self.flags = flags;
                    }
                }
                REP_ACK => return Ok(()),
                _ => bail!(
                    "the server refused export {export}: {}",
                    String::from_utf8_lossy(&p)
                ),
            }
        }
        bail!("the server did not acknowledge export {export}")
    }

    fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut out = Vec::with_capacity(REQUEST_BYTES + data.len());
        tx::encode_request(
            &mut out,
            &Request {
                flags,
                command,
                cookie,
                offset,
                len,
            },
        );
        out.extend_from_slice(data);
        self.conn
            .write_all(&out)
            .context("sending to the NBD server")?;
        Ok(cookie)
    }

    /// Reads the next reply message (a simple reply, or one structured chunk). For simple
    /// replies to reads, `read_len(cookie)` says how many data bytes follow.
    fn next_piece(&mut self, read_len: impl Fn(u64) -> Option<usize>) -> Result<Piece> {
        let head = self.read_exact(4)?;
        if tx::decode_reply_kind(&head)? == ReplyKind::Simple {
            let mut b = head;
            b.extend(self.read_exact(SIMPLE_REPLY_BYTES - 4)?);
            let r = tx::decode_simple_reply(&b)?;
            if r.error != 0 {
                bail!("the NBD server answered with error {}", r.error);
            }
            let data = match read_len(r.cookie) {
                Some(n) => Some(self.read_exact(n)?),
                None => None,
            };
            return Ok(Piece {
                cookie: r.cookie,
                done: true,
                data: data.map(|d| (None, d)),
                status: None,
            });
        }
        let mut b = head;
        b.extend(self.read_exact(CHUNK_HEADER_BYTES - 4)?);
        let h = tx::decode_chunk_header(&b)?;
        if h.len > MAX_PAYLOAD_BYTES + (1 << 20) {
            bail!("NBD reply chunk of {} bytes is too large", h.len);
        }
        let payload = self.read_exact(h.len as usize)?;
        let mut piece = Piece {
            cookie: h.cookie,
            done: h.is_done(),
            data: None,
            status: None,
        };
        match h.ty {
            REPLY_TYPE_OFFSET_DATA => {
                let (off, data) = tx::decode_offset_data(&payload)?;
                piece.data = Some((Some(off), data.to_vec()));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let (off, len) = tx::decode_offset_hole(&payload)?;
                piece.data = Some((Some(off), vec![0u8; len as usize]));
            }
            REPLY_TYPE_BLOCK_STATUS => piece.status = Some(payload),
            REPLY_TYPE_NONE => {}
            t if h.is_error() => {
                let e = tx::decode_error_chunk(t, &payload)?;
                bail!(
                    "the NBD server answered with error {}: {}",
                    e.error,
                    e.message
                );
            }
            t => bail!("unexpected NBD reply chunk type {t}"),
        }
        Ok(piece)
    }

    /// Waits until every cookie in `pending` has its final reply.
    fn complete(&mut self, pending: &mut HashMap<u64, usize>) -> Result<()> {
        while !pending.is_empty() {
            let p = self.next_piece(|_| None)?;
            if p.done {
                pending.remove(&p.cookie);
            }
        }
        Ok(())
    }

    /// Writes every (offset, data) with up to [`WINDOW`] requests in flight.
    pub fn write_all(&mut self, writes: &[(u64, &[u8])]) -> Result<()> {
        for batch in writes.chunks(WINDOW) {
            let mut pending = HashMap::new();
            for (off, data) in batch {
                let len = u32::try_from(data.len()).map_err(|_| anyhow!("write too large"))?;
                pending.insert(self.send(Command::Write, 0, *off, len, data)?, 0);
            }
            self.complete(&mut pending)?;
        }
        Ok(())
    }

    /// Reads every (offset, len) into one buffer each, up to [`WINDOW`] in flight.
    pub fn read_all(&mut self, reads: &[(u64, usize)]) -> Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = reads.iter().map(|&(_, n)| vec![0u8; n]).collect();
        for (bi, batch) in reads.chunks(WINDOW).enumerate() {
            let mut by_cookie: HashMap<u64, (usize, u64, usize)> = HashMap::new();
            for (k, &(off, len)) in batch.iter().enumerate() {
                let len32 = u32::try_from(len).map_err(|_| anyhow!("read too large"))?;
                let c = self.send(Command::Read, 0, off, len32, &[])?;
                by_cookie.insert(c, (bi * WINDOW + k, off, len));
            }
            let mut open = by_cookie.len();
            while open > 0 {
                let p = self.next_piece(|c| by_cookie.get(&c).map(|&(_, _, n)| n))?;
                let &(i, off, len) = by_cookie
                    .get(&p.cookie)
                    .ok_or_else(|| anyhow!("reply for an unknown request"))?;
                if let Some((at, d)) = p.data {
                    let at = at.unwrap_or(off);
                    let rel = at
                        .checked_sub(off)
                        .map(|a| a as usize)
                        .filter(|a| a + d.len() <= len);
                    let rel = rel.ok_or_else(|| {
                        anyhow!("the server sent data outside the requested range")
                    })?;
                    out[i][rel..rel + d.len()].copy_from_slice(&d);
                }
                if p.done {
                    open -= 1;
                }
            }
        }
        Ok(out)
    }

    /// Block status of up to `len` bytes at `offset`: (length, flags) extents.
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<(u64, u32)>> {
        if self.meta_id.is_none() {
            return Ok(vec![(u64::from(len), 0)]);
        }
        let cookie = self.send(Command::BlockStatus, 0, offset, len, &[])?;
        let mut status = None;
        loop {
            let p = self.next_piece(|_| None)?;
            if p.cookie == cookie && p.status.is_some() {
                status = p.status;
            }
            if p.cookie == cookie && p.done {
                break;
            }
        }
        let payload = status.ok_or_else(|| anyhow!("block status reply without extents"))?;
        let (_, ext) = tx::decode_block_status(&payload)?;
        Ok(ext
            .into_iter()
            .map(|e| (u64::from(e.len), e.flags))
            .collect())
    }

    pub fn flush(&mut self) -> Result<()> {
        let mut pending = HashMap::from([(self.send(Command::Flush, 0, 0, 0, &[])?, 0)]);
        self.complete(&mut pending)
    }

    pub fn disconnect(mut self) {
        let _ = self.send(Command::Disc, 0, 0, 0, &[]);
    }
}
