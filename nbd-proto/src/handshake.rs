//! Fixed-newstyle handshake messages.
//!
//! ```text
//! S: NBDMAGIC  IHAVEOPT  handshake-flags(16)            encode_greeting / decode_greeting
//! C: client-flags(32)                                    decode_client_flags / encode_client_flags
//! C: IHAVEOPT option(32) length(32) data                 decode_option_header + decode_option / encode_option
//! S: REPLY_MAGIC option(32) reply-type(32) length(32) data    encode_rep_* / decode_option_reply_header
//! ...                                                    until GO + ACK, EXPORT_NAME, or ABORT
//! S: size(64) transmission-flags(16) [124 zero bytes]   encode_export_name_reply (EXPORT_NAME only)
//! ```

use crate::consts::*;
use crate::{DecodeError, Reader, clip, len_u32, put_u16, put_u32, put_u64, validate_string};

// ---------------------------------------------------------------- greeting and flags

/// Appends the server greeting (18 bytes).
pub fn encode_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    put_u64(out, INIT_PASSWD);
    put_u64(out, IHAVEOPT);
    put_u16(out, handshake_flags);
}

/// Client side: decodes the server greeting and returns the handshake flags.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != INIT_PASSWD {
        return Err(DecodeError::BadMagic {
            expected: INIT_PASSWD,
            found: magic,
        });
    }
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    r.u16()
}

/// Flags the client sent after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the client flags. The spec requires the server to drop the connection
/// when the client sets a flag it does not know or the server did not offer; each client
/// flag is allowed only when the matching handshake flag is in `offered`.
pub fn decode_client_flags(buf: &[u8], offered: u16) -> Result<ClientFlags, DecodeError> {
    let bits = Reader::new(buf).u32()?;
    let mut allowed = 0;
    if offered & FLAG_FIXED_NEWSTYLE != 0 {
        allowed |= FLAG_C_FIXED_NEWSTYLE;
    }
    if offered & FLAG_NO_ZEROES != 0 {
        allowed |= FLAG_C_NO_ZEROES;
    }
    if bits & !allowed != 0 {
        return Err(DecodeError::UnknownClientFlags(bits & !allowed));
    }
    Ok(ClientFlags {
        fixed_newstyle: bits & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: bits & FLAG_C_NO_ZEROES != 0,
    })
}

/// Client side: appends the client flags word.
pub fn encode_client_flags(out: &mut Vec<u8>, flags: ClientFlags) {
    let mut bits = 0;
    if flags.fixed_newstyle {
        bits |= FLAG_C_FIXED_NEWSTYLE;
    }
    if flags.no_zeroes {
        bits |= FLAG_C_NO_ZEROES;
    }
    put_u32(out, bits);
}

// ---------------------------------------------------------------- client options

/// The fixed 16-byte header in front of every option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: r.u32()?,
        len: r.u32()?,
    })
}

/// Client side: appends an option with its data.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    put_u64(out, IHAVEOPT);
    put_u32(out, option);
    put_u32(out, len_u32(data.len()));
    out.extend_from_slice(data);
}

/// Data of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub info_requests: Vec<u16>,
}

impl GoRequest {
    pub fn wants(&self, info: u16) -> bool {
        self.info_requests.contains(&info)
    }

    /// Client side: the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.info_requests.len());
        put_u32(&mut out, len_u32(self.name.len()));
        out.extend_from_slice(self.name.as_bytes());
        put_u16(
            &mut out,
            u16::try_from(self.info_requests.len()).unwrap_or(u16::MAX),
        );
        for info in &self.info_requests {
            put_u16(&mut out, *info);
        }
        out
    }
}

/// Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Client side: the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, len_u32(self.export.len()));
        out.extend_from_slice(self.export.as_bytes());
        put_u32(&mut out, len_u32(self.queries.len()));
        for q in &self.queries {
            put_u32(&mut out, len_u32(q.len()));
            out.extend_from_slice(q.as_bytes());
        }
        out
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(GoRequest),
    Go(GoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Known option that blockd does not negotiate (EXTENDED_HEADERS, PEEK_EXPORT) or an
    /// unknown one: both are answered with NBD_REP_ERR_UNSUP.
    Unsupported(u32),
}

/// An option that is known but malformed: answered with NBD_REP_ERR_INVALID and this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption {
    pub option: u32,
    pub message: String,
}

impl InvalidOption {
    fn new(option: u32, err: DecodeError) -> Self {
        InvalidOption {
            option,
            message: err.to_string(),
        }
    }
}

/// Decodes an option's data. `data` is exactly the `len` bytes that followed the header.
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(InvalidOption::new(
                option,
                DecodeError::BadLength("this option takes no data"),
            ))
        }
    };
    match option {
        OPT_EXPORT_NAME => validate_string(data, "export name")
            .map(|s| ClientOption::ExportName(s.to_owned()))
            .map_err(|e| InvalidOption::new(option, e)),
        // The spec asks the server to ignore data sent with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_INFO | OPT_GO => {
            let req = decode_go(data).map_err(|e| InvalidOption::new(option, e))?;
            Ok(if option == OPT_INFO {
                ClientOption::Info(req)
            } else {
                ClientOption::Go(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let req = decode_meta_context(data).map_err(|e| InvalidOption::new(option, e))?;
            Ok(if option == OPT_LIST_META_CONTEXT {
                ClientOption::ListMetaContext(req)
            } else {
                ClientOption::SetMetaContext(req)
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

fn decode_go(data: &[u8]) -> Result<GoRequest, DecodeError> {
    let mut r = Reader::new(data);
    let name_len = r.u32()? as usize;
    if name_len > data.len().saturating_sub(6) {
        return Err(DecodeError::BadLength(
            "export name length exceeds option length - 6",
        ));
    }
    let name = r.string(name_len, "export name")?;
    let count = r.u16()?;
    if count > MAX_INFO_REQUESTS {
        return Err(DecodeError::TooMany("information requests"));
    }
    if r.remaining() != usize::from(count) * 2 {
        return Err(DecodeError::BadLength(
            "information request count does not match length",
        ));
    }
    let mut info_requests = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        info_requests.push(r.u16()?);
    }
    Ok(GoRequest {
        name,
        info_requests,
    })
}

fn decode_meta_context(data: &[u8]) -> Result<MetaContextRequest, DecodeError> {
    let mut r = Reader::new(data);
    let export_len = r.u32()? as usize;
    let export = r.string(export_len, "export name")?;
    let count = r.u32()?;
    if count > MAX_META_QUERIES {
        return Err(DecodeError::TooMany("metadata context queries"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = r.u32()? as usize;
        queries.push(r.string(len, "metadata context query")?);
    }
    if r.remaining() != 0 {
        return Err(DecodeError::BadLength(
            "trailing bytes after metadata context queries",
        ));
    }
    Ok(MetaContextRequest { export, queries })
}

// ---------------------------------------------------------------- server replies

/// Appends an option reply with an arbitrary payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, len_u32(payload.len()));
    out.extend_from_slice(payload);
}

pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// NBD_REP_SERVER: the name length field counts only the name; the description follows it.
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, name: &str, description: &str) {
    let name = clip(name, MAX_STRING_BYTES);
    let description = clip(description, MAX_STRING_BYTES);
    let mut payload = Vec::with_capacity(4 + name.len() + description.len());
    put_u32(&mut payload, len_u32(name.len()));
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(description.as_bytes());
    encode_option_reply(out, option, REP_SERVER, &payload);
}

/// NBD_INFO_EXPORT: exactly 12 bytes of payload.
pub fn encode_rep_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut payload = Vec::with_capacity(12);
    put_u16(&mut payload, INFO_EXPORT);
    put_u64(&mut payload, size);
    put_u16(&mut payload, flags);
    encode_option_reply(out, option, REP_INFO, &payload);
}

fn encode_rep_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let s = clip(s, MAX_STRING_BYTES);
    let mut payload = Vec::with_capacity(2 + s.len());
    put_u16(&mut payload, info);
    payload.extend_from_slice(s.as_bytes());
    encode_option_reply(out, option, REP_INFO, &payload);
}

pub fn encode_rep_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    encode_rep_info_string(out, option, INFO_NAME, name);
}

pub fn encode_rep_info_description(out: &mut Vec<u8>, option: u32, description: &str) {
    encode_rep_info_string(out, option, INFO_DESCRIPTION, description);
}

/// Block size constraints (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSize {
    /// Checks the rules qemu and libnbd enforce: minimum a power of two no larger than 64 KiB,
    /// preferred a power of two at least max(minimum, 512), maximum at least preferred.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if !self.minimum.is_power_of_two() || self.minimum > 65536 {
            return Err(DecodeError::Invalid("minimum block size"));
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return Err(DecodeError::Invalid("preferred block size"));
        }
        if self.maximum < self.preferred {
            return Err(DecodeError::Invalid("maximum payload size"));
        }
        Ok(())
    }
}

/// NBD_INFO_BLOCK_SIZE: exactly 14 bytes of payload.
pub fn encode_rep_info_block_size(out: &mut Vec<u8>, option: u32, bs: BlockSize) {
    let mut payload = Vec::with_capacity(14);
    put_u16(&mut payload, INFO_BLOCK_SIZE);
    put_u32(&mut payload, bs.minimum);
    put_u32(&mut payload, bs.preferred);
    put_u32(&mut payload, bs.maximum);
    encode_option_reply(out, option, REP_INFO, &payload);
}

pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let name = clip(name, MAX_STRING_BYTES);
    let mut payload = Vec::with_capacity(4 + name.len());
    put_u32(&mut payload, id);
    payload.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &payload);
}

/// An error reply; the message is clipped so that option replies stay well under the
/// 4096 bytes nbd-client can read.
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & REP_FLAG_ERROR != 0);
    let message = clip(message, MAX_ERROR_MESSAGE_BYTES);
    encode_option_reply(out, option, reply_type, message.as_bytes());
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the client
/// negotiated NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    put_u64(out, size);
    put_u16(out, flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZERO_PAD_BYTES]);
    }
}

// ---------------------------------------------------------------- client side of replies

/// The fixed 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: r.u32()?,
        reply_type: r.u32()?,
        len: r.u32()?,
    })
}

/// A decoded NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    Unknown(u16),
}

pub fn decode_info(payload: &[u8]) -> Result<Info, DecodeError> {
    let mut r = Reader::new(payload);
    let ty = r.u16()?;
    let info = match ty {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(DecodeError::BadLength("NBD_INFO_EXPORT must be 12 bytes"));
            }
            Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            }
        }
        INFO_NAME => Info::Name(r.string(r.remaining(), "export name")?),
        INFO_DESCRIPTION => Info::Description(r.string(r.remaining(), "description")?),
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(DecodeError::BadLength(
                    "NBD_INFO_BLOCK_SIZE must be 14 bytes",
                ));
            }
            Info::BlockSize(BlockSize {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            })
        }
        other => Info::Unknown(other),
    };
    Ok(info)
}

/// Decodes an NBD_REP_SERVER payload into (name, description).
pub fn decode_rep_server(payload: &[u8]) -> Result<(String, String), DecodeError> {
    let mut r = Reader::new(payload);
    let len = r.u32()? as usize;
    if len > payload.len().saturating_sub(4) {
        return Err(DecodeError::BadLength(
            "export name length exceeds reply length - 4",
        ));
    }
    let name = r.string(len, "export name")?;
    let description = r.string(r.remaining(), "description")?;
    Ok((name, description))
}

/// Decodes an NBD_REP_META_CONTEXT payload into (id, name).
pub fn decode_rep_meta_context(payload: &[u8]) -> Result<(u32, String), DecodeError> {
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    let name = r.string(r.remaining(), "metadata context name")?;
    Ok((id, name))
}

/// Decodes the 10-byte EXPORT_NAME reply prefix into (size, flags).
pub fn decode_export_name_reply(buf: &[u8]) -> Result<(u64, u16), DecodeError> {
    let mut r = Reader::new(buf);
    Ok((r.u64()?, r.u16()?))
}
