//! The NBD server as a service: handshake deadline, connection cap, graceful shutdown,
//! several connections to one export, and the Unix socket.
//!
//! The client here is the tests' raw one (common::nbd, built on nbd-proto's client-side
//! encoders), so that tests control exactly what is in flight when.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nbd::{Client, encode_request};
use common::{Daemon, pattern};
use nbd_proto::consts::*;
use nbd_proto::handshake::{self as hs, GoRequest};
use nbd_proto::transmission as tx;

const VOLUME: &str = "vol";
const BLOCK: usize = 4096;

fn connected(d: &Daemon) -> Client {
    let mut c = Client::tcp(&d.nbd);
    c.handshake(VOLUME);
    c
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- handshake deadline

#[test]
fn handshake_deadline_closes_silent_and_slow_clients_but_not_established_ones() {
    let d = Daemon::start_with(&["--handshake-timeout", "1s"]);
    d.create_volume(VOLUME, "4M");

    // An established connection that idles well past the handshake deadline.
    let mut established = connected(&d);
    let data = pattern(1, BLOCK);
    established.write(0, &data, 0);

    let silent = std::thread::spawn({
        let addr = d.nbd.clone();
        move || {
            let started = Instant::now();
            let mut c = Client::tcp(&addr);
            c.greeting();
            c.wait_closed(Duration::from_secs(5), "silent client");
            started.elapsed()
        }
    });
    // A slow client trickles a valid handshake, one byte every 200 ms: the deadline is
    // for the whole handshake, not per read.
    let slow = std::thread::spawn({
        let addr = d.nbd.clone();
        move || {
            let started = Instant::now();
            let mut c = Client::tcp(&addr);
            c.greeting();
            let mut bytes = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
                .to_be_bytes()
                .to_vec();
            hs::encode_option(&mut bytes, OPT_LIST, &[]);
            for b in bytes {
                if started.elapsed() > Duration::from_secs(5) || c.s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            c.wait_closed(Duration::from_secs(5), "slow client");
            started.elapsed()
        }
    });

    // Meanwhile a normal client connects and works.
    let mut other = connected(&d);
    other.write(BLOCK as u64, &pattern(2, BLOCK), 0);
    assert_eq!(other.read(0, BLOCK), data);

    for (name, t) in [("silent", silent), ("slow", slow)] {
        let took = t.join().expect("client thread");
        assert!(
            took >= Duration::from_millis(800) && took <= Duration::from_secs(3),
            "{name} client closed after {took:?}, expected about 1 s"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    // The established connection is untouched by the deadline.
    assert_eq!(established.read(0, BLOCK), data);
    assert_eq!(established.read(BLOCK as u64, BLOCK), pattern(2, BLOCK));
    assert!(d.log().contains("handshake failed"), "{}", d.log());
}

// ---------------------------------------------------------------- connection cap

#[test]
fn connection_cap_refuses_extra_connections_and_readmits_after_a_close() {
    let d = Daemon::start_with(&["--max-connections", "2"]);
    d.create_volume(VOLUME, "4M");
    let mut a = connected(&d);
    let mut b = connected(&d);

    // The third is accepted by the kernel and closed at once, before any greeting.
    let started = Instant::now();
    let mut c = Client::tcp(&d.nbd);
    c.wait_closed(Duration::from_secs(3), "third connection");
    assert!(started.elapsed() < Duration::from_secs(2));
    wait_until(Duration::from_secs(5), "a log line about the limit", || {
        d.log().contains("connection limit reached")
    });

    // The first two are unaffected.
    a.write(0, &pattern(3, BLOCK), 0);
    assert_eq!(b.read(0, BLOCK), pattern(3, BLOCK));

    // After one leaves, a new client gets in (once the server has noticed the close).
    drop(a);
    let mut admitted = None;
    wait_until(Duration::from_secs(10), "admission after a close", || {
        let mut c = Client::tcp(&d.nbd);
        let mut first = [0u8; 1];
        match c.s.read(&mut first) {
            Ok(1) => {
                admitted = Some(c);
                true
            }
            _ => false,
        }
    });
    let mut c = admitted.expect("admitted client");
    // The first greeting byte was consumed above; read the rest and go on.
    c.read_n(GREETING_BYTES - 1);
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = Vec::new();
    hs::encode_option(&mut opt, OPT_EXPORT_NAME, VOLUME.as_bytes());
    c.send(&opt);
    c.read_n(EXPORT_NAME_REPLY_BYTES);
    assert_eq!(c.read(0, BLOCK), pattern(3, BLOCK));
    // And the cap still holds with two connected again.
    let mut extra = Client::tcp(&d.nbd);
    extra.wait_closed(Duration::from_secs(3), "connection over the cap");
    b.flush();
}

// ---------------------------------------------------------------- shutdown

/// Requests still in flight when SIGTERM arrives are answered, the daemon exits 0 within
/// the grace period and removes its socket, and acknowledged writes survive a restart.
#[test]
fn sigterm_finishes_in_flight_requests_and_keeps_acknowledged_writes() {
    let mut d = Daemon::start_with(&["--shutdown-grace", "5s"]);
    d.create_volume(VOLUME, "8M");
    let socket = d.socket.clone();
    assert!(socket.exists(), "the Unix socket exists while serving");

    let mut c = connected(&d);
    // Flushed data.
    for i in 0..16u64 {
        c.write(i * BLOCK as u64, &pattern(100 + i, BLOCK), 0);
    }
    c.flush();
    // An idle second connection and a client still in the handshake must not hold up
    // the shutdown.
    let mut idle = connected(&d);
    let mut negotiating = Client::tcp(&d.nbd);
    negotiating.greeting();

    // In flight: 64 MiB of reads the client does not read yet (so the server blocks on
    // sending them), then writes and a flush queued behind them.
    let mut expect: HashMap<u64, usize> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..64u64 {
        let cookie = c.cookie();
        batch.extend(encode_request(
            CMD_READ,
            0,
            cookie,
            (i % 8) << 20,
            1 << 20,
            &[],
        ));
        expect.insert(cookie, 1 << 20);
    }
    let in_flight_base = 1u64 << 20;
    for i in 0..8u64 {
        let cookie = c.cookie();
        let data = pattern(200 + i, BLOCK);
        let flags = if i % 2 == 0 { CMD_FLAG_FUA } else { 0 };
        batch.extend(encode_request(
            CMD_WRITE,
            flags,
            cookie,
            in_flight_base + i * BLOCK as u64,
            BLOCK as u32,
            &data,
        ));
        expect.insert(cookie, 0);
    }
    let flush = c.cookie();
    batch.extend(encode_request(CMD_FLUSH, 0, flush, 0, 0, &[]));
    expect.insert(flush, 0);
    c.send(&batch);
    std::thread::sleep(Duration::from_millis(300));

    // SIGTERM, then start reading the replies while the daemon winds down.
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        while !expect.is_empty() {
            let (cookie, error) = c.reply();
            let len = expect
                .remove(&cookie)
                .unwrap_or_else(|| panic!("unexpected or repeated cookie {cookie}"));
            assert_eq!(error, 0, "cookie {cookie} failed during shutdown");
            c.read_n(len);
        }
        c.wait_closed(Duration::from_secs(10), "after the in-flight replies");
    });
    let started = Instant::now();
    let status = d.terminate(Duration::from_secs(20));
    let took = started.elapsed();
    reader.join().expect("every in-flight request was answered");
    idle.wait_closed(Duration::from_secs(5), "idle connection at shutdown");
    negotiating.wait_closed(Duration::from_secs(5), "handshake at shutdown");
    assert!(
        status.success(),
        "blockd exited with {status}:\n{}",
        d.log()
    );
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?}, grace is 5 s"
    );
    assert!(
        !socket.exists(),
        "the Unix socket file is removed at shutdown"
    );
    assert!(
        !d.log().contains("cutting connections"),
        "nothing had to be cut:\n{}",
        d.log()
    );

    let (dir, data_dir) = d.into_dirs(false);
    let d = Daemon::start_in(dir, data_dir, &[]);
    let mut c = connected(&d);
    for i in 0..16u64 {
        assert!(
            c.read(i * BLOCK as u64, BLOCK) == pattern(100 + i, BLOCK),
            "flushed block {i} after restart"
        );
    }
    for i in 0..8u64 {
        assert!(
            c.read(in_flight_base + i * BLOCK as u64, BLOCK) == pattern(200 + i, BLOCK),
            "in-flight write {i} after restart"
        );
    }
}

/// A client that never reads its replies cannot hold the daemon up past the grace period.
#[test]
fn sigterm_cuts_a_stuck_client_after_the_grace_period() {
    let mut d = Daemon::start_with(&["--shutdown-grace", "1s"]);
    d.create_volume(VOLUME, "8M");
    let mut c = connected(&d);
    let data = pattern(7, BLOCK);
    c.write(0, &data, 0);
    let mut batch = Vec::new();
    for i in 0..64u64 {
        batch.extend(encode_request(
            CMD_READ,
            0,
            1000 + i,
            (i % 8) << 20,
            1 << 20,
            &[],
        ));
    }
    c.send(&batch);
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let status = d.terminate(Duration::from_secs(20));
    let took = started.elapsed();
    assert!(
        status.success(),
        "blockd exited with {status}:\n{}",
        d.log()
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "shutdown took {took:?} with a 1 s grace period"
    );
    assert!(d.log().contains("cutting connections"), "{}", d.log());
    drop(c);

    let (dir, data_dir) = d.into_dirs(false);
    let d = Daemon::start_in(dir, data_dir, &[]);
    assert_eq!(
        connected(&d).read(0, BLOCK),
        data,
        "acknowledged write survives"
    );
}

// ---------------------------------------------------------------- sharing and sockets

#[test]
fn connections_to_one_export_share_state_and_flushes() {
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    let mut a = connected(&d);
    let mut b = Client::unix(&d.socket);
    let (_, flags) = b.handshake(VOLUME);
    assert_ne!(
        flags & FLAG_CAN_MULTI_CONN,
        0,
        "blockd advertises multi-conn"
    );

    // Written on A (not flushed), read on B.
    a.write(0, &pattern(10, BLOCK), 0);
    assert_eq!(b.read(0, BLOCK), pattern(10, BLOCK));
    // And the other way round, with FUA.
    b.write(BLOCK as u64, &pattern(11, BLOCK), CMD_FLAG_FUA);
    assert_eq!(a.read(BLOCK as u64, BLOCK), pattern(11, BLOCK));
    // A flush on B covers A's write; a third connection sees everything.
    b.flush();
    let mut c = connected(&d);
    assert_eq!(
        c.read(0, 2 * BLOCK),
        [pattern(10, BLOCK), pattern(11, BLOCK)].concat()
    );
    // Trims and zeroes are shared too.
    let z = a.request(CMD_WRITE_ZEROES, 0, 0, BLOCK as u32, &[]);
    a.expect_ok(z, "write zeroes on A");
    assert_eq!(b.read(0, BLOCK), vec![0; BLOCK]);
    // Concurrent writers to disjoint blocks: each sees both.
    let mut writers = Vec::new();
    for (n, mut conn) in [(0u64, a), (1, b)] {
        writers.push(std::thread::spawn(move || {
            for i in 0..64u64 {
                let block = 16 + i * 2 + n;
                conn.write(block * BLOCK as u64, &pattern(block, BLOCK), 0);
            }
            conn.flush();
        }));
    }
    for w in writers {
        w.join().expect("writer");
    }
    for block in 16..16 + 128u64 {
        assert!(
            c.read(block * BLOCK as u64, BLOCK) == pattern(block, BLOCK),
            "block {block}"
        );
    }
}

#[test]
fn many_concurrent_connections_each_work() {
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    let clients: Vec<_> = (0..48u64)
        .map(|n| {
            let (tcp, sock) = (d.nbd.clone(), d.socket.clone());
            std::thread::spawn(move || {
                let mut c = if n % 2 == 0 {
                    Client::tcp(&tcp)
                } else {
                    Client::unix(&sock)
                };
                c.handshake(VOLUME);
                for round in 0..20u64 {
                    let offset = (n * 20 + round) * BLOCK as u64;
                    let data = pattern(n * 1000 + round, BLOCK);
                    c.write(offset, &data, if round % 5 == 0 { CMD_FLAG_FUA } else { 0 });
                    assert!(c.read(offset, BLOCK) == data, "client {n} round {round}");
                }
                c.flush();
            })
        })
        .collect();
    for t in clients {
        t.join().expect("client thread");
    }
    let mut c = connected(&d);
    for n in 0..48u64 {
        for round in 0..20u64 {
            let offset = (n * 20 + round) * BLOCK as u64;
            assert!(c.read(offset, BLOCK) == pattern(n * 1000 + round, BLOCK));
        }
    }
}

#[test]
fn unix_socket_serves_the_same_exports() {
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    assert_eq!(d.socket, d.data_dir.join("nbd.sock"), "default socket path");
    let mut c = Client::unix(&d.socket);
    let (size, _) = c.handshake(VOLUME);
    assert_eq!(size, 4 << 20);
    c.write(0, &pattern(20, BLOCK), 0);
    c.flush();
    assert_eq!(c.read(0, BLOCK), pattern(20, BLOCK));
    // What was written over the socket is what TCP clients see.
    assert_eq!(connected(&d).read(0, BLOCK), pattern(20, BLOCK));
    // A GO for an unknown export is an error reply there too, not a hang.
    let mut c = Client::unix(&d.socket);
    c.greeting();
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = Vec::new();
    let go = GoRequest {
        name: "nope".into(),
        info_requests: vec![],
    };
    hs::encode_option(&mut opt, OPT_GO, &go.encode());
    c.send(&opt);
    let h = hs::decode_option_reply_header(&c.read_n(OPTION_REPLY_HEADER_BYTES)).expect("reply");
    assert_eq!(h.reply_type, REP_ERR_UNKNOWN);
}

#[test]
fn a_stale_unix_socket_from_a_killed_daemon_is_replaced() {
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    let socket = d.socket.clone();
    let mut c = Client::unix(&socket);
    c.handshake(VOLUME);
    c.write(0, &pattern(30, BLOCK), 0);
    c.flush();
    drop(c);

    let (dir, data_dir) = d.into_dirs(false); // SIGKILL: no cleanup
    assert!(
        socket.exists(),
        "a killed daemon leaves its socket file behind"
    );
    assert!(
        UnixStream::connect(&socket).is_err(),
        "nobody listens on the stale socket"
    );

    let d = Daemon::start_in(dir, data_dir, &[]);
    assert_eq!(
        d.socket, socket,
        "the restarted daemon uses the same socket path"
    );
    let mut c = Client::unix(&socket);
    c.handshake(VOLUME);
    assert_eq!(c.read(0, BLOCK), pattern(30, BLOCK));

    // But a socket a live daemon listens on is not taken over.
    let out = common::run_with_timeout(
        std::process::Command::new(common::blockd_bin())
            .args([
                "serve",
                "--listen",
                "none",
                "--api",
                "127.0.0.1:0",
                "--socket",
            ])
            .arg(&socket)
            .arg("--data-dir")
            .arg(d.dir.path().join("other-data")),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "a second daemon must not steal a live socket"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    let mut c = Client::unix(&socket);
    c.handshake(VOLUME);
    assert_eq!(
        c.read(0, BLOCK),
        pattern(30, BLOCK),
        "the first daemon still serves"
    );
}

/// A client that keeps sending while the daemon shuts down: every reply it gets is a
/// success or ESHUTDOWN, the stream ends with a clean close (not a reset that would destroy
/// replies already sent), and every acknowledged write survives a restart.
#[test]
fn sigterm_with_a_busy_client_ends_cleanly() {
    let mut d = Daemon::start_with(&["--shutdown-grace", "5s"]);
    d.create_volume(VOLUME, "8M");
    let mut c = connected(&d);
    let mut writer = c.s.try_clone().expect("clone socket");
    const WINDOW: u64 = 256;
    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let offsets: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let sender = std::thread::spawn({
        let (sent, answered, stop, offsets) = (
            sent.clone(),
            answered.clone(),
            stop.clone(),
            offsets.clone(),
        );
        move || {
            let mut cookie = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if sent.load(Ordering::Acquire) - answered.load(Ordering::Acquire) >= WINDOW {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                cookie += 1;
                let offset = (cookie % 2048) * BLOCK as u64;
                offsets.lock().expect("lock").insert(cookie, offset);
                let req = encode_request(
                    CMD_WRITE,
                    0,
                    cookie,
                    offset,
                    BLOCK as u32,
                    &pattern(cookie, BLOCK),
                );
                sent.fetch_add(1, Ordering::AcqRel);
                if writer.write_all(&req).is_err() {
                    break;
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let terminator = std::thread::spawn(move || {
        let st = d.terminate(Duration::from_secs(20));
        (d, st)
    });
    let mut acked: HashMap<u64, u64> = HashMap::new(); // offset -> last acked cookie
    let mut errors = 0;
    let end = loop {
        let mut h = [0u8; SIMPLE_REPLY_BYTES];
        match c.s.read_exact(&mut h) {
            Ok(()) => {
                let r = tx::decode_simple_reply(&h).expect("simple reply");
                answered.fetch_add(1, Ordering::AcqRel);
                let offset = offsets.lock().expect("lock")[&r.cookie];
                match r.error {
                    0 => {
                        acked.insert(offset, r.cookie);
                    }
                    ESHUTDOWN => errors += 1,
                    e => panic!("cookie {}: error {e} during shutdown", r.cookie),
                }
            }
            Err(e) => break e,
        }
    };
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    let (d, status) = terminator.join().expect("terminate");
    assert!(status.success(), "{status}");
    assert!(
        acked.len() > 10,
        "the client made progress before the shutdown"
    );
    assert_eq!(
        end.kind(),
        ErrorKind::UnexpectedEof,
        "the connection must end with a close, not {end} ({} acked, {errors} ESHUTDOWN)\n{}",
        acked.len(),
        d.log()
    );
    let (dir, data_dir) = d.into_dirs(false);
    let d = Daemon::start_in(dir, data_dir, &[]);
    let mut c = connected(&d);
    for (offset, cookie) in acked {
        // A later unacknowledged write to the same block may have landed too.
        let got = c.read(offset, BLOCK);
        assert!(
            got == pattern(cookie, BLOCK)
                || (cookie + 2048..cookie + 2048 * 64)
                    .step_by(2048)
                    .any(|k| got == pattern(k, BLOCK)),
            "acknowledged write {cookie} at {offset} lost"
        );
    }
}

// ---------------------------------------------------------------- large writes

/// Small writes that arrive together are appended as one burst (one vectored write of
/// their payloads, one of their index entries). Every one is still answered on its own:
/// an out-of-range write in the middle is refused alone, later writes over earlier ones
/// win, a read in the middle sees exactly the writes sent before it, FUA and FLUSH make
/// them durable, and a `kill -9` after the flush loses none of them.
#[test]
fn pipelined_small_writes_are_answered_one_by_one_and_survive_kill_after_flush() {
    const SIZE: usize = 4 << 20;
    let d = Daemon::start();
    d.create_volume(VOLUME, "4M");
    let mut c = connected(&d);
    let mut expected = vec![0u8; SIZE];
    let mut batch = Vec::new();
    let mut ok = Vec::new();
    let mut refused = None;
    let mut middle_read = None;
    let mut rng = 12345u64;
    let mut next = |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    for i in 0..400u64 {
        if i == 150 {
            // Out of range: refused, and the writes around it still happen.
            let w = c.cookie();
            batch.extend(encode_request(
                CMD_WRITE,
                0,
                w,
                SIZE as u64 - 512,
                4096,
                &[7; 4096],
            ));
            refused = Some(w);
        }
        if i == 200 {
            let r = c.cookie();
            batch.extend(encode_request(CMD_READ, 0, r, 0, SIZE as u32, &[]));
            middle_read = Some((r, expected.clone()));
        }
        // 4 KiB-aligned pages, odd sizes at odd offsets, single bytes; a third of them over
        // the previous write's range.
        let (off, len) = match next(3) {
            0 => (next(1024) * 4096, 4096 * (1 + next(4)) as usize),
            1 => (next(SIZE as u64 - 70_000), 1 + next(65_536) as usize),
            _ => (next(SIZE as u64), 1),
        };
        let off = if i % 3 == 2 {
            ok.last().map_or(off, |&(_, o, _)| o)
        } else {
            off
        };
        let len = len.min(SIZE - off as usize);
        let data = pattern(9000 + i, len);
        expected[off as usize..off as usize + len].copy_from_slice(&data);
        let flags = if i % 50 == 49 { CMD_FLAG_FUA } else { 0 };
        let w = c.cookie();
        batch.extend(encode_request(CMD_WRITE, flags, w, off, len as u32, &data));
        ok.push((w, off, len));
    }
    let flush = c.cookie();
    batch.extend(encode_request(CMD_FLUSH, 0, flush, 0, 0, &[]));
    let sender = c.send_in_background(batch);
    let (read_cookie, at_read) = middle_read.expect("a read in the middle");
    let mut answered = HashMap::new();
    for _ in 0..ok.len() + 3 {
        let r = c.simple_reply();
        if r.cookie == read_cookie {
            assert_eq!(r.error, 0, "the read in the middle failed");
            let got = c.read_n(SIZE);
            assert!(
                got == at_read,
                "a read behind 200 pipelined writes does not see exactly those writes (first \
                 difference at byte {:?})",
                got.iter().zip(&at_read).position(|(a, b)| a != b)
            );
        }
        assert!(
            answered.insert(r.cookie, r.error).is_none(),
            "request {} answered twice",
            r.cookie
        );
    }
    sender.join().expect("sender").expect("send");
    let refused = refused.expect("an out-of-range write");
    assert_ne!(
        answered.get(&refused).copied().unwrap_or(0),
        0,
        "out-of-range write accepted"
    );
    for &(w, off, len) in &ok {
        assert_eq!(
            answered.get(&w),
            Some(&0),
            "write {off}+{len} not answered with success"
        );
    }
    assert_eq!(answered.get(&flush), Some(&0), "flush failed");
    assert!(
        c.read(0, SIZE) == expected,
        "volume after the pipelined writes"
    );
    drop(c);

    let (dir, data_dir) = d.into_dirs(false);
    let d = Daemon::start_in(dir, data_dir, &[]);
    let mut c = connected(&d);
    assert!(
        c.read(0, SIZE) == expected,
        "flushed pipelined small writes lost or changed across kill -9"
    );
}

/// Large writes are received into an aligned buffer and run on a second thread while the
/// next request arrives (and the big aligned ones go to disk around the page cache). Every
/// other request waits for them: a read right behind a write returns the new data, a
/// flush behind them makes them durable, and a `kill -9` after that loses none of them.
#[test]
fn pipelined_large_writes_are_read_back_and_survive_kill_after_flush() {
    let d = Daemon::start();
    d.create_volume(VOLUME, "32M");
    let mut c = connected(&d);
    // (offset, length, flags): aligned (direct), larger than the bounce buffer with FUA,
    // unaligned offset and length (buffered), and one rewriting part of the first.
    let writes: [(u64, usize, u16); 5] = [
        (1 << 20, 1 << 20, 0),
        (4 << 20, 3 << 20, CMD_FLAG_FUA),
        ((8 << 20) + 512, (300 << 10) + 512, 0),
        ((1 << 20) + (256 << 10), 512 << 10, 0),
        (16 << 20, 8 << 20, 0),
    ];
    let mut expected = vec![0u8; 32 << 20];
    let mut batch = Vec::new();
    let mut reads: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut others = Vec::new();
    for (i, &(off, len, flags)) in writes.iter().enumerate() {
        let data = pattern(700 + i as u64, len);
        expected[off as usize..off as usize + len].copy_from_slice(&data);
        let w = c.cookie();
        batch.extend(encode_request(CMD_WRITE, flags, w, off, len as u32, &data));
        others.push(w);
        let r = c.cookie();
        batch.extend(encode_request(CMD_READ, 0, r, off, len as u32, &[]));
        reads.insert(r, (off, len));
    }
    let flush = c.cookie();
    batch.extend(encode_request(CMD_FLUSH, 0, flush, 0, 0, &[]));
    others.push(flush);
    let sender = c.send_in_background(batch);
    let mut answered = Vec::new();
    for _ in 0..reads.len() + others.len() {
        let r = c.simple_reply();
        assert_eq!(r.error, 0, "request {} failed", r.cookie);
        if let Some(&(off, len)) = reads.get(&r.cookie) {
            let got = c.read_n(len);
            // A read sees the write received right before it (and no later one).
            let idx = others
                .iter()
                .position(|&w| w == r.cookie - 1)
                .expect("write");
            let data = pattern(700 + idx as u64, writes[idx].1);
            assert!(
                got == data,
                "read {off}+{len} right after its write returned other bytes"
            );
        }
        answered.push(r.cookie);
    }
    sender.join().expect("sender").expect("send");
    for w in &others {
        assert!(answered.contains(w), "request {w} was not answered");
    }
    assert_eq!(
        c.read(0, 32 << 20),
        expected,
        "whole volume after the writes"
    );
    drop(c);

    let (dir, data_dir) = d.into_dirs(false);
    let d = Daemon::start_in(dir, data_dir, &[]);
    let mut c = connected(&d);
    assert!(
        c.read(0, 32 << 20) == expected,
        "flushed large writes lost or changed across kill -9"
    );
}
