//! `courier-bench soak`: a steady conversation workload for minutes, run against a cluster with
//! short retention windows, that samples how many records each projection holds (Admin.Status of
//! one node: every shard's pair counts) so that the report shows whether the storage per user
//! levels off once the windows pass.
//!
//! ```text
//!  sender i ──Send, `rate` per second──▶ node i % n ──▶ recipient i's stream (node (i+1) % n)
//!                                                       acks and reads every message it gets
//!  every `sample-seconds`: Admin.Status ──▶ records per projection per user, printed
//!  after the load: verify every shard from genesis, then from its checkpoint, and inspect one
//!  user at an archived index, timed (the ops tool's promise at any age)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{Ack, ClientFrame, Read, SendRequest, client_frame, server_frame};
use courier_proto::pb::events::{Content, Conversation, conversation};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::{
    InspectUserRequest, ProjectionJobUpdate, StatusRequest, VerifyProjectionRequest,
    projection_job_update,
};
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
    /// The cluster's log archive directory (`archive.dir`): its size is sampled.
    #[arg(long)]
    archive_dir: Option<PathBuf>,
}

/// One sample: what was sent and received so far, and the records each projection holds.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    seconds: u64,
    sent: u64,
    received: u64,
    /// Records (key/value pairs) per projection, summed over every shard of the counted node.
    records: BTreeMap<String, u64>,
    /// Log entries written, summed over the counted node's shards (last log index).
    log_entries: u64,
    /// Of those, entries purged from its live log (readable only from the archive).
    purged_entries: u64,
    /// Bytes in the archive directory.
    archive_bytes: u64,
}

/// One shard's verify, from genesis and from its checkpoint.
#[derive(Clone, Debug, Serialize)]
struct ShardVerify {
    shard: u32,
    applied: u64,
    purged: u64,
    genesis: Timed,
    checkpoint: Timed,
}

/// One timed replay: events replayed, from which checkpoint, seconds, and whether it matched.
#[derive(Clone, Debug, Serialize)]
struct Timed {
    applied: u64,
    from_checkpoint: u64,
    events: u64,
    seconds: f64,
    ok: bool,
}

/// The soak's result: its settings and samples.
#[derive(Debug, Serialize)]
struct SoakResult {
    users: usize,
    rate_per_sender: f64,
    samples: Vec<Sample>,
    verifies: Vec<ShardVerify>,
    /// `InspectUser` of one soak user at its shard's newest purged index.
    inspect: Option<Inspected>,
}

/// A timed `InspectUser` at an archived index.
#[derive(Clone, Debug, Serialize)]
struct Inspected {
    shard: u32,
    at: u64,
    events: u64,
    seconds: f64,
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
        let sample = sample(&mut admin, started, &totals, args.archive_dir.as_deref()).await?;
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
    let (verifies, inspect) = at_any_age(&mut admin, devices[1].user).await?;
    let result = SoakResult {
        users: devices.len(),
        rate_per_sender: args.rate,
        samples,
        verifies,
        inspect,
    };
    print_table(&result);
    print_ages(&result);
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

type Admin = AdminClient<tonic::transport::Channel>;

/// Reads the counted node's records per projection, its log figures and the archive's size.
async fn sample(
    admin: &mut Admin,
    started: Instant,
    totals: &Totals,
    archive: Option<&Path>,
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
        log_entries: status.shards.iter().map(|s| s.last_log_index).sum(),
        purged_entries: status.shards.iter().map(|s| s.purged_index).sum(),
        archive_bytes: archive.map_or(0, bytes_under),
    })
}

/// Bytes of the files under `dir` (0 when it does not exist yet).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => bytes_under(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// After the load: every shard verified from genesis (which writes a checkpoint when it
/// matches) and then from that checkpoint, and `user` inspected at its shard's newest purged
/// index, each timed. Fails when a verify finds a mismatch.
async fn at_any_age(
    admin: &mut Admin,
    user: u64,
) -> anyhow::Result<(Vec<ShardVerify>, Option<Inspected>)> {
    let status = admin
        .status(StatusRequest {})
        .await
        .context("Admin.Status")?
        .into_inner();
    let mut verifies = Vec::new();
    for shard in &status.shards {
        let genesis = verify(admin, shard.shard, true).await?;
        let checkpoint = verify(admin, shard.shard, false).await?;
        let line = ShardVerify {
            shard: shard.shard,
            // The genesis replay's index (the shard applies on while it runs).
            applied: genesis.applied,
            purged: shard.purged_index,
            genesis,
            checkpoint,
        };
        println!(
            "soak: shard {} verified from genesis ({} events, {:.2} s) and from checkpoint {} ({} events, {:.2} s)",
            line.shard,
            line.genesis.events,
            line.genesis.seconds,
            line.checkpoint.from_checkpoint,
            line.checkpoint.events,
            line.checkpoint.seconds
        );
        if !line.genesis.ok || !line.checkpoint.ok {
            bail!("shard {}: a projection does not match its log", line.shard);
        }
        verifies.push(line);
    }
    let shard_count = u16::try_from(status.shards.len()).context("shard count")?;
    let user_id = courier_proto::UserId::new(user).context("a registered user id is nonzero")?;
    let shard = u32::from(courier_proto::shard_of(user_id, shard_count).get());
    let purged = status
        .shards
        .iter()
        .find(|s| s.shard == shard)
        .map_or(0, |s| s.purged_index);
    if purged == 0 {
        println!("soak: shard {shard} purged nothing; no archived index to inspect");
        return Ok((verifies, None));
    }
    let started = Instant::now();
    let update = follow(
        admin
            .inspect_user(InspectUserRequest { user, at: purged })
            .await
            .context("Admin.InspectUser")?
            .into_inner(),
    )
    .await?;
    let Some(projection_job_update::Update::Inspected(inspected)) = update else {
        bail!("InspectUser answered without a result");
    };
    Ok((
        verifies,
        Some(Inspected {
            shard,
            at: inspected.at,
            events: inspected.events_replayed,
            seconds: started.elapsed().as_secs_f64(),
        }),
    ))
}

/// Verifies every projection of `shard` on the counted node, timed.
async fn verify(admin: &mut Admin, shard: u32, from_genesis: bool) -> anyhow::Result<Timed> {
    let started = Instant::now();
    let update = follow(
        admin
            .verify_projection(VerifyProjectionRequest {
                shard,
                projection: String::new(),
                from_genesis,
            })
            .await
            .context("Admin.VerifyProjection")?
            .into_inner(),
    )
    .await?;
    let Some(projection_job_update::Update::Verified(verified)) = update else {
        bail!("VerifyProjection answered without a result");
    };
    Ok(Timed {
        applied: verified.applied_index,
        from_checkpoint: verified.from_checkpoint,
        events: verified.events_replayed,
        seconds: started.elapsed().as_secs_f64(),
        ok: verified.mismatches.is_empty(),
    })
}

/// The last update of a job's stream (its result), past the progress updates.
async fn follow(
    mut stream: tonic::Streaming<ProjectionJobUpdate>,
) -> anyhow::Result<Option<projection_job_update::Update>> {
    let mut last = None;
    while let Some(update) = stream.message().await.context("job stream")? {
        if !matches!(
            update.update,
            Some(projection_job_update::Update::Progress(_))
        ) {
            last = update.update;
        }
    }
    Ok(last)
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
    println!(
        "\n| s | messages sent | {} | total | log entries (purged) | archive MiB |",
        header.join(" | ")
    );
    println!("|{}", " ---: |".repeat(names.len() + 5));
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
            "| {} | {} | {} | {:.1} | {} ({}) | {:.1} |",
            sample.seconds,
            sample.sent,
            cells.join(" | "),
            per_user(total, result.users),
            sample.log_entries,
            sample.purged_entries,
            mib(sample.archive_bytes)
        );
    }
}

#[allow(clippy::cast_precision_loss, reason = "sizes far below 2^52")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1_u32 << 20)
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn rate(events: u64, seconds: f64) -> f64 {
    events as f64 / seconds.max(1e-9)
}

/// The markdown table of the verifies and the inspect after the load.
fn print_ages(result: &SoakResult) {
    println!(
        "\n| shard | applied | purged | verify from genesis: events, s, events/s | from checkpoint: at, events, s |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for v in &result.verifies {
        println!(
            "| {} | {} | {} | {}, {:.2}, {:.0} | {}, {}, {:.2} |",
            v.shard,
            v.applied,
            v.purged,
            v.genesis.events,
            v.genesis.seconds,
            rate(v.genesis.events, v.genesis.seconds),
            v.checkpoint.from_checkpoint,
            v.checkpoint.events,
            v.checkpoint.seconds
        );
    }
    if let Some(i) = &result.inspect {
        println!(
            "\nInspectUser at archived index {} of shard {}: {} events replayed, {:.2} s",
            i.at, i.shard, i.events, i.seconds
        );
    }
}
