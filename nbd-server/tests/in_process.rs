//! The library entry points in one process: `Server::bind` on port 0, the async
//! client, per-export stats, runtime export registry changes, clean shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nbd_client::{Client, ClientOptions};
use nbd_server::config::FileConfig;
use nbd_server::export::{Export, ExportSpec};
use nbd_server::{Args, Config, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stats_registry_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
    std::fs::File::create(&b).unwrap().set_len(2 << 20).unwrap();
    let spec = |name: &str, path: &std::path::Path| ExportSpec {
        name: name.into(),
        path: path.into(),
        read_only: false,
        unleased: true,
        lease_reads: false,
        description: Some("test disk".into()),
    };
    let args = Args {
        listen: Some("127.0.0.1:0".into()),
        // No control API is started here; the flag only satisfies the start check.
        insecure_no_auth: true,
        ..Args::default()
    };
    let mut config = Config::merge(args, FileConfig::default()).unwrap();
    config.exports = vec![spec("a", &a)];
    let server = Server::bind(&config).await.unwrap();
    let addr = server.tcp_addr().unwrap().to_string();
    let state = Arc::clone(server.state());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

    let c = Client::connect_tcp(&addr, ClientOptions::new("a"))
        .await
        .unwrap();
    c.write(0, &[9u8; 8192], false).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![9u8; 4096]);
    let ea = state.registry.get("a").unwrap();
    assert_eq!(ea.stats.connections.load(Ordering::Relaxed), 1);
    assert_eq!(ea.stats.bytes_written.load(Ordering::Relaxed), 8192);
    assert_eq!(ea.stats.bytes_read.load(Ordering::Relaxed), 4096);
    assert!(ea.stats.requests.load(Ordering::Relaxed) >= 2);

    // Exports come and go at runtime; removing one closes its connections.
    assert!(
        Client::connect_tcp(&addr, ClientOptions::new("b"))
            .await
            .is_err()
    );
    state
        .registry
        .insert(Arc::new(Export::open(&spec("b", &b)).unwrap()))
        .unwrap();
    let cb = Client::connect_tcp(&addr, ClientOptions::new("b"))
        .await
        .unwrap();
    assert_eq!(cb.size(), 2 << 20);
    state.registry.remove("a").unwrap();
    assert!(
        c.read(0, 16).await.is_err(),
        "a connection to a removed export still serves"
    );
    assert_eq!(cb.read(0, 16).await.unwrap().len(), 16, "other export cut");
    assert!(
        Client::connect_tcp(&addr, ClientOptions::new("a"))
            .await
            .is_err()
    );

    drop(c);
    // Give the server a moment to notice the disconnect.
    for _ in 0..100 {
        if ea.stats.connections.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ea.stats.connections.load(Ordering::Relaxed), 0);

    // Shutdown with a connection still open: serve returns, the client sees EOF.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("shutdown in time")
        .unwrap();
    assert!(cb.read(0, 16).await.is_err());
}
