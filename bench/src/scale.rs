//! `courier-bench scale`: idle device streams against one node, stepped up (for example to
//! 1k, 10k, 50k, 100k), with the node's RSS and idle CPU at each step and live delivery latency
//! to a few probe devices while the idle streams stay open.
//!
//! ```text
//!  users (one device each) ──N idle streams, multiplexed K per HTTP/2 connection──▶ node
//!  probe sender ──Send──▶ node ──▶ probe device stream (own connection): send → arrival
//! ```
//!
//! A phone keeps one stream open; here each device opens many (streams of the same device are
//! independent on the server), so a modest number of registrations covers 100k streams.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{SendRequest, server_frame};
use courier_proto::pb::events::Content;
use futures_util::FutureExt as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::client::{self, Device, DeviceStream, Outbox, PhoneBook};
use crate::procstat::{self, Sampler};
use crate::stats::{self, Latency, ScaleResult, ScaleStep};

/// Registrations in flight at once.
const REGISTER_PARALLEL: usize = 16;
/// How long a probe message may take to arrive before it counts as missing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after opening streams before measuring, so the node settles.
const SETTLE: Duration = Duration::from_secs(2);

/// Options of `courier-bench scale`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Client API address of the node (`host:port`).
    #[arg(long)]
    addr: String,
    /// The node's data directory (dev-mode codes).
    #[arg(long)]
    data_dir: PathBuf,
    /// Open streams at each step, increasing (comma separated), e.g. 1000,10000,100000.
    #[arg(long, value_delimiter = ',', required = true)]
    streams: Vec<u64>,
    /// Users whose devices hold the idle streams.
    #[arg(long, default_value_t = 100)]
    users: u32,
    /// Streams per HTTP/2 connection (at most the node's limits.streams-per-connection-max).
    #[arg(long, default_value_t = 1000)]
    streams_per_connection: u32,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 256)]
    open_parallel: usize,
    /// The node's process id (RSS and CPU).
    #[arg(long)]
    pid: Option<u32>,
    /// Probe devices, each with its own stream, that receive the latency probes.
    #[arg(long, default_value_t = 4)]
    probes: u32,
    /// Probe messages sent (one at a time) at each step.
    #[arg(long, default_value_t = 100)]
    probe_sends: u32,
    /// Longest probe phase per step, seconds: probes not sent by then are not sent (a node
    /// drowning in idle streams would otherwise hold the run for probes × timeout).
    #[arg(long, default_value_t = 60.0)]
    probe_seconds: f64,
    /// Seconds the idle streams sit untouched while the node's CPU is sampled, per step.
    #[arg(long, default_value_t = 5.0)]
    idle_seconds: f64,
    /// Message size of the probes, bytes.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Where the JSON result is written.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The devices and streams of a scale run.
struct Fleet {
    idle_users: Vec<Device>,
    probe_sender: Device,
    probes: Vec<(Device, DeviceStream)>,
    connections: Vec<Channel>,
    idle: Vec<DeviceStream>,
    /// Probe messages sent so far (client message ids and body markers stay unique).
    probe_seq: u64,
}

/// Runs the scale test and writes its result.
///
/// # Errors
/// Registration or connection failures, or a step that opened fewer streams than asked.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.streams.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--streams steps must increase");
    }
    let mut fleet = setup(&args).await?;
    tokio::time::sleep(SETTLE).await;
    let rss = || args.pid.and_then(procstat::rss_mib).unwrap_or(0.0);
    let rss_before = rss();
    let idle_cpu = || async {
        let mut sampler = Sampler::start(args.pid.as_slice());
        sampler
            .poll_until(Instant::now() + Duration::from_secs_f64(args.idle_seconds.max(0.5)))
            .await;
        let (processes, _) = sampler.finish();
        processes.first().map_or(0.0, |p| p.cpu_pct)
    };
    let idle_cpu_before = idle_cpu().await;
    println!(
        "scale: node RSS before idle streams {rss_before:.1} MiB, idle CPU {idle_cpu_before:.1}%"
    );
    let mut steps = Vec::with_capacity(args.streams.len());
    for &target in &args.streams {
        let opened = Instant::now();
        open_idle(&args, &mut fleet, target).await?;
        let open_s = opened.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let idle_cpu_pct = idle_cpu().await;
        let rss_now = rss();
        let (delivery, missing) = probe(&args, &mut fleet).await?;
        let closed = closed_streams(&mut fleet.idle);
        #[allow(clippy::cast_precision_loss, reason = "stream counts far below 2^52")]
        let per_stream_kib = (rss_now - rss_before) * 1024.0 / target.max(1) as f64;
        let step = ScaleStep {
            streams: target,
            streams_closed: closed,
            open_s,
            rss_mib: rss_now,
            rss_per_stream_kib: per_stream_kib,
            idle_cpu_pct,
            delivery,
            delivery_missing: missing,
        };
        println!(
            "scale: {} streams open ({} closed by the server) in {:.1} s; node RSS {:.1} MiB \
             ({:.2} KiB/stream), idle CPU {:.1}%; delivery p50 {:.2} ms p99 {:.2} ms max {:.2} ms, \
             {} missing",
            step.streams,
            step.streams_closed,
            step.open_s,
            step.rss_mib,
            step.rss_per_stream_kib,
            step.idle_cpu_pct,
            step.delivery.p50_ms,
            step.delivery.p99_ms,
            step.delivery.max_ms,
            step.delivery_missing
        );
        steps.push(step);
    }
    fleet.idle.clear();
    fleet.connections.clear();
    tokio::time::sleep(SETTLE * 2).await;
    let result = ScaleResult {
        kind: "scale".to_owned(),
        users: args.users,
        streams_per_connection: args.streams_per_connection,
        rss_before_mib: rss_before,
        idle_cpu_before_pct: Some(idle_cpu_before),
        rss_after_close_mib: rss(),
        steps,
        command: stats::command_line(),
    };
    if let Some(out) = &args.out {
        stats::write_json(out, &result)?;
    }
    let failed: Vec<&ScaleStep> = result
        .steps
        .iter()
        .filter(|s| s.streams_closed > 0 || s.delivery_missing > 0)
        .collect();
    if !failed.is_empty() {
        bail!("scale: streams closed or probes lost at steps {failed:?}");
    }
    Ok(())
}

/// Registers the idle users, the probe devices and the probe sender, and opens the probes'
/// streams (each on its own connection, like a phone).
async fn setup(args: &Args) -> anyhow::Result<Fleet> {
    let channel = client::connect(&args.addr).await?;
    // One shard: every number lands on it, whatever the cluster's key.
    let mut book = PhoneBook::new(client::run_tag(), 1, courier_proto::PhoneHasher::Unkeyed);
    let count = args.users + args.probes + 1;
    let limit = Arc::new(Semaphore::new(REGISTER_PARALLEL));
    let mut tasks = JoinSet::new();
    let outbox = Outbox::new(&args.data_dir);
    for index in 0..count {
        let (channel, outbox, phone) = (channel.clone(), outbox.clone(), book.any());
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire().await?;
            anyhow::Ok((index, client::register(channel, &outbox, &phone).await?))
        });
    }
    let mut devices: Vec<Option<Device>> = vec![None; usize::try_from(count)?];
    while let Some(done) = tasks.join_next().await {
        let (index, device) = done.context("a registration panicked")??;
        devices[usize::try_from(index)?] = Some(device);
    }
    let mut devices = devices
        .into_iter()
        .collect::<Option<Vec<Device>>>()
        .context("a registration did not finish")?;
    let probe_sender = devices.pop().context("the probe sender")?;
    let probe_devices = devices.split_off(usize::try_from(args.users)?);
    let mut probes = Vec::with_capacity(probe_devices.len());
    for device in probe_devices {
        let stream = client::open_stream(client::connect(&args.addr).await?, &device).await?;
        probes.push((device, stream));
    }
    println!(
        "scale: {} idle users, {} probe devices and a probe sender registered",
        args.users, args.probes
    );
    Ok(Fleet {
        idle_users: devices,
        probe_sender,
        probes,
        connections: Vec::new(),
        idle: Vec::new(),
        probe_seq: 0,
    })
}

/// Opens idle streams until `target` are open, `streams_per_connection` per connection.
async fn open_idle(args: &Args, fleet: &mut Fleet, target: u64) -> anyhow::Result<()> {
    let per_connection = usize::try_from(args.streams_per_connection.max(1))?;
    let target = usize::try_from(target)?;
    let from = fleet.idle.len();
    while fleet.connections.len() * per_connection < target {
        fleet.connections.push(client::connect(&args.addr).await?);
    }
    let limit = Arc::new(Semaphore::new(args.open_parallel.max(1)));
    let mut tasks = JoinSet::new();
    for index in from..target {
        let channel = fleet.connections[index / per_connection].clone();
        let device = fleet.idle_users[index % fleet.idle_users.len()].clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire().await?;
            client::open_stream(channel, &device).await
        });
    }
    let mut failures = 0_u64;
    let mut first_failure = None;
    while let Some(done) = tasks.join_next().await {
        match done.context("a stream open panicked")? {
            Ok(stream) => fleet.idle.push(stream),
            Err(error) => {
                failures += 1;
                first_failure.get_or_insert(format!("{error:#}"));
            }
        }
    }
    if failures > 0 {
        bail!(
            "{failures} of {} streams failed to open (first: {})",
            target - from,
            first_failure.unwrap_or_default()
        );
    }
    Ok(())
}

/// Sends `probe_sends` messages one at a time, round-robin to the probe devices, and times each
/// from the send to its arrival on the probe's stream. Returns the latency and the count that
/// never arrived.
async fn probe(args: &Args, fleet: &mut Fleet) -> anyhow::Result<(Latency, u64)> {
    let mut sender = MessagingClient::new(client::connect(&args.addr).await?);
    let mut latency = stats::histogram();
    let mut missing = 0;
    let size = usize::try_from(args.size)?.max(8);
    let probes = fleet.probes.len().max(1);
    let deadline = Instant::now() + Duration::from_secs_f64(args.probe_seconds.max(1.0));
    for i in 0..args.probe_sends {
        if Instant::now() >= deadline {
            println!(
                "scale: probe phase over {} s; {i} probes sent",
                args.probe_seconds
            );
            break;
        }
        fleet.probe_seq += 1;
        let marker = fleet.probe_seq | (u64::from(std::process::id()) << 40);
        let (device, stream) = &mut fleet.probes[usize::try_from(i)? % probes];
        let mut body = marker.to_le_bytes().to_vec();
        body.resize(size, b'p');
        let started = Instant::now();
        let request = client::authed(
            &fleet.probe_sender,
            SendRequest {
                client_msg_id: format!("probe-{marker:x}"),
                to_user: device.user,
                content: Some(Content {
                    body,
                    ..Content::default()
                }),
            },
        );
        sender.send(request).await.context("probe Send")?;
        let arrived = tokio::time::timeout(PROBE_TIMEOUT, async {
            loop {
                let frame = stream
                    .frames
                    .message()
                    .await?
                    .context("probe stream ended")?;
                if let Some(server_frame::Frame::Message(m)) = frame.frame
                    && m.content
                        .is_some_and(|c| c.body.get(..8) == Some(&marker.to_le_bytes()[..]))
                {
                    return anyhow::Ok(());
                }
            }
        })
        .await;
        match arrived {
            Ok(result) => {
                result?;
                stats::record(&mut latency, started.elapsed());
            }
            Err(_) => missing += 1,
        }
    }
    Ok((Latency::of(&latency), missing))
}

/// Counts idle streams that the server has ended (or that failed), without waiting.
fn closed_streams(idle: &mut [DeviceStream]) -> u64 {
    let mut closed = 0;
    for stream in idle {
        // Poll each stream once: pending means open and idle; a frame means open.
        if let Some(Ok(None) | Err(_)) = stream.frames.message().now_or_never() {
            closed += 1;
        }
    }
    closed
}
