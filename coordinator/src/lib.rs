//! coord: the Stagehand coordinator (see README.md and docs/coordinator.md).
//!
//! - `store`: the state-store interface and its two implementations, RocksDB
//!   (embedded, the default) and etcd (shared by several coordinators, one leading).
//! - `migration`: the journaled record and its pure state machine.
//! - `driver`: `next_action`, the pure decision of the next migration step (live and
//!   after a restart alike).
//! - `model`: inventory records; `daemons`: HTTP clients of stagehand-nbd and agents.
//! - `service`: inventory and placement, the VM lifecycle, the migration executor,
//!   recovery.
//! - `api`: the HTTP/JSON API (axum); `config`: `coord serve` flags and TOML.
//! - `cli`: the client verbs (`coord site add`, `coord migrate`, ...).

pub mod api;
pub mod cli;
pub mod config;
pub mod daemons;
pub mod driver;
pub mod error;
pub mod migration;
pub mod model;
pub mod plan;
pub mod service;
pub mod store;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the state store in {dir}: {source}")]
    Store {
        dir: std::path::PathBuf,
        source: store::StoreError,
    },
    #[error("cannot open the etcd state store: {0}")]
    Etcd(store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] stagehand_common::tls::TlsError),
    #[error("cannot build the HTTP client for the daemons: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the coordinator until `shutdown` fires: opens the store, hands migrations a
/// previous run left unfinished to their executors, and serves the API (HTTPS with
/// `--tls-*`). Prints `coord: api listening on ADDR` once it accepts connections.
pub async fn run(cfg: config::ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let st = match &cfg.store {
        config::StoreConfig::Rocks => {
            std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServeError::Store {
                dir: cfg.data_dir.clone(),
                source: store::StoreError::Io(source),
            })?;
            store::Store::open(&cfg.data_dir).map_err(|source| ServeError::Store {
                dir: cfg.data_dir.clone(),
                source,
            })?
        }
        config::StoreConfig::Etcd(ec) => {
            let es = store::etcd::EtcdStore::connect(ec.clone()).map_err(ServeError::Etcd)?;
            es.start_election(cfg.name.clone(), cfg.advertise.clone(), cfg.election_ttl);
            tracing::info!(name = %cfg.name, advertise = %cfg.advertise, "campaigning for leadership on etcd");
            store::Store::from_backend(Arc::new(es))
        }
    };
    let (client_tls, server_tls) = match &cfg.tls {
        Some(files) => (
            Some(files.client_config()?),
            Some(files.api_server_config()?),
        ),
        None => (None, None),
    };
    let coord = service::Coordinator::new(
        st,
        service::ServiceConfig {
            cluster_token: cfg.auth.token().cloned(),
            tls: client_tls,
            images_dir: cfg.images_dir.clone(),
            max_migrations_per_host: cfg.max_migrations_per_host,
            max_migrations_per_site: cfg.max_migrations_per_site,
        },
    )?;
    let listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.api,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::Serve)?;
    // Unfinished migrations get their executors (and cancel controls) before the API
    // answers its first call when this process leads from the start (RocksDB); with
    // etcd, whenever the election makes it the leader.
    if coord.is_leader() {
        match coord.recover() {
            Ok(0) => {}
            Ok(n) => tracing::info!(migrations = n, "driving unfinished migrations again"),
            Err(e) => tracing::error!(error = %e, "cannot read the migration journal"),
        }
    }
    tokio::spawn(Arc::clone(&coord).follow_role());
    tokio::spawn(Arc::clone(&coord).poll_hosts());
    let scheme = if server_tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("coord: api listening on {bound}");
    tracing::info!(%bound, scheme, "coordinator serving");
    let app = api::router(Arc::clone(&coord), Arc::new(cfg.auth), cfg.name.clone());
    stagehand_common::http::serve(listener, app, server_tls, shutdown)
        .await
        .map_err(ServeError::Serve)?;
    coord.shutdown.cancel();
    Ok(())
}
