//! A small certificate authority for demos, tests and first deployments (rcgen):
//! one CA and one certificate per node, valid both as a TLS server and as a client
//! (nodes are both: a storage node serves NBD and mirrors to another node).
//!
//! Each node gets a directory laid out the way libnbd's `tls-certificates=DIR` and
//! qemu's `tls-creds-x509,dir=DIR` expect, so the standard clients can use it as is:
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem` (the server and client pairs are the same certificate).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;

use crate::tls::TlsFiles;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a usable node name (letters, digits, '-', '_', '.')")]
    BadName(String),
}

/// The names every generated node certificate is valid for besides the node's own
/// name: loopback, where the demo and the tests run.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A CA and the node certificates it issued, under one directory:
/// `DIR/ca-cert.pem`, `DIR/ca-key.pem` and `DIR/NODE/` per node.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    /// Makes a fresh CA in `dir` and a certificate for each of `nodes` (valid for
    /// the node's name and [`LOOPBACK_NAMES`]).
    pub fn generate(dir: &Path, nodes: &[&str]) -> Result<Self, PkiError> {
        let ca = Ca::create(dir)?;
        for n in nodes {
            ca.issue(n, &[])?;
        }
        Ok(Self { dir: dir.into() })
    }

    /// The `--tls-*` files of `node`.
    pub fn files(&self, node: &str) -> TlsFiles {
        node_files(&self.dir.join(node))
    }

    /// The directory of `node` (for `nbds://...?tls-certificates=DIR`).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }
}

/// The `--tls-*` files in a node directory written by [`Ca::issue`].
pub fn node_files(node_dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: node_dir.join("server-cert.pem"),
        key: node_dir.join("server-key.pem"),
        ca: node_dir.join("ca-cert.pem"),
    }
}

/// A CA whose key lives in `dir/ca-key.pem`.
pub struct Ca {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl Ca {
    /// Creates a new CA in `dir` (created if missing): `ca-cert.pem`, `ca-key.pem`
    /// (mode 0600).
    pub fn create(dir: &Path) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Stagehand cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        write(&dir.join("ca-cert.pem"), &pem, 0o644)?;
        write(&dir.join("ca-key.pem"), &key.serialize_pem(), 0o600)?;
        Ok(Self {
            dir: dir.into(),
            cert,
            key,
            pem,
        })
    }

    /// Issues a certificate for `node` (valid for `node`, `extra_names` and
    /// loopback) into `dir/NODE/`, and returns that directory.
    pub fn issue(&self, node: &str, extra_names: &[&str]) -> Result<PathBuf, PkiError> {
        if node.is_empty()
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(PkiError::BadName(node.into()));
        }
        let mut names: Vec<String> = vec![node.to_string()];
        names.extend(extra_names.iter().map(|s| s.to_string()));
        names.extend(LOOPBACK_NAMES.iter().map(|s| s.to_string()));
        names.dedup();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, node);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let out = self.dir.join(node);
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        write(&out.join("ca-cert.pem"), &self.pem, 0o644)?;
        write(&out.join("server-cert.pem"), &cert_pem, 0o644)?;
        write(&out.join("server-key.pem"), &key_pem, 0o600)?;
        write(&out.join("client-cert.pem"), &cert_pem, 0o644)?;
        write(&out.join("client-key.pem"), &key_pem, 0o600)?;
        Ok(out)
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn node_directories_have_the_standard_layout_and_private_keys_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path(), &["kvm-a1"]).unwrap();
        let n = pki.node_dir("kvm-a1");
        for f in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            assert!(n.join(f).exists(), "{f}");
        }
        let mode = std::fs::metadata(n.join("server-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            Ca::create(&dir.path().join("x"))
                .unwrap()
                .issue("../evil", &[]),
            Err(PkiError::BadName(_))
        ));
    }
}
