//! `coord migrate` edge cases with real agents: cancel during pre-copy, per-host and
//! per-site limits, `--offline`. (Moving back and forth with disk checks:
//! coord_disk.rs.)

mod coord_support;

use std::time::Duration;

use coord_support::Cluster;

/// A migration that stays in pre-copy until released or cancelled. (A slow link and a
/// tiny downtime limit are not enough: under dirty logging the A-B guest dirties few
/// pages per pass here, each sent in a few bytes, so such a migration converged.)
fn slow_migrate(vm: &str) -> [&str; 7] {
    ["migrate", vm, "--to", "siteB", "--bandwidth", "1", "--hold"]
}

#[test]
fn cancel_keeps_the_guest_on_the_source() {
    let Some(c) = Cluster::registered_or_skip("cancel_keeps_the_guest_on_the_source") else {
        return;
    };
    let guest = c.guest.display().to_string();
    c.ok(&[
        "vm", "create", "vm7", "--site", "siteA", "--memory", "256M", "--image", &guest, "--disk",
        "16M",
    ]);
    // Held: pre-copy goes on until the cancel below.
    let m = c.ok(&slow_migrate("vm7"));
    let id = m["id"].as_str().expect("id").to_owned();
    c.wait_precopy(&id);
    // Held: passes go on (however little is left) and it stays in pre-copy.
    c.wait_for("held pre-copy passes", Duration::from_secs(60), |c| {
        let (ok, m, _) = c.cli(&["migration", "show", &id]);
        assert!(ok && m["state"] == "precopy" && m["hold"] == true, "{m}");
        (m["passes"].as_u64().unwrap_or(0) >= 4).then_some(())
    });
    c.ok(&["migration", "cancel", &id]);
    let m = c.wait_migration(&id, Duration::from_secs(60));
    assert_eq!(m["phase"]["phase"], "cancelled", "{m}");
    assert_eq!(m["state"], "cancelled", "{m}");
    assert_eq!(c.lease("vm7-disk0"), ("kvm-a1".to_owned(), 1));
    assert_eq!(c.agent_vm_state(0, "vm7"), "running");
    let vm = c.ok(&["vm", "show", "vm7"]);
    assert_eq!(vm["host"], "kvm-a1");
    assert_eq!(vm["state"], "running");
    // The target has no copy left (the agent drops it when the stream ends).
    c.wait_absent(1, "vm7");
}

#[test]
fn limits_and_offline_move() {
    let Some(mut c) = Cluster::registered_or_skip("limits_and_offline_move") else {
        return;
    };
    let guest = c.guest.display().to_string();
    for vm in ["vm1", "vm2", "vm3"] {
        c.ok(&[
            "vm", "create", vm, "--site", "siteA", "--memory", "128M", "--image", &guest, "--disk",
            "8M",
        ]);
    }
    // Two slow migrations occupy kvm-a1 (limit 2 per host): a third is refused.
    let m1 = c.ok(&slow_migrate("vm1"));
    let m2 = c.ok(&slow_migrate("vm2"));
    let err = c.fails(&["migrate", "vm3", "--to", "siteB"]);
    assert!(err.contains("too_many_migrations"), "{err}");
    let err = c.fails(&["migrate", "vm1", "--to", "siteB"]);
    assert!(err.contains("vm_migrating"), "{err}");
    let err = c.fails(&["vm", "delete", "vm1"]);
    assert!(err.contains("vm_migrating"), "{err}");
    for m in [&m1, &m2] {
        let id = m["id"].as_str().expect("id");
        c.ok(&["migration", "cancel", id]);
        assert_eq!(
            c.wait_migration(id, Duration::from_secs(60))["state"],
            "cancelled"
        );
    }
    // Offline: the guest pauses on the source, its memory and state move, it resumes on
    // the target; the lease follows.
    let m = c.ok(&[
        "migrate",
        "vm3",
        "--to",
        "siteB",
        "--offline",
        "--wait",
        "--wait-timeout-s",
        "60",
    ]);
    assert_eq!(m["state"], "committed", "{m}");
    assert!(
        m["memory_bytes"].as_u64().unwrap_or(0) > 0,
        "an offline move carries the guest's memory (no cold boot): {m}"
    );
    assert_eq!(c.lease("vm3-disk0"), ("kvm-b1".to_owned(), 2));
    assert_eq!(c.agent_vm_state(1, "vm3"), "running");
    assert_eq!(c.agent_vm_state(0, "vm3"), "absent");
    let m = c.ok(&["migration", "show", m["id"].as_str().unwrap_or("")]);
    let phases: Vec<&str> = m["journal"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["phase"]["phase"].as_str())
        .collect();
    assert_eq!(
        phases,
        [
            "planned",
            "precopy",
            "quiesced",
            "fencing",
            "fenced",
            "target_running",
            "committed"
        ]
    );

    // Per site: with one migration allowed per site, a second one from siteA waits.
    if let Some(p) = c.coord.as_mut() {
        p.kill();
    }
    c.start_coord_with(&["--max-migrations-per-site", "1"], &[]);
    // Held, but not capped: once released it converges at the link's speed (at
    // 1 MiB/s the A-B guest can dirty more per pass than the cap moves).
    let m1 = c.ok(&["migrate", "vm1", "--to", "siteB", "--hold"]);
    let err = c.fails(&["migrate", "vm2", "--host", "kvm-b1"]);
    assert!(
        err.contains("too_many_migrations") && err.contains("Site siteA"),
        "{err}"
    );
    let id = m1["id"].as_str().expect("id");
    // Released, the held migration switches over on its own.
    let err = c.fails(&["migration", "release", m["id"].as_str().unwrap_or("")]);
    assert!(err.contains("migration_finished"), "{err}");
    c.wait_precopy(id);
    c.ok(&["migration", "release", id]);
    let done = c.wait_migration(id, Duration::from_secs(60));
    assert_eq!(done["state"], "committed", "{done}");
    assert_eq!(done["hold"], false, "{done}");
    assert_eq!(c.lease("vm1-disk0"), ("kvm-b1".to_owned(), 2));
    assert_eq!(c.agent_vm_state(1, "vm1"), "running");
}
