//! Helpers for the live-migration tests: agents as real processes on loopback, a tiny
//! blocking HTTP client, and the A-B guest image.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "migrate-test-token";

/// The integration tests' one KVM check.
pub use stagehand_tests::kvm_or_skip;

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
    /// `--tls-*` files when the agent runs with TLS (HTTPS API, TLS migration).
    pub tls: Option<stagehand_common::tls::TlsFiles>,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_with(None)
    }

    /// An agent with `--tls-cert/--tls-key/--tls-ca` from `tls` when given.
    pub fn start_with(tls: Option<stagehand_common::tls::TlsFiles>) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let (api, mig) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let mut cmd = Command::new(agent_bin());
        if let Some(t) = &tls {
            cmd.arg("--tls-cert")
                .arg(&t.cert)
                .arg("--tls-key")
                .arg(&t.key)
                .arg("--tls-ca")
                .arg(&t.ca);
        }
        let child = cmd
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
            tls,
        };
        wait_until(Duration::from_secs(20), "agent health", || {
            a.try_request("GET", "/v1/health", None)
                .is_ok_and(|(s, _)| s == 200)
        });
        a
    }

    /// The agent's `--data-dir` (memory dumps must be written under it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The agent's images directory (`<data-dir>/images`): guests boot from there only.
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir().join("images")
    }

    /// The agent's process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
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
        let tcp = TcpStream::connect(&self.api)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut s: Box<dyn ReadWrite> = match &self.tls {
            None => Box::new(tcp),
            Some(t) => {
                let cfg = stagehand_common::tls::ca_only_client_config(&t.ca)
                    .map_err(std::io::Error::other)?;
                let name =
                    stagehand_common::tls::server_name(&self.api).map_err(std::io::Error::other)?;
                let c = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
                Box::new(rustls::StreamOwned::new(c, tcp))
            }
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        )?;
        let mut raw = Vec::new();
        // A TLS peer that closes without close_notify ends the reply all the same.
        match s.read_to_end(&mut raw) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
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
        let image = self.images_dir().join("ab.bin");
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
        let dump = self.data_dir().join(format!("{vm}.ram"));
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

/// A plain or TLS stream to the API.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

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
