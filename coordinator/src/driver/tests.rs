use super::*;
use SourceMigration as S;
use VmPresence as V;
use proptest::prelude::*;

const SRC: &str = "kvm-a1";
const DST: &str = "kvm-b1";

fn rec() -> MigrationRecord {
    MigrationRecord::new("m1", "vm7", SRC, DST, 4)
}

fn at(events: &[Event]) -> MigrationRecord {
    let mut r = rec();
    for e in events {
        r.apply(e.clone()).unwrap();
    }
    r
}

fn obs() -> Observation {
    Observation {
        source: V::Running,
        target: V::Absent,
        source_migration: S::NotStarted,
        storage_epoch: 4,
        storage_holder: Some(SRC.into()),
        tokens: Some((4, SRC.into())),
        cancel: CancelRequest::None,
        disk_move: None,
    }
}

fn moving() -> Observation {
    Observation {
        source: V::InMigration,
        target: V::InMigration,
        source_migration: S::Active,
        ..obs()
    }
}

fn quiesced() -> Observation {
    Observation {
        source_migration: S::Quiesced,
        ..moving()
    }
}

fn precopy() -> Vec<Event> {
    vec![Event::Started]
}
fn quiesced_phase() -> Vec<Event> {
    vec![Event::Started, Event::SourceQuiesced]
}
fn fencing(e: u64) -> Vec<Event> {
    let mut v = quiesced_phase();
    v.push(Event::FenceIntent { epoch: e });
    v
}
fn fenced(e: u64) -> Vec<Event> {
    let mut v = fencing(e);
    v.push(Event::FenceConfirmed);
    v
}

// ------------------------------------------------------------ the live path

#[test]
fn live_path_step_by_step() {
    let mut r = rec();
    assert_eq!(next_action(&r, &obs()), Action::StartSourceMigration);
    r.apply(Event::Started).unwrap();
    assert_eq!(next_action(&r, &moving()), Action::Wait { fast: true });
    assert_eq!(
        next_action(&r, &quiesced()),
        Action::Journal(Event::SourceQuiesced)
    );
    r.apply(Event::SourceQuiesced).unwrap();
    assert_eq!(
        next_action(&r, &quiesced()),
        Action::Fence {
            to: Side::Target,
            epoch: 5
        }
    );
    r.apply(Event::FenceIntent { epoch: 5 }).unwrap();
    r.apply(Event::FenceConfirmed).unwrap();
    let fenced_obs = Observation {
        storage_epoch: 5,
        storage_holder: Some(DST.into()),
        tokens: Some((5, DST.into())),
        ..quiesced()
    };
    assert_eq!(next_action(&r, &fenced_obs), Action::GoAhead);
    let running = Observation {
        source: V::Paused,
        target: V::Running,
        source_migration: S::Completed,
        ..fenced_obs
    };
    assert_eq!(
        next_action(&r, &running),
        Action::Journal(Event::TargetRunning)
    );
    r.apply(Event::TargetRunning).unwrap();
    assert_eq!(
        next_action(&r, &running),
        Action::Journal(Event::Commit { epoch: 5 })
    );
    r.apply(Event::Commit { epoch: 5 }).unwrap();
    assert_eq!(next_action(&r, &running), Action::DiscardSource);
    let gone = Observation {
        source: V::Absent,
        ..running
    };
    assert_eq!(next_action(&r, &gone), Action::Done);
}

#[test]
fn silent_source_agent_waits() {
    for r in [at(&precopy()), at(&quiesced_phase()), at(&fenced(5))] {
        let o = Observation {
            source_migration: S::Unknown,
            ..quiesced()
        };
        assert_eq!(next_action(&r, &o), Action::Wait { fast: false });
    }
}

// ------------------------------------------------------------ planned

#[test]
fn planned() {
    let r = rec();
    let paused = Observation {
        source: V::Paused,
        ..obs()
    };
    assert_eq!(next_action(&r, &paused), Action::StartSourceMigration);
    let unknown_migration = Observation {
        source: V::InMigration,
        ..obs()
    };
    assert_eq!(
        next_action(&r, &unknown_migration),
        Action::Wait { fast: false }
    );
    let cancel = Observation {
        cancel: CancelRequest::Requested,
        ..obs()
    };
    assert!(matches!(
        next_action(&r, &cancel),
        Action::Journal(Event::Abort { .. })
    ));
    let gone = Observation {
        source: V::Absent,
        ..obs()
    };
    assert!(matches!(
        next_action(&r, &gone),
        Action::Journal(Event::Abort { .. })
    ));
}

// ------------------------------------------------------------ before the fence

#[test]
fn cancel_while_memory_moves_is_sent_once() {
    let r = at(&precopy());
    let o = Observation {
        cancel: CancelRequest::Requested,
        ..moving()
    };
    assert_eq!(next_action(&r, &o), Action::CancelSourceMigration);
    let sent = Observation {
        cancel: CancelRequest::Sent,
        ..moving()
    };
    assert_eq!(next_action(&r, &sent), Action::Wait { fast: true });
    // Quiesced before the cancel arrived: cancel it there (the agent resumes it).
    let r = at(&quiesced_phase());
    let o = Observation {
        cancel: CancelRequest::Requested,
        ..quiesced()
    };
    assert_eq!(next_action(&r, &o), Action::CancelSourceMigration);
    let o = Observation {
        cancel: CancelRequest::Sent,
        ..quiesced()
    };
    assert_eq!(next_action(&r, &o), Action::Wait { fast: false });
}

#[test]
fn failures_before_the_fence_cancel_with_the_source_running() {
    for r in [at(&precopy()), at(&quiesced_phase())] {
        for m in [
            S::Failed("x".into()),
            S::Cancelled,
            S::Forgotten,
            S::NotStarted,
        ] {
            // Settling: the source still shows the migration.
            let o = Observation {
                source_migration: m.clone(),
                ..moving()
            };
            assert_eq!(next_action(&r, &o), Action::Wait { fast: false });
            let o = Observation {
                source: V::Paused,
                target: V::InMigration,
                source_migration: m.clone(),
                ..obs()
            };
            assert_eq!(next_action(&r, &o), Action::DiscardTarget, "{m:?}");
            let o = Observation {
                source: V::Paused,
                ..o
            };
            let o = Observation {
                target: V::Absent,
                ..o
            };
            assert_eq!(
                next_action(&r, &o),
                Action::ResumeSource { new_tokens: false }
            );
            let o = Observation {
                source: V::Running,
                ..o
            };
            assert!(matches!(
                next_action(&r, &o),
                Action::Journal(Event::Abort { .. })
            ));
        }
    }
}

#[test]
fn abort_waits_for_a_silent_target() {
    let r = at(&precopy());
    let o = Observation {
        source_migration: S::Failed("x".into()),
        source: V::Running,
        target: V::Unreachable,
        ..obs()
    };
    assert_eq!(next_action(&r, &o), Action::Wait { fast: false });
}

// ------------------------------------------------------------ after the fence intent

#[test]
fn unknown_fence_outcome_burns_the_epoch() {
    // Fencing at 5 journaled; the node may or may not have applied it.
    let r = at(&fencing(5));
    for storage in [4, 5] {
        let o = Observation {
            storage_epoch: storage,
            ..quiesced()
        };
        assert_eq!(
            next_action(&r, &o),
            Action::Fence {
                to: Side::Target,
                epoch: 6
            }
        );
    }
    // Fenced at 5 but the record holds no tokens for it: fence again too.
    let r = at(&fenced(5));
    assert_eq!(
        next_action(&r, &quiesced()),
        Action::Fence {
            to: Side::Target,
            epoch: 6
        }
    );
}

#[test]
fn cancel_or_failure_after_the_fence_decides_a_rollback() {
    let r = at(&fenced(5));
    let o = Observation {
        cancel: CancelRequest::Requested,
        tokens: Some((5, DST.into())),
        ..quiesced()
    };
    assert!(matches!(
        next_action(&r, &o),
        Action::Journal(Event::RollbackDecided { .. })
    ));
    let o = Observation {
        source: V::Paused,
        source_migration: S::Failed("target gone".into()),
        ..obs()
    };
    match next_action(&r, &o) {
        Action::Journal(Event::RollbackDecided { reason }) => {
            assert!(reason.contains("target gone"))
        }
        a => panic!("{a:?}"),
    }
    let o = Observation {
        source_migration: S::Active,
        ..o
    };
    assert_eq!(next_action(&r, &o), Action::Wait { fast: false });
}

#[test]
fn a_decided_rollback_stops_the_source_then_fences_back() {
    let mut r = at(&fenced(5));
    r.apply(Event::RollbackDecided { reason: "x".into() })
        .unwrap();
    assert_eq!(next_action(&r, &quiesced()), Action::AbortSourceMigration);
    let settling = Observation {
        source_migration: S::Failed("aborted".into()),
        ..moving()
    };
    assert_eq!(next_action(&r, &settling), Action::Wait { fast: false });
    let target_left = Observation {
        source: V::Paused,
        target: V::Paused,
        source_migration: S::Failed("aborted".into()),
        storage_epoch: 5,
        ..obs()
    };
    assert_eq!(next_action(&r, &target_left), Action::DiscardTarget);
    let clean = Observation {
        target: V::Absent,
        ..target_left
    };
    assert_eq!(
        next_action(&r, &clean),
        Action::Fence {
            to: Side::Source,
            epoch: 6
        }
    );
    r.apply(Event::RollbackIntent { epoch: 6 }).unwrap();
    // The fence's outcome is unknown: a newer epoch.
    assert_eq!(
        next_action(&r, &clean),
        Action::Fence {
            to: Side::Source,
            epoch: 7
        }
    );
    let refenced = Observation {
        storage_epoch: 6,
        tokens: Some((6, SRC.into())),
        ..clean
    };
    assert_eq!(
        next_action(&r, &refenced),
        Action::ResumeSource { new_tokens: true }
    );
    let resumed = Observation {
        source: V::Running,
        ..refenced
    };
    assert_eq!(
        next_action(&r, &resumed),
        Action::Journal(Event::RollbackConfirmed)
    );
    r.apply(Event::RollbackConfirmed).unwrap();
    assert_eq!(next_action(&r, &resumed), Action::Done);
}

#[test]
fn rolling_back_with_a_quiesced_source_aborts_its_wait_first() {
    let mut r = at(&fenced(5));
    r.apply(Event::RollbackDecided { reason: "x".into() })
        .unwrap();
    r.apply(Event::RollbackIntent { epoch: 6 }).unwrap();
    assert_eq!(next_action(&r, &quiesced()), Action::AbortSourceMigration);
}

#[test]
fn target_running_commits() {
    let r = at(&[fenced(5), vec![Event::TargetRunning]].concat());
    let o = Observation {
        source: V::Paused,
        source_migration: S::Completed,
        ..obs()
    };
    assert_eq!(
        next_action(&r, &o),
        Action::Journal(Event::Commit { epoch: 5 })
    );
}

// ------------------------------------------------------------ roll forward

#[test]
fn a_running_target_with_the_lease_is_committed_from_any_fence_phase() {
    let running = Observation {
        source: V::Paused,
        target: V::Running,
        source_migration: S::Completed,
        storage_epoch: 5,
        storage_holder: Some(DST.into()),
        tokens: Some((4, SRC.into())),
        cancel: CancelRequest::None,
        disk_move: None,
    };
    for r in [at(&fencing(5)), at(&fenced(5))] {
        assert_eq!(
            next_action(&r, &running),
            Action::Journal(Event::Commit { epoch: 5 })
        );
    }
    // Even when a rollback was decided: the running copy wins.
    let mut r = at(&fenced(5));
    r.apply(Event::RollbackDecided { reason: "x".into() })
        .unwrap();
    assert_eq!(
        next_action(&r, &running),
        Action::Journal(Event::Commit { epoch: 5 })
    );
}

#[test]
fn a_lone_running_target_gets_the_disks_at_any_phase() {
    let lone = Observation {
        source: V::Absent,
        target: V::Running,
        source_migration: S::Completed,
        ..obs()
    };
    for r in [rec(), at(&precopy()), at(&quiesced_phase())] {
        assert_eq!(
            next_action(&r, &lone),
            Action::Fence {
                to: Side::Target,
                epoch: 5
            }
        );
    }
    // Intent at 5 journaled and never applied: 5 is burnt.
    assert_eq!(
        next_action(&at(&fencing(5)), &lone),
        Action::Fence {
            to: Side::Target,
            epoch: 6
        }
    );
    // Also in a rollback: it is the only copy.
    let mut r = at(&fenced(5));
    r.apply(Event::RollbackDecided { reason: "x".into() })
        .unwrap();
    r.apply(Event::RollbackIntent { epoch: 6 }).unwrap();
    let lone6 = Observation {
        storage_epoch: 6,
        storage_holder: Some(SRC.into()),
        ..lone
    };
    assert_eq!(
        next_action(&r, &lone6),
        Action::Fence {
            to: Side::Target,
            epoch: 7
        }
    );
}

// ------------------------------------------------------------ terminal

#[test]
fn terminal_phases_clean_up_but_never_the_only_copy() {
    let mut r = rec();
    r.apply(Event::Abort { reason: "x".into() }).unwrap();
    let left = Observation {
        target: V::Paused,
        ..obs()
    };
    assert_eq!(next_action(&r, &left), Action::DiscardTarget);
    let lone = Observation {
        source: V::Absent,
        target: V::Running,
        ..obs()
    };
    assert_eq!(next_action(&r, &lone), Action::Done);
    assert_eq!(next_action(&r, &obs()), Action::Done);
    let unreachable = Observation {
        target: V::Unreachable,
        ..obs()
    };
    assert_eq!(next_action(&r, &unreachable), Action::Done);
}

// ------------------------------------------------------------ properties

fn arb_presence() -> impl Strategy<Value = VmPresence> {
    prop_oneof![
        Just(V::Running),
        Just(V::Paused),
        Just(V::InMigration),
        Just(V::Absent),
        Just(V::Unreachable),
    ]
}

fn arb_migration() -> impl Strategy<Value = SourceMigration> {
    prop_oneof![
        Just(S::NotStarted),
        Just(S::Active),
        Just(S::Quiesced),
        Just(S::Completed),
        Just(S::Failed("f".into())),
        Just(S::Cancelled),
        Just(S::Forgotten),
        Just(S::Unknown),
    ]
}

fn arb_cancel() -> impl Strategy<Value = CancelRequest> {
    prop_oneof![
        Just(CancelRequest::None),
        Just(CancelRequest::Requested),
        Just(CancelRequest::Sent),
    ]
}

/// The random part of an observation; the storage and token fields follow what the
/// simulated executor did (with random drift) so that the sequence is plausible.
#[derive(Debug, Clone)]
struct Noise {
    source: VmPresence,
    target: VmPresence,
    migration: SourceMigration,
    cancel: CancelRequest,
    /// The fence call: 0 applied and recorded, 1 applied but reply lost, 2 failed.
    fence_outcome: u8,
    storage_drift: u64,
    holder_is_target: bool,
}

fn arb_noise() -> impl Strategy<Value = Noise> {
    (
        arb_presence(),
        arb_presence(),
        arb_migration(),
        arb_cancel(),
        0u8..3,
        0u64..2,
        any::<bool>(),
    )
        .prop_map(
            |(source, target, migration, cancel, fence_outcome, drift, holder)| Noise {
                source,
                target,
                migration,
                cancel,
                fence_outcome,
                storage_drift: drift,
                holder_is_target: holder,
            },
        )
}

proptest! {
    /// Arbitrary observation sequences (restarts included: nothing but the record
    /// carries over): every journal step the driver asks for is a valid transition,
    /// no epoch is fenced twice, and once a fence intent was journaled the source
    /// neither resumes with its own disks nor has its migration cancelled (which
    /// resumes it with them).
    #[test]
    fn random_observations_keep_the_invariants(steps in proptest::collection::vec(arb_noise(), 1..60)) {
        let mut r = rec();
        let mut fenced_epochs: Vec<u64> = Vec::new();
        let mut storage = (4u64, SRC.to_owned());
        let mut tokens = Some((4u64, SRC.to_owned()));
        for n in steps {
            storage.0 += n.storage_drift;
            let o = Observation {
                source: n.source,
                target: n.target,
                source_migration: n.migration.clone(),
                storage_epoch: storage.0,
                storage_holder: Some(if n.holder_is_target { DST.into() } else { storage.1.clone() }),
                tokens: tokens.clone(),
                cancel: n.cancel,
                disk_move: None,
            };
            let past_intent = r.phase.past_fence_intent();
            let action = next_action(&r, &o);
            match action {
                Action::Journal(ev) => {
                    let before = r.clone();
                    prop_assert!(r.apply(ev.clone()).is_ok(), "{:?} refused in {:?} ({:?})", ev, before.phase, o);
                    if matches!(ev, Event::Commit { .. }) && !matches!(before.phase, Phase::TargetRunning { .. }) {
                        // Only a running target is committed (TargetRunning was journaled once it ran).
                        prop_assert_eq!(o.target, V::Running);
                    }
                }
                Action::Fence { to, epoch } => {
                    prop_assert!(!fenced_epochs.contains(&epoch), "epoch {} fenced twice", epoch);
                    prop_assert!(epoch > storage.0 && epoch > r.highest_epoch);
                    fenced_epochs.push(epoch);
                    let intent = match to {
                        Side::Target => Event::FenceIntent { epoch },
                        Side::Source => Event::RollbackIntent { epoch },
                    };
                    let before = r.clone();
                    prop_assert!(r.apply(intent).is_ok(), "intent refused in {:?}", before);
                    let holder = match to { Side::Target => DST, Side::Source => SRC };
                    if n.fence_outcome < 2 {
                        storage = (epoch, holder.to_owned());
                    }
                    if n.fence_outcome == 0 {
                        tokens = Some((epoch, holder.to_owned()));
                        if to == Side::Target {
                            let confirmed = r.apply(Event::FenceConfirmed).is_ok();
                            prop_assert!(confirmed);
                        }
                    }
                }
                Action::GoAhead => {
                    let Phase::Fenced { epoch } = r.phase else {
                        return Err(TestCaseError::fail(format!("go-ahead in {:?}", r.phase)));
                    };
                    prop_assert_eq!(tokens.clone(), Some((epoch, DST.to_owned())));
                    if n.fence_outcome == 0 {
                        let ran = r.apply(Event::TargetRunning).is_ok();
                        prop_assert!(ran);
                    } else {
                        let decided = r.apply(Event::RollbackDecided { reason: "x".into() }).is_ok();
                        prop_assert!(decided);
                    }
                }
                Action::ResumeSource { new_tokens } => {
                    if past_intent {
                        prop_assert!(new_tokens, "source resumed with its own disks after the fence intent");
                        let Phase::RollingBack { epoch, .. } = r.phase else {
                            return Err(TestCaseError::fail("resume past the intent outside a rollback"));
                        };
                        prop_assert_eq!(tokens.clone(), Some((epoch, SRC.to_owned())));
                        prop_assert!(fenced_epochs.iter().all(|e| *e <= epoch));
                    } else {
                        prop_assert!(!new_tokens);
                    }
                }
                Action::CancelSourceMigration => {
                    prop_assert!(!past_intent, "cancel (resumes with old disks) after the fence intent");
                }
                Action::StartSourceMigration => {
                    prop_assert_eq!(&r.phase, &Phase::Planned);
                    let started = r.apply(Event::Started).is_ok();
                    prop_assert!(started);
                }
                Action::Done => prop_assert!(r.phase.is_terminal()),
                Action::Wait { .. } | Action::AbortSourceMigration
                | Action::DiscardTarget | Action::DiscardSource => {}
                Action::StartMirror { .. } | Action::MirrorWriteBlocking | Action::ReleaseHold
                | Action::CompleteMirror | Action::DropLeftoverCopy => {
                    prop_assert!(false, "disk-move step {:?} on shared storage", action);
                }
            }
        }
    }

    /// A simulated world that misbehaves for a while (agents crash or fail, the
    /// target dies, fences fail or lose their reply, the operator cancels, the
    /// coordinator restarts) and then answers: every migration ends committed,
    /// cancelled or rolled back, with exactly one running copy, on the host that
    /// holds the lease.
    #[test]
    fn every_migration_ends_with_one_copy_holding_the_lease(
        chaos in proptest::collection::vec((0u8..10, 0u8..3), 0..25),
        cancel_at in proptest::option::of(0usize..40),
    ) {
        let mut w = World::new();
        let mut r = rec();
        let mut chaos = chaos.into_iter();
        for step in 0..400 {
            if Some(step) == cancel_at && w.cancel == CancelRequest::None {
                w.cancel = CancelRequest::Requested;
            }
            let (kind, outcome) = chaos.next().unwrap_or((0, 0));
            w.disturb(kind);
            let o = w.observe();
            let a = next_action(&r, &o);
            if a == Action::Done {
                prop_assert!(r.phase.is_terminal());
                let running: Vec<&str> = [(SRC, w.source), (DST, w.target)]
                    .iter()
                    .filter(|(_, p)| *p == V::Running)
                    .map(|(h, _)| *h)
                    .collect();
                prop_assert_eq!(running.len(), 1, "{:?} {:?}", r.phase, w);
                prop_assert_eq!(running[0], w.storage.1.as_str(), "{:?} {:?}", r.phase, w);
                match r.phase {
                    Phase::Committed { .. } => prop_assert_eq!(running[0], DST),
                    _ => prop_assert_eq!(running[0], SRC),
                }
                return Ok(());
            }
            w.act(&mut r, &a, outcome);
        }
        prop_assert!(false, "no end after 400 steps: {:?} {:?}", r.phase, w);
    }
}

/// A toy cluster for the liveness property.
#[derive(Debug)]
struct World {
    source: VmPresence,
    target: VmPresence,
    migration: SourceMigration,
    storage: (u64, String),
    tokens: Option<(u64, String)>,
    cancel: CancelRequest,
    target_dead: bool,
}

impl World {
    fn new() -> Self {
        World {
            source: V::Running,
            target: V::Absent,
            migration: S::NotStarted,
            storage: (4, SRC.into()),
            tokens: Some((4, SRC.into())),
            cancel: CancelRequest::None,
            target_dead: false,
        }
    }

    fn observe(&self) -> Observation {
        Observation {
            source: self.source,
            target: self.target,
            source_migration: self.migration.clone(),
            storage_epoch: self.storage.0,
            storage_holder: Some(self.storage.1.clone()),
            tokens: self.tokens.clone(),
            cancel: self.cancel,
            disk_move: None,
        }
    }

    /// One random misfortune (0-2 nothing, so the world also makes progress).
    fn disturb(&mut self, kind: u8) {
        match kind {
            3 if self.migration == S::Active => self.migration = S::Quiesced,
            4 if self.migration == S::Active => {
                // The agent's migration failed while the guest ran.
                self.migration = S::Failed("stream".into());
                self.source = V::Running;
                self.target = V::Absent;
            }
            5 if self.target == V::InMigration => {
                self.target_dead = true;
            }
            6 if self.migration == S::Quiesced && self.target_dead => {
                // Switchover timeout: the source stays paused.
                self.migration = S::Failed("switchover_timeout".into());
                self.source = V::Paused;
                self.target = V::Absent;
            }
            // The coordinator restarted: a cancel sent is not remembered.
            7 if self.cancel == CancelRequest::Sent => self.cancel = CancelRequest::None,
            _ => {
                if self.migration == S::Active {
                    self.migration = S::Quiesced;
                }
            }
        }
    }

    fn act(&mut self, r: &mut MigrationRecord, a: &Action, outcome: u8) {
        match a {
            Action::Wait { .. } | Action::Done => {}
            Action::StartSourceMigration => {
                self.migration = S::Active;
                self.source = V::InMigration;
                self.target = V::InMigration;
                self.target_dead = false;
                r.apply(Event::Started).unwrap();
            }
            Action::CancelSourceMigration => {
                self.cancel = CancelRequest::Sent;
                if matches!(self.migration, S::Active | S::Quiesced) {
                    self.migration = S::Cancelled;
                    self.source = V::Running;
                    self.target = V::Absent;
                }
            }
            Action::AbortSourceMigration => {
                if self.migration == S::Quiesced {
                    self.migration = S::Failed("aborted".into());
                    self.source = V::Paused;
                }
            }
            Action::Journal(ev) => {
                r.apply(ev.clone()).unwrap();
            }
            Action::Fence { to, epoch } => {
                match to {
                    Side::Target => r.apply(Event::FenceIntent { epoch: *epoch }).unwrap(),
                    Side::Source => r.apply(Event::RollbackIntent { epoch: *epoch }).unwrap(),
                };
                let holder = if *to == Side::Target { DST } else { SRC };
                if outcome < 2 {
                    self.storage = (*epoch, holder.into());
                }
                if outcome == 0 {
                    self.tokens = Some((*epoch, holder.into()));
                    if *to == Side::Target {
                        r.apply(Event::FenceConfirmed).unwrap();
                    }
                } else if *to == Side::Target && outcome == 2 {
                    // The executor decides a rollback when the fence call fails.
                    r.apply(Event::RollbackDecided {
                        reason: "fence failed".into(),
                    })
                    .unwrap();
                }
            }
            Action::GoAhead => {
                let ok = !self.target_dead && self.cancel == CancelRequest::None;
                if ok {
                    self.target = V::Running;
                    self.source = V::Absent;
                    self.migration = S::Completed;
                    r.apply(Event::TargetRunning).unwrap();
                } else {
                    if self.cancel == CancelRequest::None {
                        self.migration = S::Failed("target gone".into());
                        self.source = V::Paused;
                        self.target = V::Absent;
                    }
                    r.apply(Event::RollbackDecided {
                        reason: "go-ahead".into(),
                    })
                    .unwrap();
                }
            }
            Action::DiscardTarget => self.target = V::Absent,
            Action::DiscardSource => self.source = V::Absent,
            Action::ResumeSource { .. } => self.source = V::Running,
            Action::StartMirror { .. }
            | Action::MirrorWriteBlocking
            | Action::ReleaseHold
            | Action::CompleteMirror
            | Action::DropLeftoverCopy => panic!("disk-move step {a:?} on shared storage"),
        }
    }
}

// ------------------------------------------------------------ geographic migration

const RETIRED: &str = "coord-retired";
const MIRROR: &str = "coord-mirror";

fn geo(mirror: MirrorJob) -> Option<DiskMove> {
    Some(DiskMove {
        mirror,
        write_blocking: false,
        held_for_disks: true,
        leftover: false,
    })
}

fn geo_obs(mirror: MirrorJob) -> Observation {
    Observation {
        disk_move: geo(mirror),
        ..obs()
    }
}

#[test]
fn geo_live_path_step_by_step() {
    let mut r = rec();
    // The disk first: a mirror under a new epoch, then memory once it is synced.
    assert_eq!(
        next_action(&r, &geo_obs(MirrorJob::NotStarted)),
        Action::StartMirror { epoch: 5 }
    );
    r.apply(Event::MirrorIntent { epoch: 5 }).unwrap();
    let copying = Observation {
        storage_epoch: 5,
        storage_holder: Some(MIRROR.into()),
        ..geo_obs(MirrorJob::Copying)
    };
    assert_eq!(next_action(&r, &copying), Action::Wait { fast: false });
    let synced = Observation {
        disk_move: geo(MirrorJob::Synced),
        ..copying.clone()
    };
    assert_eq!(next_action(&r, &synced), Action::StartSourceMigration);
    r.apply(Event::Started).unwrap();
    // Memory moves: the mirror blocks writes, then the hold is lifted.
    let mut moving_geo = Observation {
        disk_move: geo(MirrorJob::Synced),
        ..moving()
    };
    assert_eq!(next_action(&r, &moving_geo), Action::MirrorWriteBlocking);
    if let Some(d) = moving_geo.disk_move.as_mut() {
        d.write_blocking = true;
    }
    assert_eq!(next_action(&r, &moving_geo), Action::ReleaseHold);
    if let Some(d) = moving_geo.disk_move.as_mut() {
        d.held_for_disks = false;
    }
    assert_eq!(next_action(&r, &moving_geo), Action::Wait { fast: true });
    let mut q = Observation {
        source_migration: S::Quiesced,
        storage_epoch: 5,
        storage_holder: Some(MIRROR.into()),
        ..moving_geo
    };
    assert_eq!(next_action(&r, &q), Action::Journal(Event::SourceQuiesced));
    r.apply(Event::SourceQuiesced).unwrap();
    // The last dirty blocks before the fence.
    assert_eq!(next_action(&r, &q), Action::CompleteMirror);
    if let Some(d) = q.disk_move.as_mut() {
        d.mirror = MirrorJob::Completed;
    }
    // Above the mirror's epoch.
    assert_eq!(
        next_action(&r, &q),
        Action::Fence {
            to: Side::Target,
            epoch: 6
        }
    );
    r.apply(Event::FenceIntent { epoch: 6 }).unwrap();
    r.apply(Event::FenceConfirmed).unwrap();
    let fenced_obs = Observation {
        storage_epoch: 6,
        storage_holder: Some(DST.into()),
        tokens: Some((6, DST.into())),
        ..q
    };
    assert_eq!(next_action(&r, &fenced_obs), Action::GoAhead);
    let running = Observation {
        source: V::Paused,
        target: V::Running,
        source_migration: S::Completed,
        ..fenced_obs
    };
    assert_eq!(
        next_action(&r, &running),
        Action::Journal(Event::TargetRunning)
    );
    r.apply(Event::TargetRunning).unwrap();
    r.apply(Event::Commit { epoch: 6 }).unwrap();
    assert_eq!(next_action(&r, &running), Action::DiscardSource);
    let mut gone = Observation {
        source: V::Absent,
        ..running
    };
    if let Some(d) = gone.disk_move.as_mut() {
        d.leftover = true;
    }
    // The retired source copy goes once the commit is journaled.
    assert_eq!(next_action(&r, &gone), Action::DropLeftoverCopy);
    if let Some(d) = gone.disk_move.as_mut() {
        d.leftover = false;
    }
    assert_eq!(next_action(&r, &gone), Action::Done);
}

#[test]
fn geo_mirror_restarted_burns_its_epoch() {
    // The coordinator died after the intent, before it recorded a job: a new intent.
    let r = at(&[Event::MirrorIntent { epoch: 5 }]);
    let o = Observation {
        storage_epoch: 5,
        storage_holder: Some(MIRROR.into()),
        ..geo_obs(MirrorJob::NotStarted)
    };
    assert_eq!(next_action(&r, &o), Action::StartMirror { epoch: 6 });
    // Silent node: wait.
    assert_eq!(
        next_action(&r, &geo_obs(MirrorJob::Unknown)),
        Action::Wait { fast: false }
    );
}

#[test]
fn geo_failures_before_the_fence_keep_the_source_and_drop_the_copy() {
    let failed = MirrorJob::Failed("EPERM".into());
    // While mirroring: the VM never stopped; cancel.
    let r = at(&[Event::MirrorIntent { epoch: 5 }]);
    assert!(matches!(
        next_action(&r, &geo_obs(failed.clone())),
        Action::Journal(Event::Abort { .. })
    ));
    let cancel = Observation {
        cancel: CancelRequest::Requested,
        ..geo_obs(MirrorJob::Copying)
    };
    assert!(matches!(
        next_action(&r, &cancel),
        Action::Journal(Event::Abort { .. })
    ));
    // While memory moves, and at the quiesce: the agent migration is cancelled (the
    // source resumes with its own disks).
    let o = Observation {
        disk_move: geo(failed.clone()),
        ..moving()
    };
    assert_eq!(
        next_action(&at(&precopy()), &o),
        Action::CancelSourceMigration
    );
    let q = Observation {
        disk_move: geo(failed.clone()),
        ..quiesced()
    };
    assert_eq!(
        next_action(&at(&quiesced_phase()), &q),
        Action::CancelSourceMigration
    );
    let ended = Observation {
        source: V::Running,
        target: V::Absent,
        source_migration: S::Cancelled,
        disk_move: geo(failed),
        ..obs()
    };
    match next_action(&at(&precopy()), &ended) {
        Action::Journal(Event::Abort { reason }) => {
            assert!(reason.contains("mirror"), "{reason}")
        }
        a => panic!("{a:?}"),
    }
    // Terminal: the half-made copy is deleted once no target copy is left.
    let mut r = at(&precopy());
    r.apply(Event::Abort { reason: "x".into() }).unwrap();
    let left = Observation {
        target: V::Paused,
        disk_move: Some(DiskMove {
            leftover: true,
            ..geo(MirrorJob::Unknown).unwrap()
        }),
        ..obs()
    };
    assert_eq!(next_action(&r, &left), Action::DiscardTarget);
    let left = Observation {
        target: V::Absent,
        ..left
    };
    assert_eq!(next_action(&r, &left), Action::DropLeftoverCopy);
}

#[test]
fn geo_operator_hold_is_not_lifted_for_the_disk() {
    let o = Observation {
        disk_move: Some(DiskMove {
            mirror: MirrorJob::Synced,
            write_blocking: true,
            held_for_disks: false,
            leftover: false,
        }),
        ..moving()
    };
    assert_eq!(
        next_action(&at(&precopy()), &o),
        Action::Wait { fast: true }
    );
}

/// A toy two-site cluster for the disk-move liveness property: the agents behave as in
/// [`World`] (which it wraps), and each site's storage holds one copy of the disk with
/// its own lease.
#[derive(Debug)]
struct GeoWorld {
    base: World,
    /// The source copy's lease (None once deleted) and the tokens the VM record holds.
    src_copy: Option<(u64, String)>,
    src_tokens: Option<(u64, String)>,
    /// The target site's copy (None until created / once deleted) and its tokens.
    replica: Option<(u64, String)>,
    replica_tokens: Option<(u64, String)>,
    mirror: MirrorJob,
    write_blocking: bool,
    held: bool,
}

impl GeoWorld {
    fn new() -> Self {
        GeoWorld {
            base: World::new(),
            src_copy: Some((4, SRC.into())),
            src_tokens: Some((4, SRC.into())),
            replica: None,
            replica_tokens: None,
            mirror: MirrorJob::NotStarted,
            write_blocking: false,
            held: true,
        }
    }

    fn observe(&self, r: &MigrationRecord) -> Observation {
        // As the executor computes it: the highest epoch, the target's copy at a tie.
        let (storage_epoch, storage_holder) = match (&self.src_copy, &self.replica) {
            (Some(s), Some(t)) if t.0 >= s.0 => (t.0, Some(t.1.clone())),
            (Some(s), _) => (s.0, Some(s.1.clone())),
            (None, Some(t)) => (t.0, Some(t.1.clone())),
            (None, None) => (0, None),
        };
        let leftover = match r.phase {
            Phase::Committed { .. } => self.src_copy.is_some(),
            Phase::Cancelled { .. } | Phase::RolledBack { .. } => self.replica.is_some(),
            _ => false,
        };
        Observation {
            storage_epoch,
            storage_holder,
            tokens: self.src_tokens.clone().or(self.replica_tokens.clone()),
            disk_move: Some(DiskMove {
                mirror: self.mirror.clone(),
                write_blocking: self.write_blocking,
                held_for_disks: self.held,
                leftover,
            }),
            ..self.base.observe()
        }
    }

    fn disturb(&mut self, kind: u8) {
        match kind {
            // The mirror's target refused writes (or its node restarted).
            8 if matches!(self.mirror, MirrorJob::Copying | MirrorJob::Synced) => {
                self.mirror = MirrorJob::Failed("EPERM".into())
            }
            9 if matches!(self.mirror, MirrorJob::Copying | MirrorJob::Synced) => {
                self.mirror = MirrorJob::Unknown
            }
            3..=7 => self.base.disturb(kind),
            _ => {
                if matches!(self.mirror, MirrorJob::Copying | MirrorJob::Unknown) {
                    self.mirror = MirrorJob::Synced;
                }
                // A held switchover waits; the driver lifts the hold.
                if !self.held {
                    self.base.disturb(kind);
                }
            }
        }
    }

    fn act(&mut self, r: &mut MigrationRecord, a: &Action, outcome: u8) {
        match a {
            Action::StartMirror { epoch } => {
                r.apply(Event::MirrorIntent { epoch: *epoch }).unwrap();
                match outcome {
                    0 => {
                        self.replica = Some((*epoch, MIRROR.into()));
                        self.mirror = MirrorJob::Copying;
                    }
                    // Leased, but the job id was not recorded.
                    1 => {
                        self.replica = Some((*epoch, MIRROR.into()));
                        self.mirror = MirrorJob::NotStarted;
                    }
                    _ => self.mirror = MirrorJob::Failed("refused".into()),
                }
            }
            Action::MirrorWriteBlocking => self.write_blocking = true,
            Action::ReleaseHold => self.held = false,
            Action::CompleteMirror => {
                self.mirror = match outcome {
                    0 | 1 => MirrorJob::Completed,
                    _ => MirrorJob::Failed("drain".into()),
                }
            }
            Action::Fence { to, epoch } => {
                match to {
                    Side::Target => r.apply(Event::FenceIntent { epoch: *epoch }).unwrap(),
                    Side::Source => r.apply(Event::RollbackIntent { epoch: *epoch }).unwrap(),
                };
                if outcome < 2 {
                    match to {
                        Side::Target => {
                            self.src_copy = Some((*epoch, RETIRED.into()));
                            self.src_tokens = None;
                            self.replica = Some((*epoch, DST.into()));
                        }
                        Side::Source => self.src_copy = Some((*epoch, SRC.into())),
                    }
                }
                if outcome == 0 {
                    match to {
                        Side::Target => {
                            self.replica_tokens = Some((*epoch, DST.into()));
                            r.apply(Event::FenceConfirmed).unwrap();
                        }
                        Side::Source => self.src_tokens = Some((*epoch, SRC.into())),
                    }
                } else if *to == Side::Target && outcome == 2 {
                    r.apply(Event::RollbackDecided {
                        reason: "fence failed".into(),
                    })
                    .unwrap();
                }
            }
            Action::DropLeftoverCopy => match r.phase {
                Phase::Committed { .. } => self.src_copy = None,
                _ => {
                    self.replica = None;
                    self.replica_tokens = None;
                    self.mirror = MirrorJob::NotStarted;
                }
            },
            // The agents' side is the shared-storage world's.
            _ => self.base.act(r, a, outcome),
        }
    }
}

proptest! {
    /// The disk-move world misbehaves for a while (mirror failures and silent nodes as
    /// well as everything the shared-storage world does) and then answers: every
    /// migration ends with exactly one running copy, whose host holds the lease on
    /// the copy of the disk it uses, and only that copy is left.
    #[test]
    fn every_geo_migration_ends_with_one_copy_holding_the_lease_on_its_disk(
        chaos in proptest::collection::vec((0u8..10, 0u8..3), 0..25),
        cancel_at in proptest::option::of(0usize..40),
    ) {
        let mut w = GeoWorld::new();
        let mut r = rec();
        let mut chaos = chaos.into_iter();
        let mut fenced: Vec<u64> = Vec::new();
        for step in 0..400 {
            if Some(step) == cancel_at && w.base.cancel == CancelRequest::None {
                w.base.cancel = CancelRequest::Requested;
            }
            let (kind, outcome) = chaos.next().unwrap_or((0, 0));
            w.disturb(kind);
            let o = w.observe(&r);
            let a = next_action(&r, &o);
            if let Action::Fence { epoch, .. } | Action::StartMirror { epoch } = a {
                prop_assert!(!fenced.contains(&epoch), "epoch {} handed out twice", epoch);
                fenced.push(epoch);
            }
            if a == Action::Done {
                prop_assert!(r.phase.is_terminal());
                let running: Vec<&str> = [(SRC, w.base.source), (DST, w.base.target)]
                    .iter()
                    .filter(|(_, p)| *p == V::Running)
                    .map(|(h, _)| *h)
                    .collect();
                prop_assert_eq!(running.len(), 1, "{:?} {:?}", r.phase, w);
                match r.phase {
                    Phase::Committed { .. } => {
                        prop_assert_eq!(running[0], DST);
                        prop_assert_eq!(w.replica.as_ref().map(|l| l.1.as_str()), Some(DST), "{:?}", w);
                        prop_assert!(w.src_copy.is_none(), "old copy left: {:?}", w);
                    }
                    _ => {
                        prop_assert_eq!(running[0], SRC);
                        prop_assert_eq!(w.src_copy.as_ref().map(|l| l.1.as_str()), Some(SRC), "{:?}", w);
                        prop_assert!(w.replica.is_none(), "half-made copy left: {:?}", w);
                    }
                }
                return Ok(());
            }
            w.act(&mut r, &a, outcome);
        }
        prop_assert!(false, "no end after 400 steps: {:?} {:?}", r.phase, w);
    }
}
