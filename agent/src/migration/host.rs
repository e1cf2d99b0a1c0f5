//! The VM manager as migration's [`VmHost`]: its hooks already have these signatures.

use std::sync::Arc;

use super::VmHost;
use crate::contract::{MigrationSource, MigrationTarget, VmError, VmSpec};
use crate::manager::VmManager;

impl VmHost for VmManager {
    fn begin_outgoing(&self, name: &str) -> Result<(Arc<dyn MigrationSource>, bool), VmError> {
        VmManager::begin_outgoing(self, name)
    }
    fn end_outgoing(&self, name: &str, moved: bool) {
        VmManager::end_outgoing(self, name, moved)
    }
    fn end_outgoing_paused(&self, name: &str) {
        VmManager::end_outgoing_paused(self, name)
    }
    fn create_incoming(&self, spec: &VmSpec) -> Result<Arc<dyn MigrationTarget>, VmError> {
        VmManager::create_incoming(self, spec)
    }
    fn end_incoming(&self, name: &str, running: bool) {
        VmManager::end_incoming(self, name, running)
    }
}
