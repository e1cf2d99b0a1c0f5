//! Mirror jobs that survive a restart of the source node (`--data-dir`).
//!
//! A job keeps two records of what the target lacks:
//! - the working set ([`MemTracker`], in memory): what the job copies next. Marked
//!   after a change landed, cleared right before a range is read for copying (see
//!   `job`).
//! - the job's dirty bitmap on the export (`mirror-<id>`, persistent): what a
//!   restarted node must copy again. The write path marks it, crash-safe, before a
//!   change is issued, like every dirty bitmap. It starts all dirty and is cleared
//!   only where a copy *settled*: it was written to the target, a FLUSH there
//!   covered it, and nothing newer is pending for the granule (the working set, a
//!   copy on the wire or not yet flushed, a change in flight on the source). The
//!   clear comes first and the checks after it, and a granule with anything pending
//!   is marked again; a change's in-flight count starts before its mark (see
//!   [`crate::bitmap::inflight`]), so either the check sees the change or the change's
//!   mark comes after the clear.
//!
//! The settled clears reach the bitmap file every [`PERSIST_EVERY`] (and when the
//! activity log expires a region). A node killed -9 restarts with the file's bits
//! plus every region of its activity log: a superset of what the target lacks,
//! never the whole disk again once a pass settled.
//!
//! The job's parameters are kept in `<data-dir>/mirrors/<id>.json` (0600: it may
//! hold the replica's lease token) until the job ends.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DirtyTracker, MemTracker, Mode};
use crate::bitmap::DirtyBitmap;

/// How often settled clears are written to the bitmap file.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// The name of a job's bitmap on its export.
pub fn job_bitmap(id: &str) -> String {
    format!("mirror-{id}")
}

pub struct PersistentTracker {
    work: MemTracker,
    bitmap: Arc<DirtyBitmap>,
}

impl std::fmt::Debug for PersistentTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentTracker")
            .field("bitmap", &self.bitmap.name())
            .finish()
    }
}

impl PersistentTracker {
    /// A new job's tracker over `bitmap` (just created on the export): everything
    /// dirty, durably, until copies settle.
    pub fn create(bitmap: Arc<DirtyBitmap>) -> std::io::Result<Self> {
        bitmap.mark_all_durable().map_err(std::io::Error::other)?;
        Ok(Self {
            work: MemTracker::new(bitmap.size(), bitmap.granularity()),
            bitmap,
        })
    }

    /// A restarted job's tracker: the working set is what the bitmap holds (its
    /// file's bits and its activity log's regions).
    pub fn resume(bitmap: Arc<DirtyBitmap>) -> Self {
        let work = MemTracker::new(bitmap.size(), bitmap.granularity());
        for (o, l) in bitmap.dirty_extents() {
            work.mark(o, l);
        }
        Self { work, bitmap }
    }

    pub fn granularity(&self) -> u64 {
        self.bitmap.granularity()
    }
}

impl DirtyTracker for PersistentTracker {
    fn dirty_extents(&self) -> Vec<(u64, u64)> {
        self.work.dirty_extents()
    }

    fn dirty_bytes(&self) -> u64 {
        self.work.dirty_bytes()
    }

    fn clear_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // The working set only: the bitmap keeps the bit until the copy settles.
        self.work.clear_range(offset, len)
    }

    fn mark(&self, offset: u64, len: u64) {
        // The write path marked the bitmap before the change was issued.
        self.work.mark(offset, len);
    }

    fn settle(&self, ranges: &[(u64, u64)], pending: &dyn Fn(u64, u64) -> bool) {
        let g = self.bitmap.granularity();
        let size = self.bitmap.size();
        for &(o, l) in ranges {
            let end = o.saturating_add(l).min(size);
            let mut s = o.div_ceil(g) * g;
            while s < end {
                let ge = (s + g).min(size);
                if ge > end {
                    break;
                }
                if !self.work.is_dirty(s, ge - s) {
                    self.bitmap.unmark_in_memory(s, ge - s);
                    if self.work.is_dirty(s, ge - s) || pending(s, ge - s) {
                        self.bitmap.remark_in_memory(s, ge - s);
                    }
                }
                s = ge;
            }
        }
    }

    fn persist(&self) -> std::io::Result<()> {
        self.bitmap.write_all_bits().map_err(std::io::Error::other)
    }
}

/// A job's parameters as kept in the data dir.
#[derive(Serialize, Deserialize)]
pub struct StoredJob {
    pub id: String,
    pub export: String,
    pub address: String,
    pub target_export: String,
    /// The replica's lease token (the file is 0600).
    pub lease: Option<String>,
    pub tls: Option<bool>,
    pub mode: Mode,
    pub bandwidth_mib_s: Option<f64>,
    pub max_in_flight: Option<usize>,
}

impl std::fmt::Debug for StoredJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredJob")
            .field("id", &self.id)
            .field("export", &self.export)
            .field("address", &self.address)
            .field("target_export", &self.target_export)
            .field("lease", &self.lease.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where jobs are kept: `<data-dir>/mirrors`.
#[derive(Debug, Clone)]
pub struct JobStore {
    dir: PathBuf,
}

impl JobStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("mirrors"),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the job durably (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, job: &StoredJob) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{}.tmp", job.id));
        let body = serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?;
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path(&job.id))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    pub fn remove(&self, id: &str) {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(job = id, error = %e, "cannot remove the stored mirror job"),
        }
    }

    /// The stored jobs; an unreadable file is logged and skipped.
    pub fn load(&self) -> Vec<StoredJob> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<StoredJob>(&b).map_err(|e| e.to_string()))
                .and_then(|j| {
                    // Ids name files and bitmaps: only the form this node makes.
                    let ok = j
                        .id
                        .strip_prefix("m-")
                        .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
                    if ok {
                        Ok(j)
                    } else {
                        Err(format!("bad job id {:?}", j.id))
                    }
                }) {
                Ok(j) => out.push(j),
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "stored mirror job unreadable; skipped")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 64 << 10;

    fn tracker(dir: &Path) -> PersistentTracker {
        let b = DirtyBitmap::create(&dir.join("b.bitmap"), "mirror-t", G, 64 * G, 4).unwrap();
        PersistentTracker::create(Arc::new(b)).unwrap()
    }

    #[test]
    fn starts_all_dirty_and_clears_only_what_settled_with_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        assert_eq!(t.bitmap.dirty_bytes(), 64 * G);
        // The working set: granules 0..10 dirty.
        t.mark(0, 10 * G);
        // Copied 0..4 (cleared before the reads), flushed: they settle; 4..10
        // are still in the working set and stay.
        t.clear_range(0, 4 * G).unwrap();
        t.settle(&[(0, 10 * G)], &|_, _| false);
        assert_eq!(t.bitmap.dirty_extents(), vec![(4 * G, 60 * G)]);
        // Something pending on granule 20 keeps it; 21 settles; a partial
        // granule never settles.
        t.settle(&[(20 * G, 2 * G), (30 * G + 1, G)], &|o, _| o == 20 * G);
        let d = t.bitmap.dirty_extents();
        assert!(
            d.contains(&(4 * G, 17 * G)) && d.contains(&(22 * G, 42 * G)),
            "{d:?}"
        );
    }

    #[test]
    fn a_restart_resumes_from_what_was_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.settle(&[(0, 32 * G)], &|_, _| false);
        t.persist().unwrap();
        drop(t);
        let b = DirtyBitmap::open(&dir.path().join("b.bitmap"), "mirror-t", 64 * G, 4).unwrap();
        let r = PersistentTracker::resume(Arc::new(b));
        // The file's bits, plus whatever regions its activity log held (none).
        assert_eq!(r.dirty_extents(), vec![(32 * G, 32 * G)]);
    }

    #[test]
    fn stored_jobs_round_trip_and_hide_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let s = JobStore::new(dir.path());
        let j = StoredJob {
            id: "m-1f".into(),
            export: "disk".into(),
            address: "10.0.0.2:10809".into(),
            target_export: "disk".into(),
            lease: Some("sekrit-token".into()),
            tls: None,
            mode: Mode::Background,
            bandwidth_mib_s: Some(5.0),
            max_in_flight: None,
        };
        assert!(!format!("{j:?}").contains("sekrit"));
        s.save(&j).unwrap();
        let meta = std::fs::metadata(dir.path().join("mirrors/m-1f.json")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = s.load();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].lease.as_deref(), Some("sekrit-token"));
        s.remove("m-1f");
        assert!(s.load().is_empty());
        // A record naming anything but a job id of this node is skipped.
        std::fs::write(dir.path().join("mirrors/x.json"), br#"{"id":"../etc","export":"d","address":"a","target_export":"d","lease":null,"tls":null,"mode":"background","bandwidth_mib_s":null,"max_in_flight":null}"#).unwrap();
        assert!(s.load().is_empty());
    }
}
