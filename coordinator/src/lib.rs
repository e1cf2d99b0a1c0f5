//! coord: the Stagehand coordinator (see README.md). The orchestration itself arrives
//! with its issue; for now the crate holds the durable state store.

pub mod migration;
pub mod store;
