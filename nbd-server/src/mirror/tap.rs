//! The write path's hook into mirror jobs: every change to an export that has
//! mirror jobs is reported here after it landed (or failed) on the source, before
//! it is acknowledged.
//!
//! - background mode: the job's tracker marks the range (marking after the data
//!   landed is what makes the job's clear-then-read safe: a write whose mark came
//!   before the clear has already landed, so the read that follows sees it);
//! - write-blocking mode: the change is also written to the target, and the
//!   client's request is only answered once the target has acknowledged it (on a
//!   failure the range is marked dirty instead, so the guest never stalls on a lost
//!   link).
//!
//! An export without jobs pays one atomic load per change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::job::Job;

/// One change to an export, as the write path saw it.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// A TRIM: reads as zeros afterwards on a file (hole punched), unknown on a
    /// block device.
    Trim {
        offset: u64,
        len: u64,
        reads_zero: bool,
    },
}

impl Change<'_> {
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Change::Write { offset, data, .. } => (offset, data.len() as u64),
            Change::Zero { offset, len } | Change::Trim { offset, len, .. } => (offset, len),
        }
    }
}

/// The mirror jobs of one export (a field of [`crate::export::Export`]).
#[derive(Default)]
pub struct MirrorTap {
    jobs: RwLock<Vec<Arc<Job>>>,
    count: AtomicUsize,
}

impl std::fmt::Debug for MirrorTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorTap")
            .field("jobs", &self.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl MirrorTap {
    fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.read().map(|j| j.clone()).unwrap_or_default()
    }

    /// True when no job follows this export (the write path's fast check).
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// True when a change must wait for a target (a write-blocking job): the write
    /// path then skips its inline fast path.
    pub fn blocks_writes(&self) -> bool {
        !self.is_idle()
            && self
                .jobs
                .read()
                .is_ok_and(|j| j.iter().any(|j| j.write_blocking()))
    }

    /// Marks `[offset, offset+len)` in every job (for changes made inline, when no
    /// job is write-blocking).
    pub fn note(&self, offset: u64, len: u64) {
        if self.is_idle() {
            return;
        }
        if let Ok(jobs) = self.jobs.read() {
            for j in jobs.iter() {
                j.note_change(offset, len);
            }
        }
    }

    /// Reports a change that landed (`ok`) or failed (and may have landed in part)
    /// on the source; returns once every write-blocking job has it on its target
    /// (or has marked it dirty).
    pub async fn after_change(&self, change: Change<'_>, ok: bool) {
        if self.is_idle() {
            return;
        }
        for j in self.jobs() {
            if ok && j.write_blocking() {
                j.forward(&change).await;
            } else {
                let (o, l) = change.range();
                j.note_change(o, l);
            }
        }
    }

    pub(super) fn attach(&self, job: Arc<Job>) {
        let mut jobs = self.jobs.write().unwrap_or_else(|e| e.into_inner());
        jobs.push(job);
        self.count.store(jobs.len(), Ordering::Release);
    }

    pub(super) fn detach(&self, id: &str) {
        let mut jobs = self.jobs.write().unwrap_or_else(|e| e.into_inner());
        jobs.retain(|j| j.id != id);
        self.count.store(jobs.len(), Ordering::Release);
    }

    /// Ids of the jobs following this export.
    pub fn job_ids(&self) -> Vec<String> {
        self.jobs().iter().map(|j| j.id.clone()).collect()
    }
}
