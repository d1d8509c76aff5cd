//! Transmission-phase messages: compact requests, simple replies, structured reply chunks.
//!
//! ```text
//! request:  magic(32) flags(16) type(16) cookie(64) offset(64) length(32) [payload if WRITE]
//! simple:   magic(32) error(32) cookie(64) [payload if READ and error == 0]
//! chunk:    magic(32) flags(16) type(16) cookie(64) length(32) payload
//! ```

use crate::consts::*;
use crate::{DecodeError, Reader, clip, len_u32, put_u16, put_u32, put_u64};

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A command number this crate does not know (answered with EINVAL).
    Unknown(u16),
}

impl Command {
    pub fn from_wire(v: u16) -> Command {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(v) => v,
        }
    }

    /// Stable lower-case name, used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Unknown(_) => "unknown",
        }
    }

    /// Command flags that are meaningful for this command. FUA is valid on every command
    /// (clients are known to set it on reads and flushes).
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }
}

/// A compact (28-byte header) request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Decodes a request header from the first [`REQUEST_BYTES`] of `buf`.
///
/// A wrong magic (including the extended-header magic, which blockd never negotiates) is an
/// error: the stream can no longer be framed and the server must disconnect.
pub fn decode_request(buf: &[u8]) -> Result<Request, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(Request {
        flags: r.u16()?,
        command: Command::from_wire(r.u16()?),
        cookie: r.u64()?,
        offset: r.u64()?,
        len: r.u32()?,
    })
}

/// Client side: appends a request header (the caller appends any WRITE payload).
pub fn encode_request(out: &mut Vec<u8>, req: &Request) {
    put_u32(out, REQUEST_MAGIC);
    put_u16(out, req.flags);
    put_u16(out, req.command.to_wire());
    put_u64(out, req.cookie);
    put_u64(out, req.offset);
    put_u32(out, req.len);
}

// ---------------------------------------------------------------- server replies

/// Appends a simple reply header; for a successful READ the caller appends the data.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    put_u32(out, SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// Appends a structured reply chunk header.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, len: u32) {
    put_u32(out, STRUCTURED_REPLY_MAGIC);
    put_u16(out, flags);
    put_u16(out, ty);
    put_u64(out, cookie);
    put_u32(out, len);
}

fn done_flag(done: bool) -> u16 {
    if done { REPLY_FLAG_DONE } else { 0 }
}

/// Appends the header of an OFFSET_DATA chunk carrying `data_len` bytes; the caller appends
/// exactly `data_len` bytes of data. `data_len` must be at least 1 and at most
/// `u32::MAX - 8`.
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    debug_assert!((1..=u32::MAX - 8).contains(&data_len));
    encode_chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    put_u64(out, offset);
}

/// Appends an OFFSET_HOLE chunk.
pub fn encode_offset_hole(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32, done: bool) {
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    put_u64(out, offset);
    put_u32(out, len);
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusExtent {
    pub len: u32,
    pub flags: u32,
}

/// Appends a BLOCK_STATUS chunk. `extents` must hold between 1 and
/// [`MAX_BLOCK_STATUS_EXTENTS`] descriptors, each with a non-zero length.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[BlockStatusExtent],
    done: bool,
) {
    debug_assert!(!extents.is_empty() && extents.len() <= MAX_BLOCK_STATUS_EXTENTS);
    let len = 4 + 8 * extents.len();
    encode_chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len_u32(len),
    );
    put_u32(out, context_id);
    for e in extents {
        put_u32(out, e.len);
        put_u32(out, e.flags);
    }
}

/// Appends an ERROR chunk with a human-readable message (clipped to
/// [`MAX_ERROR_MESSAGE_BYTES`]). `error` must be non-zero.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, done: bool) {
    debug_assert!(error != 0);
    let message = clip(message, MAX_ERROR_MESSAGE_BYTES);
    encode_chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_ERROR,
        cookie,
        len_u32(6 + message.len()),
    );
    put_u32(out, error);
    put_u16(out, u16::try_from(message.len()).unwrap_or(0));
    out.extend_from_slice(message.as_bytes());
}

/// Appends an ERROR_OFFSET chunk.
pub fn encode_error_offset_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    error: u32,
    message: &str,
    offset: u64,
    done: bool,
) {
    debug_assert!(error != 0);
    let message = clip(message, MAX_ERROR_MESSAGE_BYTES);
    encode_chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_ERROR_OFFSET,
        cookie,
        len_u32(14 + message.len()),
    );
    put_u32(out, error);
    put_u16(out, u16::try_from(message.len()).unwrap_or(0));
    out.extend_from_slice(message.as_bytes());
    put_u64(out, offset);
}

/// Appends a NONE chunk (always final).
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

// ---------------------------------------------------------------- client side of replies

/// The first four bytes of any reply tell its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Structured,
}

pub fn decode_reply_kind(buf: &[u8]) -> Result<ReplyKind, DecodeError> {
    let magic = Reader::new(buf).u32()?;
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        other => Err(DecodeError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: other.into(),
        }),
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn decode_simple_reply(buf: &[u8]) -> Result<SimpleReply, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(SimpleReply {
        error: r.u32()?,
        cookie: r.u64()?,
    })
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
    pub fn is_error(&self) -> bool {
        self.ty & REPLY_TYPE_FLAG_ERROR != 0
    }
}

pub fn decode_chunk_header(buf: &[u8]) -> Result<ChunkHeader, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: STRUCTURED_REPLY_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(ChunkHeader {
        flags: r.u16()?,
        ty: r.u16()?,
        cookie: r.u64()?,
        len: r.u32()?,
    })
}

/// Decodes a BLOCK_STATUS chunk payload into (context id, descriptors).
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<BlockStatusExtent>), DecodeError> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(DecodeError::BadLength(
            "block status payload must be 4 + 8n bytes, n >= 1",
        ));
    }
    let count = (payload.len() - 4) / 8;
    if count > MAX_BLOCK_STATUS_EXTENTS {
        return Err(DecodeError::TooMany("block status descriptors"));
    }
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    let mut extents = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32()?;
        if len == 0 {
            return Err(DecodeError::Invalid("zero-length block status descriptor"));
        }
        extents.push(BlockStatusExtent {
            len,
            flags: r.u32()?,
        });
    }
    Ok((id, extents))
}

/// A decoded error chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Decodes the payload of an error chunk (any `ty` with bit 15 set).
///
/// ERROR and ERROR_OFFSET must match their layouts exactly. For an error type this crate
/// does not know, the spec defines only the common prefix (error, message length, message)
/// and lets the header length cover structured fields after it, so those are skipped: the
/// client must treat the reply as errored, not disconnect.
pub fn decode_error_chunk(ty: u16, payload: &[u8]) -> Result<ChunkError, DecodeError> {
    if ty & REPLY_TYPE_FLAG_ERROR == 0 {
        return Err(DecodeError::Invalid("not an error chunk type"));
    }
    let mut r = Reader::new(payload);
    let error = r.u32()?;
    if error == 0 {
        return Err(DecodeError::Invalid("error chunk with error 0"));
    }
    let msg_len = usize::from(r.u16()?);
    let message = r.string(msg_len, "error message")?;
    let offset = if ty == REPLY_TYPE_ERROR_OFFSET {
        Some(r.u64()?)
    } else {
        None
    };
    let known = ty == REPLY_TYPE_ERROR || ty == REPLY_TYPE_ERROR_OFFSET;
    if known && r.remaining() != 0 {
        return Err(DecodeError::BadLength("trailing bytes in error chunk"));
    }
    Ok(ChunkError {
        error,
        message,
        offset,
    })
}

/// Decodes an OFFSET_DATA payload into (offset, data) or OFFSET_HOLE into (offset, len).
pub fn decode_offset_data(payload: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let mut r = Reader::new(payload);
    let offset = r.u64()?;
    let data = r.rest();
    if data.is_empty() {
        return Err(DecodeError::BadLength("OFFSET_DATA chunk without data"));
    }
    Ok((offset, data))
}

pub fn decode_offset_hole(payload: &[u8]) -> Result<(u64, u32), DecodeError> {
    if payload.len() != 12 {
        return Err(DecodeError::BadLength(
            "OFFSET_HOLE payload must be 12 bytes",
        ));
    }
    let mut r = Reader::new(payload);
    let offset = r.u64()?;
    let len = r.u32()?;
    if len == 0 {
        return Err(DecodeError::Invalid("zero-length hole"));
    }
    Ok((offset, len))
}
