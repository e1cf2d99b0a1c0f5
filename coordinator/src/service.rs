//! The coordinator's service layer: inventory, placement, `vm create`, and the
//! migration driver that walks `migration.rs`'s state machine, journaling each phase
//! before acting on it. The HTTP layer (`api.rs`) is a thin translation of this.
//!
//! Switchover today: the agents have no coordinated switchover mode yet, so the
//! driver fences the disk to the target right after the source agent reports the
//! migration `completed` (the target runs). See docs/coordinator.md, "Gaps".

use std::collections::HashMap;
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

/// Consecutive failed polls of the source agent (100 ms apart) before giving up.
const POLL_ERRORS_MAX: u32 = 600;

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The cluster token: used when calling daemons added without their own token.
    pub cluster_token: Option<String>,
    /// Concurrent migrations per host (in or out).
    pub max_migrations_per_host: usize,
}

pub struct Coordinator {
    store: Store,
    http: reqwest::Client,
    cfg: ServiceConfig,
    /// Serializes inventory changes (placement reads then writes).
    inventory: tokio::sync::Mutex<()>,
    /// Migrations driven by this process: id -> cancel signal.
    running: Mutex<HashMap<String, CancellationToken>>,
    failpoint: Option<String>,
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
        let opts = nbd_server::client::ClientOptions::new(&format!("{export};lease={}", f.token));
        let fill = async {
            let c = nbd_server::client::Client::connect_tcp(&storage.nbd, opts).await?;
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

    fn outgoing_and_incoming(&self, host: &str) -> Result<usize, ApiError> {
        Ok(self
            .migrations()?
            .iter()
            .filter(|m| !m.record.phase.is_terminal())
            .filter(|m| m.record.from_host == host || m.record.to_host == host)
            .count())
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
            if self.outgoing_and_incoming(h)? >= limit {
                return Err(ApiError::conflict(
                    "too_many_migrations",
                    format!(
                        "Host {h} already takes part in {limit} migrations; try again when one ends."
                    ),
                ));
            }
        }
        // The agents must answer before anything is journaled.
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
        let cancel = self.shutdown.child_token();
        self.running
            .lock()
            .expect("running map lock is never poisoned")
            .insert(id.clone(), cancel.clone());
        let me = Arc::clone(self);
        let driven = doc.clone();
        tokio::spawn(async move {
            let id = driven.record.id.clone();
            let result = me.drive(driven, cancel).await;
            me.running
                .lock()
                .expect("running map lock is never poisoned")
                .remove(&id);
            if let Err(e) = result {
                // The driver stopped short of a terminal phase (a fence or store error):
                // settle it the way a restarted coordinator would.
                tracing::error!(migration = %id, error = %e, "migration driver stopped; recovering");
                me.recover().await;
            }
        });
        Ok(doc)
    }

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
        if doc.record.phase.past_fence_intent() {
            return Err(ApiError::conflict(
                "too_late",
                format!(
                    "Migration {id} is past the disk handover ({}); it can no longer be cancelled.",
                    doc.record.phase.name()
                ),
            ));
        }
        match self
            .running
            .lock()
            .expect("running map lock is never poisoned")
            .get(id)
        {
            Some(c) => c.cancel(),
            None => {
                return Err(ApiError::conflict(
                    "not_driven",
                    format!("Migration {id} is being recovered; try again shortly."),
                ));
            }
        }
        Ok(doc)
    }

    /// Applies an event and journals the resulting phase.
    fn step(
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
        self.journal_phase(doc, vm)
    }

    async fn drive(
        &self,
        mut doc: MigrationDoc,
        cancel: CancellationToken,
    ) -> Result<(), ApiError> {
        let mut vm = self.vm(&doc.record.vm)?;
        let src = self.host(&doc.record.from_host)?;
        let dst = self.host(&doc.record.to_host)?;
        let (sa, da) = (self.agent_client(&src), self.agent_client(&dst));
        let started = Instant::now();
        self.step(&mut doc, Event::Started, 0, None)?;

        let outcome = if doc.options.offline {
            self.offline_move(&vm, &sa, &da).await
        } else {
            self.live_precopy(&mut doc, &vm, &sa, &cancel).await
        };
        if let Err(reason) = outcome {
            // Before the fence intent: the source agent resumed the guest itself (or it
            // never stopped); make sure no half-built copy stays on the target.
            if let Ok(Some(t)) = da.get_vm(&vm.name).await
                && t.state != "running"
            {
                let _ = da.delete_vm(&vm.name).await;
            }
            if let Ok(Some(s)) = sa.get_vm(&vm.name).await
                && s.state == "paused"
            {
                let _ = sa.resume(&vm.name).await;
            }
            vm.state = VmState::Running;
            vm.migration = None;
            doc.error = Some(reason.clone());
            doc.figures.total_ms = started.elapsed().as_millis() as u64;
            return self.step(&mut doc, Event::Abort { reason }, 0, Some(&vm));
        }

        // The target runs the guest. Hand it the disks: journal the intent, fence, and
        // only then record the new owner.
        self.step(
            &mut doc,
            Event::SourceQuiesced,
            self.observed_epoch(&vm).await,
            None,
        )?;
        let Phase::Fencing { epoch } = doc.record.phase else {
            return Err(ApiError::new(500, "internal", "expected a fence intent"));
        };
        let fence_start = Instant::now();
        match self.fence_all(&mut vm, epoch, &dst.name).await {
            Ok(()) => {}
            Err(e) => {
                // The source copy is gone (the agent freed it once the target ran), so the
                // only safe direction is forward: the restart recovery fences the disk to
                // the running copy. Mark the VM failed until then.
                vm.state = VmState::Failed;
                doc.error = Some(format!("fence failed: {e}"));
                self.journal_phase(&doc, Some(&vm))?;
                return Err(e);
            }
        }
        doc.figures.fence_ms = fence_start.elapsed().as_millis() as u64;
        // The VM record keeps its host until the commit but takes the new tokens now, so
        // a recovery that rolls forward finds the target's token.
        self.step(&mut doc, Event::FenceConfirmed, epoch, Some(&vm))?;
        match da.get_vm(&vm.name).await {
            Ok(Some(t)) if t.state == "running" => {}
            other => {
                vm.state = VmState::Failed;
                doc.error = Some(format!(
                    "the target does not run the VM after the migration: {other:?}"
                ));
                self.journal_phase(&doc, Some(&vm))?;
                return Err(ApiError::new(
                    502,
                    "target_not_running",
                    doc.error.clone().unwrap_or_default(),
                ));
            }
        }
        self.step(&mut doc, Event::TargetRunning, epoch, None)?;
        vm.host = dst.name.clone();
        vm.site = dst.site.clone();
        vm.state = VmState::Running;
        vm.migration = None;
        doc.figures.total_ms = started.elapsed().as_millis() as u64;
        self.step(&mut doc, Event::Commit, epoch, Some(&vm))?;
        // The source agent frees its copy after a completed migration; an offline move
        // stopped it already. Anything left there must not run.
        let _ = sa.delete_vm(&vm.name).await;
        Ok(())
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

    /// Runs the agents' live migration to completion. Err(reason) means the target
    /// does not run the guest and the source keeps (or got back) it.
    async fn live_precopy(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
        sa: &AgentClient,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let dst = self.host(&doc.record.to_host).map_err(|e| e.message)?;
        let mut body = json!({"target": dst.migration});
        if let Some(d) = doc.options.downtime_ms {
            body["downtime_limit_ms"] = json!(d);
        }
        if let Some(b) = doc.options.bandwidth_mibs {
            body["max_bandwidth_mibs"] = json!(b);
        }
        let agent_id = sa
            .migrate(&vm.name, &body)
            .await
            .map_err(|e| format!("the source agent refused the migration: {e}"))?;
        doc.agent_migration = Some(agent_id.clone());
        self.store
            .put("migrations", &doc.record.id, &*doc)
            .map_err(|e| e.to_string())?;
        let mut cancel_sent = false;
        let mut poll_errors = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    if let Err(e) = sa.cancel_migration(&agent_id).await {
                        tracing::warn!(migration = %doc.record.id, error = %e, "cancel at the agent failed");
                    }
                }
            }
            let m: AgentMigration = match sa.migration(&agent_id).await {
                Ok(m) => m,
                Err(DaemonError::Refused { status: 404, .. }) => {
                    return Err("the source agent forgot the migration (restarted?)".into());
                }
                Err(e) => {
                    // A source agent that stays silent this long has outlived its own
                    // 30 s socket timeouts: give up; recovery logic settles the copies.
                    poll_errors += 1;
                    tracing::warn!(error = %e, "polling the source agent");
                    if poll_errors > POLL_ERRORS_MAX {
                        return Err(format!("the source agent stopped answering: {e}"));
                    }
                    continue;
                }
            };
            poll_errors = 0;
            doc.figures.total_ms = m.total_ms.round() as u64;
            doc.figures.downtime_ms = m.downtime_ms.round() as u64;
            doc.figures.memory_bytes = m.ram_transferred_bytes as u64;
            doc.figures.memory_total_bytes = m.total_bytes as u64;
            doc.figures.remaining_bytes = m.remaining_bytes as u64;
            doc.figures.passes = m.passes.len() as u64;
            if !m.finished() {
                // Progress is not journaled (it is not needed for recovery), only stored.
                let _ = self.store.put("migrations", &doc.record.id, &*doc);
                continue;
            }
            return match m.state.as_str() {
                "completed" => Ok(()),
                _ if m.error_code().as_deref() == Some("outcome_unknown") => {
                    // The target may or may not run; the source stays paused. Settle it.
                    let da = self.agent_client(&dst);
                    match da.get_vm(&vm.name).await {
                        Ok(Some(t)) if t.state == "running" => {
                            let _ = sa.delete_vm(&vm.name).await;
                            Ok(())
                        }
                        _ => Err(format!("migration failed: {}", m.error_text())),
                    }
                }
                "cancelled" => Err("cancelled by the operator".into()),
                _ => Err(format!("migration failed: {}", m.error_text())),
            };
        }
    }

    /// `--offline`: stop the guest on the source and boot it on the target (the
    /// definition moves, not the memory: the agents have no way to move a paused
    /// guest's memory without the live path).
    async fn offline_move(
        &self,
        vm: &Vm,
        sa: &AgentClient,
        da: &AgentClient,
    ) -> Result<(), String> {
        sa.pause(&vm.name)
            .await
            .map_err(|e| format!("pausing the source: {e}"))?;
        let spec = self.agent_spec(vm).map_err(|e| e.message)?;
        da.put_vm(&vm.name, &spec)
            .await
            .map_err(|e| format!("starting the VM on the target: {e}"))?;
        sa.delete_vm(&vm.name)
            .await
            .map_err(|e| format!("stopping the source copy: {e}"))?;
        Ok(())
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
        // An agent-to-agent migration outlives the coordinator: let it end first.
        if [source, target]
            .iter()
            .any(|p| matches!(p, VmPresence::Unreachable | VmPresence::InMigration))
        {
            tracing::info!(migration = %doc.record.id, ?source, ?target, "waiting for the agents to settle");
            return Ok(false);
        }
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
            storage_epoch: info.lease.as_ref().map(|l| l.epoch).unwrap_or(0),
            storage_holder: info.lease.map(|l| l.holder),
        };
        let plan = plan_recovery(&doc.record, &obs);
        tracing::info!(migration = %doc.record.id, ?obs, ?plan, "recovery plan");
        for action in plan {
            match action {
                RecoveryAction::ResumeSource => {
                    if let Some(a) = &doc.agent_migration {
                        let _ = sa.cancel_migration(a).await;
                    }
                    if source == VmPresence::Paused {
                        sa.resume(&vm.name)
                            .await
                            .map_err(|e| ApiError::daemon("resuming the source", &e))?;
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
                }
                RecoveryAction::FenceToTarget { epoch } => {
                    self.burn_epoch(&mut doc, epoch)?;
                    self.fence_all(&mut vm, epoch, &dst.name).await?;
                    vm.host = dst.name.clone();
                    vm.site = dst.site.clone();
                }
                RecoveryAction::Finish(phase) => {
                    if let Phase::Committed { epoch } = &phase {
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
