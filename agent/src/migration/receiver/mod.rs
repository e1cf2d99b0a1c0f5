//! The receiving side: a pure state machine ([`ReceiverState`]) that says which message
//! may come next, and the listener that drives it (an async accept loop handing each
//! connection to a thread, since the work per frame is memory copies and hashing).
//!
//! Control connection states (see `protocol` for the sequence):
//!
//! ```text
//! AwaitHello --Hello(auth ok)--> AwaitConfig --Config(checked, VM created)--> Memory
//! AwaitConfig --Join(known session)--> Data            (data connections)
//! Memory --Memory|Sparse|Sync--> Memory --State--> StateReceived --Digests(match)--> Verified
//! Verified --Complete(restored, resumed)--> Running                  (auto mode only)
//! Verified --Switchover(set_disks)--> GoAhead --Complete--> Running  (coordinated only)
//! Data --Memory|Sparse|Sync--> Data
//! any state before Running --Abandon--> Closed
//! ```
//!
//! Anything else is refused with an Error frame and the session is discarded: the
//! incoming VM never runs unless every step happened in order and the digests matched,
//! and in coordinated mode never opens a disk or runs before the go-ahead's URIs came.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::VmHost;
use super::digest::ChunkDigests;
use super::protocol::{
    self, AuthKind, Command, Compression, ErrorCode, ID_LEN, Message, NONCE_LEN, SwitchoverMode,
    auth, parse_memory,
};
use super::wire::{Conn, Stream, WireError};
use crate::contract::VmSpec;

mod session;
mod state;

use session::{CpuOnDrop, Mode, PageSet, Session, drive_control};
pub use state::{
    FrameRefused, HANDSHAKE_MAX_FRAME, MAX_MEMORY_MIB, OutOfOrder, ReceiverState, check_config,
};

/// Secrets a peer may prove it holds.
struct Ticket {
    key: [u8; 32],
    vm: String,
    expires: Instant,
    /// A Config used the ticket (one migration per ticket)...
    configured: bool,
    /// ...and created this session, which its data connections may Join with it.
    session: Option<[u8; ID_LEN]>,
}

/// The migration listener's shared state.
pub struct Receiver {
    host: Arc<dyn VmHost>,
    token_key: Option<[u8; 32]>,
    tickets: Mutex<HashMap<[u8; ID_LEN], Ticket>>,
    sessions: Mutex<HashMap<[u8; ID_LEN], Arc<Session>>>,
    /// Connections being served; beyond `MAX_CONNECTIONS` new ones are closed at once.
    connections: Arc<Semaphore>,
    /// Connections still in their handshake; beyond `MAX_PENDING_HANDSHAKES` new ones
    /// are closed at once, so peers that prove nothing cannot take every connection.
    handshakes: Arc<Semaphore>,
    /// `--tls-*`: every connection must be TLS with a client certificate of our CA.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Most migration connections served at once (64 streams × a few migrations).
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections in their handshake (not yet authenticated) at once.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Total time a peer gets, from accept, to finish the handshake (TLS, challenge and
/// proof): a peer trickling bytes cannot stretch it, unlike a per-read timeout.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// How long an issued ticket stays valid.
pub const TICKET_TTL: Duration = Duration::from_secs(600);

impl Receiver {
    pub fn new(
        host: Arc<dyn VmHost>,
        token: Option<&str>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        Receiver {
            host,
            token_key: token.map(|t| auth::derive_key(t.as_bytes())),
            tickets: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            tls,
        }
    }

    /// Issues a one-time ticket for an incoming migration of `vm`: `ID.SECRET` in hex.
    pub fn issue_ticket(&self, vm: &str) -> String {
        let mut id = [0u8; ID_LEN];
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        let hex_secret = hex(&secret);
        let mut t = self.tickets.lock().expect("ticket lock is never poisoned");
        let now = Instant::now();
        t.retain(|_, v| v.expires > now || v.configured);
        t.insert(
            id,
            Ticket {
                key: auth::derive_key(hex_secret.as_bytes()),
                vm: vm.to_string(),
                expires: now + TICKET_TTL,
                configured: false,
                session: None,
            },
        );
        format!("{}.{}", hex(&id), hex_secret)
    }

    /// Accepts connections until `shutdown`; each connection runs on its own thread.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "migration listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let std_stream = match stream
                .into_std()
                .and_then(|s| s.set_nonblocking(false).map(|_| s))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "migration connection setup failed");
                    continue;
                }
            };
            let permits = Arc::clone(&self.connections)
                .try_acquire_owned()
                .and_then(|c| Ok((c, Arc::clone(&self.handshakes).try_acquire_owned()?)));
            let Ok((conn_permit, handshake_permit)) = permits else {
                // Dropped here: closed at once, before a byte is read.
                tracing::debug!(%peer, "too many migration connections; refusing one");
                continue;
            };
            // The handshake deadline: unless the thread reports the peer authenticated
            // in time, the socket is shut down under it (any blocked read returns).
            let killer = match std_stream.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, "migration connection setup failed");
                    continue;
                }
            };
            let (authed, watch) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                if tokio::time::timeout(HANDSHAKE_DEADLINE, watch)
                    .await
                    .is_err()
                {
                    tracing::debug!(%peer, "migration handshake deadline passed; closing");
                    let _ = killer.shutdown(std::net::Shutdown::Both);
                }
            });
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("mig-recv".into())
                .spawn(move || {
                    let _conn_permit = conn_permit;
                    me.handle(std_stream, peer, Pending(handshake_permit, authed));
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a migration receiver thread");
            }
        }
    }

    fn handle(&self, stream: TcpStream, peer: std::net::SocketAddr, pending: Pending) {
        // With TLS the handshake runs on the first write (the Challenge), inside the
        // handshake deadline; a peer without a certificate of our CA gets no frame.
        let stream = match &self.tls {
            None => Ok(Stream::Plain(stream)),
            Some(cfg) => Stream::server(stream, cfg.clone()),
        };
        let mut conn = match stream.and_then(Conn::with_stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "migration connection setup failed");
                return;
            }
        };
        // A peer that has not proved anything holds a thread until the deadline at
        // most (the watchdog in `serve` shuts the socket down then).
        let timeouts = conn.set_read_timeout(HANDSHAKE_DEADLINE);
        let ticket = match timeouts
            .map_err(WireError::Io)
            .and_then(|_| self.handshake(&mut conn))
        {
            Ok(v) => v,
            Err(e) => {
                // Free the handshake slot before the peer sees the connection close.
                drop(pending);
                tracing::warn!(%peer, error = %e, "migration peer refused");
                return;
            }
        };
        pending.authenticated();
        // Only an authenticated peer's work outranks the host's other threads.
        super::stats::raise_thread_priority();
        if let Err(e) = conn.set_read_timeout(super::wire::IO_TIMEOUT) {
            tracing::warn!(%peer, error = %e, "migration connection setup failed");
            return;
        }
        let state = ReceiverState::AwaitConfig;
        let first = match recv_in(&mut conn, state, SwitchoverMode::Auto) {
            Ok(m) => m,
            Err(e) => {
                if let WireError::Refused(msg) = &e {
                    conn.send_error(ErrorCode::Protocol, msg);
                }
                tracing::warn!(%peer, error = %e, "migration peer failed before Config");
                return;
            }
        };
        match first {
            Message::Config {
                chunk_size,
                streams,
                switchover,
                switchover_timeout_s,
                spec,
            } => {
                if let Some(id) = ticket
                    && let Err(msg) = self.ticket_for_config(id, &spec.name)
                {
                    conn.send_error(ErrorCode::AuthFailed, &msg);
                    return;
                }
                let mode = Mode {
                    switchover,
                    timeout: Duration::from_secs(u64::from(switchover_timeout_s)),
                };
                self.control(conn, chunk_size, streams, mode, spec, (peer, ticket));
                if let Some(id) = ticket {
                    // One migration per ticket, whatever its outcome.
                    self.tickets
                        .lock()
                        .expect("ticket lock is never poisoned")
                        .remove(&id);
                }
            }
            Message::Join { session } => {
                if let Some(id) = ticket
                    && !self.ticket_joins(id, session)
                {
                    conn.send_error(
                        ErrorCode::AuthFailed,
                        "the ticket does not belong to this migration session",
                    );
                    return;
                }
                self.data(conn, session)
            }
            Message::Abandon { .. } => {}
            other => conn.send_error(
                ErrorCode::Protocol,
                &format!("{:?} before Config", other.command()),
            ),
        }
    }

    /// Challenge-response; returns the id of the ticket used, if a ticket was used.
    /// A ticket stays in the store until its migration ends: the data connections of
    /// that migration authenticate with it too (`ticket_joins`).
    fn handshake(&self, conn: &mut Conn) -> Result<Option<[u8; ID_LEN]>, WireError> {
        let mut nonce_r = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce_r);
        conn.send(
            &Message::Challenge {
                version_min: protocol::MIN_VERSION,
                version_max: protocol::VERSION,
                nonce: nonce_r,
            },
            Compression::None,
        )?;
        let msg = match recv_in(conn, ReceiverState::AwaitHello, SwitchoverMode::Auto) {
            Ok(m) => m,
            Err(e) => {
                if let WireError::Refused(msg) = &e {
                    conn.send_error(ErrorCode::Protocol, msg);
                }
                return Err(e);
            }
        };
        let Message::Hello {
            version,
            auth: kind,
            nonce: nonce_s,
            proof,
        } = msg
        else {
            return Err(WireError::Unexpected(Command::Invalid));
        };
        if !(protocol::MIN_VERSION..=protocol::VERSION).contains(&version) {
            conn.send_error(ErrorCode::Version, "unsupported protocol version");
            return Err(WireError::Remote {
                code: ErrorCode::Version,
                message: format!("version {version}"),
            });
        }
        let (key, ticket) = match kind {
            AuthKind::Token => (self.token_key, None),
            AuthKind::Ticket(id) => {
                let now = Instant::now();
                let key = self
                    .tickets
                    .lock()
                    .expect("ticket lock is never poisoned")
                    .get(&id)
                    .filter(|t| t.expires > now || t.session.is_some())
                    .map(|t| t.key);
                (key, Some(id))
            }
        };
        let ok =
            key.is_some_and(|k| auth::verify(auth::sender_proof(&k, &nonce_r, &nonce_s), &proof));
        let Some(key) = key.filter(|_| ok) else {
            conn.send_error(
                ErrorCode::AuthFailed,
                "the peer did not prove it holds the cluster token or a valid ticket",
            );
            return Err(WireError::Remote {
                code: ErrorCode::AuthFailed,
                message: "bad proof".into(),
            });
        };
        conn.send(
            &Message::Ok {
                payload: auth::receiver_proof(&key, &nonce_r, &nonce_s).to_vec(),
            },
            Compression::None,
        )?;
        Ok(ticket)
    }

    /// A Config authenticated with ticket `id`: allowed once, for the ticket's VM.
    fn ticket_for_config(&self, id: [u8; ID_LEN], vm: &str) -> Result<(), String> {
        let mut tickets = self.tickets.lock().expect("ticket lock is never poisoned");
        match tickets.get_mut(&id) {
            Some(t) if t.configured => Err("the ticket was used already".into()),
            Some(t) if t.vm != vm => {
                Err(format!("the ticket was issued for VM {}, not {vm}", t.vm))
            }
            Some(t) => {
                t.configured = true;
                Ok(())
            }
            None => Err("the ticket is unknown or expired".into()),
        }
    }

    /// Whether a data connection authenticated with ticket `id` may join `session`.
    fn ticket_joins(&self, id: [u8; ID_LEN], session: [u8; ID_LEN]) -> bool {
        self.tickets
            .lock()
            .expect("ticket lock is never poisoned")
            .get(&id)
            .is_some_and(|t| t.session == Some(session))
    }

    fn control(
        &self,
        mut conn: Conn,
        chunk_size: u64,
        streams: u16,
        mode: Mode,
        spec: VmSpec,
        (peer, ticket): (std::net::SocketAddr, Option<[u8; ID_LEN]>),
    ) {
        let cpu = super::stats::thread_cpu();
        if let Err(msg) = check_config(chunk_size, streams, &spec) {
            conn.send_error(ErrorCode::Incompatible, &msg);
            return;
        }
        let target = match self.host.create_incoming(&spec) {
            Ok(t) => t,
            Err(e) => {
                conn.send_error(super::sender::vm_error_code(&e), &e.to_string());
                return;
            }
        };
        let mem_size = spec.memory_mib << 20;
        let have: u64 = target.guest_memory().iter().map(|r| r.len()).sum();
        if have != mem_size {
            self.host.end_incoming(&spec.name, false);
            conn.send_error(
                ErrorCode::Incompatible,
                &format!("incoming VM has {have} bytes of memory, the source {mem_size}"),
            );
            return;
        }
        let mut id = [0u8; ID_LEN];
        rand::rng().fill_bytes(&mut id);
        let session = Arc::new(Session {
            name: spec.name.clone(),
            target,
            digests: ChunkDigests::zeroed(mem_size, chunk_size),
            mem_size,
            closed: AtomicBool::new(false),
            scan: Mutex::new(None),
            ended: AtomicBool::new(false),
            data_conns: Mutex::new(Vec::new()),
            data_cpu_ns: std::sync::atomic::AtomicU64::new(0),
            written: PageSet::new(mem_size / crate::contract::PAGE_SIZE),
        });
        let scanner = session.clone();
        let scan = std::thread::Builder::new()
            .name("mig-scan".into())
            .spawn(move || {
                let mut scratch = Vec::new();
                let mem = scanner.target.guest_memory();
                // Chunks never populated are zero without reading them.
                let populated = super::resident::populated(mem);
                let ppc = scanner.digests.chunk_size() / crate::contract::PAGE_SIZE;
                let pages = scanner.mem_size / crate::contract::PAGE_SIZE;
                for c in 0..scanner.digests.chunks() {
                    if scanner.ended.load(Ordering::SeqCst) {
                        break;
                    }
                    let known_zero = populated.as_ref().is_some_and(|p| {
                        !super::bitmap::any_in(p, c * ppc, ((c + 1) * ppc).min(pages))
                    });
                    scanner
                        .digests
                        .scan_initial(mem, c, known_zero, &mut scratch)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            });
        match scan {
            Ok(h) => *session.scan.lock().expect("scan lock is never poisoned") = Some(h),
            Err(e) => {
                self.host.end_incoming(&spec.name, false);
                conn.send_error(
                    ErrorCode::Internal,
                    &format!("cannot start the memory scan: {e}"),
                );
                return;
            }
        }
        self.sessions
            .lock()
            .expect("session lock is never poisoned")
            .insert(id, session.clone());
        if let Some(t) = ticket
            && let Some(t) = self
                .tickets
                .lock()
                .expect("ticket lock is never poisoned")
                .get_mut(&t)
        {
            t.session = Some(id);
        }
        tracing::info!(vm = %spec.name, %peer, streams, switchover = ?mode.switchover, "incoming migration");
        let result = match conn.send(
            &Message::Ok {
                payload: id.to_vec(),
            },
            Compression::None,
        ) {
            Ok(_) => drive_control(&mut conn, &session, mode),
            Err(e) => Err((ErrorCode::Internal, e.to_string())),
        };
        let cpu_ms = super::stats::ms(super::stats::thread_cpu().saturating_sub(cpu))
            + session.data_cpu_ns.load(Ordering::Relaxed) as f64 / 1e6;
        session.closed.store(true, Ordering::SeqCst);
        session.ended.store(true, Ordering::SeqCst);
        for c in session
            .data_conns
            .lock()
            .expect("conns lock is never poisoned")
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.sessions
            .lock()
            .expect("session lock is never poisoned")
            .remove(&id);
        match result {
            Ok(ReceiverState::Running) => {
                self.host.end_incoming(&session.name, true);
                // Told only now, so the source frees its copy only once ours is running.
                if let Err(e) = conn.send(&Message::Ok { payload: vec![] }, Compression::None) {
                    tracing::warn!(vm = %session.name, error = %e, "guest running here, but the source did not hear it");
                }
                tracing::info!(vm = %session.name, cpu_ms, "incoming migration completed; guest running");
            }
            Ok(state) => {
                self.host.end_incoming(&session.name, false);
                tracing::info!(vm = %session.name, ?state, "incoming migration abandoned by the source");
            }
            Err((code, msg)) => {
                self.host.end_incoming(&session.name, false);
                conn.send_error(code, &msg);
                tracing::warn!(vm = %session.name, error = %msg, "incoming migration failed; VM discarded");
            }
        }
    }

    fn data(&self, mut conn: Conn, id: [u8; ID_LEN]) {
        let session = self
            .sessions
            .lock()
            .expect("session lock is never poisoned")
            .get(&id)
            .cloned();
        let Some(session) = session else {
            conn.send_error(ErrorCode::Protocol, "unknown migration session");
            return;
        };
        match conn.try_clone_stream() {
            Ok(s) => session
                .data_conns
                .lock()
                .expect("conns lock is never poisoned")
                .push(s),
            Err(e) => {
                conn.send_error(ErrorCode::Internal, &e.to_string());
                return;
            }
        }
        if conn
            .send(&Message::Ok { payload: vec![] }, Compression::None)
            .is_err()
        {
            return;
        }
        let cpu = super::stats::thread_cpu();
        let _account = CpuOnDrop(cpu, &session.data_cpu_ns);
        let mut state = ReceiverState::Data;
        let (mut scratch, mut payload, mut decompressed) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let check = |h: &protocol::FrameHeader| {
                state
                    .check_header(h, SwitchoverMode::Auto)
                    .map_err(|e| e.to_string())
            };
            let h = match conn.recv_frame(&mut payload, check) {
                Ok(h) => h,
                Err(WireError::Refused(e)) => {
                    conn.send_error(ErrorCode::Protocol, &e);
                    return;
                }
                Err(_) => return, // The control connection decides the outcome.
            };
            if session.closed.load(Ordering::SeqCst) {
                conn.send_error(ErrorCode::Protocol, "the session no longer accepts memory");
                return;
            }
            state = match state.next(h.cmd, SwitchoverMode::Auto) {
                Ok(s) => s,
                Err(e) => {
                    conn.send_error(ErrorCode::Protocol, &e.to_string());
                    return;
                }
            };
            let applied = match h.cmd {
                Command::Memory => parse_memory(&h, &payload, &mut decompressed)
                    .map_err(|e| e.to_string())
                    .and_then(|(ranges, data)| session.apply(&ranges, data, &mut scratch)),
                Command::Sparse => {
                    session.apply_sparse(&h, &payload, &mut decompressed, &mut scratch)
                }
                Command::Sync => conn
                    .send(&Message::Ok { payload: vec![] }, Compression::None)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                _ => return,
            };
            if let Err(e) = applied {
                conn.send_error(ErrorCode::Protocol, &e);
                return;
            }
        }
    }
}

/// A connection still in its handshake: holds one of the `MAX_PENDING_HANDSHAKES`
/// permits and the watchdog's line. Dropping it (handshake failed) releases both.
struct Pending(OwnedSemaphorePermit, tokio::sync::oneshot::Sender<()>);

impl Pending {
    /// The peer proved its secret: the deadline no longer applies.
    fn authenticated(self) {
        let Pending(permit, watchdog) = self;
        let _ = watchdog.send(());
        drop(permit);
    }
}

/// Receives one frame that `state` accepts, refusing its header (before reading or
/// allocating the payload) when the state does not allow it or it is too long.
fn recv_in(
    conn: &mut Conn,
    state: ReceiverState,
    mode: SwitchoverMode,
) -> Result<Message, WireError> {
    let mut payload = Vec::new();
    let h = conn.recv_frame(&mut payload, |h| {
        state.check_header(h, mode).map_err(|e| e.to_string())
    })?;
    Ok(Message::decode(&h, &payload)?)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses a ticket `ID.SECRET` (hex) into its id and the secret the proofs use.
pub fn parse_ticket(t: &str) -> Option<([u8; ID_LEN], Vec<u8>)> {
    let (id, secret) = t.split_once('.')?;
    if id.len() != ID_LEN * 2
        || secret.len() != 64
        || !secret.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    let mut out = [0u8; ID_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(id.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some((out, secret.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests;
