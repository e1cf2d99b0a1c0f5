use super::*;
use crate::devices::DEVICE_STATE_VERSION;
use crate::vstate::vcpu::{FpuState, VCPU_STATE_VERSION};

fn sample_state() -> MachineState {
    let mut regs = kvm_bindings::kvm_regs {
        rip: 0x7c2a,
        rflags: 0x202,
        ..Default::default()
    };
    regs.rbx = 0x55;
    let mut lapic = kvm_bindings::kvm_lapic_state::default();
    lapic.regs[0x20] = 7;
    let mut xsave = kvm_bindings::kvm_xsave::default();
    xsave.region[5] = 0xdead_beef;
    MachineState {
        version: MACHINE_STATE_VERSION,
        vm: VmState {
            version: vm::VM_STATE_VERSION,
            pic_master: Default::default(),
            pic_slave: kvm_bindings::kvm_irqchip {
                chip_id: 1,
                ..Default::default()
            },
            ioapic: kvm_bindings::kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            },
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 123_456_789,
                ..Default::default()
            },
        },
        vcpus: vec![VcpuState {
            version: VCPU_STATE_VERSION,
            id: 0,
            mp_state: Default::default(),
            regs,
            sregs: Default::default(),
            fpu: FpuState {
                fpr: vec![[1; 16]; 8],
                fcw: 0x37f,
                fsw: 0,
                ftwx: 0,
                last_opcode: 0,
                last_ip: 0,
                last_dp: 0,
                xmm: vec![[2; 16]; 16],
                mxcsr: 0x1f80,
            },
            xsave,
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic,
            tsc_khz: Some(2_000_000),
            msrs: vec![(0x10, 99), (0x1b, 0xfee0_0900)],
            vcpu_events: Default::default(),
        }],
        devices: DeviceState {
            version: DEVICE_STATE_VERSION,
            serial: Default::default(),
            console: b"AB".to_vec(),
            port92: 2,
            post_code: 0,
            cmos_index: 0,
            disks: vec![crate::devices::block::BlockRegs {
                capacity: 2048,
                status: crate::devices::block::STATUS_OK,
                ..Default::default()
            }],
        },
    }
}

#[test]
fn machine_state_round_trips_and_checks_its_version() {
    let bytes = sample_state().encode().expect("encodes");
    let back = MachineState::decode(&bytes).expect("decodes");
    assert_eq!(
        back.encode().expect("encodes"),
        bytes,
        "lossless round trip"
    );
    assert_eq!(back.vcpus[0].regs.rip, 0x7c2a);
    assert_eq!(back.vcpus[0].xsave.region[5], 0xdead_beef);
    assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
    assert_eq!(back.vcpus[0].msrs, vec![(0x10, 99), (0x1b, 0xfee0_0900)]);
    assert_eq!(back.vm.clock.clock, 123_456_789);
    assert_eq!(back.devices.console, b"AB");
    assert_eq!(back.devices.disks[0].capacity, 2048);

    let mut future = sample_state();
    future.version = MACHINE_STATE_VERSION + 1;
    let err = MachineState::decode(&future.encode().expect("encodes"))
        .expect_err("unknown version refused");
    assert!(err.to_string().contains("version"), "{err}");
    assert!(
        MachineState::decode(&bytes[..bytes.len() / 2]).is_err(),
        "truncated"
    );
}

#[test]
fn cpuid_subset_is_compatible() {
    let host = vec![[1, 0, 0, 0, 0b1111, 0b1111], [7, 0, 0, 0b11, 0, 0]];
    assert!(check_cpuid_compatible(&[[1, 0, 0, 0, 0b0101, 0b1000]], &host).is_ok());
    // OSXSAVE follows CR4, never a host feature.
    assert!(check_cpuid_compatible(&[[1, 0, 0, 0, 1 << 27, 0]], &host).is_ok());
    let err = check_cpuid_compatible(&[[7, 0, 0, 0b111, 0, 0]], &host)
        .expect_err("bit 2 of leaf 7 ebx is missing");
    assert!(err.contains("0x7.0 ebx"), "{err}");
    // A feature leaf the host lacks entirely cannot carry features.
    assert!(check_cpuid_compatible(&[[0x8000_0001, 0, 0, 0, 1, 0]], &host).is_err());
    // Non-feature leaves are not compared.
    assert!(check_cpuid_compatible(&[[0, 0, 0xd, 1, 2, 3]], &host).is_ok());
}

#[test]
fn cpu_fingerprint_follows_feature_bits_only() {
    use super::cpu_fingerprint;
    let a = vec![[1, 0, 0, 0, 0b1111, 0b1111], [7, 0, 0, 0b11, 0, 0]];
    // Non-feature registers (eax/ebx of leaf 1: family, APIC id) and OSXSAVE do not count.
    let b = vec![
        [1, 0, 0x806ea, 0x42, 0b1111 | 1 << 27, 0b1111],
        [7, 0, 9, 0b11, 0, 0],
    ];
    assert_eq!(cpu_fingerprint(&a), cpu_fingerprint(&b));
    let c = vec![[1, 0, 0, 0, 0b1111, 0b1111], [7, 0, 0, 0b111, 0, 0]];
    assert_ne!(cpu_fingerprint(&a), cpu_fingerprint(&c));
    assert_eq!(cpu_fingerprint(&a).len(), 64);
}
