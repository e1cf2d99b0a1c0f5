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

    pub(crate) fn host(&self, name: &str) -> Result<Host, ApiError> {
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
        self.agent_client(&host)
            .health()
            .await
            .map_err(|e| ApiError::daemon("checking the agent", &e))?;
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

    /// Picks a host: the named one (checked), or the host of `site` with most room.
    pub(crate) fn place(
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
}
