//! NBD over TLS (`--tls-cert/--tls-key/--tls-ca`): standard clients (nbdinfo,
//! nbdcopy, qemu-img with `nbds://` or tls-creds-x509) and our own client get in
//! with a certificate from the cluster CA; a plain client, a client whose
//! certificate is from another CA and a client without a certificate get nothing.

// Test helpers panic to report a failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nbd_client::{Client, ClientError, ClientOptions};
use nbd_proto::consts::REP_ERR_TLS_REQD;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use stagehand_common::pki::TestPki;
use stagehand_common::tls::{ca_only_client_config, server_name};
use stagehand_tests::{Daemon, pattern, require_tool, run_ok, run_timeout, start_nbd};

const T: Duration = Duration::from_secs(120);
const SIZE: usize = 8 << 20;

struct Setup {
    dir: tempfile::TempDir,
    pki: TestPki,
    /// A CA the server does not trust, with a node "client".
    other: TestPki,
    img: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(&dir.path().join("pki"), &["storage", "client"]).unwrap();
        let other = TestPki::generate(&dir.path().join("other"), &["client"]).unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, pattern(SIZE, 7)).unwrap();
        let f = pki.files("storage");
        let sock = dir.path().join("nbd.sock");
        let daemon = start_nbd(&[
            "--unix",
            &sock.display().to_string(),
            "--export",
            &format!("disk={},unleased", img.display()),
            "--tls-cert",
            &f.cert.display().to_string(),
            "--tls-key",
            &f.key.display().to_string(),
            "--tls-ca",
            &f.ca.display().to_string(),
        ]);
        Setup {
            dir,
            pki,
            other,
            img,
            sock,
            daemon,
        }
    }

    fn addr(&self) -> &str {
        self.daemon.tcp.as_deref().unwrap()
    }

    fn port(&self) -> &str {
        self.addr().rsplit_once(':').unwrap().1
    }

    /// `nbds://...?tls-certificates=DIR` for libnbd's tools.
    fn nbds(&self, certs: &Path) -> String {
        format!(
            "nbds://{}/disk?tls-certificates={}",
            self.addr(),
            certs.display()
        )
    }

    fn client_dir(&self) -> PathBuf {
        self.pki.node_dir("client")
    }

    /// Our CA (so the server is trusted) with the other CA's client certificate.
    fn foreign_cert_dir(&self) -> PathBuf {
        let d = self.dir.path().join("foreign");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.client_dir().join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        for f in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(self.other.node_dir("client").join(f), d.join(f)).unwrap();
        }
        d
    }

    /// Our CA only: the server is trusted, no client certificate.
    fn no_cert_dir(&self) -> PathBuf {
        let d = self.dir.path().join("nocert");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.client_dir().join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        d
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn fails(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, T).unwrap();
    assert!(!out.status.success(), "{desc} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn libnbd_tools_read_and_write_over_tls() {
    require_tool!("nbdinfo");
    require_tool!("nbdcopy");
    let s = Setup::start();
    let uri = s.nbds(&s.client_dir());
    let j: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new("nbdinfo").args(["--json", &uri]), T)).unwrap();
    assert_eq!(j["TLS"], true, "{j}");
    assert_eq!(j["exports"][0]["export-size"], SIZE as u64);

    // nbdcopy out of and into the export, checked byte for byte.
    let out = s.dir.path().join("out.raw");
    run_ok(
        Command::new("nbdcopy").args([uri.as_str(), out.to_str().unwrap()]),
        T,
    );
    assert!(
        std::fs::read(&out).unwrap() == pattern(SIZE, 7),
        "nbdcopy read"
    );
    let src = s.dir.path().join("src.raw");
    std::fs::write(&src, pattern(SIZE, 11)).unwrap();
    run_ok(
        Command::new("nbdcopy").args([src.to_str().unwrap(), uri.as_str()]),
        T,
    );
    assert!(
        std::fs::read(&s.img).unwrap() == pattern(SIZE, 11),
        "nbdcopy write"
    );
}

#[test]
fn qemu_img_over_tls_creds_x509() {
    require_tool!("qemu-img");
    let s = Setup::start();
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        s.client_dir().display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
        s.port()
    );
    let info = run_ok(
        Command::new("qemu-img").args(["info", "--object", &creds, "--image-opts", &opts]),
        T,
    );
    assert!(info.contains(&format!("{SIZE}")), "{info}");
    let out = s.dir.path().join("out.raw");
    run_ok(
        Command::new("qemu-img").args([
            "convert",
            "--object",
            &creds,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            out.to_str().unwrap(),
        ]),
        T,
    );
    assert!(
        std::fs::read(&out).unwrap() == pattern(SIZE, 7),
        "qemu-img read"
    );
}

#[test]
fn our_client_over_tls_and_refusals() {
    let s = Setup::start();
    let rt = rt();
    let name = server_name("127.0.0.1").unwrap();
    let good = s.pki.files("client").client_config().unwrap();
    rt.block_on(async {
        let opts = ClientOptions::new("disk").tls(Arc::clone(&good), name.clone());
        let c = Client::connect_tcp(s.addr(), opts)
            .await
            .expect("TLS client");
        assert_eq!(c.read(0, 4096).await.unwrap(), pattern(SIZE, 7)[..4096]);
        c.write(4096, &[9u8; 4096], true).await.unwrap();
        assert_eq!(c.read(4096, 4096).await.unwrap(), vec![9u8; 4096]);
        c.disconnect().await.unwrap();
        // The Unix listener requires TLS too.
        let opts = ClientOptions::new("disk").tls(Arc::clone(&good), name.clone());
        let c = Client::connect_unix(&s.sock, opts)
            .await
            .expect("TLS over Unix");
        assert_eq!(c.read(4096, 4096).await.unwrap(), vec![9u8; 4096]);
        c.disconnect().await.unwrap();

        // Plain: every option is refused with TLS_REQD, GO included.
        match Client::connect_tcp(s.addr(), ClientOptions::new("disk")).await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, REP_ERR_TLS_REQD),
            other => panic!("plain client: {other:?}"),
        }
        match Client::connect_unix(&s.sock, ClientOptions::new("disk")).await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, REP_ERR_TLS_REQD),
            other => panic!("plain client over Unix: {other:?}"),
        }
        // A certificate from another CA, and no certificate at all.
        let foreign = foreign_config(&s);
        let r = Client::connect_tcp(
            s.addr(),
            ClientOptions::new("disk").tls(foreign, name.clone()),
        )
        .await;
        assert!(r.is_err(), "client with another CA's certificate served");
        let no_cert = ca_only_client_config(&s.pki.files("client").ca).unwrap();
        let r = Client::connect_tcp(
            s.addr(),
            ClientOptions::new("disk").tls(no_cert, name.clone()),
        )
        .await;
        assert!(r.is_err(), "client without a certificate served");
    });
}

/// Trusts our CA, presents the other CA's client certificate.
fn foreign_config(s: &Setup) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(s.pki.files("client").ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let other = s.other.files("client");
    let chain: Vec<_> = CertificateDer::pem_file_iter(&other.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&other.key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

#[test]
fn standard_clients_without_the_right_certificate_get_nothing() {
    require_tool!("nbdinfo");
    let s = Setup::start();
    // Plain NBD: refused before any export is named or listed.
    // (libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as "Operation not supported".)
    let err = fails(Command::new("nbdinfo").arg(format!("nbd://{}/disk", s.addr())));
    assert!(err.contains("opt_go"), "{err}");
    fails(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", s.addr())]));
    // TLS with another CA's client certificate, and without one.
    fails(Command::new("nbdinfo").arg(s.nbds(&s.foreign_cert_dir())));
    fails(Command::new("nbdinfo").arg(s.nbds(&s.no_cert_dir())));
    // The image is unchanged and the server still serves the right client.
    assert!(std::fs::read(&s.img).unwrap() == pattern(SIZE, 7));
    run_ok(Command::new("nbdinfo").arg(s.nbds(&s.client_dir())), T);
}
