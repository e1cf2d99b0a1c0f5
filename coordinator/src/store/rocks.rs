//! The embedded store: RocksDB, one column family per table. Every write is synced
//! (`set_sync(true)`) because the journal is what crash recovery trusts. RocksDB's lock
//! on the directory means one process owns it, and that process always leads.

use std::path::Path;
use std::sync::Mutex;

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use tokio::sync::watch;

use super::{Backend, Batch, Expect, LeaderInfo, Role, StoreError, StoreHealth, TABLES};

pub struct RocksStore {
    db: DB,
    /// Serializes commits so that a batch's expectations are checked and its writes
    /// applied with no other commit in between.
    commit: Mutex<()>,
    role: watch::Sender<Role>,
    changes: watch::Sender<u64>,
}

impl RocksStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = TABLES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Self::with_db(db))
    }

    /// Opens the state read-only, beside a running coordinator (RocksDB takes no lock
    /// for read-only opens and replays the WAL in memory, so synced writes are seen).
    pub fn open_read_only(dir: &Path) -> Result<Self, StoreError> {
        let opts = Options::default();
        let db = DB::open_cf_for_read_only(&opts, dir, TABLES.iter().copied(), false)?;
        Ok(Self::with_db(db))
    }

    fn with_db(db: DB) -> Self {
        // The directory's owner leads from the start: nobody else can write it.
        let (role, _) = watch::channel(Role::Leader(LeaderInfo {
            id: "local".into(),
            url: String::new(),
            since_ms: crate::model::now_ms(),
        }));
        let (changes, _) = watch::channel(0);
        Self {
            db,
            commit: Mutex::new(()),
            role,
            changes,
        }
    }

    fn cf(&self, table: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))
    }
}

impl Backend for RocksStore {
    fn kind(&self) -> &'static str {
        "rocksdb"
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(table)?, key.as_bytes())?)
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(table)?, rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.into_vec()));
        }
        Ok(out)
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let _serial = self
            .commit
            .lock()
            .expect("the commit lock is never poisoned");
        for (table, key, expect) in &batch.expects {
            let now = self.get(table, key)?;
            let ok = match expect {
                Expect::Absent => now.is_none(),
                Expect::Bytes(b) => now.as_deref() == Some(b.as_slice()),
            };
            if !ok {
                return Err(StoreError::Conflict {
                    table: table.clone(),
                    key: key.clone(),
                });
            }
        }
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
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            kind: "rocksdb",
            healthy: true,
            error: None,
            members: Vec::new(),
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
