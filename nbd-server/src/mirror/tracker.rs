//! An in-memory [`DirtyTracker`]: one bit per granule. It forgets everything when
//! the node restarts; the persistent dirty bitmap replaces it for jobs that must
//! survive one.

use std::sync::Mutex;

use super::DirtyTracker;

/// One bit per `granularity` bytes of a disk of `size` bytes.
#[derive(Debug)]
pub struct MemTracker {
    granularity: u64,
    size: u64,
    bits: Mutex<Vec<u64>>,
}

impl MemTracker {
    /// `granularity` is rounded up to a power of two (at least 512).
    pub fn new(size: u64, granularity: u64) -> Self {
        let granularity = granularity.max(512).next_power_of_two();
        let granules = size.div_ceil(granularity);
        Self {
            granularity,
            size,
            bits: Mutex::new(vec![0; granules.div_ceil(64) as usize]),
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Whether a granule `[offset, offset+len)` touches is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return false;
        }
        let bits = self.lock();
        (offset / self.granularity..end.div_ceil(self.granularity))
            .any(|g| bits[(g / 64) as usize] & (1 << (g % 64)) != 0)
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // A panic while holding the lock cannot leave the bits inconsistent (every
        // update is one word at a time); keep going with them.
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn set(bits: &mut [u64], g: u64, on: bool) {
    let (w, b) = ((g / 64) as usize, g % 64);
    if on {
        bits[w] |= 1 << b;
    } else {
        bits[w] &= !(1 << b);
    }
}

impl DirtyTracker for MemTracker {
    fn dirty_extents(&self) -> Vec<(u64, u64)> {
        let bits = self.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in bits.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for b in 0..64 {
                if word & (1 << b) == 0 {
                    continue;
                }
                let g = w as u64 * 64 + b;
                let start = g * self.granularity;
                let end = (start + self.granularity).min(self.size);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += end - start,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }

    fn dirty_bytes(&self) -> u64 {
        self.dirty_extents().iter().map(|e| e.1).sum()
    }

    /// Clears only granules the range covers whole (the disk's last, short granule
    /// counts as whole when the range reaches the end): a granule copied in part
    /// stays dirty.
    fn clear_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return Ok(());
        }
        let first = offset.div_ceil(self.granularity);
        let last = if end == self.size {
            self.granules()
        } else {
            end / self.granularity
        };
        let mut bits = self.lock();
        for g in first..last {
            set(&mut bits, g, false);
        }
        Ok(())
    }

    fn mark(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return;
        }
        let mut bits = self.lock();
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            set(&mut bits, g, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_widen_and_clears_narrow() {
        let t = MemTracker::new(10 * 4096 + 100, 4096);
        t.mark(4097, 10);
        t.mark(8192, 4096);
        assert_eq!(t.dirty_extents(), vec![(4096, 8192)]);
        // A partial clear leaves the granule dirty.
        t.clear_range(4096, 4095).unwrap();
        assert_eq!(t.dirty_bytes(), 8192);
        t.clear_range(4096, 4096).unwrap();
        assert_eq!(t.dirty_extents(), vec![(8192, 4096)]);
        // The short last granule.
        t.mark(10 * 4096 + 99, 50);
        assert_eq!(t.dirty_extents(), vec![(8192, 4096), (40960, 100)]);
        t.clear_range(40960, 100).unwrap();
        t.clear_range(0, u64::MAX).unwrap();
        assert_eq!(t.dirty_bytes(), 0);
        // Beyond the end: nothing.
        t.mark(1 << 40, 5);
        assert!(t.dirty_extents().is_empty());
    }

    proptest! {
        /// Against a byte model: every marked byte is reported dirty until a clear
        /// covering its whole granule.
        #[test]
        fn never_loses_a_mark(ops in prop::collection::vec((any::<bool>(), 0u64..20_000, 1u64..5_000), 1..30)) {
            let size = 16_000;
            let g = 1024;
            let t = MemTracker::new(size, g);
            let mut model = vec![false; size as usize];
            for (mark, off, len) in ops {
                if mark {
                    t.mark(off, len);
                    for x in off..(off + len).min(size) {
                        model[x as usize] = true;
                    }
                } else {
                    t.clear_range(off, len).unwrap();
                    let end = (off + len).min(size);
                    let mut s = off.div_ceil(g) * g;
                    while s < end {
                        let ge = (s + g).min(size);
                        if ge <= end {
                            for x in s..ge {
                                model[x as usize] = false;
                            }
                        }
                        s += g;
                    }
                }
                let ext = t.dirty_extents();
                for (x, &dirty) in model.iter().enumerate() {
                    if dirty {
                        let x = x as u64;
                        prop_assert!(ext.iter().any(|&(o, l)| x >= o && x < o + l), "byte {x} lost");
                    }
                }
            }
        }
    }
}
