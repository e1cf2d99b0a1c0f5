//! Mirror jobs (`/v1/mirrors`) between real processes: a stagehand-nbd source
//! written by fio and qemu-io through NBD while it mirrors to qemu-nbd or to a
//! second stagehand-nbd (leased, killed -9 and restarted mid-mirror); the replica
//! must be identical by `qemu-img compare`, and a sparse disk must cost only its
//! data.

// Test helpers panic to report a failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::netns::{LinkSpec, TwoSites};
use stagehand_tests::{
    Daemon, NBD_API_TOKEN, free_port, pattern, require_tool, run_ok, run_timeout, sparse_file,
    start_nbd, start_nbd_in,
};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// The control API of a node, over HTTP.
struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(port: u16) -> Api {
        Api {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// HTTPS, checking the node against `ca` (a node with `--tls-*` files).
    fn new_tls(port: u16, ca: &Path) -> Api {
        let pem = std::fs::read(ca).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        Api {
            http,
            base: format!("https://127.0.0.1:{port}"),
            ..Api::new(port)
        }
    }

    fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, String) {
        self.rt.block_on(async {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut r = self.http.request(m, format!("{}{path}", self.base));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (s, text) = self.call_as(Some(NBD_API_TOKEN), method, path, body);
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (s, v)
    }

    /// Polls the job until `done` holds (or panics after `limit`).
    fn wait_job(
        &self,
        id: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let (s, v) = self.call("GET", &format!("/v1/mirrors/{id}"), None);
            assert_eq!(s, 200, "{v}");
            if done(&v) {
                return v;
            }
            assert!(
                v["state"] != "failed" && v["state"] != "cancelled",
                "job ended while waiting for {what}: {v}"
            );
            assert!(start.elapsed() < limit, "timed out waiting for {what}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A stagehand-nbd with its control API; `extra` adds flags. Mirror jobs may push
/// to plain targets on loopback (where the tests' targets and relays listen).
fn node(extra: &[&str]) -> (Daemon, Api) {
    let api_port = free_port();
    let api = format!("127.0.0.1:{api_port}");
    let mut args = vec!["--api", api.as_str()];
    if !extra.contains(&"--mirror-allow") {
        args.extend(["--mirror-allow", "127.0.0.0/8"]);
    }
    args.extend_from_slice(extra);
    let d = start_nbd(&args);
    (d, Api::new(api_port))
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// qemu-nbd serving `img` as `dst` on a loopback TCP port.
fn qemu_nbd(img: &Path) -> (Proc, String) {
    let port = free_port();
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "dst", "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["--persistent", "--shared=8", "--cache=writeback"])
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr);
    (Proc(child), addr)
}

/// Writes `count` MiB of pseudo-random data at `count` spread, MiB-aligned offsets.
fn fill(img: &Path, size: u64, count: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let stride = size / count / MIB * MIB;
    for i in 0..count {
        f.write_all_at(&pattern(MIB as usize, seed + i), i * stride)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn identical(a: &Path, b: &Path) {
    let out = run_timeout(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
        T,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "replica differs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_mirror(api: &Api, body: Value) -> String {
    let (s, v) = api.call("POST", "/v1/mirrors", Some(body));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["state"], "copying", "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// After a kill and restart: waits for the job to be synced again, completes it,
/// checks the replica, and returns the bytes it copied (its counter as it stood
/// when synced).
fn resume_and_complete(api: &Api, id: &str, src: &Path, dst: &Path) -> u64 {
    let v = api.wait_job(id, T, "synced after the restart", |v| {
        v["state"] == "synced"
    });
    eprintln!("synced after the restart: {v}");
    complete(api, id);
    identical(src, dst);
    v["bytes_copied"].as_u64().unwrap()
}

/// A POST /v1/mirrors the node refuses because no rule allows its plain target.
fn assert_target_not_allowed(api: &Api, body: Value) {
    let (s, v) = api.call("POST", "/v1/mirrors", Some(body));
    assert_eq!(
        (s, &v["error"]["code"]),
        (403, &json!("mirror_target_not_allowed")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--mirror-allow"), "{v}");
}

fn complete(api: &Api, id: &str) -> Value {
    let (s, v) = api.call("POST", &format!("/v1/mirrors/{id}/complete"), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["dirty_bytes"], 0, "{v}");
    v
}

#[test]
fn mirror_to_qemu_nbd_under_fio_load_ends_identical() {
    mirror_under_fio_load(false);
}

/// The same with a data dir: the job's tracker is then the persistent dirty bitmap,
/// which the write path marks before a write lands (and which the job clears only
/// where copies settled).
#[test]
fn persistent_mirror_to_qemu_nbd_under_fio_load_ends_identical() {
    mirror_under_fio_load(true);
}

fn mirror_under_fio_load(persistent: bool) {
    require_tool!("qemu-nbd");
    require_tool!("qemu-img");
    require_tool!("fio");
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_file(&src, size);
    sparse_file(&dst, size);
    fill(&src, size, 32, 1);
    let (_q, qaddr) = qemu_nbd(&dst);
    let export = format!("src={},unleased", src.display());
    let data_dir = dir.path().join("src-data").display().to_string();
    let mut args = vec!["--export", export.as_str()];
    if persistent {
        args.extend(["--data-dir", data_dir.as_str()]);
    }
    let (d, api) = node(&args);
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": qaddr, "export": "dst"}, "mode": "background"}),
    );
    // The guest: random writes through the source's NBD server for 6 s.
    let fio = Command::new("fio")
        .args([
            "--name=guest",
            "--ioengine=nbd",
            &format!("--uri=nbd://{}/src", d.tcp.as_deref().unwrap()),
            "--rw=randwrite",
            "--bs=4k-64k",
            "--iodepth=8",
            "--size=256M",
            "--time_based",
            "--runtime=6",
            "--rate=20m",
            "--randrepeat=0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    let mut fio = Proc(fio);
    std::thread::sleep(Duration::from_secs(2));
    // Write-blocking from now on: guest writes land on both sides before the ack,
    // so the dirty set only shrinks.
    let (s, v) = api.call(
        "POST",
        &format!("/v1/mirrors/{id}/mode"),
        Some(json!({"mode": "write-blocking"})),
    );
    assert_eq!((s, &v["mode"]), (200, &json!("write-blocking")), "{v}");
    let synced = api.wait_job(&id, T, "synced under load", |v| v["state"] == "synced");
    eprintln!("synced while fio writes: {synced}");
    let status = fio.0.wait().unwrap();
    assert!(status.success(), "fio failed");
    let v = complete(&api, &id);
    eprintln!("completed: {v}");
    identical(&src, &dst);
    // The job stays listed, ended; DELETE then forgets it.
    let (s, list) = api.call("GET", "/v1/mirrors", None);
    assert_eq!(s, 200);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "{list}"
    );
    assert_eq!(
        api.call("DELETE", &format!("/v1/mirrors/{id}"), None).0,
        204
    );
    assert_eq!(api.call("GET", &format!("/v1/mirrors/{id}"), None).0, 404);
    if persistent {
        // An ended job leaves neither its record nor its bitmap behind.
        let (_, e) = api.call("GET", "/v1/exports/src", None);
        assert_eq!(e["bitmaps"], json!([]), "{e}");
        let left = std::fs::read_dir(Path::new(&data_dir).join("mirrors"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "a stored job record is left behind");
    }
}

/// Kill -9 the source node mid-mirror and start it again: the job comes back by
/// itself (from its record and its persistent bitmap), copies what was left and
/// what the guest wrote meanwhile, not the whole disk, and the replica ends
/// identical.
#[test]
fn mirror_resumes_after_the_source_is_killed() {
    require_tool!("qemu-nbd");
    require_tool!("qemu-img");
    require_tool!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 30;
    let data = 400;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_file(&src, size);
    sparse_file(&dst, size);
    fill(&src, size, data, 7);
    let (_q, qaddr) = qemu_nbd(&dst);
    let listen = format!("127.0.0.1:{}", free_port());
    let src_args = [
        "--listen".to_string(),
        listen.clone(),
        "--data-dir".into(),
        dir.path().join("src-data").display().to_string(),
        "--export".into(),
        format!("src={},unleased", src.display()),
        // 16 regions of 4 MiB: a restart copies at most 64 MiB for the activity log.
        "--bitmap-al-regions".into(),
        "16".into(),
    ];
    let sargs: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let (src_node, api) = node(&sargs);
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": qaddr, "export": "dst"}, "bandwidth_mib_s": 50}),
    );
    let uri = format!("nbd://{listen}/src");
    let guest_write = |off: u64, byte: u8| {
        run_ok(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                &uri,
                "-c",
                &format!("write -P {byte} {off}M 1M"),
            ]),
            T,
        );
    };
    guest_write(2, 0x11);
    guest_write(700, 0x22);
    let v = api.wait_job(&id, T, "300 MiB copied", |v| {
        v["bytes_copied"].as_u64().unwrap() >= 300 * MIB
    });
    let at_kill = v["bytes_copied"].as_u64().unwrap();
    // SAFETY: signals the child process the Daemon owns.
    unsafe { libc::kill(src_node.pid() as i32, libc::SIGKILL) };
    drop(src_node);
    let (_src_node, api) = node(&sargs);
    // Back by itself, same id, same target and cap.
    let (s, list) = api.call("GET", "/v1/mirrors", None);
    assert_eq!(s, 200, "{list}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "the job did not come back after the restart: {list}"
    );
    guest_write(5, 0x33);
    guest_write(900, 0x44);
    let copied = resume_and_complete(&api, &id, &src, &dst);
    eprintln!(
        "source killed at {} MiB copied; after the restart {} MiB",
        at_kill / MIB,
        copied / MIB
    );
    // What was left, plus what had not settled when the node died (at most a
    // second of copying at the cap plus one flush window), plus the activity log's
    // regions: far less than starting over.
    let left = data * MIB - at_kill.min(data * MIB);
    let budget = left + 2 * MIB + (50 + 64 + 64) * MIB;
    assert!(
        copied <= budget && copied < data * MIB,
        "copied {} MiB after the restart (left: {} MiB): more than resuming should",
        copied / MIB,
        left / MIB
    );
}

#[test]
fn sparse_10g_disk_with_100m_written_moves_about_100m() {
    require_tool!("qemu-nbd");
    require_tool!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = 10 << 30;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_file(&src, size);
    sparse_file(&dst, size);
    fill(&src, size, 100, 3);
    let (_q, qaddr) = qemu_nbd(&dst);
    let (_d, api) = node(&["--export", &format!("src={},unleased", src.display())]);
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": qaddr, "export": "dst"}}),
    );
    let v = api.wait_job(&id, T, "synced", |v| v["state"] == "synced");
    let copied = v["bytes_copied"].as_u64().unwrap();
    eprintln!("10 GiB sparse, 100 MiB written: {v}");
    assert!(
        (100 * MIB..=101 * MIB).contains(&copied),
        "copied {copied} bytes for 100 MiB of data"
    );
    // The target read zeros already: holes cost no request at all.
    assert_eq!(v["bytes_zeroed"], 0, "{v}");
    complete(&api, &id);
    identical(&src, &dst);
}

#[test]
fn mirror_to_leased_stagehand_resumes_after_the_target_is_killed() {
    require_tool!("qemu-img");
    require_tool!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 30;
    let data = 400;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_file(&src, size);
    sparse_file(&dst, size);
    fill(&src, size, data, 5);
    // The target: a leased export on a node with durable state, on a fixed port
    // so that it comes back where the job looks for it.
    let target_dir = dir.path().join("target-data");
    let taddr = format!("127.0.0.1:{}", free_port());
    let target_args = [
        "--listen".to_string(),
        taddr.clone(),
        "--data-dir".into(),
        target_dir.display().to_string(),
        "--export".into(),
        format!("dst={}", dst.display()),
    ];
    let targs: Vec<&str> = target_args.iter().map(String::as_str).collect();
    let (target, tapi) = node(&targs);
    let (s, f) = tapi.call(
        "POST",
        "/v1/exports/dst/fence",
        Some(json!({"epoch": 1, "holder": "mirror-of-src"})),
    );
    assert_eq!(s, 200, "{f}");
    let token = f["token"].as_str().unwrap().to_string();
    let (src_node, api) = node(&["--export", &format!("src={},unleased", src.display())]);
    // Secure by default: no bearer token, no mirrors.
    let (s, _) = api.call_as(None, "GET", "/v1/mirrors", None);
    assert_eq!(s, 401);
    // And a token holder cannot push a disk to a plain target nobody allowed (a
    // TLS target proves itself with the cluster CA instead).
    {
        let (_strict, sapi) = node(&[
            "--mirror-allow",
            "10.99.0.0/16",
            "--export",
            &format!("src={},unleased", src.display()),
        ]);
        assert_target_not_allowed(
            &sapi,
            json!({"export": "src", "target": {"address": taddr, "export": "dst"}}),
        );
    }
    // Without the lease the replica is read-only: the job fails, saying why.
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": taddr, "export": "dst"}}),
    );
    let v = api.wait_job(&id, T, "failed", |v| {
        v["state"] == "failed" || v["state"] == "completed"
    });
    assert!(v["error"].as_str().unwrap().contains("lease_token"), "{v}");
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": taddr, "export": "dst", "lease_token": token},
               "bandwidth_mib_s": 100}),
    );
    let (_, text) = api.call_as(Some(NBD_API_TOKEN), "GET", "/v1/mirrors", None);
    assert!(
        !text.contains(&token),
        "the lease token shows in the API: {text}"
    );
    // Kill -9 the target once a good part has crossed.
    let v = api.wait_job(&id, T, "150 MiB copied", |v| {
        v["bytes_copied"].as_u64().unwrap() >= 150 * MIB
    });
    let at_kill = v["bytes_copied"].as_u64().unwrap();
    // SAFETY: signals the child process the Daemon owns.
    unsafe { libc::kill(target.pid() as i32, libc::SIGKILL) };
    drop(target);
    let v = api.wait_job(&id, T, "the job to notice", |v| {
        v["state"] == "copying" && v["error"].is_string()
    });
    eprintln!("target down: {v}");
    // The guest keeps writing while the target is away.
    let uri = format!("nbd://{}/src", src_node.tcp.as_deref().unwrap());
    for off in [3, 500, 1000] {
        run_ok(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                &uri,
                "-c",
                &format!("write -P 0x5a {off}M 1M"),
            ]),
            T,
        );
    }
    let (target, _tapi) = node(&targs);
    let copied = resume_and_complete(&api, &id, &src, &dst);
    eprintln!(
        "resumed: killed at {} MiB, {} MiB in all",
        at_kill / MIB,
        copied / MIB
    );
    // Starting over would have copied at_kill + all of it again; resuming copies
    // what was left, plus at most what the target had not flushed (64 MiB) and the
    // requests in flight (32 MiB) when it died.
    let budget = (data + 3 + 64 + 32 + 8) * MIB;
    assert!(
        copied <= budget && copied < at_kill + data * MIB,
        "copied {} MiB: more than resuming should",
        copied / MIB
    );
    drop(target);
}

/// Two sites, 1 Gbit/s and 20 ms RTT between them: the source node in site A
/// mirrors to a node in site B through the delay line. One request in flight is
/// bound by the round trip; the default window fills the link.
#[test]
fn mirror_across_a_shaped_wan_link() {
    if !TwoSites::available("mirror_across_a_shaped_wan_link") {
        return;
    }
    require_tool!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = 512 * MIB;
    let data = 256;
    let src = dir.path().join("src.img");
    sparse_file(&src, size);
    fill(&src, size, data, 11);
    let dsts: Vec<_> = (1..=2)
        .map(|i| dir.path().join(format!("dst{i}.img")))
        .collect();
    for d in &dsts {
        sparse_file(d, size);
    }
    let link = LinkSpec::default();
    let mut sites = TwoSites::create(link).unwrap();
    sites.enter_a().unwrap();
    let b_nbd = format!("{}:{}", sites.b_ip, free_port());
    let exports: Vec<String> = dsts
        .iter()
        .enumerate()
        .map(|(i, d)| format!("dst{}={},unleased", i + 1, d.display()))
        .collect();
    let _target = start_nbd_in(
        &["ip", "netns", "exec", &sites.b],
        &[
            "--listen",
            &b_nbd,
            "--export",
            &exports[0],
            "--export",
            &exports[1],
        ],
    );
    let relay = sites.relay(b_nbd.parse().unwrap()).unwrap();
    let (_source, api) = node(&["--export", &format!("src={},unleased", src.display())]);
    let target = |export: &str| json!({"address": relay.addr.to_string(), "export": export});

    // One request in flight: about 1 MiB per round trip.
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": target("dst1"), "max_in_flight": 1}),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (_, v) = api.call("GET", &format!("/v1/mirrors/{id}"), None);
    let one = v["rate_mib_s"].as_f64().unwrap();
    assert_eq!(
        api.call("DELETE", &format!("/v1/mirrors/{id}"), None).0,
        200
    );

    // The default window.
    let start = Instant::now();
    let id = start_mirror(&api, json!({"export": "src", "target": target("dst2")}));
    let v = api.wait_job(&id, T, "synced", |v| v["state"] == "synced");
    let secs = start.elapsed().as_secs_f64();
    let copied = v["bytes_copied"].as_u64().unwrap();
    complete(&api, &id);
    identical(&src, &dsts[1]);
    let rate = copied as f64 / secs;
    let share = rate / link.bytes_per_s();
    eprintln!(
        "mirror over {} Mbit/s, {:?} RTT: {} MiB in {secs:.2} s = {:.1} MiB/s, {:.0} % of the link; one request in flight: {one:.1} MiB/s",
        link.rate_mbit,
        link.rtt,
        copied / MIB,
        rate / MIB as f64,
        share * 100.0
    );
    assert!(
        one * (MIB as f64) < rate / 2.0,
        "the delay line did not slow one request in flight"
    );
    assert!(share >= 0.5, "only {:.0} % of the link", share * 100.0);
}

/// The link between the sites is cut mid-mirror (no connection is told) and
/// restored: the job carries on and ends identical without starting over.
#[test]
fn mirror_survives_a_cut_wan_link() {
    if !TwoSites::available("mirror_survives_a_cut_wan_link") {
        return;
    }
    require_tool!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = 512 * MIB;
    let data = 200;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_file(&src, size);
    sparse_file(&dst, size);
    fill(&src, size, data, 13);
    let mut sites = TwoSites::create(LinkSpec::default()).unwrap();
    sites.enter_a().unwrap();
    let b_nbd = format!("{}:{}", sites.b_ip, free_port());
    let export = format!("dst={},unleased", dst.display());
    let _target = start_nbd_in(
        &["ip", "netns", "exec", &sites.b],
        &["--listen", &b_nbd, "--export", &export],
    );
    let relay = sites.relay(b_nbd.parse().unwrap()).unwrap();
    let (_source, api) = node(&["--export", &format!("src={},unleased", src.display())]);
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": relay.addr.to_string(), "export": "dst"},
               "bandwidth_mib_s": 50}),
    );
    api.wait_job(&id, T, "60 MiB copied", |v| {
        v["bytes_copied"].as_u64().unwrap() >= 60 * MIB
    });
    sites.set_link(false).unwrap();
    // Nothing crosses while the link is down.
    std::thread::sleep(Duration::from_millis(500));
    let (_, before) = api.call("GET", &format!("/v1/mirrors/{id}"), None);
    std::thread::sleep(Duration::from_secs(2));
    let (_, after) = api.call("GET", &format!("/v1/mirrors/{id}"), None);
    let stalled =
        after["bytes_copied"].as_u64().unwrap() - before["bytes_copied"].as_u64().unwrap();
    assert!(stalled <= 40 * MIB, "{stalled} bytes crossed a cut link");
    sites.set_link(true).unwrap();
    let v = api.wait_job(&id, T, "synced after the cut", |v| v["state"] == "synced");
    eprintln!("after the cut: {v}");
    complete(&api, &id);
    identical(&src, &dst);
    let copied = v["bytes_copied"].as_u64().unwrap();
    assert!(copied <= (data + 100) * MIB, "copied {} MiB", copied / MIB);
}

/// Between two nodes with `--tls-*` files the job uses TLS by default: STARTTLS,
/// this node's certificate presented, the target's checked against the CA.
#[test]
fn mirror_between_tls_nodes_uses_tls() {
    require_tool!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let pki =
        stagehand_common::pki::TestPki::generate(&dir.path().join("pki"), &["a", "b"]).unwrap();
    let tls_args = |node: &str| -> Vec<String> {
        let f = pki.files(node);
        vec![
            "--tls-cert".into(),
            f.cert.display().to_string(),
            "--tls-key".into(),
            f.key.display().to_string(),
            "--tls-ca".into(),
            f.ca.display().to_string(),
        ]
    };
    let size = 64 * MIB;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_file(&src, size);
    sparse_file(&dst, size);
    fill(&src, size, 16, 17);
    let mut b = vec![
        "--export".to_string(),
        format!("dst={},unleased", dst.display()),
    ];
    b.extend(tls_args("b"));
    let target = start_nbd(&b.iter().map(String::as_str).collect::<Vec<_>>());
    let api_port = free_port();
    let mut a = vec![
        "--api".to_string(),
        format!("127.0.0.1:{api_port}"),
        "--export".into(),
        format!("src={},unleased", src.display()),
    ];
    a.extend(tls_args("a"));
    let _source = start_nbd(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let api = Api::new_tls(api_port, &pki.files("a").ca);
    let addr = target.tcp.clone().unwrap();
    // Without TLS the target proves nothing, and no --mirror-allow rule names it:
    // refused before any byte is read.
    assert_target_not_allowed(
        &api,
        json!({"export": "src", "target": {"address": addr, "export": "dst", "tls": false}}),
    );
    let id = start_mirror(
        &api,
        json!({"export": "src", "target": {"address": addr, "export": "dst"}}),
    );
    let v = api.wait_job(&id, T, "synced", |v| v["state"] == "synced");
    assert_eq!(v["tls"], true, "{v}");
    complete(&api, &id);
    identical(&src, &dst);
}
