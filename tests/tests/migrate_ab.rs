//! Live migration between two real agents with the KVM A-B sweeper guest, checked the
//! way QEMU's migration test checks it. Skipped (loudly) without /dev/kvm.

mod migrate_support;

use std::time::Duration;

use migrate_support::{Agent, assert_sweeping, kvm_or_skip, wait_until};
use serde_json::json;

const MEM_MIB: u64 = 150;

/// Starts the A-B guest and lets its first, slow sweep (first touch of every page)
/// finish. From then on it dirties ~200k pages/s; a page whose counter changed costs
/// ~20 bytes on the wire (Sparse frames), so only a 1 MiB/s cap (~50k such pages/s)
/// keeps the migration from converging, and only a fully sweeping guest keeps it from
/// converging by accident during the first sweep.
fn start_sweeping(src: &Agent) {
    src.start_ab("ab", MEM_MIB);
    std::thread::sleep(Duration::from_secs(2));
}

/// QEMU-style: force non-convergence (tiny cap, 1 ms downtime) for a few passes, then
/// raise the limits; the target's RAM passes the A-B check and the guest keeps going.
#[test]
fn ram_check_after_forced_non_convergence() {
    if !kvm_or_skip("ram_check_after_forced_non_convergence") {
        return;
    }
    let (src, dst) = (Agent::start(), Agent::start());
    start_sweeping(&src);
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": dst.migration, "max_bandwidth_mibs": 1, "downtime_limit_ms": 1, "timeout_s": 120})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    wait_until(Duration::from_secs(60), "three passes", || {
        src.migration(&id)["passes"]
            .as_array()
            .is_some_and(|p| p.len() >= 3)
    });
    let m = src.migration(&id);
    assert_eq!(
        m["state"], "active",
        "must not converge at 1 MiB/s and 1 ms: {m}"
    );
    assert_eq!(dst.vm_state("ab").as_deref(), Some("incoming"));
    src.ok(
        "PATCH",
        &format!("/v1/migrations/{id}"),
        Some(json!({"max_bandwidth_mibs": 0, "downtime_limit_ms": 2000})),
    );
    let m = src.wait_migration_end(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "completed", "{m}\n{}\n{}", src.log(), dst.log());
    assert!(m["downtime_ms"].as_f64().expect("downtime") > 0.0);
    assert_eq!(src.vm_state("ab"), None, "the source copy is freed");
    assert_eq!(dst.vm_state("ab").as_deref(), Some("running"));
    assert_sweeping(&dst, "ab");
    // The guest's own output goes on too: one more 'B' (every 256 sweeps, ~30 s here).
    let b = dst.console("ab").iter().filter(|c| **c == b'B').count();
    wait_until(
        Duration::from_secs(120),
        "another 'B' on the target",
        || dst.console("ab").iter().filter(|c| **c == b'B').count() > b,
    );
}

/// Cancel mid-migration: the guest stays on the source; then a fresh target works.
#[test]
fn cancel_then_migrate_to_a_fresh_target() {
    if !kvm_or_skip("cancel_then_migrate_to_a_fresh_target") {
        return;
    }
    let (src, dst) = (Agent::start(), Agent::start());
    start_sweeping(&src);
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": dst.migration, "max_bandwidth_mibs": 1, "downtime_limit_ms": 1})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    wait_until(Duration::from_secs(30), "some memory sent", || {
        src.migration(&id)["ram_transferred_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 8 << 20
    });
    src.ok("POST", &format!("/v1/migrations/{id}/cancel"), None);
    let m = src.wait_migration_end(&id, Duration::from_secs(30));
    assert_eq!(m["state"], "cancelled", "{m}");
    assert_eq!(src.vm_state("ab").as_deref(), Some("running"));
    wait_until(
        Duration::from_secs(10),
        "the target to drop its copy",
        || dst.vm_state("ab").is_none(),
    );
    assert_sweeping(&src, "ab");

    let fresh = Agent::start();
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": fresh.migration, "streams": 2})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    let m = src.wait_migration_end(&id, Duration::from_secs(60));
    assert_eq!(
        m["state"],
        "completed",
        "{m}\n{}\n{}",
        src.log(),
        fresh.log()
    );
    assert_eq!(src.vm_state("ab"), None);
    assert_sweeping(&fresh, "ab");
}

/// Kill the target mid-migration: the source still runs and its RAM passes the check.
#[test]
fn killed_target_leaves_the_guest_running_on_the_source() {
    if !kvm_or_skip("killed_target_leaves_the_guest_running_on_the_source") {
        return;
    }
    let (src, mut dst) = (Agent::start(), Agent::start());
    start_sweeping(&src);
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": dst.migration, "max_bandwidth_mibs": 1, "downtime_limit_ms": 1})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    wait_until(Duration::from_secs(30), "some memory sent", || {
        src.migration(&id)["ram_transferred_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 8 << 20
    });
    dst.kill();
    let m = src.wait_migration_end(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "failed", "{m}");
    assert_eq!(m["error"]["code"], "connection", "{m}");
    assert_eq!(src.vm_state("ab").as_deref(), Some("running"));
    assert_sweeping(&src, "ab");
}
