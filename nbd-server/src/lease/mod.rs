//! Write leases with epoch fencing: the guarantee that one holder, and only one, can
//! change an export at any instant.
//!
//! # Model
//!
//! Every leased export carries a [`LeaseRecord`] `{epoch, holder, token hash}`. A
//! connection binds to the current epoch at NBD_OPT_GO / EXPORT_NAME by presenting the
//! token (`NAME;lease=TOKEN`); every connection that presents the same token shares one
//! [`EpochSlot`] (multi-conn: all connections of one holder share its epoch). A fence
//! installs a new epoch with a new token and marks the old slot fenced.
//!
//! # Why no stale byte can land after a fence returns
//!
//! The data path and the fence meet on two sequentially consistent atomics in the
//! slot, in the classic store-then-load (Dekker) pattern:
//!
//! * `begin_change`: `in_flight += 1` (SeqCst), then load `fenced` (SeqCst). If fenced,
//!   undo and refuse; otherwise the change may be submitted and the counter is held
//!   until the change has completed or failed ([`ChangeGuard`] drop).
//! * fence: store `fenced = true` (SeqCst), then wait until `in_flight == 0` (SeqCst).
//!
//! In the single total order of SeqCst operations, either the fence's store comes
//! before the writer's load (the writer sees `fenced` and refuses) or the writer's
//! increment comes before the fence's load of the counter (the fence waits for it).
//! There is no third case, so once the counter has drained every older-epoch change
//! has landed or failed, and none can start. Durability of the new epoch (so that a
//! restart does not resurrect the old token) is the store's job; see `store.rs`.
//!
//! # Why the fence waits only for changes the kernel has
//!
//! An admitted change may still wait in a queue (the io_uring thread's backlog, the
//! thread pool's channel) before any syscall touches the file. The [`ChangeGuard`]
//! goes with it, and the backend loads `fenced` again immediately before the syscall
//! or SQE ([`ChangeGuard::may_issue`]): a fenced change is failed with NBD_EPERM
//! instead of issued, and its guard dropped at once. This only adds refusals, so the
//! argument above is untouched: the counter still covers every change from
//! `begin_change` until the kernel is done with it (the backend drops the guard on
//! its own thread at completion, without waiting for the requesting task to run).
//! What it changes is how long the drain takes: a fence no longer waits for the
//! older epoch's queued writes (up to 128 with 8 connections at queue depth 16),
//! only for those already issued. The io_uring backend goes one step further: it
//! asks the kernel to cancel the fenced ones not yet started, at once when a fence
//! wakes its thread ([`FenceListener`]) and every millisecond while leased changes
//! are in the kernel as a backstop (see `io/uring.rs`); a cancelled change never
//! touched the file, and its guard, too, is dropped only at its completion.
//!
//! The per-change cost is two uncontended atomic read-modify-writes and one load on a
//! cache line shared only by one holder's connections; no lock on the data path.
//!
//! Tokens are 256 random bits, shown to the caller once (in the fence answer) and
//! never logged; only their BLAKE3 hash is kept, in memory and on disk, and hashes are
//! compared in constant time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod token;

pub use token::{LeaseToken, TOKEN_BYTES, TokenHash};

/// The durable part of a lease. `epoch` is the high-water mark and survives even when
/// no holder is set (an export that was never fenced has epoch 0 and no holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LeaseRecord {
    pub epoch: u64,
    pub holder: Option<String>,
    pub token_hash: Option<TokenHash>,
}

/// Why a fence was refused by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error(
        "epoch {requested} is not higher than the current epoch {current}; pick a higher epoch"
    )]
    StaleEpoch { requested: u64, current: u64 },
    #[error("export {0:?} does not use leases (it was added as unleased)")]
    Unleased(String),
}

impl LeaseRecord {
    /// The pure transition: a fence to `epoch` is allowed only above the current one.
    pub fn fenced_to(
        &self,
        epoch: u64,
        holder: &str,
        token_hash: TokenHash,
    ) -> Result<LeaseRecord, FenceError> {
        if epoch <= self.epoch {
            return Err(FenceError::StaleEpoch {
                requested: epoch,
                current: self.epoch,
            });
        }
        Ok(LeaseRecord {
            epoch,
            holder: Some(holder.to_string()),
            token_hash: Some(token_hash),
        })
    }

    /// Whether `presented` is the current epoch's token.
    pub fn admits(&self, presented: &TokenHash) -> bool {
        // Evaluate the comparison even without a current token so the time taken does
        // not tell a caller whether a lease exists.
        let current = self.token_hash.unwrap_or(TokenHash([0u8; 32]));
        let ok = current.matches(presented);
        ok && self.token_hash.is_some()
    }
}

/// Told about every fence, right after the new epoch is in force in memory: the
/// io_uring engine registers here so that it asks the kernel to drop fenced changes
/// still queued there at once, instead of at its next tick (see `io::uring`).
pub trait FenceListener: Send + Sync {
    fn fenced(&self);
}

static FENCE_LISTENERS: std::sync::Mutex<Vec<std::sync::Weak<dyn FenceListener>>> =
    std::sync::Mutex::new(Vec::new());

/// Registers `l` until it is dropped.
pub fn add_fence_listener(l: std::sync::Weak<dyn FenceListener>) {
    let mut ls = FENCE_LISTENERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ls.retain(|w| w.strong_count() > 0);
    ls.push(l);
}

fn notify_fence_listeners() {
    let ls: Vec<_> = FENCE_LISTENERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    for l in ls {
        l.fenced();
    }
}

/// Per-export policy for leased exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeasePolicy {
    /// A plain `NAME` (no token) is refused instead of opened read-only.
    pub lease_required_for_reads: bool,
}

/// The shared state of one epoch: every connection bound with that epoch's token
/// points at the same slot.
#[derive(Debug)]
pub struct EpochSlot {
    epoch: u64,
    in_flight: AtomicU64,
    fenced: AtomicBool,
    /// Woken when the last in-flight change of a fenced slot completes.
    drained: Notify,
    /// Cancelled when the slot is fenced: bound connections close.
    fence_signal: CancellationToken,
}

impl EpochSlot {
    fn new(epoch: u64) -> Arc<Self> {
        Arc::new(Self {
            epoch,
            in_flight: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            drained: Notify::new(),
            fence_signal: CancellationToken::new(),
        })
    }

    fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        self.fence_signal.cancel();
    }

    fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    async fn wait_drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Register before checking, so a completion between the check and the
            // await cannot be missed.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// What a connection is bound to, decided once at NBD_OPT_GO / EXPORT_NAME.
#[derive(Debug, Clone)]
pub struct Binding {
    pub writable: bool,
    /// The epoch slot of a leased, writable binding; None when unleased or read-only.
    slot: Option<Arc<EpochSlot>>,
    /// This connection's own child of the slot's fence signal: the connection polls
    /// it on every wake-up, and a child keeps those polls off the lock that all
    /// connections of the epoch would otherwise share.
    signal: Option<CancellationToken>,
}

impl Binding {
    /// Narrows an export's NBD transmission flags to what this binding may do, so a
    /// plain `NAME` on a leased export is advertised to the client as read-only.
    pub fn transmission_flags(&self, export_flags: u16) -> u16 {
        use nbd_proto::consts::{
            TFLAG_READ_ONLY, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FUA, TFLAG_SEND_TRIM,
            TFLAG_SEND_WRITE_ZEROES,
        };
        if self.writable {
            export_flags
        } else {
            (export_flags | TFLAG_READ_ONLY)
                & !(TFLAG_SEND_FUA
                    | TFLAG_SEND_TRIM
                    | TFLAG_SEND_WRITE_ZEROES
                    | TFLAG_SEND_FAST_ZERO)
        }
    }

    /// The epoch this binding writes under (None when unleased or read-only).
    pub fn epoch(&self) -> Option<u64> {
        self.slot.as_ref().map(|s| s.epoch)
    }
}

/// Why an export name was refused (answered with NBD_REP_ERR_POLICY).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("the lease token does not belong to the export's current epoch")]
    WrongToken,
    #[error("this export requires a lease token even for reads")]
    LeaseRequired,
    #[error("this export does not use leases; open it without a lease token")]
    NotLeased,
}

/// A change refused because its binding's epoch has been fenced (NBD_EPERM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection's lease epoch has been fenced")]
pub struct Fenced;

/// Held while one change is in flight; dropping it tells a waiting fence the change
/// has landed or failed.
///
/// The guard travels with the change down to the I/O backend, which calls
/// [`ChangeGuard::may_issue`] immediately before it hands the change to the kernel
/// and drops the guard as soon as the kernel is done with it. A change admitted by
/// `begin_change` but still queued when its epoch is fenced is therefore failed
/// (NBD_EPERM) instead of issued, and the fence only waits for changes the kernel
/// already has.
#[derive(Debug)]
#[must_use = "the change is only accounted for while the guard lives"]
pub struct ChangeGuard {
    slot: Option<Arc<EpochSlot>>,
}

impl ChangeGuard {
    /// Whether the change may still be handed to the kernel: false once its epoch
    /// has been fenced (always true for unleased exports). Call it right before the
    /// syscall or SQE; the guard stays held until the kernel is done, so a fence that
    /// switched after this check still waits for the change (the counter was raised
    /// in `begin_change`, before this load, so the fence's drain cannot miss it).
    #[inline]
    pub fn may_issue(&self) -> bool {
        self.slot
            .as_ref()
            .is_none_or(|s| !s.fenced.load(Ordering::SeqCst))
    }

    /// Whether this guard counts a change on a leased export (false for unleased
    /// exports, whose changes no fence waits for).
    pub fn is_leased(&self) -> bool {
        self.slot.is_some()
    }
}

impl Drop for ChangeGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let before = slot.in_flight.fetch_sub(1, Ordering::SeqCst);
            if before == 1 && slot.fenced.load(Ordering::SeqCst) {
                slot.drained.notify_waiters();
            }
        }
    }
}

#[derive(Debug)]
struct Current {
    record: LeaseRecord,
    slot: Arc<EpochSlot>,
}

#[derive(Debug)]
enum Mode {
    Unleased,
    Leased {
        policy: LeasePolicy,
        current: Mutex<Current>,
    },
}

/// The per-export lease gate the NBD server consults. Cloning gives another handle
/// to the same gate (the export and the control API share it).
#[derive(Debug, Clone)]
pub struct LeaseGate {
    mode: Arc<Mode>,
}

/// A fence that has switched the epoch in memory; [`FenceTicket::drained`] resolves
/// when the older epoch's in-flight changes are done.
#[derive(Debug)]
pub struct FenceTicket {
    pub record: LeaseRecord,
    pub previous: LeaseRecord,
    old_slot: Arc<EpochSlot>,
}

impl FenceTicket {
    /// Changes of the fenced epoch still in flight.
    pub fn in_flight(&self) -> u64 {
        self.old_slot.in_flight()
    }

    pub async fn drained(&self) {
        self.old_slot.wait_drained().await;
    }
}

impl LeaseGate {
    /// An export that does not use leases: any connection may write (unless the export
    /// is read-only) and begin_change never refuses.
    pub fn new_unleased() -> Self {
        Self {
            mode: Arc::new(Mode::Unleased),
        }
    }

    /// A leased export starting from its durable record.
    pub fn new_leased(record: LeaseRecord, policy: LeasePolicy) -> Self {
        let slot = EpochSlot::new(record.epoch);
        Self {
            mode: Arc::new(Mode::Leased {
                policy,
                current: Mutex::new(Current { record, slot }),
            }),
        }
    }

    pub fn is_leased(&self) -> bool {
        matches!(*self.mode, Mode::Leased { .. })
    }

    pub fn policy(&self) -> Option<LeasePolicy> {
        match &*self.mode {
            Mode::Unleased => None,
            Mode::Leased { policy, .. } => Some(*policy),
        }
    }

    /// The current lease record (None for an unleased export).
    pub fn record(&self) -> Option<LeaseRecord> {
        match &*self.mode {
            Mode::Unleased => None,
            Mode::Leased { current, .. } => Some(lock(current).record.clone()),
        }
    }

    /// Binds a connection. `token` is Some for an export name `NAME;lease=TOKEN`.
    pub fn bind(&self, token: Option<&str>, read_only_export: bool) -> Result<Binding, BindError> {
        match (&*self.mode, token) {
            (Mode::Unleased, None) => Ok(Binding {
                writable: !read_only_export,
                slot: None,
                signal: None,
            }),
            (Mode::Unleased, Some(_)) => Err(BindError::NotLeased),
            (Mode::Leased { policy, .. }, None) => {
                if policy.lease_required_for_reads {
                    Err(BindError::LeaseRequired)
                } else {
                    Ok(Binding {
                        writable: false,
                        slot: None,
                        signal: None,
                    })
                }
            }
            (Mode::Leased { current, .. }, Some(token)) => {
                let presented = TokenHash::of(token);
                let current = lock(current);
                if !current.record.admits(&presented) {
                    return Err(BindError::WrongToken);
                }
                if read_only_export {
                    return Ok(Binding {
                        writable: false,
                        slot: None,
                        signal: None,
                    });
                }
                Ok(Binding {
                    writable: true,
                    slot: Some(Arc::clone(&current.slot)),
                    signal: Some(current.slot.fence_signal.child_token()),
                })
            }
        }
    }

    /// Called before every change (WRITE, TRIM, WRITE_ZEROES) is submitted; keep the
    /// guard until the change has completed or failed.
    #[inline]
    pub fn begin_change(&self, binding: &Binding) -> Result<ChangeGuard, Fenced> {
        if !binding.writable {
            return Err(Fenced);
        }
        let Some(slot) = &binding.slot else {
            // Writable without a slot only happens on unleased exports.
            return Ok(ChangeGuard { slot: None });
        };
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        if slot.fenced.load(Ordering::SeqCst) {
            // Dropping this guard undoes the increment and wakes a waiting fence.
            drop(ChangeGuard {
                slot: Some(Arc::clone(slot)),
            });
            return Err(Fenced);
        }
        Ok(ChangeGuard {
            slot: Some(Arc::clone(slot)),
        })
    }

    /// Whether this binding's epoch has been fenced.
    pub fn is_fenced(&self, binding: &Binding) -> bool {
        binding
            .slot
            .as_ref()
            .is_some_and(|s| s.fenced.load(Ordering::SeqCst))
    }

    /// Resolves when this binding has been fenced (never for unleased or read-only
    /// bindings); the connection then closes.
    pub async fn fenced(&self, binding: &Binding) {
        match &binding.signal {
            Some(signal) => signal.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// First half of a fence: validates the epoch, installs the new record and slot,
    /// and fences the old slot, all under the export's lock so that two racing fences
    /// serialize (the loser sees the winner's epoch and gets `StaleEpoch`).
    ///
    /// The caller must make `ticket.record` durable and await `ticket.drained()`
    /// before it reports the fence as done.
    pub fn fence(
        &self,
        export: &str,
        epoch: u64,
        holder: &str,
        token_hash: TokenHash,
    ) -> Result<FenceTicket, FenceError> {
        let Mode::Leased { current, .. } = &*self.mode else {
            return Err(FenceError::Unleased(export.to_string()));
        };
        let mut current = lock(current);
        let record = current.record.fenced_to(epoch, holder, token_hash)?;
        let previous = std::mem::replace(&mut current.record, record.clone());
        let old_slot = std::mem::replace(&mut current.slot, EpochSlot::new(epoch));
        old_slot.fence();
        drop(current);
        notify_fence_listeners();
        Ok(FenceTicket {
            record,
            previous,
            old_slot,
        })
    }

    /// Invalidates every binding (export removal): like a fence that installs no
    /// token. Returns the ticket to await the drain.
    pub fn revoke_all(&self) -> Option<FenceTicket> {
        let Mode::Leased { current, .. } = &*self.mode else {
            return None;
        };
        let mut current = lock(current);
        let record = LeaseRecord {
            epoch: current.record.epoch,
            holder: None,
            token_hash: None,
        };
        let previous = std::mem::replace(&mut current.record, record.clone());
        let old_slot = std::mem::replace(&mut current.slot, EpochSlot::new(record.epoch));
        old_slot.fence();
        drop(current);
        notify_fence_listeners();
        Some(FenceTicket {
            record,
            previous,
            old_slot,
        })
    }
}

fn lock(m: &Mutex<Current>) -> MutexGuard<'_, Current> {
    // The critical sections never panic midway through a change of `Current` (they
    // only swap whole values), so a poisoned lock still holds consistent state.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
