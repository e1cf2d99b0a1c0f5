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

// ---------------------------------------------------------------------------
// Handshake

/// The server's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub flags: u16,
}

impl Greeting {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, NBDMAGIC);
        put_u64(out, IHAVEOPT);
        put_u16(out, self.flags);
    }
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let m = r.u64()?;
        if m != NBDMAGIC {
            return Err(CodecError::BadMagic(m));
        }
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(CodecError::BadMagic(m));
        }
        let flags = r.u16()?;
        r.finish()?;
        Ok(Self { flags })
    }
}

/// Header of one option the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(CodecError::BadMagic(m));
        }
        let option = r.u32()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self { option, length })
    }
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, IHAVEOPT);
        put_u32(out, self.option);
        put_u32(out, self.length);
    }
}

/// The request carried by NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// The request carried by NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// One option, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    ExtendedHeaders,
    /// An option this codec does not know; the server answers ERR_UNSUP.
    Unknown {
        option: u32,
        data: Vec<u8>,
    },
}

impl ClientOption {
    pub fn code(&self) -> u32 {
        match self {
            Self::ExportName(_) => OPT_EXPORT_NAME,
            Self::Abort => OPT_ABORT,
            Self::List => OPT_LIST,
            Self::StartTls => OPT_STARTTLS,
            Self::Info(_) => OPT_INFO,
            Self::Go(_) => OPT_GO,
            Self::StructuredReply => OPT_STRUCTURED_REPLY,
            Self::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            Self::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            Self::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            Self::Unknown { option, .. } => *option,
        }
    }

    /// Decodes the payload of option `option`. Options that take no data must have
    /// none (the server answers ERR_INVALID otherwise).
    pub fn decode(option: u32, data: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(data);
        let opt = match option {
            OPT_EXPORT_NAME => {
                let name = r.string(data.len())?;
                Self::ExportName(name)
            }
            OPT_ABORT => Self::Abort,
            OPT_LIST => Self::List,
            OPT_STARTTLS => Self::StartTls,
            OPT_STRUCTURED_REPLY => Self::StructuredReply,
            OPT_EXTENDED_HEADERS => Self::ExtendedHeaders,
            OPT_INFO | OPT_GO => {
                let len = r.u32()? as usize;
                let name = r.string(len)?;
                let n = r.u16()? as usize;
                if r.remaining() != n * 2 {
                    return Err(CodecError::Malformed("info request count"));
                }
                let mut requests = Vec::with_capacity(n);
                for _ in 0..n {
                    requests.push(r.u16()?);
                }
                let req = InfoRequest { name, requests };
                if option == OPT_INFO {
                    Self::Info(req)
                } else {
                    Self::Go(req)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let len = r.u32()? as usize;
                let export = r.string(len)?;
                let n = r.u32()? as usize;
                // Each query needs at least its 4-byte length, so `n` is bounded by
                // the payload we were given before anything is allocated.
                if n > r.remaining() / 4 {
                    return Err(CodecError::Malformed("meta context query count"));
                }
                let mut queries = Vec::with_capacity(n);
                for _ in 0..n {
                    let l = r.u32()? as usize;
                    queries.push(r.string(l)?);
                }
                let req = MetaContextRequest { export, queries };
                if option == OPT_LIST_META_CONTEXT {
                    Self::ListMetaContext(req)
                } else {
                    Self::SetMetaContext(req)
                }
            }
            other => Self::Unknown {
                option: other,
                data: r.rest().to_vec(),
            },
        };
        let no_data = matches!(
            opt,
            Self::Abort
                | Self::List
                | Self::StartTls
                | Self::StructuredReply
                | Self::ExtendedHeaders
        );
        if no_data && !data.is_empty() {
            return Err(CodecError::Malformed("option takes no data"));
        }
        if !no_data {
            r.finish()?;
        }
        Ok(opt)
    }

    /// Encodes the option with its header, as a client sends it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Self::ExportName(name) => data.extend_from_slice(str_bytes(name)),
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders => {}
            Self::Info(req) | Self::Go(req) => {
                let name = str_bytes(&req.name);
                put_u32(&mut data, name.len() as u32);
                data.extend_from_slice(name);
                let n = req.requests.len().min(u16::MAX as usize);
                put_u16(&mut data, n as u16);
                for r in &req.requests[..n] {
                    put_u16(&mut data, *r);
                }
            }
            Self::ListMetaContext(req) | Self::SetMetaContext(req) => {
                let name = str_bytes(&req.export);
                put_u32(&mut data, name.len() as u32);
                data.extend_from_slice(name);
                put_u32(&mut data, req.queries.len() as u32);
                for q in &req.queries {
                    let q = str_bytes(q);
                    put_u32(&mut data, q.len() as u32);
                    data.extend_from_slice(q);
                }
            }
            Self::Unknown { data: d, .. } => data.extend_from_slice(d),
        }
        OptionHeader {
            option: self.code(),
            length: data.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(&data);
    }
}

/// An information item in an NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown { kind: u16, data: Vec<u8> },
}

impl InfoItem {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Export { size, flags } => {
                put_u16(out, INFO_EXPORT);
                put_u64(out, *size);
                put_u16(out, *flags);
            }
            Self::Name(s) => {
                put_u16(out, INFO_NAME);
                out.extend_from_slice(str_bytes(s));
            }
            Self::Description(s) => {
                put_u16(out, INFO_DESCRIPTION);
                out.extend_from_slice(str_bytes(s));
            }
            Self::BlockSize {
                min,
                preferred,
                max,
            } => {
                put_u16(out, INFO_BLOCK_SIZE);
                put_u32(out, *min);
                put_u32(out, *preferred);
                put_u32(out, *max);
            }
            Self::Unknown { kind, data } => {
                put_u16(out, *kind);
                out.extend_from_slice(data);
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let kind = r.u16()?;
        let item = match kind {
            INFO_EXPORT => Self::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            INFO_NAME => Self::Name(r.string(r.remaining())?),
            INFO_DESCRIPTION => Self::Description(r.string(r.remaining())?),
            INFO_BLOCK_SIZE => Self::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            kind => Self::Unknown {
                kind,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(item)
    }
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(buf);
        let m = r.u64()?;
        if m != OPTION_REPLY_MAGIC {
            return Err(CodecError::BadMagic(m));
        }
        let h = Self {
            option: r.u32()?,
            reply_type: r.u32()?,
            length: r.u32()?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// One reply to an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(InfoItem),
    MetaContext {
        id: u32,
        name: String,
    },
    /// Any `REP_FLAG_ERROR` type, with its optional message.
    Error {
        code: u32,
        message: String,
    },
    Unknown {
        reply_type: u32,
        data: Vec<u8>,
    },
}

impl OptionReply {
    pub fn reply_type(&self) -> u32 {
        match self {
            Self::Ack => REP_ACK,
            Self::Server { .. } => REP_SERVER,
            Self::Info(_) => REP_INFO,
            Self::MetaContext { .. } => REP_META_CONTEXT,
            Self::Error { code, .. } => *code,
            Self::Unknown { reply_type, .. } => *reply_type,
        }
    }

    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Self::Ack => {}
            Self::Server { name, description } => {
                let n = str_bytes(name);
                put_u32(&mut data, n.len() as u32);
                data.extend_from_slice(n);
                data.extend_from_slice(str_bytes(description));
            }
            Self::Info(item) => item.encode(&mut data),
            Self::MetaContext { id, name } => {
                put_u32(&mut data, *id);
                data.extend_from_slice(str_bytes(name));
            }
            Self::Error { message, .. } => data.extend_from_slice(str_bytes(message)),
            Self::Unknown { data: d, .. } => data.extend_from_slice(d),
        }
        put_u64(out, OPTION_REPLY_MAGIC);
        put_u32(out, option);
        put_u32(out, self.reply_type());
        put_u32(out, data.len() as u32);
        out.extend_from_slice(&data);
    }

    pub fn decode(reply_type: u32, data: &[u8]) -> Result<Self, CodecError> {
        let mut r = Rd::new(data);
        let reply = match reply_type {
            REP_ACK => Self::Ack,
            REP_SERVER => {
                let len = r.u32()? as usize;
                let name = r.string(len)?;
                let description = r.string(r.remaining())?;
                Self::Server { name, description }
            }
            REP_INFO => Self::Info(InfoItem::decode(r.rest())?),
            REP_META_CONTEXT => {
                let id = r.u32()?;
                Self::MetaContext {
                    id,
                    name: r.string(r.remaining())?,
                }
            }
            t if t & REP_FLAG_ERROR != 0 => {
                // Messages are for people; a non-UTF-8 one is shown lossily.
                let msg = r.rest();
                let msg = &msg[..msg.len().min(MAX_STRING)];
                Self::Error {
                    code: t,
                    message: String::from_utf8_lossy(msg).into_owned(),
                }
            }
            t => Self::Unknown {
                reply_type: t,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The server's answer to NBD_OPT_EXPORT_NAME.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    put_u64(out, size);
    put_u16(out, flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
    }
}

/// Decodes the first 10 bytes of the reply to NBD_OPT_EXPORT_NAME: (size, flags).
pub fn decode_export_name_reply(buf: &[u8]) -> Result<(u64, u16), CodecError> {
    let mut r = Rd::new(buf);
    let v = (r.u64()?, r.u16()?);
    r.finish()?;
    Ok(v)
}

// ---------------------------------------------------------------------------
// Transmission

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_has_spec_bytes() {
        let mut out = Vec::new();
        Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(&mut out);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
        assert_eq!(Greeting::decode(&out), Ok(Greeting { flags: 3 }));
    }

    #[test]
    fn compact_request_layout() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let mut out = Vec::new();
        req.encode(false, &mut out);
        assert_eq!(out.len(), COMPACT_REQUEST_LEN);
        assert_eq!(&out[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&out[24..], &512u32.to_be_bytes());
        assert_eq!(Request::decode(&out, false), Ok(req));
        // Compact magic is a violation once extended headers are negotiated.
        assert!(matches!(
            Request::decode(&out, true),
            Err(CodecError::BadMagic(_))
        ));
        let mut ext = Vec::new();
        req.encode(true, &mut ext);
        assert_eq!(ext.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(Request::decode(&ext, true), Ok(req));
        assert!(matches!(
            Request::decode(&ext[..28], false),
            Err(CodecError::BadMagic(_))
        ));
    }

    #[test]
    fn extended_write_length_is_64_bit() {
        let req = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 1 << 33,
        };
        let mut out = Vec::new();
        req.encode(true, &mut out);
        let back = Request::decode(&out, true).unwrap();
        assert_eq!(back.length, 1 << 33);
        assert_eq!(back.payload_len(true), 1 << 33);
        let read = Request {
            command: CMD_READ,
            ..req
        };
        assert_eq!(read.payload_len(true), 0);
    }

    #[test]
    fn go_option_layout() {
        let opt = ClientOption::Go(InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE],
        });
        let mut out = Vec::new();
        opt.encode(&mut out);
        let h = OptionHeader::decode(&out[..16]).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: OPT_GO,
                length: 4 + 4 + 2 + 2
            }
        );
        assert_eq!(ClientOption::decode(h.option, &out[16..]), Ok(opt));
    }

    #[test]
    fn info_count_mismatch_is_rejected() {
        // name "a", claims 2 info requests but carries one.
        let data = [0, 0, 0, 1, b'a', 0, 2, 0, 3];
        assert!(ClientOption::decode(OPT_GO, &data).is_err());
        // name length beyond the data.
        let data = [0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(ClientOption::decode(OPT_INFO, &data).is_err());
    }

    #[test]
    fn meta_context_count_is_bounded_by_payload() {
        // export "", 2^32-1 queries, no bytes: must fail without allocating.
        let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            ClientOption::decode(OPT_SET_META_CONTEXT, &data),
            Err(CodecError::Malformed("meta context query count"))
        );
    }

    #[test]
    fn no_data_options_reject_data() {
        assert!(ClientOption::decode(OPT_STRUCTURED_REPLY, &[1]).is_err());
        assert_eq!(ClientOption::decode(OPT_LIST, &[]), Ok(ClientOption::List));
    }

    #[test]
    fn nul_in_name_is_rejected() {
        assert_eq!(
            ClientOption::decode(OPT_EXPORT_NAME, b"a\0b"),
            Err(CodecError::BadString)
        );
    }

    #[test]
    fn export_name_reply() {
        let mut out = Vec::new();
        encode_export_name_reply(1 << 30, 3, false, &mut out);
        assert_eq!(out.len(), EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES);
        assert_eq!(decode_export_name_reply(&out[..10]), Ok((1 << 30, 3)));
        out.clear();
        encode_export_name_reply(5, 1, true, &mut out);
        assert_eq!(out.len(), EXPORT_NAME_REPLY_LEN);
    }

    #[test]
    fn structured_chunk_layout() {
        let mut out = Vec::new();
        let p = ChunkPayload::OffsetHole {
            offset: 8,
            length: 4096,
        };
        encode_chunk(false, REPLY_FLAG_DONE, 9, 0, &p, &mut out);
        assert_eq!(out.len(), STRUCTURED_REPLY_LEN + 12);
        let h = ReplyHeader::decode(&out[..20]).unwrap();
        assert_eq!(
            h,
            ReplyHeader::Chunk {
                extended: false,
                flags: 1,
                chunk_type: 2,
                cookie: 9,
                offset: 0,
                length: 12
            }
        );
        assert_eq!(ChunkPayload::decode(2, &out[20..], 12), Ok(p));
    }

    #[test]
    fn block_status_ext_requires_exact_count() {
        let p = ChunkPayload::BlockStatus {
            context_id: 1,
            wide: true,
            extents: vec![Extent {
                length: 1 << 40,
                flags: 3,
            }],
        };
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out.len() as u64, p.wire_len());
        assert_eq!(ChunkPayload::decode(6, &out, p.wire_len()), Ok(p));
        // Count says 2, one extent present.
        out[7] = 2;
        assert!(ChunkPayload::decode(6, &out, 24).is_err());
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:;=/._-]{0,40}"
    }

    fn arb_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
            arb_string().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            Just(ClientOption::StructuredReply),
            Just(ClientOption::ExtendedHeaders),
            (arb_string(), proptest::collection::vec(any::<u16>(), 0..5))
                .prop_map(|(name, requests)| ClientOption::Info(InfoRequest { name, requests })),
            (arb_string(), proptest::collection::vec(any::<u16>(), 0..5))
                .prop_map(|(name, requests)| ClientOption::Go(InfoRequest { name, requests })),
            (arb_string(), proptest::collection::vec(arb_string(), 0..4)).prop_map(
                |(export, queries)| ClientOption::ListMetaContext(MetaContextRequest {
                    export,
                    queries
                })
            ),
            (arb_string(), proptest::collection::vec(arb_string(), 0..4)).prop_map(
                |(export, queries)| ClientOption::SetMetaContext(MetaContextRequest {
                    export,
                    queries
                })
            ),
            (12u32.., proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(option, data)| ClientOption::Unknown { option, data }),
        ]
    }

    fn arb_info() -> impl Strategy<Value = InfoItem> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoItem::Export { size, flags }),
            arb_string().prop_map(InfoItem::Name),
            arb_string().prop_map(InfoItem::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                InfoItem::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(kind, data)| InfoItem::Unknown { kind, data }),
        ]
    }

    fn arb_option_reply() -> impl Strategy<Value = OptionReply> {
        prop_oneof![
            Just(OptionReply::Ack),
            (arb_string(), arb_string())
                .prop_map(|(name, description)| OptionReply::Server { name, description }),
            arb_info().prop_map(OptionReply::Info),
            (any::<u32>(), arb_string())
                .prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            ((1u32..64), arb_string()).prop_map(|(c, message)| OptionReply::Error {
                code: REP_FLAG_ERROR | c,
                message
            }),
            (5u32..1000, proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(reply_type, data)| OptionReply::Unknown { reply_type, data }),
        ]
    }

    fn arb_extents(wide: bool) -> impl Strategy<Value = Vec<Extent>> {
        let max = if wide { u64::MAX } else { u32::MAX as u64 };
        proptest::collection::vec(
            (1..=max, any::<u32>()).prop_map(|(length, flags)| Extent { length, flags }),
            1..8,
        )
    }

    fn arb_chunk() -> impl Strategy<Value = ChunkPayload> {
        prop_oneof![
            Just(ChunkPayload::None),
            (any::<u64>(), 1u64..1 << 30)
                .prop_map(|(offset, data_len)| ChunkPayload::OffsetData { offset, data_len }),
            (any::<u64>(), 1u32..)
                .prop_map(|(offset, length)| ChunkPayload::OffsetHole { offset, length }),
            (any::<u32>(), arb_extents(false)).prop_map(|(context_id, extents)| {
                ChunkPayload::BlockStatus {
                    context_id,
                    wide: false,
                    extents,
                }
            }),
            (any::<u32>(), arb_extents(true)).prop_map(|(context_id, extents)| {
                ChunkPayload::BlockStatus {
                    context_id,
                    wide: true,
                    extents,
                }
            }),
            (any::<u32>(), arb_string())
                .prop_map(|(error, message)| ChunkPayload::Error { error, message }),
            (any::<u32>(), arb_string(), any::<u64>()).prop_map(|(error, message, offset)| {
                ChunkPayload::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }),
            (100u16..1000, proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(chunk_type, data)| ChunkPayload::Unknown { chunk_type, data }),
        ]
    }

    proptest! {
        #[test]
        fn option_round_trip(opt in arb_option()) {
            let mut out = Vec::new();
            opt.encode(&mut out);
            let h = OptionHeader::decode(&out[..OPTION_HEADER_LEN]).unwrap();
            prop_assert_eq!(h.length as usize, out.len() - OPTION_HEADER_LEN);
            prop_assert_eq!(ClientOption::decode(h.option, &out[OPTION_HEADER_LEN..]).unwrap(), opt);
        }

        #[test]
        fn option_reply_round_trip(rep in arb_option_reply(), option in any::<u32>()) {
            let mut out = Vec::new();
            rep.encode(option, &mut out);
            let h = OptionReplyHeader::decode(&out[..OPTION_REPLY_HEADER_LEN]).unwrap();
            prop_assert_eq!(h.option, option);
            prop_assert_eq!(h.length as usize, out.len() - OPTION_REPLY_HEADER_LEN);
            prop_assert_eq!(OptionReply::decode(h.reply_type, &out[OPTION_REPLY_HEADER_LEN..]).unwrap(), rep);
        }

        #[test]
        fn request_round_trip(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(),
                              offset in any::<u64>(), len32 in any::<u32>(), len64 in any::<u64>()) {
            let compact = Request { flags, command, cookie, offset, length: len32 as u64 };
            let mut out = Vec::new();
            compact.encode(false, &mut out);
            prop_assert_eq!(Request::decode(&out, false).unwrap(), compact);
            let ext = Request { length: len64, ..compact };
            out.clear();
            ext.encode(true, &mut out);
            prop_assert_eq!(Request::decode(&out, true).unwrap(), ext);
        }

        #[test]
        fn reply_round_trip(chunk in arb_chunk(), extended in any::<bool>(), flags in any::<u16>(),
                            cookie in any::<u64>(), offset in any::<u64>()) {
            let mut out = Vec::new();
            let req_offset = if extended { offset } else { 0 };
            encode_chunk(extended, flags, cookie, req_offset, &chunk, &mut out);
            let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
            let hl = ReplyHeader::len_for_magic(magic).unwrap();
            let h = ReplyHeader::decode(&out[..hl]).unwrap();
            let ReplyHeader::Chunk { chunk_type, length, offset: o, flags: f, cookie: c, .. } = h else {
                panic!("not a chunk");
            };
            prop_assert_eq!((o, f, c), (req_offset, flags, cookie));
            prop_assert_eq!(length, chunk.wire_len());
            prop_assert_eq!(ChunkPayload::decode(chunk_type, &out[hl..], length).unwrap(), chunk);
        }

        #[test]
        fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
            let mut out = Vec::new();
            ReplyHeader::Simple { error, cookie }.encode(&mut out);
            prop_assert_eq!(out.len(), SIMPLE_REPLY_LEN);
            prop_assert_eq!(ReplyHeader::decode(&out).unwrap(), ReplyHeader::Simple { error, cookie });
        }

        #[test]
        fn decoders_never_panic(option in any::<u32>(), t in any::<u16>(), rt in any::<u32>(),
                                data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientOption::decode(option % 16, &data);
            let _ = ClientOption::decode(option, &data);
            let _ = OptionReply::decode(rt, &data);
            let _ = OptionReply::decode(rt % 5, &data);
            let _ = ChunkPayload::decode(t, &data, data.len() as u64);
            let _ = ChunkPayload::decode(t % 7, &data, data.len() as u64);
            let _ = ReplyHeader::decode(&data);
            let _ = Request::decode(&data, false);
            let _ = Request::decode(&data, true);
            let _ = OptionHeader::decode(&data);
            let _ = Greeting::decode(&data);
        }
    }
}
