//! Proposals this node hands to leaders on other nodes, gathered per node into `ProposeMany`
//! calls.
//!
//! A client connected here whose shard is led elsewhere costs one hop. As one unary `Propose`
//! per proposal, that hop was a gRPC call (an HTTP/2 stream, headers, a task on each side) per
//! message. Now each leader's node has a bounded queue and a task that takes every proposal
//! waiting (up to [`PROPOSE_MANY_REQUESTS_MAX`] and [`PROPOSE_MANY_BYTES_MAX`]) into one call,
//! with at most [`CALLS_IN_FLIGHT`] calls to that node outstanding; while they are, the next
//! proposals gather. Nothing lingers: a proposal that finds no call in flight goes at once (alone,
//! as a plain `Propose`).
//!
//! ```text
//!   propose_via ──▶ queue (per node, QUEUE_MAX) ──▶ gathering task ──▶ ProposeMany ──▶ leader
//!        ▲                                                  │ one result per request, in order
//!        └──────────────────── oneshot ◀───────────────────┘
//! ```
//!
//! Each request keeps its meaning: a refusal comes back as the status a unary call would have
//! carried (`wire::status_to_wire`), so the caller maps it as before. A node that does not know
//! `ProposeMany` (an older build during a rolling upgrade) answers `UNIMPLEMENTED`; its requests
//! then go one by one, as before, and so does everything after to that node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use courier_proto::limits::{PROPOSE_MANY_BYTES_MAX, PROPOSE_MANY_REQUESTS_MAX};
use courier_proto::pb::peer::{self, propose_result};
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;

use super::peer::PeerClient;
use super::wire::status_from_wire;

/// Proposals waiting for a call to one node; a proposal finding the queue full waits for room.
pub(super) const QUEUE_MAX: usize = 1024;

/// Calls to one node outstanding at once; the proposals arriving meanwhile gather for the next.
pub(super) const CALLS_IN_FLIGHT: usize = 4;

/// Whether a node answers `ProposeMany`: not known yet, yes, no.
const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

type Answer = Result<peer::ProposeResponse, Status>;

/// One proposal waiting for its call.
struct Pending {
    request: peer::ProposeRequest,
    reply: oneshot::Sender<Answer>,
}

/// The queues to the leaders' nodes, one per address, each with its gathering task.
pub(super) struct Gather {
    peers: PeerClient,
    queues: Mutex<HashMap<String, mpsc::Sender<Pending>>>,
}

impl std::fmt::Debug for Gather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gather").finish_non_exhaustive()
    }
}

impl Gather {
    /// Gathers over `peers`' channels and deadlines.
    pub(super) fn new(peers: PeerClient) -> Self {
        Self {
            peers,
            queues: Mutex::default(),
        }
    }

    /// Proposes `request` (which took its one hop) on the node at `addr` and returns its answer:
    /// as a unary forwarded `Propose` would, within the RPC deadline from now.
    pub(super) async fn propose(&self, addr: &str, request: peer::ProposeRequest) -> Answer {
        let queue = self.queue(addr);
        let (reply, answer) = oneshot::channel();
        let deadline = self.peers.rpc_timeout();
        let answered = tokio::time::timeout(deadline, async {
            queue
                .send(Pending { request, reply })
                .await
                .map_err(|_| Status::unavailable("the proposal queue to the leader stopped"))?;
            answer
                .await
                .map_err(|_| Status::unavailable("the call to the leader was dropped"))?
        })
        .await;
        // As tonic reports its own deadline: the proposal's fate is unknown.
        answered.unwrap_or_else(|_| Err(Status::cancelled("Timeout expired")))
    }

    /// The queue to `addr`, started on first use.
    fn queue(&self, addr: &str) -> mpsc::Sender<Pending> {
        let mut queues = self.queues.lock().expect("gather lock is never poisoned");
        if let Some(queue) = queues.get(addr).filter(|queue| !queue.is_closed()) {
            return queue.clone();
        }
        let (queue, waiting) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run(self.peers.clone(), addr.to_owned(), waiting));
        queues.insert(addr.to_owned(), queue.clone());
        queue
    }
}

/// The gathering task of one node's queue: runs while the queue has senders.
async fn run(peers: PeerClient, addr: String, mut waiting: mpsc::Receiver<Pending>) {
    let calls = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    let many = Arc::new(AtomicU8::new(UNKNOWN));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(pending) => pending,
            None => match waiting.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let permit = calls
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // Taken after the permit: what arrived while every call was in flight joins this one.
        let mut bytes = first.request.encoded_len();
        let mut batch = vec![first];
        while batch.len() < PROPOSE_MANY_REQUESTS_MAX {
            let Ok(next) = waiting.try_recv() else { break };
            let len = next.request.encoded_len();
            if bytes.saturating_add(len) > PROPOSE_MANY_BYTES_MAX {
                carried = Some(next);
                break;
            }
            bytes = bytes.saturating_add(len);
            batch.push(next);
        }
        // A caller that gave up (its deadline passed while queued) is not proposed for.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (peers, addr, many) = (peers.clone(), addr.clone(), many.clone());
        tokio::spawn(async move {
            call(&peers, &addr, &many, batch).await;
            drop(permit);
        });
    }
}

/// Sends `batch` to `addr` in one call and answers each proposal.
async fn call(peers: &PeerClient, addr: &str, many: &AtomicU8, batch: Vec<Pending>) {
    let Some(mut client) = peers.forward(addr) else {
        for pending in batch {
            let _ = pending.reply.send(Err(Status::unavailable(format!(
                "bad leader address {addr}"
            ))));
        }
        return;
    };
    let (requests, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.request, pending.reply))
        .unzip();
    if requests.len() == 1 || many.load(Ordering::Relaxed) == UNSUPPORTED {
        one_by_one(peers, &client, requests, replies).await;
        return;
    }
    // Kept until the node is known to answer `ProposeMany`, to send one by one if it does not.
    let fallback = (many.load(Ordering::Relaxed) == UNKNOWN).then(|| requests.clone());
    let count = requests.len();
    let answered = client
        .propose_many(peers.forwarded(peer::ProposeManyRequest { requests }))
        .await;
    match answered {
        Ok(response) => {
            many.store(SUPPORTED, Ordering::Relaxed);
            let results = response.into_inner().results;
            if results.len() != count {
                let status = Status::internal(format!(
                    "the leader answered {} of {count} proposals",
                    results.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(match result.result {
                    Some(propose_result::Result::Ok(response)) => Ok(response),
                    Some(propose_result::Result::Refused(status)) => Err(status_from_wire(status)),
                    None => Err(Status::internal(
                        "the leader answered a proposal with nothing",
                    )),
                });
            }
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            many.store(UNSUPPORTED, Ordering::Relaxed);
            match fallback {
                Some(requests) => one_by_one(peers, &client, requests, replies).await,
                None => {
                    // It answered `ProposeMany` before (a downgrade since): nothing was proposed.
                    for reply in replies {
                        let _ = reply.send(Err(Status::unavailable(
                            "the leader's node stopped answering ProposeMany; retry",
                        )));
                    }
                }
            }
        }
        Err(status) => {
            // A transport failure or deadline: every proposal's fate is unknown, as with a
            // unary call that failed.
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

/// Sends each of `requests` as its own forwarded `Propose`, concurrently.
async fn one_by_one(
    peers: &PeerClient,
    client: &peer::forward_client::ForwardClient<tonic::transport::Channel>,
    requests: Vec<peer::ProposeRequest>,
    replies: Vec<oneshot::Sender<Answer>>,
) {
    let calls = requests.into_iter().zip(replies).map(|(request, reply)| {
        let mut client = client.clone();
        async move {
            let answer = client
                .propose(peers.forwarded(request))
                .await
                .map(tonic::Response::into_inner);
            let _ = reply.send(answer);
        }
    });
    futures_util::future::join_all(calls).await;
}
