//! An in-memory VM for testing migration without KVM: a thread plays the A-B sweeper
//! guest (increments the first byte of every page in a range, forever) writing through
//! vm-memory, so its AtomicBitmap is the dirty log. Its "vCPU state" is the sweeper's
//! position, so a restored target continues the sweep exactly where the source stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, bitmap::AtomicBitmap};

use super::VmHost;
use crate::contract::{
    BootSpec, DiskSpec, MigrationSource, MigrationTarget, PAGE_SIZE, VmError, VmSpec,
};

pub const SWEEP_START: u64 = 1 << 20;

pub struct FakeVm {
    spec: VmSpec,
    mem: GuestMemoryMmap<AtomicBitmap>,
    sweep_end: u64,
    /// `true` while paused; the sweeper writes only while holding this lock with `false`.
    gate: Mutex<bool>,
    cv: Condvar,
    /// Next page address the sweeper increments.
    pos: AtomicU64,
    pub sweeps: AtomicU64,
    throttle: AtomicU8,
    stop: AtomicBool,
    started: AtomicBool,
    pub logging: AtomicBool,
    /// Pause between pages, to model a guest slower than memcpy.
    page_delay: Duration,
    /// The URIs of the last `set_disks` (None: never called).
    pub disks: Mutex<Option<Vec<DiskSpec>>>,
}

impl FakeVm {
    pub fn with_disks(
        name: &str,
        memory_mib: u64,
        sweep_end: u64,
        page_delay: Duration,
        disks: Vec<DiskSpec>,
    ) -> Arc<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (memory_mib << 20) as usize)])
            .expect("anonymous mapping");
        Arc::new(FakeVm {
            spec: VmSpec {
                name: name.to_string(),
                memory_mib,
                vcpus: 1,
                boot: BootSpec {
                    flat_binary: "fake".into(),
                    load_addr: 0x7c00,
                },
                disks,
                cpuid: vec![[0, 0, 1, 2, 3, 4]],
            },
            mem,
            sweep_end,
            gate: Mutex::new(true),
            cv: Condvar::new(),
            pos: AtomicU64::new(SWEEP_START),
            sweeps: AtomicU64::new(0),
            throttle: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            started: AtomicBool::new(false),
            logging: AtomicBool::new(false),
            page_delay,
            disks: Mutex::new(None),
        })
    }

    /// Starts the sweeper thread (paused VMs are started by `resume`).
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || me.sweep());
        self.unpause();
    }

    fn unpause(&self) {
        *self.gate.lock().expect("gate") = false;
        self.cv.notify_all();
    }

    fn sweep(&self) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            {
                let mut g = self.gate.lock().expect("gate");
                while *g && !self.stop.load(Ordering::SeqCst) {
                    g = self.cv.wait(g).expect("gate");
                }
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let p = self.pos.load(Ordering::SeqCst);
                let b: u8 = self.mem.read_obj(GuestAddress(p)).expect("in range");
                self.mem
                    .write_obj(b.wrapping_add(1), GuestAddress(p))
                    .expect("in range");
                let next = if p + PAGE_SIZE >= self.sweep_end {
                    self.sweeps.fetch_add(1, Ordering::SeqCst);
                    SWEEP_START
                } else {
                    p + PAGE_SIZE
                };
                self.pos.store(next, Ordering::SeqCst);
            }
            n += 1;
            if n.is_multiple_of(64) {
                let t = self.throttle.load(Ordering::Relaxed);
                let d = self.page_delay * 64;
                if t > 0 {
                    std::thread::sleep(d * u32::from(t) / u32::from(100 - t.min(99)));
                }
                if !d.is_zero() {
                    std::thread::sleep(d);
                }
            }
        }
    }

    /// The QEMU A-B check over the sweep range: every page's first byte equals its
    /// predecessor's, except for at most one step of -1 (mod 256) where the sweep is.
    pub fn check_ab(&self) -> Result<(), String> {
        check_ab_ram(&self.mem, self.sweep_end)
    }

    /// Whether the sweeper is held (paused, or a target not started yet).
    pub fn is_paused(&self) -> bool {
        *self.gate.lock().expect("gate")
    }

    pub fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// The region's own bitmap (not the trait's offset slice of it).
struct MmapRegionBitmap;
impl MmapRegionBitmap {
    fn bitmap(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
        std::ops::Deref::deref(r).bitmap()
    }
}

pub fn check_ab_ram(mem: &GuestMemoryMmap<AtomicBitmap>, end: u64) -> Result<(), String> {
    let mut prev: u8 = mem
        .read_obj(GuestAddress(SWEEP_START))
        .map_err(|e| e.to_string())?;
    let mut steps = 0;
    let mut a = SWEEP_START + PAGE_SIZE;
    while a < end {
        let b: u8 = mem.read_obj(GuestAddress(a)).map_err(|e| e.to_string())?;
        if b != prev {
            if b.wrapping_add(1) != prev {
                return Err(format!("page {a:#x}: byte {b} after {prev}"));
            }
            steps += 1;
            if steps > 1 {
                return Err(format!("page {a:#x}: second step"));
            }
        }
        prev = b;
        a += PAGE_SIZE;
    }
    if prev == 0 && steps == 0 {
        return Err("the sweep range was never written".into());
    }
    Ok(())
}

impl MigrationSource for FakeVm {
    fn spec(&self) -> VmSpec {
        self.spec.clone()
    }
    fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.mem
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        for r in self.mem.iter() {
            MmapRegionBitmap::bitmap(r).reset();
        }
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn take_dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        // Like the real VMM: ascending page numbers.
        let r = self
            .mem
            .iter()
            .next()
            .ok_or(VmError::Other("no memory".into()))?;
        let words = MmapRegionBitmap::bitmap(r).get_and_reset();
        Ok((0..words.len() as u64 * 64)
            .filter(|p| super::bitmap::is_set(&words, *p))
            .collect())
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.logging.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn pause(&self) -> Result<(), VmError> {
        *self.gate.lock().expect("gate") = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        if self.started.load(Ordering::SeqCst) {
            self.unpause();
            Ok(())
        } else {
            Err(VmError::WrongState {
                state: "incoming".into(),
                needed: "started",
            })
        }
    }
    fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::Relaxed);
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        if !*self.gate.lock().expect("gate") {
            return Err(VmError::WrongState {
                state: "running".into(),
                needed: "paused",
            });
        }
        Ok(self.pos.load(Ordering::SeqCst).to_le_bytes().to_vec())
    }
    fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), VmError> {
        record_disks(self, disks)
    }
}

/// Both sides' `set_disks`: like the real VMM, only while the vCPUs do not run.
fn record_disks(vm: &FakeVm, disks: &[DiskSpec]) -> Result<(), VmError> {
    if !*vm.gate.lock().expect("gate") {
        return Err(VmError::WrongState {
            state: "running".into(),
            needed: "paused",
        });
    }
    *vm.disks.lock().expect("disks") = Some(disks.to_vec());
    Ok(())
}

/// The target side of a fake VM (it needs the `Arc` to start its sweeper thread).
pub struct FakeTarget(pub Arc<FakeVm>);

impl MigrationTarget for FakeTarget {
    fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.0.mem
    }
    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        let b: [u8; 8] = state
            .try_into()
            .map_err(|_| VmError::BadState("want 8 bytes".into()))?;
        self.0.pos.store(u64::from_le_bytes(b), Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        self.0.start();
        Ok(())
    }
    fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), VmError> {
        record_disks(&self.0, disks)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeState {
    Running,
    Paused,
    Migrating,
    Incoming,
}

/// A VM manager holding fake VMs.
pub struct FakeHost {
    pub vms: Mutex<HashMap<String, (Arc<FakeVm>, FakeState)>>,
    sweep_end: u64,
    page_delay: Duration,
    /// Written into every incoming VM's memory at creation (a target whose "fresh"
    /// memory is not clean).
    pub poison_incoming: Option<u64>,
    /// CPUID this host can give; a spec asking for another is incompatible.
    pub cpuid: Vec<[u32; 6]>,
    /// Leave the sweep range zero but for the sweeper's byte (pages travel as Sparse
    /// frames); otherwise it is filled with a dense, compressible pattern first, so
    /// every page costs 4 KiB on the wire like real guest data.
    pub sparse_guest: bool,
}

impl FakeHost {
    pub fn plain(sweep_end: u64, page_delay: Duration) -> Self {
        FakeHost {
            vms: Mutex::new(HashMap::new()),
            sweep_end,
            page_delay,
            poison_incoming: None,
            cpuid: vec![[0, 0, 1, 2, 3, 4]],
            sparse_guest: false,
        }
    }
    pub fn add_running(&self, name: &str, memory_mib: u64) -> Arc<FakeVm> {
        self.add_running_with_disks(name, memory_mib, vec![])
    }
    pub fn add_running_with_disks(
        &self,
        name: &str,
        memory_mib: u64,
        disks: Vec<DiskSpec>,
    ) -> Arc<FakeVm> {
        let vm = FakeVm::with_disks(name, memory_mib, self.sweep_end, self.page_delay, disks);
        if !self.sparse_guest {
            // Bytes 1.. of each page: the sweeper and the A-B check use byte 0 only.
            let page: Vec<u8> = (1..PAGE_SIZE).map(|i| (i % 251 + 1) as u8).collect();
            let mut a = SWEEP_START;
            while a < self.sweep_end {
                vm.mem
                    .write_slice(&page, GuestAddress(a + 1))
                    .expect("in range");
                a += PAGE_SIZE;
            }
        }
        vm.start();
        self.vms
            .lock()
            .expect("vms")
            .insert(name.into(), (vm.clone(), FakeState::Running));
        vm
    }
    pub fn get(&self, name: &str) -> Option<(Arc<FakeVm>, FakeState)> {
        self.vms.lock().expect("vms").get(name).cloned()
    }
}

impl VmHost for FakeHost {
    fn begin_outgoing(&self, name: &str) -> Result<(Arc<dyn MigrationSource>, bool), VmError> {
        let mut g = self.vms.lock().expect("vms");
        let (vm, st) = g
            .get_mut(name)
            .ok_or(VmError::Other(format!("no VM {name}")))?;
        let running = match *st {
            FakeState::Running => true,
            other => {
                return Err(VmError::WrongState {
                    state: format!("{other:?}"),
                    needed: "running or paused",
                });
            }
        };
        *st = FakeState::Migrating;
        Ok((vm.clone(), running))
    }
    fn end_outgoing(&self, name: &str, moved: bool) {
        let mut g = self.vms.lock().expect("vms");
        if moved {
            if let Some((vm, _)) = g.remove(name) {
                vm.kill();
            }
        } else if let Some((_, st)) = g.get_mut(name) {
            *st = FakeState::Running;
        }
    }
    fn end_outgoing_paused(&self, name: &str) {
        if let Some((_, st)) = self.vms.lock().expect("vms").get_mut(name) {
            *st = FakeState::Paused;
        }
    }
    fn create_incoming(&self, spec: &VmSpec) -> Result<Arc<dyn MigrationTarget>, VmError> {
        if spec.cpuid.iter().any(|l| !self.cpuid.contains(l)) {
            return Err(VmError::Incompatible("CPUID leaf not available".into()));
        }
        let mut g = self.vms.lock().expect("vms");
        if g.contains_key(&spec.name) {
            return Err(VmError::Other(format!("a VM named {} exists", spec.name)));
        }
        let vm = FakeVm::with_disks(
            &spec.name,
            spec.memory_mib,
            self.sweep_end,
            self.page_delay,
            spec.disks.clone(),
        );
        if let Some(a) = self.poison_incoming {
            vm.mem.write_obj(0x5au8, GuestAddress(a)).expect("in range");
        }
        g.insert(spec.name.clone(), (vm.clone(), FakeState::Incoming));
        Ok(Arc::new(FakeTarget(vm)))
    }
    fn end_incoming(&self, name: &str, running: bool) {
        let mut g = self.vms.lock().expect("vms");
        if running {
            if let Some((_, st)) = g.get_mut(name) {
                *st = FakeState::Running;
            }
        } else if let Some((vm, _)) = g.remove(name) {
            vm.kill();
        }
    }
}
