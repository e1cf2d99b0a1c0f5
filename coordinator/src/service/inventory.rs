//! Inventory (sites, storage nodes, hosts, VM records) and placement.

use std::collections::HashMap;

use super::Coordinator;
use crate::error::ApiError;
use crate::model::*;

impl Coordinator {
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

    pub fn host(&self, name: &str) -> Result<Host, ApiError> {
        self.store.get::<Host>("hosts", name)?.ok_or_else(|| {
            ApiError::not_found(
                "host_not_found",
                format!("No host named {name:?}; add it with `coord host add`."),
            )
        })
    }

    pub(crate) fn storage(&self, name: &str) -> Result<StorageNode, ApiError> {
        self.store
            .get::<StorageNode>("storage", name)?
            .ok_or_else(|| {
                ApiError::not_found(
                    "storage_not_found",
                    format!("No storage node named {name:?}."),
                )
            })
    }

    pub(crate) fn require_site(&self, name: &str) -> Result<(), ApiError> {
        match self.store.get::<Site>("sites", name)? {
            Some(_) => Ok(()),
            None => Err(ApiError::not_found(
                "site_not_found",
                format!("No site named {name:?}; add it with `coord site add {name}`."),
            )),
        }
    }

    pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
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
        if node.disk_dir.as_ref().is_some_and(|d| !d.starts_with('/')) {
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
        let agent = self.agent_client(&host);
        agent
            .health()
            .await
            .map_err(|e| ApiError::daemon("checking the agent", &e))?;
        // Its capacity and CPU from the start (an older agent without the report is
        // still accepted; placement then uses --memory alone).
        let mut host = host;
        match agent.host_report().await {
            Ok(mut r) => {
                r.received_ms = now_ms();
                host.report = Some(r);
            }
            Err(e) => {
                tracing::warn!(host = %host.name, error = %e, "the agent does not report its host")
            }
        }
        self.store.put("hosts", &host.name, &host)?;
        Ok(host)
    }

    /// Memory (MiB) already promised on each host: its VMs, plus incoming migrations.
    pub(crate) fn host_usage(&self) -> Result<HashMap<String, u64>, ApiError> {
        let mut used: HashMap<String, u64> = HashMap::new();
        // The memory of each VM from the one listing: a store read per migration in
        // flight would cost a round trip each on etcd.
        let mut memory: HashMap<String, u64> = HashMap::new();
        for vm in self.vms()? {
            *used.entry(vm.host.clone()).or_default() += vm.memory_mib;
            memory.insert(vm.name, vm.memory_mib);
        }
        for (_, m) in self.store.list::<MigrationDoc>("migrations")? {
            if !m.record.phase.is_terminal() {
                let mem = memory.get(&m.record.vm).copied().unwrap_or(0);
                *used.entry(m.record.to_host.clone()).or_default() += mem;
            }
        }
        Ok(used)
    }

    /// Guest memory a host may hold, MiB: the smaller of `--memory` and what its agent
    /// reports it offers guests (when it reported).
    pub fn capacity_mib(h: &Host) -> u64 {
        match &h.report {
            Some(r) if r.memory_mib_for_guests > 0 => h.memory_mib.min(r.memory_mib_for_guests),
            _ => h.memory_mib,
        }
    }

    /// The CPU fingerprint a host's agent reported (None: not reported yet, or empty).
    pub(crate) fn fingerprint_of(h: &Host) -> Option<&str> {
        h.report
            .as_ref()
            .map(|r| r.cpu.fingerprint.as_str())
            .filter(|f| !f.is_empty())
    }

    /// Picks a host: the named one (checked), or the schedulable host of `site` with
    /// most room. When `exclude` is the VM's current host (a migration), the target
    /// must also report the same CPU fingerprint as that host: guests only move between
    /// equal fingerprints, so the source's is the guest's. Refuses with a reason
    /// (`no_capacity`, `cpu_incompatible`, `host_drained`) before any memory moves.
    pub(crate) fn place(
        &self,
        site: Option<&str>,
        host: Option<&str>,
        memory_mib: u64,
        exclude: Option<&str>,
    ) -> Result<Host, ApiError> {
        let used = self.host_usage()?;
        let room = |h: &Host| {
            Self::capacity_mib(h).saturating_sub(used.get(&h.name).copied().unwrap_or(0))
        };
        // The guest's CPU fingerprint, for a migration.
        let need_fp: Option<String> = match exclude {
            Some(src) => self
                .store
                .get::<Host>("hosts", src)?
                .as_ref()
                .and_then(|h| Self::fingerprint_of(h).map(str::to_owned)),
            None => None,
        };
        let cpu_ok = |h: &Host| match (&need_fp, Self::fingerprint_of(h)) {
            (Some(need), Some(have)) => need == have,
            // Unknown on either side: the target agent still checks CPUID at start.
            _ => true,
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
            if let Some(d) = h.drained {
                return Err(ApiError::conflict(
                    "host_drained",
                    format!(
                        "Host {name} is drained ({}); `coord host undrain {name}` first.",
                        drain_word(d)
                    ),
                ));
            }
            if !cpu_ok(&h) {
                return Err(ApiError::conflict(
                    "cpu_incompatible",
                    format!(
                        "Host {name}'s CPU (fingerprint {}) differs from the one the VM runs on (fingerprint {}): the guest's CPU features may be missing there.",
                        short_fp(Self::fingerprint_of(&h).unwrap_or("")),
                        short_fp(need_fp.as_deref().unwrap_or(""))
                    ),
                ));
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
        let candidates: Vec<Host> = self
            .hosts()?
            .into_iter()
            .filter(|h| h.site == site && Some(h.name.as_str()) != exclude)
            .collect();
        let schedulable: Vec<&Host> = candidates.iter().filter(|h| h.drained.is_none()).collect();
        let compatible: Vec<&Host> = schedulable.iter().copied().filter(|h| cpu_ok(h)).collect();
        if let Some(h) = compatible
            .iter()
            .filter(|h| room(h) >= memory_mib)
            .max_by_key(|h| room(h))
        {
            return Ok((*h).clone());
        }
        let why = if candidates.is_empty() {
            format!("No other host in site {site}; add one with `coord host add`.")
        } else if schedulable.is_empty() {
            format!("Every other host in site {site} is drained; undrain one or add a host.")
        } else if compatible.is_empty() {
            format!(
                "No schedulable host in site {site} has a CPU compatible with the VM's (fingerprint {}).",
                short_fp(need_fp.as_deref().unwrap_or(""))
            )
        } else {
            format!(
                "No schedulable host in site {site} with a compatible CPU has {memory_mib} MiB free; add a host or free memory."
            )
        };
        let code = if !schedulable.is_empty() && compatible.is_empty() {
            "cpu_incompatible"
        } else {
            "no_capacity"
        };
        Err(ApiError::conflict(code, why))
    }
}

fn drain_word(d: crate::plan::Drain) -> &'static str {
    match d {
        crate::plan::Drain::Maintenance => "maintenance",
        crate::plan::Drain::Standby => "stand-by after consolidate",
    }
}

/// The first 12 hex digits of a fingerprint, for messages.
pub(crate) fn short_fp(fp: &str) -> &str {
    if fp.is_empty() {
        "unknown"
    } else {
        fp.get(..12).unwrap_or(fp)
    }
}
