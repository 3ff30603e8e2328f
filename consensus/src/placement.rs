//! Placement: which nodes hold a replica of each shard, decided when the cluster is created and
//! kept in the metadata group.
//!
//! Each shard gets `R` distinct nodes; the first is the node that starts the shard's group and
//! so becomes its first leader. [`Placement::spread`] keeps every node's replica count and
//! first-leader count within one of every other node's.

use std::collections::BTreeSet;

use courier_proto::ShardId;
use serde::{Deserialize, Serialize};

/// A node id (`crate::types::NodeId`, named here so that this file imports nothing of the
/// crate: `types.rs` stores a [`Placement`] in its proposals).
type NodeId = u64;

/// The replicas of every shard, by shard id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `shards[s]`: the nodes holding shard `s`, its first leader first.
    shards: Vec<Vec<NodeId>>,
}

/// The greatest common divisor of `a` and `b`.
fn gcd(a: usize, b: usize) -> usize {
    match a.checked_rem(b) {
        None => a,
        Some(rest) => gcd(b, rest),
    }
}

impl Placement {
    /// Places `shard_count` shards on `replicas` of `nodes` each (`replicas` ≤ the node count,
    /// at least 1), evenly: replica counts and first-leader counts differ by at most one
    /// between nodes. Deterministic in its inputs.
    ///
    /// # Panics
    /// When `replicas` is 0 or above the number of distinct nodes (the caller validates).
    pub fn spread(nodes: &BTreeSet<NodeId>, shard_count: u16, replicas: usize) -> Self {
        assert!(
            replicas >= 1 && replicas <= nodes.len(),
            "{replicas} replicas on {} nodes",
            nodes.len()
        );
        let nodes: Vec<NodeId> = nodes.iter().copied().collect();
        let n = nodes.len();
        // Replica slots go round the nodes in turn, `replicas` consecutive slots per shard, the
        // first slot leading: distinct nodes per shard and replica counts even to within one.
        // Taken plainly, the first slots would visit only every `gcd(n, replicas)`-th node;
        // each full turn of the slots (`n / gcd` shards) therefore starts one node further on,
        // and over the turns every node leads in turn.
        let turn = n.checked_div(gcd(n, replicas)).unwrap_or(1).max(1);
        let slot = |i: usize| nodes[i.checked_rem(n).expect("at least one node")];
        let shards = (0..usize::from(shard_count))
            .map(|shard| {
                let first = shard
                    .wrapping_mul(replicas)
                    .wrapping_add(shard.checked_div(turn).unwrap_or(0));
                (0..replicas).map(|j| slot(first.wrapping_add(j))).collect()
            })
            .collect();
        Self { shards }
    }

    /// The nodes holding `shard`, its first leader first; empty for a shard beyond the table.
    pub fn replicas(&self, shard: ShardId) -> &[NodeId] {
        self.shards
            .get(usize::from(shard.get()))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether `node` holds a replica of `shard`.
    pub fn holds(&self, node: NodeId, shard: ShardId) -> bool {
        self.replicas(shard).contains(&node)
    }

    /// The shards `node` holds.
    pub fn shards_of(&self, node: NodeId) -> Vec<ShardId> {
        (0..self.shards.len())
            .filter_map(|s| u16::try_from(s).ok().map(ShardId::new))
            .filter(|shard| self.holds(node, *shard))
            .collect()
    }

    /// The table with `shard`'s replica on `from` moved to `to` (in `from`'s place); `None`
    /// when `from` holds no replica of it or `to` already holds one.
    pub fn moved(&self, shard: ShardId, from: NodeId, to: NodeId) -> Option<Self> {
        let replicas = self.shards.get(usize::from(shard.get()))?;
        if !replicas.contains(&from) || replicas.contains(&to) {
            return None;
        }
        let mut moved = self.clone();
        for node in &mut moved.shards[usize::from(shard.get())] {
            if *node == from {
                *node = to;
            }
        }
        Some(moved)
    }

    /// The number of shards placed.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

#[cfg(test)]
mod tests {
    // Test arithmetic works on small counts; overflow would be a test bug.
    #![allow(clippy::arithmetic_side_effects)]

    use super::*;

    fn counts(placement: &Placement, nodes: &BTreeSet<NodeId>) -> (Vec<usize>, Vec<usize>) {
        let held = nodes
            .iter()
            .map(|n| placement.shards_of(*n).len())
            .collect();
        let led = nodes
            .iter()
            .map(|n| {
                (0..placement.shard_count())
                    .filter(|s| placement.shards[*s][0] == *n)
                    .count()
            })
            .collect();
        (held, led)
    }

    fn spread_of(counts: &[usize]) -> usize {
        counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
    }

    /// Every size the protocol allows up to 9 nodes and 64 shards: each shard on `R` distinct
    /// nodes, replica and first-leader counts even to within one.
    #[test]
    fn replicas_and_leaders_are_even_to_within_one() {
        for n in 1..=9_u64 {
            let nodes: BTreeSet<NodeId> = (1..=n).collect();
            for r in 1..=usize::try_from(n).expect("small").min(7) {
                for shard_count in 1..=64_u16 {
                    let placement = Placement::spread(&nodes, shard_count, r);
                    assert_eq!(
                        placement.shard_count(),
                        usize::from(shard_count),
                        "all placed"
                    );
                    for replicas in &placement.shards {
                        let distinct: BTreeSet<_> = replicas.iter().collect();
                        assert_eq!(distinct.len(), r, "{r} distinct nodes: {replicas:?}");
                        assert!(replicas.iter().all(|id| nodes.contains(id)), "members only");
                    }
                    let (held, led) = counts(&placement, &nodes);
                    assert!(
                        spread_of(&held) <= 1,
                        "replicas per node {held:?} (n={n} r={r} s={shard_count})"
                    );
                    assert!(
                        spread_of(&led) <= 1,
                        "first leaders per node {led:?} (n={n} r={r} s={shard_count})"
                    );
                }
            }
        }
    }

    /// A move replaces one replica and nothing else; an impossible move is `None`.
    #[test]
    fn a_move_replaces_one_replica() {
        let nodes: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let placement = Placement::spread(&nodes, 4, 3);
        let shard = ShardId::new(1);
        let from = placement.replicas(shard)[0];
        let to = *nodes
            .iter()
            .find(|n| !placement.holds(**n, shard))
            .expect("one node lacks each shard");
        let moved = placement.moved(shard, from, to).expect("a possible move");
        assert!(moved.holds(to, shard) && !moved.holds(from, shard), "moved");
        assert_eq!(moved.replicas(shard).len(), 3, "still three replicas");
        for other in [0, 2, 3] {
            let other = ShardId::new(other);
            assert_eq!(
                moved.replicas(other),
                placement.replicas(other),
                "others unchanged"
            );
        }
        assert_eq!(
            placement.moved(shard, to, from),
            None,
            "from a node without it"
        );
        assert_eq!(moved.moved(shard, to, to), None, "to a node with it");
    }

    /// With `R = N` every shard is everywhere, and shard `i` is led first by member `i mod N`,
    /// as bootstrap always did.
    #[test]
    fn everywhere_is_every_member_with_leaders_in_turn() {
        let nodes: BTreeSet<NodeId> = [1, 2, 3].into();
        // A cluster with every shard on every member: shard `i` first led by member `i mod N`, as
        // bootstrap spread leaders before placement existed.
        let placement = Placement::spread(&nodes, 6, nodes.len());
        for shard in 0..6_u16 {
            let replicas = placement.replicas(ShardId::new(shard));
            assert_eq!(replicas.len(), 3, "every member");
            assert_eq!(
                replicas[0],
                u64::from(shard % 3) + 1,
                "shard {shard} led first"
            );
        }
        assert!(
            placement.replicas(ShardId::new(6)).is_empty(),
            "beyond the table"
        );
    }
}
