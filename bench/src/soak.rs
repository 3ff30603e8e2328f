//! `courier-bench soak`: a steady conversation workload for minutes, run against a cluster with
//! short retention windows, that samples how many records each projection holds (Admin.Status of
//! one node: every shard's pair counts) so that the report shows whether the storage per user
//! levels off once the windows pass.
//!
//! ```text
//!  sender i ──Send, `rate` per second──▶ node i % n ──▶ recipient i's stream (node (i+1) % n)
//!                                                       acks and reads every message it gets
//!  every `sample-seconds`: Admin.Status ──▶ records per projection per user, printed
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{Ack, ClientFrame, Read, SendRequest, client_frame, server_frame};
use courier_proto::pb::events::{Content, Conversation, conversation};
use courier_proto::pb::peer::StatusRequest;
use courier_proto::pb::peer::admin_client::AdminClient;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::client::{self, Device};

/// Deadline of one send.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `courier-bench soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    nodes: client::Nodes,
    /// Peer (admin) address of the node whose replicas are counted (it holds every shard).
    #[arg(long)]
    admin_addr: String,
    /// Sender → recipient pairs (two users each).
    #[arg(long, default_value_t = 16)]
    pairs: usize,
    /// Messages per second each sender sends.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Minutes of load.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 30.0)]
    sample_seconds: f64,
    /// Body size, bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Where the samples are written as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One sample: what was sent and received so far, and the records each projection holds.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    seconds: u64,
    sent: u64,
    received: u64,
    /// Records (key/value pairs) per projection, summed over every shard of the counted node.
    records: BTreeMap<String, u64>,
}

/// The soak's result: its settings and samples.
#[derive(Debug, Serialize)]
struct SoakResult {
    users: usize,
    rate_per_sender: f64,
    samples: Vec<Sample>,
}

/// Counters shared by the senders and the stream readers.
#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    send_errors: AtomicU64,
    received: AtomicU64,
}

/// Runs the soak and prints the table of records per user over time.
///
/// # Errors
/// Setup failures, a stream that ends, or a run where sends mostly failed.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    args.nodes.check()?;
    let nodes = args.nodes.addrs.len();
    let outboxes = args.nodes.outboxes();
    let run = client::run_tag();
    let mut devices = Vec::with_capacity(args.pairs * 2);
    for index in 0..args.pairs * 2 {
        let node = index % nodes;
        let channel = client::connect(&args.nodes.addrs[node]).await?;
        let phone = client::phone(run, u32::try_from(index).context("too many users")?);
        devices.push(client::register(channel, &outboxes[node], &phone).await?);
    }
    println!("soak: {} users registered", devices.len());
    let totals = Arc::new(Totals::default());
    let mut tasks = JoinSet::new();
    for (index, pair) in devices.chunks(2).enumerate() {
        let (sender, recipient) = (pair[0].clone(), pair[1].clone());
        let channel = client::connect(&args.nodes.addrs[(index + 1) % nodes]).await?;
        let stream = client::open_stream(channel, &recipient).await?;
        tasks.spawn(answer(stream, totals.clone()));
        let client = MessagingClient::new(client::connect(&args.nodes.addrs[index % nodes]).await?);
        let load = Load {
            to_user: recipient.user,
            size: args.size,
            every: Duration::from_secs_f64(1.0 / args.rate.max(0.01)),
            until: Instant::now() + Duration::from_secs_f64(args.minutes.max(0.0) * 60.0),
        };
        tasks.spawn(send(sender, client, load, totals.clone()));
    }
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.minutes.max(0.0) * 60.0);
    let every = Duration::from_secs_f64(args.sample_seconds.max(1.0));
    let mut admin = AdminClient::new(client::connect(&args.admin_addr).await?);
    let mut samples = Vec::new();
    loop {
        let now = Instant::now();
        let sample = sample(&mut admin, started, &totals).await?;
        print_sample(&sample, devices.len());
        samples.push(sample);
        if now >= until {
            break;
        }
        tokio::time::sleep(every.min(until.saturating_duration_since(now).max(every))).await;
    }
    tasks.abort_all();
    let (sent, errors) = (
        totals.sent.load(Ordering::Relaxed),
        totals.send_errors.load(Ordering::Relaxed),
    );
    if errors > sent / 100 {
        bail!("{errors} of {} sends failed", sent + errors);
    }
    let result = SoakResult {
        users: devices.len(),
        rate_per_sender: args.rate,
        samples,
    };
    print_table(&result);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// What one sender sends.
struct Load {
    to_user: u64,
    size: usize,
    every: Duration,
    until: Instant,
}

/// Sends to one recipient at a fixed rate until `load.until`.
async fn send(
    device: Device,
    mut client: MessagingClient<tonic::transport::Channel>,
    load: Load,
    totals: Arc<Totals>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(load.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0_u64;
    while Instant::now() < load.until {
        tick.tick().await;
        next += 1;
        let request = SendRequest {
            client_msg_id: format!("soak-{next}"),
            to_user: load.to_user,
            content: Some(Content {
                body: vec![b's'; load.size],
                media: None,
            }),
        };
        let sent =
            tokio::time::timeout(SEND_TIMEOUT, client.send(client::authed(&device, request)));
        match sent.await {
            Ok(Ok(_)) => totals.sent.fetch_add(1, Ordering::Relaxed),
            Ok(Err(_)) | Err(_) => totals.send_errors.fetch_add(1, Ordering::Relaxed),
        };
    }
    Ok(())
}

/// Acks and reads every message a recipient's stream delivers, as a phone on screen does.
async fn answer(mut stream: client::DeviceStream, totals: Arc<Totals>) -> anyhow::Result<()> {
    while let Some(frame) = stream.frames.message().await.context("stream")? {
        let Some(server_frame::Frame::Message(message)) = frame.frame else {
            continue;
        };
        totals.received.fetch_add(1, Ordering::Relaxed);
        let conversation = Conversation {
            with: Some(conversation::With::User(message.sender_user)),
        };
        for frame in [
            client_frame::Frame::Ack(Ack {
                up_to_seq: message.seq,
            }),
            client_frame::Frame::Read(Read {
                conversation: Some(conversation),
                up_to_seq: message.seq,
            }),
        ] {
            stream
                .out
                .send(ClientFrame { frame: Some(frame) })
                .await
                .context("stream closed")?;
        }
    }
    bail!("a recipient's stream ended")
}

/// Reads the counted node's records per projection.
async fn sample(
    admin: &mut AdminClient<tonic::transport::Channel>,
    started: Instant,
    totals: &Totals,
) -> anyhow::Result<Sample> {
    let status = admin
        .status(StatusRequest {})
        .await
        .context("Admin.Status")?
        .into_inner();
    let mut records = BTreeMap::new();
    for shard in &status.shards {
        for projection in &shard.projections {
            *records.entry(projection.projection.clone()).or_insert(0) += projection.pairs;
        }
    }
    Ok(Sample {
        seconds: started.elapsed().as_secs(),
        sent: totals.sent.load(Ordering::Relaxed),
        received: totals.received.load(Ordering::Relaxed),
        records,
    })
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn per_user(records: u64, users: usize) -> f64 {
    records as f64 / users.max(1) as f64
}

fn print_sample(sample: &Sample, users: usize) {
    let total: u64 = sample.records.values().sum();
    println!(
        "soak: {:>5} s, {} sent, {} received, {:.1} records per user",
        sample.seconds,
        sample.sent,
        sample.received,
        per_user(total, users)
    );
}

/// The markdown table: records per user per projection at each sample.
fn print_table(result: &SoakResult) {
    let Some(last) = result.samples.last() else {
        return;
    };
    let names: Vec<&String> = last.records.keys().collect();
    let header: Vec<String> = names.iter().map(|n| (*n).clone()).collect();
    println!("\n| s | messages sent | {} | total |", header.join(" | "));
    println!("|{}", " ---: |".repeat(names.len() + 3));
    for sample in &result.samples {
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                format!(
                    "{:.1}",
                    per_user(sample.records.get(*n).copied().unwrap_or(0), result.users)
                )
            })
            .collect();
        let total: u64 = sample.records.values().sum();
        println!(
            "| {} | {} | {} | {:.1} |",
            sample.seconds,
            sample.sent,
            cells.join(" | "),
            per_user(total, result.users)
        );
    }
}
