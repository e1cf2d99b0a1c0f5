//! Mirror jobs: push a source export to an export on another NBD server (another
//! stagehand-nbd, qemu-nbd, any NBD server) while the guest keeps writing.
//!
//! - [`plan`] (pure): which requests a pass sends; [`state`] (pure): the job's
//!   states; [`tracker`]: an in-memory [`DirtyTracker`].
//! - `job`: the async shell. A job seeds its tracker with the source's allocated
//!   extents (and the holes the target does not already read as zeros), then runs
//!   passes over the dirty extents, up to `max_in_flight` requests at once, until
//!   the tracker is empty (`synced`), and keeps following writes. A lost target is
//!   retried with backoff and the job resumes from the tracker: every request
//!   clears its range before reading the source and marks it again on failure, and
//!   what the target acknowledged since its last FLUSH is marked again too.
//! - [`tap`]: the write path's one call into the jobs of an export.
//! - [`MirrorManager`]: the jobs of the node, for the control API.
//!
//! Jobs live in memory: a restart of this node forgets them (and an in-memory
//! tracker forgets its dirty blocks; the persistent dirty bitmap fixes the latter).

pub mod allow;
pub mod job;
pub mod persist;
pub mod plan;
pub mod source;
pub mod state;
pub mod tap;
pub mod tracker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use stagehand_common::secret::Secret;
use stagehand_common::tls::TlsFiles;
use thiserror::Error;

use crate::export::{Export, ExportRegistry};
pub use allow::MirrorAllow;
pub use job::{Job, JobView, Mode, Target, Tuning};
pub use state::State;
pub use tap::{Change, MirrorTap};
pub use tracker::MemTracker;

/// The blocks of an export written since a point in time (a dirty bitmap).
pub trait DirtyTracker: Send + Sync {
    fn dirty_extents(&self) -> Vec<(u64, u64)>;
    fn dirty_bytes(&self) -> u64;
    /// Clears before the range is read for copying; a failed copy re-marks it.
    fn clear_range(&self, offset: u64, len: u64) -> std::io::Result<()>;
    fn mark(&self, offset: u64, len: u64);
    /// The copies of `ranges` are durable on the target (a FLUSH covered them);
    /// `pending(offset, len)` tells whether something newer is on its way for a
    /// granule. Only a tracker that outlives the node keeps a record to clear.
    fn settle(&self, _ranges: &[(u64, u64)], _pending: &dyn Fn(u64, u64) -> bool) {}
    /// Writes what settled to disk.
    fn persist(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Makes the tracker of a new job: `(export, job id) -> (tracker, its granularity)`.
pub type TrackerFactory =
    Box<dyn Fn(&Export, &str) -> Result<(Arc<dyn DirtyTracker>, u64), String> + Send + Sync>;

/// Granularity of the in-memory tracker.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// The in-memory tracker (the default until jobs use the persistent bitmap).
pub fn mem_trackers() -> TrackerFactory {
    Box::new(|export, _id| {
        let t = MemTracker::new(export.size, DEFAULT_GRANULARITY);
        let g = t.granularity();
        Ok((Arc::new(t), g))
    })
}

/// What `POST /v1/mirrors` asks for.
#[derive(Debug, Clone)]
pub struct NewMirror {
    pub export: String,
    pub address: String,
    pub target_export: String,
    pub lease: Option<Secret>,
    /// None: TLS exactly when this node has `--tls-*` files.
    pub tls: Option<bool>,
    pub mode: Mode,
    pub bandwidth_mib_s: Option<f64>,
    pub max_in_flight: Option<usize>,
}

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error("no export named {0:?} on this node")]
    NoExport(String),
    #[error("export {export:?} already has an active mirror job ({id})")]
    Busy { export: String, id: String },
    #[error("no mirror job {0:?}")]
    NoJob(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotAllowed(String),
}

/// Most requests a job may keep in flight.
pub const MAX_IN_FLIGHT: usize = 1024;

/// The mirror jobs of this node. Jobs run on the runtime the manager was made on
/// (the data path's, not the control API's own thread).
pub struct MirrorManager {
    registry: Arc<ExportRegistry>,
    tls: Option<TlsFiles>,
    trackers: TrackerFactory,
    /// With a `--data-dir`: jobs on exports with persistent bitmaps are kept here
    /// and resumed after a restart (see [`persist`]).
    store: Option<persist::JobStore>,
    /// Targets jobs may push to (see [`allow`]).
    allow: MirrorAllow,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for MirrorManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorManager")
            .field("jobs", &self.jobs.lock().map(|j| j.len()).unwrap_or(0))
            .finish()
    }
}

impl MirrorManager {
    /// With in-memory trackers. Must be called on the runtime jobs will run on.
    pub fn new(registry: Arc<ExportRegistry>, tls: Option<TlsFiles>) -> Arc<Self> {
        Self::with_trackers(registry, tls, mem_trackers())
    }

    /// With `trackers` making each job's tracker (the persistent bitmap).
    pub fn with_trackers(
        registry: Arc<ExportRegistry>,
        tls: Option<TlsFiles>,
        trackers: TrackerFactory,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            tls,
            trackers,
            store: None,
            allow: MirrorAllow::any(),
            jobs: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Jobs kept in `data_dir` survive a restart of the node: call
    /// [`MirrorManager::resume_stored`] once the exports are open. Must be called on
    /// the runtime jobs will run on.
    pub fn persistent(
        registry: Arc<ExportRegistry>,
        tls: Option<TlsFiles>,
        data_dir: Option<&std::path::Path>,
        allow: MirrorAllow,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            tls,
            trackers: mem_trackers(),
            store: data_dir.map(persist::JobStore::new),
            allow,
            jobs: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Restarts the jobs a previous run of the node left unfinished, each from its
    /// persistent bitmap. A job whose export or bitmap is gone is dropped (logged).
    pub fn resume_stored(&self) {
        let Some(store) = &self.store else { return };
        for s in store.load() {
            let Some(export) = self.registry.get(&s.export) else {
                tracing::error!(job = %s.id, export = %s.export, "stored mirror job dropped: its export is not served");
                store.remove(&s.id);
                continue;
            };
            let Some(bitmap) = export.bitmap(&persist::job_bitmap(&s.id)) else {
                tracing::error!(job = %s.id, "stored mirror job dropped: its dirty bitmap is gone");
                store.remove(&s.id);
                continue;
            };
            let lease = match s.lease.clone().map(Secret::new).transpose() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(job = %s.id, error = %e, "stored mirror job dropped: bad lease token");
                    store.remove(&s.id);
                    continue;
                }
            };
            let req = NewMirror {
                export: s.export.clone(),
                address: s.address.clone(),
                target_export: s.target_export.clone(),
                lease,
                tls: s.tls,
                mode: s.mode,
                bandwidth_mib_s: s.bandwidth_mib_s,
                max_in_flight: s.max_in_flight,
            };
            let tracker = persist::PersistentTracker::resume(bitmap);
            let dirty = tracker.dirty_bytes();
            match self.launch(req, s.id.clone(), Some(tracker), true) {
                Ok(v) => {
                    tracing::info!(job = %v.id, export = %v.export, dirty, "mirror job resumed after a restart")
                }
                Err(e) => {
                    tracing::error!(job = %s.id, error = %e, "stored mirror job cannot resume; dropped");
                    store.remove(&s.id);
                }
            }
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a job; it connects to the target in the background.
    pub fn start(&self, req: NewMirror) -> Result<JobView, MirrorError> {
        let id = format!("m-{:016x}", rand::random::<u64>());
        self.launch(req, id, None, false)
    }

    /// Starts job `id` (`resumed`: with `tracker`, restored from its bitmap).
    fn launch(
        &self,
        req: NewMirror,
        id: String,
        resumed_tracker: Option<persist::PersistentTracker>,
        resumed: bool,
    ) -> Result<JobView, MirrorError> {
        let export = self
            .registry
            .get(&req.export)
            .ok_or_else(|| MirrorError::NoExport(req.export.clone()))?;
        if req.address.is_empty() || req.target_export.is_empty() {
            return Err(MirrorError::Invalid(
                "target.address and target.export must not be empty".into(),
            ));
        }
        let tls = match (req.tls, &self.tls) {
            (Some(false), _) | (None, None) => None,
            (Some(true), None) => {
                return Err(MirrorError::Invalid(
                    "tls requested but this node has no --tls-cert/--tls-key/--tls-ca".into(),
                ));
            }
            (_, Some(files)) => {
                let host = req.address.strip_prefix("unix:").unwrap_or(&req.address);
                let cfg = files
                    .client_config()
                    .map_err(|e| MirrorError::Invalid(format!("TLS: {e}")))?;
                let name = if req.address.starts_with("unix:") {
                    stagehand_common::tls::server_name("localhost")
                } else {
                    stagehand_common::tls::server_name(host)
                }
                .map_err(|e| MirrorError::Invalid(e.to_string()))?;
                Some((cfg, name))
            }
        };
        self.allow
            .check(&req.address, tls.is_some())
            .map_err(MirrorError::NotAllowed)?;
        let mut tuning = Tuning::default();
        if let Some(b) = req.bandwidth_mib_s {
            if !(b.is_finite() && b > 0.0) {
                return Err(MirrorError::Invalid(
                    "bandwidth_mib_s must be a positive number".into(),
                ));
            }
            tuning.bandwidth = Some((b * (1u64 << 20) as f64) as u64);
        }
        if let Some(n) = req.max_in_flight {
            if n == 0 || n > MAX_IN_FLIGHT {
                return Err(MirrorError::Invalid(format!(
                    "max_in_flight must be 1 to {MAX_IN_FLIGHT}"
                )));
            }
            tuning.max_in_flight = n;
        }
        let mut jobs = self.jobs();
        if let Some(j) = jobs
            .values()
            .find(|j| j.export.name == export.name && !j.state().is_final())
        {
            return Err(MirrorError::Busy {
                export: export.name.clone(),
                id: j.id.clone(),
            });
        }
        let stored = persist::StoredJob {
            id: id.clone(),
            export: req.export.clone(),
            address: req.address.clone(),
            target_export: req.target_export.clone(),
            lease: req.lease.as_ref().map(|l| l.expose().to_string()),
            tls: req.tls,
            mode: req.mode,
            bandwidth_mib_s: req.bandwidth_mib_s,
            max_in_flight: req.max_in_flight,
        };
        let persistent = self
            .store
            .as_ref()
            .filter(|_| export.bitmaps.is_persistent());
        let (tracker, granularity): (Arc<dyn DirtyTracker>, u64) =
            match (resumed_tracker, persistent) {
                (Some(t), _) => {
                    let g = t.granularity();
                    (Arc::new(t), g)
                }
                (None, Some(store)) => {
                    // The job's bitmap first (from here on the write path marks it),
                    // then its record: a crash in between leaves an unused bitmap, not
                    // a job without one.
                    let name = persist::job_bitmap(&id);
                    let bitmap = export
                        .create_bitmap(&name, DEFAULT_GRANULARITY)
                        .map_err(|e| {
                            MirrorError::Invalid(format!(
                                "cannot create the job's dirty bitmap: {e}"
                            ))
                        })?;
                    let t = persist::PersistentTracker::create(bitmap)
                        .and_then(|t| store.save(&stored).map(|()| t));
                    match t {
                        Ok(t) => (Arc::new(t), DEFAULT_GRANULARITY),
                        Err(e) => {
                            let _ = export.remove_bitmap(&name);
                            return Err(MirrorError::Invalid(format!(
                                "cannot keep the job on disk: {e}"
                            )));
                        }
                    }
                }
                (None, None) => (self.trackers)(&export, &id).map_err(MirrorError::Invalid)?,
            };
        // Requests never share a granule of the tracker (see `plan`).
        tuning.align = granularity.max(tuning.align).next_power_of_two();
        tuning.max_request = tuning.max_request.max(tuning.align);
        let target = Target {
            address: req.address,
            export: req.target_export,
            lease: req.lease,
            tls,
        };
        let job = Job::new(
            id.clone(),
            Arc::clone(&export),
            target,
            tracker,
            req.mode,
            tuning,
        );
        if resumed {
            job.set_resumed();
        }
        if let Some(store) = persistent {
            job.set_store(store.clone());
        }
        // Changes are tracked from here on; the job's first pass covers the rest.
        export.mirrors.attach(Arc::clone(&job));
        jobs.insert(id.clone(), Arc::clone(&job));
        tracing::info!(job = %id, export = %export.name, target = ?job.target, mode = ?req.mode, "mirror job started");
        self.runtime.spawn(Arc::clone(&job).run());
        Ok(job.view())
    }

    pub fn list(&self) -> Vec<JobView> {
        self.jobs().values().map(|j| j.view()).collect()
    }

    pub fn get(&self, id: &str) -> Result<Arc<Job>, MirrorError> {
        self.jobs()
            .get(id)
            .cloned()
            .ok_or_else(|| MirrorError::NoJob(id.into()))
    }

    /// Forgets a job that has ended.
    pub fn forget(&self, id: &str) {
        let mut jobs = self.jobs();
        if jobs.get(id).is_some_and(|j| j.state().is_final()) {
            jobs.remove(id);
        }
    }
}

#[cfg(test)]
mod tests;
