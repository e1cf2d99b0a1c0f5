//! The KVM VM: file descriptors, the one RAM slot, in-kernel irqchip and PIT, dirty
//! logging, and the VM-wide state (PIC, IOAPIC, PIT, kvmclock).

use std::sync::Mutex;

use kvm_bindings::{
    CpuId, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_clear_dirty_log,
    kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};

use super::memory::{self, GuestMemoryAtomic};
use crate::contract::PAGE_SIZE;

/// Where KVM puts the three-page TSS it needs for real mode on Intel (below 4 GiB,
/// above any RAM we map).
pub const TSS_ADDR: usize = 0xfffb_d000;
/// The identity-map page KVM needs on Intel, just below the TSS.
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
const RAM_SLOT: u32 = 0;
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: GET_DIRTY_LOG stops write-protecting;
/// CLEAR_DIRTY_LOG does it for the pages just harvested.
const MANUAL_PROTECT_ENABLE: u64 = 1;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("saved VM state is invalid: {0}")]
    BadState(String),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// VM-wide state saved for migration. Versioned; see [`VM_STATE_VERSION`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

pub const VM_STATE_VERSION: u32 = 1;

struct DirtyLog {
    enabled: bool,
    /// Logging is on for a rate sample (`start_dirty_sample`), not for a migration.
    /// A migration's `start_dirty_log` takes the log over and clears this, so a
    /// sample never steals the dirty bits a migration needs.
    sampling: bool,
}

/// One KVM VM with its guest RAM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryAtomic,
    manual_protect: bool,
    dirty: Mutex<DirtyLog>,
}

impl Vm {
    /// Creates the VM: TSS and identity map, in-kernel irqchip and PIT, RAM in slot 0.
    pub fn new(memory_mib: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm_err("SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // Port 0x61's speaker bits then read back sanely without a userspace speaker.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))?;
        let manual_protect = fd
            .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            & (MANUAL_PROTECT_ENABLE as i32)
            != 0;
        if manual_protect {
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [MANUAL_PROTECT_ENABLE, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(kvm_err("ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
        }
        let memory = memory::create_guest_memory(memory_mib)?;
        let vm = Vm {
            kvm,
            fd,
            memory,
            manual_protect,
            dirty: Mutex::new(DirtyLog {
                enabled: false,
                sampling: false,
            }),
        };
        vm.set_ram_slot(0)?;
        Ok(vm)
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn memory(&self) -> &GuestMemoryAtomic {
        &self.memory
    }

    /// Whether KVM_CLEAR_DIRTY_LOG is in use (MANUAL_DIRTY_LOG_PROTECT2).
    pub fn manual_dirty_protect(&self) -> bool {
        self.manual_protect
    }

    /// CPUID KVM can give a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))
    }

    fn set_ram_slot(&self, flags: u32) -> Result<(), VmError> {
        let (host, len) = memory::ram_host_range(&self.memory);
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags,
            guest_phys_addr: 0,
            memory_size: len as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is the mapping owned by `self.memory`, which lives as
        // long as `self` and so as long as the VM fd that refers to it.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("SET_USER_MEMORY_REGION"))
    }

    /// Re-registers RAM with KVM_MEM_LOG_DIRTY_PAGES and resets the VMM's bitmap, so
    /// that from now on every page written by the guest or the VMM is reported.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        let mut dirty = self.dirty.lock().expect("dirty-log lock is never poisoned");
        if !dirty.enabled {
            self.set_ram_slot(KVM_MEM_LOG_DIRTY_PAGES)?;
            dirty.enabled = true;
        }
        // A rate sample in progress is abandoned: the log is the migration's now.
        dirty.sampling = false;
        // Drop whatever was logged before: the caller sends everything next.
        if self.manual_protect {
            let bits = self.get_kvm_log()?;
            self.clear_kvm_log(&bits)?;
        } else {
            self.get_kvm_log()?;
        }
        memory::vmm_bitmap(&self.memory).reset();
        Ok(())
    }

    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        let mut dirty = self.dirty.lock().expect("dirty-log lock is never poisoned");
        if dirty.enabled {
            self.set_ram_slot(0)?;
            dirty.enabled = false;
        }
        dirty.sampling = false;
        Ok(())
    }

    /// Starts a dirty-rate sample: logging on, the log cleared. Returns false (and
    /// does nothing) while a migration owns the log.
    pub fn start_dirty_sample(&self) -> Result<bool, VmError> {
        let mut dirty = self.dirty.lock().expect("dirty-log lock is never poisoned");
        if dirty.enabled {
            return Ok(false);
        }
        self.set_ram_slot(KVM_MEM_LOG_DIRTY_PAGES)?;
        dirty.enabled = true;
        dirty.sampling = true;
        if self.manual_protect {
            let bits = self.get_kvm_log()?;
            self.clear_kvm_log(&bits)?;
        }
        memory::vmm_bitmap(&self.memory).reset();
        Ok(true)
    }

    /// Ends a sample: the number of pages written since `start_dirty_sample`, and
    /// logging off again. None when a migration took the log over meanwhile (its
    /// bits are left alone).
    pub fn end_dirty_sample(&self) -> Result<Option<u64>, VmError> {
        let mut dirty = self.dirty.lock().expect("dirty-log lock is never poisoned");
        if !dirty.sampling {
            return Ok(None);
        }
        let kvm_bits = self.get_kvm_log()?;
        let vmm_bits = memory::vmm_bitmap(&self.memory).get_and_reset();
        let pages = memory::merge_dirty_bitmaps(&kvm_bits, &vmm_bits)
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        self.set_ram_slot(0)?;
        dirty.enabled = false;
        dirty.sampling = false;
        Ok(Some(pages))
    }

    fn get_kvm_log(&self) -> Result<Vec<u64>, VmError> {
        let size = memory::ram_size(&self.memory) as usize;
        self.fd
            .get_dirty_log(RAM_SLOT, size)
            .map_err(kvm_err("GET_DIRTY_LOG"))
    }

    /// Re-protects exactly the pages in `bits` (MANUAL_DIRTY_LOG_PROTECT2). Called after
    /// GET and before the caller copies the pages, so a write racing with the copy
    /// faults again and is reported next time.
    fn clear_kvm_log(&self, bits: &[u64]) -> Result<(), VmError> {
        if bits.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let pages = memory::ram_size(&self.memory) / PAGE_SIZE;
        let mut bitmap = bits.to_vec();
        let mut arg = kvm_clear_dirty_log {
            slot: RAM_SLOT,
            num_pages: u32::try_from(pages)
                .map_err(|_| VmError::BadState("RAM too large".into()))?,
            first_page: 0,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `arg` points at `bitmap`, which holds one bit per page of the slot
        // (`num_pages` bits, rounded up to whole u64 words) and outlives the call; the
        // ioctl only reads it.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(VmError::Kvm {
                op: "CLEAR_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Pages dirtied since the last call: KVM's log OR-ed with the VMM's bitmap.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>, VmError> {
        let dirty = self.dirty.lock().expect("dirty-log lock is never poisoned");
        if !dirty.enabled {
            return Err(VmError::BadState("dirty logging is not started".into()));
        }
        let kvm_bits = self.get_kvm_log()?;
        if self.manual_protect {
            self.clear_kvm_log(&kvm_bits)?;
        }
        let vmm_bits = memory::vmm_bitmap(&self.memory).get_and_reset();
        Ok(memory::merge_dirty_bitmaps(&kvm_bits, &vmm_bits))
    }

    fn get_chip(&self, chip_id: u32) -> Result<kvm_irqchip, VmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// Saves PIC master/slave, IOAPIC, PIT and kvmclock. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let mut clock = self.fd.get_clock().map_err(kvm_err("GET_CLOCK"))?;
        // TSC_STABLE is informational and refused by SET_CLOCK on some kernels.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            version: VM_STATE_VERSION,
            pic_master: self.get_chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.get_chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.get_chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("GET_PIT2"))?,
            clock,
        })
    }

    /// Restores VM-wide state (before the vCPUs' state, as Firecracker does).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        if state.version != VM_STATE_VERSION {
            return Err(VmError::BadState(format!(
                "VM state version {} is not supported (this agent reads {VM_STATE_VERSION})",
                state.version
            )));
        }
        let chips = [
            (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
            (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
            (KVM_IRQCHIP_IOAPIC, &state.ioapic),
        ];
        for (id, chip) in chips {
            if chip.chip_id != id {
                return Err(VmError::BadState(format!(
                    "irqchip {id} saved with id {}",
                    chip.chip_id
                )));
            }
        }
        self.fd.set_pit2(&state.pit).map_err(kvm_err("SET_PIT2"))?;
        let mut clock = state.clock;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        self.fd.set_clock(&clock).map_err(kvm_err("SET_CLOCK"))?;
        for (_, chip) in chips {
            self.fd.set_irqchip(chip).map_err(kvm_err("SET_IRQCHIP"))?;
        }
        Ok(())
    }

    /// Whether the kernel offers `cap` (for diagnostics and tests).
    pub fn has_cap(&self, cap: Cap) -> bool {
        self.fd.check_extension(cap)
    }
}
