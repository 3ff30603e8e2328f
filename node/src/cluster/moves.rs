//! Shard moves: one replica of a shard goes from one node to another, never below `R` voters.
//!
//! ```text
//!   on `from`:  to joins (learner, catches up, voter) ─▶ `from` leaves (a leader removes
//!               itself and steps down) ─▶ placement table records the move (metadata leader)
//!               ─▶ the shard's data on `from` is deleted and checked gone
//! ```
//!
//! Every step is skipped when already done, so a move interrupted anywhere finishes when it is
//! sent again; until the table records it, the shard's replicas are still found through the
//! old entry (reads and writes try the placed replicas in turn).

use std::time::Duration;

use courier_consensus::types::{GroupId, NodeId};
use courier_proto::ShardId;
use courier_proto::pb::peer;
use tracing::info;

use super::membership::Change;
use super::{Cluster, internal, invalid, unavailable};
use crate::status::ApiError;

/// How long a move tries to record itself in the placement table while the metadata group has
/// no reachable leader (it elects one within an election timeout when a member died).
const RECORD_WAIT: Duration = Duration::from_secs(30);

impl Cluster {
    /// Serves `Admin.MoveShard` (see the module docs): on the node the replica leaves, or on
    /// another voter of the shard when that node is down (then its data is not deleted).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `COURIER:Cluster:NotPlaced` for a cluster with every shard on every
    /// member, `COURIER:Cluster:BadMove` when the table shows no such move to make;
    /// `INVALID_ARGUMENT` `COURIER:Cluster:WrongNode` when sent to neither `from` nor a voter,
    /// `COURIER:Cluster:BadMember` for a `to` outside the cluster; `UNAVAILABLE` when a step
    /// did not finish in time (send the move again: it resumes).
    pub async fn move_shard(
        &self,
        request: peer::MoveShardRequest,
    ) -> Result<peer::MoveShardResponse, ApiError> {
        let shard_count = self.groups.shard_count().unwrap_or(0);
        let shard = ShardId::from_wire(request.shard, shard_count)?;
        let (from, to) = (request.from_node, request.to_node);
        if request.placement_only {
            // One hop: only the metadata leader records; anyone else answers so, and the
            // sender tries again with its newer view of the leader.
            self.record_move_here(shard, from, to).await?;
            return Ok(peer::MoveShardResponse::default());
        }
        let placement = self
            .groups
            .placement()
            .ok_or(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:NotPlaced",
                message: "every shard is on every member of this cluster: there is nothing to move"
                    .to_owned(),
            })?;
        let on_from = from == self.groups.node_id();
        if !on_from && !self.holds(shard) {
            return Err(invalid(
                "COURIER:Cluster:WrongNode",
                format!(
                    "send the move to node {from} or another voter of {shard}; node {} is neither",
                    self.groups.node_id()
                ),
            ));
        }
        let to_addr = self
            .groups
            .get(GroupId::Metadata)
            .and_then(|metadata| metadata.state().members.remove(&to))
            .ok_or_else(|| {
                invalid(
                    "COURIER:Cluster:BadMember",
                    format!("node {to} is not a member of the cluster"),
                )
            })?;
        let already = placement.holds(to, shard) && !placement.holds(from, shard);
        if !already {
            if placement.moved(shard, from, to).is_none() {
                return Err(ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:BadMove",
                    message: format!(
                        "{shard} is on nodes {:?}: it cannot move from node {from} to node {to}",
                        placement.replicas(shard)
                    ),
                });
            }
            let group = GroupId::Shard(shard);
            info!(%shard, from, to, "shard move: the new replica joins");
            self.change_group(group, &Change::Add(to, to_addr), false)
                .await?;
            // When this node leads the shard it removes itself: raft commits the membership
            // without it (the other voters are a quorum of it) and the leader then steps down,
            // so the others elect a new one (raft's leader removal). No transfer is needed.
            info!(%shard, from, to, "shard move: the old replica leaves");
            self.change_group(group, &Change::Remove(from), false)
                .await?;
            self.record_move(shard, from, to).await?;
        }
        if !on_from {
            // `from` is down: its copy stays on its disk, outside every group.
            info!(%shard, from, to, "shard move done; node {from} keeps its data");
            return Ok(peer::MoveShardResponse {
                families_left: 0,
                already_moved: already,
                deleted: false,
            });
        }
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        loop {
            // `to` may not have applied the table's new entry yet: it answers once it has.
            match self.confirm_removed(shard, from, to).await {
                Err(ApiError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        }
        let families_left = self
            .groups
            .drop_shard(shard)
            .await
            .map_err(|e| internal(e.to_string()))?;
        info!(%shard, from, to, families_left, "shard move done");
        Ok(peer::MoveShardResponse {
            families_left,
            already_moved: already,
            deleted: true,
        })
    }

    /// Checks with `to`, now a voter, that `from` (this node) is out of the shard's group before
    /// its data is deleted: this node's own view may never learn of its removal, and a voter
    /// that lost its log and vote could vote twice in one term.
    async fn confirm_removed(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), ApiError> {
        let addr = self
            .groups
            .get(GroupId::Metadata)
            .and_then(|metadata| metadata.state().members.remove(&to))
            .ok_or_else(|| internal(format!("node {to} has no address")))?;
        let mut client = self
            .peers
            .forward(&addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let request = self.peers.request(peer::ReadShardRequest {
            shard: u32::from(shard.get()),
            ops: Vec::new(),
        });
        let voters = client
            .read_shard(request)
            .await
            .map_err(|status| unavailable(format!("node {to}: {}", status.message()), None))?
            .into_inner()
            .voters;
        if voters.contains(&to) && !voters.contains(&from) {
            return Ok(());
        }
        Err(ApiError::FailedPrecondition {
            code: "COURIER:Cluster:StillAVoter",
            message: format!(
                "node {to} sees {shard}'s voters as {voters:?}: node {from} keeps its data"
            ),
        })
    }

    /// Records in the placement table that `shard` moved from `from` to `to`: on the metadata
    /// group's leader, here or one hop away; tried again while the metadata group elects (up to
    /// [`RECORD_WAIT`]).
    async fn record_move(&self, shard: ShardId, from: NodeId, to: NodeId) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        loop {
            let attempt = self.record_move_once(shard, from, to).await;
            match attempt {
                Err(ApiError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn record_move_once(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), ApiError> {
        let metadata = self.group(GroupId::Metadata).await?;
        let state = metadata.state();
        if state.current_leader == Some(self.groups.node_id()) {
            return self.record_move_here(shard, from, to).await;
        }
        let addr = state.leader_addr().ok_or_else(|| {
            unavailable(
                "the metadata group has no leader; send the move again".to_owned(),
                None,
            )
        })?;
        let mut client = self
            .peers
            .admin(&addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let request = self.peers.request(peer::MoveShardRequest {
            shard: u32::from(shard.get()),
            from_node: from,
            to_node: to,
            placement_only: true,
        });
        client.move_shard(request).await.map_err(|status| {
            if status.code() == tonic::Code::FailedPrecondition {
                ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:BadMove",
                    message: status.message().to_owned(),
                }
            } else {
                unavailable(status.message().to_owned(), state.current_leader)
            }
        })?;
        Ok(())
    }

    /// On the metadata group's leader: records the move and checks the table shows it (a move
    /// that does not fit the table, such as one racing another move of the shard, changes
    /// nothing and is refused).
    async fn record_move_here(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), ApiError> {
        let metadata = self.group(GroupId::Metadata).await?;
        let state = metadata.state();
        if state.current_leader != Some(self.groups.node_id()) {
            return Err(unavailable(
                "this node does not lead the metadata group".to_owned(),
                state.current_leader,
            ));
        }
        metadata
            .write_placement_move(shard, from, to)
            .await
            .map_err(|e| unavailable(e.to_string(), e.leader))?;
        let recorded = self
            .groups
            .placement()
            .is_some_and(|placement| placement.holds(to, shard) && !placement.holds(from, shard));
        if recorded {
            Ok(())
        } else {
            Err(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:BadMove",
                message: format!(
                    "the placement table does not show {shard} moved from node {from} to node {to}"
                ),
            })
        }
    }
}
