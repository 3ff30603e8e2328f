//! One raft stream per ordered node pair: every group's AppendEntries and Vote to one peer go
//! over one long-lived `Raft.Pipe` call, batched into frames, and come back by call id.
//!
//! A unary call per raft message costs an HTTP/2 stream, its headers and trailers on both sides,
//! for a request that is often a heartbeat of a few dozen bytes; with many groups replicating at
//! once the node pair exchanges many such calls at the same moment. A pipe sends whatever calls
//! queued behind the first one in a single frame (at most [`FRAME_CALLS_MAX`] calls,
//! [`FRAME_BYTES_MAX`] bytes), and the serving side answers in frames the same way.
//!
//! What stays as it was: each call has the deadline openraft gives it (the caller's timeout; the
//! frame carries what is left of it and the server answers `DEADLINE_EXCEEDED` after it, as for a
//! unary call), and a call whose caller gave up before its frame left is not sent. openraft
//! still sends one AppendEntries at a time per group and target, so per-group order needs nothing
//! from the pipe; calls are served concurrently, as unary calls are. One stream delivers in
//! order, so a large call would hold up every group's heartbeats behind it: calls above
//! [`CALL_BYTES_MAX`] (catch-up appends) and snapshots stay unary, where HTTP/2 interleaves them.
//! The pipe has a connection of its own, so a pipe the peer stopped reading (flow control) holds
//! up neither snapshots nor forwarding.
//!
//! Client side ([`Pipe`]): a writer task turns queued calls into frames and a reader task
//! matches reply frames to waiting callers. Both are bounded: [`CALLS_QUEUED_MAX`] calls wait
//! for a frame, [`CALLS_IN_FLIGHT_MAX`] wait for replies. When the stream fails or ends, every
//! waiting call fails as `UNAVAILABLE` and the pipe closes; the pool opens a new one on the next
//! call (counted in `pipes_opened`). A peer that does not serve `Pipe` answers `UNIMPLEMENTED`,
//! and the pool calls it with the unary RPCs, trying a pipe again after
//! `network::PIPE_RETRY_AFTER` (a cluster upgraded one node at a time).
//!
//! Server side ([`serve`]): calls are dispatched as the unary RPCs dispatch them, at most
//! [`CALLS_IN_FLIGHT_MAX`] at once per stream (beyond that the stream is not read, and HTTP/2
//! flow control holds the peer back). The caller's certificate was checked when the stream
//! opened; membership is checked again on every frame, so a node removed from the cluster stops
//! being served on a stream it opened before.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_proto::pb::peer::{
    RaftCall, RaftCallKind, RaftFrame, RaftReply, RaftReplyFrame, RaftRequest, RaftResponse,
    raft_client::RaftClient,
};
use prost::Message as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;

use crate::types::NodeId;

/// Largest gRPC message on a pipe, either way (as every raft message).
const RAFT_MESSAGE_BYTES_MAX: usize = courier_proto::limits::GRPC_MESSAGE_BYTES_MAX;

/// How often an idle pipe's connection is pinged (HTTP/2), on both ends.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Calls one frame carries at most.
pub const FRAME_CALLS_MAX: usize = 256;

/// Encoded bytes of one frame at most (a frame is one gRPC message, within
/// `GRPC_MESSAGE_BYTES_MAX`).
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;

/// Payload bytes of a call sent on the pipe at most; larger ones are sent unary.
pub const CALL_BYTES_MAX: usize = 64 * 1024;

const _: () = assert!(
    CALL_BYTES_MAX + CALL_OVERHEAD_BYTES <= FRAME_BYTES_MAX
        && FRAME_BYTES_MAX <= RAFT_MESSAGE_BYTES_MAX,
    "a pipe call fits a frame and a frame fits a raft message"
);

/// Calls of one pipe waiting for their reply at most, on either side. Each group has at most
/// one AppendEntries and one Vote in flight to one target at a time, but a call its caller gave
/// up on keeps its slot until the peer answers it, so under a slow peer repeated rounds can
/// reach this bound; calls then wait in the queue for a slot.
#[expect(
    clippy::as_conversions,
    reason = "u32 into usize in a const, lossless on the 64-bit targets courier builds for"
)]
pub const CALLS_IN_FLIGHT_MAX: usize = 2 * (courier_proto::limits::SHARD_COUNT_MAX as usize + 1);

/// Calls of one pipe queued for the writer at most.
pub const CALLS_QUEUED_MAX: usize = CALLS_IN_FLIGHT_MAX;

/// Frames queued for the transport at most, per direction of one stream.
pub const FRAMES_QUEUED_MAX: usize = 4;

/// Room a call takes in a frame beyond its payload (id, kind, group, field tags): generous.
const CALL_OVERHEAD_BYTES: usize = 64;

/// What the pipes of one pool did since start.
#[derive(Debug, Default)]
pub struct PipeCounters {
    /// Raft calls sent in frames.
    pub calls: AtomicU64,
    /// Frames sent.
    pub frames: AtomicU64,
    /// Pipes opened (more than one per peer: reconnects).
    pub opened: AtomicU64,
}

struct Call {
    kind: RaftCallKind,
    request: RaftRequest,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<RaftResponse, tonic::Status>>,
}

/// The client end of one pipe. Cheap to clone; the pipe's task stops, and its stream closes,
/// when the last clone is dropped (the pool replaced or forgot it), even while the connection
/// under it is wedged.
#[derive(Clone, Debug)]
pub struct Pipe {
    calls: mpsc::Sender<Call>,
    _stop: Arc<DropGuard>,
}

/// A deadline no caller reaches (about thirty years on).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now()
        .checked_add(Duration::from_secs(86_400 * 365 * 30))
        .unwrap_or_else(tokio::time::Instant::now)
}

fn closed() -> tonic::Status {
    tonic::Status::unavailable("the raft pipe to this peer closed")
}

impl Pipe {
    /// Opens a pipe over `channel`; the stream opens within `open_timeout` or the pipe closes.
    pub fn open(channel: Channel, open_timeout: Duration, counters: Arc<PipeCounters>) -> Self {
        let (calls, queued) = mpsc::channel(CALLS_QUEUED_MAX);
        let stop = CancellationToken::new();
        counters.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run(channel, open_timeout, queued, counters, stop.clone()));
        Self {
            calls,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    /// Whether the pipe closed (its stream failed or ended): the pool opens another.
    pub fn is_closed(&self) -> bool {
        self.calls.is_closed()
    }

    /// Sends one call, to be answered within `timeout`, and waits for its reply (the caller
    /// bounds the wait). `UNAVAILABLE` when the pipe closed first; `UNIMPLEMENTED` when the peer
    /// does not serve pipes. A request above [`CALL_BYTES_MAX`] is the caller's to send unary.
    ///
    /// # Errors
    /// The status the call failed with, as the unary RPC would have returned it.
    pub async fn call(
        &self,
        kind: RaftCallKind,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftResponse, tonic::Status> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call {
                kind,
                request,
                deadline: tokio::time::Instant::now()
                    .checked_add(timeout)
                    .unwrap_or_else(far_future),
                reply,
            })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

type Replier = oneshot::Sender<Result<RaftResponse, tonic::Status>>;

/// Calls sent and not answered yet, by id, each holding its in-flight slot.
type Waiting = Arc<Mutex<BTreeMap<u64, (Replier, OwnedSemaphorePermit)>>>;

/// The pipe's task: opens the stream, then writes frames until the pipe is dropped or the
/// stream fails; then fails every call still waiting or queued.
async fn run(
    channel: Channel,
    open_timeout: Duration,
    mut queued: mpsc::Receiver<Call>,
    counters: Arc<PipeCounters>,
    stop: CancellationToken,
) {
    let (frames, outbound) = mpsc::channel::<RaftFrame>(FRAMES_QUEUED_MAX);
    let mut client = RaftClient::new(channel)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let opened = tokio::select! {
        opened = tokio::time::timeout(open_timeout, client.pipe(ReceiverStream::new(outbound))) => opened,
        () = stop.cancelled() => return fail_all(&mut queued, &closed()),
    };
    let inbound = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return fail_all(&mut queued, &status),
        Err(_) => {
            let status = tonic::Status::unavailable("opening the raft pipe timed out");
            return fail_all(&mut queued, &status);
        }
    };
    let waiting: Waiting = Arc::default();
    let reader_done = Arc::new(Notify::new());
    let reader = tokio::spawn(read(inbound, waiting.clone(), reader_done.clone()));
    let mut carried: Option<Call> = None;
    tokio::select! {
        () = write(&mut queued, &mut carried, &frames, &waiting, &counters) => {}
        () = stop.cancelled() => {}
        () = reader_done.notified() => {}
    }
    reader.abort();
    let _ = reader.await;
    let stranded = std::mem::take(&mut *lock(&waiting));
    for (_, (reply, _)) in stranded {
        let _ = reply.send(Err(closed()));
    }
    if let Some(call) = carried {
        let _ = call.reply.send(Err(closed()));
    }
    fail_all(&mut queued, &closed());
}

/// Turns queued calls into frames until the queue closes or the stream refuses a frame. A call
/// that does not fit the frame being built is `carried` to the next one.
async fn write(
    queued: &mut mpsc::Receiver<Call>,
    carried: &mut Option<Call>,
    frames: &mpsc::Sender<RaftFrame>,
    waiting: &Waiting,
    counters: &PipeCounters,
) {
    let permits = Arc::new(Semaphore::new(CALLS_IN_FLIGHT_MAX));
    let mut next_id = 0_u64;
    loop {
        let mut next = match carried.take() {
            Some(call) => Some(call),
            // None: every handle dropped (the pool replaced or forgot this pipe).
            None => Some(match queued.recv().await {
                Some(call) => call,
                None => return,
            }),
        };
        let mut frame = RaftFrame::default();
        let mut bytes = 0_usize;
        while let Some(call) = next.take() {
            let size = call
                .request
                .encoded_len()
                .saturating_add(CALL_OVERHEAD_BYTES);
            let left = call
                .deadline
                .saturating_duration_since(tokio::time::Instant::now());
            if call.reply.is_closed() || left.is_zero() {
                // Its caller gave up: nobody would read the answer.
            } else if size > FRAME_BYTES_MAX {
                let _ = call
                    .reply
                    .send(Err(tonic::Status::resource_exhausted(format!(
                        "a raft call of {size} bytes exceeds the frame limit of {FRAME_BYTES_MAX}"
                    ))));
            } else if bytes.saturating_add(size) > FRAME_BYTES_MAX {
                *carried = Some(call);
                break;
            } else {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                // The wait for a free slot may outlast the caller: look again, and send what is
                // left of its deadline, not what was left before the wait.
                let left = call
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                if !call.reply.is_closed() && !left.is_zero() {
                    bytes = bytes.saturating_add(size);
                    next_id = next_id.wrapping_add(1);
                    lock(waiting).insert(next_id, (call.reply, permit));
                    frame.calls.push(RaftCall {
                        id: next_id,
                        kind: call.kind.into(),
                        request: Some(call.request),
                        timeout_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1),
                    });
                }
            }
            if frame.calls.len() < FRAME_CALLS_MAX {
                next = queued.try_recv().ok();
            }
        }
        if frame.calls.is_empty() {
            continue;
        }
        let count = u64::try_from(frame.calls.len()).unwrap_or(u64::MAX);
        if frames.send(frame).await.is_err() {
            return;
        }
        counters.frames.fetch_add(1, Ordering::Relaxed);
        counters.calls.fetch_add(count, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().expect("raft pipe lock is never poisoned")
}

/// Closes the queue and fails every call in it with `status`.
fn fail_all(queued: &mut mpsc::Receiver<Call>, status: &tonic::Status) {
    queued.close();
    while let Ok(call) = queued.try_recv() {
        let _ = call.reply.send(Err(status.clone()));
    }
}

/// Hands each reply to the call waiting for it, until the stream ends or fails; then tells
/// the writer.
async fn read(mut inbound: tonic::Streaming<RaftReplyFrame>, waiting: Waiting, done: Arc<Notify>) {
    while let Ok(Some(frame)) = inbound.message().await {
        for reply in frame.replies {
            // A reply to a call whose caller gave up still frees its slot.
            let caller = lock(&waiting).remove(&reply.id);
            if let Some((caller, _permit)) = caller {
                let _ = caller.send(from_reply(reply));
            }
        }
    }
    done.notify_one();
}

fn from_reply(reply: RaftReply) -> Result<RaftResponse, tonic::Status> {
    if reply.code == 0 {
        return Ok(reply.response.unwrap_or_default());
    }
    let mut status = tonic::Status::new(reply.code.into(), reply.message);
    if let Ok(code) = tonic::metadata::MetadataValue::try_from(reply.courier_code.as_str())
        && !reply.courier_code.is_empty()
    {
        status.metadata_mut().insert(courier_proto::CODE_KEY, code);
    }
    Err(status)
}

fn to_reply(id: u64, result: Result<RaftResponse, tonic::Status>) -> RaftReply {
    match result {
        Ok(response) => RaftReply {
            id,
            response: Some(response),
            ..RaftReply::default()
        },
        Err(status) => RaftReply {
            id,
            code: status.code().into(),
            message: status.message().to_owned(),
            response: None,
            courier_code: status
                .metadata()
                .get(courier_proto::CODE_KEY)
                .and_then(|code| code.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        },
    }
}

/// Serves one pipe: reads frames from `inbound`, dispatches each call through `dispatch`, and
/// writes the replies to `outbound` in frames, until the caller closes its side or `stop` is
/// cancelled (then the calls in flight are answered first and the stream ends), or the stream
/// fails. `caller` is the node whose certificate opened the stream (`None` without TLS); each
/// frame is refused unless `admits` it (still a member).
pub async fn serve<A, D, Fut>(
    (caller, admits): (Option<NodeId>, A),
    mut inbound: tonic::Streaming<RaftFrame>,
    (outbound, stop): (
        mpsc::Sender<Result<RaftReplyFrame, tonic::Status>>,
        CancellationToken,
    ),
    dispatch: D,
) where
    A: Fn(NodeId) -> bool,
    D: Fn(RaftCallKind, RaftRequest) -> Fut,
    Fut: Future<Output = Result<RaftResponse, tonic::Status>> + Send + 'static,
{
    let (replies, mut answered) = mpsc::channel::<RaftReply>(CALLS_IN_FLIGHT_MAX);
    let writer = tokio::spawn(async move {
        while let Some(first) = answered.recv().await {
            let mut frame = RaftReplyFrame {
                replies: vec![first],
            };
            while frame.replies.len() < FRAME_CALLS_MAX
                && let Ok(reply) = answered.try_recv()
            {
                frame.replies.push(reply);
            }
            if outbound.send(Ok(frame)).await.is_err() {
                break;
            }
        }
    });
    let permits = Arc::new(Semaphore::new(CALLS_IN_FLIGHT_MAX));

    loop {
        let frame = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            frame = inbound.message() => match frame {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => break,
            },
        };
        let refused = caller.filter(|node| !admits(*node)).map(|node| {
            let mut status = tonic::Status::permission_denied(format!(
                "node {node} is not a member of this cluster"
            ));
            status.metadata_mut().insert(
                courier_proto::CODE_KEY,
                tonic::metadata::MetadataValue::from_static("COURIER:Peer:NotAMember"),
            );
            status
        });
        for call in frame.calls {
            let permit = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else {
                return;
            };
            let replies = replies.clone();
            let id = call.id;
            let Some(request) = call.request else {
                let _ = replies
                    .send(to_reply(
                        id,
                        Err(tonic::Status::invalid_argument(
                            "a raft call without its request",
                        )),
                    ))
                    .await;
                continue;
            };
            if let Some(status) = &refused {
                let _ = replies.send(to_reply(id, Err(status.clone()))).await;
                continue;
            }
            let kind = RaftCallKind::try_from(call.kind).unwrap_or(RaftCallKind::Unspecified);
            let answer = dispatch(kind, request);
            let timeout = if call.timeout_ms > 0 {
                Duration::from_millis(u64::from(call.timeout_ms))
            } else {
                Duration::MAX
            };
            tokio::spawn(async move {
                let result = tokio::time::timeout(timeout, answer)
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::deadline_exceeded(
                            "the raft call's deadline passed",
                        ))
                    });
                let _ = replies.send(to_reply(id, result)).await;
                drop(permit);
            });
        }
    }
    // Stop holding the caller's stream (and its flow-control window) while the calls in flight
    // finish.
    drop(inbound);
    drop(replies);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a piped failure reaches the caller as the unary call's would: the same gRPC code,
    /// message and stable `COURIER:*` code. Method: a status with a code round-trips through
    /// a reply; a success carries its payload; a status without a code gains none.
    #[test]
    fn a_reply_carries_the_status_and_its_stable_code() {
        let mut refused = tonic::Status::permission_denied("node 2 sent a raft request as node 3");
        refused.metadata_mut().insert(
            courier_proto::CODE_KEY,
            tonic::metadata::MetadataValue::from_static("COURIER:Peer:WrongNode"),
        );
        let back = from_reply(to_reply(7, Err(refused))).expect_err("a failure");
        assert_eq!(back.code(), tonic::Code::PermissionDenied);
        assert_eq!(back.message(), "node 2 sent a raft request as node 3");
        assert_eq!(
            back.metadata()
                .get(courier_proto::CODE_KEY)
                .map(|v| v.to_str().ok()),
            Some(Some("COURIER:Peer:WrongNode"))
        );
        let plain = from_reply(to_reply(8, Err(tonic::Status::unavailable("gone"))))
            .expect_err("a failure");
        assert_eq!(plain.code(), tonic::Code::Unavailable);
        assert!(plain.metadata().get(courier_proto::CODE_KEY).is_none());
        let payload = vec![1, 2, 3];
        let ok = from_reply(to_reply(
            9,
            Ok(RaftResponse {
                payload: payload.clone(),
            }),
        ));
        assert_eq!(ok.map(|r| r.payload).ok(), Some(payload));
    }
}
