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

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Bytes of randomness in a lease token (256 bits; the contract asks for >= 128).
pub const TOKEN_BYTES: usize = 32;

/// A lease token: the secret that lets a holder write. Deliberately not `Debug` in
/// clear: it must never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// A fresh token from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut bytes)
            .expect("the kernel's random source (getrandom) does not fail once booted");
        Self(hex(&bytes))
    }

    /// The token as given to the holder (64 lowercase hex digits).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(<redacted>)")
    }
}

/// BLAKE3 hash of a token: what durable state and memory keep instead of the token.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(*blake3::hash(token.as_bytes()).as_bytes())
    }

    /// Constant-time comparison, so that timing reveals nothing about how much of a
    /// guessed token matched.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", hex(&self.0[..4]))
    }
}

impl From<TokenHash> for String {
    fn from(h: TokenHash) -> String {
        hex(&h.0)
    }
}

impl TryFrom<String> for TokenHash {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bytes = unhex(&s).ok_or_else(|| "token hash is not hex".to_string())?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "token hash is not 32 bytes".to_string())?;
        Ok(Self(arr))
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

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
mod tests {
    use super::*;

    fn leased() -> LeaseGate {
        LeaseGate::new_leased(LeaseRecord::default(), LeasePolicy::default())
    }

    #[test]
    fn tokens_are_long_random_and_redacted() {
        let a = LeaseToken::generate();
        let b = LeaseToken::generate();
        assert_eq!(a.expose().len(), TOKEN_BYTES * 2);
        assert_ne!(a, b);
        assert!(!format!("{a:?}").contains(a.expose()));
        assert!(a.hash().matches(&TokenHash::of(a.expose())));
        assert!(!a.hash().matches(&b.hash()));
    }

    #[test]
    fn token_hash_round_trips_through_json() {
        let h = LeaseToken::generate().hash();
        let s = serde_json::to_string(&h).expect("serializes");
        let back: TokenHash = serde_json::from_str(&s).expect("parses");
        assert!(back.matches(&h));
        assert!(serde_json::from_str::<TokenHash>("\"zz\"").is_err());
    }

    #[test]
    fn unleased_export_is_always_writable() {
        let gate = LeaseGate::new_unleased();
        let b = gate.bind(None, false).expect("binds");
        assert!(b.writable);
        let _g = gate.begin_change(&b).expect("writes");
        assert!(!gate.bind(None, true).expect("binds").writable);
        assert_eq!(
            gate.bind(Some("x"), false).unwrap_err(),
            BindError::NotLeased
        );
    }

    #[test]
    fn plain_name_is_read_only_or_refused() {
        let gate = leased();
        let b = gate.bind(None, false).expect("binds read-only");
        assert!(!b.writable);
        assert_eq!(gate.begin_change(&b).unwrap_err(), Fenced);
        let strict = LeaseGate::new_leased(
            LeaseRecord::default(),
            LeasePolicy {
                lease_required_for_reads: true,
            },
        );
        assert_eq!(
            strict.bind(None, false).unwrap_err(),
            BindError::LeaseRequired
        );
    }

    #[test]
    fn no_token_binds_before_the_first_fence() {
        let gate = leased();
        assert_eq!(
            gate.bind(Some(""), false).unwrap_err(),
            BindError::WrongToken
        );
        assert_eq!(
            gate.bind(Some("0000"), false).unwrap_err(),
            BindError::WrongToken
        );
    }

    #[test]
    fn fence_listeners_hear_every_fence_until_dropped() {
        struct Count(AtomicU64);
        impl FenceListener for Count {
            fn fenced(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicU64::new(0)));
        let as_listener: Arc<dyn FenceListener> = count.clone();
        add_fence_listener(Arc::downgrade(&as_listener));
        let gate = leased();
        gate.fence("d", 1, "a", LeaseToken::generate().hash())
            .expect("fence 1");
        // Other tests fence concurrently: at least ours was heard.
        assert!(count.0.load(Ordering::SeqCst) >= 1);
        assert!(
            gate.fence("d", 1, "a", LeaseToken::generate().hash())
                .is_err()
        );
        let weak = Arc::downgrade(&as_listener);
        drop(as_listener);
        drop(count);
        assert!(weak.upgrade().is_none());
        // A dropped listener is skipped (and pruned at the next registration).
        gate.fence("d", 2, "b", LeaseToken::generate().hash())
            .expect("fence 2");
    }

    #[test]
    fn fence_switches_writers_and_refuses_stale_epochs() {
        let gate = leased();
        let t1 = LeaseToken::generate();
        gate.fence("d", 1, "a", t1.hash()).expect("fence 1");
        let b1 = gate.bind(Some(t1.expose()), false).expect("binds");
        let b1b = gate.bind(Some(t1.expose()), false).expect("second conn");
        assert_eq!(b1.epoch(), Some(1));
        drop(gate.begin_change(&b1).expect("writes"));
        drop(gate.begin_change(&b1b).expect("writes"));

        let t2 = LeaseToken::generate();
        let ticket = gate.fence("d", 2, "b", t2.hash()).expect("fence 2");
        assert_eq!(ticket.previous.epoch, 1);
        assert!(gate.is_fenced(&b1) && gate.is_fenced(&b1b));
        assert_eq!(gate.begin_change(&b1).unwrap_err(), Fenced);
        assert_eq!(gate.begin_change(&b1b).unwrap_err(), Fenced);
        assert_eq!(ticket.in_flight(), 0);
        assert_eq!(
            gate.bind(Some(t1.expose()), false).unwrap_err(),
            BindError::WrongToken
        );
        let b2 = gate.bind(Some(t2.expose()), false).expect("new holder");
        drop(gate.begin_change(&b2).expect("new holder writes"));

        for stale in [1, 2] {
            assert!(matches!(
                gate.fence("d", stale, "c", LeaseToken::generate().hash()),
                Err(FenceError::StaleEpoch { .. })
            ));
        }
        // The refused fences changed nothing.
        drop(gate.begin_change(&b2).expect("still writes"));
    }

    #[tokio::test]
    async fn fence_waits_for_changes_in_flight() {
        let gate = Arc::new(leased());
        let t1 = LeaseToken::generate();
        gate.fence("d", 1, "a", t1.hash()).expect("fence 1");
        let b1 = gate.bind(Some(t1.expose()), false).expect("binds");
        let guard = gate.begin_change(&b1).expect("writes");

        let ticket = gate
            .fence("d", 2, "b", LeaseToken::generate().hash())
            .expect("fence 2");
        assert_eq!(ticket.in_flight(), 1);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), ticket.drained());
        assert!(
            waited.await.is_err(),
            "fence returned with a change in flight"
        );

        let closed = {
            let gate = Arc::clone(&gate);
            let b1 = b1.clone();
            tokio::spawn(async move { gate.fenced(&b1).await })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), closed)
            .await
            .expect("fenced() resolves")
            .expect("task ran");

        let releaser = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(guard);
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), ticket.drained())
            .await
            .expect("drains once the change completes");
        releaser.await.expect("task ran");
    }

    #[test]
    fn racing_fences_exactly_one_wins() {
        let gate = Arc::new(leased());
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let gate = &gate;
                    s.spawn(move || {
                        gate.fence("d", 5, &format!("h{i}"), LeaseToken::generate().hash())
                            .is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().expect("no panic")))
                .sum()
        });
        assert_eq!(winners, 1);
        assert_eq!(gate.record().expect("leased").epoch, 5);
    }

    #[test]
    fn concurrent_writers_never_pass_a_fence() {
        // Writers hammer begin_change while a fence happens; any change admitted after
        // the fence's drain completed would be a stale write.
        use std::sync::atomic::AtomicUsize;
        let gate = Arc::new(leased());
        let t1 = LeaseToken::generate();
        gate.fence("d", 1, "a", t1.hash()).expect("fence 1");
        let binding = gate.bind(Some(t1.expose()), false).expect("binds");
        let fence_done = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let late = AtomicUsize::new(0);
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    // Bounded by `stop`, so a broken gate fails the test, not hangs it.
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(g) = gate.begin_change(&binding) else {
                            continue;
                        };
                        admitted.fetch_add(1, Ordering::SeqCst);
                        if fence_done.load(Ordering::SeqCst) {
                            late.fetch_add(1, Ordering::SeqCst);
                        }
                        drop(g);
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            let ticket = gate
                .fence("d", 2, "b", LeaseToken::generate().hash())
                .expect("fence 2");
            while ticket.in_flight() != 0 {
                std::hint::spin_loop();
            }
            fence_done.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            stop.store(true, Ordering::SeqCst);
        });
        assert!(admitted.load(Ordering::SeqCst) > 0, "writers never ran");
        assert_eq!(late.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn revoke_all_keeps_the_epoch_and_drops_the_token() {
        let gate = leased();
        let t1 = LeaseToken::generate();
        gate.fence("d", 3, "a", t1.hash()).expect("fence");
        let b = gate.bind(Some(t1.expose()), false).expect("binds");
        gate.revoke_all().expect("leased");
        assert_eq!(gate.begin_change(&b).unwrap_err(), Fenced);
        assert_eq!(
            gate.bind(Some(t1.expose()), false).unwrap_err(),
            BindError::WrongToken
        );
        assert!(gate.fence("d", 3, "b", t1.hash()).is_err());
    }
}

#[cfg(test)]
mod proptests {
    //! Random sequences of bind, write (begin / issue / complete), fence and restart
    //! against the real gate; the invariant: no change from an older epoch is ever
    //! admitted, nor issued to the kernel (the backends' re-check), after that epoch
    //! was fenced, a fence never reports drained with a change in flight (issued or
    //! still queued), and a restart (rebuilding the gate from the durable record)
    //! never revives an old token.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Bind a connection with the token of the given epoch index (0 = plain name).
        Bind(usize),
        /// Begin a change on connection i (mod len).
        Begin(usize),
        /// The backend reaches the oldest queued change of connection i: it issues it
        /// if `may_issue`, or fails it (dropping the guard) otherwise.
        Issue(usize),
        /// Complete the oldest in-flight change of connection i.
        Complete(usize),
        /// Fence to current + delta (delta 0 = stale request).
        Fence(u64),
        /// Kill -9 and restart: bindings and in-flight changes vanish.
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..6).prop_map(Op::Bind),
            5 => (0usize..16).prop_map(Op::Begin),
            3 => (0usize..16).prop_map(Op::Issue),
            3 => (0usize..16).prop_map(Op::Complete),
            2 => (0u64..3).prop_map(Op::Fence),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #[test]
        fn no_stale_change_is_ever_admitted(ops in proptest::collection::vec(op(), 1..200)) {
            // The "durable store": what a restart rebuilds from.
            let mut durable = LeaseRecord::default();
            let mut gate = LeaseGate::new_leased(durable.clone(), LeasePolicy::default());
            // tokens[i] = token issued for the i-th successful fence.
            let mut tokens: Vec<(u64, LeaseToken)> = Vec::new();
            // Per connection: its binding and its changes in flight (guard, issued).
            let mut conns: Vec<(Binding, Vec<(ChangeGuard, bool)>)> = Vec::new();
            let mut tickets: Vec<FenceTicket> = Vec::new();

            for op in ops {
                match op {
                    Op::Bind(i) => {
                        let token = if i == 0 || tokens.is_empty() {
                            None
                        } else {
                            Some(&tokens[(i - 1) % tokens.len()])
                        };
                        let result = gate.bind(token.map(|(_, t)| t.expose()), false);
                        match (token, result) {
                            (None, Ok(b)) => { prop_assert!(!b.writable); conns.push((b, Vec::new())); }
                            (Some((epoch, _)), Ok(b)) => {
                                prop_assert_eq!(*epoch, durable.epoch, "bound with an old token");
                                prop_assert!(b.writable);
                                conns.push((b, Vec::new()));
                            }
                            (Some((epoch, _)), Err(e)) => {
                                prop_assert_eq!(e, BindError::WrongToken);
                                prop_assert!(*epoch != durable.epoch, "current token refused");
                            }
                            (None, Err(e)) => prop_assert!(false, "plain bind refused: {e}"),
                        }
                    }
                    Op::Begin(i) if !conns.is_empty() => {
                        let n = conns.len();
                        let (b, guards) = &mut conns[i % n];
                        match gate.begin_change(b) {
                            Ok(g) => {
                                prop_assert!(b.writable);
                                prop_assert_eq!(b.epoch(), Some(durable.epoch), "stale change admitted");
                                guards.push((g, false));
                            }
                            Err(Fenced) => prop_assert!(
                                !b.writable || b.epoch() != Some(durable.epoch),
                                "current holder refused"
                            ),
                        }
                    }
                    Op::Complete(i) if !conns.is_empty() => {
                        let n = conns.len();
                        let guards = &mut conns[i % n].1;
                        if !guards.is_empty() {
                            drop(guards.remove(0));
                        }
                    }
                    Op::Issue(i) if !conns.is_empty() => {
                        let n = conns.len();
                        let (b, guards) = &mut conns[i % n];
                        if let Some(k) = guards.iter().position(|(_, issued)| !issued) {
                            // The binding's slot is current exactly when its epoch is
                            // the durable one and no restart replaced the gate (a
                            // restart clears every connection).
                            let current = b.epoch() == Some(durable.epoch);
                            if guards[k].0.may_issue() {
                                prop_assert!(current, "stale change issued to the kernel");
                                guards[k].1 = true;
                            } else {
                                prop_assert!(!current, "current holder's change refused at issue");
                                drop(guards.remove(k));
                            }
                        }
                    }
                    Op::Begin(_) | Op::Issue(_) | Op::Complete(_) => {}
                    Op::Fence(delta) => {
                        let token = LeaseToken::generate();
                        let epoch = durable.epoch + delta;
                        match gate.fence("d", epoch, "h", token.hash()) {
                            Ok(ticket) => {
                                prop_assert!(delta > 0);
                                // Persist before reporting; the store would fsync here.
                                durable = ticket.record.clone();
                                tokens.push((epoch, token));
                                tickets.push(ticket);
                            }
                            Err(FenceError::StaleEpoch { .. }) => prop_assert_eq!(delta, 0),
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Restart => {
                        conns.clear();
                        tickets.clear();
                        gate = LeaseGate::new_leased(durable.clone(), LeasePolicy::default());
                    }
                }
                // A fence's drain is complete exactly when no change of the old epoch
                // is still held by any connection.
                for t in &tickets {
                    let held: usize = conns
                        .iter()
                        .filter(|(b, _)| b.epoch() == Some(t.previous.epoch) && b.slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &t.old_slot)))
                        .map(|(_, g)| g.len())
                        .sum();
                    prop_assert_eq!(t.in_flight(), held as u64);
                }
            }
        }
    }
}
