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
//! A geographic migration (no storage node in the target's reach holds the disk) adds
//! one phase before `Precopy`: `Mirroring{e}`, the intent to create the target site's
//! copy and lease it to a mirror job at epoch `e`, journaled before the calls. Pre-copy
//! starts once the mirror is synced; at the quiesce the mirror is completed and the
//! fence retires the source copy (fenced to no writer) while it fences the target
//! site's copy to the target host, both at the fence epoch. Epochs of both copies come
//! from the one counter below, so neither storage node ever sees one reused.
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
    /// Geographic migration (no storage in the target's reach holds the disk):
    /// intent to create the disk on a storage node of the target site, lease it to the
    /// mirror at `epoch` and start the mirror job; journaled before those calls. Stays
    /// the phase while the mirror copies; the memory pre-copy starts once it is synced.
    Mirroring {
        epoch: u64,
    },
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
            Phase::Mirroring { .. } => "mirroring",
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

/// What happened, as the executor observed it. Each event the record accepts yields
/// the phase to journal (see [`MigrationRecord::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Geographic migration: the coordinator creates the target site's copy and leases
    /// it to the mirror job at `epoch` (journaled before the calls; burnt whatever their
    /// outcome, like a fence intent).
    MirrorIntent {
        epoch: u64,
    },
    /// The source agent accepted the migration (its id is stored with the record).
    Started,
    /// The source paused and drained its disk I/O; it waits for the go-ahead.
    SourceQuiesced,
    /// The coordinator hands the disks to the target at `epoch` (journaled before the
    /// fence call; the epoch is burnt from then on, whatever the call's outcome).
    FenceIntent {
        epoch: u64,
    },
    /// The storage node confirmed the fence of the current `Fencing` intent.
    FenceConfirmed,
    TargetRunning,
    /// The target runs under the lease at `epoch`.
    Commit {
        epoch: u64,
    },
    /// Before the fence intent: something failed or the operator cancelled; the source
    /// keeps its disks.
    Abort {
        reason: String,
    },
    /// After the fence intent: the disks must go back to the source. Recorded (the
    /// phase stays) until the rollback fence is sent.
    RollbackDecided {
        reason: String,
    },
    /// The coordinator gives the disks back to the source at `epoch` (journaled before
    /// the fence call).
    RollbackIntent {
        epoch: u64,
    },
    /// The source runs again under the rollback epoch.
    RollbackConfirmed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("event {event} is not valid in phase {phase}")]
    Invalid { phase: &'static str, event: String },
    #[error("epoch {epoch} is not above {highest}, the highest ever journaled")]
    EpochReused { epoch: u64, highest: u64 },
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
    /// Set once a rollback was decided after the fence intent (the go-ahead failed,
    /// the operator cancelled): the next fence goes to the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
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
            rollback: None,
        }
    }

    /// The next epoch to hand out: above everything journaled and everything the storage
    /// node reports (`observed`), so an epoch is never reused even when a call's outcome
    /// is unknown.
    pub fn next_epoch(&self, observed: u64) -> u64 {
        self.highest_epoch.max(observed) + 1
    }

    /// Applies an event, returning the new phase to journal. Every transition of the
    /// migration is one arm of the match below.
    pub fn apply(&mut self, event: Event) -> Result<&Phase, TransitionError> {
        use Phase as P;
        let invalid = |phase: &Phase, event: &Event| TransitionError::Invalid {
            phase: phase.name(),
            event: format!("{event:?}"),
        };
        let fresh = |epoch: u64| {
            if epoch > self.highest_epoch {
                Ok(epoch)
            } else {
                Err(TransitionError::EpochReused {
                    epoch,
                    highest: self.highest_epoch,
                })
            }
        };
        let next = match (&self.phase, &event) {
            // Again from `Mirroring`: the last intent's outcome is unknown (a restart).
            (P::Planned | P::Mirroring { .. }, Event::MirrorIntent { epoch }) => P::Mirroring {
                epoch: fresh(*epoch)?,
            },
            (P::Planned | P::Mirroring { .. }, Event::Started) => P::Precopy,
            (P::Precopy, Event::SourceQuiesced) => P::Quiesced,
            // A new intent from a quiesced source, again after an intent whose outcome is
            // unknown, or to adopt a target that runs without the coordinator.
            // (From a rollback only to adopt a target that runs as the lone copy.)
            (
                P::Planned
                | P::Mirroring { .. }
                | P::Precopy
                | P::Quiesced
                | P::Fencing { .. }
                | P::Fenced { .. }
                | P::RollingBack { .. },
                Event::FenceIntent { epoch },
            ) => P::Fencing {
                epoch: fresh(*epoch)?,
            },
            (P::Fencing { epoch }, Event::FenceConfirmed) => P::Fenced { epoch: *epoch },
            (P::Fenced { epoch }, Event::TargetRunning) => P::TargetRunning { epoch: *epoch },
            // Roll forward: the target runs under the lease (the go-ahead's, or one it
            // got before a crash).
            (
                P::Fencing { .. } | P::Fenced { .. } | P::TargetRunning { .. },
                Event::Commit { epoch },
            ) => P::Committed { epoch: *epoch },
            (
                P::Planned | P::Mirroring { .. } | P::Precopy | P::Quiesced,
                Event::Abort { reason },
            ) => P::Cancelled {
                reason: reason.clone(),
            },
            (P::Fencing { .. } | P::Fenced { .. }, Event::RollbackDecided { reason }) => {
                if self.rollback.is_none() {
                    self.rollback = Some(reason.clone());
                }
                self.phase.clone()
            }
            (
                P::Fencing { .. } | P::Fenced { .. } | P::RollingBack { .. },
                Event::RollbackIntent { epoch },
            ) => {
                let reason = match (&self.phase, &self.rollback) {
                    (P::RollingBack { reason, .. }, _) => reason.clone(),
                    (_, Some(r)) => r.clone(),
                    (phase, None) => return Err(invalid(phase, &event)),
                };
                P::RollingBack {
                    epoch: fresh(*epoch)?,
                    reason,
                }
            }
            (P::RollingBack { epoch, reason }, Event::RollbackConfirmed) => P::RolledBack {
                epoch: *epoch,
                reason: reason.clone(),
            },
            (phase, event) => return Err(invalid(phase, event)),
        };
        if let P::Fencing { epoch } | P::RollingBack { epoch, .. } | P::Mirroring { epoch } = next {
            self.highest_epoch = self.highest_epoch.max(epoch);
        }
        if matches!(event, Event::FenceIntent { .. }) {
            // A fence to the target supersedes a decided rollback (the lone copy).
            self.rollback = None;
        }
        self.phase = next;
        Ok(&self.phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> MigrationRecord {
        MigrationRecord::new("m1", "vm7", "kvm-a1", "kvm-b1", 4)
    }

    #[test]
    fn happy_path_hands_out_one_new_epoch() {
        let mut r = rec();
        r.apply(Event::Started).unwrap();
        assert_eq!(r.apply(Event::SourceQuiesced).unwrap(), &Phase::Quiesced);
        assert_eq!(
            r.apply(Event::FenceIntent { epoch: 5 }).unwrap(),
            &Phase::Fencing { epoch: 5 }
        );
        r.apply(Event::FenceConfirmed).unwrap();
        r.apply(Event::TargetRunning).unwrap();
        assert_eq!(
            r.apply(Event::Commit { epoch: 5 }).unwrap(),
            &Phase::Committed { epoch: 5 }
        );
        assert!(r.apply(Event::Commit { epoch: 5 }).is_err());
    }

    #[test]
    fn an_epoch_is_never_journaled_twice() {
        let mut r = rec();
        r.apply(Event::Started).unwrap();
        r.apply(Event::SourceQuiesced).unwrap();
        assert!(matches!(
            r.apply(Event::FenceIntent { epoch: 4 }),
            Err(TransitionError::EpochReused { .. })
        ));
        r.apply(Event::FenceIntent { epoch: 5 }).unwrap();
        // The outcome of 5 is unknown: a new intent must use a newer epoch.
        assert!(r.apply(Event::FenceIntent { epoch: 5 }).is_err());
        r.apply(Event::FenceIntent { epoch: 6 }).unwrap();
        assert_eq!(r.highest_epoch, 6);
    }

    #[test]
    fn rollback_is_decided_then_fenced_under_a_newer_epoch() {
        let mut r = rec();
        r.apply(Event::Started).unwrap();
        r.apply(Event::SourceQuiesced).unwrap();
        r.apply(Event::FenceIntent { epoch: 5 }).unwrap();
        r.apply(Event::FenceConfirmed).unwrap();
        // No rollback intent without a decision.
        assert!(r.apply(Event::RollbackIntent { epoch: 6 }).is_err());
        r.apply(Event::RollbackDecided {
            reason: "target died".into(),
        })
        .unwrap();
        assert_eq!(r.phase, Phase::Fenced { epoch: 5 });
        assert_eq!(
            r.apply(Event::RollbackIntent { epoch: 6 }).unwrap(),
            &Phase::RollingBack {
                epoch: 6,
                reason: "target died".into()
            }
        );
        assert_eq!(
            r.apply(Event::RollbackConfirmed).unwrap(),
            &Phase::RolledBack {
                epoch: 6,
                reason: "target died".into()
            }
        );
    }

    #[test]
    fn mirroring_burns_its_epoch_and_leads_to_precopy_or_cancel() {
        let mut r = rec();
        assert_eq!(
            r.apply(Event::MirrorIntent { epoch: 5 }).unwrap(),
            &Phase::Mirroring { epoch: 5 }
        );
        assert!(r.apply(Event::MirrorIntent { epoch: 5 }).is_err());
        r.apply(Event::MirrorIntent { epoch: 6 }).unwrap();
        assert!(!r.phase.past_fence_intent());
        let mut cancelled = r.clone();
        cancelled
            .apply(Event::Abort { reason: "x".into() })
            .unwrap();
        assert!(cancelled.phase.is_terminal());
        r.apply(Event::Started).unwrap();
        r.apply(Event::SourceQuiesced).unwrap();
        // The fence epoch goes above the mirror's.
        assert!(r.apply(Event::FenceIntent { epoch: 6 }).is_err());
        r.apply(Event::FenceIntent { epoch: 7 }).unwrap();
        assert!(r.apply(Event::MirrorIntent { epoch: 8 }).is_err());
    }

    #[test]
    fn out_of_order_events_are_refused() {
        let mut r = rec();
        assert!(r.apply(Event::FenceConfirmed).is_err());
        assert!(r.apply(Event::TargetRunning).is_err());
        assert!(r.apply(Event::RollbackConfirmed).is_err());
        assert_eq!(r.phase, Phase::Planned);
        r.apply(Event::Abort { reason: "x".into() }).unwrap();
        assert!(r.phase.is_terminal());
        assert!(r.apply(Event::Started).is_err());
    }
}
