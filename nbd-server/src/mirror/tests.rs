//! A mirror job between two exports of in-process servers: the source export in a
//! registry (changes reported through its tap as the write path does), the target
//! served by a real `Server` on a Unix socket.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::config::{Args, Config, FileConfig};
use crate::export::ExportSpec;
use crate::server::Server;

const M: u64 = 1 << 20;

struct Rig {
    _dir: tempfile::TempDir,
    src_path: PathBuf,
    dst_path: PathBuf,
    source: Arc<Export>,
    manager: Arc<MirrorManager>,
    sock: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn spec(name: &str, path: &Path) -> ExportSpec {
    ExportSpec {
        name: name.into(),
        path: path.into(),
        read_only: false,
        unleased: true,
        lease_reads: false,
        description: None,
    }
}

async fn rig(size: u64) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.img");
    let dst_path = dir.path().join("dst.img");
    let f = std::fs::File::create(&src_path).unwrap();
    f.set_len(size).unwrap();
    // Data at 1 MiB and 5 MiB, a zero-filled (allocated) MiB at 3 MiB, holes elsewhere.
    f.write_all_at(&crate_pattern(M as usize, 1), M).unwrap();
    f.write_all_at(&crate_pattern(M as usize / 2, 2), 5 * M + 4096)
        .unwrap();
    f.write_all_at(&vec![0u8; M as usize], 3 * M).unwrap();
    // The target starts with garbage where the source has a hole.
    let g = std::fs::File::create(&dst_path).unwrap();
    g.set_len(size).unwrap();
    g.write_all_at(&[0xAA; 8192], 7 * M).unwrap();
    let sock = dir.path().join("t.sock");
    let args = Args {
        listen: Some("none".into()),
        unix: Some(sock.clone()),
        exports: vec![format!("dst={},unleased", dst_path.display())],
        ..Args::default()
    };
    let config = Config::merge(args, FileConfig::default()).unwrap();
    let server = Server::bind(&config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let registry = ExportRegistry::new();
    let source = Arc::new(Export::open(&spec("src", &src_path)).unwrap());
    registry.insert(Arc::clone(&source)).unwrap();
    let manager = MirrorManager::new(registry, None);
    Rig {
        _dir: dir,
        src_path,
        dst_path,
        source,
        manager,
        sock,
        stop: Some(stop),
    }
}

fn crate_pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Rig {
    fn start(&self, mode: Mode) -> Arc<Job> {
        let v = self
            .manager
            .start(NewMirror {
                export: "src".into(),
                address: format!("unix:{}", self.sock.display()),
                target_export: "dst".into(),
                lease: None,
                tls: None,
                mode,
                bandwidth_mib_s: None,
                max_in_flight: Some(4),
            })
            .unwrap();
        self.manager.get(&v.id).unwrap()
    }

    /// A guest write as the write path makes it: on the source, then the tap.
    async fn guest_write(&self, offset: u64, data: &[u8]) {
        self.source.file.write_all_at(data, offset).unwrap();
        self.source
            .mirrors
            .after_change(
                Change::Write {
                    offset,
                    data,
                    fua: false,
                },
                true,
            )
            .await;
    }

    fn same(&self) -> bool {
        std::fs::read(&self.src_path).unwrap() == std::fs::read(&self.dst_path).unwrap()
    }
}

async fn wait_state(job: &Job, want: State) {
    let mut rx = job.subscribe();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("job never reached {want:?}: {:?}", job.view()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_mirror_copies_data_zeroes_holes_and_follows_writes() {
    let size = 8 * M;
    let r = rig(size).await;
    let job = r.start(Mode::Background);
    wait_state(&job, State::Synced).await;
    let v = job.view();
    // Only the data crossed as WRITEs: 1 MiB + the 64 KiB-aligned half MiB
    // (the zero-filled MiB went as WRITE_ZEROES).
    assert_eq!(v.bytes_copied, M + M / 2 + (64 << 10), "{v:?}");
    assert!(v.bytes_zeroed >= M, "{v:?}");
    assert_eq!(v.dirty_bytes, 0);
    // Writes after sync are followed.
    r.guest_write(6 * M + 100, b"after sync").await;
    r.guest_write(0, &[7u8; 4096]).await;
    job.complete();
    wait_state(&job, State::Completed).await;
    assert!(r.same(), "replica differs");
    // The tap forgets a finished job.
    assert!(r.source.mirrors.is_idle());
    // A second job on the export is allowed once the first ended.
    let again = r.start(Mode::Background);
    again.cancel();
    wait_state(&again, State::Cancelled).await;
}

/// A pass plans a hole as WRITE_ZEROES from an allocation scan; a write that lands
/// after the scan but whose mark the step's clear then takes away must still reach
/// the target (a tracker marked before the write lands, like the persistent dirty
/// bitmap, loses such a write otherwise: the replica came out one granule short).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_hole_that_filled_before_its_step_is_copied() {
    let r = rig(8 * M).await;
    let job = r.start(Mode::Background);
    wait_state(&job, State::Synced).await;
    // 6 MiB is a hole on both sides. The data lands on the source; its mark is the
    // one the step below clears (nothing goes through the tap here).
    let data = crate_pattern(64 << 10, 9);
    r.source.file.write_all_at(&data, 6 * M).unwrap();
    job.run_step(plan::Step::Zero {
        offset: 6 * M,
        len: M,
    })
    .await
    .unwrap();
    let mut got = vec![0u8; data.len()];
    std::fs::File::open(&r.dst_path)
        .unwrap()
        .read_exact_at(&mut got, 6 * M)
        .unwrap();
    assert!(
        got == data,
        "the target got zeros where the source holds data"
    );
    job.complete();
    wait_state(&job, State::Completed).await;
    assert!(r.same(), "replica differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocking_writes_reach_the_target_before_the_ack() {
    let size = 8 * M;
    let r = rig(size).await;
    let job = r.start(Mode::WriteBlocking);
    wait_state(&job, State::Synced).await;
    assert!(r.source.mirrors.blocks_writes());
    let data = crate_pattern(200_000, 9);
    r.guest_write(2 * M + 7, &data).await;
    // Acknowledged: it is on the target already (before any pass could run).
    let mut got = vec![0u8; data.len()];
    std::fs::File::open(&r.dst_path)
        .unwrap()
        .read_exact_at(&mut got, 2 * M + 7)
        .unwrap();
    assert!(got == data, "forwarded write not on the target");
    assert_eq!(job.view().dirty_bytes, 0);
    job.complete();
    wait_state(&job, State::Completed).await;
    assert!(r.same());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_too_small_fails_the_job() {
    let r = rig(8 * M).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&r.dst_path)
        .unwrap()
        .set_len(M)
        .unwrap();
    // The server read the size at start: restart it on the shrunk file.
    let mut r = r;
    let _ = r.stop.take().map(|s| s.send(()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let args = Args {
        listen: Some("none".into()),
        unix: Some(r.sock.clone()),
        exports: vec![format!("dst={},unleased", r.dst_path.display())],
        ..Args::default()
    };
    let server = Server::bind(&Config::merge(args, FileConfig::default()).unwrap())
        .await
        .unwrap();
    tokio::spawn(server.serve(std::future::pending()));
    let job = r.start(Mode::Background);
    wait_state(&job, State::Failed).await;
    assert!(job.view().error.unwrap().contains("smaller"));
}
