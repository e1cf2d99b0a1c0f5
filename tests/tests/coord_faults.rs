//! A randomized fault run of the coordinators on etcd: three `coord serve` on a
//! three-member etcd on loopback, two agents with small disk-writer guests and a
//! storage node. For a bounded time (`STAGEHAND_FAULT_SECS`, default 100 s) the run
//! starts migrations back and forth while it kills (-9) and restarts coordinators
//! and etcd members at random - keeping etcd's quorum most of the time, losing it for
//! a few seconds now and then. Every decision comes from one seed
//! (`STAGEHAND_FAULT_SEED`, printed at the start): a failure is repeated by running
//! the test again with that seed (the timing of the processes still varies).
//!
//! Checked throughout: every disk's epoch, as the storage node reports it, only grows.
//! Checked at the end, with every process back: every migration ended (committed,
//! rolled back or cancelled, its journal's last phase saying so), every VM runs
//! exactly once - on its recorded host, which holds the lease at the recorded epoch -
//! and its guest's disk records and RAM check out.

mod coord_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coord_support::{Cluster, Proc};
use stagehand_tests::free_port;

/// splitmix64: a tiny, seedable generator (the run must be repeatable from its seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `pct` percent.
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

const VMS: [&str; 2] = ["vm1", "vm2"];
const TERMINAL: [&str; 3] = ["committed", "rolled_back", "cancelled"];

struct Coords {
    names: [&'static str; 3],
    apis: Vec<String>,
    procs: Vec<Option<Proc>>,
}

impl Coords {
    fn live(&self) -> Vec<usize> {
        (0..3).filter(|i| self.procs[*i].is_some()).collect()
    }

    fn start(&mut self, c: &Cluster, i: usize) {
        self.procs[i] = Some(c.start_named_coord(self.names[i], &self.apis[i], &[]));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill();
        }
    }
}

/// Every disk's epoch over time, as the storage node reports it.
#[derive(Default)]
struct Epochs {
    last: BTreeMap<String, u64>,
    samples: usize,
}

impl Epochs {
    fn sample(&mut self, c: &Cluster) {
        for vm in VMS {
            let export = format!("{vm}-disk0");
            let (code, v) = c.get(&format!("http://{}/v1/exports/{export}", c.nbd.api));
            if code != 200 {
                continue;
            }
            let Some(epoch) = v["lease"]["epoch"].as_u64() else {
                continue;
            };
            let before = self.last.insert(export.clone(), epoch).unwrap_or(0);
            assert!(
                epoch >= before,
                "the epoch of {export} went back from {before} to {epoch}"
            );
            self.samples += 1;
        }
    }
}

#[test]
fn random_kills_of_coordinators_and_etcd_members_during_migrations() {
    let test = "random_kills_of_coordinators_and_etcd_members_during_migrations";
    if !coord_support::etcd::etcd_and_kvm_or_skip(test) {
        return;
    }
    let seed = std::env::var("STAGEHAND_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let secs = std::env::var("STAGEHAND_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(100);
    stagehand_tests::skip!("{test}: STAGEHAND_FAULT_SEED={seed} STAGEHAND_FAULT_SECS={secs}");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let mut c = Cluster::start_without_coord();
    if c.etcd.is_none() {
        c.start_etcd();
    }
    let mut etcd = c.etcd.take().expect("the fixture's etcd");
    let mut coords = Coords {
        names: ["coord-0", "coord-1", "coord-2"],
        apis: (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect(),
        procs: vec![None, None, None],
    };
    for i in 0..3 {
        coords.start(&c, i);
    }
    c.coord_api = coords.apis[0].clone();
    wait_writable(&c, Duration::from_secs(30));
    c.register();
    let guest = c.guest_image("disk-writer").display().to_string();
    for (vm, site) in VMS.iter().zip(["siteA", "siteB"]) {
        c.ok(&[
            "vm", "create", vm, "--site", site, "--memory", "128M", "--image", &guest, "--disk",
            "4M",
        ]);
    }
    for (i, vm) in VMS.iter().enumerate() {
        c.wait_guest_progress(i, vm);
    }
    let mut epochs = Epochs::default();
    epochs.sample(&c);

    // The faults. Counters for the summary line.
    let (mut started_migrations, mut coord_kills, mut etcd_kills, mut quorum_losses) = (0, 0, 0, 0);
    let mut ids: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let live = coords.live();
        if let Some(&i) = live.get(rng.below(live.len() as u64) as usize) {
            c.coord_api = coords.apis[i].clone();
        }
        match rng.below(100) {
            // Start a migration of a VM to the other site (refusals are fine: the VM
            // may be migrating, or no coordinator leads right now). Half of them
            // capped, so that they are still moving when the next fault strikes.
            0..=39 => {
                let vm = VMS[rng.below(2) as usize];
                let (ok, shown, _) = c.cli(&["vm", "show", vm]);
                if ok {
                    let to = if shown["site"] == "siteA" {
                        "siteB"
                    } else {
                        "siteA"
                    };
                    let cap = (16 + rng.below(48)).to_string();
                    let mut args = vec!["migrate", vm, "--to", to];
                    if rng.chance(50) {
                        args.extend(["--bandwidth", cap.as_str()]);
                    }
                    let (ok, out, err) = c.cli(&args);
                    if ok {
                        eprintln!("{}: {}", args.join(" "), out["id"]);
                        if let Some(id) = out["id"].as_str() {
                            ids.push(id.to_owned());
                        }
                        started_migrations += 1;
                    } else {
                        eprintln!("{} refused: {}", args.join(" "), err.trim());
                    }
                }
            }
            // Cancel the newest migration (it may have ended: then it is refused).
            40..=44 => {
                if let Some(id) = ids.last() {
                    let (ok, _, err) = c.cli(&["migration", "cancel", id]);
                    eprintln!(
                        "migration cancel {id}: {}",
                        if ok { "ok" } else { err.trim() }
                    );
                }
            }
            // kill -9 a coordinator: the leader half of the time.
            45..=64 => {
                let leader = c.cli(&["status"]).1["leader"]["id"].clone();
                let target = if rng.chance(50) {
                    live.iter().copied().find(|i| leader == coords.names[*i])
                } else {
                    None
                };
                let pick = live.get(rng.below(live.len() as u64) as usize).copied();
                if let Some(i) = target.or(pick) {
                    eprintln!("kill -9 {}", coords.names[i]);
                    coords.kill(i);
                    coord_kills += 1;
                }
            }
            // Restart a dead coordinator.
            65..=79 => {
                let dead: Vec<usize> = (0..3).filter(|i| !live.contains(i)).collect();
                if let Some(&i) = dead.get(rng.below(dead.len() as u64) as usize) {
                    eprintln!("restart {}", coords.names[i]);
                    coords.start(&c, i);
                }
            }
            // An etcd member: kill one while all are up (quorum stays); now and then a
            // second one too, for a few seconds (quorum lost); otherwise bring one back.
            _ => {
                let up: Vec<usize> = (0..3).filter(|i| etcd.procs[*i].is_some()).collect();
                if up.len() == 3 {
                    let i = up[rng.below(3) as usize];
                    eprintln!("kill -9 etcd member {i}");
                    etcd.kill(i);
                    etcd_kills += 1;
                } else if up.len() == 2 && rng.chance(25) {
                    let i = up[rng.below(2) as usize];
                    let pause = rng.millis(1000, 5000);
                    eprintln!("kill -9 etcd member {i}: quorum lost for {pause:?}");
                    etcd.kill(i);
                    etcd_kills += 1;
                    quorum_losses += 1;
                    std::thread::sleep(pause);
                    etcd.start_member(i);
                    etcd.wait_member(i);
                } else {
                    let down: Vec<usize> = (0..3).filter(|i| !up.contains(i)).collect();
                    if let Some(&i) = down.first() {
                        eprintln!("restart etcd member {i}");
                        etcd.start_member(i);
                        etcd.wait_member(i);
                    }
                }
            }
        }
        // Never leave the cluster without any coordinator for long.
        if coords.live().is_empty() && rng.chance(50) {
            let i = rng.below(3) as usize;
            eprintln!("restart {} (none was running)", coords.names[i]);
            coords.start(&c, i);
        }
        epochs.sample(&c);
        std::thread::sleep(rng.millis(200, 2500));
    }

    // Everything back; wait until every migration ended.
    for i in 0..3 {
        if etcd.procs[i].is_none() {
            etcd.start_member(i);
        }
    }
    for i in 0..3 {
        etcd.wait_member(i);
    }
    for i in 0..3 {
        if coords.procs[i].is_none() {
            coords.start(&c, i);
        }
    }
    c.coord_api = coords.apis[0].clone();
    wait_writable(&c, Duration::from_secs(30));
    let list = c.wait_for("every migration to end", Duration::from_secs(120), |c| {
        epochs.sample(c);
        let (ok, list, _) = c.cli(&["migration", "list"]);
        let all = list.as_array()?.clone();
        (ok && all
            .iter()
            .all(|m| TERMINAL.contains(&m["state"].as_str().unwrap_or(""))))
        .then_some(all)
    });
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for m in &list {
        let id = m["id"].as_str().expect("migration id");
        let phases = c.journal_phases(id);
        let last = phases.last().map(String::as_str).unwrap_or("");
        assert!(
            TERMINAL.contains(&last),
            "the journal of {id} ends at {last:?}: {phases:?}"
        );
        *ends.entry(last.to_owned()).or_default() += 1;
    }
    for vm in VMS {
        c.assert_one_copy(vm, "after the fault run");
    }
    epochs.sample(&c);
    eprintln!(
        "{test}: seed {seed}: {} migrations started ({started_migrations} accepted by the CLI), \
         ended {ends:?}; {coord_kills} coordinator kills, {etcd_kills} etcd member kills, \
         {quorum_losses} quorum losses; {} epoch samples, last {:?}; {} s in all",
        list.len(),
        epochs.samples,
        epochs.last,
        started.elapsed().as_secs()
    );
    drop(coords);
    drop(etcd);
}

/// Waits until the coordinator at `coord_api` accepts a write (a leader is elected
/// and etcd has a quorum): `site list` is a read, so it probes with `status`.
fn wait_writable(c: &Cluster, limit: Duration) {
    c.wait_for("a coordinator to lead", limit, |c| {
        let (ok, st, _) = c.cli(&["status"]);
        (ok && st["leader"]["id"].is_string() && st["store"]["healthy"] == true).then_some(())
    });
}
