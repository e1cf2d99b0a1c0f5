//! stagehand-agent: the KVM host agent (see README.md).
//!
//! `vstate` holds the KVM pieces, `devices` the userspace devices, `machine` a whole
//! guest (implementing the migration [`contract`]), `manager` the table of guests,
//! `migration` live pre-copy migration between agents, `api` the HTTP API, `guests`
//! the test guests built from `agent/guests/`.

pub mod api;
pub mod config;
pub mod contract;
pub mod devices;
pub mod guests;
pub mod host;
pub mod machine;
pub mod manager;
pub mod migration;
pub mod vstate;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::{AgentConfig, AgentFlags};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// "the API" or "migration streams": which listener failed.
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] stagehand_common::tls::TlsError),
}

/// Addresses the agent actually listens on (port 0 resolved).
#[derive(Debug, Clone)]
pub struct Bound {
    pub api: SocketAddr,
    /// The migration listener, when `--migration-listen` was given.
    pub migration: Option<SocketAddr>,
}

/// Runs the agent until `shutdown` is cancelled; then stops every VM.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    serve(config, shutdown, |_| {}).await
}

/// [`run`], calling `on_ready` once the listeners are bound.
pub async fn serve(
    config: AgentConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Bound),
) -> Result<(), AgentError> {
    for dir in [&config.data_dir, &config.images_dir] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::DataDir {
            path: dir.clone(),
            source,
        })?;
    }
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .map_err(|source| AgentError::Bind {
            what: "the API",
            addr: config.api,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        what: "the API",
        addr: config.api,
        source,
    })?;
    let manager = Arc::new(manager::VmManager::new());
    let state = api::ApiState::new(manager.clone(), Arc::new(config.clone()));
    tokio::spawn(Arc::clone(&state.host).run(shutdown.clone()));
    // Loaded before anything listens: a bad certificate stops the start.
    let (api_tls, migration_tls) = match &config.tls {
        Some(files) => (
            {
                devices::disk_uri::set_tls_client(files.client_config()?);
                Some(files.api_server_config()?)
            },
            Some(migration::service::MigrationTls::from_files(files)?),
        ),
        None => (None, None),
    };
    let migrations = migration::MigrationService::with_tls(
        manager.clone(),
        config.auth.token().map(|t| t.expose().to_string()),
        migration_tls,
    );
    let migration_addr = match config.migration_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind {
                    what: "migration streams",
                    addr,
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| AgentError::Bind {
                what: "migration streams",
                addr,
                source,
            })?;
            tokio::spawn(migrations.clone().serve(l, shutdown.clone()));
            tracing::info!(migration = %bound, "migration listener ready");
            Some(bound)
        }
        None => None,
    };
    let app = api::app(state, api::migration::routes(migrations));
    tracing::info!(api = %api_addr, host_id = %config.host_id, tls = api_tls.is_some(), "agent ready");
    on_ready(&Bound {
        api: api_addr,
        migration: migration_addr,
    });
    let result = stagehand_common::http::serve(listener, app, api_tls, shutdown)
        .await
        .map_err(AgentError::Serve);
    tracing::info!("shutting down: stopping all VMs");
    let _ = tokio::task::spawn_blocking(move || manager.shutdown()).await;
    result
}
