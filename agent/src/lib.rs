//! stagehand-agent: KVM host agent (see README.md).
pub mod api;
pub mod contract;
pub mod devices;
pub mod guests;
pub mod machine;
pub mod migration;
pub mod vstate;
