//! HTTP API of the agent.
pub mod migration;
