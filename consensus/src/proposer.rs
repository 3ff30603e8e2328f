//! Group commit: many callers' events share one raft entry, one replication round and one fsync.
//!
//! ```text
//!  propose(events) ─▶ bounded queue ─▶ batcher: drain up to BATCH_EVENTS_MAX / PROPOSAL_BYTES_MAX
//!                                        │ client_write_ff (enqueue in order)
//!                                        ▼
//!                     up to IN_FLIGHT_BATCHES_MAX batches replicating at once; each reply is
//!                     split back into the callers' outcomes, in order
//! ```
//!
//! Order: batches are handed to raft by one task in queue order, so events proposed by one
//! caller one after another land in the log in that order.

use std::sync::Arc;

use courier_proto::FORMAT_VERSION;
use courier_proto::limits::PROPOSAL_BYTES_MAX;
use courier_proto::pb::events::{EntryPayload, Event};
use openraft::error::ClientWriteError;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::types::{EventOutcome, NodeId, Proposal, Raft};

/// Events per raft entry at most.
pub const BATCH_EVENTS_MAX: usize = 1024;
/// Proposals waiting per group at most; more is refused as overload.
pub const QUEUE_PROPOSALS_MAX: usize = 4096;
/// Batches replicating at once per group.
pub const IN_FLIGHT_BATCHES_MAX: usize = 8;

/// Why a proposal did not commit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the group (the leader, when known).
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The current leader.
        leader: Option<NodeId>,
    },
    /// The queue is full: retry later.
    #[error("proposal queue full ({QUEUE_PROPOSALS_MAX} waiting)")]
    Overloaded,
    /// The proposal alone exceeds one raft entry.
    #[error("proposal of {bytes} bytes exceeds {PROPOSAL_BYTES_MAX}")]
    TooLarge {
        /// Its encoded size.
        bytes: usize,
    },
    /// Raft stopped or failed; the outcome is unknown.
    #[error("raft: {0}")]
    Raft(String),
}

struct Pending {
    events: Vec<Event>,
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<EventOutcome>, ProposeError>>,
}

/// The group-commit front of one raft group.
#[derive(Clone, Debug)]
pub struct Proposer {
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the batcher of `raft`; it stops when every `Proposer` clone is dropped.
    pub fn start(raft: Raft) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_PROPOSALS_MAX);
        tokio::spawn(batcher(raft, rx));
        Self { queue }
    }

    /// Proposes `events`; answers with one outcome per event after they commit and apply.
    ///
    /// # Errors
    /// [`ProposeError`]; with `Raft` the events may or may not have committed.
    pub async fn propose(&self, events: Vec<Event>) -> Result<Vec<EventOutcome>, ProposeError> {
        let bytes = events.iter().map(Message::encoded_len).sum::<usize>();
        if bytes > PROPOSAL_BYTES_MAX {
            return Err(ProposeError::TooLarge { bytes });
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending {
                events,
                bytes,
                reply,
            })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => ProposeError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    ProposeError::Raft("group stopped".to_owned())
                }
            })?;
        answer
            .await
            .map_err(|_| ProposeError::Raft("group stopped before answering".to_owned()))?
    }
}

async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES_MAX));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(pending) => pending,
            None => match rx.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let mut batch = vec![first];
        let (mut events, mut bytes) = (batch[0].events.len(), batch[0].bytes);
        while let Ok(next) = rx.try_recv() {
            if events.saturating_add(next.events.len()) > BATCH_EVENTS_MAX
                || bytes.saturating_add(next.bytes) > PROPOSAL_BYTES_MAX
            {
                carry = Some(next);
                break;
            }
            events = events.saturating_add(next.events.len());
            bytes = bytes.saturating_add(next.bytes);
            batch.push(next);
        }
        // We never close the semaphore, so acquiring cannot fail.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let counts: Vec<usize> = batch.iter().map(|p| p.events.len()).collect();
        let mut all = Vec::with_capacity(events);
        let mut replies = Vec::with_capacity(batch.len());
        for pending in batch {
            all.extend(pending.events);
            replies.push(pending.reply);
        }
        let payload = EntryPayload {
            format_version: FORMAT_VERSION,
            events: all,
        };
        match raft.client_write_ff(Proposal::Events(payload)).await {
            Err(fatal) => {
                for reply in replies {
                    let _ = reply.send(Err(ProposeError::Raft(fatal.to_string())));
                }
            }
            Ok(receiver) => {
                let leading = || raft.metrics().borrow().state == openraft::ServerState::Leader;
                let replies = if crate::bugs::ack_before_commit() && leading() {
                    // Deliberate bug (feature `bugs`): on the leader, every caller hears "done"
                    // as soon as raft took the batch, before it commits.
                    for (reply, count) in replies.into_iter().zip(&counts) {
                        let _ = reply.send(Ok(vec![EventOutcome::Done; *count]));
                    }
                    Vec::new()
                } else {
                    replies
                };
                tokio::spawn(async move {
                    let outcome = receiver.await;
                    drop(permit);
                    let result = match outcome {
                        Ok(Ok(response)) => Ok(response.data.outcomes),
                        Ok(Err(ClientWriteError::ForwardToLeader(forward))) => {
                            Err(ProposeError::NotLeader {
                                leader: forward.leader_id,
                            })
                        }
                        Ok(Err(error)) => Err(ProposeError::Raft(error.to_string())),
                        Err(_) => Err(ProposeError::Raft("raft dropped the proposal".to_owned())),
                    };
                    split(result, &counts, replies);
                });
            }
        }
    }
}

/// Hands each caller its slice of the outcomes (or the shared error).
fn split(
    result: Result<Vec<EventOutcome>, ProposeError>,
    counts: &[usize],
    replies: Vec<oneshot::Sender<Result<Vec<EventOutcome>, ProposeError>>>,
) {
    match result {
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Ok(outcomes) => {
            assert_eq!(
                outcomes.len(),
                counts.iter().sum::<usize>(),
                "one outcome per proposed event"
            );
            let mut outcomes = outcomes.into_iter();
            for (reply, count) in replies.into_iter().zip(counts) {
                let _ = reply.send(Ok(outcomes.by_ref().take(*count).collect()));
            }
        }
    }
}
