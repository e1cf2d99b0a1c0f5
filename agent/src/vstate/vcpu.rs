//! vCPUs: boot registers, complete state save/restore, and the run loop on its own
//! thread with pause/resume/throttle commands.
//!
//! Kicking a vCPU out of KVM_RUN (Firecracker's scheme): the controller queues a
//! command, then sends [`kick_signal`] to the vCPU thread. The signal handler sets
//! `immediate_exit` in that thread's `kvm_run`, so KVM_RUN returns EINTR whether the
//! signal lands inside KVM_RUN or just before it. The loop clears `immediate_exit`
//! *before* it looks at the command queue, so no command is ever left waiting behind a
//! blocked KVM_RUN.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, Msrs, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::Devices;

pub const VCPU_STATE_VERSION: u32 = 1;
/// MSR_IA32_TSC: restored with the other MSRs, it sets the guest TSC (KVM turns the
/// write into a TSC offset), so guest time does not jump backwards on the target.
pub const MSR_IA32_TSC: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM {op} failed on vCPU {id}: {source}")]
    Kvm {
        op: &'static str,
        id: u8,
        source: kvm_ioctls::Error,
    },
    #[error("saved vCPU state is invalid: {0}")]
    BadState(String),
    #[error("vCPU {0} thread is gone")]
    ThreadGone(u8),
    #[error("vCPU {0} did not stop within {1:?}")]
    Timeout(u8, Duration),
    #[error("cannot start vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// The x87/SSE state of KVM_GET_FPU (kvm_fpu has no serde support of its own).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl FpuState {
    fn save(fpu: &kvm_fpu) -> Self {
        FpuState {
            fpr: fpu.fpr.to_vec(),
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm.to_vec(),
            mxcsr: fpu.mxcsr,
        }
    }

    fn restore(&self) -> Result<kvm_fpu, VcpuError> {
        let mut fpu = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != fpu.fpr.len() || self.xmm.len() != fpu.xmm.len() {
            return Err(VcpuError::BadState("FPU register count".into()));
        }
        fpu.fpr.copy_from_slice(&self.fpr);
        fpu.xmm.copy_from_slice(&self.xmm);
        Ok(fpu)
    }
}

/// Everything KVM keeps about one vCPU. Versioned by [`VCPU_STATE_VERSION`].
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub version: u32,
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// TSC frequency of the source, in kHz (None when KVM cannot report it).
    pub tsc_khz: Option<u32>,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that this vCPU could read, IA32_TSC included.
    pub msrs: Vec<(u32, u64)>,
    pub vcpu_events: kvm_vcpu_events,
}

/// One vCPU file descriptor and what it needs for save/restore.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    /// MSRs KVM reports for save/restore.
    msr_index: Arc<Vec<u32>>,
}

fn kvm_err(op: &'static str, id: u8) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, id, source }
}

impl Vcpu {
    /// Creates vCPU `id` with the given CPUID (APIC id patched in leaf 1 and 0xb).
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        id: u8,
        cpuid: &CpuId,
        msr_index: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("CREATE_VCPU", id))?;
        let mut cpuid = cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
                0xb | 0x1f => entry.edx = u32::from(id),
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2", id))?;
        Ok(Vcpu { id, fd, msr_index })
    }

    /// Real-mode entry as a BIOS hands over a boot sector: CS selector 0 base 0,
    /// IP = `load_addr`, RFLAGS 0x2 (reserved bit), DL = boot drive 0x80.
    pub fn configure_boot(&self, load_addr: u64) -> Result<(), VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("GET_SREGS", self.id))?;
        sregs.cs.selector = 0;
        sregs.cs.base = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err("SET_SREGS", self.id))?;
        let regs = kvm_regs {
            rip: load_addr,
            rflags: 0x2,
            rdx: 0x80,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(kvm_err("SET_REGS", self.id))
    }

    fn get_msrs(&self) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut out = Vec::with_capacity(self.msr_index.len());
        let mut rest: &[u32] = &self.msr_index;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| VcpuError::BadState(format!("MSR list: {e:?}")))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(kvm_err("GET_MSRS", self.id))?;
            out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            let consumed = if read < chunk.len() { read + 1 } else { read };
            rest = &rest[consumed..];
        }
        Ok(out)
    }

    /// Saves the complete vCPU state, in Firecracker's order (mp_state first,
    /// vcpu_events last). The vCPU must be out of KVM_RUN.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(kvm_err("GET_MP_STATE", id))?;
        let regs = self.fd.get_regs().map_err(kvm_err("GET_REGS", id))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err("GET_SREGS", id))?;
        let fpu = FpuState::save(&self.fd.get_fpu().map_err(kvm_err("GET_FPU", id))?);
        let xsave = self.fd.get_xsave().map_err(kvm_err("GET_XSAVE", id))?;
        let xcrs = self.fd.get_xcrs().map_err(kvm_err("GET_XCRS", id))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(kvm_err("GET_DEBUGREGS", id))?;
        let lapic = self.fd.get_lapic().map_err(kvm_err("GET_LAPIC", id))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let msrs = self.get_msrs()?;
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("GET_VCPU_EVENTS", id))?;
        Ok(VcpuState {
            version: VCPU_STATE_VERSION,
            id,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            lapic,
            tsc_khz,
            msrs,
            vcpu_events,
        })
    }

    /// Restores the state in the order KVM needs (Firecracker/Cloud Hypervisor):
    /// TSC rate, mp_state, regs, sregs, fpu, xsave, xcrs, debugregs, lapic, MSRs,
    /// vcpu_events last (pending events refer to the registers set before).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let id = self.id;
        if state.version != VCPU_STATE_VERSION {
            return Err(VcpuError::BadState(format!(
                "vCPU state version {} is not supported (this agent reads {VCPU_STATE_VERSION})",
                state.version
            )));
        }
        if state.id != id {
            return Err(VcpuError::BadState(format!(
                "state of vCPU {} given to vCPU {id}",
                state.id
            )));
        }
        if let Some(khz) = state.tsc_khz
            && self.fd.get_tsc_khz().ok() != Some(khz)
            && let Err(e) = self.fd.set_tsc_khz(khz)
        {
            // Without TSC scaling the guest sees this host's TSC rate; our guests
            // do not calibrate against it, so this is a warning, not a failure.
            tracing::warn!(vcpu = id, khz, error = %e, "cannot set the source's TSC frequency");
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(kvm_err("SET_MP_STATE", id))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(kvm_err("SET_REGS", id))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(kvm_err("SET_SREGS", id))?;
        self.fd
            .set_fpu(&state.fpu.restore()?)
            .map_err(kvm_err("SET_FPU", id))?;
        // SAFETY: `state.xsave` is a whole kvm_xsave (4 KiB) as KVM_GET_XSAVE returned
        // it; this host does not use the larger XSAVE2 layout for it.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(kvm_err("SET_XSAVE", id))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(kvm_err("SET_XCRS", id))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(kvm_err("SET_DEBUGREGS", id))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(kvm_err("SET_LAPIC", id))?;
        for chunk in state.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| VcpuError::BadState(format!("MSR list: {e:?}")))?;
            let written = self.fd.set_msrs(&msrs).map_err(kvm_err("SET_MSRS", id))?;
            if written != entries.len() {
                return Err(VcpuError::BadState(format!(
                    "this host refused MSR {:#x} of the saved state",
                    entries[written].index
                )));
            }
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(kvm_err("SET_VCPU_EVENTS", id))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// The vCPU thread.

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler. Null outside vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let ptr = run.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU
            // loop while its VcpuFd (which owns the mapping) is alive, and cleared before
            // the VcpuFd is dropped. A volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| VcpuError::Spawn(std::io::Error::other(e)))
}

/// How the guest stopped on its own (not by a pause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStop {
    /// `true` for a failure (triple fault, entry failure), `false` for a clean stop.
    pub failed: bool,
    pub reason: String,
}

/// Shared between the vCPU threads and the machine: devices and the stop record.
pub struct VcpuShared {
    pub devices: Arc<Devices>,
    pub stop: Mutex<Option<GuestStop>>,
    /// Total time vCPUs spent held out of the guest by auto-converge, in microseconds.
    pub throttled_us: std::sync::atomic::AtomicU64,
}

impl VcpuShared {
    fn record_stop(&self, failed: bool, reason: String) {
        let mut stop = self.stop.lock().expect("stop lock is never poisoned");
        if stop.is_none() {
            tracing::warn!(failed, %reason, "guest stopped");
            *stop = Some(GuestStop { failed, reason });
        }
    }
}

enum Command {
    Pause(Sender<()>),
    Resume,
    Save(Sender<Result<VcpuState, VcpuError>>),
    Restore(Box<VcpuState>, Sender<Result<(), VcpuError>>),
    /// Auto-converge: stay out of KVM_RUN for this long.
    Sleep(Duration),
    Exit,
}

/// The controller's side of one vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    tx: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// How long a vCPU may take to answer a command before we call it stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an unanswered command is re-kicked (a signal can only be lost if it
/// lands between two KVM_RUNs, which immediate_exit already covers; this is belt and
/// braces against a vCPU stuck in an uninterruptible path).
const REKICK_EVERY: Duration = Duration::from_millis(20);

impl VcpuHandle {
    /// CPU time this vCPU's thread has used (guest and host side of KVM_RUN), or None
    /// once the thread is gone. One `clock_gettime` on the thread's CPU clock.
    pub fn cpu_time(&self) -> Option<Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let thread = self.thread.as_ref()?;
        if thread.is_finished() {
            return None;
        }
        let pthread = thread.as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `pthread` names a thread that has not been joined (we hold its
        // JoinHandle), so the id is valid; `clock` is a valid out-pointer.
        if unsafe { libc::pthread_getcpuclockid(pthread, &mut clock) } != 0 {
            return None;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock` came from pthread_getcpuclockid; `ts` is a valid out-pointer.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ))
    }

    /// Starts the vCPU thread, paused: it runs only after [`VcpuHandle::resume`].
    pub fn spawn(vcpu: Vcpu, shared: Arc<VcpuShared>) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let id = vcpu.id;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_loop(vcpu, rx, shared))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            id,
            tx,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), VcpuError> {
        self.tx
            .send(cmd)
            .map_err(|_| VcpuError::ThreadGone(self.id))?;
        self.kick();
        Ok(())
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread
            && let Err(e) = thread.kill(kick_signal())
        {
            tracing::debug!(vcpu = self.id, error = %e, "kick failed (thread exiting?)");
        }
    }

    fn wait<T>(&self, rx: &Receiver<T>) -> Result<T, VcpuError> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match rx.recv_timeout(REKICK_EVERY) {
                Ok(v) => return Ok(v),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::ThreadGone(self.id)),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Err(VcpuError::Timeout(self.id, COMMAND_TIMEOUT));
                }
                Err(RecvTimeoutError::Timeout) => self.kick(),
            }
        }
    }

    /// Asks the vCPU to leave KVM_RUN and park; returns the receiver of its answer so
    /// that several vCPUs can be stopped in parallel.
    pub fn request_pause(&self) -> Result<Receiver<()>, VcpuError> {
        let (ack_tx, ack_rx) = mpsc::channel();
        self.send(Command::Pause(ack_tx))?;
        Ok(ack_rx)
    }

    /// Waits for the answer to [`VcpuHandle::request_pause`].
    pub fn wait_paused(&self, ack: &Receiver<()>) -> Result<(), VcpuError> {
        self.wait(ack)
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(Command::Resume)
    }

    pub fn throttle_sleep(&self, d: Duration) -> Result<(), VcpuError> {
        self.send(Command::Sleep(d))
    }

    /// Saves this vCPU's state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Save(tx))?;
        self.wait(&rx)?
    }

    /// Restores this vCPU's state; the vCPU must be paused.
    pub fn restore_state(&self, state: VcpuState) -> Result<(), VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Restore(Box::new(state), tx))?;
        self.wait(&rx)?
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Exit);
        self.kick();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(vcpu = self.id, "vCPU thread panicked");
        }
    }
}

/// Rate limit for "unhandled access" logs: the first few, then every 1000th.
fn should_log(count: u64) -> bool {
    count < 10 || count.is_multiple_of(1000)
}

fn run_loop(mut vcpu: Vcpu, rx: Receiver<Command>, shared: Arc<VcpuShared>) {
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    let id = vcpu.id;
    let mut running = false;
    let mut sleep_until: Option<Instant> = None;
    let mut mmio_count = 0u64;
    loop {
        // Clear before looking at commands: a kick after this point makes the next
        // KVM_RUN return at once, so a command queued now is never stuck behind it.
        vcpu.fd.set_kvm_immediate_exit(0);
        let cmd = if !running {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => break,
            }
        } else if let Some(until) = sleep_until.filter(|u| *u > Instant::now()) {
            let slept = Instant::now();
            let got = rx.recv_timeout(until.saturating_duration_since(slept));
            let us = u64::try_from(slept.elapsed().as_micros()).unwrap_or(u64::MAX);
            shared
                .throttled_us
                .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
            match got {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => {
                    sleep_until = None;
                    None
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            }
        };
        if let Some(cmd) = cmd {
            match cmd {
                Command::Pause(ack) => {
                    running = false;
                    let _ = ack.send(());
                }
                Command::Resume => {
                    // A guest that stopped on its own stays stopped.
                    running = shared.stop.lock().map(|s| s.is_none()).unwrap_or(false);
                }
                Command::Save(reply) => {
                    let _ = reply.send(vcpu.save_state());
                }
                Command::Restore(state, reply) => {
                    let _ = reply.send(vcpu.restore_state(&state));
                }
                Command::Sleep(d) => sleep_until = Some(Instant::now() + d),
                Command::Exit => break,
            }
            continue;
        }
        if sleep_until.is_some() {
            continue;
        }
        match vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => shared.devices.pio_write(port, data),
                VcpuExit::IoIn(port, data) => shared.devices.pio_read(port, data),
                VcpuExit::MmioRead(addr, data) => {
                    mmio_count += 1;
                    if should_log(mmio_count) {
                        tracing::warn!(
                            vcpu = id,
                            addr = format_args!("{addr:#x}"),
                            len = data.len(),
                            count = mmio_count,
                            "unhandled MMIO read (reads as all ones)"
                        );
                    }
                    data.fill(0xff);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    mmio_count += 1;
                    if should_log(mmio_count) {
                        tracing::warn!(
                            vcpu = id,
                            addr = format_args!("{addr:#x}"),
                            len = data.len(),
                            count = mmio_count,
                            "unhandled MMIO write ignored"
                        );
                    }
                }
                VcpuExit::Hlt => {
                    // With the in-kernel irqchip KVM handles HLT itself; an exit here
                    // means the guest halted for good.
                    shared.record_stop(false, format!("vCPU {id} halted"));
                    running = false;
                }
                VcpuExit::Shutdown => {
                    shared.record_stop(true, format!("vCPU {id}: triple fault (shutdown)"));
                    running = false;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    shared.record_stop(
                        kind != kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN,
                        format!("vCPU {id}: system event {kind}"),
                    );
                    running = false;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    shared.record_stop(
                        true,
                        format!("vCPU {id}: KVM entry failed, reason {reason:#x} on cpu {cpu}"),
                    );
                    running = false;
                }
                VcpuExit::InternalError => {
                    shared.record_stop(true, format!("vCPU {id}: KVM internal error"));
                    running = false;
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                other => {
                    tracing::warn!(vcpu = id, exit = ?other, "unexpected vCPU exit ignored");
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                shared.record_stop(true, format!("vCPU {id}: KVM_RUN failed: {e}"));
                running = false;
            }
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}
