//! Glue between the control API and the NBD server: the export registry as an
//! [`ExportHost`], and the start-up of the durable store, the exports' lease gates
//! and the API listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::{
    Confinement, ConnectionCount, ControlState, ExportHost, ExportInfo, ExportStats, NewExport,
    gate_for, stored_exports,
};
use crate::config::Config;
use crate::export::{BitmapStore, Export, ExportRegistry, ExportSpec};
use crate::lease::{LeaseGate, LeasePolicy};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("control API TLS: {0}")]
    Tls(#[from] stagehand_common::tls::TlsError),
    #[error("cannot listen for the control API on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

fn info(e: &Export) -> ExportInfo {
    ExportInfo {
        name: e.name.clone(),
        path: e.path.clone(),
        size_bytes: e.size,
        read_only: e.read_only,
        gate: e.lease.clone(),
        stats: ExportStats {
            connections: e.stats.connections.load(Ordering::Relaxed),
            read_bytes: e.stats.bytes_read.load(Ordering::Relaxed),
            written_bytes: e.stats.bytes_written.load(Ordering::Relaxed),
            requests: e.stats.requests.load(Ordering::Relaxed),
        },
        bitmaps: e.bitmaps.names(),
    }
}

/// Opens an export with the given gate and its stored bitmaps.
fn open_export(
    spec: &ExportSpec,
    gate: LeaseGate,
    bitmaps: &BitmapStore,
) -> Result<Export, crate::export::ExportError> {
    let export = Export::open(spec)?;
    bitmaps.attach(Export {
        leased: gate.is_leased(),
        lease: gate,
        ..export
    })
}

impl ExportHost for ExportRegistry {
    fn list(&self) -> Vec<ExportInfo> {
        ExportRegistry::list(self).iter().map(|e| info(e)).collect()
    }

    fn get(&self, name: &str) -> Option<ExportInfo> {
        ExportRegistry::get(self, name).map(|e| info(&e))
    }

    fn add(&self, export: NewExport) -> Result<ExportInfo, String> {
        let spec = ExportSpec {
            name: export.name,
            path: export.path,
            read_only: export.read_only,
            unleased: !export.gate.is_leased(),
            lease_reads: export
                .gate
                .policy()
                .is_some_and(|p| p.lease_required_for_reads),
            description: None,
        };
        let opened = Arc::new(
            open_export(&spec, export.gate, &self.bitmap_store()).map_err(|e| e.to_string())?,
        );
        let view = info(&opened);
        self.insert(opened).map_err(|e| e.to_string())?;
        Ok(view)
    }

    fn export(&self, name: &str) -> Option<Arc<Export>> {
        ExportRegistry::get(self, name)
    }

    fn remove(&self, name: &str) -> Option<ConnectionCount> {
        let removed = ExportRegistry::remove(self, name)?;
        // A later export of this name is another disk: its writes start clean.
        removed.bitmaps.destroy();
        Some(Box::new(move || {
            removed.stats.connections.load(Ordering::Relaxed)
        }))
    }
}

/// The operator's limits on API-added exports.
pub fn confinement(config: &Config) -> Confinement {
    Confinement {
        roots: config.export_roots.clone(),
        devices: config.allow_devices.clone(),
    }
}

/// The durable store of `config.data_dir` (in memory, with a warning, without one).
pub fn open_store(config: &Config) -> Result<Arc<Store>, ControlError> {
    Ok(Arc::new(match &config.data_dir {
        Some(dir) => Store::open(dir)?,
        None => {
            tracing::warn!(
                "no --data-dir: lease epochs and API-added exports are kept in memory only and a restart forgets them"
            );
            Store::ephemeral()
        }
    }))
}

/// The registry with the configured exports (leased unless `,unleased`, a plain name
/// refused with `,lease-reads`, each from its
/// durable lease record) and the exports added through the API in earlier runs. A
/// stored export that no longer opens is logged and skipped, not fatal: the node must
/// still come up to serve the others.
pub fn open_registry(
    config: &Config,
    store: &Store,
) -> Result<Arc<ExportRegistry>, crate::export::ExportError> {
    let bitmaps = BitmapStore {
        data_dir: config.data_dir.clone(),
        al_regions: config.bitmap_al_regions,
    };
    let registry = ExportRegistry::with_bitmap_store(bitmaps.clone());
    for spec in &config.exports {
        let policy = LeasePolicy {
            lease_required_for_reads: spec.lease_reads,
        };
        let gate = gate_for(store, &spec.name, !spec.unleased, policy);
        registry.insert(Arc::new(open_export(spec, gate, &bitmaps)?))?;
    }
    let confinement = confinement(config);
    for (name, record) in stored_exports(store) {
        if registry.get(&name).is_some() {
            tracing::warn!(export = %name, "export given on the command line and stored by the API; using the command line");
            continue;
        }
        // The roots may have narrowed since the export was added.
        if !confinement.allows(&record.path) {
            tracing::error!(export = %name, path = %record.path.display(), "stored export not served: its path is outside every --export-root (or an unlisted block device)");
            continue;
        }
        let spec = ExportSpec {
            name: name.clone(),
            path: record.path.clone(),
            read_only: record.read_only,
            unleased: !record.leased,
            lease_reads: record.policy.lease_required_for_reads,
            description: None,
        };
        let gate = gate_for(store, &name, record.leased, record.policy);
        match open_export(&spec, gate, &bitmaps) {
            Ok(e) => registry.insert(Arc::new(e))?,
            Err(e) => tracing::error!(export = %name, error = %e, "stored export not served"),
        }
    }
    Ok(registry)
}

/// Nice value of the control API's thread (and of the blocking threads it starts,
/// which inherit it: the fence's fdatasync runs there).
const API_NICE: libc::c_int = -10;

/// Best effort: gives the calling thread (the control API's) a higher CPU priority,
/// so that on a node whose cores are busy with the data path a fence's few
/// wake-ups (accept, the fence, the fsync thread, the answer) are not each queued
/// behind busy threads. Measured on the 2-core dev VM under load: see
/// `nbd-server/README.md`. Needs CAP_SYS_NICE (root); without it nothing changes.
fn raise_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain syscall on this thread's own id; Linux nice values are per thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, API_NICE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "control API thread keeps its priority");
    }
}

/// Real-time priority (SCHED_FIFO, the lowest level) for the control API's thread,
/// and so for the thread that makes a fence durable: a blocking thread of the API's
/// runtime, started by this thread, inherits the policy. A fence is a
/// few wake-ups (request arrives, fdatasync completes in an interrupt, in-flight
/// writes drain, answer goes out); on a node whose cores are saturated by the data
/// path each of them waited for a core even at nice -10. Measured with
/// `make bench-fence` on the 2-core dev VM under 8 busy writers (export on tmpfs):
/// persist p50 1.3 -> 0.4 ms, p99 4.3 -> 1.8 ms; whole fence at the server p99
/// 4.4 -> 1.4-3.0 ms. These threads only parse small HTTP requests and write a
/// few KiB of state, so they cannot monopolise a core, and the kernel's RT
/// throttling (sched_rt_runtime_us) bounds them regardless. Best effort: needs
/// CAP_SYS_NICE (root); without it the thread keeps its nice value.
fn realtime_for_fences() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a live sched_param.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "control API thread keeps its nice value");
    }
}

/// Binds `config.api` (if set) and serves the control API until `shutdown`, on a
/// thread and runtime of its own: a fence must not queue behind the data path's
/// work on the server's runtime (on a busy node that added ~10 ms to every fence).
pub async fn start_api(
    config: &Config,
    store: Arc<Store>,
    registry: Arc<ExportRegistry>,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, ControlError> {
    let Some(addr) = &config.api else {
        return Ok(None);
    };
    let listen_err = |source| ControlError::Listen {
        addr: addr.clone(),
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("control-api")
        .build()
        .map_err(listen_err)?;
    let tls = match &config.tls {
        Some(files) => Some(files.api_server_config()?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%local, scheme, "control API listening");
    println!("stagehand-nbd: control api on {scheme}://{local}");
    // Mirror jobs run on this (the data path's) runtime, not the API's thread.
    // With a data dir, jobs on exports with persistent bitmaps outlive a restart.
    let mirrors = crate::mirror::MirrorManager::persistent(
        Arc::clone(&registry),
        config.tls.clone(),
        config.data_dir.as_deref(),
        config.mirror_allow.clone(),
    );
    mirrors.resume_stored();
    let state = Arc::new(
        ControlState::new(registry, store, config.auth.clone())
            .confined(confinement(config))
            .with_mirrors(mirrors),
    );
    let thread = std::thread::Builder::new()
        .name("control-api".into())
        .spawn(move || {
            raise_priority();
            realtime_for_fences();
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => super::serve(l, state, tls, shutdown).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "control API stopped");
                }
            });
        })
        .map_err(listen_err)?;
    Ok(Some(tokio::task::spawn_blocking(move || {
        if thread.join().is_err() {
            tracing::error!("control API thread panicked");
        }
    })))
}
