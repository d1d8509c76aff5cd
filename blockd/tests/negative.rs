//! Bad input from NBD clients: every malformed or out-of-range request gets the answer the
//! NBD spec asks for, and the server neither hangs, crashes, nor lets one bad client
//! disturb another.
//!
//! Two kinds of client: libnbd (from the system Python, with strict mode off so it sends
//! requests it would normally refuse) and the tests' raw client (common::nbd), speaking the
//! wire format through nbd-proto's client-side encoders and decoders, for what no real
//! client library sends.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::nbd::{Client, encode_request, go_data, types};
use common::{Daemon, SYSTEM_PYTHON, pattern, run_with_timeout};
use nbd_proto::consts::*;
use nbd_proto::handshake::{self as hs, MetaContextRequest};
use nbd_proto::transmission::{self as tx, SimpleReply};

const VOLUME: &str = "vol";
const VOLUME_SIZE: u64 = 4 << 20;

fn daemon() -> Daemon {
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    d
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
    let mut c = Client::negotiating(&d);
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
    let mut c = Client::negotiating(&d);
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
    c.send_request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 1, 0, 1 << 20, &[]);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 1);
    let (h, payload) = &chunks[0];
    assert_eq!((h.cookie, h.ty), (1, REPLY_TYPE_BLOCK_STATUS));
    let (id, extents) = tx::decode_block_status(payload).expect("block status payload");
    assert_eq!(id, context, "block status uses the negotiated context id");
    assert_eq!(extents.len(), 1, "REQ_ONE gives exactly one extent");
    assert!(extents[0].len <= 1 << 20);

    // Reads come back as structured chunks.
    c.send_request(CMD_READ, 0, 2, 0, 4096, &[]);
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
    let mut c = Client::negotiating(&d);
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
    let mut c = Client::negotiating(&d);
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
    let mut c = Client::negotiating(&d);
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
        let (mut c, _) = Client::connect(&d);
        c.client_flags(bits);
        c.assert_closed(&format!("client flags {bits:#x}"));
    }
    // The server is still fine for a well-behaved client.
    let mut c = Client::transmission(&d, VOLUME, false);
    c.assert_usable(5);
}

#[test]
fn export_name_of_an_unknown_export_closes_without_a_reply() {
    let d = daemon();
    let mut c = Client::negotiating(&d);
    c.option(OPT_EXPORT_NAME, b"no-such-volume");
    c.assert_closed("EXPORT_NAME of an unknown export");
}

#[test]
fn export_name_reply_has_124_zero_bytes_unless_no_zeroes_was_negotiated() {
    let d = daemon();
    for no_zeroes in [false, true] {
        let (mut c, _) = Client::connect(&d);
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
    let mut c = Client::negotiating(&d);
    assert_eq!(types(&c.ask(OPT_LIST, &[])), vec![REP_SERVER, REP_ACK]);
    let replies = c.ask(OPT_ABORT, &[]);
    assert_eq!(types(&replies), vec![REP_ACK]);
    assert!(replies[0].1.is_empty());
    c.assert_closed("after ABORT");
}

#[test]
fn go_for_an_unknown_export_gets_err_unknown_and_negotiation_continues() {
    let d = daemon();
    let mut c = Client::negotiating(&d);
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
    let mut c = Client::negotiating(&d);
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
        let mut c = Client::transmission(&d, VOLUME, false);
        c.assert_usable(8);
        let mut req = encode_request(CMD_READ, 0, 9, 0, 512, &[]);
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
    let mut c = Client::transmission(&d, VOLUME, false);
    for (cookie, command) in [(10u64, 8u16), (11, 99), (12, u16::MAX)] {
        c.send_request(command, 0, cookie, 0, 512, &[]);
        let r = c.simple_reply();
        assert_eq!((r.cookie, r.error), (cookie, EINVAL), "command {command}");
        c.assert_usable(cookie * 100);
    }

    // With structured replies the error comes as an error chunk.
    let mut c = Client::transmission(&d, VOLUME, true);
    c.send_request(99, 0, 13, 0, 512, &[]);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 1);
    let (h, payload) = &chunks[0];
    assert_eq!(h.cookie, 13);
    assert!(h.is_error() && h.is_done());
    let err = tx::decode_error_chunk(h.ty, payload).expect("error chunk");
    assert_eq!(err.error, EINVAL);
    // Still usable: a write is acknowledged with a simple reply.
    c.send(&encode_request(CMD_WRITE, 0, 14, 0, 512, &[7u8; 512]));
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
    let mut c = Client::transmission(&d, VOLUME, false);
    let len = MAX_PAYLOAD_BYTES + 512;
    // The payload looks like requests: if the server parsed it, the replies would show.
    let decoy = encode_request(CMD_WRITE, 0, 666, 0, 0, &[]);
    let mut payload = Vec::with_capacity(len as usize);
    while payload.len() < len as usize {
        payload.extend_from_slice(&decoy);
    }
    payload.truncate(len as usize);
    let req = encode_request(CMD_WRITE, 0, 20, 0, len, &payload);
    let sender = c.send_in_background(req);
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
    let mut c = Client::transmission(&d, VOLUME, false);
    // Region A (first N blocks) gets known contents first.
    let mut batch = Vec::new();
    for i in 0..N {
        let data = pattern(i, BLOCK as usize);
        batch.extend(encode_request(
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
        batch.extend(encode_request(
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
        batch.extend(encode_request(
            CMD_WRITE, flags, cookie, offset, BLOCK, &data,
        ));
        expect.insert(cookie, None);
        cookie += 1;
        if i % 50 == 49 {
            batch.extend(encode_request(CMD_FLUSH, 0, cookie, 0, 0, &[]));
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
            batch.extend(encode_request(CMD_FLUSH, 0, cookie, 0, 0, &[]));
        } else {
            let data = pattern(cookie, 512);
            batch.extend(encode_request(
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
fn exchange(c: &mut Client, batch: Vec<u8>, expect: &mut HashMap<u64, Option<Vec<u8>>>) {
    let sender = c.send_in_background(batch);
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
    let mut c = Client::transmission(&d, VOLUME, false);
    let old = pattern(30, 4096);
    c.write_ok(30, 0, &old);

    let new1 = pattern(31, 4096);
    let new2 = pattern(32, 4096);
    let mut batch = Vec::new();
    batch.extend(encode_request(CMD_WRITE, 0, 31, 4096, 4096, &new1));
    batch.extend(encode_request(
        CMD_WRITE,
        CMD_FLAG_FUA,
        32,
        8192,
        4096,
        &new2,
    ));
    batch.extend(encode_request(CMD_FLUSH, 0, 33, 0, 0, &[]));
    batch.extend(encode_request(CMD_READ, 0, 34, 0, 4096, &[]));
    batch.extend(encode_request(CMD_DISC, 0, 35, 0, 0, &[]));
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

    let mut c = Client::transmission(&d, VOLUME, false);
    assert!(c.read_ok(40, 4096, 4096) == new1);
    assert!(c.read_ok(41, 8192, 4096) == new2);
}

#[test]
fn a_client_that_half_closes_still_gets_every_reply() {
    let d = daemon();
    let mut c = Client::transmission(&d, VOLUME, false);
    let data = pattern(50, 4096);
    let mut batch = Vec::new();
    batch.extend(encode_request(CMD_WRITE, 0, 51, 0, 4096, &data));
    batch.extend(encode_request(
        CMD_WRITE,
        CMD_FLAG_FUA,
        52,
        4096,
        4096,
        &data,
    ));
    batch.extend(encode_request(CMD_FLUSH, 0, 53, 0, 0, &[]));
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
    let mut c = Client::transmission(&d, VOLUME, false);
    assert!(c.read_ok(1, 0, 8192) == [data.clone(), data].concat());
}

#[test]
fn endless_options_are_cut_off_and_starttls_is_refused() {
    let d = daemon();
    let mut c = Client::negotiating(&d);
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
    let sender = c.send_in_background(spam);
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
    let mut c = Client::transmission(&d, VOLUME, false);
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
        let mut c = Client::transmission(&d, VOLUME, false);
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
        let (mut c, _) = Client::connect(&d);
        let mut junk = pattern(seed + 7000, 256);
        junk[0] = 0xff; // unknown client flag bits, whatever follows
        c.send(&junk);
        bad.push((c, format!("garbage flags {seed}")));
    }
    // Garbage instead of an option header.
    for seed in 0..10u64 {
        let mut c = Client::negotiating(&d);
        c.send(&pattern(seed + 8000, 1000));
        bad.push((c, format!("garbage option {seed}")));
    }
    // Garbage instead of a request.
    for seed in 0..10u64 {
        let mut c = Client::transmission(&d, VOLUME, seed % 2 == 0);
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
        let mut c = Client::negotiating(&d);
        c.send(&{
            let mut o = Vec::new();
            hs::encode_option(&mut o, OPT_GO, &[]);
            o[12..16].copy_from_slice(&u32::MAX.to_be_bytes()); // 4 GiB of option data...
            o.extend_from_slice(&[0; 100]);
            o
        });
        drop(c); // ...that never comes
        let mut c = Client::transmission(&d, VOLUME, false);
        // Half of a 1 MiB write, then gone.
        c.send(&encode_request(
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
    let mut c = Client::transmission(&d, VOLUME, false);
    let data = c.read_ok(1, UNTOUCHED, 1 << 20);
    assert!(
        data.iter().all(|&b| b == 0),
        "a half-sent write was applied"
    );
    c.assert_usable(9);
}
