//! Where the source export holds data: the same SEEK_DATA/SEEK_HOLE walk (and the
//! same no-lseek answer for block devices and fully allocated files) that
//! BLOCK_STATUS's base:allocation uses, as data ranges.

use std::io;

use nbd_proto::consts::STATE_HOLE;

use crate::conn::{extents_without_lseek, seek_extents};
use crate::export::Export;

/// The allocated extents of `[lo, hi)` of the export, sorted and merged. May wait
/// on the inode lock: call it on a blocking thread.
pub fn allocated(export: &Export, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
    let hi = hi.min(export.size);
    if lo >= hi {
        return Ok(Vec::new());
    }
    let len = hi - lo;
    let extents = match extents_without_lseek(export, lo, len, usize::MAX, u64::MAX) {
        Some(e) => e,
        None => seek_extents(export, lo, len, usize::MAX, u64::MAX)?,
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = lo;
    for e in extents {
        if e.flags & STATE_HOLE == 0 {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == pos => last.1 += e.length,
                _ => out.push((pos, e.length)),
            }
        }
        pos += e.length;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportSpec;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_the_written_extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 32 << 20).unwrap();
        f.sync_all().unwrap();
        let e = Export::open(&ExportSpec {
            name: "s".into(),
            path: p,
            read_only: true,
            unleased: true,
            lease_reads: false,
            description: None,
        })
        .unwrap();
        let a = allocated(&e, 0, 64 << 20).unwrap();
        let total: u64 = a.iter().map(|x| x.1).sum();
        // File systems allocate in blocks (tmpfs in pages, some in larger units).
        assert!(((1 << 20) + 4096..8 << 20).contains(&total), "{a:?}");
        let covers = |x: u64| a.iter().any(|&(o, l)| x >= o && x < o + l);
        assert!(covers(8 << 20) && covers(32 << 20) && covers((33 << 20) - 1));
        assert!(!covers(0) && !covers(50 << 20));
        // A window.
        let w = allocated(&e, 16 << 20, 40 << 20).unwrap();
        assert!(w.iter().all(|&(o, l)| o >= 16 << 20 && o + l <= 40 << 20));
    }
}
