//! A loopback cluster for the coordinator tests: one stagehand-nbd, two
//! stagehand-agents (siteA, siteB), `coord serve`, and the `coord` CLI. Every process
//! is killed on drop; every wait is bounded.
//!
//! The coordinator keeps its state in RocksDB under the cluster directory, or - with
//! `STAGEHAND_TEST_STORE=etcd` - in a three-member etcd on loopback that the fixture
//! starts (`make test-coord-etcd` runs the coordinator suites that way): the same
//! tests then check the same behaviour on the replicated store.
#![allow(dead_code)]

pub mod etcd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stagehand_tests::{bin, free_port, run_timeout};

pub const TOKEN: &str = "coord-test-cluster-token-0123456789";

/// The agents' host names, by index.
pub const HOSTS: [&str; 2] = ["kvm-a1", "kvm-b1"];

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit by itself; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until GET `url` answers 200 (bounded).
pub fn wait_health(url: &str, token: Option<&str>, p: &mut Proc) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited during start-up: {status}", p.name);
        }
        let mut cmd = Command::new("curl");
        cmd.args(["-sf", "-m", "2", "-o", "/dev/null", url]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if run_timeout(&mut cmd, Duration::from_secs(5))
            .map(|o| o.status.success())
            .unwrap_or(false)
            && listens(p.child.id(), url)
        {
            return;
        }
        assert!(
            Instant::now() < end,
            "{} did not become healthy at {url}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` itself listens on `url`'s port. Ports come from
/// `free_port` (bind to 0, release): a test running beside us can take the same one,
/// and then our daemon fails to bind while its own daemon answers our health check
/// with the same test token (seen: a VM created on another test's agent).
fn listens(pid: u32, url: &str) -> bool {
    let Some(port) = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
    else {
        return true;
    };
    let out = Command::new("ss")
        .args(["-Htlnp", &format!("sport = :{port}")])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            String::from_utf8_lossy(&o.stdout).contains(&format!("pid={pid},"))
        }
        // Without ss the check cannot be made; the health answer has to do.
        _ => true,
    }
}

pub struct Node {
    pub proc: Proc,
    pub api: String,
    pub nbd: String,
}

pub struct Agent {
    pub proc: Proc,
    pub api: String,
    pub migration: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nbd: Node,
    pub agents: Vec<Agent>,
    pub coord: Option<Proc>,
    pub coord_api: String,
    pub guest: PathBuf,
    /// `--store` of the coordinators when not RocksDB in coord-data (etcd tests).
    pub store: Option<String>,
    /// The etcd cluster behind `store` when the fixture started one.
    pub etcd: Option<etcd::Etcd>,
}

/// The store the coordinator suites run on: `STAGEHAND_TEST_STORE=etcd` selects a
/// fixture-started etcd, anything else (or nothing) RocksDB.
pub fn etcd_requested() -> bool {
    std::env::var("STAGEHAND_TEST_STORE").is_ok_and(|v| v == "etcd")
}

pub fn spawn(
    exe: &Path,
    args: &[String],
    name: &'static str,
    log: &Path,
    env: &[(&str, &str)],
) -> Proc {
    let logf = std::fs::File::create(log).expect("create log file");
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}")),
        name,
    }
}

impl Cluster {
    /// Storage node + two agents + coordinator (started), nothing registered yet.
    pub fn start() -> Cluster {
        let mut c = Cluster::start_without_coord();
        c.start_coord(&[]);
        c
    }

    /// Storage node + two agents; the test starts its coordinators.
    pub fn start_without_coord() -> Cluster {
        let mut dir = tempfile::tempdir().expect("tempdir");
        if std::env::var_os("STAGEHAND_KEEP_TEST_DIRS").is_some() {
            // Logs of every daemon stay for a post-mortem.
            dir.disable_cleanup(true);
            eprintln!("test cluster in {}", dir.path().display());
        }
        let d = dir.path();
        let nbd_api = format!("127.0.0.1:{}", free_port());
        let nbd_port = format!("127.0.0.1:{}", free_port());
        std::fs::create_dir_all(d.join("nbd-data")).expect("mkdir");
        // The coordinator's images directory (its default, <data-dir>/images).
        std::fs::create_dir_all(d.join("coord-data/images")).expect("mkdir");
        let mut nbd = spawn(
            &bin("stagehand-nbd", "nbd-server"),
            &[
                "--listen".into(),
                nbd_port.clone(),
                "--api".into(),
                nbd_api.clone(),
                "--data-dir".into(),
                d.join("nbd-data").display().to_string(),
                "--api-token".into(),
                TOKEN.into(),
            ],
            "stagehand-nbd",
            &d.join("nbd.log"),
            &[],
        );
        wait_health(
            &format!("http://{nbd_api}/v1/health"),
            Some(TOKEN),
            &mut nbd,
        );
        let agent_exe = bin("stagehand-agent", "agent");
        // Guest images live in one directory that is every agent's images directory
        // (their default, <data-dir>/images, is a symlink to it): a VM's image path is
        // the same on both hosts, and agents only boot images from there.
        let images = d.join("images");
        std::fs::create_dir_all(&images).expect("mkdir");
        let mut agents = Vec::new();
        for host in HOSTS {
            agents.push(start_agent(d, host, &[]));
        }
        let guest = guest_image(&agent_exe, "ab-sweeper", &images.join("ab.bin"));
        let mut c = Cluster {
            dir,
            nbd: Node {
                proc: nbd,
                api: nbd_api,
                nbd: nbd_port,
            },
            agents,
            coord: None,
            coord_api: format!("127.0.0.1:{}", free_port()),
            guest,
            store: None,
            etcd: None,
        };
        if etcd_requested() {
            c.start_etcd();
        }
        c
    }

    /// Starts a three-member etcd on loopback in the cluster directory; coordinators
    /// started from now on keep their state there.
    pub fn start_etcd(&mut self) {
        assert!(
            stagehand_tests::have_tool("etcd"),
            "STAGEHAND_TEST_STORE=etcd but etcd is not installed (run `make deps`)"
        );
        let dir = self.dir.path().join("etcd");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let e = etcd::Etcd::start(&dir, 3);
        self.store = Some(e.store_uri());
        self.etcd = Some(e);
    }

    /// "etcd" or "rocksdb": the store kind `coord status` should report.
    pub fn store_kind(&self) -> &'static str {
        if self.store.is_some() {
            "etcd"
        } else {
            "rocksdb"
        }
    }

    /// Starts one more agent with host id `host` (sharing the images directory) and
    /// `extra` flags; returns its index in `agents`.
    pub fn add_agent(&mut self, host: &str, extra: &[&str]) -> usize {
        let agent = start_agent(self.dir.path(), host, extra);
        self.agents.push(agent);
        self.agents.len() - 1
    }

    /// Pauses the A-B sweeper guest `vm` on agent `i` (host id `host`), dumps its RAM,
    /// checks it with `check_ab_ram`, and resumes it.
    pub fn check_ab_at(&self, i: usize, host: &str, vm: &str) {
        let ram = self.pause_and_dump(i, host, vm);
        agent::guests::check_ab_ram(&ram).unwrap_or_else(|e| panic!("RAM of {vm}: {e}"));
        let (code, v) = self.agent_post(i, &format!("/v1/vms/{vm}/resume"), "");
        assert_eq!(code, 200, "resume {vm}: {v}");
    }

    pub fn start_coord(&mut self, env: &[(&str, &str)]) {
        self.start_coord_with(&[], env);
    }

    /// Starts `coord serve` on the cluster's state with extra flags and environment.
    pub fn start_coord_with(&mut self, flags: &[&str], env: &[(&str, &str)]) {
        let d = self.dir.path();
        let n = std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--api".into(),
            self.coord_api.clone(),
            "--data-dir".into(),
            d.join("coord-data").display().to_string(),
            "--api-token".into(),
            TOKEN.into(),
        ];
        if let Some(store) = &self.store {
            args.extend([
                "--store".into(),
                store.clone(),
                "--name".into(),
                "coord".into(),
            ]);
        }
        args.extend(flags.iter().map(|f| f.to_string()));
        let mut p = spawn(
            &bin("coord", "coordinator"),
            &args,
            "coord serve",
            &d.join(format!("coord-{n}.log")),
            env,
        );
        wait_health(
            &format!("http://{}/v1/health", self.coord_api),
            None,
            &mut p,
        );
        if self.store.is_some() {
            // On etcd it leads only once the lease of a killed predecessor has run
            // out (up to the election TTL): wait, so that writes are accepted.
            self.wait_leading(&mut p);
        }
        self.coord = Some(p);
    }

    /// Starts one of several `coord serve` processes sharing the cluster's etcd store
    /// (`start_etcd` first), named `name`, its API at `api`; waits for its health only
    /// (it may follow).
    pub fn start_named_coord(&self, name: &str, api: &str, env: &[(&str, &str)]) -> Proc {
        let store = self
            .store
            .as_deref()
            .expect("start_named_coord needs the etcd store (Cluster::start_etcd)");
        let d = self.dir.path();
        let n = std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
        let args: Vec<String> = [
            "serve",
            "--api",
            api,
            "--store",
            store,
            "--name",
            name,
            "--data-dir",
            &d.join("coord-data").display().to_string(),
            "--api-token",
            TOKEN,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut p = spawn(
            &bin("coord", "coordinator"),
            &args,
            "coord serve",
            &d.join(format!("{name}-{n}.log")),
            env,
        );
        wait_health(&format!("http://{api}/v1/health"), None, &mut p);
        p
    }

    /// Waits (bounded) until the coordinator at `coord_api` says it leads.
    fn wait_leading(&self, p: &mut Proc) {
        let url = format!("http://{}/v1/status", self.coord_api);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("{} exited before leading: {status}", p.name);
            }
            let (code, v) = self.get(&url);
            if code == 200 && v["coordinator"]["role"] == "leader" {
                return;
            }
            assert!(
                Instant::now() < end,
                "the coordinator on etcd did not lead within 30 s: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `coord ARGS --json` with the cluster token; returns (success, stdout JSON or
    /// Null, stderr).
    pub fn cli_with_token(&self, args: &[&str], token: &str) -> (bool, Value, String) {
        let out = run_timeout(
            Command::new(bin("coord", "coordinator"))
                .args(args)
                .arg("--json")
                .env(
                    "STAGEHAND_COORDINATOR",
                    format!("http://{}", self.coord_api),
                )
                .env("STAGEHAND_TOKEN", token),
            Duration::from_secs(120),
        )
        .expect("coord CLI runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (
            out.status.success(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn cli(&self, args: &[&str]) -> (bool, Value, String) {
        self.cli_with_token(args, TOKEN)
    }

    /// Runs the CLI and panics with its stderr unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Value {
        let (ok, v, err) = self.cli(args);
        assert!(ok, "coord {args:?} failed: {err}");
        v
    }

    /// Runs the CLI expecting failure; returns its one-line stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let (ok, _, err) = self.cli(args);
        assert!(!ok, "coord {args:?} should have failed");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "one-line error expected: {err}"
        );
        err
    }

    /// site add siteA siteB; the storage node in siteA reachable from siteB; a host per site.
    /// A started cluster with its sites, storage node and hosts registered, or `None`
    /// after a loud skip when /dev/kvm is missing (the agents need it).
    pub fn registered_or_skip(test: &str) -> Option<Cluster> {
        if !stagehand_tests::kvm_or_skip(test) {
            return None;
        }
        let c = Cluster::start();
        c.register();
        Some(c)
    }

    pub fn register(&self) {
        self.ok(&["site", "add", "siteA"]);
        self.ok(&["site", "add", "siteB"]);
        // No --disk-dir: disks go to the node's own export root (<data-dir>/exports).
        self.ok(&[
            "storage",
            "add",
            "nbd-a1",
            "--site",
            "siteA",
            "--api",
            &format!("http://{}", self.nbd.api),
            "--nbd",
            &self.nbd.nbd,
            "--reachable-from",
            "siteB",
        ]);
        self.register_hosts();
    }

    /// Registers the agents as kvm-a1 (siteA) and kvm-b1 (siteB), 1 GiB each.
    pub fn register_hosts(&self) {
        for (i, (host, site)) in [("kvm-a1", "siteA"), ("kvm-b1", "siteB")]
            .iter()
            .enumerate()
        {
            self.ok(&[
                "host",
                "add",
                host,
                "--site",
                site,
                "--api",
                &format!("http://{}", self.agents[i].api),
                "--migration",
                &self.agents[i].migration,
                "--memory",
                "1G",
            ]);
        }
    }

    /// The one HTTP client of the coord tests (curl): `method` on `url` with the
    /// cluster token and an optional JSON body; (status, raw body).
    pub fn http_raw(&self, method: &str, url: &str, body: Option<&str>) -> (u16, Vec<u8>) {
        let auth = format!("Authorization: Bearer {TOKEN}");
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-m",
            "60",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "-H",
            &auth,
        ]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", b]);
        }
        cmd.arg(url);
        let out = run_timeout(&mut cmd, Duration::from_secs(70)).expect("curl runs");
        let text = out.stdout;
        let split = text.iter().rposition(|b| *b == b'\n').unwrap_or(0);
        let code = String::from_utf8_lossy(&text[split..])
            .trim()
            .parse()
            .unwrap_or(0);
        (code, text[..split].to_vec())
    }

    /// [`Cluster::http_raw`] with a JSON answer (Null when it is not JSON).
    pub fn http(&self, method: &str, url: &str, body: Option<&str>) -> (u16, Value) {
        let (code, raw) = self.http_raw(method, url, body);
        (code, serde_json::from_slice(&raw).unwrap_or(Value::Null))
    }

    /// GET on a daemon with the cluster token; (status, JSON body).
    pub fn get(&self, url: &str) -> (u16, Value) {
        self.http("GET", url, None)
    }

    /// The VM's state on agent `i` ("absent" when the agent has none).
    pub fn agent_vm_state(&self, i: usize, vm: &str) -> String {
        let (code, v) = self.get(&format!("http://{}/v1/vms/{vm}", self.agents[i].api));
        if code == 404 {
            return "absent".into();
        }
        v["state"].as_str().unwrap_or("?").to_owned()
    }

    /// The export's lease `(holder, epoch)` as the storage node reports it.
    pub fn lease(&self, export: &str) -> (String, u64) {
        let (_, v) = self.get(&format!("http://{}/v1/exports/{export}", self.nbd.api));
        (
            v["lease"]["holder"].as_str().unwrap_or("").to_owned(),
            v["lease"]["epoch"].as_u64().unwrap_or(0),
        )
    }

    /// Writes the built-in guest `kind` (`ab-sweeper`, `disk-writer`) into the cluster dir.
    pub fn guest_image(&self, kind: &str) -> PathBuf {
        guest_image(
            &bin("stagehand-agent", "agent"),
            kind,
            &self.dir.path().join("images").join(format!("{kind}.bin")),
        )
    }

    /// Where the storage node keeps an export's file (its default export root).
    pub fn disk_file(&self, export: &str) -> PathBuf {
        self.dir
            .path()
            .join("nbd-data/exports")
            .join(format!("{export}.img"))
    }

    /// The coordinator's images directory (`--disk-image` files go there).
    pub fn images_dir(&self) -> PathBuf {
        self.dir.path().join("coord-data/images")
    }

    /// The token of the VM's first disk's current lease (reads need it: the
    /// coordinator creates disks with `require_lease_for_reads`).
    pub fn read_token(&self, vm: &str) -> String {
        let t = self.lease_tokens(vm);
        assert!(
            t.first().is_some_and(|d| !d.2.is_empty()),
            "no lease token recorded for {vm}: {t:?}"
        );
        t[0].2.clone()
    }

    /// The VM's disk lease tokens `(epoch, holder, token)`, read from the coordinator's
    /// state directory (the API never shows them).
    pub fn lease_tokens(&self, vm: &str) -> Vec<(u64, String, String)> {
        let dir = self.dir.path().join("coord-data");
        let mut cmd = Command::new(bin("coord", "coordinator"));
        cmd.args(["lease-tokens", vm]);
        match &self.store {
            Some(store) => cmd.args(["--store", store]),
            None => cmd.arg("--data-dir").arg(&dir),
        };
        let out = run_timeout(&mut cmd, Duration::from_secs(30)).expect("coord lease-tokens runs");
        assert!(out.status.success(), "coord lease-tokens: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    d["epoch"].as_u64().unwrap_or(0),
                    d["holder"].as_str().unwrap_or("").to_owned(),
                    d["token"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// POST on agent `i` with the cluster token; (status, JSON body).
    pub fn agent_post(&self, i: usize, path: &str, body: &str) -> (u16, Value) {
        let url = format!("http://{}{path}", self.agents[i].api);
        self.http("POST", &url, Some(body))
    }

    /// Bytes of COM1 output of the VM on agent `i`.
    pub fn console_len(&self, i: usize, vm: &str) -> usize {
        let url = format!("http://{}/v1/vms/{vm}/console", self.agents[i].api);
        self.http_raw("GET", &url, None).1.len()
    }

    /// Waits until the guest on agent `i` printed something new since now (the disk
    /// writer prints 'A' once booted, then 'W' every 4096 acknowledged records), so
    /// it has made progress: at least one 'W' in all. The observable replacement for
    /// "sleep a moment and hope it ran".
    pub fn wait_guest_progress(&self, i: usize, vm: &str) {
        let start = self.console_len(i, vm).max(1);
        self.wait_for(
            &format!("{vm} on agent {i} to make progress"),
            Duration::from_secs(60),
            |c| (c.console_len(i, vm) > start).then_some(()),
        );
    }

    /// Waits (bounded) until agent `i` has no copy of `vm`.
    pub fn wait_absent(&self, i: usize, vm: &str) {
        self.wait_for(
            &format!("agent {i} to drop {vm}"),
            Duration::from_secs(20),
            |c| (c.agent_vm_state(i, vm) == "absent").then_some(()),
        );
    }

    /// The phases of a migration's journal, in order.
    pub fn journal_phases(&self, id: &str) -> Vec<String> {
        let show = self.ok(&["migration", "show", id]);
        show["journal"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["phase"]["phase"].as_str().map(str::to_owned))
            .collect()
    }

    /// Names of the hosts whose agent runs `vm`.
    pub fn running_on(&self, vm: &str) -> Vec<&'static str> {
        [("kvm-a1", 0usize), ("kvm-b1", 1)]
            .into_iter()
            .filter(|(_, i)| self.agent_vm_state(*i, vm) == "running")
            .map(|(h, _)| h)
            .collect()
    }

    /// Waits until migration `id` is in pre-copy and has moved some memory.
    pub fn wait_precopy(&self, id: &str) -> Value {
        self.wait_for("pre-copy to move memory", Duration::from_secs(60), |c| {
            let (ok, m, _) = c.cli(&["migration", "show", id]);
            (ok && m["state"] == "precopy" && m["memory_bytes"].as_u64().unwrap_or(0) > 0)
                .then_some(m)
        })
    }

    /// Checks the disk-writer guest of `vm` on agent `i`: pause, dump its RAM, read its
    /// disk read-only through NBD, run the agent's checkers, resume. Returns the last
    /// acknowledged record's seq.
    pub fn check_disk_writer(&self, i: usize, vm: &str, export: &str) -> u64 {
        self.check_disk_writer_at(i, HOSTS[i], vm, export)
    }

    /// `check_disk_writer` on agent `i` whose host id is `host` (agents started by
    /// `add_agent` as well as the first two).
    pub fn check_disk_writer_at(&self, i: usize, host: &str, vm: &str, export: &str) -> u64 {
        let ram = self.pause_and_dump(i, host, vm);
        let at = agent::guests::DISK_WRITER_ACKED_ADDR as usize;
        let mut word = [0u8; 8];
        word.copy_from_slice(&ram[at..at + 8]);
        let acked = u64::from_le_bytes(word);
        let disk = read_disk(&self.nbd.nbd, export, &self.read_token(vm), 1 << 20);
        let check = agent::guests::check_disk_records(&disk, acked)
            .unwrap_or_else(|e| panic!("disk of {vm} on agent {i}: {e}"));
        agent::guests::check_ab_ram(&ram).unwrap_or_else(|e| panic!("RAM of {vm}: {e}"));
        let (code, v) = self.agent_post(i, &format!("/v1/vms/{vm}/resume"), "");
        assert_eq!(code, 200, "resume {vm}: {v}");
        assert!(acked > 0, "the guest acknowledged no write: {check:?}");
        acked
    }

    /// Exactly one running copy of `vm`, on its recorded host, which holds the lease at
    /// the recorded epoch; the disk-writer guest's disk and RAM check out.
    pub fn assert_one_copy(&self, vm: &str, what: &str) {
        let export = format!("{vm}-disk0");
        let shown = self.ok(&["vm", "show", vm]);
        let host = shown["host"].as_str().unwrap_or("").to_owned();
        assert_eq!(
            self.running_on(vm),
            vec![host.as_str()],
            "{what}: one copy on {host}"
        );
        let (holder, epoch) = self.lease(&export);
        assert_eq!(holder, host, "{what}: the running host holds the lease");
        assert_eq!(shown["disks"][0]["epoch"], epoch, "{what}: recorded epoch");
        assert_eq!(shown["state"], "running", "{what}");
        let idx = if host == HOSTS[0] { 0 } else { 1 };
        self.check_disk_writer(idx, vm, &export);
    }

    /// Pauses `vm` on agent `i` (host id `host`) and returns its RAM, dumped by the
    /// agent under its data directory (the only place it writes dumps). The VM stays
    /// paused.
    pub fn pause_and_dump(&self, i: usize, host: &str, vm: &str) -> Vec<u8> {
        let (code, v) = self.agent_post(i, &format!("/v1/vms/{vm}/pause"), "");
        assert_eq!(code, 200, "pause {vm}: {v}");
        let dump = self
            .dir
            .path()
            .join(format!("{host}-data"))
            .join(format!("{vm}.ram"));
        let body = serde_json::json!({"path": dump}).to_string();
        let (code, v) = self.agent_post(i, &format!("/v1/vms/{vm}/memory-dump"), &body);
        assert_eq!(code, 200, "memory-dump {vm}: {v}");
        let ram = std::fs::read(&dump).expect("read the dump");
        let _ = std::fs::remove_file(&dump);
        ram
    }

    /// Polls `probe` until it yields a value (bounded; panics naming `what`).
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut(&Cluster) -> Option<T>,
    ) -> T {
        let end = Instant::now() + limit;
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `coord migration show` until the migration is terminal (bounded).
    pub fn wait_migration(&self, id: &str, limit: Duration) -> Value {
        self.wait_for(&format!("migration {id} to end"), limit, |c| {
            let (ok, v, _) = c.cli(&["migration", "show", id]);
            (ok && matches!(
                v["state"].as_str(),
                Some("committed" | "rolled_back" | "cancelled")
            ))
            .then_some(v)
        })
    }
}

/// Starts an agent with host id `host` in cluster directory `d` (data in
/// `d/<host>-data`, whose `images` is a symlink to the shared `d/images`), with the
/// cluster token and `extra` flags, and waits until it answers.
fn start_agent(d: &Path, host: &str, extra: &[&str]) -> Agent {
    let api = format!("127.0.0.1:{}", free_port());
    let mig = format!("127.0.0.1:{}", free_port());
    let data = d.join(format!("{host}-data"));
    std::fs::create_dir_all(&data).expect("mkdir");
    std::os::unix::fs::symlink(d.join("images"), data.join("images")).expect("symlink images");
    let mut args: Vec<String> = vec![
        "--api".into(),
        api.clone(),
        "--migration-listen".into(),
        mig.clone(),
        "--host-id".into(),
        host.into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--api-token".into(),
        TOKEN.into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut p = spawn(
        &bin("stagehand-agent", "agent"),
        &args,
        "stagehand-agent",
        &d.join(format!("{host}.log")),
        &[],
    );
    wait_health(&format!("http://{api}/v1/health"), Some(TOKEN), &mut p);
    Agent {
        proc: p,
        api,
        migration: mig,
    }
}

fn guest_image(agent_exe: &Path, kind: &str, out_path: &Path) -> PathBuf {
    let out = run_timeout(
        Command::new(agent_exe)
            .args(["guest-image", kind, "--out"])
            .arg(out_path),
        Duration::from_secs(30),
    )
    .expect("guest-image runs");
    assert!(out.status.success(), "guest-image {kind} failed: {out:?}");
    out_path.to_path_buf()
}

/// The first `len` bytes of `export`, read under the current lease `token` (nothing
/// is written).
pub fn read_disk(nbd: &str, export: &str, token: &str, len: u32) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let fut = async {
            let opts = nbd_client::ClientOptions::new(&format!("{export};lease={token}"));
            let c = nbd_client::Client::connect_tcp(nbd, opts).await?;
            let data = c.read(0, len).await?;
            c.disconnect().await?;
            Ok::<_, nbd_client::ClientError>(data)
        };
        match tokio::time::timeout(Duration::from_secs(20), fut).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("reading {export} over NBD: {e}"),
            Err(_) => panic!("reading {export} over NBD hung"),
        }
    })
}

/// True when the storage node refuses a write to `export` under `token`, with EPERM.
pub fn token_refused(nbd: &str, export: &str, token: &str) -> bool {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let opts = nbd_client::ClientOptions::new(&format!("{export};lease={token}"));
        let fut = async {
            let c = nbd_client::Client::connect_tcp(nbd, opts).await?;
            c.write(0, b"stale", true).await
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(())) => false,
            Ok(Err(e)) => {
                // Refused at connect (unknown token) or EPERM on the write: both fence.
                eprintln!("stale token refused: {e}");
                e.errno().is_none_or(|n| n == 1)
            }
            Err(_) => panic!("NBD write with a stale token hung"),
        }
    })
}

/// An NBD connection opened under a lease token while it was valid, kept across a
/// fence: its writes must then fail - with EPERM during the 100 ms the storage node
/// keeps a fenced connection open, closed after that.
pub struct HeldWriter {
    rt: tokio::runtime::Runtime,
    client: Option<nbd_client::Client>,
}

impl HeldWriter {
    pub fn open(nbd: &str, export: &str, token: &str) -> HeldWriter {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let opts = nbd_client::ClientOptions::new(&format!("{export};lease={token}"));
        let client = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                nbd_client::Client::connect_tcp(nbd, opts),
            )
            .await
            .expect("NBD connect hung")
            .expect("connect with the current holder's token")
        });
        HeldWriter {
            rt,
            client: Some(client),
        }
    }

    /// Writes one sector of 0xEE at `offset`: Ok(()) when it landed, else
    /// Err(Some(errno)) for an NBD error reply or Err(None) when the node had closed
    /// the connection.
    pub fn write(&self, offset: u64) -> Result<(), Option<u32>> {
        let Some(c) = self.client.as_ref() else {
            return Err(None);
        };
        self.rt.block_on(async {
            match tokio::time::timeout(Duration::from_secs(10), c.write(offset, &[0xEE; 512], true))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.errno()),
                Err(_) => panic!("NBD write through a fenced connection hung"),
            }
        })
    }

    /// Asserts the write at `offset` is refused (EPERM or a closed connection) and that
    /// nothing landed on the disk (read under the current holder's `reader_token`);
    /// returns the errno when there was one.
    pub fn assert_fenced(
        &self,
        nbd: &str,
        export: &str,
        reader_token: &str,
        offset: u64,
    ) -> Option<u32> {
        let r = self.write(offset);
        let errno = match r {
            Ok(()) => panic!("a write under a fenced token landed at {offset}"),
            Err(Some(1)) => Some(1),
            Err(Some(n)) => panic!("a fenced write failed with errno {n}, not EPERM"),
            Err(None) => None,
        };
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let sector = rt.block_on(async {
            let opts = nbd_client::ClientOptions::new(&format!("{export};lease={reader_token}"));
            let c = nbd_client::Client::connect_tcp(nbd, opts)
                .await
                .expect("read-only connect");
            let d = c.read(offset, 512).await.expect("read back");
            let _ = c.disconnect().await;
            d
        });
        assert!(
            sector.iter().any(|b| *b != 0xEE),
            "the fenced write's bytes are on the disk"
        );
        errno
    }
}

impl Drop for HeldWriter {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), c.disconnect()).await
            });
        }
    }
}
