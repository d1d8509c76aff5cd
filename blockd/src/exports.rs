//! Glue between the store and the NBD server: export names to open volumes.
//!
//! `VOLUME` exports a writable volume, `VOLUME@SNAP` a snapshot, read-only. Every
//! connection to a volume works on the store's one live volume object, so connections
//! share its state and a flush through any of them covers writes made through all.

use std::sync::Arc;

use crate::nbd::{ExportError, ExportInfo, ExportSource, OpenExport};
use crate::store::ErrorKind;
use crate::store::engine::Store;

pub struct Exports {
    store: Arc<Store>,
}

impl Exports {
    pub fn new(store: Arc<Store>) -> Exports {
        Exports { store }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

fn info(name: String, size: u64, read_only: bool) -> ExportInfo {
    // nbd-client -l shows only names and descriptions: put the size there too.
    let kind = if read_only {
        "blockd snapshot (read-only)"
    } else {
        "blockd volume"
    };
    ExportInfo {
        name,
        description: format!("{kind}, {size} bytes"),
        size,
        read_only,
    }
}

fn unknown(name: &str) -> ExportError {
    ExportError::Unknown(format!(
        "no volume or snapshot named {name:?}; `nbdinfo --list` shows the exports"
    ))
}

impl ExportSource for Exports {
    fn list(&self) -> Vec<ExportInfo> {
        self.store
            .exports()
            .into_iter()
            .map(|(n, s, ro)| info(n, s, ro))
            .collect()
    }

    fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        self.store
            .exports()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(n, s, ro)| info(n, s, ro))
            .ok_or_else(|| unknown(name))
    }

    fn open(&self, name: &str) -> Result<Arc<OpenExport>, ExportError> {
        match self.store.open_export(name) {
            Ok(volume) => Ok(Arc::new(OpenExport {
                name: name.to_owned(),
                volume,
            })),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidArgument) => {
                Err(unknown(name))
            }
            Err(e) => Err(ExportError::Unavailable(format!("cannot open {name}: {e}"))),
        }
    }
}
