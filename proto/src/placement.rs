//! Shard placement as the cluster reports it, and the plan that evens out shard leadership
//! (`courier-ops leader rebalance` and the nodes' opt-in automatic rebalancer share it).
//!
//! Pure functions over node ids: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use crate::pb::peer::StatusResponse;

/// One shard as the cluster reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardView {
    /// Its voters.
    pub voters: BTreeSet<u64>,
    /// The node that reports leading it (highest term), if any.
    pub leader: Option<u64>,
}

/// A planned leadership transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// The shard.
    pub shard: u32,
    /// Its leader now.
    pub from: u64,
    /// The voter that takes it.
    pub to: u64,
}

/// The shards as one node sees them: each of its replicas' voters and the leader that replica
/// knows of (the automatic rebalancer plans from this; [`view`] combines every node's report).
pub fn view_of_one(status: &StatusResponse) -> BTreeMap<u32, ShardView> {
    status
        .shards
        .iter()
        .map(|shard| {
            let view = ShardView {
                voters: shard.replicas.iter().copied().collect(),
                leader: (shard.leader != 0).then_some(shard.leader),
            };
            (shard.shard, view)
        })
        .collect()
}

/// Replicas per node in `shards` (the voters of each).
pub fn replica_counts(shards: &BTreeMap<u32, ShardView>) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for voter in shards.values().flat_map(|view| &view.voters) {
        let count = counts.entry(*voter).or_default();
        *count = count.saturating_add(1);
    }
    counts
}

/// Leaders per node in `shards` (every node of `nodes` listed, zero when it leads nothing).
pub fn leader_counts(
    shards: &BTreeMap<u32, ShardView>,
    nodes: &BTreeSet<u64>,
) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for view in shards.values() {
        if let Some(count) = view.leader.and_then(|l| counts.get_mut(&l)) {
            *count = count.saturating_add(1);
        }
    }
    counts
}

/// The transfers that even out leadership: repeatedly, a shard of the node with the most leaders
/// moves to the voter of that shard, among `nodes`, with the fewest, as long as that leaves the
/// target with fewer than the source had. Each move lowers the sum of squared counts, so the plan
/// ends; when every node of `nodes` votes in every shard it ends with counts within one.
pub fn plan(shards: &BTreeMap<u32, ShardView>, nodes: &BTreeSet<u64>) -> Vec<Move> {
    let mut leaders: BTreeMap<u32, Option<u64>> =
        shards.iter().map(|(s, v)| (*s, v.leader)).collect();
    let mut counts = leader_counts(shards, nodes);
    let mut moves = Vec::new();
    loop {
        // Sources from the most loaded down; the first that can give a shard away does.
        let mut sources: Vec<(u64, usize)> = counts.iter().map(|(n, c)| (*n, *c)).collect();
        sources.sort_by_key(|(node, count)| (std::cmp::Reverse(*count), *node));
        let next = sources.iter().find_map(|(from, from_count)| {
            leaders
                .iter()
                .filter(|(_, leader)| **leader == Some(*from))
                .filter_map(|(shard, _)| {
                    shards[shard]
                        .voters
                        .iter()
                        .filter_map(|to| counts.get(to).map(|count| (*count, *to)))
                        .filter(|(count, _)| count.saturating_add(1) < *from_count)
                        .min()
                        .map(|(count, to)| (count, *shard, to))
                })
                .min()
                .map(|(_, shard, to)| Move {
                    shard,
                    from: *from,
                    to,
                })
        });
        let Some(chosen) = next else {
            return moves;
        };
        leaders.insert(chosen.shard, Some(chosen.to));
        for (node, delta) in [(chosen.from, false), (chosen.to, true)] {
            let count = counts.entry(node).or_default();
            *count = if delta {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
        moves.push(chosen);
    }
}

/// The shards as the reachable nodes report them: the leader is the node that says it leads,
/// at the highest term; the voters are that leader's view of the membership (or, for a shard
/// without a leader, the first report's).
pub fn view(statuses: &[StatusResponse]) -> BTreeMap<u32, ShardView> {
    let mut best: BTreeMap<u32, (u64, ShardView)> = BTreeMap::new();
    for status in statuses {
        for shard in &status.shards {
            let leads = shard.role == "leader";
            let report = ShardView {
                voters: shard.replicas.iter().copied().collect(),
                leader: leads.then_some(status.node_id),
            };
            let known = best
                .entry(shard.shard)
                .or_insert_with(|| (0, report.clone()));
            if leads && (known.1.leader.is_none() || shard.term > known.0) {
                *known = (shard.term, report);
            }
        }
    }
    best.into_iter().map(|(s, (_, v))| (s, v)).collect()
}

/// A planned move of one shard's replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaMove {
    /// The shard.
    pub shard: u32,
    /// The node its replica leaves.
    pub from: u64,
    /// The node it goes to.
    pub to: u64,
}

/// Replicas per node of `table` (shard → its placed nodes), every node of `nodes` listed.
fn placed_counts(table: &BTreeMap<u32, Vec<u64>>, nodes: &BTreeSet<u64>) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for node in table.values().flatten() {
        if let Some(count) = counts.get_mut(node) {
            *count = count.saturating_add(1);
        }
    }
    counts
}

/// The moves that take every replica off `node` (`courier-ops node drain`): each shard it holds
/// goes to the member of `nodes` that does not hold it and holds fewest replicas (the lowest id
/// among equals), counted as the plan goes. A shard every other member already holds has
/// nowhere to go and is left out.
pub fn drain_plan(
    table: &BTreeMap<u32, Vec<u64>>,
    nodes: &BTreeSet<u64>,
    node: u64,
) -> Vec<ReplicaMove> {
    let others: BTreeSet<u64> = nodes.iter().copied().filter(|n| *n != node).collect();
    let mut counts = placed_counts(table, &others);
    let mut moves = Vec::new();
    for (shard, replicas) in table {
        if !replicas.contains(&node) {
            continue;
        }
        let target = counts
            .iter()
            .filter(|(candidate, _)| !replicas.contains(candidate))
            .min_by_key(|(candidate, count)| (**count, **candidate))
            .map(|(candidate, _)| *candidate);
        if let Some(to) = target {
            *counts.entry(to).or_default() += 1;
            moves.push(ReplicaMove {
                shard: *shard,
                from: node,
                to,
            });
        }
    }
    moves
}

/// The moves that even out replicas per node among `nodes` (`courier-ops shard rebalance`, after
/// a node joined): repeatedly a shard of a node holding most goes to a node holding fewest that
/// lacks it, while their counts differ by more than one. Each move lowers the sum of squared
/// counts, so the plan ends; it ends with counts within one of each other whenever some shard of
/// a fullest node is missing on an emptiest one (always, with equal replicas per shard).
pub fn rebalance_plan(table: &BTreeMap<u32, Vec<u64>>, nodes: &BTreeSet<u64>) -> Vec<ReplicaMove> {
    let mut table = table.clone();
    let mut counts = placed_counts(&table, nodes);
    let mut moves = Vec::new();
    loop {
        let mut by_count: Vec<(u64, usize)> = counts.iter().map(|(n, c)| (*n, *c)).collect();
        by_count.sort_by_key(|(node, count)| (*count, *node));
        let found = by_count.iter().rev().find_map(|(from, most)| {
            by_count
                .iter()
                .filter(|(_, fewest)| most.saturating_sub(*fewest) > 1)
                .find_map(|(to, _)| {
                    table
                        .iter()
                        .find(|(_, replicas)| replicas.contains(from) && !replicas.contains(to))
                        .map(|(shard, _)| ReplicaMove {
                            shard: *shard,
                            from: *from,
                            to: *to,
                        })
                })
        });
        let Some(step) = found else {
            return moves;
        };
        if let Some(replicas) = table.get_mut(&step.shard) {
            for node in replicas.iter_mut().filter(|node| **node == step.from) {
                *node = step.to;
            }
        }
        counts = placed_counts(&table, nodes);
        moves.push(step);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cluster(leaders: &[Option<u64>], nodes: &BTreeSet<u64>) -> BTreeMap<u32, ShardView> {
        (0_u32..)
            .zip(leaders)
            .map(|(shard, leader)| {
                (
                    shard,
                    ShardView {
                        voters: nodes.clone(),
                        leader: *leader,
                    },
                )
            })
            .collect()
    }

    fn apply(shards: &mut BTreeMap<u32, ShardView>, moves: &[Move]) {
        for m in moves {
            let view = shards.get_mut(&m.shard).expect("planned shard exists");
            assert_eq!(
                view.leader,
                Some(m.from),
                "a move starts at the shard's leader"
            );
            assert!(view.voters.contains(&m.to), "a move ends at a voter");
            view.leader = Some(m.to);
        }
    }

    #[test]
    fn after_a_failover_the_returned_node_gets_its_share_back() {
        let nodes: BTreeSet<u64> = [1, 2, 3].into();
        // Node 3 died and came back: nodes 1 and 2 lead all eight shards.
        let leaders = [1, 2, 1, 2, 1, 2, 1, 2].map(Some);
        let mut shards = cluster(&leaders, &nodes);
        let moves = plan(&shards, &nodes);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert!(moves.iter().all(|m| m.to == 3));
        apply(&mut shards, &moves);
        let counts = leader_counts(&shards, &nodes);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![3, 3, 2]);
        assert!(
            plan(&shards, &nodes).is_empty(),
            "a balanced cluster plans nothing"
        );
    }

    #[test]
    fn a_shard_moves_only_to_its_own_voters_and_reachable_nodes() {
        let nodes: BTreeSet<u64> = [1, 2, 3, 4].into();
        let mut shards = cluster(&[Some(1); 4], &nodes);
        for view in shards.values_mut() {
            view.voters = [1, 2, 3].into();
        }
        // Node 3 is unreachable: only node 2 can take shards, and node 4 votes in none.
        let reachable: BTreeSet<u64> = [1, 2, 4].into();
        let moves = plan(&shards, &reachable);
        assert!(moves.iter().all(|m| m.to == 2), "{moves:?}");
        apply(&mut shards, &moves);
        assert_eq!(leader_counts(&shards, &reachable)[&2], 2);
    }

    #[test]
    fn the_view_takes_the_leader_at_the_highest_term() {
        use crate::pb::peer::ShardStatus;
        let status = |node_id: u64, role: &str, term: u64| StatusResponse {
            node_id,
            shards: vec![ShardStatus {
                shard: 0,
                role: role.to_owned(),
                term,
                replicas: vec![1, 2, 3],
                ..ShardStatus::default()
            }],
            ..StatusResponse::default()
        };
        // Node 1 still thinks it leads at term 3 (partitioned); node 2 leads at term 4.
        let views = view(&[
            status(1, "leader", 3),
            status(2, "leader", 4),
            status(3, "follower", 4),
        ]);
        assert_eq!(views[&0].leader, Some(2));
        assert_eq!(views[&0].voters, [1, 2, 3].into());
        let none = view(&[status(1, "follower", 4), status(2, "candidate", 5)]);
        assert_eq!(none[&0].leader, None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Goal: whatever the leaders, the plan ends with every node's count within one of every
        /// other's, moving each shard from its leader to a voter. Method: random leaders (some
        /// shards leaderless) over 1–7 nodes that all vote in every shard.
        #[test]
        fn any_leader_layout_ends_within_one(
            node_count in 1_u64..=7,
            picks in proptest::collection::vec(0_u64..8, 1..64),
        ) {
            let nodes: BTreeSet<u64> = (1..=node_count).collect();
            let leaders: Vec<Option<u64>> = picks
                .iter()
                .map(|p| (*p < node_count).then_some(p + 1))
                .collect();
            let mut shards = cluster(&leaders, &nodes);
            let moves = plan(&shards, &nodes);
            apply(&mut shards, &moves);
            let counts = leader_counts(&shards, &nodes);
            let (min, max) = (counts.values().min().copied(), counts.values().max().copied());
            prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{counts:?}");
            let led = leaders.iter().flatten().count();
            prop_assert!(moves.len() <= led, "{} moves for {led} led shards", moves.len());
        }
    }

    /// Four nodes, three replicas of four shards, and a fifth node that just joined.
    fn four_of_five() -> (BTreeMap<u32, Vec<u64>>, BTreeSet<u64>) {
        let table = BTreeMap::from([
            (0, vec![1, 2, 3]),
            (1, vec![4, 1, 2]),
            (2, vec![3, 4, 1]),
            (3, vec![2, 3, 4]),
        ]);
        (table, (1..=5).collect())
    }

    fn moved(table: &BTreeMap<u32, Vec<u64>>, moves: &[ReplicaMove]) -> BTreeMap<u32, Vec<u64>> {
        let mut table = table.clone();
        for step in moves {
            let replicas = table.get_mut(&step.shard).expect("a placed shard");
            assert!(replicas.contains(&step.from), "{step:?} leaves a holder");
            assert!(
                !replicas.contains(&step.to),
                "{step:?} goes to a node without it"
            );
            for node in replicas.iter_mut().filter(|node| **node == step.from) {
                *node = step.to;
            }
        }
        table
    }

    #[test]
    fn a_joined_node_gets_its_share_and_counts_end_within_one() {
        let (table, nodes) = four_of_five();
        let moves = rebalance_plan(&table, &nodes);
        let after = placed_counts(&moved(&table, &moves), &nodes);
        let (min, max) = (
            after.values().min().copied().unwrap_or(0),
            after.values().max().copied().unwrap_or(0),
        );
        assert!(max - min <= 1, "even after the plan: {after:?}");
        assert_eq!(after[&5], 2, "the new node holds its share: {after:?}");
        assert_eq!(moves.len(), 2, "no more moves than needed: {moves:?}");
        assert!(
            rebalance_plan(&moved(&table, &moves), &nodes).is_empty(),
            "an even table needs no moves"
        );
    }

    #[test]
    fn a_drain_moves_every_replica_off_the_node_evenly() {
        let (table, nodes) = four_of_five();
        let moves = drain_plan(&table, &nodes, 1);
        let after = moved(&table, &moves);
        assert!(
            after.values().all(|replicas| !replicas.contains(&1)),
            "node 1 holds nothing: {after:?}"
        );
        assert!(
            after.values().all(|replicas| replicas.len() == 3),
            "every shard keeps three replicas"
        );
        let counts = placed_counts(&after, &(2..=5).collect());
        assert_eq!(counts[&5], 3, "the emptiest node takes most: {counts:?}");
        let full: BTreeMap<u32, Vec<u64>> = BTreeMap::from([(0, vec![1, 2, 3])]);
        assert!(
            drain_plan(&full, &(1..=3).collect(), 1).is_empty(),
            "with every member holding the shard there is nowhere to go"
        );
    }
}
