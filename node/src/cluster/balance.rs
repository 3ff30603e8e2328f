//! The opt-in automatic leader rebalancer (`cluster.leader-rebalance-interval`). Every node
//! runs it: once per interval it reads its own replicas' view of every shard (voters and the
//! leader each knows), computes the plan `courier-ops leader rebalance` would carry out
//! (`courier_proto::placement::plan`), and if the plan gives one of the shards to this node, it
//! starts an election for that one shard. A node only ever promotes itself: no node calls
//! another's operator RPCs (`Admin.TransferLeader` stays operator-only, SECURITY.md), and
//! starting an election is what any voter may do anyway. One election per node per round is the
//! rate limit: the next round sees its outcome first. Nothing moves while some shard has no
//! leader, and a node that is down takes nothing (its share waits until it is back).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_proto::pb::peer::TransferLeaderRequest;
use courier_proto::placement::{Move, ShardView, plan};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Cluster;
use crate::status::ApiError;

/// Runs the rebalancer every `interval` until `shutdown`.
pub async fn run_leader_rebalancer(
    cluster: Cluster,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match cluster.rebalance_round().await {
            Ok(Some(moved)) => info!(
                shard = moved.shard,
                from = moved.from,
                to = moved.to,
                "leader rebalance: started an election to take this shard's leadership"
            ),
            Ok(None) => {}
            Err(error) => warn!(%error, "leader rebalance round failed"),
        }
    }
}

impl Cluster {
    /// One round of the rebalancer on this node: the first transfer of the plan that gives this
    /// node a shard, carried out by electing this node; `None` when there is none (or some shard
    /// has no leader now).
    ///
    /// # Errors
    /// When the election cannot be started (the next round plans again).
    pub async fn rebalance_round(&self) -> Result<Option<Move>, ApiError> {
        let me = self.groups.node_id();
        let status = self.status();
        let shards: BTreeMap<u32, ShardView> = status
            .shards
            .iter()
            .map(|shard| {
                let view = ShardView {
                    voters: shard.replicas.iter().copied().collect(),
                    leader: (shard.leader != 0).then_some(shard.leader),
                };
                (shard.shard, view)
            })
            .collect();
        if shards.is_empty() || shards.values().any(|shard| shard.leader.is_none()) {
            return Ok(None);
        }
        let nodes: BTreeSet<u64> = shards.values().flat_map(|s| s.voters.clone()).collect();
        let Some(mine) = plan(&shards, &nodes).into_iter().find(|m| m.to == me) else {
            return Ok(None);
        };
        self.transfer_leader(TransferLeaderRequest {
            shard: mine.shard,
            to_node: me,
        })
        .await?;
        Ok(Some(mine))
    }
}
