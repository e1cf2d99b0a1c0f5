//! Fence counters and the Prometheus text rendering of `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ExportInfo;

/// Upper bounds of the fence latency histogram, in seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Fence outcomes and latencies since the node started.
#[derive(Debug, Default)]
pub struct FenceMetrics {
    succeeded: AtomicU64,
    refused_stale: AtomicU64,
    failed: AtomicU64,
    /// Cumulative counts per bucket (plus +Inf last).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl FenceMetrics {
    pub fn record_success(&self, latency: Duration) {
        self.succeeded.fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.buckets[BUCKETS.len()].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn record_stale(&self) {
        self.refused_stale.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }
}

/// Escapes a label value per the Prometheus text format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric of the node.
pub fn render(exports: &[ExportInfo], fences: &FenceMetrics) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let mut metric = |name: &str, kind: &str, help: &str, f: &dyn Fn(&ExportInfo) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for e in exports {
            let _ = writeln!(out, "{name}{{export=\"{}\"}} {}", label(&e.name), f(e));
        }
    };
    metric(
        "stagehand_nbd_connections",
        "gauge",
        "NBD connections currently bound to the export.",
        &|e| e.stats.connections,
    );
    metric(
        "stagehand_nbd_read_bytes_total",
        "counter",
        "Bytes read from the export.",
        &|e| e.stats.read_bytes,
    );
    metric(
        "stagehand_nbd_written_bytes_total",
        "counter",
        "Bytes written to the export.",
        &|e| e.stats.written_bytes,
    );
    metric(
        "stagehand_nbd_requests_total",
        "counter",
        "NBD requests served on the export.",
        &|e| e.stats.requests,
    );
    metric(
        "stagehand_nbd_lease_epoch",
        "gauge",
        "Current lease epoch of the export (0 when never fenced or unleased).",
        &|e| e.gate.record().map_or(0, |r| r.epoch),
    );

    let _ = writeln!(
        out,
        "# HELP stagehand_nbd_fences_total Fence requests by outcome.\n# TYPE stagehand_nbd_fences_total counter"
    );
    for (outcome, v) in [
        ("ok", &fences.succeeded),
        ("stale_epoch", &fences.refused_stale),
        ("error", &fences.failed),
    ] {
        let _ = writeln!(
            out,
            "stagehand_nbd_fences_total{{outcome=\"{outcome}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP stagehand_nbd_fence_duration_seconds Time from fence request to durable epoch and drained writes.\n# TYPE stagehand_nbd_fence_duration_seconds histogram"
    );
    for (i, bound) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "stagehand_nbd_fence_duration_seconds_bucket{{le=\"{bound}\"}} {}",
            fences.buckets[i].load(Ordering::Relaxed)
        );
    }
    let count = fences.buckets[BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "stagehand_nbd_fence_duration_seconds_bucket{{le=\"+Inf\"}} {count}\nstagehand_nbd_fence_duration_seconds_sum {}\nstagehand_nbd_fence_duration_seconds_count {count}",
        fences.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = FenceMetrics::default();
        m.record_success(Duration::from_micros(300));
        m.record_success(Duration::from_millis(3));
        m.record_success(Duration::from_secs(2));
        m.record_stale();
        let text = render(&[], &m);
        assert!(text.contains("stagehand_nbd_fence_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("stagehand_nbd_fence_duration_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("stagehand_nbd_fence_duration_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("stagehand_nbd_fence_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("stagehand_nbd_fences_total{outcome=\"ok\"} 3\n"));
        assert!(text.contains("stagehand_nbd_fences_total{outcome=\"stale_epoch\"} 1\n"));
        assert_eq!(label("a\"b\\"), "a\\\"b\\\\");
    }
}
