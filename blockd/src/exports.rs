//! Glue between the store and the NBD server: the registry of open volumes.
//!
//! Every connection to one export shares one open volume (so multi-conn clients see one
//! state and one flush covers all connections). The registry also tells the control plane
//! whether a volume is in use before it is deleted.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::nbd::{ExportError, ExportInfo, ExportSource, OpenExport};
use crate::store::file::{FileStore, VolumeInfo};
use crate::store::{Result, StoreError, Volume};

pub struct Exports {
    store: FileStore,
    open: Mutex<HashMap<String, Weak<OpenExport>>>,
}

impl Exports {
    pub fn new(store: FileStore) -> Exports {
        Exports {
            store,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &FileStore {
        &self.store
    }

    /// NBD connections currently using `name`.
    pub fn connections(&self, name: &str) -> usize {
        self.open
            .lock()
            .get(name)
            .map(|w| w.strong_count())
            .unwrap_or(0)
    }

    /// Deletes a volume unless an NBD client has it open.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut open = self.open.lock();
        let users = open.get(name).map(|w| w.strong_count()).unwrap_or(0);
        if users > 0 {
            return Err(StoreError::InUse(format!(
                "volume {name} is exported to {users} NBD connection(s); disconnect them first \
                 (unmount and `nbd-client -d`, or stop nbdfuse) and retry"
            )));
        }
        open.remove(name);
        self.store.delete_volume(name)
    }

    /// Flushes every open volume (used at shutdown).
    pub fn flush_all(&self) {
        let open: Vec<Arc<OpenExport>> = self
            .open
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for e in open {
            if let Err(err) = e.volume.flush() {
                tracing::error!(export = %e.name, error = %err, "flush at shutdown failed");
            }
        }
    }

    fn info(v: &VolumeInfo) -> ExportInfo {
        ExportInfo {
            name: v.name.clone(),
            description: format!("blockd volume, {} bytes", v.size_bytes),
            size: v.size_bytes,
            read_only: false,
        }
    }
}

fn unknown(name: &str) -> ExportError {
    ExportError::Unknown(format!(
        "no volume named {name:?}; `nbdinfo --list` shows the exports"
    ))
}

impl ExportSource for Exports {
    fn list(&self) -> Vec<ExportInfo> {
        self.store.list_volumes().iter().map(Self::info).collect()
    }

    fn describe(&self, name: &str) -> std::result::Result<ExportInfo, ExportError> {
        self.store
            .volume_info(name)
            .map(|v| Self::info(&v))
            .map_err(|_| unknown(name))
    }

    fn open(&self, name: &str) -> std::result::Result<Arc<OpenExport>, ExportError> {
        let mut open = self.open.lock();
        if let Some(existing) = open.get(name).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let volume = match self.store.open_volume(name) {
            Ok(v) => v,
            Err(e) if e.kind() == crate::store::ErrorKind::NotFound => return Err(unknown(name)),
            Err(e) => {
                return Err(ExportError::Unavailable(format!(
                    "cannot open volume {name}: {e}"
                )));
            }
        };
        let volume: Arc<dyn Volume> = volume;
        let export = Arc::new(OpenExport {
            name: name.to_owned(),
            volume,
        });
        open.insert(name.to_owned(), Arc::downgrade(&export));
        Ok(export)
    }
}
