//! Geographic migration driven by the coordinator: two sites in network namespaces
//! (veth pair shaped with `tc tbf`), each with its own storage node and agent. Site A's
//! storage node is not in site B's reach in the coordinator's inventory, so
//! `coord migrate --to siteB` mirrors the disk to site B's node while the
//! disk-writer guest keeps writing, then moves memory. The guest's disk records and
//! RAM must check out on the target, the source copy must be retired (then deleted),
//! and it must work back again; then the coordinator is killed (kill -9 through its
//! fail point) right after journaling each phase of a geographic migration, and the
//! restarted one must end with one running copy whose host holds the lease on the
//! copy of the disk it uses.

mod coord_support;

use std::path::Path;
use std::time::{Duration, Instant};

use coord_support::{Agent, Cluster, Node, Proc, TOKEN, spawn};
use serde_json::Value;
use stagehand_tests::netns::{LinkSpec, TwoSites};
use stagehand_tests::{bin, run_timeout};

const NBD_API: u16 = 17080;
const NBD_PORT: u16 = 10809;
const AGENT_API: u16 = 17090;
const AGENT_MIG: u16 = 17091;
const COORD_API: u16 = 17070;

/// Waits until `url` answers (no port races inside fresh namespaces: their ports are
/// ours alone, so the health answer is enough).
fn wait_up(url: &str, p: &mut Proc) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited during start-up: {status}", p.name);
        }
        let ok = run_timeout(
            std::process::Command::new("curl").args(["-sf", "-m", "2", "-o", "/dev/null", url]),
            Duration::from_secs(5),
        )
        .map(|o| o.status.success())
        .unwrap_or(false);
        if ok {
            return;
        }
        assert!(Instant::now() < end, "{} did not come up at {url}", p.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a site's storage node and agent; `wrap` runs them in the site's namespace
/// (empty: the calling thread's, site A).
/// `peers`: the storage nodes this one may mirror to without TLS (`--mirror-allow`).
fn start_site(dir: &Path, wrap: &[&str], ip: &str, host: &str, peers: &str) -> (Node, Agent) {
    let run = |exe: &Path, args: Vec<String>, name: &'static str, log: &str| {
        let mut all: Vec<String> = wrap.iter().skip(1).map(|s| s.to_string()).collect();
        let program = if wrap.is_empty() {
            exe.to_path_buf()
        } else {
            all.push(exe.display().to_string());
            Path::new(wrap[0]).to_path_buf()
        };
        all.extend(args);
        spawn(&program, &all, name, &dir.join(log), &[])
    };
    // Site A's coordinator calls the node's API; site B's node answers on its veth.
    let nbd_api = format!("{ip}:{NBD_API}");
    let nbd_addr = format!("{ip}:{NBD_PORT}");
    let data = dir.join(format!("nbd-{host}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut nbd = run(
        &bin("stagehand-nbd", "nbd-server"),
        vec![
            "--listen".into(),
            nbd_addr.clone(),
            "--api".into(),
            nbd_api.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--api-token".into(),
            TOKEN.into(),
            "--mirror-allow".into(),
            peers.into(),
        ],
        "stagehand-nbd",
        &format!("nbd-{host}.log"),
    );
    wait_up(&format!("http://{nbd_api}/v1/health"), &mut nbd);
    let api = format!("{ip}:{AGENT_API}");
    let mig = format!("{ip}:{AGENT_MIG}");
    let adata = dir.join(format!("{host}-data"));
    std::fs::create_dir_all(&adata).expect("mkdir");
    std::os::unix::fs::symlink(dir.join("images"), adata.join("images")).expect("symlink");
    let mut agent = run(
        &bin("stagehand-agent", "agent"),
        vec![
            "--api".into(),
            api.clone(),
            "--migration-listen".into(),
            mig.clone(),
            "--host-id".into(),
            host.into(),
            "--data-dir".into(),
            adata.display().to_string(),
            "--api-token".into(),
            TOKEN.into(),
        ],
        "stagehand-agent",
        &format!("{host}.log"),
    );
    wait_up(&format!("http://{api}/v1/health"), &mut agent);
    (
        Node {
            proc: nbd,
            api: nbd_api,
            nbd: nbd_addr,
        },
        Agent {
            proc: agent,
            api,
            migration: mig,
        },
    )
}

/// The two-site cluster: `c.nbd` is site A's node, `other` site B's (swapped with
/// [`Geo::on_site`] for the shared helpers that read `c.nbd`).
struct Geo {
    c: Cluster,
    other: Node,
    /// `c.nbd` is site A's node (else site B's, and `other` site A's).
    a_in_c: bool,
    /// Keeps the namespaces (and moves the thread back when dropped, after `c`).
    _sites: TwoSites,
}

impl Geo {
    fn start(test: &str) -> Option<Geo> {
        if !stagehand_tests::kvm_or_skip(test) || !TwoSites::available(test) {
            return None;
        }
        let mut sites = TwoSites::create(LinkSpec::default()).expect("two sites");
        sites.enter_a().expect("enter site A");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("images")).expect("mkdir");
        std::fs::create_dir_all(d.join("coord-data/images")).expect("mkdir");
        let (a_ip, b_ip) = (sites.a_ip.to_string(), sites.b_ip.to_string());
        let peers = format!("{a_ip},{b_ip}");
        let (node_a, agent_a) = start_site(d, &[], &a_ip, "kvm-a1", &peers);
        let wrap = ["ip", "netns", "exec", sites.b.as_str()];
        let (node_b, agent_b) = start_site(d, &wrap, &b_ip, "kvm-b1", &peers);
        let guest = d.join("images/ab.bin");
        let mut c = Cluster {
            dir,
            nbd: node_a,
            agents: vec![agent_a, agent_b],
            coord: None,
            coord_api: format!("127.0.0.1:{COORD_API}"),
            guest,
            store: None,
            etcd: None,
        };
        c.start_coord(&[]);
        c.ok(&["site", "add", "siteA"]);
        c.ok(&["site", "add", "siteB"]);
        // No --reachable-from: each site reaches only its own storage node.
        for (name, site, n) in [("nbd-a1", "siteA", &c.nbd), ("nbd-b1", "siteB", &node_b)] {
            c.ok(&[
                "storage",
                "add",
                name,
                "--site",
                site,
                "--api",
                &format!("http://{}", n.api),
                "--nbd",
                &n.nbd,
            ]);
        }
        c.register_hosts();
        Some(Geo {
            c,
            other: node_b,
            a_in_c: true,
            _sites: sites,
        })
    }

    /// Makes `c.nbd` site `site`'s storage node (index as the agents: 0 A, 1 B).
    fn on_site(&mut self, site: usize) {
        if (site == 0) != self.a_in_c {
            std::mem::swap(&mut self.c.nbd, &mut self.other);
            self.a_in_c = !self.a_in_c;
        }
    }

    /// The export's lease `(holder, epoch)` on site `site`'s node, or None when it has
    /// no such export.
    fn lease_on(&mut self, site: usize, export: &str) -> Option<(String, u64)> {
        self.on_site(site);
        let (code, v) = self
            .c
            .get(&format!("http://{}/v1/exports/{export}", self.c.nbd.api));
        (code == 200).then(|| {
            (
                v["lease"]["holder"].as_str().unwrap_or("").to_owned(),
                v["lease"]["epoch"].as_u64().unwrap_or(0),
            )
        })
    }

    /// Runs the disk-writer check of `vm` on the host of site `site`, reading the disk
    /// from that site's node.
    fn check(&mut self, site: usize, vm: &str) -> u64 {
        self.on_site(site);
        self.c.check_disk_writer(site, vm, &format!("{vm}-disk0"))
    }

    /// Waits until the migration deleted the disk copy it left unused.
    fn wait_cleaned(&self, id: &str) -> Value {
        self.c
            .wait_for("the unused disk copy to go", Duration::from_secs(30), |c| {
                let v = c.ok(&["migration", "show", id]);
                (v["disk_move"]["cleaned"] == true).then_some(v)
            })
    }
}

/// Migrates `vm` to `site` (blocking); returns the final migration.
fn migrate(g: &Geo, vm: &str, site: &str) -> Value {
    let m = g.c.ok(&["migrate", vm, "--to", site, "--wait"]);
    assert_eq!(m["state"], "committed", "{m}");
    m
}

/// What a settled VM must look like: running only on its host, which holds the lease
/// on the copy of the disk in the VM record (on its site's node), the other site's
/// node without a copy, and a disk that checks out.
fn assert_settled(g: &mut Geo, vm: &str, phase: &str) -> usize {
    let shown = g.c.ok(&["vm", "show", vm]);
    let host = shown["host"].as_str().unwrap_or("").to_owned();
    let site = if host == "kvm-a1" { 0 } else { 1 };
    let running = g.c.running_on(vm);
    assert_eq!(running, vec![host.as_str()], "{phase}: one running copy");
    let storage = shown["disks"][0]["storage"].as_str().unwrap_or("");
    assert_eq!(
        storage,
        ["nbd-a1", "nbd-b1"][site],
        "{phase}: the VM's disk is on its own site's node: {shown}"
    );
    let export = format!("{vm}-disk0");
    let lease = g.lease_on(site, &export);
    assert_eq!(
        lease,
        Some((
            host.clone(),
            shown["disks"][0]["epoch"].as_u64().unwrap_or(0)
        )),
        "{phase}: the host holds the lease on the copy it uses"
    );
    let (code, agent_vm) =
        g.c.get(&format!("http://{}/v1/vms/{vm}", g.c.agents[site].api));
    assert_eq!(code, 200);
    g.on_site(site);
    let node_nbd = g.c.nbd.nbd.clone();
    assert!(
        agent_vm["disks"][0]["nbd"]
            .as_str()
            .is_some_and(|u| u.contains(&node_nbd)),
        "{phase}: the host's disk is on its site's node {node_nbd}: {agent_vm}"
    );
    g.check(site, vm);
    site
}

#[test]
fn geo_migration_there_and_back_then_killed_at_each_phase() {
    let Some(mut g) = Geo::start("geo_migration_there_and_back_then_killed_at_each_phase") else {
        return;
    };
    let guest = g.c.guest_image("disk-writer").display().to_string();
    g.c.ok(&[
        "vm", "create", "vm7", "--site", "siteA", "--memory", "128M", "--image", &guest, "--disk",
        "64M",
    ]);
    g.c.wait_guest_progress(0, "vm7");

    // There: the disk moves to site B's node while the guest writes.
    let m = migrate(&g, "vm7", "siteB");
    eprintln!(
        "geo migration A -> B: total {} ms, downtime {} ms, disk {} B copied ({} B disk), memory {} B",
        m["total_ms"], m["downtime_ms"], m["disk_bytes"], m["disk_total_bytes"], m["memory_bytes"]
    );
    assert!(
        m["disk_bytes"].as_u64().unwrap_or(0) > 0,
        "no disk bytes moved: {m}"
    );
    let id = m["id"].as_str().expect("id").to_owned();
    let phases = g.c.journal_phases(&id);
    assert!(
        phases.starts_with(&[
            "planned".to_owned(),
            "mirroring".to_owned(),
            "precopy".to_owned()
        ]),
        "{phases:?}"
    );
    assert_settled(&mut g, "vm7", "A -> B");
    // The source copy was retired (fenced to no writer), then deleted once committed.
    g.wait_cleaned(&id);
    assert_eq!(
        g.lease_on(0, "vm7-disk0"),
        None,
        "site A's old copy is gone"
    );

    // And back.
    let m = migrate(&g, "vm7", "siteA");
    eprintln!(
        "geo migration B -> A: total {} ms, downtime {} ms, disk {} B copied",
        m["total_ms"], m["downtime_ms"], m["disk_bytes"]
    );
    let id = m["id"].as_str().expect("id").to_owned();
    assert_settled(&mut g, "vm7", "B -> A");
    g.wait_cleaned(&id);
    assert_eq!(
        g.lease_on(1, "vm7-disk0"),
        None,
        "site B's old copy is gone"
    );

    // Continuous replication to site B: a background mirror job the coordinator
    // tracks; its lag is the job's dirty bytes.
    let r = g.c.ok(&["replicate", "vm7", "--to", "siteB"]);
    assert_eq!(r["vm"], "vm7", "{r}");
    let listed =
        g.c.wait_for("the replica to be in sync", Duration::from_secs(60), |c| {
            let v = c.ok(&["replicate", "list"]);
            (v[0]["state"] == "synced").then_some(v)
        });
    eprintln!(
        "replication: {} B copied, lag {} B",
        listed[0]["bytes_copied"], listed[0]["lag_bytes"]
    );
    assert!(
        listed[0]["bytes_copied"].as_u64().unwrap_or(0) > 0,
        "{listed}"
    );
    assert_eq!(
        g.lease_on(1, "vm7-disk0").map(|l| l.0),
        Some("coord-replica".to_owned()),
        "the replica is leased to its mirror job"
    );
    let err = g.c.fails(&["migrate", "vm7", "--to", "siteB"]);
    assert!(err.contains("vm_replicating"), "{err}");
    g.c.ok(&["replicate", "stop", "vm7"]);
    assert_eq!(g.c.ok(&["replicate", "list"]), serde_json::json!([]));
    assert_eq!(g.lease_on(1, "vm7-disk0"), None, "the replica is deleted");
    g.c.ok(&["vm", "delete", "vm7"]);

    // The coordinator killed right after journaling each phase of a geographic
    // migration, then restarted on its state.
    for (n, phase) in [
        "mirroring",
        "precopy",
        "quiesced",
        "fencing",
        "fenced",
        "target_running",
    ]
    .iter()
    .enumerate()
    {
        let vm = format!("vmk{n}");
        g.c.ok(&[
            "vm", "create", &vm, "--site", "siteA", "--memory", "128M", "--image", &guest,
            "--disk", "16M",
        ]);
        g.c.wait_guest_progress(0, &vm);
        if let Some(p) = g.c.coord.as_mut() {
            p.kill();
        }
        g.c.start_coord(&[("STAGEHAND_COORD_FAILPOINT", phase)]);
        let _ = g.c.cli(&["migrate", &vm, "--to", "siteB"]);
        let died =
            g.c.coord
                .as_mut()
                .map(|p| p.wait_exit(Duration::from_secs(60)))
                .unwrap_or(false);
        assert!(died, "coordinator did not stop at fail point {phase}");
        g.c.start_coord(&[]);
        let list = g.c.ok(&["migration", "list"]);
        let id = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["vm"] == vm.as_str())
            .and_then(|m| m["id"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no migration journaled for {vm} at {phase}: {list}"));
        let m = g.c.wait_migration(&id, Duration::from_secs(90));
        let m = match m["state"].as_str() {
            Some("committed" | "cancelled" | "rolled_back") => g.wait_cleaned(&id),
            _ => m,
        };
        let site = assert_settled(&mut g, &vm, phase);
        // Exactly one copy of the disk is left: the one the VM uses.
        let export = format!("{vm}-disk0");
        assert_eq!(
            g.lease_on(1 - site, &export),
            None,
            "{phase}: the unused copy is gone"
        );
        eprintln!(
            "fail point {phase}: ended {} on site {} (disk {} B copied)",
            m["state"],
            ["A", "B"][site],
            m["disk_bytes"]
        );
        // One guest at a time: the machine has few cores.
        g.c.ok(&["vm", "delete", &vm]);
    }
}
