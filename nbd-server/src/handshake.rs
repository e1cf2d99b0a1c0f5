//! Server side of the NBD handshake (fixed newstyle option haggling).
//!
//! Sequence: greeting -> client flags -> options until EXPORT_NAME or a successful
//! GO (transmission), or ABORT / a violation (close). One option is handled at a
//! time; unknown options get ERR_UNSUP and haggling goes on.
//!
//! With TLS required ([`TlsPhase::Required`]) every option but STARTTLS and ABORT
//! is answered NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot be refused politely,
//! closes the connection), so a plain client learns nothing, not even the export
//! list. STARTTLS is acknowledged and [`haggle`] returns [`Haggled::StartTls`]: the
//! caller runs the TLS handshake and haggles again over TLS ([`TlsPhase::Done`]).

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
/// Context id of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Context ids of `qemu:dirty-bitmap:NAME`: this plus the bitmap's place in the
/// selection.
pub const DIRTY_BITMAP_FIRST_ID: u32 = 2;
/// Prefix of the dirty bitmap meta contexts (qemu's namespace, read by qemu-img and
/// nbdinfo; flag 1 means dirty).
pub const META_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
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
    /// Context ids of the dirty bitmaps the client selected.
    pub bitmaps: Vec<(u32, Arc<crate::bitmap::DirtyBitmap>)>,
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
    #[error("EXPORT_NAME before STARTTLS on a server that requires TLS")]
    TlsRequired,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// The server offers no TLS: STARTTLS gets ERR_UNSUP.
    Off,
    /// TLS is required and not yet on.
    Required,
    /// The connection runs over TLS: a second STARTTLS gets ERR_INVALID.
    Done,
}

/// The client's flags, kept across the switch to TLS.
#[derive(Debug, Clone, Copy)]
pub struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

/// How option haggling ended (short of an error).
#[derive(Debug)]
pub enum Haggled {
    Transmission(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls(ClientFlags),
}

#[derive(Default)]
struct State {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name the meta context selection applies to, and what it chose.
    meta: Option<(String, MetaSelection)>,
}

/// The meta contexts a SET_META_CONTEXT chose.
#[derive(Debug, Default, Clone)]
struct MetaSelection {
    base_allocation: bool,
    /// Bitmap names, in context id order.
    bitmaps: Vec<String>,
}

/// What LIST or SET of `queries` matches on `export`, in reply order.
fn match_contexts(export: &Export, queries: &[String], set: bool) -> MetaSelection {
    let names = export.bitmaps.names();
    let mut sel = MetaSelection::default();
    let add_bitmap = |sel: &mut MetaSelection, n: &str| {
        if !sel.bitmaps.iter().any(|b| b == n) {
            sel.bitmaps.push(n.to_owned());
        }
    };
    if !set && queries.is_empty() {
        sel.base_allocation = true;
        for n in &names {
            add_bitmap(&mut sel, n);
        }
        return sel;
    }
    for q in queries {
        if q == META_BASE_ALLOCATION || (!set && q == "base:") {
            sel.base_allocation = true;
        } else if let Some(n) = q.strip_prefix(META_DIRTY_BITMAP) {
            if n.is_empty() && !set {
                for n in &names {
                    add_bitmap(&mut sel, n);
                }
            } else if names.iter().any(|b| b == n) {
                add_bitmap(&mut sel, n);
            }
        } else if !set && q == "qemu:" {
            for n in &names {
                add_bitmap(&mut sel, n);
            }
        }
    }
    sel
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

/// Runs the handshake of a server without TLS up to transmission; a client ABORT
/// is `Err(Aborted)`.
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    registry: &ExportRegistry,
) -> Result<Negotiated, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let flags = greet(r, w).await?;
    match haggle(r, w, registry, flags, TlsPhase::Off).await? {
        Haggled::Transmission(n) => Ok(n),
        Haggled::StartTls(_) => Err(HandshakeError::Protocol("STARTTLS without TLS")),
    }
}

/// Sends the greeting and reads the client's flags.
pub async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<ClientFlags, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(32);
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
    Ok(ClientFlags {
        fixed: cflags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Option haggling, from the client's flags (or from the TLS handshake) on, until
/// transmission or an acknowledged STARTTLS.
pub async fn haggle<R, W>(
    r: &mut R,
    w: &mut W,
    registry: &ExportRegistry,
    client: ClientFlags,
    tls: TlsPhase,
) -> Result<Haggled, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    // Nothing negotiated before TLS carries over (the spec: state is reset).
    let mut st = State {
        fixed: client.fixed,
        no_zeroes: client.no_zeroes,
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
        if tls == TlsPhase::Required {
            match opt {
                ClientOption::StartTls => {
                    reply(&mut out, option, OptionReply::Ack);
                    send(w, &out).await?;
                    return Ok(Haggled::StartTls(client));
                }
                ClientOption::Abort => {}
                ClientOption::ExportName(_) => return Err(HandshakeError::TlsRequired),
                _ => {
                    err(
                        &mut out,
                        option,
                        REP_ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    send(w, &out).await?;
                    continue;
                }
            }
        }
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
                return Ok(Haggled::Transmission(finish(st, export, binding, flags)));
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
                if tls == TlsPhase::Done {
                    err(&mut out, option, REP_ERR_INVALID, "TLS is already on");
                } else {
                    err(
                        &mut out,
                        option,
                        REP_ERR_UNSUP,
                        "this server does not offer TLS",
                    );
                }
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
                } else if let Some(export) = lookup(registry, split_lease(&req.export).0) {
                    let sel = match_contexts(&export, &req.queries, set);
                    if sel.base_allocation {
                        reply(
                            &mut out,
                            option,
                            OptionReply::MetaContext {
                                id: BASE_ALLOCATION_ID,
                                name: META_BASE_ALLOCATION.into(),
                            },
                        );
                    }
                    for (i, n) in sel.bitmaps.iter().enumerate() {
                        reply(
                            &mut out,
                            option,
                            OptionReply::MetaContext {
                                id: DIRTY_BITMAP_FIRST_ID + i as u32,
                                name: format!("{META_DIRTY_BITMAP}{n}"),
                            },
                        );
                    }
                    if set {
                        st.meta = Some((req.export.clone(), sel));
                    }
                    reply(&mut out, option, OptionReply::Ack);
                } else {
                    err(&mut out, option, REP_ERR_UNKNOWN, "unknown export");
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
                                return Ok(Haggled::Transmission(finish(
                                    st, export, binding, flags,
                                )));
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
    let sel = match st.meta {
        Some((_, sel)) if st.structured => sel,
        _ => MetaSelection::default(),
    };
    let base_allocation = sel.base_allocation.then_some(BASE_ALLOCATION_ID);
    // A bitmap deleted since SET_META_CONTEXT is simply not reported.
    let bitmaps = sel
        .bitmaps
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some((DIRTY_BITMAP_FIRST_ID + i as u32, export.bitmap(n)?)))
        .collect();
    Negotiated {
        export,
        binding,
        structured: st.structured,
        extended: st.extended,
        base_allocation,
        bitmaps,
        flags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    #[test]
    fn meta_contexts_list_and_select_dirty_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.img");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let spec = crate::export::ExportSpec {
            name: "m".into(),
            path: p,
            read_only: false,
            unleased: true,
            lease_reads: false,
            description: None,
        };
        let e = Export::open(&spec).unwrap();
        e.create_bitmap("b", 65536).unwrap();
        e.create_bitmap("a", 4096).unwrap();
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = match_contexts(&e, &[], false);
        assert!(all.base_allocation);
        assert_eq!(all.bitmaps, ["a", "b"]);
        let l = match_contexts(&e, &q(&["qemu:"]), false);
        assert!(!l.base_allocation);
        assert_eq!(l.bitmaps, ["a", "b"]);
        assert_eq!(
            match_contexts(&e, &q(&["qemu:dirty-bitmap:"]), false)
                .bitmaps
                .len(),
            2
        );
        // SET takes exact names only, in query order, once each; unknown ones are ignored.
        let s = match_contexts(
            &e,
            &q(&[
                "qemu:dirty-bitmap:b",
                "base:allocation",
                "qemu:dirty-bitmap:zz",
                "qemu:dirty-bitmap:b",
                "qemu:",
            ]),
            true,
        );
        assert!(s.base_allocation);
        assert_eq!(s.bitmaps, ["b"]);
        assert!(
            match_contexts(&e, &q(&["qemu:dirty-bitmap:"]), true)
                .bitmaps
                .is_empty()
        );
    }

    const FIXED: ClientFlags = ClientFlags {
        fixed: true,
        no_zeroes: true,
    };

    async fn send_opt(c: &mut DuplexStream, opt: ClientOption) {
        let mut out = Vec::new();
        opt.encode(&mut out);
        c.write_all(&out).await.unwrap();
    }

    /// The reply type of the next option reply (its payload skipped).
    async fn reply_type(c: &mut DuplexStream) -> u32 {
        let mut hb = [0u8; codec::OPTION_REPLY_HEADER_LEN];
        c.read_exact(&mut hb).await.unwrap();
        let h = codec::OptionReplyHeader::decode(&hb).unwrap();
        let mut skip = vec![0u8; h.length as usize];
        c.read_exact(&mut skip).await.unwrap();
        h.reply_type
    }

    fn go() -> ClientOption {
        ClientOption::Go(codec::InfoRequest {
            name: "disk".into(),
            requests: vec![],
        })
    }

    /// Runs `haggle` in `phase` on one end of a pipe; the test drives the other.
    fn server(
        phase: TlsPhase,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<Haggled, HandshakeError>>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(server);
            haggle(&mut r, &mut w, &ExportRegistry::default(), FIXED, phase).await
        });
        (client, task)
    }

    #[tokio::test]
    async fn tls_required_refuses_every_option_but_starttls_and_abort() {
        let (mut c, task) = server(TlsPhase::Required);
        for opt in [
            ClientOption::List,
            go(),
            ClientOption::StructuredReply,
            ClientOption::ExtendedHeaders,
        ] {
            send_opt(&mut c, opt).await;
            assert_eq!(reply_type(&mut c).await, REP_ERR_TLS_REQD);
        }
        send_opt(&mut c, ClientOption::StartTls).await;
        assert_eq!(reply_type(&mut c).await, REP_ACK);
        assert!(matches!(task.await.unwrap(), Ok(Haggled::StartTls(_))));

        // EXPORT_NAME cannot be refused politely: the connection closes.
        let (mut c, task) = server(TlsPhase::Required);
        send_opt(&mut c, ClientOption::ExportName("disk".into())).await;
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::TlsRequired)
        ));

        let (mut c, task) = server(TlsPhase::Required);
        send_opt(&mut c, ClientOption::Abort).await;
        assert_eq!(reply_type(&mut c).await, REP_ACK);
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::Aborted)));
    }

    #[tokio::test]
    async fn starttls_twice_is_invalid_and_without_tls_unsupported() {
        let (mut c, task) = server(TlsPhase::Done);
        send_opt(&mut c, ClientOption::StartTls).await;
        assert_eq!(reply_type(&mut c).await, REP_ERR_INVALID);
        // Haggling goes on over TLS.
        send_opt(&mut c, ClientOption::List).await;
        assert_eq!(reply_type(&mut c).await, REP_ACK);
        send_opt(&mut c, ClientOption::Abort).await;
        assert_eq!(reply_type(&mut c).await, REP_ACK);
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::Aborted)));

        let (mut c, task) = server(TlsPhase::Off);
        send_opt(&mut c, ClientOption::StartTls).await;
        assert_eq!(reply_type(&mut c).await, REP_ERR_UNSUP);
        send_opt(&mut c, ClientOption::Abort).await;
        assert_eq!(reply_type(&mut c).await, REP_ACK);
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::Aborted)));
    }
}
