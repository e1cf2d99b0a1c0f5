//! Shared harness of the lease tests: start a real `stagehand-nbd`, talk to its API,
//! run real NBD clients, checksum backing files.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The built `stagehand-nbd` (`$STAGEHAND_BIN_DIR`, else cargo's target/release;
/// built on demand so a bare `cargo test --release` works).
pub fn server_bin() -> PathBuf {
    stagehand_tests::bin("stagehand-nbd", "nbd-server")
}

/// A free loopback port (bound then released; the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The system python with python3-libnbd (a pyenv shim on PATH may lack it).
pub fn python() -> &'static str {
    "/usr/bin/python3"
}

pub fn have_python_libnbd() -> bool {
    Command::new(python())
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn writer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lease_support/nbd_writer.py")
}

/// CLOCK_MONOTONIC in nanoseconds, the clock python's `time.monotonic_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).expect("positive") * 1_000_000_000
        + u64::try_from(ts.tv_nsec).expect("positive")
}

pub fn checksum(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).expect("read backing file"))
}

/// The API token of a node started without one of the test's own.
pub const DEFAULT_API_TOKEN: &str = "lease-tests-api-token";

/// A running storage node, killed on drop.
pub struct Node {
    child: Option<Child>,
    pub nbd_port: u16,
    pub api_port: u16,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub api_token: Option<String>,
    pub http: reqwest::Client,
}

impl Node {
    /// Starts the server with `--listen`, `--api`, `--data-dir` and `extra` flags, and
    /// waits (bounded) until `/v1/health` answers. Unless `extra` names its own
    /// `--export-root`, the data directory's parent is one. Without `api_token`, and unless
    /// `extra` chooses `--api-token-file` or `--insecure-no-auth`, the node gets
    /// [`DEFAULT_API_TOKEN`], which [`Node::call`] then sends when given no token.
    pub async fn start(data_dir: &Path, extra: &[String], api_token: Option<&str>) -> Node {
        let own_auth = extra
            .iter()
            .any(|a| a == "--api-token-file" || a == "--insecure-no-auth");
        let api_token = match api_token {
            None if !own_auth => Some(DEFAULT_API_TOKEN),
            t => t,
        };
        let nbd_port = free_port();
        let api_port = free_port();
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{nbd_port}"),
            "--api".to_string(),
            format!("127.0.0.1:{api_port}"),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        if let Some(t) = api_token {
            args.push("--api-token".into());
            args.push(t.into());
        }
        // API-added exports in these tests live next to the data directory.
        if !extra.iter().any(|a| a == "--export-root")
            && let Some(parent) = data_dir.parent()
        {
            args.push("--export-root".into());
            args.push(parent.display().to_string());
        }
        args.extend(extra.iter().cloned());
        Self::spawn(args, nbd_port, api_port, data_dir, api_token).await
    }

    async fn spawn(
        args: Vec<String>,
        nbd_port: u16,
        api_port: u16,
        data_dir: &Path,
        api_token: Option<&str>,
    ) -> Node {
        let bin = server_bin();
        assert!(
            bin.exists(),
            "{} missing: build it first (cargo build --release -p nbd-server)",
            bin.display()
        );
        let child = Command::new(&bin)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn stagehand-nbd");
        let node = Node {
            child: Some(child),
            nbd_port,
            api_port,
            data_dir: data_dir.to_path_buf(),
            args,
            api_token: api_token.map(str::to_string),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
        };
        node.wait_ready().await;
        node
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self
                .http
                .get(format!("{}/v1/health", self.base()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok && std::net::TcpStream::connect(("127.0.0.1", self.nbd_port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stagehand-nbd did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9 and start again with the same flags and ports.
    pub async fn kill9_and_restart(mut self) -> Node {
        self.kill9();
        let args = std::mem::take(&mut self.args);
        let token = self.api_token.take();
        Self::spawn(
            args,
            self.nbd_port,
            self.api_port,
            &self.data_dir,
            token.as_deref(),
        )
        .await
    }

    /// The server's process id (None once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn nbd_addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    /// Calls the API with `token`, else with the node's own token (if it has one).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (reqwest::StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base()));
        if let Some(t) = token.or(self.api_token.as_deref()) {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("API request");
        let status = resp.status();
        let text = resp.text().await.expect("API body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Fences `export` to `epoch` and returns the token; panics unless 200.
    pub async fn fence(&self, export: &str, epoch: u64) -> String {
        let (s, v) = self.try_fence(export, epoch).await;
        assert_eq!(s, reqwest::StatusCode::OK, "fence {export} to {epoch}: {v}");
        v["token"]
            .as_str()
            .expect("token in fence answer")
            .to_string()
    }

    pub async fn try_fence(&self, export: &str, epoch: u64) -> (reqwest::StatusCode, Value) {
        let body = json!({"epoch": epoch, "holder": format!("holder-{epoch}")}).to_string();
        self.call(
            reqwest::Method::POST,
            &format!("/v1/exports/{export}/fence"),
            Some(&body),
            self.api_token.as_deref(),
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A sparse backing file of `size` bytes filled with a recognizable first block.
pub fn backing_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create backing file");
    f.set_len(size).expect("size backing file");
    path
}

/// A python3-libnbd writer process (see nbd_writer.py), killed on drop.
pub struct PyWriter {
    child: Child,
    lines: Option<std::thread::JoinHandle<Vec<String>>>,
}

pub struct PyReport {
    /// (start_ns, ok) per attempt.
    pub attempts: Vec<(u64, bool)>,
}

impl PyWriter {
    /// Starts the writer and waits (bounded) for its "ready" (or "refused") line.
    pub fn start(
        addr: &str,
        export: &str,
        seconds: f64,
        conns: usize,
        base: u64,
    ) -> (PyWriter, Option<String>) {
        Self::start_pipelined(addr, export, seconds, conns, base, 1)
    }

    /// Like `start`, with `queue_depth` writes in flight per connection.
    pub fn start_pipelined(
        addr: &str,
        export: &str,
        seconds: f64,
        conns: usize,
        base: u64,
        queue_depth: usize,
    ) -> (PyWriter, Option<String>) {
        use std::io::BufRead;
        let (host, port) = addr.split_once(':').expect("host:port");
        let mut child = Command::new(python())
            .arg(writer_script())
            .args([
                host,
                port,
                export,
                &seconds.to_string(),
                &conns.to_string(),
                &base.to_string(),
                &queue_depth.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python writer");
        let stdout = child.stdout.take().expect("piped");
        let mut reader = std::io::BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("read writer output");
        let refused = first.strip_prefix("refused ").map(|s| s.trim().to_string());
        if refused.is_none() {
            assert_eq!(first.trim(), "ready", "writer said {first:?}");
        }
        // A thread drains the pipe so the writer never blocks on a full pipe.
        let lines = std::thread::spawn(move || reader.lines().map_while(Result::ok).collect());
        (
            PyWriter {
                child,
                lines: Some(lines),
            },
            refused,
        )
    }

    /// Waits (bounded) for the writer to end and parses its attempts.
    pub fn finish(mut self, timeout: Duration) -> PyReport {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait().expect("wait writer").is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "python writer did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        let lines = self
            .lines
            .take()
            .expect("finish runs once")
            .join()
            .expect("reader thread");
        let mut attempts = Vec::new();
        for line in lines {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("ok"), Some(t)) => attempts.push((t.parse().expect("ns"), true)),
                (Some("err"), Some(t)) => attempts.push((t.parse().expect("ns"), false)),
                _ => {}
            }
        }
        PyReport { attempts }
    }
}

impl Drop for PyWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
