//! The opt-in automatic leader rebalancer (`cluster.leader-rebalance-interval`). Every node
//! runs it: once per interval it reads its own replicas' view of every shard (voters and the
//! leader each knows), computes the plan `courier-ops leader rebalance` would carry out
//! (`courier_proto::placement::plan`), and if the plan gives one of the shards to this node in
//! two rounds in a row, and its replica of that shard has applied all it stored, it starts an
//! election for that one shard. A node only ever promotes itself: no node calls
//! another's operator RPCs (`Admin.TransferLeader` stays operator-only, SECURITY.md), and
//! starting an election is what any voter may do anyway. On a cluster that places shards the
//! view is every shard's placed voters and the leader its replicas name (a node's own status
//! holds only its shards). One election per node per round is the
//! rate limit: the next round sees its outcome first. Nothing moves while some shard has no
//! leader, and a node that is down takes nothing (its share waits until it is back).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_consensus::placement::Placement;
use courier_consensus::types::GroupId;
use courier_proto::ShardId;
use courier_proto::pb::peer::TransferLeaderRequest;
use courier_proto::placement::{Move, ShardView, plan, replica_counts, view_of_one};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Cluster;

/// Runs the rebalancer every `interval` until `shutdown`.
pub async fn run_leader_rebalancer(
    cluster: Cluster,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut previous: Option<Move> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let planned = cluster.planned_for_me().await;
        // Only a plan two rounds agree on is acted on: a view taken during an election or
        // right after a restart (a leader remembered from before) changes by the next round.
        if planned.is_none() || planned != previous {
            previous = planned;
            continue;
        }
        previous = None;
        let Some(mine) = planned else { continue };
        let request = TransferLeaderRequest {
            shard: mine.shard,
            to_node: mine.to,
        };
        match cluster.transfer_leader(request).await {
            Ok(()) => info!(
                shard = mine.shard,
                from = mine.from,
                to = mine.to,
                "leader rebalance: started an election to take this shard's leadership"
            ),
            Err(error) => warn!(%error, shard = mine.shard, "leader rebalance: no election"),
        }
    }
}

impl Cluster {
    /// The first transfer of the rebalance plan, over this node's view of every shard, that
    /// gives this node a shard whose replica here is caught up with what it stored (an election
    /// of a replica that is behind would only unseat the leader). `None` when there is none, or
    /// while some shard has no leader.
    pub async fn planned_for_me(&self) -> Option<Move> {
        let me = self.groups.node_id();
        let status = self.status();
        let shards = match self.groups.placement() {
            None => view_of_one(&status),
            Some(placement) => self.placed_view(&placement).await,
        };
        if shards.is_empty() || shards.values().any(|shard| shard.leader.is_none()) {
            return None;
        }
        let caught_up: BTreeSet<u32> = status
            .shards
            .iter()
            .filter(|shard| shard.apply_lag == 0)
            .map(|shard| shard.shard)
            .collect();
        let nodes: BTreeSet<u64> = replica_counts(&shards).into_keys().collect();
        plan(&shards, &nodes)
            .into_iter()
            .find(|m| m.to == me && caught_up.contains(&m.shard))
    }

    /// Every shard of a cluster that places shards: its voters from the placement table, its
    /// leader as this node's replica knows it, or as a replica elsewhere names it for a shard
    /// this node does not hold. (This node's own status covers only the shards it holds, and a
    /// plan over part of the shards would differ from node to node.)
    async fn placed_view(&self, placement: &Placement) -> BTreeMap<u32, ShardView> {
        let mut shards = BTreeMap::new();
        for index in 0..placement.shard_count() {
            let Ok(index) = u16::try_from(index) else {
                break;
            };
            let shard = ShardId::new(index);
            let leader = if self.holds(shard) {
                self.groups
                    .get(GroupId::Shard(shard))
                    .and_then(|handle| handle.state().current_leader)
            } else {
                self.leader_elsewhere(shard).await.map(|(leader, _)| leader)
            };
            let view = ShardView {
                voters: placement.replicas(shard).iter().copied().collect(),
                leader,
            };
            shards.insert(u32::from(index), view);
        }
        shards
    }
}
