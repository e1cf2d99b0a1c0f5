//! The `coord` CLI against a real coordinator, storage node and agents on loopback:
//! every verb's happy path and its errors (unknown site/VM, no capacity, unreachable
//! storage, bad token), tables and `--json`.

mod coord_support;

use std::process::Command;
use std::time::{Duration, Instant};

use coord_support::{Cluster, TOKEN, spawn};
use stagehand_tests::{bin, free_port, run_timeout};

#[test]
fn inventory_verbs_and_their_errors() {
    let c = Cluster::start();
    c.register();
    let sites = c.ok(&["site", "list"]);
    assert_eq!(sites.as_array().map(Vec::len), Some(2));
    let storage = c.ok(&["storage", "list"]);
    assert_eq!(storage[0]["name"], "nbd-a1");
    assert_eq!(storage[0]["reachable_from"][0], "siteB");
    let hosts = c.ok(&["host", "list"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(2));
    assert_eq!(hosts[0]["memory_mib"], 1024);
    // One coordinator leads from the start (on etcd: once elected, which the fixture
    // waits for).
    let st = c.ok(&["status"]);
    assert_eq!(st["coordinator"]["role"], "leader", "{st}");
    assert_eq!(st["leader"]["id"], st["coordinator"]["id"], "{st}");
    assert_eq!(st["store"]["kind"], c.store_kind(), "{st}");
    assert_eq!(st["store"]["healthy"], true, "{st}");

    // Bad token: refused, one line, non-zero, and nothing changes.
    let (ok, _, err) = c.cli_with_token(&["site", "add", "siteX"], "wrong-token");
    assert!(!ok);
    assert!(err.contains("unauthorized"), "{err}");
    assert_eq!(c.ok(&["site", "list"]).as_array().map(Vec::len), Some(2));

    // Unknown site, for a host and for a VM.
    let err = c.fails(&[
        "host",
        "add",
        "kvm-x",
        "--site",
        "nowhere",
        "--api",
        "http://127.0.0.1:1",
        "--migration",
        "127.0.0.1:2",
    ]);
    assert!(err.contains("site_not_found"), "{err}");
    let err = c.fails(&[
        "vm", "create", "vm1", "--site", "nowhere", "--memory", "128M", "--image", "/x", "--disk",
        "16M",
    ]);
    assert!(err.contains("site_not_found"), "{err}");

    // Unreachable storage node: refused at add time.
    let dead = format!("http://127.0.0.1:{}", stagehand_tests::free_port());
    let err = c.fails(&[
        "storage",
        "add",
        "nbd-dead",
        "--site",
        "siteA",
        "--api",
        &dead,
        "--nbd",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("storage_unreachable"), "{err}");

    // No capacity: hosts hold 1 GiB of guests each.
    let err = c.fails(&[
        "vm", "create", "big", "--site", "siteA", "--memory", "2G", "--image", "/x", "--disk",
        "16M",
    ]);
    assert!(err.contains("no_capacity"), "{err}");

    // Unknown VM and migration.
    let err = c.fails(&["vm", "show", "nope"]);
    assert!(err.contains("vm_not_found"), "{err}");
    let err = c.fails(&["migrate", "nope", "--to", "siteB"]);
    assert!(err.contains("vm_not_found"), "{err}");
    let err = c.fails(&["migration", "show", "mig-nope"]);
    assert!(err.contains("migration_not_found"), "{err}");
    let err = c.fails(&["vm", "delete", "nope"]);
    assert!(err.contains("vm_not_found"), "{err}");

    // Coordinator down: a clear one-line reason.
    let mut c = c;
    if let Some(p) = c.coord.as_mut() {
        p.kill();
    }
    let err = c.fails(&["vm", "list"]);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

#[test]
fn vm_create_show_list_delete() {
    let Some(c) = Cluster::registered_or_skip("vm_create_show_list_delete") else {
        return;
    };
    let guest = c.guest.display().to_string();
    // A disk image: the coordinator writes it through NBD under its own lease.
    let img = c.images_dir().join("disk.img");
    let pattern: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &pattern).expect("write image");
    let vm = c.ok(&[
        "vm",
        "create",
        "vm7",
        "--site",
        "siteA",
        "--memory",
        "64M",
        "--image",
        &guest,
        "--disk",
        "16M",
        "--disk-image",
        &img.display().to_string(),
    ]);
    assert_eq!(vm["host"], "kvm-a1");
    assert_eq!(vm["disks"][0]["storage"], "nbd-a1");
    // Epoch 1 went to the filler, 2 to the host.
    assert_eq!(vm["disks"][0]["epoch"], 2);
    assert_eq!(c.lease("vm7-disk0"), ("kvm-a1".to_owned(), 2));
    // Created without a path: in the node's own export root.
    let file = std::fs::read(c.disk_file("vm7-disk0")).expect("disk file");
    assert_eq!(file.len(), 16 << 20);
    assert_eq!(&file[..pattern.len()], &pattern[..]);
    assert_eq!(c.agent_vm_state(0, "vm7"), "running");

    // Without an image: epoch 1 to the host, placed in siteB.
    let vm = c.ok(&[
        "vm", "create", "vm8", "--site", "siteB", "--memory", "128M", "--image", &guest, "--disk",
        "8M",
    ]);
    assert_eq!(vm["host"], "kvm-b1");
    assert_eq!(c.lease("vm8-disk0"), ("kvm-b1".to_owned(), 1));

    let err = c.fails(&[
        "vm", "create", "vm8", "--site", "siteB", "--memory", "128M", "--image", &guest, "--disk",
        "8M",
    ]);
    assert!(err.contains("vm_exists"), "{err}");

    let show = c.ok(&["vm", "show", "vm7"]);
    for key in ["name", "site", "host", "state", "memory_mib", "disks"] {
        assert!(!show[key].is_null(), "vm show lacks {key}: {show}");
    }
    assert_eq!(show["agent_state"], "running");
    // A disk image must come from the coordinator's images directory.
    let err = c.fails(&[
        "vm",
        "create",
        "vm9",
        "--site",
        "siteA",
        "--memory",
        "64M",
        "--image",
        &guest,
        "--disk",
        "16M",
        "--disk-image",
        "/etc/passwd",
    ]);
    assert!(err.contains("path_not_allowed"), "{err}");
    assert!(
        show.to_string().find("token").is_none(),
        "tokens must not leak: {show}"
    );
    let list = c.ok(&["vm", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));

    c.ok(&["vm", "delete", "vm8"]);
    assert_eq!(c.agent_vm_state(1, "vm8"), "absent");
    let err = c.fails(&["vm", "show", "vm8"]);
    assert!(err.contains("vm_not_found"), "{err}");
}

/// `coord serve` refuses to start without a token (unless --insecure-no-auth); with
/// `coord certs create` and --tls-* its API is HTTPS, /v1/health answers only
/// `{"status":"ok"}` without a token, and the CLI verifies it against --ca.
#[test]
fn secure_by_default_https_api_and_certs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let coord = bin("coord", "coordinator");
    let api = format!("127.0.0.1:{}", free_port());
    let data = d.join("coord-data").display().to_string();
    let out = run_timeout(
        Command::new(&coord).args(["serve", "--api", &api, "--data-dir", &data]),
        Duration::from_secs(20),
    )
    .expect("coord serve runs");
    assert!(
        !out.status.success(),
        "coord serve without a token must not start"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-auth"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    let pki = d.join("pki");
    let out = run_timeout(
        Command::new(&coord).args([
            "certs",
            "create",
            "--out",
            &pki.display().to_string(),
            "--node",
            "coord",
            "--node",
            "nbd-a1",
            "--san",
            "coord.example",
        ]),
        Duration::from_secs(30),
    )
    .expect("coord certs create runs");
    assert!(out.status.success(), "certs create: {out:?}");
    for f in [
        "ca-cert.pem",
        "coord/server-cert.pem",
        "coord/server-key.pem",
        "coord/client-key.pem",
        "nbd-a1/ca-cert.pem",
    ] {
        assert!(pki.join(f).is_file(), "{f} missing");
    }
    let n = pki.join("coord");
    let mut p = spawn(
        &coord,
        &[
            "serve".into(),
            "--api".into(),
            api.clone(),
            "--data-dir".into(),
            data.clone(),
            "--api-token".into(),
            TOKEN.into(),
            "--tls-cert".into(),
            n.join("server-cert.pem").display().to_string(),
            "--tls-key".into(),
            n.join("server-key.pem").display().to_string(),
            "--tls-ca".into(),
            n.join("ca-cert.pem").display().to_string(),
        ],
        "coord serve",
        &d.join("coord.log"),
        &[],
    );
    let ca = pki.join("ca-cert.pem").display().to_string();
    let health = |scheme: &str| {
        let out = run_timeout(
            Command::new("curl").args([
                "-s",
                "-m",
                "2",
                "--cacert",
                &ca,
                &format!("{scheme}://{api}/v1/health"),
            ]),
            Duration::from_secs(5),
        )
        .expect("curl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let end = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(Some(s)) = p.child.try_wait() {
            panic!(
                "coord serve exited: {s}: {:?}",
                std::fs::read_to_string(d.join("coord.log"))
            );
        }
        let (ok, body) = health("https");
        if ok {
            break body;
        }
        assert!(Instant::now() < end, "HTTPS health never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(v, serde_json::json!({"status": "ok"}));
    assert!(!health("http").0, "plain HTTP to the HTTPS API must fail");
    let url = format!("https://{api}");
    let cli = |extra: &[&str]| {
        let out = run_timeout(
            Command::new(&coord)
                .args(extra)
                .args(["site", "add", "siteA", "--json"])
                .env("STAGEHAND_COORDINATOR", &url)
                .env("STAGEHAND_TOKEN", TOKEN)
                .env_remove("STAGEHAND_CA"),
            Duration::from_secs(30),
        )
        .expect("coord runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = cli(&[]);
    assert!(!ok && err.contains("--ca"), "{err}");
    let other = d.join("other");
    other_ca(&coord, &other);
    let (ok, err) = cli(&["--ca", &other.join("ca-cert.pem").display().to_string()]);
    assert!(
        !ok && err.contains("cannot reach the coordinator"),
        "a foreign CA: {err}"
    );
    let (ok, err) = cli(&["--ca", &ca]);
    assert!(ok, "site add over HTTPS: {err}");
    p.kill();
}

/// A second, unrelated CA (via `coord certs create`).
fn other_ca(coord: &std::path::Path, out: &std::path::Path) {
    let o = run_timeout(
        Command::new(coord).args([
            "certs",
            "create",
            "--out",
            &out.display().to_string(),
            "--node",
            "x",
        ]),
        Duration::from_secs(30),
    )
    .expect("certs create");
    assert!(o.status.success());
}
