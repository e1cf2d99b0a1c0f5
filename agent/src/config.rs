//! Agent configuration: command-line flags over an optional TOML file (`--config`).
//! Every flag has a TOML key of the same name with `_` for `-`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use stagehand_common::auth::{ApiAuth, AuthError};
use stagehand_common::tls::{TlsError, TlsFiles};

pub const DEFAULT_API: &str = "127.0.0.1:7071";
/// `--data-dir` when none is given.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/stagehand-agent";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid address {value:?} for {key}: {source}")]
    Addr {
        key: &'static str,
        value: String,
        source: std::net::AddrParseError,
    },
}

/// Flags of `stagehand-agent` (the daemon). All optional: unset flags fall back to the
/// config file, then to defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentFlags {
    /// HTTP API listen address (default 127.0.0.1:7071; port 0 picks a free port).
    #[arg(long)]
    pub api: Option<String>,
    /// Migration stream listen address (used by live migration).
    #[arg(long)]
    pub migration_listen: Option<String>,
    /// This host's identifier (default: the hostname).
    #[arg(long)]
    pub host_id: Option<String>,
    /// Directory for the agent's state. Memory dumps must be written under it.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Guest images (`boot.flat_binary`) must be under this directory (default
    /// `<data-dir>/images`, created on start).
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// Bearer token required on the API (and by migration peers).
    #[arg(long, env = "STAGEHAND_AGENT_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// File holding the bearer token (first line).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// Serve the API without authentication (and accept no token-proved migration
    /// peers). Without a token and without this flag the agent refuses to start.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// This agent's certificate (PEM): with --tls-key and --tls-ca, the API is HTTPS
    /// and migration streams (in and out) are TLS with client certificates.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) peers' certificates must be signed by.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Guest memory this host offers, MiB (reported by `GET /v1/host`; default: the
    /// host's MemTotal minus 1 GiB for itself, at least a quarter of it).
    #[arg(long)]
    pub memory_for_guests_mib: Option<u64>,
    /// How often the agent samples each guest's CPU use and dirty-page rate, seconds
    /// (0: never; default 5). Each sample logs dirty pages for one second.
    #[arg(long)]
    pub sample_interval_s: Option<u64>,
    /// TEST ONLY: report this CPU fingerprint in `GET /v1/host` instead of the real
    /// one, so tests can fake a host with another CPU model. Never set it in
    /// production: the coordinator would place guests on a host that cannot run them
    /// (the target agent still refuses them at migration start).
    #[arg(long, hide = true)]
    pub test_cpu_fingerprint: Option<String>,
    /// TOML file with any of the above (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    api: Option<String>,
    #[serde(alias = "migration_listen")]
    migration_listen: Option<String>,
    #[serde(alias = "host_id")]
    host_id: Option<String>,
    #[serde(alias = "data_dir")]
    data_dir: Option<PathBuf>,
    #[serde(alias = "images_dir")]
    images_dir: Option<PathBuf>,
    #[serde(alias = "api_token")]
    api_token: Option<String>,
    #[serde(alias = "api_token_file")]
    api_token_file: Option<PathBuf>,
    #[serde(alias = "insecure_no_auth")]
    insecure_no_auth: Option<bool>,
    #[serde(alias = "tls_cert")]
    tls_cert: Option<PathBuf>,
    #[serde(alias = "tls_key")]
    tls_key: Option<PathBuf>,
    #[serde(alias = "tls_ca")]
    tls_ca: Option<PathBuf>,
    #[serde(alias = "memory_for_guests_mib")]
    memory_for_guests_mib: Option<u64>,
    #[serde(alias = "sample_interval_s")]
    sample_interval_s: Option<u64>,
    #[serde(alias = "test_cpu_fingerprint")]
    test_cpu_fingerprint: Option<String>,
}

/// The resolved configuration `run` works from.
#[derive(Clone)]
pub struct AgentConfig {
    pub api: SocketAddr,
    /// Where the migration listener binds (None: no listener).
    pub migration_listen: Option<SocketAddr>,
    pub host_id: String,
    pub data_dir: PathBuf,
    /// Where `boot.flat_binary` may point (`--images-dir`, default `<data-dir>/images`).
    pub images_dir: PathBuf,
    /// How API callers authenticate; the token also proves migration peers.
    pub auth: ApiAuth,
    /// `--tls-*`: HTTPS API, TLS migration streams, `nbds://` disks.
    pub tls: Option<TlsFiles>,
    /// `--memory-for-guests-mib` (None: from MemTotal).
    pub memory_for_guests_mib: Option<u64>,
    /// `--sample-interval-s` (0: no sampling).
    pub sample_interval_s: u64,
    /// `--test-cpu-fingerprint` (tests only).
    pub test_cpu_fingerprint: Option<String>,
}

impl std::fmt::Debug for AgentConfig {
    // The token is a secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("api", &self.api)
            .field("migration_listen", &self.migration_listen)
            .field("host_id", &self.host_id)
            .field("data_dir", &self.data_dir)
            .field("images_dir", &self.images_dir)
            // ApiAuth's Debug redacts the token.
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .finish()
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|source| ConfigError::Addr {
        key,
        value: value.to_string(),
        source,
    })
}

fn default_host_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl AgentConfig {
    /// Flags over the file given by `--config`, over defaults.
    pub fn resolve(flags: AgentFlags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let api = flags.api.or(file.api).unwrap_or_else(|| DEFAULT_API.into());
        let migration_listen = flags.migration_listen.or(file.migration_listen);
        let token_file = flags.api_token_file.or(file.api_token_file);
        let token = flags.api_token.or(file.api_token);
        let auth = ApiAuth::from_flags(
            token.as_deref(),
            token_file.as_deref(),
            flags.insecure_no_auth || file.insecure_no_auth.unwrap_or(false),
            "stagehand-agent",
        )?;
        let tls = TlsFiles::from_flags(
            flags.tls_cert.or(file.tls_cert).as_deref(),
            flags.tls_key.or(file.tls_key).as_deref(),
            flags.tls_ca.or(file.tls_ca).as_deref(),
        )?;
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let images_dir = flags
            .images_dir
            .or(file.images_dir)
            .unwrap_or_else(|| data_dir.join("images"));
        Ok(AgentConfig {
            api: parse_addr("api", &api)?,
            migration_listen: migration_listen
                .map(|a| parse_addr("migration-listen", &a))
                .transpose()?,
            host_id: flags
                .host_id
                .or(file.host_id)
                .unwrap_or_else(default_host_id),
            data_dir,
            images_dir,
            auth,
            tls,
            memory_for_guests_mib: flags.memory_for_guests_mib.or(file.memory_for_guests_mib),
            sample_interval_s: flags
                .sample_interval_s
                .or(file.sample_interval_s)
                .unwrap_or(5),
            test_cpu_fingerprint: flags.test_cpu_fingerprint.or(file.test_cpu_fingerprint),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_token_file_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").expect("write token");
        let cfg = dir.path().join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "api = \"127.0.0.1:9000\"\nmigration-listen = \"127.0.0.1:9001\"\nhost-id = \"h1\"\napi-token-file = {:?}\n",
                token.display().to_string()
            ),
        )
        .expect("write config");
        let c = AgentConfig::resolve(AgentFlags {
            api: Some("127.0.0.1:0".into()),
            config: Some(cfg),
            ..Default::default()
        })
        .expect("resolves");
        assert_eq!(c.api, "127.0.0.1:0".parse().expect("addr"));
        assert_eq!(
            c.migration_listen,
            Some("127.0.0.1:9001".parse().expect("addr"))
        );
        assert_eq!(c.host_id, "h1");
        assert_eq!(c.auth.token().map(|t| t.expose()), Some("s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "token leaked into Debug"
        );
    }

    #[test]
    fn bad_inputs_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, "bogus = 1\n").expect("write");
        assert!(matches!(
            AgentConfig::resolve(AgentFlags {
                config: Some(cfg),
                ..Default::default()
            }),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            AgentConfig::resolve(AgentFlags {
                api: Some("nope".into()),
                insecure_no_auth: true,
                ..Default::default()
            }),
            Err(ConfigError::Addr { .. })
        ));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        assert!(matches!(
            AgentConfig::resolve(AgentFlags {
                api_token_file: Some(empty),
                ..Default::default()
            }),
            Err(ConfigError::Auth(_))
        ));
        // Secure by default: no token and no opt-out is refused.
        assert!(matches!(
            AgentConfig::resolve(AgentFlags::default()),
            Err(ConfigError::Auth(AuthError::NoToken))
        ));
        assert!(matches!(
            AgentConfig::resolve(AgentFlags {
                insecure_no_auth: true,
                ..Default::default()
            })
            .map(|c| c.auth),
            Ok(ApiAuth::InsecureNoAuth)
        ));
    }
}
