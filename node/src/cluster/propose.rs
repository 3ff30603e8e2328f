//! Routing and proposing: where a shard's leader is, and proposing there (here, or one hop away
//! on its node), holding a client's request through a failover.

use std::time::Duration;

use courier_consensus::groups::GroupHandle;
use courier_consensus::leadership::{LeaderView, Role};
use courier_consensus::proposer::ProposeError;
use courier_consensus::types::{EventOutcome, GroupId, NodeId};
use courier_proto::ShardId;
use courier_proto::pb::events::{Event, event::Kind};
use courier_proto::pb::peer;
use tracing::Instrument as _;

use super::wire::outcome_from_wire;
use super::{Cluster, NO_LEADER_RETRY_MS, internal, invalid, unavailable};
use crate::status::ApiError;

impl Cluster {
    /// Where a shard's leader is, from this node's point of view.
    pub(super) async fn route(&self, shard: ShardId) -> Result<Route, ApiError> {
        if !self.holds(shard) {
            // No replica here: the leader as the replicas last named it.
            return match self.leader_elsewhere(shard).await {
                Some((leader, addr)) => Ok(Route::Remote {
                    addr,
                    leader: Some(leader),
                }),
                None => Err(unavailable(
                    format!("{shard} is not replicated here and its leader is not known here yet"),
                    None,
                )),
            };
        }
        let handle = self.group(GroupId::Shard(shard)).await?;
        let state = handle.state();
        if state.role == Role::Leader {
            return Ok(Route::Local(handle));
        }
        let leader = state.current_leader;
        match state.leader_addr() {
            Some(addr) => Ok(Route::Remote { addr, leader }),
            None => Err(unavailable(format!("{shard} has no leader"), leader)),
        }
    }

    /// Proposes events decided on this node to `shard`'s leader, here or one hop away, and
    /// returns one outcome per event after they applied.
    ///
    /// During a failover the request is held here rather than refused at once: while the shard
    /// has no known leader, or its leader stopped answering or stepped down, it waits (up to
    /// [`Cluster::leader_wait`]) for this node to learn of a new leader and goes there. A request
    /// that may already have reached the old leader is sent again only when doing so cannot apply
    /// it twice (a send, an ack or a read); any other answers `UNAVAILABLE` once the new leader is known.
    ///
    /// A node that holds no replica of `shard` hands the events to a node that does
    /// (`Cluster::propose_elsewhere`), which does all of the above.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the shard has no leader within the wait or leadership moved; the
    /// caller retries with the same ids (idempotent).
    pub async fn propose(
        &self,
        shard: ShardId,
        events: Vec<Event>,
    ) -> Result<Vec<EventOutcome>, ApiError> {
        if !self.holds(shard) {
            let resend_safe = retry_safe(&events);
            return self
                .propose_elsewhere(shard, events, resend_safe)
                .await
                .map_err(|error| self.advise_retry(error));
        }
        if let Some(first) = self.applied_send(shard, &events)? {
            return Ok(vec![first]);
        }
        let deadline = tokio::time::Instant::now() + self.leader_wait();
        let resend = retry_safe(&events).then(|| events.clone());
        let mut events = Some(events);
        loop {
            if tokio::time::Instant::now() >= deadline {
                // Every pass below waits for news from raft, bounded by the deadline; this check
                // makes the bound hold even if a pass found news it could not use.
                return Err(self.advise_retry(unavailable(
                    format!("{shard} has no reachable leader"),
                    None,
                )));
            }
            // The leader and term this attempt goes to: a later attempt waits for another.
            let seen = self.leader_view(shard).await;
            let route = match self.route(shard).await {
                Ok(route) => route,
                Err(error) if is_no_leader(&error) => {
                    // No reachable leader: nothing was sent, so waiting and going on is always
                    // safe. The wait counts a leader only once its address is known, as `route`
                    // does, so this never comes back here at once.
                    if !self.wait_for_new_leader(shard, None, deadline).await {
                        return Err(self.advise_retry(error));
                    }
                    continue;
                }
                Err(error) => return Err(error),
            };
            let Some(attempt) = events.take().or_else(|| resend.clone()) else {
                // Sent once already and not safe to send twice: the caller decides.
                return Err(self.advise_retry(unavailable(
                    format!("{shard} changed its leader during the request; retry"),
                    None,
                )));
            };
            let result = self.propose_via(route, shard, attempt, false).await;
            if !result.as_ref().is_err_and(is_no_leader) {
                return result;
            }
            if !self.wait_for_new_leader(shard, seen, deadline).await {
                return result.map_err(|error| self.advise_retry(error));
            }
        }
    }

    /// Serves the peer `Propose` RPC of a request that took its one hop: proposes on this node
    /// when it leads `shard` and answers at once otherwise (the origin node holds and retries).
    ///
    /// # Errors
    /// `UNAVAILABLE` when this node does not lead `shard` (any more).
    pub async fn propose_forwarded(
        &self,
        shard: ShardId,
        events: Vec<Event>,
    ) -> Result<Vec<EventOutcome>, ApiError> {
        if let Some(first) = self.applied_send(shard, &events)? {
            return Ok(vec![first]);
        }
        let route = self.route(shard).await?;
        self.propose_via(route, shard, events, true).await
    }

    /// The answer to a retry of a client send this replica already applied, found in its dedup
    /// projection: answered here, nothing proposed.
    fn applied_send(
        &self,
        shard: ShardId,
        events: &[Event],
    ) -> Result<Option<EventOutcome>, ApiError> {
        match crate::sends::single_send(events) {
            Some(sent) => crate::sends::applied_result(&self.db, shard, sent),
            None => Ok(None),
        }
    }

    /// How long a request waits on this node for a shard's new leader during a failover: one
    /// election, with room for one split vote (twice the longest election timeout).
    pub fn leader_wait(&self) -> Duration {
        self.groups.election_timeout_max().saturating_mul(2)
    }

    /// Fills the retry hint of a `NoLeader` answer: after [`Cluster::leader_wait`] passed without
    /// a leader (no quorum, most likely), half to all of the shortest election timeout, with
    /// jitter so that clients refused together do not return together.
    fn advise_retry(&self, error: ApiError) -> ApiError {
        match error {
            ApiError::Unavailable {
                code: code @ "COURIER:Shard:NoLeader",
                message,
                leader,
                ..
            } => {
                let min_ms =
                    u64::try_from(self.groups.election_timeout_min().as_millis()).unwrap_or(1000);
                ApiError::Unavailable {
                    code,
                    message,
                    retry_after_ms: crate::env::random_range(min_ms / 2..=min_ms),
                    leader,
                }
            }
            other => other,
        }
    }

    /// The leader of `shard` as this node sees it (itself included) and the term it sees.
    async fn leader_view(&self, shard: ShardId) -> Option<LeaderView> {
        let handle = self.group(GroupId::Shard(shard)).await.ok()?;
        Some(handle.leader_view())
    }

    /// Waits until this node knows a leader of `shard` that is not the one in `seen` (another
    /// node, or the same one re-elected in a later term), or any leader when `seen` is `None`;
    /// gives up at `deadline`. Returns whether it knows one.
    async fn wait_for_new_leader(
        &self,
        shard: ShardId,
        seen: Option<LeaderView>,
        deadline: tokio::time::Instant,
    ) -> bool {
        let Ok(handle) = self.group(GroupId::Shard(shard)).await else {
            return false;
        };
        handle.wait_for_new_leader(seen, deadline).await
    }

    /// Proposes through `route`: on this node, or one hop away on the leader's.
    async fn propose_via(
        &self,
        route: Route,
        shard: ShardId,
        events: Vec<Event>,
        already_forwarded: bool,
    ) -> Result<Vec<EventOutcome>, ApiError> {
        match route {
            Route::Local(handle) if crate::sends::single_send(&events).is_some() => {
                // A send to a user of the same shard is stored in the recipient's inbox by this
                // very entry (no forward, so the forward path's push hook does not see it): this
                // node leads the shard and holds its presence, so it decides the push here.
                let same_shard_to = crate::sends::single_send(&events)
                    .filter(|sent| sent.recipient_shard == u32::from(shard.get()))
                    .and_then(|sent| match sent.to.as_ref()?.with.as_ref()? {
                        courier_proto::pb::events::conversation::With::User(user) => Some(*user),
                        courier_proto::pb::events::conversation::With::Group(_) => None,
                    });
                let outcomes = crate::sends::propose_send_on_leader(
                    &self.sends,
                    &self.db,
                    shard,
                    &handle,
                    events,
                    // A retry waits for the attempt in flight for half the forwarding node's
                    // deadline, so that the forwarding node gets this answer (and passes it on)
                    // before its own call gives up.
                    (self.rpc_timeout, self.rpc_timeout / 2),
                    {
                        let handle = handle.clone();
                        move |events| async move { propose_local(&handle, shard, events).await }
                    },
                )
                .await?;
                if let (
                    Some(to),
                    Some(EventOutcome::Sent {
                        message_id,
                        duplicate: false,
                        ..
                    }),
                ) = (same_shard_to, outcomes.first())
                {
                    self.push_if_offline(to, message_id.clone());
                }
                Ok(outcomes)
            }
            Route::Local(handle) => propose_local(&handle, shard, events).await,
            Route::Remote { leader, .. } if already_forwarded => Err(unavailable(
                format!("{shard} moved its leader; retry"),
                leader,
            )),
            Route::Remote { addr, leader } => {
                let mut client = self
                    .peers
                    .forward(&addr)
                    .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
                let request = self.peers.forwarded(peer::ProposeRequest {
                    shard: u32::from(shard.get()),
                    events,
                });
                let response = client.propose(request).await.map_err(|status| {
                    ApiError::passed_on_from_leader(&status).unwrap_or_else(|| {
                        unavailable(format!("leader {leader:?}: {}", status.message()), leader)
                    })
                })?;
                response
                    .into_inner()
                    .outcomes
                    .into_iter()
                    .map(outcome_from_wire)
                    .collect()
            }
        }
    }
}

/// Where a shard's leader runs.
pub(super) enum Route {
    Local(GroupHandle),
    Remote {
        addr: String,
        leader: Option<NodeId>,
    },
}

/// Whether `error` says the shard had no (reachable) leader.
fn is_no_leader(error: &ApiError) -> bool {
    matches!(
        error,
        ApiError::Unavailable {
            code: "COURIER:Shard:NoLeader",
            ..
        }
    )
}

/// Whether proposing `events` a second time, after a first attempt whose fate is unknown, can
/// never apply them twice: a client send (deduplicated by its client message id at apply), an
/// ack or a read (positions that only move forward).
fn retry_safe(events: &[Event]) -> bool {
    !events.is_empty()
        && events.iter().all(|event| {
            matches!(
                event.kind,
                Some(Kind::MessageSent(_) | Kind::DeliveryAcked(_) | Kind::ReadUpTo(_))
            )
        })
}

/// Proposes on this node, the shard's leader, and waits for the outcomes.
async fn propose_local(
    handle: &GroupHandle,
    shard: ShardId,
    events: Vec<Event>,
) -> Result<Vec<EventOutcome>, ApiError> {
    handle
        .proposer
        .propose(events)
        .instrument(tracing::info_span!("raft.commit", %shard))
        .await
        .map_err(propose_error)
}

/// Maps a proposal failure to the API.
pub(super) fn propose_error(error: ProposeError) -> ApiError {
    match error {
        ProposeError::NotLeader { leader } => {
            unavailable("leadership moved; retry".to_owned(), leader)
        }
        ProposeError::LeadershipLost { leader } => unavailable(
            "leadership moved before the outcome was known; retry with the same ids".to_owned(),
            leader,
        ),
        ProposeError::Overloaded => ApiError::Unavailable {
            code: "COURIER:Shard:Overloaded",
            message: error.to_string(),
            retry_after_ms: NO_LEADER_RETRY_MS,
            leader: None,
        },
        ProposeError::TooLarge { .. } => {
            invalid("COURIER:Shard:ProposalTooLarge", error.to_string())
        }
        ProposeError::Raft(message) => internal(message),
    }
}
