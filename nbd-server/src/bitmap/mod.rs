//! Dirty bitmaps: per export, named, one bit per `granularity` bytes, set by every
//! write-like request (WRITE, WRITE_ZEROES, TRIM) before it is acknowledged, read by
//! the control API, by NBD clients (meta context `qemu:dirty-bitmap:NAME`) and by
//! mirror jobs.
//!
//! # Crash safety: the activity log
//!
//! A dirty bit must never be lost, even to kill -9 or a power cut, and a crash must
//! not force a full resync. Making the bit durable on every write would cost an
//! fdatasync per write; instead (as DRBD does) the disk is cut into regions of
//! [`REGION`] bytes, and a small set of "hot" regions is recorded durably in an
//! activity log (AL) in the bitmap's file. A write into a hot region only sets bits
//! in memory; the first write into a region that is not hot waits until the region
//! is added to the AL and the AL is on disk (fdatasync) before the data write is even
//! issued. After a crash every region in the AL is marked dirty as a whole: bits may
//! be over-reported (at most AL capacity x region size), never under-reported.
//!
//! When the AL is full, regions expire lazily (CLOCK: a region hit since the last
//! sweep gets a second chance): their bits are written to the bitmap file and
//! fdatasync'ed, and only then is the AL rewritten without them. The invariant: every
//! bit set in memory is either in a region of the durable AL or in the durable bitmap
//! file. A region is marked cold in memory before its bits are snapshotted, so a
//! write racing with the expiry either lands in the snapshot or takes the slow path
//! and puts the region back into the AL.
//!
//! The file: a 4 KiB header, two AL slots written alternately (a torn slot fails its
//! hash and the other, older one wins; it can only miss a region whose write was not
//! yet issued), then the bits as little-endian u64 words. Created full size (zeros
//! written), so fdatasync never flushes file-system metadata.

mod bits;
mod file;
pub mod inflight;

pub use inflight::{InFlight, Landing};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub use bits::Bits;
use file::BitmapFile;

/// Bytes per region of the activity log (DRBD's extent size).
pub const REGION: u64 = 4 << 20;
/// Default granularity of a new bitmap.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Smallest granularity.
pub const MIN_GRANULARITY: u64 = 4096;
/// Largest granularity (one bit per GiB).
pub const MAX_GRANULARITY: u64 = 1 << 30;
/// Default number of hot regions (x 4 MiB = at most 1 GiB over-reported after a crash).
pub const DEFAULT_AL_REGIONS: usize = 256;
/// Largest AL a node may configure.
pub const MAX_AL_REGIONS: usize = 65536;

/// Why a bitmap operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap {0:?} already exists")]
    Exists(String),
    #[error("no bitmap named {0:?}")]
    NotFound(String),
    #[error("bad bitmap name {0:?}: use 1 to 255 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("bad granularity {0}: a power of two from 4096 to 1 GiB")]
    BadGranularity(u64),
    #[error("range {offset}+{length} is beyond the end of the export")]
    BadRange { offset: u64, length: u64 },
    #[error("bitmap file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bitmap file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Checks a bitmap name: it is a file name and part of a meta context name.
pub fn validate_name(name: &str) -> Result<(), BitmapError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BitmapError::BadName(name.into()))
    }
}

pub fn validate_granularity(g: u64) -> Result<(), BitmapError> {
    if g.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
        Ok(())
    } else {
        Err(BitmapError::BadGranularity(g))
    }
}

/// Region states, per region, read lock-free by the write path.
const COLD: u8 = 0;
/// In the durable AL, not written to since the last CLOCK sweep.
const HOT: u8 = 1;
/// In the durable AL and written to since the last sweep.
const HOT_REFERENCED: u8 = 2;

/// One named dirty bitmap of one export. Shared (Arc) by the write path, the control
/// API, the NBD meta-context reader and mirror jobs.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    /// log2(granularity).
    gshift: u32,
    size: u64,
    bits: Bits,
    /// log2 of the AL region size (at least the granularity).
    rshift: u32,
    /// Per region: COLD, HOT or HOT_REFERENCED. Empty without persistence.
    regions: Vec<AtomicU8>,
    persist: Option<Mutex<Persist>>,
    /// Cold regions writers are waiting to have logged (see [`DirtyBitmap::try_mark`]).
    pending: Mutex<Vec<u32>>,
}

/// Most regions one AL update takes from other writers' queue.
const GROUP_MAX: usize = 256;

fn lock_pending(m: &Mutex<Vec<u32>>) -> MutexGuard<'_, Vec<u32>> {
    // A plain list of hints: any state it is left in is valid.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The durable side, behind one lock: every AL update and every write of bits.
#[derive(Debug)]
struct Persist {
    file: BitmapFile,
    /// The regions of the durable AL, in CLOCK order.
    al: Vec<u32>,
    hand: usize,
    capacity: usize,
}

impl DirtyBitmap {
    /// `bm` kept in `file`, with an empty activity log of `capacity` regions, every
    /// region cold.
    fn persisted(self, file: BitmapFile, capacity: usize) -> Self {
        Self {
            persist: Some(Mutex::new(Persist {
                file,
                al: Vec::new(),
                hand: 0,
                capacity,
            })),
            regions: (0..self.size.div_ceil(1u64 << self.rshift))
                .map(|_| AtomicU8::new(COLD))
                .collect(),
            ..self
        }
    }

    fn build(name: &str, granularity: u64, size: u64, persist: Option<Persist>) -> Self {
        let gshift = granularity.trailing_zeros();
        let rshift = REGION.max(granularity).trailing_zeros();
        let nregions = if persist.is_some() {
            size.div_ceil(1u64 << rshift) as usize
        } else {
            0
        };
        Self {
            name: name.to_owned(),
            granularity,
            gshift,
            size,
            bits: Bits::new(size.div_ceil(granularity)),
            rshift,
            regions: (0..nregions).map(|_| AtomicU8::new(COLD)).collect(),
            persist: persist.map(Mutex::new),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// A bitmap kept in memory only (a node without `--data-dir`).
    pub fn in_memory(name: &str, granularity: u64, size: u64) -> Result<Self, BitmapError> {
        validate_name(name)?;
        validate_granularity(granularity)?;
        Ok(Self::build(name, granularity, size, None))
    }

    /// Creates a new bitmap file at `path` (all clean).
    pub fn create(
        path: &Path,
        name: &str,
        granularity: u64,
        size: u64,
        capacity: usize,
    ) -> Result<Self, BitmapError> {
        validate_name(name)?;
        validate_granularity(granularity)?;
        let capacity = capacity.clamp(1, MAX_AL_REGIONS);
        let bm = Self::build(name, granularity, size, None);
        let file = BitmapFile::create(path, granularity, size, capacity, bm.bits.words())?;
        Ok(bm.persisted(file, capacity))
    }

    /// Opens the bitmap file at `path`: its bits, plus every region of its activity
    /// log marked dirty as a whole (those regions may have been written to without
    /// the bits reaching the file). A file made for another export size counts as
    /// dirty everywhere. The recovered state is then checkpointed (bits written, AL
    /// emptied), so a second crash recovers the same.
    pub fn open(path: &Path, name: &str, size: u64, capacity: usize) -> Result<Self, BitmapError> {
        validate_name(name)?;
        let (file, loaded) = BitmapFile::open(path)?;
        validate_granularity(loaded.granularity).map_err(|_| BitmapError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("granularity {}", loaded.granularity),
        })?;
        let capacity = capacity.clamp(1, file.al_capacity());
        let bm = Self::build(name, loaded.granularity, size, None);
        if loaded.size == size {
            for (i, w) in loaded.words.iter().enumerate() {
                bm.bits.or_word(i, *w);
            }
            let region = 1u64 << bm.rshift;
            for r in &loaded.al {
                let start = u64::from(*r) * region;
                bm.mark_bits(start, region);
            }
            if !loaded.al.is_empty() {
                tracing::info!(
                    bitmap = name,
                    regions = loaded.al.len(),
                    "bitmap recovered from its activity log"
                );
            }
        } else {
            tracing::warn!(
                bitmap = name,
                was = loaded.size,
                now = size,
                "export size changed: bitmap marked dirty everywhere"
            );
            bm.bits.set(0, bm.bits.len());
        }
        let file = if loaded.size == size {
            file
        } else {
            drop(file);
            BitmapFile::create(path, loaded.granularity, size, capacity, bm.bits.words())?
        };
        let out = bm.persisted(file, capacity);
        out.checkpoint()?;
        Ok(out)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the export the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_persistent(&self) -> bool {
        self.persist.is_some()
    }

    /// Sets the bits of `[offset, offset+len)`, rounded out to the granularity.
    fn mark_bits(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        self.bits
            .set(offset >> self.gshift, ((end - 1) >> self.gshift) + 1);
    }

    /// The AL regions `[offset, offset+len)` touches.
    fn region_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset >= self.size {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.size);
        (offset >> self.rshift) as usize..(((end - 1) >> self.rshift) + 1) as usize
    }

    /// Whether region `r` is in the durable AL; marks it referenced for CLOCK.
    fn touch(&self, r: usize) -> bool {
        let state = &self.regions[r];
        loop {
            match state.load(Ordering::SeqCst) {
                COLD => return false,
                HOT_REFERENCED => return true,
                _ => {
                    if state
                        .compare_exchange(HOT, HOT_REFERENCED, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        return true;
                    }
                }
            }
        }
    }

    /// Sets the bits of the range in memory and tells whether they are already
    /// crash-safe (every region touched is hot): true means the write may be issued
    /// now; false means [`DirtyBitmap::try_mark`] must run first (it blocks on an
    /// fdatasync). Never blocks.
    pub fn mark_fast(&self, offset: u64, len: u64) -> bool {
        // Bits first, then the region check: an expiry that marks the region cold
        // after we saw it hot snapshots the bits after ours were set.
        self.mark_bits(offset, len);
        if self.persist.is_none() {
            return true;
        }
        self.region_range(offset, len).all(|r| self.touch(r))
    }

    /// Marks the range dirty and returns once the mark is crash-safe. Blocks (an
    /// fdatasync) when a region is not hot yet.
    pub fn try_mark(&self, offset: u64, len: u64) -> Result<(), BitmapError> {
        if self.mark_fast(offset, len) {
            return Ok(());
        }
        let Some(persist) = &self.persist else {
            return Ok(());
        };
        // Group commit: regions queued here while another writer holds the lock
        // (in its fdatasync) go into the next AL update together, so under a deep
        // queue one fdatasync covers many writers' regions.
        let queued: Vec<u32> = self
            .region_range(offset, len)
            .filter(|r| !self.touch(*r))
            .map(|r| r as u32)
            .collect();
        if queued.len() <= GROUP_MAX {
            lock_pending(&self.pending).extend_from_slice(&queued);
        }
        let mut guard = lock(persist);
        let p = &mut *guard;
        let cold: Vec<u32> = self
            .region_range(offset, len)
            .filter(|r| !self.touch(*r))
            .map(|r| r as u32)
            .collect();
        if cold.is_empty() {
            // Another writer made them hot while we waited for the lock.
            return Ok(());
        }
        if cold.len() > p.capacity / 2 {
            // A huge range (a TRIM or WRITE_ZEROES of many regions): write its bits
            // to the file directly instead of flooding the AL.
            let words = self.region_words(cold[0] as usize, cold[cold.len() - 1] as usize + 1);
            return p
                .file
                .write_words(&self.bits, words)
                .and_then(|()| p.file.sync());
        }
        // Ours first, then what other writers queued and is still cold. A writer
        // whose regions do not make it into this batch finds them still cold once it
        // holds the lock, and adds them itself.
        let mut batch = cold;
        let limit = (p.capacity / 2).min(GROUP_MAX).max(batch.len());
        for r in std::mem::take(&mut *lock_pending(&self.pending)) {
            if batch.len() >= limit {
                break;
            }
            if !batch.contains(&r) && !self.touch(r as usize) {
                batch.push(r);
            }
        }
        self.make_room(p, batch.len())?;
        p.al.extend_from_slice(&batch);
        if let Err(e) = p.file.write_al(&p.al).and_then(|()| p.file.sync()) {
            // Not hot: the next write into them tries again (the durable AL may or
            // may not hold them, which only over-reports).
            let n = p.al.len() - batch.len();
            p.al.truncate(n);
            return Err(e);
        }
        for r in batch {
            self.regions[r as usize].store(HOT_REFERENCED, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Marks `[offset, offset+len)` dirty, crash-safe before it returns (see
    /// [`DirtyBitmap::try_mark`]). If the mark cannot be made durable (an I/O error
    /// on the bitmap file) the whole bitmap is marked dirty in memory and the error
    /// logged: a bit is never lost while the node runs.
    pub fn mark(&self, offset: u64, len: u64) {
        if let Err(e) = self.try_mark(offset, len) {
            tracing::error!(bitmap = %self.name, error = %e, "dirty bit not durable: whole bitmap marked dirty");
            self.bits.set(0, self.bits.len());
        }
    }

    /// Word indexes of the bits of regions `[r0, r1)`.
    fn region_words(&self, r0: usize, r1: usize) -> std::ops::Range<usize> {
        let bits_per_region = 1u64 << (self.rshift - self.gshift);
        let first = (r0 as u64 * bits_per_region) / 64;
        let last = ((r1 as u64 * bits_per_region).min(self.bits.len())).div_ceil(64);
        first as usize..(last as usize).min(self.bits.words())
    }

    /// Expires regions until `need` more fit in the AL: at least an eighth of the AL
    /// at a time, so that the two fdatasyncs of an expiry are amortized.
    fn make_room(&self, p: &mut Persist, need: usize) -> Result<(), BitmapError> {
        if p.al.len() + need <= p.capacity {
            return Ok(());
        }
        let want = (p.al.len() + need - p.capacity)
            .max(p.capacity / 8)
            .min(p.al.len());
        let mut victims = Vec::with_capacity(want);
        let mut steps = 0;
        while victims.len() < want && !p.al.is_empty() && steps < 4 * p.capacity + 4 {
            steps += 1;
            if p.hand >= p.al.len() {
                p.hand = 0;
            }
            let r = p.al[p.hand];
            let state = &self.regions[r as usize];
            // After two full sweeps (writers keep referencing everything) a region
            // goes even if referenced: the AL must not outgrow its slot.
            let force = steps > 2 * p.capacity + 2;
            // Writers only ever move HOT -> HOT_REFERENCED; COLD is set under this lock.
            if !force
                && state
                    .compare_exchange(HOT_REFERENCED, HOT, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                p.hand += 1;
                continue;
            }
            if state.swap(COLD, Ordering::SeqCst) != COLD {
                victims.push(p.al.swap_remove(p.hand));
            } else {
                p.hand += 1;
            }
        }
        let result = (|| {
            for r in &victims {
                let words = self.region_words(*r as usize, *r as usize + 1);
                p.file.write_words(&self.bits, words)?;
            }
            // The bits are on disk before the AL forgets their regions.
            p.file.sync()
        })();
        if let Err(e) = result {
            for r in victims {
                self.regions[r as usize].store(HOT, Ordering::SeqCst);
                p.al.push(r);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Writes every bit to the file and empties the AL (a clean shutdown, or after
    /// recovery), so the next start over-reports nothing.
    pub fn checkpoint(&self) -> Result<(), BitmapError> {
        let Some(persist) = &self.persist else {
            return Ok(());
        };
        let mut guard = lock(persist);
        let p = &mut *guard;
        let hot = std::mem::take(&mut p.al);
        for r in &hot {
            self.regions[*r as usize].store(COLD, Ordering::SeqCst);
        }
        let result = p
            .file
            .write_words(&self.bits, 0..self.bits.words())
            .and_then(|()| p.file.sync())
            .and_then(|()| p.file.write_al(&[]))
            .and_then(|()| p.file.sync());
        if let Err(e) = result {
            for r in &hot {
                self.regions[*r as usize].store(HOT, Ordering::SeqCst);
            }
            p.al = hot;
            return Err(e);
        }
        p.hand = 0;
        Ok(())
    }

    /// Dirty ranges `(offset, len)`, merged and sorted; the last one ends at the
    /// export's size at most.
    pub fn dirty_extents(&self) -> Vec<(u64, u64)> {
        self.bits
            .runs()
            .into_iter()
            .map(|(b, n)| {
                let off = b << self.gshift;
                let end = ((b + n) << self.gshift).min(self.size);
                (off, end - off)
            })
            .collect()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_extents().iter().map(|(_, l)| l).sum()
    }

    /// Extents of `[offset, offset+length)` as `(length, dirty)`, alternating, at
    /// most `max` of them, none longer than `max_len` (a multiple of the
    /// granularity or u64::MAX): what BLOCK_STATUS reports.
    pub fn status(&self, offset: u64, length: u64, max: usize, max_len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let bit = pos >> self.gshift;
            let dirty = self.bits.get(bit);
            let next_bit = self.bits.next_change(bit, self.bits.len(), dirty);
            let run_end = (next_bit << self.gshift).min(end);
            let mut n = run_end - pos;
            if n > max_len {
                n = max_len;
            }
            out.push((n, dirty));
            pos += n;
        }
        out
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), BitmapError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BitmapError::BadRange { offset, length }),
        }
    }

    /// Clears the granules fully inside `[offset, offset+len)` (a granule that ends
    /// past the export's end counts as inside when the range reaches the end), and
    /// writes them to the file (fdatasync) before returning.
    /// [`DirtyBitmap::clear_range`] that keeps the bits of changes still in flight:
    /// a change marked before the clear but landing after it is a change since the
    /// clear. `busy(offset, len)` tells whether a change to the range is in flight
    /// (the export's [`InFlight`]); it is asked after the clear, and a change counts
    /// as in flight from before its mark, so none is lost.
    pub fn clear_range_keeping(
        &self,
        offset: u64,
        len: u64,
        busy: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), BitmapError> {
        self.check_range(offset, len)?;
        let (first, last) = self.whole_granules(offset, offset + len);
        if first >= last {
            return Ok(());
        }
        for (w, was) in self.bits.clear_fetch(first, last) {
            let mut rest = was;
            while rest != 0 {
                let bit = w as u64 * 64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let off = bit << self.gshift;
                if busy(off, self.granularity) {
                    self.bits.set(bit, bit + 1);
                }
            }
        }
        self.persist_bits(first, last)
    }

    pub fn clear_range(&self, offset: u64, len: u64) -> Result<(), BitmapError> {
        self.clear_range_keeping(offset, len, &|_, _| false)
    }

    /// The bits of the granules `[offset, end)` covers whole (the export's last, short
    /// granule counts as whole when the range reaches the end).
    fn whole_granules(&self, offset: u64, end: u64) -> (u64, u64) {
        let first = offset.div_ceil(self.granularity);
        let last = if end == self.size {
            self.bits.len()
        } else {
            end >> self.gshift
        };
        (first, last)
    }

    /// Clears the granules `[offset, offset+len)` covers whole, in memory only: the
    /// file learns it at the next [`DirtyBitmap::write_all_bits`], activity-log
    /// expiry or checkpoint (a crash before that only over-reports).
    pub fn unmark_in_memory(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return;
        }
        let (first, last) = self.whole_granules(offset, end);
        if first < last {
            self.bits.clear(first, last);
        }
    }

    /// Sets the bits of `[offset, offset+len)` in memory (undoing an
    /// [`DirtyBitmap::unmark_in_memory`] before anything could persist it).
    pub fn remark_in_memory(&self, offset: u64, len: u64) {
        self.mark_bits(offset, len);
    }

    /// Sets every bit, durably, without the activity log (a mirror job's bitmap
    /// starts this way: everything to copy until copies settle).
    pub fn mark_all_durable(&self) -> Result<(), BitmapError> {
        self.bits.set(0, self.bits.len());
        self.persist_bits(0, self.bits.len())
    }

    /// Writes every bit to the file and syncs (the activity log is left as it is).
    pub fn write_all_bits(&self) -> Result<(), BitmapError> {
        self.persist_bits(0, self.bits.len())
    }

    /// Clears every bit.
    pub fn clear_all(&self) -> Result<(), BitmapError> {
        self.clear_range(0, self.size)
    }

    /// Sets every bit that is set in `other` (rounded out to this bitmap's
    /// granularity), durably.
    pub fn merge_from(&self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        for (off, len) in other.dirty_extents() {
            self.mark_bits(off, len);
        }
        self.persist_bits(0, self.bits.len())
    }

    /// Writes the words holding bits `[first, last)` and syncs.
    fn persist_bits(&self, first: u64, last: u64) -> Result<(), BitmapError> {
        let Some(persist) = &self.persist else {
            return Ok(());
        };
        let p = lock(persist);
        let words = (first / 64) as usize..(last.div_ceil(64) as usize).min(self.bits.words());
        p.file.write_words(&self.bits, words)?;
        p.file.sync()
    }

    /// Hot regions now (for tests and metrics).
    pub fn hot_regions(&self) -> usize {
        self.persist.as_ref().map_or(0, |p| lock(p).al.len())
    }
}

fn lock(m: &Mutex<Persist>) -> MutexGuard<'_, Persist> {
    // Persist's fields stay consistent across a panic: the AL in memory is only
    // changed after the matching write succeeded or is rolled back.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The bitmaps of one export.
#[derive(Debug)]
pub struct BitmapSet {
    /// Where the bitmap files live; None keeps them in memory.
    dir: Option<PathBuf>,
    size: u64,
    al_regions: usize,
    list: RwLock<Vec<Arc<DirtyBitmap>>>,
    /// How many bitmaps there are: the write path skips everything when zero.
    count: AtomicUsize,
}

const SUFFIX: &str = ".bitmap";

impl BitmapSet {
    /// No bitmaps, kept in memory.
    pub fn in_memory(size: u64) -> Self {
        Self {
            dir: None,
            size,
            al_regions: DEFAULT_AL_REGIONS,
            list: RwLock::new(Vec::new()),
            count: AtomicUsize::new(0),
        }
    }

    /// The bitmaps stored in `dir` (created if missing). A bitmap file that cannot
    /// be read is an error: serving the export without it would lose its bits.
    pub fn open(dir: &Path, size: u64, al_regions: usize) -> Result<Self, BitmapError> {
        let io = |source| BitmapError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut list = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
                // Leftover temporary files of an interrupted creation.
                if file_name.to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            list.push(Arc::new(DirtyBitmap::open(
                &entry.path(),
                name,
                size,
                al_regions,
            )?));
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            size,
            al_regions,
            count: AtomicUsize::new(list.len()),
            list: RwLock::new(list),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.list.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.list.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether new bitmaps are kept on disk (the node has a `--data-dir`).
    pub fn is_persistent(&self) -> bool {
        self.dir.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::SeqCst) == 0
    }

    pub fn names(&self) -> Vec<String> {
        self.read().iter().map(|b| b.name.clone()).collect()
    }

    pub fn list(&self) -> Vec<Arc<DirtyBitmap>> {
        self.read().clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.read().iter().find(|b| b.name == name).cloned()
    }

    /// Creates a bitmap (all clean). It records every write admitted after it is
    /// listed here.
    pub fn create(&self, name: &str, granularity: u64) -> Result<Arc<DirtyBitmap>, BitmapError> {
        validate_name(name)?;
        validate_granularity(granularity)?;
        let mut list = self.write();
        if list.iter().any(|b| b.name == name) {
            return Err(BitmapError::Exists(name.into()));
        }
        let bm = Arc::new(match &self.dir {
            Some(dir) => DirtyBitmap::create(
                &dir.join(format!("{name}{SUFFIX}")),
                name,
                granularity,
                self.size,
                self.al_regions,
            )?,
            None => DirtyBitmap::in_memory(name, granularity, self.size)?,
        });
        list.push(Arc::clone(&bm));
        list.sort_by(|a, b| a.name.cmp(&b.name));
        self.count.store(list.len(), Ordering::SeqCst);
        Ok(bm)
    }

    /// Deletes a bitmap and its file.
    pub fn remove(&self, name: &str) -> Result<(), BitmapError> {
        let mut list = self.write();
        let i = list
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| BitmapError::NotFound(name.into()))?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name}{SUFFIX}"));
            let io = |source| BitmapError::Io {
                path: path.clone(),
                source,
            };
            std::fs::remove_file(&path).map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        list.remove(i);
        self.count.store(list.len(), Ordering::SeqCst);
        Ok(())
    }

    /// Marks the range in every bitmap without blocking; false when one of them
    /// needs [`BitmapSet::mark_durable`] before the write may be issued.
    pub fn mark_fast(&self, offset: u64, len: u64) -> bool {
        if self.is_empty() {
            return true;
        }
        let mut all = true;
        for b in self.read().iter() {
            all &= b.mark_fast(offset, len);
        }
        all
    }

    /// Marks the range in every bitmap, crash-safe on return (may block).
    pub fn mark_durable(&self, offset: u64, len: u64) -> Result<(), BitmapError> {
        for b in self.list() {
            b.try_mark(offset, len)?;
        }
        Ok(())
    }

    /// Checkpoints every bitmap (clean shutdown).
    pub fn checkpoint(&self) {
        for b in self.list() {
            if let Err(e) = b.checkpoint() {
                tracing::warn!(bitmap = %b.name, error = %e, "bitmap checkpoint failed; its activity log will be replayed at start");
            }
        }
    }

    /// Removes every bitmap file (the export was deleted).
    pub fn destroy(&self) {
        for name in self.names() {
            if let Err(e) = self.remove(&name) {
                tracing::warn!(bitmap = %name, error = %e, "cannot delete bitmap file");
            }
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The directory of an export's bitmaps under the data directory. The export name
/// is hex-encoded: flag-defined exports may use any character.
pub fn export_dir(data_dir: &Path, export: &str) -> PathBuf {
    let hex: String = export.bytes().map(|b| format!("{b:02x}")).collect();
    data_dir.join("bitmaps").join(hex)
}

#[cfg(test)]
mod tests;
