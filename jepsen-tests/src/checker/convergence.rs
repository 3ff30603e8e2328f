//! Convergence after the heal: the replicas of each shard agree (`divergence`; no status at all
//! is `no_replica_status`), and each replica's projections equal their rebuild from the log
//! (`rebuild_mismatch`).

use std::collections::{BTreeMap, BTreeSet};

use super::index::Index;
use super::report::{AnomalyKind, Findings};
use crate::history::Replica;

/// `divergence`: every node reporting a shard must report the same applied index
/// (`applied-index`) and the same digest per projection (`digest`), and every shard must be
/// reported by as many nodes as the best-reported shard (`missing-shard`). Without any
/// replica status, `no_replica_status`.
pub(super) fn check_divergence(index: &Index<'_>, findings: &mut Findings) {
    if index.replicas.is_empty() {
        let detail = "no replica status recorded; convergence unchecked".to_owned();
        findings.add(AnomalyKind::NoReplicaStatus, "no-replica-status", detail);
        return;
    }
    let mut shards: BTreeMap<u32, BTreeMap<u32, &Replica>> = BTreeMap::new();
    for ((shard, node), replica) in &index.replicas {
        shards.entry(*shard).or_default().insert(*node, replica);
    }
    let all_nodes: BTreeSet<u32> = index.replicas.keys().map(|(_, node)| *node).collect();
    let most = shards.values().map(BTreeMap::len).max().unwrap_or(0);
    for (shard, replicas) in &shards {
        if replicas.len() < most {
            let missing: Vec<&u32> = all_nodes
                .iter()
                .filter(|node| !replicas.contains_key(node))
                .collect();
            let detail = format!(
                "shard {shard} reported by {} nodes, others by {most}; missing nodes {missing:?}",
                replicas.len()
            );
            findings.add(AnomalyKind::Divergence, "missing-shard", detail);
        }
        check_shard_agreement(*shard, replicas, findings);
    }
}

/// Compares the applied index and each projection digest across the replicas of one shard.
fn check_shard_agreement(shard: u32, replicas: &BTreeMap<u32, &Replica>, findings: &mut Findings) {
    let indexes: BTreeSet<u64> = replicas.values().map(|r| r.applied_index).collect();
    if indexes.len() > 1 {
        let per_node: Vec<String> = replicas
            .iter()
            .map(|(node, r)| format!("node {node}={}", r.applied_index))
            .collect();
        let detail = format!("shard {shard} applied index: {}", per_node.join(", "));
        findings.add(AnomalyKind::Divergence, "applied-index", detail);
    }
    let names: BTreeSet<&str> = replicas
        .values()
        .flat_map(|r| r.digests.keys().map(String::as_str))
        .collect();
    for name in names {
        let values: BTreeSet<Option<&String>> =
            replicas.values().map(|r| r.digests.get(name)).collect();
        if values.len() < 2 {
            continue;
        }
        let per_node: Vec<String> = replicas
            .iter()
            .map(|(node, r)| {
                let digest = r.digests.get(name).map_or("<missing>", String::as_str);
                format!("node {node}={digest}")
            })
            .collect();
        let detail = format!("shard {shard} projection {name}: {}", per_node.join(", "));
        findings.add(AnomalyKind::Divergence, "digest", detail);
    }
}

/// `rebuild_mismatch`: a verification that failed (`verify-failed`), or a replica that
/// reported status but was never verified (`not-verified`).
pub(super) fn check_rebuild(index: &Index<'_>, findings: &mut Findings) {
    for verify in &index.verifies {
        if !verify.ok {
            let detail = format!(
                "node {} shard {}: {}",
                verify.node, verify.shard, verify.detail
            );
            findings.add(AnomalyKind::RebuildMismatch, "verify-failed", detail);
        }
    }
    let verified: BTreeSet<(u32, u32)> = index
        .verifies
        .iter()
        .map(|verify| (verify.shard, verify.node))
        .collect();
    for (shard, node) in index.replicas.keys() {
        if !verified.contains(&(*shard, *node)) {
            let detail = format!("node {node} shard {shard}: replica status but no verification");
            findings.add(AnomalyKind::RebuildMismatch, "not-verified", detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::checker::fixture::*;
    use crate::checker::{AnomalyKind, check};

    /// Goal: replicas with different digests diverge.
    #[test]
    fn digest_difference_is_divergence() {
        let mut b = drained();
        b.status_where(
            |node, shard| {
                Some((
                    100,
                    [if (node, shard) == (3, 1) { "xx" } else { "aa" }, "bb"],
                ))
            },
            |_, _| Some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Divergence, "digest", 1);
        let example = &report.examples(AnomalyKind::Divergence)[0];
        assert!(example.contains("shard 1 projection inbox"), "{example}");
        assert!(example.contains("node 3=xx"), "{example}");
    }

    /// Goal: replicas with different applied indexes diverge.
    #[test]
    fn applied_index_difference_is_divergence() {
        let mut b = drained();
        b.status_where(
            |node, shard| Some((if (node, shard) == (2, 0) { 99 } else { 100 }, ["aa", "bb"])),
            |_, _| Some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Divergence, "applied-index", 1);
        assert!(
            report.examples(AnomalyKind::Divergence)[0].contains("node 2=99"),
            "{report}"
        );
    }

    /// Goal: a shard one node does not report is divergence.
    #[test]
    fn shard_missing_on_a_node_is_divergence() {
        let mut b = drained();
        let reported = |node, shard| (node, shard) != (3, 1);
        b.status_where(
            |node, shard| reported(node, shard).then_some((100, ["aa", "bb"])),
            |node, shard| reported(node, shard).then_some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Divergence, "missing-shard", 1);
        assert!(
            report.examples(AnomalyKind::Divergence)[0].contains("[3]"),
            "{report}"
        );
    }

    /// Goal: no replica status at all fails the run.
    #[test]
    fn no_status_is_no_replica_status() {
        let report = check(&drained().history());
        assert_only(
            &report,
            AnomalyKind::NoReplicaStatus,
            "no-replica-status",
            1,
        );
    }

    /// Goal: a failed verification, or a replica never verified, is a rebuild mismatch.
    #[test]
    fn failed_or_missing_verification_is_rebuild_mismatch() {
        let mut b = drained();
        b.status_where(
            |_, _| Some((100, ["aa", "bb"])),
            |node, shard| Some((node, shard) != (2, 0)),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::RebuildMismatch, "verify-failed", 1);
        assert!(report.examples(AnomalyKind::RebuildMismatch)[0].contains("node 2 shard 0"));

        let mut b = drained();
        b.status_where(
            |_, _| Some((100, ["aa", "bb"])),
            |node, shard| ((node, shard) != (1, 1)).then_some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::RebuildMismatch, "not-verified", 1);
    }
}
