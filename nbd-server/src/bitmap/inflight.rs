//! Changes in flight per region of an export: counted from before a change is
//! marked in the dirty bitmaps until it landed and mirror jobs were told.
//!
//! A mirror job's persistent bitmap is cleared as copies settle on the target
//! ("settled": copied, then flushed there). A change that was marked before such a
//! clear but has not landed yet would lose its bit: the settle clears first and then
//! checks [`InFlight::busy`], and restores the bit when a change is in flight there.
//! Both sides are sequentially consistent, so either the settle sees the count or
//! the change's mark comes after the clear (see `mirror::persist`).

use std::sync::atomic::{AtomicU32, Ordering};

/// Smallest counted region; larger exports use larger regions so that the counters
/// stay at most [`MAX_COUNTERS`].
const MIN_SHIFT: u32 = 22;
const MAX_COUNTERS: u64 = 1 << 16;

#[derive(Debug)]
pub struct InFlight {
    shift: u32,
    counts: Box<[AtomicU32]>,
}

impl InFlight {
    pub fn new(size: u64) -> Self {
        let mut shift = MIN_SHIFT;
        while size.div_ceil(1 << shift) > MAX_COUNTERS {
            shift += 1;
        }
        let n = size.div_ceil(1 << shift).max(1);
        Self {
            shift,
            counts: (0..n).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn regions(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let last = self.counts.len();
        if len == 0 {
            return 0..0;
        }
        let first = ((offset >> self.shift) as usize).min(last);
        let end = ((offset.saturating_add(len - 1) >> self.shift) as usize + 1).min(last);
        first..end
    }

    /// Counts a change of `[offset, offset+len)` until the guard is dropped.
    pub fn begin(&self, offset: u64, len: u64) -> Landing<'_> {
        let regions = self.regions(offset, len);
        for c in &self.counts[regions.clone()] {
            c.fetch_add(1, Ordering::SeqCst);
        }
        Landing {
            counts: &self.counts[regions],
        }
    }

    /// Whether a change touching `[offset, offset+len)` is in flight.
    pub fn busy(&self, offset: u64, len: u64) -> bool {
        self.counts[self.regions(offset, len)]
            .iter()
            .any(|c| c.load(Ordering::SeqCst) > 0)
    }
}

/// One change in flight (see [`InFlight::begin`]).
#[derive(Debug)]
#[must_use = "the change counts as in flight only while the guard lives"]
pub struct Landing<'a> {
    counts: &'a [AtomicU32],
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        for c in self.counts {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_while_the_guard_lives() {
        let f = InFlight::new(64 << 20);
        assert!(!f.busy(0, 64 << 20));
        let g = f.begin((4 << 20) - 1, 2);
        assert!(f.busy(0, 1) && f.busy(4 << 20, 1) && !f.busy(8 << 20, 1));
        let h = f.begin(5 << 20, 1);
        drop(g);
        assert!(!f.busy(0, 1) && f.busy(4 << 20, 1));
        drop(h);
        assert!(!f.busy(0, 64 << 20));
        // Out of range and empty ranges count nothing and never panic.
        let _e = f.begin(1 << 40, 10);
        let _z = f.begin(0, 0);
        assert!(!f.busy(0, 64 << 20));
    }

    #[test]
    fn huge_exports_use_bigger_regions() {
        let f = InFlight::new(1 << 50);
        assert!(f.counts.len() as u64 <= MAX_COUNTERS);
        let _g = f.begin((1 << 50) - 1, 1);
        assert!(f.busy((1 << 50) - 4096, 4096));
    }
}
