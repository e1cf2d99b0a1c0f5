//! `coord migrate` end to end: a running A-B guest moves siteA -> siteB -> siteA over
//! one shared storage node; after each move the disk lease follows the VM with a
//! higher epoch and the previous holder's token is refused by the storage node.

mod coord_support;

use std::time::Duration;

use coord_support::{Cluster, have_kvm};

/// True when the storage node refuses `token` for writing `export`.
fn token_refused(nbd: &str, export: &str, token: &str) -> bool {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let opts = nbd_server::client::ClientOptions::new(&format!("{export};lease={token}"));
        let fut = async {
            let c = nbd_server::client::Client::connect_tcp(nbd, opts).await?;
            c.write(0, b"stale", true).await
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(())) => false,
            Ok(Err(_)) => true,
            Err(_) => panic!("NBD write with a stale token hung"),
        }
    })
}

#[test]
fn migrate_back_and_forth_hands_the_lease_over() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm missing");
        return;
    }
    let c = Cluster::start();
    c.register();
    let guest = c.guest.display().to_string();
    c.ok(&[
        "vm", "create", "vm7", "--site", "siteA", "--memory", "128M", "--image", &guest, "--disk",
        "16M",
    ]);
    let mut epoch = c.lease("vm7-disk0").1;
    assert_eq!(epoch, 1);
    let mut at = 0usize;
    for (to_site, to_host, to_idx) in [
        ("siteB", "kvm-b1", 1usize),
        ("siteA", "kvm-a1", 0),
        ("siteB", "kvm-b1", 1),
    ] {
        let old_token = c
            .agent_disk_token(at, "vm7")
            .expect("the source agent has the disk URI");
        let t0 = std::time::Instant::now();
        let m = c.ok(&[
            "migrate",
            "vm7",
            "--to",
            to_site,
            "--downtime-ms",
            "500",
            "--wait",
            "--wait-timeout-s",
            "90",
        ]);
        // Figures for the report: the CLI's wall time includes its 200 ms polling.
        eprintln!(
            "migrate -> {to_site}: cli {} ms, coordinator total {} ms, agent downtime {} ms, fence {} ms, memory {} B, passes {}",
            t0.elapsed().as_millis(),
            m["total_ms"],
            m["downtime_ms"],
            m["fence_ms"],
            m["memory_bytes"],
            m["passes"]
        );
        assert_eq!(m["state"], "committed", "{m}");
        for key in [
            "id",
            "vm",
            "from_host",
            "to_host",
            "total_ms",
            "downtime_ms",
            "memory_bytes",
            "disk_bytes",
        ] {
            assert!(!m[key].is_null(), "migration lacks {key}: {m}");
        }
        assert!(m["memory_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
        let (holder, e) = c.lease("vm7-disk0");
        assert_eq!(holder, to_host);
        assert!(e > epoch, "epoch must grow: {e} after {epoch}");
        epoch = e;
        let vm = c.ok(&["vm", "show", "vm7"]);
        assert_eq!(vm["host"], to_host);
        assert_eq!(vm["disks"][0]["epoch"], epoch);
        assert_eq!(vm["agent_state"], "running");
        // Exactly one copy runs.
        assert_eq!(c.agent_vm_state(to_idx, "vm7"), "running");
        assert_eq!(c.agent_vm_state(at, "vm7"), "absent");
        assert!(
            token_refused(&c.nbd.nbd, "vm7-disk0", &old_token),
            "the old holder's token must be refused"
        );
        // The journal shows the phases in order.
        let show = c.ok(&["migration", "show", m["id"].as_str().unwrap_or("")]);
        let phases: Vec<String> = show["journal"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["phase"]["phase"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            phases,
            [
                "planned",
                "precopy",
                "fencing",
                "fenced",
                "target_running",
                "committed"
            ]
        );
        at = to_idx;
    }
    let list = c.ok(&["migration", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(3));

    // Errors: migrating to the site it is in has no other host; a finished migration
    // cannot be cancelled.
    let err = c.fails(&["migrate", "vm7", "--to", "siteB"]);
    assert!(err.contains("no_capacity"), "{err}");
    let id = list[0]["id"].as_str().unwrap_or("").to_owned();
    let err = c.fails(&["migration", "cancel", &id]);
    assert!(err.contains("migration_finished"), "{err}");
}

#[test]
fn cancel_keeps_the_guest_on_the_source() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm missing");
        return;
    }
    let c = Cluster::start();
    c.register();
    let guest = c.guest.display().to_string();
    c.ok(&[
        "vm", "create", "vm7", "--site", "siteA", "--memory", "256M", "--image", &guest, "--disk",
        "16M",
    ]);
    // 1 MiB/s: 256 MiB cannot finish before the cancel, once the guest sweeps at full
    // speed (a freshly booted one dirties little, and Sparse frames carry its pages in
    // ~20 bytes, so even 1 MiB/s could converge).
    std::thread::sleep(Duration::from_secs(2));
    let m = c.ok(&["migrate", "vm7", "--to", "siteB", "--bandwidth", "1"]);
    let id = m["id"].as_str().expect("id").to_owned();
    std::thread::sleep(Duration::from_millis(800));
    c.ok(&["migration", "cancel", &id]);
    let m = c.wait_migration(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "cancelled", "{m}");
    assert_eq!(c.lease("vm7-disk0"), ("kvm-a1".to_owned(), 1));
    assert_eq!(c.agent_vm_state(0, "vm7"), "running");
    let vm = c.ok(&["vm", "show", "vm7"]);
    assert_eq!(vm["host"], "kvm-a1");
    assert_eq!(vm["state"], "running");
    // The target has no copy left (bounded wait: the agent drops it when the stream ends).
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while c.agent_vm_state(1, "vm7") != "absent" {
        assert!(std::time::Instant::now() < end, "target copy stayed");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn limits_and_offline_move() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm missing");
        return;
    }
    let c = Cluster::start();
    c.register();
    let guest = c.guest.display().to_string();
    for vm in ["vm1", "vm2", "vm3"] {
        c.ok(&[
            "vm", "create", vm, "--site", "siteA", "--memory", "128M", "--image", &guest, "--disk",
            "8M",
        ]);
    }
    // Two slow migrations occupy kvm-a1 (limit 2 per host): a third is refused. The
    // guests sweep at full speed first, or 1 MiB/s could converge (see above).
    std::thread::sleep(Duration::from_secs(2));
    let m1 = c.ok(&["migrate", "vm1", "--to", "siteB", "--bandwidth", "1"]);
    let m2 = c.ok(&["migrate", "vm2", "--to", "siteB", "--bandwidth", "1"]);
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
    // Offline: the guest stops on the source and boots on the target; the lease follows.
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
    assert_eq!(c.lease("vm3-disk0"), ("kvm-b1".to_owned(), 2));
    assert_eq!(c.agent_vm_state(1, "vm3"), "running");
    assert_eq!(c.agent_vm_state(0, "vm3"), "absent");
}
