//! What the node asks of one raft group, in this crate's own types: the replica's role, the
//! leader it knows and the term, the members, and the few raft calls the node makes (bootstrap,
//! membership changes, elections, linearizable reads, the cluster settings).
//!
//! Everything here reads openraft's metrics watch or calls the group's `Raft`; the node above
//! never names an openraft type. Reads are one consistent snapshot of the metrics each.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use courier_proto::PhoneKey;
use openraft::ChangeMembers;
use openraft::error::{ChangeMembershipError, ClientWriteError};

use crate::groups::GroupHandle;
use crate::placement::Placement;
use crate::types::{ClusterSettings, Node, NodeId, Proposal};

/// What a replica is doing in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It leads the group.
    Leader,
    /// It follows a leader (or waits for one).
    Follower,
    /// It stands for election.
    Candidate,
    /// It replicates without a vote.
    Learner,
    /// It stopped.
    Shutdown,
}

impl Role {
    /// The role's name in status reports (`"leader"`, `"follower"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leader => "leader",
            Self::Follower => "follower",
            Self::Candidate => "candidate",
            Self::Learner => "learner",
            Self::Shutdown => "shutdown",
        }
    }

    fn of(state: openraft::ServerState) -> Self {
        match state {
            openraft::ServerState::Leader => Self::Leader,
            openraft::ServerState::Follower => Self::Follower,
            openraft::ServerState::Candidate => Self::Candidate,
            openraft::ServerState::Learner => Self::Learner,
            openraft::ServerState::Shutdown => Self::Shutdown,
        }
    }
}

/// The leader a replica knows (itself included) and the term it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderView {
    /// The leader, `None` while the replica knows of none.
    pub leader: Option<NodeId>,
    /// The replica's current term.
    pub term: u64,
}

/// One snapshot of a replica's state in its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    /// What the replica is doing.
    pub role: Role,
    /// The replica's current term.
    pub term: u64,
    /// The leader the replica knows of (itself when it leads).
    pub current_leader: Option<NodeId>,
    /// The voters of the effective membership.
    pub voters: BTreeSet<NodeId>,
    /// Every member (voters and learners) and its peer address.
    pub members: BTreeMap<NodeId, String>,
    /// The last raft log index the replica holds (raft's numbering, from 0).
    pub last_log_index: Option<u64>,
    /// The raft log index its last snapshot covers.
    pub snapshot_index: Option<u64>,
    /// The raft log index up to which its log was purged.
    pub purged_index: Option<u64>,
}

impl GroupState {
    /// The peer address of the leader this replica knows, if it knows one and its address.
    pub fn leader_addr(&self) -> Option<String> {
        self.current_leader
            .and_then(|id| self.members.get(&id).cloned())
    }
}

/// A raft call that failed: openraft's message, and the leader to go to when it names one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RaftCallError {
    /// What went wrong, as openraft says it.
    pub message: String,
    /// The leader the call should go to instead, when openraft knows it.
    pub leader: Option<NodeId>,
    /// A membership change refused because another one has not committed yet: the same change
    /// made again after it succeeds.
    pub busy: bool,
}

impl RaftCallError {
    fn from_display(error: impl std::fmt::Display) -> Self {
        Self {
            message: error.to_string(),
            leader: None,
            busy: false,
        }
    }

    /// A refused membership change (or learner added), telling whether another change was
    /// under way.
    fn of_change(
        error: &openraft::error::RaftError<NodeId, ClientWriteError<NodeId, Node>>,
    ) -> Self {
        let busy = matches!(
            error.api_error(),
            Some(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_)
            ))
        );
        Self {
            busy,
            ..Self::from_display(error)
        }
    }
}

impl GroupHandle {
    /// The log index this replica applied up to.
    pub fn applied_index(&self) -> courier_proto::LogIndex {
        self.applied
            .read()
            .expect("applied view lock is never poisoned")
            .shard
            .applied
    }

    /// Whether `node` is a voter of this group, as this replica knows its membership: a cheap
    /// check (no copy of the raft metrics), for every read.
    pub fn has_voter(&self, node: NodeId) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .any(|id| id == node)
    }

    /// What this replica is doing, its term, leader and members, as of now.
    pub fn state(&self) -> GroupState {
        let metrics = self.raft.metrics().borrow().clone();
        GroupState {
            role: Role::of(metrics.state),
            term: metrics.current_term,
            current_leader: metrics.current_leader,
            voters: metrics.membership_config.voter_ids().collect(),
            members: metrics
                .membership_config
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.map(|l| l.index),
            purged_index: metrics.purged.map(|l| l.index),
        }
    }

    /// Whether `node` is a member (voter or learner) of this group as this replica knows it;
    /// `None` before the group has a membership (a node not yet initialized).
    pub fn has_member(&self, node: NodeId) -> Option<bool> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let mut members = metrics.membership_config.nodes().peekable();
        members.peek()?;
        Some(members.any(|(id, _)| *id == node))
    }

    /// Whether this replica follows a leader it knows and applied every entry its log holds (a
    /// follower catching up a backlog also does, between two of its leader's appends).
    pub fn follows_and_applied_all(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.state == openraft::ServerState::Follower
            && metrics.current_leader.is_some()
            && metrics.last_applied.map(|id| id.index) == metrics.last_log_index
    }

    /// Whether this replica leads its group now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == openraft::ServerState::Leader
    }

    /// The leader this replica knows of, as of now.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The leader as this replica sees it (itself when it leads) and its term.
    pub fn leader_view(&self) -> LeaderView {
        leader_view(&self.raft.metrics().borrow())
    }

    /// Waits up to `timeout` until this replica knows a leader and returns it; `None` when none
    /// emerged in time.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                if let Some(leader) = metrics.borrow().current_leader {
                    return leader;
                }
                if metrics.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// Waits until this replica knows a leader that is not the one in `seen` (another node, or
    /// the same one re-elected in a later term), or any leader when `seen` is `None`; gives up
    /// at `deadline`. Returns whether it knows one.
    pub async fn wait_for_new_leader(
        &self,
        seen: Option<LeaderView>,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                {
                    let metrics = metrics.borrow_and_update();
                    let now = leader_view(&metrics);
                    let new = match seen {
                        None => true,
                        Some(old) => now.leader != old.leader || now.term > old.term,
                    };
                    // A leader counts once a request can reach it: this replica, or a member
                    // whose address it knows. A replica can know the leader's id before the
                    // membership naming it (a learner just added): counting that leader made a
                    // caller that routes by address retry at once, again and again, without
                    // ever yielding (seen in the jepsen clock-membership run).
                    let reachable = metrics.state == openraft::ServerState::Leader
                        || now.leader.is_some_and(|leader| {
                            metrics
                                .membership_config
                                .nodes()
                                .any(|(id, _)| *id == leader)
                        });
                    if reachable && new {
                        return true;
                    }
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout_at(deadline, wait)
            .await
            .unwrap_or(false)
    }

    /// Waits until this replica leads the group and has applied an entry of its own term, which
    /// means it has applied everything any earlier leader committed: a lookup in its projections
    /// then sees every committed fact. Returns `false` when it is not (or stops being) the leader,
    /// or that did not happen within `timeout` (a new leader applies its first entry within one
    /// replication round).
    pub async fn leader_caught_up(&self, timeout: Duration) -> bool {
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                {
                    let now = metrics.borrow();
                    if now.state != openraft::ServerState::Leader {
                        return false;
                    }
                    if now
                        .last_applied
                        .is_some_and(|id| id.leader_id.term == now.current_term)
                    {
                        return true;
                    }
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Whether the group was ever initialized (on this replica's state).
    ///
    /// # Errors
    /// [`RaftCallError`] when the raft stopped.
    pub async fn is_initialized(&self) -> Result<bool, RaftCallError> {
        self.raft
            .is_initialized()
            .await
            .map_err(RaftCallError::from_display)
    }

    /// Initializes the group with `members` (node id → peer address). Already initialized counts
    /// as success, so bootstrap is safe to retry.
    ///
    /// # Errors
    /// [`RaftCallError`] for any other refusal or fault.
    pub async fn initialize(
        &self,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), RaftCallError> {
        let members: BTreeMap<NodeId, Node> = members
            .iter()
            .map(|(id, addr)| (*id, Node::new(addr.clone())))
            .collect();
        match self.raft.initialize(members).await {
            Ok(())
            | Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => Ok(()),
            Err(error) => Err(RaftCallError::from_display(error)),
        }
    }

    /// On the leader: proposes the cluster settings, the phone-hash key and the placement
    /// (`None`: every shard on every member) to the metadata group and waits until applied.
    /// Only the first settings entry takes effect.
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the write fails.
    pub async fn write_settings(
        &self,
        settings: ClusterSettings,
        phone_key: PhoneKey,
        placement: Option<Placement>,
    ) -> Result<(), RaftCallError> {
        let proposal = match placement {
            None => Proposal::ClusterKeyed(settings, phone_key),
            Some(placement) => Proposal::ClusterPlaced(settings, phone_key, Arc::new(placement)),
        };
        self.raft
            .client_write(proposal)
            .await
            .map(|_| ())
            .map_err(RaftCallError::from_display)
    }

    /// On the metadata group's leader: records in the placement table that `shard`'s replica
    /// moved from `from` to `to`, and waits until applied (a move that does not fit the table
    /// changes nothing).
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the write fails.
    pub async fn write_placement_move(
        &self,
        shard: courier_proto::ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), RaftCallError> {
        self.raft
            .client_write(Proposal::PlacementMoved(shard, from, to))
            .await
            .map(|_| ())
            .map_err(RaftCallError::from_display)
    }

    /// On the metadata group's leader: marks `node` draining (`on`) or not, and waits until
    /// applied.
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the write fails.
    pub async fn write_draining(&self, node: NodeId, on: bool) -> Result<(), RaftCallError> {
        self.raft
            .client_write(Proposal::Draining(node, on))
            .await
            .map(|_| ())
            .map_err(RaftCallError::from_display)
    }

    /// On the metadata group's leader: records that the cluster's leaders write event format
    /// `format` from now on (never lowered), and waits until applied.
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the write fails.
    pub async fn write_event_format(&self, format: u32) -> Result<(), RaftCallError> {
        self.raft
            .client_write(Proposal::EventFormat(format))
            .await
            .map(|_| ())
            .map_err(RaftCallError::from_display)
    }

    /// On the leader: adds `id` at `addr` as a learner and waits until it caught up.
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the change fails.
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), RaftCallError> {
        self.raft
            .add_learner(id, Node::new(addr), true)
            .await
            .map(|_| ())
            .map_err(|error| RaftCallError::of_change(&error))
    }

    /// On the leader: makes learner `id` a voter. The change names only `id`, so the leader
    /// applies it to the membership as it is when the change runs: two changes at once (two
    /// moves of one shard) never write each other out, as a whole new voter set read earlier
    /// would.
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the change fails.
    pub async fn add_voter(&self, id: NodeId) -> Result<(), RaftCallError> {
        self.change_members(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await
    }

    /// On the leader: voter `id` leaves the group (not kept as a learner). Like
    /// [`GroupHandle::add_voter`], it changes only `id`.
    ///
    /// # Errors
    /// [`RaftCallError`] when this replica does not lead or the change fails.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), RaftCallError> {
        self.change_members(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await
    }

    async fn change_members(
        &self,
        change: ChangeMembers<NodeId, Node>,
    ) -> Result<(), RaftCallError> {
        self.raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(|error| RaftCallError::of_change(&error))
    }

    /// Makes this replica stand for election now.
    ///
    /// # Errors
    /// [`RaftCallError`] when the raft stopped.
    pub async fn elect(&self) -> Result<(), RaftCallError> {
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(RaftCallError::from_display)
    }

    /// Confirms leadership with a quorum (openraft's read index) and waits until this replica
    /// applied up to it: a read after this reflects every write acknowledged before it started.
    ///
    /// # Errors
    /// [`RaftCallError`], with the leader to go to when openraft knows it, when this replica
    /// does not lead or lost its quorum.
    pub async fn ensure_linearizable(&self) -> Result<(), RaftCallError> {
        self.raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(|error| RaftCallError {
                message: error.to_string(),
                leader: error.forward_to_leader().and_then(|f| f.leader_id),
                busy: false,
            })
    }
}

/// The leader `metrics` show (this replica when it leads) and the term.
fn leader_view(metrics: &openraft::RaftMetrics<NodeId, Node>) -> LeaderView {
    let leader = if metrics.state == openraft::ServerState::Leader {
        Some(metrics.id)
    } else {
        metrics.current_leader
    };
    LeaderView {
        leader,
        term: metrics.current_term,
    }
}
