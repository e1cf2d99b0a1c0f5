//! The executor: starts and cancels migrations, and runs each one as a thin loop of
//! observe -> [`next_action`] -> act. Every decision is the pure driver's; this file
//! only performs the chosen step and journals what the record says. A restarted
//! coordinator runs the same loop on the journaled record (see `recovery.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::RngCore;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Coordinator, MigrateRequest};
use crate::daemons::{AgentClient, AgentMigration, DaemonError};
use crate::driver::{
    Action, CancelRequest, Observation, Side, SourceMigration, VmPresence, next_action,
};
use crate::error::ApiError;
use crate::migration::{Event, MigrationRecord, Phase};
use crate::model::*;

/// How often the executor asks the source agent while memory moves: the moment it
/// quiesces starts the guest's downtime, so it is noticed within this.
const FAST_POLL: Duration = Duration::from_millis(20);
/// How often it looks again while something settles (an agent migration ending, a
/// silent daemon).
const SLOW_POLL: Duration = Duration::from_millis(250);
/// After a failed step (a daemon refused or did not answer): retry after this,
/// doubled for each further failure in a row up to `RETRY_MAX` (a store without
/// quorum or a dead agent is not hammered; a success resets it).
const RETRY: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(4);

/// The wait before the next attempt after `failures` failed steps in a row (>= 1).
fn retry_delay(failures: u32) -> Duration {
    RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}
/// Live figures are stored (not journaled) at most this often.
const STORE_FIGURES: Duration = Duration::from_millis(100);
/// The longest the go-ahead step follows the agents before it decides.
const SETTLE_MAX: Duration = Duration::from_secs(120);

/// A driven migration's controls, shared by its executor and `cancel_migration`.
pub(crate) struct DriveControl {
    /// The operator asked to cancel.
    cancel: AtomicBool,
    /// The cancel went to the source agent.
    cancel_sent: AtomicBool,
    /// Set (under the `running` map lock) once the go-ahead may be sent: from then on a
    /// cancel is refused.
    go_ahead: AtomicBool,
    /// The operator lifted the switchover hold.
    release: AtomicBool,
    /// Wakes the executor from a wait (a cancel arrived).
    wake: Notify,
    /// Cancelled when this coordinator stops leading (or shuts down): the executor
    /// stops at its next step and the next leader drives the migration on.
    term: CancellationToken,
}

impl DriveControl {
    fn new(term: CancellationToken) -> Self {
        Self {
            term,
            cancel: AtomicBool::new(false),
            cancel_sent: AtomicBool::new(false),
            go_ahead: AtomicBool::new(false),
            release: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn cancel_request(&self) -> CancelRequest {
        match (
            self.cancel.load(Ordering::SeqCst),
            self.cancel_sent.load(Ordering::SeqCst),
        ) {
            (false, _) => CancelRequest::None,
            (true, false) => CancelRequest::Requested,
            (true, true) => CancelRequest::Sent,
        }
    }
}

/// What one step asks of the loop.
enum Flow {
    Continue,
    Wait(Duration),
    Done,
}

/// One migration being executed: its record and VM as this process holds them.
struct Run {
    doc: MigrationDoc,
    vm: Vm,
    src: Host,
    dst: Host,
    sa: AgentClient,
    da: AgentClient,
    /// The source agent refused to start the migration (fed to the driver as a failed
    /// agent migration).
    start_refused: Option<String>,
    /// A storage node refused to set up the disk mirror (fed to the driver as a failed
    /// mirror).
    mirror_refused: Option<String>,
    /// When the source was paused for an offline migration (this process).
    paused_at: Option<Instant>,
    /// When this process saw the source quiesce.
    quiesced_at: Option<Instant>,
    figures_stored: Instant,
}

fn agent_state(m: &AgentMigration) -> SourceMigration {
    match m.state.as_str() {
        "quiesced" => SourceMigration::Quiesced,
        "completed" => SourceMigration::Completed,
        "failed" => SourceMigration::Failed(m.error_text()),
        "cancelled" => SourceMigration::Cancelled,
        // setup, active, device
        _ => SourceMigration::Active,
    }
}

fn presence_of(r: Result<Option<crate::daemons::AgentVm>, DaemonError>) -> VmPresence {
    match r {
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

impl Coordinator {
    /// Pre-checks, journals the migration as Planned and starts its executor.
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
        if let Some(r) = self.replication(&vm.name)? {
            // Its mirror jobs would be cancelled by this migration's.
            return Err(ApiError::conflict(
                "vm_replicating",
                format!(
                    "VM {} replicates to site {}; `coord replicate stop {}` first.",
                    vm.name, r.to_site, vm.name
                ),
            ));
        }
        // The last geographic migration deletes the disk copy it left unused right
        // after it ended; a new one must not create its copy before that.
        if let Some(m) = self
            .migrations()?
            .iter()
            .find(|m| m.record.vm == vm.name && m.disk_move.as_ref().is_some_and(|p| !p.cleaned))
            && m.record.phase.is_terminal()
        {
            return Err(ApiError::conflict(
                "cleanup_pending",
                format!(
                    "Migration {} of {} still deletes the disk copy it left unused; try again in a few seconds.",
                    m.record.id, vm.name
                ),
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
        if req.options.offline && req.options.hold {
            return Err(ApiError::bad_request(
                "An offline migration has no pre-copy to hold: give --offline or --hold, not both.",
            ));
        }
        let target = self.place(
            req.to_site.as_deref(),
            req.to_host.as_deref(),
            vm.memory_mib,
            Some(&vm.host),
        )?;
        // Disks no storage node in the target's reach holds move with the VM.
        let disk_move = self.plan_disk_move(&vm, &target, &req.options)?;
        // The unfinished migrations and the hosts' sites, read once for both limits
        // (on etcd every read is a round trip).
        let unfinished: Vec<MigrationDoc> = self
            .migrations()?
            .into_iter()
            .filter(|m| !m.record.phase.is_terminal())
            .collect();
        let site_of: HashMap<String, String> = self
            .hosts()?
            .into_iter()
            .map(|h| (h.name, h.site))
            .collect();
        let limit = self.cfg.max_migrations_per_host;
        for h in [&vm.host, &target.name] {
            let n = unfinished
                .iter()
                .filter(|m| m.record.from_host == *h || m.record.to_host == *h)
                .count();
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
            let n = unfinished
                .iter()
                .filter(|m| m.to_site == *site || site_of.get(&m.record.from_host) == Some(site))
                .count();
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
            disk_move,
        };
        vm.state = VmState::Migrating;
        vm.migration = Some(id.clone());
        self.journal_phase(&doc, Some(&vm))?;
        self.spawn_executor(&id);
        Ok(doc)
    }

    /// Registers a migration's controls (so a cancel finds it at once) and starts its
    /// executor for the current leadership term. A migration already driven in this
    /// term is left alone; one still winding down from an ended term is taken over.
    pub(crate) fn spawn_executor(self: &Arc<Self>, id: &str) {
        let term = self.current_term();
        if term.is_cancelled() {
            return;
        }
        let ctl = {
            let mut running = self
                .running
                .lock()
                .expect("running map lock is never poisoned");
            if running.get(id).is_some_and(|c| !c.term.is_cancelled()) {
                return;
            }
            let ctl = Arc::new(DriveControl::new(term));
            running.insert(id.to_owned(), Arc::clone(&ctl));
            ctl
        };
        let me = Arc::clone(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            me.execute(&id, &ctl).await;
            let mut running = me
                .running
                .lock()
                .expect("running map lock is never poisoned");
            // Only our own entry: a later term's executor may have replaced it.
            if running.get(&id).is_some_and(|c| Arc::ptr_eq(c, &ctl)) {
                running.remove(&id);
            }
        });
    }

    /// The migration, unless it already ended (409 `migration_finished`).
    fn unfinished_migration(&self, id: &str) -> Result<MigrationDoc, ApiError> {
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
        Ok(doc)
    }

    /// Cancels a migration: before the fence the source simply resumes; after it (but
    /// before the target got the go-ahead) the disks are fenced back to the source
    /// under a new epoch first. Once the go-ahead went out: 409 `too_late`.
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationDoc, ApiError> {
        let doc = self.unfinished_migration(id)?;
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
        ) || doc.record.rollback.is_some()
        {
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
                c.cancel.store(true, Ordering::SeqCst);
                c.wake.notify_one();
                Ok(doc)
            }
            // Only between the end of an executor and its terminal phase being read.
            None => Err(not_driven(id)),
        }
    }

    /// Lifts the switchover hold of a migration started with `hold`: the executor
    /// passes it on to the source agent (or starts the agent's migration without it).
    pub fn release_migration(&self, id: &str) -> Result<MigrationDoc, ApiError> {
        let doc = self.unfinished_migration(id)?;
        if !doc.options.hold {
            return Err(ApiError::conflict(
                "not_held",
                format!("Migration {id} does not hold its switchover."),
            ));
        }
        let running = self
            .running
            .lock()
            .expect("running map lock is never poisoned");
        match running.get(id) {
            Some(c) => {
                c.release.store(true, Ordering::SeqCst);
                c.wake.notify_one();
                Ok(doc)
            }
            None => Err(not_driven(id)),
        }
    }

    /// Passes a requested release on: to the source agent once its migration runs,
    /// else into the options the agent's migration will start with.
    async fn pass_release(&self, run: &mut Run, ctl: &DriveControl) {
        if !run.doc.options.hold || !ctl.release.load(Ordering::SeqCst) {
            return;
        }
        let disk_hold = run.doc.disk_move.as_ref().is_some_and(|p| p.disk_hold);
        match &run.doc.agent_migration {
            // Still held for the disk: the driver lifts it once the mirror blocks writes.
            _ if disk_hold => run.doc.options.hold = false,
            None => run.doc.options.hold = false,
            Some(aid) => match run.sa.patch_migration(aid, &json!({"hold": false})).await {
                Ok(()) => run.doc.options.hold = false,
                // Ended meanwhile (cancelled, failed): nothing is held any more.
                Err(e) if e.status() == Some(409) || e.status() == Some(404) => {
                    run.doc.options.hold = false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lifting the hold at the source agent; retrying")
                }
            },
        }
        if !run.doc.options.hold {
            tracing::info!(migration = %run.doc.record.id, "switchover hold lifted");
            let _ = self.store.put("migrations", &run.doc.record.id, &run.doc);
        }
    }

    /// True when the executor may send the go-ahead (and from now on refuses cancels);
    /// false when a cancel came first. Atomic with `cancel_migration`.
    fn pass_point_of_no_return(&self, ctl: &DriveControl) -> bool {
        let _map = self
            .running
            .lock()
            .expect("running map lock is never poisoned");
        if ctl.cancel.load(Ordering::SeqCst) {
            return false;
        }
        ctl.go_ahead.store(true, Ordering::SeqCst);
        true
    }

    fn load_run(&self, id: &str) -> Result<Run, ApiError> {
        let doc = self.migration(id)?;
        let vm = self.vm(&doc.record.vm)?;
        let src = self.host(&doc.record.from_host)?;
        let dst = self.host(&doc.record.to_host)?;
        Ok(Run {
            sa: self.agent_client(&src),
            da: self.agent_client(&dst),
            doc,
            vm,
            src,
            dst,
            start_refused: None,
            mirror_refused: None,
            paused_at: None,
            quiesced_at: None,
            figures_stored: Instant::now(),
        })
    }

    /// The loop: observe, decide, act, until the driver says `Done` or the process
    /// shuts down (a later start picks the migration up where the journal says).
    async fn execute(&self, id: &str, ctl: &DriveControl) {
        let mut failures = 0;
        let mut run = loop {
            match self.load_run(id) {
                Ok(r) => break r,
                Err(e) => {
                    failures += 1;
                    tracing::error!(migration = %id, error = %e, "cannot load the migration; retrying");
                    if self.pause(retry_delay(failures), ctl).await {
                        return;
                    }
                }
            }
        };
        let mut last: Option<Action> = None;
        loop {
            if ctl.term.is_cancelled() {
                return;
            }
            self.pass_release(&mut run, ctl).await;
            let obs = self.observe(&mut run, ctl).await;
            let action = next_action(&run.doc.record, &obs);
            if last.as_ref() != Some(&action) {
                tracing::info!(migration = %id, phase = run.doc.record.phase.name(), ?action, ?obs, "next step");
                last = Some(action.clone());
            }
            let flow = match self.act(&mut run, ctl, &obs, action).await {
                Ok(f) => {
                    failures = 0;
                    f
                }
                Err(e) => {
                    failures += 1;
                    let d = retry_delay(failures);
                    tracing::warn!(migration = %id, error = %e, retry_in_ms = d.as_millis() as u64, "migration step failed; retrying");
                    Flow::Wait(d)
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Done => {
                    if let Some(p) = run.doc.disk_move.as_mut()
                        && !p.cleaned
                    {
                        p.cleaned = true;
                        if let Err(e) = self.store.put("migrations", id, &run.doc) {
                            tracing::warn!(migration = %id, error = %e, "recording the cleanup");
                        }
                    }
                    tracing::info!(migration = %id, phase = run.doc.record.phase.name(), "migration ended");
                    return;
                }
                Flow::Wait(d) => {
                    if run.figures_stored.elapsed() >= STORE_FIGURES {
                        // Progress is stored, not journaled: recovery does not need it.
                        let _ = self.store.put("migrations", id, &run.doc);
                        run.figures_stored = Instant::now();
                    }
                    if self.pause(d, ctl).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps `d` unless a cancel arrives first; true when the process shuts down or
    /// stops leading.
    async fn pause(&self, d: Duration, ctl: &DriveControl) -> bool {
        tokio::select! {
            _ = ctl.term.cancelled() => true,
            _ = ctl.wake.notified() => false,
            _ = tokio::time::sleep(d) => false,
        }
    }

    async fn observe(&self, run: &mut Run, ctl: &DriveControl) -> Observation {
        let source_migration = match (&run.doc.agent_migration, &run.start_refused) {
            (None, None) => SourceMigration::NotStarted,
            (None, Some(reason)) => SourceMigration::Failed(reason.clone()),
            (Some(id), _) => match run.sa.migration(id).await {
                Ok(m) => {
                    copy_figures(&mut run.doc, &m);
                    agent_state(&m)
                }
                Err(DaemonError::Refused { status: 404, .. }) => SourceMigration::Forgotten,
                Err(e) => {
                    tracing::debug!(error = %e, "polling the source agent");
                    SourceMigration::Unknown
                }
            },
        };
        // While the agents move the guest, both copies are in the migration; the driver
        // looks at them only once it ends (and saves two calls per fast poll).
        let moving = matches!(
            source_migration,
            SourceMigration::Active | SourceMigration::Quiesced
        );
        let (source, target) = if moving {
            (VmPresence::InMigration, VmPresence::InMigration)
        } else {
            (
                presence_of(run.sa.get_vm(&run.vm.name).await),
                presence_of(run.da.get_vm(&run.vm.name).await),
            )
        };
        // The lease whose tokens the coordinator holds for one host's set of disks: the
        // VM's own, else (a disk move past the fence) the target site's copies.
        let target_disks = Self::target_disks(&run.vm, run.doc.disk_move.as_ref());
        let tokens = held_tokens(&run.vm.disks).or_else(|| held_tokens(&target_disks));
        // The storage node's lease matters for the next epoch and for a running target;
        // where the driver provably reads neither (memory moving; the quiesce to
        // journal; the go-ahead with tokens in hand) the call is saved: it would add to
        // the guest's downtime.
        let needs_storage = match (&source_migration, &run.doc.record.phase) {
            (SourceMigration::Active, _) => false,
            (SourceMigration::Quiesced, Phase::Precopy) => false,
            (SourceMigration::Quiesced, Phase::Fenced { epoch }) => {
                tokens != Some((*epoch, run.dst.name.clone()))
            }
            _ => true,
        };
        let (storage_epoch, storage_holder) = if needs_storage {
            let mut lease = self.observed_lease(&run.vm.disks).await;
            if run.doc.disk_move.is_some() {
                // At a tie (the fence gives both copies one epoch) the target site's
                // copy, the one a running target uses, tells who holds the disk.
                let replica = self.observed_lease(&target_disks).await;
                if replica.0 >= lease.0 && replica.0 > 0 {
                    lease = replica;
                }
            }
            lease
        } else {
            (0, None)
        };
        let disk_move = self
            .observe_disk_move(&mut run.doc, &run.vm, run.mirror_refused.as_deref())
            .await;
        Observation {
            source,
            target,
            source_migration,
            storage_epoch,
            storage_holder,
            tokens,
            cancel: ctl.cancel_request(),
            disk_move,
        }
    }

    /// The highest lease epoch among the VM's disks and its holder, as the storage
    /// nodes report them (0 and None where they do not answer).
    async fn observed_lease(&self, disks: &[Disk]) -> (u64, Option<String>) {
        let mut best: (u64, Option<String>) = (0, None);
        for d in disks {
            if let Ok(s) = self.storage(&d.storage)
                && let Ok(info) = self.storage_client(&s).get_export(&d.export).await
                && let Some(l) = info.lease
                && l.epoch > best.0
            {
                best = (l.epoch, Some(l.holder));
            }
        }
        best
    }

    /// Applies `event` to the record and journals the new phase (with the VM record
    /// when given), then honours the test hold point.
    async fn record_step(
        &self,
        run: &mut Run,
        event: Event,
        with_vm: bool,
    ) -> Result<(), ApiError> {
        run.doc
            .record
            .apply(event)
            .map_err(|e| ApiError::new(500, "internal", format!("migration state machine: {e}")))?;
        if run.doc.record.phase.is_terminal() {
            run.doc.finished_ms = Some(now_ms());
        }
        self.journal_phase(&run.doc, with_vm.then_some(&run.vm))?;
        self.hold(run.doc.record.phase.name()).await;
        Ok(())
    }

    /// Records a rollback decision (the phase stays; the record is stored, synced).
    fn decide_rollback(&self, run: &mut Run, reason: String) -> Result<(), ApiError> {
        tracing::warn!(migration = %run.doc.record.id, %reason, "rolling back to the source");
        run.doc
            .record
            .apply(Event::RollbackDecided {
                reason: reason.clone(),
            })
            .map_err(|e| ApiError::new(500, "internal", format!("migration state machine: {e}")))?;
        run.doc.error = Some(reason);
        self.store.put("migrations", &run.doc.record.id, &run.doc)?;
        Ok(())
    }

    async fn act(
        &self,
        run: &mut Run,
        ctl: &DriveControl,
        obs: &Observation,
        action: Action,
    ) -> Result<Flow, ApiError> {
        match action {
            Action::Wait { fast } => Ok(Flow::Wait(if fast { FAST_POLL } else { SLOW_POLL })),
            Action::Done => Ok(Flow::Done),
            Action::StartSourceMigration => {
                self.start_source(run).await?;
                Ok(Flow::Continue)
            }
            Action::CancelSourceMigration => {
                if let Some(id) = &run.doc.agent_migration {
                    match run.sa.cancel_migration(id).await {
                        // 409: it ended meanwhile (a cancel for a failed mirror is
                        // asked again until the agent reports it cancelled).
                        Err(e) if e.status() != Some(409) => {
                            return Err(ApiError::daemon("cancelling at the source agent", &e));
                        }
                        _ => {}
                    }
                }
                ctl.cancel_sent.store(true, Ordering::SeqCst);
                Ok(Flow::Continue)
            }
            Action::AbortSourceMigration => {
                if let Some(id) = &run.doc.agent_migration {
                    match run.sa.abort_migration(id).await {
                        // 409: it left `quiesced` by itself meanwhile.
                        Err(e) if e.status() != Some(409) => {
                            return Err(ApiError::daemon("ending the source's wait", &e));
                        }
                        _ => {}
                    }
                }
                Ok(Flow::Wait(FAST_POLL))
            }
            Action::Journal(event) => {
                self.journal_event(run, obs, event).await?;
                Ok(Flow::Continue)
            }
            Action::Fence { to, epoch } => {
                let fenced = self.fence(run, to, epoch).await?;
                if fenced && to == Side::Target && obs.target == VmPresence::Running {
                    // Adopting a target that already runs (the agents finished without
                    // the coordinator): it still holds the old, now fenced, token; hand
                    // it the new one (the agent takes new disks on resume).
                    self.rehand_target(run).await?;
                }
                Ok(Flow::Continue)
            }
            Action::GoAhead => {
                self.go_ahead(run, ctl).await?;
                Ok(Flow::Continue)
            }
            Action::StartMirror { epoch } => {
                self.record_step(run, Event::MirrorIntent { epoch }, false)
                    .await?;
                let vm = run.vm.clone();
                if let Some(reason) = self.start_mirrors(&mut run.doc, &vm, epoch).await? {
                    tracing::warn!(migration = %run.doc.record.id, %reason, "disk mirror refused");
                    run.mirror_refused = Some(reason);
                }
                Ok(Flow::Continue)
            }
            Action::MirrorWriteBlocking => {
                let vm = run.vm.clone();
                self.mirrors_write_blocking(&mut run.doc, &vm).await?;
                Ok(Flow::Continue)
            }
            Action::ReleaseHold => {
                let sa = run.sa.clone();
                self.release_disk_hold(&mut run.doc, &sa).await?;
                Ok(Flow::Continue)
            }
            Action::CompleteMirror => {
                let vm = run.vm.clone();
                match self.complete_mirrors(&mut run.doc, &vm).await? {
                    true => Ok(Flow::Continue),
                    false => Ok(Flow::Wait(FAST_POLL)),
                }
            }
            Action::DropLeftoverCopy => {
                let vm = run.vm.clone();
                self.drop_leftover_copy(&mut run.doc, &vm).await?;
                if let Some(p) = run.doc.disk_move.as_mut()
                    && matches!(run.doc.record.phase, Phase::Committed { .. })
                {
                    p.old_disks.clear();
                    self.store.put("migrations", &run.doc.record.id, &run.doc)?;
                }
                Ok(Flow::Continue)
            }
            Action::DiscardTarget => {
                run.da
                    .delete_vm(&run.vm.name)
                    .await
                    .map_err(|e| ApiError::daemon("removing the target copy", &e))?;
                Ok(Flow::Continue)
            }
            Action::DiscardSource => {
                run.sa
                    .delete_vm(&run.vm.name)
                    .await
                    .map_err(|e| ApiError::daemon("removing the source copy", &e))?;
                Ok(Flow::Continue)
            }
            Action::ResumeSource { new_tokens } => {
                let r = if new_tokens {
                    let disks = self.disk_specs(&run.vm)?;
                    run.sa.resume_with_disks(&run.vm.name, &disks).await
                } else {
                    run.sa.resume(&run.vm.name).await
                };
                match r {
                    Ok(_) => Ok(Flow::Continue),
                    // Not paused any more: look again.
                    Err(e) if e.status() == Some(409) => Ok(Flow::Wait(FAST_POLL)),
                    Err(e) => Err(ApiError::daemon("resuming the source", &e)),
                }
            }
        }
    }

    /// Asks the source agent for the coordinated migration (pausing the guest first
    /// when offline) and journals `Precopy` with the agent's id.
    async fn start_source(&self, run: &mut Run) -> Result<(), ApiError> {
        if run.doc.options.offline {
            // The pause drains and flushes the disks; the same coordinated migration
            // then moves the paused guest's memory and state in its first pass.
            match run.sa.pause(&run.vm.name).await {
                Ok(_) => run.paused_at = Some(Instant::now()),
                Err(e) if e.status() == Some(409) => {}
                Err(e) if e.status().is_some() => {
                    run.start_refused = Some(format!("pausing the source: {e}"));
                    return Ok(());
                }
                Err(e) => return Err(ApiError::daemon("pausing the source", &e)),
            }
        }
        let mut body = json!({"target": run.dst.migration, "switchover": "coordinated"});
        if let Some(d) = run.doc.options.downtime_ms {
            body["downtime_limit_ms"] = json!(d);
        }
        if let Some(b) = run.doc.options.bandwidth_mibs {
            body["max_bandwidth_mibs"] = json!(b);
        }
        // A disk move holds the switchover until the mirror blocks writes.
        if run.doc.options.hold || run.doc.disk_move.as_ref().is_some_and(|p| p.disk_hold) {
            body["hold"] = json!(true);
        }
        match run.sa.migrate(&run.vm.name, &body).await {
            Ok(agent_id) => {
                run.doc.agent_migration = Some(agent_id);
                self.record_step(run, Event::Started, false).await
            }
            // A refusal is an answer: the driver cancels (the source keeps running).
            Err(e) if e.status().is_some() => {
                run.start_refused = Some(format!("the source agent refused the migration: {e}"));
                Ok(())
            }
            Err(e) => Err(ApiError::daemon("starting the migration at the source", &e)),
        }
    }

    async fn journal_event(
        &self,
        run: &mut Run,
        obs: &Observation,
        event: Event,
    ) -> Result<(), ApiError> {
        let total = |doc: &MigrationDoc| {
            if doc.figures.total_ms == 0 {
                now_ms().saturating_sub(doc.created_ms)
            } else {
                doc.figures.total_ms
            }
        };
        match &event {
            Event::SourceQuiesced => {
                run.quiesced_at = Some(Instant::now());
                self.record_step(run, event, false).await
            }
            Event::RollbackDecided { reason } => self.decide_rollback(run, reason.clone()),
            Event::Commit { epoch } => {
                let epoch = *epoch;
                let dst = run.dst.name.clone();
                if let Some(plan) = run.doc.disk_move.as_mut() {
                    // The target site's copies become the VM's disks; the old ones are
                    // deleted once the commit is journaled (see `DropLeftoverCopy`).
                    let disks = Self::target_disks(&run.vm, Some(plan));
                    plan.old_disks = plan
                        .disks
                        .iter()
                        .filter_map(|m| run.vm.disks.get(m.index).cloned())
                        .collect();
                    run.vm.disks = disks;
                }
                for d in run.vm.disks.iter_mut() {
                    if d.holder != dst || d.epoch != epoch {
                        // Rolled forward to a lease whose token this process never got
                        // (the target holds it); a later fence replaces it.
                        d.epoch = epoch;
                        d.holder = dst.clone();
                        d.token = None;
                    }
                }
                run.vm.host = dst;
                run.vm.site = run.dst.site.clone();
                run.vm.state = VmState::Running;
                run.vm.migration = None;
                if run.doc.options.offline {
                    run.doc.figures.total_ms = now_ms().saturating_sub(run.doc.created_ms);
                    if let Some(p) = run.paused_at {
                        // Offline downtime is the whole pause, until the target ran.
                        run.doc.figures.downtime_ms = p.elapsed().as_millis() as u64;
                    }
                } else {
                    run.doc.figures.total_ms = if run.doc.disk_move.is_some() {
                        now_ms().saturating_sub(run.doc.created_ms)
                    } else {
                        total(&run.doc)
                    };
                }
                self.record_step(run, event, true).await
            }
            Event::Abort { reason } => {
                run.doc.error = Some(reason.clone());
                self.finish_on_source(run, obs);
                self.record_step(run, event, true).await
            }
            Event::RollbackConfirmed => {
                self.finish_on_source(run, obs);
                self.record_step(run, event, true).await
            }
            _ => self.record_step(run, event, false).await,
        }
    }

    /// The VM stays (or is back) on the source: failed when no copy runs there.
    fn finish_on_source(&self, run: &mut Run, obs: &Observation) {
        run.vm.host = run.src.name.clone();
        run.vm.site = run.src.site.clone();
        run.vm.migration = None;
        run.vm.state = if obs.source == VmPresence::Running {
            VmState::Running
        } else {
            VmState::Failed
        };
        if run.doc.figures.total_ms == 0 {
            run.doc.figures.total_ms = now_ms().saturating_sub(run.doc.created_ms);
        }
    }

    /// Journals the intent, fences, records the tokens (and `Fenced` for the target).
    /// True when the fence landed (false: a failed fence to the target, now a
    /// decided rollback).
    async fn fence(&self, run: &mut Run, to: Side, epoch: u64) -> Result<bool, ApiError> {
        let (intent, holder) = match to {
            Side::Target => (Event::FenceIntent { epoch }, run.dst.name.clone()),
            Side::Source => (Event::RollbackIntent { epoch }, run.src.name.clone()),
        };
        self.record_step(run, intent, false).await?;
        let t = Instant::now();
        let r = self
            .fence_all(&mut run.vm, run.doc.disk_move.as_mut(), to, epoch, &holder)
            .await;
        run.doc.figures.fence_ms += t.elapsed().as_millis() as u64;
        run.doc.figures.fence_us += t.elapsed().as_micros() as u64;
        match (r, to) {
            // The VM record keeps its host until the commit but takes the new tokens
            // now, in the same synced batch as `Fenced`.
            (Ok(()), Side::Target) => self
                .record_step(run, Event::FenceConfirmed, true)
                .await
                .map(|()| true),
            (Ok(()), Side::Source) => {
                self.store.put("vms", &run.vm.name, &run.vm)?;
                Ok(true)
            }
            (Err(e), Side::Target) => self
                .decide_rollback(run, format!("fencing the disks to the target failed: {e}"))
                .map(|()| false),
            // Retried by the driver under a newer epoch.
            (Err(e), Side::Source) => Err(e),
        }
    }

    /// Pauses the running target and resumes it with the VM's current tokens.
    async fn rehand_target(&self, run: &mut Run) -> Result<(), ApiError> {
        match run.da.pause(&run.vm.name).await {
            Err(e) if e.status() != Some(409) => {
                return Err(ApiError::daemon(
                    "pausing the target to hand it its lease",
                    &e,
                ));
            }
            _ => {}
        }
        let disks = self.target_disk_specs(&run.vm, run.doc.disk_move.as_ref())?;
        run.da
            .resume_with_disks(&run.vm.name, &disks)
            .await
            .map_err(|e| ApiError::daemon("resuming the target with its lease", &e))?;
        Ok(())
    }

    /// Fences every disk of the VM to `holder` at `epoch` and records the new tokens.
    /// With a disk move, a fence to the target retires each moved disk's source copy
    /// (fenced to no writer: nobody gets its token) and fences the target site's copy
    /// to the target instead; a fence to the source fences the source copies only.
    async fn fence_all(
        &self,
        vm: &mut Vm,
        mut plan: Option<&mut DiskMovePlan>,
        to: Side,
        epoch: u64,
        holder: &str,
    ) -> Result<(), ApiError> {
        for (i, d) in vm.disks.iter_mut().enumerate() {
            let moved = plan
                .as_deref_mut()
                .and_then(|p| p.disks.iter_mut().find(|m| m.index == i));
            if let (Some(m), Side::Target) = (moved, to) {
                let s = self.storage(&d.storage)?;
                let r = self
                    .storage_client(&s)
                    .fence(&d.export, epoch, super::geo::RETIRED_HOLDER)
                    .await
                    .map_err(|e| ApiError::daemon("retiring the source copy of the disk", &e))?;
                d.epoch = r.epoch;
                d.holder = r.holder;
                d.token = None;
                let s = self.storage(&m.replica.storage)?;
                let r = self
                    .storage_client(&s)
                    .fence(&m.replica.export, epoch, holder)
                    .await
                    .map_err(|e| ApiError::daemon("fencing the target site's copy", &e))?;
                m.replica.epoch = r.epoch;
                m.replica.holder = r.holder;
                m.replica.token = Some(r.token);
                continue;
            }
            let s = self.storage(&d.storage)?;
            let r = self
                .storage_client(&s)
                .fence(&d.export, epoch, holder)
                .await
                .map_err(|e| ApiError::daemon("fencing the disk", &e))?;
            d.epoch = r.epoch;
            d.holder = r.holder;
            d.token = Some(r.token);
        }
        Ok(())
    }

    /// Sends the go-ahead with the target's tokens and follows the agents until the
    /// migration ends: `TargetRunning`, or a rollback decision.
    async fn go_ahead(&self, run: &mut Run, ctl: &DriveControl) -> Result<(), ApiError> {
        if !self.pass_point_of_no_return(ctl) {
            return self.decide_rollback(run, "cancelled by the operator after the fence".into());
        }
        if let Some(q) = run.quiesced_at {
            run.doc.figures.handover_ms = q.elapsed().as_millis() as u64;
        }
        let disks = self.target_disk_specs(&run.vm, run.doc.disk_move.as_ref())?;
        let outcome = self.live_switchover(run, &disks).await;
        let target_runs =
            matches!(run.da.get_vm(&run.vm.name).await, Ok(Some(t)) if t.state == "running");
        if !target_runs {
            let reason = match outcome {
                Err(reason) => reason,
                Ok(()) => "the target does not run the VM after the switchover".to_owned(),
            };
            return self.decide_rollback(run, reason);
        }
        if let Err(reason) = outcome {
            // The target runs under its new lease although the migration reported a
            // failure afterwards: forward is the only way that keeps one copy.
            tracing::warn!(migration = %run.doc.record.id, %reason, "target runs; rolling forward");
        }
        self.record_step(run, Event::TargetRunning, false).await
    }

    /// Sends the go-ahead and follows the migration until it ends. Ok when the agent
    /// reports it completed.
    async fn live_switchover(
        &self,
        run: &mut Run,
        disks: &[serde_json::Value],
    ) -> Result<(), String> {
        let Some(agent_id) = run.doc.agent_migration.clone() else {
            return Err("no agent migration to switch over".into());
        };
        let end = Instant::now() + SETTLE_MAX;
        let mut sent = false;
        loop {
            if !sent {
                match run.sa.switchover(&agent_id, disks).await {
                    Ok(()) => sent = true,
                    // Not quiesced any more (it failed meanwhile): the poll says why.
                    Err(e) if e.status() == Some(409) => sent = true,
                    Err(e) => tracing::warn!(error = %e, "sending the go-ahead; retrying"),
                }
            }
            match run.sa.migration(&agent_id).await {
                Ok(m) => {
                    copy_figures(&mut run.doc, &m);
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
}

fn copy_figures(doc: &mut MigrationDoc, m: &AgentMigration) {
    if doc.disk_move.is_none() {
        doc.figures.total_ms = m.total_ms.round() as u64;
    } else if !doc.record.phase.is_terminal() {
        // A geographic migration's total includes the disk copy before the agents'
        // migration started: the coordinator's wall time.
        doc.figures.total_ms = now_ms().saturating_sub(doc.created_ms);
    }
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

/// `(epoch, holder)` when every disk has a token of one lease.
fn held_tokens(disks: &[Disk]) -> Option<(u64, String)> {
    match disks.split_first() {
        Some((first, rest))
            if first.token.is_some()
                && rest.iter().all(|d| {
                    d.token.is_some() && d.epoch == first.epoch && d.holder == first.holder
                }) =>
        {
            Some((first.epoch, first.holder.clone()))
        }
        _ => None,
    }
}

/// A migration with no executor in this process: only between the end of an
/// executor and its terminal phase being read (or on a follower).
fn not_driven(id: &str) -> ApiError {
    ApiError::conflict(
        "not_driven",
        format!("Migration {id} is not driven by this coordinator; try again shortly."),
    )
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let ms: Vec<u128> = (1..=6).map(|n| retry_delay(n).as_millis()).collect();
        assert_eq!(ms, vec![500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
        assert_eq!(retry_delay(0), RETRY);
    }
}
