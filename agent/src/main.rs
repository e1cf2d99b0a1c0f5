//! `stagehand-agent`: parses flags, sets up logging, runs `agent::serve`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "stagehand-agent", version, about = "Stagehand KVM host agent")]
struct Cli {
    #[command(flatten)]
    flags: agent::AgentFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a built-in test guest (a flat binary) into the images directory
    /// (`--images-dir`, default `<data-dir>/images`), where the API may boot it.
    GuestImage {
        /// Guest name: ab-sweeper, disk-writer.
        name: String,
        /// Another file to write instead of `<images-dir>/<name>.bin`.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "stagehand-agent: {}",
                stagehand_common::report::error_line(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    stagehand_common::logging::init();
    if let Some(Command::GuestImage { name, out }) = cli.command {
        let (image, load_addr) = agent::guests::by_name(&name).with_context(|| {
            format!(
                "no guest {name:?}; known: {}",
                agent::guests::NAMES.join(", ")
            )
        })?;
        let out = match out {
            Some(o) => o,
            None => {
                let dir = cli.flags.images_dir.clone().unwrap_or_else(|| {
                    cli.flags
                        .data_dir
                        .clone()
                        .unwrap_or_else(|| agent::config::DEFAULT_DATA_DIR.into())
                        .join("images")
                });
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                dir.join(format!("{name}.bin"))
            }
        };
        std::fs::write(&out, image).with_context(|| format!("writing {}", out.display()))?;
        println!(
            "{}: {} bytes, load at {load_addr:#x}",
            out.display(),
            image.len()
        );
        return Ok(());
    }
    let config = agent::AgentConfig::resolve(cli.flags).context("configuration")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
            on_signal.cancel();
        });
        agent::serve(config, shutdown, |bound| {
            // One line on stdout that scripts and tests wait for.
            println!("stagehand-agent: api listening on {}", bound.api);
        })
        .await
        .map_err(anyhow::Error::from)
    })
}
