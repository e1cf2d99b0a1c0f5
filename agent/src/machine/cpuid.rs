//! CPUID: the guest's leaves as a migration carries them, and the check that a target
//! host can supply them.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

use super::MachineError;

/// CPUID leaves whose feature bits a guest may only use when the host has them:
/// (function, index, which registers: eax, ebx, ecx, edx).
const FEATURE_LEAVES: &[(u32, u32, [bool; 4])] = &[
    (1, 0, [false, false, true, true]),
    (7, 0, [false, true, true, true]),
    (7, 1, [true, false, false, false]),
    (0xd, 1, [true, false, false, false]),
    (0x8000_0001, 0, [false, false, true, true]),
];

/// Checks that every CPU feature the guest was given exists on the host (pure).
/// Leaf 1 ECX bit 27 (OSXSAVE) follows the guest's CR4 and is not a host feature.
pub fn check_cpuid_compatible(guest: &[[u32; 6]], host: &[[u32; 6]]) -> Result<(), String> {
    const REGS: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    for &(function, index, regs) in FEATURE_LEAVES {
        let Some(g) = guest.iter().find(|l| l[0] == function && l[1] == index) else {
            continue;
        };
        let h = host
            .iter()
            .find(|l| l[0] == function && l[1] == index)
            .copied()
            .unwrap_or([function, index, 0, 0, 0, 0]);
        for (r, check) in regs.iter().enumerate() {
            let mut want = g[2 + r];
            if function == 1 && r == 2 {
                want &= !(1 << 27);
            }
            let missing = want & !h[2 + r];
            if *check && missing != 0 {
                return Err(format!(
                    "CPUID leaf {function:#x}.{index} {}: guest bits {missing:#010x} are missing here",
                    REGS[r]
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn cpuid_to_spec(cpuid: &CpuId) -> Vec<[u32; 6]> {
    cpuid
        .as_slice()
        .iter()
        .map(|e| [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx])
        .collect()
}

/// Builds the target's CPUID from the spec's leaves, taking KVM's per-leaf flags
/// (significant index and so on) from the host's own table.
pub(super) fn cpuid_from_spec(spec: &[[u32; 6]], host: &CpuId) -> Result<CpuId, MachineError> {
    let entries: Vec<kvm_cpuid_entry2> = spec
        .iter()
        .map(|l| {
            let flags = host
                .as_slice()
                .iter()
                .find(|h| h.function == l[0] && h.index == l[1])
                .map(|h| h.flags)
                .unwrap_or(0);
            kvm_cpuid_entry2 {
                function: l[0],
                index: l[1],
                flags,
                eax: l[2],
                ebx: l[3],
                ecx: l[4],
                edx: l[5],
                ..Default::default()
            }
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|e| MachineError::Invalid(format!("CPUID table: {e:?}")))
}

/// The fingerprint of the CPU features a guest started on this host sees: BLAKE3 of
/// the feature registers of [`FEATURE_LEAVES`] (the bits `check_cpuid_compatible`
/// compares), hex. Two hosts with the same fingerprint can take each other's guests;
/// the coordinator places and moves guests only between equal fingerprints (a
/// conservative rule: a superset host would do as well).
pub fn cpu_fingerprint(leaves: &[[u32; 6]]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"stagehand-cpu-features-v1");
    for &(function, index, regs) in FEATURE_LEAVES {
        let l = leaves
            .iter()
            .find(|l| l[0] == function && l[1] == index)
            .copied()
            .unwrap_or([function, index, 0, 0, 0, 0]);
        for (r, check) in regs.iter().enumerate() {
            let mut v = if *check { l[2 + r] } else { 0 };
            if function == 1 && r == 2 {
                v &= !(1 << 27);
            }
            h.update(&v.to_le_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

/// The host's CPU as guests see it: (model name from CPUID leaves 0x80000002-4,
/// fingerprint of the KVM-supported features).
pub fn host_cpu() -> Result<(String, String), MachineError> {
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| MachineError::Invalid(format!("cannot open /dev/kvm: {e}")))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| MachineError::Invalid(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let leaves = cpuid_to_spec(&cpuid);
    Ok((model_name(), cpu_fingerprint(&leaves)))
}

/// "model name" of the first CPU in /proc/cpuinfo ("unknown" when absent).
fn model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
