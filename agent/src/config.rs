//! Agent configuration: command-line flags over an optional TOML file (`--config`).
//! Every flag has a TOML key of the same name with `_` for `-`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub const DEFAULT_API: &str = "127.0.0.1:7071";

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
    #[error("cannot read the API token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API token file {0} is empty")]
    EmptyToken(PathBuf),
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
    /// Directory for the agent's state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Bearer token required on the API (and by migration peers).
    #[arg(long, env = "STAGEHAND_AGENT_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// File holding the bearer token (first line).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
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
    #[serde(alias = "api_token")]
    api_token: Option<String>,
    #[serde(alias = "api_token_file")]
    api_token_file: Option<PathBuf>,
}

/// The resolved configuration `run` works from.
#[derive(Clone)]
pub struct AgentConfig {
    pub api: SocketAddr,
    /// Where the migration listener binds (None: no listener).
    pub migration_listen: Option<SocketAddr>,
    pub host_id: String,
    pub data_dir: PathBuf,
    /// None: the API is open (loopback development only).
    pub api_token: Option<String>,
}

impl std::fmt::Debug for AgentConfig {
    // The token is a secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("api", &self.api)
            .field("migration_listen", &self.migration_listen)
            .field("host_id", &self.host_id)
            .field("data_dir", &self.data_dir)
            .field("api_token", &self.api_token.as_ref().map(|_| "<set>"))
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
        let api_token = match (flags.api_token.or(file.api_token), token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(&path).map_err(|source| ConfigError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                let token = text.lines().next().unwrap_or("").trim().to_string();
                if token.is_empty() {
                    return Err(ConfigError::EmptyToken(path));
                }
                Some(token)
            }
            (None, None) => None,
        };
        Ok(AgentConfig {
            api: parse_addr("api", &api)?,
            migration_listen: migration_listen
                .map(|a| parse_addr("migration-listen", &a))
                .transpose()?,
            host_id: flags
                .host_id
                .or(file.host_id)
                .unwrap_or_else(default_host_id),
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/stagehand-agent")),
            api_token,
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
        assert_eq!(c.api_token.as_deref(), Some("s3cret"));
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
            Err(ConfigError::EmptyToken(_))
        ));
    }
}
