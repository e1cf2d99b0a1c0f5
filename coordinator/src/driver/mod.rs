//! The migration driver's decisions, pure: [`next_action`] maps the journaled record
//! and what the executor just observed to the one step to take next. The executor
//! (`service::executor`) runs it in a loop (observe, decide, act, journal) for a live
//! migration and, unchanged, for one a previous coordinator left unfinished: recovery
//! after a restart is the same function applied to the same record.
//!
//! Every rule is one arm below, in the order they are tried:
//!
//! | phase | observation | action |
//! |---|---|---|
//! | terminal | leftover VM copy, else leftover disk copy | discard it, else `Done` |
//! | any live | source agent silent | `Wait` |
//! | any live | target runs, storage shows it holding a newer epoch | journal `TargetRunning` / `Commit` (roll forward) |
//! | any live | target runs, source copy gone | fence to the target (adopt the lone copy) |
//! | planned | cancel | abort before the fence |
//! | planned, mirroring | disk move, no mirror job recorded | journal `MirrorIntent` at a new epoch, start the mirror |
//! | mirroring | mirror copying, or its node silent | `Wait` |
//! | mirroring | mirror failed | abort before the fence |
//! | mirroring | mirror synced | start the agent migration (held) |
//! | planned | no agent migration, source there | start the agent migration |
//! | precopy (disk move) | moving memory, mirror failed | cancel the agent migration |
//! | precopy (disk move) | moving memory, mirror not blocking | switch it to write-blocking |
//! | precopy (disk move) | moving memory, held for the disk only | release the hold |
//! | quiesced (disk move) | mirror not completed | complete it (failed: cancel the agent migration) |
//! | precopy | moving memory | `Wait` (fast), or send a requested cancel |
//! | precopy | quiesced | journal `Quiesced` |
//! | quiesced | quiesced | fence to the target at a new epoch |
//! | precopy, quiesced | failed, cancelled, forgotten | abort before the fence |
//! | fencing | source quiesced | fence again at a new epoch (the last one's outcome is unknown) |
//! | fenced | source quiesced, tokens for the target | go-ahead |
//! | fencing, fenced | cancel, migration failed | decide a rollback |
//! | fencing, fenced | rollback decided | end the source's wait, drop the target copy, fence to the source |
//! | rolling back | tokens for the source | drop the target copy, resume the source with them, journal `RolledBack` |
//! | rolling back | no tokens for the source | fence to the source at a new epoch |
//! | target running | - | journal `Commit` |
//!
//! Invariants (property-tested below): an epoch is fenced at most once; the source
//! never resumes with its old disks once a fence intent was journaled; the executor
//! never has to journal a transition the record refuses; and in a world that
//! eventually answers, every migration ends committed, cancelled or rolled back with
//! exactly one running copy whose host holds the lease.

use crate::migration::{Event, MigrationRecord, Phase};

/// A copy of the VM as one agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPresence {
    Running,
    Paused,
    /// Incoming or migrating: a migration stream is (or was) attached.
    InMigration,
    Absent,
    Unreachable,
}

impl VmPresence {
    /// The agent has a copy (in any state).
    pub fn present(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::InMigration)
    }
}

/// The source agent's migration, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceMigration {
    /// No agent migration is known: none was started (or its id was never journaled).
    NotStarted,
    /// Setting up, copying memory while the guest runs, or the final stop-and-copy.
    Active,
    /// Paused with its disks drained; waits for the go-ahead or a cancel, for ever.
    Quiesced,
    Completed,
    Failed(String),
    Cancelled,
    /// The agent does not know the migration (it restarted).
    Forgotten,
    /// The agent does not answer.
    Unknown,
}

/// Whether the operator asked to cancel, and whether the source agent was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRequest {
    None,
    Requested,
    /// The cancel went to the source agent; its migration ends shortly.
    Sent,
}

/// A geographic migration's mirror job(s), as the source's storage node reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorJob {
    /// No job id is recorded (none was started, or the coordinator died before it
    /// recorded one).
    NotStarted,
    Copying,
    /// Caught up with the source once; follows its writes.
    Synced,
    /// Drained and flushed (recorded by the coordinator: the node may forget it).
    Completed,
    /// Failed, cancelled, or forgotten by a restarted storage node.
    Failed(String),
    /// The storage node does not answer.
    Unknown,
}

/// What a geographic migration adds to an observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMove {
    pub mirror: MirrorJob,
    /// The mirror acknowledges guest writes only once they are on both sides.
    pub write_blocking: bool,
    /// The agent's pre-copy still holds its switchover for the disk's sake only (the
    /// operator did not ask for a hold, or released it).
    pub held_for_disks: bool,
    /// A terminal migration left a copy nobody uses: the target site's copy after a
    /// cancel or rollback, the source's after a commit.
    pub leftover: bool,
}

/// What the executor saw just before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub source: VmPresence,
    pub target: VmPresence,
    pub source_migration: SourceMigration,
    /// The storage node's current epoch and holder of the VM's disks.
    pub storage_epoch: u64,
    pub storage_holder: Option<String>,
    /// The lease `(epoch, holder)` whose tokens the coordinator's VM record holds
    /// (None when it holds none it can hand out).
    pub tokens: Option<(u64, String)>,
    pub cancel: CancelRequest,
    /// None on shared storage. With a disk move, the storage fields above cover both
    /// copies (the highest epoch; at a tie, the target site's copy).
    pub disk_move: Option<DiskMove>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

/// One step of the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until the world moves; `fast` while memory moves (the quiesce
    /// starts the guest's downtime, so it must be noticed at once).
    Wait {
        fast: bool,
    },
    /// Ask the source agent for a coordinated migration to the target (an offline
    /// migration pauses the guest first); journal `Precopy` with the agent's id.
    StartSourceMigration,
    /// Cancel the agent migration: the source resumes with its own disks. Only before
    /// the fence intent.
    CancelSourceMigration,
    /// End a quiesced source's wait without a go-ahead, keeping the guest paused (a
    /// rollback: it must not run on its fenced tokens).
    AbortSourceMigration,
    /// Journal `event` (no daemon call).
    Journal(Event),
    /// Journal the intent (`FenceIntent` or `RollbackIntent` at `epoch`), fence every
    /// disk to that side, record the new tokens; after a fence to the target, journal
    /// `Fenced`. A failed fence to the target decides a rollback.
    Fence {
        to: Side,
        epoch: u64,
    },
    /// Pass the point of no return (a cancel that came first wins: rollback), send the
    /// go-ahead with the target's tokens, follow the agents to the end: journal
    /// `TargetRunning`, or decide a rollback.
    GoAhead,
    DiscardTarget,
    DiscardSource,
    /// Resume the paused source: with the tokens of the rollback fence, or (before the
    /// fence intent) with its own disks.
    ResumeSource {
        new_tokens: bool,
    },
    /// Geographic: journal `MirrorIntent` at `epoch`, create the target site's copy,
    /// lease it to the mirror job at `epoch`, start the job (background) and record its
    /// id. A job an earlier attempt left is cancelled first.
    StartMirror {
        epoch: u64,
    },
    /// Switch the mirror to write-blocking (it then always converges).
    MirrorWriteBlocking,
    /// Lift the agent's switchover hold (taken while the mirror was not blocking).
    ReleaseHold,
    /// The source is quiesced: drain the mirror's last dirty blocks and record it
    /// completed.
    CompleteMirror,
    /// Remove the copy a terminal migration left unused (see [`DiskMove::leftover`]),
    /// cancelling its mirror job first.
    DropLeftoverCopy,
    /// The migration is over and nothing is left to clean up.
    Done,
}

const OPERATOR: &str = "cancelled by the operator";

/// The one next step for `rec` given `obs`. See the module docs for the table.
pub fn next_action(rec: &MigrationRecord, obs: &Observation) -> Action {
    use Action::*;
    let phase = &rec.phase;
    if phase.is_terminal() {
        return cleanup(phase, obs);
    }
    if obs.source_migration == SourceMigration::Unknown {
        return Wait { fast: false };
    }
    // Roll forward whenever the target runs: its memory was verified before it resumed.
    if obs.target == VmPresence::Running {
        let target_holds = obs.storage_holder.as_deref() == Some(rec.to_host.as_str())
            && obs.storage_epoch > rec.source_epoch;
        if target_holds {
            return match phase {
                Phase::Fenced { epoch }
                    if obs.tokens == Some((*epoch, rec.to_host.clone()))
                        && obs.storage_epoch == *epoch =>
                {
                    Journal(Event::TargetRunning)
                }
                Phase::TargetRunning { epoch } if obs.storage_epoch == *epoch => {
                    Journal(Event::Commit { epoch: *epoch })
                }
                // The fence landed but its journal entry did not, or the target was
                // adopted: commit at the epoch the storage node shows.
                Phase::Fencing { .. } | Phase::Fenced { .. } | Phase::TargetRunning { .. } => {
                    Journal(Event::Commit {
                        epoch: obs.storage_epoch,
                    })
                }
                // Before any fence the target cannot hold a newer epoch unless someone
                // else fenced; adopt it under a fresh one.
                _ => Fence {
                    to: Side::Target,
                    epoch: rec.next_epoch(obs.storage_epoch),
                },
            };
        }
        if obs.source == VmPresence::Absent {
            // The agents finished without the coordinator (the only copy runs on the
            // target): its disks must follow it, under an epoch above anything handed
            // out, whatever was journaled. Discarding it would lose the guest.
            return Fence {
                to: Side::Target,
                epoch: rec.next_epoch(obs.storage_epoch),
            };
        }
    }
    match phase {
        Phase::Planned | Phase::Mirroring { .. } => planned(rec, obs),
        Phase::Precopy | Phase::Quiesced => before_fence(rec, obs),
        Phase::Fencing { epoch } | Phase::Fenced { epoch } => after_fence_intent(rec, obs, *epoch),
        Phase::TargetRunning { epoch } => Journal(Event::Commit { epoch: *epoch }),
        Phase::RollingBack { epoch, .. } => rolling_back(rec, obs, *epoch),
        Phase::Committed { .. } | Phase::Cancelled { .. } | Phase::RolledBack { .. } => Done,
    }
}

/// After a terminal phase: remove a copy the last steps may have left behind.
fn cleanup(phase: &Phase, obs: &Observation) -> Action {
    let leftover = obs.disk_move.as_ref().is_some_and(|d| d.leftover);
    match phase {
        Phase::Committed { .. } if obs.source.present() => Action::DiscardSource,
        Phase::Committed { .. } if leftover && obs.source == VmPresence::Absent => {
            Action::DropLeftoverCopy
        }
        // Never the only running copy.
        Phase::Cancelled { .. } | Phase::RolledBack { .. }
            if obs.target.present()
                && !(obs.target == VmPresence::Running && obs.source != VmPresence::Running) =>
        {
            Action::DiscardTarget
        }
        // The target site's copy goes once no copy of the VM there can use it.
        Phase::Cancelled { .. } | Phase::RolledBack { .. }
            if leftover && obs.target == VmPresence::Absent =>
        {
            Action::DropLeftoverCopy
        }
        _ => Action::Done,
    }
}

fn planned(rec: &MigrationRecord, obs: &Observation) -> Action {
    if obs.cancel != CancelRequest::None {
        return abort_before_fence(obs, OPERATOR.into());
    }
    match obs.source_migration {
        SourceMigration::NotStarted => match obs.source {
            VmPresence::Running | VmPresence::Paused => match &obs.disk_move {
                None => Action::StartSourceMigration,
                Some(d) => mirror_first(rec, obs, d),
            },
            // A migration whose id was never journaled (the coordinator died between
            // the call and the journal): it ends by itself (cancel or its switchover
            // timeout), then this one starts afresh.
            VmPresence::InMigration | VmPresence::Unreachable => Action::Wait { fast: false },
            VmPresence::Absent => abort_before_fence(obs, "the VM is not on its host".into()),
        },
        // The id is journaled with `Precopy`; a planned record with one is not ours.
        _ => before_fence(rec, obs),
    }
}

/// Planned or Mirroring with a disk move, the source running: the disk is mirrored
/// (and synced) before any memory moves.
fn mirror_first(rec: &MigrationRecord, obs: &Observation, d: &DiskMove) -> Action {
    match &d.mirror {
        MirrorJob::NotStarted => Action::StartMirror {
            epoch: rec.next_epoch(obs.storage_epoch),
        },
        // No mirror job is recorded before `Mirroring` is journaled.
        _ if rec.phase == Phase::Planned => Action::StartMirror {
            epoch: rec.next_epoch(obs.storage_epoch),
        },
        MirrorJob::Copying | MirrorJob::Unknown => Action::Wait { fast: false },
        MirrorJob::Synced => Action::StartSourceMigration,
        MirrorJob::Failed(reason) => {
            abort_before_fence(obs, format!("the disk mirror failed: {reason}"))
        }
        // Only recorded at the quiesce; not before the memory moves.
        MirrorJob::Completed => Action::StartSourceMigration,
    }
}

/// Why the source's migration was cancelled: the operator, or a failed mirror.
fn cancel_reason(obs: &Observation) -> String {
    match &obs.disk_move {
        Some(DiskMove {
            mirror: MirrorJob::Failed(r),
            ..
        }) => format!("the disk mirror failed: {r}"),
        _ => OPERATOR.into(),
    }
}

/// Precopy and Quiesced: the source owns its disks; every failure ends with it running.
fn before_fence(rec: &MigrationRecord, obs: &Observation) -> Action {
    use SourceMigration as S;
    let mirror_failed = obs
        .disk_move
        .as_ref()
        .is_some_and(|d| matches!(d.mirror, MirrorJob::Failed(_)));
    match &obs.source_migration {
        S::Active => match (obs.cancel, &obs.disk_move) {
            (CancelRequest::Requested, _) => Action::CancelSourceMigration,
            (CancelRequest::None, Some(_)) if mirror_failed => Action::CancelSourceMigration,
            (CancelRequest::None, Some(d)) if !d.write_blocking => Action::MirrorWriteBlocking,
            (CancelRequest::None, Some(d)) if d.held_for_disks => Action::ReleaseHold,
            _ => Action::Wait { fast: true },
        },
        S::Quiesced => match obs.cancel {
            CancelRequest::Requested => Action::CancelSourceMigration,
            CancelRequest::Sent => Action::Wait { fast: false },
            CancelRequest::None if rec.phase == Phase::Precopy => {
                Action::Journal(Event::SourceQuiesced)
            }
            CancelRequest::None => match &obs.disk_move {
                Some(_) if mirror_failed => Action::CancelSourceMigration,
                Some(d) if d.mirror == MirrorJob::Unknown => Action::Wait { fast: false },
                Some(d) if d.mirror != MirrorJob::Completed => Action::CompleteMirror,
                _ => Action::Fence {
                    to: Side::Target,
                    epoch: rec.next_epoch(obs.storage_epoch),
                },
            },
        },
        S::Cancelled => abort_before_fence(obs, cancel_reason(obs)),
        S::Failed(reason) => abort_before_fence(obs, format!("migration failed: {reason}")),
        S::Forgotten => abort_before_fence(
            obs,
            "the source agent forgot the migration (restarted?)".into(),
        ),
        S::NotStarted => abort_before_fence(
            obs,
            "the coordinator restarted before the migration started".into(),
        ),
        // Completed without a go-ahead: the target runs shortly (then it is adopted).
        S::Completed | S::Unknown => Action::Wait { fast: false },
    }
}

/// Before the fence intent: drop a half-built target, resume a paused source, journal
/// `Cancelled`.
fn abort_before_fence(obs: &Observation, reason: String) -> Action {
    if matches!(
        obs.source,
        VmPresence::InMigration | VmPresence::Unreachable
    ) || obs.target == VmPresence::Unreachable
    {
        // The agent migration is still settling (or an agent is silent).
        return Action::Wait { fast: false };
    }
    if obs.target.present() && obs.target != VmPresence::Running {
        return Action::DiscardTarget;
    }
    if obs.source == VmPresence::Paused {
        return Action::ResumeSource { new_tokens: false };
    }
    Action::Journal(Event::Abort { reason })
}

/// Fencing or Fenced: the disks may be the target's. Forward while the source waits
/// for its go-ahead; back (under a newer epoch) once that is impossible.
fn after_fence_intent(rec: &MigrationRecord, obs: &Observation, epoch: u64) -> Action {
    use SourceMigration as S;
    if rec.rollback.is_some() {
        return start_rollback(rec, obs);
    }
    if obs.cancel != CancelRequest::None {
        return Action::Journal(Event::RollbackDecided {
            reason: format!("{OPERATOR} after the fence"),
        });
    }
    match &obs.source_migration {
        S::Quiesced => match rec.phase {
            Phase::Fenced { .. } if obs.tokens == Some((epoch, rec.to_host.clone())) => {
                Action::GoAhead
            }
            // The last fence's outcome is unknown (or its tokens were lost): burn it.
            _ => Action::Fence {
                to: Side::Target,
                epoch: rec.next_epoch(obs.storage_epoch),
            },
        },
        S::Active | S::Completed | S::Unknown => Action::Wait { fast: false },
        S::Failed(reason) => Action::Journal(Event::RollbackDecided {
            reason: format!("switchover failed: {reason}"),
        }),
        S::Cancelled | S::Forgotten | S::NotStarted => Action::Journal(Event::RollbackDecided {
            reason: "the source's migration ended without a switchover".into(),
        }),
    }
}

/// A rollback was decided: end the source's wait (keeping it paused), drop the target's
/// copy, then fence the disks back to the source under a new epoch.
fn start_rollback(rec: &MigrationRecord, obs: &Observation) -> Action {
    if obs.source_migration == SourceMigration::Quiesced {
        return Action::AbortSourceMigration;
    }
    if obs.source_migration == SourceMigration::Active
        || matches!(
            obs.source,
            VmPresence::InMigration | VmPresence::Unreachable
        )
    {
        return Action::Wait { fast: false };
    }
    if obs.target.present() && obs.target != VmPresence::Running {
        return Action::DiscardTarget;
    }
    Action::Fence {
        to: Side::Source,
        epoch: rec.next_epoch(obs.storage_epoch),
    }
}

fn rolling_back(rec: &MigrationRecord, obs: &Observation, epoch: u64) -> Action {
    if obs.source_migration == SourceMigration::Quiesced {
        return Action::AbortSourceMigration;
    }
    if matches!(
        obs.source,
        VmPresence::InMigration | VmPresence::Unreachable
    ) {
        return Action::Wait { fast: false };
    }
    if obs.target.present() && obs.target != VmPresence::Running {
        return Action::DiscardTarget;
    }
    if obs.tokens != Some((epoch, rec.from_host.clone())) {
        // The rollback fence's outcome is unknown: burn its epoch, fence again.
        return Action::Fence {
            to: Side::Source,
            epoch: rec.next_epoch(obs.storage_epoch),
        };
    }
    match obs.source {
        VmPresence::Paused => Action::ResumeSource { new_tokens: true },
        // Running (resumed just before a crash) or gone with its agent: nothing to
        // resume.
        _ => Action::Journal(Event::RollbackConfirmed),
    }
}

#[cfg(test)]
mod tests;
