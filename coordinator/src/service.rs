//! The coordinator's service layer: inventory, placement, `vm create`, and the
//! migration driver that walks `migration.rs`'s state machine, journaling each phase
//! before acting on it. The HTTP layer (`api.rs`) is a thin translation of this.
//!
//! Switchover: the agents run the migration in their coordinated mode. The source
//! pauses, drains its disk I/O and reports `quiesced`; the driver then fences the disks
//! to the target host (while the last pages still flow) and sends the go-ahead with
//! the target's own lease tokens, which the target uses to open the disks before it
//! resumes. See docs/coordinator.md.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::daemons::{AgentClient, AgentMigration, DaemonClient, DaemonError, POLL, StorageClient};
use crate::error::ApiError;
use crate::migration::{
    Event, MigrationRecord, Observation, Phase, RecoveryAction, VmPresence, plan_recovery,
};
use crate::model::*;
use crate::store::{Batch, Store};

/// The environment variable naming a phase at which the process kills itself right
/// after journaling it (crash-recovery tests).
pub const FAILPOINT_ENV: &str = "STAGEHAND_COORD_FAILPOINT";

/// Holder name used while the coordinator itself fills a new disk from an image.
const FILL_HOLDER: &str = "coord-fill";

/// Test hook: `<phase>:<file>`, see `Coordinator::hold`.
pub const HOLD_ENV: &str = "STAGEHAND_COORD_HOLD";

/// Consecutive failed polls of the source agent (`FAST_POLL` apart) before giving up.
const POLL_ERRORS_MAX: u32 = 3000;

/// How often the driver asks the source agent while memory moves: the moment it
/// quiesces starts the guest's downtime, so it is noticed within this.
const FAST_POLL: Duration = Duration::from_millis(20);

/// The longest the driver waits for a quiesced source to settle (its switchover
/// timeout is 30 s by default) or for a migration to end after the go-ahead.
const SETTLE_MAX: Duration = Duration::from_secs(120);

/// A driven migration's controls, shared by the driver and `cancel_migration`.
struct DriveControl {
    cancel: CancellationToken,
    /// Set (under the `running` map lock) once the go-ahead may be sent: from then on a
    /// cancel is refused.
    go_ahead: AtomicBool,
}

/// The two hosts of a migration and their agents.
struct Pair<'a> {
    src: &'a Host,
    dst: &'a Host,
    sa: AgentClient,
    da: AgentClient,
}

/// Why the driver stopped before the source quiesced.
enum Stop {
    /// The source keeps its disks: undo and journal `cancelled`.
    Abort(String),
    /// The outcome is unclear: leave it to recovery.
    Recover(ApiError),
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The cluster token: used when calling daemons added without their own token.
    pub cluster_token: Option<String>,
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
    /// Migrations driven by this process: id -> cancel signal.
    running: Mutex<HashMap<String, Arc<DriveControl>>>,
    failpoint: Option<String>,
    hold: Option<(String, PathBuf)>,
    pub shutdown: CancellationToken,
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
    pub fn new(store: Store, cfg: ServiceConfig) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a reqwest client with timeouts builds");
        Arc::new(Self {
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
            shutdown: CancellationToken::new(),
        })
    }

    fn storage_client(&self, s: &StorageNode) -> StorageClient {
        let token = s.token.clone().or_else(|| self.cfg.cluster_token.clone());
        StorageClient(DaemonClient::new(
            self.http.clone(),
            &s.api,
            token,
            "storage node",
        ))
    }

    fn agent_client(&self, h: &Host) -> AgentClient {
        let token = h.token.clone().or_else(|| self.cfg.cluster_token.clone());
        AgentClient(DaemonClient::new(self.http.clone(), &h.api, token, "agent"))
    }

    // ---------------------------------------------------------------- inventory

    pub fn sites(&self) -> Result<Vec<Site>, ApiError> {
        Ok(self
            .store
            .list::<Site>("sites")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    pub fn storage_nodes(&self) -> Result<Vec<StorageNode>, ApiError> {
        Ok(self
            .store
            .list::<StorageNode>("storage")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    pub fn hosts(&self) -> Result<Vec<Host>, ApiError> {
        Ok(self
            .store
            .list::<Host>("hosts")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    pub fn vms(&self) -> Result<Vec<Vm>, ApiError> {
        Ok(self
            .store
            .list::<Vm>("vms")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    pub fn vm(&self, name: &str) -> Result<Vm, ApiError> {
        self.store.get::<Vm>("vms", name)?.ok_or_else(|| {
            ApiError::not_found(
                "vm_not_found",
                format!("No VM named {name:?}; see `coord vm list`."),
            )
        })
    }

    fn host(&self, name: &str) -> Result<Host, ApiError> {
        self.store.get::<Host>("hosts", name)?.ok_or_else(|| {
            ApiError::not_found(
                "host_not_found",
                format!("No host named {name:?}; add it with `coord host add`."),
            )
        })
    }

    fn storage(&self, name: &str) -> Result<StorageNode, ApiError> {
        self.store
            .get::<StorageNode>("storage", name)?
            .ok_or_else(|| {
                ApiError::not_found(
                    "storage_not_found",
                    format!("No storage node named {name:?}."),
                )
            })
    }

    fn require_site(&self, name: &str) -> Result<(), ApiError> {
        match self.store.get::<Site>("sites", name)? {
            Some(_) => Ok(()),
            None => Err(ApiError::not_found(
                "site_not_found",
                format!("No site named {name:?}; add it with `coord site add {name}`."),
            )),
        }
    }

    fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
        if valid_name(name) {
            Ok(())
        } else {
            Err(ApiError::bad_request(format!(
                "{kind} name {name:?} is invalid: use 1-64 characters of A-Z a-z 0-9 . _ - not starting with a dot."
            )))
        }
    }

    pub async fn add_site(&self, name: &str) -> Result<Site, ApiError> {
        Self::check_name("site", name)?;
        let _g = self.inventory.lock().await;
        let site = Site {
            name: name.to_owned(),
        };
        self.store.put("sites", name, &site)?;
        Ok(site)
    }

    pub async fn add_storage(&self, node: StorageNode) -> Result<StorageNode, ApiError> {
        Self::check_name("storage node", &node.name)?;
        let _g = self.inventory.lock().await;
        self.require_site(&node.site)?;
        for s in &node.reachable_from {
            self.require_site(s)?;
        }
        if !node.disk_dir.starts_with('/') {
            return Err(ApiError::bad_request(
                "disk_dir must be an absolute path on the storage node.",
            ));
        }
        self.storage_client(&node)
            .health()
            .await
            .map_err(|e| ApiError::daemon("checking the storage node", &e))?;
        self.store.put("storage", &node.name, &node)?;
        Ok(node)
    }

    pub async fn add_host(&self, host: Host) -> Result<Host, ApiError> {
        Self::check_name("host", &host.name)?;
        let _g = self.inventory.lock().await;
        self.require_site(&host.site)?;
        if host.memory_mib == 0 {
            return Err(ApiError::bad_request(
                "A host needs some memory capacity (--memory).",
            ));
        }
        self.agent_client(&host)
            .health()
            .await
            .map_err(|e| ApiError::daemon("checking the agent", &e))?;
        self.store.put("hosts", &host.name, &host)?;
        Ok(host)
    }

    /// Memory (MiB) already promised on each host: its VMs, plus incoming migrations.
    fn host_usage(&self) -> Result<HashMap<String, u64>, ApiError> {
        let mut used: HashMap<String, u64> = HashMap::new();
        for vm in self.vms()? {
            *used.entry(vm.host.clone()).or_default() += vm.memory_mib;
        }
        for (_, m) in self.store.list::<MigrationDoc>("migrations")? {
            if !m.record.phase.is_terminal() {
                let mem = self
                    .store
                    .get::<Vm>("vms", &m.record.vm)?
                    .map(|v| v.memory_mib)
                    .unwrap_or(0);
                *used.entry(m.record.to_host.clone()).or_default() += mem;
            }
        }
        Ok(used)
    }

    /// Picks a host: the named one (checked), or the host of `site` with most room.
    fn place(
        &self,
        site: Option<&str>,
        host: Option<&str>,
        memory_mib: u64,
        exclude: Option<&str>,
    ) -> Result<Host, ApiError> {
        let used = self.host_usage()?;
        let room = |h: &Host| {
            h.memory_mib
                .saturating_sub(used.get(&h.name).copied().unwrap_or(0))
        };
        if let Some(name) = host {
            let h = self.host(name)?;
            if let Some(site) = site
                && h.site != site
            {
                return Err(ApiError::bad_request(format!(
                    "Host {name} is in site {}, not {site}.",
                    h.site
                )));
            }
            if Some(h.name.as_str()) == exclude {
                return Err(ApiError::bad_request(format!(
                    "The VM already runs on {name}."
                )));
            }
            if room(&h) < memory_mib {
                return Err(ApiError::conflict(
                    "no_capacity",
                    format!(
                        "Host {name} has {} MiB free, the VM needs {memory_mib} MiB.",
                        room(&h)
                    ),
                ));
            }
            return Ok(h);
        }
        let site = site.ok_or_else(|| ApiError::bad_request("Give a site or a host."))?;
        self.require_site(site)?;
        self.hosts()?
            .into_iter()
            .filter(|h| h.site == site && Some(h.name.as_str()) != exclude)
            .filter(|h| room(h) >= memory_mib)
            .max_by_key(|h| room(h))
            .ok_or_else(|| {
                ApiError::conflict(
                    "no_capacity",
                    format!("No host in site {site} has {memory_mib} MiB free; add a host or free memory."),
                )
            })
    }

    // ---------------------------------------------------------------- VMs

    pub async fn create_vm(&self, name: &str, req: CreateVmRequest) -> Result<Vm, ApiError> {
        Self::check_name("VM", name)?;
        if req.memory_mib == 0 || req.disk_bytes == 0 {
            return Err(ApiError::bad_request(
                "memory and disk size must be above zero.",
            ));
        }
        let _g = self.inventory.lock().await;
        if self.store.get::<Vm>("vms", name)?.is_some() {
            return Err(ApiError::conflict(
                "vm_exists",
                format!("A VM named {name} exists already."),
            ));
        }
        if let Some(site) = &req.site {
            self.require_site(site)?;
        }
        let host = self.place(
            req.site.as_deref(),
            req.host.as_deref(),
            req.memory_mib,
            None,
        )?;
        let storage = self
            .storage_nodes()?
            .into_iter()
            .find(|s| s.reaches(&host.site))
            .ok_or_else(|| {
                ApiError::conflict(
                    "no_storage",
                    format!(
                        "No storage node serves site {}; add one with `coord storage add`.",
                        host.site
                    ),
                )
            })?;
        let sc = self.storage_client(&storage);
        let export = format!("{name}-disk0");
        let path = format!("{}/{export}.img", storage.disk_dir.trim_end_matches('/'));
        let info = sc
            .put_export(&export, &path, req.disk_bytes)
            .await
            .map_err(|e| ApiError::daemon("creating the disk export", &e))?;
        let mut first_epoch = 1;
        if let Some(image) = &req.disk_image {
            self.fill_disk(&sc, &storage, &export, image, info.size_bytes)
                .await?;
            first_epoch = 2;
        }
        let fence = sc
            .fence(&export, first_epoch, &host.name)
            .await
            .map_err(|e| ApiError::daemon("fencing the new disk to its host", &e))?;
        let disk = Disk {
            storage: storage.name.clone(),
            export: export.clone(),
            size_bytes: info.size_bytes,
            epoch: fence.epoch,
            holder: fence.holder,
            token: fence.token,
        };
        let vm = Vm {
            name: name.to_owned(),
            site: host.site.clone(),
            host: host.name.clone(),
            state: VmState::Running,
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            image: req.image,
            load_addr: req.load_addr,
            disks: vec![disk],
            migration: None,
        };
        let spec = self.agent_spec(&vm)?;
        if let Err(e) = self.agent_client(&host).put_vm(name, &spec).await {
            // Leave nothing behind: the export goes too (its epoch high-water mark stays).
            let _ = sc.delete_export(&export).await;
            return Err(ApiError::daemon("starting the VM on its host", &e));
        }
        self.store.put("vms", name, &vm)?;
        tracing::info!(vm = name, host = %host.name, storage = %storage.name, "VM created");
        Ok(vm)
    }

    /// Writes a raw image into a new export through NBD, under a coordinator-held
    /// lease, so the host's first epoch (2) fences the filler out for good.
    async fn fill_disk(
        &self,
        sc: &StorageClient,
        storage: &StorageNode,
        export: &str,
        image: &str,
        size: u64,
    ) -> Result<(), ApiError> {
        let data = tokio::fs::read(image).await.map_err(|e| {
            ApiError::bad_request(format!("Cannot read the disk image {image}: {e}"))
        })?;
        if data.len() as u64 > size {
            return Err(ApiError::bad_request(format!(
                "The disk image ({} bytes) is larger than the disk ({size} bytes).",
                data.len()
            )));
        }
        let f = sc
            .fence(export, 1, FILL_HOLDER)
            .await
            .map_err(|e| ApiError::daemon("taking the disk to fill it", &e))?;
        let opts = nbd_client::ClientOptions::new(&format!("{export};lease={}", f.token));
        let fill = async {
            let c = nbd_client::Client::connect_tcp(&storage.nbd, opts).await?;
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                c.write((i as u64) << 20, chunk, false).await?;
            }
            c.flush().await?;
            c.disconnect().await
        };
        fill.await.map_err(|e| {
            ApiError::new(
                502,
                "storage_unreachable",
                format!("Filling the disk over NBD failed: {e}"),
            )
        })
    }

    fn agent_spec(&self, vm: &Vm) -> Result<Value, ApiError> {
        let mut disks = Vec::new();
        for d in &vm.disks {
            let s = self.storage(&d.storage)?;
            disks.push(json!({"nbd": format!("nbd://{}/{};lease={}", s.nbd, d.export, d.token)}));
        }
        Ok(json!({
            "memory_mib": vm.memory_mib,
            "vcpus": vm.vcpus,
            "boot": {"flat_binary": vm.image, "load_addr": vm.load_addr},
            "disks": disks,
        }))
    }

    /// Live state of the VM as its host reports it (None when unreachable).
    pub async fn vm_agent_state(&self, vm: &Vm) -> Option<String> {
        let host = self.host(&vm.host).ok()?;
        match self.agent_client(&host).get_vm(&vm.name).await {
            Ok(Some(v)) => Some(v.state),
            Ok(None) => Some("absent".into()),
            Err(_) => None,
        }
    }

    pub async fn delete_vm(&self, name: &str) -> Result<(), ApiError> {
        let _g = self.inventory.lock().await;
        let vm = self.vm(name)?;
        if let Some(m) = &vm.migration {
            return Err(ApiError::conflict(
                "vm_migrating",
                format!("VM {name} is migrating ({m}); cancel the migration first."),
            ));
        }
        let host = self.host(&vm.host)?;
        self.agent_client(&host)
            .delete_vm(name)
            .await
            .map_err(|e| ApiError::daemon("stopping the VM", &e))?;
        for d in &vm.disks {
            let s = self.storage(&d.storage)?;
            if let Err(e) = self.storage_client(&s).delete_export(&d.export).await
                && e.status() != Some(404)
            {
                return Err(ApiError::daemon("removing the disk export", &e));
            }
        }
        let mut b = Batch::default();
        b.delete("vms", name);
        self.store.commit(b)?;
        Ok(())
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
    fn journal_phase(&self, doc: &MigrationDoc, vm: Option<&Vm>) -> Result<(), ApiError> {
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

    fn migrations_touching(&self, pred: impl Fn(&MigrationDoc) -> bool) -> Result<usize, ApiError> {
        Ok(self
            .migrations()?
            .iter()
            .filter(|m| !m.record.phase.is_terminal())
            .filter(|m| pred(m))
            .count())
    }

    /// The site a host is in (None for a host removed since).
    fn site_of(&self, host: &str) -> Option<String> {
        self.store
            .get::<Host>("hosts", host)
            .ok()
            .flatten()
            .map(|h| h.site)
    }

    /// Pre-checks, journals the migration as Planned and starts driving it.
    pub async fn start_migration(
        self: &Arc<Self>,
        req: MigrateRequest,
    ) -> Result<MigrationDoc, ApiError> {
        let _g = self.inventory.lock().await;
        let mut vm = self.vm(&req.vm)?;
        if let Some(m) = &vm.migration {
            return Err(ApiError::conflict(
                "vm_migrating",
                format!("VM {} is already migrating ({m}).", vm.name),
            ));
        }
        if vm.state != VmState::Running {
            return Err(ApiError::conflict(
                "vm_not_running",
                format!("VM {} is {:?}, not running.", vm.name, vm.state),
            ));
        }
        if req.to_site.is_none() && req.to_host.is_none() {
            return Err(ApiError::bad_request(
                "Give a target site (--to) or host (--host).",
            ));
        }
        let target = self.place(
            req.to_site.as_deref(),
            req.to_host.as_deref(),
            vm.memory_mib,
            Some(&vm.host),
        )?;
        for d in &vm.disks {
            let s = self.storage(&d.storage)?;
            if !s.reaches(&target.site) {
                return Err(ApiError::conflict(
                    "storage_unreachable_from_target",
                    format!(
                        "Site {} cannot reach storage node {} holding {}'s disk, and disk mirroring is not built yet.",
                        target.site, s.name, vm.name
                    ),
                ));
            }
        }
        let limit = self.cfg.max_migrations_per_host;
        for h in [&vm.host, &target.name] {
            let n =
                self.migrations_touching(|m| m.record.from_host == *h || m.record.to_host == *h)?;
            if n >= limit {
                return Err(ApiError::conflict(
                    "too_many_migrations",
                    format!(
                        "Host {h} already takes part in {limit} migrations; try again when one ends."
                    ),
                ));
            }
        }
        // Per site as well: the inter-site link and the storage node serving the site
        // carry every migration in or out of it.
        let limit = self.cfg.max_migrations_per_site;
        let mut sites = vec![vm.site.clone()];
        if target.site != vm.site {
            sites.push(target.site.clone());
        }
        for site in &sites {
            let n = self.migrations_touching(|m| {
                m.to_site == *site
                    || self.site_of(&m.record.from_host).as_deref() == Some(site.as_str())
            })?;
            if n >= limit {
                return Err(ApiError::conflict(
                    "too_many_migrations",
                    format!(
                        "Site {site} already takes part in {limit} migrations; try again when one ends."
                    ),
                ));
            }
        }
        // The agents must answer before anything is journaled. (CPU compatibility is
        // not pre-checked here: the agents do not report CPUID; the target agent compares
        // it with the source's before any memory moves and refuses with `incompatible`.)
        let src = self.host(&vm.host)?;
        self.agent_client(&src)
            .health()
            .await
            .map_err(|e| ApiError::daemon("checking the source agent", &e))?;
        self.agent_client(&target)
            .health()
            .await
            .map_err(|e| ApiError::daemon("checking the target agent", &e))?;

        let mut idb = [0u8; 6];
        rand::rng().fill_bytes(&mut idb);
        let id = format!(
            "mig-{}",
            idb.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let source_epoch = vm.disks.iter().map(|d| d.epoch).max().unwrap_or(0);
        let doc = MigrationDoc {
            record: MigrationRecord::new(&id, &vm.name, &vm.host, &target.name, source_epoch),
            to_site: target.site.clone(),
            options: req.options,
            agent_migration: None,
            figures: MigrationFigures::default(),
            created_ms: now_ms(),
            finished_ms: None,
            error: None,
        };
        vm.state = VmState::Migrating;
        vm.migration = Some(id.clone());
        self.journal_phase(&doc, Some(&vm))?;
        let ctl = Arc::new(DriveControl {
            cancel: self.shutdown.child_token(),
            go_ahead: AtomicBool::new(false),
        });
        self.running
            .lock()
            .expect("running map lock is never poisoned")
            .insert(id.clone(), Arc::clone(&ctl));
        let me = Arc::clone(self);
        let driven = doc.clone();
        tokio::spawn(async move {
            let id = driven.record.id.clone();
            let result = me.drive(driven, &ctl).await;
            me.running
                .lock()
                .expect("running map lock is never poisoned")
                .remove(&id);
            if let Err(e) = result {
                // The driver stopped short of a terminal phase (a fence or store error,
                // an agent gone silent): settle it the way a restarted coordinator would.
                tracing::error!(migration = %id, error = %e, "migration driver stopped; recovering");
                me.recover().await;
            }
        });
        Ok(doc)
    }

    /// Cancels a migration: before the fence the source simply resumes; after it (but
    /// before the target got the go-ahead) the disks are fenced back to the source
    /// under a new epoch first. Once the go-ahead went out: 409 `too_late`.
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationDoc, ApiError> {
        let doc = self.migration(id)?;
        if doc.record.phase.is_terminal() {
            return Err(ApiError::conflict(
                "migration_finished",
                format!(
                    "Migration {id} already ended ({}).",
                    doc.record.phase.name()
                ),
            ));
        }
        let phase = doc.record.phase.name();
        let too_late = || {
            ApiError::conflict(
                "too_late",
                format!(
                    "Migration {id} is past the switchover ({phase}); it can no longer be cancelled."
                ),
            )
        };
        if matches!(
            doc.record.phase,
            Phase::TargetRunning { .. } | Phase::RollingBack { .. }
        ) {
            return Err(too_late());
        }
        let running = self
            .running
            .lock()
            .expect("running map lock is never poisoned");
        match running.get(id) {
            // Checked and set under the map lock, like `pass_point_of_no_return`.
            Some(c) if c.go_ahead.load(Ordering::SeqCst) => Err(too_late()),
            Some(c) => {
                c.cancel.cancel();
                Ok(doc)
            }
            None => Err(ApiError::conflict(
                "not_driven",
                format!("Migration {id} is being recovered; try again shortly."),
            )),
        }
    }

    /// True when the driver may send the go-ahead (and from now on refuses cancels);
    /// false when a cancel came first. Atomic with `cancel_migration`.
    fn pass_point_of_no_return(&self, ctl: &DriveControl) -> bool {
        let _map = self
            .running
            .lock()
            .expect("running map lock is never poisoned");
        if ctl.cancel.is_cancelled() {
            return false;
        }
        ctl.go_ahead.store(true, Ordering::SeqCst);
        true
    }

    /// Applies an event and journals the resulting phase, then honours the test hold
    /// point (`STAGEHAND_COORD_HOLD`).
    async fn step(
        &self,
        doc: &mut MigrationDoc,
        ev: Event,
        observed: u64,
        vm: Option<&Vm>,
    ) -> Result<(), ApiError> {
        doc.record
            .apply(ev, observed)
            .map_err(|e| ApiError::new(500, "internal", format!("migration state machine: {e}")))?;
        if doc.record.phase.is_terminal() {
            doc.finished_ms = Some(now_ms());
        }
        self.journal_phase(doc, vm)?;
        self.hold(doc.record.phase.name()).await;
        Ok(())
    }

    /// Test hook: `STAGEHAND_COORD_HOLD=<phase>:<file>` makes the driver stop right after
    /// journaling `<phase>`, create `<file>.held`, and go on once `<file>` exists (or
    /// after ten minutes). Lets a test break something at an exact phase.
    async fn hold(&self, phase: &str) {
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

    /// Disk URIs for the VM's current leases (`nbd://HOST:PORT/EXPORT;lease=TOKEN`).
    fn disk_uris(&self, vm: &Vm) -> Result<Vec<String>, ApiError> {
        vm.disks
            .iter()
            .map(|d| {
                let s = self.storage(&d.storage)?;
                Ok(format!("nbd://{}/{};lease={}", s.nbd, d.export, d.token))
            })
            .collect()
    }

    async fn drive(&self, mut doc: MigrationDoc, ctl: &DriveControl) -> Result<(), ApiError> {
        let mut vm = self.vm(&doc.record.vm)?;
        let src = self.host(&doc.record.from_host)?;
        let dst = self.host(&doc.record.to_host)?;
        let hosts = Pair {
            src: &src,
            dst: &dst,
            sa: self.agent_client(&src),
            da: self.agent_client(&dst),
        };
        let started = Instant::now();
        let offline = doc.options.offline;
        self.step(&mut doc, Event::Started, 0, None).await?;

        // Until the source quiesces it owns its disks: any failure or cancel ends with
        // the source running under its original lease.
        // `--offline`: pause first (the pause drains and flushes the disks), then move
        // the paused guest's memory and state by the same coordinated migration: the
        // first pass carries everything, nothing is dirtied, and the target resumes the
        // guest where it stopped. Its downtime is the whole move.
        let paused = if offline {
            hosts
                .sa
                .pause(&vm.name)
                .await
                .map(|_| ())
                .map_err(|e| Stop::Abort(format!("pausing the source: {e}")))
        } else {
            Ok(())
        };
        let paused_at = Instant::now();
        let quiesced = match paused {
            Ok(()) => {
                self.live_until_quiesced(&mut doc, &vm, &hosts, &ctl.cancel)
                    .await
            }
            Err(e) => Err(e),
        };
        match quiesced {
            Ok(()) => {}
            Err(Stop::Abort(reason)) => {
                return self
                    .abort_before_fence(doc, vm, &hosts, started, reason)
                    .await;
            }
            Err(Stop::Recover(e)) => return Err(e),
        }
        let quiesced_at = Instant::now();
        self.step(&mut doc, Event::SourceQuiesced, 0, None).await?;
        if ctl.cancel.is_cancelled() {
            if let Some(id) = &doc.agent_migration {
                // Before the go-ahead the agent resumes the source with its own disks.
                let _ = hosts.sa.cancel_migration(id).await;
                let _ = self.wait_source_settled(&hosts.sa, id).await;
            }
            return self
                .abort_before_fence(doc, vm, &hosts, started, "cancelled by the operator".into())
                .await;
        }

        // Hand the disks over: journal the intent (the epoch is burnt from here on),
        // fence, journal the new tokens, then give the target the go-ahead.
        let observed = self.observed_epoch(&vm).await;
        self.step(&mut doc, Event::FenceIntent, observed, None)
            .await?;
        let Phase::Fencing { epoch } = doc.record.phase else {
            return Err(ApiError::new(500, "internal", "expected a fence intent"));
        };
        let fence_start = Instant::now();
        if let Err(e) = self.fence_all(&mut vm, epoch, &dst.name).await {
            let reason = format!("fencing the disks to the target failed: {e}");
            return self.roll_back(doc, vm, &hosts, started, reason).await;
        }
        doc.figures.fence_ms = fence_start.elapsed().as_millis() as u64;
        doc.figures.fence_us = fence_start.elapsed().as_micros() as u64;
        // The VM record keeps its host until the commit but takes the new tokens now, so
        // a recovery that rolls forward finds the target's token.
        self.step(&mut doc, Event::FenceConfirmed, epoch, Some(&vm))
            .await?;
        if !self.pass_point_of_no_return(ctl) {
            let reason = "cancelled by the operator after the fence".to_owned();
            return self.roll_back(doc, vm, &hosts, started, reason).await;
        }
        doc.figures.handover_ms = quiesced_at.elapsed().as_millis() as u64;
        let uris = self.disk_uris(&vm)?;
        let outcome = self.live_switchover(&mut doc, &hosts.sa, &uris).await;
        let target_runs =
            matches!(hosts.da.get_vm(&vm.name).await, Ok(Some(t)) if t.state == "running");
        if !target_runs {
            let reason = match outcome {
                Err(reason) => reason,
                Ok(()) => "the target does not run the VM after the switchover".to_owned(),
            };
            return self.roll_back(doc, vm, &hosts, started, reason).await;
        }
        if let Err(reason) = outcome {
            // The target runs under its new lease although the migration reported a
            // failure afterwards: forward is the only way that keeps one copy.
            tracing::warn!(migration = %doc.record.id, %reason, "target runs; rolling forward");
        }
        self.step(&mut doc, Event::TargetRunning, epoch, None)
            .await?;
        vm.host = dst.name.clone();
        vm.site = dst.site.clone();
        vm.state = VmState::Running;
        vm.migration = None;
        if offline || doc.figures.total_ms == 0 {
            doc.figures.total_ms = started.elapsed().as_millis() as u64;
        }
        if offline {
            // Offline downtime is the whole pause: source paused until the target ran.
            doc.figures.downtime_ms = paused_at.elapsed().as_millis() as u64;
        }
        self.step(&mut doc, Event::Commit, epoch, Some(&vm)).await?;
        // The source agent frees its paused copy once the target runs; an offline move
        // leaves it paused. Anything left there must not run.
        let _ = hosts.sa.delete_vm(&vm.name).await;
        Ok(())
    }

    /// Before the fence intent: the source keeps its disks. Remove any half-built target
    /// copy, resume a paused source, journal `cancelled`.
    async fn abort_before_fence(
        &self,
        mut doc: MigrationDoc,
        mut vm: Vm,
        hosts: &Pair<'_>,
        started: Instant,
        reason: String,
    ) -> Result<(), ApiError> {
        if let Ok(Some(t)) = hosts.da.get_vm(&vm.name).await
            && t.state != "running"
        {
            let _ = hosts.da.delete_vm(&vm.name).await;
        }
        if let Ok(Some(s)) = hosts.sa.get_vm(&vm.name).await
            && s.state == "paused"
        {
            hosts
                .sa
                .resume(&vm.name)
                .await
                .map_err(|e| ApiError::daemon("resuming the source", &e))?;
        }
        vm.state = VmState::Running;
        vm.migration = None;
        doc.error = Some(reason.clone());
        doc.figures.total_ms = started.elapsed().as_millis() as u64;
        self.step(&mut doc, Event::Abort { reason }, 0, Some(&vm))
            .await
    }

    /// After the fence intent, with the target not running: fence the disks back to
    /// the source under a new, higher epoch, discard the target's copy, and resume the
    /// source with the new tokens. The source agent's migration must first leave
    /// `quiesced`; `abort` ends it at once with the source kept paused (so it
    /// never resumes with stale tokens), and without that call (an older agent) it fails
    /// by itself once the target is gone or its switchover timeout passes.
    async fn roll_back(
        &self,
        mut doc: MigrationDoc,
        mut vm: Vm,
        hosts: &Pair<'_>,
        started: Instant,
        reason: String,
    ) -> Result<(), ApiError> {
        tracing::warn!(migration = %doc.record.id, %reason, "rolling back to the source");
        doc.error = Some(reason.clone());
        let observed = self.observed_epoch(&vm).await;
        self.step(&mut doc, Event::Abort { reason }, observed, None)
            .await?;
        let Phase::RollingBack { epoch, .. } = doc.record.phase else {
            return Err(ApiError::new(500, "internal", "expected a rollback intent"));
        };
        if let Some(id) = doc.agent_migration.clone() {
            // End the source's wait for a go-ahead at once, keeping it paused (a 409
            // means it already left `quiesced` on its own); then drop the target's copy.
            let _ = hosts.sa.abort_migration(&id).await;
            let _ = hosts.da.delete_vm(&vm.name).await;
            self.wait_source_settled(&hosts.sa, &id).await?;
        }
        let fence_start = Instant::now();
        self.fence_all(&mut vm, epoch, &hosts.src.name).await?;
        doc.figures.fence_ms += fence_start.elapsed().as_millis() as u64;
        doc.figures.fence_us += fence_start.elapsed().as_micros() as u64;
        if let Ok(Some(t)) = hosts.da.get_vm(&vm.name).await
            && t.state != "running"
        {
            let _ = hosts.da.delete_vm(&vm.name).await;
        }
        let uris = self.disk_uris(&vm)?;
        hosts
            .sa
            .resume_with_disks(&vm.name, &uris)
            .await
            .map_err(|e| ApiError::daemon("resuming the source with its new lease", &e))?;
        vm.host = hosts.src.name.clone();
        vm.site = hosts.src.site.clone();
        vm.state = VmState::Running;
        vm.migration = None;
        doc.figures.total_ms = started.elapsed().as_millis() as u64;
        self.step(&mut doc, Event::RollbackConfirmed, epoch, Some(&vm))
            .await
    }

    /// Waits (bounded) until the source agent's migration is no longer `quiesced`.
    async fn wait_source_settled(&self, sa: &AgentClient, id: &str) -> Result<(), ApiError> {
        let end = Instant::now() + SETTLE_MAX;
        loop {
            match sa.migration(id).await {
                Ok(m) if !m.quiesced() => return Ok(()),
                // The agent forgot it (restarted): nothing waits for a go-ahead any more.
                Err(DaemonError::Refused { status: 404, .. }) => return Ok(()),
                _ => {}
            }
            if Instant::now() > end {
                return Err(ApiError::new(
                    502,
                    "host_unreachable",
                    "the source agent's migration did not leave the quiesced state",
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn observed_epoch(&self, vm: &Vm) -> u64 {
        let mut max = 0;
        for d in &vm.disks {
            if let Ok(s) = self.storage(&d.storage)
                && let Ok(info) = self.storage_client(&s).get_export(&d.export).await
                && let Some(l) = info.lease
            {
                max = max.max(l.epoch);
            }
        }
        max
    }

    /// Fences every disk of the VM to `holder` at `epoch` and records the new tokens.
    async fn fence_all(&self, vm: &mut Vm, epoch: u64, holder: &str) -> Result<(), ApiError> {
        for d in vm.disks.iter_mut() {
            let s = self.storage(&d.storage)?;
            let r = self
                .storage_client(&s)
                .fence(&d.export, epoch, holder)
                .await
                .map_err(|e| ApiError::daemon("fencing the disk", &e))?;
            d.epoch = r.epoch;
            d.holder = r.holder;
            d.token = r.token;
        }
        Ok(())
    }

    fn copy_figures(doc: &mut MigrationDoc, m: &AgentMigration) {
        doc.figures.total_ms = m.total_ms.round() as u64;
        doc.figures.downtime_ms = m.downtime_ms.round() as u64;
        doc.figures.memory_bytes = m.ram_transferred_bytes as u64;
        doc.figures.memory_total_bytes = m.total_bytes as u64;
        doc.figures.remaining_bytes = m.remaining_bytes as u64;
        doc.figures.passes = m.passes.len() as u64;
        if let Some(q) = m.quiesced_at_ms {
            doc.figures.quiesced_at_ms = q.round() as u64;
        }
        if let Some(w) = m
            .downtime
            .as_ref()
            .and_then(|d| d["switchover_wait_ms"].as_f64())
        {
            doc.figures.switchover_wait_ms = w.round() as u64;
        }
    }

    /// Runs the agents' live migration in coordinated mode until the source quiesced.
    async fn live_until_quiesced(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
        hosts: &Pair<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut body = json!({"target": hosts.dst.migration, "switchover": "coordinated"});
        if let Some(d) = doc.options.downtime_ms {
            body["downtime_limit_ms"] = json!(d);
        }
        if let Some(b) = doc.options.bandwidth_mibs {
            body["max_bandwidth_mibs"] = json!(b);
        }
        let agent_id = hosts
            .sa
            .migrate(&vm.name, &body)
            .await
            .map_err(|e| Stop::Abort(format!("the source agent refused the migration: {e}")))?;
        doc.agent_migration = Some(agent_id.clone());
        self.store
            .put("migrations", &doc.record.id, &*doc)
            .map_err(|e| Stop::Recover(e.into()))?;
        let mut cancel_sent = false;
        let mut poll_errors = 0u32;
        let mut stored = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FAST_POLL) => {}
                _ = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    if let Err(e) = hosts.sa.cancel_migration(&agent_id).await {
                        tracing::warn!(migration = %doc.record.id, error = %e, "cancel at the agent failed");
                    }
                }
            }
            let m: AgentMigration = match hosts.sa.migration(&agent_id).await {
                Ok(m) => m,
                Err(DaemonError::Refused { status: 404, .. }) => {
                    return Err(Stop::Abort(
                        "the source agent forgot the migration (restarted?)".into(),
                    ));
                }
                Err(e) => {
                    // A source agent that stays silent this long has outlived its own
                    // socket timeouts: give up; recovery settles the copies.
                    poll_errors += 1;
                    tracing::warn!(error = %e, "polling the source agent");
                    if poll_errors > POLL_ERRORS_MAX {
                        return Err(Stop::Recover(ApiError::daemon(
                            "the source agent stopped answering",
                            &e,
                        )));
                    }
                    continue;
                }
            };
            poll_errors = 0;
            Self::copy_figures(doc, &m);
            if m.quiesced() {
                return Ok(());
            }
            if !m.finished() {
                // Progress is not journaled (recovery does not need it), only stored.
                if stored.elapsed() >= POLL {
                    let _ = self.store.put("migrations", &doc.record.id, &*doc);
                    stored = Instant::now();
                }
                continue;
            }
            return match m.state.as_str() {
                // Without a go-ahead a coordinated migration cannot complete; an agent
                // that did anyway runs the target under the source's lease: recovery
                // fences the disks to the running copy.
                "completed" => Err(Stop::Recover(ApiError::new(
                    502,
                    "daemon_bad_answer",
                    "the source agent completed a coordinated migration without the go-ahead",
                ))),
                "cancelled" => Err(Stop::Abort("cancelled by the operator".into())),
                _ => Err(Stop::Abort(format!("migration failed: {}", m.error_text()))),
            };
        }
    }

    /// Sends the go-ahead with the target's disk URIs and follows the migration until
    /// it ends. Ok when the agent reports it completed.
    async fn live_switchover(
        &self,
        doc: &mut MigrationDoc,
        sa: &AgentClient,
        uris: &[String],
    ) -> Result<(), String> {
        let Some(agent_id) = doc.agent_migration.clone() else {
            return Err("no agent migration to switch over".into());
        };
        let end = Instant::now() + SETTLE_MAX;
        let mut sent = false;
        loop {
            if !sent {
                match sa.switchover(&agent_id, uris).await {
                    Ok(()) => sent = true,
                    // Not quiesced any more (it failed meanwhile): the poll says why.
                    Err(e) if e.status() == Some(409) => sent = true,
                    Err(e) => tracing::warn!(error = %e, "sending the go-ahead; retrying"),
                }
            }
            match sa.migration(&agent_id).await {
                Ok(m) => {
                    Self::copy_figures(doc, &m);
                    match m.state.as_str() {
                        "completed" => return Ok(()),
                        "failed" | "cancelled" => {
                            return Err(format!("switchover failed: {}", m.error_text()));
                        }
                        _ => {}
                    }
                }
                Err(e) => tracing::warn!(error = %e, "polling the source agent after the go-ahead"),
            }
            if Instant::now() > end {
                return Err("the migration did not end after the go-ahead".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // ---------------------------------------------------------------- recovery

    /// Settles every migration a previous coordinator left unfinished. Runs at start;
    /// a migration whose daemons do not answer yet is retried until they do.
    pub async fn recover(self: &Arc<Self>) {
        loop {
            let pending: Vec<MigrationDoc> = match self.migrations() {
                Ok(v) => v
                    .into_iter()
                    .filter(|m| !m.record.phase.is_terminal())
                    // Migrations a live driver in this process owns are not recovery's.
                    .filter(|m| {
                        !self
                            .running
                            .lock()
                            .expect("running map lock is never poisoned")
                            .contains_key(&m.record.id)
                    })
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "recovery cannot read the journal");
                    return;
                }
            };
            if pending.is_empty() {
                return;
            }
            let mut left = 0;
            for doc in pending {
                let id = doc.record.id.clone();
                match self.recover_one(doc).await {
                    Ok(true) => tracing::info!(migration = %id, "recovered"),
                    Ok(false) => left += 1,
                    Err(e) => {
                        left += 1;
                        tracing::warn!(migration = %id, error = %e, "recovery step failed; retrying");
                    }
                }
            }
            if left == 0 {
                return;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn presence(&self, a: &AgentClient, vm: &str) -> VmPresence {
        match a.get_vm(vm).await {
            Ok(None) => VmPresence::Absent,
            Ok(Some(v)) => match v.state.as_str() {
                "running" => VmPresence::Running,
                "paused" => VmPresence::Paused,
                "incoming" | "migrating" => VmPresence::InMigration,
                // stopped or failed: not a copy that can serve the guest.
                _ => VmPresence::Absent,
            },
            Err(_) => VmPresence::Unreachable,
        }
    }

    /// Ok(true) when the migration reached a terminal phase.
    async fn recover_one(&self, mut doc: MigrationDoc) -> Result<bool, ApiError> {
        let mut vm = self.vm(&doc.record.vm)?;
        let src = self.host(&doc.record.from_host)?;
        let dst = self.host(&doc.record.to_host)?;
        let (sa, da) = (self.agent_client(&src), self.agent_client(&dst));
        let (source, target) = (
            self.presence(&sa, &vm.name).await,
            self.presence(&da, &vm.name).await,
        );
        let source_quiesced = match &doc.agent_migration {
            Some(id) => matches!(sa.migration(id).await, Ok(m) if m.quiesced()),
            None => false,
        };
        let disk = vm
            .disks
            .first()
            .cloned()
            .ok_or_else(|| ApiError::new(500, "internal", "VM without disks"))?;
        let st = self.storage(&disk.storage)?;
        let info = self
            .storage_client(&st)
            .get_export(&disk.export)
            .await
            .map_err(|e| ApiError::daemon("observing the disk lease", &e))?;
        let obs = Observation {
            source,
            target,
            source_quiesced,
            storage_epoch: info.lease.as_ref().map(|l| l.epoch).unwrap_or(0),
            storage_holder: info.lease.map(|l| l.holder),
        };
        let plan = plan_recovery(&doc.record, &obs);
        tracing::info!(migration = %doc.record.id, ?obs, ?plan, "recovery plan");
        // Set once the disks were fenced back to the source in this plan: the source
        // then resumes with the new tokens.
        let mut source_refenced = false;
        for action in plan {
            match action {
                RecoveryAction::Wait => return Ok(false),
                RecoveryAction::CancelSource => {
                    if let Some(a) = &doc.agent_migration {
                        sa.cancel_migration(a)
                            .await
                            .map_err(|e| ApiError::daemon("cancelling at the source", &e))?;
                        self.wait_source_settled(&sa, a).await?;
                    }
                    vm.host = src.name.clone();
                    vm.site = src.site.clone();
                }
                RecoveryAction::ResumeSource => {
                    if source == VmPresence::Paused {
                        let r = if source_refenced {
                            let uris = self.disk_uris(&vm)?;
                            sa.resume_with_disks(&vm.name, &uris).await
                        } else {
                            sa.resume(&vm.name).await
                        };
                        r.map_err(|e| ApiError::daemon("resuming the source", &e))?;
                    }
                    vm.host = src.name.clone();
                    vm.site = src.site.clone();
                }
                RecoveryAction::DiscardTarget => {
                    da.delete_vm(&vm.name)
                        .await
                        .map_err(|e| ApiError::daemon("removing the target copy", &e))?;
                }
                RecoveryAction::DiscardSource => {
                    sa.delete_vm(&vm.name)
                        .await
                        .map_err(|e| ApiError::daemon("removing the source copy", &e))?;
                    vm.host = dst.name.clone();
                    vm.site = dst.site.clone();
                }
                RecoveryAction::FenceToSource { epoch } => {
                    self.burn_epoch(&mut doc, epoch)?;
                    self.fence_all(&mut vm, epoch, &src.name).await?;
                    source_refenced = true;
                    // Journal the new tokens now: a failed resume is retried with them.
                    self.store.put("vms", &vm.name, &vm)?;
                }
                RecoveryAction::FenceToTarget { epoch } => {
                    self.burn_epoch(&mut doc, epoch)?;
                    self.fence_all(&mut vm, epoch, &dst.name).await?;
                    self.store.put("vms", &vm.name, &vm)?;
                }
                RecoveryAction::Switchover => {
                    let uris = self.disk_uris(&vm)?;
                    // Err: the go-ahead did not make the target run; the next round
                    // observes a paused source and rolls back.
                    self.live_switchover(&mut doc, &sa, &uris)
                        .await
                        .map_err(|e| ApiError::new(502, "target_not_running", e))?;
                    if !matches!(da.get_vm(&vm.name).await, Ok(Some(t)) if t.state == "running") {
                        return Err(ApiError::new(
                            502,
                            "target_not_running",
                            "the target does not run after the go-ahead",
                        ));
                    }
                    vm.host = dst.name.clone();
                    vm.site = dst.site.clone();
                }
                RecoveryAction::Finish(phase) => {
                    if let Phase::Committed { epoch } = &phase {
                        vm.host = dst.name.clone();
                        vm.site = dst.site.clone();
                        // Roll forward: make sure the record carries the lease the target holds.
                        for d in vm.disks.iter_mut() {
                            if d.holder != dst.name {
                                d.epoch = *epoch;
                                d.holder = dst.name.clone();
                                // The token the target uses came from the fence before the
                                // crash and is not journaled; a later fence replaces it.
                                d.token.clear();
                            }
                        }
                    }
                    doc.record.phase = phase;
                    doc.finished_ms = Some(now_ms());
                    vm.state = VmState::Running;
                    vm.migration = None;
                    self.journal_phase(&doc, Some(&vm))?;
                }
            }
        }
        Ok(doc.record.phase.is_terminal())
    }

    /// Journals that `epoch` is about to be handed out, so it is never reused.
    fn burn_epoch(&self, doc: &mut MigrationDoc, epoch: u64) -> Result<(), ApiError> {
        doc.record.highest_epoch = doc.record.highest_epoch.max(epoch);
        self.store.put("migrations", &doc.record.id, &*doc)?;
        Ok(())
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
}
