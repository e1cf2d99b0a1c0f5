//! Live migration between two agents started with `--tls-*`: every stream is TLS with
//! client certificates, the API is HTTPS, and a peer without a certificate of the
//! cluster CA gets no frame at all. Skipped (loudly) without /dev/kvm.

mod migrate_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent::migration::protocol::{FrameHeader, HEADER_LEN};
use migrate_support::{Agent, assert_sweeping, kvm_or_skip};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use stagehand_common::pki::TestPki;
use stagehand_common::tls::TlsFiles;

/// Reads what the listener sends within `wait` (until EOF, an error or the timeout).
fn read_for(s: &mut impl Read, wait: Duration, tcp: &TcpStream) -> Vec<u8> {
    tcp.set_read_timeout(Some(wait)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn is_frame(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&b[..HEADER_LEN]);
        FrameHeader::parse(&h).is_ok()
    }
}

/// A client config that trusts `server_ca` and presents `client` (of any CA).
fn client_config(server_ca: &Path, client: &TlsFiles) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(server_ca).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&client.cert)
        .expect("cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&client.key).expect("key");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client cert");
    Arc::new(cfg)
}

#[test]
fn tls_agents_migrate_and_strangers_get_no_frame() {
    if !kvm_or_skip("tls_agents_migrate_and_strangers_get_no_frame") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(&dir.path().join("pki"), &["site-a", "site-b"]).expect("pki");
    let other = TestPki::generate(&dir.path().join("other"), &["mallory"]).expect("other pki");
    let (src, dst) = (
        Agent::start_with(Some(pki.files("site-a"))),
        Agent::start_with(Some(pki.files("site-b"))),
    );

    // The HTTPS API refuses plain HTTP.
    {
        let mut s = TcpStream::connect(&dst.api).expect("connect");
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let tcp = s.try_clone().expect("clone");
        let got = read_for(&mut s, Duration::from_secs(3), &tcp);
        assert!(
            !String::from_utf8_lossy(&got).contains("200 OK"),
            "plain HTTP answered on the HTTPS API"
        );
    }

    // A plain peer on the migration port: no Challenge, no frame at all.
    {
        let mut s = TcpStream::connect(&dst.migration).expect("connect");
        let tcp = s.try_clone().expect("clone");
        let got = read_for(&mut s, Duration::from_secs(2), &tcp);
        assert!(!is_frame(&got), "a plain peer got a frame: {got:?}");
        // And speaking the protocol in the clear gets it nowhere either.
        let _ = s.write_all(&[0u8; 99]);
        let got = read_for(&mut s, Duration::from_secs(2), &tcp);
        assert!(!is_frame(&got), "a plain peer got a frame: {got:?}");
    }

    // A peer whose certificate another CA signed (it trusts ours): the handshake
    // fails and not one frame comes through.
    {
        let cfg = client_config(&pki.files("site-b").ca, &other.files("mallory"));
        let tcp = TcpStream::connect(&dst.migration).expect("connect");
        let name = stagehand_common::tls::server_name(&dst.migration).expect("name");
        let conn = rustls::ClientConnection::new(cfg, name).expect("client");
        let mut s = rustls::StreamOwned::new(conn, tcp.try_clone().expect("clone"));
        let _ = s.write_all(&[0u8; 1]);
        let got = read_for(&mut s, Duration::from_secs(3), &tcp);
        assert!(got.is_empty(), "a foreign-CA peer read {} bytes", got.len());
    }
    // The same client with our CA's certificate does get the Challenge (the checks
    // above fail for the right reason).
    {
        let cfg = client_config(&pki.files("site-b").ca, &pki.files("site-a"));
        let tcp = TcpStream::connect(&dst.migration).expect("connect");
        let name = stagehand_common::tls::server_name(&dst.migration).expect("name");
        let conn = rustls::ClientConnection::new(cfg, name).expect("client");
        let mut s = rustls::StreamOwned::new(conn, tcp.try_clone().expect("clone"));
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).expect("a challenge over TLS");
        assert!(is_frame(&h));
    }

    // The A-B guest migrates over TLS streams (3 of them) and passes the RAM check.
    src.start_ab("ab", 150);
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": dst.migration, "streams": 3})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    let m = src.wait_migration_end(&id, Duration::from_secs(90));
    assert_eq!(m["state"], "completed", "{m}\n{}\n{}", src.log(), dst.log());
    assert_eq!(src.vm_state("ab"), None);
    assert_sweeping(&dst, "ab");

    // A plain agent cannot migrate into the TLS one.
    let plain = Agent::start();
    plain.start_ab("p", 64);
    let id = plain.ok(
        "POST",
        "/v1/vms/p/migrate",
        Some(json!({"target": dst.migration})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    let m = plain.wait_migration_end(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "failed", "{m}");
    assert_eq!(plain.vm_state("p").as_deref(), Some("running"));
    assert_eq!(dst.vm_state("p"), None);
}
