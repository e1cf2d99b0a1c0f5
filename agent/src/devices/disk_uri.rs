//! NBD disks as the agent receives them: `{nbd, lease}` where `nbd` is
//! `nbd://HOST[:PORT]/EXPORT`, `nbds://HOST[:PORT]/EXPORT` (TLS) or
//! `nbd+unix:///EXPORT?socket=PATH`, and `lease` the write lease's token. The token
//! never travels in the URI: one with `;lease=` is refused ([`DiskError::LeaseInUri`]),
//! and the token goes to nbd-client's `ClientOptions::lease`, which builds the
//! `EXPORT;lease=TOKEN` name stagehand-nbd parses only on the way to the wire. [`DiskUri`] is not `Debug`; old URIs that
//! still carry a token are shown through [`redact_uri`].

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use nbd_client::{Client, ClientError, ClientOptions};
use stagehand_common::secret::Secret;

use crate::contract::DiskSpec;

/// The NBD port when a URI names none (IANA).
pub const DEFAULT_NBD_PORT: u16 = 10809;
const LEASE_MARK: &str = ";lease=";
const REDACTED: &str = "<redacted>";

/// Why a disk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("disk {0}: the URI carries ;lease=")]
    LeaseInUri(usize),
    #[error("disk {index}: {reason}")]
    Invalid { index: usize, reason: String },
}

/// Checks disks as an API request gives them: no token in a URI, every URI valid.
pub fn check_disks(disks: &[DiskSpec]) -> Result<(), DiskError> {
    for (index, d) in disks.iter().enumerate() {
        if d.nbd.contains(LEASE_MARK) {
            return Err(DiskError::LeaseInUri(index));
        }
        DiskUri::new(d).map_err(|reason| DiskError::Invalid { index, reason })?;
    }
    Ok(())
}

/// The agent's TLS client configuration for `nbds://` disks (set once at start from
/// `--tls-*`).
static TLS_CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Sets the TLS client configuration `nbds://` disks connect with.
pub fn set_tls_client(cfg: Arc<rustls::ClientConfig>) {
    let _ = TLS_CLIENT.set(cfg);
}

/// Whether `nbds://` disks have a TLS client configuration.
pub fn tls_configured() -> bool {
    TLS_CLIENT.get().is_some()
}

/// Where a disk lives. Deliberately not `Debug`: it holds the lease token.
#[derive(Clone, PartialEq, Eq)]
pub struct DiskUri {
    /// The URI as given (no token in it).
    pub uri: String,
    pub target: Target,
    /// The export name, without any lease.
    pub export: String,
    /// `nbds://`: the connection is TLS (the agent's client configuration).
    pub tls: bool,
    lease: Option<Secret>,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// `HOST:PORT`, as `tokio::net::TcpStream::connect` takes it.
    Tcp(String),
    Unix(PathBuf),
}

/// `uri` with any lease token replaced by `<redacted>`: safe for logs and answers.
pub fn redact_uri(uri: &str) -> String {
    let Some(at) = uri.find(LEASE_MARK) else {
        return uri.to_string();
    };
    let start = at + LEASE_MARK.len();
    let end = uri[start..]
        .find(['?', '&', '#', ';', '/'])
        .map_or(uri.len(), |i| start + i);
    format!("{}{REDACTED}{}", &uri[..start], &uri[end..])
}

impl DiskUri {
    /// A disk from its API shape. A URI with `;lease=` is refused.
    pub fn new(d: &DiskSpec) -> Result<Self, String> {
        if d.nbd.contains(LEASE_MARK) {
            return Err("the URI carries ;lease=; put the token in the lease field".into());
        }
        let mut u = Self::parse(&d.nbd)?;
        u.lease = d.lease.clone();
        Ok(u)
    }

    fn parse(uri: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("disk URI {:?} is not valid: {why}", redact_uri(uri));
        let (tls, tcp) = match (uri.strip_prefix("nbd://"), uri.strip_prefix("nbds://")) {
            (Some(r), _) => (false, Some(r)),
            (_, Some(r)) => (true, Some(r)),
            _ => (false, None),
        };
        if let Some(rest) = tcp {
            let (authority, export) = rest
                .split_once('/')
                .ok_or_else(|| bad("expected nbd://HOST[:PORT]/EXPORT"))?;
            if authority.is_empty() {
                return Err(bad("the host is missing"));
            }
            // A port is present when the text after the last ':' is outside any
            // IPv6 brackets.
            let has_port = match (authority.rfind(':'), authority.rfind(']')) {
                (Some(c), Some(b)) => c > b,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let addr = if has_port {
                let (_, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
                port.parse::<u16>()
                    .map_err(|_| bad("the port is not a number 0-65535"))?;
                authority.to_string()
            } else {
                format!("{authority}:{DEFAULT_NBD_PORT}")
            };
            if export.is_empty() || export.contains('?') {
                return Err(bad("expected an export name and no query"));
            }
            Ok(DiskUri {
                uri: uri.to_string(),
                target: Target::Tcp(addr),
                export: export.to_string(),
                tls,
                lease: None,
            })
        } else if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("the socket=PATH query is missing"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("the socket=PATH query is missing"))?;
            if export.is_empty() {
                return Err(bad("the export name is missing"));
            }
            Ok(DiskUri {
                uri: uri.to_string(),
                target: Target::Unix(PathBuf::from(socket)),
                export: export.to_string(),
                tls: false,
                lease: None,
            })
        } else {
            Err(bad(
                "use nbd://HOST:PORT/EXPORT, nbds://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ))
        }
    }

    /// Back to the API shape (the lease included: for the VM's spec).
    pub fn spec(&self) -> DiskSpec {
        DiskSpec {
            nbd: self.uri.clone(),
            lease: self.lease.clone(),
        }
    }

    /// The URI as shown to people (it carries no token; old ones are redacted).
    pub fn redacted(&self) -> String {
        redact_uri(&self.uri)
    }

    /// `text` with any copy of the token (a server may echo the export name) hidden.
    pub fn scrub(&self, text: &str) -> String {
        match &self.lease {
            Some(t) if !t.expose().is_empty() => text.replace(t.expose(), REDACTED),
            _ => text.to_string(),
        }
    }

    pub async fn connect(&self) -> Result<Client, ClientError> {
        let mut opts = ClientOptions::new(&self.export);
        if let Some(t) = &self.lease {
            opts = opts.lease(t);
        }
        match &self.target {
            Target::Tcp(addr) if self.tls => connect_tls(addr, opts).await,
            Target::Tcp(addr) => Client::connect_tcp(addr, opts).await,
            Target::Unix(path) => Client::connect_unix(path, opts).await,
        }
    }
}

/// `nbds://`: NBD over TLS (STARTTLS) with the agent's client configuration: the
/// storage node is checked against the cluster CA under its host name or address,
/// and the agent presents its own certificate.
async fn connect_tls(addr: &str, opts: ClientOptions) -> Result<Client, ClientError> {
    let Some(cfg) = TLS_CLIENT.get() else {
        return Err(ClientError::Io(std::io::Error::other(format!(
            "nbds://{addr}: this agent has no --tls-* configured"
        ))));
    };
    let name = stagehand_common::tls::server_name(addr)
        .map_err(|e| ClientError::Io(std::io::Error::other(e.to_string())))?;
    Client::connect_tcp(addr, opts.tls(Arc::clone(cfg), name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(nbd: &str, lease: Option<&str>) -> DiskSpec {
        DiskSpec {
            nbd: nbd.into(),
            lease: lease.map(|l| Secret::new(l).expect("token")),
        }
    }

    #[test]
    fn tcp_uris_parse_with_and_without_port() {
        let u = DiskUri::new(&disk("nbd://127.0.0.1:10900/d1", Some("abc"))).expect("valid");
        assert!(u.target == Target::Tcp("127.0.0.1:10900".into()));
        assert_eq!(u.export, "d1");
        assert_eq!(u.lease.as_ref().map(Secret::expose), Some("abc"));
        assert!(!u.tls);
        let u = DiskUri::parse("nbd://host/d1").expect("valid");
        assert!(u.target == Target::Tcp(format!("host:{DEFAULT_NBD_PORT}")));
        assert!(u.lease.is_none());
        let u = DiskUri::parse("nbd://[::1]/d1").expect("valid");
        assert!(u.target == Target::Tcp(format!("[::1]:{DEFAULT_NBD_PORT}")));
        let u = DiskUri::parse("nbd://[::1]:99/d1").expect("valid");
        assert!(u.target == Target::Tcp("[::1]:99".into()));
        let u = DiskUri::parse("nbds://h:99/d1").expect("valid");
        assert!(u.tls && u.target == Target::Tcp("h:99".into()));
    }

    #[test]
    fn unix_uris_parse() {
        let u =
            DiskUri::new(&disk("nbd+unix:///d1?socket=/run/nbd.sock", Some("t0k"))).expect("valid");
        assert!(u.target == Target::Unix("/run/nbd.sock".into()));
        assert_eq!(u.lease.as_ref().map(Secret::expose), Some("t0k"));
    }

    #[test]
    fn a_token_in_the_uri_is_refused() {
        for nbd in [
            "nbd://h:1/d;lease=SECRET",
            "nbds://h:1/d;lease=SECRET",
            "nbd+unix:///d;lease=SECRET?socket=/s",
        ] {
            let e = DiskUri::new(&disk(nbd, None)).err().unwrap_or_default();
            assert!(e.contains("lease field") && !e.contains("SECRET"), "{e}");
            assert_eq!(
                check_disks(&[disk("nbd://h/ok", None), disk(nbd, None)]),
                Err(DiskError::LeaseInUri(1))
            );
        }
        assert_eq!(check_disks(&[disk("nbd://h/d", Some("tok"))]), Ok(()));
        assert!(matches!(
            check_disks(&[disk("http://x/y", None)]),
            Err(DiskError::Invalid { index: 0, .. })
        ));
    }

    #[test]
    fn bad_uris_are_refused() {
        for bad in [
            "",
            "http://x/y",
            "nbd://",
            "nbd://h:port/x",
            "nbd://h:1/",
            "nbd:///x",
            "nbd+unix:///x",
            "nbd+unix:///?socket=/s",
            "nbd+unix://x?socket=/s",
        ] {
            let err = DiskUri::new(&disk(bad, Some("SECRET")))
                .err()
                .unwrap_or_default();
            assert!(!err.is_empty(), "{bad:?} accepted");
            assert!(!err.contains("SECRET"), "{err}");
        }
    }

    #[test]
    fn the_lease_is_never_shown() {
        assert_eq!(
            redact_uri("nbd://h:1/d;lease=abc123"),
            "nbd://h:1/d;lease=<redacted>"
        );
        assert_eq!(redact_uri("nbd://h:1/d"), "nbd://h:1/d");
        let d = disk("nbd://h:1/d", Some("abc123"));
        assert!(!format!("{d:?}").contains("abc123"), "{d:?}");
        let u = DiskUri::new(&d).expect("valid");
        assert_eq!(
            u.scrub("unknown export d;lease=abc123"),
            "unknown export d;lease=<redacted>"
        );
        assert_eq!(u.redacted(), "nbd://h:1/d");
    }
}
