//! Serving a daemon's HTTP API, plain or over HTTPS, until shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a caller may take over its TLS handshake before it is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel backlog.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// Serves `router` on `listener` (HTTPS when `tls` is given) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerConfig>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        Some(cfg) => {
            let listener = TlsListener::new(listener, cfg, shutdown.clone())?;
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    }
}

/// A listener whose connections come out TLS-established. Handshakes run in their
/// own tasks with a deadline, so a slow or silent caller holds up nobody else.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(
        listener: TcpListener,
        cfg: Arc<ServerConfig>,
        shutdown: CancellationToken,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_PENDING_HANDSHAKES);
        let acceptor = TlsAcceptor::from(cfg);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("API accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "API TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept task ended (shutdown): never yield another connection.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::TestPki;
    use axum::routing::get;

    #[tokio::test]
    async fn https_api_answers_a_client_that_trusts_the_ca_and_refuses_plain_http() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path(), &["n1"]).unwrap();
        let files = pki.files("n1");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let router = Router::new().route("/v1/health", get(|| async { "ok" }));
        let task = tokio::spawn(serve(
            listener,
            router,
            Some(files.api_server_config().unwrap()),
            shutdown.clone(),
        ));
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&files.ca).unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let body = client
            .get(format!("https://127.0.0.1:{}/v1/health", addr.port()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "ok");
        // Plain HTTP to the HTTPS port gets no answer.
        let plain = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/v1/health", addr.port()))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(plain.is_err() || !plain.unwrap().status().is_success());
        // A client that does not trust the CA fails the handshake.
        let untrusting = reqwest::Client::new()
            .get(format!("https://127.0.0.1:{}/v1/health", addr.port()))
            .send()
            .await;
        assert!(untrusting.is_err());
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
