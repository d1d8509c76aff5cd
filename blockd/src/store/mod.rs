//! Storage: the data directory, its volumes, and the [`Volume`] interface the NBD server
//! serves.
//!
//! This module knows nothing of NBD or of the control plane (a test walks the sources to
//! keep it that way). The NBD layer sees a volume only through [`Volume`]: byte-granular
//! read, write, trim, write-zeroes, flush, block status, size and read-only.

pub mod catalog;
pub mod compact;
pub mod engine;
pub mod error;
pub mod format;
pub mod group_commit;
pub mod io;
pub mod map;
pub mod segment;
pub mod verify;
pub mod volume;

pub use error::{ErrorKind, Result, StoreError};

/// Largest logical volume size accepted: 16 TiB.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// Volume sizes are multiples of this so that every NBD client (the kernel driver defaults to
/// 512-byte blocks) can reach the last byte.
pub const VOLUME_SIZE_ALIGN_BYTES: u64 = 512;

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The range may become a hole (the client did not send NO_HOLE).
    pub may_trim: bool,
    /// Fail with [`ErrorKind::NotSupported`] instead of doing anything slower than a write
    /// (the client sent FAST_ZERO).
    pub fast_only: bool,
}

/// Allocation state of a range, as reported by block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Allocated data.
    Data,
    /// Allocated, reads as zeroes.
    Zero,
    /// Not allocated, reads as zeroes.
    Hole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub state: ExtentState,
}

/// A volume as the data path sees it. Implementations are shared by every connection to the
/// volume (`Arc<dyn Volume>`), so a flush through any of them covers writes completed
/// through all of them.
pub trait Volume: Send + Sync {
    /// Logical size in bytes.
    fn size(&self) -> u64;
    fn is_read_only(&self) -> bool;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Runs `writes` in order, as `write` each would (a client's pipelined writes); the
    /// store may append them at once. On error, any of them may have been written or not,
    /// as after a failed `write`.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<()> {
        for (offset, data) in writes {
            self.write(*offset, data)?;
        }
        Ok(())
    }
    /// Discards a range; it reads back as zeroes afterwards.
    fn trim(&self, offset: u64, len: u64) -> Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()>;
    /// Makes every completed write durable (group commit).
    fn flush(&self) -> Result<()>;
    /// Consecutive extents starting at `offset`, covering at least one byte and at most
    /// `len` bytes, in at most `max_extents` entries.
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>>;
    /// A hint that the range will be read soon.
    fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Writes of at least this many bytes go to disk around the page cache and block in
    /// the device (`Config::direct_write_min_bytes`); 0: none do. A caller can overlap
    /// receiving the next such write with this one.
    fn direct_write_min_bytes(&self) -> u64 {
        0
    }
}

/// Checks that `offset + len` lies within `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange { offset, len, size }),
    }
}

/// Validates a requested volume size.
pub fn check_volume_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(StoreError::invalid(
            "volume size must be greater than zero, e.g. --size 10G",
        ));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(StoreError::invalid(format!(
            "volume size {size} bytes is larger than the maximum of 16 TiB"
        )));
    }
    if !size.is_multiple_of(VOLUME_SIZE_ALIGN_BYTES) {
        let up = size.div_ceil(VOLUME_SIZE_ALIGN_BYTES) * VOLUME_SIZE_ALIGN_BYTES;
        return Err(StoreError::invalid(format!(
            "volume size {size} is not a multiple of 512 bytes (NBD clients address 512-byte \
             sectors); use {up}"
        )));
    }
    Ok(())
}
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
