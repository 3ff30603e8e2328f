//! `courier-ops demo`: two users on different shards talk through a running cluster, showing
//! every step and every receipt as it arrives, then measuring send-to-arrival latency.
//!
//! Dev mode only: registration codes are read from the nodes' `sms-outbox.log` files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    Ack, ClientFrame, Open, Read, RegisterRequest, RequestCodeRequest, SendRequest, ServerFrame,
    client_frame, server_frame,
};
use courier_proto::pb::events::{self, ReceiptState};
use courier_proto::{UserId, shard_of};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Where the demo runs.
#[derive(Debug, Clone)]
pub(crate) struct Demo {
    /// Client address and data directory of the node Alice uses.
    pub(crate) alice_node: (String, PathBuf),
    /// Client address and data directory of the node Bob uses.
    pub(crate) bob_node: (String, PathBuf),
    /// The cluster's shard count.
    pub(crate) shards: u16,
    /// Messages sent for the latency measurement.
    pub(crate) latency_samples: usize,
}

struct User {
    name: &'static str,
    id: u64,
    bearer: String,
}

/// The name on the development PKI's client listener certificate (`courier-ops certs dev`),
/// which the demo verifies when the cluster runs TLS.
const CLIENT_SERVER_NAME: &str = "localhost";

/// A channel to a client listener, whose certificate names `CLIENT_SERVER_NAME`.
async fn channel(addr: &str) -> anyhow::Result<Channel> {
    crate::transport::endpoint(addr, Some(CLIENT_SERVER_NAME), Duration::from_secs(3))?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

fn authed<T>(user: &User, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", user.bearer.parse()?);
    Ok(request)
}

async fn register(
    name: &'static str,
    phone: &str,
    addr: &str,
    data_dir: &Path,
) -> anyhow::Result<User> {
    let mut client = RegistrationClient::new(channel(addr).await?);
    client
        .request_code(RequestCodeRequest {
            phone_number: phone.to_owned(),
        })
        .await?;
    let outbox = std::fs::read_to_string(data_dir.join("sms-outbox.log"))
        .context("reading the dev SMS outbox")?;
    let code = outbox
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{phone} ")))
        .context("no code for the number")?;
    let response = client
        .register(RegisterRequest {
            phone_number: phone.to_owned(),
            code: code.to_owned(),
            device_name: name.to_owned(),
        })
        .await?
        .into_inner();
    let token: String = response
        .device_token
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(User {
        name,
        id: response.user_id,
        bearer: format!("Bearer {}.{}.{token}", response.user_id, response.device_id),
    })
}

async fn open(
    addr: &str,
    user: &User,
    after: u64,
) -> anyhow::Result<(tonic::Streaming<ServerFrame>, mpsc::Sender<ClientFrame>)> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(ClientFrame {
        frame: Some(client_frame::Frame::Open(Open {
            resume_after_seq: after,
            hide_last_seen: false,
            receipts_after_index: 0,
            receipts_after_position: Vec::new(),
        })),
    })
    .await?;
    let frames = MessagingClient::new(channel(addr).await?)
        .stream(authed(user, ReceiverStream::new(rx))?)
        .await?
        .into_inner();
    Ok((frames, tx))
}

fn short(id: &[u8]) -> String {
    id.iter()
        .rev()
        .take(3)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs the demo.
///
/// # Errors
/// Any RPC failure, with context.
pub(crate) async fn run(demo: Demo) -> anyhow::Result<()> {
    let (alice, bob) = register_both(&demo).await?;
    let (mut alice_frames, _alice_out) = open(&demo.alice_node.0, &alice, 0).await?;
    let mut messaging = MessagingClient::new(channel(&demo.alice_node.0).await?);
    println!("demo: bob is offline; alice sends 3 messages");
    send_three(&mut messaging, &alice, &bob).await?;
    println!("demo: bob connects, receives, acks and reads");
    let (mut bob_frames, bob_out) = open(&demo.bob_node.0, &bob, 0).await?;
    let last = receive_ack_read(&mut bob_frames, &bob_out, &alice).await?;
    await_read_receipts(&mut alice_frames).await?;
    latency(&demo, &alice, &bob, &mut messaging, &mut bob_frames, last).await
}

/// Numbers tried for bob before the demo settles for a bob on alice's shard.
const BOB_NUMBERS_MAX: u32 = 16;

/// Registers alice and bob, bob on another shard than alice when it can. User ids are a keyed
/// hash only the cluster can compute, so the demo learns a number's shard by registering it
/// (with S shards, a number lands elsewhere with probability 1 − 1/S).
async fn register_both(demo: &Demo) -> anyhow::Result<(User, User)> {
    let shard = |user: &User| UserId::new(user.id).map(|id| shard_of(id, demo.shards).get());
    let alice = register(
        "alice",
        "+15550100001",
        &demo.alice_node.0,
        &demo.alice_node.1,
    )
    .await?;
    let mut bob = None;
    for i in 2..2 + BOB_NUMBERS_MAX {
        let phone = format!("+1555010{i:04}");
        let candidate = register("bob", &phone, &demo.bob_node.0, &demo.bob_node.1).await?;
        let elsewhere = shard(&candidate) != shard(&alice);
        bob = Some(candidate);
        if elsewhere || demo.shards < 2 {
            break;
        }
    }
    let bob = bob.context("no number registered for bob")?;
    println!(
        "demo: {} (user {}, shard {}) and {} (user {}, shard {}) registered",
        alice.name,
        alice.id,
        shard(&alice).unwrap_or_default(),
        bob.name,
        bob.id,
        shard(&bob).unwrap_or_default()
    );
    Ok((alice, bob))
}

/// Alice sends bob three messages.
async fn send_three(
    messaging: &mut MessagingClient<Channel>,
    alice: &User,
    bob: &User,
) -> anyhow::Result<()> {
    for (i, text) in ["hi bob", "are you there?", "call me"].iter().enumerate() {
        let request = SendRequest {
            client_msg_id: format!("demo-{i}"),
            to_user: bob.id,
            content: Some(events::Content {
                body: text.as_bytes().to_vec(),
                media: None,
            }),
        };
        let sent = messaging.send(authed(alice, request)?).await?.into_inner();
        println!(
            "  alice  ✓  sent      {:?} (message …{})",
            text,
            short(&sent.message_id)
        );
    }
    Ok(())
}

/// Bob receives the three messages, acks them and marks alice's conversation read; returns the
/// last seq received.
async fn receive_ack_read(
    bob_frames: &mut tonic::Streaming<ServerFrame>,
    bob_out: &mpsc::Sender<ClientFrame>,
    alice: &User,
) -> anyhow::Result<u64> {
    let mut last = 0;
    while last < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), bob_frames.message())
            .await
            .context("bob waited 10 s")??
            .context("stream ended")?;
        if let Some(server_frame::Frame::Message(m)) = frame.frame {
            let text = m
                .content
                .map(|c| String::from_utf8_lossy(&c.body).into_owned())
                .unwrap_or_default();
            println!(
                "  bob    received  seq {} {:?} from user {}",
                m.seq, text, m.sender_user
            );
            last = m.seq;
        }
    }
    bob_out
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: last })),
        })
        .await?;
    let conversation = Some(events::Conversation {
        with: Some(events::conversation::With::User(alice.id)),
    });
    bob_out
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Read(Read {
                conversation,
                up_to_seq: last,
            })),
        })
        .await?;
    Ok(last)
}

/// Alice's stream shows each receipt until all three messages are read.
async fn await_read_receipts(
    alice_frames: &mut tonic::Streaming<ServerFrame>,
) -> anyhow::Result<()> {
    let mut read = 0;
    while read < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), alice_frames.message())
            .await
            .context("alice waited 10 s for receipts")??
            .context("stream ended")?;
        if let Some(server_frame::Frame::Receipt(r)) = frame.frame {
            let mark = match r.state() {
                ReceiptState::Sent => "✓  sent     ",
                ReceiptState::Delivered => "✓✓ delivered",
                ReceiptState::Read => "✓✓ read (blue)",
                ReceiptState::Unspecified => "?",
            };
            println!("  alice  {mark} message …{}", short(&r.message_id));
            if r.state() == ReceiptState::Read {
                read += 1;
            }
        }
    }
    Ok(())
}

async fn latency(
    demo: &Demo,
    alice: &User,
    bob: &User,
    messaging: &mut MessagingClient<Channel>,
    bob_frames: &mut tonic::Streaming<ServerFrame>,
    mut last: u64,
) -> anyhow::Result<()> {
    if demo.latency_samples == 0 {
        return Ok(());
    }
    println!(
        "demo: measuring send → arrival on bob's live stream over {} messages (cross-shard)",
        demo.latency_samples
    );
    let mut samples = Vec::with_capacity(demo.latency_samples);
    for i in 0..demo.latency_samples {
        let started = Instant::now();
        let request = SendRequest {
            client_msg_id: format!("lat-{i}"),
            to_user: bob.id,
            content: Some(events::Content {
                body: vec![b'x'; 100],
                media: None,
            }),
        };
        messaging.send(authed(alice, request)?).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), bob_frames.message())
                .await
                .context("no arrival in 10 s")??
                .context("stream ended")?;
            if let Some(server_frame::Frame::Message(m)) = frame.frame {
                if m.seq <= last {
                    bail!("seq {} after {last}: out of order", m.seq);
                }
                last = m.seq;
                break;
            }
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "demo: send → arrival p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    );
    Ok(())
}
