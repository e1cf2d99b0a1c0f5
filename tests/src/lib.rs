//! Helpers shared by the workspace integration tests: finding the built binaries,
//! starting daemons on free loopback ports and stopping them on drop, running peer
//! tools with a time limit, and skipping loudly when a tool is missing.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod netns;

/// Directory holding the workspace's built binaries: `STAGEHAND_BIN_DIR` when set,
/// else the directory above this test executable's `deps/`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STAGEHAND_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable has a directory");
    deps.parent().expect("deps/ has a parent").to_path_buf()
}

/// Path of a workspace binary, building it (release) when it is not there yet, so
/// that a bare `cargo test --release` works as well as `make test`.
pub fn bin(name: &str, package: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", package, "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    assert!(p.exists(), "{} missing after build", p.display());
    p
}

/// True when `tool` is on PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Prints a skip message straight to stderr. Not `eprintln!`: libtest captures the
/// `eprintln!` output of passing tests, and a skipped test must be seen in the log.
/// (The agent's and nbd-server's own tests write to stderr the same way.)
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Whether KVM is usable (`/dev/kvm` opens read-write); prints the loud skip line for
/// `test` when it is not. The one KVM check of the integration tests.
pub fn kvm_or_skip(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        skip!("SKIPPED: {test}: /dev/kvm missing or not usable");
    }
    usable
}

/// Returns from the calling test with a loud message when a tool is missing.
#[macro_export]
macro_rules! require_tool {
    ($tool:expr) => {
        if !$crate::have_tool($tool) {
            $crate::skip!("SKIPPED: {} missing (run `make deps`)", $tool);
            return;
        }
    };
}

/// A port that was free a moment ago on 127.0.0.1 (for peers that cannot report
/// the port they bound).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Runs a command to completion within `limit`, killing it when it overruns.
pub fn run_timeout(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, limit).expect("command runs");
    assert!(
        out.status.success(),
        "{desc} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running daemon, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    pub tcp: Option<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    /// Sends SIGTERM and waits up to `limit` for a clean exit; returns the exit
    /// success and what the daemon logged.
    pub fn terminate(mut self, limit: Duration) -> (bool, String) {
        let ok = self.stop(limit);
        let log = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (ok, log)
    }

    fn stop(&mut self, limit: Duration) -> bool {
        // SAFETY: signals a child process we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// The control API token [`start_nbd`] gives the server when the test's args choose
/// no authentication of their own (the server refuses to start without one).
pub const NBD_API_TOKEN: &str = "stagehand-tests-api-token";

/// Starts `stagehand-nbd` with `args` plus `--listen 127.0.0.1:0` (unless the args
/// choose a listener) and `--api-token NBD_API_TOKEN` (unless they choose
/// `--api-token[-file]` or `--insecure-no-auth`), and waits for it to report its
/// listeners.
pub fn start_nbd(args: &[&str]) -> Daemon {
    start_nbd_in(&[], args)
}

/// [`start_nbd`] under a wrapper that execs it, e.g. `["ip", "netns", "exec", NS]`
/// (the daemon keeps the wrapper's pid).
pub fn start_nbd_in(wrapper: &[&str], args: &[&str]) -> Daemon {
    let exe = bin("stagehand-nbd", "nbd-server");
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    if !args
        .iter()
        .any(|a| ["--api-token", "--api-token-file", "--insecure-no-auth"].contains(a))
    {
        cmd.args(["--api-token", NBD_API_TOKEN]);
    }
    cmd.args(args)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn stagehand-nbd");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let want_tcp = !args.windows(2).any(|w| w == ["--listen", "none"]);
    let want_unix = args.contains(&"--unix");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut tcp = None;
    let mut unix = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while (want_tcp && tcp.is_none()) || (want_unix && !unix) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(a) = line.strip_prefix("stagehand-nbd: listening on tcp ") {
                    tcp = Some(a.trim().to_owned());
                } else if line.starts_with("stagehand-nbd: listening on unix ") {
                    unix = true;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = err_thread.join().unwrap_or_default();
                panic!("stagehand-nbd did not start: {log}");
            }
        }
    }
    Daemon {
        child,
        tcp,
        stderr: Some(err_thread),
    }
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
