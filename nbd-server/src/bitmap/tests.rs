use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

#[test]
fn marks_round_out_and_clears_round_in() {
    let b = DirtyBitmap::in_memory("b", 64 << 10, 10 * MIB + 4096).unwrap();
    assert_eq!(b.granularity(), 64 << 10);
    b.mark(100, 1);
    b.mark((64 << 10) - 1, 2);
    assert_eq!(b.dirty_extents(), vec![(0, 128 << 10)]);
    b.mark(10 * MIB, 1);
    // The last granule is cut at the export's end.
    assert_eq!(b.dirty_extents()[1], (10 * MIB, 4096));
    assert_eq!(b.dirty_bytes(), (128 << 10) + 4096);
    // Clearing part of a granule leaves it dirty; the tail granule clears when the
    // range reaches the end.
    b.clear_range(0, 100 << 10).unwrap();
    assert_eq!(
        b.dirty_extents(),
        vec![(64 << 10, 64 << 10), (10 * MIB, 4096)]
    );
    b.clear_range(10 * MIB, 4096).unwrap();
    assert_eq!(b.dirty_extents(), vec![(64 << 10, 64 << 10)]);
    assert!(b.clear_range(10 * MIB, 8192).is_err());
    let st = b.status(0, MIB, 100, u64::MAX);
    assert_eq!(
        st,
        vec![
            (64 << 10, false),
            (64 << 10, true),
            (MIB - (128 << 10), false)
        ]
    );
    assert_eq!(b.status(0, MIB, 1, u64::MAX).len(), 1);
    assert_eq!(b.status(4096, 8192, 10, u64::MAX), vec![(8192, false)]);
}

#[test]
fn names_and_granularities_are_checked() {
    assert!(DirtyBitmap::in_memory("a/b", 65536, MIB).is_err());
    assert!(DirtyBitmap::in_memory("", 65536, MIB).is_err());
    assert!(DirtyBitmap::in_memory("ok", 65535, MIB).is_err());
    assert!(DirtyBitmap::in_memory("ok", 2048, MIB).is_err());
    assert!(DirtyBitmap::in_memory("ok", 4096, MIB).is_ok());
}

#[test]
fn merge_sets_the_union() {
    let a = DirtyBitmap::in_memory("a", 4096, 8 * MIB).unwrap();
    let b = DirtyBitmap::in_memory("b", 1 << 20, 8 * MIB).unwrap();
    a.mark(3 * MIB + 8192, 4096);
    b.mark(0, 1);
    b.merge_from(&a).unwrap();
    assert_eq!(b.dirty_extents(), vec![(0, MIB), (3 * MIB, MIB)]);
}

#[test]
fn set_persists_creates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let set = BitmapSet::open(dir.path(), 64 * MIB, 8).unwrap();
    assert!(set.is_empty());
    let b = set.create("one", 65536).unwrap();
    assert!(matches!(
        set.create("one", 65536),
        Err(BitmapError::Exists(_))
    ));
    set.create("two", 4096).unwrap();
    assert_eq!(set.names(), ["one", "two"]);
    assert!(set.mark_durable(5 * MIB, 10).is_ok());
    assert!(set.mark_fast(5 * MIB + 4096, 10));
    assert_eq!(b.dirty_extents(), vec![(5 * MIB, 65536)]);
    drop(b);
    drop(set);
    let set = BitmapSet::open(dir.path(), 64 * MIB, 8).unwrap();
    assert_eq!(set.names(), ["one", "two"]);
    let b = set.get("one").unwrap();
    // The region (4 MiB) was hot and never checkpointed: dirty as a whole.
    assert_eq!(b.dirty_extents(), vec![(4 * MIB, 4 * MIB)]);
    // Recovery checkpointed: a clear now is remembered.
    b.clear_all().unwrap();
    drop(b);
    set.checkpoint();
    drop(set);
    let set = BitmapSet::open(dir.path(), 64 * MIB, 8).unwrap();
    assert_eq!(set.get("one").unwrap().dirty_bytes(), 0);
    set.remove("one").unwrap();
    assert!(matches!(set.remove("one"), Err(BitmapError::NotFound(_))));
    drop(set);
    let set = BitmapSet::open(dir.path(), 64 * MIB, 8).unwrap();
    assert_eq!(set.names(), ["two"]);
}

#[test]
fn a_torn_activity_log_slot_falls_back_to_the_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitmap");
    let b = DirtyBitmap::create(&path, "t", 65536, 64 * MIB, 8).unwrap();
    b.try_mark(0, 1).unwrap(); // AL seq 1 (slot 1): [0]
    b.try_mark(9 * MIB, 1).unwrap(); // AL seq 2 (slot 0): [0, 2]
    drop(b);
    // Tear slot 0 (the newest): the older AL [0] wins; region 2's write was never
    // issued in that case, so losing it is right.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 25] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let b = DirtyBitmap::open(&path, "t", 64 * MIB, 8).unwrap();
    assert_eq!(b.dirty_extents(), vec![(0, 4 * MIB)]);
}

#[test]
fn a_resized_export_is_dirty_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.bitmap");
    drop(DirtyBitmap::create(&path, "r", 65536, 8 * MIB, 8).unwrap());
    let b = DirtyBitmap::open(&path, "r", 16 * MIB, 8).unwrap();
    assert_eq!(b.dirty_bytes(), 16 * MIB);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Whatever the writes, clears and expiries, a "crash" (the bitmap dropped
    /// without a checkpoint, as kill -9 leaves it) loses no bit set since the last
    /// clear, and over-reports at most the AL's regions.
    #[test]
    fn a_crash_loses_no_bit(
        ops in prop::collection::vec((0u64..256 * MIB, 1u64..(2 * MIB), any::<u8>()), 1..120),
        capacity in 1usize..12,
    ) {
        let size = 256 * MIB;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.bitmap");
        let b = DirtyBitmap::create(&path, "p", 65536, size, capacity).unwrap();
        let model = DirtyBitmap::in_memory("m", 65536, size).unwrap();
        for (off, len, kind) in &ops {
            let len = (*len).min(size - off);
            if kind % 8 == 0 {
                b.clear_range(*off, len).unwrap();
                model.clear_range(*off, len).unwrap();
            } else {
                b.try_mark(*off, len).unwrap();
                model.mark(*off, len);
            }
            prop_assert!(b.hot_regions() <= capacity.max(1));
        }
        prop_assert_eq!(b.dirty_extents(), model.dirty_extents());
        drop(b);
        let r = DirtyBitmap::open(&path, "p", size, capacity).unwrap();
        for (off, len) in model.dirty_extents() {
            prop_assert_eq!(r.status(off, len, 10, u64::MAX), vec![(len, true)]);
        }
        prop_assert!(r.dirty_bytes() <= model.dirty_bytes() + capacity as u64 * REGION);
    }
}

/// Writers on several threads racing with expiries (an AL of 2 regions, so nearly
/// every mark expires something): after a "crash" no acknowledged mark is lost.
#[test]
fn concurrent_marks_and_expiries_lose_no_bit() {
    let size = 512 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.bitmap");
    let b = Arc::new(DirtyBitmap::create(&path, "c", 4096, size, 2).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let mut seed = t + 1;
                let mut done = Vec::new();
                for _ in 0..150 {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    // Mostly a few hot regions, sometimes anywhere.
                    let off = if seed >> 60 < 12 {
                        (seed >> 20) % (12 * MIB)
                    } else {
                        (seed >> 20) % (size - 8192)
                    };
                    b.try_mark(off, 4096).unwrap();
                    done.push(off);
                }
                done
            })
        })
        .collect();
    let done: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    drop(b);
    let r = DirtyBitmap::open(&path, "c", size, 2).unwrap();
    for off in done {
        assert!(r.status(off, 4096, 4, u64::MAX)[0].1, "{off} lost");
    }
}

/// A change marked before a clear that lands after it stays marked; one that
/// landed before it does not; bits clear before the clear are not invented.
#[test]
fn a_clear_keeps_the_bits_of_changes_in_flight() {
    let size = 16 * MIB;
    let b = DirtyBitmap::in_memory("b", 64 << 10, size).unwrap();
    let inflight = InFlight::new(size);
    // A landed change at 0; a change in flight at 5 MiB (counted, then marked).
    b.mark(0, 4096);
    let landing = inflight.begin(5 * MIB, 4096);
    b.mark(5 * MIB, 4096);
    b.clear_range_keeping(0, size, &|o, l| inflight.busy(o, l))
        .unwrap();
    assert_eq!(b.dirty_extents(), vec![(5 * MIB, 64 << 10)]);
    // Landed: the next clear takes it.
    drop(landing);
    b.clear_range_keeping(0, size, &|o, l| inflight.busy(o, l))
        .unwrap();
    assert!(b.dirty_extents().is_empty());
    // A busy region keeps only what was set.
    let _l = inflight.begin(MIB, 1);
    b.clear_range_keeping(0, size, &|o, l| inflight.busy(o, l))
        .unwrap();
    assert!(b.dirty_extents().is_empty());
}
