//! A whole guest: the KVM VM, its vCPU threads, its devices, and the auto-converge
//! throttle. Implements the migration contract ([`MigrationSource`] and
//! [`MigrationTarget`]).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use vm_memory::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;

use crate::contract::{
    BootSpec, DiskSpec, MigrationSource, MigrationTarget, PAGE_SIZE, VmError, VmSpec,
};
use crate::devices::block::BlockDevices;
use crate::devices::disk_uri::DiskUri;
use crate::devices::{DeviceState, Devices};
use crate::vstate::memory;
use crate::vstate::vcpu::{GuestStop, Vcpu, VcpuError, VcpuHandle, VcpuShared, VcpuState};
use crate::vstate::vm::{self, Vm, VmState};

pub const MACHINE_STATE_VERSION: u32 = 1;
/// Most vCPUs one guest may have.
pub const MAX_VCPUS: u8 = 32;
/// Longest a pause waits for disk requests in flight (and for each flush).
const DISK_QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Auto-converge time slice: a throttled vCPU runs this long, then sleeps.
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot read the guest image {path}: {source}")]
    Image {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid VM configuration: {0}")]
    Invalid(String),
    #[error("the VM is in state {state}, but this needs it {needed}")]
    WrongState {
        state: &'static str,
        needed: &'static str,
    },
    #[error("the guest's CPU features cannot be provided on this host: {0}")]
    Incompatible(String),
    #[error("saved VM state is invalid: {0}")]
    BadState(String),
    #[error("disk: {0}")]
    Disk(String),
    #[error("cannot write the memory dump to {path}: {source}")]
    Dump {
        path: String,
        source: std::io::Error,
    },
}

impl From<MachineError> for VmError {
    fn from(e: MachineError) -> Self {
        match e {
            MachineError::Vm(vm::VmError::BadState(s)) | MachineError::BadState(s) => {
                VmError::BadState(s)
            }
            MachineError::Vcpu(VcpuError::BadState(s)) => VmError::BadState(s),
            MachineError::Vm(e) => VmError::Kvm(e.to_string()),
            MachineError::Vcpu(e) => VmError::Kvm(e.to_string()),
            MachineError::WrongState { state, needed } => VmError::WrongState {
                state: state.to_string(),
                needed,
            },
            MachineError::Incompatible(s) => VmError::Incompatible(s),
            other => VmError::Other(other.to_string()),
        }
    }
}

/// Everything `save_state` produces: VM-wide, per-vCPU and device state.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub version: u32,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

impl MachineState {
    pub fn encode(&self) -> Result<Vec<u8>, MachineError> {
        serde_json::to_vec(self).map_err(|e| MachineError::BadState(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MachineError> {
        let state: MachineState =
            serde_json::from_slice(bytes).map_err(|e| MachineError::BadState(e.to_string()))?;
        if state.version != MACHINE_STATE_VERSION {
            return Err(MachineError::BadState(format!(
                "machine state version {} is not supported (this agent reads {MACHINE_STATE_VERSION})",
                state.version
            )));
        }
        Ok(state)
    }
}

struct Throttle {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

/// A guest on this host. Drop stops the vCPU threads, then frees RAM.
pub struct Machine {
    // Field order is drop order: the throttle thread (which holds vCPU handles) first,
    // then the vCPU threads, and guest RAM (in `vm`) only after they are gone.
    throttle: Mutex<Throttle>,
    vcpus: Arc<Vec<VcpuHandle>>,
    shared: Arc<VcpuShared>,
    throttle_percent: Arc<AtomicU8>,
    paused: Mutex<bool>,
    /// KVM's XSAVE area on this host exceeds the 4 KiB `kvm_xsave` (AMX): saving would
    /// truncate it, so `save_state` refuses instead.
    xsave_too_big: bool,
    /// The guest's disks (None without disks). `spec.disks` is the creation-time
    /// list; the URIs in use (after `set_disks`) live here.
    block: Option<Arc<BlockDevices>>,
    spec: VmSpec,
    vm: Vm,
}

impl Machine {
    /// Reads `spec.boot.flat_binary` and boots it. `spec.cpuid` is ignored and filled
    /// from this host.
    pub fn boot(spec: VmSpec) -> Result<Self, MachineError> {
        Self::boot_on(spec, None)
    }

    /// As [`Machine::boot`], running disk I/O on `runtime` (default: the current
    /// runtime, else a shared one of the agent's own).
    pub fn boot_on(spec: VmSpec, runtime: Option<Handle>) -> Result<Self, MachineError> {
        let image =
            std::fs::read(&spec.boot.flat_binary).map_err(|source| MachineError::Image {
                path: spec.boot.flat_binary.clone(),
                source,
            })?;
        Self::boot_image_on(spec, &image, runtime)
    }

    /// Boots `image` at `spec.boot.load_addr` in real mode on vCPU 0 and starts it.
    pub fn boot_image(spec: VmSpec, image: &[u8]) -> Result<Self, MachineError> {
        Self::boot_image_on(spec, image, None)
    }

    fn boot_image_on(
        mut spec: VmSpec,
        image: &[u8],
        runtime: Option<Handle>,
    ) -> Result<Self, MachineError> {
        check_shape(&spec)?;
        let vm = Vm::new(spec.memory_mib)?;
        let cpuid = vm.supported_cpuid()?;
        spec.cpuid = cpuid_to_spec(&cpuid);
        memory::load_image(vm.memory(), spec.boot.load_addr, image).map_err(vm::VmError::from)?;
        let machine = Self::assemble(spec, vm, &cpuid, Some(image.len()), runtime)?;
        machine.start()?;
        Ok(machine)
    }

    /// An empty, paused VM shaped like `spec`, for an incoming migration. Refuses a
    /// guest whose CPU features this host lacks.
    pub fn create_incoming(spec: &VmSpec) -> Result<Self, MachineError> {
        Self::create_incoming_on(spec, None)
    }

    /// As [`Machine::create_incoming`], running disk I/O on `runtime`. The disks are
    /// not opened until `set_disks` or the first resume.
    pub fn create_incoming_on(
        spec: &VmSpec,
        runtime: Option<Handle>,
    ) -> Result<Self, MachineError> {
        check_shape(spec)?;
        let vm = Vm::new(spec.memory_mib)?;
        let host = vm.supported_cpuid()?;
        check_cpuid_compatible(&spec.cpuid, &cpuid_to_spec(&host))
            .map_err(MachineError::Incompatible)?;
        let cpuid = cpuid_from_spec(&spec.cpuid, &host)?;
        Self::assemble(spec.clone(), vm, &cpuid, None, runtime)
    }

    fn assemble(
        spec: VmSpec,
        vm: Vm,
        cpuid: &CpuId,
        boot_image_len: Option<usize>,
        runtime: Option<Handle>,
    ) -> Result<Self, MachineError> {
        let block = if spec.disks.is_empty() {
            None
        } else {
            let block = BlockDevices::new(
                &spec.name,
                &spec.disks,
                vm.memory().clone(),
                disk_runtime(runtime)?,
            )
            .map_err(MachineError::Invalid)?;
            Some(Arc::new(block))
        };
        let msr_index = Arc::new(
            vm.kvm()
                .get_msr_index_list()
                .map_err(|source| vm::VmError::Kvm {
                    op: "GET_MSR_INDEX_LIST",
                    source,
                })?
                .as_slice()
                .to_vec(),
        );
        let shared = Arc::new(VcpuShared {
            devices: Arc::new(Devices::with_block(block.clone())),
            stop: Mutex::new(None),
            throttled_us: Default::default(),
        });
        let mut handles = Vec::with_capacity(usize::from(spec.vcpus));
        for id in 0..spec.vcpus {
            let vcpu = Vcpu::new(vm.fd(), id, cpuid, msr_index.clone())?;
            if id == 0 && boot_image_len.is_some() {
                vcpu.configure_boot(spec.boot.load_addr)?;
            }
            handles.push(VcpuHandle::spawn(vcpu, shared.clone())?);
        }
        let vcpus = Arc::new(handles);
        let throttle_percent = Arc::new(AtomicU8::new(0));
        let xsave_too_big = vm.fd().check_extension_int(kvm_ioctls::Cap::Xsave2)
            > std::mem::size_of::<kvm_bindings::kvm_xsave>() as i32;
        let throttle = spawn_throttle(vcpus.clone(), throttle_percent.clone())?;
        tracing::info!(
            vm = %spec.name,
            memory_mib = spec.memory_mib,
            vcpus = spec.vcpus,
            manual_dirty_protect = vm.manual_dirty_protect(),
            "VM created"
        );
        Ok(Machine {
            throttle: Mutex::new(throttle),
            vcpus,
            shared,
            throttle_percent,
            paused: Mutex::new(true),
            xsave_too_big,
            block,
            spec,
            vm,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether the vCPUs are parked (by pause, or not yet started).
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().expect("pause lock is never poisoned")
    }

    /// How the guest stopped on its own, if it did (halt, triple fault, ...).
    pub fn guest_stop(&self) -> Option<GuestStop> {
        self.shared
            .stop
            .lock()
            .expect("stop lock is never poisoned")
            .clone()
    }

    /// The bytes the guest wrote to COM1 (the last MiB).
    pub fn console(&self) -> Vec<u8> {
        self.shared.devices.console()
    }

    /// Total time the vCPUs were held out of the guest by auto-converge.
    pub fn throttled_time(&self) -> Duration {
        Duration::from_micros(self.shared.throttled_us.load(Ordering::Relaxed))
    }

    pub fn throttle_percent(&self) -> u8 {
        self.throttle_percent.load(Ordering::Relaxed)
    }

    /// CPU time all vCPU threads have used so far.
    pub fn vcpu_time(&self) -> Duration {
        self.vcpus.iter().filter_map(VcpuHandle::cpu_time).sum()
    }

    /// Starts a dirty-rate sample (false: a migration owns the dirty log now).
    pub fn start_dirty_sample(&self) -> Result<bool, MachineError> {
        Ok(self.vm.start_dirty_sample()?)
    }

    /// Pages written since `start_dirty_sample` (None: a migration took over).
    pub fn end_dirty_sample(&self) -> Result<Option<u64>, MachineError> {
        Ok(self.vm.end_dirty_sample()?)
    }

    /// Whether KVM_CLEAR_DIRTY_LOG (manual protect) is in use.
    pub fn manual_dirty_protect(&self) -> bool {
        self.vm.manual_dirty_protect()
    }

    /// Writes guest RAM, byte for byte from guest-physical 0, to `path`. Paused only.
    pub fn dump_memory(&self, path: &std::path::Path) -> Result<u64, MachineError> {
        let paused = self.paused.lock().expect("pause lock is never poisoned");
        if !*paused {
            return Err(MachineError::WrongState {
                state: "running",
                needed: "paused",
            });
        }
        let dump_err = |source| MachineError::Dump {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::create(path).map_err(dump_err)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        memory::dump(self.vm.memory(), &mut out).map_err(dump_err)?;
        let file = out.into_inner().map_err(|e| dump_err(e.into_error()))?;
        file.sync_all().map_err(dump_err)?;
        Ok(memory::ram_size(self.vm.memory()))
    }

    /// Starts (or restarts) the guest: opens disks not open yet in the background,
    /// then runs the vCPUs.
    pub fn start(&self) -> Result<(), MachineError> {
        if let Some(b) = &self.block {
            b.connect_in_background();
        }
        self.resume_vcpus()
    }

    /// Stops the vCPUs, then drains and flushes the disks (pause must leave nothing
    /// in flight: migration and memory dumps read a still image).
    pub fn pause_and_quiesce(&self) -> Result<(), MachineError> {
        self.pause_vcpus()?;
        if let Some(b) = &self.block {
            b.quiesce(DISK_QUIESCE_TIMEOUT)
                .map_err(MachineError::Disk)?;
        }
        Ok(())
    }

    /// The disk URIs in use now (tokens included: never log them).
    pub fn disk_uris(&self) -> Vec<DiskSpec> {
        match &self.block {
            Some(b) => b.uris(),
            None => self.spec.disks.clone(),
        }
    }

    fn pause_vcpus(&self) -> Result<(), MachineError> {
        let mut paused = self.paused.lock().expect("pause lock is never poisoned");
        // Ask all first, then wait: the vCPUs stop in parallel.
        let acks = self
            .vcpus
            .iter()
            .map(|v| v.request_pause())
            .collect::<Result<Vec<_>, _>>()?;
        for (v, ack) in self.vcpus.iter().zip(&acks) {
            v.wait_paused(ack)?;
        }
        *paused = true;
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), MachineError> {
        let mut paused = self.paused.lock().expect("pause lock is never poisoned");
        for v in self.vcpus.iter() {
            v.resume()?;
        }
        *paused = false;
        Ok(())
    }

    fn require_paused(&self) -> Result<(), MachineError> {
        if self.is_paused() {
            Ok(())
        } else {
            Err(MachineError::WrongState {
                state: "running",
                needed: "paused",
            })
        }
    }

    /// The complete state as a [`MachineState`] (paused only).
    pub fn save_machine_state(&self) -> Result<MachineState, MachineError> {
        self.require_paused()?;
        if self.xsave_too_big {
            return Err(MachineError::Incompatible(
                "this host's XSAVE state is larger than 4 KiB (AMX); saving it is not supported"
                    .into(),
            ));
        }
        let vm = self.vm.save_state()?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save_state())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            vm,
            vcpus,
            devices: self.shared.devices.save_state(),
        })
    }

    /// Loads a [`MachineState`] (paused only): VM-wide state, then vCPUs, then devices.
    pub fn restore_machine_state(&self, state: MachineState) -> Result<(), MachineError> {
        self.require_paused()?;
        if state.vcpus.len() != self.vcpus.len() {
            return Err(MachineError::BadState(format!(
                "state has {} vCPUs, this VM {}",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        self.vm.restore_state(&state.vm)?;
        for (v, s) in self.vcpus.iter().zip(state.vcpus) {
            v.restore_state(s)?;
        }
        self.shared
            .devices
            .restore_state(&state.devices)
            .map_err(MachineError::BadState)?;
        Ok(())
    }
}

fn check_shape(spec: &VmSpec) -> Result<(), MachineError> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(MachineError::Invalid(format!(
            "vcpus must be 1..={MAX_VCPUS}, got {}",
            spec.vcpus
        )));
    }
    if spec.memory_mib == 0 || spec.memory_mib > memory::MAX_MEMORY_MIB {
        return Err(MachineError::Invalid(format!(
            "memory_mib must be 1..={}, got {}",
            memory::MAX_MEMORY_MIB,
            spec.memory_mib
        )));
    }
    Ok(())
}

/// QEMU-style CPU throttling: every slice, each vCPU is told to stay out of the guest
/// for `slice * p / (100 - p)`, so it runs `100 - p` percent of the time.
fn spawn_throttle(
    vcpus: Arc<Vec<VcpuHandle>>,
    percent: Arc<AtomicU8>,
) -> Result<Throttle, MachineError> {
    let (stop, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("throttle".into())
        .spawn(move || {
            loop {
                let p = u32::from(percent.load(Ordering::Relaxed).min(99));
                let wait = if p == 0 {
                    Duration::from_millis(50)
                } else {
                    let sleep = THROTTLE_SLICE * p / (100 - p);
                    for v in vcpus.iter() {
                        let _ = v.throttle_sleep(sleep);
                    }
                    THROTTLE_SLICE + sleep
                };
                match stop_rx.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
        })
        .map_err(|e| MachineError::Vcpu(VcpuError::Spawn(e)))?;
    Ok(Throttle {
        stop,
        thread: Some(thread),
    })
}

impl Drop for Machine {
    fn drop(&mut self) {
        let mut t = self
            .throttle
            .lock()
            .expect("throttle lock is never poisoned");
        let _ = t.stop.send(());
        if let Some(thread) = t.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(vm = %self.spec.name, "throttle thread panicked");
        }
        tracing::info!(vm = %self.spec.name, "VM destroyed");
    }
}

impl MigrationSource for Machine {
    fn spec(&self) -> VmSpec {
        VmSpec {
            disks: self.disk_uris(),
            ..self.spec.clone()
        }
    }

    fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        self.vm.memory()
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        Ok(self.vm.start_dirty_log().map_err(MachineError::from)?)
    }

    fn take_dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        let bitmap = self.vm.take_dirty_bitmap().map_err(MachineError::from)?;
        let pages = memory::ram_size(self.vm.memory()) / PAGE_SIZE;
        Ok(memory::dirty_page_list(&bitmap, pages))
    }

    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Ok(self.vm.stop_dirty_log().map_err(MachineError::from)?)
    }

    fn pause(&self) -> Result<(), VmError> {
        Ok(self.pause_and_quiesce()?)
    }

    fn resume(&self) -> Result<(), VmError> {
        Ok(self.start()?)
    }

    fn set_throttle(&self, percent: u8) {
        self.throttle_percent
            .store(percent.min(99), Ordering::Relaxed);
    }

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        Ok(self.save_machine_state()?.encode()?)
    }

    fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), VmError> {
        Ok(Machine::set_disks(self, disks)?)
    }
}

impl MigrationTarget for Machine {
    fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        self.vm.memory()
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        let state = MachineState::decode(state)?;
        Ok(self.restore_machine_state(state)?)
    }

    fn resume(&self) -> Result<(), VmError> {
        Ok(self.start()?)
    }

    fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), VmError> {
        Ok(Machine::set_disks(self, disks)?)
    }
}

/// A spec for a new VM from its boot description (CPUID is filled in at boot).
pub fn new_spec(
    name: &str,
    memory_mib: u64,
    vcpus: u8,
    boot: BootSpec,
    disks: Vec<DiskSpec>,
) -> VmSpec {
    VmSpec {
        name: name.to_string(),
        memory_mib,
        vcpus,
        boot,
        disks,
        cpuid: Vec::new(),
    }
}

/// The runtime disk I/O runs on: `preferred`, else the caller's, else one the agent
/// starts for this (library users and tests without a runtime).
fn disk_runtime(preferred: Option<Handle>) -> Result<Handle, MachineError> {
    static FALLBACK: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(h) = preferred.or_else(|| Handle::try_current().ok()) {
        return Ok(h);
    }
    if let Some(rt) = FALLBACK.get() {
        return Ok(rt.handle().clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("disk-io")
        .enable_all()
        .build()
        .map_err(|e| MachineError::Disk(format!("cannot start the disk I/O runtime: {e}")))?;
    Ok(FALLBACK.get_or_init(|| rt).handle().clone())
}

mod cpuid;
mod disks;

pub use cpuid::{check_cpuid_compatible, cpu_fingerprint, host_cpu};
use cpuid::{cpuid_from_spec, cpuid_to_spec};

#[cfg(test)]
mod tests;
