//! Replacing a paused VM's disks (new lease tokens): rollback after a fence, or a
//! migration target before its first resume.

use super::*;

impl Machine {
    /// Replaces the VM's disk URIs (new lease tokens) and reconnects its disks,
    /// waiting for the connections. Only while paused: a source being rolled back
    /// after a fence, or a migration target before its first resume. One URI per
    /// disk, in order.
    pub fn set_disks(&self, disks: &[DiskSpec]) -> Result<(), MachineError> {
        let have = self.block.as_ref().map_or(0, |b| b.uris().len());
        if disks.len() != have {
            return Err(MachineError::Invalid(format!(
                "{} disk URIs given; this VM has {have} disks",
                disks.len()
            )));
        }
        for d in disks {
            DiskUri::new(d).map_err(MachineError::Invalid)?;
        }
        // Held throughout so nobody resumes the vCPUs while the disks change.
        let paused = self.paused.lock().expect("pause lock is never poisoned");
        if !*paused {
            return Err(MachineError::WrongState {
                state: "running",
                needed: "paused",
            });
        }
        if let Some(b) = &self.block {
            // Nothing may be in flight against the old URIs (a pause drained them;
            // this makes sure for a VM that was never paused through `pause`).
            b.quiesce(DISK_QUIESCE_TIMEOUT)
                .map_err(MachineError::Disk)?;
            b.set_uris(disks).map_err(MachineError::Disk)?;
        }
        drop(paused);
        tracing::info!(vm = %self.spec.name, disks = disks.len(), "disks replaced");
        Ok(())
    }
}
