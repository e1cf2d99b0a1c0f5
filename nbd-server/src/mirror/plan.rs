//! The pass planner (pure): which requests one pass sends to the target, from the
//! dirty extents and the source's allocated extents.
//!
//! Every request is aligned to the tracker's granularity (`align`), except that the
//! last one may end at the end of the disk. That matters: a pass clears exactly the
//! range of a request before reading it, so two requests must never share a
//! granule, or clearing the second would also clear a write that landed in the part
//! the first had already read.

/// One request of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read from the source and write to the target (as WRITE_ZEROES when the bytes
    /// read are all zero).
    Copy { offset: u64, len: u64 },
    /// The source holds no data here: WRITE_ZEROES without reading.
    Zero { offset: u64, len: u64 },
}

impl Step {
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Step::Copy { offset, len } | Step::Zero { offset, len } => (offset, len),
        }
    }
}

/// Request sizes of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Granularity every request boundary keeps (a power of two).
    pub align: u64,
    /// Largest Copy (a multiple of `align`).
    pub max_copy: u64,
    /// Largest Zero (a multiple of `align`).
    pub max_zero: u64,
}

impl Limits {
    /// `align` rounded up to a power of two, the maxima to multiples of it.
    pub fn new(align: u64, max_copy: u64, max_zero: u64) -> Self {
        let align = align.max(1).next_power_of_two();
        let round = |m: u64| m.max(align) / align * align;
        Self {
            align,
            max_copy: round(max_copy),
            max_zero: round(max_zero),
        }
    }
}

/// Sorted, merged, non-empty extents clipped to `[0, size)` and widened to `align`
/// (the end clipped to `size` again).
pub fn normalize(extents: &[(u64, u64)], size: u64, align: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = extents
        .iter()
        .filter(|(o, l)| *l > 0 && *o < size)
        .map(|&(o, l)| {
            let start = o / align * align;
            let end = o.saturating_add(l).min(size);
            let end = end.div_ceil(align).saturating_mul(align).min(size);
            (start, end)
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// `a` minus `b` (both sorted and merged, as [`normalize`] returns them).
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(o, l) in a {
        let (mut s, e) = (o, o + l);
        while j < b.len() && b[j].0 + b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while s < e {
            match b.get(k) {
                Some(&(bo, bl)) if bo < e => {
                    if bo > s {
                        out.push((s, bo - s));
                    }
                    s = s.max(bo + bl);
                    k += 1;
                }
                _ => {
                    out.push((s, e - s));
                    break;
                }
            }
        }
    }
    out
}

/// The extents to mark dirty when a job starts: every allocated extent of the
/// source, and every hole the target does not already read as zeros.
pub fn seed(
    allocated: &[(u64, u64)],
    target_zero: &[(u64, u64)],
    size: u64,
    align: u64,
) -> Vec<(u64, u64)> {
    let allocated = normalize(allocated, size, align);
    let zero = normalize_inward(target_zero, size, align);
    // Holes of the source that the target already has as zeros need nothing.
    let skip = subtract(&zero, &allocated);
    normalize(&subtract(&[(0, size)], &skip), size, align)
}

/// Like [`normalize`] but narrowed to whole granules (for "known zero" ranges: a
/// granule is only skipped when all of it is known).
fn normalize_inward(extents: &[(u64, u64)], size: u64, align: u64) -> Vec<(u64, u64)> {
    let v: Vec<(u64, u64)> = extents
        .iter()
        .filter_map(|&(o, l)| {
            let end = o.saturating_add(l).min(size);
            let start = o.div_ceil(align).saturating_mul(align);
            // The disk's last, partial granule counts as whole when it reaches the end.
            let end = if end == size {
                end
            } else {
                end / align * align
            };
            (start < end).then_some((start, end - start))
        })
        .collect();
    normalize(&v, size, 1)
}

/// Plans one pass over `dirty` on a source of `size` bytes whose data lies in
/// `allocated` (the rest reads as zeros): Copy requests for data, Zero requests for
/// holes, each at most `max_copy` / `max_zero` long and aligned (see the module).
pub fn plan_pass(
    dirty: &[(u64, u64)],
    allocated: &[(u64, u64)],
    size: u64,
    lim: &Limits,
) -> Vec<Step> {
    let dirty = normalize(dirty, size, lim.align);
    // A granule with any data in it is copied whole.
    let data = normalize(allocated, size, lim.align);
    let mut steps = Vec::new();
    let mut j = 0;
    for &(o, l) in &dirty {
        let (mut s, e) = (o, o + l);
        while j < data.len() && data[j].0 + data[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while s < e {
            let (seg_end, is_data) = match data.get(k) {
                Some(&(d, _)) if d > s => (d.min(e), false),
                Some(&(d, dl)) if d <= s => {
                    k += 1;
                    ((d + dl).min(e), true)
                }
                _ => (e, false),
            };
            split(s, seg_end, is_data, lim, &mut steps);
            s = seg_end;
        }
    }
    steps
}

fn split(start: u64, end: u64, data: bool, lim: &Limits, out: &mut Vec<Step>) {
    let max = if data { lim.max_copy } else { lim.max_zero };
    let mut s = start;
    while s < end {
        let len = (end - s).min(max);
        out.push(if data {
            Step::Copy { offset: s, len }
        } else {
            Step::Zero { offset: s, len }
        });
        s += len;
    }
}

/// True when every byte is zero (such a block goes out as WRITE_ZEROES).
pub fn is_zero(buf: &[u8]) -> bool {
    // OR-folding fixed-size chunks lets the compiler use vector instructions.
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K64: u64 = 64 << 10;
    const M: u64 = 1 << 20;

    fn lim() -> Limits {
        Limits::new(K64, M, 64 * M)
    }

    #[test]
    fn data_is_copied_holes_are_zeroed_and_requests_split() {
        let size = 16 * M;
        // Dirty: the first 4 MiB. Data: 1 MiB at 512 KiB, plus 1 byte at 3 MiB + 10.
        let steps = plan_pass(&[(0, 4 * M)], &[(M / 2, M), (3 * M + 10, 1)], size, &lim());
        assert_eq!(
            steps,
            vec![
                Step::Zero {
                    offset: 0,
                    len: M / 2
                },
                Step::Copy {
                    offset: M / 2,
                    len: M
                },
                Step::Zero {
                    offset: 3 * M / 2,
                    len: 3 * M / 2
                },
                Step::Copy {
                    offset: 3 * M,
                    len: K64
                },
                Step::Zero {
                    offset: 3 * M + K64,
                    len: M - K64
                },
            ]
        );
        // A long data run is cut at max_copy.
        let steps = plan_pass(&[(0, 3 * M)], &[(0, size)], size, &lim());
        assert_eq!(steps.len(), 3);
        assert!(
            steps
                .iter()
                .all(|s| matches!(s, Step::Copy { len, .. } if *len == M))
        );
    }

    #[test]
    fn unaligned_dirty_is_widened_and_the_tail_ends_at_the_disk_end() {
        let size = 10 * K64 + 100;
        let steps = plan_pass(&[(K64 + 5, 10), (size - 1, 1)], &[(0, size)], size, &lim());
        assert_eq!(
            steps,
            vec![
                Step::Copy {
                    offset: K64,
                    len: K64
                },
                Step::Copy {
                    offset: 10 * K64,
                    len: 100
                },
            ]
        );
        // Beyond the end: nothing.
        assert!(plan_pass(&[(size, 5)], &[], size, &lim()).is_empty());
    }

    #[test]
    fn seed_skips_holes_the_target_reads_as_zero() {
        let size = 8 * M;
        // Source data in [1M, 2M); target: all zero but [5M, 6M).
        let s = seed(&[(M, M)], &[(0, 5 * M), (6 * M, 2 * M)], size, K64);
        assert_eq!(s, vec![(M, M), (5 * M, M)]);
        // Nothing known about the target: everything.
        assert_eq!(seed(&[(M, M)], &[], size, K64), vec![(0, size)]);
        // A target zero range that covers a granule only in part does not count.
        assert_eq!(seed(&[], &[(100, size - 100)], size, K64), vec![(0, K64)]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v[1..]));
    }

    fn extents(size: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0..size, 1..size / 4), 0..12)
    }

    fn covered(v: &[(u64, u64)], x: u64) -> bool {
        v.iter().any(|&(o, l)| x >= o && x < o + l)
    }

    proptest! {
        /// The pass covers exactly the dirty granules, once, in order, with every
        /// boundary aligned (but the disk's end), every request within its maximum,
        /// Zero only where the source has no data in the granule.
        #[test]
        fn plan_covers_dirty_exactly(
            size_g in 1u64..200,
            tail in 0u64..K64,
            dirty in extents(200 * K64),
            allocated in extents(200 * K64),
        ) {
            let size = size_g * K64 + tail;
            let lim = Limits::new(K64, 4 * K64, 16 * K64);
            let steps = plan_pass(&dirty, &allocated, size, &lim);
            let want = normalize(&dirty, size, K64);
            let data = normalize(&allocated, size, K64);
            let mut prev_end = 0;
            for s in &steps {
                let (o, l) = s.range();
                prop_assert!(l > 0);
                prop_assert!(o >= prev_end, "overlap or out of order: {steps:?}");
                prev_end = o + l;
                prop_assert_eq!(o % K64, 0);
                prop_assert!(o + l == size || (o + l) % K64 == 0);
                prop_assert!(o + l <= size);
                match s {
                    Step::Copy { .. } => prop_assert!(l <= lim.max_copy),
                    Step::Zero { .. } => {
                        prop_assert!(l <= lim.max_zero);
                        // No byte of source data in a Zero request.
                        for &(ao, al) in &allocated {
                            let (ae, e) = ((ao + al).min(size), o + l);
                            prop_assert!(ae <= o || ao >= e, "zeroing data {s:?} {ao}+{al}");
                        }
                    }
                }
            }
            // Same coverage as the dirty set, granule by granule.
            let mut g = 0;
            while g < size {
                let in_steps = steps.iter().any(|s| {
                    let (o, l) = s.range();
                    g >= o && g < o + l
                });
                prop_assert_eq!(in_steps, covered(&want, g), "granule {}", g);
                if in_steps {
                    let copy = steps.iter().any(|s| matches!(*s, Step::Copy { offset, len } if g >= offset && g < offset + len));
                    prop_assert_eq!(copy, covered(&data, g));
                }
                g += K64;
            }
        }

        #[test]
        fn subtract_is_set_difference(a in extents(4096), b in extents(4096)) {
            let a = normalize(&a, 4096, 1);
            let b = normalize(&b, 4096, 1);
            let d = subtract(&a, &b);
            for x in 0..4096 {
                prop_assert_eq!(covered(&d, x), covered(&a, x) && !covered(&b, x));
            }
        }

        /// Seeding never leaves out a granule that holds data or that the target
        /// does not wholly know as zero.
        #[test]
        fn seed_is_safe(alloc in extents(64 * 4096), zero in extents(64 * 4096)) {
            let size = 64 * 4096;
            let s = seed(&alloc, &zero, size, 4096);
            for g in (0..size).step_by(4096) {
                let has_data = alloc.iter().any(|&(o, l)| o < g + 4096 && o + l > g);
                let known_zero = (g..g + 4096).all(|x| covered(&zero, x));
                if has_data || !known_zero {
                    prop_assert!(covered(&s, g), "granule {g} left out");
                }
            }
        }
    }
}
