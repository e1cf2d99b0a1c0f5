//! `coord serve` configuration: a TOML file (`--config`) with flags that override it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

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
    #[error("the token file {0} is empty")]
    EmptyToken(PathBuf),
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
    /// Concurrent migrations each host may take part in (default 2, as KubeVirt).
    #[arg(long, value_name = "N")]
    pub max_migrations_per_host: Option<usize>,
    /// Concurrent migrations each site may take part in, in or out (default 4).
    #[arg(long, value_name = "N")]
    pub max_migrations_per_site: Option<usize>,
    /// TOML file with the same keys (api, data_dir, api_token, api_token_file, ...).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    api: Option<String>,
    data_dir: Option<PathBuf>,
    api_token: Option<String>,
    api_token_file: Option<PathBuf>,
    max_migrations_per_host: Option<usize>,
    max_migrations_per_site: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    pub api_token: Option<String>,
    pub max_migrations_per_host: usize,
    pub max_migrations_per_site: usize,
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
        let api = api.parse().map_err(|_| ConfigError::BadAddr(api.clone()))?;
        let token_file = self.api_token_file.or(file.api_token_file);
        let api_token = match (self.api_token.or(file.api_token), token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let t = text.lines().next().unwrap_or("").trim().to_owned();
                if t.is_empty() {
                    return Err(ConfigError::EmptyToken(path));
                }
                Some(t)
            }
            (None, None) => None,
        };
        Ok(ServeConfig {
            api,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("coord-data")),
            api_token,
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
            "api = \"127.0.0.1:9\"\napi_token = \"file\"\nmax_migrations_per_host = 4\nmax_migrations_per_site = 3\n",
        )
        .unwrap();
        let flags = ServeFlags {
            api: Some("127.0.0.1:7".into()),
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let c = flags.resolve().unwrap();
        assert_eq!(c.api.port(), 7);
        assert_eq!(c.api_token.as_deref(), Some("file"));
        assert_eq!(c.max_migrations_per_host, 4);
        assert_eq!(c.max_migrations_per_site, 3);
        std::fs::write(&cfg, "bogus = 1\n").unwrap();
        let flags = ServeFlags {
            config: Some(cfg),
            ..Default::default()
        };
        assert!(matches!(flags.resolve(), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn token_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "  secret \nignored\n").unwrap();
        let c = ServeFlags {
            api_token_file: Some(f.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.api_token.as_deref(), Some("secret"));
        std::fs::write(&f, "\n").unwrap();
        let e = ServeFlags {
            api_token_file: Some(f),
            ..Default::default()
        }
        .resolve();
        assert!(matches!(e, Err(ConfigError::EmptyToken(_))));
    }
}
