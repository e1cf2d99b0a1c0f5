use super::*;

fn leased() -> LeaseGate {
    LeaseGate::new_leased(LeaseRecord::default(), LeasePolicy::default())
}

#[test]
fn tokens_are_long_random_and_redacted() {
    let a = LeaseToken::generate();
    let b = LeaseToken::generate();
    assert_eq!(a.expose().len(), TOKEN_BYTES * 2);
    assert_ne!(a, b);
    assert!(!format!("{a:?}").contains(a.expose()));
    assert!(a.hash().matches(&TokenHash::of(a.expose())));
    assert!(!a.hash().matches(&b.hash()));
}

#[test]
fn token_hash_round_trips_through_json() {
    let h = LeaseToken::generate().hash();
    let s = serde_json::to_string(&h).expect("serializes");
    let back: TokenHash = serde_json::from_str(&s).expect("parses");
    assert!(back.matches(&h));
    assert!(serde_json::from_str::<TokenHash>("\"zz\"").is_err());
}

#[test]
fn unleased_export_is_always_writable() {
    let gate = LeaseGate::new_unleased();
    let b = gate.bind(None, false).expect("binds");
    assert!(b.writable);
    let _g = gate.begin_change(&b).expect("writes");
    assert!(!gate.bind(None, true).expect("binds").writable);
    assert_eq!(
        gate.bind(Some("x"), false).unwrap_err(),
        BindError::NotLeased
    );
}

#[test]
fn plain_name_is_read_only_or_refused() {
    let gate = leased();
    let b = gate.bind(None, false).expect("binds read-only");
    assert!(!b.writable);
    assert_eq!(gate.begin_change(&b).unwrap_err(), Fenced);
    let strict = LeaseGate::new_leased(
        LeaseRecord::default(),
        LeasePolicy {
            lease_required_for_reads: true,
        },
    );
    assert_eq!(
        strict.bind(None, false).unwrap_err(),
        BindError::LeaseRequired
    );
}

#[test]
fn no_token_binds_before_the_first_fence() {
    let gate = leased();
    assert_eq!(
        gate.bind(Some(""), false).unwrap_err(),
        BindError::WrongToken
    );
    assert_eq!(
        gate.bind(Some("0000"), false).unwrap_err(),
        BindError::WrongToken
    );
}

#[test]
fn fence_listeners_hear_every_fence_until_dropped() {
    struct Count(AtomicU64);
    impl FenceListener for Count {
        fn fenced(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let count = Arc::new(Count(AtomicU64::new(0)));
    let as_listener: Arc<dyn FenceListener> = count.clone();
    add_fence_listener(Arc::downgrade(&as_listener));
    let gate = leased();
    gate.fence("d", 1, "a", LeaseToken::generate().hash())
        .expect("fence 1");
    // Other tests fence concurrently: at least ours was heard.
    assert!(count.0.load(Ordering::SeqCst) >= 1);
    assert!(
        gate.fence("d", 1, "a", LeaseToken::generate().hash())
            .is_err()
    );
    let weak = Arc::downgrade(&as_listener);
    drop(as_listener);
    drop(count);
    assert!(weak.upgrade().is_none());
    // A dropped listener is skipped (and pruned at the next registration).
    gate.fence("d", 2, "b", LeaseToken::generate().hash())
        .expect("fence 2");
}

#[test]
fn fence_switches_writers_and_refuses_stale_epochs() {
    let gate = leased();
    let t1 = LeaseToken::generate();
    gate.fence("d", 1, "a", t1.hash()).expect("fence 1");
    let b1 = gate.bind(Some(t1.expose()), false).expect("binds");
    let b1b = gate.bind(Some(t1.expose()), false).expect("second conn");
    assert_eq!(b1.epoch(), Some(1));
    drop(gate.begin_change(&b1).expect("writes"));
    drop(gate.begin_change(&b1b).expect("writes"));

    let t2 = LeaseToken::generate();
    let ticket = gate.fence("d", 2, "b", t2.hash()).expect("fence 2");
    assert_eq!(ticket.previous.epoch, 1);
    assert!(gate.is_fenced(&b1) && gate.is_fenced(&b1b));
    assert_eq!(gate.begin_change(&b1).unwrap_err(), Fenced);
    assert_eq!(gate.begin_change(&b1b).unwrap_err(), Fenced);
    assert_eq!(ticket.in_flight(), 0);
    assert_eq!(
        gate.bind(Some(t1.expose()), false).unwrap_err(),
        BindError::WrongToken
    );
    let b2 = gate.bind(Some(t2.expose()), false).expect("new holder");
    drop(gate.begin_change(&b2).expect("new holder writes"));

    for stale in [1, 2] {
        assert!(matches!(
            gate.fence("d", stale, "c", LeaseToken::generate().hash()),
            Err(FenceError::StaleEpoch { .. })
        ));
    }
    // The refused fences changed nothing.
    drop(gate.begin_change(&b2).expect("still writes"));
}

#[tokio::test]
async fn fence_waits_for_changes_in_flight() {
    let gate = Arc::new(leased());
    let t1 = LeaseToken::generate();
    gate.fence("d", 1, "a", t1.hash()).expect("fence 1");
    let b1 = gate.bind(Some(t1.expose()), false).expect("binds");
    let guard = gate.begin_change(&b1).expect("writes");

    let ticket = gate
        .fence("d", 2, "b", LeaseToken::generate().hash())
        .expect("fence 2");
    assert_eq!(ticket.in_flight(), 1);
    let waited = tokio::time::timeout(std::time::Duration::from_millis(50), ticket.drained());
    assert!(
        waited.await.is_err(),
        "fence returned with a change in flight"
    );

    let closed = {
        let gate = Arc::clone(&gate);
        let b1 = b1.clone();
        tokio::spawn(async move { gate.fenced(&b1).await })
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), closed)
        .await
        .expect("fenced() resolves")
        .expect("task ran");

    let releaser = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(guard);
    });
    tokio::time::timeout(std::time::Duration::from_secs(5), ticket.drained())
        .await
        .expect("drains once the change completes");
    releaser.await.expect("task ran");
}

#[test]
fn racing_fences_exactly_one_wins() {
    let gate = Arc::new(leased());
    let winners: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let gate = &gate;
                s.spawn(move || {
                    gate.fence("d", 5, &format!("h{i}"), LeaseToken::generate().hash())
                        .is_ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| usize::from(h.join().expect("no panic")))
            .sum()
    });
    assert_eq!(winners, 1);
    assert_eq!(gate.record().expect("leased").epoch, 5);
}

#[test]
fn concurrent_writers_never_pass_a_fence() {
    // Writers hammer begin_change while a fence happens; any change admitted after
    // the fence's drain completed would be a stale write.
    use std::sync::atomic::AtomicUsize;
    let gate = Arc::new(leased());
    let t1 = LeaseToken::generate();
    gate.fence("d", 1, "a", t1.hash()).expect("fence 1");
    let binding = gate.bind(Some(t1.expose()), false).expect("binds");
    let fence_done = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let late = AtomicUsize::new(0);
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                // Bounded by `stop`, so a broken gate fails the test, not hangs it.
                while !stop.load(Ordering::SeqCst) {
                    let Ok(g) = gate.begin_change(&binding) else {
                        continue;
                    };
                    admitted.fetch_add(1, Ordering::SeqCst);
                    if fence_done.load(Ordering::SeqCst) {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                    drop(g);
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ticket = gate
            .fence("d", 2, "b", LeaseToken::generate().hash())
            .expect("fence 2");
        while ticket.in_flight() != 0 {
            std::hint::spin_loop();
        }
        fence_done.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::SeqCst);
    });
    assert!(admitted.load(Ordering::SeqCst) > 0, "writers never ran");
    assert_eq!(late.load(Ordering::SeqCst), 0);
}

#[test]
fn revoke_all_keeps_the_epoch_and_drops_the_token() {
    let gate = leased();
    let t1 = LeaseToken::generate();
    gate.fence("d", 3, "a", t1.hash()).expect("fence");
    let b = gate.bind(Some(t1.expose()), false).expect("binds");
    gate.revoke_all().expect("leased");
    assert_eq!(gate.begin_change(&b).unwrap_err(), Fenced);
    assert_eq!(
        gate.bind(Some(t1.expose()), false).unwrap_err(),
        BindError::WrongToken
    );
    assert!(gate.fence("d", 3, "b", t1.hash()).is_err());
}
