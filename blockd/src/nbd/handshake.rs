//! The fixed-newstyle handshake, as a pure state machine plus a small blocking driver.
//!
//! ```text
//!            greeting sent
//!                 |
//!                 v
//!        +-- AwaitFlags --bad flags / EOF / deadline--> Closed
//!        |        |
//!        |        v
//!        |     Options <---------------------------------+
//!        |        |  LIST, INFO, STRUCTURED_REPLY,       |
//!        |        |  LIST/SET_META_CONTEXT, unknown ------+  (each answered, stay)
//!        |        |
//!        |        +--ABORT (ACK)----------------------------> Closed
//!        |        +--EXPORT_NAME unknown / over limits------> Closed (hard disconnect)
//!        |        +--EXPORT_NAME known (size, flags)--------> Transmission
//!        |        +--GO known (INFO..., ACK)----------------> Transmission
//!        |        +--GO unknown (ERR_UNKNOWN)--> Options
//! ```
//!
//! [`Negotiator::on_option`] takes one decoded option, appends the reply bytes and
//! says what happens next; it touches no socket, so it is tested byte for byte.
//! [`negotiate`] drives it over a stream with the handshake deadline.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use nbd_proto::consts::*;
use nbd_proto::handshake::{
    self as hs, ClientFlags, ClientOption, GoRequest, InvalidOption, MetaContextRequest,
};

use super::stream::Stream;
use super::{BLOCK_SIZE, ExportError, ExportInfo, ExportSource, OpenExport};

/// Handshake flags blockd offers.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
/// Options accepted in one handshake before the server gives up on the client.
pub const MAX_OPTIONS_PER_HANDSHAKE: usize = 1024;
/// The metadata context id blockd hands out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the client negotiated, carried into the transmission phase.
#[derive(Debug, Clone)]
pub struct Session {
    pub export: Arc<OpenExport>,
    pub flags: u16,
    pub structured: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
}

/// The next step after an option.
#[derive(Debug)]
pub enum Step {
    Continue,
    Close,
    Transmit(Box<Session>),
}

/// Transmission flags for an export, given what has been negotiated.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut flags =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// The option-haggling state of one connection.
pub struct Negotiator<'a> {
    source: &'a dyn ExportSource,
    client: ClientFlags,
    structured: bool,
    /// Export name the last successful SET_META_CONTEXT selected base:allocation for.
    meta_export: Option<String>,
}

impl<'a> Negotiator<'a> {
    pub fn new(source: &'a dyn ExportSource, client: ClientFlags) -> Self {
        Negotiator {
            source,
            client,
            structured: false,
            meta_export: None,
        }
    }

    /// Handles one option. Replies are appended to `out`, which the caller sends before
    /// acting on the returned step.
    pub fn on_option(
        &mut self,
        option: u32,
        decoded: Result<ClientOption, InvalidOption>,
        out: &mut Vec<u8>,
    ) -> Step {
        let opt = match decoded {
            Ok(opt) => opt,
            Err(invalid) => {
                if option == OPT_EXPORT_NAME {
                    // EXPORT_NAME cannot be answered with an error.
                    return Step::Close;
                }
                hs::encode_rep_error(out, option, REP_ERR_INVALID, &invalid.message);
                return Step::Continue;
            }
        };
        match opt {
            ClientOption::Abort => {
                hs::encode_rep_ack(out, option);
                Step::Close
            }
            ClientOption::List => {
                for e in self.source.list() {
                    hs::encode_rep_server(out, option, &e.name, &e.description);
                }
                hs::encode_rep_ack(out, option);
                Step::Continue
            }
            ClientOption::StartTls => {
                hs::encode_rep_error(
                    out,
                    option,
                    REP_ERR_UNSUP,
                    "this blockd does not offer TLS; connect without TLS over loopback or a \
                     trusted network",
                );
                Step::Continue
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                hs::encode_rep_ack(out, option);
                Step::Continue
            }
            ClientOption::ListMetaContext(req) => {
                self.list_meta_context(option, &req, out);
                Step::Continue
            }
            ClientOption::SetMetaContext(req) => {
                self.set_meta_context(option, &req, out);
                Step::Continue
            }
            ClientOption::Info(req) => {
                match self.source.describe(&req.name) {
                    Ok(info) => {
                        self.encode_info(option, &req, &info, out);
                        hs::encode_rep_ack(out, option);
                    }
                    Err(e) => self.encode_export_error(option, &req.name, &e, out),
                }
                Step::Continue
            }
            ClientOption::Go(req) => match self.source.open(&req.name) {
                Ok(export) => {
                    let info = ExportInfo {
                        name: export.name.clone(),
                        description: String::new(),
                        size: export.volume.size(),
                        read_only: export.volume.is_read_only(),
                    };
                    let info = match self.source.describe(&req.name) {
                        Ok(described) => ExportInfo {
                            description: described.description,
                            ..info
                        },
                        Err(_) => info,
                    };
                    self.encode_info(option, &req, &info, out);
                    hs::encode_rep_ack(out, option);
                    Step::Transmit(Box::new(self.session(export, &req.name)))
                }
                Err(e) => {
                    self.encode_export_error(option, &req.name, &e, out);
                    Step::Continue
                }
            },
            ClientOption::ExportName(name) => match self.source.open(&name) {
                Ok(export) => {
                    let session = self.session(export, &name);
                    hs::encode_export_name_reply(
                        out,
                        session.export.volume.size(),
                        session.flags,
                        self.client.no_zeroes,
                    );
                    Step::Transmit(Box::new(session))
                }
                Err(_) => Step::Close,
            },
            ClientOption::Unsupported(code) => {
                hs::encode_rep_error(
                    out,
                    code,
                    REP_ERR_UNSUP,
                    &format!("option {code} is not supported by blockd"),
                );
                Step::Continue
            }
        }
    }

    fn session(&self, export: Arc<OpenExport>, name: &str) -> Session {
        let read_only = export.volume.is_read_only();
        let base_allocation = match &self.meta_export {
            Some(n) if n == name && self.structured => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        Session {
            export,
            flags: transmission_flags(read_only, self.structured),
            structured: self.structured,
            base_allocation,
        }
    }

    fn encode_info(&self, option: u32, req: &GoRequest, info: &ExportInfo, out: &mut Vec<u8>) {
        hs::encode_rep_info_export(
            out,
            option,
            info.size,
            transmission_flags(info.read_only, self.structured),
        );
        if req.wants(INFO_NAME) {
            hs::encode_rep_info_name(out, option, &info.name);
        }
        if req.wants(INFO_DESCRIPTION) && !info.description.is_empty() {
            hs::encode_rep_info_description(out, option, &info.description);
        }
        if req.wants(INFO_BLOCK_SIZE) {
            hs::encode_rep_info_block_size(out, option, BLOCK_SIZE);
        }
    }

    fn encode_export_error(&self, option: u32, name: &str, err: &ExportError, out: &mut Vec<u8>) {
        match err {
            ExportError::Unknown(msg) => {
                let msg = if name.is_empty() {
                    "blockd has no default export: name a volume (nbd://HOST:PORT/VOLUME or \
                     VOLUME@SNAPSHOT); `nbdinfo --list` shows them"
                        .to_string()
                } else {
                    msg.clone()
                };
                hs::encode_rep_error(out, option, REP_ERR_UNKNOWN, &msg);
            }
            ExportError::Unavailable(msg) => hs::encode_rep_error(out, option, REP_ERR_POLICY, msg),
        }
    }

    /// The contexts of `req` that select `base:allocation`, or an error reply already written.
    fn matching_contexts(
        &self,
        option: u32,
        req: &MetaContextRequest,
        listing: bool,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        if !self.structured {
            hs::encode_rep_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts",
            );
            return None;
        }
        if let Err(e) = self.source.describe(&req.export) {
            self.encode_export_error(option, &req.export, &e, out);
            return None;
        }
        let selects = |q: &str| q == META_BASE_ALLOCATION || (listing && q == "base:");
        Some((listing && req.queries.is_empty()) || req.queries.iter().any(|q| selects(q)))
    }

    fn list_meta_context(&self, option: u32, req: &MetaContextRequest, out: &mut Vec<u8>) {
        if let Some(found) = self.matching_contexts(option, req, true, out) {
            if found {
                // Ids in LIST replies are reserved and sent as zero.
                hs::encode_rep_meta_context(out, option, 0, META_BASE_ALLOCATION);
            }
            hs::encode_rep_ack(out, option);
        }
    }

    fn set_meta_context(&mut self, option: u32, req: &MetaContextRequest, out: &mut Vec<u8>) {
        // SET replaces the previous selection even when it fails.
        self.meta_export = None;
        if let Some(found) = self.matching_contexts(option, req, false, out) {
            if found {
                hs::encode_rep_meta_context(out, option, BASE_ALLOCATION_ID, META_BASE_ALLOCATION);
                self.meta_export = Some(req.export.clone());
            }
            hs::encode_rep_ack(out, option);
        }
    }
}

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("client did not finish the handshake in time")]
    Timeout,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("I/O error during handshake: {0}")]
    Io(#[from] io::Error),
}

/// Drives the handshake on `stream` until transmission, a close, or the deadline.
/// Returns `Ok(None)` when the client aborted politely.
pub fn negotiate(
    stream: &mut Stream,
    source: &dyn ExportSource,
    deadline: Instant,
) -> Result<Option<Session>, HandshakeError> {
    let mut io = DeadlineIo { stream, deadline };
    let mut out = Vec::with_capacity(256);
    hs::encode_greeting(&mut out, HANDSHAKE_FLAGS);
    io.write_all(&out)?;

    let mut flags = [0u8; CLIENT_FLAGS_BYTES];
    io.read_exact(&mut flags)?;
    let client = hs::decode_client_flags(&flags, HANDSHAKE_FLAGS)
        .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    let mut negotiator = Negotiator::new(source, client);

    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS_PER_HANDSHAKE {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        io.read_exact(&mut header)?;
        let header = hs::decode_option_header(&header)
            .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        out.clear();
        let step = if header.len > MAX_OPTION_DATA_BYTES {
            io.discard(u64::from(header.len))?;
            if header.option == OPT_EXPORT_NAME {
                Step::Close
            } else {
                hs::encode_rep_error(
                    &mut out,
                    header.option,
                    REP_ERR_TOO_BIG,
                    &format!(
                        "option data of {} bytes exceeds the limit of {MAX_OPTION_DATA_BYTES}",
                        header.len
                    ),
                );
                Step::Continue
            }
        } else {
            data.resize(header.len as usize, 0);
            io.read_exact(&mut data)?;
            let decoded = hs::decode_option(header.option, &data);
            negotiator.on_option(header.option, decoded, &mut out)
        };
        if !out.is_empty() {
            io.write_all(&out)?;
        }
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(session) => return Ok(Some(*session)),
        }
    }
    Err(HandshakeError::Protocol(format!(
        "more than {MAX_OPTIONS_PER_HANDSHAKE} options without entering transmission"
    )))
}

/// Blocking reads and writes that give up at a deadline.
struct DeadlineIo<'a> {
    stream: &'a mut Stream,
    deadline: Instant,
}

impl DeadlineIo<'_> {
    fn arm(&self) -> Result<(), HandshakeError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout);
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))?;
        Ok(())
    }

    fn map(e: io::Error) -> HandshakeError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => HandshakeError::Closed,
            _ => HandshakeError::Io(e),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), HandshakeError> {
        let mut done = 0;
        while done < buf.len() {
            self.arm()?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::map(e)),
            }
        }
        Ok(())
    }

    fn discard(&mut self, mut n: u64) -> Result<(), HandshakeError> {
        let mut sink = [0u8; 8192];
        while n > 0 {
            let k = n.min(sink.len() as u64) as usize;
            self.read_exact(&mut sink[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), HandshakeError> {
        self.arm()?;
        self.stream.write_all(buf).map_err(Self::map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Extent, Result as StoreResult, Volume, ZeroMode};

    struct NullVolume(u64, bool);
    impl Volume for NullVolume {
        fn size(&self) -> u64 {
            self.0
        }
        fn is_read_only(&self) -> bool {
            self.1
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> StoreResult<()> {
            buf.fill(0);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> StoreResult<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> StoreResult<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode) -> StoreResult<()> {
            Ok(())
        }
        fn flush(&self) -> StoreResult<()> {
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64, _: usize) -> StoreResult<Vec<Extent>> {
            Ok(vec![Extent {
                len,
                state: crate::store::ExtentState::Hole,
            }])
        }
    }

    struct OneExport;
    impl ExportSource for OneExport {
        fn list(&self) -> Vec<ExportInfo> {
            vec![ExportInfo {
                name: "db".into(),
                description: "d".into(),
                size: 4096,
                read_only: false,
            }]
        }
        fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
            self.list()
                .into_iter()
                .find(|e| e.name == name)
                .ok_or_else(|| ExportError::Unknown(format!("no export {name}")))
        }
        fn open(&self, name: &str) -> Result<Arc<OpenExport>, ExportError> {
            self.describe(name)?;
            Ok(Arc::new(OpenExport {
                name: name.into(),
                volume: Arc::new(NullVolume(4096, false)),
            }))
        }
    }

    fn reply_types(mut bytes: &[u8]) -> Vec<u32> {
        let mut types = Vec::new();
        while !bytes.is_empty() {
            let h = hs::decode_option_reply_header(bytes).expect("reply header");
            types.push(h.reply_type);
            bytes = &bytes[OPTION_REPLY_HEADER_BYTES + h.len as usize..];
        }
        types
    }

    #[test]
    fn unknown_option_gets_unsup_and_negotiation_continues() {
        let mut n = Negotiator::new(&OneExport, ClientFlags::default());
        let mut out = Vec::new();
        let step = n.on_option(
            OPT_EXTENDED_HEADERS,
            hs::decode_option(OPT_EXTENDED_HEADERS, &[]),
            &mut out,
        );
        assert!(matches!(step, Step::Continue));
        assert_eq!(reply_types(&out), vec![REP_ERR_UNSUP]);
        let step = n.on_option(999, hs::decode_option(999, b"junk"), &mut out);
        assert!(matches!(step, Step::Continue));
    }

    #[test]
    fn go_sends_export_info_then_ack_and_enters_transmission() {
        let mut n = Negotiator::new(&OneExport, ClientFlags::default());
        let mut out = Vec::new();
        n.on_option(
            OPT_STRUCTURED_REPLY,
            Ok(ClientOption::StructuredReply),
            &mut out,
        );
        out.clear();
        let req = GoRequest {
            name: "db".into(),
            info_requests: vec![INFO_BLOCK_SIZE],
        };
        let step = n.on_option(OPT_GO, Ok(ClientOption::Go(req)), &mut out);
        let Step::Transmit(session) = step else {
            panic!("expected transmission")
        };
        assert!(session.structured);
        assert_eq!(reply_types(&out), vec![REP_INFO, REP_INFO, REP_ACK]);
        assert!(session.flags & FLAG_SEND_DF != 0);
        assert!(session.flags & FLAG_CAN_MULTI_CONN != 0);
        assert_eq!(session.base_allocation, None);
    }

    #[test]
    fn go_to_unknown_export_is_an_error_not_a_disconnect() {
        let mut n = Negotiator::new(&OneExport, ClientFlags::default());
        let mut out = Vec::new();
        let req = GoRequest {
            name: "nope".into(),
            info_requests: vec![],
        };
        let step = n.on_option(OPT_GO, Ok(ClientOption::Go(req)), &mut out);
        assert!(matches!(step, Step::Continue));
        assert_eq!(reply_types(&out), vec![REP_ERR_UNKNOWN]);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_selects_only_base_allocation() {
        let mut n = Negotiator::new(&OneExport, ClientFlags::default());
        let mut out = Vec::new();
        let req = MetaContextRequest {
            export: "db".into(),
            queries: vec![META_BASE_ALLOCATION.into()],
        };
        n.on_option(
            OPT_SET_META_CONTEXT,
            Ok(ClientOption::SetMetaContext(req.clone())),
            &mut out,
        );
        assert_eq!(reply_types(&out), vec![REP_ERR_INVALID]);
        out.clear();
        n.on_option(
            OPT_STRUCTURED_REPLY,
            Ok(ClientOption::StructuredReply),
            &mut out,
        );
        out.clear();
        let both = MetaContextRequest {
            export: "db".into(),
            queries: vec!["qemu:dirty-bitmap:x".into(), META_BASE_ALLOCATION.into()],
        };
        n.on_option(
            OPT_SET_META_CONTEXT,
            Ok(ClientOption::SetMetaContext(both)),
            &mut out,
        );
        assert_eq!(reply_types(&out), vec![REP_META_CONTEXT, REP_ACK]);
        out.clear();
        let go = GoRequest {
            name: "db".into(),
            info_requests: vec![],
        };
        let Step::Transmit(s) = n.on_option(OPT_GO, Ok(ClientOption::Go(go)), &mut out) else {
            panic!("expected transmission")
        };
        assert_eq!(s.base_allocation, Some(BASE_ALLOCATION_ID));
    }

    #[test]
    fn export_name_to_unknown_export_closes() {
        let mut n = Negotiator::new(&OneExport, ClientFlags::default());
        let mut out = Vec::new();
        let step = n.on_option(
            OPT_EXPORT_NAME,
            Ok(ClientOption::ExportName("x".into())),
            &mut out,
        );
        assert!(matches!(step, Step::Close));
        assert!(out.is_empty());
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        for (no_zeroes, len) in [(false, 134), (true, 10)] {
            let mut n = Negotiator::new(
                &OneExport,
                ClientFlags {
                    fixed_newstyle: true,
                    no_zeroes,
                },
            );
            let mut out = Vec::new();
            let step = n.on_option(
                OPT_EXPORT_NAME,
                Ok(ClientOption::ExportName("db".into())),
                &mut out,
            );
            assert!(matches!(step, Step::Transmit(_)));
            assert_eq!(out.len(), len);
        }
    }
}
