//! Helpers for the live-migration tests: agents as real processes on loopback, a tiny
//! blocking HTTP client, and the A-B guest image.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "migrate-test-token";

/// Whether KVM is usable; prints the loud skip line when it is not.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    stagehand_tests::skip!("SKIPPED: {test}: /dev/kvm missing");
    false
}

pub fn agent_bin() -> PathBuf {
    if let Ok(d) = std::env::var("STAGEHAND_BIN_DIR") {
        return Path::new(&d).join("stagehand-agent");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/stagehand-agent")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A stagehand-agent process, killed on drop.
pub struct Agent {
    child: Option<Child>,
    pub api: String,
    pub migration: String,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let (api, mig) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let child = Command::new(agent_bin())
            .args(["--api", &format!("127.0.0.1:{api}")])
            .args(["--migration-listen", &format!("127.0.0.1:{mig}")])
            .args(["--api-token", TOKEN])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (build it first)",
                    agent_bin().display()
                )
            });
        let a = Agent {
            child: Some(child),
            api: format!("127.0.0.1:{api}"),
            migration: format!("127.0.0.1:{mig}"),
            dir,
        };
        wait_until(Duration::from_secs(20), "agent health", || {
            a.try_request("GET", "/v1/health", None)
                .is_ok_and(|(s, _)| s == 200)
        });
        a
    }

    /// SIGKILL, like a host that dies.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(&self.api)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no header end"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status"))?;
        let mut body = raw[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Ok((status, body))
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (s, b) = self
            .try_request(method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        (
            s,
            serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let (s, v) = self.request(method, path, body);
        assert!(
            (200..300).contains(&s),
            "{method} {path}: {s} {v}\n{}",
            self.log()
        );
        v
    }

    pub fn console(&self, vm: &str) -> Vec<u8> {
        let (s, b) = self
            .try_request("GET", &format!("/v1/vms/{vm}/console"), None)
            .expect("console");
        assert_eq!(s, 200);
        b
    }

    /// Starts the A-B sweeper and waits until it printed 'A'.
    pub fn start_ab(&self, vm: &str, memory_mib: u64) {
        let image = self.dir.path().join("ab.bin");
        std::fs::write(&image, agent::guests::AB_SWEEPER).expect("write guest image");
        self.ok(
            "PUT",
            &format!("/v1/vms/{vm}"),
            Some(serde_json::json!({
                "memory_mib": memory_mib, "vcpus": 1,
                "boot": {"flat_binary": image, "load_addr": agent::guests::AB_SWEEPER_LOAD_ADDR},
                "disks": []
            })),
        );
        wait_until(Duration::from_secs(30), "'A' on the console", || {
            self.console(vm).contains(&b'A')
        });
    }

    /// Pauses the VM, dumps its RAM, runs QEMU's A-B check, resumes it. Returns the
    /// byte at 1 MiB (to see the sweep move between two calls).
    pub fn check_ab(&self, vm: &str) -> u8 {
        self.ok("POST", &format!("/v1/vms/{vm}/pause"), None);
        let dump = self.dir.path().join(format!("{vm}.ram"));
        self.ok(
            "POST",
            &format!("/v1/vms/{vm}/memory-dump"),
            Some(serde_json::json!({"path": dump})),
        );
        let ram = std::fs::read(&dump).expect("read dump");
        let _ = std::fs::remove_file(&dump);
        if let Err(e) = agent::guests::check_ab_ram(&ram) {
            panic!("A-B RAM check failed on {vm}: {e}");
        }
        self.ok("POST", &format!("/v1/vms/{vm}/resume"), None);
        ram[1 << 20]
    }

    pub fn migration(&self, id: &str) -> serde_json::Value {
        self.ok("GET", &format!("/v1/migrations/{id}"), None)
    }

    pub fn wait_migration_end(&self, id: &str, limit: Duration) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let m = self.migration(id);
            if ["completed", "failed", "cancelled"].contains(&m["state"].as_str().unwrap_or("")) {
                return m;
            }
            assert!(
                t.elapsed() < limit,
                "migration did not end in {limit:?}: {m}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn vm_state(&self, vm: &str) -> Option<String> {
        let (s, v) = self.request("GET", &format!("/v1/vms/{vm}"), None);
        (s == 200).then(|| v["state"].as_str().unwrap_or("").to_string())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn dechunk(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(nl) = b[i..].windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[i..i + nl]).trim(), 16).unwrap_or(0);
        i += nl + 2;
        if size == 0 || i + size > b.len() {
            break;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
    out
}

pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the sweeper visibly moved on `a` (two RAM checks see different bytes).
pub fn assert_sweeping(a: &Agent, vm: &str) {
    let first = a.check_ab(vm);
    wait_until(Duration::from_secs(20), "the sweep to move", || {
        a.check_ab(vm) != first
    });
}
