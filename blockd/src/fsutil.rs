//! Small file-system helpers with the crash-safety rules the store and catalog rely on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` atomically and durably: write a temporary file, fsync it,
/// rename it over `path`, fsync the directory. After a crash either the old or the new
/// contents are there, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    // A bare file name has an empty parent: that is the current directory.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// fsyncs a directory so that creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An exclusive advisory lock on a file, held until dropped. Used so that two daemons never
/// open one data directory.
#[derive(Debug)]
pub struct LockFile {
    _file: File,
    pub path: PathBuf,
}

impl LockFile {
    pub fn acquire(path: &Path) -> io::Result<LockFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut f = &file;
        let _ = f.write_all(format!("{}\n", std::process::id()).as_bytes());
        Ok(LockFile {
            _file: file,
            path: path.to_owned(),
        })
    }
}

/// Bytes of disk actually allocated to a file (st_blocks * 512).
pub fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_accepts_a_bare_file_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = std::env::current_dir().expect("cwd");
        std::env::set_current_dir(dir.path()).expect("cd");
        let r = write_atomic(Path::new("ready.json"), b"{}");
        std::env::set_current_dir(old).expect("cd back");
        r.expect("bare file name");
        assert_eq!(
            fs::read(dir.path().join("ready.json")).expect("read"),
            b"{}"
        );
    }
}
