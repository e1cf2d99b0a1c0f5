//! The migration service: starts outgoing migrations, keeps their handles for the API,
//! and owns the listener state for incoming ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::RngCore;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::VmHost;
use super::policy::{Limits, TimeoutAction};
use super::protocol::{AuthKind, Compression, MAX_DISKS, MAX_URI_LEN, SwitchoverMode};
use super::receiver::{Receiver, parse_ticket};
use super::sender::{self, SendParams};
use super::stats::{Downtime, MigrationInfo, MigrationState, Outgoing, Window};

/// Body of `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target agent's migration listener, `HOST:PORT`.
    pub target: String,
    pub downtime_limit_ms: Option<u64>,
    pub max_bandwidth_mibs: Option<u64>,
    pub streams: Option<u16>,
    pub auto_converge: Option<bool>,
    pub timeout_s: Option<u64>,
    pub timeout_action: Option<TimeoutAction>,
    pub compression: Option<Compression>,
    /// A one-time ticket from the target (`POST /v1/migrations/tickets` there), used
    /// instead of the cluster token.
    /// A secret: `Debug` shows `<redacted>`.
    pub ticket: Option<stagehand_common::secret::Secret>,
    /// `auto` (default) or `coordinated`: wait, quiesced, for the go-ahead.
    pub switchover: Option<SwitchoverMode>,
    /// Coordinated mode: fail (source stays paused) without a go-ahead in this time.
    pub switchover_timeout_s: Option<u64>,
    /// Hold the switchover until a PATCH lifts it (see `Limits::hold`).
    pub hold: Option<bool>,
}

/// Body of `POST /v1/migrations/{id}/switchover`: the coordinator's go-ahead.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// One disk per VM disk, in the VM's order: `{nbd, lease}` with the target's
    /// lease tokens.
    pub disks: Vec<crate::contract::DiskSpec>,
}

/// Default of `switchover_timeout_s`.
/// TCP connections when the request names none. Two: the sender's reading and hashing
/// and the receiver's writing then run on two threads per side, which roughly halved
/// a 1 GiB A-B migration here (147 -> 114 ms median), at no cost on a shaped link.
pub const DEFAULT_STREAMS: u16 = 2;

pub const DEFAULT_SWITCHOVER_TIMEOUT_S: u64 = 30;
/// Largest `switchover_timeout_s` (it also bounds how long a target holds a verified,
/// paused copy).
pub const MAX_SWITCHOVER_TIMEOUT_S: u64 = 3600;

/// Body of `PATCH /v1/migrations/{id}`: limits to change while it runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    pub downtime_limit_ms: Option<u64>,
    pub max_bandwidth_mibs: Option<u64>,
    pub auto_converge: Option<bool>,
    pub timeout_s: Option<u64>,
    pub timeout_action: Option<TimeoutAction>,
    pub hold: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no migration {0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Vm(#[from] crate::contract::VmError),
    #[error(
        "no cluster token is configured and no ticket was given; the target would refuse the stream"
    )]
    NoCredentials,
    #[error("migration {0} has already ended")]
    Ended(String),
    #[error("{0}")]
    WrongState(String),
    #[error("{0}: put the token in the lease field")]
    LeaseInUri(String),
}

/// TLS for migration streams (`--tls-*`): the listener requires a CA-signed client
/// certificate; outgoing streams check the target against the CA.
#[derive(Clone)]
pub struct MigrationTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl MigrationTls {
    pub fn from_files(
        files: &stagehand_common::tls::TlsFiles,
    ) -> Result<Self, stagehand_common::tls::TlsError> {
        let mut server = (*files.mutual_server_config()?).clone();
        // No session tickets: nothing but frames ever comes after the handshake, so an
        // idle stream's "has the peer said something" check stays a socket peek.
        server.send_tls13_tickets = 0;
        Ok(MigrationTls {
            server: Arc::new(server),
            client: files.client_config()?,
        })
    }
}

pub struct MigrationService {
    host: Arc<dyn VmHost>,
    token: Option<String>,
    tls: Option<MigrationTls>,
    receiver: Arc<Receiver>,
    migrations: Mutex<HashMap<String, Arc<Outgoing>>>,
}

impl MigrationService {
    /// `token` is the cluster token (`--api-token`): proofs to targets are made with it
    /// and incoming streams must prove it (or a ticket this agent issued).
    pub fn new(host: Arc<dyn VmHost>, token: Option<String>) -> Arc<Self> {
        Self::with_tls(host, token, None)
    }

    /// [`Self::new`], with every migration stream (in and out) over TLS when `tls`.
    pub fn with_tls(
        host: Arc<dyn VmHost>,
        token: Option<String>,
        tls: Option<MigrationTls>,
    ) -> Arc<Self> {
        Arc::new(MigrationService {
            receiver: Arc::new(Receiver::new(
                host.clone(),
                token.as_deref(),
                tls.as_ref().map(|t| t.server.clone()),
            )),
            host,
            token,
            tls,
            migrations: Mutex::new(HashMap::new()),
        })
    }

    /// Serves the migration listener until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) {
        self.receiver.clone().serve(listener, shutdown).await
    }

    pub fn issue_ticket(&self, vm: &str) -> String {
        self.receiver.issue_ticket(vm)
    }

    /// Starts migrating VM `name`; returns the migration id at once.
    pub fn start(&self, name: &str, req: MigrateRequest) -> Result<String, ServiceError> {
        if req.target.is_empty() {
            return Err(ServiceError::BadRequest(
                "target is required: the target agent's migration listener, HOST:PORT".into(),
            ));
        }
        if let Some(s) = req.streams
            && !(1..=64).contains(&s)
        {
            return Err(ServiceError::BadRequest(
                "streams must be between 1 and 64".into(),
            ));
        }
        let (secret, auth) = match (&req.ticket, &self.token) {
            (Some(t), _) => {
                let (id, secret) = parse_ticket(t.expose()).ok_or_else(|| {
                    ServiceError::BadRequest(
                        "ticket is not of the form ID.SECRET issued by the target".into(),
                    )
                })?;
                (secret, AuthKind::Ticket(id))
            }
            (None, Some(tok)) => (tok.as_bytes().to_vec(), AuthKind::Token),
            (None, None) => return Err(ServiceError::NoCredentials),
        };
        let d = Limits::default();
        let limits = Limits {
            downtime_limit_ms: req.downtime_limit_ms.unwrap_or(d.downtime_limit_ms),
            max_bandwidth_mibs: req.max_bandwidth_mibs.unwrap_or(d.max_bandwidth_mibs),
            auto_converge: req.auto_converge.unwrap_or(d.auto_converge),
            timeout_s: req.timeout_s.unwrap_or(d.timeout_s),
            timeout_action: req.timeout_action.unwrap_or(d.timeout_action),
            hold: req.hold.unwrap_or(d.hold),
        };
        let switchover = req.switchover.unwrap_or_default();
        let switchover_timeout_s = req
            .switchover_timeout_s
            .unwrap_or(DEFAULT_SWITCHOVER_TIMEOUT_S);
        if !(1..=MAX_SWITCHOVER_TIMEOUT_S).contains(&switchover_timeout_s) {
            return Err(ServiceError::BadRequest(format!(
                "switchover_timeout_s must be between 1 and {MAX_SWITCHOVER_TIMEOUT_S}"
            )));
        }
        let streams = req.streams.unwrap_or(DEFAULT_STREAMS);
        let compression = req.compression.unwrap_or_default();
        let (src, was_running) = self.host.begin_outgoing(name)?;
        let mut idb = [0u8; 8];
        rand::rng().fill_bytes(&mut idb);
        let id = format!(
            "mig-{}",
            idb.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let spec = src.spec();
        let out = Arc::new(Outgoing::new(
            spec.disks.len(),
            MigrationInfo {
                id: id.clone(),
                vm: name.to_string(),
                target: req.target.clone(),
                state: MigrationState::Setup,
                error: None,
                total_ms: 0.0,
                setup_ms: 0.0,
                downtime_ms: 0.0,
                downtime: Downtime::default(),
                expected_downtime_ms: 0.0,
                transferred_bytes: 0,
                ram_transferred_bytes: 0,
                remaining_bytes: spec.memory_mib << 20,
                total_bytes: spec.memory_mib << 20,
                zero_pages: 0,
                normal_pages: 0,
                passes: vec![],
                bandwidth_mibs: 0.0,
                dirty_rate_pages_per_s: 0.0,
                throttle_percent: 0,
                streams,
                compression,
                limits,
                switchover,
                switchover_timeout_s,
                quiesced_at_ms: None,
                go_ahead_at_ms: None,
                cpu_ms: 0.0,
            },
        ));
        out.counters
            .pass_pending
            .store(spec.memory_mib << 20, std::sync::atomic::Ordering::Relaxed);
        self.migrations
            .lock()
            .expect("migrations lock is never poisoned")
            .insert(id.clone(), out.clone());
        let params = SendParams {
            target: req.target,
            streams,
            compression,
            secret,
            auth,
            switchover,
            switchover_timeout: std::time::Duration::from_secs(switchover_timeout_s),
            tls: self.tls.as_ref().map(|t| t.client.clone()),
        };
        let host = self.host.clone();
        let vm = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("mig-send-{name}"))
            .spawn(move || sender::run(out, host, vm, src, was_running, params));
        if let Err(e) = spawned {
            self.host.end_outgoing(name, false);
            return Err(ServiceError::BadRequest(format!(
                "cannot start the migration thread: {e}"
            )));
        }
        tracing::info!(vm = name, %id, "migration started");
        Ok(id)
    }

    fn get_handle(&self, id: &str) -> Result<Arc<Outgoing>, ServiceError> {
        self.migrations
            .lock()
            .expect("migrations lock is never poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(id.to_string()))
    }

    pub fn get(&self, id: &str) -> Result<MigrationInfo, ServiceError> {
        Ok(self.get_handle(id)?.snapshot())
    }

    pub fn list(&self) -> Vec<MigrationInfo> {
        let mut v: Vec<MigrationInfo> = self
            .migrations
            .lock()
            .expect("migrations lock is never poisoned")
            .values()
            .map(|o| o.snapshot())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Requests cancellation. Before the guest is paused the sender stops at the next
    /// chunk and the guest keeps running on the source; once stop and copy began the
    /// switchover runs to its end (or fails and resumes the source). A coordinated
    /// migration that is quiesced is cancelled (the source resumes) unless the go-ahead
    /// was given: then it is too late (`WrongState`).
    pub fn cancel(&self, id: &str) -> Result<MigrationInfo, ServiceError> {
        let h = self.get_handle(id)?;
        if h.state().is_final() {
            return Err(ServiceError::Ended(id.to_string()));
        }
        h.with_window(|w| match w {
            Window::Open => {
                *w = Window::Cancelled;
                h.request_cancel();
                Ok(())
            }
            Window::Cancelled => Ok(()),
            Window::GoAhead(_) => Err(ServiceError::WrongState(format!(
                "migration {id} already has its switchover go-ahead; it can no longer be cancelled"
            ))),
            Window::Aborted => Err(ServiceError::WrongState(format!(
                "migration {id} was aborted while quiesced; its source stays paused until resumed with new disk URIs"
            ))),
            Window::Failed => Err(ServiceError::Ended(id.to_string())),
            Window::Closed => {
                h.request_cancel();
                Ok(())
            }
        })?;
        Ok(h.snapshot())
    }

    /// Ends a quiesced coordinated migration without a go-ahead and WITHOUT resuming the
    /// source: the coordinator calls it when it fenced (or may have fenced) the disks to
    /// the target and then decided to roll back; it resumes the source itself with new
    /// disk URIs. The target discards its copy. Anything but a quiesced migration
    /// waiting for its go-ahead is `WrongState` (before quiesce, `cancel` is the call).
    pub fn abort(&self, id: &str) -> Result<MigrationInfo, ServiceError> {
        let h = self.get_handle(id)?;
        if h.state().is_final() {
            return Err(ServiceError::Ended(id.to_string()));
        }
        h.with_window(|w| match w {
            Window::Open => {
                *w = Window::Aborted;
                Ok(())
            }
            Window::Aborted => Ok(()),
            Window::Closed => Err(ServiceError::WrongState(format!(
                "migration {id} is not quiesced and waiting for its go-ahead; use cancel"
            ))),
            Window::GoAhead(_) => Err(ServiceError::WrongState(format!(
                "migration {id} already has its switchover go-ahead; it can no longer be aborted"
            ))),
            Window::Cancelled | Window::Failed => Err(ServiceError::Ended(id.to_string())),
        })?;
        tracing::info!(%id, "quiesced migration aborted; the source stays paused");
        Ok(h.snapshot())
    }

    /// The coordinator's go-ahead for a quiesced coordinated migration: `disks` are the
    /// URIs (new lease tokens) the target opens, one per VM disk. Repeating the same
    /// go-ahead is harmless; anything but a quiesced migration is `WrongState`.
    pub fn switchover(
        &self,
        id: &str,
        req: SwitchoverRequest,
    ) -> Result<MigrationInfo, ServiceError> {
        let h = self.get_handle(id)?;
        let info = h.snapshot();
        if info.switchover != SwitchoverMode::Coordinated {
            return Err(ServiceError::WrongState(format!(
                "migration {id} switches over on its own (switchover \"auto\"); only a coordinated one takes a go-ahead"
            )));
        }
        if req.disks.len() != h.disk_count {
            return Err(ServiceError::BadRequest(format!(
                "{} disk URIs given; VM {} has {} disks (give one URI per disk, in order)",
                req.disks.len(),
                info.vm,
                h.disk_count
            )));
        }
        if req.disks.len() > MAX_DISKS
            || req.disks.iter().any(|d| {
                d.nbd.is_empty()
                    || d.nbd.len() > MAX_URI_LEN
                    || d.lease
                        .as_ref()
                        .is_some_and(|l| l.expose().len() > MAX_URI_LEN)
            })
        {
            return Err(ServiceError::BadRequest(format!(
                "disk URIs and leases must be non-empty and at most {MAX_URI_LEN} bytes"
            )));
        }
        crate::devices::disk_uri::check_disks(&req.disks).map_err(|e| match e {
            crate::devices::disk_uri::DiskError::LeaseInUri(_) => {
                ServiceError::LeaseInUri(e.to_string())
            }
            other => ServiceError::BadRequest(other.to_string()),
        })?;
        h.with_window(|w| match w {
            Window::Open => {
                *w = Window::GoAhead(req.disks);
                let at = super::stats::ms(h.started.elapsed());
                h.update(|i| i.go_ahead_at_ms = Some(at));
                Ok(())
            }
            Window::GoAhead(d) if *d == req.disks => Ok(()),
            _ => Err(ServiceError::WrongState(format!(
                "migration {id} is {}; the switchover go-ahead needs it quiesced and waiting",
                serde_json::to_value(info.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ))),
        })?;
        tracing::info!(%id, disks = h.disk_count, "switchover go-ahead accepted");
        Ok(h.snapshot())
    }

    pub fn patch(&self, id: &str, p: LimitsPatch) -> Result<MigrationInfo, ServiceError> {
        let h = self.get_handle(id)?;
        if h.state().is_final() {
            return Err(ServiceError::Ended(id.to_string()));
        }
        let mut l = h.limits();
        if let Some(v) = p.downtime_limit_ms {
            l.downtime_limit_ms = v;
        }
        if let Some(v) = p.max_bandwidth_mibs {
            l.max_bandwidth_mibs = v;
        }
        if let Some(v) = p.auto_converge {
            l.auto_converge = v;
        }
        if let Some(v) = p.timeout_s {
            l.timeout_s = v;
        }
        if let Some(v) = p.timeout_action {
            l.timeout_action = v;
        }
        if let Some(v) = p.hold {
            l.hold = v;
        }
        h.set_limits(l);
        Ok(h.snapshot())
    }
}
