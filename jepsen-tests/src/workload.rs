//! The clients: users with two devices each, send workers ("processes" in Jepsen terms) and one
//! long-lived stream per device, plus the final drain.
//!
//! ```text
//!  send worker p:  pick sender device, recipient ─ Invoke ─▶ Send(client_msg_id "p-c", body "p-c")
//!                  ◀─ Complete ok(message id) | fail(definite error) | info(unknown; retried with
//!                     the same client id, from the same device, on another node)
//!  device stream:  Open{resume_after_seq = last seq seen} on a random node ─ SessionStart
//!                  ◀─ InboxMessage ─ Delivered (client id read back from the body); Ack / Read sent
//!                  ◀─ ReceiptUpdate ─ Receipt (primary devices only, see `record_receipts`)
//!                  each session lives 5–15 s, then the device reconnects elsewhere and resumes
//!  drain:          after the heal, every device of every user on every node from seq 0
//! ```
//!
//! Outcomes follow Jepsen's rule: `fail` only when the status proves the send was not applied
//! (a rejection before any proposal: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...);
//! everything else — timeouts, UNAVAILABLE (the proposal may have reached a leader that then
//! lost its lease), connection errors — is `info`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    Ack, ClientFrame, LinkDeviceRequest, Open, Read, RegisterRequest, RegisterResponse,
    RequestCodeRequest, SendRequest, ServerFrame, client_frame, server_frame,
};
use courier_proto::pb::events::{self, ReceiptState as WireReceiptState};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::admin::{channel, describe};
use crate::history::{
    Complete, Delivered, Invoke, Outcome, Receipt, ReceiptState, Record, SendOp, SessionStart,
};
use crate::nodes::NodeSpec;
use crate::recorder::Recorder;

/// Deadline of one Send attempt; past it the attempt is `info`.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per logical send (the first plus retries of an `info`).
pub const SEND_ATTEMPTS_MAX: u32 = 4;
/// Probability that an acknowledged send is sent once more with the same client id.
const RESEND_ACKED_PROBABILITY: f64 = 0.05;
/// Deadline for a stream to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames buffered towards the server per stream (acks and reads; dropped when full).
const CLIENT_FRAMES_MAX: usize = 16;
/// How often a stream acks what it received.
const ACK_INTERVAL: Duration = Duration::from_millis(500);
/// Probability that a received message is also marked read.
const READ_PROBABILITY: f64 = 0.25;
/// A drain session ends after this long without a frame (once it has what was seen before).
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// A drain session that has fewer messages than were seen before waits this long for more.
const DRAIN_SHORT_IDLE: Duration = Duration::from_secs(10);
/// A drain session ends after this long in any case.
const DRAIN_SESSION_MAX: Duration = Duration::from_secs(30);
/// Drain sessions open at once.
const DRAIN_CONCURRENCY: usize = 6;
/// Attempts per drain session (device, node) before its failure is recorded as it is.
const DRAIN_ATTEMPTS: u32 = 3;

/// One registered device.
#[derive(Clone, Debug)]
pub struct Device {
    /// The user.
    pub user: u64,
    /// The device of that user.
    pub device: u32,
    /// The `authorization` value: `Bearer <user>.<device>.<hex token>`.
    pub bearer: String,
    /// True for the primary device (the one that registered).
    pub primary: bool,
}

/// A user and its devices (primary first).
#[derive(Clone, Debug)]
pub struct User {
    /// The user id.
    pub id: u64,
    /// Its devices.
    pub devices: Vec<Device>,
}

/// A node as the clients see it: id and a channel to its client port.
#[derive(Clone, Debug)]
pub struct ClientNode {
    /// The node id.
    pub id: u32,
    /// A lazily connecting channel to the client API.
    pub channel: Channel,
}

impl ClientNode {
    /// Client channels for every node.
    ///
    /// # Errors
    ///
    /// A malformed address.
    pub fn all(specs: &[NodeSpec]) -> anyhow::Result<Vec<ClientNode>> {
        specs
            .iter()
            .map(|spec| {
                Ok(ClientNode {
                    id: spec.id,
                    channel: channel(&spec.client_addr())?,
                })
            })
            .collect()
    }
}

fn authed<T>(device: &Device, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", device.bearer.parse()?);
    Ok(request)
}

fn device_of(response: &RegisterResponse, primary: bool) -> Device {
    Device {
        user: response.user_id,
        device: response.device_id,
        bearer: format!(
            "Bearer {}.{}.{}",
            response.user_id,
            response.device_id,
            crate::hex(&response.device_token)
        ),
        primary,
    }
}

/// Registers `count` users (dev mode: codes are read from the receiving node's
/// `sms-outbox.log`), each with a primary and a linked second device, spread over the nodes.
///
/// # Errors
///
/// A user could not be registered within a few attempts.
pub async fn register_users(specs: &[NodeSpec], count: u32) -> anyhow::Result<Vec<User>> {
    let mut users = Vec::new();
    for i in 0..count {
        let index = usize::try_from(i).unwrap_or(0) % specs.len().max(1);
        let spec = specs.get(index).context("no nodes")?;
        let phone = format!("+155501{i:05}");
        let mut last_error = None;
        let mut registered = None;
        let sms = spec.data_dir().join("sms-outbox.log");
        for _attempt in 0..5 {
            match register_one(channel(&spec.client_addr())?, &sms, &phone).await {
                Ok(user) => {
                    registered = Some(user);
                    break;
                }
                Err(error) => {
                    tracing::debug!(%error, phone_index = i, "registration attempt failed");
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        match registered {
            Some(user) => users.push(user),
            None => bail!(
                "cannot register user {i} on node {}: {}",
                spec.id,
                last_error.map_or_else(String::new, |e| format!("{e:#}"))
            ),
        }
    }
    Ok(users)
}

/// Registers one user with a primary and a linked second device over `channel` (dev mode: the
/// code is read from the node's SMS outbox file `sms`).
///
/// # Errors
///
/// An RPC failed or timed out, or no code for `phone` is in the outbox.
pub async fn register_one(channel: Channel, sms: &Path, phone: &str) -> anyhow::Result<User> {
    let timeout = Duration::from_secs(10);
    let mut client = RegistrationClient::new(channel);
    let request = RequestCodeRequest {
        phone_number: phone.to_owned(),
    };
    tokio::time::timeout(timeout, client.request_code(request))
        .await
        .context("RequestCode timed out")?
        .map_err(|s| anyhow::anyhow!("RequestCode: {}", describe(&s)))?;
    let outbox = std::fs::read_to_string(sms).context("reading the dev SMS outbox")?;
    let code = outbox
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(&format!("{phone} ")))
        .context("no code for the number in the SMS outbox")?
        .trim()
        .to_owned();
    let request = RegisterRequest {
        phone_number: phone.to_owned(),
        code,
        device_name: "primary".to_owned(),
    };
    let response = tokio::time::timeout(timeout, client.register(request))
        .await
        .context("Register timed out")?
        .map_err(|s| anyhow::anyhow!("Register: {}", describe(&s)))?
        .into_inner();
    let primary = device_of(&response, true);
    let request = authed(
        &primary,
        LinkDeviceRequest {
            device_name: "second".to_owned(),
        },
    )?;
    let linked = tokio::time::timeout(timeout, client.link_device(request))
        .await
        .context("LinkDevice timed out")?
        .map_err(|s| anyhow::anyhow!("LinkDevice: {}", describe(&s)))?
        .into_inner();
    let second = device_of(&linked, false);
    Ok(User {
        id: primary.user,
        devices: vec![primary, second],
    })
}

/// What the workload shares between its tasks.
#[derive(Debug)]
pub struct Shared {
    /// The history.
    pub recorder: Arc<Recorder>,
    /// Every user.
    pub users: Vec<User>,
    /// Client channels, one per node.
    pub nodes: Vec<ClientNode>,
    /// Highest inbox seq any session saw, per user (the drain waits for at least that many).
    pub highest_seq: Mutex<BTreeMap<u64, u64>>,
}

impl Shared {
    fn saw_seq(&self, user: u64, seq: u64) {
        let mut highest = self
            .highest_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = highest.entry(user).or_insert(0);
        *entry = (*entry).max(seq);
    }

    fn highest(&self, user: u64) -> u64 {
        self.highest_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&user)
            .copied()
            .unwrap_or(0)
    }
}

/// Classifies a failed Send: `Fail` only for statuses that prove nothing was proposed.
pub fn classify(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let error = describe(status);
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::ResourceExhausted
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => Outcome::Fail { error },
        _ => Outcome::Info { error },
    }
}

/// The `retry-after-ms` hint of a status, capped at one second.
fn retry_after(status: &tonic::Status) -> Option<Duration> {
    let ms: u64 = status
        .metadata()
        .get("retry-after-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(1_000)))
}

/// One send worker: sends until `stop`, at about `1 / pause_mean` sends per second.
pub async fn send_worker(
    shared: Arc<Shared>,
    process: u32,
    seed: u64,
    pause_mean: Duration,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counter: u64 = 0;
    while !stop.is_cancelled() {
        counter = counter.saturating_add(1);
        let client_id = format!("{process}-{counter}");
        let (Some(sender), Some(recipient)) = pick_pair(&shared.users, &mut rng) else {
            return;
        };
        let Some(device) = sender.devices.choose(&mut rng).cloned() else {
            return;
        };
        let op = SendOp {
            from_user: sender.id,
            to_user: recipient.id,
            client_id: client_id.clone(),
        };
        for attempt in 1..=SEND_ATTEMPTS_MAX {
            let Some(node) = shared.nodes.choose(&mut rng).cloned() else {
                return;
            };
            let (outcome, pause) = send_once(&shared, process, &device, &op, &node).await;
            if matches!(outcome, Outcome::Ok { .. }) && rng.random_bool(RESEND_ACKED_PROBABILITY) {
                // A client that lost the answer resends: the server must answer with the same
                // message id and store nothing new. Timeouts that hide a committed send are
                // rare on this machine, so without this the dedup path would seldom run.
                let Some(node) = shared.nodes.choose(&mut rng).cloned() else {
                    return;
                };
                send_once(&shared, process, &device, &op, &node).await;
            }
            if !matches!(outcome, Outcome::Info { .. }) || attempt == SEND_ATTEMPTS_MAX {
                break;
            }
            // Retry an unknown outcome with the same client id (the server deduplicates), after
            // the server's hint or a short backoff, unless the workload is over.
            let backoff = pause.unwrap_or(Duration::from_millis(
                200u64.saturating_mul(u64::from(attempt)),
            ));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
        }
        let jitter = rng.random_range(0.5..1.5);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause_mean.mul_f64(jitter)) => {}
        }
    }
}

fn pick_pair<'u>(users: &'u [User], rng: &mut StdRng) -> (Option<&'u User>, Option<&'u User>) {
    let sender = users.choose(rng);
    let others: Vec<&User> = users
        .iter()
        .filter(|u| Some(u.id) != sender.map(|s| s.id))
        .collect();
    (sender, others.choose(rng).copied())
}

/// One attempt: Invoke, the RPC, Complete. Returns the outcome and the server's retry hint.
async fn send_once(
    shared: &Shared,
    process: u32,
    device: &Device,
    op: &SendOp,
    node: &ClientNode,
) -> (Outcome, Option<Duration>) {
    let recorder = &shared.recorder;
    let op_id = recorder.next_op_id();
    recorder.record(&Record::Invoke(Invoke {
        process,
        op_id,
        time_ms: recorder.now_ms(),
        op: op.clone(),
    }));
    let request = SendRequest {
        client_msg_id: op.client_id.clone(),
        to_user: op.to_user,
        content: Some(events::Content {
            body: op.client_id.as_bytes().to_vec(),
            media: None,
        }),
    };
    let (outcome, hint) = match authed(device, request) {
        Err(error) => (
            Outcome::Fail {
                error: format!("harness could not build the request: {error}"),
            },
            None,
        ),
        Ok(request) => {
            let mut client = MessagingClient::new(node.channel.clone());
            match tokio::time::timeout(SEND_TIMEOUT, client.send(request)).await {
                Err(_) => (
                    Outcome::Info {
                        error: format!("timeout after {SEND_TIMEOUT:?} on node {}", node.id),
                    },
                    None,
                ),
                Ok(Ok(response)) => (
                    Outcome::Ok {
                        message_id: crate::hex(&response.into_inner().message_id),
                    },
                    None,
                ),
                Ok(Err(status)) => (classify(&status), retry_after(&status)),
            }
        }
    };
    recorder.record(&Record::Complete(Complete {
        process,
        op_id,
        time_ms: recorder.now_ms(),
        outcome: outcome.clone(),
    }));
    (outcome, hint)
}

/// Receipts are recorded from primary devices only. The checker keys receipt monotonicity by
/// the observing user, while the promise (TESTING.md) is per device: two devices of one user
/// streaming from replicas at different applied indexes legitimately see different progress at
/// the same moment, which the checker would report as a regression.
fn record_receipts(device: &Device) -> bool {
    device.primary
}

/// An open stream: server frames in, client frames out.
struct OpenStream {
    frames: tonic::Streaming<ServerFrame>,
    out: mpsc::Sender<ClientFrame>,
}

async fn open_stream(
    node: &ClientNode,
    device: &Device,
    resume_after_seq: u64,
    receipts_after_position: Vec<u8>,
) -> anyhow::Result<OpenStream> {
    let (out, rx) = mpsc::channel(CLIENT_FRAMES_MAX);
    out.send(ClientFrame {
        frame: Some(client_frame::Frame::Open(Open {
            resume_after_seq,
            hide_last_seen: false,
            receipts_after_index: 0,
            receipts_after_position,
        })),
    })
    .await
    .context("queueing Open")?;
    let mut client = MessagingClient::new(node.channel.clone());
    let request = authed(device, ReceiverStream::new(rx))?;
    let frames = tokio::time::timeout(OPEN_TIMEOUT, client.stream(request))
        .await
        .context("opening the stream timed out")?
        .map_err(|s| anyhow::anyhow!("opening the stream: {}", describe(&s)))?
        .into_inner();
    Ok(OpenStream { frames, out })
}

/// What one server frame of a session means for the history.
struct FrameRecord {
    /// The record to append, if the frame is one the history keeps.
    record: Option<Record>,
    /// For an inbox message: its seq and conversation.
    message: Option<(u64, Option<events::Conversation>)>,
}

/// Turns one server frame of `session` into its history record.
fn frame_record(shared: &Shared, device: &Device, session: u64, frame: ServerFrame) -> FrameRecord {
    let time_ms = shared.recorder.now_ms();
    match frame.frame {
        Some(server_frame::Frame::Message(message)) => {
            let client_id = message
                .content
                .as_ref()
                .map(|c| String::from_utf8_lossy(&c.body).into_owned())
                .unwrap_or_default();
            shared.saw_seq(device.user, message.seq);
            FrameRecord {
                record: Some(Record::Delivered(Delivered {
                    session,
                    seq: message.seq,
                    message_id: crate::hex(&message.message_id),
                    from_user: message.sender_user,
                    client_id,
                    time_ms,
                })),
                message: Some((message.seq, message.conversation)),
            }
        }
        Some(server_frame::Frame::Receipt(receipt)) if record_receipts(device) => {
            let state = match receipt.state() {
                WireReceiptState::Sent => Some(ReceiptState::Sent),
                WireReceiptState::Delivered => Some(ReceiptState::Delivered),
                WireReceiptState::Read => Some(ReceiptState::Read),
                WireReceiptState::Unspecified => {
                    tracing::warn!(session, "receipt frame without a state");
                    None
                }
            };
            FrameRecord {
                record: state.map(|state| {
                    Record::Receipt(Receipt {
                        observer_user: device.user,
                        message_id: crate::hex(&receipt.message_id),
                        recipient_user: receipt.recipient_user,
                        state,
                        time_ms,
                    })
                }),
                message: None,
            }
        }
        _ => FrameRecord {
            record: None,
            message: None,
        },
    }
}

/// One device's live stream until `stop`: sessions of 5–15 s on random nodes, each resuming
/// after the last seq this device saw; acks every `ACK_INTERVAL`, reads some messages.
pub async fn stream_worker(
    shared: Arc<Shared>,
    device: Device,
    seed: u64,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut last_seq: u64 = 0;
    // The receipt feed position this device saw last: a new stream, on any replica, resumes
    // after it (as a phone would), so no receipt it already saw comes again, older.
    // The feed position of the last receipt change seen (empty: none yet). Positions order
    // bytewise like the feed, so the greatest seen is where the next stream resumes.
    let mut last_receipt: Vec<u8> = Vec::new();
    while !stop.is_cancelled() {
        let Some(node) = shared.nodes.choose(&mut rng).cloned() else {
            return;
        };
        let stream = match open_stream(&node, &device, last_seq, last_receipt.clone()).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, node = node.id, user = device.user, "stream open failed");
                let pause = Duration::from_millis(rng.random_range(300..1_000));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let session = shared.recorder.next_session_id();
        shared.recorder.record(&Record::SessionStart(SessionStart {
            session,
            user: device.user,
            device: device.device,
            node: node.id,
            resume_after_seq: last_seq,
            time_ms: shared.recorder.now_ms(),
            drain: false,
        }));
        let lifetime = Duration::from_millis(rng.random_range(5_000..15_000));
        let read_seed = rng.random();
        run_session(
            &shared,
            &device,
            session,
            stream,
            (&mut last_seq, &mut last_receipt),
            lifetime,
            read_seed,
            &stop,
        )
        .await;
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
async fn run_session(
    shared: &Shared,
    device: &Device,
    session: u64,
    mut stream: OpenStream,
    (last_seq, last_receipt): (&mut u64, &mut Vec<u8>),
    lifetime: Duration,
    seed: u64,
    stop: &CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let end = Instant::now() + lifetime;
    let mut acked = *last_seq;
    let mut ticker = tokio::time::interval(ACK_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(end) => break,
            _ = ticker.tick() => {
                if *last_seq > acked {
                    let ack = ClientFrame {
                        frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: *last_seq })),
                    };
                    // Dropped when the server does not take frames (paused node): acks are
                    // cumulative, the next one covers it.
                    if stream.out.try_send(ack).is_ok() {
                        acked = *last_seq;
                    }
                }
            }
            frame = stream.frames.message() => {
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(session, error = %describe(&status), "stream ended");
                        break;
                    }
                };
                if let Some(server_frame::Frame::Receipt(receipt)) = &frame.frame
                    && receipt.feed_position > *last_receipt
                {
                    last_receipt.clone_from(&receipt.feed_position);
                }
                let frame = frame_record(shared, device, session, frame);
                if let Some(record) = &frame.record {
                    shared.recorder.record(record);
                }
                let Some((seq, conversation)) = frame.message else {
                    continue;
                };
                *last_seq = (*last_seq).max(seq);
                if conversation.is_some() && rng.random_bool(READ_PROBABILITY) {
                    let read = ClientFrame {
                        frame: Some(client_frame::Frame::Read(Read { conversation, up_to_seq: seq })),
                    };
                    let _ = stream.out.try_send(read);
                }
            }
        }
    }
}

/// One drain session: `device` on `node` from seq 0, reading until [`DRAIN_IDLE`] passes
/// without a frame once at least as many messages arrived as the highest seq any session of the
/// user saw, or [`DRAIN_SESSION_MAX`]. Never acks or reads (the drain must not change state).
///
/// The session's records are returned, not written: a session cut short by a transport error
/// is retried, and only the retry's records belong in the history (see [`drain_all`]).
async fn drain_session(
    shared: &Shared,
    node: &ClientNode,
    device: &Device,
) -> (Vec<Record>, Result<(), String>) {
    let expect = shared.highest(device.user);
    let mut records = Vec::new();
    let mut stream = match open_stream(node, device, 0, Vec::new()).await {
        Ok(stream) => stream,
        Err(error) => return (records, Err(format!("{error:#}"))),
    };
    let session = shared.recorder.next_session_id();
    records.push(Record::SessionStart(SessionStart {
        session,
        user: device.user,
        device: device.device,
        node: node.id,
        resume_after_seq: 0,
        time_ms: shared.recorder.now_ms(),
        drain: true,
    }));
    let end = Instant::now() + DRAIN_SESSION_MAX;
    let mut received: u64 = 0;
    let result = loop {
        let idle = if received >= expect {
            DRAIN_IDLE
        } else {
            DRAIN_SHORT_IDLE
        };
        let frame = tokio::select! {
            () = tokio::time::sleep_until(end) => break Ok(()),
            frame = tokio::time::timeout(idle, stream.frames.message()) => frame,
        };
        match frame {
            Err(_) | Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(frame))) => {
                let frame = frame_record(shared, device, session, frame);
                if frame.message.is_some() {
                    received = received.saturating_add(1);
                }
                records.extend(frame.record);
            }
            Ok(Err(status)) => {
                break Err(format!("drain session {session}: {}", describe(&status)));
            }
        }
    };
    drop(stream.out);
    (records, result)
}

/// Drains every device of every user on every node of `members` (the cluster's voters after
/// the heal), a few sessions at a time. Returns the number of sessions that ended in an error
/// (their records stay in the history; a failed drain session shows up as lost messages, never
/// as a pass).
pub async fn drain_all(shared: Arc<Shared>, members: &BTreeSet<u32>) -> usize {
    let mut jobs: Vec<(ClientNode, Device)> = Vec::new();
    for user in &shared.users {
        for device in &user.devices {
            for node in shared.nodes.iter().filter(|n| members.contains(&n.id)) {
                jobs.push((node.clone(), device.clone()));
            }
        }
    }
    let semaphore = Arc::new(tokio::sync::Semaphore::new(DRAIN_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (node, device) in jobs {
        let shared = shared.clone();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            // The semaphore is never closed, so acquire only fails if it were; count that as a
            // failed session.
            let Ok(_permit) = semaphore.acquire().await else {
                return false;
            };
            for attempt in 1..=DRAIN_ATTEMPTS {
                let (records, result) = drain_session(&shared, &node, &device).await;
                // The last attempt is recorded even when it failed: a missing drain from one
                // node would otherwise go unnoticed by the checker.
                if result.is_ok() || attempt == DRAIN_ATTEMPTS {
                    for record in &records {
                        shared.recorder.record(record);
                    }
                }
                match result {
                    Ok(()) => return true,
                    Err(error) => {
                        tracing::warn!(%error, attempt, node = node.id, user = device.user, "drain session failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            false
        });
    }
    let mut failed = 0usize;
    while let Some(result) = tasks.join_next().await {
        if !matches!(result, Ok(true)) {
            failed = failed.saturating_add(1);
        }
    }
    failed
}

/// Registers users on `specs` and writes their ids to `path` (for reading a history later).
///
/// # Errors
///
/// As [`register_users`], or the file cannot be written.
pub async fn register_and_save(
    specs: &[NodeSpec],
    count: u32,
    path: &Path,
) -> anyhow::Result<Vec<User>> {
    let users = register_users(specs, count).await?;
    let ids: Vec<serde_json::Value> = users
        .iter()
        .map(|u| {
            serde_json::json!({
                "user": u.id,
                "devices": u.devices.iter().map(|d| d.device).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&ids)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rejections_before_a_proposal_are_fail() {
        let fail = [
            tonic::Status::invalid_argument("bad"),
            tonic::Status::not_found("no such user"),
            tonic::Status::resource_exhausted("rate"),
        ];
        for status in &fail {
            assert!(
                matches!(classify(status), Outcome::Fail { .. }),
                "{status:?} is definite"
            );
        }
        let info = [
            tonic::Status::unavailable("no leader"),
            tonic::Status::deadline_exceeded("slow"),
            tonic::Status::internal("outcome"),
            tonic::Status::unknown("transport"),
            tonic::Status::cancelled("reset"),
        ];
        for status in &info {
            assert!(
                matches!(classify(status), Outcome::Info { .. }),
                "{status:?} is unknown"
            );
        }
    }

    #[test]
    fn retry_hint_is_read_and_capped() {
        let mut status = tonic::Status::unavailable("no leader");
        status
            .metadata_mut()
            .insert("retry-after-ms", "50000".parse().expect("ascii"));
        assert_eq!(retry_after(&status), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(&tonic::Status::unavailable("x")), None);
    }
}
