//! The wire codec: frames encoded and decoded, the receiver's zero-copy fast paths
//! for Memory and Sparse frames, and payload compression.

use super::{
    AuthKind, Command, Compression, ErrorCode, FrameHeader, HEADER_LEN, ID_LEN, MAX_DIGESTS,
    MAX_DISKS, MAX_PAYLOAD, MAX_RANGES, MAX_SPARSE_PAGES, MAX_SPARSE_WORDS, MAX_URI_LEN, MemRange,
    Message, PAGE_WORDS, ProtocolError, SparsePage, SwitchoverMode,
};
use crate::contract::{DiskSpec, PAGE_SIZE};
use stagehand_common::secret::Secret;

/// Small bounds-checked little-endian reader over a payload.
struct Reader<'a> {
    buf: &'a [u8],
    cmd: Command,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::BadLength(self.cmd));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::BadLength(self.cmd))
        }
    }
}

fn text(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::BadText)
}

/// Truncates a text field to what its frame may carry, on a char boundary.
fn bounded_text(s: &str, max: usize) -> &[u8] {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

impl Message {
    pub fn command(&self) -> Command {
        match self {
            Message::Challenge { .. } => Command::Challenge,
            Message::Hello { .. } => Command::Hello,
            Message::Config { .. } => Command::Config,
            Message::Join { .. } => Command::Join,
            Message::Memory { .. } => Command::Memory,
            Message::Sync { .. } => Command::Sync,
            Message::State { .. } => Command::State,
            Message::Digests { .. } => Command::Digests,
            Message::Switchover { .. } => Command::Switchover,
            Message::Sparse { .. } => Command::Sparse,
            Message::Complete => Command::Complete,
            Message::Abandon { .. } => Command::Abandon,
            Message::Ok { .. } => Command::Ok,
            Message::Error { .. } => Command::Error,
        }
    }

    /// Encodes a whole frame (header + payload). Memory payloads are compressed with
    /// `compression`; other messages ignore it.
    pub fn encode(&self, compression: Compression) -> Vec<u8> {
        let mut p = Vec::new();
        let mut flags = 0u16;
        match self {
            Message::Challenge {
                version_min,
                version_max,
                nonce,
            } => {
                p.extend_from_slice(&version_min.to_le_bytes());
                p.extend_from_slice(&version_max.to_le_bytes());
                p.extend_from_slice(nonce);
            }
            Message::Hello {
                version,
                auth,
                nonce,
                proof,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                match auth {
                    AuthKind::Token => {
                        p.push(1);
                        p.extend_from_slice(&[0u8; ID_LEN]);
                    }
                    AuthKind::Ticket(id) => {
                        p.push(2);
                        p.extend_from_slice(id);
                    }
                }
                p.extend_from_slice(nonce);
                p.extend_from_slice(proof);
            }
            Message::Config {
                chunk_size,
                streams,
                switchover,
                switchover_timeout_s,
                spec,
            } => {
                p.extend_from_slice(&chunk_size.to_le_bytes());
                p.extend_from_slice(&streams.to_le_bytes());
                p.push(switchover.byte());
                p.extend_from_slice(&switchover_timeout_s.to_le_bytes());
                let json = serde_json::to_vec(spec).expect("VmSpec serializes to JSON");
                p.extend_from_slice(&json);
            }
            Message::Join { session } => p.extend_from_slice(session),
            Message::Memory { ranges, data } => {
                let mut raw = Vec::with_capacity(4 + ranges.len() * 16 + data.len());
                raw.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for r in ranges {
                    raw.extend_from_slice(&r.gpa.to_le_bytes());
                    raw.extend_from_slice(&r.len.to_le_bytes());
                }
                raw.extend_from_slice(data);
                flags = compression.flag();
                p = compress(compression, raw);
            }
            Message::Sync { pass } => p.extend_from_slice(&pass.to_le_bytes()),
            Message::State { state } => p.extend_from_slice(state),
            Message::Digests {
                chunk_size,
                digests,
            } => {
                p.extend_from_slice(&chunk_size.to_le_bytes());
                p.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    p.extend_from_slice(d);
                }
            }
            Message::Sparse { pages } => {
                p.reserve(4 + pages.iter().map(SparsePage::wire_len).sum::<usize>());
                p.extend_from_slice(&(pages.len() as u32).to_le_bytes());
                for pg in pages {
                    p.extend_from_slice(&pg.gpa.to_le_bytes());
                    p.extend_from_slice(&(pg.words.len() as u16).to_le_bytes());
                    for (i, v) in &pg.words {
                        p.extend_from_slice(&i.to_le_bytes());
                        p.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Message::Switchover { disks } => {
                // The sender checked count and lengths (service::switchover); a longer
                // list would be refused by the receiver, never silently cut.
                // Per disk: the URI, then the lease (length 0: none).
                p.extend_from_slice(&(disks.len() as u32).to_le_bytes());
                for d in disks {
                    p.extend_from_slice(&(d.nbd.len() as u32).to_le_bytes());
                    p.extend_from_slice(d.nbd.as_bytes());
                    let lease = d.lease.as_ref().map_or("", |l| l.expose());
                    p.extend_from_slice(&(lease.len() as u32).to_le_bytes());
                    p.extend_from_slice(lease.as_bytes());
                }
            }
            Message::Complete => {}
            Message::Abandon { reason } => p.extend_from_slice(bounded_text(reason, 4096)),
            Message::Ok { payload } => p.extend_from_slice(payload),
            Message::Error { code, message } => {
                p.extend_from_slice(&(*code as u16).to_le_bytes());
                p.extend_from_slice(bounded_text(message, 4094));
            }
        }
        let header = FrameHeader {
            cmd: self.command(),
            flags,
            length: p.len() as u64,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + p.len());
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&p);
        out
    }

    /// Decodes a payload whose header was accepted by [`FrameHeader::parse`] and whose
    /// `length` bytes were all read.
    pub fn decode(h: &FrameHeader, payload: &[u8]) -> Result<Message, ProtocolError> {
        if payload.len() as u64 != h.length {
            return Err(ProtocolError::BadLength(h.cmd));
        }
        let mut r = Reader {
            buf: payload,
            cmd: h.cmd,
        };
        let msg = match h.cmd {
            Command::Invalid => return Err(ProtocolError::UnknownCommand(0)),
            Command::Challenge => Message::Challenge {
                version_min: r.u16()?,
                version_max: r.u16()?,
                nonce: r.array()?,
            },
            Command::Hello => {
                let version = r.u16()?;
                let kind = r.u8()?;
                let id: [u8; ID_LEN] = r.array()?;
                let auth = match kind {
                    1 => AuthKind::Token,
                    2 => AuthKind::Ticket(id),
                    _ => return Err(ProtocolError::BadLength(h.cmd)),
                };
                Message::Hello {
                    version,
                    auth,
                    nonce: r.array()?,
                    proof: r.array()?,
                }
            }
            Command::Config => {
                let chunk_size = r.u64()?;
                let streams = r.u16()?;
                let switchover = SwitchoverMode::from_byte(r.u8()?)?;
                let switchover_timeout_s = r.u32()?;
                let spec = serde_json::from_slice(r.rest())
                    .map_err(|e| ProtocolError::BadConfig(e.to_string()))?;
                Message::Config {
                    chunk_size,
                    streams,
                    switchover,
                    switchover_timeout_s,
                    spec,
                }
            }
            Command::Sparse => {
                let mut pages = Vec::new();
                walk_sparse(r.rest(), |gpa, words| {
                    pages.push(SparsePage {
                        gpa,
                        words: words.to_vec(),
                    })
                })?;
                Message::Sparse { pages }
            }
            Command::Switchover => {
                let n = r.u32()? as usize;
                if n > MAX_DISKS {
                    return Err(ProtocolError::TooManyDisks(n));
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u32()? as usize;
                    if len == 0 || len > MAX_URI_LEN {
                        return Err(ProtocolError::BadUri);
                    }
                    let nbd = text(r.take(len)?)?;
                    let len = r.u32()? as usize;
                    if len > MAX_URI_LEN {
                        return Err(ProtocolError::BadUri);
                    }
                    let lease = match text(r.take(len)?)? {
                        t if t.is_empty() => None,
                        t => Some(Secret::new(t).map_err(|_| ProtocolError::BadUri)?),
                    };
                    disks.push(DiskSpec { nbd, lease });
                }
                Message::Switchover { disks }
            }
            Command::Join => Message::Join {
                session: r.array()?,
            },
            Command::Memory => {
                let raw = decompress(Compression::from_flag(h.flags)?, payload)?;
                return decode_memory(&raw);
            }
            Command::Sync => Message::Sync { pass: r.u32()? },
            Command::State => Message::State {
                state: r.rest().to_vec(),
            },
            Command::Digests => {
                let chunk_size = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_DIGESTS || r.buf.len() != n * 32 {
                    return Err(ProtocolError::BadLength(h.cmd));
                }
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.array()?);
                }
                Message::Digests {
                    chunk_size,
                    digests,
                }
            }
            Command::Complete => Message::Complete,
            Command::Abandon => Message::Abandon {
                reason: text(r.rest())?,
            },
            Command::Ok => Message::Ok {
                payload: r.rest().to_vec(),
            },
            Command::Error => {
                let code = ErrorCode::from_u16(r.u16()?);
                Message::Error {
                    code,
                    message: text(r.rest())?,
                }
            }
        };
        r.end()?;
        Ok(msg)
    }
}

fn decode_memory(raw: &[u8]) -> Result<Message, ProtocolError> {
    let (ranges, data) = parse_memory_raw(raw)?;
    Ok(Message::Memory {
        ranges,
        data: data.to_vec(),
    })
}

/// Parses an uncompressed Memory payload without copying its page bytes.
fn parse_memory_raw(raw: &[u8]) -> Result<(Vec<MemRange>, &[u8]), ProtocolError> {
    let mut r = Reader {
        buf: raw,
        cmd: Command::Memory,
    };
    let n = r.u32()? as usize;
    if n > MAX_RANGES {
        return Err(ProtocolError::TooManyRanges(n));
    }
    let mut ranges = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for _ in 0..n {
        let gpa = r.u64()?;
        let len = r.u64()?;
        if len == 0
            || !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || gpa.checked_add(len).is_none()
        {
            return Err(ProtocolError::BadRange { gpa, len });
        }
        total = total
            .checked_add(len)
            .ok_or(ProtocolError::BadRange { gpa, len })?;
        ranges.push(MemRange { gpa, len });
    }
    if r.buf.len() as u64 != total {
        return Err(ProtocolError::BadLength(Command::Memory));
    }
    Ok((ranges, r.rest()))
}

/// The receiver's fast path for Memory frames: ranges plus the page bytes, borrowed
/// from `payload` (or from `decompressed`, which holds the decompressed payload).
pub fn parse_memory<'a>(
    h: &FrameHeader,
    payload: &'a [u8],
    decompressed: &'a mut Vec<u8>,
) -> Result<(Vec<MemRange>, &'a [u8]), ProtocolError> {
    if h.cmd != Command::Memory || payload.len() as u64 != h.length {
        return Err(ProtocolError::BadLength(h.cmd));
    }
    match Compression::from_flag(h.flags)? {
        Compression::None => parse_memory_raw(payload),
        c => {
            *decompressed = decompress(c, payload)?;
            parse_memory_raw(decompressed)
        }
    }
}

/// The receiver's fast path for Sparse frames: checks the whole frame as `decode`
/// does, then calls `page(gpa, words)` for each page in frame order, without
/// allocating (a frame of a chunk of counters is 512 small pages; decoding it into
/// vectors cost the receiver more than writing the pages).
pub fn parse_sparse(
    h: &FrameHeader,
    payload: &[u8],
    page: impl FnMut(u64, &[(u16, u64)]),
) -> Result<(), ProtocolError> {
    if h.cmd != Command::Sparse || payload.len() as u64 != h.length {
        return Err(ProtocolError::BadLength(h.cmd));
    }
    walk_sparse(payload, |_, _| {})?;
    walk_sparse(payload, page)
}

/// Parses a Sparse payload, calling `page` for each page as it is read (so a frame
/// that fails half-way has already been partly visited: check first, see above).
fn walk_sparse(
    payload: &[u8],
    mut page: impl FnMut(u64, &[(u16, u64)]),
) -> Result<(), ProtocolError> {
    let mut r = Reader {
        buf: payload,
        cmd: Command::Sparse,
    };
    let n = r.u32()? as usize;
    if n > MAX_SPARSE_PAGES {
        return Err(ProtocolError::TooManyRanges(n));
    }
    let mut words = [(0u16, 0u64); MAX_SPARSE_WORDS];
    for _ in 0..n {
        let gpa = r.u64()?;
        let nw = usize::from(r.u16()?);
        if !gpa.is_multiple_of(PAGE_SIZE) || nw > MAX_SPARSE_WORDS {
            return Err(ProtocolError::BadSparse { gpa });
        }
        for k in 0..nw {
            let i = r.u16()?;
            let v = r.u64()?;
            // Canonical only (increasing indices, non-zero values): the target hashes
            // these encodings as they are (`digest`).
            if usize::from(i) >= PAGE_WORDS || v == 0 || (k > 0 && words[k - 1].0 >= i) {
                return Err(ProtocolError::BadSparse { gpa });
            }
            words[k] = (i, v);
        }
        page(gpa, &words[..nw]);
    }
    r.end()
}

/// Builds an (uncompressed) Sparse frame page by page in a reusable buffer: the same
/// bytes as `Message::Sparse { pages }.encode(Compression::None)`, without a vector per
/// page (the sender's chunk of counters is 512 of them).
#[derive(Debug, Default)]
pub struct SparseFrame {
    buf: Vec<u8>,
    pages: u32,
}

impl SparseFrame {
    /// Empties the frame, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN + 4, 0);
        self.pages = 0;
    }

    /// Adds a page: `words` as `PageScan::Sparse` gives them (canonical).
    pub fn push(&mut self, gpa: u64, words: &[(u16, u64)]) {
        if self.buf.len() < HEADER_LEN + 4 {
            self.clear();
        }
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf
            .extend_from_slice(&(words.len() as u16).to_le_bytes());
        for (i, v) in words {
            self.buf.extend_from_slice(&i.to_le_bytes());
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
        self.pages += 1;
    }

    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// The whole frame (header included), ready to send.
    pub fn finish(&mut self) -> &[u8] {
        if self.buf.len() < HEADER_LEN + 4 {
            self.clear();
        }
        let header = FrameHeader {
            cmd: Command::Sparse,
            flags: 0,
            length: (self.buf.len() - HEADER_LEN) as u64,
        }
        .encode();
        self.buf[..HEADER_LEN].copy_from_slice(&header);
        self.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&self.pages.to_le_bytes());
        &self.buf
    }
}

/// Header and range table of an uncompressed Memory frame whose page bytes (`data_len`
/// of them, in range order) the caller writes right after, straight from its buffer.
pub fn memory_frame_prefix(ranges: &[MemRange], data_len: u64) -> Vec<u8> {
    let table = 4 + 16 * ranges.len() as u64;
    let mut out = Vec::with_capacity(HEADER_LEN + table as usize);
    out.extend_from_slice(
        &FrameHeader {
            cmd: Command::Memory,
            flags: 0,
            length: table + data_len,
        }
        .encode(),
    );
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
    }
    out
}

/// Compressed payloads start with the uncompressed length (u32 LE) so the receiver can
/// refuse an oversized one before decompressing.
fn compress(c: Compression, raw: Vec<u8>) -> Vec<u8> {
    match c {
        Compression::None => raw,
        Compression::Lz4 => {
            let mut out = (raw.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(&lz4_flex::block::compress(&raw));
            out
        }
        Compression::Zstd => {
            let mut out = (raw.len() as u32).to_le_bytes().to_vec();
            let z = zstd::bulk::compress(&raw, 1).expect("zstd compresses into a growable Vec");
            out.extend_from_slice(&z);
            out
        }
    }
}

fn decompress(c: Compression, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let raw_len = |p: &[u8]| -> Result<usize, ProtocolError> {
        if p.len() < 4 {
            return Err(ProtocolError::BadLength(Command::Memory));
        }
        let n = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as u64;
        if n > MAX_PAYLOAD {
            return Err(ProtocolError::TooLong {
                cmd: Command::Memory,
                len: n,
                max: MAX_PAYLOAD,
            });
        }
        Ok(n as usize)
    };
    let out = match c {
        Compression::None => return Ok(payload.to_vec()),
        Compression::Lz4 => {
            let n = raw_len(payload)?;
            let out = lz4_flex::block::decompress(&payload[4..], n)
                .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
            (n, out)
        }
        Compression::Zstd => {
            let n = raw_len(payload)?;
            let out = zstd::bulk::decompress(&payload[4..], n)
                .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
            (n, out)
        }
    };
    if out.1.len() != out.0 {
        return Err(ProtocolError::Decompress(
            "length differs from the declared one".into(),
        ));
    }
    Ok(out.1)
}
