//! `courier-bench courier`: C sender devices each send 1:1 messages to their own recipient device
//! in a closed loop; the recipients' device streams time each message's arrival.
//!
//! ```text
//!  sender i ──Send (await SendResponse: quorum-durable on the sender's shard)──▶ node i % n
//!                                   │ forward (cross-shard) / same entry (same shard)
//!  recipient i ◀──device stream─────┘ node (i + 1) % n
//! ```
//!
//! Senders sit on shard `i % S` and recipients on another shard, so every message crosses the
//! outbox forwarder (two raft commits before arrival); `--same-shard` puts everyone on shard 0.
//! Each body starts with the send's start time (an offset from a process-wide base), the pair
//! and a sequence number, so the recipient measures send start → arrival without a lookup.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use courier_proto::ShardId;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{SendRequest, server_frame};
use courier_proto::pb::events::Content;
use courier_proto::pb::peer::StatusRequest;
use courier_proto::pb::peer::admin_client::AdminClient;
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::LoadArgs;
use crate::client::{self, Device, DeviceStream, PhoneBook};
use crate::procstat::Sampler;
use crate::stats::{self, Latency, LogAppends, NodeCost, RunResult, Tally, Window};

/// Bytes at the start of every body: send start offset (8), pair (4), sequence (8).
const BODY_HEADER_BYTES: usize = 20;
/// Registrations in flight at once.
const REGISTER_PARALLEL: usize = 16;
/// Deadline of one send.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed send before the next (keeps a failing worker from spinning).
const ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Options of `courier-bench courier`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    nodes: client::Nodes,
    /// Peer (admin) addresses of the nodes: log appends and fsyncs are read from Admin.Status
    /// before and after the window.
    #[arg(long, value_delimiter = ',')]
    admin_addrs: Vec<String>,
    /// The cluster's shard count (as given to `courier-ops cluster init`).
    #[arg(long, default_value_t = 8)]
    shards: u16,
    /// The phone-hash key file the cluster was created with (`courier-ops cluster init
    /// --phone-key-file`): the benchmark places senders and recipients on chosen shards, so it
    /// must compute user ids.
    #[arg(long, value_name = "FILE")]
    phone_key_file: PathBuf,
    /// Every sender and recipient on shard 0 (no cross-shard forwarding).
    #[arg(long)]
    same_shard: bool,
    /// Seconds to wait after the window for acknowledged messages still in flight.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    #[command(flatten)]
    load: LoadArgs,
}

/// One sender → recipient pair.
struct Pair {
    sender: Device,
    sender_node: usize,
    recipient: Device,
    recipient_node: usize,
}

/// Progress of one pair, shared by its sender and its recipient's stream reader.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    arrived: AtomicU64,
}

/// What one recipient's stream saw.
struct Arrivals {
    e2e: Histogram<u64>,
    out_of_order: u64,
}

/// Runs the workload and writes its result.
///
/// # Errors
/// Setup failures; the run's own failure (too many errors, lost messages).
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    args.nodes.check()?;
    if !args.same_shard && args.shards < 2 {
        bail!("cross-shard needs at least 2 shards (or pass --same-shard)");
    }
    let base = Instant::now();
    let size = args.load.size_bytes().max(BODY_HEADER_BYTES);
    let pairs = register_pairs(&args).await?;
    println!(
        "courier: {} pairs registered ({})",
        pairs.len(),
        if args.same_shard {
            "same shard"
        } else {
            "cross-shard"
        }
    );
    let mut streams = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        let channel = client::connect(&args.nodes.addrs[pair.recipient_node]).await?;
        streams.push(client::open_stream(channel, &pair.recipient).await?);
    }
    let mut senders = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        senders.push(MessagingClient::new(
            client::connect(&args.nodes.addrs[pair.sender_node]).await?,
        ));
    }
    let progress: Vec<Arc<Progress>> = pairs.iter().map(|_| Arc::default()).collect();
    let window = Window::start(base, args.load.warmup(), args.load.seconds());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    for (index, stream) in streams.into_iter().enumerate() {
        let (progress, stop) = (progress[index].clone(), stop_rx.clone());
        readers.spawn(receive(index, stream, window, progress, stop));
    }
    let mut workers = JoinSet::new();
    for (index, (pair, client)) in pairs.iter().zip(senders).enumerate() {
        let worker = Sender {
            index,
            device: pair.sender.clone(),
            to_user: pair.recipient.user,
            size,
            client,
            progress: progress[index].clone(),
        };
        workers.spawn(worker.run(window));
    }
    tokio::time::sleep_until(window.measure_from.into()).await;
    let appends_before = log_appends(&args.admin_addrs).await;
    let mut sampler = Sampler::start(&args.load.pids);
    sampler.poll_until(window.until).await;
    let (processes, machine) = sampler.finish();
    let appends_after = log_appends(&args.admin_addrs).await;
    let mut tally = Tally::new();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.context("a sender panicked")?);
    }
    let missing = drain(&progress, Duration::from_secs_f64(args.drain.max(0.0))).await;
    let _ = stop_tx.send(true);
    let mut e2e = stats::histogram();
    let mut out_of_order = 0;
    while let Some(reader) = readers.join_next().await {
        let arrivals = reader.context("a stream reader panicked")??;
        e2e.add(&arrivals.e2e)?;
        out_of_order += arrivals.out_of_order;
    }
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let throughput = tally.ok as f64 / window.measured().as_secs_f64();
    let result = RunResult {
        kind: "throughput".to_owned(),
        system: if args.same_shard {
            "courier-same-shard"
        } else {
            "courier"
        }
        .to_owned(),
        concurrency: args.load.concurrency,
        size_bytes: u32::try_from(size).unwrap_or(u32::MAX),
        warmup_s: args.load.warmup,
        seconds: window.measured().as_secs_f64(),
        acked: tally.ok,
        errors: tally.errors,
        first_error: tally.first_error.clone(),
        throughput,
        ack: Latency::of(&tally.latency),
        e2e: Some(Latency::of(&e2e)),
        e2e_missing: missing,
        e2e_out_of_order: out_of_order,
        processes,
        machine,
        log_appends: appends_diff(&appends_before, &appends_after),
        command: stats::command_line(),
    };
    crate::finish_run(&args.load, &result)
}

/// Picks phone numbers on the right shards and registers every sender and recipient.
async fn register_pairs(args: &Args) -> anyhow::Result<Vec<Pair>> {
    let nodes = args.nodes.addrs.len();
    let shards = args.shards;
    let mut book = PhoneBook::new(
        client::run_tag(),
        shards,
        phone_hasher(&args.phone_key_file)?,
    );
    let mut plan = Vec::new();
    for index in 0..args.load.workers() {
        let (from, to) = if args.same_shard {
            (0, 0)
        } else {
            // Sender on shard i % S; recipient on one of the other shards, rotating so every
            // shard pair carries traffic.
            let s = u16::try_from(index % usize::from(shards)).unwrap_or(0);
            let hop = 1 + u16::try_from(index / usize::from(shards)).unwrap_or(0) % (shards - 1);
            (s, (s + hop) % shards)
        };
        let sender_phone = book.on_shard(ShardId::new(from))?;
        let recipient_phone = book.on_shard(ShardId::new(to))?;
        plan.push((
            (sender_phone, index % nodes),
            (recipient_phone, (index + 1) % nodes),
        ));
    }
    let mut channels = Vec::with_capacity(nodes);
    for addr in &args.nodes.addrs {
        channels.push(client::connect(addr).await?);
    }
    let outboxes = args.nodes.outboxes();
    let limit = Arc::new(Semaphore::new(REGISTER_PARALLEL));
    let mut tasks = JoinSet::new();
    for (index, ((sender, sender_node), (recipient, recipient_node))) in
        plan.into_iter().enumerate()
    {
        for (role, phone, node) in [(0, sender, sender_node), (1, recipient, recipient_node)] {
            let (channel, outbox) = (channels[node].clone(), outboxes[node].clone());
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire().await?;
                let device = client::register(channel, &outbox, &phone).await?;
                anyhow::Ok((index, role, node, device))
            });
        }
    }
    let mut slots: Vec<[Option<(usize, Device)>; 2]> =
        (0..args.load.workers()).map(|_| [None, None]).collect();
    while let Some(done) = tasks.join_next().await {
        let (index, role, node, device) = done.context("a registration panicked")??;
        slots[index][role] = Some((node, device));
    }
    slots
        .into_iter()
        .map(|slot| match slot {
            [
                Some((sender_node, sender)),
                Some((recipient_node, recipient)),
            ] => Ok(Pair {
                sender,
                sender_node,
                recipient,
                recipient_node,
            }),
            _ => bail!("a registration did not finish"),
        })
        .collect()
}

/// One closed-loop sender.
struct Sender {
    index: usize,
    device: Device,
    to_user: u64,
    size: usize,
    client: MessagingClient<tonic::transport::Channel>,
    progress: Arc<Progress>,
}

impl Sender {
    // Hot path: one send in flight per sender; the next starts when the answer arrives.
    async fn run(mut self, window: Window) -> Tally {
        let mut tally = Tally::new();
        let pair = u32::try_from(self.index).unwrap_or(u32::MAX);
        let mut seq: u64 = 0;
        while window.running() {
            seq += 1;
            let started = Instant::now();
            let mut body = Vec::with_capacity(self.size);
            body.extend_from_slice(&window.offset_ns(started).to_le_bytes());
            body.extend_from_slice(&pair.to_le_bytes());
            body.extend_from_slice(&seq.to_le_bytes());
            body.resize(self.size, b'x');
            let mut request = client::authed(
                &self.device,
                SendRequest {
                    client_msg_id: format!("b{pair}-{seq}"),
                    to_user: self.to_user,
                    content: Some(Content {
                        body,
                        ..Content::default()
                    }),
                },
            );
            request.set_timeout(SEND_TIMEOUT);
            let outcome = self.client.send(request).await;
            let failed = outcome.is_err();
            if !failed {
                self.progress.acked.fetch_add(1, Ordering::Relaxed);
            }
            tally.finish(
                &window,
                started,
                outcome
                    .map(|_| ())
                    .map_err(|s| format!("Send: {:?}: {}", s.code(), s.message())),
            );
            if failed {
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
        tally
    }
}

/// Reads one recipient's stream until told to stop, timing each arrival.
async fn receive(
    index: usize,
    mut stream: DeviceStream,
    window: Window,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Arrivals> {
    let pair = u32::try_from(index).unwrap_or(u32::MAX);
    let mut arrivals = Arrivals {
        e2e: stats::histogram(),
        out_of_order: 0,
    };
    let mut last_seq = 0;
    loop {
        let frame = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return Ok(arrivals),
            frame = stream.frames.message() => frame,
        };
        let Some(frame) = frame.context("recipient stream failed")? else {
            bail!("the server ended recipient stream {index}");
        };
        let Some(server_frame::Frame::Message(message)) = frame.frame else {
            continue;
        };
        let now = Instant::now();
        if message.seq <= last_seq {
            arrivals.out_of_order += 1;
        }
        last_seq = message.seq;
        let body = message.content.map(|c| c.body).unwrap_or_default();
        let (Some(offset), Some(from)) = (
            body.get(0..8).and_then(|b| b.try_into().ok()),
            body.get(8..12).and_then(|b| b.try_into().ok()),
        ) else {
            continue;
        };
        if u32::from_le_bytes(from) != pair {
            continue;
        }
        progress.arrived.fetch_add(1, Ordering::Relaxed);
        let started = window.at_offset(u64::from_le_bytes(offset));
        if window.counts(started) {
            stats::record(&mut arrivals.e2e, now.saturating_duration_since(started));
        }
    }
}

/// Waits up to `timeout` for every acknowledged message to arrive; returns how many did not.
async fn drain(progress: &[Arc<Progress>], timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let missing: u64 = progress
            .iter()
            .map(|p| {
                p.acked
                    .load(Ordering::Relaxed)
                    .saturating_sub(p.arrived.load(Ordering::Relaxed))
            })
            .sum();
        if missing == 0 || Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Log appends and entries per node, summed over shards (empty when no admin address was given
/// or a node did not answer).
async fn log_appends(admin_addrs: &[String]) -> Vec<LogAppends> {
    let mut out = Vec::new();
    for addr in admin_addrs {
        let status = async {
            let mut admin = AdminClient::new(client::connect(addr).await?);
            anyhow::Ok(admin.status(StatusRequest {}).await?.into_inner())
        }
        .await;
        match status {
            Ok(status) => out.push(LogAppends {
                node_id: status.node_id,
                fsyncs: status.shards.iter().map(|s| s.fsyncs).sum(),
                entries: status.shards.iter().map(|s| s.entries_appended).sum(),
                counters: status
                    .counters
                    .as_ref()
                    .map(NodeCost::from_wire)
                    .unwrap_or_default(),
            }),
            Err(error) => eprintln!("courier: Admin.Status on {addr} failed: {error:#}"),
        }
    }
    out
}

/// Appends during the window: after − before, per node.
fn appends_diff(before: &[LogAppends], after: &[LogAppends]) -> Vec<LogAppends> {
    after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.node_id == a.node_id)?;
            Some(LogAppends {
                node_id: a.node_id,
                fsyncs: a.fsyncs.saturating_sub(b.fsyncs),
                entries: a.entries.saturating_sub(b.entries),
                counters: a.counters.since(&b.counters),
            })
        })
        .collect()
}

/// The keyed phone hasher of a key file of 64 hex digits.
fn phone_hasher(path: &std::path::Path) -> anyhow::Result<courier_proto::PhoneHasher> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the phone-hash key {}", path.display()))?;
    let key = courier_proto::PhoneKey::from_hex(&text)
        .with_context(|| format!("{}: not 64 hex digits", path.display()))?;
    Ok(courier_proto::PhoneHasher::Keyed(key))
}
