//! The coordinator's service layer. The HTTP layer (`api.rs`) is a thin translation of
//! it.
//!
//! - `inventory`: sites, storage nodes, hosts, VM records, placement.
//! - `vms`: the VM lifecycle (create with its leased disk, delete).
//! - `executor`: starts and cancels migrations and runs each one as a loop of
//!   observe, [`crate::driver::next_action`], act, journal.
//! - `recovery`: at start, hands every unfinished migration to an executor.
//! - `leadership`: terms of leadership (etcd election), status, forwarding writes.
//! - `fleet`: host reports, drain/pin, evacuate / balance / consolidate operations.
//!
//! Switchover: the agents run the migration in their coordinated mode. The source
//! pauses, drains its disk I/O and reports `quiesced`; the executor then fences the
//! disks to the target host (while the last pages still flow) and sends the go-ahead
//! with the target's own lease tokens, which the target uses to open the disks before
//! it resumes. See docs/coordinator.md.

mod executor;
mod fleet;
mod geo;
mod inventory;
mod leadership;
mod recovery;
mod replication;
mod vms;

pub use fleet::{FleetItem, FleetKind, FleetOp, FleetRequest, HOST_POLL};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use stagehand_common::secret::Secret;

pub use replication::ReplicateRequest;

use crate::daemons::{AgentClient, DaemonClient, StorageClient};
use crate::error::ApiError;
use crate::model::*;
use crate::store::{Batch, Store};

/// The environment variable naming a phase at which the process kills itself right
/// after journaling it (crash-recovery tests).
pub const FAILPOINT_ENV: &str = "STAGEHAND_COORD_FAILPOINT";

/// Holder name used while the coordinator itself fills a new disk from an image.
const FILL_HOLDER: &str = "coord-fill";

/// Test hook: `<phase>:<file>`, see `Coordinator::hold`.
pub const HOLD_ENV: &str = "STAGEHAND_COORD_HOLD";

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The cluster token: used when calling daemons added without their own token.
    pub cluster_token: Option<Secret>,
    /// TLS for calling daemons over https (their certificate checked against the CA,
    /// this coordinator's presented), and for NBD connections to storage nodes.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where `--disk-image` files must be.
    pub images_dir: PathBuf,
    /// Concurrent migrations per host (in or out).
    pub max_migrations_per_host: usize,
    /// Concurrent migrations per site (in or out).
    pub max_migrations_per_site: usize,
}

pub struct Coordinator {
    store: Store,
    http: reqwest::Client,
    cfg: ServiceConfig,
    /// Serializes inventory changes (placement reads then writes).
    inventory: tokio::sync::Mutex<()>,
    /// Migrations driven by this process: id -> controls.
    running: Mutex<HashMap<String, Arc<executor::DriveControl>>>,
    failpoint: Option<String>,
    hold: Option<(String, PathBuf)>,
    pub shutdown: CancellationToken,
    /// The current leadership term (a child of `shutdown`): executors run under it
    /// and stop when it is cancelled. Cancelled while this coordinator does not lead.
    term: Mutex<CancellationToken>,
    /// This coordinator's role as the store's election publishes it.
    role: tokio::sync::watch::Receiver<crate::store::Role>,
}

/// A VM creation request (the API's body).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    pub memory_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u32,
    pub image: String,
    #[serde(default = "boot_sector")]
    pub load_addr: u64,
    pub disk_bytes: u64,
    #[serde(default)]
    pub disk_image: Option<String>,
}

fn one() -> u32 {
    1
}
fn boot_sector() -> u64 {
    0x7c00
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub vm: String,
    /// Target site; defaults to the target host's site.
    #[serde(default)]
    pub to_site: Option<String>,
    #[serde(default)]
    pub to_host: Option<String>,
    #[serde(default, flatten)]
    pub options: MigrationOptions,
}

fn failpoint_hit(fp: &Option<String>, phase: &str) {
    if fp.as_deref() == Some(phase) {
        tracing::error!(phase, "fail point reached: the coordinator stops here");
        // Abort, not exit: no destructors, no flush; as close to kill -9 as std gets.
        std::process::abort();
    }
}

impl Coordinator {
    pub fn new(store: Store, cfg: ServiceConfig) -> Result<Arc<Self>, reqwest::Error> {
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = &cfg.tls {
            // reqwest is built with the same rustls (0.23) as stagehand_common: the config
            // (our CA as the only root, our certificate as the client's) is used as is.
            http = http.use_preconfigured_tls(rustls::ClientConfig::clone(tls));
        }
        let http = http.build()?;
        let shutdown = CancellationToken::new();
        let term = shutdown.child_token();
        // A store whose owner leads from the start (RocksDB) gives this process its
        // term at once; otherwise there is none until the election says so.
        if !matches!(*store.role().borrow(), crate::store::Role::Leader(_)) {
            term.cancel();
        }
        Ok(Arc::new(Self {
            role: store.role(),
            store,
            http,
            cfg,
            inventory: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            failpoint: std::env::var(FAILPOINT_ENV).ok(),
            hold: std::env::var(HOLD_ENV).ok().and_then(|v| {
                v.split_once(':')
                    .map(|(p, f)| (p.to_owned(), PathBuf::from(f)))
            }),
            shutdown,
            term: Mutex::new(term),
        }))
    }

    fn cluster_token(&self) -> Option<String> {
        self.cfg
            .cluster_token
            .as_ref()
            .map(|t| t.expose().to_owned())
    }

    pub(crate) fn storage_client(&self, s: &StorageNode) -> StorageClient {
        let token = s
            .token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .or_else(|| self.cluster_token());
        StorageClient(DaemonClient::new(
            self.http.clone(),
            &s.api,
            token,
            "storage node",
        ))
    }

    pub(crate) fn agent_client(&self, h: &Host) -> AgentClient {
        let token = h
            .token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .or_else(|| self.cluster_token());
        AgentClient(DaemonClient::new(self.http.clone(), &h.api, token, "agent"))
    }

    // ---------------------------------------------------------------- migrations

    pub fn migrations(&self) -> Result<Vec<MigrationDoc>, ApiError> {
        let mut v: Vec<MigrationDoc> = self
            .store
            .list::<MigrationDoc>("migrations")?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        v.sort_by_key(|m| m.created_ms);
        Ok(v)
    }

    pub fn migration(&self, id: &str) -> Result<MigrationDoc, ApiError> {
        self.store
            .get::<MigrationDoc>("migrations", id)?
            .ok_or_else(|| {
                ApiError::not_found(
                    "migration_not_found",
                    format!("No migration {id}; see `coord migration list`."),
                )
            })
    }

    pub fn journal(&self, id: &str) -> Result<Vec<JournalEntry>, ApiError> {
        Ok(self
            .store
            .list::<JournalEntry>("journal")?
            .into_iter()
            .filter(|(k, _)| k.split_once('/').map(|(m, _)| m) == Some(id))
            .map(|(_, v)| v)
            .collect())
    }

    /// Persists the doc and a journal entry for its phase in one synced batch, plus
    /// the VM record when it changes with the phase.
    pub(crate) fn journal_phase(
        &self,
        doc: &MigrationDoc,
        vm: Option<&Vm>,
    ) -> Result<(), ApiError> {
        let mut b = Batch::default();
        b.put("migrations", &doc.record.id, doc)?;
        let key = format!(
            "{}/{:020}",
            doc.record.id,
            now_ms() * 1000 + self.journal(&doc.record.id)?.len() as u64
        );
        b.put(
            "journal",
            &key,
            &JournalEntry {
                at_ms: now_ms(),
                phase: doc.record.phase.clone(),
            },
        )?;
        if let Some(vm) = vm {
            b.put("vms", &vm.name, vm)?;
        }
        self.store.commit(b)?;
        tracing::info!(migration = %doc.record.id, phase = doc.record.phase.name(), "journaled");
        failpoint_hit(&self.failpoint, doc.record.phase.name());
        Ok(())
    }

    /// Pre-checks, journals the migration as Planned and starts driving it.
    /// Test hook: `STAGEHAND_COORD_HOLD=<phase>:<file>` makes the driver stop right after
    /// journaling `<phase>`, create `<file>.held`, and go on once `<file>` exists (or
    /// after ten minutes). Lets a test break something at an exact phase.
    pub(crate) async fn hold(&self, phase: &str) {
        let Some((at, file)) = &self.hold else {
            return;
        };
        if at != phase {
            return;
        }
        tracing::warn!(phase, file = %file.display(), "hold point reached; waiting for the file");
        let mut held = file.clone().into_os_string();
        held.push(".held");
        let _ = std::fs::write(&held, b"");
        let end = Instant::now() + Duration::from_secs(600);
        while !file.exists() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Prometheus text for /metrics.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let count = |t: &str| self.store.list::<Value>(t).map(|v| v.len()).unwrap_or(0);
        out.push_str("# TYPE stagehand_coord_inventory gauge\n");
        for (kind, table) in [
            ("site", "sites"),
            ("storage", "storage"),
            ("host", "hosts"),
            ("vm", "vms"),
        ] {
            out.push_str(&format!(
                "stagehand_coord_inventory{{kind=\"{kind}\"}} {}\n",
                count(table)
            ));
        }
        out.push_str("# TYPE stagehand_coord_migrations gauge\n");
        let mut by_phase: HashMap<&'static str, usize> = HashMap::new();
        for m in self.migrations().unwrap_or_default() {
            *by_phase.entry(m.record.phase.name()).or_default() += 1;
        }
        let mut phases: Vec<_> = by_phase.into_iter().collect();
        phases.sort();
        for (p, n) in phases {
            out.push_str(&format!(
                "stagehand_coord_migrations{{phase=\"{p}\"}} {n}\n"
            ));
        }
        out
    }

    /// The disks as agents take them in create, resume and the switchover go-ahead:
    /// `{"nbd": URI, "lease": TOKEN}`. The token never goes into the URI (it would end
    /// up in logs); `nbds://` when the coordinator runs with TLS (the agent connects
    /// with its own client certificate).
    pub(crate) fn disk_specs(&self, vm: &Vm) -> Result<Vec<Value>, ApiError> {
        self.specs_of(&vm.disks)
    }

    /// The disk specs for the target host: the target site's copies of moved disks.
    pub(crate) fn target_disk_specs(
        &self,
        vm: &Vm,
        plan: Option<&DiskMovePlan>,
    ) -> Result<Vec<Value>, ApiError> {
        self.specs_of(&Self::target_disks(vm, plan))
    }

    fn specs_of(&self, disks: &[Disk]) -> Result<Vec<Value>, ApiError> {
        let scheme = if self.cfg.tls.is_some() {
            "nbds"
        } else {
            "nbd"
        };
        disks
            .iter()
            .map(|d| {
                let s = self.storage(&d.storage)?;
                let mut spec =
                    serde_json::json!({"nbd": format!("{scheme}://{}/{}", s.nbd, d.export)});
                if let Some(t) = &d.token {
                    spec["lease"] = Value::String(t.expose().to_owned());
                }
                Ok(spec)
            })
            .collect()
    }
}
