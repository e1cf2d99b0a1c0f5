//! The VM manager: the agent's table of guests and their lifecycle states.
//!
//! # For live migration
//!
//! The four migration hooks have exactly the signatures of the migration module's
//! `VmHost` trait (contract errors, unit-returning ends that log their own failures),
//! so `impl VmHost for VmManager` only delegates.
//!
//! Source side:
//! 1. [`VmManager::begin_outgoing`] checks the VM is `running` or `paused`, marks it
//!    `migrating`, and returns it as an `Arc<dyn MigrationSource>` plus whether it was
//!    running.
//! 2. [`VmManager::end_outgoing`]`(name, moved)`: `moved = true` (the target runs the
//!    guest) removes the VM here; its RAM is freed when the last `Arc` drops.
//!    `moved = false` puts it back to the state it had, resuming the vCPUs if it was
//!    running (resume is idempotent, so the sender may resume first).
//!
//! Target side:
//! 1. [`VmManager::create_incoming`] builds an empty, paused VM from the stream's
//!    [`VmSpec`] (refusing a name in use, or CPU features this host lacks, before any
//!    memory flows), registers it as `incoming`, and returns it as an
//!    `Arc<dyn MigrationTarget>`.
//! 2. [`VmManager::end_incoming`]`(name, running)`: after `restore_state` and `resume`,
//!    `running = true` marks it `running`; `false` discards it.
//!
//! All methods block (KVM calls, waiting for vCPUs): call them from
//! `tokio::task::spawn_blocking` in async code.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::contract::{BootSpec, DiskSpec, MigrationSource, MigrationTarget, VmError, VmSpec};
use crate::devices::disk_uri::redact_uri;
use crate::machine::{Machine, MachineError, new_spec};

/// A VM's lifecycle state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmLifecycle {
    Running,
    Paused,
    Incoming,
    Migrating,
    Stopped,
    Failed,
}

impl VmLifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            VmLifecycle::Running => "running",
            VmLifecycle::Paused => "paused",
            VmLifecycle::Incoming => "incoming",
            VmLifecycle::Migrating => "migrating",
            VmLifecycle::Stopped => "stopped",
            VmLifecycle::Failed => "failed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    #[error("a VM named {0:?} already exists on this host")]
    AlreadyExists(String),
    #[error("VM {name:?} is {state}; this needs it {needed}")]
    WrongState {
        name: String,
        state: &'static str,
        needed: &'static str,
    },
    #[error("invalid VM name {0:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'")]
    BadName(String),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

impl From<ManagerError> for VmError {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::WrongState { state, needed, .. } => VmError::WrongState {
                state: state.to_string(),
                needed,
            },
            ManagerError::Machine(m) => m.into(),
            other => VmError::Other(other.to_string()),
        }
    }
}

/// What `PUT /v1/vms/{name}` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    pub boot: BootRequest,
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
}

fn default_vcpus() -> u8 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootRequest {
    pub flat_binary: String,
    #[serde(default = "default_load_addr")]
    pub load_addr: u64,
}

fn default_load_addr() -> u64 {
    0x7c00
}

/// A disk in requests: `{nbd: URI, lease: TOKEN}` (the lease optional, never in the URI).
pub type DiskRequest = DiskSpec;

/// A disk in answers: its URI only, never the lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskInfo {
    pub nbd: String,
}

/// What the API answers about a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub state: VmLifecycle,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// URIs only: lease tokens are never shown.
    pub disks: Vec<DiskInfo>,
    /// Why the guest stopped on its own, when state is `stopped` or `failed`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stop_reason: Option<String>,
}

struct Entry {
    machine: Arc<Machine>,
    /// The state the agent put it in; a guest that stopped on its own overrides it.
    state: VmLifecycle,
    /// State to return to when a migration fails.
    before_migration: Option<VmLifecycle>,
}

impl Entry {
    fn effective_state(&self) -> (VmLifecycle, Option<String>) {
        match self.machine.guest_stop() {
            Some(stop) if stop.failed => (VmLifecycle::Failed, Some(stop.reason)),
            Some(stop) => (VmLifecycle::Stopped, Some(stop.reason)),
            None => (self.state, None),
        }
    }

    fn info(&self) -> VmInfo {
        let spec = MigrationSource::spec(&*self.machine);
        let (state, stop_reason) = self.effective_state();
        VmInfo {
            name: spec.name,
            state,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            disks: spec
                .disks
                .into_iter()
                .map(|d| DiskInfo {
                    nbd: redact_uri(&d.nbd),
                })
                .collect(),
            stop_reason,
        }
    }
}

/// The agent's guests. Cheap to share (`Arc<VmManager>`).
#[derive(Default)]
pub struct VmManager {
    vms: Mutex<BTreeMap<String, Entry>>,
    /// Where guest disk I/O runs (the agent's runtime, captured at creation).
    runtime: Option<tokio::runtime::Handle>,
}

fn check_name(name: &str) -> Result<(), ManagerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ManagerError::BadName(name.to_string()))
    }
}

impl VmManager {
    /// A manager whose guests do their disk I/O on the current tokio runtime (if
    /// any; else on a small runtime of their own).
    pub fn new() -> Self {
        VmManager {
            vms: Mutex::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.vms.lock().expect("VM table lock is never poisoned")
    }

    fn with_entry<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, ManagerError>,
    ) -> Result<T, ManagerError> {
        let mut vms = self.lock();
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        f(entry)
    }

    /// Creates and starts a VM from its flat binary.
    pub fn create(&self, name: &str, req: &CreateVmRequest) -> Result<VmInfo, ManagerError> {
        check_name(name)?;
        if self.lock().contains_key(name) {
            return Err(ManagerError::AlreadyExists(name.to_string()));
        }
        let spec = new_spec(
            name,
            req.memory_mib,
            req.vcpus,
            BootSpec {
                flat_binary: req.boot.flat_binary.clone(),
                load_addr: req.boot.load_addr,
            },
            req.disks.clone(),
        );
        // Built outside the lock: creating a VM takes a while and must not block GETs.
        let machine = Arc::new(Machine::boot_on(spec, self.runtime.clone())?);
        let mut vms = self.lock();
        if vms.contains_key(name) {
            return Err(ManagerError::AlreadyExists(name.to_string()));
        }
        let entry = Entry {
            machine,
            state: VmLifecycle::Running,
            before_migration: None,
        };
        let info = entry.info();
        vms.insert(name.to_string(), entry);
        Ok(info)
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, ManagerError> {
        self.with_entry(name, |e| Ok(e.info()))
    }

    pub fn list(&self) -> Vec<VmInfo> {
        self.lock().values().map(Entry::info).collect()
    }

    /// The machine itself (for console, dumps, and tests).
    pub fn machine(&self, name: &str) -> Result<Arc<Machine>, ManagerError> {
        self.with_entry(name, |e| Ok(e.machine.clone()))
    }

    pub fn console(&self, name: &str) -> Result<Vec<u8>, ManagerError> {
        Ok(self.machine(name)?.console())
    }

    pub fn pause(&self, name: &str) -> Result<VmInfo, ManagerError> {
        let machine = self.with_entry(name, |e| match e.effective_state().0 {
            VmLifecycle::Running | VmLifecycle::Paused => Ok(Arc::clone(&e.machine)),
            other => Err(ManagerError::WrongState {
                name: name.to_string(),
                state: other.as_str(),
                needed: "running",
            }),
        })?;
        // Outside the table lock: draining the disks waits for the storage node (up to
        // the quiesce timeout when it hangs), and calls for other VMs must not queue
        // behind that.
        let paused = machine.pause_and_quiesce();
        self.with_entry(name, |e| {
            if !Arc::ptr_eq(&e.machine, &machine) {
                // Deleted (and perhaps re-created) while we drained: not ours any more.
                return Err(ManagerError::NotFound(name.to_string()));
            }
            // The vCPUs may be stopped even when draining the disks failed.
            if e.machine.is_paused() {
                e.state = VmLifecycle::Paused;
            }
            paused?;
            Ok(e.info())
        })
    }

    pub fn resume(&self, name: &str) -> Result<VmInfo, ManagerError> {
        self.resume_with_disks(name, None)
    }

    /// Resumes `name`; with `disks`, first reconnects its disks with these URIs (new
    /// lease tokens, e.g. after the coordinator fenced the disks back to this host).
    pub fn resume_with_disks(
        &self,
        name: &str,
        disks: Option<&[DiskSpec]>,
    ) -> Result<VmInfo, ManagerError> {
        let check = |e: &Entry| match e.effective_state().0 {
            VmLifecycle::Running | VmLifecycle::Paused => Ok(()),
            other => Err(ManagerError::WrongState {
                name: name.to_string(),
                state: other.as_str(),
                needed: "paused",
            }),
        };
        if let Some(disks) = disks {
            let machine = self.with_entry(name, |e| {
                check(e)?;
                Ok(e.machine.clone())
            })?;
            // Outside the table lock: opening disks may take seconds, and other VMs'
            // calls must not wait for it. set_disks itself refuses a running VM.
            machine.set_disks(disks)?;
        }
        self.with_entry(name, |e| {
            check(e)?;
            e.machine.start()?;
            e.state = VmLifecycle::Running;
            Ok(e.info())
        })
    }

    /// Writes guest RAM from guest-physical 0 to `path`; the VM must be paused (or
    /// stopped/failed, whose vCPUs no longer run).
    pub fn memory_dump(&self, name: &str, path: &Path) -> Result<u64, ManagerError> {
        let machine = self.with_entry(name, |e| match e.effective_state().0 {
            VmLifecycle::Paused | VmLifecycle::Stopped | VmLifecycle::Failed => {
                Ok(e.machine.clone())
            }
            other => Err(ManagerError::WrongState {
                name: name.to_string(),
                state: other.as_str(),
                needed: "paused",
            }),
        })?;
        if !machine.is_paused() {
            MigrationSource::pause(&*machine).map_err(|e| MachineError::Invalid(e.to_string()))?;
        }
        Ok(machine.dump_memory(path)?)
    }

    /// Removes a VM (not while it migrates or is being migrated in).
    pub fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let machine = {
            let mut vms = self.lock();
            let entry = vms
                .get(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            if matches!(entry.state, VmLifecycle::Migrating | VmLifecycle::Incoming) {
                return Err(ManagerError::WrongState {
                    name: name.to_string(),
                    state: entry.state.as_str(),
                    needed: "not migrating",
                });
            }
            vms.remove(name).map(|e| e.machine)
        };
        // Dropped outside the lock: joining vCPU threads takes a moment.
        drop(machine);
        Ok(())
    }

    /// Removes every VM (agent shutdown).
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }

    /// Source side: marks `name` as `migrating`; returns it as a migration source and
    /// whether it was running. Only a `running` or `paused` VM can migrate.
    pub fn begin_outgoing(&self, name: &str) -> Result<(Arc<dyn MigrationSource>, bool), VmError> {
        Ok(self.with_entry(name, |e| {
            let state = e.effective_state().0;
            if !matches!(state, VmLifecycle::Running | VmLifecycle::Paused) {
                return Err(ManagerError::WrongState {
                    name: name.to_string(),
                    state: state.as_str(),
                    needed: "running or paused",
                });
            }
            e.before_migration = Some(state);
            e.state = VmLifecycle::Migrating;
            let source: Arc<dyn MigrationSource> = e.machine.clone();
            Ok((source, state == VmLifecycle::Running))
        })?)
    }

    /// Source side: ends a migration begun with [`VmManager::begin_outgoing`]. `moved`:
    /// the target runs the guest, so this copy is removed; otherwise the VM returns to
    /// its earlier state (and runs again if it was running).
    pub fn end_outgoing(&self, name: &str, moved: bool) {
        if let Err(e) = self.try_end_outgoing(name, moved) {
            tracing::error!(vm = name, moved, error = %e, "cannot end the outgoing migration");
        }
    }

    fn try_end_outgoing(&self, name: &str, moved: bool) -> Result<(), ManagerError> {
        let removed = {
            let mut vms = self.lock();
            let entry = vms
                .get_mut(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            if entry.state != VmLifecycle::Migrating {
                return Err(ManagerError::WrongState {
                    name: name.to_string(),
                    state: entry.state.as_str(),
                    needed: "migrating",
                });
            }
            if moved {
                vms.remove(name)
            } else {
                entry.state = entry
                    .before_migration
                    .take()
                    .unwrap_or(VmLifecycle::Running);
                if entry.state == VmLifecycle::Running && entry.machine.is_paused() {
                    MigrationSource::resume(&*entry.machine)
                        .map_err(|e| MachineError::Invalid(e.to_string()))?;
                }
                None
            }
        };
        // Dropped outside the lock: joining vCPU threads takes a moment.
        drop(removed);
        Ok(())
    }

    /// Source side (migration): ends an outgoing migration leaving the VM paused and
    /// marked `paused` (see `migration::VmHost::end_outgoing_paused`); never resumes.
    pub fn end_outgoing_paused(&self, name: &str) {
        let r = self.with_entry(name, |e| {
            if e.state != VmLifecycle::Migrating {
                return Err(ManagerError::WrongState {
                    name: name.to_string(),
                    state: e.state.as_str(),
                    needed: "migrating",
                });
            }
            e.before_migration = None;
            e.state = VmLifecycle::Paused;
            Ok(())
        });
        if let Err(e) = r {
            tracing::error!(vm = name, error = %e, "cannot end the outgoing migration");
        }
    }

    /// Target side: creates an empty, paused VM from `spec` and registers it as
    /// `incoming`. Refuses a name in use and CPU features this host lacks.
    pub fn create_incoming(&self, spec: &VmSpec) -> Result<Arc<dyn MigrationTarget>, VmError> {
        check_name(&spec.name)?;
        if self.lock().contains_key(&spec.name) {
            return Err(ManagerError::AlreadyExists(spec.name.clone()).into());
        }
        let machine = Arc::new(
            Machine::create_incoming_on(spec, self.runtime.clone()).map_err(ManagerError::from)?,
        );
        let mut vms = self.lock();
        if vms.contains_key(&spec.name) {
            return Err(ManagerError::AlreadyExists(spec.name.clone()).into());
        }
        vms.insert(
            spec.name.clone(),
            Entry {
                machine: machine.clone(),
                state: VmLifecycle::Incoming,
                before_migration: None,
            },
        );
        Ok(machine)
    }

    /// Target side: `running` (after `restore_state` and `resume`) marks the incoming VM
    /// running; otherwise it is discarded.
    pub fn end_incoming(&self, name: &str, running: bool) {
        if let Err(e) = self.try_end_incoming(name, running) {
            tracing::error!(vm = name, running, error = %e, "cannot end the incoming migration");
        }
    }

    fn try_end_incoming(&self, name: &str, running: bool) -> Result<(), ManagerError> {
        let removed = {
            let mut vms = self.lock();
            let entry = vms
                .get_mut(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            if entry.state != VmLifecycle::Incoming {
                return Err(ManagerError::WrongState {
                    name: name.to_string(),
                    state: entry.state.as_str(),
                    needed: "incoming",
                });
            }
            if running {
                entry.state = if entry.machine.is_paused() {
                    VmLifecycle::Paused
                } else {
                    VmLifecycle::Running
                };
                None
            } else {
                vms.remove(name)
            }
        };
        drop(removed);
        Ok(())
    }

    /// Counts per state, for /metrics.
    pub fn state_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for e in self.lock().values() {
            *counts.entry(e.effective_state().0.as_str()).or_insert(0) += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["vm1", "a.b-c_d", "X"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_vm_is_not_found() {
        let m = VmManager::new();
        assert!(matches!(m.info("nope"), Err(ManagerError::NotFound(_))));
        assert!(matches!(m.delete("nope"), Err(ManagerError::NotFound(_))));
        assert!(m.begin_outgoing("nope").is_err());
    }

    #[test]
    fn create_request_defaults() {
        let req: CreateVmRequest =
            serde_json::from_str(r#"{"memory_mib":128,"boot":{"flat_binary":"/x"}}"#)
                .expect("minimal request parses");
        assert_eq!(req.vcpus, 1);
        assert_eq!(req.boot.load_addr, 0x7c00);
        assert!(req.disks.is_empty());
        assert!(
            serde_json::from_str::<CreateVmRequest>(
                r#"{"memory_mib":1,"boot":{"flat_binary":"/x"},"bogus":1}"#
            )
            .is_err()
        );
    }
}
