//! The store's error type: a small stable [`ErrorKind`] plus context for humans.

use std::io;

/// Stable classification of store errors; the NBD layer maps each kind to exactly one errno
/// and the REST API to exactly one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    ReadOnly,
    OutOfRange,
    NoSpace,
    InUse,
    NotSupported,
    FlushFailed,
    Corrupt,
    Io,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidArgument,
        ErrorKind::ReadOnly,
        ErrorKind::OutOfRange,
        ErrorKind::NoSpace,
        ErrorKind::InUse,
        ErrorKind::NotSupported,
        ErrorKind::FlushFailed,
        ErrorKind::Corrupt,
        ErrorKind::Io,
    ];

    /// Stable snake_case name used in API error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::InUse => "in_use",
            ErrorKind::NotSupported => "not_supported",
            ErrorKind::FlushFailed => "flush_failed",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found; {hint}")]
    NotFound { what: String, hint: &'static str },
    #[error("{what} already exists; pick another name or delete the existing one first")]
    AlreadyExists { what: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what} is read-only; write to a writable volume or clone it first")]
    ReadOnly { what: String },
    #[error("range {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no space left on the store's file system while {context}; free space and retry")]
    NoSpace { context: String },
    #[error("{0}")]
    InUse(String),
    #[error("{0} is not supported")]
    NotSupported(&'static str),
    #[error(
        "an earlier fdatasync of {what} failed, so data acknowledged since then may be lost; \
         every flush fails until the volume is reopened (restart blockd or reattach the volume)"
    )]
    FlushFailed { what: String },
    #[error("corrupt data in {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            StoreError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            StoreError::ReadOnly { .. } => ErrorKind::ReadOnly,
            StoreError::OutOfRange { .. } => ErrorKind::OutOfRange,
            StoreError::NoSpace { .. } => ErrorKind::NoSpace,
            StoreError::InUse(_) => ErrorKind::InUse,
            StoreError::NotSupported(_) => ErrorKind::NotSupported,
            StoreError::FlushFailed { .. } => ErrorKind::FlushFailed,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::Io { .. } => ErrorKind::Io,
        }
    }

    /// Wraps an I/O error, classifying ENOSPC, EDQUOT and EFBIG as [`ErrorKind::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                StoreError::NoSpace { context }
            }
            _ => StoreError::Io { context, source },
        }
    }

    pub fn invalid(msg: impl Into<String>) -> StoreError {
        StoreError::InvalidArgument(msg.into())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
