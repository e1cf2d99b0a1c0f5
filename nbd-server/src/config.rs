//! Configuration: command-line flags, an optional TOML file, and their merge
//! (a flag given on the command line wins over the file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use thiserror::Error;

use stagehand_common::auth::{ApiAuth, AuthError};
use stagehand_common::tls::{TlsError, TlsFiles};

use crate::export::{ExportError, ExportSpec};
use crate::io::EngineKind;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Command-line flags of `stagehand-nbd`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "stagehand-nbd",
    version,
    about = "Stagehand storage node: NBD server"
)]
pub struct Args {
    /// TOML file in which every flag below can also be set.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NBD over TCP (default 127.0.0.1:10809; port 0 picks a free port; "none" disables TCP).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// NBD over a Unix socket.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Export NAME=PATH[,ro][,unleased][,lease-reads]; repeatable. `lease-reads`:
    /// a plain NAME (no lease token) is refused instead of opened read-only.
    #[arg(
        long = "export",
        value_name = "NAME=PATH[,ro][,unleased][,lease-reads]"
    )]
    pub exports: Vec<String>,
    /// I/O backend: auto (io_uring when the kernel has it), uring or threads.
    #[arg(long, value_enum)]
    pub io_engine: Option<EngineKind>,
    /// Durable state (leases, bitmaps): used by the lease and control features.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP control API address (served by the control API feature).
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<String>,
    /// Most NBD connections served at once.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Threads serving NBD connections (default: one per CPU). Each connection stays
    /// on one thread; new connections go to the least-loaded one.
    #[arg(long, value_name = "N")]
    pub data_threads: Option<usize>,
    /// Bearer token the control API requires (prefer --api-token-file: flags show in ps).
    #[arg(long, value_name = "TOKEN")]
    pub api_token: Option<String>,
    /// File whose first line is the control API's bearer token.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Directory under which exports added through the API may live (repeatable).
    /// Default: <data-dir>/exports (created on demand) when --data-dir is set.
    #[arg(long = "export-root", value_name = "DIR")]
    pub export_roots: Vec<PathBuf>,
    /// Block device the API may export (repeatable); no other block device may be.
    #[arg(long = "allow-device", value_name = "PATH")]
    pub allow_devices: Vec<PathBuf>,
    /// This node's TLS certificate (PEM). With --tls-key and --tls-ca: NBD clients
    /// must switch to TLS (NBD_OPT_STARTTLS) and present a certificate signed by
    /// the CA, and the control API is served over HTTPS.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) that clients' certificates must be signed by.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Dirty bitmaps: regions (4 MiB each) of the activity log. After a crash at
    /// most this many regions are over-reported as dirty; fewer regions cost more
    /// fdatasyncs under scattered writes. Default 256 (1 GiB).
    #[arg(long, value_name = "N")]
    pub bitmap_al_regions: Option<usize>,
    /// Plain (non-TLS) targets mirror jobs may push exports to, repeatable or
    /// comma-separated: an IP network (10.0.2.0/24), an address, a host[:port],
    /// `unix` (Unix sockets) or `any`. Targets reached over TLS are checked against
    /// --tls-ca instead and always allowed. Default: none.
    #[arg(long = "mirror-allow", value_name = "RULE")]
    pub mirror_allow: Vec<String>,
    /// Serve the control API WITHOUT authentication (on purpose; without a token and
    /// without this flag the server refuses to start).
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// The TOML file: the same keys as the flags, plus `[[exports]]` tables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<String>,
    pub unix: Option<PathBuf>,
    /// Same syntax as `--export`.
    #[serde(default)]
    pub export: Vec<String>,
    #[serde(default)]
    pub exports: Vec<ExportSpec>,
    pub io_engine: Option<EngineKind>,
    pub data_dir: Option<PathBuf>,
    pub api: Option<String>,
    pub max_connections: Option<usize>,
    pub data_threads: Option<usize>,
    pub api_token: Option<String>,
    pub api_token_file: Option<PathBuf>,
    pub insecure_no_auth: Option<bool>,
    #[serde(default)]
    pub export_roots: Vec<PathBuf>,
    #[serde(default)]
    pub allow_devices: Vec<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub bitmap_al_regions: Option<usize>,
    #[serde(default)]
    pub mirror_allow: Vec<String>,
}

/// The resolved configuration the server runs with. `Debug` never shows the API
/// token ([`ApiAuth`] redacts it; configurations end up in logs).
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub exports: Vec<ExportSpec>,
    pub io_engine: EngineKind,
    pub data_dir: Option<PathBuf>,
    pub api: Option<String>,
    pub max_connections: usize,
    /// Data-plane threads (see [`crate::dataplane`]).
    pub data_threads: usize,
    /// Where API-added exports may live (see [`crate::control::Confinement`]).
    pub export_roots: Vec<PathBuf>,
    pub allow_devices: Vec<PathBuf>,
    /// TLS on the NBD listeners (required) and the control API (HTTPS).
    pub tls: Option<TlsFiles>,
    /// How the control API authenticates callers (`--api-token[-file]` or
    /// `--insecure-no-auth`; one of them is required to start).
    pub auth: ApiAuth,
    /// Activity-log regions of every dirty bitmap (see [`crate::bitmap`]).
    pub bitmap_al_regions: usize,
    /// Plain targets mirror jobs may push to (see [`crate::mirror::allow`]).
    pub mirror_allow: crate::mirror::MirrorAllow,
}

/// Connections served at once unless `--max-connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("bad listen address {0:?}")]
    Listen(String),
    #[error("{0}")]
    MirrorAllow(String),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("export {0:?} is configured twice")]
    DuplicateExport(String),
    #[error("nothing to listen on: give --listen or --unix")]
    NoListener,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Config {
    /// Resolves flags over the optional TOML file.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => Self::read_file(p)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            source: Box::new(e),
        })
    }

    pub fn merge(args: Args, file: FileConfig) -> Result<Self, ConfigError> {
        let listen = match args.listen.or(file.listen) {
            None => DEFAULT_LISTEN.parse().ok(),
            Some(s) if s == "none" => None,
            Some(s) => Some(s.parse().map_err(|_| ConfigError::Listen(s))?),
        };
        let unix = args.unix.or(file.unix);
        if listen.is_none() && unix.is_none() {
            return Err(ConfigError::NoListener);
        }
        let mut exports = file.exports;
        for s in file.export.iter().chain(args.exports.iter()) {
            exports.push(s.parse()?);
        }
        let mut names = std::collections::HashSet::new();
        for e in &exports {
            e.validate()?;
            if !names.insert(e.name.clone()) {
                return Err(ConfigError::DuplicateExport(e.name.clone()));
            }
        }
        let api = args.api.or(file.api);
        let token = args.api_token.or(file.api_token);
        let token_file = args.api_token_file.or(file.api_token_file);
        let insecure = args.insecure_no_auth || file.insecure_no_auth.unwrap_or(false);
        // Without --api there is no API to protect (a quick `--export` server); any
        // auth flag given is still checked.
        let auth = if api.is_none() && token.is_none() && token_file.is_none() && !insecure {
            ApiAuth::InsecureNoAuth
        } else {
            ApiAuth::from_flags(
                token.as_deref(),
                token_file.as_deref(),
                insecure,
                "stagehand-nbd",
            )?
        };
        let data_dir = args.data_dir.or(file.data_dir);
        let mut export_roots = if args.export_roots.is_empty() {
            file.export_roots
        } else {
            args.export_roots
        };
        if export_roots.is_empty()
            && let Some(d) = &data_dir
        {
            export_roots.push(d.join("exports"));
        }
        let allow_devices = if args.allow_devices.is_empty() {
            file.allow_devices
        } else {
            args.allow_devices
        };
        let mirror_allow = crate::mirror::MirrorAllow::parse(if args.mirror_allow.is_empty() {
            &file.mirror_allow
        } else {
            &args.mirror_allow
        })
        .map_err(ConfigError::MirrorAllow)?;
        let tls = TlsFiles::from_flags(
            args.tls_cert.or(file.tls_cert).as_deref(),
            args.tls_key.or(file.tls_key).as_deref(),
            args.tls_ca.or(file.tls_ca).as_deref(),
        )?;
        Ok(Self {
            listen,
            tls,
            export_roots,
            allow_devices,
            unix,
            exports,
            io_engine: args
                .io_engine
                .or(file.io_engine)
                .unwrap_or(EngineKind::Auto),
            data_dir,
            bitmap_al_regions: args
                .bitmap_al_regions
                .or(file.bitmap_al_regions)
                .unwrap_or(crate::bitmap::DEFAULT_AL_REGIONS)
                .clamp(1, crate::bitmap::MAX_AL_REGIONS),
            mirror_allow,
            api,
            auth,
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                .max(1),
            data_threads: args
                .data_threads
                .or(file.data_threads)
                .unwrap_or_else(crate::dataplane::default_threads)
                .max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags with an API token (without one the server does not start).
    fn authed() -> Args {
        Args {
            api_token: Some("t".into()),
            ..Args::default()
        }
    }

    #[test]
    fn debug_hides_the_api_token() {
        let args = Args {
            api_token: Some("s3cret-token".into()),
            ..Args::default()
        };
        let c = Config::merge(args, FileConfig::default()).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:1"
            unix = "/tmp/s.sock"
            export = ["a=/a.img,ro"]
            io-engine = "threads"
            max-connections = 7
            data-threads = 3
            [[exports]]
            name = "b"
            path = "/b.img"
            unleased = true
            [[exports]]
            name = "d"
            path = "/d.img"
            lease_reads = true
            "#,
        )
        .unwrap();
        let args = Args {
            listen: Some("127.0.0.1:2".into()),
            exports: vec!["c=/c.img".into()],
            ..authed()
        };
        let c = Config::merge(args, file).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(c.unix, Some(PathBuf::from("/tmp/s.sock")));
        assert_eq!(c.io_engine, EngineKind::Threads);
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.data_threads, 3);
        let names: Vec<_> = c.exports.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "d", "a", "c"]);
        assert!(c.exports[2].read_only);
        assert!(c.exports[0].unleased);
        assert!(c.exports[1].lease_reads && !c.exports[3].lease_reads);
    }

    #[test]
    fn defaults_and_errors() {
        let c = Config::merge(authed(), FileConfig::default()).unwrap();
        assert_eq!(c.listen, Some(DEFAULT_LISTEN.parse().unwrap()));
        assert!(c.data_threads >= 1);
        let none = Args {
            listen: Some("none".into()),
            ..authed()
        };
        assert!(matches!(
            Config::merge(none, FileConfig::default()),
            Err(ConfigError::NoListener)
        ));
        let dup = Args {
            exports: vec!["a=/x".into(), "a=/y".into()],
            ..authed()
        };
        assert!(matches!(
            Config::merge(dup, FileConfig::default()),
            Err(ConfigError::DuplicateExport(_))
        ));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        // From TOML, lease_reads on an unleased export is refused at start too.
        let mut spec: ExportSpec = "u=/u,unleased".parse().unwrap();
        spec.lease_reads = true;
        let mut both = FileConfig::default();
        both.exports.push(spec);
        assert!(matches!(
            Config::merge(authed(), both),
            Err(ConfigError::Export(ExportError::LeaseReadsUnleased(_)))
        ));
    }

    #[test]
    fn no_token_refuses_to_start_unless_opted_out() {
        // No API at all: nothing to authenticate, the server starts.
        Config::merge(Args::default(), FileConfig::default()).expect("no API, no token needed");
        let with_api = || Args {
            api: Some("127.0.0.1:0".into()),
            ..Args::default()
        };
        let e = Config::merge(with_api(), FileConfig::default()).unwrap_err();
        assert!(matches!(e, ConfigError::Auth(AuthError::NoToken)), "{e}");
        assert!(e.to_string().contains("--insecure-no-auth"), "{e}");
        let open = Args {
            insecure_no_auth: true,
            ..with_api()
        };
        let c = Config::merge(open, FileConfig::default()).unwrap();
        assert!(matches!(c.auth, ApiAuth::InsecureNoAuth));
        let file: FileConfig = toml::from_str("insecure-no-auth = true").unwrap();
        let c = Config::merge(Args::default(), file).unwrap();
        assert!(matches!(c.auth, ApiAuth::InsecureNoAuth));
    }

    #[test]
    fn toml_keys_of_auth_confinement_and_tls() {
        let file: FileConfig = toml::from_str(
            r#"
            api-token-file = "/etc/stagehand/api-token"
            export-roots = ["/srv/disks"]
            allow-devices = ["/dev/vdb"]
            tls-cert = "/t/server-cert.pem"
            tls-key = "/t/server-key.pem"
            tls-ca = "/t/ca-cert.pem"
            "#,
        )
        .unwrap();
        assert_eq!(file.export_roots, [PathBuf::from("/srv/disks")]);
        let c = Config::merge(Args::default(), file).unwrap_err();
        // The token file does not exist: the error names it.
        assert!(c.to_string().contains("/etc/stagehand/api-token"), "{c}");
        let mut half: FileConfig = toml::from_str("tls-cert = \"/t/c.pem\"").unwrap();
        half.insecure_no_auth = Some(true);
        assert!(matches!(
            Config::merge(Args::default(), half),
            Err(ConfigError::Tls(_))
        ));
    }

    #[test]
    fn export_roots_default_to_the_data_dir() {
        let c = Config::merge(authed(), FileConfig::default()).unwrap();
        assert!(c.export_roots.is_empty());
        let with_data = Args {
            data_dir: Some("/var/lib/n".into()),
            ..authed()
        };
        let c = Config::merge(with_data.clone(), FileConfig::default()).unwrap();
        assert_eq!(c.export_roots, [PathBuf::from("/var/lib/n/exports")]);
        let file: FileConfig =
            toml::from_str("export-roots = [\"/srv/a\"]\nallow-devices = [\"/dev/vdb\"]").unwrap();
        let c = Config::merge(with_data.clone(), file.clone()).unwrap();
        assert_eq!(c.export_roots, [PathBuf::from("/srv/a")]);
        assert_eq!(c.allow_devices, [PathBuf::from("/dev/vdb")]);
        let flags = Args {
            export_roots: vec!["/srv/b".into(), "/srv/c".into()],
            ..with_data
        };
        let c = Config::merge(flags, file).unwrap();
        assert_eq!(c.export_roots.len(), 2);
    }
}
