//! Live pre-copy migration of a running guest between two agents.
//!
//! - [`protocol`]: the versioned wire format and its message sequence (pure).
//! - [`receiver`]: the receiver state machine (pure) and the listener that drives it.
//! - [`sender`]: the pre-copy sender (passes, stop and copy, rollback).
//! - [`policy`]: when to switch over, throttle or give up; the bandwidth cap (pure).
//! - [`digest`]: per-chunk BLAKE3 digests that prove target memory == source image.
//! - [`bitmap`]: dirty page bitmap helpers.
//!
//! The VMM is reached only through `crate::contract` (`MigrationSource`,
//! `MigrationTarget`) and the [`VmHost`] trait below, which the VM manager implements.

pub mod bitmap;
pub mod digest;
mod host;
pub mod policy;
pub mod protocol;
pub mod receiver;
pub mod resident;
pub mod sender;
pub mod service;
pub mod stats;
pub mod wire;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::contract::{MigrationSource, MigrationTarget, VmError, VmSpec};

pub use service::{MigrateRequest, MigrationService};

/// What migration needs from the VM manager. No default bodies: a missing step must
/// not silently succeed.
pub trait VmHost: Send + Sync {
    /// Marks VM `name` as `migrating` and returns it as a migration source, plus whether
    /// it was running (a VM that was paused is not resumed when a migration fails).
    /// Fails when the VM does not exist or is not running or paused.
    fn begin_outgoing(&self, name: &str) -> Result<(Arc<dyn MigrationSource>, bool), VmError>;
    /// Ends an outgoing migration. `moved`: the target reported the guest running, so
    /// the (paused) source copy is freed. Otherwise the VM returns to its state before.
    fn end_outgoing(&self, name: &str, moved: bool);
    /// Ends an outgoing migration whose outcome leaves the source copy paused for
    /// good (a coordinated switchover that failed after quiescing, or a Complete whose
    /// answer was lost): the VM is marked `paused` and is NOT resumed, whatever its
    /// state before. Only an operator or the coordinator resumes it.
    fn end_outgoing_paused(&self, name: &str);
    /// Creates an empty `incoming` VM shaped by `spec` (memory, vCPUs, CPUID checked
    /// here, before any memory is sent). Fails if a VM of that name exists.
    fn create_incoming(&self, spec: &VmSpec) -> Result<Arc<dyn MigrationTarget>, VmError>;
    /// Ends an incoming migration: `running` marks the VM running; otherwise it is
    /// discarded.
    fn end_incoming(&self, name: &str, running: bool);
}
