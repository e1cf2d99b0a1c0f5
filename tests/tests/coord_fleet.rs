//! Fleet operations against real agents: three hosts in one site, guests of different
//! sizes. `coord host evacuate` while the disk writer runs on the host, N sequential
//! `coord migrate` for comparison, `coord balance`, `coord consolidate`, and a fourth
//! host with a faked CPU fingerprint that is never chosen. Every moved guest is
//! checked (RAM pattern; the disk writer's records too). Skips loudly without
//! /dev/kvm.

mod coord_support;

use std::time::{Duration, Instant};

use coord_support::Cluster;
use serde_json::Value;

const HOSTS: [&str; 3] = ["kvm-a1", "kvm-b1", "kvm-c1"];
/// Guests and their sizes (MiB): the disk writer and two A-B sweepers.
const GUESTS: [(&str, u64); 3] = [("dw", 128), ("g1", 160), ("g2", 192)];
const CAPACITY_MIB: u64 = 1024;

fn agent_index(host: &str) -> usize {
    match host {
        "kvm-a1" => 0,
        "kvm-b1" => 1,
        "kvm-c1" => 2,
        "kvm-x1" => 3,
        other => panic!("unknown host {other}"),
    }
}

/// VM name -> host, from `coord vm list`.
fn placement(c: &Cluster) -> Vec<(String, String)> {
    c.ok(&["vm", "list"])
        .as_array()
        .expect("vm list")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("").to_owned(),
                v["host"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn host_of(c: &Cluster, vm: &str) -> String {
    placement(c)
        .into_iter()
        .find(|(n, _)| n == vm)
        .map(|(_, h)| h)
        .expect("vm listed")
}

/// Checks every guest where the coordinator says it runs: running there (and nowhere
/// else), RAM pattern intact, disk records intact for the writer.
fn check_all(c: &Cluster) {
    for (vm, host) in placement(c) {
        let i = agent_index(&host);
        assert_eq!(c.agent_vm_state(i, &vm), "running", "{vm} on {host}");
        for j in 0..c.agents.len() {
            if j != i {
                c.wait_absent(j, &vm);
            }
        }
        if vm == "dw" {
            c.check_disk_writer_at(i, &host, "dw", "dw-disk0");
        } else {
            c.check_ab_at(i, &host, &vm);
        }
    }
}

/// Waits until the coordinator has a report (with a CPU fingerprint) from `host`.
fn wait_report(c: &Cluster, host: &str) -> Value {
    c.wait_for(
        &format!("a host report from {host}"),
        Duration::from_secs(30),
        |c| {
            let (ok, v, _) = c.cli(&["host", "show", host]);
            (ok && v["report"]["cpu"]["fingerprint"]
                .as_str()
                .is_some_and(|f| !f.is_empty()))
            .then_some(v)
        },
    )
}

fn memory_spread(c: &Cluster, hosts: &[&str]) -> f64 {
    let p = placement(c);
    let fr: Vec<f64> = hosts
        .iter()
        .map(|h| {
            let used: u64 = p
                .iter()
                .filter(|(_, on)| on == h)
                .map(|(vm, _)| GUESTS.iter().find(|g| g.0 == vm).map(|g| g.1).unwrap_or(0))
                .sum();
            used as f64 / CAPACITY_MIB as f64
        })
        .collect();
    fr.iter().cloned().fold(f64::MIN, f64::max) - fr.iter().cloned().fold(f64::MAX, f64::min)
}

/// `coord host add` of agent `i` in siteA.
fn add_host(c: &Cluster, host: &str, i: usize, memory: &str) {
    c.ok(&[
        "host",
        "add",
        host,
        "--site",
        "siteA",
        "--api",
        &format!("http://{}", c.agents[i].api),
        "--migration",
        &c.agents[i].migration,
        "--memory",
        memory,
    ]);
}

fn all_committed(op: &Value) {
    assert_eq!(op["state"], "completed", "{op:#}");
    for it in op["items"].as_array().expect("items") {
        assert_eq!(it["state"], "committed", "{it}");
        assert!(it["migration"].as_str().is_some(), "{it}");
    }
}

#[test]
fn evacuate_balance_consolidate_and_cpu_fingerprints() {
    if !stagehand_tests::kvm_or_skip("coord_fleet") {
        return;
    }
    let mut c = Cluster::start();
    c.add_agent("kvm-c1", &["--sample-interval-s", "2"]);
    c.ok(&["site", "add", "siteA"]);
    c.ok(&[
        "storage",
        "add",
        "nbd-a1",
        "--site",
        "siteA",
        "--api",
        &format!("http://{}", c.nbd.api),
        "--nbd",
        &c.nbd.nbd,
    ]);
    for (i, host) in HOSTS.iter().enumerate() {
        add_host(&c, host, i, "1G");
    }
    // The agent reports its capacity and CPU; the coordinator keeps it.
    let a1 = wait_report(&c, "kvm-a1");
    let fp = a1["report"]["cpu"]["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    assert_eq!(fp.len(), 64, "{a1}");
    assert!(a1["report"]["memory_mib_for_guests"].as_u64().unwrap_or(0) > 0);
    assert!(a1["report"]["vcpus"].as_u64().unwrap_or(0) > 0);
    assert_eq!(a1["capacity_mib"], CAPACITY_MIB);

    let dw_image = c.guest_image("disk-writer").display().to_string();
    let ab_image = c.guest.display().to_string();
    for (vm, mib) in GUESTS {
        let image = if vm == "dw" { &dw_image } else { &ab_image };
        let v = c.ok(&[
            "vm",
            "create",
            vm,
            "--host",
            "kvm-a1",
            "--memory",
            &format!("{mib}M"),
            "--image",
            image,
            "--disk",
            "8M",
        ]);
        assert_eq!(v["cpu_fingerprint"], fp.as_str(), "{v}");
    }
    c.wait_guest_progress(0, "dw");
    // The agent samples CPU use and dirty rate of its guests.
    let r = c.wait_for(
        "guest usage in kvm-a1's report",
        Duration::from_secs(30),
        |c| {
            let (_, v) = c.get(&format!("http://{}/v1/host", c.agents[0].api));
            let g = v["guests"].as_array().cloned().unwrap_or_default();
            // The sweepers spin: their CPU use shows once two samples were taken.
            (g.len() == 3
                && g.iter().all(|g| g["sampled_ms_ago"].is_u64())
                && g.iter()
                    .filter(|g| g["name"] != "dw")
                    .all(|g| g["cpu_percent"].as_f64().unwrap_or(0.0) > 0.0))
            .then_some(v)
        },
    );
    eprintln!("kvm-a1 report: {}", r["guests"]);

    // --- Evacuate kvm-a1 while the disk writer runs on it.
    let t = Instant::now();
    let op = c.ok(&["host", "evacuate", "kvm-a1"]);
    let evac_wall = t.elapsed();
    all_committed(&op);
    assert_eq!(op["items"].as_array().map(Vec::len), Some(3), "{op:#}");
    for (vm, host) in placement(&c) {
        assert_ne!(host, "kvm-a1", "{vm} still on the evacuated host");
    }
    let a1 = c.ok(&["host", "show", "kvm-a1"]);
    assert_eq!(a1["drained"], "maintenance", "{a1}");
    check_all(&c);
    // A drained host takes no VM.
    let err = c.fails(&["migrate", "g1", "--host", "kvm-a1"]);
    assert!(err.contains("drained"), "{err}");

    // --- The same moves one by one with `coord migrate --wait` (for the figures).
    c.ok(&["host", "undrain", "kvm-a1"]);
    let t = Instant::now();
    for (vm, _) in GUESTS {
        c.ok(&["migrate", vm, "--host", "kvm-a1", "--wait"]);
    }
    let seq_wall = t.elapsed();
    eprintln!(
        "FIGURE evacuate 3 guests ({} MiB): {} ms (operation {} ms); 3 sequential `coord migrate --wait`: {} ms",
        GUESTS.iter().map(|g| g.1).sum::<u64>(),
        evac_wall.as_millis(),
        op["total_ms"],
        seq_wall.as_millis()
    );
    check_all(&c);

    // --- Balance: everything is on kvm-a1; the plan spreads it.
    let dry = c.ok(&["balance", "--site", "siteA", "--dry-run"]);
    let planned = dry["plan"]["moves"].as_array().map(Vec::len).unwrap_or(0);
    assert!(planned >= 2, "{dry:#}");
    assert!(
        placement(&c).iter().all(|(_, h)| h == "kvm-a1"),
        "dry run moved something"
    );
    let op = c.ok(&["balance", "--site", "siteA"]);
    all_committed(&op);
    assert!(
        op["plan"]["imbalance_after"].as_f64().unwrap_or(1.0) <= 0.15,
        "{op:#}"
    );
    let spread = memory_spread(&c, &HOSTS);
    assert!(
        spread <= 0.15,
        "memory spread {spread} after balance: {:?}",
        placement(&c)
    );
    check_all(&c);
    // Balanced: a second balance moves nothing.
    let again = c.ok(&["balance", "--site", "siteA", "--dry-run"]);
    assert_eq!(
        again["plan"]["moves"].as_array().map(Vec::len),
        Some(0),
        "{again:#}"
    );

    // --- Consolidate: 480 MiB fit one 1 GiB host; the other two are freed.
    let op = c.ok(&["consolidate", "--site", "siteA"]);
    all_committed(&op);
    let used: std::collections::BTreeSet<String> =
        placement(&c).into_iter().map(|(_, h)| h).collect();
    assert_eq!(used.len(), 1, "{used:?}");
    let freed: Vec<String> = op["freed_hosts"]
        .as_array()
        .expect("freed_hosts")
        .iter()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    assert_eq!(freed.len(), 2, "{op:#}");
    for h in &freed {
        assert!(!used.contains(h));
        assert_eq!(c.ok(&["host", "show", h])["drained"], "standby");
    }
    check_all(&c);
    let holder = used.into_iter().next().expect("one host");

    // --- A host whose CPU differs (faked report) with the most room of all.
    let x = c.add_agent(
        "kvm-x1",
        &[
            "--test-cpu-fingerprint",
            &"f".repeat(64),
            "--sample-interval-s",
            "2",
        ],
    );
    add_host(&c, "kvm-x1", x, "4G");
    let err = c.fails(&["migrate", "g1", "--host", "kvm-x1"]);
    assert!(err.contains("cpu_incompatible"), "{err}");
    // Automatic placement: the stand-by hosts are drained, kvm-x1 is the only other
    // schedulable host, and it cannot run the guest.
    let err = c.fails(&["migrate", "g1", "--to", "siteA"]);
    assert!(err.contains("cpu_incompatible"), "{err}");
    // Balance never uses it either (and takes no stand-by host back at this load).
    let op = c.ok(&["balance", "--site", "siteA"]);
    assert_eq!(op["state"], "completed", "{op:#}");
    assert!(placement(&c).iter().all(|(_, h)| h != "kvm-x1"));
    // Evacuating the holder takes the stand-by hosts back, never kvm-x1.
    let op = c.ok(&["host", "evacuate", &holder]);
    all_committed(&op);
    for (vm, host) in placement(&c) {
        assert!(host != holder && host != "kvm-x1", "{vm} on {host}");
    }
    check_all(&c);
    assert_ne!(host_of(&c, "dw"), "kvm-x1");
}
