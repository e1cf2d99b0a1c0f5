//! The end to end, real processes on loopback: one stagehand-nbd reachable
//! from two sites, an agent per site, `coord serve`, and the disk-writer guest writing
//! numbered records to its leased disk while it moves.
//!
//! - back and forth five times with the coordinated switchover: after each move the
//!   guest is paused, its RAM dumped and its disk read read-only through NBD, and the
//!   agent's checkers (`check_disk_records`, `check_ab_ram`) pass; epochs only grow;
//!   the previous holder's token is refused;
//! - cancelled after the fence, and the target agent killed (kill -9) after the
//!   fence: the guest resumes on the source under a new, higher epoch and its disk
//!   checks out.

mod coord_support;

use std::time::{Duration, Instant};

use coord_support::{Cluster, HeldWriter, token_refused};

const EXPORT: &str = "vm7-disk0";

fn create_writer(c: &Cluster) {
    let guest = c.guest_image("disk-writer").display().to_string();
    c.ok(&[
        "vm", "create", "vm7", "--site", "siteA", "--memory", "128M", "--image", &guest, "--disk",
        "16M",
    ]);
}

#[test]
fn disk_writer_moves_back_and_forth_five_times() {
    let Some(c) = Cluster::registered_or_skip("disk_writer_moves_back_and_forth_five_times") else {
        return;
    };
    create_writer(&c);
    c.wait_guest_progress(0, "vm7");
    let mut acked = c.check_disk_writer(0, "vm7", EXPORT);
    let (_, mut epoch) = c.lease(EXPORT);
    assert_eq!(epoch, 1);
    let mut at = 0usize;
    for round in 0..5 {
        let (to_site, to_host, to_idx) = if at == 0 {
            ("siteB", "kvm-b1", 1usize)
        } else {
            ("siteA", "kvm-a1", 0)
        };
        let old = c.lease_tokens("vm7");
        assert_eq!(old.len(), 1, "one disk: {old:?}");
        // A connection under the holder's token, opened before the move (past the
        // sectors the guest writes, so a write that wrongly lands harms no record).
        let held = HeldWriter::open(&c.nbd.nbd, EXPORT, &old[0].2);
        let t0 = Instant::now();
        let m = c.ok(&[
            "migrate",
            "vm7",
            "--to",
            to_site,
            "--downtime-ms",
            "300",
            "--wait",
            "--wait-timeout-s",
            "120",
        ]);
        eprintln!(
            "round {round} -> {to_site}: cli {} ms, total {} ms, downtime {} ms, fence {} us, handover {} ms, memory {} B, passes {}",
            t0.elapsed().as_millis(),
            m["total_ms"],
            m["downtime_ms"],
            m["fence_us"],
            m["handover_ms"],
            m["memory_bytes"],
            m["passes"]
        );
        assert_eq!(m["state"], "committed", "{m}");
        let id = m["id"].as_str().unwrap_or("").to_owned();
        assert_eq!(
            c.journal_phases(&id),
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
        let (holder, e) = c.lease(EXPORT);
        assert_eq!(holder, to_host);
        assert!(e > epoch, "epoch must grow: {e} after {epoch}");
        epoch = e;
        let vm = c.ok(&["vm", "show", "vm7"]);
        assert_eq!(vm["host"], to_host);
        assert_eq!(vm["disks"][0]["epoch"], epoch);
        assert_eq!(c.running_on("vm7"), vec![to_host], "exactly one copy runs");
        // The guest goes on writing on the target, and what it acknowledged anywhere
        // is on the disk.
        c.wait_guest_progress(to_idx, "vm7");
        let now = c.check_disk_writer(to_idx, "vm7", EXPORT);
        assert!(
            now > acked,
            "round {round}: no new acknowledged write on the target ({now} <= {acked})"
        );
        acked = now;
        // Past the node's 100 ms grace the fenced connection is closed: refused either way.
        held.assert_fenced(&c.nbd.nbd, EXPORT, &c.read_token("vm7"), 4 << 20);
        drop(held);
        assert!(
            token_refused(&c.nbd.nbd, EXPORT, &old[0].2),
            "round {round}: the previous holder's token (epoch {}) must be refused",
            old[0].0
        );
        at = to_idx;
    }
    // The target's console shows the guest alive after the last move.
    c.wait_guest_progress(at, "vm7");
}

/// Starts a migration of vm7 to siteB with the coordinator held at `fenced`; returns
/// the migration id once the hold point is reached.
fn migrate_until_fenced(c: &Cluster, go: &std::path::Path) -> String {
    let held = go.with_extension("held");
    let _ = std::fs::remove_file(go);
    let _ = std::fs::remove_file(&held);
    let m = c.ok(&["migrate", "vm7", "--to", "siteB", "--downtime-ms", "300"]);
    let id = m["id"].as_str().expect("migration id").to_owned();
    c.wait_for(
        "the coordinator to reach the fenced hold point",
        Duration::from_secs(90),
        |_| held.exists().then_some(()),
    );
    id
}

#[test]
fn failure_after_the_fence_rolls_back_under_a_new_epoch() {
    let Some(mut c) =
        Cluster::registered_or_skip("failure_after_the_fence_rolls_back_under_a_new_epoch")
    else {
        return;
    };
    let go = c.dir.path().join("go");
    if let Some(p) = c.coord.as_mut() {
        p.kill();
    }
    let hold = format!("fenced:{}", go.display());
    c.start_coord(&[("STAGEHAND_COORD_HOLD", hold.as_str())]);
    create_writer(&c);
    c.wait_guest_progress(0, "vm7");
    c.check_disk_writer(0, "vm7", EXPORT);

    // 1. Cancelled after the fence, before the go-ahead: the disks come back.
    let before = c.lease_tokens("vm7");
    let held = HeldWriter::open(&c.nbd.nbd, EXPORT, &before[0].2);
    let id = migrate_until_fenced(&c, &go);
    // Right after the fence (the coordinator holds): the source's old binding.
    let errno = held.assert_fenced(&c.nbd.nbd, EXPORT, &c.read_token("vm7"), 4 << 20);
    eprintln!(
        "write under the epoch-1 token right after the fence: errno {errno:?} (1 = EPERM; None = closed)"
    );
    drop(held);
    let fenced = c.lease_tokens("vm7");
    assert_eq!((fenced[0].0, fenced[0].1.as_str()), (2, "kvm-b1"));
    c.ok(&["migration", "cancel", &id]);
    std::fs::write(&go, b"").expect("release the hold");
    let m = c.wait_migration(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "rolled_back", "{m}");
    assert_eq!(c.lease(EXPORT), ("kvm-a1".to_owned(), 3));
    assert_eq!(c.running_on("vm7"), vec!["kvm-a1"]);
    c.check_disk_writer(0, "vm7", EXPORT);
    for (e, _, t) in before.iter().chain(&fenced) {
        assert!(
            token_refused(&c.nbd.nbd, EXPORT, t),
            "token of epoch {e} must be refused"
        );
    }
    let err = c.fails(&["migration", "cancel", &id]);
    assert!(err.contains("migration_finished"), "{err}");

    // 2. The target agent killed (kill -9) after the fence: the source resumes under
    // a new epoch once its stream broke.
    let before = c.lease_tokens("vm7");
    let id = migrate_until_fenced(&c, &go);
    let fenced = c.lease_tokens("vm7");
    assert_eq!((fenced[0].0, fenced[0].1.as_str()), (4, "kvm-b1"));
    c.agents[1].proc.kill();
    std::fs::write(&go, b"").expect("release the hold");
    let m = c.wait_migration(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "rolled_back", "{m}");
    let phases = c.journal_phases(&id);
    assert_eq!(
        phases,
        [
            "planned",
            "precopy",
            "quiesced",
            "fencing",
            "fenced",
            "rolling_back",
            "rolled_back"
        ]
    );
    assert_eq!(c.lease(EXPORT), ("kvm-a1".to_owned(), 5));
    assert_eq!(c.agent_vm_state(0, "vm7"), "running");
    let vm = c.ok(&["vm", "show", "vm7"]);
    assert_eq!(vm["host"], "kvm-a1");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["disks"][0]["epoch"], 5);
    c.wait_guest_progress(0, "vm7");
    c.check_disk_writer(0, "vm7", EXPORT);
    for (e, _, t) in before.iter().chain(&fenced) {
        assert!(
            token_refused(&c.nbd.nbd, EXPORT, t),
            "token of epoch {e} must be refused"
        );
    }
}
