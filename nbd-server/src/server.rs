//! Listeners and connection lifecycle: accept on TCP and/or a Unix socket, run the
//! handshake, then the transmission phase, until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::bufpool::BufPool;
use crate::config::Config;
use crate::conn;
use crate::dataplane::DataPlane;
use crate::export::{Export, ExportError, ExportRegistry};
use crate::handshake::{self, Haggled, HandshakeError, Negotiated, TlsPhase};
use crate::io::IoEngine;

/// A client must finish option haggling within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the I/O engine: {0}")]
    Engine(std::io::Error),
    #[error("cannot start the data-plane threads: {0}")]
    DataPlane(std::io::Error),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Control(#[from] crate::control::node::ControlError),
    #[error("NBD TLS: {0}")]
    Tls(#[from] stagehand_common::tls::TlsError),
}

/// Shared by every connection.
pub struct ServerState {
    pub registry: Arc<ExportRegistry>,
    pub engine: Arc<IoEngine>,
    pub pool: Arc<BufPool>,
    conn_limit: Arc<Semaphore>,
    data: DataPlane,
    /// Set with --tls-*: every connection must switch to TLS (NBD_OPT_STARTTLS)
    /// with a client certificate signed by the CA before anything else.
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("registry", &self.registry)
            .field("engine", &self.engine.name())
            .field("data", &self.data)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A server with its listeners bound, ready to [`Server::serve`].
pub struct Server {
    state: Arc<ServerState>,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
}

impl Server {
    /// Opens the configured exports, starts the I/O engine and binds the listeners.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let registry = ExportRegistry::new();
        for spec in &config.exports {
            registry.insert(Arc::new(Export::open(spec)?))?;
        }
        Self::bind_with_registry(config, registry).await
    }

    /// Like [`Server::bind`] with a registry the caller keeps (the control API
    /// adds and removes exports in it while the server runs).
    pub async fn bind_with_registry(
        config: &Config,
        registry: Arc<ExportRegistry>,
    ) -> Result<Self, ServerError> {
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(files.mutual_server_config()?)),
            None => None,
        };
        let engine = Arc::new(IoEngine::new(config.io_engine).map_err(ServerError::Engine)?);
        let tcp = match config.listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Listen {
                            addr: addr.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let unix = match &config.unix {
            Some(path) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(|source| ServerError::Listen {
                    addr: path.display().to_string(),
                    source,
                })?;
                Some((l, path.clone()))
            }
            None => None,
        };
        let state = Arc::new(ServerState {
            registry,
            engine,
            pool: BufPool::new(),
            conn_limit: Arc::new(Semaphore::new(config.max_connections)),
            data: DataPlane::start(config.data_threads).map_err(ServerError::DataPlane)?,
            tls,
        });
        Ok(Self { state, tcp, unix })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets in-flight
    /// requests finish, closes connections and flushes every export.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let token = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if let Some(l) = self.tcp {
            tasks.spawn(accept_tcp(l, Arc::clone(&self.state), token.clone()));
        }
        let unix_path = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((l, _)) = self.unix {
            tasks.spawn(accept_unix(l, Arc::clone(&self.state), token.clone()));
        }
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        token.cancel();
        while tasks.join_next().await.is_some() {}
        for e in self.state.registry.list() {
            if let Err(err) = e.file.sync_data() {
                tracing::warn!(export = %e.name, error = %err, "final flush failed");
            }
            // A clean stop leaves no activity log to replay (nothing over-reported).
            e.bitmaps.checkpoint();
        }
        if let Some(p) = unix_path {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!("stopped");
    }
}

/// Binds and serves `config` until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    // Leases: exports get their gates from the durable store, and the control API
    // (if --api) shares the registry to add, remove and fence exports at runtime.
    let store = crate::control::node::open_store(&config)?;
    let registry = crate::control::node::open_registry(&config, &store)?;
    let server = Server::bind_with_registry(&config, std::sync::Arc::clone(&registry)).await?;
    let api_shutdown = CancellationToken::new();
    let api =
        crate::control::node::start_api(&config, store, registry, api_shutdown.clone()).await?;
    tracing::info!(
        engine = server.state.engine.name(),
        data_threads = server.state.data.threads(),
        exports = server.state.registry.list().len(),
        "ready"
    );
    if let Some(a) = server.tcp_addr() {
        tracing::info!(%a, "listening on TCP");
        // A machine-readable line for scripts and tests that asked for port 0.
        println!("stagehand-nbd: listening on tcp {a}");
    }
    if let Some(p) = &config.unix {
        tracing::info!(path = %p.display(), "listening on Unix socket");
        println!("stagehand-nbd: listening on unix {}", p.display());
    }
    server.serve(shutdown).await;
    api_shutdown.cancel();
    if let Some(api) = api {
        let _ = api.await;
    }
    Ok(())
}

/// Most reply bytes a TCP connection keeps queued in the kernel beyond what the
/// client's window lets out (TCP_NOTSENT_LOWAT); the writer waits for room instead.
///
/// Why: bytes queued behind the window are pushed out when the client's ACK opens
/// it, and that push runs in the client's own recv(), on the client's CPU, followed
/// by a wake-up of our writer. With no limit a server that answers faster than the
/// client reads moves that work onto the client. Measured here (2 cores, loopback,
/// 3 x nbdcopy -C4 of 1 GiB to null:): nbdcopy's CPU time went from 1200-1480 ms to
/// 720-840 ms (nbdkit's: 1040-1510 ms) and throughput rose; 64 KiB and 128 KiB did
/// equally well, 256 KiB less, 1 MiB not at all. Small replies never reach it.
const NOTSENT_LOWAT: libc::c_int = 128 << 10;

fn limit_unsent(s: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let v = NOTSENT_LOWAT;
    // SAFETY: setsockopt reads one int through the live pointer, of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        // Only costs the client some CPU: replies flow the same without it.
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT refused");
    }
}

async fn accept_tcp(l: TcpListener, state: Arc<ServerState>, token: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            r = l.accept() => match r {
                Ok((s, peer)) => {
                    let Ok(permit) = Arc::clone(&state.conn_limit).try_acquire_owned() else {
                        tracing::warn!(%peer, "connection limit reached, refusing");
                        continue;
                    };
                    // Only for connections we serve.
                    let _ = s.set_nodelay(true);
                    limit_unsent(&s);
                    // Re-registered with the reactor of the data-plane thread that
                    // will serve it.
                    let s = match s.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot hand over connection");
                            continue;
                        }
                    };
                    let st = Arc::clone(&state);
                    let tk = token.clone();
                    state.data.spawn(&mut conns, move || async move {
                        match tokio::net::TcpStream::from_std(s) {
                            Ok(s) => connection(s, st, tk, peer.to_string()).await,
                            Err(e) => tracing::warn!(%peer, error = %e, "cannot serve connection"),
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

async fn accept_unix(l: UnixListener, state: Arc<ServerState>, token: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            r = l.accept() => match r {
                Ok((s, _)) => {
                    let Ok(permit) = Arc::clone(&state.conn_limit).try_acquire_owned() else {
                        tracing::warn!("connection limit reached, refusing");
                        continue;
                    };
                    let s = match s.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot hand over connection");
                            continue;
                        }
                    };
                    let st = Arc::clone(&state);
                    let tk = token.clone();
                    state.data.spawn(&mut conns, move || async move {
                        match tokio::net::UnixStream::from_std(s) {
                            Ok(s) => connection(s, st, tk, "unix".into()).await,
                            Err(e) => tracing::warn!(error = %e, "cannot serve connection"),
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

/// A connection's byte stream: split for option haggling and transmission, and
/// put back together for the TLS handshake after NBD_OPT_STARTTLS.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    type Read: conn::SpliceSocket;
    type Write: conn::ReplySink;
    fn split(self) -> (Self::Read, Self::Write);
    fn reunite(r: Self::Read, w: Self::Write) -> std::io::Result<Self>;
}

macro_rules! transport {
    ($t:ty, $m:ident) => {
        impl Transport for $t {
            type Read = tokio::net::$m::OwnedReadHalf;
            type Write = tokio::net::$m::OwnedWriteHalf;
            fn split(self) -> (Self::Read, Self::Write) {
                self.into_split()
            }
            fn reunite(r: Self::Read, w: Self::Write) -> std::io::Result<Self> {
                r.reunite(w)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }
        }
    };
}

transport!(TcpStream, tcp);
transport!(UnixStream, unix);

type TlsStream<S> = tokio_rustls::server::TlsStream<S>;

/// A connection ready for transmission: plain (the socket's own halves, with
/// sendfile) or over TLS.
enum Ready<S: Transport> {
    Plain(BufReader<S::Read>, S::Write, Negotiated),
    Tls(
        BufReader<tokio::io::ReadHalf<TlsStream<S>>>,
        tokio::io::WriteHalf<TlsStream<S>>,
        Negotiated,
    ),
}

/// Greeting, option haggling and (when the server requires it) the switch to TLS.
async fn handshake<S: Transport>(s: S, state: &ServerState) -> Result<Ready<S>, HandshakeError> {
    let (r, mut w) = s.split();
    // Option haggling is small messages; a small buffer keeps the reader honest
    // about what it has consumed before transmission takes over the stream.
    let mut r = BufReader::with_capacity(4096, r);
    let phase = match state.tls {
        Some(_) => TlsPhase::Required,
        None => TlsPhase::Off,
    };
    let client = handshake::greet(&mut r, &mut w).await?;
    let client = match handshake::haggle(&mut r, &mut w, &state.registry, client, phase).await? {
        Haggled::Transmission(n) => return Ok(Ready::Plain(r, w, n)),
        Haggled::StartTls(client) => client,
    };
    let Some(acceptor) = &state.tls else {
        return Err(HandshakeError::Protocol("STARTTLS without TLS"));
    };
    // The client starts TLS only after our ACK; bytes already buffered would be
    // plaintext smuggled in front of the TLS session.
    if !r.buffer().is_empty() {
        return Err(HandshakeError::Protocol("data after STARTTLS"));
    }
    let s = S::reunite(r.into_inner(), w)?;
    let tls = acceptor.accept(s).await?;
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::with_capacity(4096, r);
    match handshake::haggle(&mut r, &mut w, &state.registry, client, TlsPhase::Done).await? {
        Haggled::Transmission(n) => Ok(Ready::Tls(r, w, n)),
        Haggled::StartTls(_) => Err(HandshakeError::Protocol("STARTTLS twice")),
    }
}

async fn connection<S: Transport>(
    s: S,
    state: Arc<ServerState>,
    token: CancellationToken,
    peer: String,
) {
    let ready = tokio::select! {
        _ = token.cancelled() => return,
        n = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(s, &state)) => n,
    };
    match ready {
        Ok(Ok(Ready::Plain(r, w, neg))) => transmission(r, w, neg, &state, token, &peer).await,
        Ok(Ok(Ready::Tls(r, w, neg))) => {
            tracing::debug!(%peer, "TLS on");
            transmission(r, w, neg, &state, token, &peer).await
        }
        Ok(Err(HandshakeError::Aborted)) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "handshake ended"),
        Err(_) => tracing::debug!(%peer, "handshake timed out"),
    }
}

async fn transmission<R, W>(
    r: BufReader<R>,
    w: W,
    neg: Negotiated,
    state: &ServerState,
    token: CancellationToken,
    peer: &str,
) where
    BufReader<R>: conn::PayloadSource,
    W: conn::ReplySink,
{
    let export = Arc::clone(&neg.export);
    tracing::debug!(%peer, export = %export.name, structured = neg.structured, extended = neg.extended, "transmission");
    conn::count_connection(&export, 1);
    let res = conn::serve(
        r,
        w,
        neg,
        Arc::clone(&state.engine),
        Arc::clone(&state.pool),
        token,
    )
    .await;
    conn::count_connection(&export, -1);
    if let Err(e) = res {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn limit_unsent_sets_tcp_notsent_lowat_on_a_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        limit_unsent(&s);
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the live int.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw mut v).cast(),
                &raw mut len,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(v, NOTSENT_LOWAT);
    }
}
