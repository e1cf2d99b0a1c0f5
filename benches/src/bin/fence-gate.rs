//! Cost of the lease check itself on the data path: `begin_change` plus dropping its
//! guard, per change, on an unleased gate and on a leased gate (one thread, and all
//! cores sharing one epoch as multi-conn connections of one holder do). Prints
//! nanoseconds per change; compare with the tens of microseconds an NBD write takes.
//! Run by benches/fence.sh (make bench-fence).

use std::hint::black_box;
use std::time::Instant;

use nbd_server::lease::{LeaseGate, LeasePolicy, LeaseRecord, LeaseToken};

const OPS: u64 = 20_000_000;

fn per_change(gate: &LeaseGate, token: Option<&str>, threads: usize) -> f64 {
    let binding = gate.bind(token, false).expect("binds");
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..OPS {
                    let guard = gate.begin_change(&binding).expect("not fenced");
                    drop(black_box(guard));
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / OPS as f64
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let unleased = LeaseGate::new_unleased();
    let leased = LeaseGate::new_leased(LeaseRecord::default(), LeasePolicy::default());
    let token = LeaseToken::generate();
    leased
        .fence("bench", 1, "bench", token.hash())
        .expect("first fence");
    let u = per_change(&unleased, None, 1);
    let l1 = per_change(&leased, Some(token.expose()), 1);
    let ln = per_change(&leased, Some(token.expose()), threads);
    println!(
        "lease check per change (ns): unleased {u:.1}, leased {l1:.1} (1 thread), leased {ln:.1} ({threads} threads sharing one epoch)"
    );
}
