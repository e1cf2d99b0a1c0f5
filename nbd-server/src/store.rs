//! Durable state of a storage node (`--data-dir`): the export registry (exports added
//! through the API) and every export's lease record (epoch high-water mark, holder,
//! token hash).
//!
//! One small JSON file, `state.json`, replaced atomically: write `state.json.tmp`,
//! fsync it, rename it over `state.json`, fsync the directory. After a crash (kill -9
//! or power loss) the file is either the old or the new version, never a mix, and once
//! `update` has returned the new version survives. The state is a few hundred bytes
//! per export and changes only on fences and export changes, so rewriting the whole
//! file costs two fsyncs and nothing else; a database would buy nothing here.
//!
//! Lease epochs are merged monotonically: a record only replaces one with a lower
//! epoch, so two fences racing to persist can never leave an older epoch on disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::lease::{LeasePolicy, LeaseRecord};

const STATE_FILE: &str = "state.json";
const TMP_FILE: &str = "state.json.tmp";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "state file {path} has format version {found}; this build reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
}

/// An export added at runtime through the API; flag-defined exports are not stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// False for an export that does not use leases at all.
    #[serde(default = "default_true")]
    pub leased: bool,
    #[serde(default)]
    pub policy: LeasePolicy,
}

fn default_true() -> bool {
    true
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    pub version: u32,
    #[serde(default)]
    pub exports: BTreeMap<String, ExportRecord>,
    /// Lease records of every leased export, including flag-defined ones, and of
    /// removed exports (epoch only) so that a re-created export never reuses an epoch.
    #[serde(default)]
    pub leases: BTreeMap<String, LeaseRecord>,
}

impl Default for StoreState {
    fn default() -> Self {
        Self {
            version: FORMAT_VERSION,
            exports: BTreeMap::new(),
            leases: BTreeMap::new(),
        }
    }
}

impl StoreState {
    /// Records `record` unless a record with a higher or equal epoch is already there.
    pub fn merge_lease(&mut self, name: &str, record: LeaseRecord) {
        let replace = match self.leases.get(name) {
            None => true,
            Some(existing) => {
                // Equal epochs: a revocation (no token) wins over the fence record that
                // it followed in memory, whichever reached the disk first.
                existing.epoch < record.epoch
                    || (existing.epoch == record.epoch && record.token_hash.is_none())
            }
        };
        if replace {
            self.leases.insert(name.to_string(), record);
        }
    }
}

/// The durable store; `None` directory means state lives in memory only (no
/// `--data-dir`), which the server warns about at start.
#[derive(Debug)]
pub struct Store {
    dir: Option<PathBuf>,
    state: Mutex<StoreState>,
}

impl Store {
    /// Opens (creating if needed) the data directory and reads its state.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        // A leftover temporary file is a write that never reached its rename: the
        // update did not return, so dropping it loses nothing that was promised.
        match fs::remove_file(dir.join(TMP_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let path = dir.join(STATE_FILE);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let state: StoreState =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if state.version != FORMAT_VERSION {
                    return Err(StoreError::Version {
                        path,
                        found: state.version,
                    });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreState::default(),
            Err(e) => return Err(io(e)),
        };
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            state: Mutex::new(state),
        })
    }

    /// A store that keeps state in memory only.
    pub fn ephemeral() -> Self {
        Self {
            dir: None,
            state: Mutex::new(StoreState::default()),
        }
    }

    pub fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    pub fn snapshot(&self) -> StoreState {
        self.lock().clone()
    }

    /// Applies `change` and makes the result durable before returning. On error the
    /// in-memory state is unchanged (the file is the old or the new version; a caller
    /// must treat the outcome as unknown and fail closed).
    pub fn update(&self, change: impl FnOnce(&mut StoreState)) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let mut next = guard.clone();
        change(&mut next);
        if next == *guard {
            return Ok(());
        }
        if let Some(dir) = &self.dir {
            write_atomically(dir, &next).map_err(|source| StoreError::Io {
                dir: dir.clone(),
                source,
            })?;
        }
        *guard = next;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        // `update` swaps in a whole new state only after the write succeeded, so a
        // panic elsewhere cannot leave a half-applied state behind the lock.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn write_atomically(dir: &Path, state: &StoreState) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let tmp = dir.join(TMP_FILE);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        // The data must be on disk before the rename makes it visible, or a crash
        // could leave a renamed but empty file.
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(STATE_FILE))?;
    // The rename itself lives in the directory: without this fsync a crash could
    // bring back the old file after we told the caller the new state is durable.
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseToken;

    fn record(epoch: u64) -> LeaseRecord {
        LeaseRecord {
            epoch,
            holder: Some(format!("h{epoch}")),
            token_hash: Some(LeaseToken::generate().hash()),
        }
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let r = record(7);
        store
            .update(|s| {
                s.merge_lease("disk", r.clone());
                s.exports.insert(
                    "disk".into(),
                    ExportRecord {
                        path: "/x".into(),
                        read_only: false,
                        leased: true,
                        policy: LeasePolicy::default(),
                    },
                );
            })
            .expect("persists");
        drop(store);
        let again = Store::open(dir.path()).expect("reopens");
        let snap = again.snapshot();
        assert_eq!(snap.leases.get("disk"), Some(&r));
        assert_eq!(snap.exports.len(), 1);
        assert!(!dir.path().join(TMP_FILE).exists());
    }

    #[test]
    fn leftover_temp_file_is_ignored_and_corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(TMP_FILE), b"{half").expect("write");
        let store = Store::open(dir.path()).expect("opens despite tmp");
        assert!(store.snapshot().leases.is_empty());
        fs::write(dir.path().join(STATE_FILE), b"{half").expect("write");
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn epochs_never_go_backwards() {
        let mut s = StoreState::default();
        s.merge_lease("d", record(5));
        s.merge_lease("d", record(4));
        assert_eq!(s.leases["d"].epoch, 5);
        s.merge_lease("d", record(6));
        assert_eq!(s.leases["d"].epoch, 6);
        // A revocation at the same epoch is not undone by a late fence record.
        let revoked = LeaseRecord {
            epoch: 6,
            holder: None,
            token_hash: None,
        };
        s.merge_lease("d", revoked.clone());
        assert_eq!(s.leases["d"], revoked);
        s.merge_lease("d", record(6));
        assert_eq!(s.leases["d"], revoked);
    }

    #[test]
    fn failed_write_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        // A directory where the temp file should go makes the write fail.
        fs::create_dir(dir.path().join(TMP_FILE)).expect("mkdir");
        assert!(store.update(|s| s.merge_lease("d", record(1))).is_err());
        assert!(store.snapshot().leases.is_empty());
    }
}
