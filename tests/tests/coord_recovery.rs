//! The coordinator killed during a migration, then restarted on the same state: it
//! drives the migration on at once (figures advance, a cancel works), and it ends
//! with exactly one running copy whose host holds the disk lease, and the
//! disk-writer guest's disk checks out.

mod coord_support;

use std::time::Duration;

use coord_support::Cluster;

#[test]
fn killed_at_each_phase_recovers_to_one_copy_holding_the_lease() {
    let Some(mut c) =
        Cluster::registered_or_skip("killed_at_each_phase_recovers_to_one_copy_holding_the_lease")
    else {
        return;
    };
    let guest = c.guest_image("disk-writer").display().to_string();
    for (n, phase) in [
        "planned",
        "precopy",
        "quiesced",
        "fencing",
        "fenced",
        "target_running",
    ]
    .iter()
    .enumerate()
    {
        let vm = format!("vm{n}");
        c.ok(&[
            "vm", "create", &vm, "--site", "siteA", "--memory", "128M", "--image", &guest,
            "--disk", "8M",
        ]);
        let export = format!("{vm}-disk0");
        // Restart the coordinator with the fail point armed.
        if let Some(p) = c.coord.as_mut() {
            p.kill();
        }
        c.start_coord(&[("STAGEHAND_COORD_FAILPOINT", phase)]);
        let _ = c.cli(&["migrate", &vm, "--to", "siteB"]);
        let died = c
            .coord
            .as_mut()
            .map(|p| p.wait_exit(Duration::from_secs(60)))
            .unwrap_or(false);
        assert!(died, "coordinator did not stop at fail point {phase}");
        c.start_coord(&[]);
        let list = c.ok(&["migration", "list"]);
        let id = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["vm"] == vm.as_str())
            .and_then(|m| m["id"].as_str())
            .map(str::to_owned);
        let Some(id) = id else {
            panic!("no migration journaled for {vm} at {phase}: {list}");
        };
        let m = c.wait_migration(&id, Duration::from_secs(90));
        let shown = c.ok(&["vm", "show", &vm]);
        let host = shown["host"].as_str().unwrap_or("").to_owned();
        let (a, b) = (c.agent_vm_state(0, &vm), c.agent_vm_state(1, &vm));
        let running: Vec<&str> = [("kvm-a1", &a), ("kvm-b1", &b)]
            .iter()
            .filter(|(_, s)| s.as_str() == "running")
            .map(|(h, _)| *h)
            .collect();
        assert_eq!(
            running,
            vec![host.as_str()],
            "phase {phase}: exactly one copy must run on the VM's host (a={a}, b={b}, migration {m})"
        );
        let (holder, epoch) = c.lease(&export);
        assert_eq!(
            holder, host,
            "phase {phase}: the running host must hold the lease"
        );
        assert_eq!(
            shown["disks"][0]["epoch"], epoch,
            "phase {phase}: recorded epoch matches storage"
        );
        assert_eq!(shown["state"], "running", "phase {phase}");
        // The restarted coordinator drives the migration on from its journal with
        // the same driver: before the fence intent the agents' migration goes on (or
        // starts), after it the quiesced source gets the go-ahead with tokens of a
        // fresh epoch. Either way it ends on the target.
        assert_eq!(m["state"], "committed", "phase {phase}: {m}");
        assert!(epoch >= 2);
        let idx = if host == "kvm-a1" { 0 } else { 1 };
        c.check_disk_writer(idx, &vm, &export);
        // One guest at a time: the machine has few cores.
        c.ok(&["vm", "delete", &vm]);
        eprintln!(
            "fail point {phase}: ended {} on {host} at epoch {epoch}",
            m["state"]
        );
    }
}

/// kill -9 during a bandwidth-capped pre-copy, restart: the migration is driven again
/// at once. Its figures advance, and a cancel is accepted within seconds (it used to
/// answer `not_driven` until the agents finished moving memory) and leaves the guest
/// running on the source with its lease and a disk that checks out.
#[test]
fn killed_during_capped_precopy_is_driven_again_at_once() {
    let Some(mut c) =
        Cluster::registered_or_skip("killed_during_capped_precopy_is_driven_again_at_once")
    else {
        return;
    };
    let guest = c.guest_image("disk-writer").display().to_string();
    c.ok(&[
        "vm", "create", "vmc", "--site", "siteA", "--memory", "256M", "--image", &guest, "--disk",
        "8M",
    ]);
    // A freshly booted guest dirties little: wait until it wrote 4096 records (its
    // second console byte, 'W') and so sweeps at full speed.
    c.wait_for(
        "the guest writing at full speed",
        Duration::from_secs(60),
        |c| (c.console_len(0, "vmc") >= 2).then_some(()),
    );
    // Held at 1 MiB/s: pre-copy goes on until the cancel below (the hold is in the
    // journaled options, so it outlives the coordinator restart).
    let v = c.ok(&[
        "migrate",
        "vmc",
        "--to",
        "siteB",
        "--bandwidth",
        "1",
        "--hold",
    ]);
    let id = v["id"].as_str().expect("migration id").to_owned();
    let moved = |c: &Cluster| -> (String, u64) {
        let (ok, m, _) = c.cli(&["migration", "show", &id]);
        assert!(ok, "migration show {id}");
        (
            m["state"].as_str().unwrap_or("").to_owned(),
            m["memory_bytes"].as_u64().unwrap_or(0),
        )
    };
    c.wait_precopy(&id);
    let before = c.wait_for("a second pre-copy pass", Duration::from_secs(60), |c| {
        let (ok, m, _) = c.cli(&["migration", "show", &id]);
        assert!(ok && m["state"] == "precopy", "still in pre-copy: {m}");
        (m["passes"].as_u64().unwrap_or(0) >= 2).then(|| m["memory_bytes"].as_u64().unwrap_or(0))
    });
    if let Some(p) = c.coord.as_mut() {
        p.kill();
    }
    c.start_coord(&[]);
    let restarted = std::time::Instant::now();
    // Figures advance again (the agents kept moving memory meanwhile).
    c.wait_for(
        "figures advancing after the restart",
        Duration::from_secs(20),
        |c| {
            let (state, bytes) = moved(c);
            assert_eq!(state, "precopy", "still in pre-copy after the restart");
            (bytes > before).then_some(())
        },
    );
    // A cancel is accepted at once.
    let (ok, _, err) = c.cli(&["migration", "cancel", &id]);
    assert!(ok, "cancel after the restart: {err}");
    let m = c.wait_migration(&id, Duration::from_secs(30));
    assert_eq!(m["state"], "cancelled", "{m}");
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "cancel took {took:?} after the restart"
    );
    assert_eq!(c.agent_vm_state(0, "vmc"), "running");
    assert_eq!(c.agent_vm_state(1, "vmc"), "absent");
    let (holder, epoch) = c.lease("vmc-disk0");
    assert_eq!((holder.as_str(), epoch), ("kvm-a1", 1));
    let shown = c.ok(&["vm", "show", "vmc"]);
    assert_eq!(shown["host"], "kvm-a1");
    assert_eq!(shown["state"], "running");
    c.check_disk_writer(0, "vmc", "vmc-disk0");
    eprintln!(
        "capped pre-copy: restart -> cancelled in {took:?}, memory moved before the kill {before} B"
    );
}
