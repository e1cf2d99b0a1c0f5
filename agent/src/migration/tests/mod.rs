//! End-to-end tests of sender, receiver and policy over real TCP on loopback, with the
//! in-memory fake VM (the KVM versions live in tests/tests/migrate_*.rs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::fake::{FakeHost, FakeState, FakeVm};
use super::protocol::SwitchoverMode;
use super::service::{LimitsPatch, MigrateRequest, MigrationService, SwitchoverRequest};
use super::stats::{MigrationInfo, MigrationState};
use crate::contract::{DiskSpec, MigrationSource};

const MIB: u64 = 1 << 20;
const MEM_MIB: u64 = 32;
const SWEEP_END: u64 = 24 * MIB;

struct Agent {
    host: Arc<FakeHost>,
    svc: Arc<MigrationService>,
    addr: String,
    shutdown: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for (vm, _) in self.host.vms.lock().expect("vms").values() {
            vm.kill();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn agent_with(rt: &tokio::runtime::Runtime, host: FakeHost, token: Option<&str>) -> Agent {
    let host = Arc::new(host);
    let svc = MigrationService::new(host.clone(), token.map(str::to_string));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    rt.spawn(svc.clone().serve(listener, shutdown.clone()));
    Agent {
        host,
        svc,
        addr,
        shutdown,
    }
}

fn agent(rt: &tokio::runtime::Runtime, token: Option<&str>) -> Agent {
    agent_with(
        rt,
        FakeHost::plain(SWEEP_END, Duration::from_micros(1)),
        token,
    )
}

fn secret(s: &str) -> stagehand_common::secret::Secret {
    stagehand_common::secret::Secret::new(s).expect("non-empty")
}

fn req(target: &str) -> MigrateRequest {
    MigrateRequest {
        target: target.to_string(),
        timeout_s: Some(60),
        ..Default::default()
    }
}

fn wait_final(svc: &MigrationService, id: &str, limit: Duration) -> MigrationInfo {
    let t = Instant::now();
    loop {
        let i = svc.get(id).expect("migration exists");
        if i.state.is_final() {
            return i;
        }
        assert!(
            t.elapsed() < limit,
            "migration did not end in {limit:?}: {i:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest moved: target runs it and keeps sweeping from where the source stopped,
/// the RAM check passes, the source copy is gone.
fn assert_moved(src: &Agent, dst: &Agent, name: &str) {
    assert!(src.host.get(name).is_none(), "source copy must be freed");
    let (vm, st) = dst.host.get(name).expect("target has the VM");
    assert_eq!(st, FakeState::Running);
    let s0 = vm.sweeps.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "sweeps on the target", || {
        vm.sweeps.load(Ordering::SeqCst) > s0 + 2
    });
    MigrationSource::pause(vm.as_ref()).expect("pause");
    vm.check_ab().expect("target RAM passes the A-B check");
    MigrationSource::resume(vm.as_ref()).expect("resume");
}

/// The guest stayed: source runs (keeps sweeping), its RAM is consistent, and the
/// target holds no copy.
fn assert_stayed(src: &Agent, dst: &Agent, vm: &FakeVm, name: &str) {
    let (_, st) = src.host.get(name).expect("source keeps the VM");
    assert_eq!(st, FakeState::Running);
    let s0 = vm.sweeps.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "sweeps on the source", || {
        vm.sweeps.load(Ordering::SeqCst) > s0 + 2
    });
    MigrationSource::pause(vm).expect("pause");
    vm.check_ab().expect("source RAM passes the A-B check");
    MigrationSource::resume(vm).expect("resume");
    wait_until(Duration::from_secs(10), "target to discard the VM", || {
        dst.host.get(name).is_none()
    });
}

#[test]
fn migrates_a_sweeping_guest_with_streams_and_compression() {
    let rt = runtime();
    for (streams, compression) in [(1, "none"), (3, "lz4"), (2, "zstd")] {
        let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
        let vm = src.host.add_running("vm1", MEM_MIB);
        wait_until(Duration::from_secs(5), "first sweep", || {
            vm.sweeps.load(Ordering::SeqCst) > 0
        });
        let mut r = req(&dst.addr);
        r.streams = Some(streams);
        r.compression =
            Some(serde_json::from_value(serde_json::json!(compression)).expect("compression"));
        let id = src.svc.start("vm1", r).expect("start");
        let info = wait_final(&src.svc, &id, Duration::from_secs(30));
        assert_eq!(info.state, MigrationState::Completed, "{info:?}");
        assert!(info.passes.len() >= 2, "{info:?}");
        // Zero pages (above the sweep range) were skipped in pass 0.
        assert!(
            info.zero_pages >= (MEM_MIB * MIB - SWEEP_END) / 4096,
            "{info:?}"
        );
        assert!(info.downtime_ms > 0.0 && info.downtime_ms < info.total_ms);
        if compression != "none" {
            assert!(
                info.transferred_bytes < info.ram_transferred_bytes,
                "{compression} shrinks the A-B pages"
            );
        }
        assert_moved(&src, &dst, "vm1");
    }
}

#[test]
fn a_guest_of_mostly_zero_pages_travels_as_sparse_words() {
    let rt = runtime();
    let mut h = FakeHost::plain(SWEEP_END, Duration::from_micros(1));
    h.sparse_guest = true;
    let (src, dst) = (agent_with(&rt, h, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    wait_until(Duration::from_secs(5), "first sweep", || {
        vm.sweeps.load(Ordering::SeqCst) > 0
    });
    let id = src.svc.start("vm1", req(&dst.addr)).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    // One non-zero word per page: about 20 bytes on the wire instead of 4 KiB.
    assert!(
        info.transferred_bytes * 50 < info.ram_transferred_bytes,
        "{info:?}"
    );
    assert_moved(&src, &dst, "vm1");
}

#[test]
fn forced_non_convergence_then_raised_limits_converge() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    wait_until(Duration::from_secs(5), "first sweep", || {
        vm.sweeps.load(Ordering::SeqCst) > 0
    });
    let mut r = req(&dst.addr);
    r.max_bandwidth_mibs = Some(100);
    r.downtime_limit_ms = Some(1);
    let id = src.svc.start("vm1", r).expect("start");
    wait_until(Duration::from_secs(30), "three passes", || {
        src.svc.get(&id).expect("exists").passes.len() >= 3
    });
    let during = src.svc.get(&id).expect("exists");
    assert_eq!(
        during.state,
        MigrationState::Active,
        "must not converge under 1 ms: {during:?}"
    );
    for p in during.passes.iter().filter(|p| p.bytes >= 4 * MIB) {
        let mibs = p.bytes as f64 / MIB as f64 / (p.duration_ms / 1000.0);
        assert!(mibs < 120.0, "cap holds: {mibs} MiB/s in {during:?}");
    }
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
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    assert!(info.passes.len() >= 4);
    assert_moved(&src, &dst, "vm1");
}

#[test]
fn cancel_keeps_the_guest_on_the_source_and_a_fresh_target_then_works() {
    let rt = runtime();
    let (src, dst, dst2) = (
        agent(&rt, Some("tok")),
        agent(&rt, Some("tok")),
        agent(&rt, Some("tok")),
    );
    let vm = src.host.add_running("vm1", MEM_MIB);
    let mut r = req(&dst.addr);
    r.max_bandwidth_mibs = Some(20);
    r.downtime_limit_ms = Some(1);
    let id = src.svc.start("vm1", r).expect("start");
    wait_until(Duration::from_secs(10), "some bytes", || {
        src.svc.get(&id).expect("exists").ram_transferred_bytes > 2 * MIB
    });
    assert!(
        dst.host.get("vm1").is_some(),
        "target holds the incoming VM meanwhile"
    );
    src.svc.cancel(&id).expect("cancel");
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Cancelled, "{info:?}");
    assert!(
        src.svc.cancel(&id).is_err(),
        "an ended migration cannot be cancelled"
    );
    assert_stayed(&src, &dst, &vm, "vm1");

    let id = src.svc.start("vm1", req(&dst2.addr)).expect("start again");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    assert_moved(&src, &dst2, "vm1");
}

/// A TCP proxy that can cut every connection it carries, like a killed target.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
}

fn proxy(to: &str) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let cut = Arc::new(AtomicBool::new(false));
    let (to, c) = (to.to_string(), cut.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(a) = s else { return };
            let Ok(b) = TcpStream::connect(&to) else {
                return;
            };
            for (mut from, mut into) in [
                (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
                (b, a),
            ] {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    from.set_read_timeout(Some(Duration::from_millis(50)))
                        .expect("timeout");
                    loop {
                        if c.load(Ordering::SeqCst) {
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let _ = into.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                if into.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        }
    });
    Proxy { addr, cut }
}

#[test]
fn a_cut_connection_mid_migration_leaves_the_guest_running_on_the_source() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let p = proxy(&dst.addr);
    let mut r = req(&p.addr);
    r.max_bandwidth_mibs = Some(30);
    r.downtime_limit_ms = Some(1);
    r.streams = Some(2);
    let id = src.svc.start("vm1", r).expect("start");
    wait_until(Duration::from_secs(10), "a pass", || {
        !src.svc.get(&id).expect("exists").passes.is_empty()
    });
    p.cut.store(true, Ordering::SeqCst);
    let info = wait_final(&src.svc, &id, Duration::from_secs(40));
    assert_eq!(info.state, MigrationState::Failed, "{info:?}");
    assert_stayed(&src, &dst, &vm, "vm1");
}

#[test]
fn a_wrong_token_is_refused_both_ways() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("other")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let id = src.svc.start("vm1", req(&dst.addr)).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Failed);
    assert_eq!(
        info.error.as_ref().expect("error").code,
        "auth_failed",
        "{info:?}"
    );
    assert_eq!(info.transferred_bytes, 0, "no memory left the source");
    assert_stayed(&src, &dst, &vm, "vm1");
    // An agent with no token and no ticket refuses to start.
    let lone = agent(&rt, None);
    lone.host.add_running("vm2", MEM_MIB);
    assert!(lone.svc.start("vm2", req(&dst.addr)).is_err());
}

#[test]
fn a_one_time_ticket_works_once() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, None), agent(&rt, None));
    src.host.add_running("vm1", MEM_MIB);
    let ticket = dst.svc.issue_ticket("vm1");
    let mut r = req(&dst.addr);
    r.ticket = Some(secret(&ticket));
    let id = src.svc.start("vm1", r.clone()).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    assert_moved(&src, &dst, "vm1");
    // Reusing it (from the target back to a third agent's ticket store) fails.
    let third = agent(&rt, None);
    third.host.add_running("vm3", MEM_MIB);
    let mut r = req(&dst.addr);
    r.ticket = Some(secret(&ticket));
    let id = third.svc.start("vm3", r).expect("start");
    let info = wait_final(&third.svc, &id, Duration::from_secs(10));
    assert_eq!(
        info.error.as_ref().expect("error").code,
        "auth_failed",
        "{info:?}"
    );
    // A ticket for another VM is refused too.
    let mut r = req(&dst.addr);
    r.ticket = Some(secret(&dst.svc.issue_ticket("other")));
    let id = third.svc.start("vm3", r).expect("start");
    let info = wait_final(&third.svc, &id, Duration::from_secs(10));
    assert_eq!(
        info.error.as_ref().expect("error").code,
        "auth_failed",
        "{info:?}"
    );
}

#[test]
fn unclean_target_memory_fails_the_digest_check_and_the_source_resumes() {
    let rt = runtime();
    let mut h = FakeHost::plain(SWEEP_END, Duration::from_micros(1));
    // A byte in the zero area the source never sends: only the digests can see it.
    h.poison_incoming = Some(30 * MIB + 123);
    let (src, dst) = (agent(&rt, Some("tok")), agent_with(&rt, h, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let id = src.svc.start("vm1", req(&dst.addr)).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Failed);
    assert_eq!(
        info.error.as_ref().expect("error").code,
        "digest_mismatch",
        "{info:?}"
    );
    assert_stayed(&src, &dst, &vm, "vm1");
}

#[test]
fn an_incompatible_target_is_refused_before_any_memory() {
    let rt = runtime();
    let mut h = FakeHost::plain(SWEEP_END, Duration::from_micros(1));
    h.cpuid = vec![];
    let (src, dst) = (agent(&rt, Some("tok")), agent_with(&rt, h, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let id = src.svc.start("vm1", req(&dst.addr)).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(
        info.error.as_ref().expect("error").code,
        "incompatible",
        "{info:?}"
    );
    assert_eq!(info.ram_transferred_bytes, 0);
    assert_stayed(&src, &dst, &vm, "vm1");
}

#[test]
fn auto_converge_throttles_a_guest_that_outpaces_the_link_until_it_converges() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    src.host.add_running("vm1", MEM_MIB);
    let mut r = req(&dst.addr);
    r.max_bandwidth_mibs = Some(200);
    // Only a (nearly) stopped guest fits 0 ms: without throttling this never ends.
    r.downtime_limit_ms = Some(0);
    r.auto_converge = Some(true);
    let id = src.svc.start("vm1", r).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(40));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    let throttles: Vec<u8> = info.passes.iter().map(|p| p.throttle_percent).collect();
    assert!(throttles.windows(2).all(|w| w[1] >= w[0]), "{throttles:?}");
    assert!(*throttles.last().expect("passes") >= 20, "{throttles:?}");
    assert_moved(&src, &dst, "vm1");
}

#[test]
fn timeout_cancels_by_default() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let mut r = req(&dst.addr);
    // Passes long enough that the guest surely dirties pages during each, however
    // loaded the machine is.
    r.max_bandwidth_mibs = Some(50);
    r.downtime_limit_ms = Some(0);
    r.timeout_s = Some(1);
    let id = src.svc.start("vm1", r).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Failed, "{info:?}");
    assert_eq!(info.error.as_ref().expect("error").code, "timeout");
    assert_stayed(&src, &dst, &vm, "vm1");
}

#[test]
fn timeout_with_force_switches_over() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    src.host.add_running("vm1", MEM_MIB);
    let mut r = req(&dst.addr);
    r.downtime_limit_ms = Some(0);
    r.timeout_s = Some(1);
    r.timeout_action = Some(super::policy::TimeoutAction::Force);
    let id = src.svc.start("vm1", r).expect("start");
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    assert_moved(&src, &dst, "vm1");
}

/// Not a correctness test: prints the figures of a 1 GiB fake guest (run with
/// `cargo test --release -p agent -- --ignored --nocapture fake_1g`).
#[test]
#[ignore]
fn fake_1g_figures() {
    let rt = runtime();
    for (streams, compression) in [(1u16, "none"), (2, "none"), (2, "lz4")] {
        let host = FakeHost::plain(100 * MIB, Duration::from_micros(5));
        let (src, dst) = (agent_with(&rt, host, Some("tok")), agent(&rt, Some("tok")));
        let vm = src.host.add_running("big", 1024);
        wait_until(Duration::from_secs(20), "first sweep", || {
            vm.sweeps.load(Ordering::SeqCst) > 1
        });
        let mut r = req(&dst.addr);
        r.streams = Some(streams);
        r.compression =
            Some(serde_json::from_value(serde_json::json!(compression)).expect("compression"));
        let id = src.svc.start("big", r).expect("start");
        let info = wait_final(&src.svc, &id, Duration::from_secs(60));
        eprintln!(
            "streams {streams} {compression}: {}",
            serde_json::to_string_pretty(&info).expect("json")
        );
    }
}

mod coordinated;
mod kvm;
