//! The bitmap file: header, two activity-log slots, the bits.
//!
//! ```text
//! [0, 4096)                 header: magic, granularity, size, slot size, AL capacity, hash
//! [4096, 4096 + slot)       AL slot 0 \ written alternately; the valid one with the
//! [4096 + slot, 4096 + 2s)  AL slot 1 / higher sequence number is the AL
//! [4096 + 2 slot, ...)      bits, little-endian u64 words
//! ```
//! An AL slot: magic, sequence number, region count, regions (u32 each), and the
//! BLAKE3 hash of everything before it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BitmapError, Bits};

const MAGIC: &[u8; 8] = b"SHDIRTY1";
const AL_MAGIC: &[u8; 8] = b"SHALOG01";
const HEADER: u64 = 4096;
/// magic + granularity + size + slot size + capacity, then a hash of those.
const HEADER_FIELDS: usize = 8 + 8 + 8 + 4 + 4;
/// AL slot overhead: magic, sequence, count, hash.
const SLOT_FIXED: usize = 8 + 8 + 4 + 32;

#[derive(Debug)]
pub(super) struct BitmapFile {
    file: File,
    path: PathBuf,
    slot_size: u64,
    seq: u64,
}

/// What [`BitmapFile::open`] read.
pub(super) struct Loaded {
    pub granularity: u64,
    pub size: u64,
    pub al: Vec<u32>,
    pub words: Vec<u64>,
}

fn slot_size_for(capacity: usize) -> u64 {
    ((SLOT_FIXED + 4 * capacity) as u64).div_ceil(4096) * 4096
}

fn encode_slot(seq: u64, al: &[u32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(SLOT_FIXED + 4 * al.len());
    b.extend_from_slice(AL_MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(al.len() as u32).to_le_bytes());
    for r in al {
        b.extend_from_slice(&r.to_le_bytes());
    }
    let h = blake3::hash(&b);
    b.extend_from_slice(h.as_bytes());
    b
}

/// `(seq, regions)` of an intact slot.
fn decode_slot(b: &[u8]) -> Option<(u64, Vec<u32>)> {
    if b.get(..8)? != AL_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    let n = u32::from_le_bytes(b.get(16..20)?.try_into().ok()?) as usize;
    let body = b.get(..20 + 4 * n)?;
    let hash = b.get(20 + 4 * n..52 + 4 * n)?;
    if blake3::hash(body).as_bytes() != hash {
        return None;
    }
    let al = body[20..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((seq, al))
}

impl BitmapFile {
    fn io(&self, source: std::io::Error) -> BitmapError {
        BitmapError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn al_capacity(&self) -> usize {
        (self.slot_size as usize - SLOT_FIXED) / 4
    }

    fn bits_offset(&self) -> u64 {
        HEADER + 2 * self.slot_size
    }

    /// Writes a new, all-clean file (or one holding `initial` bits... none here)
    /// and puts it in place atomically: temp file, fsync, rename, fsync directory.
    pub fn create(
        path: &Path,
        granularity: u64,
        size: u64,
        capacity: usize,
        words: usize,
    ) -> Result<Self, BitmapError> {
        let io = |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let slot_size = slot_size_for(capacity);
        let mut header = Vec::with_capacity(HEADER as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&granularity.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&(slot_size as u32).to_le_bytes());
        header.extend_from_slice(&(capacity as u32).to_le_bytes());
        let h = blake3::hash(&header);
        header.extend_from_slice(h.as_bytes());
        header.resize(HEADER as usize, 0);
        let mut slots = encode_slot(0, &[]);
        slots.resize(2 * slot_size as usize, 0);
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&header).map_err(io)?;
            f.write_all(&slots).map_err(io)?;
            // Zeros written for real: later in-place writes allocate nothing, so
            // fdatasync has no file-system metadata to flush.
            let zeros = vec![0u8; 64 << 10];
            let mut left = words as u64 * 8;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n]).map_err(io)?;
                left -= n as u64;
            }
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            slot_size,
            seq: 0,
        })
    }

    pub fn open(path: &Path) -> Result<(Self, Loaded), BitmapError> {
        let io = |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: &str| BitmapError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut header = vec![0u8; HEADER as usize];
        file.read_exact_at(&mut header, 0).map_err(io)?;
        if &header[..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let fields = &header[..HEADER_FIELDS];
        if blake3::hash(fields).as_bytes() != &header[HEADER_FIELDS..HEADER_FIELDS + 32] {
            return Err(corrupt("header hash mismatch"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap_or([0; 4]));
        let granularity = u64_at(8);
        let size = u64_at(16);
        let slot_size = u64::from(u32_at(24));
        if slot_size < SLOT_FIXED as u64 || granularity == 0 {
            return Err(corrupt("bad header fields"));
        }
        let mut slots = vec![0u8; 2 * slot_size as usize];
        file.read_exact_at(&mut slots, HEADER).map_err(io)?;
        let a = decode_slot(&slots[..slot_size as usize]);
        let b = decode_slot(&slots[slot_size as usize..]);
        let (seq, al) = match (a, b) {
            (Some(a), Some(b)) => {
                if a.0 >= b.0 {
                    a
                } else {
                    b
                }
            }
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => return Err(corrupt("no intact activity log slot")),
        };
        let nwords = size.div_ceil(granularity).div_ceil(64) as usize;
        let mut raw = vec![0u8; nwords * 8];
        file.read_exact_at(&mut raw, HEADER + 2 * slot_size)
            .map_err(io)?;
        let words = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                slot_size,
                seq,
            },
            Loaded {
                granularity,
                size,
                al,
                words,
            },
        ))
    }

    /// Writes `al` into the older slot (not synced: the caller syncs).
    pub fn write_al(&mut self, al: &[u32]) -> Result<(), BitmapError> {
        let seq = self.seq + 1;
        let slot = encode_slot(seq, al);
        if slot.len() as u64 > self.slot_size {
            return Err(self.io(std::io::Error::other("activity log larger than its slot")));
        }
        let offset = HEADER + (seq % 2) * self.slot_size;
        self.file
            .write_all_at(&slot, offset)
            .map_err(|e| self.io(e))?;
        self.seq = seq;
        Ok(())
    }

    /// Writes words `range` of `bits` in place (not synced).
    pub fn write_words(
        &self,
        bits: &Bits,
        range: std::ops::Range<usize>,
    ) -> Result<(), BitmapError> {
        if range.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(range.len() * 8);
        for i in range.clone() {
            buf.extend_from_slice(&bits.word(i).to_le_bytes());
        }
        self.file
            .write_all_at(&buf, self.bits_offset() + range.start as u64 * 8)
            .map_err(|e| self.io(e))
    }

    pub fn sync(&self) -> Result<(), BitmapError> {
        self.file.sync_data().map_err(|e| self.io(e))
    }
}
