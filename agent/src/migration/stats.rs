//! Statistics of an outgoing migration, shaped like QEMU's `query-migrate`, and the
//! shared handle through which the API reads them, changes limits and cancels.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::policy::Limits;
use super::protocol::{Compression, SwitchoverMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Connecting, authenticating, target creating the VM.
    Setup,
    /// Pre-copy passes while the guest runs.
    Active,
    /// Stop and copy: the guest is paused.
    Device,
    /// Coordinated switchover: the source is paused with its disks drained and waits
    /// for the go-ahead (`POST /v1/migrations/{id}/switchover`) while it sends the last
    /// pages, state and digests. From here the source never resumes on its own.
    Quiesced,
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
    /// Coordinated mode: from the pause to the coordinator's go-ahead (0 in auto
    /// mode). Final pages, state and verify run during this wait, so it overlaps them.
    pub switchover_wait_ms: f64,
    /// Restoring the state and resuming on the target, until it reported running
    /// (coordinated: from the go-ahead, or the verify if that ended later).
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
    pub switchover: SwitchoverMode,
    pub switchover_timeout_s: u64,
    /// Coordinated mode: when the source paused and quiesced, ms since the start.
    pub quiesced_at_ms: Option<f64>,
    /// Coordinated mode: when the go-ahead came, ms since the start.
    pub go_ahead_at_ms: Option<f64>,
    /// CPU time the source's stream workers used (reading, scanning, hashing and
    /// sending pages): what the migration costs the host beyond the wall clock.
    pub cpu_ms: f64,
}

/// The coordinated switchover's decision point, shared by the API and the sender so
/// that a go-ahead, a cancel and the sender's timeout cannot both win.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Window {
    /// Not quiesced (yet), or auto mode: the go-ahead is refused.
    #[default]
    Closed,
    /// Quiesced, waiting: go-ahead or cancel may come.
    Open,
    /// The go-ahead came with these disk URIs (secrets: never logged or shown).
    GoAhead(Vec<crate::contract::DiskSpec>),
    /// Cancelled while quiesced, before any go-ahead.
    Cancelled,
    /// Aborted while quiesced, before any go-ahead: the coordinator fenced (or may have
    /// fenced) the disks away, so the source must stay paused until it is resumed with
    /// new disk URIs.
    Aborted,
    /// The sender gave up (timeout, target lost); nothing more is accepted.
    Failed,
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
    /// CPU time of finished stream workers, ns.
    pub cpu_ns: AtomicU64,
}

/// One outgoing migration, shared by its sender thread and the API.
pub struct Outgoing {
    pub started: Instant,
    pub info: Mutex<MigrationInfo>,
    pub limits: Mutex<Limits>,
    pub counters: Counters,
    cancel: AtomicBool,
    pub window: Mutex<Window>,
    /// Disks of the VM: a go-ahead must carry this many URIs.
    pub disk_count: usize,
}

impl Outgoing {
    pub fn new(disk_count: usize, info: MigrationInfo) -> Self {
        Outgoing {
            disk_count,
            started: Instant::now(),
            limits: Mutex::new(info.limits),
            info: Mutex::new(info),
            counters: Counters::default(),
            cancel: AtomicBool::new(false),
            window: Mutex::new(Window::Closed),
        }
    }

    /// Runs `f` on the switchover window under its lock.
    pub fn with_window<T>(&self, f: impl FnOnce(&mut Window) -> T) -> T {
        f(&mut self.window.lock().expect("window lock is never poisoned"))
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
        i.cpu_ms = c.cpu_ns.load(Ordering::Relaxed) as f64 / 1e6;
        if !i.state.is_final() {
            i.total_ms = ms(self.started.elapsed());
            i.remaining_bytes = c.pass_pending.load(Ordering::Relaxed);
        }
        i
    }
}

/// Nice value of the migration threads (the vCPU threads run at 0).
pub const MIGRATION_NICE: i32 = -5;

/// Runs the calling thread at `MIGRATION_NICE`: a guest that keeps its vCPU busy then
/// cannot starve its own migration of CPU (on a loaded 2-core host the sender and
/// receiver otherwise get the same share as the spinning vCPU). Needs CAP_SYS_NICE;
/// without it the thread keeps its priority.
pub fn raise_thread_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: setpriority only reads its integer arguments; PRIO_PROCESS with a thread
    // id changes that thread's nice value on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, MIGRATION_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot raise the migration thread's priority");
    }
}

/// CPU time the calling thread has used so far (zero if the clock is unavailable).
pub fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
