//! Start-up: every migration a previous coordinator left unfinished gets an executor
//! at once, running the same driver from the journaled record. Its controls are
//! registered before the API serves, so cancels, figures and limits work as they did
//! before the restart.

use std::sync::Arc;

use super::Coordinator;
use crate::error::ApiError;

impl Coordinator {
    /// Hands every unfinished migration to an executor; returns how many.
    pub fn recover(self: &Arc<Self>) -> Result<usize, ApiError> {
        let pending: Vec<String> = self
            .migrations()?
            .into_iter()
            // A geographic migration also until its unused disk copy is deleted (the
            // coordinator may have died between the end and the cleanup).
            // (Not once the VM was deleted: its disks went with it.)
            .filter(|m| {
                !m.record.phase.is_terminal()
                    || (m.disk_move.as_ref().is_some_and(|p| !p.cleaned)
                        && self.vm(&m.record.vm).is_ok())
            })
            .map(|m| m.record.id)
            .collect();
        for id in &pending {
            tracing::info!(migration = %id, "resuming an unfinished migration");
            self.spawn_executor(id);
        }
        Ok(pending.len())
    }
}
