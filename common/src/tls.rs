//! TLS for every link that leaves a host (rustls, ring provider).
//!
//! One set of flags on every daemon: `--tls-cert FILE --tls-key FILE --tls-ca FILE`
//! (PEM). With them a daemon:
//! - requires TLS with a client certificate signed by the CA on its data ports (NBD
//!   via STARTTLS, the agents' migration stream): [`TlsFiles::mutual_server_config`];
//! - connects to its peers with its own certificate and checks theirs against the CA:
//!   [`TlsFiles::client_config`];
//! - serves its HTTP API over HTTPS, where the bearer token (not a certificate)
//!   authenticates callers: [`TlsFiles::api_server_config`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("--tls-cert, --tls-key and --tls-ca go together; {0} is missing")]
    Incomplete(&'static str),
    #[error("cannot read {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("{0:?} is not a valid TLS server name (a host name or an IP address)")]
    ServerName(String),
}

/// The PEM files of one daemon: its certificate (chain), its private key, and the
/// cluster CA its peers' certificates must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// The three flags: all or none.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(c), Some(k), Some(a)) => Ok(Some(Self {
                cert: c.into(),
                key: k.into(),
                ca: a.into(),
            })),
            (None, _, _) => Err(TlsError::Incomplete("--tls-cert")),
            (_, None, _) => Err(TlsError::Incomplete("--tls-key")),
            (_, _, None) => Err(TlsError::Incomplete("--tls-ca")),
        }
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        read_certs(&self.cert, "certificate")
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_file(&self.key).map_err(|e| TlsError::Pem {
            what: "private key",
            path: self.key.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The CA as a root store.
    pub fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        roots(&self.ca)
    }

    /// For data ports: TLS 1.2+ and a client certificate signed by the CA, required.
    pub fn mutual_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, self.key()?)?;
        Ok(Arc::new(cfg))
    }

    /// For HTTPS APIs: the server proves itself; callers authenticate with the
    /// bearer token, so a client certificate is accepted but not required.
    pub fn api_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, self.key()?)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// For connecting to peers: checks the peer against the CA (and its name) and
    /// presents this daemon's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain()?, self.key()?)?;
        Ok(Arc::new(cfg))
    }
}

/// A client that only checks servers against `ca` (the `coord` CLI: its callers
/// authenticate with the token, not a certificate).
pub fn ca_only_client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in read_certs(ca, "CA certificate")? {
        store.add(c)?;
    }
    Ok(Arc::new(store))
}

/// The TLS server name for `host` (the part of `HOST:PORT` before the port; IPv6
/// addresses in brackets lose them).
pub fn server_name(host_port: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match host_port.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::TestPki;

    #[test]
    fn flags_are_all_or_none() {
        let p = Path::new("x");
        assert!(TlsFiles::from_flags(None, None, None).unwrap().is_none());
        assert!(
            TlsFiles::from_flags(Some(p), Some(p), Some(p))
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            TlsFiles::from_flags(Some(p), None, Some(p)),
            Err(TlsError::Incomplete("--tls-key"))
        ));
    }

    #[test]
    fn configs_load_from_generated_files_and_bad_files_say_which() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path(), &["node-a"]).unwrap();
        let files = pki.files("node-a");
        files.mutual_server_config().unwrap();
        files.api_server_config().unwrap();
        files.client_config().unwrap();
        ca_only_client_config(&files.ca).unwrap();
        let mut bad = files.clone();
        bad.ca = dir.path().join("missing.pem");
        let e = bad.client_config().unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }

    #[test]
    fn server_names_from_host_port() {
        assert!(matches!(
            server_name("127.0.0.1:10809").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7171").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("node-a.example:1").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name:1").is_err());
    }
}
