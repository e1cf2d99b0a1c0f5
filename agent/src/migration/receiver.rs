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
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::VmHost;
use super::digest::{ChunkDigests, ChunkHasher};
use super::protocol::{
    self, AuthKind, Command, Compression, ErrorCode, ID_LEN, MemRange, Message, NONCE_LEN,
    SwitchoverMode, auth, parse_memory,
};
use super::wire::{Conn, Stream, WireError};
use crate::contract::{MigrationTarget, VmSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    AwaitHello,
    AwaitConfig,
    Memory,
    Data,
    StateReceived,
    Verified,
    /// Coordinated mode: the go-ahead came and the disks are set; Complete may follow.
    GoAhead,
    Running,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cmd:?} is not allowed in state {state:?}")]
pub struct OutOfOrder {
    pub state: ReceiverState,
    pub cmd: Command,
}

impl ReceiverState {
    /// The state after `cmd`, assuming its checks (auth, config, digests) pass; the
    /// shell moves to `Closed` itself when they fail. `mode` is the switchover mode the
    /// session's Config declared (`Auto` before Config and on data connections).
    pub fn next(self, cmd: Command, mode: SwitchoverMode) -> Result<ReceiverState, OutOfOrder> {
        use Command as C;
        use ReceiverState as S;
        use SwitchoverMode as M;
        Ok(match (self, cmd, mode) {
            (S::AwaitHello, C::Hello, _) => S::AwaitConfig,
            (S::AwaitConfig, C::Config, _) => S::Memory,
            (S::AwaitConfig, C::Join, _) => S::Data,
            (S::Memory, C::Memory | C::Sparse | C::Sync, _) => S::Memory,
            (S::Memory, C::State, _) => S::StateReceived,
            (S::StateReceived, C::Digests, _) => S::Verified,
            (S::Verified, C::Complete, M::Auto) => S::Running,
            (S::Verified, C::Switchover, M::Coordinated) => S::GoAhead,
            (S::GoAhead, C::Complete, M::Coordinated) => S::Running,
            (S::Data, C::Memory | C::Sparse | C::Sync, _) => S::Data,
            (
                S::AwaitConfig | S::Memory | S::Data | S::StateReceived | S::Verified | S::GoAhead,
                C::Abandon,
                _,
            ) => S::Closed,
            (state, cmd, _) => return Err(OutOfOrder { state, cmd }),
        })
    }
}

/// Largest payload a frame may declare before the peer proved the token or a ticket
/// (the Hello it owes is 83 bytes): an unauthenticated peer cannot make the receiver
/// allocate more than this per connection.
pub const HANDSHAKE_MAX_FRAME: u64 = 128;

/// Why a frame was refused from its header alone (nothing of it was read further).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameRefused {
    #[error(transparent)]
    OutOfOrder(#[from] OutOfOrder),
    #[error("{cmd:?} declares {len} payload bytes; at most {max} are allowed in state {state:?}")]
    TooLong {
        state: ReceiverState,
        cmd: Command,
        len: u64,
        max: u64,
    },
}

impl ReceiverState {
    /// Whether the peer has proved the cluster token or a ticket by this state.
    pub fn authenticated(self) -> bool {
        !matches!(self, ReceiverState::AwaitHello)
    }

    /// The largest payload a `cmd` frame may declare in this state (pure). A command
    /// the state does not accept is refused outright, and before authentication only
    /// small frames pass, so the shell checks a header against this before it
    /// allocates anything for the payload.
    pub fn max_frame_len(self, cmd: Command, mode: SwitchoverMode) -> Result<u64, OutOfOrder> {
        self.next(cmd, mode)?;
        let max = cmd.max_payload();
        Ok(if self.authenticated() {
            max
        } else {
            max.min(HANDSHAKE_MAX_FRAME)
        })
    }

    /// Checks a received header against [`Self::max_frame_len`].
    pub fn check_header(
        self,
        h: &protocol::FrameHeader,
        mode: SwitchoverMode,
    ) -> Result<(), FrameRefused> {
        let max = self.max_frame_len(h.cmd, mode)?;
        if h.length > max {
            return Err(FrameRefused::TooLong {
                state: self,
                cmd: h.cmd,
                len: h.length,
                max,
            });
        }
        Ok(())
    }
}

/// Largest guest a target accepts (a sanity bound before any allocation).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Checks a Config before the VM manager sees it. Pure.
pub fn check_config(chunk_size: u64, streams: u16, spec: &VmSpec) -> Result<(), String> {
    if !chunk_size.is_power_of_two() || !(64 << 10..=1 << 30).contains(&chunk_size) {
        return Err(format!(
            "chunk size {chunk_size} is not a power of two between 64 KiB and 1 GiB"
        ));
    }
    if !(1..=64).contains(&streams) {
        return Err(format!("{streams} streams; between 1 and 64 are allowed"));
    }
    if spec.memory_mib == 0 || spec.memory_mib > MAX_MEMORY_MIB {
        return Err(format!(
            "memory size {} MiB is out of range",
            spec.memory_mib
        ));
    }
    if spec.vcpus == 0 {
        return Err("the VM has no vCPU".into());
    }
    if spec.name.is_empty() || spec.name.len() > 128 {
        return Err("the VM name is empty or too long".into());
    }
    Ok(())
}

/// One incoming migration, shared by its control and data connections.
struct Session {
    name: String,
    target: Arc<dyn MigrationTarget>,
    digests: ChunkDigests,
    mem_size: u64,
    /// Set once State arrived (or the session died): data connections stop writing.
    closed: AtomicBool,
    /// The initial scan of target memory (see `ChunkDigests::scan_initial`).
    scan: Mutex<Option<std::thread::JoinHandle<Result<(), String>>>>,
    /// The session ended: the scan stops early.
    ended: AtomicBool,
    /// The session's data connections, shut down when it ends so that they release
    /// the session (and its guest memory) at once.
    data_conns: Mutex<Vec<TcpStream>>,
    /// Pages this session wrote (or faulted in for writing): see `prefault`.
    written: PageSet,
    /// CPU time of the session's data connection threads that ended, ns (for the log).
    data_cpu_ns: std::sync::atomic::AtomicU64,
}

impl Session {
    /// Writes the pages of a Sparse frame, each expanded to a whole page in a small
    /// buffer. A frame that carries every page of a chunk, in order (what the sender
    /// makes of a chunk of counters or flags), is hashed from its own encodings: they
    /// are the canonical encoding `chunk_digest` hashes, and memory now holds exactly
    /// them. Any other chunk it touched is re-hashed from memory after the write.
    fn apply_sparse(
        &self,
        h: &protocol::FrameHeader,
        payload: &[u8],
        page_buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), String> {
        let ps = crate::contract::PAGE_SIZE;
        let cs = self.digests.chunk_size();
        let mut touched: Vec<u64> = Vec::new();
        let mut runs: Vec<MemRange> = Vec::new();
        let mut outside = None;
        protocol::parse_sparse(h, payload, |gpa, _| {
            if gpa.checked_add(ps).is_none_or(|e| e > self.mem_size) {
                outside.get_or_insert(gpa);
                return;
            }
            if touched.last() != Some(&(gpa / cs)) {
                touched.push(gpa / cs);
            }
            match runs.last_mut() {
                Some(r) if r.gpa + r.len == gpa => r.len += ps,
                _ => runs.push(MemRange { gpa, len: ps }),
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(gpa) = outside {
            return Err(format!("page {gpa:#x} is outside guest memory"));
        }
        let whole_chunk = match (touched.as_slice(), runs.as_slice()) {
            ([c], [r]) => (r.gpa, r.len) == self.digests.chunk_range(*c),
            _ => false,
        };
        touched.sort_unstable();
        touched.dedup();
        for c in &touched {
            self.digests.mark_touched(*c);
        }
        self.prefault(&runs);
        let mem = self.target.guest_memory();
        // Kept zero between pages: only the words of each page are set, then cleared.
        page_buf.clear();
        page_buf.resize(ps as usize, 0);
        let mut hasher = whole_chunk.then(ChunkHasher::new);
        let mut failed = None;
        protocol::parse_sparse(h, payload, |gpa, words| {
            for &(i, v) in words {
                let o = usize::from(i) * 8;
                page_buf[o..o + 8].copy_from_slice(&v.to_le_bytes());
            }
            if let Err(e) = mem.write_slice(page_buf, GuestAddress(gpa)) {
                failed.get_or_insert(e.to_string());
            }
            for &(i, _) in words {
                let o = usize::from(i) * 8;
                page_buf[o..o + 8].fill(0);
            }
            if let Some(h) = hasher.as_mut() {
                h.sparse(words);
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let (Some(h), [c]) = (hasher, touched.as_slice()) {
            self.digests.set(*c, h.finish());
            return Ok(());
        }
        for c in touched {
            self.digests
                .rehash(mem, c, scratch)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Faults in, in one call per run, the pages of `runs` this session has not
    /// written yet (`resident::populate_write`), and marks them written.
    fn prefault(&self, runs: &[MemRange]) {
        let ps = crate::contract::PAGE_SIZE;
        let mem = self.target.guest_memory();
        for r in runs {
            let (first, end) = (r.gpa / ps, (r.gpa + r.len) / ps);
            let mut p = first;
            while p < end {
                if self.written.test_and_set(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                p += 1;
                while p < end && !self.written.test_and_set(p) {
                    p += 1;
                }
                // A single page faults in on its write just as cheaply.
                if p - start > 1 {
                    super::resident::populate_write(mem, start * ps, (p - start) * ps);
                }
            }
        }
    }

    /// Writes the pages of a Memory frame and re-hashes the chunks they touched.
    fn apply(&self, ranges: &[MemRange], data: &[u8], scratch: &mut Vec<u8>) -> Result<(), String> {
        let mem = self.target.guest_memory();
        let mut touched: Vec<u64> = Vec::new();
        for r in ranges {
            let end = r.gpa.checked_add(r.len).filter(|e| *e <= self.mem_size);
            if end.is_none() {
                return Err(format!(
                    "range {:#x}+{:#x} is outside guest memory",
                    r.gpa, r.len
                ));
            }
            let cs = self.digests.chunk_size();
            for c in r.gpa / cs..=(r.gpa + r.len - 1) / cs {
                if touched.last() != Some(&c) {
                    touched.push(c);
                }
            }
        }
        touched.dedup();
        for c in &touched {
            self.digests.mark_touched(*c);
        }
        self.prefault(ranges);
        let mut off = 0usize;
        for r in ranges {
            let len = r.len as usize;
            mem.write_slice(&data[off..off + len], GuestAddress(r.gpa))
                .map_err(|e| e.to_string())?;
            off += len;
        }
        for c in touched {
            // A frame that carries a whole chunk is hashed from its own bytes; anything
            // else is hashed from memory after the write.
            match ranges {
                [r] if (r.gpa, r.len) == self.digests.chunk_range(c) => {
                    self.digests.record(c, data)
                }
                _ => self
                    .digests
                    .rehash(mem, c, scratch)
                    .map_err(|e| e.to_string())?,
            }
        }
        Ok(())
    }
}

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

/// A set of page numbers that several connection threads mark at once.
struct PageSet(Vec<std::sync::atomic::AtomicU64>);

impl PageSet {
    fn new(pages: u64) -> Self {
        PageSet(
            (0..pages.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        )
    }

    /// Adds `page`; returns whether it was there already (true beyond the end, so
    /// callers leave such pages alone).
    fn test_and_set(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.0
            .get((page / 64) as usize)
            .is_none_or(|w| w.fetch_or(bit, Ordering::Relaxed) & bit != 0)
    }
}

/// Adds the thread's CPU time since `.0` to `.1` when the data connection ends.
struct CpuOnDrop<'a>(Duration, &'a std::sync::atomic::AtomicU64);

impl Drop for CpuOnDrop<'_> {
    fn drop(&mut self) {
        let used = super::stats::thread_cpu().saturating_sub(self.0);
        self.1.fetch_add(
            u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The session's switchover mode and how long the source may wait for its go-ahead.
#[derive(Debug, Clone, Copy)]
struct Mode {
    switchover: SwitchoverMode,
    timeout: Duration,
}

/// Runs the control connection from `Memory` to `Running` (or `Closed` on Abandon).
/// Errors carry the code and sentence to send back.
fn drive_control(
    conn: &mut Conn,
    s: &Session,
    mode: Mode,
) -> Result<ReceiverState, (ErrorCode, String)> {
    let mut state = ReceiverState::Memory;
    let mut saved: Option<Vec<u8>> = None;
    let (mut scratch, mut payload, mut decompressed) = (Vec::new(), Vec::new(), Vec::new());
    // Exactly one digest per chunk of this guest: the Digests frame's length is known.
    let digests_len = 12 + s.digests.chunks() * 32;
    loop {
        let check = |h: &protocol::FrameHeader| {
            state
                .check_header(h, mode.switchover)
                .map_err(|e| e.to_string())?;
            if h.cmd == Command::Digests && h.length != digests_len {
                return Err(format!(
                    "Digests declares {} payload bytes; this guest's take {digests_len}",
                    h.length
                ));
            }
            Ok(())
        };
        let h = conn
            .recv_frame(&mut payload, check)
            .map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        state = state
            .next(h.cmd, mode.switchover)
            .map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        if h.cmd == Command::Sparse {
            s.apply_sparse(&h, &payload, &mut decompressed, &mut scratch)
                .map_err(|e| (ErrorCode::Protocol, e))?;
            continue;
        }
        if h.cmd == Command::Memory {
            let (ranges, data) = parse_memory(&h, &payload, &mut decompressed)
                .map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
            s.apply(&ranges, data, &mut scratch)
                .map_err(|e| (ErrorCode::Protocol, e))?;
            continue;
        }
        let msg =
            Message::decode(&h, &payload).map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        let ok = |conn: &mut Conn| {
            conn.send(&Message::Ok { payload: vec![] }, Compression::None)
                .map(|_| ())
                .map_err(|e| (ErrorCode::Internal, e.to_string()))
        };
        match msg {
            Message::Sync { .. } => ok(conn)?,
            Message::State { state: st } => {
                // Data connections were synced before State; no more memory may land.
                s.closed.store(true, Ordering::SeqCst);
                saved = Some(st);
                ok(conn)?;
            }
            Message::Digests {
                chunk_size,
                digests,
            } => {
                if chunk_size != s.digests.chunk_size() {
                    return Err((
                        ErrorCode::Protocol,
                        format!("digest chunk size {chunk_size} differs from the session's"),
                    ));
                }
                // The initial scan must be done before its digests mean anything.
                let scan = s.scan.lock().expect("scan lock is never poisoned").take();
                match scan.map(|h| h.join()) {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        return Err((
                            ErrorCode::Internal,
                            format!("scanning target memory failed: {e}"),
                        ));
                    }
                    Some(Err(_)) => {
                        return Err((
                            ErrorCode::Internal,
                            "the memory scan thread panicked".into(),
                        ));
                    }
                    None => {
                        return Err((ErrorCode::Internal, "the memory scan did not run".into()));
                    }
                }
                let bad = s.digests.mismatches(&digests);
                if !bad.is_empty() {
                    return Err((
                        ErrorCode::DigestMismatch,
                        format!(
                            "target memory differs from the source image in {} of {} chunks (first: chunk {})",
                            bad.len(),
                            s.digests.chunks(),
                            bad[0]
                        ),
                    ));
                }
                if mode.switchover == SwitchoverMode::Coordinated {
                    // The source now waits for the coordinator's go-ahead: silence on
                    // this connection is expected for up to its switchover timeout.
                    conn.set_read_timeout(mode.timeout.saturating_add(super::wire::IO_TIMEOUT))
                        .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                }
                ok(conn)?;
            }
            Message::Switchover { disks } => {
                conn.set_read_timeout(super::wire::IO_TIMEOUT)
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                // The go-ahead's URIs (never the source's tokens) before anything runs.
                s.target
                    .set_disks(&disks)
                    .map_err(|e| (ErrorCode::RestoreFailed, e.to_string()))?;
                tracing::info!(vm = %s.name, disks = disks.len(), "switchover go-ahead received");
                ok(conn)?;
            }
            Message::Complete => {
                let st = saved
                    .take()
                    .ok_or((ErrorCode::Protocol, "Complete without State".to_string()))?;
                s.target
                    .restore_state(&st)
                    .map_err(|e| (ErrorCode::RestoreFailed, e.to_string()))?;
                s.target
                    .resume()
                    .map_err(|e| (ErrorCode::RestoreFailed, e.to_string()))?;
                // The Ok is sent by the caller once the manager marked the VM running.
                return Ok(ReceiverState::Running);
            }
            Message::Abandon { reason } => {
                tracing::info!(vm = %s.name, %reason, "source abandoned the migration");
                return Ok(ReceiverState::Closed);
            }
            _ => return Err((ErrorCode::Protocol, "unexpected message".into())),
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
mod tests {
    use super::*;
    use crate::contract::BootSpec;
    use Command as C;
    use ReceiverState as S;
    use SwitchoverMode as M;
    use proptest::prelude::*;

    const MODES: [SwitchoverMode; 2] = [M::Auto, M::Coordinated];
    const STATES: [ReceiverState; 9] = [
        S::AwaitHello,
        S::AwaitConfig,
        S::Memory,
        S::Data,
        S::StateReceived,
        S::Verified,
        S::GoAhead,
        S::Running,
        S::Closed,
    ];

    const ALL: [Command; 15] = [
        C::Invalid,
        C::Challenge,
        C::Hello,
        C::Config,
        C::Join,
        C::Memory,
        C::Sync,
        C::State,
        C::Digests,
        C::Complete,
        C::Abandon,
        C::Ok,
        C::Error,
        C::Switchover,
        C::Sparse,
    ];

    #[test]
    fn the_documented_sequence_is_accepted() {
        let seq = [
            C::Hello,
            C::Config,
            C::Memory,
            C::Sync,
            C::Sparse,
            C::Memory,
            C::Sync,
            C::State,
            C::Digests,
            C::Complete,
        ];
        let mut s = S::AwaitHello;
        for c in seq {
            s = s.next(c, M::Auto).expect("documented sequence");
        }
        assert_eq!(s, S::Running);
        // Coordinated: the go-ahead sits between Digests and Complete.
        let mut s = S::AwaitHello;
        for c in seq[..9].iter().chain(&[C::Switchover, C::Complete]) {
            s = s.next(*c, M::Coordinated).expect("coordinated sequence");
        }
        assert_eq!(s, S::Running);
        for m in MODES {
            let mut s = S::AwaitHello;
            for c in [C::Hello, C::Join, C::Memory, C::Sync, C::Memory] {
                s = s.next(c, m).expect("data sequence");
            }
            assert_eq!(s, S::Data);
        }
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        // Memory before Config, State twice, Complete before Digests, Digests before State,
        // Join on a control connection, anything after Running.
        for m in MODES {
            assert!(S::AwaitHello.next(C::Config, m).is_err());
            assert!(S::AwaitConfig.next(C::Memory, m).is_err());
            assert!(S::StateReceived.next(C::State, m).is_err());
            assert!(S::StateReceived.next(C::Memory, m).is_err());
            assert!(S::StateReceived.next(C::Sparse, m).is_err());
            assert!(S::AwaitConfig.next(C::Sparse, m).is_err());
            assert!(S::StateReceived.next(C::Complete, m).is_err());
            assert!(S::Memory.next(C::Digests, m).is_err());
            assert!(S::Memory.next(C::Complete, m).is_err());
            assert!(S::Memory.next(C::Join, m).is_err());
            assert!(S::Data.next(C::State, m).is_err());
            // The go-ahead only after the digests matched, once, never on a data stream.
            for s in [
                S::AwaitConfig,
                S::Memory,
                S::StateReceived,
                S::Data,
                S::GoAhead,
            ] {
                assert!(s.next(C::Switchover, m).is_err(), "Switchover in {s:?}");
            }
            assert!(S::GoAhead.next(C::Memory, m).is_err());
            assert!(S::GoAhead.next(C::State, m).is_err());
            for c in ALL {
                assert!(S::Running.next(c, m).is_err(), "{c:?} after Running");
                assert!(S::Closed.next(c, m).is_err(), "{c:?} after Closed");
                // A receiver never accepts response frames or Invalid.
                if matches!(c, C::Invalid | C::Ok | C::Error | C::Challenge) {
                    for s in STATES {
                        assert!(s.next(c, m).is_err(), "{c:?} in {s:?}");
                    }
                }
            }
        }
        // Coordinated: no Complete without the go-ahead. Auto: no go-ahead at all.
        assert!(S::Verified.next(C::Complete, M::Coordinated).is_err());
        assert!(S::Verified.next(C::Switchover, M::Auto).is_err());
        assert!(S::GoAhead.next(C::Complete, M::Auto).is_err());
    }

    /// Walks every sequence up to `depth`; returns the commands on each path to Running.
    fn paths_to_running(m: SwitchoverMode, depth: usize) -> Vec<Vec<Command>> {
        fn walk(
            s: S,
            m: SwitchoverMode,
            depth: usize,
            path: &mut Vec<Command>,
            out: &mut Vec<Vec<Command>>,
        ) {
            if s == S::Running {
                out.push(path.clone());
                return;
            }
            if depth == 0 {
                return;
            }
            for c in ALL {
                if let Ok(n) = s.next(c, m) {
                    path.push(c);
                    walk(n, m, depth - 1, path, out);
                    path.pop();
                }
            }
        }
        let mut out = Vec::new();
        walk(S::AwaitHello, m, depth, &mut Vec::new(), &mut out);
        out
    }

    #[test]
    fn coordinated_running_needs_the_go_ahead_after_digests() {
        let paths = paths_to_running(M::Coordinated, 8);
        assert!(!paths.is_empty());
        for p in paths {
            let d = p.iter().position(|c| *c == C::Digests).expect("digests");
            let g = p
                .iter()
                .position(|c| *c == C::Switchover)
                .expect("go-ahead");
            assert!(d < g && g + 1 == p.len() - 1, "{p:?}");
            assert_eq!(p.last(), Some(&C::Complete));
        }
        for p in paths_to_running(M::Auto, 8) {
            assert!(!p.contains(&C::Switchover), "{p:?}");
        }
    }

    proptest! {
        /// Any command sequence: the machine never reaches Running in coordinated mode
        /// unless Digests and then Switchover came, and once Closed or Running it
        /// accepts nothing.
        #[test]
        fn arbitrary_sequences_respect_the_go_ahead(cmds in proptest::collection::vec(0usize..15, 0..24),
                                                    coordinated in any::<bool>()) {
            let m = if coordinated { M::Coordinated } else { M::Auto };
            let mut s = S::AwaitHello;
            let (mut digests, mut go_ahead) = (false, false);
            for i in cmds {
                let c = ALL[i];
                match s.next(c, m) {
                    Ok(n) => {
                        prop_assert!(!matches!(s, S::Running | S::Closed));
                        if c == C::Digests { digests = true; }
                        if c == C::Switchover {
                            prop_assert!(digests && m == M::Coordinated);
                            go_ahead = true;
                        }
                        if n == S::Running {
                            prop_assert!(digests);
                            prop_assert_eq!(go_ahead, m == M::Coordinated);
                        }
                        s = n;
                    }
                    Err(e) => prop_assert_eq!(e, OutOfOrder { state: s, cmd: c }),
                }
            }
        }
    }

    #[test]
    fn only_running_is_reached_through_complete_after_digests() {
        // Exhaustive over sequences of length <= 6: Running needs Digests before Complete.
        fn walk(s: S, depth: usize, saw_digests: bool) {
            if s == S::Running {
                assert!(saw_digests);
                return;
            }
            if depth == 0 {
                return;
            }
            for c in ALL {
                if let Ok(n) = s.next(c, M::Auto) {
                    walk(n, depth - 1, saw_digests || c == C::Digests);
                }
            }
        }
        walk(S::AwaitHello, 7, false);
    }

    #[test]
    fn before_authentication_only_a_small_hello_passes() {
        for m in MODES {
            assert_eq!(
                S::AwaitHello.max_frame_len(C::Hello, m),
                Ok(C::Hello.max_payload())
            );
            assert!(C::Hello.max_payload() <= HANDSHAKE_MAX_FRAME);
            for c in ALL {
                if c != C::Hello {
                    assert!(S::AwaitHello.max_frame_len(c, m).is_err(), "{c:?}");
                }
                // Nothing at all once the connection is over.
                assert!(S::Running.max_frame_len(c, m).is_err());
                assert!(S::Closed.max_frame_len(c, m).is_err());
            }
            // The largest frame a peer can announce is refused from the header.
            let h = protocol::FrameHeader {
                cmd: C::Digests,
                flags: 0,
                length: C::Digests.max_payload(),
            };
            assert!(matches!(
                S::AwaitHello.check_header(&h, m),
                Err(FrameRefused::OutOfOrder(_))
            ));
            let h = protocol::FrameHeader {
                cmd: C::Hello,
                flags: 0,
                length: C::Hello.max_payload() + 1,
            };
            assert!(matches!(
                S::AwaitHello.check_header(&h, m),
                Err(FrameRefused::TooLong { .. })
            ));
        }
    }

    #[test]
    fn authenticated_states_allow_their_commands_full_length() {
        for m in MODES {
            for s in STATES {
                for c in ALL {
                    match (s.next(c, m), s.max_frame_len(c, m)) {
                        (Ok(_), Ok(max)) if s.authenticated() => {
                            assert_eq!(max, c.max_payload(), "{c:?} in {s:?}")
                        }
                        (Ok(_), Ok(max)) => assert!(max <= HANDSHAKE_MAX_FRAME),
                        (Err(a), Err(b)) => assert_eq!(a, b),
                        (a, b) => panic!("{c:?} in {s:?}: next {a:?}, max {b:?}"),
                    }
                }
            }
        }
        assert_eq!(
            S::Memory.max_frame_len(C::Memory, M::Auto),
            Ok(protocol::MAX_PAYLOAD)
        );
        assert_eq!(S::AwaitConfig.max_frame_len(C::Join, M::Auto), Ok(16));
        assert!(S::Data.max_frame_len(C::Digests, M::Auto).is_err());
    }

    #[test]
    fn abandon_closes_before_running() {
        for m in MODES {
            for s in [
                S::AwaitConfig,
                S::Memory,
                S::Data,
                S::StateReceived,
                S::Verified,
                S::GoAhead,
            ] {
                assert_eq!(s.next(C::Abandon, m), Ok(S::Closed));
            }
        }
    }

    #[test]
    fn config_checks() {
        let spec = VmSpec {
            name: "a".into(),
            memory_mib: 128,
            vcpus: 1,
            boot: BootSpec {
                flat_binary: "x".into(),
                load_addr: 0x7c00,
            },
            disks: vec![],
            cpuid: vec![],
        };
        assert!(check_config(2 << 20, 4, &spec).is_ok());
        assert!(check_config(3 << 20, 4, &spec).is_err());
        assert!(check_config(2 << 20, 0, &spec).is_err());
        assert!(check_config(2 << 20, 65, &spec).is_err());
        assert!(
            check_config(
                2 << 20,
                1,
                &VmSpec {
                    memory_mib: 0,
                    ..spec.clone()
                }
            )
            .is_err()
        );
        assert!(
            check_config(
                2 << 20,
                1,
                &VmSpec {
                    vcpus: 0,
                    ..spec.clone()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn tickets_parse() {
        let t = format!("{}.{}", "ab".repeat(16), "cd".repeat(32));
        let (id, secret) = parse_ticket(&t).expect("valid ticket");
        assert_eq!(id, [0xab; 16]);
        assert_eq!(secret, "cd".repeat(32).into_bytes());
        assert!(parse_ticket("abc.def").is_none());
        assert!(parse_ticket(&format!("{}.{}", "zz".repeat(16), "cd".repeat(32))).is_none());
    }
}
