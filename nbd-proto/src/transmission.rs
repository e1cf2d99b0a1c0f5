//! The transmission phase: requests, reply headers and structured reply chunks.

use super::*;

/// One request header; `length` is 64-bit so that compact and extended share a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Header size for the negotiated mode.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        }
    }

    /// Decodes a header of exactly `header_len(extended)` bytes. The magic must
    /// match the negotiated mode: the other one is a protocol violation.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let magic = r.u32()?;
        let want = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(CodecError::BadMagic(magic as u64));
        }
        let flags = r.u16()?;
        let command = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if extended { r.u64()? } else { r.u32()? as u64 };
        r.finish()?;
        Ok(Self {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Encodes the header. In compact mode `length` must fit 32 bits; larger values
    /// are clamped (the client never builds such a request).
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        put_u32(
            out,
            if extended {
                EXTENDED_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            },
        );
        put_u16(out, self.flags);
        put_u16(out, self.command);
        put_u64(out, self.cookie);
        put_u64(out, self.offset);
        if extended {
            put_u64(out, self.length);
        } else {
            put_u32(out, self.length.min(u32::MAX as u64) as u32);
        }
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// Header of any server reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply; for a successful READ, `length` of the request follows.
    Simple { error: u32, cookie: u64 },
    /// Structured (offset is 0) or extended chunk; `length` bytes of payload follow.
    Chunk {
        extended: bool,
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    },
}

impl ReplyHeader {
    /// Total header length for the header starting with `magic`.
    pub fn len_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_LEN),
            _ => None,
        }
    }

    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. } | Self::Chunk { cookie, .. } => *cookie,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Self::Simple { error, cookie } => {
                put_u32(out, SIMPLE_REPLY_MAGIC);
                put_u32(out, error);
                put_u64(out, cookie);
            }
            Self::Chunk {
                extended: true,
                flags,
                chunk_type,
                cookie,
                offset,
                length,
            } => {
                put_u32(out, EXTENDED_REPLY_MAGIC);
                put_u16(out, flags);
                put_u16(out, chunk_type);
                put_u64(out, cookie);
                put_u64(out, offset);
                put_u64(out, length);
            }
            Self::Chunk {
                extended: false,
                flags,
                chunk_type,
                cookie,
                length,
                ..
            } => {
                put_u32(out, STRUCTURED_REPLY_MAGIC);
                put_u16(out, flags);
                put_u16(out, chunk_type);
                put_u64(out, cookie);
                put_u32(out, length.min(u32::MAX as u64) as u32);
            }
        }
    }

    /// Decodes one whole header (its length given by `len_for_magic`).
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let magic = r.u32()?;
        let h = match magic {
            SIMPLE_REPLY_MAGIC => Self::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => Self::Chunk {
                extended: false,
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                offset: 0,
                length: r.u32()? as u64,
            },
            EXTENDED_REPLY_MAGIC => Self::Chunk {
                extended: true,
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                offset: r.u64()?,
                length: r.u64()?,
            },
            m => return Err(CodecError::BadMagic(m as u64)),
        };
        r.finish()?;
        Ok(h)
    }
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// The payload of a structured/extended reply chunk, except OFFSET_DATA's data,
/// which the caller moves separately to avoid copying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    None,
    /// OFFSET_DATA: the 8-byte offset; `data_len` bytes of data follow it.
    OffsetData {
        offset: u64,
        data_len: u64,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// BLOCK_STATUS (32-bit extents) or BLOCK_STATUS_EXT (64-bit), per `wide`.
    BlockStatus {
        context_id: u32,
        wide: bool,
        extents: Vec<Extent>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    Unknown {
        chunk_type: u16,
        data: Vec<u8>,
    },
}

impl ChunkPayload {
    pub fn chunk_type(&self) -> u16 {
        match self {
            Self::None => REPLY_TYPE_NONE,
            Self::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            Self::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            Self::BlockStatus { wide: false, .. } => REPLY_TYPE_BLOCK_STATUS,
            Self::BlockStatus { wide: true, .. } => REPLY_TYPE_BLOCK_STATUS_EXT,
            Self::Error { .. } => REPLY_TYPE_ERROR,
            Self::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
            Self::Unknown { chunk_type, .. } => *chunk_type,
        }
    }

    /// Bytes the chunk header's length field must count (including OFFSET_DATA's data).
    pub fn wire_len(&self) -> u64 {
        match self {
            Self::None => 0,
            Self::OffsetData { data_len, .. } => 8 + data_len,
            Self::OffsetHole { .. } => 12,
            Self::BlockStatus {
                wide: false,
                extents,
                ..
            } => 4 + 8 * extents.len() as u64,
            Self::BlockStatus {
                wide: true,
                extents,
                ..
            } => 8 + 16 * extents.len() as u64,
            Self::Error { message, .. } => 6 + str_bytes(message).len() as u64,
            Self::ErrorOffset { message, .. } => 14 + str_bytes(message).len() as u64,
            Self::Unknown { data, .. } => data.len() as u64,
        }
    }

    /// Encodes the payload (for OFFSET_DATA only its 8-byte offset).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::None => {}
            Self::OffsetData { offset, .. } => put_u64(out, *offset),
            Self::OffsetHole { offset, length } => {
                put_u64(out, *offset);
                put_u32(out, *length);
            }
            Self::BlockStatus {
                context_id,
                wide,
                extents,
            } => {
                put_u32(out, *context_id);
                if *wide {
                    put_u32(out, extents.len() as u32);
                    for e in extents {
                        put_u64(out, e.length);
                        put_u64(out, e.flags as u64);
                    }
                } else {
                    for e in extents {
                        put_u32(out, e.length.min(u32::MAX as u64) as u32);
                        put_u32(out, e.flags);
                    }
                }
            }
            Self::Error { error, message } | Self::ErrorOffset { error, message, .. } => {
                let m = str_bytes(message);
                put_u32(out, *error);
                put_u16(out, m.len() as u16);
                out.extend_from_slice(m);
                if let Self::ErrorOffset { offset, .. } = self {
                    put_u64(out, *offset);
                }
            }
            Self::Unknown { data, .. } => out.extend_from_slice(data),
        }
    }

    /// Decodes a chunk payload. For OFFSET_DATA give only the first 8 bytes and the
    /// total length from the header: the data itself stays with the caller.
    pub fn decode(chunk_type: u16, buf: &[u8], total_len: u64) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let p = match chunk_type {
            REPLY_TYPE_NONE => Self::None,
            REPLY_TYPE_OFFSET_DATA => {
                if total_len < 9 {
                    return Err(CodecError::Malformed("OFFSET_DATA without data"));
                }
                Self::OffsetData {
                    offset: r.u64()?,
                    data_len: total_len - 8,
                }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let p = Self::OffsetHole {
                    offset: r.u64()?,
                    length: r.u32()?,
                };
                if matches!(p, Self::OffsetHole { length: 0, .. }) {
                    return Err(CodecError::Malformed("empty hole"));
                }
                p
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
                    return Err(CodecError::Malformed("block status extents"));
                }
                let mut extents = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    extents.push(Extent {
                        length: r.u32()? as u64,
                        flags: r.u32()?,
                    });
                }
                Self::BlockStatus {
                    context_id,
                    wide: false,
                    extents,
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let context_id = r.u32()?;
                let count = r.u32()? as usize;
                if count == 0 || r.remaining() != count.saturating_mul(16) {
                    return Err(CodecError::Malformed("extended block status extents"));
                }
                let mut extents = Vec::with_capacity(count);
                for _ in 0..count {
                    let length = r.u64()?;
                    let flags = r.u64()?;
                    extents.push(Extent {
                        length,
                        flags: flags as u32,
                    });
                }
                Self::BlockStatus {
                    context_id,
                    wide: true,
                    extents,
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32()?;
                let mlen = r.u16()? as usize;
                let m = r.take(mlen)?;
                let message = String::from_utf8_lossy(&m[..m.len().min(MAX_STRING)]).into_owned();
                if chunk_type == REPLY_TYPE_ERROR {
                    Self::Error { error, message }
                } else {
                    Self::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                }
            }
            t => Self::Unknown {
                chunk_type: t,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(p)
    }
}

/// Encodes one whole structured or extended chunk header + non-data payload.
pub fn encode_chunk(
    extended: bool,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    payload: &ChunkPayload,
    out: &mut Vec<u8>,
) {
    ReplyHeader::Chunk {
        extended,
        flags,
        chunk_type: payload.chunk_type(),
        cookie,
        offset: req_offset,
        length: payload.wire_len(),
    }
    .encode(out);
    payload.encode(out);
}
