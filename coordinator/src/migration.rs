//! The coordinator's migration state machine, pure (no I/O), and its crash recovery.
//!
//! A shared-storage migration moves through these phases; each is journaled (synced to
//! the store) *before* the coordinator acts on it, so a coordinator killed anywhere
//! can tell from its journal what may already have happened:
//!
//! ```text
//!  Planned --start--> Precopy --source quiesced--> Quiesced --fence intent--> Fencing{e}
//!     |                  |                            |                        |
//!     +-----cancel/error-+----------------------------+              fence ok  |  fence refused,
//!                        v                                                     v  error or cancel
//!                    Cancelled  (source resumes; nothing else changed)     Fenced{e} ---+
//!                                                                              |        |
//!                                            go-ahead sent, target runs       |        | target died,
//!                                                                              v        v stream cut
//!                                                                  TargetRunning{e}  RollingBack{e'}
//!                                                                        |              |
//!                                                                 commit v              v source fenced
//!                                                                  Committed{e}     RolledBack{e'}  at e' > e
//! ```
//!
//! In the agents' coordinated switchover mode the source pauses and quiesces its disks
//! (`Quiesced`) and waits for the coordinator's go-ahead; only then does the
//! coordinator fence the disks to the target and hand the target the new lease
//! tokens. A source that quiesced never resumes on its own: before the fence intent
//! the coordinator cancels (the source resumes with its disks); after it, the source
//! runs again only once the disks were fenced back to it under a newer epoch.
//!
//! Invariants (checked by the tests below):
//! - Epochs handed out only grow; an epoch once journaled in a `Fencing` or
//!   `RollingBack` intent is never handed out again, even if the call may not have
//!   reached the storage node.
//! - Before a fence intent is journaled, every failure path ends in `Cancelled` with
//!   the source running under its original epoch.
//! - After a fence intent, the source only runs again under a newer epoch.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Planned,
    Precopy,
    Quiesced,
    /// Intent: fence the VM's disks to the target at `epoch`. Journaled before the call.
    Fencing {
        epoch: u64,
    },
    /// The storage node confirmed `epoch` for the target.
    Fenced {
        epoch: u64,
    },
    TargetRunning {
        epoch: u64,
    },
    Committed {
        epoch: u64,
    },
    /// Intent: give the disks back to the source at `epoch` (newer than any handed out).
    RollingBack {
        epoch: u64,
        reason: String,
    },
    RolledBack {
        epoch: u64,
        reason: String,
    },
    Cancelled {
        reason: String,
    },
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Committed { .. } | Phase::RolledBack { .. } | Phase::Cancelled { .. }
        )
    }

    /// Short name for tables, metrics and fail points.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Precopy => "precopy",
            Phase::Quiesced => "quiesced",
            Phase::Fencing { .. } => "fencing",
            Phase::Fenced { .. } => "fenced",
            Phase::TargetRunning { .. } => "target_running",
            Phase::Committed { .. } => "committed",
            Phase::RollingBack { .. } => "rolling_back",
            Phase::RolledBack { .. } => "rolled_back",
            Phase::Cancelled { .. } => "cancelled",
        }
    }

    /// True once the disks may have been handed to the target: from here on the source
    /// may run again only under a newer epoch.
    pub fn past_fence_intent(&self) -> bool {
        matches!(
            self,
            Phase::Fencing { .. }
                | Phase::Fenced { .. }
                | Phase::TargetRunning { .. }
                | Phase::Committed { .. }
                | Phase::RollingBack { .. }
                | Phase::RolledBack { .. }
        )
    }
}

/// What happened, as the orchestrator (or recovery) observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started,
    /// The source paused and drained its disk I/O; it waits for the go-ahead.
    SourceQuiesced,
    /// The coordinator decided to hand the disks over (journaled before the fence call).
    FenceIntent,
    FenceConfirmed,
    TargetRunning,
    Commit,
    /// Something failed or the operator cancelled.
    Abort {
        reason: String,
    },
    /// The storage node confirmed the rollback fence.
    RollbackConfirmed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("event {event} is not valid in phase {phase}")]
    Invalid { phase: &'static str, event: String },
}

/// The journaled record of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub vm: String,
    pub from_host: String,
    pub to_host: String,
    /// The disk epoch the source held when the migration was planned.
    pub source_epoch: u64,
    /// Highest epoch ever journaled for this VM's disks (never handed out twice).
    pub highest_epoch: u64,
    pub phase: Phase,
}

impl MigrationRecord {
    pub fn new(id: &str, vm: &str, from: &str, to: &str, source_epoch: u64) -> Self {
        Self {
            id: id.to_owned(),
            vm: vm.to_owned(),
            from_host: from.to_owned(),
            to_host: to.to_owned(),
            source_epoch,
            highest_epoch: source_epoch,
            phase: Phase::Planned,
        }
    }

    /// The next epoch to hand out: above everything journaled and everything the storage
    /// node reports (`observed`), so an epoch is never reused even when a call's outcome
    /// is unknown.
    pub fn next_epoch(&self, observed: u64) -> u64 {
        self.highest_epoch.max(observed) + 1
    }

    /// Applies an event, returning the new phase to journal. `observed_epoch` is the
    /// storage node's current epoch where the caller knows it (else 0).
    pub fn apply(&mut self, event: Event, observed_epoch: u64) -> Result<&Phase, TransitionError> {
        let invalid = |phase: &Phase, event: &Event| TransitionError::Invalid {
            phase: phase.name(),
            event: format!("{event:?}"),
        };
        let next = match (&self.phase, &event) {
            (Phase::Planned, Event::Started) => Phase::Precopy,
            (Phase::Precopy, Event::SourceQuiesced) => Phase::Quiesced,
            (Phase::Quiesced, Event::FenceIntent) => {
                let epoch = self.next_epoch(observed_epoch);
                Phase::Fencing { epoch }
            }
            (Phase::Fencing { epoch }, Event::FenceConfirmed) => Phase::Fenced { epoch: *epoch },
            (Phase::Fenced { epoch }, Event::TargetRunning) => {
                Phase::TargetRunning { epoch: *epoch }
            }
            (Phase::TargetRunning { epoch }, Event::Commit) => Phase::Committed { epoch: *epoch },
            (Phase::Planned | Phase::Precopy | Phase::Quiesced, Event::Abort { reason }) => {
                Phase::Cancelled {
                    reason: reason.clone(),
                }
            }
            (Phase::Fencing { .. } | Phase::Fenced { .. }, Event::Abort { reason }) => {
                let epoch = self.next_epoch(observed_epoch);
                Phase::RollingBack {
                    epoch,
                    reason: reason.clone(),
                }
            }
            (Phase::RollingBack { epoch, reason }, Event::RollbackConfirmed) => Phase::RolledBack {
                epoch: *epoch,
                reason: reason.clone(),
            },
            (phase, event) => return Err(invalid(phase, event)),
        };
        if let Phase::Fencing { epoch } | Phase::RollingBack { epoch, .. } = next {
            self.highest_epoch = self.highest_epoch.max(epoch);
        }
        self.phase = next;
        Ok(&self.phase)
    }
}

/// What recovery sees when it asks the world after a coordinator restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPresence {
    Running,
    Paused,
    /// Incoming or migrating: a migration stream is (or was) attached.
    InMigration,
    Absent,
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub source: VmPresence,
    pub target: VmPresence,
    /// The source agent's migration is `quiesced`: the guest is paused with its disk
    /// I/O drained, and the agent waits for the go-ahead (or a cancel) for ever.
    pub source_quiesced: bool,
    /// The storage node's current epoch and holder for the VM's disk.
    pub storage_epoch: u64,
    pub storage_holder: Option<String>,
}

/// The steps recovery takes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryAction {
    /// The agents are still moving the guest (or do not answer): look again later.
    Wait,
    /// Cancel the source agent's quiesced migration: it resumes the guest with its
    /// current disks. Only valid while the source still owns them (no fence intent).
    CancelSource,
    /// Resume the source's paused VM; with the new tokens when a `FenceToSource`
    /// came before it in the plan, else with its current disks.
    ResumeSource,
    /// Fence the disks to the source at `epoch` and hand the source the new token.
    FenceToSource { epoch: u64 },
    /// Stop and delete the target's copy (it never ran, or must not).
    DiscardTarget,
    /// Fence the disks to the target at `epoch`.
    FenceToTarget { epoch: u64 },
    /// Send the quiesced source the go-ahead with the target's new disk URIs (from the
    /// `FenceToTarget` before it) and wait until the target runs.
    Switchover,
    /// Delete the source's paused copy: the target runs and holds the lease.
    DiscardSource,
    /// Journal the final phase.
    Finish(Phase),
}

/// Decides how to reach exactly one running copy whose host holds the disk lease.
pub fn plan_recovery(rec: &MigrationRecord, obs: &Observation) -> Vec<RecoveryAction> {
    use RecoveryAction::*;
    if rec.phase.is_terminal() {
        return match &rec.phase {
            // A terminal phase was journaled, but the cleanup after it may not have run.
            Phase::Committed { .. } if obs.source != VmPresence::Absent => vec![DiscardSource],
            Phase::Cancelled { .. } | Phase::RolledBack { .. }
                if obs.target != VmPresence::Absent =>
            {
                vec![DiscardTarget]
            }
            _ => vec![],
        };
    }
    if obs.source_quiesced && obs.source != VmPresence::Unreachable {
        // The source waits for us. Before a fence intent it still owns its disks: a
        // cancel resumes it. After one, the disks may already be the target's: finish
        // the handover under a fresh epoch (the target verified the memory and waits
        // for its tokens), unless a rollback was already decided - then the source's
        // switchover timeout fails the migration and the rollback goes on from there.
        return match &rec.phase {
            Phase::Planned | Phase::Precopy | Phase::Quiesced => vec![
                CancelSource,
                Finish(Phase::Cancelled {
                    reason: "coordinator restarted before the disk handover".to_owned(),
                }),
            ],
            Phase::RollingBack { .. } => vec![Wait],
            _ => {
                let epoch = rec.next_epoch(obs.storage_epoch);
                vec![
                    FenceToTarget { epoch },
                    Switchover,
                    Finish(Phase::Committed { epoch }),
                ]
            }
        };
    }
    // An agent-to-agent migration outlives the coordinator: let it end first.
    if [obs.source, obs.target]
        .iter()
        .any(|p| matches!(p, VmPresence::Unreachable | VmPresence::InMigration))
    {
        return vec![Wait];
    }
    let fence_happened = obs.storage_epoch > rec.source_epoch;
    let target_holds = obs.storage_holder.as_deref() == Some(rec.to_host.as_str());
    // Roll forward only when the target already runs under its lease: its memory was
    // verified before it resumed, and the source is paused.
    if fence_happened && target_holds && obs.target == VmPresence::Running {
        let epoch = obs.storage_epoch;
        return vec![DiscardSource, Finish(Phase::Committed { epoch })];
    }
    // The target runs and the source has no copy left (the agents finished without the
    // coordinator, e.g. an auto-mode migration): the running copy must get the lease,
    // under an epoch above anything handed out, whatever phase was journaled.
    // Discarding it would lose the guest.
    // (When the fence already landed, the roll-forward rule above has answered.)
    if obs.target == VmPresence::Running && obs.source == VmPresence::Absent {
        let epoch = rec.next_epoch(obs.storage_epoch);
        return vec![FenceToTarget { epoch }, Finish(Phase::Committed { epoch })];
    }
    // Before a fence intent was journaled no fence call can have been made: the source
    // still owns its disks under its original epoch.
    if !rec.phase.past_fence_intent() {
        return vec![
            DiscardTarget,
            ResumeSource,
            Finish(Phase::Cancelled {
                reason: "coordinator restarted before the switchover".to_owned(),
            }),
        ];
    }
    // The disks may belong to the target, which does not run: hand them back to the
    // source under a brand-new epoch, remove the target's copy, then resume the source.
    // This holds even when the storage node still shows the source's epoch: a fence
    // call the dead coordinator sent may yet be applied, so the old epoch is burnt.
    let epoch = match &rec.phase {
        Phase::RollingBack { epoch, .. } if *epoch > obs.storage_epoch => *epoch,
        _ => rec.next_epoch(obs.storage_epoch),
    };
    let reason = match &rec.phase {
        Phase::RollingBack { reason, .. } => reason.clone(),
        _ => "coordinator restarted after the fence; rolled back to the source".to_owned(),
    };
    vec![
        FenceToSource { epoch },
        DiscardTarget,
        ResumeSource,
        Finish(Phase::RolledBack { epoch, reason }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec() -> MigrationRecord {
        MigrationRecord::new("m1", "vm7", "kvm-a1", "kvm-b1", 4)
    }

    #[test]
    fn happy_path_hands_out_one_new_epoch() {
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        assert_eq!(r.apply(Event::SourceQuiesced, 4).unwrap(), &Phase::Quiesced);
        assert_eq!(
            r.apply(Event::FenceIntent, 4).unwrap(),
            &Phase::Fencing { epoch: 5 }
        );
        r.apply(Event::FenceConfirmed, 5).unwrap();
        r.apply(Event::TargetRunning, 5).unwrap();
        assert_eq!(
            r.apply(Event::Commit, 5).unwrap(),
            &Phase::Committed { epoch: 5 }
        );
        assert!(r.apply(Event::Commit, 5).is_err());
    }

    #[test]
    fn abort_after_fence_rolls_back_with_a_newer_epoch() {
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        r.apply(Event::SourceQuiesced, 4).unwrap();
        r.apply(Event::FenceIntent, 4).unwrap();
        let p = r
            .apply(
                Event::Abort {
                    reason: "target died".into(),
                },
                4,
            )
            .unwrap()
            .clone();
        assert_eq!(
            p,
            Phase::RollingBack {
                epoch: 6,
                reason: "target died".into()
            }
        );
    }

    #[test]
    fn out_of_order_events_are_refused() {
        let mut r = rec();
        assert!(r.apply(Event::FenceConfirmed, 4).is_err());
        assert!(r.apply(Event::TargetRunning, 4).is_err());
        assert_eq!(r.phase, Phase::Planned);
    }

    #[test]
    fn recovery_before_fence_resumes_source() {
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        let obs = Observation {
            source: VmPresence::Paused,
            target: VmPresence::Absent,
            source_quiesced: false,
            storage_epoch: 4,
            storage_holder: Some("kvm-a1".into()),
        };
        let plan = plan_recovery(&r, &obs);
        assert_eq!(plan[0], RecoveryAction::DiscardTarget);
        assert_eq!(plan[1], RecoveryAction::ResumeSource);
    }

    #[test]
    fn recovery_after_fence_intent_burns_the_epoch() {
        // Intent journaled; the storage node did apply it (epoch 5) but the target never
        // ran: roll back at 6, not 5.
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        r.apply(Event::SourceQuiesced, 4).unwrap();
        r.apply(Event::FenceIntent, 4).unwrap();
        let obs = Observation {
            source: VmPresence::Paused,
            target: VmPresence::Absent,
            source_quiesced: false,
            storage_epoch: 5,
            storage_holder: Some("kvm-b1".into()),
        };
        let plan = plan_recovery(&r, &obs);
        assert_eq!(plan[0], RecoveryAction::FenceToSource { epoch: 6 });
    }

    #[test]
    fn recovery_rolls_forward_when_target_runs_with_the_lease() {
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        r.apply(Event::SourceQuiesced, 4).unwrap();
        r.apply(Event::FenceIntent, 4).unwrap();
        r.apply(Event::FenceConfirmed, 5).unwrap();
        let obs = Observation {
            source: VmPresence::Paused,
            target: VmPresence::Running,
            source_quiesced: false,
            storage_epoch: 5,
            storage_holder: Some("kvm-b1".into()),
        };
        assert_eq!(
            plan_recovery(&r, &obs),
            vec![
                RecoveryAction::DiscardSource,
                RecoveryAction::Finish(Phase::Committed { epoch: 5 })
            ]
        );
    }

    #[test]
    fn recovery_fences_to_a_lone_running_target_at_any_phase() {
        // Journaled only Precopy, but the agents finished: the source copy is gone and
        // the target runs. Its disks must follow it, under a fresh epoch.
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        let obs = Observation {
            source: VmPresence::Absent,
            target: VmPresence::Running,
            source_quiesced: false,
            storage_epoch: 4,
            storage_holder: Some("kvm-a1".into()),
        };
        assert_eq!(
            plan_recovery(&r, &obs),
            vec![
                RecoveryAction::FenceToTarget { epoch: 5 },
                RecoveryAction::Finish(Phase::Committed { epoch: 5 })
            ]
        );
        // Fence intent at 5 journaled, storage never saw it: 5 is burnt, use 6.
        r.apply(Event::SourceQuiesced, 4).unwrap();
        r.apply(Event::FenceIntent, 4).unwrap();
        assert_eq!(
            plan_recovery(&r, &obs)[0],
            RecoveryAction::FenceToTarget { epoch: 6 }
        );
        // The fence landed before the crash: nothing to fence, just commit (discarding
        // an absent source is a no-op).
        let landed = Observation {
            storage_epoch: 5,
            storage_holder: Some("kvm-b1".into()),
            ..obs
        };
        assert_eq!(
            plan_recovery(&r, &landed),
            vec![
                RecoveryAction::DiscardSource,
                RecoveryAction::Finish(Phase::Committed { epoch: 5 })
            ]
        );
    }

    #[test]
    fn recovery_waits_while_the_agents_move_the_guest() {
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        let obs = Observation {
            source: VmPresence::InMigration,
            target: VmPresence::InMigration,
            source_quiesced: false,
            storage_epoch: 4,
            storage_holder: Some("kvm-a1".into()),
        };
        assert_eq!(plan_recovery(&r, &obs), vec![RecoveryAction::Wait]);
        let gone = Observation {
            target: VmPresence::Unreachable,
            source: VmPresence::Paused,
            ..obs
        };
        assert_eq!(plan_recovery(&r, &gone), vec![RecoveryAction::Wait]);
    }

    #[test]
    fn recovery_of_a_quiesced_source_cancels_before_the_fence_intent() {
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        let obs = Observation {
            source: VmPresence::InMigration,
            target: VmPresence::InMigration,
            source_quiesced: true,
            storage_epoch: 4,
            storage_holder: Some("kvm-a1".into()),
        };
        // Journaled Precopy (killed before journaling Quiesced) or Quiesced: the same.
        for journaled_quiesced in [false, true] {
            if journaled_quiesced {
                r.apply(Event::SourceQuiesced, 4).unwrap();
            }
            let plan = plan_recovery(&r, &obs);
            assert_eq!(plan[0], RecoveryAction::CancelSource);
            assert!(matches!(
                plan[1],
                RecoveryAction::Finish(Phase::Cancelled { .. })
            ));
        }
    }

    #[test]
    fn recovery_of_a_quiesced_source_hands_over_after_the_fence_intent() {
        // Fence intent at 5 journaled; maybe applied, maybe not: fence again at 6 and
        // send the go-ahead with the new token.
        let mut r = rec();
        r.apply(Event::Started, 4).unwrap();
        r.apply(Event::SourceQuiesced, 4).unwrap();
        r.apply(Event::FenceIntent, 4).unwrap();
        let obs = Observation {
            source: VmPresence::InMigration,
            target: VmPresence::InMigration,
            source_quiesced: true,
            storage_epoch: 5,
            storage_holder: Some("kvm-b1".into()),
        };
        assert_eq!(
            plan_recovery(&r, &obs),
            vec![
                RecoveryAction::FenceToTarget { epoch: 6 },
                RecoveryAction::Switchover,
                RecoveryAction::Finish(Phase::Committed { epoch: 6 })
            ]
        );
        // A rollback already decided waits for the source's switchover timeout.
        r.apply(Event::Abort { reason: "x".into() }, 5).unwrap();
        assert_eq!(plan_recovery(&r, &obs), vec![RecoveryAction::Wait]);
        // Then the source is paused and the rollback epoch is used.
        let failed = Observation {
            source: VmPresence::Paused,
            target: VmPresence::Absent,
            source_quiesced: false,
            ..obs
        };
        assert_eq!(
            plan_recovery(&r, &failed)[0],
            RecoveryAction::FenceToSource { epoch: 6 }
        );
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Started),
            Just(Event::SourceQuiesced),
            Just(Event::FenceIntent),
            Just(Event::FenceConfirmed),
            Just(Event::TargetRunning),
            Just(Event::Commit),
            Just(Event::Abort { reason: "x".into() }),
            Just(Event::RollbackConfirmed),
        ]
    }

    fn arb_presence() -> impl Strategy<Value = VmPresence> {
        prop_oneof![
            Just(VmPresence::Running),
            Just(VmPresence::Paused),
            Just(VmPresence::InMigration),
            Just(VmPresence::Absent),
        ]
    }

    proptest! {
        /// Epochs handed out never repeat and never go below what storage has seen, the
        /// source never runs again under its old epoch once a fence intent was journaled,
        /// and recovery never discards the only running copy.
        #[test]
        fn epochs_only_grow(
            events in proptest::collection::vec((arb_event(), 0u64..12), 0..20),
            source in arb_presence(),
            target in arb_presence(),
            source_quiesced in any::<bool>(),
        ) {
            let mut r = rec();
            let mut handed: Vec<u64> = vec![r.source_epoch];
            let mut storage = r.source_epoch;
            for (ev, bump) in events {
                // The storage node may have moved on by itself (another fence elsewhere).
                storage = storage.max(r.source_epoch + bump % 3);
                if r.apply(ev, storage).is_ok()
                    && let Phase::Fencing { epoch } | Phase::RollingBack { epoch, .. } = r.phase
                {
                    prop_assert!(!handed.contains(&epoch), "epoch {} reused", epoch);
                    prop_assert!(epoch > storage);
                    handed.push(epoch);
                }
                let obs = Observation {
                    source,
                    target,
                    source_quiesced,
                    storage_epoch: storage,
                    storage_holder: None,
                };
                let plan = plan_recovery(&r, &obs);
                let pos = |f: &dyn Fn(&RecoveryAction) -> bool| plan.iter().position(f);
                for action in &plan {
                    if let RecoveryAction::FenceToSource { epoch } | RecoveryAction::FenceToTarget { epoch } = action {
                        prop_assert!(*epoch > storage);
                        prop_assert!(*epoch > r.source_epoch);
                    }
                }
                if r.phase.past_fence_intent()
                    && !r.phase.is_terminal()
                    && let Some(resume) = pos(&|a| *a == RecoveryAction::ResumeSource)
                {
                    // Resuming after a fence intent requires a FenceToSource first.
                    let fence = pos(&|a| matches!(a, RecoveryAction::FenceToSource { .. }));
                    prop_assert!(matches!(fence, Some(f) if f < resume), "plan {:?}", plan);
                }
                if r.phase.past_fence_intent() {
                    // The source resumes with its own (possibly fenced) disks only before it.
                    prop_assert!(pos(&|a| *a == RecoveryAction::CancelSource).is_none(), "plan {:?}", plan);
                }
                if let Some(go) = pos(&|a| *a == RecoveryAction::Switchover) {
                    // The go-ahead carries tokens from a fence in the same plan.
                    let fence = pos(&|a| matches!(a, RecoveryAction::FenceToTarget { .. }));
                    prop_assert!(matches!(fence, Some(f) if f < go), "plan {:?}", plan);
                }
                if !r.phase.is_terminal() && target == VmPresence::Running && source == VmPresence::Absent && !source_quiesced {
                    prop_assert!(pos(&|a| *a == RecoveryAction::DiscardTarget).is_none(), "plan {:?} drops the only copy", plan);
                }
            }
        }
    }
}
