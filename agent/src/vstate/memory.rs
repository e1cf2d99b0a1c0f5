//! Guest RAM: one anonymous mapping at guest-physical 0, with vm-memory's
//! `AtomicBitmap` so that every write the VMM itself makes is tracked, plus the pure
//! helpers that turn KVM's and the VMM's dirty bitmaps into a page list.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::contract::PAGE_SIZE;

/// Guest RAM as the whole agent sees it.
pub type GuestMemoryAtomic = GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory_mib must be between 1 and {max} MiB, got {got}")]
    BadSize { got: u64, max: u64 },
    #[error("could not map {mib} MiB of guest RAM: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("the image ({len} bytes at {addr:#x}) does not fit in guest RAM of {size} bytes")]
    ImageTooBig { len: usize, addr: u64, size: u64 },
    #[error("guest memory access failed: {0}")]
    Access(String),
}

/// Largest guest this agent creates (64 GiB); guards against typos in requests.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

/// Maps `memory_mib` MiB of zeroed anonymous memory at guest-physical 0.
pub fn create_guest_memory(memory_mib: u64) -> Result<GuestMemoryAtomic, MemoryError> {
    if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
        return Err(MemoryError::BadSize {
            got: memory_mib,
            max: MAX_MEMORY_MIB,
        });
    }
    let size = usize::try_from(memory_mib << 20).map_err(|_| MemoryError::BadSize {
        got: memory_mib,
        max: MAX_MEMORY_MIB,
    })?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).map_err(|source| MemoryError::Map {
        mib: memory_mib,
        source,
    })
}

/// The single RAM region (the agent never creates more than one).
pub fn ram_region(mem: &GuestMemoryAtomic) -> &vm_memory::GuestRegionMmap<AtomicBitmap> {
    mem.find_region(GuestAddress(0))
        .expect("guest RAM always has one region at guest-physical 0")
}

/// Size of guest RAM in bytes.
pub fn ram_size(mem: &GuestMemoryAtomic) -> u64 {
    ram_region(mem).len()
}

/// Host address and length of guest RAM, for KVM slot registration and dumps.
pub fn ram_host_range(mem: &GuestMemoryAtomic) -> (*mut u8, usize) {
    let region = ram_region(mem);
    (region.as_ptr(), region.size())
}

/// The VMM's own dirty bitmap (one bit per 4 KiB page, page `p` is bit `p % 64` of
/// word `p / 64`, the same layout as KVM's).
pub fn vmm_bitmap(mem: &GuestMemoryAtomic) -> &AtomicBitmap {
    vm_memory::mmap::MmapRegion::bitmap(ram_region(mem))
}

/// Copies a flat binary into guest RAM at `addr`.
pub fn load_image(mem: &GuestMemoryAtomic, addr: u64, image: &[u8]) -> Result<(), MemoryError> {
    use vm_memory::Bytes;
    let size = ram_size(mem);
    let end = addr.checked_add(image.len() as u64);
    if image.is_empty() || end.is_none_or(|end| end > size) {
        return Err(MemoryError::ImageTooBig {
            len: image.len(),
            addr,
            size,
        });
    }
    mem.write_slice(image, GuestAddress(addr))
        .map_err(|e| MemoryError::Access(e.to_string()))
}

/// Writes guest RAM, byte for byte from guest-physical 0, to `out`. Copies through a
/// bounce buffer with vm-memory's volatile reads, because a running guest (or a vCPU
/// thread) may write the memory concurrently; callers pause the guest for a
/// consistent image.
pub fn dump(mem: &GuestMemoryAtomic, out: &mut impl std::io::Write) -> std::io::Result<()> {
    use vm_memory::Bytes;
    const CHUNK: usize = 1 << 20;
    let size = ram_size(mem);
    let mut buf = vec![0u8; CHUNK];
    let mut addr = 0u64;
    while addr < size {
        let len = CHUNK.min(usize::try_from(size - addr).unwrap_or(CHUNK));
        mem.read_slice(&mut buf[..len], GuestAddress(addr))
            .map_err(std::io::Error::other)?;
        out.write_all(&buf[..len])?;
        addr += len as u64;
    }
    Ok(())
}

/// Number of 64-bit words a dirty bitmap of `ram_bytes` needs.
pub fn bitmap_words(ram_bytes: u64) -> usize {
    let pages = ram_bytes.div_ceil(PAGE_SIZE);
    usize::try_from(pages.div_ceil(64)).expect("page count of mapped RAM fits usize")
}

/// ORs the KVM dirty log with the VMM's bitmap. Either may be shorter (an empty vector
/// when that source is off); the result has the longer length and every bit set in
/// either input. Pure, so the property test can hammer it.
pub fn merge_dirty_bitmaps(kvm: &[u64], vmm: &[u64]) -> Vec<u64> {
    let len = kvm.len().max(vmm.len());
    (0..len)
        .map(|i| kvm.get(i).copied().unwrap_or(0) | vmm.get(i).copied().unwrap_or(0))
        .collect()
}

/// Page numbers of the set bits, ascending, limited to `pages` pages (bits past the
/// end of RAM in the last word are ignored).
pub fn dirty_page_list(bitmap: &[u64], pages: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            let page = w as u64 * 64 + bit;
            if page < pages {
                out.push(page);
            }
            bits &= bits - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set_bits(bitmap: &[u64]) -> std::collections::BTreeSet<u64> {
        dirty_page_list(bitmap, u64::MAX).into_iter().collect()
    }

    proptest! {
        /// Merging the KVM and VMM bitmaps never loses a dirty page and invents none.
        #[test]
        fn merge_never_loses_a_page(
            kvm in proptest::collection::vec(any::<u64>(), 0..64),
            vmm in proptest::collection::vec(any::<u64>(), 0..64),
        ) {
            let merged = merge_dirty_bitmaps(&kvm, &vmm);
            let m = set_bits(&merged);
            let k = set_bits(&kvm);
            let v = set_bits(&vmm);
            prop_assert!(k.is_subset(&m), "lost a KVM-dirty page");
            prop_assert!(v.is_subset(&m), "lost a VMM-dirty page");
            let union: std::collections::BTreeSet<u64> = k.union(&v).copied().collect();
            prop_assert_eq!(m, union);
        }

        /// The page list holds exactly the set bits below the RAM end, ascending.
        #[test]
        fn page_list_matches_bits(bitmap in proptest::collection::vec(any::<u64>(), 0..16), pages in 0u64..1100) {
            let list = dirty_page_list(&bitmap, pages);
            prop_assert!(list.windows(2).all(|w| w[0] < w[1]));
            for p in 0..pages.min(bitmap.len() as u64 * 64) {
                let set = bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1;
                prop_assert_eq!(set, list.binary_search(&p).is_ok());
            }
            prop_assert!(list.iter().all(|&p| p < pages));
        }
    }

    #[test]
    fn vmm_writes_are_tracked() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(2).expect("2 MiB maps");
        vmm_bitmap(&mem).reset();
        mem.write_slice(&[1, 2, 3], GuestAddress(5 * PAGE_SIZE + 10))
            .expect("in range");
        let bits = vmm_bitmap(&mem).get_and_reset();
        assert_eq!(dirty_page_list(&bits, 512), vec![5]);
        assert!(dirty_page_list(&vmm_bitmap(&mem).get_and_reset(), 512).is_empty());
    }

    #[test]
    fn dump_is_byte_for_byte_from_zero() {
        let mem = create_guest_memory(3).expect("3 MiB maps");
        load_image(&mem, 0, &[0xaa]).expect("fits");
        load_image(&mem, (1 << 20) + 17, b"hello").expect("fits");
        load_image(&mem, (3 << 20) - 1, &[0x55]).expect("fits");
        let mut out = Vec::new();
        dump(&mem, &mut out).expect("dumps");
        assert_eq!(out.len(), 3 << 20);
        assert_eq!(out[0], 0xaa);
        assert_eq!(&out[(1 << 20) + 17..(1 << 20) + 22], b"hello");
        assert_eq!(out[(3 << 20) - 1], 0x55);
        assert_eq!(out.iter().filter(|&&b| b != 0).count(), 7);
    }

    #[test]
    fn image_must_fit() {
        let mem = create_guest_memory(1).expect("1 MiB maps");
        assert!(load_image(&mem, 0x7c00, &[0x90; 512]).is_ok());
        assert!(load_image(&mem, (1 << 20) - 100, &[0x90; 512]).is_err());
        assert!(load_image(&mem, 0, &[]).is_err());
        assert!(create_guest_memory(0).is_err());
    }
}
