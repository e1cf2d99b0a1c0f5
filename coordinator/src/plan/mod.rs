//! Fleet planners: evacuation, balancing and consolidation as pure functions of an
//! [`Inventory`] snapshot. No I/O here: `service/fleet.rs` builds the inventory from the
//! store and the agents' reports, and carries a plan out as ordinary migrations.
//!
//! Every plan keeps these promises (unit- and property-tested below):
//! - no host ends over its memory or CPU capacity (counting every move of the plan);
//! - a pinned guest never moves, and a guest moves only to a host whose CPU fingerprint
//!   equals the guest's;
//! - a drained host never receives a guest (consolidate's stand-by hosts only when
//!   `balance` decides the active ones are too full);
//! - a guest moves at most once per plan; every planner ends (each step moves a new
//!   guest, or stops).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// Why a host takes no new guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Drain {
    /// `coord host drain` / `evacuate`: maintenance; only `undrain` lifts it.
    Maintenance,
    /// Emptied by `coord consolidate`: may be powered down; `balance` uses it again when
    /// the active hosts fill up.
    Standby,
}

/// A host as the planners see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCap {
    pub name: String,
    /// Guest memory it may hold, MiB.
    pub memory_mib: u64,
    /// CPU it may give guests, in percent of one CPU (vCPUs x 100).
    pub cpu_percent: f64,
    pub cpu_fingerprint: String,
    pub drained: Option<Drain>,
}

/// A guest as the planners see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guest {
    pub name: String,
    pub host: String,
    pub memory_mib: u64,
    /// CPU use, percent of one CPU.
    pub cpu_percent: f64,
    pub dirty_mib_per_s: f64,
    /// The fingerprint of the CPU features the guest was started with.
    pub cpu_fingerprint: String,
    pub pinned: bool,
    /// False while it migrates or has failed: it counts on its host but cannot move.
    pub movable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub hosts: Vec<HostCap>,
    pub guests: Vec<Guest>,
}

/// One migration of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub memory_mib: u64,
    /// Estimated seconds at `PlanParams::bandwidth_mib_per_s` (pre-copy converges at
    /// bandwidth minus dirty rate).
    pub estimate_s: f64,
}

/// A guest a plan wanted to move but cannot, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stuck {
    pub vm: String,
    pub host: String,
    pub reason: String,
}

/// Load of one host after a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    pub host: String,
    pub memory_mib: u64,
    pub memory_mib_capacity: u64,
    pub memory_fraction: f64,
    pub cpu_fraction: f64,
    pub guests: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained: Option<Drain>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// In the order to start them.
    pub moves: Vec<Move>,
    pub stuck: Vec<Stuck>,
    /// Per-host load before and after the plan.
    pub before: Vec<HostLoad>,
    pub after: Vec<HostLoad>,
    /// Largest difference in memory or CPU fraction between two active hosts, before
    /// and after.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// Hosts the plan empties (consolidate) or takes back from stand-by (balance).
    #[serde(default)]
    pub freed_hosts: Vec<String>,
    #[serde(default)]
    pub reactivated_hosts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlanParams {
    /// `balance` stops once the imbalance is at or below this (0.15: 15 points of
    /// memory or CPU use), and takes a move only if it lowers the imbalance measure by
    /// more than `min_gain`.
    pub threshold: f64,
    pub min_gain: f64,
    /// `balance` takes stand-by hosts back when an active host is fuller than this.
    pub high_water: f64,
    /// Assumed migration bandwidth for estimates and ordering, MiB/s.
    pub bandwidth_mib_per_s: f64,
}

impl Default for PlanParams {
    fn default() -> Self {
        PlanParams {
            threshold: 0.15,
            min_gain: 1e-6,
            high_water: 0.85,
            bandwidth_mib_per_s: 1000.0,
        }
    }
}

/// Seconds a guest's migration is expected to take: its memory at the bandwidth left
/// after its dirty rate (a guest dirtying faster than the link needs auto-converge;
/// counted as ten times its memory time).
pub fn estimate_s(g: &Guest, p: &PlanParams) -> f64 {
    let bw = p.bandwidth_mib_per_s.max(1.0);
    let net = bw - g.dirty_mib_per_s;
    let mem = g.memory_mib.max(1) as f64;
    if net <= bw * 0.1 {
        mem / bw * 10.0
    } else {
        mem / net
    }
}

/// The working state of a plan: where each guest is, what each host holds.
#[derive(Clone)]
struct State<'a> {
    inv: &'a Inventory,
    host_ix: BTreeMap<&'a str, usize>,
    /// Guest index -> host index.
    at: Vec<Option<usize>>,
    mem: Vec<u64>,
    cpu: Vec<f64>,
    count: Vec<usize>,
    moved: BTreeSet<usize>,
    moves: Vec<Move>,
    params: PlanParams,
}

impl<'a> State<'a> {
    fn new(inv: &'a Inventory, params: PlanParams) -> Self {
        let host_ix: BTreeMap<&str, usize> = inv
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();
        let mut s = State {
            inv,
            at: vec![None; inv.guests.len()],
            mem: vec![0; inv.hosts.len()],
            cpu: vec![0.0; inv.hosts.len()],
            count: vec![0; inv.hosts.len()],
            host_ix,
            moved: BTreeSet::new(),
            moves: Vec::new(),
            params,
        };
        for (gi, g) in inv.guests.iter().enumerate() {
            if let Some(&h) = s.host_ix.get(g.host.as_str()) {
                s.at[gi] = Some(h);
                s.mem[h] += g.memory_mib;
                s.cpu[h] += g.cpu_percent.max(0.0);
                s.count[h] += 1;
            }
        }
        s
    }

    fn fits(&self, gi: usize, h: usize) -> bool {
        let g = &self.inv.guests[gi];
        let host = &self.inv.hosts[h];
        self.mem[h] + g.memory_mib <= host.memory_mib
            && self.cpu[h] + g.cpu_percent.max(0.0) <= host.cpu_percent + 1e-9
    }

    /// Why `gi` cannot go to `h` (None: it can).
    fn refuses(&self, gi: usize, h: usize, allow_standby: bool) -> Option<Refusal> {
        let g = &self.inv.guests[gi];
        let host = &self.inv.hosts[h];
        if self.at[gi] == Some(h) {
            return Some(Refusal::Same);
        }
        match host.drained {
            Some(Drain::Maintenance) => return Some(Refusal::Drained),
            Some(Drain::Standby) if !allow_standby => return Some(Refusal::Drained),
            _ => {}
        }
        if host.cpu_fingerprint != g.cpu_fingerprint {
            return Some(Refusal::Cpu);
        }
        if !self.fits(gi, h) {
            return Some(Refusal::Room);
        }
        None
    }

    fn can_move(&self, gi: usize) -> bool {
        let g = &self.inv.guests[gi];
        g.movable && !g.pinned && !self.moved.contains(&gi) && self.at[gi].is_some()
    }

    fn apply(&mut self, gi: usize, to: usize) {
        let g = &self.inv.guests[gi];
        let Some(from) = self.at[gi] else {
            return;
        };
        self.mem[from] -= g.memory_mib;
        self.cpu[from] -= g.cpu_percent.max(0.0);
        self.count[from] -= 1;
        self.mem[to] += g.memory_mib;
        self.cpu[to] += g.cpu_percent.max(0.0);
        self.count[to] += 1;
        self.at[gi] = Some(to);
        self.moved.insert(gi);
        self.moves.push(Move {
            vm: g.name.clone(),
            from: self.inv.hosts[from].name.clone(),
            to: self.inv.hosts[to].name.clone(),
            memory_mib: g.memory_mib,
            estimate_s: estimate_s(g, &self.params),
        });
    }

    fn mem_frac(&self, h: usize) -> f64 {
        frac(self.mem[h] as f64, self.inv.hosts[h].memory_mib as f64)
    }

    fn cpu_frac(&self, h: usize) -> f64 {
        frac(self.cpu[h], self.inv.hosts[h].cpu_percent)
    }

    fn loads(&self) -> Vec<HostLoad> {
        (0..self.inv.hosts.len())
            .map(|h| HostLoad {
                host: self.inv.hosts[h].name.clone(),
                memory_mib: self.mem[h],
                memory_mib_capacity: self.inv.hosts[h].memory_mib,
                memory_fraction: self.mem_frac(h),
                cpu_fraction: self.cpu_frac(h),
                guests: self.count[h],
                drained: self.inv.hosts[h].drained,
            })
            .collect()
    }

    /// Max minus min of the memory and of the CPU fraction over `active` hosts; the
    /// larger of the two.
    fn imbalance(&self, active: &[usize]) -> f64 {
        spread(active.iter().map(|&h| self.mem_frac(h)))
            .max(spread(active.iter().map(|&h| self.cpu_frac(h))))
    }

    /// Sum of squared deviations from the mean, memory and CPU: the smooth measure the
    /// balancer descends (a move from the fullest to the emptiest host lowers it).
    fn variance(&self, active: &[usize]) -> f64 {
        sq_dev(active.iter().map(|&h| self.mem_frac(h)))
            + sq_dev(active.iter().map(|&h| self.cpu_frac(h)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    Same,
    Drained,
    Cpu,
    Room,
}

fn frac(used: f64, cap: f64) -> f64 {
    if cap <= 0.0 {
        if used > 0.0 { 1.0 } else { 0.0 }
    } else {
        used / cap
    }
}

fn spread(v: impl Iterator<Item = f64>) -> f64 {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if hi >= lo { hi - lo } else { 0.0 }
}

fn sq_dev(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    if v.is_empty() {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().map(|x| (x - mean) * (x - mean)).sum()
}

fn stuck_reason(s: &State, gi: usize, best: Option<Refusal>, from: &str) -> String {
    let g = &s.inv.guests[gi];
    if g.pinned {
        return format!("{} is pinned to {from} (coord vm unpin {})", g.name, g.name);
    }
    if !g.movable {
        return format!("{} is migrating or failed", g.name);
    }
    match best {
        Some(Refusal::Room) => format!(
            "no other host with a compatible CPU has {} MiB of memory and {:.0}% CPU free",
            g.memory_mib, g.cpu_percent
        ),
        Some(Refusal::Cpu) => format!(
            "no schedulable host has a CPU compatible with the guest's (fingerprint {})",
            short(&g.cpu_fingerprint)
        ),
        _ => "no other schedulable host in the site".to_owned(),
    }
}

fn short(fp: &str) -> &str {
    fp.get(..12).unwrap_or(fp)
}

/// Empties `host`: every guest on it goes to another schedulable host with room and a
/// compatible CPU (the one with most memory left, so the load stays spread; stand-by
/// hosts left by consolidate only when no active host can take it: they are listed in
/// `reactivated_hosts`). Guests
/// are planned longest estimated migration first (LPT: with a limit on concurrent
/// migrations, starting the longest jobs first ends the whole soonest). A guest that
/// cannot move is listed in `stuck` with the reason.
pub fn evacuate(inv: &Inventory, host: &str, params: PlanParams) -> Plan {
    let mut s = State::new(inv, params);
    let before = s.loads();
    let Some(&src) = s.host_ix.get(host) else {
        return Plan {
            before: before.clone(),
            after: before,
            ..Plan::default()
        };
    };
    let mut order: Vec<usize> = (0..inv.guests.len())
        .filter(|&gi| s.at[gi] == Some(src))
        .collect();
    order.sort_by(|&a, &b| {
        estimate_s(&inv.guests[b], &params)
            .total_cmp(&estimate_s(&inv.guests[a], &params))
            .then_with(|| inv.guests[a].name.cmp(&inv.guests[b].name))
    });
    let mut stuck = Vec::new();
    for gi in order {
        if !s.can_move(gi) {
            stuck.push(Stuck {
                vm: inv.guests[gi].name.clone(),
                host: host.to_owned(),
                reason: stuck_reason(&s, gi, None, host),
            });
            continue;
        }
        let mut best: Option<(bool, u64, usize)> = None;
        let mut closest: Option<Refusal> = None;
        for h in 0..inv.hosts.len() {
            if h == src {
                continue;
            }
            match s.refuses(gi, h, true) {
                None => {
                    // Active hosts first, then most room.
                    let key = (
                        inv.hosts[h].drained.is_none(),
                        inv.hosts[h].memory_mib - s.mem[h],
                        h,
                    );
                    if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
                        best = Some(key);
                    }
                }
                Some(r) => closest = Some(closest.map_or(r, |c: Refusal| c.max(r))),
            }
        }
        let best = best.map(|(_, room, h)| (h, room));
        match best {
            Some((h, _)) => s.apply(gi, h),
            None => stuck.push(Stuck {
                vm: inv.guests[gi].name.clone(),
                host: host.to_owned(),
                reason: stuck_reason(&s, gi, closest, host),
            }),
        }
    }
    let active = active_hosts(inv, false);
    let reactivated: BTreeSet<String> = s
        .moves
        .iter()
        .filter(|m| {
            s.host_ix
                .get(m.to.as_str())
                .is_some_and(|&h| inv.hosts[h].drained == Some(Drain::Standby))
        })
        .map(|m| m.to.clone())
        .collect();
    Plan {
        imbalance_before: imbalance_of(&State::new(inv, params), &active),
        imbalance_after: s.imbalance(&active),
        moves: s.moves.clone(),
        stuck,
        before,
        after: s.loads(),
        reactivated_hosts: reactivated.into_iter().collect(),
        ..Plan::default()
    }
}

fn active_hosts(inv: &Inventory, with_standby: bool) -> Vec<usize> {
    inv.hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| match h.drained {
            None => true,
            Some(Drain::Standby) => with_standby,
            Some(Drain::Maintenance) => false,
        })
        .map(|(i, _)| i)
        .collect()
}

fn imbalance_of(s: &State, active: &[usize]) -> f64 {
    s.imbalance(active)
}

/// Evens out memory and CPU use over the schedulable hosts with as few moves as it
/// can: greedily, the single move that lowers the variance of the hosts' memory and
/// CPU fractions most, until the imbalance (max - min fraction) is within
/// `threshold` or no move gains more than `min_gain`. Stand-by hosts (left by
/// consolidate) join when an active host is fuller than `high_water`.
pub fn balance(inv: &Inventory, params: PlanParams) -> Plan {
    let s0 = State::new(inv, params);
    let before = s0.loads();
    let base = active_hosts(inv, false);
    let too_full = base
        .iter()
        .any(|&h| s0.mem_frac(h) > params.high_water || s0.cpu_frac(h) > params.high_water);
    let with_standby = too_full && inv.hosts.iter().any(|h| h.drained == Some(Drain::Standby));
    let active = if with_standby {
        active_hosts(inv, true)
    } else {
        base.clone()
    };
    let mut s = s0.clone();
    loop {
        if s.imbalance(&active) <= params.threshold + 1e-12 {
            break;
        }
        let current = s.variance(&active);
        let mut best: Option<(f64, usize, usize)> = None;
        for gi in 0..inv.guests.len() {
            if !s.can_move(gi) {
                continue;
            }
            let Some(from) = s.at[gi] else { continue };
            if !active.contains(&from) {
                continue;
            }
            for &h in &active {
                if s.refuses(gi, h, with_standby).is_some() {
                    continue;
                }
                let mut t = s.clone();
                t.apply(gi, h);
                let v = t.variance(&active);
                if best.is_none_or(|(bv, _, _)| v < bv) {
                    best = Some((v, gi, h));
                }
            }
        }
        match best {
            Some((v, gi, h)) if current - v > params.min_gain => s.apply(gi, h),
            _ => {
                // No single move helps: the best exchange of two guests (two moves),
                // which gets past sizes that do not divide evenly.
                match best_swap(&s, &active, current) {
                    Some((v, gi, gj)) if current - v > params.min_gain => {
                        let (Some(hi), Some(hj)) = (s.at[gi], s.at[gj]) else {
                            break;
                        };
                        // The smaller one first, so that the intermediate state fits
                        // whenever the final one does on memory.
                        if inv.guests[gi].memory_mib <= inv.guests[gj].memory_mib {
                            s.apply(gi, hj);
                            s.apply(gj, hi);
                        } else {
                            s.apply(gj, hi);
                            s.apply(gi, hj);
                        }
                    }
                    _ => break,
                }
            }
        }
    }
    let reactivated: Vec<String> = active
        .iter()
        .filter(|&&h| inv.hosts[h].drained == Some(Drain::Standby) && s.count[h] > 0)
        .map(|&h| inv.hosts[h].name.clone())
        .collect();
    Plan {
        imbalance_before: s0.imbalance(&base),
        imbalance_after: s.imbalance(&active),
        moves: s.moves.clone(),
        stuck: Vec::new(),
        before,
        after: s.loads(),
        freed_hosts: Vec::new(),
        reactivated_hosts: reactivated,
    }
}

/// The exchange of two movable guests on different active hosts that lowers the
/// variance most and keeps every step within capacity: (variance, gi, gj).
fn best_swap(s: &State, active: &[usize], current: f64) -> Option<(f64, usize, usize)> {
    let inv = s.inv;
    let mut best: Option<(f64, usize, usize)> = None;
    let movable: Vec<usize> = (0..inv.guests.len())
        .filter(|&g| s.can_move(g) && s.at[g].is_some_and(|h| active.contains(&h)))
        .collect();
    for (a, &gi) in movable.iter().enumerate() {
        for &gj in &movable[a + 1..] {
            let (Some(hi), Some(hj)) = (s.at[gi], s.at[gj]) else {
                continue;
            };
            if hi == hj {
                continue;
            }
            let (first, second) = if inv.guests[gi].memory_mib <= inv.guests[gj].memory_mib {
                ((gi, hj), (gj, hi))
            } else {
                ((gj, hi), (gi, hj))
            };
            if s.refuses(first.0, first.1, false).is_some() {
                continue;
            }
            let mut t = s.clone();
            t.apply(first.0, first.1);
            if t.refuses(second.0, second.1, false).is_some() {
                continue;
            }
            t.apply(second.0, second.1);
            let v = t.variance(active);
            if v < current && best.is_none_or(|(bv, _, _)| v < bv) {
                best = Some((v, gi, gj));
            }
        }
    }
    best
}

/// Packs guests onto as few hosts as capacity allows: tries to empty the least-used
/// hosts first, each by first-fit-decreasing of its guests onto the hosts that stay on
/// (fullest first, so the space left stays in few hosts). A host is emptied only when
/// all its guests fit elsewhere (pinned guests keep their host on); a host that
/// received guests is not emptied later, so no guest moves twice.
pub fn consolidate(inv: &Inventory, params: PlanParams) -> Plan {
    let s0 = State::new(inv, params);
    let before = s0.loads();
    let active = active_hosts(inv, false);
    let mut s = s0.clone();
    let mut freed = Vec::new();
    let mut kept: BTreeSet<usize> = BTreeSet::new();
    let mut candidates: Vec<usize> = active.clone();
    candidates.sort_by(|&a, &b| {
        s.mem_frac(a)
            .total_cmp(&s.mem_frac(b))
            .then(s.count[a].cmp(&s.count[b]))
            .then_with(|| inv.hosts[a].name.cmp(&inv.hosts[b].name))
    });
    let mut emptied: BTreeSet<usize> = BTreeSet::new();
    for &c in &candidates {
        if kept.contains(&c) {
            continue;
        }
        let mut guests: Vec<usize> = (0..inv.guests.len())
            .filter(|&gi| s.at[gi] == Some(c))
            .collect();
        if guests.is_empty() {
            emptied.insert(c);
            freed.push(inv.hosts[c].name.clone());
            continue;
        }
        if guests.iter().any(|&gi| !s.can_move(gi)) {
            kept.insert(c);
            continue;
        }
        guests.sort_by(|&a, &b| {
            inv.guests[b]
                .memory_mib
                .cmp(&inv.guests[a].memory_mib)
                .then_with(|| inv.guests[a].name.cmp(&inv.guests[b].name))
        });
        let mut t = s.clone();
        let mut targets_used = Vec::new();
        let mut ok = true;
        for gi in guests {
            let mut targets: Vec<usize> = active
                .iter()
                .copied()
                .filter(|&h| h != c && !emptied.contains(&h))
                .filter(|&h| t.refuses(gi, h, false).is_none())
                .collect();
            // Hosts that stay on anyway (pinned guests, received guests) first, then
            // fullest first (best fit).
            targets.sort_by(|&a, &b| {
                let ra = inv.hosts[a].memory_mib - t.mem[a];
                let rb = inv.hosts[b].memory_mib - t.mem[b];
                kept.contains(&b)
                    .cmp(&kept.contains(&a))
                    .then(ra.cmp(&rb))
                    .then_with(|| inv.hosts[a].name.cmp(&inv.hosts[b].name))
            });
            match targets.first() {
                Some(&h) => {
                    t.apply(gi, h);
                    targets_used.push(h);
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            s = t;
            emptied.insert(c);
            kept.extend(targets_used);
            freed.push(inv.hosts[c].name.clone());
        } else {
            kept.insert(c);
        }
    }
    let remaining: Vec<usize> = active
        .iter()
        .copied()
        .filter(|h| !emptied.contains(h))
        .collect();
    Plan {
        imbalance_before: s0.imbalance(&active),
        imbalance_after: s.imbalance(&remaining),
        moves: s.moves.clone(),
        stuck: Vec::new(),
        before,
        after: s.loads(),
        freed_hosts: freed,
        reactivated_hosts: Vec::new(),
    }
}

/// Checks a plan against the inventory's promises; `Err` names the first broken one.
/// Used by the tests and, before carrying a plan out, by the service (a plan that
/// fails it is a bug, refused rather than run).
pub fn check_plan(inv: &Inventory, plan: &Plan, allow_standby: bool) -> Result<(), String> {
    let host = |n: &str| inv.hosts.iter().find(|h| h.name == n);
    let mut at: BTreeMap<&str, &str> = inv
        .guests
        .iter()
        .map(|g| (g.name.as_str(), g.host.as_str()))
        .collect();
    let mut seen = BTreeSet::new();
    for m in &plan.moves {
        if !seen.insert(m.vm.as_str()) {
            return Err(format!("{} moves twice", m.vm));
        }
        let g = inv
            .guests
            .iter()
            .find(|g| g.name == m.vm)
            .ok_or_else(|| format!("{} is not in the inventory", m.vm))?;
        if g.pinned {
            return Err(format!("{} is pinned", m.vm));
        }
        if !g.movable {
            return Err(format!("{} cannot move now", m.vm));
        }
        if at.get(m.vm.as_str()) != Some(&m.from.as_str()) || m.from == m.to {
            return Err(format!("{} does not run on {}", m.vm, m.from));
        }
        let h = host(&m.to).ok_or_else(|| format!("no host {}", m.to))?;
        match h.drained {
            Some(Drain::Maintenance) => return Err(format!("{} is drained", m.to)),
            Some(Drain::Standby) if !allow_standby => {
                return Err(format!("{} is on stand-by", m.to));
            }
            _ => {}
        }
        if h.cpu_fingerprint != g.cpu_fingerprint {
            return Err(format!("{} cannot run on {}'s CPU", m.vm, m.to));
        }
        at.insert(m.vm.as_str(), m.to.as_str());
    }
    // Capacity, move by move in plan order (a source frees its share at once; the
    // service starts a move only when its target has room, so this is what runs).
    let mut at: BTreeMap<&str, &str> = inv
        .guests
        .iter()
        .map(|g| (g.name.as_str(), g.host.as_str()))
        .collect();
    for m in &plan.moves {
        at.insert(m.vm.as_str(), m.to.as_str());
        let h = host(&m.to).ok_or_else(|| format!("no host {}", m.to))?;
        let (mut mem, mut cpu) = (0u64, 0f64);
        for g in &inv.guests {
            if at.get(g.name.as_str()) == Some(&m.to.as_str()) {
                mem += g.memory_mib;
                cpu += g.cpu_percent.max(0.0);
            }
        }
        if mem > h.memory_mib {
            return Err(format!(
                "{} would hold {mem} MiB of {} MiB",
                m.to, h.memory_mib
            ));
        }
        if cpu > h.cpu_percent + 1e-6 {
            return Err(format!(
                "{} would use {cpu:.0}% CPU of {:.0}%",
                m.to, h.cpu_percent
            ));
        }
    }
    Ok(())
}
