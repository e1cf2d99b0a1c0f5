//! The HTTP API against the real `stagehand-agent` binary on a free loopback port:
//! auth, errors, VM lifecycle with the A-B guest, console, pause, memory dump, metrics,
//! clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789abcdef";

fn agent_bin() -> PathBuf {
    match std::env::var_os("STAGEHAND_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join("stagehand-agent"),
        None => PathBuf::from(env!("CARGO_BIN_EXE_stagehand-agent")),
    }
}

/// The agent process; killed on drop so a failing test leaves nothing behind.
struct Agent {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(agent_bin())
        .args([
            "--api",
            "127.0.0.1:0",
            "--host-id",
            "test-host",
            "--api-token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start stagehand-agent");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("stagehand-agent: api listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("agent announced its API address within 20 s")
        .parse()
        .expect("a socket address");
    Agent {
        child,
        addr,
        _dir: dir,
    }
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .expect("error body has error.code")
            .to_string()
    }
}

/// Minimal HTTP/1.1 client (Connection: close), so the test needs no HTTP crate.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read reply");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("reply has headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).expect("hex").trim(), 16)
                    .expect("hex size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Reply { status, body }
}

fn kvm_ok() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Secure by default: without a token and without `--insecure-no-auth` the agent
/// does not start, and says why.
#[test]
fn refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(agent_bin())
        .args(["--api", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("STAGEHAND_AGENT_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run stagehand-agent");
    assert!(!out.status.success(), "started without a token");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve the API without authentication")
            && err.contains("--insecure-no-auth"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("api listening"),
        "it must not listen"
    );
    // With the explicit opt-out it starts (and is killed here at once).
    let mut child = Command::new(agent_bin())
        .args(["--api", "127.0.0.1:0", "--insecure-no-auth"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("STAGEHAND_AGENT_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stagehand-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("api listening"), "{line}");
}

#[test]
fn guest_image_subcommand_writes_the_sweeper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("ab.bin");
    let status = Command::new(agent_bin())
        .args(["guest-image", "ab-sweeper", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("run guest-image");
    assert!(status.success());
    assert_eq!(
        std::fs::read(&out).expect("image"),
        agent::guests::AB_SWEEPER
    );
    // Without --out it goes into the images directory, where the API may boot it.
    let status = Command::new(agent_bin())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["guest-image", "ab-sweeper"])
        .stdout(Stdio::null())
        .status()
        .expect("run guest-image");
    assert!(status.success());
    assert_eq!(
        std::fs::read(dir.path().join("data/images/ab-sweeper.bin")).expect("image"),
        agent::guests::AB_SWEEPER
    );
    let bad = Command::new(agent_bin())
        .args(["guest-image", "no-such-guest", "--out"])
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .expect("run guest-image");
    assert!(!bad.success(), "an unknown guest name fails");
}

#[test]
fn api_lifecycle_against_the_real_binary() {
    let mut agent = start_agent();
    let a = agent.addr;
    let images = agent._dir.path().join("data/images");

    // Health is open and says nothing but "ok" (no host id, no version).
    let r = http(a, "GET", "/v1/health", None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
    // Everything else: no token or a wrong one is 401 in our error shape.
    let r = http(a, "GET", "/v1/vms", None, None);
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "unauthorized");
    assert_eq!(http(a, "GET", "/v1/vms", Some("wrong"), None).status, 401);
    assert_eq!(http(a, "GET", "/metrics", None, None).status, 401);
    let r = http(a, "GET", "/v1/vms/none", Some(TOKEN), None);
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = http(
        a,
        "PUT",
        "/v1/vms/bad",
        Some(TOKEN),
        Some("{\"memory_mib\": \"lots\"}"),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_request")
    );
    let r = http(
        a,
        "PUT",
        "/v1/vms/bad",
        Some(TOKEN),
        Some(&format!(
            r#"{{"memory_mib":16,"vcpus":1,"boot":{{"flat_binary":{:?},"load_addr":31744}},"disks":[]}}"#,
            images.join("missing.bin").display().to_string()
        )),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "bad_image"));

    // Lease tokens go in their own field: a URI carrying one is refused, on create
    // and on resume, and the refusal does not echo the token.
    let r = http(
        a,
        "PUT",
        "/v1/vms/leased",
        Some(TOKEN),
        Some(&format!(
            r#"{{"memory_mib":16,"boot":{{"flat_binary":{:?}}},"disks":[{{"nbd":"nbd://127.0.0.1:1/d;lease=S3CRET"}}]}}"#,
            images.join("x.bin").display().to_string()
        )),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "lease_in_uri"));
    assert!(!String::from_utf8_lossy(&r.body).contains("S3CRET"));
    let r = http(
        a,
        "POST",
        "/v1/vms/leased/resume",
        Some(TOKEN),
        Some(r#"{"disks":[{"nbd":"nbd://127.0.0.1:1/d;lease=S3CRET"}]}"#),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "lease_in_uri"));

    // Confinement: a token holder boots only from the images directory and dumps
    // only under the data directory; `..` and symlinks do not get out.
    std::os::unix::fs::symlink("/etc/passwd", images.join("escape.bin")).expect("symlink");
    for image in [
        "/etc/passwd".to_string(),
        format!("{}/../../../../etc/passwd", images.display()),
        images.join("escape.bin").display().to_string(),
        "relative.bin".to_string(),
    ] {
        let r = http(
            a,
            "PUT",
            "/v1/vms/escape",
            Some(TOKEN),
            Some(&format!(
                r#"{{"memory_mib":16,"vcpus":1,"boot":{{"flat_binary":{image:?}}},"disks":[]}}"#
            )),
        );
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (403, "path_not_allowed"),
            "booting {image}"
        );
    }
    assert_eq!(
        http(a, "GET", "/v1/vms/escape", Some(TOKEN), None).status,
        404
    );

    if !kvm_ok() {
        {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: /dev/kvm missing: VM part of the API test"
            );
        };
    } else {
        let image = images.join("ab.bin");
        std::fs::write(&image, agent::guests::AB_SWEEPER).expect("write image");
        let create = format!(
            r#"{{"memory_mib":128,"vcpus":1,"boot":{{"flat_binary":{:?},"load_addr":31744}},"disks":[{{"nbd":"nbd://127.0.0.1:10809/d1","lease":"L3ASE"}}]}}"#,
            image.display().to_string()
        );
        let r = http(a, "PUT", "/v1/vms/t1", Some(TOKEN), Some(&create));
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        let vm = r.json();
        assert_eq!(vm["state"], "running");
        assert_eq!(vm["memory_mib"], 128);
        assert_eq!(
            vm["disks"][0],
            serde_json::json!({"nbd": "nbd://127.0.0.1:10809/d1"})
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("L3ASE"),
            "lease shown"
        );
        let r = http(a, "PUT", "/v1/vms/t1", Some(TOKEN), Some(&create));
        assert_eq!((r.status, r.error_code().as_str()), (409, "already_exists"));

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = http(a, "GET", "/v1/vms/t1/console", Some(TOKEN), None);
            assert_eq!(r.status, 200);
            if r.body.first() == Some(&b'A') {
                break;
            }
            assert!(Instant::now() < deadline, "no 'A' on the console");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300)); // let it sweep a bit

        // Dumps outside the data directory are refused before anything is written.
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), agent._dir.path().join("data/out"))
            .expect("symlink");
        for path in [
            outside.path().join("ram.bin"),
            agent._dir.path().join("data/../ram.bin"),
            agent._dir.path().join("data/out/ram.bin"),
        ] {
            let r = http(
                a,
                "POST",
                "/v1/vms/t1/memory-dump",
                Some(TOKEN),
                Some(&format!(r#"{{"path":{:?}}}"#, path.display().to_string())),
            );
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (403, "path_not_allowed"),
                "dump to {}",
                path.display()
            );
            assert!(!path.exists(), "{} was written", path.display());
        }

        let dump = agent._dir.path().join("data/ram.bin");
        let dump_req = format!(r#"{{"path":{:?}}}"#, dump.display().to_string());
        let r = http(
            a,
            "POST",
            "/v1/vms/t1/memory-dump",
            Some(TOKEN),
            Some(&dump_req),
        );
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (409, "wrong_state"),
            "dump needs a paused VM"
        );

        let r = http(a, "POST", "/v1/vms/t1/pause", Some(TOKEN), None);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["state"], "paused");
        let r = http(
            a,
            "POST",
            "/v1/vms/t1/memory-dump",
            Some(TOKEN),
            Some(&dump_req),
        );
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["bytes"], 128u64 << 20);
        let ram = std::fs::read(&dump).expect("dump file");
        assert_eq!(ram.len(), 128 << 20);
        agent::guests::check_ab_ram(&ram).expect("A-B RAM consistent");
        assert!(
            ram[agent::guests::AB_START as usize] != 0,
            "the guest swept"
        );
        // The code, byte for byte (the CPU sets accessed bits in the GDT behind it).
        assert!(
            ram[0x7c00..0x7c40] == agent::guests::AB_SWEEPER[..0x40],
            "image at 0x7c00"
        );

        let r = http(a, "POST", "/v1/vms/t1/resume", Some(TOKEN), None);
        assert_eq!(r.json()["state"], "running");
        let r = http(a, "GET", "/v1/vms", Some(TOKEN), None);
        assert_eq!(r.json().as_array().map(Vec::len), Some(1));

        let r = http(a, "GET", "/metrics", Some(TOKEN), None);
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert!(
            text.contains("stagehand_agent_vms{state=\"running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stagehand_agent_api_unauthorized_total 3"),
            "{text}"
        );

        assert_eq!(
            http(a, "DELETE", "/v1/vms/t1", Some(TOKEN), None).status,
            204
        );
        assert_eq!(http(a, "GET", "/v1/vms/t1", Some(TOKEN), None).status, 404);

        // A second VM stays up across the shutdown below and is torn down by it.
        let r = http(a, "PUT", "/v1/vms/t2", Some(TOKEN), Some(&create));
        assert_eq!(r.status, 201);
    }

    // SIGTERM: a clean, prompt exit.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = agent.child.try_wait().expect("wait") {
            assert!(status.success(), "agent exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
