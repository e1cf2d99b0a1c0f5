//! Per-chunk BLAKE3 digests of guest memory, kept up to date as pages flow so that the
//! final "target memory == source paused image" check costs only the last pass.
//!
//! Both sides hash a chunk right after the pages of that chunk were collected (source:
//! after the dirty set that contained them was taken; target: after they were written).
//! Why this proves equality at the end: on the source, if a chunk was last hashed at
//! time t after the dirty-set collection at t' < t, any guest write to it after t'
//! would be in a later collection and the chunk would have been hashed again; so its
//! last digest reflects the paused image. On the target only received pages change
//! memory, and each Memory frame re-hashes the chunks it touched.
//!
//! What is hashed (`chunk_digest`) is a canonical, injective encoding of the chunk, page
//! by page: a page with at most `MAX_SPARSE_WORDS` non-zero 64-bit words is
//! `0, n, (index u16, value u64) × n`, any other page `1, its 4096 bytes`. Distinct
//! chunks have distinct encodings, so BLAKE3 over them proves equality as well as over
//! the raw bytes, but a mostly-zero page costs a scan instead of 4 KiB of hashing: the
//! pages that make up most pre-copy passes of counter-like guests are that kind.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

use super::protocol::MAX_SPARSE_WORDS;
use crate::contract::PAGE_SIZE;

/// Default chunk size: 2 MiB, one huge page; a 1 GiB guest has 512 digests (16 KiB).
pub const CHUNK_SIZE: u64 = 2 << 20;

pub type Digest = [u8; 32];

/// Digest table for a guest memory of `mem_size` bytes split in `chunk_size` chunks.
pub struct ChunkDigests {
    chunk_size: u64,
    mem_size: u64,
    digests: Mutex<Vec<Digest>>,
    /// Chunks written by a Memory frame (target) since the table was made; the initial
    /// scan of target memory must not overwrite their digests.
    touched: Vec<AtomicBool>,
    zero_full: Digest,
}

impl ChunkDigests {
    /// A table whose every chunk holds zeros (a freshly mapped target memory).
    pub fn zeroed(mem_size: u64, chunk_size: u64) -> Self {
        let n = mem_size.div_ceil(chunk_size) as usize;
        let zero_full = zero_digest(chunk_size);
        let mut digests = vec![zero_full; n];
        if !mem_size.is_multiple_of(chunk_size)
            && let Some(last) = digests.last_mut()
        {
            *last = zero_digest(mem_size % chunk_size);
        }
        let touched = (0..n).map(|_| AtomicBool::new(false)).collect();
        ChunkDigests {
            chunk_size,
            mem_size,
            digests: Mutex::new(digests),
            touched,
            zero_full,
        }
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn chunks(&self) -> u64 {
        self.mem_size.div_ceil(self.chunk_size)
    }

    /// Guest-physical start and length of chunk `c`.
    pub fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk_size;
        (
            start,
            self.chunk_size.min(self.mem_size.saturating_sub(start)),
        )
    }

    fn zero_of(&self, len: u64) -> Digest {
        if len == self.chunk_size {
            self.zero_full
        } else {
            zero_digest(len)
        }
    }

    /// Records chunk `c` as all zero (known without reading it).
    pub fn record_zero(&self, c: u64) {
        let (_, len) = self.chunk_range(c);
        let d = self.zero_of(len);
        let mut g = self
            .digests
            .lock()
            .expect("digest lock is never poisoned: no panics under it");
        if let Some(slot) = g.get_mut(c as usize) {
            *slot = d;
        }
    }

    /// Digest of chunk `c`'s bytes, given as `data` (a copy the caller already made).
    pub fn record(&self, c: u64, data: &[u8]) {
        let d = if is_zero(data) {
            if data.len() as u64 == self.chunk_size {
                self.zero_full
            } else {
                zero_digest(data.len() as u64)
            }
        } else {
            chunk_digest(data)
        };
        let mut g = self
            .digests
            .lock()
            .expect("digest lock is never poisoned: no panics under it");
        if let Some(slot) = g.get_mut(c as usize) {
            *slot = d;
        }
    }

    /// Records `d` as chunk `c`'s digest (computed by the caller, e.g. `scan_chunk`).
    pub fn set(&self, c: u64, d: Digest) {
        let mut g = self
            .digests
            .lock()
            .expect("digest lock is never poisoned: no panics under it");
        if let Some(slot) = g.get_mut(c as usize) {
            *slot = d;
        }
    }

    /// Marks chunk `c` as written by a Memory frame (before the write happens).
    pub fn mark_touched(&self, c: u64) {
        if let Some(t) = self.touched.get(c as usize) {
            t.store(true, Ordering::SeqCst);
        }
    }

    /// The target's initial scan: hashes chunk `c` as found in memory unless a Memory
    /// frame touched it meanwhile (its own re-hash then holds the right digest). This
    /// makes the final check cover memory the source never sent (zero pages), so a
    /// target whose "fresh" memory is not zero fails verification.
    pub fn scan_initial(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        c: u64,
        known_zero: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        if self
            .touched
            .get(c as usize)
            .is_none_or(|t| t.load(Ordering::SeqCst))
        {
            return Ok(());
        }
        let (start, len) = self.chunk_range(c);
        let d = if known_zero {
            self.zero_of(len)
        } else {
            scratch.resize(len as usize, 0);
            mem.read_slice(scratch, GuestAddress(start))?;
            if is_zero(scratch) {
                self.zero_of(len)
            } else {
                chunk_digest(scratch)
            }
        };
        let mut g = self
            .digests
            .lock()
            .expect("digest lock is never poisoned: no panics under it");
        // Checked again under the lock: a frame that touched the chunk while we read
        // re-hashes it after its write and must win.
        if !self.touched[c as usize].load(Ordering::SeqCst) {
            g[c as usize] = d;
        }
        Ok(())
    }

    /// Re-reads chunk `c` from guest memory into `scratch` and records its digest.
    pub fn rehash(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        c: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let (start, len) = self.chunk_range(c);
        scratch.resize(len as usize, 0);
        mem.read_slice(scratch, GuestAddress(start))?;
        self.record(c, scratch);
        Ok(())
    }

    pub fn snapshot(&self) -> Vec<Digest> {
        self.digests
            .lock()
            .expect("digest lock is never poisoned: no panics under it")
            .clone()
    }

    /// Chunks whose digest differs from `other` (or all, if the tables differ in size).
    pub fn mismatches(&self, other: &[Digest]) -> Vec<u64> {
        let mine = self.snapshot();
        if mine.len() != other.len() {
            return (0..mine.len().max(other.len()) as u64).collect();
        }
        mine.iter()
            .zip(other)
            .enumerate()
            .filter(|(_, (a, b))| blake3::Hash::from(**a) != blake3::Hash::from(**b))
            .map(|(i, _)| i as u64)
            .collect()
    }
}

/// `chunk_digest` of `len` zero bytes, without them.
fn zero_digest(len: u64) -> Digest {
    let mut h = blake3::Hasher::new();
    for _ in 0..len / PAGE_SIZE {
        h.update(&[0, 0]);
    }
    let tail = (len % PAGE_SIZE) as usize;
    if tail > 0 {
        h.update(&[2]);
        h.update(&vec![0u8; tail]);
    }
    *h.finalize().as_bytes()
}

/// BLAKE3 of the chunk's canonical encoding (see the module comment). A trailing
/// partial page (never produced by MiB-sized guests) is hashed raw behind tag 2.
pub fn chunk_digest(data: &[u8]) -> Digest {
    scan_chunk(data, |_, _| {})
}

/// What one scan of a page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageScan<'a> {
    /// Zero but for these `(word index, value)` words, at most `MAX_SPARSE_WORDS` of
    /// them, indices increasing, values non-zero (empty: an all-zero page).
    Sparse(&'a [(u16, u64)]),
    /// More non-zero words than that.
    Dense,
}

/// One read of a chunk for everything the sender needs: returns its `chunk_digest` and
/// tells `on_page(page index, scan)` what each whole page is, so that the digest, the
/// zero-page skip and the sparse encoding share a single pass over the bytes.
pub fn scan_chunk(data: &[u8], mut on_page: impl FnMut(usize, PageScan<'_>)) -> Digest {
    let mut h = ChunkHasher::new();
    let mut pages = data.chunks_exact(PAGE_SIZE as usize);
    let mut words = [(0u16, 0u64); MAX_SPARSE_WORDS];
    for (i, page) in (&mut pages).enumerate() {
        match sparse_words(page, &mut words) {
            Some(n) => {
                h.sparse(&words[..n]);
                on_page(i, PageScan::Sparse(&words[..n]));
            }
            None => {
                h.dense(page);
                on_page(i, PageScan::Dense);
            }
        }
    }
    h.tail(pages.remainder());
    h.finish()
}

/// The non-zero 64-bit words of a page, into `out`, if there are at most
/// `MAX_SPARSE_WORDS`; returns how many. Stops at the first word past the limit, and
/// skips zero 64-byte blocks with one test, so both dense and empty pages cost little.
pub fn sparse_words(page: &[u8], out: &mut [(u16, u64); MAX_SPARSE_WORDS]) -> Option<usize> {
    let mut n = 0usize;
    for (b, block) in page.chunks_exact(64).enumerate() {
        let mut ws = [0u64; 8];
        for (w, bytes) in ws.iter_mut().zip(block.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(bytes);
            *w = u64::from_le_bytes(a);
        }
        if ws.iter().fold(0, |acc, w| acc | w) == 0 {
            continue;
        }
        for (k, &v) in ws.iter().enumerate() {
            if v != 0 {
                let slot = out.get_mut(n)?;
                *slot = ((b * 8 + k) as u16, v);
                n += 1;
            }
        }
    }
    // A page length that is not a multiple of 64 never occurs (pages are 4 KiB).
    Some(n)
}

/// Incremental `chunk_digest`, page by page: lets the target hash a chunk straight
/// from the sparse encodings it received instead of reading the written memory back.
pub struct ChunkHasher(blake3::Hasher);

impl Default for ChunkHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkHasher {
    pub fn new() -> Self {
        ChunkHasher(blake3::Hasher::new())
    }

    /// A page that is zero but for `words` (canonical: indices increasing, values
    /// non-zero, at most `MAX_SPARSE_WORDS`).
    pub fn sparse(&mut self, words: &[(u16, u64)]) {
        let mut enc = [0u8; 2 + MAX_SPARSE_WORDS * 10];
        enc[1] = words.len() as u8;
        for (k, (i, v)) in words.iter().enumerate() {
            let o = 2 + k * 10;
            enc[o..o + 2].copy_from_slice(&i.to_le_bytes());
            enc[o + 2..o + 10].copy_from_slice(&v.to_le_bytes());
        }
        self.0.update(&enc[..2 + words.len() * 10]);
    }

    /// Any other whole page.
    pub fn dense(&mut self, page: &[u8]) {
        self.0.update(&[1]);
        self.0.update(page);
    }

    /// A trailing partial page.
    pub fn tail(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.0.update(&[2]);
            self.0.update(bytes);
        }
    }

    pub fn finish(&self) -> Digest {
        *self.0.finalize().as_bytes()
    }
}

/// Whether every byte is zero; 16 bytes at a time (zero pages are the common case in
/// a fresh guest, so this runs over most of pass 0).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: every bit pattern is a valid u128, and align_to only reinterprets the
        // correctly aligned middle part of the slice.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|b| *b == 0) && body.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("anonymous mapping")
    }

    #[test]
    fn zeroed_table_matches_hashing_fresh_memory() {
        let size = 5 << 20; // 2.5 chunks: the last one is partial
        let m = mem(size);
        let fresh = ChunkDigests::zeroed(size as u64, CHUNK_SIZE);
        let hashed = ChunkDigests::zeroed(size as u64, CHUNK_SIZE);
        let mut s = Vec::new();
        for c in 0..hashed.chunks() {
            m.write_slice(&[0], GuestAddress(c * CHUNK_SIZE))
                .expect("in range");
            hashed.rehash(&m, c, &mut s).expect("in range");
        }
        assert_eq!(fresh.chunks(), 3);
        assert!(fresh.mismatches(&hashed.snapshot()).is_empty());
    }

    #[test]
    fn one_changed_byte_is_found_in_its_chunk() {
        let size = 6 << 20;
        let (a, b) = (mem(size), mem(size));
        let (da, db) = (
            ChunkDigests::zeroed(size as u64, CHUNK_SIZE),
            ChunkDigests::zeroed(size as u64, CHUNK_SIZE),
        );
        b.write_slice(&[1], GuestAddress(CHUNK_SIZE + 4097))
            .expect("in range");
        let mut s = Vec::new();
        for c in 0..3 {
            da.rehash(&a, c, &mut s).expect("in range");
            db.rehash(&b, c, &mut s).expect("in range");
        }
        assert_eq!(da.mismatches(&db.snapshot()), vec![1]);
        assert_eq!(da.mismatches(&db.snapshot()[..2]), vec![0, 1, 2]);
    }

    #[test]
    fn zero_digest_is_the_digest_of_zeros() {
        for len in [PAGE_SIZE, CHUNK_SIZE, CHUNK_SIZE + 100] {
            assert_eq!(zero_digest(len), chunk_digest(&vec![0; len as usize]));
        }
    }

    proptest::proptest! {
        /// Sparse and dense pages, one changed word or byte anywhere: the digest sees it
        /// (the encoding is injective), and equal chunks hash equal.
        #[test]
        fn any_change_changes_the_digest(words in proptest::collection::vec((0usize..1024, proptest::prelude::any::<u64>()), 0..80),
                                         at in 0usize..(2 * PAGE_SIZE as usize), delta in 1u8..=255) {
            let mut a = vec![0u8; 2 * PAGE_SIZE as usize];
            for (i, v) in &words {
                a[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            let mut b = a.clone();
            proptest::prop_assert_eq!(chunk_digest(&a), chunk_digest(&b));
            b[at] = b[at].wrapping_add(delta);
            proptest::prop_assert_ne!(chunk_digest(&a), chunk_digest(&b));
        }
    }

    proptest::proptest! {
        /// The single scan the sender relies on: each page is classified exactly as
        /// `SparsePage::encode` would, and hashing the encodings page by page (what the
        /// target does with a whole-chunk Sparse frame) gives the chunk's digest.
        #[test]
        fn scan_agrees_with_sparse_encoding_and_incremental_hashing(
            words in proptest::collection::vec((0usize..(4 * PAGE_SIZE as usize / 8), 1u64..), 0..200),
        ) {
            let mut data = vec![0u8; 4 * PAGE_SIZE as usize];
            for (i, v) in &words {
                data[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            let mut inc = ChunkHasher::new();
            let mut seen = 0;
            let d = scan_chunk(&data, |i, scan| {
                let page = &data[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
                let sp = crate::migration::protocol::SparsePage::encode(0, page);
                match scan {
                    PageScan::Sparse(w) => {
                        assert_eq!(sp.map(|s| s.words), Some(w.to_vec()));
                        inc.sparse(w);
                    }
                    PageScan::Dense => {
                        assert_eq!(sp, None);
                        inc.dense(page);
                    }
                }
                seen += 1;
            });
            proptest::prop_assert_eq!(seen, 4);
            proptest::prop_assert_eq!(d, inc.finish());
            proptest::prop_assert_eq!(d, chunk_digest(&data));
        }
    }

    #[test]
    fn is_zero_checks_unaligned_edges() {
        let mut v = [0u8; 100];
        assert!(is_zero(&v[1..99]));
        v[98] = 1;
        assert!(!is_zero(&v[1..99]));
        assert!(is_zero(&v[1..98]));
    }
}

#[cfg(test)]
mod speed {
    /// Not a test: prints hashing and copy speed here (`-- --ignored --nocapture speed`).
    #[test]
    #[ignore]
    fn speed() {
        let src = vec![7u8; 2 << 20];
        let mut dst = vec![0u8; 2 << 20];
        let t = std::time::Instant::now();
        for _ in 0..200 {
            std::hint::black_box(blake3::hash(std::hint::black_box(&src)));
        }
        let h = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..200 {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
        }
        let c = t.elapsed();
        eprintln!("400 MiB: blake3 {h:?}, copy {c:?}");
    }
}
