//! Test guests built from `agent/guests/*.S` by `build.rs`, and the RAM checker for
//! the A-B sweeper.

/// The A-B sweeper boot sector (512 bytes, load at [`AB_SWEEPER_LOAD_ADDR`]).
pub static AB_SWEEPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ab_sweeper.bin"));
pub const AB_SWEEPER_LOAD_ADDR: u64 = 0x7c00;
/// First and one-past-last byte the sweeper touches (1 MiB .. 100 MiB).
pub const AB_START: u64 = 1 << 20;
pub const AB_END: u64 = 100 << 20;
/// Smallest guest that holds the whole sweep.
pub const AB_MIN_MEMORY_MIB: u64 = 100;
const PAGE: usize = 4096;

/// Guest images by name, for `stagehand-agent guest-image NAME`.
pub fn by_name(name: &str) -> Option<(&'static [u8], u64)> {
    match name {
        "ab-sweeper" => Some((AB_SWEEPER, AB_SWEEPER_LOAD_ADDR)),
        _ => None,
    }
}

pub const NAMES: &[&str] = &["ab-sweeper"];

/// QEMU's `check_guests_ram` for a paused A-B sweeper: `ram` is guest RAM from
/// guest-physical 0. The first byte of every page from 1 MiB to 100 MiB must equal its
/// predecessor's, except for at most one step of -1 (mod 256) where the sweep was
/// interrupted.
pub fn check_ab_ram(ram: &[u8]) -> Result<(), String> {
    let (start, end) = (AB_START as usize, AB_END as usize);
    if ram.len() < end {
        return Err(format!(
            "the image is {} bytes; the A-B check needs at least {end}",
            ram.len()
        ));
    }
    let mut last = ram[start];
    let mut hit_edge = false;
    let mut bad = Vec::new();
    for addr in (start + PAGE..end).step_by(PAGE) {
        let b = ram[addr];
        if b != last {
            if b.wrapping_add(1) == last && !hit_edge {
                hit_edge = true;
            } else {
                bad.push((addr, last, b));
            }
        }
        last = b;
    }
    if bad.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = bad
        .iter()
        .take(5)
        .map(|(a, prev, b)| format!("{a:#x}: {b} after {prev}"))
        .collect();
    Err(format!(
        "{} page(s) out of sequence (first: {})",
        bad.len(),
        shown.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_with(f: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut ram = vec![0u8; AB_END as usize];
        for (i, addr) in (AB_START as usize..AB_END as usize)
            .step_by(PAGE)
            .enumerate()
        {
            ram[addr] = f(i);
        }
        ram
    }

    #[test]
    fn sweeper_is_a_boot_sector() {
        assert_eq!(AB_SWEEPER.len(), 512);
        assert_eq!(&AB_SWEEPER[510..], &[0x55, 0xaa]);
    }

    #[test]
    fn uniform_and_one_edge_pass() {
        assert!(check_ab_ram(&ram_with(|_| 7)).is_ok());
        // Interrupted mid-sweep: the first 100 pages already at 8, the rest at 7.
        assert!(check_ab_ram(&ram_with(|i| if i < 100 { 8 } else { 7 })).is_ok());
        // Wrap-around: 0 after 255 is a step of +1, so pages at 0 then 255 is the edge.
        assert!(check_ab_ram(&ram_with(|i| if i < 3 { 0 } else { 255 })).is_ok());
    }

    #[test]
    fn two_edges_or_wrong_steps_fail() {
        let two = ram_with(|i| match i {
            0..100 => 9,
            100..200 => 8,
            _ => 7,
        });
        assert!(check_ab_ram(&two).is_err());
        assert!(check_ab_ram(&ram_with(|i| if i < 100 { 7 } else { 8 })).is_err());
        assert!(check_ab_ram(&ram_with(|i| if i == 5000 { 0 } else { 3 })).is_err());
        assert!(check_ab_ram(&[0u8; 1024]).is_err());
    }
}
