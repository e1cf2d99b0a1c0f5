//! Dirty page bitmaps as the contract defines them: page `p` is bit `p % 64` of word
//! `p / 64`. Pure helpers used by the sender to plan passes.

/// ORs `other` into `acc`, growing `acc` if needed. Used to merge the dirty set the
/// switchover decision was made on with the final one taken after pausing, and (by the
/// VMM) the KVM log with the VMM's own bitmap; a set bit is never cleared.
pub fn or_into(acc: &mut Vec<u64>, other: &[u64]) {
    if acc.len() < other.len() {
        acc.resize(other.len(), 0);
    }
    for (a, o) in acc.iter_mut().zip(other) {
        *a |= *o;
    }
}

/// A bitmap of `pages` pages from a list of page numbers, which is what
/// `MigrationSource::take_dirty_pages` returns in the VMM (numbers past the end are
/// ignored).
pub fn from_pages(list: &[u64], pages: u64) -> Vec<u64> {
    let mut v = vec![0u64; pages.div_ceil(64) as usize];
    for &p in list {
        if p < pages {
            v[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    v
}

/// Number of set bits among the first `pages` pages.
pub fn count(bitmap: &[u64], pages: u64) -> u64 {
    let mut n = 0u64;
    for (i, w) in bitmap.iter().enumerate() {
        let base = i as u64 * 64;
        if base >= pages {
            break;
        }
        let valid = pages - base;
        let w = if valid < 64 {
            w & ((1u64 << valid) - 1)
        } else {
            *w
        };
        n += u64::from(w.count_ones());
    }
    n
}

/// Whether page `p` is set.
pub fn is_set(bitmap: &[u64], p: u64) -> bool {
    bitmap
        .get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

/// A bitmap with every one of `pages` pages set (pass 0 sends everything).
pub fn all(pages: u64) -> Vec<u64> {
    let mut v = vec![u64::MAX; pages.div_ceil(64) as usize];
    if !pages.is_multiple_of(64)
        && let Some(last) = v.last_mut()
    {
        *last = (1u64 << (pages % 64)) - 1;
    }
    v
}

/// Indexes of the chunks (of `pages_per_chunk` pages) holding at least one set page.
pub fn dirty_chunks(bitmap: &[u64], pages: u64, pages_per_chunk: u64) -> Vec<u64> {
    let chunks = pages.div_ceil(pages_per_chunk);
    (0..chunks)
        .filter(|c| {
            let start = c * pages_per_chunk;
            let end = ((c + 1) * pages_per_chunk).min(pages);
            any_in(bitmap, start, end)
        })
        .collect()
}

/// Whether any page in `[start, end)` is set. Word-at-a-time when aligned.
pub fn any_in(bitmap: &[u64], start: u64, end: u64) -> bool {
    let mut p = start;
    while p < end {
        if p.is_multiple_of(64) && end - p >= 64 {
            if bitmap.get((p / 64) as usize).is_some_and(|w| *w != 0) {
                return true;
            }
            p += 64;
        } else {
            if is_set(bitmap, p) {
                return true;
            }
            p += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn all_sets_exactly_the_pages() {
        let b = all(130);
        assert_eq!(count(&b, 130), 130);
        assert!(is_set(&b, 129));
        assert!(!is_set(&b, 130));
        assert_eq!(all(128).len(), 2);
    }

    #[test]
    fn dirty_chunks_finds_chunks_with_set_pages() {
        let mut b = vec![0u64; 16];
        b[0] = 1 << 3; // page 3 -> chunk 0 (512 pages per chunk)
        b[10] = 1; // page 640 -> chunk 1
        assert_eq!(dirty_chunks(&b, 1024, 512), vec![0, 1]);
        b[0] = 0;
        assert_eq!(dirty_chunks(&b, 1024, 512), vec![1]);
        assert_eq!(dirty_chunks(&[0; 16], 1024, 512), Vec::<u64>::new());
    }

    proptest! {
        // The property Firecracker tests for its diff snapshots: merging the KVM log
        // and the VMM's bitmap never loses a dirty page.
        #[test]
        fn merging_bitmaps_never_loses_a_page(a in proptest::collection::vec(any::<u64>(), 0..32),
                                               b in proptest::collection::vec(any::<u64>(), 0..32)) {
            let mut m = a.clone();
            or_into(&mut m, &b);
            let pages = (m.len() * 64) as u64;
            for p in 0..pages {
                prop_assert_eq!(is_set(&m, p), is_set(&a, p) || is_set(&b, p));
            }
            prop_assert!(count(&m, pages) >= count(&a, pages).max(count(&b, pages)));
        }

        #[test]
        fn from_pages_sets_exactly_the_listed_pages(list in proptest::collection::vec(0u64..700, 0..100)) {
            let b = from_pages(&list, 640);
            for p in 0..640 {
                prop_assert_eq!(is_set(&b, p), list.contains(&p));
            }
            prop_assert_eq!(b.len(), 10);
        }

        #[test]
        fn dirty_chunks_matches_a_page_by_page_scan(words in proptest::collection::vec(any::<u64>().prop_map(|w| w & w.rotate_left(7) & w.rotate_left(19)), 1..20),
                                                    ppc in 1u64..200) {
            let pages = words.len() as u64 * 64 - 5;
            let expect: Vec<u64> = (0..pages.div_ceil(ppc))
                .filter(|c| (c * ppc..((c + 1) * ppc).min(pages)).any(|p| is_set(&words, p)))
                .collect();
            prop_assert_eq!(dirty_chunks(&words, pages, ppc), expect);
        }
    }
}
