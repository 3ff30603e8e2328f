//! Device streams: one long-lived stream per device, resumed on a random node after each
//! session, recording what it delivered and the receipts of primary devices.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{
    Ack, ClientFrame, Open, Read, ServerFrame, client_frame, server_frame,
};
use courier_proto::pb::events::{self, ReceiptState as WireReceiptState};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{ClientNode, Device, Shared, authed};
use crate::admin::describe;
use crate::history::{Acked, Delivered, Receipt, ReceiptState, Record, SessionStart};

/// Deadline for a stream to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames buffered towards the server per stream (acks and reads; dropped when full).
const CLIENT_FRAMES_MAX: usize = 16;
/// How often a stream acks what it received.
const ACK_INTERVAL: Duration = Duration::from_millis(500);
/// Probability that a received message is also marked read.
const READ_PROBABILITY: f64 = 0.25;

/// Receipts are recorded from primary devices only. The checker keys receipt monotonicity by
/// the observing user, while the promise (TESTING.md) is per device: two devices of one user
/// streaming from replicas at different applied indexes legitimately see different progress at
/// the same moment, which the checker would report as a regression.
fn record_receipts(device: &Device) -> bool {
    device.primary
}

/// An open stream: server frames in, client frames out.
pub(super) struct OpenStream {
    pub(super) frames: tonic::Streaming<ServerFrame>,
    pub(super) out: mpsc::Sender<ClientFrame>,
}

pub(super) async fn open_stream(
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
pub(super) struct FrameRecord {
    /// The record to append, if the frame is one the history keeps.
    pub(super) record: Option<Record>,
    /// For an inbox message: its seq and conversation.
    pub(super) message: Option<(u64, Option<events::Conversation>)>,
}

/// Turns one server frame of `session` into its history record.
pub(super) fn frame_record(
    shared: &Shared,
    device: &Device,
    session: u64,
    frame: ServerFrame,
) -> FrameRecord {
    let time_ms = shared.recorder.now_ms();
    match frame.frame {
        Some(server_frame::Frame::Message(message)) => {
            let client_id = message
                .content
                .as_ref()
                .map(|c| super::body::client_id_of(&c.body))
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
                        shared.saw_ack(device, acked);
                        shared.recorder.record(&Record::Acked(Acked {
                            session,
                            user: device.user,
                            device: device.device,
                            up_to_seq: acked,
                            time_ms: shared.recorder.now_ms(),
                        }));
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
