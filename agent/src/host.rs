//! What this host offers guests and what they use: `GET /v1/host` and the `host_*`
//! metrics. A sampler task measures, every `--sample-interval-s` seconds, each
//! running guest's CPU use (its vCPU threads' CPU clocks) and dirty-page rate (KVM's
//! dirty log switched on for one second, then off again; a migration in progress owns
//! the log and the sample yields to it). Cost per sample and guest: two memory-slot
//! updates, one GET_DIRTY_LOG, and one write-protection fault per page the guest
//! writes during the second (measured figures in agent/README.md).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::contract::PAGE_SIZE;
use crate::manager::VmManager;

/// How long dirty logging stays on per sample.
pub const SAMPLE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct HostCpu {
    pub model: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestUsage {
    pub name: String,
    pub state: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// Percent of one CPU over the last sampling interval.
    pub cpu_percent: f64,
    /// MiB of guest memory written per second over the last sample window.
    pub dirty_mib_per_s: f64,
    /// Age of the figures, ms (None: not sampled yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_ms_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host_id: String,
    pub memory_mib_total: u64,
    pub memory_mib_for_guests: u64,
    /// Guest memory of every VM on the host (running, paused, incoming, migrating).
    pub memory_mib_used: u64,
    pub vcpus: u32,
    pub cpu: HostCpu,
    pub guests: Vec<GuestUsage>,
    pub sample_interval_s: u64,
}

#[derive(Debug, Clone, Default)]
struct Sample {
    cpu_percent: f64,
    dirty_mib_per_s: f64,
    at: Option<Instant>,
    /// vCPU time and wall clock at the previous sample (for the CPU percentage).
    last_cpu: Option<(Instant, Duration)>,
}

/// The host's description and the guests' latest samples.
pub struct HostMonitor {
    manager: Arc<VmManager>,
    host_id: String,
    cpu: HostCpu,
    memory_mib_total: u64,
    memory_mib_for_guests: u64,
    vcpus: u32,
    interval: Duration,
    samples: Mutex<BTreeMap<String, Sample>>,
    /// Time spent in the dirty-log ioctls of samples, µs, and samples taken.
    pub sample_cost_us: AtomicU64,
    pub samples_taken: AtomicU64,
}

/// MemTotal from /proc/meminfo, MiB (0 when unreadable).
fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Guest memory by default: MemTotal less 1 GiB for the host, at least a quarter.
pub fn default_for_guests(total_mib: u64) -> u64 {
    total_mib.saturating_sub(1024).max(total_mib / 4)
}

impl HostMonitor {
    pub fn new(
        manager: Arc<VmManager>,
        host_id: &str,
        for_guests_mib: Option<u64>,
        interval_s: u64,
        fingerprint_override: Option<&str>,
    ) -> Self {
        let (model, fingerprint) = match crate::machine::host_cpu() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the host's CPUID; reporting an empty CPU fingerprint");
                ("unknown".to_owned(), String::new())
            }
        };
        let fingerprint = match fingerprint_override {
            Some(f) => {
                tracing::warn!(
                    fingerprint = f,
                    "TEST ONLY: reporting a faked CPU fingerprint (--test-cpu-fingerprint)"
                );
                f.to_owned()
            }
            None => fingerprint,
        };
        let total = mem_total_mib();
        HostMonitor {
            manager,
            host_id: host_id.to_owned(),
            cpu: HostCpu { model, fingerprint },
            memory_mib_total: total,
            memory_mib_for_guests: for_guests_mib.unwrap_or_else(|| default_for_guests(total)),
            vcpus: std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1),
            interval: Duration::from_secs(interval_s),
            samples: Mutex::new(BTreeMap::new()),
            sample_cost_us: AtomicU64::new(0),
            samples_taken: AtomicU64::new(0),
        }
    }

    pub fn report(&self) -> HostReport {
        let vms = self.manager.list();
        let samples = self
            .samples
            .lock()
            .expect("samples lock is never poisoned")
            .clone();
        let now = Instant::now();
        let guests: Vec<GuestUsage> = vms
            .iter()
            .map(|v| {
                let s = samples.get(&v.name).cloned().unwrap_or_default();
                GuestUsage {
                    name: v.name.clone(),
                    state: v.state.as_str().to_owned(),
                    memory_mib: v.memory_mib,
                    vcpus: v.vcpus,
                    cpu_percent: round2(s.cpu_percent),
                    dirty_mib_per_s: round2(s.dirty_mib_per_s),
                    sampled_ms_ago: s.at.map(|t| now.duration_since(t).as_millis() as u64),
                }
            })
            .collect();
        HostReport {
            host_id: self.host_id.clone(),
            memory_mib_total: self.memory_mib_total,
            memory_mib_for_guests: self.memory_mib_for_guests,
            memory_mib_used: vms.iter().map(|v| v.memory_mib).sum(),
            vcpus: self.vcpus,
            cpu: self.cpu.clone(),
            guests,
            sample_interval_s: self.interval.as_secs(),
        }
    }

    /// Samples every running guest every interval until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.interval.is_zero() {
            return;
        }
        loop {
            let me = Arc::clone(&self);
            let started = tokio::task::spawn_blocking(move || me.start_samples())
                .await
                .unwrap_or_default();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(SAMPLE_WINDOW) => {}
            }
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || me.end_samples(started)).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval.saturating_sub(SAMPLE_WINDOW)) => {}
            }
        }
    }

    /// Switches dirty logging on for every running guest; returns (name, start).
    fn start_samples(&self) -> Vec<(String, Instant)> {
        let mut out = Vec::new();
        for v in self.manager.list() {
            if v.state.as_str() != "running" {
                continue;
            }
            let Ok(m) = self.manager.machine(&v.name) else {
                continue;
            };
            let t = Instant::now();
            match m.start_dirty_sample() {
                Ok(true) => {
                    self.cost(t);
                    out.push((v.name.clone(), Instant::now()));
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(vm = %v.name, error = %e, "no dirty sample"),
            }
        }
        out
    }

    fn end_samples(&self, started: Vec<(String, Instant)>) {
        let mut fresh = BTreeMap::new();
        for (name, since) in started {
            let Ok(m) = self.manager.machine(&name) else {
                continue;
            };
            let t = Instant::now();
            let pages = match m.end_dirty_sample() {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(vm = %name, error = %e, "dirty sample failed");
                    continue;
                }
            };
            self.cost(t);
            self.samples_taken.fetch_add(1, Ordering::Relaxed);
            let secs = since.elapsed().as_secs_f64().max(1e-3);
            let dirty = (pages * PAGE_SIZE) as f64 / (1 << 20) as f64 / secs;
            fresh.insert(name, (dirty, m.vcpu_time()));
        }
        let now = Instant::now();
        let mut samples = self.samples.lock().expect("samples lock is never poisoned");
        let live: std::collections::BTreeSet<String> =
            self.manager.list().into_iter().map(|v| v.name).collect();
        samples.retain(|k, _| live.contains(k));
        for (name, (dirty, cpu_time)) in fresh {
            let s = samples.entry(name).or_default();
            if let Some((t0, c0)) = s.last_cpu {
                let wall = now.duration_since(t0).as_secs_f64();
                if wall > 0.0 {
                    s.cpu_percent = cpu_time.saturating_sub(c0).as_secs_f64() / wall * 100.0;
                }
            }
            s.last_cpu = Some((now, cpu_time));
            s.dirty_mib_per_s = dirty;
            s.at = Some(now);
        }
    }

    fn cost(&self, since: Instant) {
        self.sample_cost_us
            .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Prometheus lines for /metrics.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let r = self.report();
        let mut out = String::new();
        out.push_str("# HELP stagehand_agent_host_memory_mib Host memory: total, for guests, used by guests.\n# TYPE stagehand_agent_host_memory_mib gauge\n");
        for (k, v) in [
            ("total", r.memory_mib_total),
            ("for_guests", r.memory_mib_for_guests),
            ("used", r.memory_mib_used),
        ] {
            let _ = writeln!(out, "stagehand_agent_host_memory_mib{{kind=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# TYPE stagehand_agent_host_vcpus gauge\nstagehand_agent_host_vcpus {}",
            r.vcpus
        );
        let per_guest: [(&str, &str, GuestFigure); 2] = [
            (
                "stagehand_agent_vm_cpu_percent",
                "Guest CPU use, percent of one CPU.",
                |g| g.cpu_percent,
            ),
            (
                "stagehand_agent_vm_dirty_mib_per_second",
                "Guest memory written per second (sampled).",
                |g| g.dirty_mib_per_s,
            ),
        ];
        for (metric, help, value) in per_guest {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            for g in &r.guests {
                let _ = writeln!(out, "{metric}{{vm=\"{}\"}} {}", g.name, value(g));
            }
        }
        let _ = writeln!(
            out,
            "# HELP stagehand_agent_dirty_samples_total Dirty-rate samples taken.\n# TYPE stagehand_agent_dirty_samples_total counter\nstagehand_agent_dirty_samples_total {}",
            self.samples_taken.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP stagehand_agent_dirty_sample_ioctl_microseconds_total Time in the sampler's dirty-log ioctls.\n# TYPE stagehand_agent_dirty_sample_ioctl_microseconds_total counter\nstagehand_agent_dirty_sample_ioctl_microseconds_total {}",
            self.sample_cost_us.load(Ordering::Relaxed)
        );
        out
    }
}

/// One per-guest figure of the metrics.
type GuestFigure = fn(&GuestUsage) -> f64;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_guest_memory_leaves_room_for_the_host() {
        assert_eq!(super::default_for_guests(16384), 15360);
        assert_eq!(super::default_for_guests(1024), 256);
        assert_eq!(super::default_for_guests(0), 0);
    }
}
