//! The pure core: a fixed-size bit array shared by threads without a lock.
//!
//! Bits are set from the write path (many connections at once) and cleared from the
//! control API or a mirror job; every operation is a word-wide atomic, so a set and a
//! clear racing on one word never lose each other's other bits.

use std::sync::atomic::{AtomicU64, Ordering};

/// `len` bits, all clear at first.
#[derive(Debug)]
pub struct Bits {
    words: Vec<AtomicU64>,
    len: u64,
}

/// The mask of bits `[lo, hi)` of one word (`lo < hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Bits {
    pub fn new(len: u64) -> Self {
        let n = len.div_ceil(64) as usize;
        Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Applies `f(word index, mask)` to every word touched by bits `[start, end)`,
    /// clipped to the array.
    fn for_words(&self, start: u64, end: u64, mut f: impl FnMut(usize, u64)) {
        let end = end.min(self.len);
        let mut b = start;
        while b < end {
            let w = b / 64;
            let lo = b % 64;
            let hi = (end - w * 64).min(64);
            f(w as usize, mask(lo, hi));
            b = w * 64 + hi;
        }
    }

    /// Sets bits `[start, end)`.
    pub fn set(&self, start: u64, end: u64) {
        self.for_words(start, end, |w, m| {
            // Most writes hit bits already set: a load is cheaper than a locked RMW.
            if self.words[w].load(Ordering::Relaxed) & m != m {
                self.words[w].fetch_or(m, Ordering::SeqCst);
            }
        });
    }

    /// Clears bits `[start, end)`.
    pub fn clear(&self, start: u64, end: u64) {
        self.for_words(start, end, |w, m| {
            self.words[w].fetch_and(!m, Ordering::SeqCst);
        });
    }

    /// Clears bits `[start, end)` and returns the bits of that range that were set
    /// just before, as `(word index, bits)`.
    pub fn clear_fetch(&self, start: u64, end: u64) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        self.for_words(start, end, |w, m| {
            let prev = self.words[w].fetch_and(!m, Ordering::SeqCst) & m;
            if prev != 0 {
                out.push((w, prev));
            }
        });
        out
    }

    pub fn get(&self, bit: u64) -> bool {
        bit < self.len
            && self.words[(bit / 64) as usize].load(Ordering::SeqCst) >> (bit % 64) & 1 == 1
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The first bit at or after `from` and before `limit` whose value differs from
    /// `value`; `limit` when there is none.
    pub fn next_change(&self, from: u64, limit: u64, value: bool) -> u64 {
        let limit = limit.min(self.len);
        let mut b = from;
        while b < limit {
            let w = (b / 64) as usize;
            let mut word = self.words[w].load(Ordering::SeqCst);
            if value {
                word = !word;
            }
            // Bits below `b` in this word do not count.
            word &= !((1u64 << (b % 64)) - 1);
            if word != 0 {
                let found = (w as u64) * 64 + u64::from(word.trailing_zeros());
                return found.min(limit);
            }
            b = (w as u64 + 1) * 64;
        }
        limit
    }

    /// Runs of set bits as `(first bit, count)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut b = 0;
        while b < self.len {
            let start = self.next_change(b, self.len, false);
            if start >= self.len {
                break;
            }
            let end = self.next_change(start, self.len, true);
            out.push((start, end - start));
            b = end;
        }
        out
    }

    /// Word `i` as stored in the bitmap file (little-endian).
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::SeqCst)
    }

    /// Sets word `i` from the bitmap file (ORs: bits already set in memory stay).
    pub fn or_word(&self, i: usize, v: u64) {
        if let Some(w) = self.words.get(i) {
            w.fetch_or(v, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_and_runs() {
        let b = Bits::new(200);
        b.set(3, 70);
        b.set(150, 300);
        assert_eq!(b.runs(), vec![(3, 67), (150, 50)]);
        assert_eq!(b.count(), 67 + 50);
        b.clear(10, 160);
        assert_eq!(b.runs(), vec![(3, 7), (160, 40)]);
        assert!(b.get(199) && !b.get(200) && !b.get(10));
        assert_eq!(b.next_change(0, 200, false), 3);
        assert_eq!(b.next_change(3, 200, true), 10);
        assert_eq!(b.next_change(10, 100, false), 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
    }

    fn op(len: u64) -> impl Strategy<Value = Op> {
        (0..len + 10, 0..len + 10, any::<bool>()).prop_map(|(a, b, set)| {
            let (lo, hi) = (a.min(b), a.max(b));
            if set {
                Op::Set(lo, hi)
            } else {
                Op::Clear(lo, hi)
            }
        })
    }

    proptest! {
        /// Against a Vec<bool> model: every operation, every query.
        #[test]
        fn matches_a_model(len in 1u64..400, ops in prop::collection::vec(op(400), 0..40)) {
            let b = Bits::new(len);
            let mut model = vec![false; len as usize];
            for o in &ops {
                let (lo, hi, v) = match *o {
                    Op::Set(lo, hi) => { b.set(lo, hi); (lo, hi, true) }
                    Op::Clear(lo, hi) => { b.clear(lo, hi); (lo, hi, false) }
                };
                for i in lo..hi.min(len) {
                    model[i as usize] = v;
                }
            }
            for i in 0..len {
                prop_assert_eq!(b.get(i), model[i as usize]);
            }
            prop_assert_eq!(b.count(), model.iter().filter(|x| **x).count() as u64);
            let mut runs = Vec::new();
            let mut i = 0;
            while i < len as usize {
                if model[i] {
                    let s = i;
                    while i < len as usize && model[i] { i += 1; }
                    runs.push((s as u64, (i - s) as u64));
                } else {
                    i += 1;
                }
            }
            prop_assert_eq!(b.runs(), runs);
        }
    }
}
