//! `courier-node --config FILE`: loads the config, starts the node, stops on SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// The courier server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Path of the TOML config (see docs/config.example.toml).
    #[arg(long, env = "COURIER_CONFIG")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = courier_node::Config::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    courier_node::telemetry::init(&config.log);
    courier_node::telemetry::set_panic_hook();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let node = courier_node::start(config).await?;
        node.run_until(shutdown_signal()).await?;
        tracing::info!("node stopped");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}
