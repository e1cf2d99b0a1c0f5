//! Two sites on one machine: network namespaces `A` and `B` joined by a veth pair
//! shaped with `tc tbf` (rate), and a userspace TCP delay line for latency (this
//! kernel has no netem).
//!
//! - [`TwoSites::create`] makes both namespaces (needs root: [`TwoSites::available`]
//!   prints the loud skip line otherwise); dropping it deletes them (and the veth
//!   pair with them).
//! - [`TwoSites::enter_a`] moves the calling thread into site A: the processes it
//!   spawns from then on, and the sockets it opens, are in site A. Processes of
//!   site B run under `ip netns exec` ([`TwoSites::in_b`]).
//! - [`Relay`] is the delay line: it listens on loopback in the namespace of the
//!   thread that starts it and forwards every TCP connection to an address in the
//!   other site, holding each chunk for the one-way delay in both directions
//!   (RTT = 2 x delay). Its queue is bounded to twice the link's bandwidth-delay
//!   product, so senders feel backpressure instead of filling memory.
//!
//! What it does not emulate: the relay terminates TCP, so the sender's TCP sees
//! the loopback round trip, not the WAN's (no slow start over 20 ms); protocols see
//! the delay as request latency, which is what limits a windowed protocol such as
//! NBD with N requests in flight.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The link between the sites.
#[derive(Debug, Clone, Copy)]
pub struct LinkSpec {
    pub rate_mbit: u64,
    pub rtt: Duration,
}

impl Default for LinkSpec {
    /// 1 Gbit/s and 20 ms round trip.
    fn default() -> Self {
        Self {
            rate_mbit: 1000,
            rtt: Duration::from_millis(20),
        }
    }
}

impl LinkSpec {
    /// The link's payload rate in bytes per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.rate_mbit as f64 * 1e6 / 8.0
    }
}

/// Two network namespaces joined by a shaped veth pair.
pub struct TwoSites {
    pub a: String,
    pub b: String,
    pub a_ip: Ipv4Addr,
    pub b_ip: Ipv4Addr,
    pub link: LinkSpec,
    /// The veth ends in A and in B.
    dev_a: String,
    dev_b: String,
    /// The namespace the creating thread was in, to go back to.
    original: File,
    entered: bool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {args:?}"))?;
    if !out.status.success() {
        bail!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    ip(&full)
}

fn setns(f: &File) -> Result<()> {
    // SAFETY: plain syscall on an open namespace descriptor; it changes only the
    // calling thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl TwoSites {
    /// Whether namespaces can be made here (root, `ip` and `tc`); prints the loud
    /// skip line for `test` when not.
    pub fn available(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let tools = crate::have_tool("ip") && crate::have_tool("tc");
        if !root || !tools {
            crate::skip!(
                "SKIPPED: {test}: two-site network namespaces need root and iproute2 (root: {root}, ip+tc: {tools})"
            );
        }
        root && tools
    }

    /// Creates the namespaces, the veth pair between them (`a_ip` in A, `b_ip` in
    /// B, a /30), loopback in each, and `tbf` at the link's rate on both ends.
    pub fn create(link: LinkSpec) -> Result<TwoSites> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n);
        let (a, b) = (format!("sha{tag}"), format!("shb{tag}"));
        let (va, vb) = (format!("vsa{tag}"), format!("vsb{tag}"));
        // A /30 from 10.64.0.0/10 per (process, site pair).
        let k = (pid.wrapping_mul(131).wrapping_add(n) % (1 << 20)) * 4;
        let a_ip = Ipv4Addr::from(0x0A40_0000u32 + k + 1);
        let b_ip = Ipv4Addr::from(0x0A40_0000u32 + k + 2);
        let original = File::open("/proc/thread-self/ns/net").context("open own netns")?;
        let sites = TwoSites {
            a: a.clone(),
            b: b.clone(),
            a_ip,
            b_ip,
            link,
            dev_a: va.clone(),
            dev_b: vb.clone(),
            original,
            entered: false,
        };
        ip(&["netns", "add", &a])?;
        ip(&["netns", "add", &b])?;
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ])?;
        let rate = format!("{}mbit", link.rate_mbit);
        for (ns, dev, addr) in [(&a, &va, a_ip), (&b, &vb, b_ip)] {
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(
                ns,
                &["ip", "addr", "add", &format!("{addr}/30"), "dev", dev],
            )?;
            in_ns(ns, &["ip", "link", "set", dev, "up"])?;
            let tc = [
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "512kb",
                "latency", "20ms",
            ];
            in_ns(ns, &tc)?;
        }
        Ok(sites)
    }

    /// Moves the calling thread into site A (until the sites are dropped, which
    /// moves it back).
    pub fn enter_a(&mut self) -> Result<()> {
        let f = File::open(format!("/var/run/netns/{}", self.a)).context("open site A")?;
        setns(&f)?;
        self.entered = true;
        Ok(())
    }

    /// Cuts the link (both ends down: packets are dropped, no connection is told)
    /// or restores it.
    pub fn set_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        in_ns(&self.a, &["ip", "link", "set", &self.dev_a, state])?;
        in_ns(&self.b, &["ip", "link", "set", &self.dev_b, state])
    }

    /// `program` to be run in site B.
    pub fn in_b(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.b, program]);
        c
    }

    /// A delay line in the calling thread's namespace to `to` (in the other site),
    /// with this link's round trip.
    pub fn relay(&self, to: SocketAddr) -> Result<Relay> {
        Relay::start(to, self.link.rtt / 2, self.link.bytes_per_s())
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        if self.entered {
            let _ = setns(&self.original);
        }
        for ns in [&self.a, &self.b] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                crate::skip!("WARNING: cannot delete network namespace {ns}: {e}");
            }
        }
    }
}

/// A TCP delay line; stops accepting when dropped (connections end with their
/// peers).
pub struct Relay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

/// Bytes read at a time.
const CHUNK: usize = 64 << 10;

impl Relay {
    /// Listens on 127.0.0.1 (in the calling thread's namespace) and relays each
    /// connection to `to`, holding every chunk `delay` in each direction.
    pub fn start(to: SocketAddr, delay: Duration, bytes_per_s: f64) -> Result<Relay> {
        let l = TcpListener::bind("127.0.0.1:0").context("relay listen")?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        // Twice the bandwidth-delay product (each way), in chunks.
        let slots = ((2.0 * bytes_per_s * delay.as_secs_f64()) as usize / CHUNK).max(64);
        let s = Arc::clone(&stop);
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(down) = conn else { continue };
                let Ok(up) = TcpStream::connect(to) else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                if let (Ok(d2), Ok(u2)) = (down.try_clone(), up.try_clone()) {
                    pump(down, up, delay, slots);
                    pump(u2, d2, delay, slots);
                }
            }
        });
        Ok(Relay { addr, stop })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Relays `from` to `to`, each chunk leaving `delay` after it arrived.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, slots: usize) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(slots);
    std::thread::spawn(move || {
        for (due, buf) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        loop {
            let mut buf = vec![0u8; CHUNK];
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now() + delay, buf)).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Read);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The delay line holds each direction for the delay: a ping-pong through it
    /// takes one round trip.
    #[test]
    fn relay_adds_the_round_trip() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = echo.accept() {
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() {
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
            }
        });
        let r = Relay::start(to, Duration::from_millis(10), 125e6).unwrap();
        let mut c = TcpStream::connect(r.addr).unwrap();
        c.set_nodelay(true).unwrap();
        let mut b = [7u8; 1];
        let start = Instant::now();
        for _ in 0..5 {
            c.write_all(&b).unwrap();
            c.read_exact(&mut b).unwrap();
        }
        let per = start.elapsed() / 5;
        assert!(
            per >= Duration::from_millis(20) && per < Duration::from_millis(40),
            "{per:?}"
        );
    }
}
