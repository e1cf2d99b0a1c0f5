//! A pool of reusable byte buffers, so that the data path does not allocate (or
//! zero) a fresh buffer for every request.
//!
//! Buffers are grouped by power-of-two capacity class; each class keeps a bounded
//! number of free buffers, so the pool never holds more than a few tens of MiB.

use std::sync::{Arc, Mutex};

const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 25; // 32 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Free bytes kept per class (at least two buffers are kept whatever their size).
const BYTES_PER_CLASS: usize = 16 << 20;

#[derive(Debug)]
pub struct BufPool {
    classes: Vec<Mutex<Vec<Vec<u8>>>>,
}

impl Default for BufPool {
    fn default() -> Self {
        Self {
            classes: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }
}

fn class_of(len: usize) -> Option<usize> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS_SHIFT);
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn class_cap(class: usize) -> usize {
    1usize << (class as u32 + MIN_CLASS_SHIFT)
}

impl BufPool {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A buffer of exactly `len` initialised bytes (contents unspecified: callers
    /// overwrite them). Buffers above the largest class are allocated directly.
    pub fn get(self: &Arc<Self>, len: usize) -> Buf {
        let mut vec = match class_of(len) {
            Some(c) => {
                let reused = self.classes[c]
                    .lock()
                    .map(|mut free| free.pop())
                    .unwrap_or(None);
                reused.unwrap_or_else(|| Vec::with_capacity(class_cap(c)))
            }
            None => Vec::with_capacity(len),
        };
        // Reused buffers keep their old length; only bytes never initialised are zeroed.
        if vec.len() >= len {
            vec.truncate(len);
        } else {
            vec.resize(len, 0);
        }
        Buf {
            vec,
            pool: Some(Arc::clone(self)),
        }
    }

    fn put(&self, vec: Vec<u8>) {
        let Some(c) = class_of(vec.capacity()) else {
            return;
        };
        // Only buffers whose capacity is exactly a class size go back, so a class's
        // buffers always fit any request of that class.
        if vec.capacity() != class_cap(c) {
            return;
        }
        let keep = (BYTES_PER_CLASS / class_cap(c)).max(2);
        if let Ok(mut free) = self.classes[c].lock()
            && free.len() < keep
        {
            free.push(vec);
        }
    }
}

/// A byte buffer that returns to its pool when dropped.
#[derive(Debug, Default)]
pub struct Buf {
    vec: Vec<u8>,
    pool: Option<Arc<BufPool>>,
}

impl Buf {
    /// A buffer outside any pool (tests, the client).
    pub fn from_vec(vec: Vec<u8>) -> Self {
        Self { vec, pool: None }
    }
    pub fn len(&self) -> usize {
        self.vec.len()
    }
    pub fn is_empty(&self) -> bool {
        self.vec.is_empty()
    }
    pub fn truncate(&mut self, len: usize) {
        self.vec.truncate(len);
    }
    /// Resizes within the buffer, zero-filling new bytes.
    pub fn resize(&mut self, len: usize) {
        self.vec.resize(len, 0);
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.vec.as_mut_ptr()
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.vec.as_ptr()
    }
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.vec)
    }
    /// Clears the buffer for reuse as an append target.
    pub fn clear(&mut self) {
        self.vec.clear();
    }
    pub fn extend_from_slice(&mut self, s: &[u8]) {
        self.vec.extend_from_slice(s);
    }
    pub fn as_vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.vec
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.vec));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let pool = BufPool::new();
        let b = pool.get(5000);
        assert_eq!(b.len(), 5000);
        let p = b.as_ptr();
        drop(b);
        let b = pool.get(8192);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr(), p, "same class must reuse the freed buffer");
        let small = pool.get(1);
        assert_eq!(small.len(), 1);
        assert_ne!(small.as_ptr(), p);
    }

    #[test]
    fn oversize_buffers_bypass_the_pool() {
        let pool = BufPool::new();
        let b = pool.get((32 << 20) + 1);
        assert_eq!(b.len(), (32 << 20) + 1);
        drop(b);
        assert!(pool.classes.iter().all(|c| c.lock().unwrap().is_empty()));
    }

    #[test]
    fn pool_keeps_a_bounded_number() {
        let pool = BufPool::new();
        let bufs: Vec<_> = (0..100).map(|_| pool.get(1 << 20)).collect();
        drop(bufs);
        let c = class_of(1 << 20).unwrap();
        assert_eq!(pool.classes[c].lock().unwrap().len(), 16);
    }
}
