//! Fleet operations: host reports, drain/undrain, and evacuate / balance /
//! consolidate carried out as ordinary migrations.
//!
//! - A poller (leader only) asks every agent for `GET /v1/host` every
//!   [`HOST_POLL`] and keeps the report in the host record: placement and the planners
//!   read capacity, CPU fingerprint and guest usage from there.
//! - The plans are the pure functions of `crate::plan`; this file builds their
//!   inventory from the store and runs a plan: each move goes through
//!   `start_migration` (same pre-checks, same per-host and per-site limits as `coord
//!   migrate`), started in plan order as soon as the limits and the target's room
//!   allow, and followed to its end. An operation is a record in the `fleet` table,
//!   answered at once with its id and followed with `GET /v1/fleet/{id}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{Coordinator, MigrateRequest};
use crate::error::ApiError;
use crate::model::*;
use crate::plan::{self, Drain, Inventory, Plan, PlanParams};

/// How often the leader polls the agents' `GET /v1/host`.
pub const HOST_POLL: Duration = Duration::from_secs(2);
/// vCPU overcommit the planners allow: a host gives guests up to this many times its
/// CPUs (Nova's default `cpu_allocation_ratio` is 4.0 as well). Memory is never
/// overcommitted.
pub const CPU_OVERCOMMIT: f64 = 4.0;
/// How often a running fleet operation looks at its migrations.
const OP_POLL: Duration = Duration::from_millis(200);

/// The kinds of fleet operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetKind {
    Evacuate,
    Balance,
    Consolidate,
}

/// One guest's part in an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetItem {
    pub vm: String,
    pub from: String,
    /// Empty for a guest that cannot move.
    pub to: String,
    pub memory_mib: u64,
    /// pending, migrating, committed, rolled_back, cancelled, failed, stuck.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    #[serde(default)]
    pub total_ms: u64,
    #[serde(default)]
    pub downtime_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A fleet operation as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetOp {
    pub id: String,
    pub kind: FleetKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// running, completed, failed (some guest did not move), interrupted (the
    /// coordinator stopped while it ran).
    pub state: String,
    pub items: Vec<FleetItem>,
    pub plan: Plan,
    /// Hosts left empty and on stand-by (consolidate): they can be powered down.
    #[serde(default)]
    pub freed_hosts: Vec<String>,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Wall time from the first migration's start to the last one's end, ms.
    #[serde(default)]
    pub total_ms: u64,
}

/// `POST /v1/balance` and `/v1/consolidate`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRequest {
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// Balance threshold override (fraction, e.g. 0.15).
    #[serde(default)]
    pub threshold: Option<f64>,
}

impl Coordinator {
    // ------------------------------------------------------------ host reports

    /// Polls every host's report while this coordinator leads, until shutdown. Marks
    /// fleet operations left running by an earlier process as interrupted first.
    pub async fn poll_hosts(self: Arc<Self>) {
        if let Ok(ops) = self.store.list::<FleetOp>("fleet") {
            for (_, mut op) in ops {
                if op.state == "running" && self.is_leader() {
                    op.state = "interrupted".into();
                    op.finished_ms = Some(now_ms());
                    let _ = self.store.put("fleet", &op.id, &op);
                }
            }
        }
        loop {
            if self.is_leader() {
                self.refresh_reports().await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(HOST_POLL) => {}
            }
        }
    }

    /// Asks every agent for its report and stores what answered.
    pub(crate) async fn refresh_reports(&self) {
        let Ok(hosts) = self.hosts() else { return };
        let mut fresh = Vec::new();
        for h in hosts {
            match self.agent_client(&h).host_report().await {
                Ok(mut r) => {
                    r.received_ms = now_ms();
                    fresh.push((h.name, r));
                }
                Err(e) => tracing::debug!(host = %h.name, error = %e, "no host report"),
            }
        }
        let _g = self.inventory.lock().await;
        for (name, r) in fresh {
            if let Ok(Some(mut h)) = self.store.get::<Host>("hosts", &name) {
                h.report = Some(r);
                if let Err(e) = self.store.put("hosts", &name, &h) {
                    tracing::debug!(host = %name, error = %e, "cannot store the host report");
                }
            }
        }
    }

    // ------------------------------------------------------------ drain, pin

    pub async fn set_drained(&self, name: &str, drained: Option<Drain>) -> Result<Host, ApiError> {
        let _g = self.inventory.lock().await;
        let mut h = self.host(name)?;
        h.drained = drained;
        self.store.put("hosts", name, &h)?;
        tracing::info!(host = name, ?drained, "host schedulability changed");
        Ok(h)
    }

    pub async fn set_pinned(&self, name: &str, pinned: bool) -> Result<Vm, ApiError> {
        let _g = self.inventory.lock().await;
        let mut vm = self.vm(name)?;
        vm.pinned = pinned;
        self.store.put("vms", name, &vm)?;
        Ok(vm)
    }

    // ------------------------------------------------------------ planning

    /// The planners' view of `site` (every site when None).
    pub fn fleet_inventory(&self, site: Option<&str>) -> Result<Inventory, ApiError> {
        let hosts: Vec<Host> = self
            .hosts()?
            .into_iter()
            .filter(|h| site.is_none_or(|s| h.site == s))
            .collect();
        let mut usage: BTreeMap<String, GuestUsage> = BTreeMap::new();
        for h in &hosts {
            for g in h.report.iter().flat_map(|r| r.guests.iter()) {
                usage.insert(g.name.clone(), g.clone());
            }
        }
        let by_name: BTreeMap<&str, &Host> = hosts.iter().map(|h| (h.name.as_str(), h)).collect();
        let guests = self
            .vms()?
            .into_iter()
            .filter(|v| by_name.contains_key(v.host.as_str()))
            .map(|v| {
                let u = usage.get(&v.name);
                let fp = v
                    .cpu_fingerprint
                    .clone()
                    .or_else(|| {
                        by_name
                            .get(v.host.as_str())
                            .and_then(|h| Self::fingerprint_of(h).map(str::to_owned))
                    })
                    .unwrap_or_default();
                plan::Guest {
                    movable: v.state == VmState::Running && v.migration.is_none(),
                    cpu_percent: u.map(|u| u.cpu_percent).unwrap_or(0.0),
                    dirty_mib_per_s: u.map(|u| u.dirty_mib_per_s).unwrap_or(0.0),
                    cpu_fingerprint: fp,
                    pinned: v.pinned,
                    memory_mib: v.memory_mib,
                    host: v.host,
                    name: v.name,
                }
            })
            .collect();
        let hosts = hosts
            .iter()
            .map(|h| plan::HostCap {
                name: h.name.clone(),
                memory_mib: Self::capacity_mib(h),
                cpu_percent: match &h.report {
                    Some(r) if r.vcpus > 0 => f64::from(r.vcpus) * 100.0 * CPU_OVERCOMMIT,
                    // Unknown: CPU does not limit the plan.
                    _ => 1e9,
                },
                cpu_fingerprint: Self::fingerprint_of(h).unwrap_or_default().to_owned(),
                drained: h.drained,
            })
            .collect();
        Ok(Inventory { hosts, guests })
    }

    // ------------------------------------------------------------ operations

    /// `coord host evacuate`: drain the host, plan, and move every guest off it.
    pub async fn evacuate(self: &Arc<Self>, host: &str) -> Result<FleetOp, ApiError> {
        let h = self.host(host)?;
        self.set_drained(host, Some(Drain::Maintenance)).await?;
        // The freshest figures for the order (dirty rates, CPU).
        self.refresh_reports().await;
        let inv = self.fleet_inventory(Some(&h.site))?;
        let plan = plan::evacuate(&inv, host, PlanParams::default());
        self.check(&inv, &plan, true)?;
        let op = self.new_op(
            FleetKind::Evacuate,
            Some(h.site),
            Some(host.to_owned()),
            plan,
        )?;
        Ok(self.spawn_op(op))
    }

    /// `coord balance` / `coord consolidate`: the plan (dry run), or the operation.
    pub async fn plan_or_run(
        self: &Arc<Self>,
        kind: FleetKind,
        req: FleetRequest,
    ) -> Result<FleetOp, ApiError> {
        if let Some(site) = &req.site {
            self.require_site(site)?;
        } else if kind == FleetKind::Consolidate {
            return Err(ApiError::bad_request("consolidate needs a site (--site)."));
        }
        let mut params = PlanParams::default();
        if let Some(t) = req.threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(ApiError::bad_request(
                    "threshold is a fraction between 0 and 1 (e.g. 0.15).",
                ));
            }
            params.threshold = t;
        }
        self.refresh_reports().await;
        let sites: Vec<String> = match &req.site {
            Some(s) => vec![s.clone()],
            None => self.sites()?.into_iter().map(|s| s.name).collect(),
        };
        // One plan per site (guests never leave their site here); merged.
        let mut merged = Plan::default();
        for site in &sites {
            let inv = self.fleet_inventory(Some(site))?;
            let p = match kind {
                FleetKind::Balance => plan::balance(&inv, params),
                _ => plan::consolidate(&inv, params),
            };
            self.check(&inv, &p, kind == FleetKind::Balance)?;
            merged.moves.extend(p.moves);
            merged.before.extend(p.before);
            merged.after.extend(p.after);
            merged.freed_hosts.extend(p.freed_hosts);
            merged.reactivated_hosts.extend(p.reactivated_hosts);
            merged.imbalance_before = merged.imbalance_before.max(p.imbalance_before);
            merged.imbalance_after = merged.imbalance_after.max(p.imbalance_after);
        }
        let op = self.new_op(kind, req.site.clone(), None, merged)?;
        if req.dry_run {
            return Ok(op);
        }
        self.store.put("fleet", &op.id, &op)?;
        Ok(self.spawn_op(op))
    }

    fn check(&self, inv: &Inventory, p: &Plan, standby: bool) -> Result<(), ApiError> {
        plan::check_plan(inv, p, standby).map_err(|e| {
            tracing::error!(error = %e, "a planner broke its promise; refusing the plan");
            ApiError::conflict(
                "bad_plan",
                format!("The plan breaks a rule ({e}); nothing was moved. This is a bug."),
            )
        })
    }

    fn new_op(
        &self,
        kind: FleetKind,
        site: Option<String>,
        host: Option<String>,
        plan: Plan,
    ) -> Result<FleetOp, ApiError> {
        let mut idb = [0u8; 6];
        rand::rng().fill_bytes(&mut idb);
        let id = format!(
            "fleet-{}",
            idb.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mut items: Vec<FleetItem> = plan
            .moves
            .iter()
            .map(|m| FleetItem {
                vm: m.vm.clone(),
                from: m.from.clone(),
                to: m.to.clone(),
                memory_mib: m.memory_mib,
                state: "pending".into(),
                migration: None,
                total_ms: 0,
                downtime_ms: 0,
                error: None,
            })
            .collect();
        items.extend(plan.stuck.iter().map(|s| FleetItem {
            vm: s.vm.clone(),
            from: s.host.clone(),
            to: String::new(),
            memory_mib: 0,
            state: "stuck".into(),
            migration: None,
            total_ms: 0,
            downtime_ms: 0,
            error: Some(s.reason.clone()),
        }));
        Ok(FleetOp {
            id,
            kind,
            site,
            host,
            state: "running".into(),
            items,
            freed_hosts: Vec::new(),
            plan,
            created_ms: now_ms(),
            finished_ms: None,
            total_ms: 0,
        })
    }

    pub fn fleet_op(&self, id: &str) -> Result<FleetOp, ApiError> {
        self.store.get::<FleetOp>("fleet", id)?.ok_or_else(|| {
            ApiError::not_found("fleet_op_not_found", format!("No fleet operation {id}."))
        })
    }

    pub fn fleet_ops(&self) -> Result<Vec<FleetOp>, ApiError> {
        let mut v: Vec<FleetOp> = self
            .store
            .list::<FleetOp>("fleet")?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        v.sort_by_key(|o| o.created_ms);
        Ok(v)
    }

    fn spawn_op(self: &Arc<Self>, op: FleetOp) -> FleetOp {
        let _ = self.store.put("fleet", &op.id, &op);
        let me = Arc::clone(self);
        let out = op.clone();
        tokio::spawn(async move {
            let id = op.id.clone();
            if let Err(e) = me.run_op(op).await {
                tracing::error!(op = %id, error = %e.message, "fleet operation failed");
            }
        });
        out
    }

    /// Carries a plan out: starts each move (in plan order) when the limits and the
    /// target's room allow, follows every migration to its end, then settles the hosts.
    async fn run_op(self: &Arc<Self>, mut op: FleetOp) -> Result<(), ApiError> {
        let started = std::time::Instant::now();
        match op.kind {
            FleetKind::Consolidate => {
                for h in &op.plan.freed_hosts {
                    self.set_drained(h, Some(Drain::Standby)).await?;
                }
            }
            FleetKind::Balance | FleetKind::Evacuate => {
                for h in &op.plan.reactivated_hosts {
                    self.set_drained(h, None).await?;
                }
            }
        }
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let mut running = 0;
            let mut changed = false;
            // Follow the started ones.
            for it in op.items.iter_mut().filter(|i| i.state == "migrating") {
                let Some(id) = &it.migration else { continue };
                let m = self.migration(id)?;
                it.total_ms = m.figures.total_ms;
                it.downtime_ms = m.figures.downtime_ms;
                if m.record.phase.is_terminal() {
                    it.state = m.record.phase.name().to_owned();
                    it.error = m.error.clone();
                    changed = true;
                } else {
                    running += 1;
                }
            }
            // Start what can start, in order.
            let mut blocked = false;
            for i in 0..op.items.len() {
                if op.items[i].state != "pending" {
                    continue;
                }
                let it = &op.items[i];
                let req = MigrateRequest {
                    vm: it.vm.clone(),
                    to_site: None,
                    to_host: Some(it.to.clone()),
                    options: MigrationOptions::default(),
                };
                match self.start_migration(req).await {
                    Ok(doc) => {
                        tracing::info!(op = %op.id, vm = %op.items[i].vm, to = %op.items[i].to, migration = %doc.record.id, "fleet move started");
                        op.items[i].state = "migrating".into();
                        op.items[i].migration = Some(doc.record.id);
                        running += 1;
                        changed = true;
                    }
                    // Waits for a slot or for room another move frees.
                    Err(e)
                        if matches!(e.code, "too_many_migrations" | "no_capacity")
                            && running > 0 =>
                    {
                        blocked = true;
                    }
                    Err(e) => {
                        op.items[i].state = "failed".into();
                        op.items[i].error = Some(e.message);
                        changed = true;
                    }
                }
            }
            if changed {
                self.store.put("fleet", &op.id, &op)?;
            }
            if running == 0 && !blocked {
                break;
            }
            tokio::time::sleep(OP_POLL).await;
        }
        op.total_ms = started.elapsed().as_millis() as u64;
        let failed = op.items.iter().any(|i| i.state != "committed");
        // Hosts consolidate emptied: on stand-by only if really empty now.
        if op.kind == FleetKind::Consolidate {
            let vms = self.vms()?;
            for h in op.plan.freed_hosts.clone() {
                if vms.iter().any(|v| v.host == h) {
                    self.set_drained(&h, None).await?;
                } else {
                    op.freed_hosts.push(h);
                }
            }
        }
        op.state = if failed { "failed" } else { "completed" }.into();
        op.finished_ms = Some(now_ms());
        self.store.put("fleet", &op.id, &op)?;
        tracing::info!(op = %op.id, kind = ?op.kind, state = %op.state, total_ms = op.total_ms, "fleet operation ended");
        Ok(())
    }
}
