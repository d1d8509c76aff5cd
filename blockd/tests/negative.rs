//! Bad input from NBD clients: every malformed or out-of-range request gets the answer the
//! NBD spec asks for, and the server neither hangs, crashes, nor lets one bad client
//! disturb another.
//!
//! Two kinds of client: libnbd (from the system Python, with strict mode off so it sends
//! requests it would normally refuse) and a raw client speaking the wire format through
//! nbd-proto's client-side encoders and decoders, for what no real client library sends.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, SYSTEM_PYTHON, pattern, run_with_timeout};
use nbd_proto::consts::*;
use nbd_proto::handshake::{self as hs, GoRequest, Info, MetaContextRequest, OptionReplyHeader};
use nbd_proto::transmission::{self as tx, ChunkHeader, Command, Request, SimpleReply};

/// Every socket read and write in these tests gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to close a connection it should close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const VOLUME: &str = "vol";
const VOLUME_SIZE: u64 = 4 << 20;

fn daemon() -> Daemon {
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    d
}

// ---------------------------------------------------------------- raw client

/// A client that speaks the wire format byte by byte.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and reads the server greeting; returns the client and the handshake flags.
    fn connect(d: &Daemon) -> (Raw, u16) {
        let s = TcpStream::connect(&d.nbd).expect("connect to blockd");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        let _ = s.set_nodelay(true);
        let mut raw = Raw { s };
        let greeting = raw.read_n(GREETING_BYTES);
        let flags = hs::decode_greeting(&greeting).expect("valid greeting");
        (raw, flags)
    }

    /// Connects, sends FIXED_NEWSTYLE | NO_ZEROES, and is ready for options.
    fn negotiating(d: &Daemon) -> Raw {
        let (mut raw, flags) = Raw::connect(d);
        assert_eq!(
            flags,
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "blockd offers fixed newstyle and no-zeroes"
        );
        raw.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        raw
    }

    /// A client in the transmission phase on [`VOLUME`], with or without structured replies.
    fn transmission(d: &Daemon, structured: bool) -> Raw {
        let mut raw = Raw::negotiating(d);
        if structured {
            let replies = raw.ask(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(types(&replies), vec![REP_ACK]);
        }
        raw.go(VOLUME);
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to blockd");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.s
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("reading {n} bytes from blockd: {e}"));
        buf
    }

    fn client_flags(&mut self, bits: u32) {
        self.send(&bits.to_be_bytes());
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        hs::encode_option(&mut out, option, data);
        self.send(&out);
    }

    fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let header = self.read_n(OPTION_REPLY_HEADER_BYTES);
        let header = hs::decode_option_reply_header(&header).expect("option reply magic");
        assert!(
            header.len <= 64 * 1024,
            "option reply of {} bytes is unreasonably long",
            header.len
        );
        let payload = self.read_n(header.len as usize);
        (header, payload)
    }

    /// Sends an option and reads its replies up to the final one (ACK or an error). Every
    /// reply must name the option it answers.
    fn ask(&mut self, option: u32, data: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        self.option(option, data);
        let mut replies = Vec::new();
        loop {
            let (header, payload) = self.option_reply();
            assert_eq!(header.option, option, "reply names the option it answers");
            let last = header.reply_type == REP_ACK || header.is_error();
            replies.push((header, payload));
            if last {
                return replies;
            }
            assert!(replies.len() < 100, "endless option replies");
        }
    }

    /// NBD_OPT_GO on `name`; asserts it succeeds and returns (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let go = GoRequest {
            name: name.into(),
            info_requests: vec![INFO_BLOCK_SIZE],
        };
        let replies = self.ask(OPT_GO, &go.encode());
        let last = &replies[replies.len() - 1];
        assert_eq!(
            last.0.reply_type,
            REP_ACK,
            "GO {name} failed: {}",
            String::from_utf8_lossy(&last.1)
        );
        assert!(last.1.is_empty(), "ACK to GO must have no payload");
        let mut export = None;
        for (h, payload) in &replies[..replies.len() - 1] {
            assert_eq!(h.reply_type, REP_INFO);
            if let Info::Export { size, flags } = hs::decode_info(payload).expect("valid info") {
                export = Some((size, flags));
            }
        }
        export.expect("GO replies include NBD_INFO_EXPORT")
    }

    /// Asserts that the server closes the connection without sending anything more.
    fn assert_closed(&mut self, what: &str) {
        self.s
            .set_read_timeout(Some(CLOSE_TIMEOUT))
            .expect("read timeout");
        let mut buf = [0u8; 4096];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{what}: expected the server to close, got {n} more bytes: {:02x?}",
                &buf[..n.min(64)]
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server did not close the connection within {CLOSE_TIMEOUT:?}")
            }
            Err(e) => panic!("{what}: unexpected error waiting for the close: {e}"),
        }
    }

    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&encode_req(command, flags, cookie, offset, len, &[]));
    }

    fn simple_reply(&mut self) -> SimpleReply {
        let header = self.read_n(SIMPLE_REPLY_BYTES);
        tx::decode_simple_reply(&header).expect("simple reply")
    }

    /// Reads structured chunks until one has the DONE flag.
    fn structured_reply(&mut self) -> Vec<(ChunkHeader, Vec<u8>)> {
        let mut chunks = Vec::new();
        loop {
            let header = self.read_n(CHUNK_HEADER_BYTES);
            let header = tx::decode_chunk_header(&header).expect("structured reply chunk");
            let payload = self.read_n(header.len as usize);
            let done = header.is_done();
            chunks.push((header, payload));
            if done {
                return chunks;
            }
        }
    }

    /// Writes `data` at `offset` and waits for success (simple replies).
    fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send(&encode_req(
            CMD_WRITE,
            0,
            cookie,
            offset,
            data.len() as u32,
            data,
        ));
        let r = self.simple_reply();
        assert_eq!((r.cookie, r.error), (cookie, 0), "write at {offset}");
    }

    /// Reads `len` bytes at `offset` (simple replies).
    fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, 0, cookie, offset, len);
        let r = self.simple_reply();
        assert_eq!((r.cookie, r.error), (cookie, 0), "read at {offset}");
        self.read_n(len as usize)
    }

    /// A write and a read-back on a simple-reply connection, proving it is still usable.
    fn assert_usable(&mut self, seed: u64) {
        let data = pattern(seed, 4096);
        self.write_ok(seed, 8192, &data);
        assert_eq!(
            self.read_ok(seed + 1, 8192, 4096),
            data,
            "read-back after a write"
        );
    }
}

fn encode_req(
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(REQUEST_BYTES + data.len());
    tx::encode_request(
        &mut out,
        &Request {
            flags,
            command: Command::from_wire(command),
            cookie,
            offset,
            len,
        },
    );
    out.extend_from_slice(data);
    out
}

fn types(replies: &[(OptionReplyHeader, Vec<u8>)]) -> Vec<u32> {
    replies.iter().map(|(h, _)| h.reply_type).collect()
}

fn go_data(name: &str) -> Vec<u8> {
    GoRequest {
        name: name.into(),
        info_requests: vec![],
    }
    .encode()
}

// ---------------------------------------------------------------- libnbd scripts

fn py_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

fn run_python(d: &Daemon, script: &str, args: &[&str]) -> String {
    common::require(SYSTEM_PYTHON);
    let mut c = std::process::Command::new(SYSTEM_PYTHON);
    c.arg(py_script(script)).args(args);
    let out = run_with_timeout(&mut c, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed with {}\nstdout:\n{stdout}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    stdout
}

#[test]
fn libnbd_bad_requests_get_the_spec_errno_and_the_connection_stays_usable() {
    let d = Daemon::start();
    // Larger than the 32 MiB maximum payload, so oversize requests are in bounds.
    d.create_volume(VOLUME, "64M");
    let out = run_python(&d, "negative.py", &[&d.uri(VOLUME)]);
    assert!(out.contains("all checks passed"), "{out}");
}

#[test]
fn libnbd_option_mode_errors_leave_the_handshake_usable() {
    let d = daemon();
    let out = run_python(&d, "opt_mode.py", &[&d.uri(VOLUME), VOLUME]);
    assert!(out.contains("all checks passed"), "{out}");
}

// ---------------------------------------------------------------- handshake

#[test]
fn unknown_option_gets_err_unsup_and_the_next_option_works() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    for option in [0x1234_5678, OPT_PEEK_EXPORT, u32::MAX] {
        let replies = c.ask(option, b"some data the server cannot understand");
        assert_eq!(types(&replies), vec![REP_ERR_UNSUP], "option {option:#x}");
    }
    let replies = c.ask(OPT_LIST, &[]);
    assert_eq!(types(&replies), vec![REP_SERVER, REP_ACK]);
    let (name, _) = hs::decode_rep_server(&replies[0].1).expect("server reply");
    assert_eq!(name, VOLUME);
    let (size, _) = c.go(VOLUME);
    assert_eq!(size, VOLUME_SIZE);
    c.assert_usable(1);
}

#[test]
fn qemu_sequence_extended_headers_refused_then_structured_replies_and_block_status() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    // qemu >= 8.2 opens with EXTENDED_HEADERS and falls back when it is refused.
    assert_eq!(
        types(&c.ask(OPT_EXTENDED_HEADERS, &[])),
        vec![REP_ERR_UNSUP]
    );
    assert_eq!(types(&c.ask(OPT_STRUCTURED_REPLY, &[])), vec![REP_ACK]);
    let meta = MetaContextRequest {
        export: VOLUME.into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    };
    let replies = c.ask(OPT_SET_META_CONTEXT, &meta.encode());
    assert_eq!(types(&replies), vec![REP_META_CONTEXT, REP_ACK]);
    let (context, name) = hs::decode_rep_meta_context(&replies[0].1).expect("meta context");
    assert_eq!(name, META_BASE_ALLOCATION);
    let (size, flags) = c.go(VOLUME);
    assert_eq!(size, VOLUME_SIZE);
    assert_ne!(
        flags & FLAG_SEND_DF,
        0,
        "DF is offered with structured replies"
    );

    // Block status the way qemu asks: always REQ_ONE.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 1, 0, 1 << 20);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 1);
    let (h, payload) = &chunks[0];
    assert_eq!((h.cookie, h.ty), (1, REPLY_TYPE_BLOCK_STATUS));
    let (id, extents) = tx::decode_block_status(payload).expect("block status payload");
    assert_eq!(id, context, "block status uses the negotiated context id");
    assert_eq!(extents.len(), 1, "REQ_ONE gives exactly one extent");
    assert!(extents[0].len <= 1 << 20);

    // Reads come back as structured chunks.
    c.request(CMD_READ, 0, 2, 0, 4096);
    let chunks = c.structured_reply();
    let data: usize = chunks
        .iter()
        .filter(|(h, _)| h.ty == REPLY_TYPE_OFFSET_DATA)
        .map(|(_, p)| p.len() - 8)
        .sum();
    let holes: u32 = chunks
        .iter()
        .filter(|(h, _)| h.ty == REPLY_TYPE_OFFSET_HOLE)
        .map(|(_, p)| tx::decode_offset_hole(p).expect("hole").1)
        .sum();
    assert_eq!(data as u64 + u64::from(holes), 4096);
    assert!(chunks.iter().all(|(h, _)| h.cookie == 2 && !h.is_error()));
}

#[test]
fn oversized_option_data_gets_err_too_big_and_negotiation_continues() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    let mut big = go_data(VOLUME);
    big.resize(MAX_OPTION_DATA_BYTES as usize + 4096, 0);
    let replies = c.ask(OPT_GO, &big);
    assert_eq!(types(&replies), vec![REP_ERR_TOO_BIG]);
    let replies = c.ask(OPT_LIST, &[]);
    assert_eq!(types(&replies), vec![REP_SERVER, REP_ACK]);
    c.go(VOLUME);
    c.assert_usable(2);
}

#[test]
fn malformed_go_gets_err_invalid_and_negotiation_continues() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    let mut bad_cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Name length pointing past the option data.
    let mut data = 100u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"vol\0\0\0");
    bad_cases.push(("name length > optlen - 6", data));
    // Too short to hold even the name length.
    bad_cases.push(("two bytes", vec![0, 0]));
    // Info request count that does not match the data.
    let mut data = go_data(VOLUME);
    let n = data.len();
    data[n - 2..].copy_from_slice(&5u16.to_be_bytes());
    bad_cases.push(("info count 5 without requests", data));
    // A name that is not UTF-8.
    let mut data = 2u32.to_be_bytes().to_vec();
    data.extend_from_slice(&[0xff, 0xfe, 0, 0]);
    bad_cases.push(("invalid UTF-8 name", data));
    for (what, data) in bad_cases {
        let replies = c.ask(OPT_GO, &data);
        assert_eq!(types(&replies), vec![REP_ERR_INVALID], "{what}");
        assert!(
            !replies[0].1.is_empty(),
            "{what}: the error carries a message"
        );
    }
    c.go(VOLUME);
    c.assert_usable(3);
}

#[test]
fn list_with_data_gets_err_invalid_and_negotiation_continues() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    assert_eq!(types(&c.ask(OPT_LIST, b"x")), vec![REP_ERR_INVALID]);
    assert_eq!(
        types(&c.ask(OPT_STRUCTURED_REPLY, b"xy")),
        vec![REP_ERR_INVALID]
    );
    assert_eq!(types(&c.ask(OPT_LIST, &[])), vec![REP_SERVER, REP_ACK]);
    c.go(VOLUME);
    c.assert_usable(4);
}

#[test]
fn client_flags_with_unknown_bits_close_the_connection() {
    let d = daemon();
    for bits in [
        FLAG_C_FIXED_NEWSTYLE | 1 << 2,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | 1 << 31,
        u32::MAX,
    ] {
        let (mut c, _) = Raw::connect(&d);
        c.client_flags(bits);
        c.assert_closed(&format!("client flags {bits:#x}"));
    }
    // The server is still fine for a well-behaved client.
    let mut c = Raw::transmission(&d, false);
    c.assert_usable(5);
}

#[test]
fn export_name_of_an_unknown_export_closes_without_a_reply() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    c.option(OPT_EXPORT_NAME, b"no-such-volume");
    c.assert_closed("EXPORT_NAME of an unknown export");
}

#[test]
fn export_name_reply_has_124_zero_bytes_unless_no_zeroes_was_negotiated() {
    let d = daemon();
    for no_zeroes in [false, true] {
        let (mut c, _) = Raw::connect(&d);
        let mut bits = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            bits |= FLAG_C_NO_ZEROES;
        }
        c.client_flags(bits);
        c.option(OPT_EXPORT_NAME, VOLUME.as_bytes());
        let reply = c.read_n(EXPORT_NAME_REPLY_BYTES);
        let (size, flags) = hs::decode_export_name_reply(&reply).expect("export name reply");
        assert_eq!(size, VOLUME_SIZE);
        assert_ne!(flags & FLAG_HAS_FLAGS, 0);
        if !no_zeroes {
            let pad = c.read_n(EXPORT_NAME_ZERO_PAD_BYTES);
            assert!(pad.iter().all(|&b| b == 0), "padding is zeroes");
        }
        // The very next bytes are the reply to a request: nothing more or less was sent.
        c.assert_usable(6);
    }
}

#[test]
fn abort_is_acknowledged_then_the_server_closes() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    assert_eq!(types(&c.ask(OPT_LIST, &[])), vec![REP_SERVER, REP_ACK]);
    let replies = c.ask(OPT_ABORT, &[]);
    assert_eq!(types(&replies), vec![REP_ACK]);
    assert!(replies[0].1.is_empty());
    c.assert_closed("after ABORT");
}

#[test]
fn go_for_an_unknown_export_gets_err_unknown_and_negotiation_continues() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    for name in ["no-such-volume", ""] {
        let replies = c.ask(OPT_GO, &go_data(name));
        assert_eq!(types(&replies), vec![REP_ERR_UNKNOWN], "GO {name:?}");
        assert!(!replies[0].1.is_empty(), "the error says what is wrong");
        let replies = c.ask(OPT_INFO, &go_data(name));
        assert_eq!(types(&replies), vec![REP_ERR_UNKNOWN], "INFO {name:?}");
    }
    c.go(VOLUME);
    c.assert_usable(7);
}

#[test]
fn exports_in_meta_context_options_must_exist_and_structured_replies_come_first() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    let meta = MetaContextRequest {
        export: VOLUME.into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    };
    // Before STRUCTURED_REPLY a context cannot be selected.
    assert_eq!(
        types(&c.ask(OPT_SET_META_CONTEXT, &meta.encode())),
        vec![REP_ERR_INVALID]
    );
    assert_eq!(types(&c.ask(OPT_STRUCTURED_REPLY, &[])), vec![REP_ACK]);
    let unknown = MetaContextRequest {
        export: "no-such-volume".into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    };
    assert_eq!(
        types(&c.ask(OPT_LIST_META_CONTEXT, &unknown.encode())),
        vec![REP_ERR_UNKNOWN]
    );
    // Trailing garbage after the queries.
    let mut bad = meta.encode();
    bad.extend_from_slice(b"junk");
    assert_eq!(
        types(&c.ask(OPT_SET_META_CONTEXT, &bad)),
        vec![REP_ERR_INVALID]
    );
    assert_eq!(
        types(&c.ask(OPT_SET_META_CONTEXT, &meta.encode())),
        vec![REP_META_CONTEXT, REP_ACK]
    );
    c.go(VOLUME);
}

// ---------------------------------------------------------------- transmission

#[test]
fn a_request_with_bad_magic_disconnects() {
    let d = daemon();
    for magic in [0xdead_beef_u32, EXTENDED_REQUEST_MAGIC, SIMPLE_REPLY_MAGIC] {
        let mut c = Raw::transmission(&d, false);
        c.assert_usable(8);
        let mut req = encode_req(CMD_READ, 0, 9, 0, 512, &[]);
        req[..4].copy_from_slice(&magic.to_be_bytes());
        c.send(&req);
        c.assert_closed(&format!("request magic {magic:#x}"));
    }
    assert!(
        d.log().contains("protocol violation"),
        "the daemon logs why it dropped the client:\n{}",
        d.log()
    );
}

#[test]
fn unknown_command_gets_einval_and_the_connection_stays_usable() {
    let d = daemon();
    let mut c = Raw::transmission(&d, false);
    for (cookie, command) in [(10u64, 8u16), (11, 99), (12, u16::MAX)] {
        c.request(command, 0, cookie, 0, 512);
        let r = c.simple_reply();
        assert_eq!((r.cookie, r.error), (cookie, EINVAL), "command {command}");
        c.assert_usable(cookie * 100);
    }

    // With structured replies the error comes as an error chunk.
    let mut c = Raw::transmission(&d, true);
    c.request(99, 0, 13, 0, 512);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 1);
    let (h, payload) = &chunks[0];
    assert_eq!(h.cookie, 13);
    assert!(h.is_error() && h.is_done());
    let err = tx::decode_error_chunk(h.ty, payload).expect("error chunk");
    assert_eq!(err.error, EINVAL);
    // Still usable: a write is acknowledged with a simple reply.
    c.send(&encode_req(CMD_WRITE, 0, 14, 0, 512, &[7u8; 512]));
    assert_eq!(
        c.simple_reply(),
        SimpleReply {
            error: 0,
            cookie: 14
        }
    );
}

#[test]
fn an_oversize_write_payload_is_skipped_and_the_stream_stays_in_sync() {
    let d = daemon();
    let mut c = Raw::transmission(&d, false);
    let len = MAX_PAYLOAD_BYTES + 512;
    // The payload looks like requests: if the server parsed it, the replies would show.
    let decoy = encode_req(CMD_WRITE, 0, 666, 0, 0, &[]);
    let mut payload = Vec::with_capacity(len as usize);
    while payload.len() < len as usize {
        payload.extend_from_slice(&decoy);
    }
    payload.truncate(len as usize);
    let req = encode_req(CMD_WRITE, 0, 20, 0, len, &payload);
    let mut writer = c.s.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || writer.write_all(&req));
    let r = c.simple_reply();
    assert_eq!((r.cookie, r.error), (20, EINVAL));
    sender
        .join()
        .expect("sender thread")
        .expect("send the oversize write");
    c.assert_usable(21);
    let data = c.read_ok(22, 0, 512);
    assert!(
        data.iter().all(|&b| b == 0),
        "the oversize write was not applied"
    );
}

/// Many requests sent before any reply is read: each cookie is answered exactly once, with
/// the right data, even with FUA writes and flushes (answered by another thread) mixed in.
#[test]
fn pipelined_requests_are_each_answered_exactly_once_with_the_right_data() {
    const N: u64 = 250;
    const BLOCK: u32 = 4096;
    let d = daemon();
    let mut c = Raw::transmission(&d, false);
    // Region A (first N blocks) gets known contents first.
    let mut batch = Vec::new();
    for i in 0..N {
        let data = pattern(i, BLOCK as usize);
        batch.extend(encode_req(
            CMD_WRITE,
            0,
            i,
            i * u64::from(BLOCK),
            BLOCK,
            &data,
        ));
    }
    let mut expect: HashMap<u64, Option<Vec<u8>>> = (0..N).map(|i| (i, None)).collect();
    exchange(&mut c, batch, &mut expect);

    // Then, in one go: reads of region A, writes to region B (some FUA), flushes.
    let region_b = N * u64::from(BLOCK);
    let mut batch = Vec::new();
    let mut expect: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
    let mut cookie = 1_000_000u64;
    for i in 0..N {
        batch.extend(encode_req(
            CMD_READ,
            0,
            cookie,
            i * u64::from(BLOCK),
            BLOCK,
            &[],
        ));
        expect.insert(cookie, Some(pattern(i, BLOCK as usize)));
        cookie += 1;
        let flags = if i % 7 == 0 { CMD_FLAG_FUA } else { 0 };
        let data = pattern(1000 + i, BLOCK as usize);
        let offset = region_b + i * u64::from(BLOCK);
        batch.extend(encode_req(CMD_WRITE, flags, cookie, offset, BLOCK, &data));
        expect.insert(cookie, None);
        cookie += 1;
        if i % 50 == 49 {
            batch.extend(encode_req(CMD_FLUSH, 0, cookie, 0, 0, &[]));
            expect.insert(cookie, None);
            cookie += 1;
        }
    }
    assert!(expect.len() >= 500);
    exchange(&mut c, batch, &mut expect);

    // Region B has what was written.
    for i in 0..N {
        let got = c.read_ok(5_000_000 + i, region_b + i * u64::from(BLOCK), BLOCK);
        assert!(
            got == pattern(1000 + i, BLOCK as usize),
            "block {i} of region B"
        );
    }

    // More FUA writes and flushes at once than the commit queue holds (backpressure).
    let mut batch = Vec::new();
    let mut expect: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
    for i in 0..1000u64 {
        let cookie = 7_000_000 + i;
        if i % 10 == 9 {
            batch.extend(encode_req(CMD_FLUSH, 0, cookie, 0, 0, &[]));
        } else {
            let data = pattern(cookie, 512);
            batch.extend(encode_req(
                CMD_WRITE,
                CMD_FLAG_FUA,
                cookie,
                i * 512,
                512,
                &data,
            ));
        }
        expect.insert(cookie, None);
    }
    exchange(&mut c, batch, &mut expect);
    let got = c.read_ok(1, 0, 1000 * 512);
    for i in (0..1000u64).filter(|i| i % 10 != 9) {
        let at = i as usize * 512;
        assert!(
            got[at..at + 512] == pattern(7_000_000 + i, 512),
            "FUA write {i}"
        );
    }
}

/// Sends `batch` from another thread while reading one simple reply per entry of `expect`
/// (cookie -> expected read data, None for commands without data). Fails on a duplicate,
/// unknown or missing cookie, an error, or wrong data.
fn exchange(c: &mut Raw, batch: Vec<u8>, expect: &mut HashMap<u64, Option<Vec<u8>>>) {
    let mut writer = c.s.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || writer.write_all(&batch));
    let total = expect.len();
    for _ in 0..total {
        let r = c.simple_reply();
        let want = expect
            .remove(&r.cookie)
            .unwrap_or_else(|| panic!("reply for unknown or already answered cookie {}", r.cookie));
        assert_eq!(r.error, 0, "cookie {} failed", r.cookie);
        if let Some(data) = want {
            let got = c.read_n(data.len());
            assert!(got == data, "cookie {}: wrong data", r.cookie);
        }
    }
    sender.join().expect("sender thread").expect("send batch");
    assert!(expect.is_empty());
}

#[test]
fn disc_closes_after_answering_earlier_requests() {
    let d = daemon();
    let mut c = Raw::transmission(&d, false);
    let old = pattern(30, 4096);
    c.write_ok(30, 0, &old);

    let new1 = pattern(31, 4096);
    let new2 = pattern(32, 4096);
    let mut batch = Vec::new();
    batch.extend(encode_req(CMD_WRITE, 0, 31, 4096, 4096, &new1));
    batch.extend(encode_req(CMD_WRITE, CMD_FLAG_FUA, 32, 8192, 4096, &new2));
    batch.extend(encode_req(CMD_FLUSH, 0, 33, 0, 0, &[]));
    batch.extend(encode_req(CMD_READ, 0, 34, 0, 4096, &[]));
    batch.extend(encode_req(CMD_DISC, 0, 35, 0, 0, &[]));
    c.send(&batch);
    let mut answered = Vec::new();
    for _ in 0..4 {
        let r = c.simple_reply();
        assert_eq!(r.error, 0, "cookie {}", r.cookie);
        if r.cookie == 34 {
            assert!(c.read_n(4096) == old, "read before DISC");
        }
        answered.push(r.cookie);
    }
    answered.sort_unstable();
    assert_eq!(
        answered,
        vec![31, 32, 33, 34],
        "every request before DISC answered once"
    );
    c.assert_closed("after NBD_CMD_DISC (DISC itself has no reply)");

    let mut c = Raw::transmission(&d, false);
    assert!(c.read_ok(40, 4096, 4096) == new1);
    assert!(c.read_ok(41, 8192, 4096) == new2);
}

#[test]
fn a_client_that_half_closes_still_gets_every_reply() {
    let d = daemon();
    let mut c = Raw::transmission(&d, false);
    let data = pattern(50, 4096);
    let mut batch = Vec::new();
    batch.extend(encode_req(CMD_WRITE, 0, 51, 0, 4096, &data));
    batch.extend(encode_req(CMD_WRITE, CMD_FLAG_FUA, 52, 4096, 4096, &data));
    batch.extend(encode_req(CMD_FLUSH, 0, 53, 0, 0, &[]));
    c.send(&batch);
    c.s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut answered: Vec<u64> = (0..3)
        .map(|_| {
            let r = c.simple_reply();
            assert_eq!(r.error, 0, "cookie {}", r.cookie);
            r.cookie
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, vec![51, 52, 53]);
    c.assert_closed("after the client's EOF");
    let mut c = Raw::transmission(&d, false);
    assert!(c.read_ok(1, 0, 8192) == [data.clone(), data].concat());
}

#[test]
fn endless_options_are_cut_off_and_starttls_is_refused() {
    let d = daemon();
    let mut c = Raw::negotiating(&d);
    assert_eq!(types(&c.ask(OPT_STARTTLS, &[])), vec![REP_ERR_UNSUP]);
    // A client that never leaves the option phase is dropped after a bounded number of
    // options (STARTTLS above was the first). Exactly the limit is sent, so the server has
    // read everything when it closes (unread data would turn its close into a reset that
    // destroys the replies in flight).
    let limit = blockd::nbd::handshake::MAX_OPTIONS_PER_HANDSHAKE;
    let mut spam = Vec::new();
    for _ in 1..limit {
        hs::encode_option(&mut spam, OPT_STRUCTURED_REPLY, &[]);
    }
    let mut writer = c.s.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || writer.write_all(&spam));
    for n in 1..limit {
        let (h, payload) = c.option_reply();
        assert_eq!(
            (h.option, h.reply_type, payload.len()),
            (OPT_STRUCTURED_REPLY, REP_ACK, 0),
            "reply to option {n}"
        );
    }
    sender.join().expect("sender").expect("send options");
    c.assert_closed(&format!(
        "after {limit} options without entering transmission"
    ));
    assert!(
        d.log().contains("options without entering transmission"),
        "{}",
        d.log()
    );
    let mut c = Raw::transmission(&d, false);
    c.assert_usable(1);
}

/// Bad clients of every kind come and go while a good client does I/O: the good client
/// sees no error and the bad ones are dropped.
#[test]
fn garbage_from_one_client_does_not_disturb_another() {
    // The good client uses the first MiB; nothing may change this one.
    const UNTOUCHED: u64 = 2 << 20;
    let d = daemon();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = d.nbd.clone();
    let good = {
        let mut c = Raw::transmission(&d, false);
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) || rounds < 50 {
                let offset = (rounds % 256) * 4096;
                let data = pattern(rounds + 100, 4096);
                c.write_ok(rounds * 2, offset, &data);
                assert!(
                    c.read_ok(rounds * 2 + 1, offset, 4096) == data,
                    "good client: round {rounds} read back wrong data"
                );
                rounds += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "good client too slow"
                );
            }
            rounds
        })
    };

    let mut bad = Vec::new();
    // Garbage instead of client flags.
    for seed in 0..10u64 {
        let (mut c, _) = Raw::connect(&d);
        let mut junk = pattern(seed + 7000, 256);
        junk[0] = 0xff; // unknown client flag bits, whatever follows
        c.send(&junk);
        bad.push((c, format!("garbage flags {seed}")));
    }
    // Garbage instead of an option header.
    for seed in 0..10u64 {
        let mut c = Raw::negotiating(&d);
        c.send(&pattern(seed + 8000, 1000));
        bad.push((c, format!("garbage option {seed}")));
    }
    // Garbage instead of a request.
    for seed in 0..10u64 {
        let mut c = Raw::transmission(&d, seed % 2 == 0);
        let junk = pattern(seed + 9000, 3000);
        assert_ne!(junk[..4], REQUEST_MAGIC.to_be_bytes());
        c.send(&junk);
        bad.push((c, format!("garbage request {seed}")));
    }
    for (mut c, what) in bad {
        c.assert_closed(&what);
    }
    // Clients that hang up at awkward moments.
    for i in 0..10u64 {
        let s = TcpStream::connect(&addr).expect("connect");
        drop(s); // before reading the greeting
        let mut c = Raw::negotiating(&d);
        c.send(&{
            let mut o = Vec::new();
            hs::encode_option(&mut o, OPT_GO, &[]);
            o[12..16].copy_from_slice(&u32::MAX.to_be_bytes()); // 4 GiB of option data...
            o.extend_from_slice(&[0; 100]);
            o
        });
        drop(c); // ...that never comes
        let mut c = Raw::transmission(&d, false);
        // Half of a 1 MiB write, then gone.
        c.send(&encode_req(
            CMD_WRITE,
            0,
            i,
            UNTOUCHED,
            1 << 20,
            &[0xee; 100_000],
        ));
        drop(c);
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = good.join().expect("good client saw no errors");
    assert!(rounds >= 50);

    // Nothing the bad clients sent reached the volume, and the server is still serving.
    let mut c = Raw::transmission(&d, false);
    let data = c.read_ok(1, UNTOUCHED, 1 << 20);
    assert!(
        data.iter().all(|&b| b == 0),
        "a half-sent write was applied"
    );
    c.assert_usable(9);
}
