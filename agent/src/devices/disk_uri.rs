//! NBD disk URIs as the agent receives them: `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`, where EXPORT may carry a write lease as
//! `NAME;lease=TOKEN` (exactly the export name stagehand-nbd parses). The token is a
//! secret: [`DiskUri`] is not `Debug`, and everything shown to people goes through
//! [`redact_uri`].

use std::path::PathBuf;

use nbd_client::{Client, ClientError, ClientOptions};

/// The NBD port when a URI names none (IANA).
pub const DEFAULT_NBD_PORT: u16 = 10809;
const LEASE_MARK: &str = ";lease=";
const REDACTED: &str = "<redacted>";

/// Where a disk lives. Deliberately not `Debug`: the export name holds the token.
#[derive(Clone, PartialEq, Eq)]
pub struct DiskUri {
    /// The URI as given (for the VM's spec).
    pub uri: String,
    pub target: Target,
    /// The export name sent in the handshake, `;lease=TOKEN` included.
    pub export: String,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// `HOST:PORT`, as `tokio::net::TcpStream::connect` takes it.
    Tcp(String),
    Unix(PathBuf),
}

/// `uri` with the lease token replaced by `<redacted>`: safe for logs and answers.
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
    pub fn parse(uri: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("disk URI {:?} is not valid: {why}", redact_uri(uri));
        if let Some(rest) = uri.strip_prefix("nbd://") {
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
            })
        } else {
            Err(bad(
                "use nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ))
        }
    }

    /// The URI with its token hidden.
    pub fn redacted(&self) -> String {
        redact_uri(&self.uri)
    }

    /// The token, if the export name carries one (to scrub it from error texts).
    fn token(&self) -> Option<&str> {
        self.export
            .split_once(LEASE_MARK)
            .map(|(_, t)| t)
            .filter(|t| !t.is_empty())
    }

    /// `text` with any copy of the token (a server may echo the export name) hidden.
    pub fn scrub(&self, text: &str) -> String {
        match self.token() {
            Some(t) => text.replace(t, REDACTED),
            None => text.to_string(),
        }
    }

    pub async fn connect(&self) -> Result<Client, ClientError> {
        let opts = ClientOptions::new(&self.export);
        match &self.target {
            Target::Tcp(addr) => Client::connect_tcp(addr, opts).await,
            Target::Unix(path) => Client::connect_unix(path, opts).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris_parse_with_and_without_port() {
        let u = DiskUri::parse("nbd://127.0.0.1:10900/d1;lease=abc").expect("valid");
        assert!(u.target == Target::Tcp("127.0.0.1:10900".into()));
        assert_eq!(u.export, "d1;lease=abc");
        let u = DiskUri::parse("nbd://host/d1").expect("valid");
        assert!(u.target == Target::Tcp(format!("host:{DEFAULT_NBD_PORT}")));
        let u = DiskUri::parse("nbd://[::1]/d1").expect("valid");
        assert!(u.target == Target::Tcp(format!("[::1]:{DEFAULT_NBD_PORT}")));
        let u = DiskUri::parse("nbd://[::1]:99/d1").expect("valid");
        assert!(u.target == Target::Tcp("[::1]:99".into()));
    }

    #[test]
    fn unix_uris_parse() {
        let u = DiskUri::parse("nbd+unix:///d1;lease=t0k?socket=/run/nbd.sock").expect("valid");
        assert!(u.target == Target::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "d1;lease=t0k");
    }

    #[test]
    fn bad_uris_are_refused_without_their_token() {
        for bad in [
            "",
            "http://x/y",
            "nbd://",
            "nbd://h:port/x;lease=SECRET",
            "nbd://h:1/",
            "nbd:///x",
            "nbd+unix:///x;lease=SECRET",
            "nbd+unix:///?socket=/s",
            "nbd+unix://x?socket=/s",
        ] {
            let err = DiskUri::parse(bad).err().unwrap_or_default();
            assert!(!err.is_empty(), "{bad:?} accepted");
            assert!(!err.contains("SECRET"), "{err}");
        }
    }

    #[test]
    fn redaction_hides_only_the_token() {
        assert_eq!(
            redact_uri("nbd://h:1/d;lease=abc123"),
            "nbd://h:1/d;lease=<redacted>"
        );
        assert_eq!(
            redact_uri("nbd+unix:///d;lease=abc?socket=/s"),
            "nbd+unix:///d;lease=<redacted>?socket=/s"
        );
        assert_eq!(redact_uri("nbd://h:1/d"), "nbd://h:1/d");
        let u = DiskUri::parse("nbd://h:1/d;lease=abc123").expect("valid");
        assert_eq!(
            u.scrub("unknown export d;lease=abc123"),
            "unknown export d;lease=<redacted>"
        );
        assert_eq!(u.redacted(), "nbd://h:1/d;lease=<redacted>");
    }
}
