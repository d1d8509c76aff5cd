//! A raw NBD client for the integration tests, built on nbd-proto's client-side encoders
//! and decoders, so that tests control exactly which bytes are sent and what is in flight
//! when (no real client library sends malformed requests or keeps a precise pipeline).
//!
//! Two styles of use:
//! * step by step: [`Client::connect`] / [`Client::negotiating`] / [`Client::transmission`]
//!   and explicit cookies ([`Client::send_request`], [`Client::write_ok`],
//!   [`Client::read_ok`]);
//! * as a plain client: [`Client::tcp`] / [`Client::unix`], [`Client::handshake`], then
//!   [`Client::write`], [`Client::read`], [`Client::flush`] with cookies chosen for you.
//!
//! Every socket read and write gives up after [`IO_TIMEOUT`]; the `try_` variants return
//! I/O errors instead of failing the test (for tests that kill the server on purpose).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use nbd_proto::consts::*;
use nbd_proto::handshake::{self as hs, GoRequest, Info, OptionReplyHeader};
use nbd_proto::transmission::{self as tx, ChunkHeader, Command, Request, SimpleReply};

use super::{Daemon, pattern};

/// Every socket read and write gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to close a connection it should close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection over TCP or a Unix socket.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// A second handle on the same connection (for a sender thread).
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A client that speaks the wire format byte by byte.
pub struct Client {
    pub s: Sock,
    next_cookie: u64,
}

impl Client {
    /// Connects over TCP (nothing read yet: the greeting is the caller's).
    pub fn tcp(addr: &str) -> Client {
        let s = TcpStream::connect(addr).expect("connect to blockd over TCP");
        let _ = s.set_nodelay(true);
        Client::over(Sock::Tcp(s))
    }

    /// Connects to a Unix socket (nothing read yet).
    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect to blockd's Unix socket");
        Client::over(Sock::Unix(s))
    }

    pub fn over(s: Sock) -> Client {
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        Client { s, next_cookie: 1 }
    }

    /// Connects over TCP and reads the server greeting; returns the client and the
    /// handshake flags.
    pub fn connect(d: &Daemon) -> (Client, u16) {
        let mut c = Client::tcp(&d.nbd);
        let flags = c.greeting();
        (c, flags)
    }

    /// Connects, sends FIXED_NEWSTYLE | NO_ZEROES, and is ready for options.
    pub fn negotiating(d: &Daemon) -> Client {
        let (mut c, flags) = Client::connect(d);
        assert_eq!(
            flags,
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "blockd offers fixed newstyle and no-zeroes"
        );
        c.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c
    }

    /// A client in the transmission phase on `export` (over TCP, GO with a block size
    /// request), with or without structured replies.
    pub fn transmission(d: &Daemon, export: &str, structured: bool) -> Client {
        let mut c = Client::negotiating(d);
        if structured {
            let replies = c.ask(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(types(&replies), vec![REP_ACK]);
        }
        c.go(export);
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to blockd");
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Sends `bytes` from another thread, so that the caller can read replies meanwhile
    /// (a large pipeline sent from the reading thread could deadlock with the server
    /// blocked on sending replies nobody reads).
    pub fn send_in_background(&self, bytes: Vec<u8>) -> JoinHandle<io::Result<()>> {
        let mut writer = self.s.try_clone().expect("clone socket");
        std::thread::spawn(move || writer.write_all(&bytes))
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        self.try_read_n(n)
            .unwrap_or_else(|e| panic!("reading {n} bytes from blockd: {e}"))
    }

    pub fn try_read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.s.read_exact(&mut buf)?;
        Ok(buf)
    }

    // ------------------------------------------------------------ handshake

    /// Reads the server greeting; returns its handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.read_n(GREETING_BYTES);
        hs::decode_greeting(&g).expect("valid NBD greeting")
    }

    pub fn client_flags(&mut self, bits: u32) {
        self.send(&bits.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        hs::encode_option(&mut out, option, data);
        self.send(&out);
    }

    pub fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
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
    pub fn ask(&mut self, option: u32, data: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
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

    /// NBD_OPT_GO on `name` asking for the block size; asserts it succeeds and returns
    /// (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.go_with(name, vec![INFO_BLOCK_SIZE])
    }

    /// NBD_OPT_GO on `name` with these information requests; asserts it succeeds (every
    /// reply before the ACK is an NBD_REP_INFO, the ACK has no payload) and returns (size,
    /// transmission flags).
    pub fn go_with(&mut self, name: &str, info_requests: Vec<u16>) -> (u64, u16) {
        let go = GoRequest {
            name: name.into(),
            info_requests,
        };
        let replies = self.ask(OPT_GO, &go.encode());
        let last = &replies[replies.len() - 1];
        assert_eq!(
            last.0.reply_type,
            REP_ACK,
            "GO {name} failed: reply {:#x}: {}",
            last.0.reply_type,
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

    /// The whole handshake of a plain client on an already connected socket: greeting,
    /// flags, GO (no information requests). Returns (size, transmission flags).
    pub fn handshake(&mut self, export: &str) -> (u64, u16) {
        self.greeting();
        self.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        self.go_with(export, vec![])
    }

    /// Asserts that the server closes the connection within [`CLOSE_TIMEOUT`] without
    /// sending anything more.
    pub fn assert_closed(&mut self, what: &str) {
        self.wait_closed(CLOSE_TIMEOUT, what);
    }

    /// Returns once the server has closed the connection without sending anything more;
    /// fails after `limit`.
    pub fn wait_closed(&mut self, limit: Duration, what: &str) {
        self.s.set_read_timeout(Some(limit)).expect("read timeout");
        let mut buf = [0u8; 4096];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{what}: expected the server to close, got {n} more bytes: {:02x?}",
                &buf[..n.min(64)]
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server did not close the connection within {limit:?}")
            }
            Err(e) => panic!("{what}: unexpected error waiting for the close: {e}"),
        }
    }

    // ------------------------------------------------------------ transmission

    /// The next cookie of the automatic sequence.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a request with an explicit cookie.
    pub fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        self.send(&encode_request(command, flags, cookie, offset, len, data));
    }

    /// Sends a request with the next automatic cookie; returns the cookie.
    pub fn request(&mut self, command: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        let cookie = self.cookie();
        self.send_request(command, flags, cookie, offset, len, data);
        cookie
    }

    pub fn simple_reply(&mut self) -> SimpleReply {
        self.try_simple_reply()
            .unwrap_or_else(|e| panic!("reading a simple reply from blockd: {e}"))
    }

    pub fn try_simple_reply(&mut self) -> io::Result<SimpleReply> {
        let mut h = [0u8; SIMPLE_REPLY_BYTES];
        self.s.read_exact(&mut h)?;
        tx::decode_simple_reply(&h)
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, format!("simple reply: {e:?}")))
    }

    /// Reads one simple reply; returns (cookie, error).
    pub fn reply(&mut self) -> (u64, u32) {
        let r = self.simple_reply();
        (r.cookie, r.error)
    }

    pub fn expect_ok(&mut self, cookie: u64, what: &str) {
        assert_eq!(self.reply(), (cookie, 0), "{what}");
    }

    /// Reads structured chunks until one has the DONE flag.
    pub fn structured_reply(&mut self) -> Vec<(ChunkHeader, Vec<u8>)> {
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

    /// Writes `data` at `offset` with an explicit cookie and waits for success (simple
    /// replies).
    pub fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send_request(CMD_WRITE, 0, cookie, offset, data.len() as u32, data);
        let r = self.simple_reply();
        assert_eq!((r.cookie, r.error), (cookie, 0), "write at {offset}");
    }

    /// Reads `len` bytes at `offset` with an explicit cookie (simple replies).
    pub fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.send_request(CMD_READ, 0, cookie, offset, len, &[]);
        let r = self.simple_reply();
        assert_eq!((r.cookie, r.error), (cookie, 0), "read at {offset}");
        self.read_n(len as usize)
    }

    /// Writes with the given flags and waits for success (simple replies).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) {
        let c = self.request(CMD_WRITE, flags, offset, data.len() as u32, data);
        self.expect_ok(c, &format!("write at {offset}"));
    }

    /// Reads and waits for success (simple replies).
    pub fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let c = self.request(CMD_READ, 0, offset, len as u32, &[]);
        self.expect_ok(c, &format!("read at {offset}"));
        self.read_n(len)
    }

    /// Reads; returns the data, or the NBD error the server answered with.
    pub fn try_read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let c = self.request(CMD_READ, 0, offset, len as u32, &[]);
        let (cookie, error) = self.reply();
        assert_eq!(cookie, c, "reply to the read at {offset}");
        if error != 0 {
            return Err(error);
        }
        Ok(self.read_n(len))
    }

    pub fn flush(&mut self) {
        let c = self.request(CMD_FLUSH, 0, 0, 0, &[]);
        self.expect_ok(c, "flush");
    }

    /// NBD_CMD_DISC, then waits until the server has closed the connection (so that it
    /// no longer counts this client when the next command runs).
    pub fn disconnect(mut self) {
        let c = self.cookie();
        self.send_request(CMD_DISC, 0, c, 0, 0, &[]);
        self.wait_closed(CLOSE_TIMEOUT, "after NBD_CMD_DISC");
    }

    /// A write and a read-back on a simple-reply connection, proving it is still usable.
    pub fn assert_usable(&mut self, seed: u64) {
        let data = pattern(seed, 4096);
        self.write_ok(seed, 8192, &data);
        assert_eq!(
            self.read_ok(seed + 1, 8192, 4096),
            data,
            "read-back after a write"
        );
    }
}

/// One request on the wire, its payload appended.
pub fn encode_request(
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

/// The reply types of a list of option replies.
pub fn types(replies: &[(OptionReplyHeader, Vec<u8>)]) -> Vec<u32> {
    replies.iter().map(|(h, _)| h.reply_type).collect()
}

/// The data of an NBD_OPT_GO (or INFO) for `name` without information requests.
pub fn go_data(name: &str) -> Vec<u8> {
    GoRequest {
        name: name.into(),
        info_requests: vec![],
    }
    .encode()
}
