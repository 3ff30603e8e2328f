//! `courier-bench etcd`: the courier workload's counterpart on etcd v3: C closed-loop workers,
//! each with its own connection to one member (spread round-robin), each `Put`ting the message
//! bytes under a unique key and awaiting the `PutResponse` (committed on a quorum, WAL fsynced).
//!
//! The client is a minimal wire client: `bench/proto/etcdserverpb/rpc.proto` declares only
//! `KV.Put` with `key` and `value`, field-compatible with etcd's own `rpc.proto`; the response's
//! header is skipped as an unknown field. No etcd client crate (and no protoc) is needed.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::LoadArgs;
use crate::client;
use crate::stats::{self, Latency, RunResult, Tally, Window};

/// The generated etcd client (`etcdserverpb.KV`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    unused_qualifications,
    reason = "generated code"
)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// Deadline of one put.
const PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed put.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Options of `courier-bench etcd`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Client URLs' `host:port` of the members (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[command(flatten)]
    load: LoadArgs,
}

/// Runs the workload and writes its result.
///
/// # Errors
/// Connection failures; the run's own failure (too many errors).
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let base = Instant::now();
    let run = client::run_tag();
    let mut clients = Vec::with_capacity(args.load.workers());
    for index in 0..args.load.workers() {
        let endpoint = &args.endpoints[index % args.endpoints.len()];
        clients.push(pb::kv_client::KvClient::new(
            client::connect(endpoint).await?,
        ));
    }
    let window = Window::start(base, args.load.warmup(), args.load.seconds());
    let mut workers = JoinSet::new();
    let size = args.load.size_bytes();
    for (index, mut kv) in clients.into_iter().enumerate() {
        workers.spawn(async move {
            let mut tally = Tally::new();
            let value = vec![b'x'; size];
            let mut seq: u64 = 0;
            while window.running() {
                seq += 1;
                let started = Instant::now();
                let mut request = tonic::Request::new(pb::PutRequest {
                    key: format!("bench/{run}/{index}/{seq}").into_bytes(),
                    value: value.clone(),
                });
                request.set_timeout(PUT_TIMEOUT);
                let outcome = kv.put(request).await;
                let failed = outcome.is_err();
                tally.finish(
                    &window,
                    started,
                    outcome
                        .map(|_| ())
                        .map_err(|s| format!("Put: {:?}: {}", s.code(), s.message())),
                );
                if failed {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
            tally
        });
    }
    let (tally, (processes, machine)) =
        stats::measure_workers(&window, &args.load.pids, workers, "an etcd worker").await?;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let throughput = tally.ok as f64 / window.measured().as_secs_f64();
    let result = RunResult {
        kind: "throughput".to_owned(),
        system: "etcd".to_owned(),
        concurrency: args.load.concurrency,
        size_bytes: args.load.size,
        warmup_s: args.load.warmup,
        seconds: window.measured().as_secs_f64(),
        acked: tally.ok,
        errors: tally.errors,
        first_error: tally.first_error.clone(),
        throughput,
        ack: Latency::of(&tally.latency),
        processes,
        machine,
        command: stats::command_line(),
        ..RunResult::default()
    };
    crate::finish_run(&args.load, &result)
}
