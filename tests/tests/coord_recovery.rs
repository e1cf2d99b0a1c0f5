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
