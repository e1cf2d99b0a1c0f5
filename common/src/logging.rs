//! Log set-up shared by the daemons: `tracing` to stderr, filter from `RUST_LOG`
//! (default `info`), colour only when stderr is a terminal (a log file or a pipe to
//! journald gets plain text).

use std::io::IsTerminal;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
