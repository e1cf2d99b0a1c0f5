//! stagehand-nbd: the storage node's NBD server (see README.md and docs/nbd-protocol.md).
//!
//! The wire protocol is the `nbd-proto` crate (pure, shared with the client and the
//! fuzz targets); the async client is `nbd-client`.
//!
//! - [`handshake`] and `conn`: the server's option haggling and transmission phase.
//! - [`server`]: listeners, connection lifecycle, [`run`]; [`dataplane`]: the
//!   threads connections run on.
//! - [`export`]: exports and the runtime-mutable [`export::ExportRegistry`].
//! - [`io`]: io_uring and thread-pool file I/O; [`bufpool`]: reusable buffers.
//! - [`lease`]: write leases and epoch fencing; [`store`]: durable state (`--data-dir`).
//! - [`control`]: the HTTP/JSON control API (`--api`).
//! - [`mirror`]: mirror jobs, pushing an export to another NBD server.
//! - [`config`]: flags and TOML.

pub mod bitmap;
pub mod bufpool;
pub mod config;
mod conn;
pub mod control;
pub mod dataplane;
pub mod export;
pub mod handshake;
pub mod io;
pub mod lease;
pub mod mirror;
pub mod server;
pub mod store;

pub use config::{Args, Config};
pub use server::{Server, run};
