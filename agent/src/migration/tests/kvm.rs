//! The same migrations with the real VMM (KVM, the A-B sweeper boot sector).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{proxy, req, runtime, wait_final, wait_until};
use crate::contract::{BootSpec, MigrationSource, MigrationTarget, VmError, VmSpec};
use crate::guests::{AB_SWEEPER, AB_SWEEPER_LOAD_ADDR, check_ab_ram};
use crate::machine::{Machine, new_spec};
use crate::migration::VmHost;
use crate::migration::service::{LimitsPatch, MigrationService};
use crate::migration::stats::MigrationState;
use tokio_util::sync::CancellationToken;

fn kvm_or_skip(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: /dev/kvm missing");
    };
    false
}

#[derive(Default)]
struct KvmHost {
    vms: Mutex<HashMap<String, (Arc<Machine>, &'static str)>>,
}

impl KvmHost {
    fn get(&self, name: &str) -> Option<(Arc<Machine>, &'static str)> {
        self.vms.lock().expect("vms").get(name).cloned()
    }
}

impl VmHost for KvmHost {
    fn begin_outgoing(&self, name: &str) -> Result<(Arc<dyn MigrationSource>, bool), VmError> {
        let mut g = self.vms.lock().expect("vms");
        let (m, st) = g
            .get_mut(name)
            .ok_or(VmError::Other(format!("no VM {name}")))?;
        if *st != "running" {
            return Err(VmError::WrongState {
                state: st.to_string(),
                needed: "running",
            });
        }
        *st = "migrating";
        Ok((m.clone(), true))
    }
    fn end_outgoing(&self, name: &str, moved: bool) {
        let mut g = self.vms.lock().expect("vms");
        if moved {
            g.remove(name);
        } else if let Some((_, st)) = g.get_mut(name) {
            *st = "running";
        }
    }
    fn end_outgoing_paused(&self, name: &str) {
        if let Some((_, st)) = self.vms.lock().expect("vms").get_mut(name) {
            *st = "paused";
        }
    }
    fn create_incoming(&self, spec: &VmSpec) -> Result<Arc<dyn MigrationTarget>, VmError> {
        let m = Arc::new(Machine::create_incoming(spec)?);
        self.vms
            .lock()
            .expect("vms")
            .insert(spec.name.clone(), (m.clone(), "incoming"));
        Ok(m)
    }
    fn end_incoming(&self, name: &str, running: bool) {
        let mut g = self.vms.lock().expect("vms");
        if running {
            if let Some((_, st)) = g.get_mut(name) {
                *st = "running";
            }
        } else {
            g.remove(name);
        }
    }
}

struct KvmAgent {
    host: Arc<KvmHost>,
    svc: Arc<MigrationService>,
    addr: String,
    shutdown: CancellationToken,
}

impl Drop for KvmAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn kvm_agent(rt: &tokio::runtime::Runtime) -> KvmAgent {
    let host = Arc::new(KvmHost::default());
    let svc = MigrationService::new(host.clone(), Some("tok".into()));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    rt.spawn(svc.clone().serve(listener, shutdown.clone()));
    KvmAgent {
        host,
        svc,
        addr,
        shutdown,
    }
}

fn boot_ab(a: &KvmAgent, mib: u64) -> Arc<Machine> {
    let spec = new_spec(
        "ab",
        mib,
        1,
        BootSpec {
            flat_binary: "ab".into(),
            load_addr: AB_SWEEPER_LOAD_ADDR,
        },
        vec![],
    );
    let m = Arc::new(Machine::boot_image(spec, AB_SWEEPER).expect("boot the A-B guest"));
    a.host
        .vms
        .lock()
        .expect("vms")
        .insert("ab".into(), (m.clone(), "running"));
    wait_until(Duration::from_secs(30), "'A' on the console", || {
        m.console().contains(&b'A')
    });
    // Let the first, slow sweep (first touch of every page) finish: from then on
    // the guest dirties ~200k pages/s, which only a 1 MiB/s cap outruns when a
    // page whose counter changed costs ~20 bytes (Sparse frames).
    std::thread::sleep(Duration::from_secs(2));
    m
}

/// Pause, dump, QEMU's A-B check, resume; returns the byte at 1 MiB.
fn check(m: &Machine) -> u8 {
    MigrationSource::pause(m).expect("pause");
    let f = tempfile::NamedTempFile::new().expect("temp file");
    m.dump_memory(f.path()).expect("dump");
    let ram = std::fs::read(f.path()).expect("read dump");
    check_ab_ram(&ram).expect("A-B RAM check");
    MigrationSource::resume(m).expect("resume");
    ram[1 << 20]
}

fn assert_sweeping(m: &Machine) {
    let first = check(m);
    wait_until(Duration::from_secs(20), "the sweep to move", || {
        check(m) != first
    });
}

#[test]
fn kvm_forced_non_convergence_then_converge_passes_the_ram_check() {
    if !kvm_or_skip("kvm_forced_non_convergence_then_converge_passes_the_ram_check") {
        return;
    }
    let rt = runtime();
    let (src, dst) = (kvm_agent(&rt), kvm_agent(&rt));
    boot_ab(&src, 150);
    let mut r = req(&dst.addr);
    r.max_bandwidth_mibs = Some(1);
    r.downtime_limit_ms = Some(1);
    let id = src.svc.start("ab", r).expect("start");
    wait_until(Duration::from_secs(60), "three passes", || {
        src.svc.get(&id).expect("exists").passes.len() >= 3
    });
    let during = src.svc.get(&id).expect("exists");
    assert_eq!(during.state, MigrationState::Active, "{during:?}");
    assert!(
        during.passes.iter().all(|p| p.dirty_pages > 0),
        "the guest keeps dirtying: {during:?}"
    );
    src.svc
        .patch(
            &id,
            LimitsPatch {
                max_bandwidth_mibs: Some(0),
                downtime_limit_ms: Some(2000),
                ..Default::default()
            },
        )
        .expect("patch");
    let info = wait_final(&src.svc, &id, Duration::from_secs(60));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    eprintln!(
        "KVM 150 MiB after forced non-convergence: total {} ms, downtime {} ms ({:?})",
        info.total_ms, info.downtime_ms, info.downtime
    );
    assert!(src.host.get("ab").is_none(), "source copy freed");
    let (m, st) = dst.host.get("ab").expect("target VM");
    assert_eq!(st, "running");
    assert_sweeping(&m);
}

#[test]
fn kvm_cancel_then_fresh_target_and_cut_link() {
    if !kvm_or_skip("kvm_cancel_then_fresh_target_and_cut_link") {
        return;
    }
    let rt = runtime();
    let (src, dst) = (kvm_agent(&rt), kvm_agent(&rt));
    let m = boot_ab(&src, 150);
    let mut r = req(&dst.addr);
    r.max_bandwidth_mibs = Some(1);
    // Held: stays in pre-copy until the cancel, however little the guest dirties.
    r.hold = Some(true);
    let id = src.svc.start("ab", r.clone()).expect("start");
    wait_until(Duration::from_secs(30), "some memory sent", || {
        src.svc.get(&id).expect("exists").ram_transferred_bytes > 8 << 20
    });
    src.svc.cancel(&id).expect("cancel");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Cancelled, "{info:?}");
    assert_eq!(
        src.host.get("ab").expect("still on the source").1,
        "running"
    );
    wait_until(Duration::from_secs(10), "target drops its copy", || {
        dst.host.get("ab").is_none()
    });
    assert_sweeping(&m);

    // A link cut mid-migration (a killed target, as the source sees it).
    let p = proxy(&dst.addr);
    let mut r = req(&p.addr);
    r.max_bandwidth_mibs = Some(1);
    r.hold = Some(true);
    let id = src.svc.start("ab", r).expect("start");
    wait_until(Duration::from_secs(30), "some memory sent", || {
        src.svc.get(&id).expect("exists").ram_transferred_bytes > 8 << 20
    });
    p.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    let info = wait_final(&src.svc, &id, Duration::from_secs(60));
    assert_eq!(info.state, MigrationState::Failed, "{info:?}");
    assert_eq!(
        src.host.get("ab").expect("still on the source").1,
        "running"
    );
    assert_sweeping(&m);
    drop(m);

    let fresh = kvm_agent(&rt);
    let mut r = req(&fresh.addr);
    r.streams = Some(2);
    let id = src.svc.start("ab", r).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(60));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    let (m, _) = fresh.host.get("ab").expect("target VM");
    assert_sweeping(&m);
}
