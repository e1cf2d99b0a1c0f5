//! The contract between the VMM (`vstate`, `devices`, `manager`) and live migration
//! (`migration`). Both sides were written in parallel against this file; change it only
//! together with every implementor and caller.
//!
//! Memory model: guest RAM is one contiguous region at guest-physical 0 of
//! `memory_mib` MiB, tracked in 4 KiB pages. Dirty sets cross this contract as sorted
//! lists of page numbers (page `p` covers guest-physical `p * PAGE_SIZE`).

use serde::{Deserialize, Serialize};
use stagehand_common::secret::Secret;

/// Page size used for dirty tracking and migration.
pub const PAGE_SIZE: u64 = 4096;

/// What a target needs to create an empty VM of the same shape before any memory flows.
/// Sent at the start of a migration and checked by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// Boot description (flat binary path and load address) as given at creation.
    pub boot: BootSpec,
    /// The guest's disks: NBD URIs and their lease tokens.
    pub disks: Vec<DiskSpec>,
    /// CPUID leaves the guest was given, as (function, index, eax, ebx, ecx, edx).
    /// The receiver refuses a migration whose guest CPUID its host cannot supply.
    pub cpuid: Vec<[u32; 6]>,
}

/// One disk: `{"nbd": URI, "lease": TOKEN}` (the API's shape). The URI never carries
/// the token (`;lease=` in it is refused); the lease is a [`Secret`]: `Debug` shows
/// `<redacted>`, and it serializes only for the wire and the migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub nbd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Secret>,
}

impl DiskSpec {
    /// A disk without a lease.
    pub fn plain(nbd: impl Into<String>) -> Self {
        DiskSpec {
            nbd: nbd.into(),
            lease: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    pub flat_binary: String,
    pub load_addr: u64,
}

/// Errors the VMM reports to migration. Sentences a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM call failed: {0}")]
    Kvm(String),
    #[error("the VM is in state {state}, but this needs it {needed}")]
    WrongState { state: String, needed: &'static str },
    #[error("saved VM state is invalid: {0}")]
    BadState(String),
    #[error("the guest's CPU features cannot be provided on this host: {0}")]
    Incompatible(String),
    #[error("{0}")]
    Other(String),
}

/// A running (or paused) VM as live migration sees it, on the source side.
///
/// Implemented by the VMM. No method has a default body: a missing step must not
/// silently succeed.
pub trait MigrationSource: Send + Sync {
    fn spec(&self) -> VmSpec;
    /// Guest RAM; writes the VMM itself makes through it are tracked by its AtomicBitmap.
    fn guest_memory(&self) -> &vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
    /// Turns on KVM dirty logging and resets the VMM's own bitmap. After this call every
    /// page written by the guest or the VMM shows up in `take_dirty_pages`.
    fn start_dirty_log(&self) -> Result<(), VmError>;
    /// Page numbers dirtied since the previous call (or since `start_dirty_log`), sorted:
    /// the KVM dirty log OR-ed with the VMM's bitmap, then both reset. Never loses a page.
    fn take_dirty_pages(&self) -> Result<Vec<u64>, VmError>;
    fn stop_dirty_log(&self) -> Result<(), VmError>;
    /// Stops every vCPU (out of KVM_RUN, not to re-enter) and quiesces devices. Idempotent.
    fn pause(&self) -> Result<(), VmError>;
    fn resume(&self) -> Result<(), VmError>;
    /// Auto-converge: each vCPU sleeps `percent`% of its time (0 = no throttle).
    fn set_throttle(&self, percent: u8);
    /// Complete vCPU and VM state (regs, sregs, fpu, xsave, xcrs, MSRs, lapic,
    /// vcpu_events, mp_state, debugregs, TSC, kvmclock, irqchip/PIT if used, devices).
    /// Only while paused. Opaque bytes to migration; versioned by the VMM.
    fn save_state(&self) -> Result<Vec<u8>, VmError>;
    /// Replaces the VM's disk URIs (new lease tokens) and reconnects its disks; only
    /// while paused (source rollback) or before the first resume (target).
    fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), VmError>;
}

/// The target side: an empty VM created from a `VmSpec`, filled by migration, then
/// started from the saved state.
pub trait MigrationTarget: Send + Sync {
    fn guest_memory(&self) -> &vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
    /// Loads the state from `MigrationSource::save_state` into the vCPUs and devices.
    fn restore_state(&self, state: &[u8]) -> Result<(), VmError>;
    /// Starts the vCPUs after `restore_state`.
    fn resume(&self) -> Result<(), VmError>;
    /// Replaces the VM's disk URIs (new lease tokens) and reconnects its disks; only
    /// while paused (source rollback) or before the first resume (target).
    fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), VmError>;
}
