//! `courier-node --config FILE`: loads the config, starts the node, stops on SIGTERM or SIGINT.
//! Shared by the `courier-node` binary and the test-only `courier-node-bugs` one.

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

/// The whole program: parse arguments, run until a signal.
///
/// # Errors
/// A config that does not load, or a node that fails to start or stop.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = crate::Config::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Inside the runtime: the trace exporter runs on it.
        let telemetry = crate::telemetry::init(&config.log, &config.tracing, config.node_id);
        crate::telemetry::set_panic_hook();
        crate::bugs::announce();
        let node = crate::start(config).await?;
        node.run_until(shutdown_signal()).await?;
        tracing::info!("node stopped");
        telemetry.shutdown();
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
