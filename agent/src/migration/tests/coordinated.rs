//! Coordinated switchover over real TCP with the fake VM: the quiesced source waits
//! for the go-ahead; cancel, abort, cut streams and timeouts.

use super::*;

fn coordinated(target: &str) -> MigrateRequest {
    let mut r = req(target);
    r.switchover = Some(SwitchoverMode::Coordinated);
    r
}

fn wait_quiesced(svc: &MigrationService, id: &str) -> MigrationInfo {
    let t = Instant::now();
    loop {
        let i = svc.get(id).expect("migration exists");
        if i.state == MigrationState::Quiesced {
            return i;
        }
        assert!(!i.state.is_final(), "ended before quiescing: {i:?}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never quiesced: {i:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Quiesced: the source is paused and stays so; the target holds a copy that neither
/// runs nor has its disks set.
fn assert_quiesced(src: &Agent, dst: &Agent, vm: &FakeVm, name: &str) {
    assert!(vm.is_paused(), "the quiesced source must be paused");
    let s0 = vm.sweeps.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.sweeps.load(Ordering::SeqCst), s0, "source guest ran");
    assert_eq!(src.host.get(name).expect("source").1, FakeState::Migrating);
    if let Some((t, st)) = dst.host.get(name) {
        assert_eq!(st, FakeState::Incoming);
        assert!(t.is_paused(), "target must not run before the go-ahead");
        assert!(
            t.disks.lock().expect("disks").is_none(),
            "target must not touch its disks before the go-ahead"
        );
    }
}

/// The quiesced source failed: it stays paused (state paused) and is not resumed by
/// the agent; the target discards its copy. Resuming it by hand works and the RAM
/// check passes.
fn assert_failed_paused(src: &Agent, dst: &Agent, vm: &FakeVm, name: &str) {
    assert_eq!(
        src.host.get(name).expect("source keeps it").1,
        FakeState::Paused
    );
    let s0 = vm.sweeps.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert!(vm.is_paused());
    assert_eq!(
        vm.sweeps.load(Ordering::SeqCst),
        s0,
        "source resumed on its own"
    );
    wait_until(Duration::from_secs(40), "target to discard the VM", || {
        dst.host.get(name).is_none()
    });
    MigrationSource::resume(vm).expect("resume");
    wait_until(Duration::from_secs(10), "sweeps after resume", || {
        vm.sweeps.load(Ordering::SeqCst) > s0 + 2
    });
    MigrationSource::pause(vm).expect("pause");
    vm.check_ab().expect("source RAM passes the A-B check");
    MigrationSource::resume(vm).expect("resume");
}

#[test]
fn coordinated_switchover_waits_for_the_go_ahead_and_uses_its_disks() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let lease = |t: &str| Some(stagehand_common::secret::Secret::new(t).expect("token"));
    let old = vec![DiskSpec {
        nbd: "nbd://src:10809/vm1-root".into(),
        lease: lease("OLD"),
    }];
    let vm = src.host.add_running_with_disks("vm1", MEM_MIB, old);
    wait_until(Duration::from_secs(5), "first sweep", || {
        vm.sweeps.load(Ordering::SeqCst) > 0
    });
    let mut r = coordinated(&dst.addr);
    r.streams = Some(2);
    let id = src.svc.start("vm1", r).expect("start");
    let q = wait_quiesced(&src.svc, &id);
    assert!(q.quiesced_at_ms.is_some_and(|t| t > 0.0), "{q:?}");
    // The fence takes a while; everything waits meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    assert_quiesced(&src, &dst, &vm, "vm1");
    assert_eq!(
        src.svc.get(&id).expect("exists").state,
        MigrationState::Quiesced
    );
    // A go-ahead with the wrong number of disks is refused and changes nothing.
    assert!(matches!(
        src.svc.switchover(&id, SwitchoverRequest { disks: vec![] }),
        Err(crate::migration::service::ServiceError::BadRequest(_))
    ));
    let new = vec![DiskSpec {
        nbd: "nbd://dst:10809/vm1-root".into(),
        lease: lease("NEW"),
    }];
    // A token in the URI is refused (lease_in_uri), and changes nothing.
    assert!(matches!(
        src.svc.switchover(
            &id,
            SwitchoverRequest {
                disks: vec![DiskSpec::plain("nbd://dst:10809/vm1-root;lease=NEW")]
            }
        ),
        Err(crate::migration::service::ServiceError::LeaseInUri(_))
    ));
    let go = SwitchoverRequest { disks: new.clone() };
    src.svc.switchover(&id, go.clone()).expect("go-ahead");
    // Repeating the same go-ahead is harmless; cancelling after it is not allowed.
    let again = src.svc.switchover(&id, go.clone());
    let info = wait_final(&src.svc, &id, Duration::from_secs(30));
    assert_eq!(info.state, MigrationState::Completed, "{info:?}");
    if let Err(e) = again {
        assert!(
            matches!(e, crate::migration::service::ServiceError::WrongState(_)),
            "{e}"
        );
    }
    assert!(src.svc.cancel(&id).is_err());
    assert!(
        src.svc.switchover(&id, go).is_err(),
        "a completed migration takes no go-ahead"
    );
    let d = &info.downtime;
    assert!(
        d.switchover_wait_ms >= 300.0 && d.switchover_wait_ms <= info.downtime_ms,
        "{info:?}"
    );
    assert!(info.go_ahead_at_ms.is_some());
    let (t, _) = dst.host.get("vm1").expect("target has it");
    assert_eq!(
        *t.disks.lock().expect("disks"),
        Some(new),
        "target got the go-ahead's URIs"
    );
    assert_moved(&src, &dst, "vm1");
}

#[test]
fn cancel_while_quiesced_resumes_the_source() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let id = src.svc.start("vm1", coordinated(&dst.addr)).expect("start");
    wait_quiesced(&src.svc, &id);
    assert_quiesced(&src, &dst, &vm, "vm1");
    src.svc.cancel(&id).expect("cancel while quiesced");
    assert!(
        matches!(
            src.svc.switchover(&id, SwitchoverRequest { disks: vec![] }),
            Err(crate::migration::service::ServiceError::WrongState(_)
                | crate::migration::service::ServiceError::Ended(_))
        ),
        "no go-ahead after a cancel"
    );
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Cancelled, "{info:?}");
    assert_stayed(&src, &dst, &vm, "vm1");
}

#[test]
fn abort_while_quiesced_fails_at_once_and_leaves_the_source_paused() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    // Before quiesce there is nothing to abort: cancel is the call then.
    let mut r = coordinated(&dst.addr);
    r.switchover_timeout_s = Some(60);
    let id = src.svc.start("vm1", r).expect("start");
    let q = wait_quiesced(&src.svc, &id);
    assert_quiesced(&src, &dst, &vm, "vm1");
    src.svc.abort(&id).expect("abort while quiesced");
    src.svc.abort(&id).ok(); // repeating it is harmless
    assert!(
        src.svc.cancel(&id).is_err(),
        "an aborted migration cannot become a cancel (that would resume the source)"
    );
    assert!(
        src.svc
            .switchover(&id, SwitchoverRequest { disks: vec![] })
            .is_err(),
        "no go-ahead after an abort"
    );
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Failed, "{info:?}");
    assert_eq!(info.error.as_ref().expect("error").code, "aborted");
    let waited = info.total_ms - q.quiesced_at_ms.expect("quiesced at");
    assert!(
        waited < 10_000.0,
        "abort must not wait for the 60 s switchover timeout: {info:?}"
    );
    assert_failed_paused(&src, &dst, &vm, "vm1");
}

#[test]
fn a_cut_stream_while_quiesced_fails_and_leaves_the_source_paused() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let p = proxy(&dst.addr);
    let id = src.svc.start("vm1", coordinated(&p.addr)).expect("start");
    wait_quiesced(&src.svc, &id);
    // Let the last pages, state and digests through first: the source then only waits.
    std::thread::sleep(Duration::from_millis(300));
    p.cut.store(true, Ordering::SeqCst);
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Failed, "{info:?}");
    assert_eq!(info.error.as_ref().expect("error").code, "connection");
    assert!(
        src.svc
            .switchover(&id, SwitchoverRequest { disks: vec![] })
            .is_err(),
        "no go-ahead after the failure"
    );
    assert_failed_paused(&src, &dst, &vm, "vm1");
}

#[test]
fn no_go_ahead_in_time_fails_and_leaves_the_source_paused() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    let vm = src.host.add_running("vm1", MEM_MIB);
    let mut r = coordinated(&dst.addr);
    r.switchover_timeout_s = Some(1);
    let id = src.svc.start("vm1", r).expect("start");
    let q = wait_quiesced(&src.svc, &id);
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Failed, "{info:?}");
    assert_eq!(
        info.error.as_ref().expect("error").code,
        "switchover_timeout"
    );
    let waited = info.total_ms - q.quiesced_at_ms.expect("quiesced at");
    assert!(waited >= 900.0, "gave up after {waited} ms: {info:?}");
    assert!(matches!(
        src.svc.switchover(&id, SwitchoverRequest { disks: vec![] }),
        Err(crate::migration::service::ServiceError::WrongState(_))
    ));
    assert_failed_paused(&src, &dst, &vm, "vm1");
}

#[test]
fn auto_mode_refuses_a_go_ahead_and_a_quiesced_failure_is_not_a_cancel() {
    let rt = runtime();
    let (src, dst) = (agent(&rt, Some("tok")), agent(&rt, Some("tok")));
    src.host.add_running("vm1", MEM_MIB);
    let mut r = req(&dst.addr);
    r.max_bandwidth_mibs = Some(20);
    r.downtime_limit_ms = Some(1);
    let id = src.svc.start("vm1", r).expect("start");
    assert!(matches!(
        src.svc.switchover(&id, SwitchoverRequest { disks: vec![] }),
        Err(crate::migration::service::ServiceError::WrongState(_))
    ));
    src.svc.cancel(&id).expect("cancel");
    wait_final(&src.svc, &id, Duration::from_secs(10));
    // Coordinated, but still copying (it cannot converge under 1 ms): no go-ahead yet.
    let mut r = coordinated(&dst.addr);
    r.max_bandwidth_mibs = Some(20);
    r.downtime_limit_ms = Some(1);
    let id = src.svc.start("vm1", r).expect("start");
    assert!(matches!(
        src.svc.switchover(&id, SwitchoverRequest { disks: vec![] }),
        Err(crate::migration::service::ServiceError::WrongState(_))
    ));
    // A cancel before quiescing is an ordinary cancel.
    src.svc.cancel(&id).expect("cancel");
    let info = wait_final(&src.svc, &id, Duration::from_secs(10));
    assert_eq!(info.state, MigrationState::Cancelled, "{info:?}");
    assert_eq!(src.host.get("vm1").expect("vm").1, FakeState::Running);
}
