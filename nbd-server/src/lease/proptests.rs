//! Random sequences of bind, write (begin / issue / complete), fence and restart
//! against the real gate; the invariant: no change from an older epoch is ever
//! admitted, nor issued to the kernel (the backends' re-check), after that epoch
//! was fenced, a fence never reports drained with a change in flight (issued or
//! still queued), and a restart (rebuilding the gate from the durable record)
//! never revives an old token.
use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Bind a connection with the token of the given epoch index (0 = plain name).
    Bind(usize),
    /// Begin a change on connection i (mod len).
    Begin(usize),
    /// The backend reaches the oldest queued change of connection i: it issues it
    /// if `may_issue`, or fails it (dropping the guard) otherwise.
    Issue(usize),
    /// Complete the oldest in-flight change of connection i.
    Complete(usize),
    /// Fence to current + delta (delta 0 = stale request).
    Fence(u64),
    /// Kill -9 and restart: bindings and in-flight changes vanish.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..6).prop_map(Op::Bind),
        5 => (0usize..16).prop_map(Op::Begin),
        3 => (0usize..16).prop_map(Op::Issue),
        3 => (0usize..16).prop_map(Op::Complete),
        2 => (0u64..3).prop_map(Op::Fence),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #[test]
    fn no_stale_change_is_ever_admitted(ops in proptest::collection::vec(op(), 1..200)) {
        // The "durable store": what a restart rebuilds from.
        let mut durable = LeaseRecord::default();
        let mut gate = LeaseGate::new_leased(durable.clone(), LeasePolicy::default());
        // tokens[i] = token issued for the i-th successful fence.
        let mut tokens: Vec<(u64, LeaseToken)> = Vec::new();
        // Per connection: its binding and its changes in flight (guard, issued).
        let mut conns: Vec<(Binding, Vec<(ChangeGuard, bool)>)> = Vec::new();
        let mut tickets: Vec<FenceTicket> = Vec::new();

        for op in ops {
            match op {
                Op::Bind(i) => {
                    let token = if i == 0 || tokens.is_empty() {
                        None
                    } else {
                        Some(&tokens[(i - 1) % tokens.len()])
                    };
                    let result = gate.bind(token.map(|(_, t)| t.expose()), false);
                    match (token, result) {
                        (None, Ok(b)) => { prop_assert!(!b.writable); conns.push((b, Vec::new())); }
                        (Some((epoch, _)), Ok(b)) => {
                            prop_assert_eq!(*epoch, durable.epoch, "bound with an old token");
                            prop_assert!(b.writable);
                            conns.push((b, Vec::new()));
                        }
                        (Some((epoch, _)), Err(e)) => {
                            prop_assert_eq!(e, BindError::WrongToken);
                            prop_assert!(*epoch != durable.epoch, "current token refused");
                        }
                        (None, Err(e)) => prop_assert!(false, "plain bind refused: {e}"),
                    }
                }
                Op::Begin(i) if !conns.is_empty() => {
                    let n = conns.len();
                    let (b, guards) = &mut conns[i % n];
                    match gate.begin_change(b) {
                        Ok(g) => {
                            prop_assert!(b.writable);
                            prop_assert_eq!(b.epoch(), Some(durable.epoch), "stale change admitted");
                            guards.push((g, false));
                        }
                        Err(Fenced) => prop_assert!(
                            !b.writable || b.epoch() != Some(durable.epoch),
                            "current holder refused"
                        ),
                    }
                }
                Op::Complete(i) if !conns.is_empty() => {
                    let n = conns.len();
                    let guards = &mut conns[i % n].1;
                    if !guards.is_empty() {
                        drop(guards.remove(0));
                    }
                }
                Op::Issue(i) if !conns.is_empty() => {
                    let n = conns.len();
                    let (b, guards) = &mut conns[i % n];
                    if let Some(k) = guards.iter().position(|(_, issued)| !issued) {
                        // The binding's slot is current exactly when its epoch is
                        // the durable one and no restart replaced the gate (a
                        // restart clears every connection).
                        let current = b.epoch() == Some(durable.epoch);
                        if guards[k].0.may_issue() {
                            prop_assert!(current, "stale change issued to the kernel");
                            guards[k].1 = true;
                        } else {
                            prop_assert!(!current, "current holder's change refused at issue");
                            drop(guards.remove(k));
                        }
                    }
                }
                Op::Begin(_) | Op::Issue(_) | Op::Complete(_) => {}
                Op::Fence(delta) => {
                    let token = LeaseToken::generate();
                    let epoch = durable.epoch + delta;
                    match gate.fence("d", epoch, "h", token.hash()) {
                        Ok(ticket) => {
                            prop_assert!(delta > 0);
                            // Persist before reporting; the store would fsync here.
                            durable = ticket.record.clone();
                            tokens.push((epoch, token));
                            tickets.push(ticket);
                        }
                        Err(FenceError::StaleEpoch { .. }) => prop_assert_eq!(delta, 0),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Restart => {
                    conns.clear();
                    tickets.clear();
                    gate = LeaseGate::new_leased(durable.clone(), LeasePolicy::default());
                }
            }
            // A fence's drain is complete exactly when no change of the old epoch
            // is still held by any connection.
            for t in &tickets {
                let held: usize = conns
                    .iter()
                    .filter(|(b, _)| b.epoch() == Some(t.previous.epoch) && b.slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &t.old_slot)))
                    .map(|(_, g)| g.len())
                    .sum();
                prop_assert_eq!(t.in_flight(), held as u64);
            }
        }
    }
}
