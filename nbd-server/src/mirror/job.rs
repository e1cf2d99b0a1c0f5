//! The async shell of one mirror job: connect to the target, seed the tracker, run
//! passes until nothing is dirty, follow writes, retry after a lost target, and
//! drain on completion.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbd_client::{Client, ClientError, ClientOptions, ZeroFlags};
use nbd_proto::consts::{ENOSPC, EPERM, STATE_ZERO, TFLAG_SEND_WRITE_ZEROES};
use rustls::pki_types::ServerName;
use stagehand_common::secret::Secret;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::DirtyTracker;
use super::plan::{self, Limits, Step};
use super::source;
use super::state::{Event, State};
use super::tap::Change;
use crate::export::Export;

/// How the job treats guest writes (see [`super::tap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Background,
    WriteBlocking,
}

/// Where the job writes to. `Debug` never shows the lease token.
#[derive(Clone)]
pub struct Target {
    /// `HOST:PORT`, or `unix:PATH`.
    pub address: String,
    pub export: String,
    pub lease: Option<Secret>,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .field("export", &self.export)
            .field("lease", &self.lease.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Knobs of one job.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Request boundaries keep this alignment (the tracker's granularity or a
    /// multiple of it).
    pub align: u64,
    /// Largest WRITE (and read from the source).
    pub max_request: u64,
    /// Largest WRITE_ZEROES.
    pub max_zero: u64,
    /// Requests in flight to the target. 32 x 1 MiB fills a 1 Gbit/s link with a
    /// 20 ms round trip (2.5 MB in flight) more than ten times over.
    pub max_in_flight: usize,
    /// Cap on the bytes read and sent per second (None: as fast as it goes).
    pub bandwidth: Option<u64>,
    /// The target is flushed after this many bytes or this long, whichever first;
    /// what was written since the last flush is marked dirty again when the target
    /// is lost (it may not have reached its disk).
    pub flush_bytes: u64,
    pub flush_every: Duration,
    /// A request the target has not answered in this long counts as a lost
    /// target (a cut link shows no error until TCP gives up, many minutes later).
    pub request_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            align: 64 << 10,
            max_request: 1 << 20,
            max_zero: 64 << 20,
            max_in_flight: 32,
            bandwidth: None,
            flush_bytes: 64 << 20,
            flush_every: Duration::from_secs(1),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a step, a pass or a connection ended early.
#[derive(Debug)]
enum Stop {
    /// The target is gone or misbehaved: reconnect and resume from the tracker.
    Retry(String),
    /// The job cannot go on (fenced target, too small, source unreadable).
    Fatal(String),
    Cancelled,
}

fn client_stop(what: &str, e: ClientError) -> Stop {
    match e.errno() {
        Some(EPERM) => Stop::Fatal(format!(
            "{what}: the target refused the change (EPERM): its lease was fenced or the export is read-only"
        )),
        Some(ENOSPC) => Stop::Fatal(format!("{what}: the target is out of space (ENOSPC)")),
        _ => Stop::Retry(format!("{what}: {e}")),
    }
}

/// Measured data rate over the last few seconds.
#[derive(Debug, Default)]
struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(3);

impl RateMeter {
    fn add(&mut self, total: u64) {
        let now = Instant::now();
        if self
            .samples
            .back()
            .is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_millis(100))
        {
            if let Some(last) = self.samples.back_mut() {
                last.1 = total;
            }
        } else {
            self.samples.push_back((now, total));
        }
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    fn bytes_per_s(&self) -> f64 {
        let (Some(a), Some(b)) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        // Idle since the last sample: the rate decays to zero.
        let now = Instant::now();
        let dt = now.duration_since(a.0).as_secs_f64();
        if dt <= 0.0 || now.duration_since(b.0) > RATE_WINDOW {
            return 0.0;
        }
        (b.1 - a.1) as f64 / dt
    }
}

/// A token bucket that lets callers run into debt: each take waits until the
/// bucket would have refilled, so many concurrent takers share the rate.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        Self {
            rate,
            tokens: Self::burst(rate),
            last: Instant::now(),
        }
    }

    /// A tenth of a second's worth.
    fn burst(rate: f64) -> f64 {
        (rate / 10.0).max(1.0)
    }

    /// How long the caller must wait before sending `n` bytes.
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let burst = Self::burst(self.rate);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Byte ranges being written to the target. A guest write forwarded in
/// write-blocking mode and a copy of the same blocks must not cross on the wire:
/// the later of the two must also land later.
#[derive(Debug, Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next: AtomicU64,
    freed: Notify,
}

struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        if let Ok(mut h) = self.locks.held.lock() {
            h.retain(|r| r.2 != self.id);
        }
        self.locks.freed.notify_waiters();
    }
}

impl RangeLocks {
    async fn lock(self: &Arc<Self>, offset: u64, len: u64) -> RangeGuard {
        let end = offset.saturating_add(len);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
                if !h.iter().any(|&(s, e, _)| s < end && offset < e) {
                    let id = self.next.fetch_add(1, Ordering::Relaxed);
                    h.push((offset, end, id));
                    return RangeGuard {
                        locks: Arc::clone(self),
                        id,
                    };
                }
            }
            freed.await;
        }
    }

    /// Waits until nothing is being written.
    async fn idle(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.held.lock().map(|h| h.is_empty()).unwrap_or(true) {
                return;
            }
            freed.await;
        }
    }
}

/// Changes the target acknowledged but may not have made durable yet.
#[derive(Debug, Default)]
struct Unflushed {
    ranges: Vec<(u64, u64)>,
    bytes: u64,
}

#[derive(Debug)]
struct Status {
    state: State,
    error: Option<String>,
    complete: bool,
}

/// One mirror job, shared by its task, the write path (through the export's tap)
/// and the control API.
pub struct Job {
    pub id: String,
    pub export: Arc<Export>,
    pub target: Target,
    tracker: Arc<dyn DirtyTracker>,
    tuning: Tuning,
    mode: AtomicU8,
    status: Mutex<Status>,
    state_tx: watch::Sender<State>,
    bytes_copied: AtomicU64,
    bytes_zeroed: AtomicU64,
    rate: Mutex<RateMeter>,
    bucket: Option<Mutex<Bucket>>,
    locks: Arc<RangeLocks>,
    /// The current connection, for forwarded writes.
    client: Mutex<Option<Arc<Client>>>,
    unflushed: Mutex<Unflushed>,
    /// Something became dirty, or completion was asked for.
    wake: Notify,
    /// A forwarded write found the target gone.
    lost: Notify,
    cancel: CancellationToken,
    /// Resumed after a restart: the tracker already holds what to copy (no seed).
    resumed: std::sync::atomic::AtomicBool,
    /// Where the job is kept across restarts (removed with its bitmap when the job
    /// ends), and when the tracker last wrote what settled.
    stored: Mutex<Option<super::persist::JobStore>>,
    last_persist: Mutex<Instant>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("export", &self.export.name)
            .field("target", &self.target)
            .finish()
    }
}

/// A snapshot of a job for the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobView {
    pub id: String,
    pub export: String,
    pub target: TargetView,
    pub mode: Mode,
    pub state: State,
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
    pub dirty_bytes: u64,
    pub rate_mib_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<f64>,
    pub max_in_flight: usize,
    pub tls: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetView {
    pub address: String,
    pub export: String,
}

const MODE_BACKGROUND: u8 = 0;
const MODE_BLOCKING: u8 = 1;
const MIB: f64 = (1 << 20) as f64;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a synced job sleeps between looks at the tracker when nothing wakes
/// it (the wake-up from the write path makes this a fallback only).
const IDLE_POLL: Duration = Duration::from_millis(200);

impl Job {
    pub fn new(
        id: String,
        export: Arc<Export>,
        target: Target,
        tracker: Arc<dyn DirtyTracker>,
        mode: Mode,
        tuning: Tuning,
    ) -> Arc<Self> {
        let (state_tx, _) = watch::channel(State::Copying);
        Arc::new(Self {
            id,
            export,
            target,
            tracker,
            bucket: tuning.bandwidth.map(|b| Mutex::new(Bucket::new(b))),
            tuning,
            mode: AtomicU8::new(mode_code(mode)),
            status: Mutex::new(Status {
                state: State::Copying,
                error: None,
                complete: false,
            }),
            state_tx,
            bytes_copied: AtomicU64::new(0),
            bytes_zeroed: AtomicU64::new(0),
            rate: Mutex::new(RateMeter::default()),
            locks: Arc::new(RangeLocks::default()),
            client: Mutex::new(None),
            unflushed: Mutex::new(Unflushed::default()),
            wake: Notify::new(),
            lost: Notify::new(),
            cancel: CancellationToken::new(),
            resumed: std::sync::atomic::AtomicBool::new(false),
            stored: Mutex::new(None),
            last_persist: Mutex::new(Instant::now()),
        })
    }

    /// Marks the job as resumed from its stored record and bitmap (it skips the
    /// first pass's seeding). Before `run`.
    pub fn set_resumed(&self) {
        self.resumed.store(true, Ordering::SeqCst);
    }

    /// Keeps the job in `store` until it ends. Before `run`.
    pub fn set_store(&self, store: super::persist::JobStore) {
        if let Ok(mut s) = self.stored.lock() {
            *s = Some(store);
        }
    }

    /// Whether something newer than a settled copy is on its way for
    /// `[offset, offset+len)`: a copy or forwarded write on the wire, one the
    /// target acknowledged but no FLUSH covered yet, or a change in flight on the
    /// source. Checked after the persistent bitmap's clear (see `persist`).
    fn pending(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let overlaps = |s: u64, e: u64| s < end && offset < e;
        self.locks
            .held
            .lock()
            .map(|h| h.iter().any(|&(s, e, _)| overlaps(s, e)))
            .unwrap_or(true)
            || self
                .unflushed
                .lock()
                .map(|u| u.ranges.iter().any(|&(o, l)| overlaps(o, o + l)))
                .unwrap_or(true)
            || self.export.inflight.busy(offset, len)
    }

    /// The copies of `ranges` are durable on the target: the tracker's persistent
    /// record forgets them (written to disk at most every `PERSIST_EVERY`).
    async fn settle(&self, ranges: &[(u64, u64)]) {
        self.tracker.settle(ranges, &|o, l| self.pending(o, l));
        let due = self
            .last_persist
            .lock()
            .map(|mut t| {
                let due = t.elapsed() >= super::persist::PERSIST_EVERY;
                if due {
                    *t = Instant::now();
                }
                due
            })
            .unwrap_or(false);
        if due {
            let t = Arc::clone(&self.tracker);
            match tokio::task::spawn_blocking(move || t.persist()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(job = %self.id, error = %e, "mirror bitmap not written; a restart copies more")
                }
                Err(e) => {
                    tracing::warn!(job = %self.id, error = %e, "mirror bitmap write task failed")
                }
            }
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.status().state
    }

    pub fn mode(&self) -> Mode {
        if self.mode.load(Ordering::Acquire) == MODE_BLOCKING {
            Mode::WriteBlocking
        } else {
            Mode::Background
        }
    }

    pub fn write_blocking(&self) -> bool {
        self.mode.load(Ordering::Acquire) == MODE_BLOCKING
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode_code(mode), Ordering::Release);
        tracing::info!(job = %self.id, ?mode, "mirror mode");
    }

    /// Asks the job to drain the last dirty blocks, flush the target and end
    /// `completed`. Writes to the source must have stopped (a paused guest): a
    /// write after the last drain is not mirrored.
    pub fn complete(&self) {
        self.status().complete = true;
        self.wake.notify_one();
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Watches the state (for waiting on completion or cancellation).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    pub fn view(&self) -> JobView {
        let (state, error) = {
            let s = self.status();
            (s.state, s.error.clone())
        };
        JobView {
            id: self.id.clone(),
            export: self.export.name.clone(),
            target: TargetView {
                address: self.target.address.clone(),
                export: self.target.export.clone(),
            },
            mode: self.mode(),
            state,
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Ordering::Relaxed),
            dirty_bytes: self.tracker.dirty_bytes(),
            rate_mib_s: self
                .rate
                .lock()
                .map(|r| r.bytes_per_s() / MIB)
                .unwrap_or(0.0),
            bandwidth_mib_s: self.tuning.bandwidth.map(|b| b as f64 / MIB),
            max_in_flight: self.tuning.max_in_flight,
            tls: self.target.tls.is_some(),
            error,
        }
    }

    fn event(&self, ev: Event) {
        let mut s = self.status();
        let next = s.state.on(ev);
        if next != s.state {
            tracing::info!(job = %self.id, from = ?s.state, to = ?next, "mirror state");
            s.state = next;
            self.state_tx.send_replace(next);
        }
    }

    fn set_error(&self, e: Option<String>) {
        self.status().error = e;
    }

    /// A change landed on the source: mark it (and wake the job to copy it).
    pub(super) fn note_change(&self, offset: u64, len: u64) {
        self.tracker.mark(offset, len);
        self.wake.notify_one();
    }

    /// Write-blocking: writes `change` to the target before the guest's request is
    /// answered; marks it dirty when that fails.
    pub(super) async fn forward(&self, change: &Change<'_>) {
        let (offset, len) = change.range();
        let client = self.client.lock().ok().and_then(|c| c.clone());
        let Some(client) = client else {
            self.note_change(offset, len);
            return;
        };
        let _g = self.locks.lock(offset, len).await;
        let r = match *change {
            Change::Write { offset, data, fua } => {
                let mut r = Ok(());
                for (i, chunk) in data.chunks(self.tuning.max_request as usize).enumerate() {
                    let at = offset + (i as u64) * self.tuning.max_request;
                    r = timed(self.tuning.request_timeout, client.write(at, chunk, fua)).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            Change::Zero { .. }
            | Change::Trim {
                reads_zero: true, ..
            } => {
                let zero = zero_target(&client, offset, len, self.tuning.max_request);
                timed(self.tuning.request_timeout, zero).await
            }
            Change::Trim { .. } => {
                // Unknown contents afterwards: let a pass copy whatever it reads.
                self.note_change(offset, len);
                return;
            }
        };
        match r {
            Ok(()) => self.add_unflushed(offset, len),
            Err(e) => {
                tracing::debug!(job = %self.id, error = %e, "forwarded write failed; marked dirty");
                self.note_change(offset, len);
                self.lost.notify_one();
            }
        }
    }

    fn add_unflushed(&self, offset: u64, len: u64) {
        if let Ok(mut u) = self.unflushed.lock() {
            // Adjacent ranges (a pass's sequential requests) merge.
            match u.ranges.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += len,
                _ => u.ranges.push((offset, len)),
            }
            u.bytes += len;
        }
    }

    fn take_unflushed(&self) -> Unflushed {
        self.unflushed
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default()
    }

    /// Marks every change the target has not made durable (the target was lost).
    fn requeue_unflushed(&self) {
        let u = self.take_unflushed();
        for (o, l) in u.ranges {
            self.tracker.mark(o, l);
        }
    }

    /// Runs the job to its end; the export stops reporting changes to it then.
    pub async fn run(self: Arc<Self>) {
        let end = self.main().await;
        match end {
            Ok(()) => self.event(Event::Drained),
            Err(Stop::Cancelled) => self.event(Event::Cancel),
            Err(Stop::Fatal(msg)) | Err(Stop::Retry(msg)) => {
                tracing::warn!(job = %self.id, error = %msg, "mirror failed");
                self.set_error(Some(msg));
                self.event(Event::Fatal);
            }
        }
        self.export.mirrors.detach(&self.id);
        // Ended for good (not a node shutdown, which drops this task): nothing to
        // resume, so the stored record and the job's bitmap go.
        let stored = self.stored.lock().ok().and_then(|mut s| s.take());
        if let Some(store) = stored {
            store.remove(&self.id);
            let name = super::persist::job_bitmap(&self.id);
            if let Err(e) = self.export.remove_bitmap(&name) {
                tracing::warn!(job = %self.id, error = %e, "cannot remove the mirror job's bitmap");
            }
        }
        let client = self.client.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = client.and_then(|c| Arc::try_unwrap(c).ok()) {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.disconnect()).await;
        }
        tracing::info!(job = %self.id, view = ?self.view(), "mirror job ended");
    }

    async fn main(self: &Arc<Self>) -> Result<(), Stop> {
        let mut seeded = self.resumed.load(Ordering::SeqCst);
        let mut backoff = BACKOFF_MIN;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            if self.export.removed.is_cancelled() {
                return Err(Stop::Fatal("the source export was removed".into()));
            }
            let attempt = async {
                let client = self.connect().await?;
                if let Ok(mut c) = self.client.lock() {
                    *c = Some(Arc::clone(&client));
                }
                if !seeded {
                    self.seed(&client).await?;
                    seeded = true;
                }
                self.set_error(None);
                backoff = BACKOFF_MIN;
                self.follow(&client).await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(Stop::Retry(msg)) => {
                    if let Ok(mut c) = self.client.lock() {
                        *c = None;
                    }
                    self.requeue_unflushed();
                    tracing::warn!(job = %self.id, error = %msg, retry_in = ?backoff, "mirror target lost; will resume from the dirty blocks");
                    self.set_error(Some(msg));
                    self.event(Event::TargetLost);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(Stop::Cancelled),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect(&self) -> Result<Arc<Client>, Stop> {
        let t = &self.target;
        let mut opts = ClientOptions::new(&t.export);
        if let Some(token) = &t.lease {
            opts = opts.lease(token);
        }
        if let Some((cfg, name)) = &t.tls {
            opts = opts.tls(Arc::clone(cfg), name.clone());
        }
        let connecting = async {
            match t.address.strip_prefix("unix:") {
                Some(path) => Client::connect_unix(std::path::Path::new(path), opts).await,
                None => Client::connect_tcp(&t.address, opts).await,
            }
        };
        let client = tokio::select! {
            _ = self.cancel.cancelled() => return Err(Stop::Cancelled),
            r = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => match r {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(Stop::Retry(format!("connecting to the target {}: {e}", t.address))),
                Err(_) => return Err(Stop::Retry(format!("connecting to the target {}: timed out", t.address))),
            },
        };
        if client.info().read_only() {
            return Err(Stop::Fatal(format!(
                "the target export {:?} is read-only for this connection (a leased export needs lease_token)",
                t.export
            )));
        }
        if client.size() < self.export.size {
            return Err(Stop::Fatal(format!(
                "the target export is smaller ({} bytes) than the source ({} bytes)",
                client.size(),
                self.export.size
            )));
        }
        tracing::info!(job = %self.id, target = %t.address, tls = t.tls.is_some(), "mirror target connected");
        Ok(Arc::new(client))
    }

    /// Marks what the first pass must copy: the source's allocated extents, and
    /// its holes where the target does not already read zeros.
    async fn seed(&self, client: &Client) -> Result<(), Stop> {
        let size = self.export.size;
        let zero = target_zero_extents(client, size).await?;
        let export = Arc::clone(&self.export);
        let allocated = tokio::task::spawn_blocking(move || source::allocated(&export, 0, size))
            .await
            .map_err(|e| Stop::Fatal(format!("allocation scan: {e}")))?
            .map_err(|e| Stop::Fatal(format!("allocation scan of the source: {e}")))?;
        let seed = plan::seed(&allocated, &zero, size, self.tuning.align);
        let bytes: u64 = seed.iter().map(|e| e.1).sum();
        tracing::info!(job = %self.id, allocated = allocated.iter().map(|e| e.1).sum::<u64>(), to_copy = bytes, "mirror seeded");
        let mut in_sync = Vec::new();
        let mut pos = 0;
        for &(o, l) in &seed {
            self.tracker.mark(o, l);
            if o > pos {
                in_sync.push((pos, o - pos));
            }
            pos = o + l;
        }
        if pos < size {
            in_sync.push((pos, size - pos));
        }
        // Holes of the source where the target reads zeros are in sync already.
        self.settle(&in_sync).await;
        Ok(())
    }

    /// Passes until nothing is dirty, then follows writes; returns when completion
    /// was asked for and everything is drained and flushed on the target.
    async fn follow(self: &Arc<Self>, client: &Arc<Client>) -> Result<(), Stop> {
        let mut last_flush = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            if self.export.removed.is_cancelled() {
                return Err(Stop::Fatal("the source export was removed".into()));
            }
            let dirty = self.tracker.dirty_extents();
            if dirty.is_empty() {
                self.flush(client).await?;
                last_flush = Instant::now();
                let complete = self.status().complete;
                if complete {
                    // Forwarded writes still on the wire finish first.
                    self.locks.idle().await;
                    self.flush(client).await?;
                    if self.tracker.dirty_bytes() == 0 {
                        return Ok(());
                    }
                    continue;
                }
                self.event(Event::CaughtUp);
                tokio::select! {
                    _ = self.cancel.cancelled() => return Err(Stop::Cancelled),
                    _ = self.wake.notified() => {}
                    _ = self.lost.notified() => return Err(Stop::Retry("a forwarded write failed".into())),
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            }
            let (lo, hi) = match (dirty.first(), dirty.last()) {
                (Some(f), Some(l)) => (f.0, l.0 + l.1),
                _ => continue,
            };
            let export = Arc::clone(&self.export);
            let allocated = tokio::task::spawn_blocking(move || source::allocated(&export, lo, hi))
                .await
                .map_err(|e| Stop::Fatal(format!("allocation scan: {e}")))?
                .map_err(|e| Stop::Fatal(format!("allocation scan of the source: {e}")))?;
            let lim = Limits::new(
                self.tuning.align,
                self.tuning.max_request,
                self.tuning.max_zero,
            );
            let steps = plan::plan_pass(&dirty, &allocated, self.export.size, &lim);
            tracing::debug!(job = %self.id, steps = steps.len(), dirty = dirty.iter().map(|e| e.1).sum::<u64>(), "mirror pass");
            self.pass(client, steps, &mut last_flush).await?;
        }
    }

    /// One pass: up to `max_in_flight` steps at a time. Steps not started when one
    /// fails stay dirty; each failed step marks its own range again.
    async fn pass(
        self: &Arc<Self>,
        client: &Arc<Client>,
        steps: Vec<Step>,
        last_flush: &mut Instant,
    ) -> Result<(), Stop> {
        let slots = Arc::new(Semaphore::new(self.tuning.max_in_flight.max(1)));
        let mut set: JoinSet<Result<(), Stop>> = JoinSet::new();
        let mut failed: Option<Stop> = None;
        for step in steps {
            while let Some(r) = set.try_join_next() {
                note_failure(&mut failed, r);
            }
            if failed.is_some() {
                break;
            }
            let permit: OwnedSemaphorePermit = tokio::select! {
                _ = self.cancel.cancelled() => {
                    set.abort_all();
                    return Err(Stop::Cancelled);
                }
                _ = self.lost.notified() => {
                    failed = Some(Stop::Retry("a forwarded write failed".into()));
                    break;
                }
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (job, conn) = (Arc::clone(self), Arc::clone(client));
            set.spawn(async move {
                let r = job.step(&conn, step).await;
                drop(permit);
                r
            });
            if self.unflushed_bytes() >= self.tuning.flush_bytes
                || last_flush.elapsed() >= self.tuning.flush_every
            {
                // Alongside the steps in flight (waiting for it would stall the
                // window for a round trip and the target's fdatasync): FLUSH covers
                // what the target acknowledged before it was sent (see `flush`).
                let u = self.take_unflushed();
                let (job, conn) = (Arc::clone(self), Arc::clone(client));
                set.spawn(async move { job.flush_taken(&conn, u).await });
                *last_flush = Instant::now();
            }
        }
        while let Some(r) = set.join_next().await {
            note_failure(&mut failed, r);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn unflushed_bytes(&self) -> u64 {
        self.unflushed.lock().map(|u| u.bytes).unwrap_or(0)
    }

    /// Clears the step's range, copies it, and marks it again if that failed.
    async fn step(&self, client: &Client, step: Step) -> Result<(), Stop> {
        let (offset, len) = step.range();
        let _g = self.locks.lock(offset, len).await;
        self.tracker
            .clear_range(offset, len)
            .map_err(|e| Stop::Fatal(format!("clearing the dirty tracker: {e}")))?;
        let r = match step {
            // The pass planned a hole from an allocation scan made before this
            // clear: a write that landed since (its mark came before the clear, so
            // the clear just took it away) would be zeroed on the target for good.
            // Scanned again after the clear, a write landing later is marked again.
            Step::Zero { .. } if self.holds_data(offset, len).await? => {
                self.copy_range(client, offset, len).await
            }
            _ => self.copy(client, step).await,
        };
        match &r {
            Ok(()) => self.add_unflushed(offset, len),
            Err(_) => self.tracker.mark(offset, len),
        }
        r
    }

    /// Whether the source holds data in `[offset, offset+len)` now.
    async fn holds_data(&self, offset: u64, len: u64) -> Result<bool, Stop> {
        let export = Arc::clone(&self.export);
        let allocated =
            tokio::task::spawn_blocking(move || source::allocated(&export, offset, offset + len))
                .await
                .map_err(|e| Stop::Fatal(format!("allocation scan: {e}")))?
                .map_err(|e| Stop::Fatal(format!("allocation scan of the source: {e}")))?;
        Ok(!allocated.is_empty())
    }

    /// Copies `[offset, offset+len)` in requests of at most `max_request` bytes
    /// (each read, then written, or zeroed when it reads as zeros).
    async fn copy_range(&self, client: &Client, offset: u64, len: u64) -> Result<(), Stop> {
        let mut at = offset;
        while at < offset + len {
            let n = self.tuning.max_request.min(offset + len - at);
            self.copy(client, Step::Copy { offset: at, len: n }).await?;
            at += n;
        }
        Ok(())
    }

    /// Runs one step of a pass as `pass` does (for tests that set up a race).
    #[cfg(test)]
    pub(super) async fn run_step(&self, step: Step) -> Result<(), String> {
        let client = self.client.lock().ok().and_then(|c| c.clone());
        let client = client.ok_or("not connected")?;
        self.step(&client, step).await.map_err(|e| format!("{e:?}"))
    }

    async fn copy(&self, client: &Client, step: Step) -> Result<(), Stop> {
        let (offset, len) = step.range();
        if let Step::Copy { .. } = step {
            if let Some(b) = &self.bucket {
                let wait = b.lock().map(|mut b| b.take(len)).unwrap_or_default();
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            let file = Arc::clone(&self.export.file);
            let data = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(|e| Stop::Fatal(format!("source read task: {e}")))?
            .map_err(|e| Stop::Fatal(format!("reading the source at {offset}: {e}")))?;
            if !plan::is_zero(&data) {
                timed(
                    self.tuning.request_timeout,
                    client.write(offset, &data, false),
                )
                .await
                .map_err(|e| client_stop("writing to the target", e))?;
                let total = self.bytes_copied.fetch_add(len, Ordering::Relaxed) + len;
                if let Ok(mut r) = self.rate.lock() {
                    r.add(total);
                }
                return Ok(());
            }
        }
        let zero = zero_target(client, offset, len, self.tuning.max_request);
        timed(self.tuning.request_timeout, zero)
            .await
            .map_err(|e| client_stop("zeroing on the target", e))?;
        self.bytes_zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// FLUSH on the target; what it covered is no longer at risk. On a failure it
    /// is all marked dirty again.
    async fn flush(&self, client: &Client) -> Result<(), Stop> {
        let u = self.take_unflushed();
        self.flush_taken(client, u).await
    }

    /// FLUSH for the changes `u` taken out of the unflushed set.
    async fn flush_taken(&self, client: &Client, u: Unflushed) -> Result<(), Stop> {
        if u.ranges.is_empty() {
            return Ok(());
        }
        match timed(self.tuning.request_timeout, client.flush()).await {
            Ok(()) => {
                self.settle(&u.ranges).await;
                Ok(())
            }
            Err(e) => {
                for (o, l) in u.ranges {
                    self.tracker.mark(o, l);
                }
                Err(client_stop("flushing the target", e))
            }
        }
    }
}

fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::Background => MODE_BACKGROUND,
        Mode::WriteBlocking => MODE_BLOCKING,
    }
}

fn note_failure(failed: &mut Option<Stop>, r: Result<Result<(), Stop>, tokio::task::JoinError>) {
    let e = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(e) => Stop::Retry(format!("copy task: {e}")),
    };
    // A fatal error wins over a retry.
    match (&failed, &e) {
        (Some(Stop::Fatal(_)), _) => {}
        _ => *failed = Some(e),
    }
}

/// `fut` within `limit`, else a timeout error (the job then reconnects).
async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the target in {limit:?}"),
        ))),
    }
}

/// WRITE_ZEROES on the target (zero-filled WRITEs when it has no WRITE_ZEROES).
async fn zero_target(
    client: &Client,
    offset: u64,
    len: u64,
    max_write: u64,
) -> Result<(), ClientError> {
    if client.info().has(TFLAG_SEND_WRITE_ZEROES) {
        return client.write_zeroes(offset, len, ZeroFlags::default()).await;
    }
    let zeros = vec![0u8; len.min(max_write) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(max_write);
        client
            .write(offset + pos, &zeros[..n as usize], false)
            .await?;
        pos += n;
    }
    Ok(())
}

/// The ranges the target reports as reading zeros (base:allocation STATE_ZERO);
/// none when it cannot say.
async fn target_zero_extents(client: &Client, size: u64) -> Result<Vec<(u64, u64)>, Stop> {
    let mut out = Vec::new();
    if client.info().base_allocation.is_none() {
        return Ok(out);
    }
    let mut pos = 0;
    while pos < size {
        // Lengths stay below 4 GiB for servers with 32-bit extents.
        let len = (size - pos).min(1 << 30);
        let status = client.block_status(pos, len, false);
        let extents = match timed(Duration::from_secs(60), status).await {
            Ok(e) => e,
            Err(ClientError::Server { .. }) => break,
            Err(e) => return Err(Stop::Retry(format!("block status of the target: {e}"))),
        };
        let before = pos;
        for e in extents {
            let l = e.length.min(size - pos);
            if l == 0 {
                break;
            }
            if e.flags & STATE_ZERO != 0 {
                out.push((pos, l));
            }
            pos += l;
        }
        if pos == before {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_spreads_takes_over_time() {
        let mut b = Bucket::new(10 << 20);
        // 1 MiB right away is within the burst of a tenth of a second.
        assert!(b.take(1 << 20) <= Duration::from_millis(5));
        // The next 10 MiB must wait about a second.
        let w = b.take(10 << 20);
        assert!(
            w > Duration::from_millis(900) && w < Duration::from_millis(1100),
            "{w:?}"
        );
    }

    #[test]
    fn rate_meter_measures_the_window() {
        let mut r = RateMeter::default();
        let t0 = Instant::now();
        r.samples.push_back((t0 - Duration::from_secs(2), 0));
        r.samples.push_back((t0, 200 << 20));
        let rate = r.bytes_per_s() / MIB;
        assert!((90.0..=101.0).contains(&rate), "{rate}");
        assert_eq!(RateMeter::default().bytes_per_s(), 0.0);
    }

    #[test]
    fn target_debug_hides_the_lease() {
        let t = Target {
            address: "a:1".into(),
            export: "e".into(),
            lease: Some(Secret::new("s3cret-lease").unwrap()),
            tls: None,
        };
        let s = format!("{t:?}");
        assert!(!s.contains("s3cret"), "{s}");
    }

    #[tokio::test]
    async fn range_locks_order_overlapping_writers() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 100).await;
        // Disjoint: immediate.
        let g2 = tokio::time::timeout(Duration::from_millis(100), locks.lock(100, 10))
            .await
            .expect("disjoint range locks at once");
        let l2 = Arc::clone(&locks);
        let waiter = tokio::spawn(async move { l2.lock(50, 10).await.id });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "overlapping lock taken while held");
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released")
            .unwrap();
        drop(g2);
        tokio::time::timeout(Duration::from_secs(1), locks.idle())
            .await
            .expect("idle");
    }
}
