//! `coord serve` on etcd: a three-member etcd cluster on loopback, two coordinators
//! on it, two agents and a storage node. One scenario (one cluster, the machine has few
//! cores), in order:
//!
//! 1. The leader is killed (kill -9 by its fail point) during a migration: the other
//!    coordinator takes over and drives the migration on from the journal.
//! 2. That new leader is paused (SIGSTOP) while it holds at a later phase: the first
//!    (restarted) takes over and finishes the migration with one running copy whose
//!    host holds the lease. When the paused one wakes up, nothing lands in the store
//!    and it steps down.
//! 3. etcd's leader member is killed mid-migration: the migration finishes. Then the
//!    leading coordinator is killed at the other phases (planned, quiesced, fencing,
//!    target_running): the other finishes each migration.
//! 4. Quorum is lost: writes are refused with a clear error, reads are served; when
//!    quorum returns, writes work again.
//!
//! The CLI talks to one coordinator throughout, whichever leads: a follower forwards
//! writes to the leader.

mod coord_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use coord_support::{Cluster, Proc};
use serde_json::Value;
use stagehand_tests::free_port;

/// One `coord serve` on the etcd store.
struct Coord {
    api: String,
    proc: Proc,
}

fn start_coord(c: &Cluster, name: &'static str, api: &str, env: &[(&str, &str)]) -> Coord {
    Coord {
        api: api.to_owned(),
        proc: c.start_named_coord(name, api, env),
    }
}

/// `GET /v1/status` of the coordinator at `api` (Null when it does not answer).
fn status(c: &Cluster, api: &str) -> Value {
    let (code, v) = c.get(&format!("http://{api}/v1/status"));
    if code == 200 { v } else { Value::Null }
}

/// Waits until the coordinator at `api` reports `name` as the leader.
fn wait_leader(c: &Cluster, api: &str, name: &str, limit: Duration) -> Value {
    c.wait_for(&format!("{name} to lead (asking {api})"), limit, |c| {
        let s = status(c, api);
        (s["leader"]["id"] == name).then_some(s)
    })
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} failed");
}

fn migration_of(c: &Cluster, vm: &str) -> Option<String> {
    let (ok, list, _) = c.cli(&["migration", "list"]);
    if !ok {
        return None;
    }
    list.as_array()?
        .iter()
        .rev()
        .find(|m| {
            m["vm"] == vm
                && !matches!(
                    m["state"].as_str(),
                    Some("committed" | "rolled_back" | "cancelled")
                )
        })
        .and_then(|m| m["id"].as_str())
        .map(str::to_owned)
}

/// The newest migration of `vm` (any state).
fn latest_migration(c: &Cluster, vm: &str) -> Option<String> {
    let (ok, list, _) = c.cli(&["migration", "list"]);
    if !ok {
        return None;
    }
    list.as_array()?
        .iter()
        .rev()
        .find(|m| m["vm"] == vm)
        .and_then(|m| m["id"].as_str())
        .map(str::to_owned)
}

#[test]
fn coordinators_on_etcd_fail_over_and_fence_a_deposed_leader() {
    let test = "coordinators_on_etcd_fail_over_and_fence_a_deposed_leader";
    if !coord_support::etcd::etcd_and_kvm_or_skip(test) {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::start_without_coord();
    if c.etcd.is_none() {
        c.start_etcd();
    }
    let mut etcd = c.etcd.take().expect("the fixture's etcd");
    let hold = c.dir.path().join("hold-fenced");
    let hold_s = format!("fenced:{}", hold.display());
    let api_a = format!("127.0.0.1:{}", free_port());
    let api_b = format!("127.0.0.1:{}", free_port());

    // A leads first (it starts alone) and dies at its fail point once the migration is
    // in pre-copy; B holds at `fenced` (it will be paused there).
    let mut a = start_coord(
        &c,
        "coord-a",
        &api_a,
        &[("STAGEHAND_COORD_FAILPOINT", "precopy")],
    );
    wait_leader(&c, &api_a, "coord-a", Duration::from_secs(20));
    let mut b = start_coord(&c, "coord-b", &api_b, &[("STAGEHAND_COORD_HOLD", &hold_s)]);
    let s = wait_leader(&c, &api_b, "coord-a", Duration::from_secs(20));
    assert_eq!(s["coordinator"]["role"], "follower", "{s}");
    assert_eq!(s["store"]["kind"], "etcd", "{s}");
    assert_eq!(s["store"]["healthy"], true, "{s}");
    assert_eq!(
        s["store"]["members"].as_array().map(Vec::len),
        Some(3),
        "{s}"
    );

    // Everything through B, a follower: writes are forwarded to the leader.
    c.coord_api = api_b.clone();
    c.register();
    let st = c.ok(&["status"]);
    assert_eq!(st["leader"]["id"], "coord-a");
    let guest = c.guest_image("disk-writer").display().to_string();
    c.ok(&[
        "vm", "create", "vm1", "--site", "siteA", "--memory", "128M", "--image", &guest, "--disk",
        "8M",
    ]);
    c.wait_guest_progress(0, "vm1");

    // 1. kill -9 of the leader (its fail point) in pre-copy.
    let _ = c.cli(&["migrate", "vm1", "--to", "siteB"]);
    assert!(
        a.proc.wait_exit(Duration::from_secs(60)),
        "coord-a did not stop at its fail point"
    );
    let killed = Instant::now();
    wait_leader(&c, &api_b, "coord-b", Duration::from_secs(20));
    eprintln!(
        "coord-b leads {} ms after coord-a died",
        killed.elapsed().as_millis()
    );
    let id = migration_of(&c, "vm1").expect("the migration is journaled");
    // A comes back (without its fail point) and follows.
    a = start_coord(&c, "coord-a", &api_a, &[]);

    // 2. B drives the migration to `fenced` and holds there: pause it.
    let mut held = hold.clone().into_os_string();
    held.push(".held");
    c.wait_for("coord-b to hold at fenced", Duration::from_secs(90), |_| {
        Path::new(&held).exists().then_some(())
    });
    signal(&b.proc, "-STOP");
    let paused = Instant::now();
    c.coord_api = api_a.clone();
    wait_leader(&c, &api_a, "coord-a", Duration::from_secs(20));
    eprintln!(
        "coord-a leads {} ms after coord-b was paused",
        paused.elapsed().as_millis()
    );
    let m = c.wait_migration(&id, Duration::from_secs(90));
    assert_eq!(m["state"], "committed", "{m}");
    let journal_before = c.journal_phases(&id);
    let vm_before = c.ok(&["vm", "show", "vm1"]);
    // B wakes up with its hold released: it must step down and change nothing.
    std::fs::write(&hold, b"").expect("release the hold");
    signal(&b.proc, "-CONT");
    let sb = c.wait_for("coord-b to step down", Duration::from_secs(20), |c| {
        let s = status(c, &b.api);
        (s["coordinator"]["role"] == "follower" && s["leader"]["id"] == "coord-a").then_some(s)
    });
    eprintln!("coord-b after waking: {sb}");
    // Give B's executor every chance to act on its stale view: its figures are stored
    // every 100 ms while it runs.
    c.wait_for(
        "coord-b to stop its executor",
        Duration::from_secs(20),
        |c| (status(c, &b.api)["driving"] == 0).then_some(()),
    );
    assert_eq!(
        c.journal_phases(&id),
        journal_before,
        "a deposed leader's journal entry landed"
    );
    let m2 = c.ok(&["migration", "show", &id]);
    assert_eq!(m2["state"], "committed", "{m2}");
    let vm_after = c.ok(&["vm", "show", "vm1"]);
    assert_eq!(vm_after["host"], vm_before["host"]);
    assert_eq!(vm_after["disks"], vm_before["disks"]);
    c.assert_one_copy("vm1", "after the leader failovers");
    assert_eq!(c.ok(&["vm", "show", "vm1"])["host"], "kvm-b1");

    // 3. An etcd member dies mid-migration (coord-a leads; the CLI talks to coord-b).
    c.coord_api = b.api.clone();
    let out = c.ok(&["migrate", "vm1", "--to", "siteA"]);
    let id2 = out["id"].as_str().expect("migration id").to_owned();
    // At once: the journal writes of the next phases follow within milliseconds (a
    // guest that converges fast is done in well under a second).
    let lost = etcd.raft_leader();
    etcd.kill(lost);
    let m = c.wait_migration(&id2, Duration::from_secs(90));
    assert_eq!(m["state"], "committed", "{m}");
    c.assert_one_copy("vm1", "after etcd's leader member died");
    etcd.start_member(lost);
    etcd.wait_member(lost);

    // 3b. The leader killed at the other phases: each time the follower takes over and
    // the migration ends with one copy on the host holding the lease.
    signal(&b.proc, "-KILL");
    let _ = b.proc.wait_exit(Duration::from_secs(5));
    b = start_coord(&c, "coord-b", &api_b, &[]);
    let mut coords = [(a, "coord-a", api_a.clone()), (b, "coord-b", api_b.clone())];
    for phase in ["planned", "quiesced", "fencing", "target_running"] {
        // The leader now (coord-a at first) hands over to the other, which comes back
        // with the fail point armed, and is made to lead by killing the first.
        let (l, f) = if status(&c, &coords[0].2)["leader"]["id"] == coords[0].1 {
            (0, 1)
        } else {
            (1, 0)
        };
        coords[f].0.proc.kill();
        coords[f].0 = start_coord(
            &c,
            coords[f].1,
            &coords[f].2,
            &[("STAGEHAND_COORD_FAILPOINT", phase)],
        );
        coords[l].0.proc.kill();
        c.coord_api = coords[f].2.clone();
        wait_leader(&c, &coords[f].2, coords[f].1, Duration::from_secs(20));
        coords[l].0 = start_coord(&c, coords[l].1, &coords[l].2, &[]);
        wait_leader(&c, &coords[l].2, coords[f].1, Duration::from_secs(20));
        // Talk to the survivor-to-be; the doomed leader journals `phase` and dies.
        c.coord_api = coords[l].2.clone();
        let to = if c.ok(&["vm", "show", "vm1"])["site"] == "siteA" {
            "siteB"
        } else {
            "siteA"
        };
        let before = latest_migration(&c, "vm1");
        // At `planned` the leader dies before it answers: the forwarded call fails.
        let _ = c.cli(&["migrate", "vm1", "--to", to]);
        assert!(
            coords[f].0.proc.wait_exit(Duration::from_secs(60)),
            "{} did not stop at fail point {phase}",
            coords[f].1
        );
        let id = c.wait_for(
            "the new leader to show the migration",
            Duration::from_secs(20),
            |c| latest_migration(c, "vm1").filter(|id| Some(id) != before.as_ref()),
        );
        let m = c.wait_migration(&id, Duration::from_secs(90));
        assert_eq!(m["state"], "committed", "fail point {phase}: {m}");
        c.assert_one_copy("vm1", &format!("leader killed at {phase}"));
        eprintln!(
            "leader killed at {phase}: {} finished the migration",
            coords[l].1
        );
        coords[f].0 = start_coord(&c, coords[f].1, &coords[f].2, &[]);
    }
    let [(a, _, _), (b, _, _)] = coords;

    // 4. Quorum lost: two of three members down.
    let (x, y) = ((lost + 1) % 3, (lost + 2) % 3);
    etcd.kill(x);
    etcd.kill(y);
    let err = c.fails(&["site", "add", "siteC"]);
    assert!(
        err.contains("refuse") && (err.contains("quorum") || err.contains("leads")),
        "unclear error without quorum: {err}"
    );
    let sites = c.ok(&["site", "list"]);
    assert_eq!(
        sites.as_array().map(Vec::len),
        Some(2),
        "reads are served: {sites}"
    );
    let vms = c.ok(&["vm", "list"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms}");
    let st = c.ok(&["status"]);
    assert_eq!(st["store"]["healthy"], false, "{st}");
    // Quorum back: writes work again (a leader is elected, the write is accepted).
    etcd.start_member(x);
    etcd.wait_member(x);
    c.wait_for(
        "writes to work with quorum back",
        Duration::from_secs(30),
        |c| c.cli(&["site", "add", "siteC"]).0.then_some(()),
    );
    c.assert_one_copy("vm1", "after quorum returned");
    c.ok(&["vm", "delete", "vm1"]);
    drop(a);
    drop(b);
    eprintln!("etcd scenario took {} s", started.elapsed().as_secs());
}
