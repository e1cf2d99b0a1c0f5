//! The pre-copy policy, pure: when to switch over, when to throttle the guest, when to
//! give up, and how fast to send. The sender feeds it one report per pass and a clock.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What happens when `timeout_s` expires before the migration converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Cancel: the guest goes on running on the source (the default).
    #[default]
    Cancel,
    /// Switch over anyway, accepting a longer downtime.
    Force,
}

/// Limits of one migration; may change while it runs (PATCH /v1/migrations/{id}).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub downtime_limit_ms: u64,
    /// 0 = unlimited.
    pub max_bandwidth_mibs: u64,
    pub auto_converge: bool,
    pub timeout_s: u64,
    pub timeout_action: TimeoutAction,
    /// Hold the switchover: keep copying dirty pages however small the rest gets, until
    /// the hold is lifted (PATCH `{"hold": false}`), the migration is cancelled, or the
    /// timeout cancels it. Lets an operator (or the coordinator, waiting for a disk
    /// mirror to catch up) choose the moment of the stop-and-copy; QEMU's
    /// pause-before-switchover serves the same purpose one step later.
    #[serde(default)]
    pub hold: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            downtime_limit_ms: 300,
            max_bandwidth_mibs: 0,
            auto_converge: false,
            timeout_s: 3600,
            timeout_action: TimeoutAction::Cancel,
            hold: false,
        }
    }
}

/// QEMU's auto-converge steps.
pub const THROTTLE_INITIAL: u8 = 20;
pub const THROTTLE_STEP: u8 = 10;
pub const THROTTLE_MAX: u8 = 99;

/// What the sender observed during one pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassReport {
    /// Guest bytes sent in the pass (page data, before compression).
    pub bytes: u64,
    pub duration: Duration,
    /// Bytes dirtied meanwhile: the dirty set taken right after the pass.
    pub dirty_bytes: u64,
}

/// The decision after a pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Send another pass of the dirty pages.
    Iterate,
    /// Pause and send the rest: it fits the downtime limit (or is forced).
    SwitchOver { forced: bool },
    /// Give up (timeout with the cancel action); the guest stays on the source.
    Cancel,
    /// The switchover would happen now but is held: send another pass (the sender
    /// paces such passes so that a small dirty set does not spin a core).
    Held,
}

/// Pre-copy state across passes.
#[derive(Debug, Clone, Default)]
pub struct Precopy {
    throttle: u8,
    high_dirty_passes: u32,
    total_bytes: u64,
    total_time: Duration,
    last_bandwidth: f64,
    extra_passes: u32,
    passes: u32,
}

/// Expected downtime below which there is nothing left worth another pass. 1 ms: with
/// sparse pages a short pass costs a few ms of total time, and at 3 ms the final pages
/// were half of a ~3 ms downtime (1 GiB A-B: median 3.4 -> 2.8 ms, same total).
pub const TINY_DOWNTIME: Duration = Duration::from_millis(1);
/// Most passes made only to shrink an already acceptable downtime.
pub const MAX_EXTRA_PASSES: u32 = 10;

/// Passes smaller than this measure latency more than bandwidth; their bandwidth is
/// not trusted on its own.
const MIN_MEASURED_BYTES: u64 = 4 << 20;

impl Precopy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Current auto-converge throttle, in percent of vCPU time taken away.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Bandwidth estimate in bytes per second (0 before any pass).
    pub fn bandwidth(&self) -> f64 {
        self.last_bandwidth
    }

    /// Time the remaining bytes would take to send at the estimated bandwidth.
    pub fn expected_downtime(&self, remaining_bytes: u64) -> Duration {
        if remaining_bytes == 0 {
            return Duration::ZERO;
        }
        if self.last_bandwidth <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(remaining_bytes as f64 / self.last_bandwidth)
    }

    /// Records a pass and decides what to do next. `elapsed` is the time since the
    /// migration started.
    pub fn after_pass(&mut self, limits: &Limits, pass: PassReport, elapsed: Duration) -> Decision {
        match self.decide(limits, pass, elapsed) {
            // A hold keeps even a forced switchover back; a timeout's cancel still ends
            // the migration (the guest stays on the source).
            Decision::SwitchOver { .. } if limits.hold => {
                if elapsed >= Duration::from_secs(limits.timeout_s)
                    && limits.timeout_action == TimeoutAction::Cancel
                {
                    Decision::Cancel
                } else {
                    Decision::Held
                }
            }
            d => d,
        }
    }

    fn decide(&mut self, limits: &Limits, pass: PassReport, elapsed: Duration) -> Decision {
        self.passes += 1;
        self.total_bytes += pass.bytes;
        self.total_time += pass.duration;
        let secs = pass.duration.as_secs_f64();
        self.last_bandwidth = if pass.bytes >= MIN_MEASURED_BYTES && secs > 0.0 {
            pass.bytes as f64 / secs
        } else if self.total_time > Duration::ZERO {
            // Small passes: use the average over the whole migration, which is
            // dominated by the big passes that measured the link.
            self.total_bytes as f64 / self.total_time.as_secs_f64()
        } else {
            0.0
        };

        let expected = self.expected_downtime(pass.dirty_bytes);
        if expected <= Duration::from_millis(limits.downtime_limit_ms) {
            // The limit is a ceiling, not a target: while each pass still shrinks the
            // dirty set clearly (the guest dirties slower than we send), one more short
            // pass costs little time and cuts the downtime, so keep going until the
            // rest is tiny or stops shrinking.
            // Pass 0 does not count: its time went mostly to scanning never-used memory
            // and to first touches, so it says nothing about the steady state.
            let shrinking = self.passes == 1 || pass.dirty_bytes * 10 < pass.bytes * 7;
            // With auto-converge allowed, a set that stopped shrinking can still be
            // squeezed by throttling harder (the guest is already slowed anyway).
            let squeeze = !shrinking && limits.auto_converge && self.throttle < THROTTLE_MAX;
            if expected <= TINY_DOWNTIME
                || !(shrinking || squeeze)
                || self.extra_passes >= MAX_EXTRA_PASSES
            {
                return Decision::SwitchOver { forced: false };
            }
            if squeeze {
                self.throttle = if self.throttle == 0 {
                    THROTTLE_INITIAL
                } else {
                    self.throttle
                        .saturating_add(2 * THROTTLE_STEP)
                        .min(THROTTLE_MAX)
                };
            }
            self.extra_passes += 1;
            return Decision::Iterate;
        }
        if limits.auto_converge {
            // QEMU: dirtying more than half of what was sent, twice in a row.
            if pass.dirty_bytes * 2 > pass.bytes {
                self.high_dirty_passes += 1;
                if self.high_dirty_passes >= 2 {
                    self.high_dirty_passes = 0;
                    self.throttle = if self.throttle == 0 {
                        THROTTLE_INITIAL
                    } else {
                        self.throttle
                            .saturating_add(THROTTLE_STEP)
                            .min(THROTTLE_MAX)
                    };
                }
            } else {
                self.high_dirty_passes = 0;
            }
        } else {
            self.throttle = 0;
        }
        if elapsed >= Duration::from_secs(limits.timeout_s) {
            return match limits.timeout_action {
                TimeoutAction::Cancel => Decision::Cancel,
                TimeoutAction::Force => Decision::SwitchOver { forced: true },
            };
        }
        Decision::Iterate
    }
}

/// A bandwidth cap shared by all streams: each send reserves its bytes and waits until
/// the cap allows them. A burst of up to 10 ms worth of bytes passes at once.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    next_free: Option<Instant>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    pub fn new() -> Self {
        RateLimiter { next_free: None }
    }

    /// Reserves `bytes` at `mib_per_s` (0 = unlimited) and returns how long to wait
    /// before sending them.
    pub fn reserve(&mut self, now: Instant, bytes: u64, mib_per_s: u64) -> Duration {
        if mib_per_s == 0 {
            self.next_free = None;
            return Duration::ZERO;
        }
        let rate = (mib_per_s as f64) * 1024.0 * 1024.0;
        let cost = Duration::from_secs_f64(bytes as f64 / rate);
        let burst = Duration::from_millis(10);
        // Unused time does not accumulate beyond the burst.
        let start = match self.next_free {
            Some(t) if t + burst > now => t,
            _ => now.checked_sub(burst).unwrap_or(now),
        };
        let done = start + cost;
        self.next_free = Some(done);
        done.saturating_duration_since(now + burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pass(bytes: u64, ms: u64, dirty: u64) -> PassReport {
        PassReport {
            bytes,
            duration: Duration::from_millis(ms),
            dirty_bytes: dirty,
        }
    }

    #[test]
    fn switches_over_when_remaining_fits_the_downtime_limit() {
        let l = Limits::default(); // 300 ms
        let mut p = Precopy::new();
        // Pass 0 always gets a successor unless the rest is tiny.
        assert_eq!(
            p.after_pass(&l, pass(256 << 20, 250, 200 << 20), Duration::from_secs(1)),
            Decision::Iterate
        );
        // 256 MiB in 250 ms: 1 GiB/s. 200 MiB left -> ~195 ms, and not shrinking much.
        assert_eq!(
            p.after_pass(&l, pass(256 << 20, 250, 200 << 20), Duration::from_secs(1)),
            Decision::SwitchOver { forced: false }
        );
        let mut p = Precopy::new();
        // 400 MiB left -> ~390 ms > 300 ms.
        assert_eq!(
            p.after_pass(&l, pass(1 << 30, 1000, 400 << 20), Duration::from_secs(1)),
            Decision::Iterate
        );
        assert!(p.expected_downtime(400 << 20) > Duration::from_millis(300));
    }

    #[test]
    fn a_hold_keeps_the_switchover_back_until_lifted_or_timed_out() {
        let mut l = Limits {
            hold: true,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        // Nothing dirty at all: without the hold this switches over at once.
        for _ in 0..5 {
            assert_eq!(
                p.after_pass(&l, pass(256 << 20, 250, 0), Duration::from_secs(1)),
                Decision::Held
            );
        }
        // A forced switchover (timeout with the force action) is held back too.
        l.timeout_action = TimeoutAction::Force;
        l.timeout_s = 1;
        assert_eq!(
            p.after_pass(&l, pass(1 << 30, 1000, 900 << 20), Duration::from_secs(2)),
            Decision::Held
        );
        // The cancel action still ends a held migration at the timeout.
        l.timeout_action = TimeoutAction::Cancel;
        assert_eq!(
            p.after_pass(&l, pass(256 << 20, 250, 0), Duration::from_secs(2)),
            Decision::Cancel
        );
        // Lifted: the next pass that fits switches over.
        l.hold = false;
        l.timeout_s = 3600;
        assert_eq!(
            p.after_pass(&l, pass(256 << 20, 250, 0), Duration::from_secs(2)),
            Decision::SwitchOver { forced: false }
        );
    }

    #[test]
    fn a_shrinking_dirty_set_gets_more_passes_until_tiny() {
        let l = Limits::default();
        let mut p = Precopy::new();
        // 1 GiB/s link, guest dirtying about half as fast: 100 -> 50 -> 25 ... MiB.
        let mut sent = 100u64 << 20;
        let mut decisions = vec![];
        for _ in 0..12 {
            let dirty = sent / 2;
            let d = p.after_pass(&l, pass(sent, sent >> 20, dirty), Duration::ZERO);
            decisions.push(d);
            if d != Decision::Iterate {
                break;
            }
            sent = dirty;
        }
        assert_eq!(
            *decisions.last().expect("some"),
            Decision::SwitchOver { forced: false }
        );
        // It stopped once the rest fit in TINY_DOWNTIME (1 MiB at 1 GiB/s), not before.
        assert!(
            p.expected_downtime(sent / 2) <= TINY_DOWNTIME,
            "{decisions:?}"
        );
        assert!(decisions.len() > 3);
    }

    #[test]
    fn auto_converge_squeezes_an_acceptable_but_stuck_downtime() {
        let l = Limits {
            auto_converge: true,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        // Pass 0, then passes that fit 300 ms (100 MiB at 1 GiB/s) but do not shrink.
        assert_eq!(
            p.after_pass(&l, pass(200 << 20, 200, 100 << 20), Duration::ZERO),
            Decision::Iterate
        );
        assert_eq!(p.throttle(), 0);
        assert_eq!(
            p.after_pass(&l, pass(100 << 20, 100, 100 << 20), Duration::ZERO),
            Decision::Iterate
        );
        assert_eq!(p.throttle(), THROTTLE_INITIAL);
        assert_eq!(
            p.after_pass(&l, pass(100 << 20, 100, 100 << 20), Duration::ZERO),
            Decision::Iterate
        );
        assert_eq!(p.throttle(), THROTTLE_INITIAL + 2 * THROTTLE_STEP);
        // Without auto-converge the same pass switches over at once.
        let mut q = Precopy::new();
        let plain = Limits::default();
        q.after_pass(&plain, pass(200 << 20, 200, 100 << 20), Duration::ZERO);
        assert_eq!(
            q.after_pass(&plain, pass(100 << 20, 100, 100 << 20), Duration::ZERO),
            Decision::SwitchOver { forced: false }
        );
        assert_eq!(q.throttle(), 0);
    }

    #[test]
    fn extra_passes_are_bounded() {
        let l = Limits::default();
        let mut p = Precopy::new();
        let mut n = 0;
        // Always shrinking by 40% but never tiny (bandwidth stays 1 MiB/ms).
        while p.after_pass(&l, pass(100 << 20, 100, 50 << 20), Duration::ZERO) == Decision::Iterate
        {
            n += 1;
            assert!(n <= MAX_EXTRA_PASSES);
        }
        assert_eq!(n, MAX_EXTRA_PASSES);
    }

    #[test]
    fn nothing_dirty_always_switches() {
        let l = Limits {
            downtime_limit_ms: 0,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        assert_eq!(
            p.after_pass(&l, pass(0, 0, 0), Duration::ZERO),
            Decision::SwitchOver { forced: false }
        );
    }

    #[test]
    fn small_pass_uses_the_average_bandwidth() {
        let l = Limits {
            downtime_limit_ms: 5,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        assert_eq!(
            p.after_pass(&l, pass(100 << 20, 100, 8 << 20), Duration::ZERO),
            Decision::Iterate
        );
        // 16 KiB in 2 ms looks like 8 MB/s, but the link did ~1 GB/s: 16 KiB fits 5 ms.
        assert_eq!(
            p.after_pass(&l, pass(16 << 10, 2, 16 << 10), Duration::ZERO),
            Decision::SwitchOver { forced: false }
        );
    }

    #[test]
    fn auto_converge_throttles_in_qemu_steps_up_to_99() {
        let l = Limits {
            downtime_limit_ms: 1,
            auto_converge: true,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        let mut seen = vec![];
        for _ in 0..40 {
            assert_eq!(
                p.after_pass(&l, pass(100 << 20, 1000, 90 << 20), Duration::ZERO),
                Decision::Iterate
            );
            seen.push(p.throttle());
        }
        assert_eq!(seen[0], 0, "one high pass is not enough");
        assert_eq!(seen[1], 20);
        assert_eq!(seen[3], 30);
        assert_eq!(*seen.last().expect("40 passes"), 99);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn no_throttle_without_auto_converge_or_when_dirtying_is_slow() {
        let l = Limits {
            downtime_limit_ms: 1,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        for _ in 0..5 {
            p.after_pass(&l, pass(100 << 20, 1000, 90 << 20), Duration::ZERO);
        }
        assert_eq!(p.throttle(), 0);
        let l = Limits {
            auto_converge: true,
            ..l
        };
        for _ in 0..5 {
            p.after_pass(&l, pass(100 << 20, 1000, 10 << 20), Duration::ZERO);
        }
        assert_eq!(p.throttle(), 0);
    }

    #[test]
    fn timeout_cancels_by_default_or_forces() {
        let l = Limits {
            downtime_limit_ms: 1,
            timeout_s: 10,
            ..Limits::default()
        };
        let mut p = Precopy::new();
        assert_eq!(
            p.after_pass(&l, pass(1 << 30, 1000, 1 << 30), Duration::from_secs(9)),
            Decision::Iterate
        );
        assert_eq!(
            p.after_pass(&l, pass(1 << 30, 1000, 1 << 30), Duration::from_secs(10)),
            Decision::Cancel
        );
        let l = Limits {
            timeout_action: TimeoutAction::Force,
            ..l
        };
        assert_eq!(
            p.after_pass(&l, pass(1 << 30, 1000, 1 << 30), Duration::from_secs(11)),
            Decision::SwitchOver { forced: true }
        );
    }

    #[test]
    fn unlimited_rate_never_waits() {
        let mut r = RateLimiter::new();
        let t = Instant::now();
        assert_eq!(r.reserve(t, 1 << 30, 0), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn rate_limiter_holds_the_cap(mibs in 1u64..2000, sizes in proptest::collection::vec(1u64..(4 << 20), 1..50)) {
            // Senders that always wait as told never exceed cap * time + one burst.
            let mut r = RateLimiter::new();
            let t0 = Instant::now();
            let mut now = t0;
            let mut sent = 0u64;
            for s in &sizes {
                now += r.reserve(now, *s, mibs);
                sent += s;
            }
            let allowed = (mibs as f64 * 1048576.0) * ((now - t0).as_secs_f64() + 0.020) + 1.0;
            prop_assert!((sent as f64) <= allowed + *sizes.last().expect("non-empty") as f64,
                         "sent {} allowed {}", sent, allowed);
        }
    }
}
