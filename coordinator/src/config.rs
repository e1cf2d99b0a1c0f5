//! `coord serve` configuration: a TOML file (`--config`) with flags that override it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use stagehand_common::auth::{ApiAuth, AuthError};
use stagehand_common::tls::{TlsError, TlsFiles};

use crate::store::StoreError;
use crate::store::etcd::{EtcdConfig, EtcdTls};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid coordinator config: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("--api {0:?} is not HOST:PORT")]
    BadAddr(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(StoreError),
    #[error("--advertise {0:?} is not an http:// or https:// URL")]
    BadAdvertise(String),
}

/// Flags of `coord serve`; each can also be set in the TOML file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeFlags {
    /// HTTP API listener (default 127.0.0.1:7070).
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<String>,
    /// Directory of the coordinator's RocksDB state (default ./coord-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cluster token: required from API clients, and sent to daemons added without their own.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "STAGEHAND_COORD_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,
    /// Read the cluster token from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Serve the API without authentication (and call daemons without a token). Only
    /// on purpose: without a token and without this flag `coord serve` refuses to start.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// This coordinator's certificate (PEM): the API is served over HTTPS and daemons
    /// are called with it as the client certificate. With --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): daemons called over https must present a certificate it signed.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Where `--disk-image` files must be (default <data-dir>/images).
    #[arg(long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// Concurrent migrations each host may take part in (default 2, as KubeVirt).
    #[arg(long, value_name = "N")]
    pub max_migrations_per_host: Option<usize>,
    /// Concurrent migrations each site may take part in, in or out (default 4).
    #[arg(long, value_name = "N")]
    pub max_migrations_per_site: Option<usize>,
    /// The state store: etcd://HOST:PORT[,HOST:PORT...] to share state with other
    /// `coord serve` processes (one leads by etcd election, the others forward writes
    /// to it). Default: RocksDB in --data-dir.
    #[arg(long, value_name = "URI")]
    pub store: Option<String>,
    /// etcd's CA (PEM): talk to etcd over TLS, verifying its members against it.
    #[arg(long, value_name = "FILE")]
    pub store_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate auth; with --store-key.
    #[arg(long, value_name = "FILE")]
    pub store_cert: Option<PathBuf>,
    /// The private key of --store-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub store_key: Option<PathBuf>,
    /// This coordinator's name in the election and `coord status` (default
    /// HOSTNAME:PORT).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The URL other coordinators forward writes to (default http(s)://--api).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Seconds of the leader's etcd lease: a dead leader is replaced after about this
    /// long (default 2).
    #[arg(long, value_name = "SECS")]
    pub election_ttl: Option<u64>,
    /// TOML file with the same keys, spelled like the flags (api, data-dir,
    /// api-token-file, tls-cert, ...).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    api: Option<String>,
    #[serde(alias = "data_dir")]
    data_dir: Option<PathBuf>,
    #[serde(alias = "api_token")]
    api_token: Option<String>,
    #[serde(alias = "api_token_file")]
    api_token_file: Option<PathBuf>,
    #[serde(default)]
    insecure_no_auth: bool,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    images_dir: Option<PathBuf>,
    #[serde(alias = "max_migrations_per_host")]
    max_migrations_per_host: Option<usize>,
    #[serde(alias = "max_migrations_per_site")]
    max_migrations_per_site: Option<usize>,
    store: Option<String>,
    store_ca: Option<PathBuf>,
    store_cert: Option<PathBuf>,
    store_key: Option<PathBuf>,
    name: Option<String>,
    advertise: Option<String>,
    election_ttl: Option<u64>,
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// RocksDB in `data_dir` (the default).
    Rocks,
    Etcd(EtcdConfig),
}

/// `--store` and its TLS files, also used by `coord lease-tokens`.
pub fn store_config(
    uri: Option<&str>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<StoreConfig, ConfigError> {
    let tls = match (ca, cert, key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => Some(EtcdTls { ca, cert, key }),
        _ => {
            return Err(ConfigError::Store(StoreError::BadUri(
                "--store-cert/--store-key need --store-ca (etcd's CA)".into(),
            )));
        }
    };
    match uri {
        None | Some("" | "rocksdb") => {
            if tls.is_some() {
                return Err(ConfigError::Store(StoreError::BadUri(
                    "--store-ca/--store-cert/--store-key apply to --store etcd://... only".into(),
                )));
            }
            Ok(StoreConfig::Rocks)
        }
        Some(u) => Ok(StoreConfig::Etcd(
            EtcdConfig::parse(u, tls).map_err(ConfigError::Store)?,
        )),
    }
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    /// How API callers authenticate; its token is also sent to daemons added without
    /// their own.
    pub auth: ApiAuth,
    pub tls: Option<TlsFiles>,
    pub images_dir: PathBuf,
    pub max_migrations_per_host: usize,
    pub max_migrations_per_site: usize,
    pub store: StoreConfig,
    /// This coordinator's name (election, status).
    pub name: String,
    /// Where followers forward writes to reach this coordinator.
    pub advertise: String,
    pub election_ttl: std::time::Duration,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coord".into())
}

impl ServeFlags {
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let api = self
            .api
            .or(file.api)
            .unwrap_or_else(|| "127.0.0.1:7070".to_owned());
        let api: SocketAddr = api.parse().map_err(|_| ConfigError::BadAddr(api.clone()))?;
        let token = self.api_token.or(file.api_token);
        let token_file = self.api_token_file.or(file.api_token_file);
        let auth = ApiAuth::from_flags(
            token.as_deref(),
            token_file.as_deref(),
            self.insecure_no_auth || file.insecure_no_auth,
            "coord",
        )?;
        let tls = TlsFiles::from_flags(
            self.tls_cert.or(file.tls_cert).as_deref(),
            self.tls_key.or(file.tls_key).as_deref(),
            self.tls_ca.or(file.tls_ca).as_deref(),
        )?;
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("coord-data"));
        let images_dir = self
            .images_dir
            .or(file.images_dir)
            .unwrap_or_else(|| data_dir.join("images"));
        let store = store_config(
            self.store.or(file.store).as_deref(),
            self.store_ca.or(file.store_ca),
            self.store_cert.or(file.store_cert),
            self.store_key.or(file.store_key),
        )?;
        let name = self
            .name
            .or(file.name)
            .unwrap_or_else(|| format!("{}:{}", hostname(), api.port()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let advertise = self
            .advertise
            .or(file.advertise)
            .unwrap_or_else(|| format!("{scheme}://{api}"));
        if !(advertise.starts_with("http://") || advertise.starts_with("https://")) {
            return Err(ConfigError::BadAdvertise(advertise));
        }
        let election_ttl = std::time::Duration::from_secs(
            self.election_ttl
                .or(file.election_ttl)
                .unwrap_or(2)
                .clamp(1, 60),
        );
        Ok(ServeConfig {
            store,
            name,
            advertise,
            election_ttl,
            api,
            data_dir,
            auth,
            tls,
            images_dir,
            max_migrations_per_host: self
                .max_migrations_per_host
                .or(file.max_migrations_per_host)
                .unwrap_or(2)
                .max(1),
            max_migrations_per_site: self
                .max_migrations_per_site
                .or(file.max_migrations_per_site)
                .unwrap_or(4)
                .max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "api = \"127.0.0.1:9\"\napi-token = \"file\"\nmax-migrations-per-host = 4\nmax_migrations_per_site = 3\ndata-dir = \"/srv/coord\"\n",
        )
        .unwrap();
        let flags = ServeFlags {
            api: Some("127.0.0.1:7".into()),
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let c = flags.resolve().unwrap();
        assert_eq!(c.api.port(), 7);
        assert_eq!(c.auth.token().map(|t| t.expose()), Some("file"));
        assert_eq!(c.max_migrations_per_host, 4);
        assert_eq!(c.max_migrations_per_site, 3);
        assert_eq!(c.images_dir, PathBuf::from("/srv/coord/images"));
        std::fs::write(&cfg, "bogus = 1\n").unwrap();
        let flags = ServeFlags {
            config: Some(cfg),
            ..Default::default()
        };
        assert!(matches!(flags.resolve(), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn store_defaults_to_rocksdb_and_parses_etcd() {
        let c = ServeFlags {
            insecure_no_auth: true,
            api: Some("127.0.0.1:7071".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(matches!(c.store, StoreConfig::Rocks));
        assert_eq!(c.advertise, "http://127.0.0.1:7071");
        assert!(c.name.ends_with(":7071"));
        assert_eq!(c.election_ttl, std::time::Duration::from_secs(2));
        let c = ServeFlags {
            insecure_no_auth: true,
            store: Some("etcd://h1:2379,h2:2379,h3:2379".into()),
            store_ca: Some("/ca.pem".into()),
            name: Some("coord-1".into()),
            election_ttl: Some(5),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let StoreConfig::Etcd(e) = c.store else {
            panic!("etcd expected")
        };
        assert_eq!(e.endpoints.len(), 3);
        assert!(e.tls.is_some());
        assert_eq!(c.name, "coord-1");
        for (store, ca, cert) in [
            (Some("etcd:/h:1"), None, None),
            (None, Some("/ca.pem"), None),
            (Some("etcd://h:1"), None, Some("/c.pem")),
        ] {
            let r = ServeFlags {
                insecure_no_auth: true,
                store: store.map(Into::into),
                store_ca: ca.map(Into::into),
                store_cert: cert.map(Into::into),
                ..Default::default()
            }
            .resolve();
            assert!(matches!(r, Err(ConfigError::Store(_))), "{store:?}: {r:?}");
        }
        let r = ServeFlags {
            insecure_no_auth: true,
            advertise: Some("127.0.0.1:7070".into()),
            ..Default::default()
        }
        .resolve();
        assert!(matches!(r, Err(ConfigError::BadAdvertise(_))));
    }

    #[test]
    fn the_three_site_examples_parse() {
        for site in ["A", "B", "C"] {
            let path = format!(
                "{}/../deploy/three-site/coord-site{site}.toml",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let f: FileConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(f.store.is_some_and(|s| s.starts_with("etcd://")));
        }
    }

    #[test]
    fn no_token_refuses_to_start_unless_insecure() {
        let e = ServeFlags::default().resolve().unwrap_err();
        assert!(matches!(e, ConfigError::Auth(AuthError::NoToken)), "{e}");
        assert!(e.to_string().contains("--insecure-no-auth"));
        let c = ServeFlags {
            insecure_no_auth: true,
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(c.auth.token().is_none());
        assert!(c.tls.is_none());
    }

    #[test]
    fn token_file_first_line_and_tls_all_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "  secret \nignored\n").unwrap();
        let c = ServeFlags {
            api_token_file: Some(f.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.auth.token().map(|t| t.expose()), Some("secret"));
        assert!(!format!("{c:?}").contains("secret"));
        std::fs::write(&f, "\n").unwrap();
        let e = ServeFlags {
            api_token_file: Some(f.clone()),
            ..Default::default()
        }
        .resolve();
        assert!(matches!(e, Err(ConfigError::Auth(_))));
        let e = ServeFlags {
            insecure_no_auth: true,
            tls_cert: Some(f),
            ..Default::default()
        }
        .resolve();
        assert!(matches!(e, Err(ConfigError::Tls(_))));
    }
}
