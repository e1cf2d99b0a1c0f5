//! Test guests built from `agent/guests/*.S` by `build.rs`, the RAM checker for the
//! A-B sweeper and the disk checker for the disk writer.

/// The A-B sweeper boot sector (512 bytes, load at [`AB_SWEEPER_LOAD_ADDR`]).
pub static AB_SWEEPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ab_sweeper.bin"));
pub const AB_SWEEPER_LOAD_ADDR: u64 = 0x7c00;
/// The disk writer (flat binary, load at [`DISK_WRITER_LOAD_ADDR`]): writes numbered
/// records to disk 0 and sweeps RAM like the A-B sweeper (see `guests/disk_writer.S`).
pub static DISK_WRITER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/disk_writer.bin"));
pub const DISK_WRITER_LOAD_ADDR: u64 = 0x7c00;
/// Where the disk writer keeps the last acknowledged record's seq (u64 LE; 0 = none).
pub const DISK_WRITER_ACKED_ADDR: u64 = 0x500;
/// Smallest guest for the disk writer (it sweeps 1..100 MiB too).
pub const DISK_WRITER_MIN_MEMORY_MIB: u64 = 128;
/// The disk writer uses at most this many sectors (the first 1 MiB of the disk).
pub const DISK_WRITER_MAX_SECTORS: u64 = 2048;
const SECTOR: usize = 512;
const RECORD_MAGIC: &[u8; 4] = b"SHDW";
const FILLER_MUL: u32 = 0x9E37_79B1;
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
        "disk-writer" => Some((DISK_WRITER, DISK_WRITER_LOAD_ADDR)),
        _ => None,
    }
}

pub const NAMES: &[&str] = &["ab-sweeper", "disk-writer"];

/// The record the disk writer writes for `seq` at `sector`, byte for byte (pure).
pub fn disk_record(seq: u64, sector: u64) -> [u8; SECTOR] {
    let mut words = [0u32; 128];
    words[0] = u32::from_le_bytes(*RECORD_MAGIC);
    words[2] = seq as u32;
    words[3] = (seq >> 32) as u32;
    words[4] = sector as u32;
    words[5] = (sector >> 32) as u32;
    let base = (seq as u32).wrapping_mul(FILLER_MUL);
    for (i, w) in words.iter_mut().enumerate().take(126).skip(6) {
        *w = base.wrapping_add(i as u32);
    }
    let sum = words[..126].iter().fold(0u32, |a, w| a.wrapping_add(*w));
    let xor = words[..126].iter().fold(0u32, |a, w| a ^ w);
    words[126] = sum;
    words[127] = xor;
    let mut out = [0u8; SECTOR];
    for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// What [`check_disk_records`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCheck {
    /// Sectors checked (the guest's nsectors).
    pub sectors: u64,
    /// Sectors holding a record.
    pub written: u64,
    /// The highest seq on the disk (0: none).
    pub newest: u64,
    /// Whether record `acked + 1` (in flight at the pause) is on the disk.
    pub in_flight_landed: bool,
}

/// The seq a sector holds, if its bytes are an intact record for that sector.
fn parse_record(bytes: &[u8], sector: u64) -> Result<u64, String> {
    let word = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&bytes[i * 4..i * 4 + 4]);
        u32::from_le_bytes(w)
    };
    if &bytes[..4] != RECORD_MAGIC {
        return Err("no record magic (torn or foreign data)".into());
    }
    let seq = u64::from(word(2)) | (u64::from(word(3)) << 32);
    let field = u64::from(word(4)) | (u64::from(word(5)) << 32);
    if bytes != disk_record(seq, field) {
        return Err(format!("record {seq} is torn or corrupt (checksum/filler)"));
    }
    if field != sector {
        return Err(format!("holds record {seq} of sector {field}"));
    }
    Ok(seq)
}

/// Checks the disk writer's disk against the last acknowledged seq `acked` (read from
/// guest RAM at [`DISK_WRITER_ACKED_ADDR`] while paused). `disk` is the first
/// `min(disk size, 1 MiB)` bytes of the disk, i.e. the guest's nsectors sectors.
/// Every sector must hold exactly the newest record `<= acked` for it (or nothing,
/// when no such record exists), except that record `acked + 1` (in flight at the
/// pause) may also be present; anything older (a lost write), torn or newer is an
/// error naming the sector.
pub fn check_disk_records(disk: &[u8], acked: u64) -> Result<DiskCheck, String> {
    if disk.is_empty() || !disk.len().is_multiple_of(SECTOR) {
        return Err(format!(
            "the disk image is {} bytes; it must be a non-empty multiple of {SECTOR}",
            disk.len()
        ));
    }
    let n = (disk.len() / SECTOR) as u64;
    if n > DISK_WRITER_MAX_SECTORS {
        return Err(format!(
            "the disk image has {n} sectors; the writer uses at most {DISK_WRITER_MAX_SECTORS}"
        ));
    }
    let mut check = DiskCheck {
        sectors: n,
        written: 0,
        newest: 0,
        in_flight_landed: false,
    };
    let in_flight = acked.checked_add(1);
    let mut bad = Vec::new();
    for (s, bytes) in disk.chunks_exact(SECTOR).enumerate() {
        let s = s as u64;
        // The largest seq <= acked with seq % n == s (seqs start at 1).
        let newest = acked
            .checked_sub((acked % n + n - s) % n)
            .filter(|&q| q >= 1);
        if bytes.iter().all(|&b| b == 0) {
            if let Some(q) = newest {
                bad.push(format!(
                    "sector {s}: empty, but record {q} was acknowledged"
                ));
            }
            continue;
        }
        let seq = match parse_record(bytes, s) {
            Ok(q) => q,
            Err(why) => {
                bad.push(format!("sector {s}: {why}"));
                continue;
            }
        };
        check.written += 1;
        check.newest = check.newest.max(seq);
        if Some(seq) == in_flight {
            check.in_flight_landed = true;
        } else if Some(seq) != newest {
            let expected = newest.map_or("none".to_string(), |q| q.to_string());
            let what = if seq > acked {
                "newer than acknowledged"
            } else {
                "a lost write"
            };
            bad.push(format!(
                "sector {s}: holds record {seq}, expected {expected} ({what})"
            ));
        }
    }
    if bad.is_empty() {
        return Ok(check);
    }
    let shown: Vec<&str> = bad.iter().take(5).map(String::as_str).collect();
    Err(format!(
        "{} bad sector(s) with acked = {acked}: {}",
        bad.len(),
        shown.join("; ")
    ))
}

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
    fn disk_writer_is_built() {
        assert!(DISK_WRITER.len() > 64 && DISK_WRITER.len() < 0x7c00);
        assert_eq!(by_name("disk-writer").map(|g| g.1), Some(0x7c00));
    }

    /// The disk after records 1..=acked (and maybe acked + 1) landed in order.
    fn written_disk(n: u64, acked: u64, in_flight: bool) -> Vec<u8> {
        let mut disk = vec![0u8; n as usize * SECTOR];
        let last = if in_flight { acked + 1 } else { acked };
        for seq in 1..=last {
            let s = seq % n;
            disk[s as usize * SECTOR..][..SECTOR].copy_from_slice(&disk_record(seq, s));
        }
        disk
    }

    #[test]
    fn histories_pass() {
        let c = check_disk_records(&written_disk(8, 0, false), 0).expect("blank disk");
        assert_eq!((c.written, c.newest), (0, 0));
        let c = check_disk_records(&written_disk(8, 0, true), 0).expect("first in flight");
        assert!(c.in_flight_landed);
        let c = check_disk_records(&written_disk(8, 21, false), 21).expect("wrapped");
        assert_eq!(
            (c.sectors, c.written, c.newest, c.in_flight_landed),
            (8, 8, 21, false)
        );
        let c = check_disk_records(&written_disk(8, 21, true), 21).expect("in flight");
        assert_eq!((c.newest, c.in_flight_landed), (22, true));
        assert!(check_disk_records(&written_disk(1, 5, true), 5).is_ok());
    }

    #[test]
    fn corruption_fails_naming_the_sector() {
        let mut d = written_disk(8, 21, false);
        d[3 * SECTOR + 100] ^= 1;
        let err = check_disk_records(&d, 21).expect_err("torn");
        assert!(err.contains("sector 3"), "{err}");
        // A lost write: sector 5 still holds 13 instead of 21.
        let mut d = written_disk(8, 21, false);
        d[5 * SECTOR..][..SECTOR].copy_from_slice(&disk_record(13, 5));
        let err = check_disk_records(&d, 21).expect_err("lost");
        assert!(err.contains("sector 5") && err.contains("lost"), "{err}");
        // Newer than acked + 1.
        assert!(check_disk_records(&written_disk(8, 22, true), 21).is_err());
        // Acked but never written.
        assert!(check_disk_records(&written_disk(8, 20, false), 21).is_err());
        assert!(check_disk_records(&[0u8; 100], 0).is_err());
        assert!(check_disk_records(&[], 0).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_acked_history_passes(n in 1u64..64, acked in 0u64..500, in_flight: bool) {
            let c = check_disk_records(&written_disk(n, acked, in_flight), acked);
            proptest::prop_assert!(c.is_ok(), "{:?}", c);
        }

        #[test]
        fn any_damage_fails(
            n in 1u64..64,
            acked in 1u64..500,
            in_flight: bool,
            kind in 0u8..5,
            pick: u64,
            byte in 0usize..SECTOR,
        ) {
            let mut d = written_disk(n, acked, in_flight);
            let held_at = |d: &[u8], s: u64| {
                let at = s as usize * SECTOR + 8;
                u64::from_le_bytes(d[at..at + 8].try_into().expect("8 bytes"))
            };
            let written: Vec<u64> = (0..n).filter(|&s| d[s as usize * SECTOR] != 0).collect();
            // Damage an acknowledged record where there is one (an in-flight record
            // may legitimately be missing).
            let acked_sectors: Vec<u64> =
                written.iter().copied().filter(|&s| held_at(&d, s) <= acked).collect();
            let from = if acked_sectors.is_empty() { &written } else { &acked_sectors };
            let s = from[(pick % from.len() as u64) as usize];
            let at = s as usize * SECTOR;
            let held = held_at(&d, s);
            match kind {
                // Torn or corrupted.
                0 => d[at + byte] ^= 0x40,
                // Lost: erased.
                1 => d[at..at + SECTOR].fill(0),
                // Lost: an older record of the same sector.
                2 => {
                    let older = if held > acked {
                        held.saturating_sub(2 * n)
                    } else {
                        held.saturating_sub(n)
                    };
                    if older == 0 && held <= acked {
                        d[at..at + SECTOR].fill(0);
                    } else {
                        d[at..at + SECTOR].copy_from_slice(&disk_record(older, s));
                    }
                }
                // A record from the future.
                3 => d[at..at + SECTOR].copy_from_slice(&disk_record(acked + 2 + pick % 3 * n, s)),
                // Reordered: the record landed in the wrong place.
                _ => {
                    let other = (s + 1 + pick % n.max(2)) % n;
                    if other == s {
                        d[at..at + SECTOR].fill(0xff);
                    } else {
                        let rec = disk_record(held, other);
                        d[at..at + SECTOR].copy_from_slice(&rec);
                    }
                }
            }
            proptest::prop_assert!(check_disk_records(&d, acked).is_err());
        }
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
