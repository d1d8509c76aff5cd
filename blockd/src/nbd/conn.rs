//! The transmission phase of one connection.
//!
//! One thread per connection reads requests in batches: a single `read` usually brings
//! every request a client has in flight. Each request is checked by [`check_request`] and
//! run inline against the volume; its reply is appended to a batch that goes out in one
//! socket write when no complete request is left in the input buffer (or the batch is
//! large). Page-cache reads and log appends take microseconds, so running them inline
//! costs less than handing them to another thread, and batching amortises the socket
//! system calls over the queue depth.
//!
//! FLUSH, and writes with FUA, must not be answered before the data is durable. They go to
//! the connection's commit thread through a bounded queue; it drains everything queued,
//! makes it durable with one volume flush (which itself joins the volume-wide group
//! commit), and writes those replies out of order with the rest. A full queue blocks the
//! reader: backpressure, never unbounded memory.
//!
//! Memory per connection is bounded: the input buffer grows to at most one maximal
//! request (header + 32 MiB), the reply batch to `reply_batch_bytes` plus one maximal
//! read, and the commit queue to `max_pending_commits` small records.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use nbd_proto::DecodeError;
use nbd_proto::consts::*;
use nbd_proto::transmission::{self as tx, BlockStatusExtent, Command, Request};
use parking_lot::Mutex;

use super::Limits;
use super::errno::errno_of;
use super::handshake::Session;
use super::stream::Stream;
use crate::metrics::{ConnMetrics, ExportMetrics};
use crate::store::io::AlignedBuf;
use crate::store::{ExtentState, Volume, ZeroMode};

/// Initial size of the input buffer: room for many small requests at once.
const INPUT_BUFFER_BYTES: usize = 256 * 1024;
/// Buffers that grew past this for one large request are shrunk back afterwards.
const SHRINK_ABOVE_BYTES: usize = 4 << 20;
/// Most descriptors in one BLOCK_STATUS reply (the spec allows 2^20; this keeps replies
/// under 1 MiB).
const MAX_STATUS_EXTENTS: usize = 1 << 17;

/// What the client negotiated that decides whether a request is acceptable.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: Option<u32>,
}

/// A request the server answers with an error instead of running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub message: String,
}

fn refuse(errno: u32, message: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        message: message.into(),
    }
}

/// The protocol's rules for a request, given the session: unknown commands and flags are
/// EINVAL, writes to a read-only export EPERM, writes past the end ENOSPC, other requests
/// past the end EINVAL, payloads over the advertised maximum EINVAL.
pub fn check_request(req: &Request, caps: &Caps) -> Result<(), Refusal> {
    let cmd = req.command;
    if let Command::Unknown(n) = cmd {
        return Err(refuse(EINVAL, format!("unknown command {n}")));
    }
    let bad_flags = req.flags & !cmd.allowed_flags();
    if bad_flags != 0 {
        return Err(refuse(
            EINVAL,
            format!("flags {bad_flags:#x} are not valid for {}", cmd.name()),
        ));
    }
    if req.has(CMD_FLAG_DF) && !caps.structured {
        return Err(refuse(EINVAL, "DF requires structured replies"));
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && caps.read_only {
        return Err(refuse(EPERM, "export is read-only"));
    }
    if matches!(cmd, Command::Read | Command::Write) && req.len > MAX_PAYLOAD_BYTES {
        return Err(refuse(
            EINVAL,
            format!(
                "length {} exceeds the maximum payload of {MAX_PAYLOAD_BYTES} bytes",
                req.len
            ),
        ));
    }
    if cmd == Command::BlockStatus {
        if caps.base_allocation.is_none() {
            return Err(refuse(
                EINVAL,
                "no metadata context was negotiated (SET_META_CONTEXT)",
            ));
        }
        if req.len == 0 {
            return Err(refuse(EINVAL, "block status of zero bytes"));
        }
    }
    let ranged = !matches!(cmd, Command::Flush | Command::Disc);
    if ranged {
        let end = req.offset.checked_add(u64::from(req.len));
        if end.is_none_or(|end| end > caps.size) {
            let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err(refuse(
                errno,
                format!(
                    "{} of {} bytes at offset {} is beyond the end of the export ({} bytes)",
                    cmd.name(),
                    req.len,
                    req.offset,
                    caps.size
                ),
            ));
        }
    }
    Ok(())
}

/// Serialised access to the socket's write side, shared by the reader and commit threads.
struct ReplyWriter {
    stream: Mutex<Stream>,
    broken: AtomicBool,
}

impl ReplyWriter {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection already failed",
            ));
        }
        let result = self.stream.lock().write_all(bytes);
        if result.is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
        result
    }
}

/// A reply that waits for durability.
struct Pending {
    cookie: u64,
    command: Command,
    /// When the request was read (for its latency).
    arrived: Instant,
}

/// Why the transmission phase ended.
#[derive(Debug)]
pub enum End {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed its side (or the server is shutting down and closed ours).
    Eof,
    /// The client broke framing (bad magic); the connection was dropped.
    Protocol(DecodeError),
    /// A socket error.
    Io(io::Error),
}

/// Runs the transmission phase until the client leaves, then completes everything in
/// flight and flushes the volume if this connection wrote to it. Counts into `metrics`.
pub fn serve(
    stream: Stream,
    session: Session,
    limits: &Limits,
    metrics: &Arc<ExportMetrics>,
) -> End {
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(ReplyWriter {
            stream: Mutex::new(w),
            broken: AtomicBool::new(false),
        }),
        Err(e) => return End::Io(e),
    };
    let (commit_tx, commit_rx) = sync_channel(limits.max_pending_commits.max(1));
    let volume = session.export.volume.clone();
    let commit_thread = {
        let writer = writer.clone();
        let structured = session.structured;
        let volume = volume.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("nbd-commit".into())
            .stack_size(128 * 1024)
            .spawn(move || commit_loop(commit_rx, &*volume, &writer, structured, &metrics))
    };
    let commit_thread = match commit_thread {
        Ok(t) => t,
        Err(e) => return End::Io(e),
    };
    let volume_direct_min = volume.direct_write_min_bytes();
    let caps = Caps {
        size: volume.size(),
        read_only: volume.is_read_only(),
        structured: session.structured,
        base_allocation: session.base_allocation,
    };
    let mut conn = Conn {
        input: Input {
            stream,
            buf: vec![0; INPUT_BUFFER_BYTES],
            start: 0,
            end: 0,
            arrived: Instant::now(),
        },
        exec: Exec {
            volume,
            caps,
            out: Vec::with_capacity(64 * 1024),
            writer,
            commit: Some(commit_tx),
            dirty: false,
            batch_bytes: limits.reply_batch_bytes,
            metrics: metrics.local(),
            unsent: 0,
            deferred: false,
            arrived: Instant::now(),
        },
        large: None,
        large_from: match volume_direct_min {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        },
        burst: Vec::new(),
    };
    let end = conn.run();
    conn.finish(commit_thread);
    end
}

struct Input {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// When the last read returned: the requests it completed arrived then.
    arrived: Instant,
}

impl Input {
    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads at least once so that more bytes are buffered, making room for a request of
    /// `need` bytes first. Returns false at end of stream.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        if self.buf.len() - self.start < need {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < need {
                self.buf.resize(need.next_multiple_of(64 * 1024), 0);
            }
        }
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    self.arrived = Instant::now();
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > SHRINK_ABOVE_BYTES {
                self.buf.truncate(INPUT_BUFFER_BYTES);
                self.buf.shrink_to_fit();
            }
        }
    }
}

struct Exec {
    volume: Arc<dyn Volume>,
    caps: Caps,
    out: Vec<u8>,
    writer: Arc<ReplyWriter>,
    commit: Option<SyncSender<Pending>>,
    dirty: bool,
    batch_bytes: usize,
    metrics: ConnMetrics,
    /// Requests answered in the reply batch not sent yet.
    unsent: i64,
    /// Set when the request being handled went to the commit thread.
    deferred: bool,
    /// When the request being handled was read.
    arrived: Instant,
}

struct Conn {
    input: Input,
    exec: Exec,
    /// Runs large writes while this thread reads the next request (started on the first).
    large: Option<LargeWriter>,
    /// Write payloads at least this large that have not fully arrived are read from the
    /// socket straight into a page-aligned buffer and handed to `large`: the volume's
    /// direct-write threshold (`serve --direct-writes-from`), since those writes block in
    /// the device and go out without another copy. Smaller writes, such as a database's,
    /// are buffered writes that gain too little from a second thread to pay for the
    /// hand-over (docs/BENCHMARKS.md).
    large_from: usize,
    /// The writes of the burst being handled (kept to reuse its allocation).
    burst: Vec<BurstWrite>,
}

/// Writes at most in one burst handed to the volume at once (`Conn::burst`).
const MAX_BURST_WRITES: usize = 64;

/// A write of a burst: its header and where its payload sits in the input buffer.
struct BurstWrite {
    req: Request,
    payload: std::ops::Range<usize>,
}

/// Large writes at most in the writer's hands at once (running or queued): while one goes
/// to disk, the next is received.
const LARGE_WRITES_IN_FLIGHT: usize = 2;

/// A thread that runs a connection's large writes, so that receiving the next payload
/// from the socket overlaps with writing the last one to disk. Each write is answered by
/// the writer itself. Every other request waits until the writer is idle, so reads,
/// flushes and small writes see every large write received before them completed.
struct LargeWriter {
    queue: Option<SyncSender<(Request, AlignedBuf, usize, Instant)>>,
    /// Buffers come back here once their write was answered.
    done: std::sync::mpsc::Receiver<AlignedBuf>,
    in_flight: usize,
    /// Returned buffers, for reuse (fresh memory is slow to touch on some VMs).
    spare: Vec<AlignedBuf>,
    /// Returns whether the writer wrote anything (for the flush at disconnect).
    thread: Option<JoinHandle<bool>>,
}

impl LargeWriter {
    fn start(exec: &Exec) -> io::Result<LargeWriter> {
        let (queue, jobs) = sync_channel::<(Request, AlignedBuf, usize, Instant)>(1);
        let (done_tx, done) = sync_channel(LARGE_WRITES_IN_FLIGHT + 1);
        let mut worker = exec.sibling();
        let thread = std::thread::Builder::new()
            .name("nbd-write".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for (req, buf, len, arrived) in jobs {
                    worker.handle(&req, &buf.as_slice()[..len], arrived);
                    let _ = worker.send_batch();
                    if done_tx.send(buf).is_err() {
                        break;
                    }
                }
                worker.metrics.publish();
                worker.dirty
            })?;
        Ok(LargeWriter {
            queue: Some(queue),
            done,
            in_flight: 0,
            spare: Vec::new(),
            thread: Some(thread),
        })
    }

    /// A buffer of at least `len` bytes: a spare one, one back from the writer, or new.
    fn buffer(&mut self, len: usize) -> AlignedBuf {
        while let Ok(b) = self.done.try_recv() {
            self.in_flight -= 1;
            self.keep(b);
        }
        if let Some(i) = self.spare.iter().position(|b| b.len() >= len) {
            return self.spare.swap_remove(i);
        }
        if self.in_flight >= LARGE_WRITES_IN_FLIGHT
            && let Ok(b) = self.done.recv()
        {
            self.in_flight -= 1;
            if b.len() >= len {
                return b;
            }
        }
        AlignedBuf::new(len.next_multiple_of(64 * 1024))
    }

    /// Hands a write over; gives the buffer back if the writer is gone.
    fn submit(
        &mut self,
        req: Request,
        buf: AlignedBuf,
        len: usize,
        arrived: Instant,
    ) -> Option<AlignedBuf> {
        let Some(q) = &self.queue else {
            return Some(buf);
        };
        match q.send((req, buf, len, arrived)) {
            Ok(()) => {
                self.in_flight += 1;
                None
            }
            Err(e) => Some(e.0.1),
        }
    }

    /// Keeps a returned buffer for reuse unless it is large or enough are kept.
    fn keep(&mut self, b: AlignedBuf) {
        if b.len() <= SHRINK_ABOVE_BYTES && self.spare.len() < LARGE_WRITES_IN_FLIGHT {
            self.spare.push(b);
        }
    }

    /// Waits until every large write handed over was answered.
    fn drain(&mut self) {
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(b) => {
                    self.in_flight -= 1;
                    self.keep(b);
                }
                Err(_) => self.in_flight = 0,
            }
        }
    }

    /// Lets the writer finish; returns whether it wrote anything.
    fn stop(&mut self) -> bool {
        self.queue = None;
        self.drain();
        self.thread.take().is_some_and(|t| t.join().unwrap_or(true))
    }
}

impl Conn {
    fn run(&mut self) -> End {
        match self.run_inner() {
            Ok(end) => end,
            Err(e) => End::Io(e),
        }
    }

    fn run_inner(&mut self) -> io::Result<End> {
        loop {
            if self.input.buffered() < REQUEST_BYTES {
                self.exec.send_batch()?;
                if !self.input.fill(REQUEST_BYTES)? {
                    return Ok(End::Eof);
                }
                continue;
            }
            let at = self.input.start;
            let req = match tx::decode_request(&self.input.buf[at..at + REQUEST_BYTES]) {
                Ok(req) => req,
                Err(e) => return Ok(End::Protocol(e)),
            };
            let payload_len = req.payload_len() as usize;
            if req.command == Command::Write && req.len > MAX_PAYLOAD_BYTES {
                // Too large to accept: skip the payload without buffering it, then refuse.
                self.input.consume(REQUEST_BYTES);
                if !self.discard(payload_len as u64)? {
                    return Ok(End::Eof);
                }
                self.exec.handle(&req, &[], self.input.arrived);
                continue;
            }
            let total = REQUEST_BYTES + payload_len;
            if req.command == Command::Write
                && payload_len >= self.large_from
                && self.input.buffered() < total
            {
                if !self.large_write(req, payload_len)? {
                    return Ok(End::Eof);
                }
                continue;
            }
            if let Some(l) = &mut self.large {
                l.drain();
            }
            if self.input.buffered() < total {
                self.exec.send_batch()?;
                if !self.input.fill(total)? {
                    return Ok(End::Eof);
                }
                continue;
            }
            if req.command == Command::Write && self.burst(at, req, total) > 1 {
                let used = self.burst.last().map_or(total, |w| w.payload.end - at);
                self.exec
                    .handle_burst(&self.input.buf, &self.burst, self.input.arrived);
                self.input.consume(used);
                if self.exec.out.len() >= self.exec.batch_bytes {
                    self.exec.send_batch()?;
                }
                continue;
            }
            let payload = &self.input.buf[at + REQUEST_BYTES..at + total];
            let disc = self.exec.handle(&req, payload, self.input.arrived);
            self.input.consume(total);
            if disc {
                return Ok(End::Disconnect);
            }
            if self.exec.out.len() >= self.exec.batch_bytes {
                self.exec.send_batch()?;
            }
        }
    }

    /// Collects into `self.burst` the write `req` (header at `at`, `total` bytes with its
    /// payload, all buffered) and the writes right behind it that are buffered whole, are
    /// acceptable and below `large_from`, up to `MAX_BURST_WRITES`. Returns how many.
    fn burst(&mut self, at: usize, req: Request, total: usize) -> usize {
        self.burst.clear();
        if check_request(&req, &self.exec.caps).is_err() || total - REQUEST_BYTES >= self.large_from
        {
            return 0;
        }
        self.burst.push(BurstWrite {
            req,
            payload: at + REQUEST_BYTES..at + total,
        });
        let mut next = at + total;
        while self.burst.len() < MAX_BURST_WRITES && self.input.end - next >= REQUEST_BYTES {
            let Ok(req) = tx::decode_request(&self.input.buf[next..next + REQUEST_BYTES]) else {
                break;
            };
            let len = req.payload_len() as usize;
            if req.command != Command::Write
                || len >= self.large_from
                || self.input.end - next - REQUEST_BYTES < len
                || check_request(&req, &self.exec.caps).is_err()
            {
                break;
            }
            let payload = next + REQUEST_BYTES..next + REQUEST_BYTES + len;
            next = payload.end;
            self.burst.push(BurstWrite { req, payload });
        }
        self.burst.len()
    }

    /// Handles a write whose payload has not fully arrived: the payload is read into an
    /// aligned buffer (what is buffered copied, the rest read straight into place) and
    /// handed to the large-write thread. Returns false at end of stream.
    fn large_write(&mut self, req: Request, len: usize) -> io::Result<bool> {
        self.exec.send_batch()?;
        if self.large.is_none() {
            self.large = Some(LargeWriter::start(&self.exec)?);
        }
        let Some(large) = &mut self.large else {
            return Ok(false);
        };
        let mut buf = large.buffer(len);
        let dst = &mut buf.as_mut_slice()[..len];
        let have = self.input.buffered() - REQUEST_BYTES;
        let from = self.input.start + REQUEST_BYTES;
        dst[..have].copy_from_slice(&self.input.buf[from..from + have]);
        self.input.consume(REQUEST_BYTES + have);
        let mut got = have;
        while got < len {
            match self.input.stream.read(&mut dst[got..]) {
                Ok(0) => return Ok(false),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.input.arrived = Instant::now();
        if let Some(buf) = large.submit(req, buf, len, self.input.arrived) {
            // The writer thread is gone (it panicked): run the write here.
            self.exec
                .handle(&req, &buf.as_slice()[..len], self.input.arrived);
        }
        Ok(true)
    }

    /// Skips `n` payload bytes. Returns false at end of stream.
    fn discard(&mut self, mut n: u64) -> io::Result<bool> {
        while n > 0 {
            if self.input.buffered() == 0 {
                self.exec.send_batch()?;
                if !self.input.fill(1)? {
                    return Ok(false);
                }
            }
            let k = (self.input.buffered() as u64).min(n) as usize;
            self.input.consume(k);
            n -= k as u64;
        }
        Ok(true)
    }

    /// Sends what is batched, lets the commit thread answer everything queued, and flushes
    /// the volume if this connection wrote to it (data is durable after a clean
    /// disconnect).
    fn finish(&mut self, commit_thread: JoinHandle<()>) {
        if let Some(mut l) = self.large.take()
            && l.stop()
        {
            self.exec.dirty = true;
        }
        let _ = self.exec.send_batch();
        self.exec.commit = None;
        let _ = commit_thread.join();
        if self.exec.dirty
            && let Err(e) = self.exec.volume.flush()
        {
            tracing::warn!(error = %e, "flush at disconnect failed");
        }
        self.exec.metrics.publish();
        let _ = self.input.stream.shutdown(Shutdown::Both);
    }
}

impl Exec {
    /// Another executor for the same connection (the large-write thread's): same volume,
    /// reply stream and commit queue, its own reply buffer and metric counters.
    fn sibling(&self) -> Exec {
        Exec {
            volume: self.volume.clone(),
            caps: self.caps,
            out: Vec::with_capacity(4096),
            writer: self.writer.clone(),
            commit: self.commit.clone(),
            dirty: false,
            batch_bytes: self.batch_bytes,
            metrics: self.metrics.shared().local(),
            unsent: 0,
            deferred: false,
            arrived: Instant::now(),
        }
    }

    /// Sends the reply batch; also publishes the connection's counts, since the connection
    /// may block on the socket next.
    fn send_batch(&mut self) -> io::Result<()> {
        self.metrics.publish();
        if self.out.is_empty() {
            return Ok(());
        }
        // Counted per batch, not per request: the gauge is shared by the export's
        // connections.
        let unsent = std::mem::take(&mut self.unsent);
        let in_flight = &self.metrics.shared().in_flight;
        in_flight.add(unsent);
        let result = self.writer.send(&self.out);
        in_flight.sub(unsent);
        self.out.clear();
        if self.out.capacity() > SHRINK_ABOVE_BYTES {
            self.out.shrink_to(64 * 1024);
        }
        result
    }

    fn error_reply(&mut self, cookie: u64, errno: u32, message: &str) {
        self.metrics.shared().error(errno);
        if self.caps.structured {
            tx::encode_error_chunk(&mut self.out, cookie, errno, message, true);
        } else {
            tx::encode_simple_reply(&mut self.out, cookie, errno);
        }
    }

    fn ok_reply(&mut self, cookie: u64) {
        tx::encode_simple_reply(&mut self.out, cookie, 0);
    }

    /// Queues a reply that must wait until the volume is flushed.
    fn after_commit(&mut self, req: &Request) {
        let pending = Pending {
            cookie: req.cookie,
            command: req.command,
            arrived: self.arrived,
        };
        let Some(queue) = self.commit.clone() else {
            return self.error_reply(req.cookie, EIO, "connection is closing");
        };
        // Counted before the commit thread can answer it, so the gauge never dips below 0.
        let in_flight = self.metrics.shared().in_flight.clone();
        in_flight.inc();
        let sent = match queue.try_send(pending) {
            Ok(()) => true,
            // A full queue blocks here; send what is batched first so the client can make
            // progress while we wait.
            Err(std::sync::mpsc::TrySendError::Full(p)) => {
                let _ = self.send_batch();
                queue.send(p).is_ok()
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        };
        if sent {
            self.deferred = true;
        } else {
            in_flight.dec();
            self.error_reply(req.cookie, EIO, "connection is closing");
        }
    }

    /// Runs one request and counts it. Returns true for NBD_CMD_DISC.
    fn handle(&mut self, req: &Request, payload: &[u8], arrived: Instant) -> bool {
        self.metrics.request(req.command);
        self.deferred = false;
        self.arrived = arrived;
        let disc = self.run(req, payload);
        self.answered(req.command, arrived);
        disc
    }

    /// Counts a request whose reply is in the batch (not one left to the commit thread).
    fn answered(&mut self, command: Command, arrived: Instant) {
        if !self.deferred {
            self.unsent += 1;
            self.metrics.observe(command, arrived.elapsed());
        }
    }

    /// Runs a burst of writes (checked by `check_request`, payloads in `buf`) with one
    /// `write_many`, so the store can append them at once, and answers each: a FUA write
    /// once it is durable, every write with the error if the burst failed.
    fn handle_burst(&mut self, buf: &[u8], burst: &[BurstWrite], arrived: Instant) {
        let writes: Vec<(u64, &[u8])> = burst
            .iter()
            .map(|w| (w.req.offset, &buf[w.payload.clone()]))
            .collect();
        for w in burst {
            self.metrics.request(w.req.command);
        }
        self.dirty = true;
        let result = self
            .volume
            .write_many(&writes)
            .map_err(|e| (errno_of(&e), e.to_string()));
        for (w, (_, data)) in burst.iter().zip(&writes) {
            self.deferred = false;
            self.arrived = arrived;
            match &result {
                Err((errno, message)) => self.error_reply(w.req.cookie, *errno, message),
                Ok(()) => {
                    self.metrics.write_bytes(data.len() as u64);
                    if w.req.has(CMD_FLAG_FUA) {
                        self.after_commit(&w.req);
                    } else {
                        self.ok_reply(w.req.cookie);
                    }
                }
            }
            self.answered(w.req.command, arrived);
        }
    }

    /// Runs one request. Returns true for NBD_CMD_DISC.
    fn run(&mut self, req: &Request, payload: &[u8]) -> bool {
        if let Err(r) = check_request(req, &self.caps) {
            self.error_reply(req.cookie, r.errno, &r.message);
            return false;
        }
        let fua = req.has(CMD_FLAG_FUA);
        let result = match req.command {
            Command::Disc => return true,
            Command::Read => {
                self.read(req);
                return false;
            }
            Command::BlockStatus => {
                self.block_status(req);
                return false;
            }
            Command::Flush => {
                self.after_commit(req);
                return false;
            }
            Command::Cache => self.volume.cache(req.offset, u64::from(req.len)),
            Command::Write => {
                self.dirty = true;
                self.volume.write(req.offset, payload)
            }
            Command::Trim => {
                self.dirty = true;
                self.volume.trim(req.offset, u64::from(req.len))
            }
            Command::WriteZeroes => {
                self.dirty = true;
                let mode = ZeroMode {
                    may_trim: !req.has(CMD_FLAG_NO_HOLE),
                    fast_only: req.has(CMD_FLAG_FAST_ZERO),
                };
                self.volume
                    .write_zeroes(req.offset, u64::from(req.len), mode)
            }
            Command::Unknown(n) => {
                // check_request refuses these; answer again rather than trust that here.
                self.error_reply(req.cookie, EINVAL, &format!("unknown command {n}"));
                return false;
            }
        };
        if result.is_ok() && req.command == Command::Write {
            self.metrics.write_bytes(payload.len() as u64);
        }
        match result {
            Err(e) => self.error_reply(req.cookie, errno_of(&e), &e.to_string()),
            Ok(()) if fua && req.command != Command::Cache => self.after_commit(req),
            Ok(()) => self.ok_reply(req.cookie),
        }
        false
    }

    fn read(&mut self, req: &Request) {
        let len = req.len as usize;
        if self.out.len() + len > self.batch_bytes && !self.out.is_empty() {
            // Keep the batch bounded; a failed send shows up on the next one.
            let _ = self.send_batch();
        }
        let mark = self.out.len();
        if self.caps.structured {
            if len == 0 {
                tx::encode_none_chunk(&mut self.out, req.cookie);
                return;
            }
            tx::encode_offset_data_header(&mut self.out, req.cookie, req.offset, req.len, true);
        } else {
            tx::encode_simple_reply(&mut self.out, req.cookie, 0);
        }
        let data_at = self.out.len();
        self.out.resize(data_at + len, 0);
        match self.volume.read(req.offset, &mut self.out[data_at..]) {
            Ok(()) => self.metrics.read_bytes(len as u64),
            Err(e) => {
                self.out.truncate(mark);
                self.error_reply(req.cookie, errno_of(&e), &e.to_string());
            }
        }
    }

    fn block_status(&mut self, req: &Request) {
        let Some(context) = self.caps.base_allocation else {
            return self.error_reply(req.cookie, EINVAL, "no metadata context");
        };
        let req_one = req.has(CMD_FLAG_REQ_ONE);
        let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
        let extents = match self
            .volume
            .block_status(req.offset, u64::from(req.len), max)
        {
            Ok(e) => e,
            Err(e) => return self.error_reply(req.cookie, errno_of(&e), &e.to_string()),
        };
        let mut wire: Vec<BlockStatusExtent> = Vec::with_capacity(extents.len().min(1024));
        for e in extents {
            let flags = match e.state {
                ExtentState::Data => 0,
                ExtentState::Zero => STATE_ZERO,
                ExtentState::Hole => STATE_HOLE | STATE_ZERO,
            };
            // Extents lie within the request, whose length fits in 32 bits.
            let len = u32::try_from(e.len).unwrap_or(u32::MAX);
            if len == 0 {
                continue;
            }
            match wire.last_mut() {
                Some(last) if last.flags == flags => {
                    last.len = last.len.saturating_add(len).min(req.len);
                }
                _ => wire.push(BlockStatusExtent { len, flags }),
            }
        }
        if wire.is_empty() {
            return self.error_reply(req.cookie, EIO, "volume reported no extents");
        }
        if req_one {
            wire.truncate(1);
            wire[0].len = wire[0].len.min(req.len);
        }
        tx::encode_block_status(&mut self.out, req.cookie, context, &wire, true);
    }
}

/// The commit thread: drains queued replies, flushes once for all of them, answers them.
fn commit_loop(
    rx: Receiver<Pending>,
    volume: &dyn Volume,
    writer: &ReplyWriter,
    structured: bool,
    metrics: &ExportMetrics,
) {
    let mut out = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = volume.flush();
        out.clear();
        for p in &batch {
            match &result {
                Ok(()) => tx::encode_simple_reply(&mut out, p.cookie, 0),
                Err(e) if structured => {
                    let msg = format!("{} failed: {e}", p.command.name());
                    tx::encode_error_chunk(&mut out, p.cookie, errno_of(e), &msg, true);
                }
                Err(e) => tx::encode_simple_reply(&mut out, p.cookie, errno_of(e)),
            }
            if let Err(e) = &result {
                metrics.error(errno_of(e));
            }
            metrics.observe_shared(p.command, p.arrived.elapsed());
        }
        // On a dead socket keep draining so the reader never blocks on a full queue.
        let _ = writer.send(&out);
        metrics.in_flight.sub(batch.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            size: 1 << 20,
            read_only: false,
            structured: true,
            base_allocation: Some(1),
        }
    }

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn refusals_follow_the_spec() {
        let c = caps();
        let ro = Caps {
            read_only: true,
            ..c
        };
        let plain = Caps {
            structured: false,
            base_allocation: None,
            ..c
        };
        let cases: Vec<(Request, Caps, Option<u32>)> = vec![
            (req(Command::Read, 0, 0, 4096), c, None),
            (req(Command::Read, 0, (1 << 20) - 1, 2), c, Some(EINVAL)),
            (req(Command::Read, 0, u64::MAX, 1), c, Some(EINVAL)),
            (req(Command::Write, 0, 1 << 20, 1), c, Some(ENOSPC)),
            (req(Command::WriteZeroes, 0, 1 << 20, 1), c, Some(ENOSPC)),
            (req(Command::Trim, 0, 1 << 20, 1), c, Some(EINVAL)),
            (req(Command::Write, 0, 0, 1), ro, Some(EPERM)),
            (req(Command::Trim, 0, 0, 1), ro, Some(EPERM)),
            (req(Command::WriteZeroes, 0, 0, 1), ro, Some(EPERM)),
            (req(Command::Read, 0, 0, 1), ro, None),
            (req(Command::Unknown(42), 0, 0, 0), c, Some(EINVAL)),
            (req(Command::Read, 1 << 9, 0, 1), c, Some(EINVAL)),
            (req(Command::Write, CMD_FLAG_NO_HOLE, 0, 1), c, Some(EINVAL)),
            (req(Command::Read, CMD_FLAG_DF, 0, 1), plain, Some(EINVAL)),
            (req(Command::Read, CMD_FLAG_DF, 0, 1), c, None),
            (
                req(Command::Read, 0, 0, MAX_PAYLOAD_BYTES + 1),
                Caps {
                    size: u64::MAX,
                    ..c
                },
                Some(EINVAL),
            ),
            (req(Command::BlockStatus, 0, 0, 1), plain, Some(EINVAL)),
            (req(Command::BlockStatus, 0, 0, 0), c, Some(EINVAL)),
            (
                req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 4096),
                c,
                None,
            ),
            (req(Command::Flush, CMD_FLAG_FUA, 0, 0), c, None),
            (
                req(
                    Command::WriteZeroes,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                    0,
                    4096,
                ),
                c,
                None,
            ),
            (req(Command::Read, 0, 1 << 20, 0), c, None),
        ];
        for (r, caps, want) in cases {
            let got = check_request(&r, &caps).err().map(|x| x.errno);
            assert_eq!(got, want, "{r:?} with {caps:?}");
        }
    }
}
