//! Which targets a mirror job may push an export to (`--mirror-allow`).
//!
//! A mirror job reads a whole export and writes it elsewhere, so whoever holds the
//! API token could otherwise copy any disk (a leased one included) to a server of
//! their choosing. A target reached over TLS proves it belongs to the cluster (its
//! certificate is checked against the node's CA), so it is always allowed; any
//! other target must match a rule. With no rule, plain targets are refused.
//!
//! Rules: `any`; `unix` (Unix-socket targets); an IP network `10.0.2.0/24` or
//! address `10.0.2.7` (IPv6 too); a host `storage-b1` or `host:port`.

use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    Unix,
    Net(IpAddr, u8),
    Host(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorAllow {
    rules: Vec<Rule>,
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty --mirror-allow rule".into());
    }
    if s == "any" {
        return Ok(Rule::Any);
    }
    if s == "unix" {
        return Ok(Rule::Unix);
    }
    if let Some((ip, bits)) = s.split_once('/') {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("--mirror-allow {s:?}: {ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let bits: u8 = bits
            .parse()
            .ok()
            .filter(|b| *b <= max)
            .ok_or_else(|| format!("--mirror-allow {s:?}: the prefix must be 0 to {max}"))?;
        return Ok(Rule::Net(ip, bits));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Rule::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
    }
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.:_[]".contains(c))
    {
        return Ok(Rule::Host(s.to_ascii_lowercase()));
    }
    Err(format!(
        "--mirror-allow {s:?}: expected any, unix, an IP network (10.0.0.0/8), an address, or a host[:port]"
    ))
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

impl MirrorAllow {
    /// Every target (for tests and for `--mirror-allow any`).
    pub fn any() -> Self {
        Self {
            rules: vec![Rule::Any],
        }
    }

    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .flat_map(|r| r.as_ref().split(','))
            .map(parse_rule)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a job may push to `address` (`tls`: the target's certificate is
    /// checked against the cluster CA).
    pub fn check(&self, address: &str, tls: bool) -> Result<(), String> {
        if tls || self.rules.contains(&Rule::Any) {
            return Ok(());
        }
        let allowed = if address.starts_with("unix:") {
            self.rules.contains(&Rule::Unix)
        } else {
            let host = address
                .rsplit_once(':')
                .map_or(address, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let ip = host.parse::<IpAddr>().ok();
            let (host, address) = (host.to_ascii_lowercase(), address.to_ascii_lowercase());
            self.rules.iter().any(|r| match r {
                Rule::Net(net, bits) => ip.is_some_and(|ip| in_net(ip, *net, *bits)),
                Rule::Host(h) => *h == host || *h == address,
                Rule::Any | Rule::Unix => false,
            })
        };
        if allowed {
            Ok(())
        } else if self.rules.is_empty() {
            Err(format!(
                "mirror target {address} is not allowed: without TLS to the target, a node pushes disks only to targets listed with --mirror-allow"
            ))
        } else {
            Err(format!(
                "mirror target {address} is not allowed: it matches no --mirror-allow rule (and the job does not use TLS)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_what_they_say() {
        let a =
            MirrorAllow::parse(&["10.0.2.0/24,storage-b1", "fd00::/8", "10.9.9.9:10809"]).unwrap();
        assert!(a.check("10.0.2.7:10809", false).is_ok());
        assert!(a.check("10.0.3.7:10809", false).is_err());
        assert!(a.check("storage-b1:10809", false).is_ok());
        assert!(a.check("STORAGE-B1:1", false).is_ok());
        assert!(a.check("storage-b2:10809", false).is_err());
        assert!(a.check("[fd12::1]:10809", false).is_ok());
        assert!(a.check("10.9.9.9:10809", false).is_ok());
        assert!(a.check("10.9.9.9:10810", false).is_err());
        assert!(a.check("unix:/run/x.sock", false).is_err());
        // TLS targets prove themselves with the cluster CA.
        assert!(a.check("203.0.113.5:10809", true).is_ok());
        assert!(
            MirrorAllow::parse(&["unix"])
                .unwrap()
                .check("unix:/x", false)
                .is_ok()
        );
        assert!(MirrorAllow::any().check("203.0.113.5:1", false).is_ok());
    }

    #[test]
    fn no_rule_refuses_plain_targets_and_says_how() {
        let a = MirrorAllow::default();
        let e = a.check("127.0.0.1:10809", false).unwrap_err();
        assert!(e.contains("--mirror-allow"), "{e}");
        assert!(a.check("127.0.0.1:10809", true).is_ok());
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in ["", "10.0.0.0/33", "nope/8", "a b", "fd00::/129"] {
            assert!(MirrorAllow::parse(&[bad]).is_err(), "{bad}");
        }
        assert!(
            MirrorAllow::parse(&["0.0.0.0/0"])
                .unwrap()
                .check("8.8.8.8:1", false)
                .is_ok()
        );
    }
}
