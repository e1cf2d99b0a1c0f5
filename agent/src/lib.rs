//! stagehand-agent: KVM host agent (see README.md).
pub mod api;
pub mod contract;
pub mod migration;
