//! The NBD wire protocol as pure functions over bytes.
//!
//! This crate knows the message layouts of the fixed-newstyle handshake and of
//! the transmission phase (compact requests, simple replies and structured reply
//! chunks) as described in `doc/proto.md` of the NetworkBlockDevice/nbd
//! repository. It performs no I/O and owns no sockets: decoders take byte
//! slices and return typed values or a [`DecodeError`]; encoders append to a
//! `Vec<u8>`. No input makes a decoder panic or allocate more than the named
//! limits in [`consts`] allow.
//!
//! Both directions are provided: the server side (decode client messages,
//! encode server messages) is what `blockd` uses; the client side exists so
//! that tests and tools can speak the protocol with the same definitions.

pub mod consts;
pub mod handshake;
pub mod transmission;

use std::fmt;

/// Why a byte sequence could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the fixed layout needs.
    Truncated { need: usize, have: usize },
    /// A magic number did not match.
    BadMagic { expected: u64, found: u64 },
    /// The client set flag bits the server did not offer.
    UnknownClientFlags(u32),
    /// A length field points past the end of the message, or is otherwise inconsistent.
    BadLength(&'static str),
    /// A string is not UTF-8, contains NUL, or is longer than [`consts::MAX_STRING_BYTES`].
    BadString(&'static str),
    /// A count exceeds the limit this crate accepts.
    TooMany(&'static str),
    /// A value is outside what the protocol allows.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { need, have } => {
                write!(f, "message truncated: need {need} bytes, have {have}")
            }
            DecodeError::BadMagic { expected, found } => {
                write!(f, "bad magic: expected {expected:#x}, found {found:#x}")
            }
            DecodeError::UnknownClientFlags(bits) => {
                write!(f, "client set unknown or unoffered flags {bits:#x}")
            }
            DecodeError::BadLength(what) => write!(f, "inconsistent length: {what}"),
            DecodeError::BadString(what) => write!(f, "invalid string: {what}"),
            DecodeError::TooMany(what) => write!(f, "too many {what}"),
            DecodeError::Invalid(what) => write!(f, "invalid value: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A cursor over a byte slice that never panics: every read checks the remaining length.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of `len` bytes, validated as the spec requires.
    pub(crate) fn string(&mut self, len: usize, what: &'static str) -> Result<String, DecodeError> {
        if len > consts::MAX_STRING_BYTES {
            return Err(DecodeError::BadString(what));
        }
        let raw = self.bytes(len)?;
        validate_string(raw, what).map(str::to_owned)
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most [`consts::MAX_STRING_BYTES`].
pub(crate) fn validate_string<'a>(
    raw: &'a [u8],
    what: &'static str,
) -> Result<&'a str, DecodeError> {
    if raw.len() > consts::MAX_STRING_BYTES || raw.contains(&0) {
        return Err(DecodeError::BadString(what));
    }
    std::str::from_utf8(raw).map_err(|_| DecodeError::BadString(what))
}

/// Clips a message to `max` bytes on a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Length of a byte string as a u32 wire field. Callers clip strings to
/// [`consts::MAX_STRING_BYTES`] first, so this never saturates in practice.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
