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
//! Answers: a batch's callers hear raft's answer, or "outcome unknown" once the leadership it was
//! handed to ended without one (openraft 0.9 never answers an entry that a snapshot installed
//! after stepping down covers), so an in-flight slot is never held for good.
//!
//! Batch size: after handing a batch to raft the batcher waits until the log's next append has
//! flushed (at most [`APPEND_WAIT_MAX`]) before it drains the queue again. The leader's fsync is
//! the slow step; the proposals that arrive during it go into the next entry together instead of
//! queueing inside raft as one small entry each. Housekeeping queued with [`Proposer::submit`]
//! (the forwarder's trims) waits up to [`DETACHED_LINGER`] for a client proposal to ride with.

use std::sync::Arc;
use std::time::Duration;

use courier_proto::limits::PROPOSAL_BYTES_MAX;
use courier_proto::pb::events::{EntryPayload, Event};
use openraft::error::ClientWriteError;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::log_store::AppendStats;
use crate::types::{EventOutcome, Node, NodeId, Proposal, Raft};
use crate::watch::ApplyWatch;

/// Events per raft entry at most.
pub const BATCH_EVENTS_MAX: usize = 1024;
/// Proposals waiting per group at most by default (`raft.proposal-queue-max`); more is refused
/// as overload.
pub const QUEUE_PROPOSALS_MAX: usize = 4096;
/// Bytes of proposals waiting per group at most by default (`raft.proposal-queue-bytes-max`).
pub const QUEUE_BYTES_MAX: usize = 64 << 20;

/// What one group's proposer holds waiting at most: past either, a proposal is refused as
/// [`ProposeError::Overloaded`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Proposals.
    pub proposals: usize,
    /// Their encoded bytes (at least [`PROPOSAL_BYTES_MAX`], so one maximal proposal fits).
    pub bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            proposals: QUEUE_PROPOSALS_MAX,
            bytes: QUEUE_BYTES_MAX,
        }
    }
}
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
/// How long a batch's answer is still awaited after the leadership it was handed to ended
/// (its in-flight permit already freed): openraft usually answers with the real outcome once
/// the next leader's log reaches this node; after this, the caller hears
/// [`ProposeError::LeadershipLost`].
pub const LEADERSHIP_LOST_GRACE: Duration = Duration::from_secs(2);

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
    #[error("proposal queue full")]
    Overloaded,
    /// The proposal alone exceeds one raft entry.
    #[error("proposal of {bytes} bytes exceeds {PROPOSAL_BYTES_MAX}")]
    TooLarge {
        /// Its encoded size.
        bytes: usize,
    },
    /// The leadership the proposal was handed to ended before raft answered; the proposal may
    /// still commit under the next leader (the leader, when known), so a caller retries with
    /// the same ids.
    #[error("leadership changed before the outcome was known (leader: {leader:?})")]
    LeadershipLost {
        /// The current leader.
        leader: Option<NodeId>,
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
    /// Its share of the queue's byte budget, given back once it is in a batch, or once it
    /// is carried to the next batch (it is out of the queue then).
    _bytes_held: Option<OwnedSemaphorePermit>,
}

/// The group-commit front of one raft group.
#[derive(Clone, Debug)]
pub struct Proposer {
    queue: mpsc::Sender<Pending>,
    /// The queue's byte budget ([`QueueLimits::bytes`]).
    bytes: Arc<Semaphore>,
}

impl Proposer {
    /// Starts the batcher of `raft`, whose log reports its flushes to `log`; its entries are
    /// written in the event format `watch` holds (the cluster's). It stops when every
    /// `Proposer` clone is dropped.
    pub fn start(
        raft: Raft,
        log: Arc<AppendStats>,
        limits: QueueLimits,
        watch: Arc<ApplyWatch>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(limits.proposals.max(1));
        tokio::spawn(batcher(raft, log, rx, watch));
        Self {
            queue,
            bytes: Arc::new(Semaphore::new(
                limits
                    .bytes
                    .clamp(PROPOSAL_BYTES_MAX, Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// Takes `bytes` of the queue's byte budget, or `None` when that much is waiting already.
    fn hold(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        // At most PROPOSAL_BYTES_MAX (checked by the callers), which fits a u32.
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.bytes.clone().try_acquire_many_owned(permits).ok()
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
        let Some(held) = self.hold(bytes) else {
            return false;
        };
        // Nobody listens: the batcher's answer to a dropped receiver is ignored.
        let (reply, _) = oneshot::channel();
        self.queue
            .try_send(Pending {
                events,
                bytes,
                reply,
                detached: true,
                _bytes_held: Some(held),
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
        let held = self.hold(bytes).ok_or(ProposeError::Overloaded)?;
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending {
                events,
                bytes,
                reply,
                detached: false,
                _bytes_held: Some(held),
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

async fn batcher(
    raft: Raft,
    log: Arc<AppendStats>,
    mut rx: mpsc::Receiver<Pending>,
    watch: Arc<ApplyWatch>,
) {
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
                carry = Some(Pending {
                    _bytes_held: None,
                    ..next
                });
                break;
            }
            events = events.saturating_add(next.events.len());
            bytes = bytes.saturating_add(next.bytes);
            batch.push(next);
        }
        // Into one entry: each proposal's share of the queue's byte budget is given back here,
        // not held while the entry waits for an in-flight slot.
        let counts: Vec<usize> = batch.iter().map(|p| p.events.len()).collect();
        let mut all = Vec::with_capacity(events);
        let mut replies = Vec::with_capacity(batch.len());
        for pending in batch {
            all.extend(pending.events);
            replies.push(pending.reply);
        }
        // We never close the semaphore, so acquiring cannot fail.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let payload = EntryPayload {
            format_version: watch.event_format(),
            events: all,
        };
        // The leadership this batch is handed to: its answer is awaited only while it lasts.
        let metrics = raft.metrics();
        let handed_under = Leadership::of(&metrics.borrow());
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
                    let result = handed_under
                        .outlive(receiver, metrics, permit)
                        .await
                        .map_or_else(
                            |leader| Err(ProposeError::LeadershipLost { leader }),
                            from_raft,
                        );
                    split(result, &counts, replies);
                });
            }
        }
    }
}

/// What raft answered a batch, as its callers hear it.
fn from_raft(
    answer: Result<
        Result<
            openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
            ClientWriteError<NodeId, Node>,
        >,
        oneshot::error::RecvError,
    >,
) -> Result<Vec<EventOutcome>, ProposeError> {
    match answer {
        Ok(Ok(response)) => Ok(response.data.outcomes),
        Ok(Err(ClientWriteError::ForwardToLeader(forward))) => Err(ProposeError::NotLeader {
            leader: forward.leader_id,
        }),
        Ok(Err(error)) => Err(ProposeError::Raft(error.to_string())),
        Err(_) => Err(ProposeError::Raft("raft dropped the proposal".to_owned())),
    }
}

/// The term of the leadership a batch was handed to, and whether the node led in it then.
#[derive(Clone, Copy, Debug)]
struct Leadership {
    term: u64,
    leading: bool,
}

impl Leadership {
    fn of(metrics: &openraft::RaftMetrics<NodeId, Node>) -> Self {
        Self {
            term: metrics.current_term,
            leading: metrics.state == openraft::ServerState::Leader,
        }
    }

    /// Whether `metrics` show that this leadership is over: a later term, or no longer leading.
    fn ended(self, metrics: &openraft::RaftMetrics<NodeId, Node>) -> bool {
        metrics.current_term > self.term
            || (self.leading && metrics.state != openraft::ServerState::Leader)
    }

    /// Raft's answer to a batch handed over under this leadership, or `None` once the
    /// leadership ended first.
    ///
    /// openraft (0.9) keeps a former leader's pending answers and sends them when it applies or
    /// truncates their entries; but when the node then installs a snapshot that covers an entry
    /// it never applied, nobody answers it, ever. Waiting for that answer held an in-flight
    /// permit for good, and after two such entries the group's proposer on that node took no
    /// proposal again (simulation node layer, seed 91 with snapshots every 50 entries). The
    /// entry may still commit under the next leader, so the outcome is unknown: the caller
    /// retries with the same ids.
    async fn answer_or_end<F: Future + Unpin>(
        self,
        answer: &mut F,
        metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, Node>>,
    ) -> Option<F::Output> {
        loop {
            let ended = self.ended(&metrics.borrow_and_update());
            tokio::select! {
                biased;
                outcome = &mut *answer => return Some(outcome),
                () = std::future::ready(()), if ended => return None,
                changed = metrics.changed() => {
                    if changed.is_err() {
                        // Raft stopped: it drops the answer, which then reports that.
                        return Some(answer.await);
                    }
                }
            }
        }
    }

    /// Raft's answer to a batch handed over under this leadership, holding `permit` (one of
    /// the group's in-flight batches) only while the leadership lasts: once it ended, the
    /// permit is freed and the answer awaited [`LEADERSHIP_LOST_GRACE`] longer, after which
    /// the current leader (when known) is the answer.
    async fn outlive<F: Future + Unpin>(
        self,
        mut answer: F,
        mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, Node>>,
        permit: OwnedSemaphorePermit,
    ) -> Result<F::Output, Option<NodeId>> {
        let outcome = self.answer_or_end(&mut answer, &mut metrics).await;
        drop(permit);
        match outcome {
            Some(outcome) => Ok(outcome),
            None => tokio::time::timeout(LEADERSHIP_LOST_GRACE, answer)
                .await
                .map_err(|_| metrics.borrow().current_leader),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of about `bytes` encoded bytes.
    fn event_of(bytes: usize) -> Vec<Event> {
        use courier_proto::pb::events::{Content, MessageSent, event::Kind};
        vec![Event {
            kind: Some(Kind::MessageSent(MessageSent {
                content: Some(Content {
                    body: vec![7; bytes],
                    media: None,
                }),
                ..MessageSent::default()
            })),
        }]
    }

    /// Proposals waiting hold the queue's byte budget until the batcher takes them: past it, a
    /// proposal is refused as overload however few are waiting, and room comes back once the
    /// waiting one is taken.
    #[tokio::test]
    async fn the_queue_holds_at_most_its_bytes() {
        let (queue, mut waiting) = mpsc::channel(16);
        let proposer = Proposer {
            queue,
            bytes: Arc::new(Semaphore::new(PROPOSAL_BYTES_MAX)),
        };
        assert!(proposer.submit(event_of(600_000)), "within the budget");
        assert!(
            !proposer.submit(event_of(600_000)),
            "a second would pass the budget"
        );
        assert_eq!(
            proposer.propose(event_of(600_000)).await,
            Err(ProposeError::Overloaded)
        );
        assert!(proposer.submit(event_of(100_000)), "what fits still goes");
        drop(waiting.recv().await.expect("the first"));
        assert!(
            proposer.submit(event_of(600_000)),
            "the batcher took the first: its bytes are free"
        );
    }

    fn metrics(term: u64, state: openraft::ServerState) -> openraft::RaftMetrics<NodeId, Node> {
        let mut metrics = openraft::RaftMetrics::new_initial(1);
        metrics.current_term = term;
        metrics.state = state;
        metrics
    }

    #[tokio::test]
    async fn an_answer_raft_never_sends_is_abandoned_when_the_leadership_ends() {
        let (tx, rx) = tokio::sync::watch::channel(metrics(3, openraft::ServerState::Leader));
        let under = Leadership {
            term: 3,
            leading: true,
        };
        let waiting = tokio::spawn(async move {
            let mut rx = rx;
            under
                .answer_or_end(&mut std::future::pending::<()>(), &mut rx)
                .await
        });
        // Other changes in the same leadership keep it waiting.
        tx.send_modify(|m| m.last_applied = None);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "still the leader of term 3");
        // A snapshot installed after stepping down: a later term, the answer never comes.
        tx.send(metrics(4, openraft::ServerState::Follower))
            .expect("the waiter listens");
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter stops once the leadership ended")
            .expect("the waiter does not panic");
        assert_eq!(outcome, None);
    }

    #[tokio::test]
    async fn a_leadership_that_ended_before_the_wait_is_seen_at_once() {
        let (_tx, mut rx) =
            tokio::sync::watch::channel(metrics(5, openraft::ServerState::Follower));
        let under = Leadership {
            term: 5,
            leading: true,
        };
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            under.answer_or_end(&mut std::future::pending::<()>(), &mut rx),
        )
        .await
        .expect("no change needs to arrive");
        assert_eq!(outcome, None);
    }

    #[tokio::test]
    async fn an_answer_that_arrived_wins_over_a_change_of_leader() {
        let (_tx, mut rx) =
            tokio::sync::watch::channel(metrics(9, openraft::ServerState::Candidate));
        let under = Leadership {
            term: 8,
            leading: true,
        };
        let outcome = under
            .answer_or_end(&mut std::future::ready(7_u8), &mut rx)
            .await;
        assert_eq!(outcome, Some(7));
    }

    #[tokio::test]
    async fn a_follower_waits_for_raft_to_answer_in_its_term() {
        // Handed over while metrics showed no leadership: raft answers at once (forward to the
        // leader) or the node was leading after all; only a later term ends the wait.
        let (tx, rx) = tokio::sync::watch::channel(metrics(2, openraft::ServerState::Follower));
        let under = Leadership {
            term: 2,
            leading: false,
        };
        let waiting = tokio::spawn(async move {
            let mut rx = rx;
            under
                .answer_or_end(&mut std::future::pending::<()>(), &mut rx)
                .await
        });
        tx.send(metrics(2, openraft::ServerState::Leader))
            .expect("the waiter listens");
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "a leader of the same term still waits"
        );
        tx.send(metrics(3, openraft::ServerState::Follower))
            .expect("the waiter listens");
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a later term ends the wait")
            .expect("the waiter does not panic");
        assert_eq!(outcome, None);
    }

    #[tokio::test]
    async fn a_batch_frees_its_permit_when_the_leadership_ends_and_still_hears_a_late_answer() {
        let (tx, rx) = tokio::sync::watch::channel(metrics(3, openraft::ServerState::Leader));
        let under = Leadership {
            term: 3,
            leading: true,
        };
        let permits = Arc::new(Semaphore::new(1));
        let permit = permits.clone().acquire_owned().await.expect("open");
        let (answer, receiver) = oneshot::channel::<u8>();
        let waiting = tokio::spawn(under.outlive(receiver, rx, permit));
        tx.send(metrics(4, openraft::ServerState::Follower))
            .expect("the waiter listens");
        let freed = tokio::time::timeout(Duration::from_secs(1), permits.acquire())
            .await
            .expect("the permit is freed once the leadership ended");
        drop(freed);
        // Within the grace, raft's real answer (the entry applied or truncated) still counts.
        tokio::time::sleep(LEADERSHIP_LOST_GRACE / 2).await;
        answer.send(7).expect("the waiter listens");
        let outcome = waiting.await.expect("the waiter does not panic");
        assert_eq!(outcome.map(Result::ok), Ok(Some(7)));
    }

    #[tokio::test]
    async fn an_answer_that_never_comes_names_the_new_leader_after_the_grace() {
        let (tx, rx) = tokio::sync::watch::channel(metrics(3, openraft::ServerState::Leader));
        let under = Leadership {
            term: 3,
            leading: true,
        };
        let permit = Arc::new(Semaphore::new(1))
            .acquire_owned()
            .await
            .expect("open");
        let (_answer, receiver) = oneshot::channel::<u8>();
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn(under.outlive(receiver, rx, permit));
        let mut next = metrics(4, openraft::ServerState::Follower);
        next.current_leader = Some(2);
        tx.send(next).expect("the waiter listens");
        let outcome = waiting.await.expect("the waiter does not panic");
        assert_eq!(outcome, Err(Some(2)));
        assert!(
            started.elapsed() >= LEADERSHIP_LOST_GRACE,
            "it waited the grace"
        );
    }
}
