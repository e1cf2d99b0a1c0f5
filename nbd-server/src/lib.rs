//! stagehand-nbd: the storage node's NBD server (see README.md and docs/nbd-protocol.md).
pub mod codec;
