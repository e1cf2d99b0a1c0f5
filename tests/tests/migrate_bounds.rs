//! The migration listener against peers that prove nothing: each may announce the
//! largest frame the protocol has and trickle bytes, and the listener's connection
//! limit fills up. The agent's memory must stay flat, every such connection must be
//! closed by the handshake deadline, and a real migration must work afterwards.

mod migrate_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use agent::migration::protocol::{Command, FrameHeader, HEADER_LEN};
use agent::migration::receiver::{HANDSHAKE_DEADLINE, MAX_PENDING_HANDSHAKES};
use migrate_support::{Agent, assert_sweeping, kvm_or_skip};
use serde_json::json;

/// How much the target's RSS may grow while it is flooded.
const RSS_BOUND: u64 = 32 << 20;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// Connects and reads the receiver's Challenge (header and payload).
fn challenged(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect to the migration listener");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; HEADER_LEN];
    s.read_exact(&mut buf).expect("challenge header");
    let h = FrameHeader::parse(&buf).expect("valid header");
    assert_eq!(h.cmd, Command::Challenge);
    let mut p = vec![0u8; h.length as usize];
    s.read_exact(&mut p).expect("challenge payload");
    s
}

fn header(cmd: Command, length: u64) -> [u8; HEADER_LEN] {
    FrameHeader {
        cmd,
        flags: 0,
        length,
    }
    .encode()
}

/// Whether the peer closed `s` (EOF or reset) within `wait`; frames it sends first
/// (an Error) are read past.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let end = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Samples the RSS for `window` and fails as soon as it passes `base + RSS_BOUND`.
fn assert_rss_flat(pid: u32, base: u64, window: Duration, what: &str) {
    let end = Instant::now() + window;
    loop {
        let now = rss(pid);
        assert!(
            now < base + RSS_BOUND,
            "{what}: agent RSS grew from {} MiB to {} MiB",
            base >> 20,
            now >> 20
        );
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unauthenticated_flood_stays_flat_is_closed_by_the_deadline_and_migration_still_works() {
    if !kvm_or_skip("unauthenticated_flood") {
        return;
    }
    let (src, dst) = (Agent::start(), Agent::start());
    let pid = dst.pid();
    let base = rss(pid);

    // 1. The largest frame any command may declare (Digests, ~1 GiB), announced
    //    before authenticating: refused from the header, nothing allocated.
    for i in 0..MAX_PENDING_HANDSHAKES {
        let mut s = challenged(&dst.migration);
        s.write_all(&header(Command::Digests, Command::Digests.max_payload()))
            .expect("send header");
        let _ = s.write_all(&[0u8; 1024]);
        assert_rss_flat(pid, base, Duration::from_millis(50), "huge frame announced");
        assert!(
            closed_within(&mut s, Duration::from_secs(3)),
            "connection {i}: a huge frame before authentication was not refused at once"
        );
    }

    // 2. Fill the handshake slots with peers that announce the largest frame the
    //    handshake allows (a Hello) and trickle one byte a second: all are held to
    //    the total deadline, not to a per-read timeout the trickle keeps resetting.
    let started = Instant::now();
    let tricklers: Vec<_> = (0..MAX_PENDING_HANDSHAKES)
        .map(|_| {
            let mut s = challenged(&dst.migration);
            s.write_all(&header(Command::Hello, Command::Hello.max_payload()))
                .expect("send header");
            std::thread::spawn(move || {
                let t = Instant::now();
                loop {
                    let _ = s.write_all(&[0u8]);
                    if closed_within(&mut s, Duration::from_secs(1)) {
                        return t.elapsed();
                    }
                    if t.elapsed() > HANDSHAKE_DEADLINE * 4 {
                        return t.elapsed();
                    }
                }
            })
        })
        .collect();
    // The limit is full: one more connection is closed without a challenge.
    let mut extra = TcpStream::connect(&dst.migration).expect("connect");
    let mut b = [0u8; 1];
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    assert!(
        matches!(extra.read(&mut b), Ok(0) | Err(_)) && started.elapsed() < HANDSHAKE_DEADLINE,
        "a connection beyond the limit was served"
    );
    assert_rss_flat(pid, base, Duration::from_secs(2), "handshake slots full");
    for t in tricklers {
        let held = t.join().expect("trickler");
        assert!(
            held <= HANDSHAKE_DEADLINE + Duration::from_secs(3),
            "a trickling peer was held {held:?}, past the {HANDSHAKE_DEADLINE:?} deadline"
        );
        assert!(
            held + Duration::from_secs(2) >= HANDSHAKE_DEADLINE,
            "closed after {held:?}: before its deadline, for another reason"
        );
    }
    assert_rss_flat(pid, base, Duration::ZERO, "after the flood");

    // 3. The listener serves a real migration afterwards.
    src.start_ab("ab", 150);
    let id = src.ok(
        "POST",
        "/v1/vms/ab/migrate",
        Some(json!({"target": dst.migration})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    let m = src.wait_migration_end(&id, Duration::from_secs(60));
    assert_eq!(m["state"], "completed", "{m}\n{}", dst.log());
    assert_sweeping(&dst, "ab");
}
