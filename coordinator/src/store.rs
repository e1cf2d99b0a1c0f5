//! The coordinator's durable state: RocksDB, embedded.
//!
//! One column family per kind of record (sites, storage nodes, hosts, VMs, migrations,
//! the migration journal). Values are JSON documents: the store is small (hundreds of
//! records), read rarely relative to their size, and a person debugging a journal
//! should be able to dump it. Multi-record changes go through one `WriteBatch` so a
//! crash never leaves half a change; every write is synced (`set_sync(true)`) because
//! the journal is what crash recovery trusts.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use serde::{Serialize, de::DeserializeOwned};

/// Column families, one per record kind.
pub const TABLES: &[&str] = &["sites", "storage", "hosts", "vms", "migrations", "journal"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state store failed: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("record {table}/{key} is not valid JSON for its type: {source}")]
    Corrupt {
        table: String,
        key: String,
        source: serde_json::Error,
    },
    #[error("could not encode record {table}/{key}: {source}")]
    Encode {
        table: String,
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot create the state directory: {0}")]
    Io(std::io::Error),
    #[error("unknown table {0}; this is a bug in the coordinator")]
    UnknownTable(String),
}

pub struct Store {
    db: DB,
}

/// A set of puts and deletes applied atomically by `Store::commit`.
#[derive(Default)]
pub struct Batch {
    ops: Vec<(String, String, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put<T: Serialize>(
        &mut self,
        table: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            table: table.to_owned(),
            key: key.to_owned(),
            source,
        })?;
        self.ops
            .push((table.to_owned(), key.to_owned(), Some(bytes)));
        Ok(())
    }

    pub fn delete(&mut self, table: &str, key: &str) {
        self.ops.push((table.to_owned(), key.to_owned(), None));
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = TABLES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Self { db })
    }

    /// Opens the state read-only, beside a running coordinator (RocksDB takes no lock
    /// for read-only opens and replays the WAL in memory, so synced writes are seen).
    pub fn open_read_only(dir: &Path) -> Result<Self, StoreError> {
        let opts = Options::default();
        let db = DB::open_cf_for_read_only(&opts, dir, TABLES.iter().copied(), false)?;
        Ok(Self { db })
    }

    fn cf(&self, table: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.db.get_cf(self.cf(table)?, key.as_bytes())? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                table: table.to_owned(),
                key: key.to_owned(),
                source,
            })
    }

    /// Every record of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: &str) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(table)?, rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                table: table.to_owned(),
                key: key.clone(),
                source,
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Applies the batch atomically and durably (fsync of the WAL).
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for (table, key, value) in &batch.ops {
            let cf = self.cf(table)?;
            match value {
                Some(v) => wb.put_cf(cf, key.as_bytes(), v),
                None => wb.delete_cf(cf, key.as_bytes()),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }

    pub fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.put(table, key, value)?;
        self.commit(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_atomic_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut b = Batch::default();
            b.put("vms", "vm7", &serde_json::json!({"host": "kvm-a1"}))
                .unwrap();
            b.put("journal", "m1", &serde_json::json!({"phase": "fenced"}))
                .unwrap();
            store.commit(b).unwrap();
            store.put("sites", "siteA", &1u32).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let vm: serde_json::Value = store.get("vms", "vm7").unwrap().unwrap();
        assert_eq!(vm["host"], "kvm-a1");
        let sites: Vec<(String, u32)> = store.list("sites").unwrap();
        assert_eq!(sites, vec![("siteA".to_owned(), 1)]);
        // A read-only reader sees the writer's synced records while the writer runs.
        store.put("sites", "siteB", &2u32).unwrap();
        let ro = Store::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.get::<u32>("sites", "siteB").unwrap(), Some(2));
        let mut b = Batch::default();
        b.delete("vms", "vm7");
        store.commit(b).unwrap();
        assert!(
            store
                .get::<serde_json::Value>("vms", "vm7")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn unknown_table_and_corrupt_record_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            store.get::<u32>("nope", "k"),
            Err(StoreError::UnknownTable(_))
        ));
        store.put("vms", "bad", &"text").unwrap();
        assert!(matches!(
            store.get::<u32>("vms", "bad"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

/// Debian 12's RocksDB (7.8) predates `rocksdb_write_buffer_manager_destroy`, which
/// the `rocksdb` crate references from the drop of a write-buffer manager. The
/// coordinator never creates one, so this is never called; it exists only so the
/// binary links against the system library (see build.rs).
#[cfg(system_rocksdb)]
mod rocksdb_shim {
    #[unsafe(no_mangle)]
    pub extern "C" fn rocksdb_write_buffer_manager_destroy(_manager: *mut std::ffi::c_void) {
        // Unreachable by construction (no write-buffer manager is ever created);
        // abort rather than leak silently if that ever changes.
        std::process::abort();
    }
}
