use proptest::prelude::*;

use super::*;

const FP: &str = "fp-a";

fn host(name: &str, mem: u64) -> HostCap {
    HostCap {
        name: name.into(),
        memory_mib: mem,
        cpu_percent: 400.0,
        cpu_fingerprint: FP.into(),
        drained: None,
    }
}

fn guest(name: &str, host: &str, mem: u64) -> Guest {
    Guest {
        name: name.into(),
        host: host.into(),
        memory_mib: mem,
        cpu_percent: 10.0,
        dirty_mib_per_s: 0.0,
        cpu_fingerprint: FP.into(),
        pinned: false,
        movable: true,
    }
}

fn p() -> PlanParams {
    PlanParams::default()
}

#[test]
fn evacuate_moves_everything_largest_first_and_names_the_stuck() {
    let mut inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000), host("c", 300)],
        guests: vec![
            guest("small", "a", 100),
            guest("big", "a", 600),
            guest("mid", "a", 300),
            guest("other", "b", 200),
        ],
    };
    let plan = evacuate(&inv, "a", p());
    check_plan(&inv, &plan, false).unwrap();
    let order: Vec<&str> = plan.moves.iter().map(|m| m.vm.as_str()).collect();
    assert_eq!(order, ["big", "mid", "small"]);
    assert!(plan.stuck.is_empty());
    assert!(plan.moves.iter().all(|m| m.to != "a"));

    // A pinned guest and one that fits nowhere are named, not skipped.
    inv.guests[0].pinned = true;
    inv.guests.push(guest("huge", "a", 900));
    let plan = evacuate(&inv, "a", p());
    check_plan(&inv, &plan, false).unwrap();
    let stuck: Vec<(&str, &str)> = plan
        .stuck
        .iter()
        .map(|s| (s.vm.as_str(), s.reason.as_str()))
        .collect();
    assert!(
        stuck
            .iter()
            .any(|(v, r)| *v == "small" && r.contains("pinned")),
        "{stuck:?}"
    );
    assert!(
        stuck
            .iter()
            .any(|(v, r)| *v == "huge" && r.contains("900 MiB")),
        "{stuck:?}"
    );
}

#[test]
fn evacuate_never_picks_an_incompatible_cpu() {
    let mut inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000), host("x", 4000)],
        guests: vec![guest("g1", "a", 100), guest("g2", "a", 100)],
    };
    inv.hosts[2].cpu_fingerprint = "fp-other".into();
    let plan = evacuate(&inv, "a", p());
    assert!(plan.moves.iter().all(|m| m.to == "b"), "{plan:?}");
    // Without b, nothing fits: the reason is the CPU.
    inv.hosts[1].drained = Some(Drain::Maintenance);
    let plan = evacuate(&inv, "a", p());
    assert!(plan.moves.is_empty());
    assert!(
        plan.stuck.iter().all(|s| s.reason.contains("CPU")),
        "{plan:?}"
    );
}

#[test]
fn evacuate_puts_fast_dirtying_guests_first() {
    let inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000)],
        guests: vec![guest("calm", "a", 200), {
            let mut g = guest("busy", "a", 200);
            g.dirty_mib_per_s = 500.0;
            g
        }],
    };
    let plan = evacuate(&inv, "a", p());
    assert_eq!(plan.moves[0].vm, "busy");
}

#[test]
fn balance_evens_out_and_respects_threshold() {
    let inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000), host("c", 1000)],
        guests: vec![
            guest("g1", "a", 300),
            guest("g2", "a", 300),
            guest("g3", "a", 200),
            guest("g4", "b", 100),
        ],
    };
    let plan = balance(&inv, p());
    check_plan(&inv, &plan, false).unwrap();
    assert!(plan.imbalance_before > 0.5);
    assert!(plan.imbalance_after <= 0.15 + 1e-9, "{plan:?}");
    assert!(plan.moves.len() <= 2, "{:?}", plan.moves);
    // Already balanced: no moves for small gains.
    let inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000)],
        guests: vec![guest("g1", "a", 300), guest("g2", "b", 250)],
    };
    assert!(balance(&inv, p()).moves.is_empty());
}

#[test]
fn balance_leaves_standby_alone_until_load_rises() {
    let mut inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000), host("c", 1000)],
        guests: vec![guest("g1", "a", 300), guest("g2", "b", 300)],
    };
    inv.hosts[2].drained = Some(Drain::Standby);
    assert!(balance(&inv, p()).moves.is_empty());
    inv.guests.push(guest("g3", "a", 600));
    inv.guests.push(guest("g4", "b", 300));
    let plan = balance(&inv, p());
    check_plan(&inv, &plan, true).unwrap();
    assert!(plan.moves.iter().any(|m| m.to == "c"), "{plan:?}");
    assert_eq!(plan.reactivated_hosts, ["c"]);
}

#[test]
fn consolidate_packs_and_frees_hosts() {
    let mut inv = Inventory {
        hosts: vec![host("a", 1000), host("b", 1000), host("c", 1000)],
        guests: vec![
            guest("g1", "a", 400),
            guest("g2", "b", 300),
            guest("g3", "c", 200),
        ],
    };
    let plan = consolidate(&inv, p());
    check_plan(&inv, &plan, false).unwrap();
    assert_eq!(plan.freed_hosts.len(), 2, "{plan:?}");
    assert_eq!(plan.moves.len(), 2);
    // A pinned guest keeps its host on.
    inv.guests[2].pinned = true;
    let plan = consolidate(&inv, p());
    check_plan(&inv, &plan, false).unwrap();
    assert!(!plan.freed_hosts.contains(&"c".to_owned()));
    assert_eq!(plan.freed_hosts.len(), 2, "{plan:?}");
}

// ------------------------------------------------------------- property tests

fn arb_inventory() -> impl Strategy<Value = Inventory> {
    (2usize..6, 0usize..10).prop_flat_map(|(nh, ng)| {
        let hosts = proptest::collection::vec((1u64..16, 1u32..4, 0u8..4, 0u8..6), nh);
        let guests = proptest::collection::vec(
            (
                1u64..6,
                0u32..150,
                0u32..400,
                0usize..nh,
                0u8..4,
                0u8..10,
                0u8..12,
            ),
            ng,
        );
        (hosts, guests).prop_map(|(hs, gs)| {
            let hosts: Vec<HostCap> = hs
                .iter()
                .enumerate()
                .map(|(i, &(mem, cpus, fp, dr))| HostCap {
                    name: format!("h{i}"),
                    memory_mib: mem * 128,
                    cpu_percent: f64::from(cpus) * 100.0,
                    cpu_fingerprint: if fp == 0 {
                        "fp-b".into()
                    } else {
                        "fp-a".into()
                    },
                    drained: match dr {
                        0 => Some(Drain::Maintenance),
                        1 => Some(Drain::Standby),
                        _ => None,
                    },
                })
                .collect();
            let guests = gs
                .iter()
                .enumerate()
                .map(|(i, &(mem, cpu, dirty, h, fp, pin, mov))| Guest {
                    name: format!("g{i}"),
                    host: hosts[h].name.clone(),
                    memory_mib: mem * 128,
                    cpu_percent: f64::from(cpu),
                    dirty_mib_per_s: f64::from(dirty),
                    cpu_fingerprint: if fp == 0 {
                        "fp-b".into()
                    } else {
                        "fp-a".into()
                    },
                    pinned: pin == 0,
                    movable: mov != 0,
                })
                .collect();
            Inventory { hosts, guests }
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every planner keeps every promise (capacity, pins, CPU, drained hosts, one move
    /// per guest) on any inventory, and ends (the test would hang otherwise).
    #[test]
    fn plans_keep_their_promises(inv in arb_inventory(), src in 0usize..6) {
        let src = format!("h{}", src % inv.hosts.len());
        let e = evacuate(&inv, &src, p());
        prop_assert!(check_plan(&inv, &e, true).is_ok(), "{:?}", check_plan(&inv, &e, true));
        // Every guest of the source is either moved off or named.
        let on_src = inv.guests.iter().filter(|g| g.host == src).count();
        prop_assert_eq!(e.moves.len() + e.stuck.len(), on_src);
        prop_assert!(e.moves.iter().all(|m| m.from == src && m.to != src));

        let b = balance(&inv, p());
        prop_assert!(check_plan(&inv, &b, true).is_ok(), "{:?}", check_plan(&inv, &b, true));
        let c = consolidate(&inv, p());
        prop_assert!(check_plan(&inv, &c, false).is_ok(), "{:?}", check_plan(&inv, &c, false));
        // A freed host holds nothing after the plan.
        for f in &c.freed_hosts {
            let l = c.after.iter().find(|l| &l.host == f).unwrap();
            prop_assert_eq!(l.guests, 0);
        }
        // Planning is deterministic.
        prop_assert_eq!(balance(&inv, p()), b);
    }

    /// Balance only takes steps that lower the variance of the hosts' loads (over the
    /// active hosts, when it takes no stand-by host back).
    #[test]
    fn balance_never_worsens(inv in arb_inventory()) {
        let b = balance(&inv, p());
        if b.reactivated_hosts.is_empty() && !b.moves.is_empty() {
            let active = active_hosts(&inv, false);
            let s0 = State::new(&inv, p());
            let mut s1 = State::new(&inv, p());
            for m in &b.moves {
                let gi = inv.guests.iter().position(|g| g.name == m.vm).unwrap();
                let h = s1.host_ix[m.to.as_str()];
                s1.apply(gi, h);
            }
            prop_assert!(s1.variance(&active) < s0.variance(&active));
        }
    }
}

// ------------------------------------------------------------- brute force

/// Every assignment of movable guests to hosts obeying the same rules (capacity at the
/// end, CPU, pins, drained hosts); calls `f(assignment, moves)`.
fn each_assignment(inv: &Inventory, f: &mut dyn FnMut(&[usize], usize)) {
    let nh = inv.hosts.len();
    let start: Vec<usize> = inv
        .guests
        .iter()
        .map(|g| inv.hosts.iter().position(|h| h.name == g.host).unwrap())
        .collect();
    let mut cur = start.clone();
    fn rec(
        inv: &Inventory,
        i: usize,
        nh: usize,
        start: &[usize],
        cur: &mut Vec<usize>,
        f: &mut dyn FnMut(&[usize], usize),
    ) {
        if i == inv.guests.len() {
            let mut mem = vec![0u64; nh];
            let mut cpu = vec![0f64; nh];
            for (gi, &h) in cur.iter().enumerate() {
                mem[h] += inv.guests[gi].memory_mib;
                cpu[h] += inv.guests[gi].cpu_percent;
            }
            for h in 0..nh {
                let received = cur.iter().zip(start).any(|(&c, &s)| c == h && s != h);
                if received
                    && (mem[h] > inv.hosts[h].memory_mib
                        || cpu[h] > inv.hosts[h].cpu_percent + 1e-9)
                {
                    return;
                }
            }
            let moves = cur.iter().zip(start).filter(|(c, s)| c != s).count();
            f(cur, moves);
            return;
        }
        let g = &inv.guests[i];
        for h in 0..nh {
            if h != start[i]
                && (g.pinned
                    || !g.movable
                    || inv.hosts[h].drained.is_some()
                    || inv.hosts[h].cpu_fingerprint != g.cpu_fingerprint)
            {
                continue;
            }
            cur[i] = h;
            rec(inv, i + 1, nh, start, cur, f);
        }
        cur[i] = start[i];
    }
    rec(inv, 0, nh, &start, &mut cur, f);
}

fn imbalance_of_assignment(inv: &Inventory, a: &[usize], active: &[usize]) -> f64 {
    let nh = inv.hosts.len();
    let mut mem = vec![0f64; nh];
    let mut cpu = vec![0f64; nh];
    for (gi, &h) in a.iter().enumerate() {
        mem[h] += inv.guests[gi].memory_mib as f64;
        cpu[h] += inv.guests[gi].cpu_percent;
    }
    let mf = active
        .iter()
        .map(|&h| frac(mem[h], inv.hosts[h].memory_mib as f64));
    let cf = active
        .iter()
        .map(|&h| frac(cpu[h], inv.hosts[h].cpu_percent));
    spread(mf).max(spread(cf))
}

fn small_inventory(rng: &mut impl FnMut() -> u64) -> Inventory {
    let nh = 3 + (rng() % 2) as usize;
    let ng = 3 + (rng() % 4) as usize;
    let hosts: Vec<HostCap> = (0..nh)
        .map(|i| HostCap {
            name: format!("h{i}"),
            memory_mib: (4 + rng() % 5) * 128,
            cpu_percent: 400.0,
            cpu_fingerprint: if rng().is_multiple_of(6) {
                "fp-b"
            } else {
                "fp-a"
            }
            .into(),
            drained: None,
        })
        .collect();
    let guests = (0..ng)
        .map(|i| Guest {
            name: format!("g{i}"),
            host: format!("h{}", rng() % nh as u64),
            memory_mib: (1 + rng() % 3) * 128,
            cpu_percent: (rng() % 60) as f64,
            dirty_mib_per_s: 0.0,
            cpu_fingerprint: "fp-a".into(),
            pinned: rng().is_multiple_of(8),
            movable: true,
        })
        .collect();
    Inventory { hosts, guests }
}

/// Plan quality against brute force on small random inventories (3-4 hosts, 3-6
/// guests). Prints the figures (`--nocapture`) and asserts the heuristics stay close.
#[test]
fn quality_against_brute_force() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = move || {
        // xorshift64: deterministic figures run to run.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let params = p();
    let (mut cons_n, mut cons_opt_hosts, mut cons_hosts, mut cons_equal) = (0, 0, 0, 0);
    let (mut cons_moves, mut cons_opt_moves) = (0, 0);
    let (mut bal_n, mut bal_feasible, mut bal_reached, mut bal_moves, mut bal_opt_moves) =
        (0, 0, 0, 0, 0);
    let mut bal_extra_max = 0usize;
    for _ in 0..400 {
        let inv = small_inventory(&mut rng);
        let all: Vec<usize> = (0..inv.hosts.len()).collect();
        // Consolidate: fewest non-empty hosts; among those, fewest moves.
        let mut best: Option<(usize, usize)> = None;
        each_assignment(&inv, &mut |a, moves| {
            let used: BTreeSet<usize> = a.iter().copied().collect();
            let k = (used.len(), moves);
            if best.is_none_or(|b| k < b) {
                best = Some(k);
            }
        });
        // The starting assignment always qualifies (no host received anything).
        let Some((opt_hosts, opt_moves)) = best else {
            continue;
        };
        let plan = consolidate(&inv, params);
        check_plan(&inv, &plan, false).unwrap();
        let hosts_after = plan.after.iter().filter(|l| l.guests > 0).count();
        cons_n += 1;
        cons_opt_hosts += opt_hosts;
        cons_hosts += hosts_after;
        cons_moves += plan.moves.len();
        cons_opt_moves += opt_moves;
        if hosts_after == opt_hosts {
            cons_equal += 1;
        }
        assert!(hosts_after >= opt_hosts, "better than brute force? {inv:?}");
        assert!(
            hosts_after <= opt_hosts + 1,
            "{inv:?} -> {plan:?} (opt {opt_hosts})"
        );

        // Balance: fewest moves reaching the threshold, when any assignment does.
        let mut fewest: Option<usize> = None;
        each_assignment(&inv, &mut |a, moves| {
            if imbalance_of_assignment(&inv, a, &all) <= params.threshold + 1e-12
                && fewest.is_none_or(|f| moves < f)
            {
                fewest = Some(moves);
            }
        });
        let plan = balance(&inv, params);
        check_plan(&inv, &plan, false).unwrap();
        bal_n += 1;
        if let Some(f) = fewest {
            bal_feasible += 1;
            if plan.imbalance_after <= params.threshold + 1e-12 {
                bal_reached += 1;
                bal_moves += plan.moves.len();
                bal_opt_moves += f;
                bal_extra_max = bal_extra_max.max(plan.moves.len() - f.min(plan.moves.len()));
            }
        }
    }
    println!(
        "consolidate: {cons_n} inventories; hosts left on: heuristic {cons_hosts}, optimum {cons_opt_hosts}; \
         optimal in {cons_equal}/{cons_n}; moves: heuristic {cons_moves}, optimum's {cons_opt_moves}"
    );
    println!(
        "balance: {bal_n} inventories, threshold reachable in {bal_feasible}; heuristic reached it in \
         {bal_reached}; moves: heuristic {bal_moves}, fewest possible {bal_opt_moves}; worst extra moves {bal_extra_max}"
    );
    assert!(
        cons_equal * 10 >= cons_n * 8,
        "consolidate optimal in under 80%"
    );
    assert!(
        bal_reached * 10 >= bal_feasible * 7,
        "balance reached the threshold in under 70% of feasible cases"
    );
}
