//! The handshake: greeting, options and their replies.

use super::*;

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
