//! The NBD wire protocol as pure functions: no sockets, no files, no clocks.
//!
//! Both sides of the protocol live here so that the server, the async client, the
//! fuzz targets and the tests all share one definition of every message:
//!
//! ```text
//! handshake:    S: NBDMAGIC IHAVEOPT u16-flags        C: u32-flags
//! options:      C: IHAVEOPT u32-option u32-len data   S: REPLY_MAGIC u32-option u32-type u32-len data
//!               (EXPORT_NAME is answered by u64-size u16-flags [124 zero bytes])
//! transmission: C: request (28 bytes compact, 32 bytes extended) [payload]
//!               S: simple reply (16) | structured chunk (20) | extended chunk (32) [payload]
//! ```
//!
//! Decoders take a byte slice and never panic; they never allocate more than the
//! slice they were given, so a caller that caps what it reads from the network caps
//! what the codec allocates. Encoders append to a `Vec<u8>`.

use thiserror::Error;

/// Protocol constants, named as in the NBD specification (doc/proto.md).
pub mod consts {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
    pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

    // Handshake flags (server) and client flags.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // Options.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;
    pub const OPT_EXTENDED_HEADERS: u32 = 11;

    // Option reply types.
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
    pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
    pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
    pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
    pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
    pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
    pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
    pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
    pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
    pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 11;

    // Info items.
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // Transmission flags.
    pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_FUA: u16 = 1 << 3;
    pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
    pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_SEND_DF: u16 = 1 << 7;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
    pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
    pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
    pub const TFLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

    // Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    // Command flags.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;
    pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
    pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
    pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

    // Structured reply flags and chunk types.
    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

    // base:allocation flags.
    pub const STATE_HOLE: u32 = 1 << 0;
    pub const STATE_ZERO: u32 = 1 << 1;

    // Errors (errno values on the wire).
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// The only meta context this server offers.
    pub const META_BASE_ALLOCATION: &str = "base:allocation";
}

use consts::*;

/// Sizes of the fixed headers.
pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Length of the reply to NBD_OPT_EXPORT_NAME without its 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
pub const EXPORT_NAME_ZEROES: usize = 124;
/// The spec's limit for strings (export names, descriptions, messages).
pub const MAX_STRING: usize = 4096;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("message too short: need {need} bytes, have {have}")]
    TooShort { need: usize, have: usize },
    #[error("trailing bytes after message ({0})")]
    Trailing(usize),
    #[error("string longer than {MAX_STRING} bytes")]
    StringTooLong,
    #[error("string is not UTF-8 or contains NUL")]
    BadString,
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A small big-endian cursor over untrusted bytes.
struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Rd<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.remaining() < n {
            return Err(CodecError::TooShort {
                need: self.pos + n,
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self, len: usize) -> Result<String, CodecError> {
        if len > MAX_STRING {
            return Err(CodecError::StringTooLong);
        }
        let b = self.take(len)?;
        bytes_to_string(b)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

fn bytes_to_string(b: &[u8]) -> Result<String, CodecError> {
    if b.contains(&0) {
        return Err(CodecError::BadString);
    }
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| CodecError::BadString)
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Length of a string we encode; callers keep strings under `MAX_STRING`, and
/// anything longer is truncated rather than producing a wrong length prefix.
fn str_bytes(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(MAX_STRING)]
}

mod options;
mod transmission;

pub use options::*;
pub use transmission::*;

#[cfg(test)]
mod tests;
