//! The opt-in automatic replica rebalancer (`cluster.replica-rebalance-interval`), on a cluster
//! that places shards. Every node runs it: once per interval it reads the placement table and
//! the draining marks (metadata state, the same on every node that applied them), plans what
//! `courier-ops node drain` and `shard rebalance` would (every replica off the nodes marked
//! draining first, then the moves that even out replicas per node among the others), and if
//! the plan has a move *from this node* in two rounds in a row, runs it (`Admin.MoveShard` on
//! itself, every step as an operator's move).
//!
//! Decisions:
//! - **A node only moves its own replicas**: no node calls another's operator RPCs (as the
//!   leader rebalancer). A node that is down moves nothing; its replicas wait for it, or for an
//!   operator's `node drain` (which another replica runs).
//! - **One move at a time per node**, and none while this node runs another move (an operator's
//!   included). A planned move whose target an earlier move of the plan fills is left to a
//!   later round, so nodes acting at once do not pile onto one target.
//! - **A target that does not answer is skipped**: a move to it would wait for its catch-up.
//! - **The mark is state, not a flag of the command**: a drained node stays out of every plan
//!   until `node undrain` or its removal, so the rebalancer never refills a node an operator
//!   is emptying.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_consensus::types::{GroupId, NodeId};
use courier_proto::ShardId;
use courier_proto::pb::peer;
use courier_proto::placement::{ReplicaMove, drain_plan, rebalance_plan};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Cluster;

/// The longest one automatic move may run before the rebalancer stops waiting for it (the move
/// resumes when planned again: every step is skipped when already done).
const MOVE_WAIT: Duration = Duration::from_secs(600);

/// Runs the replica rebalancer every `interval` until `shutdown`.
pub async fn run_replica_rebalancer(
    cluster: Cluster,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut previous: Option<ReplicaMove> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let planned = cluster.replica_move_for_me();
        // Only a plan two rounds agree on is acted on: a table being changed by another move
        // plans differently by the next round.
        if planned.is_none() || planned != previous {
            previous = planned;
            continue;
        }
        previous = None;
        let Some(step) = planned else { continue };
        if !cluster.moves.list().is_empty() || !cluster.answers(step.to).await {
            continue;
        }
        info!(
            shard = step.shard,
            from = step.from,
            to = step.to,
            "replica rebalance: moving this node's replica"
        );
        let request = peer::MoveShardRequest {
            shard: step.shard,
            from_node: step.from,
            to_node: step.to,
            ..peer::MoveShardRequest::default()
        };
        let moved = tokio::select! {
            () = shutdown.cancelled() => return,
            moved = tokio::time::timeout(MOVE_WAIT, cluster.move_shard(request)) => moved,
        };
        match moved {
            Ok(Ok(_)) => info!(shard = step.shard, to = step.to, "replica rebalance: moved"),
            Ok(Err(error)) => warn!(%error, shard = step.shard, "replica rebalance: move failed"),
            Err(_) => warn!(
                shard = step.shard,
                "replica rebalance: move stopped after {MOVE_WAIT:?}; it resumes when planned again"
            ),
        }
    }
}

/// The first move of `moves` from `me` whose target no earlier move of the plan fills.
fn first_from(moves: &[ReplicaMove], me: NodeId) -> Option<ReplicaMove> {
    let mut filled = BTreeSet::new();
    for step in moves {
        if step.from == me && !filled.contains(&step.to) {
            return Some(*step);
        }
        filled.insert(step.to);
    }
    None
}

/// The replica plan: every replica off the members marked draining (each to a member not
/// draining), then the moves that even out the others.
pub(crate) fn replica_plan(
    table: &BTreeMap<u32, Vec<u64>>,
    members: &BTreeSet<NodeId>,
    draining: &BTreeSet<NodeId>,
) -> Vec<ReplicaMove> {
    let staying: BTreeSet<NodeId> = members.difference(draining).copied().collect();
    let mut moves = Vec::new();
    for node in draining.intersection(members) {
        let mut with = staying.clone();
        with.insert(*node);
        moves.extend(drain_plan(table, &with, *node));
    }
    if moves.is_empty() {
        moves = rebalance_plan(table, &staying);
    }
    moves
}

impl Cluster {
    /// The move this node would make now (see the module docs), if any.
    fn replica_move_for_me(&self) -> Option<ReplicaMove> {
        let placement = self.groups.placement()?;
        let members: BTreeSet<NodeId> = self
            .groups
            .get(GroupId::Metadata)?
            .state()
            .members
            .keys()
            .copied()
            .collect();
        let table: BTreeMap<u32, Vec<u64>> = (0..placement.shard_count())
            .filter_map(|s| u16::try_from(s).ok())
            .map(|s| (u32::from(s), placement.replicas(ShardId::new(s)).to_vec()))
            .collect();
        let moves = replica_plan(&table, &members, &self.groups.draining());
        first_from(&moves, self.groups.node_id())
    }

    /// Whether `node` answers a peer call (any answer, a refusal included).
    async fn answers(&self, node: NodeId) -> bool {
        let Some(mut client) = self.peer_forward(node) else {
            return false;
        };
        let request = self.peers.request(peer::ReadShardRequest::default());
        match client.read_shard(request).await {
            Ok(_) => true,
            Err(status) => status.metadata().contains_key(courier_proto::CODE_KEY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: &[&[u64]]) -> BTreeMap<u32, Vec<u64>> {
        (0_u32..).zip(rows.iter().map(|r| r.to_vec())).collect()
    }

    /// A draining node's replicas go first, to nodes not draining; once it holds none the plan
    /// evens out the others and never puts a replica back on it.
    #[test]
    fn draining_nodes_are_emptied_first_and_never_refilled() {
        let members: BTreeSet<u64> = (1..=4).collect();
        let draining = BTreeSet::from([2]);
        let full = table(&[&[1, 2, 3], &[2, 3, 4], &[1, 2, 4], &[1, 3, 4]]);
        let moves = replica_plan(&full, &members, &draining);
        assert_eq!(moves.len(), 3, "{moves:?}");
        assert!(moves.iter().all(|m| m.from == 2 && m.to != 2), "{moves:?}");

        let emptied = table(&[&[1, 4, 3], &[1, 3, 4], &[1, 3, 4], &[1, 3, 4]]);
        assert!(
            replica_plan(&emptied, &members, &draining).is_empty(),
            "even among 1, 3 and 4, and nothing goes back to 2"
        );
        assert!(
            !replica_plan(&emptied, &members, &BTreeSet::new()).is_empty(),
            "without the mark the rebalance would refill node 2"
        );
    }

    /// Each node takes its own first move; a move whose target an earlier move fills waits.
    #[test]
    fn a_node_takes_its_first_move_unless_an_earlier_one_fills_the_target() {
        let step = |shard, from, to| ReplicaMove { shard, from, to };
        let moves = [step(0, 1, 5), step(1, 2, 5), step(2, 2, 6)];
        assert_eq!(first_from(&moves, 1), Some(step(0, 1, 5)));
        assert_eq!(first_from(&moves, 2), Some(step(2, 2, 6)));
        assert_eq!(first_from(&moves, 3), None);
    }
}
