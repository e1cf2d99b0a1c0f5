//! `coord`: parses flags, sets up logging, and runs `coord serve` or one client verb.

use anyhow::Context;
use clap::Parser;
use coordinator::cli::{Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime can start");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(flags) => serve(*flags).await,
            _ => coordinator::cli::run_client(cli)
                .await
                .map_err(anyhow::Error::from),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "coord: {}",
                stagehand_common::report::error_line(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(flags: coordinator::config::ServeFlags) -> anyhow::Result<()> {
    stagehand_common::logging::init();
    let cfg = flags.resolve().context("reading the configuration")?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler works on Unix");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    coordinator::run(cfg, shutdown).await.context("coord serve")
}
