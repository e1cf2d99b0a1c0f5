//! Coordinated switchover between two real agents with the KVM A-B sweeper guest: the
//! source quiesces and waits for the coordinator's go-ahead (`POST .../switchover`),
//! never resuming on its own once quiesced. Skipped (loudly) without /dev/kvm.

mod migrate_support;

use std::time::{Duration, Instant};

use migrate_support::{Agent, assert_sweeping, kvm_or_skip, wait_until};
use serde_json::json;

const MEM_MIB: u64 = 150;

/// Starts a coordinated migration of `ab` and waits until it is quiesced.
fn quiesce(src: &Agent, dst: &Agent) -> String {
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": dst.migration, "switchover": "coordinated", "timeout_s": 120})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    let t = Instant::now();
    loop {
        let m = src.migration(&id);
        match m["state"].as_str().unwrap_or("") {
            "quiesced" => break,
            "completed" | "failed" | "cancelled" => {
                panic!("ended before quiescing: {m}\n{}\n{}", src.log(), dst.log())
            }
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never quiesced: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = src.migration(&id);
    assert!(m["quiesced_at_ms"].as_f64().is_some_and(|t| t > 0.0), "{m}");
    // Paused at the source (its RAM cannot even be dumped: it is migrating), and the
    // target's copy exists but does not run.
    assert_eq!(src.vm_state("ab").as_deref(), Some("migrating"));
    assert_eq!(dst.vm_state("ab").as_deref(), Some("incoming"));
    id
}

/// Dumps the paused VM's RAM twice, `gap` apart: equal dumps mean no vCPU ran.
fn assert_stays_paused(a: &Agent, gap: Duration) {
    let dump = |n: u32| {
        let p = a.data_dir().join(format!("still{n}.ram"));
        a.ok("POST", "/v1/vms/ab/memory-dump", Some(json!({"path": p})));
        let ram = std::fs::read(&p).expect("read dump");
        let _ = std::fs::remove_file(&p);
        ram
    };
    let first = dump(0);
    std::thread::sleep(gap);
    let second = dump(1);
    assert!(first == second, "the paused source ran: its RAM changed");
    if let Err(e) = agent::guests::check_ab_ram(&first) {
        panic!("A-B RAM check failed on the paused source: {e}");
    }
}

#[test]
fn coordinated_switchover_completes_after_the_go_ahead() {
    if !kvm_or_skip("coordinated_switchover_completes_after_the_go_ahead") {
        return;
    }
    let (src, dst) = (Agent::start(), Agent::start());
    src.start_ab("ab", MEM_MIB);
    let id = quiesce(&src, &dst);
    // The coordinator's fence takes a while; the target must not start meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.migration(&id)["state"], "quiesced");
    assert_eq!(dst.vm_state("ab").as_deref(), Some("incoming"));
    let (s, v) = src.request(
        "POST",
        &format!("/v1/migrations/{id}/switchover"),
        Some(json!({"disks": [{"nbd": "nbd://x:1/y", "lease": "z"}]})),
    );
    assert_eq!(s, 400, "one disk for a VM without disks: {v}");
    // The old shape (a bare URI, the token in it) is refused.
    let (s, v) = src.request(
        "POST",
        &format!("/v1/migrations/{id}/switchover"),
        Some(json!({"disks": ["nbd://x:1/y;lease=z"]})),
    );
    assert_eq!(s, 400, "a bare URI: {v}");
    assert_eq!(src.migration(&id)["state"], "quiesced");
    src.ok(
        "POST",
        &format!("/v1/migrations/{id}/switchover"),
        Some(json!({"disks": []})),
    );
    let m = src.wait_migration_end(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "completed", "{m}\n{}\n{}", src.log(), dst.log());
    let wait = m["downtime"]["switchover_wait_ms"].as_f64().expect("wait");
    assert!(
        wait >= 300.0 && wait <= m["downtime_ms"].as_f64().expect("downtime"),
        "{m}"
    );
    eprintln!(
        "coordinated: total {} ms, downtime {} ms (switchover wait {wait} ms, complete {} ms)",
        m["total_ms"], m["downtime_ms"], m["downtime"]["complete_ms"]
    );
    // Too late for a second go-ahead or a cancel.
    for path in ["switchover", "cancel"] {
        let (s, v) = src.request(
            "POST",
            &format!("/v1/migrations/{id}/{path}"),
            Some(json!({"disks": []})),
        );
        assert_eq!(s, 409, "{path}: {v}");
    }
    assert_eq!(src.vm_state("ab"), None, "the source copy is freed");
    assert_eq!(dst.vm_state("ab").as_deref(), Some("running"));
    assert_sweeping(&dst, "ab");
}

#[test]
fn cancel_while_quiesced_resumes_the_source() {
    if !kvm_or_skip("cancel_while_quiesced_resumes_the_source") {
        return;
    }
    let (src, dst) = (Agent::start(), Agent::start());
    src.start_ab("ab", MEM_MIB);
    let id = quiesce(&src, &dst);
    src.ok("POST", &format!("/v1/migrations/{id}/cancel"), None);
    let m = src.wait_migration_end(&id, Duration::from_secs(30));
    assert_eq!(m["state"], "cancelled", "{m}\n{}", src.log());
    let (s, v) = src.request(
        "POST",
        &format!("/v1/migrations/{id}/switchover"),
        Some(json!({"disks": []})),
    );
    assert_eq!(s, 409, "{v}");
    assert_eq!(src.vm_state("ab").as_deref(), Some("running"));
    assert_sweeping(&src, "ab");
    wait_until(Duration::from_secs(40), "the target to discard", || {
        dst.vm_state("ab").is_none()
    });
}

#[test]
fn killed_target_while_quiesced_leaves_the_source_paused() {
    if !kvm_or_skip("killed_target_while_quiesced_leaves_the_source_paused") {
        return;
    }
    let (src, mut dst) = (Agent::start(), Agent::start());
    src.start_ab("ab", MEM_MIB);
    let id = quiesce(&src, &dst);
    dst.kill();
    let m = src.wait_migration_end(&id, Duration::from_secs(40));
    assert_eq!(m["state"], "failed", "{m}\n{}", src.log());
    assert_eq!(src.vm_state("ab").as_deref(), Some("paused"), "{m}");
    // It stays paused: the agent does not resume it on its own.
    assert_stays_paused(&src, Duration::from_secs(1));
    assert_eq!(src.vm_state("ab").as_deref(), Some("paused"));
    // The operator (or coordinator) resumes it; the guest sweeps on from where it was.
    let b = src.console("ab").iter().filter(|c| **c == b'B').count();
    src.ok("POST", "/v1/vms/ab/resume", None);
    assert_eq!(src.vm_state("ab").as_deref(), Some("running"));
    assert_sweeping(&src, "ab");
    wait_until(
        Duration::from_secs(120),
        "another 'B' on the source",
        || src.console("ab").iter().filter(|c| **c == b'B').count() > b,
    );
}
