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
//!
//! Batch size: after handing a batch to raft the batcher waits until the log's next append has
//! flushed (at most [`APPEND_WAIT_MAX`]) before it drains the queue again. The leader's fsync is
//! the slow step; the proposals that arrive during it go into the next entry together instead of
//! queueing inside raft as one small entry each. Housekeeping queued with [`Proposer::submit`]
//! (the forwarder's trims) waits up to [`DETACHED_LINGER`] for a client proposal to ride with.

use std::sync::Arc;
use std::time::Duration;

use courier_proto::FORMAT_VERSION;
use courier_proto::limits::PROPOSAL_BYTES_MAX;
use courier_proto::pb::events::{EntryPayload, Event};
use openraft::error::ClientWriteError;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::log_store::AppendStats;
use crate::types::{EventOutcome, NodeId, Proposal, Raft};

/// Events per raft entry at most.
pub const BATCH_EVENTS_MAX: usize = 1024;
/// Proposals waiting per group at most; more is refused as overload.
pub const QUEUE_PROPOSALS_MAX: usize = 4096;
/// Batches replicating at once per group: one committing and the next one filling behind it.
/// Measured against 8 (BENCHMARKS.md, issue #19): the same throughput and CPU per message with
/// half the raft entries and fsyncs, and a lower p99.
pub const IN_FLIGHT_BATCHES_MAX: usize = 2;
/// Longest a batch of housekeeping alone ([`Proposer::submit`]) waits for a proposal someone
/// waits for to join it.
pub const DETACHED_LINGER: Duration = Duration::from_millis(10);
/// Longest wait for the log's append to flush before the next batch is dispatched anyway (a
/// follower's proposer never sees an append of its own).
pub const APPEND_WAIT_MAX: Duration = Duration::from_millis(2);

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
    /// Queued by [`Proposer::submit`]: nobody waits for it.
    detached: bool,
}

/// The group-commit front of one raft group.
#[derive(Clone, Debug)]
pub struct Proposer {
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the batcher of `raft`, whose log reports its flushes to `log`; it stops when every
    /// `Proposer` clone is dropped.
    pub fn start(raft: Raft, log: Arc<AppendStats>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_PROPOSALS_MAX);
        tokio::spawn(batcher(raft, log, rx));
        Self { queue }
    }

    /// Queues `events` to ride in the group's next batch without waiting for their outcome
    /// (housekeeping such as `OutboxTrimmed`, which a later proposal supersedes). Returns
    /// whether they were queued: not when the queue is full, the proposal too large, or the
    /// group stopped.
    pub fn submit(&self, events: Vec<Event>) -> bool {
        let bytes = events.iter().map(Message::encoded_len).sum::<usize>();
        if bytes > PROPOSAL_BYTES_MAX {
            return false;
        }
        // Nobody listens: the batcher's answer to a dropped receiver is ignored.
        let (reply, _) = oneshot::channel();
        self.queue
            .try_send(Pending {
                events,
                bytes,
                reply,
                detached: true,
            })
            .is_ok()
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
                detached: false,
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

async fn batcher(raft: Raft, log: Arc<AppendStats>, mut rx: mpsc::Receiver<Pending>) {
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
        let now = tokio::time::Instant::now();
        let linger_until = now.checked_add(DETACHED_LINGER).unwrap_or(now);
        loop {
            let next = match rx.try_recv() {
                Ok(next) => next,
                // Only housekeeping so far (trims): it waits a moment for a proposal someone
                // waits for, and rides in that proposal's entry instead of taking one of its own.
                Err(_) if carry.is_none() && batch.iter().all(|p| p.detached) => {
                    match tokio::time::timeout_at(linger_until, rx.recv()).await {
                        Ok(Some(next)) => next,
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            };
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
        let flushed = log.flushed.notified();
        tokio::pin!(flushed);
        flushed.as_mut().enable();
        let handed = raft
            .client_write_ff(Proposal::Events(Arc::new(payload)))
            .await;
        if handed.is_ok() {
            // Let the queue fill while the leader writes this batch (module docs).
            let _ = tokio::time::timeout(APPEND_WAIT_MAX, flushed).await;
        }
        match handed {
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
