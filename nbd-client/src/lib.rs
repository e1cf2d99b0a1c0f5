//! An async NBD client (tokio), for the agent's guest disks and disk mirroring.
//!
//! It negotiates extended headers (or else structured replies) and the
//! `base:allocation` meta context when the server offers them, enters transmission
//! with NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME for servers without GO),
//! and keeps many requests in flight: each request registers a waiter under a
//! fresh cookie before it is sent, and one reader task routes every reply chunk
//! to its waiter, so replies may arrive in any order.
//!
//! [`ClientOptions::lease`] opens a leased export with its token (sent as
//! `EXPORT;lease=TOKEN` in the handshake only; no `Debug` shows it), and
//! [`ClientOptions::tls`] requires TLS: NBD_OPT_STARTTLS, then a rustls handshake
//! checking the server's certificate (and presenting the config's client
//! certificate, which a stagehand-nbd with `--tls-*` requires).
//!
//! ```no_run
//! # async fn demo() -> Result<(), nbd_client::ClientError> {
//! use nbd_client::{Client, ClientOptions};
//! let c = Client::connect_tcp("127.0.0.1:10809", ClientOptions::new("disk")).await?;
//! c.write(0, b"hello", true).await?;
//! assert_eq!(c.read(0, 5).await?, b"hello");
//! c.disconnect().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::io::IoSlice;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::ServerName;
use stagehand_common::secret::Secret;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use nbd_proto::{
    self as codec, ChunkPayload, ClientOption, CodecError, Extent, InfoItem, InfoRequest,
    MetaContextRequest, OptionReply, OptionReplyHeader, ReplyHeader, Request, consts::*,
};

mod handshake;

use handshake::*;

/// Largest option reply or non-data reply chunk we accept.
const MAX_REPLY_PAYLOAD: u64 = 64 << 20;
/// Largest payload we send or accept when the server advertises no maximum.
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("bad message: {0}")]
    Codec(#[from] CodecError),
    #[error("server refused option {option}: {code:#x} {message}")]
    Refused {
        option: u32,
        code: u32,
        message: String,
    },
    #[error("server error {errno}: {message}")]
    Server { errno: u32, message: String },
    #[error("request too large: {0} bytes")]
    TooLarge(u64),
    #[error("connection closed")]
    Closed,
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
}

impl ClientError {
    /// The NBD errno of a failed request, if that is what this is.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Self::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What to ask for during the handshake.
///
/// ```no_run
/// # fn demo(cfg: std::sync::Arc<rustls::ClientConfig>, lease: &stagehand_common::secret::Secret)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// use nbd_client::ClientOptions;
/// let name = stagehand_common::tls::server_name("storage-1:10809")?;
/// let opts = ClientOptions::new("vm7").lease(lease).tls(cfg, name);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    pub export: String,
    pub structured: bool,
    pub extended: bool,
    pub base_allocation: bool,
    /// Sent as `EXPORT;lease=TOKEN` on the wire only; never shown.
    lease: Option<Secret>,
    tls: Option<ClientTls>,
}

/// TLS for a connection: NBD_OPT_STARTTLS, then a rustls handshake that checks the
/// server against `config`'s roots under `server_name`.
#[derive(Clone)]
struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

/// Never prints the lease token.
impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("export", &self.export)
            .field("structured", &self.structured)
            .field("extended", &self.extended)
            .field("base_allocation", &self.base_allocation)
            .field("lease", &self.lease.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.as_ref().map(|t| t.server_name.to_str()))
            .finish()
    }
}

impl ClientOptions {
    /// Everything on: extended headers, structured replies, base:allocation; no
    /// lease, no TLS.
    pub fn new(export: &str) -> Self {
        Self {
            export: export.to_owned(),
            structured: true,
            extended: true,
            base_allocation: true,
            lease: None,
            tls: None,
        }
    }

    /// Opens the export with a lease token (`EXPORT;lease=TOKEN` on the wire).
    pub fn lease(mut self, token: &Secret) -> Self {
        self.lease = Some(token.clone());
        self
    }

    /// Requires TLS: NBD_OPT_STARTTLS, then a TLS handshake with `config` (its roots
    /// check the server, its client certificate, if any, is presented) for
    /// `server_name` (see `stagehand_common::tls::server_name`).
    pub fn tls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Self {
        self.tls = Some(ClientTls {
            config,
            server_name,
        });
        self
    }

    /// Whether this connection will use TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The export name as sent on the wire (with the lease token, if any).
    fn wire_name(&self) -> String {
        match &self.lease {
            Some(t) => format!("{};lease={}", self.export, t.expose()),
            None => self.export.clone(),
        }
    }
}

/// What the handshake settled.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub extended: bool,
    pub base_allocation: Option<u32>,
    pub block_size: Option<(u32, u32, u32)>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    fn max_payload(&self) -> u32 {
        self.block_size.map(|b| b.2).unwrap_or(DEFAULT_MAX_PAYLOAD)
    }
}

/// Flags for [`Client::write_zeroes`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroFlags {
    pub fua: bool,
    pub no_hole: bool,
    pub fast: bool,
}

enum Kind {
    Plain,
    Read { offset: u64, buf: Vec<u8> },
    Status { extents: Vec<Extent> },
}

enum Outcome {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

struct Waiter {
    kind: Kind,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Outcome, ClientError>>,
}

impl Waiter {
    fn complete(self) {
        let r = match (self.error, self.kind) {
            (Some((errno, message)), _) => Err(ClientError::Server { errno, message }),
            (None, Kind::Plain) => Ok(Outcome::Done),
            (None, Kind::Read { buf, .. }) => Ok(Outcome::Data(buf)),
            (None, Kind::Status { extents }) => Ok(Outcome::Extents(extents)),
        };
        let _ = self.tx.send(r);
    }
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    closed: bool,
}

type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

struct Inner {
    info: ExportInfo,
    writer: tokio::sync::Mutex<BoxWrite>,
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
}

/// A connected NBD client; share it (`Arc<Client>`) to issue requests concurrently.
pub struct Client {
    inner: Arc<Inner>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Client {
    /// Connects over TCP (`HOST:PORT`), with TCP_NODELAY; over TLS when `opts` ask.
    pub async fn connect_tcp(addr: &str, opts: ClientOptions) -> Result<Self, ClientError> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        if opts.uses_tls() {
            return Self::handshake_stream(s, opts).await;
        }
        let (r, w) = s.into_split();
        Self::handshake(r, w, opts).await
    }

    /// Connects over a Unix socket; over TLS when `opts` ask.
    pub async fn connect_unix(path: &Path, opts: ClientOptions) -> Result<Self, ClientError> {
        let s = tokio::net::UnixStream::connect(path).await?;
        if opts.uses_tls() {
            return Self::handshake_stream(s, opts).await;
        }
        let (r, w) = s.into_split();
        Self::handshake(r, w, opts).await
    }

    /// Runs the handshake over a whole byte stream (TLS needs it whole: the stream
    /// changes hands after NBD_OPT_STARTTLS), then starts the reply reader.
    pub async fn handshake_stream<S>(s: S, opts: ClientOptions) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(tls) = opts.tls.clone() else {
            let (r, w) = tokio::io::split(s);
            return Self::handshake(r, w, opts).await;
        };
        let (mut r, mut w) = tokio::io::split(s);
        let no_zeroes = greet(&mut r, &mut w).await?;
        send_option(&mut w, &ClientOption::StartTls).await?;
        match read_option_reply(&mut r, OPT_STARTTLS).await? {
            OptionReply::Ack => {}
            OptionReply::Error { code, message } => {
                return Err(ClientError::Refused {
                    option: OPT_STARTTLS,
                    code,
                    message,
                });
            }
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
        // Nothing else was read: the reads above took exact lengths, unbuffered.
        let s = r.unsplit(w);
        let stream = tokio_rustls::TlsConnector::from(tls.config)
            .connect(tls.server_name, s)
            .await
            .map_err(ClientError::Tls)?;
        let (r, w) = tokio::io::split(stream);
        Self::start(r, w, opts, Some(no_zeroes)).await
    }

    /// Runs the handshake over any byte stream (plain only; for TLS see
    /// [`Client::handshake_stream`]), then starts the reply reader.
    pub async fn handshake<R, W>(r: R, w: W, opts: ClientOptions) -> Result<Self, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        if opts.uses_tls() {
            return Err(ClientError::Protocol(
                "TLS needs the whole stream: use Client::handshake_stream".into(),
            ));
        }
        Self::start(r, w, opts, None).await
    }

    /// Option haggling (after the greeting when `greeted` says how it went) and the
    /// reply reader.
    async fn start<R, W>(
        r: R,
        w: W,
        opts: ClientOptions,
        greeted: Option<bool>,
    ) -> Result<Self, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut w: BoxWrite = Box::new(w);
        let no_zeroes = match greeted {
            Some(n) => n,
            None => greet(&mut r, &mut w).await?,
        };
        let info = negotiate(&mut r, &mut w, &opts, no_zeroes).await?;
        let inner = Arc::new(Inner {
            info,
            writer: tokio::sync::Mutex::new(w),
            pending: Mutex::new(Pending::default()),
            next_cookie: AtomicU64::new(1),
        });
        let reader = tokio::spawn(reader_task(r, Arc::clone(&inner)));
        Ok(Self { inner, reader })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
        kind: Kind,
    ) -> Result<Outcome, ClientError> {
        let info = &self.inner.info;
        if !info.extended && length > u32::MAX as u64 {
            return Err(ClientError::TooLarge(length));
        }
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.inner.pending.lock().map_err(|_| ClientError::Closed)?;
            if p.closed {
                return Err(ClientError::Closed);
            }
            p.waiters.insert(
                cookie,
                Waiter {
                    kind,
                    error: None,
                    tx,
                },
            );
        }
        let mut head = Vec::with_capacity(32);
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(info.extended, &mut head);
        let sent = {
            let mut w = self.inner.writer.lock().await;
            let r = write_all_vectored(&mut w, &head, payload).await;
            match r {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = sent {
            if let Ok(mut p) = self.inner.pending.lock() {
                p.waiters.remove(&cookie);
            }
            return Err(e.into());
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        if len > self.inner.info.max_payload() {
            return Err(ClientError::TooLarge(len as u64));
        }
        let kind = Kind::Read {
            offset,
            buf: vec![0u8; len as usize],
        };
        match self
            .request(CMD_READ, 0, offset, len as u64, &[], kind)
            .await?
        {
            Outcome::Data(d) => Ok(d),
            _ => Err(ClientError::Protocol("read completed without data".into())),
        }
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        if data.len() as u64 > self.inner.info.max_payload() as u64 {
            return Err(ClientError::TooLarge(data.len() as u64));
        }
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(
            CMD_WRITE,
            flags,
            offset,
            data.len() as u64,
            data,
            Kind::Plain,
        )
        .await
        .map(|_| ())
    }

    /// Makes every write the server has acknowledged durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[], Kind::Plain)
            .await
            .map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_TRIM, flags, offset, len, &[], Kind::Plain)
            .await
            .map(|_| ())
    }

    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.request(CMD_CACHE, 0, offset, len, &[], Kind::Plain)
            .await
            .map(|_| ())
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        f: ZeroFlags,
    ) -> Result<(), ClientError> {
        let mut flags = 0;
        if f.fua {
            flags |= CMD_FLAG_FUA;
        }
        if f.no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if f.fast {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        self.request(CMD_WRITE_ZEROES, flags, offset, len, &[], Kind::Plain)
            .await
            .map(|_| ())
    }

    /// base:allocation extents from `offset` (needs the context negotiated).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<Extent>, ClientError> {
        if self.inner.info.base_allocation.is_none() {
            return Err(ClientError::Protocol(
                "base:allocation was not negotiated".into(),
            ));
        }
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        match self
            .request(
                CMD_BLOCK_STATUS,
                flags,
                offset,
                len,
                &[],
                Kind::Status {
                    extents: Vec::new(),
                },
            )
            .await?
        {
            Outcome::Extents(e) => Ok(e),
            _ => Err(ClientError::Protocol("block status without extents".into())),
        }
    }

    /// Sends NBD_CMD_DISC (a soft disconnect) and closes the connection. Requests
    /// still in flight get their replies first: callers await them before this.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        let mut head = Vec::with_capacity(32);
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        Request {
            flags: 0,
            command: CMD_DISC,
            cookie,
            offset: 0,
            length: 0,
        }
        .encode(self.inner.info.extended, &mut head);
        let mut w = self.inner.writer.lock().await;
        w.write_all(&head).await?;
        w.flush().await?;
        // The server may close as soon as it reads NBD_CMD_DISC (the spec allows it);
        // our shutdown (over TLS: a close_notify) can then meet a closed socket. The
        // request is sent, so that is a clean end, not an error.
        match w.shutdown().await {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(e.into()),
        }
        drop(w);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.reader).await;
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn write_all_vectored(w: &mut BoxWrite, head: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(head), IoSlice::new(payload)];
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

async fn reader_task<R: AsyncRead + Unpin>(mut r: R, inner: Arc<Inner>) {
    let res = read_replies(&mut r, &inner).await;
    let waiters = match inner.pending.lock() {
        Ok(mut p) => {
            p.closed = true;
            std::mem::take(&mut p.waiters)
        }
        Err(_) => HashMap::new(),
    };
    for (_, w) in waiters {
        let err = match &res {
            Err(e) => ClientError::Protocol(e.to_string()),
            Ok(()) => ClientError::Closed,
        };
        let _ = w.tx.send(Err(err));
    }
}

fn take_waiter(inner: &Inner, cookie: u64) -> Result<Waiter, ClientError> {
    inner
        .pending
        .lock()
        .map_err(|_| ClientError::Closed)?
        .waiters
        .remove(&cookie)
        .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))
}

async fn read_replies<R: AsyncRead + Unpin>(r: &mut R, inner: &Inner) -> Result<(), ClientError> {
    let mut hb = [0u8; codec::EXTENDED_REPLY_LEN];
    loop {
        match r.read_exact(&mut hb[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
        let hl = ReplyHeader::len_for_magic(magic).ok_or(CodecError::BadMagic(magic as u64))?;
        r.read_exact(&mut hb[4..hl]).await?;
        let h = ReplyHeader::decode(&hb[..hl])?;
        let mut waiter = take_waiter(inner, h.cookie())?;
        match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    waiter.error = Some((error, String::new()));
                } else if let Kind::Read { buf, .. } = &mut waiter.kind {
                    if inner.info.structured {
                        return Err(ClientError::Protocol(
                            "simple reply to a read after structured replies".into(),
                        ));
                    }
                    r.read_exact(buf).await?;
                }
                waiter.complete();
            }
            ReplyHeader::Chunk {
                flags,
                chunk_type,
                length,
                extended,
                ..
            } => {
                if extended != inner.info.extended {
                    return Err(ClientError::Protocol(
                        "reply header of the wrong kind".into(),
                    ));
                }
                chunk(r, &mut waiter, chunk_type, length).await?;
                if flags & REPLY_FLAG_DONE != 0 {
                    waiter.complete();
                } else if let Ok(mut p) = inner.pending.lock() {
                    p.waiters.insert(h.cookie(), waiter);
                }
            }
        }
    }
}

async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    waiter: &mut Waiter,
    chunk_type: u16,
    length: u64,
) -> Result<(), ClientError> {
    if chunk_type == REPLY_TYPE_OFFSET_DATA {
        let Kind::Read { offset, buf } = &mut waiter.kind else {
            return Err(ClientError::Protocol(
                "data chunk for a request that reads nothing".into(),
            ));
        };
        if length < 9 {
            return Err(ClientError::Protocol("short OFFSET_DATA chunk".into()));
        }
        let data_off = r.read_u64().await?;
        let n = length - 8;
        let start = data_off
            .checked_sub(*offset)
            .filter(|s| s.saturating_add(n) <= buf.len() as u64);
        let Some(start) = start else {
            return Err(ClientError::Protocol(
                "data chunk outside the request".into(),
            ));
        };
        r.read_exact(&mut buf[start as usize..(start + n) as usize])
            .await?;
        return Ok(());
    }
    if length > MAX_REPLY_PAYLOAD {
        return Err(ClientError::Protocol("reply chunk too long".into()));
    }
    let mut data = vec![0u8; length as usize];
    r.read_exact(&mut data).await?;
    match ChunkPayload::decode(chunk_type, &data, length)? {
        ChunkPayload::None => {}
        ChunkPayload::OffsetHole {
            offset: hole_off,
            length: n,
        } => {
            let Kind::Read { offset, buf } = &mut waiter.kind else {
                return Err(ClientError::Protocol(
                    "hole chunk for a request that reads nothing".into(),
                ));
            };
            let start = hole_off
                .checked_sub(*offset)
                .filter(|s| s.saturating_add(n as u64) <= buf.len() as u64);
            let Some(start) = start else {
                return Err(ClientError::Protocol(
                    "hole chunk outside the request".into(),
                ));
            };
            buf[start as usize..start as usize + n as usize].fill(0);
        }
        ChunkPayload::BlockStatus { extents: e, .. } => match &mut waiter.kind {
            Kind::Status { extents } => extents.extend(e),
            _ => {
                return Err(ClientError::Protocol(
                    "block status for another command".into(),
                ));
            }
        },
        ChunkPayload::Error { error, message }
        | ChunkPayload::ErrorOffset { error, message, .. } => {
            // The first error is the one reported.
            waiter.error.get_or_insert((error, message));
        }
        ChunkPayload::OffsetData { .. } => {}
        ChunkPayload::Unknown { chunk_type, .. } => {
            if chunk_type & 0x8000 != 0 {
                waiter
                    .error
                    .get_or_insert((EIO, format!("unknown error chunk {chunk_type}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_goes_on_the_wire_only_and_debug_hides_it() {
        let token = Secret::new("s3cret-lease-token").expect("token");
        let o = ClientOptions::new("vm7").lease(&token);
        assert_eq!(o.wire_name(), "vm7;lease=s3cret-lease-token");
        let shown = format!("{o:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert_eq!(ClientOptions::new("vm7").wire_name(), "vm7");
    }
}
