//! The plain-file backend: every volume is a sparse file in `<data-dir>/volumes/`.
//!
//! Holes are real file-system holes (fallocate PUNCH_HOLE), block status comes from
//! SEEK_DATA/SEEK_HOLE, and flush is an fdatasync shared by group commit. The catalog of
//! volumes is `<data-dir>/catalog.json`, replaced atomically on every change.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::group_commit::{FlushError, GroupCommit};
use super::{Extent, ExtentState, Result, StoreError, Volume, ZeroMode, check_range};
use crate::fsutil;
use crate::names::Name;

const CATALOG_VERSION: u32 = 1;
/// Zeroes are written in pieces of this size when the file system cannot zero a range.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    pub size_bytes: u64,
    pub created_unix: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    volumes: Vec<VolumeRecord>,
}

/// What `volume list/show` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Bytes of disk this volume occupies.
    pub allocated_bytes: u64,
    pub created_unix: u64,
}

#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<FileStore> {
        let vol_dir = dir.join("volumes");
        fs::create_dir_all(&vol_dir)
            .map_err(|e| StoreError::io(format!("creating {}", vol_dir.display()), e))?;
        let catalog = dir.join("catalog.json");
        let mut volumes = BTreeMap::new();
        match fs::read(&catalog) {
            Ok(bytes) => {
                let parsed: CatalogFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        what: catalog.display().to_string(),
                        detail: e.to_string(),
                    })?;
                if parsed.version != CATALOG_VERSION {
                    return Err(StoreError::Corrupt {
                        what: catalog.display().to_string(),
                        detail: format!(
                            "catalog version {} is not supported by this blockd (expects {})",
                            parsed.version, CATALOG_VERSION
                        ),
                    });
                }
                for v in parsed.volumes {
                    volumes.insert(v.name.clone(), v);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("reading {}", catalog.display()), e)),
        }
        Ok(FileStore {
            dir: dir.to_owned(),
            volumes: Mutex::new(volumes),
        })
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{name}.raw"))
    }

    fn save(&self, volumes: &BTreeMap<String, VolumeRecord>) -> Result<()> {
        let file = CatalogFile {
            version: CATALOG_VERSION,
            volumes: volumes.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| StoreError::invalid(format!("serialising catalog: {e}")))?;
        let path = self.dir.join("catalog.json");
        fsutil::write_atomic(&path, &bytes)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))
    }

    pub fn create_volume(&self, name: &Name, size_bytes: u64) -> Result<VolumeInfo> {
        super::check_volume_size(size_bytes)?;
        let mut volumes = self.volumes.lock();
        if volumes.contains_key(name.as_str()) {
            return Err(StoreError::AlreadyExists {
                what: format!("volume {name}"),
            });
        }
        let path = self.volume_path(name.as_str());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("creating {}", path.display()), e))?;
        file.set_len(size_bytes)
            .map_err(|e| StoreError::io(format!("sizing {}", path.display()), e))?;
        file.sync_all()
            .map_err(|e| StoreError::io(format!("syncing {}", path.display()), e))?;
        let record = VolumeRecord {
            name: name.to_string(),
            size_bytes,
            created_unix: now_unix(),
        };
        volumes.insert(record.name.clone(), record.clone());
        if let Err(e) = self.save(&volumes) {
            volumes.remove(name.as_str());
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(self.info(&record))
    }

    fn info(&self, record: &VolumeRecord) -> VolumeInfo {
        let allocated_bytes = fs::metadata(self.volume_path(&record.name))
            .map(|m| fsutil::allocated_bytes(&m))
            .unwrap_or(0);
        VolumeInfo {
            name: record.name.clone(),
            size_bytes: record.size_bytes,
            allocated_bytes,
            created_unix: record.created_unix,
        }
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let volumes = self.volumes.lock().clone();
        volumes.values().map(|r| self.info(r)).collect()
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let record = self
            .volumes
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        Ok(self.info(&record))
    }

    /// Deletes a volume. The caller makes sure nothing has it open.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut volumes = self.volumes.lock();
        let record = volumes.remove(name).ok_or_else(|| not_found(name))?;
        if let Err(e) = self.save(&volumes) {
            volumes.insert(record.name.clone(), record);
            return Err(e);
        }
        let path = self.volume_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("removing {}", path.display()), e)),
        }
        let _ = fsutil::sync_dir(&self.dir.join("volumes"));
        Ok(())
    }

    /// Opens a volume for I/O.
    pub fn open_volume(&self, name: &str) -> Result<Arc<FileVolume>> {
        let record = self
            .volumes
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        let path = self.volume_path(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        Ok(Arc::new(FileVolume {
            name: record.name,
            file,
            size: record.size_bytes,
            read_only: false,
            commit: GroupCommit::new(),
        }))
    }
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound {
        what: format!("volume {name}"),
        hint: "list volumes with `blockd volume list`",
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A volume backed by one sparse file.
#[derive(Debug)]
pub struct FileVolume {
    name: String,
    file: File,
    size: u64,
    read_only: bool,
    commit: GroupCommit,
}

impl FileVolume {
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor owned by `self.file`; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a descriptor owned by `self.file`. SEEK_DATA/SEEK_HOLE do not move
        // any position other code relies on: all I/O here is positional (pread/pwrite).
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset).map_err(|e| {
                StoreError::io(format!("writing zeroes to volume {}", self.name), e)
            })?;
            offset += n as u64;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(StoreError::ReadOnly {
                what: format!("volume {}", self.name),
            });
        }
        Ok(())
    }
}

impl Volume for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // The file is never shorter than the volume, but if it were, the rest reads
                // as zeroes like any other hole.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::io(format!("reading volume {}", self.name), e)),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| StoreError::io(format!("writing volume {}", self.name), e))
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // Trim is advisory, but blockd promises trimmed ranges read back as zeroes.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(StoreError::io(format!("trimming volume {}", self.name), e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let fl = if mode.may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(fl, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if mode.fast_only {
                    Err(StoreError::NotSupported("fast zeroing on this file system"))
                } else {
                    self.write_zero_bytes(offset, len)
                }
            }
            Err(e) => Err(StoreError::io(format!("zeroing volume {}", self.name), e)),
        }
    }

    fn flush(&self) -> Result<()> {
        self.commit
            .flush(|| self.file.sync_data())
            .map_err(|e| match e {
                FlushError::Sync(source) => {
                    StoreError::io(format!("fdatasync of volume {}", self.name), source)
                }
                FlushError::Poisoned => StoreError::FlushFailed {
                    what: format!("volume {}", self.name),
                },
            })
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        let io_err = |e| StoreError::io(format!("mapping volume {}", self.name), e);
        while pos < end && out.len() < max_extents.max(1) {
            let data = self
                .seek(pos, libc::SEEK_DATA)
                .map_err(io_err)?
                .unwrap_or(self.size);
            if data > pos {
                let hole_end = data.min(end);
                out.push(Extent {
                    len: hole_end - pos,
                    state: ExtentState::Hole,
                });
                pos = hole_end;
                continue;
            }
            let hole = self
                .seek(pos, libc::SEEK_HOLE)
                .map_err(io_err)?
                .unwrap_or(self.size);
            let data_end = hole.max(pos + 1).min(end);
            out.push(Extent {
                len: data_end - pos,
                state: ExtentState::Data,
            });
            pos = data_end;
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: advisory call on a descriptor we own.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        (dir, store)
    }

    fn name(s: &str) -> Name {
        Name::parse("volume", s).expect("valid name")
    }

    #[test]
    fn create_write_read_trim_status() {
        let (_d, store) = store();
        store.create_volume(&name("v"), 1 << 20).expect("create");
        let v = store.open_volume("v").expect("open");
        let data = vec![0xabu8; 8192];
        v.write(4096, &data).expect("write");
        let mut buf = vec![0u8; 8192];
        v.read(4096, &mut buf).expect("read");
        assert_eq!(buf, data);
        v.flush().expect("flush");
        let map = v.block_status(0, 1 << 20, 100).expect("status");
        assert_eq!(map.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        assert!(map.iter().any(|e| e.state == ExtentState::Data));
        assert_eq!(map[0].state, ExtentState::Hole);
        v.trim(4096, 8192).expect("trim");
        v.read(4096, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        assert!(matches!(
            v.read(1 << 20, &mut buf),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn catalog_survives_reopen_and_rejects_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = FileStore::open(dir.path()).expect("open");
            store.create_volume(&name("a"), 4096).expect("create");
            let e = store
                .create_volume(&name("a"), 4096)
                .expect_err("duplicate");
            assert_eq!(e.kind(), super::super::ErrorKind::AlreadyExists);
        }
        let store = FileStore::open(dir.path()).expect("reopen");
        assert_eq!(store.list_volumes().len(), 1);
        store.delete_volume("a").expect("delete");
        assert!(store.list_volumes().is_empty());
        assert_eq!(
            store.delete_volume("a").expect_err("gone").kind(),
            super::super::ErrorKind::NotFound
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        let (_d, store) = store();
        for size in [0, 1000, (16 << 40) + 512] {
            let e = store.create_volume(&name("x"), size).expect_err("bad size");
            assert_eq!(
                e.kind(),
                super::super::ErrorKind::InvalidArgument,
                "{size}: {e}"
            );
        }
    }
}
