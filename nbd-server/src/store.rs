//! Durable state of a storage node (`--data-dir`): the export registry (exports added
//! through the API) and every export's lease record (epoch high-water mark, holder,
//! token hash).
//!
//! One file, `state.bin`, with two fixed-size slots written alternately in place
//! (the A/B scheme of boot loaders and firmware updates). A slot holds a sequence
//! number, the length and BLAKE3 hash of its payload, and the payload (JSON). An
//! update writes the whole new state into the older slot and `fdatasync`s; loading
//! picks the valid slot with the higher sequence number. A write torn by a crash
//! (kill -9, power loss) fails its hash and the other slot, the previous state, wins,
//! and that write was never acknowledged. Because the file is created full size
//! (zeros written, not a hole) and never changes size, `fdatasync` flushes the slot
//! and the device cache and no file-system metadata: one flush per fence, which is
//! what makes fences fast (a write-temp-fsync-rename-fsync-directory update costs
//! two journal commits). The file itself is created, or grown when the state
//! outgrows a slot, by write-temp, fsync, rename, fsync of the directory.
//!
//! The state is a few hundred bytes per export and changes only on fences and
//! export changes; a database would buy nothing here.
//!
//! Lease epochs are merged monotonically: a record only replaces one with a lower
//! epoch, so two fences racing to persist can never leave an older epoch on disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::lease::{LeasePolicy, LeaseRecord};

const STATE_FILE: &str = "state.bin";
const TMP_FILE: &str = "state.bin.tmp";
const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"SHSTATE1";
/// magic, sequence number, payload length, slot size, payload hash.
const HEADER: usize = 8 + 8 + 4 + 4 + 32;
/// Slot size of a new file; a state that outgrows it doubles it.
const INITIAL_SLOT: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
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
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: StoreState,
    /// The open state file and its layout; None for an ephemeral store.
    file: Option<SlotFile>,
}

#[derive(Debug)]
struct SlotFile {
    file: File,
    slot_size: usize,
    /// Sequence number of the newest valid slot.
    seq: u64,
}

impl Store {
    /// Opens (creating if needed) the data directory and reads its state.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        // A leftover temporary file is a creation or growth that never reached its
        // rename: nothing it held was acknowledged.
        match fs::remove_file(dir.join(TMP_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let path = dir.join(STATE_FILE);
        let (state, file) = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => {
                let (state, slot_size, seq) = read_slots(&file, &path)?;
                (
                    state,
                    SlotFile {
                        file,
                        slot_size,
                        seq,
                    },
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = StoreState::default();
                let file = create_file(dir, &state, INITIAL_SLOT).map_err(io)?;
                (state, file)
            }
            Err(e) => return Err(io(e)),
        };
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            inner: Mutex::new(Inner {
                state,
                file: Some(file),
            }),
        })
    }

    /// A store that keeps state in memory only.
    pub fn ephemeral() -> Self {
        Self {
            dir: None,
            inner: Mutex::new(Inner {
                state: StoreState::default(),
                file: None,
            }),
        }
    }

    pub fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    pub fn snapshot(&self) -> StoreState {
        self.lock().state.clone()
    }

    /// Applies `change` and makes the result durable before returning. On error the
    /// in-memory state is unchanged (on disk it is the old or the new version; a
    /// caller must treat the outcome as unknown and fail closed).
    pub fn update(&self, change: impl FnOnce(&mut StoreState)) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let mut next = guard.state.clone();
        change(&mut next);
        if next == guard.state {
            return Ok(());
        }
        if let (Some(dir), Some(file)) = (&self.dir, guard.file.as_mut()) {
            let io = |source| StoreError::Io {
                dir: dir.clone(),
                source,
            };
            let payload = serde_json::to_vec(&next).map_err(|e| io(std::io::Error::other(e)))?;
            if HEADER + payload.len() > file.slot_size {
                let mut slot_size = file.slot_size * 2;
                while HEADER + payload.len() > slot_size {
                    slot_size *= 2;
                }
                *file = create_file(dir, &next, slot_size).map_err(io)?;
            } else {
                let seq = file.seq + 1;
                let record = slot_record(seq, file.slot_size, &payload);
                // Slot seq % 2 holds the older state; the newer one stays intact until
                // this write is on disk.
                let offset = (seq % 2) * file.slot_size as u64;
                file.file.write_all_at(&record, offset).map_err(io)?;
                file.file.sync_data().map_err(io)?;
                file.seq = seq;
            }
        }
        guard.state = next;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // `update` swaps in a whole new state only after the write succeeded, so a
        // panic elsewhere cannot leave a half-applied state behind the lock.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn slot_record(seq: u64, slot_size: usize, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(HEADER + payload.len());
    r.extend_from_slice(MAGIC);
    r.extend_from_slice(&seq.to_le_bytes());
    let len = u32::try_from(payload.len()).expect("a slot is far smaller than 4 GiB");
    r.extend_from_slice(&len.to_le_bytes());
    let size = u32::try_from(slot_size).expect("a slot is far smaller than 4 GiB");
    r.extend_from_slice(&size.to_le_bytes());
    r.extend_from_slice(blake3::hash(payload).as_bytes());
    r.extend_from_slice(payload);
    r
}

/// Parses one slot: Some((seq, slot_size, payload)) when it is intact.
fn parse_slot(bytes: &[u8]) -> Option<(u64, usize, &[u8])> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(bytes[16..20].try_into().ok()?) as usize;
    let slot_size = u32::from_le_bytes(bytes[20..24].try_into().ok()?) as usize;
    let payload = bytes.get(HEADER..HEADER + len)?;
    (blake3::hash(payload).as_bytes() == &bytes[24..56]).then_some((seq, slot_size, payload))
}

/// Reads the newest intact slot of the state file.
fn read_slots(file: &File, path: &Path) -> Result<(StoreState, usize, u64), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let len = file.metadata().map_err(|e| corrupt(e.to_string()))?.len();
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|e| corrupt(e.to_string()))?];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| corrupt(e.to_string()))?;
    // Slot A starts at 0 and names the slot size, so slot B can be found; if A is
    // torn, B is at the file's midpoint (the file is always two slots long).
    let a = parse_slot(&bytes);
    let half = bytes.len() / 2;
    let b = bytes.get(half..).and_then(parse_slot);
    let newest = match (a, b) {
        (Some(a), Some(b)) => {
            if a.0 >= b.0 {
                a
            } else {
                b
            }
        }
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => return Err(corrupt("no intact slot".into())),
    };
    let (seq, slot_size, payload) = newest;
    if slot_size * 2 != bytes.len() {
        return Err(corrupt(format!(
            "slot size {slot_size} does not match file size {}",
            bytes.len()
        )));
    }
    let state: StoreState = serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
    if state.version != FORMAT_VERSION {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: state.version,
        });
    }
    Ok((state, slot_size, seq))
}

/// Writes a new two-slot state file holding `state` (slot A, sequence 0) and
/// atomically puts it in place: write temp, fsync, rename, fsync the directory.
fn create_file(dir: &Path, state: &StoreState, slot_size: usize) -> std::io::Result<SlotFile> {
    let payload = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let mut bytes = slot_record(0, slot_size, &payload);
    // Zeros written for real (not a hole), so later in-place slot writes allocate
    // nothing and fdatasync has no metadata to flush.
    bytes.resize(slot_size * 2, 0);
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
    let path = dir.join(STATE_FILE);
    fs::rename(&tmp, &path)?;
    // The rename itself lives in the directory: without this fsync a crash could
    // bring back the old file after we told the caller the new state is durable.
    File::open(dir)?.sync_all()?;
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    Ok(SlotFile {
        file,
        slot_size,
        seq: 0,
    })
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
        drop(store);
        fs::write(dir.path().join(STATE_FILE), vec![7u8; 4096]).expect("write");
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let (r1, r2, r3) = (record(1), record(2), record(3));
        store.update(|s| s.merge_lease("d", r1)).expect("seq 1");
        store
            .update(|s| s.merge_lease("d", r2.clone()))
            .expect("seq 2");
        store
            .update(|s| s.merge_lease("d", r3.clone()))
            .expect("seq 3");
        drop(store);
        assert_eq!(
            Store::open(dir.path()).expect("reopens").snapshot().leases["d"],
            r3
        );
        // Tear the newest write (seq 3, in slot B): a crash mid-write.
        let path = dir.path().join(STATE_FILE);
        let mut bytes = fs::read(&path).expect("read");
        let b = bytes.len() / 2;
        bytes[b + HEADER + 5] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(store.snapshot().leases["d"], r2);
        // The next update overwrites the torn slot, and it is read back.
        let r4 = record(4);
        store
            .update(|s| s.merge_lease("d", r4.clone()))
            .expect("update");
        drop(store);
        assert_eq!(
            Store::open(dir.path()).expect("reopens").snapshot().leases["d"],
            r4
        );
    }

    #[test]
    fn a_state_larger_than_a_slot_grows_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        store
            .update(|s| {
                for i in 0..2000 {
                    s.merge_lease(&format!("export-{i:05}"), record(i + 1));
                }
            })
            .expect("grows");
        drop(store);
        let len = fs::metadata(dir.path().join(STATE_FILE))
            .expect("meta")
            .len();
        assert!(len > 2 * INITIAL_SLOT as u64);
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(store.snapshot().leases.len(), 2000);
        store
            .update(|s| s.merge_lease("export-00000", record(9999)))
            .expect("in-place update after growth");
        drop(store);
        let snap = Store::open(dir.path()).expect("reopens").snapshot();
        assert_eq!(snap.leases["export-00000"].epoch, 9999);
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
        // A state that must grow the file, with a directory where its temporary file
        // should go, makes the write fail.
        fs::create_dir(dir.path().join(TMP_FILE)).expect("mkdir");
        let result = store.update(|s| {
            for i in 0..2000 {
                s.merge_lease(&format!("export-{i:05}"), record(1));
            }
        });
        assert!(result.is_err());
        assert!(store.snapshot().leases.is_empty());
    }
}
