//! The cluster as this node sees it: bootstrap, status, leader transfer, and proposing to a
//! shard's leader wherever it is.
//!
//! ```text
//!   ForwardBatch(dest shard) ─▶ local raft leads it? ─yes─▶ client_write ─▶ answer after commit
//!                                   │ no
//!                                   ├─ leader known ─▶ ForwardBatch to the leader's node (one hop)
//!                                   └─ no leader    ─▶ UNAVAILABLE + retry-after-ms
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use courier_consensus::groups::{GroupHandle, Groups};
use courier_consensus::leadership::{LeaderView, Role};
use courier_consensus::proposer::ProposeError;
use courier_consensus::types::{ClusterSettings, EventOutcome, GroupId, NodeId};
use courier_proto::limits::{FORWARD_BATCH_EVENTS_MAX, SHARD_COUNT_MAX};
use courier_proto::pb::events::{Event, event::Kind};
use courier_proto::pb::peer::{
    self, ForwardBatchRequest, ForwardBatchResponse, InitClusterRequest, InitClusterResponse,
    ShardStatus, StatusResponse,
};
use courier_proto::{LogIndex, ShardId};
use courier_storage::Db;
use courier_storage::projection::{Projection, outbox};
use tracing::{Instrument as _, info};

use crate::status::ApiError;

/// How long bootstrap waits for the metadata group to elect this node.
const INIT_LEADER_WAIT: Duration = Duration::from_secs(10);
/// Retry hint when a shard has no leader and the request was not held (bootstrap, membership,
/// forwarded batches, which their callers retry), ms. Client proposals are held and get a hint
/// from the election timeout instead ([`Cluster::advise_retry`]).
const NO_LEADER_RETRY_MS: u64 = 500;
/// Metadata marking a forward that already took its one hop.
const FORWARDED_KEY: &str = "courier-forwarded";

/// How long one group's membership change may wait for a leader.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(30);
/// Voters every group keeps: a membership change never leaves fewer.
pub const VOTERS_MIN: usize = 3;

/// How long a read at a given index waits for this replica to catch up.
pub const READ_WAIT: Duration = Duration::from_secs(5);

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before the read started (leader only).
    Linearizable,
    /// Reflects at least the log up to this index (any replica).
    AtLeast(LogIndex),
}

/// A membership change.
#[derive(Debug, Clone)]
enum Change {
    Add(NodeId, String),
    Remove(NodeId),
}

/// This node's view of the cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    groups: Arc<Groups>,
    db: Arc<Db>,
    rpc_timeout: Duration,
    edge: Edge,
    sends: Arc<crate::sends::SendsInFlight>,
}

/// The ephemeral side of a node: presence it holds as a shard leader, the streams it reports,
/// and the push hook.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Presence of the users of shards this node leads.
    pub presence: Arc<crate::presence::PresenceTable>,
    /// Device streams open on this node, reported to their shard leaders.
    pub reporter: Arc<crate::presence::Reporter>,
    /// Wakes devices of users with no live stream.
    pub pusher: crate::push::Pusher,
}

fn unavailable(message: String, leader: Option<NodeId>) -> ApiError {
    ApiError::Unavailable {
        code: "COURIER:Shard:NoLeader",
        message,
        retry_after_ms: NO_LEADER_RETRY_MS,
        leader,
    }
}

fn internal(message: String) -> ApiError {
    ApiError::Internal {
        code: "COURIER:Node:Fault",
        message,
    }
}

fn invalid(code: &'static str, message: String) -> ApiError {
    ApiError::Invalid { code, message }
}

impl Cluster {
    /// The cluster view over this node's groups.
    pub fn new(groups: Arc<Groups>, db: Arc<Db>, rpc_timeout: Duration, edge: Edge) -> Self {
        Self {
            groups,
            db,
            rpc_timeout,
            edge,
            sends: Arc::default(),
        }
    }

    /// Presence, stream reports and push.
    pub fn edge(&self) -> &Edge {
        &self.edge
    }

    /// Applies presence `reports` from node `node` to this node's table and answers `query`.
    pub fn presence_local(
        &self,
        node: NodeId,
        reports: &[peer::PresenceReport],
        query: &[u64],
    ) -> Vec<courier_proto::pb::client::PresenceUpdate> {
        self.edge.presence.report(node, reports);
        query.iter().map(|u| self.edge.presence.query(*u)).collect()
    }

    /// Sends presence `reports` for users of `shard` to its leader and asks it about `query`.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the shard has no leader or it does not answer.
    pub async fn presence_exchange(
        &self,
        shard: ShardId,
        reports: Vec<peer::PresenceReport>,
        query: Vec<u64>,
    ) -> Result<Vec<courier_proto::pb::client::PresenceUpdate>, ApiError> {
        match self.route(shard).await? {
            Route::Local(_) => Ok(self.presence_local(self.groups.node_id(), &reports, &query)),
            Route::Remote { addr, leader } => {
                let channel = self
                    .groups
                    .pool()
                    .channel(&addr)
                    .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
                let mut request = tonic::Request::new(peer::PresenceRequest {
                    node_id: self.groups.node_id(),
                    reports,
                    query,
                });
                request.set_timeout(self.rpc_timeout);
                let response = peer::forward_client::ForwardClient::new(channel)
                    .presence(request)
                    .await
                    .map_err(|status| {
                        unavailable(format!("leader {leader:?}: {}", status.message()), leader)
                    })?;
                Ok(response.into_inner().presence)
            }
        }
    }

    /// The node's raft groups.
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// Bootstraps a new cluster from this node: the metadata group with every member, the
    /// settings, and one raft group per shard with every member; then spreads shard leadership
    /// over the members. Safe to retry with the same members.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed member list or settings, `FAILED_PRECONDITION` when the
    /// cluster exists with other members, `UNAVAILABLE` when no leader emerges in time.
    pub async fn init(&self, request: InitClusterRequest) -> Result<InitClusterResponse, ApiError> {
        let members = self.validate_init(&request)?;
        let shard_count = u16::try_from(request.shard_count).expect("validated");
        if !request.init_shards.is_empty() {
            // A bootstrapping peer asks this node to start some shards as their first leader.
            for shard in &request.init_shards {
                let shard = ShardId::from_wire(*shard, shard_count)?;
                self.init_group(GroupId::Shard(shard), &members).await?;
            }
            return Ok(InitClusterResponse {
                already_initialized: false,
            });
        }
        let metadata = self.group(GroupId::Metadata).await?;
        let already = metadata
            .is_initialized()
            .await
            .map_err(|e| internal(e.to_string()))?;
        if already {
            let existing: BTreeSet<NodeId> = metadata.state().voters;
            let wanted: BTreeSet<NodeId> = members.keys().copied().collect();
            if existing != wanted {
                return Err(ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:AlreadyInitialized",
                    message: format!("the cluster exists with members {existing:?}"),
                });
            }
        } else {
            info!(members = ?members.keys().collect::<Vec<_>>(), shard_count, "initializing cluster");
            self.init_group(GroupId::Metadata, &members).await?;
        }
        self.wait_leader(&metadata).await?;
        let settings = ClusterSettings {
            shard_count,
            replication_factor: u16::try_from(members.len()).expect("validated"),
        };
        let known = metadata
            .applied
            .read()
            .expect("applied view lock")
            .raft
            .settings;
        match known {
            Some(existing) if existing != settings => {
                return Err(ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:AlreadyInitialized",
                    message: format!("the cluster exists with {existing:?}"),
                });
            }
            Some(_) => {}
            None => {
                metadata
                    .write_settings(settings)
                    .await
                    .map_err(|e| unavailable(e.to_string(), None))?;
            }
        }
        self.init_shards(&request, shard_count, &members).await?;
        Ok(InitClusterResponse {
            already_initialized: already,
        })
    }

    /// Starts shard `i` on member `i mod N`, which becomes its first leader: leaders spread over
    /// the nodes from the start (the raft library has no leader transfer).
    async fn init_shards(
        &self,
        request: &InitClusterRequest,
        shard_count: u16,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), ApiError> {
        let nodes: Vec<(&NodeId, &String)> = members.iter().collect();
        let mut per_node: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for shard in 0..shard_count {
            let (id, _) = nodes[usize::from(shard) % nodes.len()];
            per_node.entry(*id).or_default().push(u32::from(shard));
        }
        for (id, shards) in per_node {
            let local = id == self.groups.node_id();
            let delegated = !local
                && self
                    .delegate_init(request, &members[&id], &shards)
                    .await
                    .is_ok();
            if !delegated {
                // This node, or a member that did not answer: start the shards here.
                for shard in shards {
                    let shard = ShardId::new(u16::try_from(shard).expect("below shard_count"));
                    self.init_group(GroupId::Shard(shard), members).await?;
                }
            }
        }
        Ok(())
    }

    async fn delegate_init(
        &self,
        request: &InitClusterRequest,
        addr: &str,
        shards: &[u32],
    ) -> Result<(), ApiError> {
        let channel = self
            .groups
            .pool()
            .channel(addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let mut client = peer::admin_client::AdminClient::new(channel);
        let mut delegated = tonic::Request::new(InitClusterRequest {
            init_shards: shards.to_vec(),
            ..request.clone()
        });
        delegated.set_timeout(self.rpc_timeout);
        client.init_cluster(delegated).await.map_err(|status| {
            tracing::warn!(%addr, %status, "could not delegate shard start; starting here");
            unavailable(status.message().to_owned(), None)
        })?;
        Ok(())
    }

    async fn init_group(
        &self,
        group: GroupId,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), ApiError> {
        let handle = self.group(group).await?;
        if handle
            .is_initialized()
            .await
            .map_err(|e| internal(e.to_string()))?
        {
            return Ok(());
        }
        handle
            .initialize(members)
            .await
            .map_err(|e| internal(e.to_string()))
    }

    fn validate_init(
        &self,
        request: &InitClusterRequest,
    ) -> Result<BTreeMap<NodeId, String>, ApiError> {
        if request.members.is_empty() {
            return Err(invalid(
                "COURIER:Cluster:NoMembers",
                "members must not be empty".to_owned(),
            ));
        }
        let mut members = BTreeMap::new();
        for member in &request.members {
            if member.node_id == 0 || member.peer_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "COURIER:Cluster:BadMember",
                    format!(
                        "member {} needs a node id >= 1 and a host:port peer address",
                        member.node_id
                    ),
                ));
            }
            if members
                .insert(member.node_id, member.peer_addr.clone())
                .is_some()
            {
                return Err(invalid(
                    "COURIER:Cluster:BadMember",
                    format!("node id {} appears twice", member.node_id),
                ));
            }
        }
        if !members.contains_key(&self.groups.node_id()) {
            return Err(invalid(
                "COURIER:Cluster:NotAMember",
                format!(
                    "this node ({}) must be one of the members",
                    self.groups.node_id()
                ),
            ));
        }
        if request.shard_count == 0 || request.shard_count > SHARD_COUNT_MAX {
            return Err(invalid(
                "COURIER:Cluster:ShardCount",
                format!(
                    "shard_count must be 1..={SHARD_COUNT_MAX}, got {}",
                    request.shard_count
                ),
            ));
        }
        let members_len = u32::try_from(members.len()).unwrap_or(u32::MAX);
        if request.replication_factor != 0 && request.replication_factor != members_len {
            return Err(invalid(
                "COURIER:Cluster:ReplicationFactor",
                format!(
                    "this version places every shard on every member: replication_factor must be 0 or {members_len}"
                ),
            ));
        }
        Ok(members)
    }

    async fn group(&self, group: GroupId) -> Result<GroupHandle, ApiError> {
        self.groups
            .get_or_create(group)
            .await
            .map_err(|e| internal(e.to_string()))
    }

    async fn wait_leader(&self, handle: &GroupHandle) -> Result<NodeId, ApiError> {
        handle
            .wait_for_leader(INIT_LEADER_WAIT)
            .await
            .ok_or_else(|| unavailable("no leader elected in time".to_owned(), None))
    }

    /// Adds a node to every group (or to `scope` only, on its leader): as a learner first, so it
    /// catches up, then as a voter. Safe to retry.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad node; `UNAVAILABLE` when a group has no leader in time.
    pub async fn add_node(&self, request: peer::AddNodeRequest) -> Result<(), ApiError> {
        let node = request
            .node
            .clone()
            .ok_or_else(|| invalid("COURIER:Cluster:BadMember", "missing node".to_owned()))?;
        if node.node_id == 0 || node.peer_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "COURIER:Cluster:BadMember",
                "a node needs an id >= 1 and a host:port peer address".to_owned(),
            ));
        }
        let change = Change::Add(node.node_id, node.peer_addr);
        self.change_members(change, request.group.as_ref()).await
    }

    /// Removes a node from every group (or from `scope` only, on its leader).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` when fewer than [`VOTERS_MIN`] voters would remain; `UNAVAILABLE`
    /// when a group has no leader in time.
    pub async fn remove_node(&self, request: peer::RemoveNodeRequest) -> Result<(), ApiError> {
        self.change_members(Change::Remove(request.node_id), request.group.as_ref())
            .await
    }

    async fn change_members(
        &self,
        change: Change,
        scope: Option<&peer::GroupId>,
    ) -> Result<(), ApiError> {
        let groups: Vec<GroupId> = match scope {
            Some(wire) => vec![
                courier_consensus::network::group_from_wire(Some(wire))
                    .map_err(|m| invalid("COURIER:Cluster:BadGroup", m))?,
            ],
            None => {
                let shard_count = self.groups.shard_count().ok_or_else(|| {
                    unavailable("the cluster is not initialized".to_owned(), None)
                })?;
                std::iter::once(GroupId::Metadata)
                    .chain((0..shard_count).map(|s| GroupId::Shard(ShardId::new(s))))
                    .collect()
            }
        };
        for group in groups {
            self.change_group(group, &change, scope.is_some()).await?;
        }
        Ok(())
    }

    async fn change_group(
        &self,
        group: GroupId,
        change: &Change,
        scoped: bool,
    ) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + MEMBERSHIP_WAIT;
        loop {
            let handle = self.group(group).await?;
            let state = handle.state();
            let mut voters = state.voters.clone();
            if state.current_leader == Some(self.groups.node_id()) {
                match change {
                    Change::Add(id, addr) => {
                        if !voters.contains(id) {
                            handle
                                .add_learner(*id, addr.clone())
                                .await
                                .map_err(|e| unavailable(e.to_string(), None))?;
                            voters.insert(*id);
                            handle
                                .change_voters(voters)
                                .await
                                .map_err(|e| unavailable(e.to_string(), None))?;
                        }
                    }
                    Change::Remove(id) => {
                        if voters.remove(id) {
                            if voters.len() < VOTERS_MIN {
                                return Err(ApiError::FailedPrecondition {
                                    code: "COURIER:Cluster:TooFewVoters",
                                    message: format!(
                                        "removing node {id} from {group} would leave {} voters (minimum {VOTERS_MIN})",
                                        voters.len()
                                    ),
                                });
                            }
                            handle
                                .change_voters(voters)
                                .await
                                .map_err(|e| unavailable(e.to_string(), None))?;
                        }
                    }
                }
                info!(%group, ?change, "membership changed");
                return Ok(());
            }
            let leader_addr = state.leader_addr();
            if let (Some(addr), false) = (leader_addr, scoped) {
                match self.delegate_change(&addr, group, change).await {
                    Ok(()) => return Ok(()),
                    Err(error @ ApiError::FailedPrecondition { .. }) => return Err(error),
                    Err(_) => {}
                }
            } else if scoped && state.current_leader.is_some() {
                return Err(unavailable(
                    format!("this node no longer leads {group}"),
                    state.current_leader,
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(
                    format!("{group} had no reachable leader for the membership change"),
                    state.current_leader,
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn delegate_change(
        &self,
        addr: &str,
        group: GroupId,
        change: &Change,
    ) -> Result<(), ApiError> {
        let channel = self
            .groups
            .pool()
            .channel(addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let mut client = peer::admin_client::AdminClient::new(channel);
        let group = Some(courier_consensus::network::group_to_wire(group));
        let result = match change {
            Change::Add(id, addr) => {
                let node = peer::NodeInfo {
                    node_id: *id,
                    peer_addr: addr.clone(),
                    client_addr: String::new(),
                };
                let mut request = tonic::Request::new(peer::AddNodeRequest {
                    node: Some(node),
                    group,
                });
                request.set_timeout(MEMBERSHIP_WAIT);
                client.add_node(request).await.map(|_| ())
            }
            Change::Remove(id) => {
                let mut request = tonic::Request::new(peer::RemoveNodeRequest {
                    node_id: *id,
                    group,
                });
                request.set_timeout(MEMBERSHIP_WAIT);
                client.remove_node(request).await.map(|_| ())
            }
        };
        result.map_err(|status| match status.code() {
            tonic::Code::FailedPrecondition => ApiError::FailedPrecondition {
                code: "COURIER:Cluster:TooFewVoters",
                message: status.message().to_owned(),
            },
            _ => unavailable(status.message().to_owned(), None),
        })
    }

    /// Makes this node start an election for a shard (leader transfer towards this node).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` when sent to another node than `to_node`; `NOT_FOUND` for an unknown
    /// shard.
    pub async fn transfer_leader(
        &self,
        request: peer::TransferLeaderRequest,
    ) -> Result<(), ApiError> {
        if request.to_node != self.groups.node_id() {
            return Err(invalid(
                "COURIER:Cluster:WrongNode",
                format!(
                    "send the transfer to node {}, this is node {}",
                    request.to_node,
                    self.groups.node_id()
                ),
            ));
        }
        let shard = u16::try_from(request.shard)
            .map_err(|_| invalid("COURIER:Cluster:BadShard", "shard out of range".to_owned()))?;
        let handle = self
            .groups
            .get(GroupId::Shard(ShardId::new(shard)))
            .ok_or_else(|| ApiError::NotFound {
                code: "COURIER:Cluster:UnknownShard",
                message: format!("shard {shard} is not replicated here"),
            })?;
        if !handle.is_leader() {
            handle.elect().await.map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Waits until this replica of `shard` can serve a read with the given consistency.
    ///
    /// `Linearizable` confirms leadership with a quorum (raft's read index) and waits until
    /// the state machine applied up to it, so the read reflects every write acknowledged before
    /// it started; only the leader can do this. `AtLeast(index)` waits until this replica, leader
    /// or follower, applied `index` (a device resuming at a cursor), up to [`READ_WAIT`].
    ///
    /// # Errors
    /// `UNAVAILABLE` (with the leader hint) when a linearizable read reaches a follower or the
    /// leader lost its quorum, or when the replica does not reach `index` in time.
    pub async fn read_barrier(
        &self,
        shard: ShardId,
        consistency: ReadConsistency,
    ) -> Result<(), ApiError> {
        let handle = self
            .groups
            .get(GroupId::Shard(shard))
            .ok_or_else(|| ApiError::NotFound {
                code: "COURIER:Cluster:UnknownShard",
                message: format!("{shard} is not replicated here"),
            })?;
        match consistency {
            ReadConsistency::Linearizable => {
                handle
                    .ensure_linearizable()
                    .await
                    .map_err(|error| unavailable(format!("{shard}: {error}"), error.leader))?;
                Ok(())
            }
            ReadConsistency::AtLeast(index) => {
                let deadline = tokio::time::Instant::now() + READ_WAIT;
                loop {
                    let applied = handle
                        .applied
                        .read()
                        .expect("applied view lock")
                        .shard
                        .applied;
                    if applied >= index {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(unavailable(
                            format!("{shard} applied {applied}, behind {index}"),
                            None,
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Takes a consistent checkpoint of the node's database into `dir`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for an empty or existing `dir`; `INTERNAL` when RocksDB fails.
    pub fn backup(&self, dir: &str) -> Result<peer::BackupResponse, ApiError> {
        if dir.is_empty() || std::path::Path::new(dir).exists() {
            return Err(invalid(
                "COURIER:Backup:Dir",
                format!("{dir:?} must be a path that does not exist yet"),
            ));
        }
        let status = self.status();
        self.db
            .checkpoint(std::path::Path::new(dir))
            .map_err(|e| internal(e.to_string()))?;
        info!(dir, "checkpoint written");
        Ok(peer::BackupResponse {
            dir: dir.to_owned(),
            shards: status.shards,
        })
    }

    /// Sends a typing update for `to_users` to every other node (fire and forget, one RPC timeout
    /// each).
    pub async fn broadcast_typing(
        &self,
        to_users: Vec<u64>,
        update: courier_proto::pb::client::TypingUpdate,
    ) {
        let Some(metadata) = self.groups.get(GroupId::Metadata) else {
            return;
        };
        for (id, addr) in metadata.state().members {
            if id == self.groups.node_id() {
                continue;
            }
            let Some(channel) = self.groups.pool().channel(&addr) else {
                continue;
            };
            let mut request = tonic::Request::new(peer::TypingRequest {
                to_users: to_users.clone(),
                update: Some(update),
            });
            request.set_timeout(self.rpc_timeout);
            let _ = peer::forward_client::ForwardClient::new(channel)
                .typing(request)
                .await;
        }
    }

    /// Reports every group this node runs.
    pub fn status(&self) -> StatusResponse {
        let mut shards = Vec::new();
        let mut nodes = Vec::new();
        for (group, handle) in self.groups.list() {
            let state = handle.state();
            let view = handle.applied.read().expect("applied view lock").clone();
            let GroupId::Shard(shard) = group else {
                nodes = state
                    .members
                    .into_iter()
                    .map(|(node_id, peer_addr)| peer::NodeInfo {
                        node_id,
                        peer_addr,
                        client_addr: String::new(),
                    })
                    .collect();
                continue;
            };
            let last_log_index = state.last_log_index.map_or(0, |i| i.saturating_add(1));
            let applied = view.shard.applied.get();
            let digest = view
                .shard
                .digests
                .values()
                .fold(0_u128, |sum, d| sum.wrapping_add(d.sum));
            shards.push(ShardStatus {
                shard: u32::from(shard.get()),
                role: state.role.as_str().to_owned(),
                term: state.term,
                leader: state.current_leader.unwrap_or(0),
                replicas: state.voters.into_iter().collect(),
                last_log_index,
                committed: applied,
                applied,
                apply_lag: last_log_index.saturating_sub(applied),
                outbox_len_entries: self.outbox_len(shard),
                digest: format!("{digest:032x}"),
                fsyncs: handle
                    .stats
                    .fsyncs
                    .load(std::sync::atomic::Ordering::Relaxed),
                entries_appended: handle
                    .stats
                    .entries
                    .load(std::sync::atomic::Ordering::Relaxed),
                // Reported as storage indexes (raft index + 1), like every index here.
                snapshot_index: state.snapshot_index.map_or(0, |i| i.saturating_add(1)),
                purged_index: state.purged_index.map_or(0, |i| i.saturating_add(1)),
            });
        }
        StatusResponse {
            node_id: self.groups.node_id(),
            shards,
            nodes,
        }
    }

    fn outbox_len(&self, shard: ShardId) -> u64 {
        self.outbox_by_dest(shard).iter().map(|(_, len)| len).sum()
    }

    /// On the recipient's shard leader: wakes `user`'s devices when none has a live stream.
    pub fn push_if_offline(&self, user: u64, message_id: Vec<u8>) {
        if !self.edge.presence.is_online(user) {
            self.edge
                .pusher
                .push(crate::push::PushJob { user, message_id });
        }
    }

    /// Outbox entries of `shard` not yet forwarded and trimmed, per destination shard.
    pub fn outbox_by_dest(&self, shard: ShardId) -> Vec<(u16, u64)> {
        outbox::states(&self.db.read(shard).view(Projection::Outbox))
            .map(|states| {
                states
                    .iter()
                    .map(|(dest, s)| (dest.get(), s.last_pos.saturating_sub(s.trimmed_up_to)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where a shard's leader is, from this node's point of view.
    async fn route(&self, shard: ShardId) -> Result<Route, ApiError> {
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
    /// it twice ([`retry_safe`]); any other answers `UNAVAILABLE` once the new leader is known.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the shard has no leader within the wait or leadership moved; the
    /// caller retries with the same ids (idempotent).
    pub async fn propose(
        &self,
        shard: ShardId,
        events: Vec<Event>,
        already_forwarded: bool,
    ) -> Result<Vec<EventOutcome>, ApiError> {
        if let Some(sent) = crate::sends::single_send(&events)
            && let Some(first) = crate::sends::applied_result(&self.db, shard, sent)?
        {
            // A retry of a send this replica already applied: answered here, nothing proposed.
            return Ok(vec![first]);
        }
        if already_forwarded {
            // The origin node holds and retries; the hop's target answers at once.
            let route = self.route(shard).await?;
            return self.propose_via(route, shard, events, true).await;
        }
        let deadline = tokio::time::Instant::now() + self.leader_wait();
        let resend = retry_safe(&events).then(|| events.clone());
        let mut events = Some(events);
        loop {
            // The leader and term this attempt goes to: a later attempt waits for another.
            let seen = self.leader_view(shard).await;
            let route = match self.route(shard).await {
                Ok(route) => route,
                Err(error) if is_no_leader(&error) => {
                    // No leader known: nothing was sent, so waiting and going on is always safe.
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
                crate::sends::propose_send_on_leader(
                    &self.sends,
                    &self.db,
                    shard,
                    &handle,
                    events,
                    (self.rpc_timeout, self.rpc_timeout),
                    |events| propose_local(&handle, shard, events),
                )
                .await
            }
            Route::Local(handle) => propose_local(&handle, shard, events).await,
            Route::Remote { leader, .. } if already_forwarded => Err(unavailable(
                format!("{shard} moved its leader; retry"),
                leader,
            )),
            Route::Remote { addr, leader } => {
                let channel = self
                    .groups
                    .pool()
                    .channel(&addr)
                    .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
                let mut client = peer::forward_client::ForwardClient::new(channel);
                let mut request = tonic::Request::new(peer::ProposeRequest {
                    shard: u32::from(shard.get()),
                    events,
                });
                request.set_timeout(self.rpc_timeout);
                request.metadata_mut().insert(
                    FORWARDED_KEY,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                crate::telemetry::inject(request.metadata_mut());
                let response = client.propose(request).await.map_err(|status| {
                    unavailable(format!("leader {leader:?}: {}", status.message()), leader)
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

    /// Stores a forwarded batch on the destination shard's leader, here or one hop away.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed batch; `UNAVAILABLE` when the shard has no leader.
    pub async fn forward_batch(
        &self,
        request: ForwardBatchRequest,
        already_forwarded: bool,
    ) -> Result<ForwardBatchResponse, ApiError> {
        let shard_count = self
            .groups
            .shard_count()
            .ok_or_else(|| unavailable("the cluster is not initialized".to_owned(), None))?;
        let dest = ShardId::from_wire(request.dest_shard, shard_count)?;
        let source = ShardId::from_wire(request.source_shard, shard_count)?;
        let events = validate_batch(&request, source)?;
        let handle = match self.route(dest).await? {
            Route::Local(handle) => handle,
            Route::Remote { addr, leader } if !already_forwarded => {
                return self.forward_to(&addr, request, leader).await;
            }
            Route::Remote { leader, .. } => {
                return Err(unavailable(
                    format!("{dest} moved its leader; retry"),
                    leader,
                ));
            }
        };
        let last = request
            .first_pos
            .saturating_add(u64::try_from(events.len()).unwrap_or(u64::MAX))
            .saturating_sub(1);
        let applied = outbox::inbound_applied(
            &self.db.read(dest).view(Projection::Outbox),
            request.source_shard,
        )
        .map_err(|e| internal(e.to_string()))?;
        if applied.saturating_add(1) < request.first_pos {
            return Err(invalid(
                "COURIER:Forward:Gap",
                format!(
                    "{dest} applied up to {applied} from {source}; the batch starts at {}",
                    request.first_pos
                ),
            ));
        }
        let fresh: Vec<Event> = events
            .into_iter()
            .zip(request.first_pos..)
            .filter(|(_, pos)| *pos > applied)
            .map(|(event, _)| event)
            .collect();
        if !fresh.is_empty() {
            let landed: Vec<Option<Vec<u8>>> = fresh
                .iter()
                .map(|event| match &event.kind {
                    Some(Kind::MessageDelivered(d)) => Some(d.message_id.clone()),
                    _ => None,
                })
                .collect();
            let outcomes = handle
                .proposer
                .propose(fresh)
                .instrument(tracing::info_span!("raft.commit", shard = %dest))
                .await
                .map_err(propose_error)?;
            for (outcome, message_id) in outcomes.iter().zip(landed) {
                if let (
                    EventOutcome::Stored {
                        user,
                        duplicate: false,
                        ..
                    },
                    Some(message_id),
                ) = (outcome, message_id)
                {
                    self.push_if_offline(*user, message_id);
                }
            }
        }
        // Everything up to `last` is now committed here (fresh events just now, the rest earlier).
        Ok(ForwardBatchResponse { stored_up_to: last })
    }

    async fn forward_to(
        &self,
        addr: &str,
        request: ForwardBatchRequest,
        leader: Option<NodeId>,
    ) -> Result<ForwardBatchResponse, ApiError> {
        let channel = self
            .groups
            .pool()
            .channel(addr)
            .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
        let mut client = peer::forward_client::ForwardClient::new(channel);
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.rpc_timeout);
        crate::telemetry::inject(request.metadata_mut());
        request.metadata_mut().insert(
            FORWARDED_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        client
            .forward_batch(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                unavailable(
                    format!("leader {leader:?} at {addr}: {}", status.message()),
                    leader,
                )
            })
    }
}

/// Where a shard's leader runs.
enum Route {
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

/// An outcome in its wire form (peer `Propose`).
pub fn outcome_to_wire(outcome: EventOutcome) -> peer::EventOutcome {
    use peer::event_outcome::Kind as W;
    let kind = match outcome {
        EventOutcome::Sent {
            message_id,
            sent_at_ms,
            log_index,
            duplicate,
        } => W::Sent(peer::event_outcome::Sent {
            message_id,
            sent_at_ms,
            log_index,
            duplicate,
        }),
        EventOutcome::Stored {
            user,
            seq,
            duplicate,
        } => W::Stored(peer::event_outcome::Stored {
            user,
            seq,
            duplicate,
        }),
        EventOutcome::DuplicateForward => W::DuplicateForward(true),
        EventOutcome::DeviceRegistered { user, device } => {
            W::DeviceRegistered(peer::event_outcome::DeviceRegistered { user, device })
        }
        EventOutcome::Rejected { code, message } => {
            W::Rejected(peer::event_outcome::Rejected { code, message })
        }
        EventOutcome::Done => W::Done(true),
    };
    peer::EventOutcome { kind: Some(kind) }
}

fn outcome_from_wire(wire: peer::EventOutcome) -> Result<EventOutcome, ApiError> {
    use peer::event_outcome::Kind as W;
    Ok(match wire.kind {
        Some(W::Sent(s)) => EventOutcome::Sent {
            message_id: s.message_id,
            sent_at_ms: s.sent_at_ms,
            log_index: s.log_index,
            duplicate: s.duplicate,
        },
        Some(W::Stored(s)) => EventOutcome::Stored {
            user: s.user,
            seq: s.seq,
            duplicate: s.duplicate,
        },
        Some(W::DuplicateForward(_)) => EventOutcome::DuplicateForward,
        Some(W::DeviceRegistered(d)) => EventOutcome::DeviceRegistered {
            user: d.user,
            device: d.device,
        },
        Some(W::Rejected(r)) => EventOutcome::Rejected {
            code: r.code,
            message: r.message,
        },
        Some(W::Done(_)) => EventOutcome::Done,
        None => {
            return Err(internal(
                "a peer answered an outcome of unknown kind".to_owned(),
            ));
        }
    })
}

/// Maps a proposal failure to the API.
fn propose_error(error: ProposeError) -> ApiError {
    match error {
        ProposeError::NotLeader { leader } => {
            unavailable("leadership moved; retry".to_owned(), leader)
        }
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

/// Whether a request already took its one forwarding hop.
pub fn was_forwarded(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.contains_key(FORWARDED_KEY)
}

/// Checks a forwarded batch: only deliveries and receipts, from `source`, at consecutive
/// positions starting at `first_pos`, within the batch limit.
fn validate_batch(request: &ForwardBatchRequest, source: ShardId) -> Result<Vec<Event>, ApiError> {
    if request.events.is_empty() || request.events.len() > FORWARD_BATCH_EVENTS_MAX {
        return Err(invalid(
            "COURIER:Forward:BatchSize",
            format!(
                "a batch holds 1..={FORWARD_BATCH_EVENTS_MAX} events, got {}",
                request.events.len()
            ),
        ));
    }
    if request.first_pos == 0 {
        return Err(invalid(
            "COURIER:Forward:Position",
            "positions start at 1".to_owned(),
        ));
    }
    let mut events = request.events.clone();
    let now_ms = now_ms();
    for (event, pos) in events.iter_mut().zip(request.first_pos..) {
        let source_shard = u32::from(source.get());
        match event.kind.as_mut() {
            Some(Kind::MessageDelivered(delivered)) => {
                courier_proto::MessageId::from_wire(&delivered.message_id, "message_id")?;
                courier_proto::UserId::from_wire(delivered.recipient_user, "recipient_user")?;
                if delivered.source_shard != source_shard || delivered.source_pos != pos {
                    return Err(invalid(
                        "COURIER:Forward:Position",
                        format!("event at {pos} names another position"),
                    ));
                }
                if delivered.stored_at_ms == 0 {
                    // The destination leader decides when the message was stored.
                    delivered.stored_at_ms = now_ms;
                }
            }
            Some(Kind::ReceiptRecorded(receipt)) => {
                courier_proto::MessageId::from_wire(&receipt.message_id, "message_id")?;
                if receipt.source_shard != source_shard || receipt.source_pos != pos {
                    return Err(invalid(
                        "COURIER:Forward:Position",
                        format!("event at {pos} names another position"),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "COURIER:Forward:EventKind",
                    "only MessageDelivered and ReceiptRecorded are forwarded".to_owned(),
                ));
            }
        }
    }
    Ok(events)
}

use crate::env::now_ms;
