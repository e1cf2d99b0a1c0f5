//! Where the source export holds data: SEEK_DATA/SEEK_HOLE on a file, everything
//! on a block device (or a file with every block allocated).

use std::io;
use std::os::fd::AsRawFd;

use crate::export::{Backing, Export};

/// The allocated extents of `[lo, hi)` of the export, sorted and merged. May wait
/// on the inode lock: call it on a blocking thread.
pub fn allocated(export: &Export, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
    let hi = hi.min(export.size);
    if lo >= hi {
        return Ok(Vec::new());
    }
    if export.backing != Backing::File || fully_allocated(export) {
        return Ok(vec![(lo, hi - lo)]);
    }
    let fd = export.file.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = lo;
    while pos < hi {
        // SAFETY: plain syscall on a descriptor kept open by `export.file`.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                // No data at or after pos.
                Some(libc::ENXIO) => Ok(out),
                // No SEEK_DATA here: all of it may be data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    out.push((pos, hi - pos));
                    Ok(out)
                }
                _ => Err(io::Error::last_os_error()),
            };
        }
        let data = data as u64;
        if data >= hi {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            hi
        } else {
            (hole as u64).clamp(data + 1, hi)
        };
        out.push((data, end - data));
        pos = end;
    }
    Ok(out)
}

fn fully_allocated(export: &Export) -> bool {
    match export.file.metadata() {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            m.blocks().saturating_mul(512) >= m.len()
        }
        Err(_) => false,
    }
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
