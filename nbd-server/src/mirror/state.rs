//! The job's state machine (pure).
//!
//! ```text
//!   copying --pass ends with nothing dirty--> synced
//!   synced  --target lost--------------------> copying
//!   copying | synced --drained and flushed after complete--> completed
//!   copying | synced --cancel--> cancelled
//!   copying | synced --fatal error--> failed
//! ```
//! `completed`, `failed` and `cancelled` are final: nothing leaves them.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Copying: the bulk pass or passes over the blocks written meanwhile.
    Copying,
    /// Caught up once and following writes (`dirty_bytes` says how far behind).
    Synced,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A pass ended and the dirty set was empty.
    CaughtUp,
    /// The connection to the target failed (the job retries).
    TargetLost,
    /// Completion asked for, the last blocks drained and the target flushed.
    Drained,
    Cancel,
    Fatal,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    /// The state after `ev`.
    pub fn on(self, ev: Event) -> State {
        if self.is_final() {
            return self;
        }
        match ev {
            Event::CaughtUp => State::Synced,
            Event::TargetLost => State::Copying,
            Event::Drained => State::Completed,
            Event::Cancel => State::Cancelled,
            Event::Fatal => State::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_happy_path() {
        let s = State::Copying.on(Event::CaughtUp);
        assert_eq!(s, State::Synced);
        assert_eq!(s.on(Event::TargetLost), State::Copying);
        assert_eq!(s.on(Event::Drained), State::Completed);
        assert_eq!(State::Copying.on(Event::Cancel), State::Cancelled);
        assert_eq!(State::Synced.on(Event::Fatal), State::Failed);
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::CaughtUp),
            Just(Event::TargetLost),
            Just(Event::Drained),
            Just(Event::Cancel),
            Just(Event::Fatal),
        ]
    }

    proptest! {
        /// Whatever happens, a final state never changes, and completed is only
        /// ever reached through Drained.
        #[test]
        fn final_states_stick(events in prop::collection::vec(event(), 0..40)) {
            let mut s = State::Copying;
            for ev in events {
                let next = s.on(ev);
                if s.is_final() {
                    prop_assert_eq!(next, s);
                }
                if next == State::Completed && s != State::Completed {
                    prop_assert_eq!(ev, Event::Drained);
                }
                s = next;
            }
        }
    }
}
