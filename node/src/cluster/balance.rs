//! The opt-in automatic leader rebalancer (`cluster.leader-rebalance-interval`). Every node
//! runs it: once per interval it reads its own replicas' view of every shard (voters and the
//! leader each knows), computes the plan `courier-ops leader rebalance` would carry out
//! (`courier_proto::placement::plan`), and if the plan gives one of the shards to this node in
//! two rounds in a row, and its replica of that shard has applied all it stored, it starts an
//! election for that one shard. A node only ever promotes itself: no node calls
//! another's operator RPCs (`Admin.TransferLeader` stays operator-only, SECURITY.md), and
//! starting an election is what any voter may do anyway. One election per node per round is the
//! rate limit: the next round sees its outcome first. Nothing moves while some shard has no
//! leader, and a node that is down takes nothing (its share waits until it is back).

use std::collections::BTreeSet;
use std::time::Duration;

use courier_proto::pb::peer::TransferLeaderRequest;
use courier_proto::placement::{Move, plan, replica_counts, view_of_one};
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
        let planned = cluster.planned_for_me();
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
    pub fn planned_for_me(&self) -> Option<Move> {
        let me = self.groups.node_id();
        let status = self.status();
        let shards = view_of_one(&status);
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
}
