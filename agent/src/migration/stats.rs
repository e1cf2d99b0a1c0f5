//! Statistics of an outgoing migration, shaped like QEMU's `query-migrate`, and the
//! shared handle through which the API reads them, changes limits and cancels.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::policy::Limits;
use super::protocol::Compression;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Connecting, authenticating, target creating the VM.
    Setup,
    /// Pre-copy passes while the guest runs.
    Active,
    /// Stop and copy: the guest is paused.
    Device,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PassInfo {
    /// Guest bytes sent in the pass (before compression).
    pub bytes: u64,
    pub duration_ms: f64,
    /// Pages dirtied during the pass (the next pass's work).
    pub dirty_pages: u64,
    pub throttle_percent: u8,
}

/// Where the downtime went (all in milliseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Downtime {
    /// Pausing the vCPUs.
    pub pause_ms: f64,
    /// Collecting and sending the last dirty pages.
    pub final_pages_ms: f64,
    /// Saving and sending the vCPU and device state.
    pub state_ms: f64,
    /// The target's digest check of the whole memory.
    pub verify_ms: f64,
    /// Restoring the state and resuming on the target, until it reported running.
    pub complete_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// The answer of `GET /v1/migrations/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationInfo {
    pub id: String,
    pub vm: String,
    pub target: String,
    pub state: MigrationState,
    pub error: Option<ErrorInfo>,
    pub total_ms: f64,
    pub setup_ms: f64,
    pub downtime_ms: f64,
    pub downtime: Downtime,
    pub expected_downtime_ms: f64,
    /// Bytes on the wire (after compression, including framing).
    pub transferred_bytes: u64,
    /// Guest page bytes sent (before compression).
    pub ram_transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    /// Zero pages skipped in the first pass.
    pub zero_pages: u64,
    /// Pages sent.
    pub normal_pages: u64,
    pub passes: Vec<PassInfo>,
    /// Measured bandwidth of the link, MiB/s.
    pub bandwidth_mibs: f64,
    /// Pages dirtied per second during the last pass.
    pub dirty_rate_pages_per_s: f64,
    pub throttle_percent: u8,
    pub streams: u16,
    pub compression: Compression,
    pub limits: Limits,
}

/// Live counters the stream workers update without a lock.
#[derive(Debug, Default)]
pub struct Counters {
    pub wire_bytes: AtomicU64,
    pub ram_bytes: AtomicU64,
    pub zero_pages: AtomicU64,
    pub normal_pages: AtomicU64,
    /// Bytes of the current pass not yet handled.
    pub pass_pending: AtomicU64,
}

/// One outgoing migration, shared by its sender thread and the API.
pub struct Outgoing {
    pub started: Instant,
    pub info: Mutex<MigrationInfo>,
    pub limits: Mutex<Limits>,
    pub counters: Counters,
    cancel: AtomicBool,
}

impl Outgoing {
    pub fn new(info: MigrationInfo) -> Self {
        Outgoing {
            started: Instant::now(),
            limits: Mutex::new(info.limits),
            info: Mutex::new(info),
            counters: Counters::default(),
            cancel: AtomicBool::new(false),
        }
    }

    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn limits(&self) -> Limits {
        *self.limits.lock().expect("limits lock is never poisoned")
    }

    pub fn set_limits(&self, l: Limits) {
        *self.limits.lock().expect("limits lock is never poisoned") = l;
        self.update(|i| i.limits = l);
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().expect("info lock is never poisoned"));
    }

    pub fn state(&self) -> MigrationState {
        self.info.lock().expect("info lock is never poisoned").state
    }

    /// A consistent snapshot for the API, with the live counters folded in.
    pub fn snapshot(&self) -> MigrationInfo {
        let mut i = self
            .info
            .lock()
            .expect("info lock is never poisoned")
            .clone();
        let c = &self.counters;
        i.transferred_bytes = c.wire_bytes.load(Ordering::Relaxed);
        i.ram_transferred_bytes = c.ram_bytes.load(Ordering::Relaxed);
        i.zero_pages = c.zero_pages.load(Ordering::Relaxed);
        i.normal_pages = c.normal_pages.load(Ordering::Relaxed);
        if !i.state.is_final() {
            i.total_ms = ms(self.started.elapsed());
            i.remaining_bytes = c.pass_pending.load(Ordering::Relaxed);
        }
        i
    }
}

pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
