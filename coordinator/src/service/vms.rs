//! The VM lifecycle: create (place, create and lease the disk, start), show, delete.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Coordinator, CreateVmRequest, FILL_HOLDER};
use crate::daemons::StorageClient;
use crate::error::ApiError;
use crate::model::*;
use crate::store::Batch;

impl Coordinator {
    pub async fn create_vm(&self, name: &str, req: CreateVmRequest) -> Result<Vm, ApiError> {
        Self::check_name("VM", name)?;
        if req.memory_mib == 0 || req.disk_bytes == 0 {
            return Err(ApiError::bad_request(
                "memory and disk size must be above zero.",
            ));
        }
        // The image is checked (where it is, how big) before anything is created.
        let image = match &req.disk_image {
            Some(i) => Some(self.disk_image(i, req.disk_bytes)?),
            None => None,
        };
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
        // Without a disk directory the node puts the file in its own export root.
        let path = storage
            .disk_dir
            .as_ref()
            .map(|d| format!("{}/{export}.img", d.trim_end_matches('/')));
        let info = sc
            .put_export(&export, path.as_deref(), req.disk_bytes)
            .await
            .map_err(|e| ApiError::daemon("creating the disk export", &e))?;
        let mut first_epoch = 1;
        if let Some(image) = &image {
            if let Err(e) = self
                .fill_disk(&sc, &storage, &export, image, info.size_bytes)
                .await
            {
                let _ = sc.delete_export(&export).await;
                return Err(e);
            }
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
            token: Some(fence.token),
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
            pinned: false,
            cpu_fingerprint: Self::fingerprint_of(&host).map(str::to_owned),
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

    /// The disk image `image` (absolute, or relative to the images directory) if it
    /// lies under the images directory and fits a disk of `disk_bytes`: 403
    /// `path_not_allowed` or 400 otherwise, before a byte of it is read.
    pub(crate) fn disk_image(&self, image: &str, disk_bytes: u64) -> Result<PathBuf, ApiError> {
        let root = &self.cfg.images_dir;
        let p = Path::new(image);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        let path = stagehand_common::paths::confine(&p, std::slice::from_ref(root)).map_err(|e| {
            ApiError::new(
                403,
                "path_not_allowed",
                format!("--disk-image must be a file under the coordinator's images directory ({}): {e}", root.display()),
            )
        })?;
        let meta = std::fs::metadata(&path).map_err(|e| {
            ApiError::bad_request(format!("Cannot read the disk image {image}: {e}"))
        })?;
        if !meta.is_file() {
            return Err(ApiError::bad_request(format!(
                "The disk image {image} is not a regular file."
            )));
        }
        if meta.len() > disk_bytes {
            return Err(ApiError::bad_request(format!(
                "The disk image ({} bytes) is larger than the disk ({disk_bytes} bytes); give a larger --disk.",
                meta.len()
            )));
        }
        Ok(path)
    }

    /// Writes a raw image into a new export through NBD, under a coordinator-held
    /// lease, so the host's first epoch (2) fences the filler out for good.
    pub(crate) async fn fill_disk(
        &self,
        sc: &StorageClient,
        storage: &StorageNode,
        export: &str,
        image: &Path,
        size: u64,
    ) -> Result<(), ApiError> {
        let data = tokio::fs::read(image).await.map_err(|e| {
            ApiError::bad_request(format!(
                "Cannot read the disk image {}: {e}",
                image.display()
            ))
        })?;
        // Checked before reading; checked again in case the file grew meanwhile.
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
        // The lease travels in the export name on the wire only (nbd-client builds it);
        // with TLS the node is checked against the CA and sees our certificate.
        let mut opts = nbd_client::ClientOptions::new(export).lease(&f.token);
        if let Some(tls) = &self.cfg.tls {
            let name = stagehand_common::tls::server_name(&storage.nbd).map_err(|e| {
                ApiError::bad_request(format!(
                    "The storage node's NBD address {} is not a TLS name: {e}.",
                    storage.nbd
                ))
            })?;
            opts = opts.tls(std::sync::Arc::clone(tls), name);
        }
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

    pub(crate) fn agent_spec(&self, vm: &Vm) -> Result<Value, ApiError> {
        let disks = self.disk_specs(vm)?;
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
        if self.replication(name)?.is_some() {
            return Err(ApiError::conflict(
                "vm_replicating",
                format!("VM {name} replicates; `coord replicate stop {name}` first."),
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
}
