//! The coordinator's durable state, behind one interface with two implementations.
//!
//! - [`rocks`]: RocksDB, embedded (the default; `make demo` and one-machine setups).
//!   One process owns it, so that process always leads.
//! - [`etcd`]: etcd v3 (`--store etcd://h1:2379,h2:2379,h3:2379`), shared by several
//!   `coord serve` processes; one leads by election on an etcd lease and every write
//!   it makes is a transaction conditional on its election key still existing.
//!
//! Records are JSON documents in tables (sites, storage nodes, hosts, VMs, migrations,
//! the migration journal): the store is small (hundreds of records) and a person
//! debugging a journal should be able to dump it. Multi-record changes go through one
//! [`Batch`] so a crash never leaves half a change, and a batch may carry expectations
//! (a record absent, or exactly these bytes) that make the whole batch fail with
//! [`StoreError::Conflict`] when another writer got there first.

pub mod etcd;
pub mod rocks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::watch;

/// Tables, one per record kind.
pub const TABLES: &[&str] = &[
    "sites",
    "storage",
    "hosts",
    "vms",
    "migrations",
    "journal",
    "replications",
    "fleet",
];

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
    /// etcd did not answer or refused (no quorum, unreachable members, TLS).
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    /// The write was not applied: this coordinator does not (or no longer) lead.
    #[error("this coordinator does not lead (its election key is gone); nothing was written")]
    NotLeader,
    /// An expectation of the batch failed: someone else changed the record first.
    #[error("record {table}/{key} changed meanwhile; nothing was written")]
    Conflict { table: String, key: String },
    #[error("bad --store: {0}")]
    BadUri(String),
}

/// What a batch expects of a record for it to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The record does not exist.
    Absent,
    /// The record holds exactly these bytes.
    Bytes(Vec<u8>),
}

/// A set of puts and deletes applied atomically by `Store::commit`, under optional
/// expectations.
#[derive(Default)]
pub struct Batch {
    ops: Vec<(String, String, Option<Vec<u8>>)>,
    expects: Vec<(String, String, Expect)>,
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

    /// The batch applies only if `table/key` is then as `expect` says.
    pub fn expect(&mut self, table: &str, key: &str, expect: Expect) {
        self.expects
            .push((table.to_owned(), key.to_owned(), expect));
    }
}

/// Who leads the coordinators sharing a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The coordinator's name (`--name`).
    pub id: String,
    /// Where its API answers (`--advertise`): followers forward writes there.
    pub url: String,
    /// When it was elected (ms since the epoch).
    pub since_ms: u64,
}

/// This process's part, as the store's election sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not decided yet (the first campaign has not answered).
    Starting,
    Leader(LeaderInfo),
    /// Another coordinator leads (`None`: nobody, or unknown because the store does
    /// not answer).
    Follower(Option<LeaderInfo>),
}

/// One member of the store's cluster, as `coord status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub name: String,
    pub urls: Vec<String>,
    /// It answered a status call just now.
    pub healthy: bool,
}

/// The store's health for `coord status`.
#[derive(Debug, Clone, Serialize)]
pub struct StoreHealth {
    /// "rocksdb" or "etcd".
    pub kind: &'static str,
    /// Writes can be accepted now (etcd: a quorum answered a linearizable read).
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub members: Vec<Member>,
}

/// What an implementation provides; [`Store`] adds typed JSON on top.
pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every record of a table, in key order.
    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies the batch atomically and durably, or not at all.
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
    /// This process's role; changes are published on the receiver.
    fn role(&self) -> watch::Receiver<Role>;
    fn health(&self) -> StoreHealth;
    /// A counter bumped after every change to the store's records (by anyone): the
    /// change notification (etcd: fed by a watch on the coordinator's prefix).
    fn changes(&self) -> watch::Receiver<u64>;
}

/// The coordinator's state store.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    refused: Arc<AtomicU64>,
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table: table.to_owned(),
        key: key.to_owned(),
        source,
    })
}

impl Store {
    pub fn from_backend(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The embedded RocksDB store in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self::from_backend(Arc::new(rocks::RocksStore::open(dir)?)))
    }

    /// Opens the RocksDB state read-only, beside a running coordinator.
    pub fn open_read_only(dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self::from_backend(Arc::new(
            rocks::RocksStore::open_read_only(dir)?,
        )))
    }

    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.backend.get(table, key)? {
            Some(bytes) => decode(table, key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every record of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: &str) -> Result<Vec<(String, T)>, StoreError> {
        self.backend
            .list(table)?
            .into_iter()
            .map(|(k, v)| {
                let value = decode(table, &k, &v)?;
                Ok((k, value))
            })
            .collect()
    }

    /// Applies the batch atomically and durably; counts writes refused because this
    /// coordinator does not lead.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let r = self.backend.commit(batch);
        if matches!(r, Err(StoreError::NotLeader)) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("a write was refused: this coordinator does not lead");
        }
        r
    }

    pub fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.put(table, key, value)?;
        self.commit(b)
    }

    pub fn role(&self) -> watch::Receiver<Role> {
        self.backend.role()
    }

    pub fn health(&self) -> StoreHealth {
        self.backend.health()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.backend.changes()
    }

    /// Writes refused since start because this coordinator did not lead.
    pub fn refused_writes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
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
    fn expectations_make_the_whole_batch_fail_and_changes_are_notified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let changes = store.changes();
        let before = *changes.borrow();
        let mut b = Batch::default();
        b.expect("vms", "vm1", Expect::Absent);
        b.put("vms", "vm1", &1u32).unwrap();
        store.commit(b).unwrap();
        assert!(*changes.borrow() > before);
        // vm1 exists now: a second "create" fails and writes nothing of its batch.
        let mut b = Batch::default();
        b.expect("vms", "vm1", Expect::Absent);
        b.put("vms", "vm1", &2u32).unwrap();
        b.put("sites", "s", &3u32).unwrap();
        assert!(matches!(store.commit(b), Err(StoreError::Conflict { .. })));
        assert_eq!(store.get::<u32>("vms", "vm1").unwrap(), Some(1));
        assert_eq!(store.get::<u32>("sites", "s").unwrap(), None);
        // Compare-and-set on the bytes.
        let mut b = Batch::default();
        b.expect("vms", "vm1", Expect::Bytes(b"1".to_vec()));
        b.put("vms", "vm1", &2u32).unwrap();
        store.commit(b).unwrap();
        let mut b = Batch::default();
        b.expect("vms", "vm1", Expect::Bytes(b"1".to_vec()));
        b.put("vms", "vm1", &9u32).unwrap();
        assert!(store.commit(b).is_err());
        assert_eq!(store.get::<u32>("vms", "vm1").unwrap(), Some(2));
        // The embedded store's owner leads.
        assert!(matches!(*store.role().borrow(), Role::Leader(_)));
        assert_eq!(store.health().kind, "rocksdb");
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
