//! A loopback etcd cluster for the coordinator tests: `n` members with fast raft
//! timers, each killable and restartable on its own data directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use stagehand_tests::{free_port, run_timeout};

use super::Proc;

/// Whether the `etcd` binary and KVM are there; prints the loud skip line for `test`
/// when one is missing.
pub fn etcd_and_kvm_or_skip(test: &str) -> bool {
    if !stagehand_tests::have_tool("etcd") {
        stagehand_tests::skip!(
            "SKIPPED: {test}: etcd missing (run `make deps`: Debian's etcd-server)"
        );
        return false;
    }
    stagehand_tests::kvm_or_skip(test)
}

/// A three-member (or `n`) etcd on 127.0.0.1.
pub struct Etcd {
    dir: PathBuf,
    names: Vec<String>,
    /// Client ports, by member.
    pub client: Vec<u16>,
    peer: Vec<u16>,
    /// The members' processes (`None` while one is down).
    pub procs: Vec<Option<Proc>>,
}

impl Etcd {
    pub fn start(dir: &Path, n: usize) -> Etcd {
        let names: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
        let client: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peer: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut e = Etcd {
            dir: dir.to_path_buf(),
            names,
            client,
            peer,
            procs: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            e.start_member(i);
        }
        for i in 0..n {
            e.wait_member(i);
        }
        e
    }

    pub fn store_uri(&self) -> String {
        let eps: Vec<String> = self
            .client
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    pub fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .names
            .iter()
            .zip(&self.peer)
            .map(|(n, p)| format!("{n}=http://127.0.0.1:{p}"))
            .collect();
        let c = format!("http://127.0.0.1:{}", self.client[i]);
        let p = format!("http://127.0.0.1:{}", self.peer[i]);
        let args: Vec<String> = [
            "--name",
            &self.names[i],
            "--data-dir",
            &self.dir.join(&self.names[i]).display().to_string(),
            "--listen-client-urls",
            &c,
            "--advertise-client-urls",
            &c,
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
            "--initial-cluster",
            &cluster.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "stagehand-test",
            // Loopback: fast heartbeats, so a lost etcd leader is replaced quickly.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.dir.join(format!("{}.log", self.names[i]));
        // Append: a restarted member keeps its earlier log.
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn etcd");
        self.procs[i] = Some(Proc {
            child,
            name: "etcd",
        });
    }

    pub fn wait_member(&self, i: usize) {
        let url = format!("http://127.0.0.1:{}/health", self.client[i]);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run_timeout(
                Command::new("curl").args(["-s", "-m", "2", &url]),
                Duration::from_secs(5),
            );
            if let Ok(o) = out
                && String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\"")
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "etcd member {i} did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The member that is etcd's raft leader now (the harder one to lose).
    pub fn raft_leader(&self) -> usize {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            for (i, port) in self.client.iter().enumerate() {
                let out = run_timeout(
                    Command::new("curl").args([
                        "-s",
                        "-m",
                        "2",
                        "-X",
                        "POST",
                        "-d",
                        "{}",
                        &format!("http://127.0.0.1:{port}/v3/maintenance/status"),
                    ]),
                    Duration::from_secs(5),
                );
                let v: Value = out
                    .ok()
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                    .unwrap_or(Value::Null);
                if v["leader"].is_string() && v["leader"] == v["header"]["member_id"] {
                    return i;
                }
            }
            assert!(Instant::now() < end, "no etcd member says it leads");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill();
        }
    }
}
