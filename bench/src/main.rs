//! `courier-bench`: closed-loop load against courier, and the same workload against the peers a
//! user would otherwise pick (etcd, NATS JetStream), measured on one machine in one run; then a
//! connection-scale test and the report (`docs/BENCHMARKS.md`, SVG plots under `docs/bench/`).
//!
//! Layout:
//! - [`stats`]: the run window, HDR histograms, the JSON results.
//! - [`procstat`]: CPU and RSS of server processes and of the machine, from `/proc`.
//! - [`client`]: a courier phone client (dev-mode registration, sends, device streams).
//! - [`courier`], [`etcd`], [`nats`]: one closed-loop workload each.
//! - [`scale`]: idle device streams against one node.
//! - [`soak`]: a steady conversation workload for minutes; records per user over time.
//! - [`report`]: results → markdown section and plots.
//!
//! Every workload is a closed loop: C workers, each with its own connection, issue one
//! operation, wait for its acknowledgement, and issue the next. What counts as acknowledged is
//! each system's durable answer: courier's `SendResponse` (committed on a quorum of the sender's
//! shard, fsync on), etcd's `PutResponse` (committed on a quorum, WAL fsync on), NATS
//! JetStream's `PubAck` (stored on the stream's replicas; fsynced before the ack only with
//! `sync_interval: always`).

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

mod client;
mod courier;
mod etcd;
mod nats;
mod procstat;
mod report;
mod scale;
mod soak;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Load options shared by the throughput workloads.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// Concurrent closed-loop workers (senders), each with its own connection.
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: u32,
    /// Message (value, payload) size, bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) size: u32,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) seconds: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) warmup: f64,
    /// Server process ids whose CPU and RSS are sampled during the run.
    #[arg(long, value_delimiter = ',')]
    pub(crate) pids: Vec<u32>,
    /// Where the JSON result is written (also printed to stdout).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// The run fails (exit 1, after writing the result) above this share of failed operations.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) max_error_ratio: f64,
}

impl LoadArgs {
    /// The warm-up as a duration.
    pub(crate) fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup.max(0.0))
    }

    /// The measured window as a duration.
    pub(crate) fn seconds(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.max(0.1))
    }

    /// The concurrency as a count.
    pub(crate) fn workers(&self) -> usize {
        usize::try_from(self.concurrency.max(1)).unwrap_or(1)
    }

    /// The size as a count of bytes.
    pub(crate) fn size_bytes(&self) -> usize {
        usize::try_from(self.size).unwrap_or(256)
    }
}

#[derive(Debug, Parser)]
#[command(name = "courier-bench", version, about)]
enum Command {
    /// Courier: C senders each send 1:1 messages to their own recipient, awaiting each
    /// SendResponse; recipients' device streams measure end-to-end latency.
    Courier(courier::Args),
    /// etcd: C concurrent closed-loop Puts of the message bytes under unique keys.
    Etcd(etcd::Args),
    /// NATS JetStream: C concurrent closed-loop publishes, each awaiting its PubAck.
    Nats(nats::Args),
    /// Opens N idle device streams against one node: RSS per stream, live delivery latency.
    Scale(scale::Args),
    /// A steady conversation workload for minutes (recipients ack and read everything): samples
    /// the records each projection holds, to show storage per user levelling off.
    Soak(soak::Args),
    /// Writes the BENCHMARKS.md section and SVG plots from a run's JSON results.
    Report(report::Args),
}

fn main() -> anyhow::Result<()> {
    let command = Command::parse();
    if let Command::Report(args) = command {
        return report::run(&args);
    }
    // Two worker threads: the bench shares the machine with the servers it measures, and the
    // same runtime drives every system's workload.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Courier(args) => courier::run(args).await,
            Command::Etcd(args) => etcd::run(args).await,
            Command::Nats(args) => nats::run(args).await,
            Command::Scale(args) => scale::run(args).await,
            Command::Soak(args) => soak::run(args).await,
            Command::Report(_) => unreachable!("handled above"),
        }
    })
}

/// Prints a throughput result, writes it to `--out`, and fails when it had too many errors.
///
/// # Errors
/// File errors, or the run's own failure (`stats::check_errors`).
pub(crate) fn finish_run(load: &LoadArgs, result: &stats::RunResult) -> anyhow::Result<()> {
    println!(
        "{} c={} size={}B: {:.0} acked/s, ack p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, errors {}{}",
        result.system,
        result.concurrency,
        result.size_bytes,
        result.throughput,
        result.ack.p50_ms,
        result.ack.p99_ms,
        result.ack.p999_ms,
        result.errors,
        result.e2e.as_ref().map_or(String::new(), |e| format!(
            ", e2e p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms",
            e.p50_ms, e.p99_ms, e.p999_ms
        ))
    );
    if let Some(out) = &load.out {
        stats::write_json(out, result)?;
    }
    stats::check_errors(result, load.max_error_ratio)
}
