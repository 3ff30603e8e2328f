//! Membership: adding and removing nodes in every group (learner first, then voter), and leader
//! transfer towards this node.

use std::time::Duration;

use courier_consensus::leadership::RaftCallError;
use courier_consensus::types::{GroupId, NodeId};
use courier_proto::ShardId;
use courier_proto::pb::peer;
use tracing::info;

use super::{Cluster, internal, invalid, unavailable};
use crate::status::ApiError;

/// How long one group's membership change may wait for a leader.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(30);
/// Voters every group keeps, but a placed shard (which keeps the replicas the placement table
/// gives it): a membership change never leaves fewer.
pub const VOTERS_MIN: usize = 3;
/// How long a removal waits for the leader's state to show it committed, before the next
/// removal of the group may count the voters.
const STATE_SHOWN_WAIT: Duration = Duration::from_secs(1);

/// A membership change.
#[derive(Debug, Clone)]
pub(super) enum Change {
    Add(NodeId, String),
    Remove(NodeId),
}

impl Cluster {
    /// Adds a node to every group (or to `scope` only, on its leader): as a learner first, so it
    /// catches up, then as a voter. On a cluster that places shards it joins the metadata group
    /// only, holding no replica until moves give it some (`shard rebalance`). Safe to retry.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad node; `UNAVAILABLE` when a group has no leader in time;
    /// once the cluster's event format is past 1 (checked on the metadata group's leader),
    /// `FAILED_PRECONDITION` `COURIER:Cluster:MemberTooOld` for a node whose build does not read
    /// it and `UNAVAILABLE` `COURIER:Cluster:MemberUnreachable` for one that does not answer.
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

    /// Removes a node from every group (or from `scope` only, on its leader). On a cluster that
    /// places shards it leaves the metadata group, once it holds no replica (`node drain`).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `COURIER:Cluster:TooFewVoters` when fewer than [`VOTERS_MIN`]
    /// voters (in a placed shard: its replication factor) would remain, or
    /// `COURIER:Cluster:HoldsReplicas` when the placement table still puts replicas on the node;
    /// `UNAVAILABLE` when a group has no leader in time.
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
                if self.groups.placement().is_some() {
                    // Each shard is on its placed replicas only: moves give a node replicas and
                    // take them away; membership of every node is the metadata group's.
                    vec![GroupId::Metadata]
                } else {
                    std::iter::once(GroupId::Metadata)
                        .chain((0..shard_count).map(|s| GroupId::Shard(ShardId::new(s))))
                        .collect()
                }
            }
        };
        if let (Change::Remove(node), Some(placement)) = (&change, self.groups.placement())
            && groups.contains(&GroupId::Metadata)
        {
            holds_none(&placement, *node, self.groups.shard_count().unwrap_or(0))?;
        }
        for group in groups {
            self.change_group(group, &change, scope.is_some()).await?;
        }
        Ok(())
    }

    pub(super) async fn change_group(
        &self,
        group: GroupId,
        change: &Change,
        scoped: bool,
    ) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + MEMBERSHIP_WAIT;
        loop {
            let handle = self.group(group).await?;
            let state = handle.state();
            if state.current_leader == Some(self.groups.node_id()) {
                match self.change_here(&handle, group, change).await? {
                    Ok(()) => {
                        info!(%group, ?change, "membership changed");
                        return Ok(());
                    }
                    // Another change of the group (another move of the shard) has not
                    // committed yet: this one is made once it has.
                    Err(error) if error.busy && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(error) => return Err(unavailable(error.to_string(), None)),
                }
            }
            let leader_addr = state.leader_addr();
            if let (Some(addr), false) = (leader_addr, scoped) {
                match self.delegate_change(&addr, group, change).await {
                    Ok(()) => return Ok(()),
                    Err(
                        error @ (ApiError::FailedPrecondition { .. }
                        | ApiError::Unavailable {
                            code: super::format::MEMBER_UNREACHABLE,
                            ..
                        }),
                    ) => return Err(error),
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

    /// Makes `change` of `group` on this node, its leader. The outer error ends the change; the
    /// inner one is raft's (`busy`: another change is under way).
    async fn change_here(
        &self,
        handle: &courier_consensus::groups::GroupHandle,
        group: GroupId,
        change: &Change,
    ) -> Result<Result<(), RaftCallError>, ApiError> {
        // The metadata group's changes take the format gate one at a time (a raise of
        // the event format holds it too). Every group's removals take the voters gate,
        // so the count of voters a removal checks is not changed by another removal
        // before it commits. Each change names only its own node (`add_voter`,
        // `remove_voter`), so two at once never write each other out.
        let _gate = if group == GroupId::Metadata {
            Some(self.format_gate.clone().lock_owned().await)
        } else {
            None
        };
        match change {
            Change::Add(id, addr) => {
                if !handle.state().voters.contains(id) {
                    // A node of an older build would stop at the first entry of the
                    // cluster's format.
                    if group == GroupId::Metadata {
                        self.admit_to_format(handle, *id, addr).await?;
                    }
                    if let Err(error) = handle.add_learner(*id, addr.clone()).await {
                        return Ok(Err(error));
                    }
                    if let Err(error) = handle.add_voter(*id).await {
                        return Ok(Err(error));
                    }
                }
            }
            Change::Remove(id) => {
                let gate = self
                    .voters_gates
                    .lock()
                    .expect("voters gates lock is never poisoned")
                    .entry(group)
                    .or_default()
                    .clone();
                let _voters_gate = gate.lock().await;
                let mut voters = handle.state().voters;
                if voters.remove(id) {
                    let min = self.voters_min(group);
                    if voters.len() < min {
                        return Err(ApiError::FailedPrecondition {
                            code: "COURIER:Cluster:TooFewVoters",
                            message: format!(
                                "removing node {id} from {group} would leave {} voters (minimum {min})",
                                voters.len()
                            ),
                        });
                    }
                    // Bounded: a group that lost its quorum would hold its gate for good.
                    match tokio::time::timeout(MEMBERSHIP_WAIT, handle.remove_voter(*id)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => return Ok(Err(error)),
                        Err(_) => {
                            return Err(unavailable(
                                format!("removing node {id} from {group} did not commit in time"),
                                None,
                            ));
                        }
                    }
                    // The next removal counts the voters from this replica's state:
                    // not before it shows this one.
                    let shown = tokio::time::Instant::now() + STATE_SHOWN_WAIT;
                    while handle.state().voters.contains(id) && tokio::time::Instant::now() < shown
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    /// The fewest voters a removal may leave in `group`: a placed shard keeps the replicas the
    /// placement table gives it (a move adds its new replica before its old one leaves, so two
    /// moves of one shard at once cannot both take one out); every other group [`VOTERS_MIN`].
    fn voters_min(&self, group: GroupId) -> usize {
        match (group, self.groups.placement()) {
            (GroupId::Shard(shard), Some(placement)) => placement.replicas(shard).len(),
            _ => VOTERS_MIN,
        }
    }

    async fn delegate_change(
        &self,
        addr: &str,
        group: GroupId,
        change: &Change,
    ) -> Result<(), ApiError> {
        let mut client = self
            .peers
            .admin(addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let group = Some(courier_consensus::network::group_to_wire(group));
        let result = match change {
            Change::Add(id, addr) => {
                let node = peer::NodeInfo {
                    node_id: *id,
                    peer_addr: addr.clone(),
                    client_addr: String::new(),
                };
                let request = self.peers.request_within(
                    peer::AddNodeRequest {
                        node: Some(node),
                        group,
                    },
                    MEMBERSHIP_WAIT,
                );
                client.add_node(request).await.map(|_| ())
            }
            Change::Remove(id) => {
                let request = self.peers.request_within(
                    peer::RemoveNodeRequest {
                        node_id: *id,
                        group,
                    },
                    MEMBERSHIP_WAIT,
                );
                client.remove_node(request).await.map(|_| ())
            }
        };
        result.map_err(|status| match status.code() {
            tonic::Code::FailedPrecondition => ApiError::FailedPrecondition {
                code: [
                    "COURIER:Cluster:HoldsReplicas",
                    "COURIER:Cluster:MemberTooOld",
                ]
                .into_iter()
                .find(|code| super::code_is(&status, code))
                .unwrap_or("COURIER:Cluster:TooFewVoters"),
                message: status.message().to_owned(),
            },
            _ if super::code_is(&status, super::format::MEMBER_UNREACHABLE) => {
                super::format::member_unreachable(status.message().to_owned())
            }
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
        let shard = ShardId::new(shard);
        let handle = self
            .groups
            .get(GroupId::Shard(shard))
            .ok_or_else(|| ApiError::unknown_shard(shard))?;
        if !handle.is_leader() {
            handle.elect().await.map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }
}

/// Refuses to let `node` leave the cluster while the placement table puts replicas on it: the
/// shard would keep a voter that nothing runs (or a member that is no longer one).
fn holds_none(
    placement: &courier_consensus::placement::Placement,
    node: NodeId,
    shard_count: u16,
) -> Result<(), ApiError> {
    let held: Vec<u16> = (0..shard_count)
        .filter(|shard| placement.holds(node, ShardId::new(*shard)))
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    Err(ApiError::FailedPrecondition {
        code: "COURIER:Cluster:HoldsReplicas",
        message: format!(
            "node {node} still holds replicas of {} shards ({held:?}): drain it first \
             (`courier-ops node drain --id {node}`), then remove it",
            held.len()
        ),
    })
}
