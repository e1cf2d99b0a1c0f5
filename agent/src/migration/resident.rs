//! Which pages of anonymous guest memory were ever populated, from
//! `/proc/self/pagemap`. A page of a private anonymous mapping that is neither present
//! nor swapped has never been written: it reads as zero. Pass 0 (source) and the
//! initial scan (target) skip such chunks instead of faulting in a gigabyte of zero
//! pages just to find it is zero.

use std::fs::File;
use std::os::unix::fs::FileExt;

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
    bitmap::AtomicBitmap,
};

use crate::contract::PAGE_SIZE;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// A page bitmap (contract layout) of the pages that may hold data, or `None` when it
/// cannot be known (file-backed memory, several regions, pagemap unreadable); callers
/// then read every page.
pub fn populated(mem: &GuestMemoryMmap<AtomicBitmap>) -> Option<Vec<u64>> {
    let mut regions = mem.iter();
    let r = regions.next()?;
    if regions.next().is_some() || r.start_addr().0 != 0 || r.file_offset().is_some() {
        return None;
    }
    let host = mem.get_host_address(vm_memory::GuestAddress(0)).ok()? as u64;
    let pages = r.len() / PAGE_SIZE;
    let f = File::open("/proc/self/pagemap").ok()?;
    let mut out = vec![0u64; pages.div_ceil(64) as usize];
    let mut buf = vec![0u8; 8 * 8192];
    let mut p = 0u64;
    while p < pages {
        let n = (pages - p).min(8192);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (host / PAGE_SIZE + p) * 8).ok()?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(e);
            let v = u64::from_le_bytes(a);
            if v & (PRESENT | SWAPPED) != 0 {
                let page = p + i as u64;
                out[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        p += n;
    }
    Some(out)
}

/// Faults in `len` bytes of guest RAM at `gpa` for writing with one
/// `MADV_POPULATE_WRITE` call (Linux 5.14+). The target calls it before it writes a run
/// of pages it has never written: a fresh anonymous page otherwise costs a page fault
/// each, which were a quarter of the receiver's time. Advice only: on an older kernel,
/// or for a range outside RAM, nothing happens and the writes fault as usual.
pub fn populate_write(mem: &GuestMemoryMmap<AtomicBitmap>, gpa: u64, len: u64) {
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    if len == 0 || UNSUPPORTED.load(Ordering::Relaxed) {
        return;
    }
    let Some(r) = mem.find_region(GuestAddress(gpa)) else {
        return;
    };
    let off = gpa - r.start_addr().0;
    let (Some(end), Ok(ulen)) = (off.checked_add(len), usize::try_from(len)) else {
        return;
    };
    if end > r.len() {
        return;
    }
    let Ok(host) = r.get_host_address(MemoryRegionAddress(off)) else {
        return;
    };
    // SAFETY: `host..host+len` lies inside one mapped guest RAM region owned by `mem`
    // (checked above); MADV_POPULATE_WRITE only faults those pages in (as a write of
    // their current contents would), it never changes their contents.
    let rc = unsafe { libc::madvise(host.cast(), ulen, libc::MADV_POPULATE_WRITE) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        tracing::debug!(error = %e, "MADV_POPULATE_WRITE on guest RAM refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn written_pages_are_populated_and_untouched_ones_are_not() {
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mmap");
        mem.write_obj(1u8, GuestAddress(5 * PAGE_SIZE))
            .expect("in range");
        mem.write_obj(1u8, GuestAddress((40 << 20) + 7))
            .expect("in range");
        let Some(b) = populated(&mem) else {
            {
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "SKIPPED: /proc/self/pagemap missing");
            };
            return;
        };
        assert!(super::super::bitmap::is_set(&b, 5));
        assert!(super::super::bitmap::is_set(&b, (40 << 20) / PAGE_SIZE));
        // Transparent huge pages may populate neighbours, but not the far end.
        assert!(!super::super::bitmap::is_set(&b, (63 << 20) / PAGE_SIZE));
    }
}
