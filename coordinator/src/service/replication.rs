//! `coord replicate`: a VM's disks copied continuously to a storage node of another
//! site by background mirror jobs of the source's storage node. The record is stored
//! before any daemon is called (state `starting`), then with the job ids (`running`);
//! `GET` reads each job's live state and dirty bytes (the lag). Not ordered shipping:
//! a bitmap-driven mirror copies blocks out of order, so the replica is not a
//! crash-consistent image while the guest writes (`consistent: false`).

use serde_json::{Value, json};

use super::Coordinator;
use crate::daemons::{DaemonError, MirrorTarget};
use crate::error::ApiError;
use crate::model::*;
use crate::store::Batch;

/// Holder of a replica's lease (the mirror job gets the token).
const REPLICA_HOLDER: &str = "coord-replica";
/// Epochs tried above a replica's floor before giving up.
const EPOCH_TRIES: u64 = 8;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateRequest {
    pub vm: String,
    pub to_site: String,
}

impl Coordinator {
    /// The VM's replication, if any.
    pub(crate) fn replication(&self, vm: &str) -> Result<Option<Replication>, ApiError> {
        Ok(self.store.get::<Replication>("replications", vm)?)
    }

    /// Starts replicating every disk of the VM to a storage node of `to_site`.
    pub async fn start_replication(&self, req: ReplicateRequest) -> Result<Value, ApiError> {
        let _g = self.inventory.lock().await;
        let vm = self.vm(&req.vm)?;
        self.require_site(&req.to_site)?;
        if let Some(r) = self.replication(&vm.name)? {
            return Err(ApiError::conflict(
                "replication_exists",
                format!(
                    "VM {} already replicates to site {} ({}); stop it first.",
                    vm.name, r.to_site, r.state
                ),
            ));
        }
        if let Some(m) = &vm.migration {
            return Err(ApiError::conflict(
                "vm_migrating",
                format!("VM {} is migrating ({m}).", vm.name),
            ));
        }
        if vm.site == req.to_site {
            return Err(ApiError::bad_request(format!(
                "VM {} already runs in site {}; replicate to another site.",
                vm.name, req.to_site
            )));
        }
        let nodes = self.storage_nodes()?;
        let node = nodes
            .iter()
            .find(|n| n.site == req.to_site)
            .ok_or_else(|| {
                ApiError::conflict(
                    "no_storage",
                    format!(
                        "No storage node in site {}; add one with `coord storage add`.",
                        req.to_site
                    ),
                )
            })?;
        let mut rec = Replication {
            vm: vm.name.clone(),
            to_site: req.to_site.clone(),
            disks: vm
                .disks
                .iter()
                .map(|d| ReplicaDisk {
                    storage: d.storage.clone(),
                    export: d.export.clone(),
                    target: node.name.clone(),
                    epoch: 0,
                    mirror: None,
                })
                .collect(),
            state: "starting".into(),
            created_ms: now_ms(),
            error: None,
        };
        // Stored before any call: a crash leaves a record `replicate stop` cleans up.
        self.store.put("replications", &vm.name, &rec)?;
        let floor = vm.disks.iter().map(|d| d.epoch).max().unwrap_or(0);
        for (i, d) in vm.disks.iter().enumerate() {
            match self.start_replica(d, node, floor).await {
                Ok((epoch, id)) => {
                    rec.disks[i].epoch = epoch;
                    rec.disks[i].mirror = Some(id);
                    self.store.put("replications", &vm.name, &rec)?;
                }
                Err(e) => {
                    let _ = self.stop_parts(&rec).await;
                    let mut b = Batch::default();
                    b.delete("replications", &vm.name);
                    self.store.commit(b)?;
                    return Err(e);
                }
            }
        }
        rec.state = "running".into();
        self.store.put("replications", &vm.name, &rec)?;
        tracing::info!(vm = %vm.name, site = %req.to_site, storage = %node.name, "replication started");
        Ok(self.replication_view(&rec).await)
    }

    /// Creates the replica export, leases it to the mirror above every epoch it has
    /// seen, starts the background mirror job; (epoch, job id).
    async fn start_replica(
        &self,
        d: &Disk,
        node: &StorageNode,
        floor: u64,
    ) -> Result<(u64, String), ApiError> {
        let src = self.storage(&d.storage)?;
        let dsc = self.storage_client(node);
        let path = node
            .disk_dir
            .as_ref()
            .map(|dir| format!("{}/{}.img", dir.trim_end_matches('/'), d.export));
        let info = dsc
            .put_export(&d.export, path.as_deref(), d.size_bytes)
            .await
            .map_err(|e| ApiError::daemon("creating the replica", &e))?;
        if info.size_bytes < d.size_bytes {
            return Err(ApiError::conflict(
                "replica_too_small",
                format!(
                    "The replica {} on {} holds {} bytes, the disk {}.",
                    d.export, node.name, info.size_bytes, d.size_bytes
                ),
            ));
        }
        let mut epoch = floor.max(info.lease.map(|l| l.epoch).unwrap_or(0)) + 1;
        let lease = loop {
            match dsc.fence(&d.export, epoch, REPLICA_HOLDER).await {
                Ok(l) => break l,
                // A floor from an earlier replica of this name: go above it.
                Err(e) if e.code() == Some("stale_epoch") && epoch < floor + EPOCH_TRIES => {
                    epoch += 1
                }
                Err(e) => return Err(ApiError::daemon("leasing the replica", &e)),
            }
        };
        let target = MirrorTarget {
            address: &node.nbd,
            export: &d.export,
            lease_token: &lease.token,
        };
        let job = self
            .storage_client(&src)
            .create_mirror(&d.export, &target)
            .await
            .map_err(|e| ApiError::daemon("starting the replication job", &e))?;
        Ok((lease.epoch, job.id))
    }

    /// Cancels the jobs and deletes the replicas of `rec`.
    async fn stop_parts(&self, rec: &Replication) -> Result<(), ApiError> {
        for d in &rec.disks {
            if let Some(id) = &d.mirror {
                let s = self.storage(&d.storage)?;
                self.storage_client(&s)
                    .cancel_mirror(id)
                    .await
                    .map_err(|e| ApiError::daemon("cancelling the replication job", &e))?;
            }
            let n = self.storage(&d.target)?;
            match self.storage_client(&n).delete_export(&d.export).await {
                Err(e) if e.status() != Some(404) => {
                    return Err(ApiError::daemon("deleting the replica", &e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Stops a VM's replication: cancels its jobs and deletes the replicas (a mirror's
    /// replica is not crash-consistent; keeping it would invite a failover onto it).
    pub async fn stop_replication(&self, vm: &str) -> Result<Value, ApiError> {
        let _g = self.inventory.lock().await;
        let rec = self.replication(vm)?.ok_or_else(|| {
            ApiError::not_found(
                "replication_not_found",
                format!("VM {vm} does not replicate; see `coord replicate list`."),
            )
        })?;
        self.stop_parts(&rec).await?;
        let mut b = Batch::default();
        b.delete("replications", vm);
        self.store.commit(b)?;
        tracing::info!(vm, "replication stopped");
        let mut v = self.replication_view(&rec).await;
        v["state"] = json!("stopped");
        Ok(v)
    }

    /// Every replication with its jobs' live state.
    pub async fn list_replications(&self) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        for (_, r) in self.store.list::<Replication>("replications")? {
            out.push(self.replication_view(&r).await);
        }
        Ok(out)
    }

    /// A replication as shown: the stored record plus its jobs' state, the bytes they
    /// still have to copy (`lag_bytes`), copied bytes and rate.
    async fn replication_view(&self, r: &Replication) -> Value {
        let mut state = r.state.clone();
        let (mut lag, mut copied, mut rate) = (0u64, 0u64, 0f64);
        let mut error = r.error.clone();
        if r.state == "running" {
            let mut states = Vec::new();
            for d in &r.disks {
                let (Some(id), Ok(s)) = (&d.mirror, self.storage(&d.storage)) else {
                    continue;
                };
                match self.storage_client(&s).mirror(id).await {
                    Ok(m) => {
                        lag += m.dirty_bytes;
                        copied += m.bytes_copied;
                        rate += m.rate_mib_s;
                        if m.error.is_some() {
                            error = m.error.clone();
                        }
                        states.push(m.state);
                    }
                    Err(DaemonError::Refused { status: 404, .. }) => {
                        states.push("failed".into());
                        error = Some("the source's storage node forgot the job (restarted?); stop and start the replication again".into());
                    }
                    Err(_) => states.push("unknown".into()),
                }
            }
            // The least advanced job tells.
            for s in ["failed", "cancelled", "unknown", "copying", "synced"] {
                if states.iter().any(|x| x == s) {
                    state = s.to_owned();
                    break;
                }
            }
        }
        json!({
            "vm": r.vm, "to_site": r.to_site, "state": state,
            "lag_bytes": lag, "bytes_copied": copied, "rate_mib_s": rate,
            "consistent": false,
            "disks": r.disks.iter().map(|d| json!({
                "storage": d.storage, "export": d.export, "target": d.target,
                "epoch": d.epoch, "mirror": d.mirror,
            })).collect::<Vec<_>>(),
            "created_ms": r.created_ms, "error": error,
        })
    }
}
