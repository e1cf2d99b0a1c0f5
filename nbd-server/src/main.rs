//! stagehand-nbd: the storage node's NBD server. Parses flags, sets up logging and
//! signals, and hands over to `nbd_server::run`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "stagehand-nbd: {}",
                stagehand_common::report::error_line(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = nbd_server::Args::parse();
    stagehand_common::logging::init();
    let config = nbd_server::Config::from_args(args).context("configuration")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        };
        nbd_server::run(config, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })
}
