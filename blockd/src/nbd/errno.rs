//! The one place where store errors become NBD error values.

use nbd_proto::consts::{EINVAL, EIO, ENOSPC, ENOTSUP, EPERM};

use crate::store::{ErrorKind, StoreError};

/// Maps every store error kind to exactly one NBD errno.
pub fn errno_for(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::AlreadyExists => EINVAL,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::NotSupported => ENOTSUP,
        ErrorKind::NotFound
        | ErrorKind::InUse
        | ErrorKind::FlushFailed
        | ErrorKind::Corrupt
        | ErrorKind::Io => EIO,
    }
}

pub fn errno_of(err: &StoreError) -> u32 {
    errno_for(err.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_an_errno() {
        for kind in ErrorKind::ALL {
            let e = errno_for(kind);
            let expected = match kind {
                ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::AlreadyExists => {
                    EINVAL
                }
                ErrorKind::ReadOnly => EPERM,
                ErrorKind::NoSpace => ENOSPC,
                ErrorKind::NotSupported => ENOTSUP,
                _ => EIO,
            };
            assert_eq!(e, expected, "{kind:?}");
        }
    }

    #[test]
    fn disk_full_io_errors_become_enospc() {
        for raw in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            let e = StoreError::io("writing", std::io::Error::from_raw_os_error(raw));
            assert_eq!(errno_of(&e), ENOSPC);
        }
        let e = StoreError::io("writing", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(errno_of(&e), EIO);
    }
}
