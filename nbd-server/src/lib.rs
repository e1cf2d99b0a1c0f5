//! stagehand-nbd: the storage node's NBD server (see README.md).
pub mod control;
pub mod lease;
pub mod store;
