//! Geographic migration: the executor's steps that move a disk to a storage node of
//! the target site (mirror job, write-blocking, completion, retiring the source copy,
//! dropping a copy nobody uses). The decisions stay in the pure driver.

use serde_json::json;

use super::Coordinator;
use crate::daemons::{DaemonError, MirrorInfo, MirrorTarget};
use crate::driver::{DiskMove, MirrorJob};
use crate::error::ApiError;
use crate::migration::Phase;
use crate::model::*;

/// Holder of a target-site copy while the mirror job fills it (the job gets the token;
/// the coordinator keeps none).
pub(crate) const MIRROR_HOLDER: &str = "coord-mirror";
/// Holder of a source copy retired at the switchover: fenced to no writer (nobody
/// gets its token), kept read-only until the migration commits or rolls back.
pub(crate) const RETIRED_HOLDER: &str = "coord-retired";
/// How long one complete call may drain (the HTTP client gives up after 30 s).
const COMPLETE_WAIT_S: u64 = 10;

impl Coordinator {
    /// The disks of `vm` that no storage node in `target`'s reach holds, each with the
    /// storage node of the target site that gets its copy; None when every disk is
    /// reachable (shared storage).
    pub(crate) fn plan_disk_move(
        &self,
        vm: &Vm,
        target: &Host,
        options: &MigrationOptions,
    ) -> Result<Option<DiskMovePlan>, ApiError> {
        let mut disks = Vec::new();
        for (index, d) in vm.disks.iter().enumerate() {
            let s = self.storage(&d.storage)?;
            if s.reaches(&target.site) {
                continue;
            }
            let nodes = self.storage_nodes()?;
            // A node of the target site itself first, else one it reaches.
            let node = nodes
                .iter()
                .find(|n| n.site == target.site)
                .or_else(|| nodes.iter().find(|n| n.reaches(&target.site)))
                .ok_or_else(|| {
                    ApiError::conflict(
                        "storage_unreachable_from_target",
                        format!(
                            "Site {} cannot reach storage node {} holding {}'s disk, and no storage node serves site {} to copy it to; add one with `coord storage add`.",
                            target.site, s.name, vm.name, target.site
                        ),
                    )
                })?;
            disks.push(MovedDisk {
                index,
                replica: Disk {
                    storage: node.name.clone(),
                    export: d.export.clone(),
                    size_bytes: d.size_bytes,
                    epoch: 0,
                    holder: String::new(),
                    token: None,
                },
                mirror: None,
            });
        }
        if disks.is_empty() {
            return Ok(None);
        }
        Ok(Some(DiskMovePlan {
            disks,
            // An offline migration pauses the guest first: nothing to hold for.
            disk_hold: !options.offline,
            ..DiskMovePlan::default()
        }))
    }

    /// The disks the target host uses: the target site's copy of every moved disk,
    /// the VM's own disk otherwise.
    pub(crate) fn target_disks(vm: &Vm, plan: Option<&DiskMovePlan>) -> Vec<Disk> {
        let mut disks = vm.disks.clone();
        for m in plan.map(|p| p.disks.as_slice()).unwrap_or_default() {
            if let Some(d) = disks.get_mut(m.index) {
                *d = m.replica.clone();
            }
        }
        disks
    }

    /// What the driver needs to know about the mirror; also copies its figures.
    pub(crate) async fn observe_disk_move(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
        refused: Option<&str>,
    ) -> Option<DiskMove> {
        let plan = doc.disk_move.as_ref()?;
        let phase = doc.record.phase.clone();
        let mirror = if let Some(r) = refused {
            MirrorJob::Failed(r.to_owned())
        } else if plan.completed {
            MirrorJob::Completed
        } else if phase.is_terminal() || phase.past_fence_intent() {
            // The driver no longer reads it: save the calls.
            MirrorJob::Unknown
        } else {
            let mut infos = Vec::new();
            let mut job = MirrorJob::Synced;
            for m in &plan.disks {
                let Some(id) = &m.mirror else {
                    job = worst(job, MirrorJob::NotStarted);
                    continue;
                };
                let r = match vm.disks.get(m.index).map(|d| self.storage(&d.storage)) {
                    Some(Ok(s)) => self.storage_client(&s).mirror(id).await,
                    _ => {
                        job = worst(job, MirrorJob::Unknown);
                        continue;
                    }
                };
                job = worst(
                    job,
                    match r {
                        Ok(i) => {
                            let j = job_state(&i);
                            infos.push(i);
                            j
                        }
                        Err(DaemonError::Refused { status: 404, .. }) => MirrorJob::Failed(
                            "the source's storage node forgot the mirror job (restarted?)".into(),
                        ),
                        Err(e) => {
                            tracing::debug!(error = %e, "polling the mirror job");
                            MirrorJob::Unknown
                        }
                    },
                );
            }
            if infos.len() == plan.disks.len() {
                let f = &mut doc.figures;
                f.disk_bytes = infos.iter().map(|i| i.bytes_copied).sum();
                f.disk_dirty_bytes = infos.iter().map(|i| i.dirty_bytes).sum();
                f.mirror_state = infos.first().map(|i| i.state.clone());
            }
            job
        };
        let plan = doc.disk_move.as_ref()?;
        let leftover = match phase {
            Phase::Committed { .. } => self.any_export(&plan.old_disks).await,
            Phase::Cancelled { .. } | Phase::RolledBack { .. } => {
                let replicas: Vec<Disk> = plan.disks.iter().map(|m| m.replica.clone()).collect();
                self.any_export(&replicas).await
            }
            _ => false,
        };
        Some(DiskMove {
            mirror,
            write_blocking: plan.write_blocking,
            held_for_disks: plan.disk_hold && !doc.options.hold,
            leftover,
        })
    }

    /// True when one of `disks` still exists on its storage node (an unreachable node
    /// counts as gone: the migration must end; the copy is logged as left behind).
    async fn any_export(&self, disks: &[Disk]) -> bool {
        for d in disks {
            let Ok(s) = self.storage(&d.storage) else {
                continue;
            };
            match self.storage_client(&s).get_export(&d.export).await {
                Ok(_) => return true,
                Err(e) if e.status() == Some(404) => {}
                Err(e) => {
                    tracing::warn!(storage = %s.name, export = %d.export, error = %e, "cannot check for a leftover disk copy; leaving it")
                }
            }
        }
        false
    }

    /// Creates the target site's copies, leases them to the mirror at `epoch` and starts
    /// the mirror jobs (a job an earlier attempt left is cancelled first). A daemon's
    /// refusal is returned as `Ok(Some(reason))` (the migration is cancelled); a silent
    /// daemon as an error (retried).
    pub(crate) async fn start_mirrors(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
        epoch: u64,
    ) -> Result<Option<String>, ApiError> {
        let Some(plan) = doc.disk_move.as_mut() else {
            return Ok(None);
        };
        for m in plan.disks.iter_mut() {
            let Some(src_disk) = vm.disks.get(m.index) else {
                return Ok(Some(format!("the VM has no disk {}", m.index)));
            };
            let src = self.storage(&src_disk.storage)?;
            let dst = self.storage(&m.replica.storage)?;
            let ssc = self.storage_client(&src);
            let dsc = self.storage_client(&dst);
            let refused = |what: &str, e: &DaemonError| -> Result<Option<String>, ApiError> {
                match e.status() {
                    Some(_) => Ok(Some(format!("{what}: {e}"))),
                    None => Err(ApiError::daemon("preparing the disk mirror", e)),
                }
            };
            let path = dst
                .disk_dir
                .as_ref()
                .map(|d| format!("{}/{}.img", d.trim_end_matches('/'), m.replica.export));
            let info = match dsc
                .put_export(&m.replica.export, path.as_deref(), src_disk.size_bytes)
                .await
            {
                Ok(i) => i,
                Err(e) => return refused("creating the disk on the target site", &e),
            };
            if info.size_bytes < src_disk.size_bytes {
                return Ok(Some(format!(
                    "the target site's copy {} on {} holds {} bytes, the disk {}",
                    m.replica.export, dst.name, info.size_bytes, src_disk.size_bytes
                )));
            }
            let lease = match dsc.fence(&m.replica.export, epoch, MIRROR_HOLDER).await {
                Ok(l) => l,
                // The name had a higher epoch before (a replica since deleted keeps its
                // floor): retried, each time under a newer epoch, until above it.
                Err(e) if e.code() == Some("stale_epoch") => {
                    return Err(ApiError::daemon("leasing the target site's copy", &e));
                }
                Err(e) => return refused("leasing the target site's copy to the mirror", &e),
            };
            // A job an earlier attempt started (its id never recorded) pushes under an
            // older, now fenced, lease: cancel it so the node takes the new one.
            match ssc.mirrors().await {
                Ok(jobs) => {
                    for j in jobs
                        .iter()
                        .filter(|j| j.export == src_disk.export && j.active())
                    {
                        if let Err(e) = ssc.cancel_mirror(&j.id).await {
                            return Err(ApiError::daemon("cancelling an old mirror job", &e));
                        }
                    }
                }
                Err(e) => return Err(ApiError::daemon("listing the mirror jobs", &e)),
            }
            let target = MirrorTarget {
                address: &dst.nbd,
                export: &m.replica.export,
                lease_token: &lease.token,
            };
            let job = match ssc.create_mirror(&src_disk.export, &target).await {
                Ok(j) => j,
                Err(e) => return refused("starting the mirror job", &e),
            };
            tracing::info!(migration = %doc.record.id, mirror = %job.id, from = %src.name, to = %dst.name, "disk mirror started");
            m.replica.epoch = lease.epoch;
            m.replica.holder = lease.holder;
            m.replica.token = None;
            m.mirror = Some(job.id);
        }
        let total = plan.disks.iter().map(|m| m.replica.size_bytes).sum();
        doc.figures.disk_total_bytes = total;
        self.store.put("migrations", &doc.record.id, &*doc)?;
        Ok(None)
    }

    /// Calls `f` with the source node's client and the job id of every mirror.
    async fn each_mirror<F, Fut>(&self, doc: &MigrationDoc, vm: &Vm, f: F) -> Result<(), DaemonErr>
    where
        F: Fn(crate::daemons::StorageClient, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), DaemonError>>,
    {
        for m in doc.disk_move.iter().flat_map(|p| p.disks.iter()) {
            let (Some(id), Some(d)) = (&m.mirror, vm.disks.get(m.index)) else {
                continue;
            };
            let s = self.storage(&d.storage).map_err(DaemonErr::Api)?;
            f(self.storage_client(&s), id.clone())
                .await
                .map_err(DaemonErr::Daemon)?;
        }
        Ok(())
    }

    /// Switches every mirror to write-blocking and records it.
    pub(crate) async fn mirrors_write_blocking(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
    ) -> Result<(), ApiError> {
        self.each_mirror(doc, vm, |sc, id| async move {
            sc.mirror_mode(&id, "write-blocking").await
        })
        .await
        .map_err(|e| e.api("switching the mirror to write-blocking"))?;
        if let Some(p) = doc.disk_move.as_mut() {
            p.write_blocking = true;
        }
        tracing::info!(migration = %doc.record.id, "disk mirror write-blocking");
        self.store.put("migrations", &doc.record.id, &*doc)?;
        Ok(())
    }

    /// Drains every mirror (the source is quiesced); true once all completed (recorded).
    pub(crate) async fn complete_mirrors(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
    ) -> Result<bool, ApiError> {
        let all = std::sync::atomic::AtomicBool::new(true);
        self.each_mirror(doc, vm, |sc, id| {
            let all = &all;
            async move {
                if !sc.complete_mirror(&id, COMPLETE_WAIT_S).await? {
                    all.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .await
        .map_err(|e| e.api("completing the disk mirror"))?;
        if !all.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        // The last figures, before the jobs are forgotten.
        let _ = self.observe_disk_move(doc, vm, None).await;
        if let Some(p) = doc.disk_move.as_mut() {
            p.completed = true;
        }
        doc.figures.disk_dirty_bytes = 0;
        doc.figures.mirror_state = Some("completed".into());
        self.store.put("migrations", &doc.record.id, &*doc)?;
        Ok(true)
    }

    /// Deletes the copy a terminal migration left unused: after a commit the source
    /// site's old copies, else the target site's copies (their mirror jobs cancelled).
    pub(crate) async fn drop_leftover_copy(
        &self,
        doc: &mut MigrationDoc,
        vm: &Vm,
    ) -> Result<(), ApiError> {
        let Some(plan) = doc.disk_move.clone() else {
            return Ok(());
        };
        let committed = matches!(doc.record.phase, Phase::Committed { .. });
        let disks: Vec<Disk> = if committed {
            plan.old_disks.clone()
        } else {
            // Cancelled jobs stop writing before their target goes away.
            self.each_mirror(doc, vm, |sc, id| async move { sc.cancel_mirror(&id).await })
                .await
                .map_err(|e| e.api("cancelling the disk mirror"))?;
            plan.disks.iter().map(|m| m.replica.clone()).collect()
        };
        for d in &disks {
            let s = self.storage(&d.storage)?;
            match self.storage_client(&s).delete_export(&d.export).await {
                Ok(()) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(ApiError::daemon("deleting the unused disk copy", &e)),
            }
            tracing::info!(migration = %doc.record.id, storage = %s.name, export = %d.export, committed, "unused disk copy deleted");
        }
        Ok(())
    }

    /// Lifts the agent's hold taken for the disk (the mirror blocks writes now).
    pub(crate) async fn release_disk_hold(
        &self,
        doc: &mut MigrationDoc,
        agent: &crate::daemons::AgentClient,
    ) -> Result<(), ApiError> {
        if let Some(aid) = &doc.agent_migration {
            match agent.patch_migration(aid, &json!({"hold": false})).await {
                Ok(()) => {}
                // Ended meanwhile: nothing is held any more.
                Err(e) if matches!(e.status(), Some(404 | 409)) => {}
                Err(e) => return Err(ApiError::daemon("lifting the hold at the source agent", &e)),
            }
        }
        if let Some(p) = doc.disk_move.as_mut() {
            p.disk_hold = false;
        }
        tracing::info!(migration = %doc.record.id, "switchover hold for the disk lifted");
        self.store.put("migrations", &doc.record.id, &*doc)?;
        Ok(())
    }
}

/// An error of one of several daemon calls.
enum DaemonErr {
    Api(ApiError),
    Daemon(DaemonError),
}

impl DaemonErr {
    fn api(self, what: &str) -> ApiError {
        match self {
            DaemonErr::Api(e) => e,
            DaemonErr::Daemon(e) => ApiError::daemon(what, &e),
        }
    }
}

fn job_state(i: &MirrorInfo) -> MirrorJob {
    match i.state.as_str() {
        "copying" => MirrorJob::Copying,
        // Completed but not recorded (the coordinator died after the call): the
        // complete step runs again and records it.
        "synced" | "completed" => MirrorJob::Synced,
        other => MirrorJob::Failed(format!(
            "{other}: {}",
            i.error.as_deref().unwrap_or("no reason given")
        )),
    }
}

/// The state of several jobs together: the least advanced one.
fn worst(a: MirrorJob, b: MirrorJob) -> MirrorJob {
    fn rank(j: &MirrorJob) -> u8 {
        match j {
            MirrorJob::Failed(_) => 0,
            MirrorJob::Unknown => 1,
            MirrorJob::NotStarted => 2,
            MirrorJob::Copying => 3,
            MirrorJob::Synced => 4,
            MirrorJob::Completed => 5,
        }
    }
    if rank(&b) < rank(&a) { b } else { a }
}
