//! Server side of the NBD handshake (fixed newstyle option haggling).
//!
//! Sequence: greeting -> client flags -> options until EXPORT_NAME or a successful
//! GO (transmission), or ABORT / a violation (close). One option is handled at a
//! time; unknown options get ERR_UNSUP and haggling goes on.

use std::sync::Arc;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{Export, ExportRegistry, split_lease};
use crate::lease::Binding;
use nbd_proto::{
    self as codec, ClientOption, CodecError, InfoItem, OptionHeader, OptionReply, consts::*,
};

/// Largest option payload we read; longer ones are skipped and answered ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Context id of `base:allocation` (the only meta context served).
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Advertised block sizes: any alignment works, 4 KiB is preferred.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Maximum payload of one request (reads and writes).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What option haggling settled.
#[derive(Debug)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub binding: Binding,
    pub structured: bool,
    pub extended: bool,
    /// Context id for base:allocation when the client selected it.
    pub base_allocation: Option<u32>,
    pub flags: u16,
}

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("bad message: {0}")]
    Codec(#[from] CodecError),
    #[error("client aborted")]
    Aborted,
    #[error("unknown export requested through EXPORT_NAME")]
    UnknownExport,
    #[error("export refused: {0}")]
    Refused(String),
}

#[derive(Default)]
struct State {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name the meta context selection applies to, and whether it chose base:allocation.
    meta: Option<(String, bool)>,
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await
}

fn reply(out: &mut Vec<u8>, option: u32, r: OptionReply) {
    r.encode(option, out);
}

fn err(out: &mut Vec<u8>, option: u32, code: u32, msg: &str) {
    reply(
        out,
        option,
        OptionReply::Error {
            code,
            message: msg.to_owned(),
        },
    );
}

fn lookup(registry: &ExportRegistry, name: &str) -> Option<Arc<Export>> {
    if name.is_empty() {
        registry.default_export()
    } else {
        registry.get(name)
    }
}

/// Runs the handshake up to transmission; a client ABORT is `Err(Aborted)`.
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    registry: &ExportRegistry,
) -> Result<Negotiated, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    codec::Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode(&mut out);
    send(w, &out).await?;

    let cflags = r.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The spec: an unknown client flag MUST make the server drop the connection.
        return Err(HandshakeError::Protocol("unknown client flags"));
    }
    let mut st = State {
        fixed: cflags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };

    loop {
        let mut hb = [0u8; codec::OPTION_HEADER_LEN];
        r.read_exact(&mut hb).await?;
        let h = OptionHeader::decode(&hb)?;
        out.clear();
        if h.length > MAX_OPTION_LEN {
            if h.option == OPT_EXPORT_NAME || !st.fixed {
                return Err(HandshakeError::Protocol("oversized option"));
            }
            // Skip the payload without buffering it, then refuse the option.
            let mut left = h.length as u64;
            let mut sink = [0u8; 4096];
            while left > 0 {
                let n = left.min(sink.len() as u64) as usize;
                r.read_exact(&mut sink[..n]).await?;
                left -= n as u64;
            }
            err(&mut out, h.option, REP_ERR_TOO_BIG, "option too large");
            send(w, &out).await?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        r.read_exact(&mut data).await?;
        let opt = match ClientOption::decode(h.option, &data) {
            Ok(o) => o,
            Err(e) => {
                if h.option == OPT_EXPORT_NAME || !st.fixed {
                    return Err(e.into());
                }
                err(
                    &mut out,
                    h.option,
                    REP_ERR_INVALID,
                    &format!("malformed option: {e}"),
                );
                send(w, &out).await?;
                continue;
            }
        };
        if !st.fixed && !matches!(opt, ClientOption::ExportName(_)) {
            // Without fixed newstyle there is no way to report an error: close.
            return Err(HandshakeError::Protocol("option without fixed newstyle"));
        }
        let option = h.option;
        match opt {
            ClientOption::ExportName(requested) => {
                let (name, token) = split_lease(&requested);
                let export = lookup(registry, name).ok_or(HandshakeError::UnknownExport)?;
                let binding = export
                    .lease
                    .bind(token, export.read_only)
                    .map_err(|e| HandshakeError::Refused(e.to_string()))?;
                let flags = binding.transmission_flags(export.transmission_flags(st.structured));
                codec::encode_export_name_reply(export.size, flags, st.no_zeroes, &mut out);
                send(w, &out).await?;
                return Ok(finish(st, export, binding, flags));
            }
            ClientOption::Abort => {
                // The spec asks for an ACK; the client may already be gone.
                reply(&mut out, option, OptionReply::Ack);
                let _ = send(w, &out).await;
                return Err(HandshakeError::Aborted);
            }
            ClientOption::List => {
                for e in registry.list() {
                    let description = e.description.clone().unwrap_or_default();
                    reply(
                        &mut out,
                        option,
                        OptionReply::Server {
                            name: e.name.clone(),
                            description,
                        },
                    );
                }
                reply(&mut out, option, OptionReply::Ack);
            }
            ClientOption::StartTls => {
                err(
                    &mut out,
                    option,
                    REP_ERR_UNSUP,
                    "this server does not offer TLS",
                );
            }
            ClientOption::StructuredReply => {
                if st.extended {
                    err(
                        &mut out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if st.structured {
                    err(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    st.structured = true;
                    reply(&mut out, option, OptionReply::Ack);
                }
            }
            ClientOption::ExtendedHeaders => {
                if st.extended {
                    err(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    // Extended headers imply structured replies.
                    st.extended = true;
                    st.structured = true;
                    reply(&mut out, option, OptionReply::Ack);
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = option == OPT_SET_META_CONTEXT;
                if set && !st.structured {
                    err(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "meta contexts need structured replies",
                    );
                } else if lookup(registry, split_lease(&req.export).0).is_none() {
                    err(&mut out, option, REP_ERR_UNKNOWN, "unknown export");
                } else {
                    let matched = if set {
                        req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
                    } else {
                        req.queries.is_empty()
                            || req
                                .queries
                                .iter()
                                .any(|q| q == META_BASE_ALLOCATION || q == "base:")
                    };
                    if matched {
                        reply(
                            &mut out,
                            option,
                            OptionReply::MetaContext {
                                id: BASE_ALLOCATION_ID,
                                name: META_BASE_ALLOCATION.into(),
                            },
                        );
                    }
                    if set {
                        st.meta = Some((req.export.clone(), matched));
                    }
                    reply(&mut out, option, OptionReply::Ack);
                }
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = option == OPT_GO;
                let (name, token) = split_lease(&req.name);
                match lookup(registry, name) {
                    None => err(&mut out, option, REP_ERR_UNKNOWN, "unknown export"),
                    Some(export) => match export.lease.bind(token, export.read_only) {
                        Err(e) => err(&mut out, option, REP_ERR_POLICY, &e.to_string()),
                        Ok(binding) => {
                            let flags = binding
                                .transmission_flags(export.transmission_flags(st.structured));
                            reply(
                                &mut out,
                                option,
                                OptionReply::Info(InfoItem::Export {
                                    size: export.size,
                                    flags,
                                }),
                            );
                            if req.requests.contains(&INFO_NAME) {
                                reply(
                                    &mut out,
                                    option,
                                    OptionReply::Info(InfoItem::Name(export.name.clone())),
                                );
                            }
                            if req.requests.contains(&INFO_DESCRIPTION)
                                && let Some(d) = &export.description
                            {
                                reply(
                                    &mut out,
                                    option,
                                    OptionReply::Info(InfoItem::Description(d.clone())),
                                );
                            }
                            // Sent unasked too: clients that do not ask simply skip it.
                            reply(
                                &mut out,
                                option,
                                OptionReply::Info(InfoItem::BlockSize {
                                    min: MIN_BLOCK,
                                    preferred: PREFERRED_BLOCK,
                                    max: MAX_PAYLOAD,
                                }),
                            );
                            reply(&mut out, option, OptionReply::Ack);
                            if go {
                                send(w, &out).await?;
                                // A selection made for another export name does not apply.
                                if st.meta.as_ref().is_some_and(|(n, _)| *n != req.name) {
                                    st.meta = None;
                                }
                                return Ok(finish(st, export, binding, flags));
                            }
                        }
                    },
                }
            }
            ClientOption::Unknown { .. } => {
                err(&mut out, option, REP_ERR_UNSUP, "option not supported");
            }
        }
        send(w, &out).await?;
    }
}

fn finish(st: State, export: Arc<Export>, binding: Binding, flags: u16) -> Negotiated {
    let base_allocation = match st.meta {
        Some((_, true)) if st.structured => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Negotiated {
        export,
        binding,
        structured: st.structured,
        extended: st.extended,
        base_allocation,
        flags,
    }
}
