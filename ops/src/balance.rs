//! `courier-ops leader rebalance`: spreads shard leadership evenly over the nodes again.
//!
//! Leaders are spread at bootstrap (shard `i` starts on member `i mod N`), but a failover moves
//! every shard a dead node led to the survivors, and nothing moves them back when it returns: one
//! node then proposes, fsyncs first and forwards for most shards. The rebalancer reads every
//! node's status, plans the fewest transfers that bring each node's leader count within one of
//! every other's (a shard moves only to one of its own voters that answered), and carries them
//! out one at a time, each confirmed by the new leader before the next starts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use courier_proto::pb::peer::StatusResponse;
use courier_proto::placement::{Move, leader_counts, plan, view};

/// How long one transfer may take to show in the new leader's status (an election, plus the
/// catch-up of a follower that was behind).
const TRANSFER_WAIT: Duration = Duration::from_secs(15);
/// Pause between status polls while a transfer completes.
const POLL: Duration = Duration::from_millis(100);
/// How often a transfer asks the new leader to start an election again while it does not lead.
/// One election can lose: the current leader and the followers hearing its heartbeats refuse
/// votes while its lease (the election timeout, from when it was elected) runs, and when the
/// candidate's higher term makes the old leader step down, the old leader can win the next
/// election itself. An ask this much later finds that lease run out. (Longer than any sane
/// `raft.election-timeout-max`.)
const ELECT_AGAIN: Duration = Duration::from_secs(2);

fn counts_line(counts: &BTreeMap<u64, usize>) -> String {
    counts
        .iter()
        .map(|(node, count)| format!("node {node}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rebalances the leaders of the cluster `addr` belongs to (or only prints the plan). Returns
/// whether every planned transfer completed.
///
/// # Errors
/// When the first node cannot be reached.
pub(crate) async fn rebalance(addr: &str, dry_run: bool) -> anyhow::Result<bool> {
    let nodes = crate::online::gather_status(addr).await?;
    let peers: BTreeMap<u64, String> = nodes
        .iter()
        .map(|(id, peer, _)| (*id, peer.clone()))
        .collect();
    let statuses: Vec<StatusResponse> = nodes
        .into_iter()
        .filter_map(|(id, _, status)| match status {
            Ok(status) => Some(status),
            Err(error) => {
                println!("node {id} is unreachable ({error}): it gets no leaders");
                None
            }
        })
        .collect();
    let reachable: BTreeSet<u64> = statuses.iter().map(|s| s.node_id).collect();
    let shards = view(&statuses);
    let leaderless: Vec<u32> = shards
        .iter()
        .filter(|(_, v)| v.leader.is_none())
        .map(|(s, _)| *s)
        .collect();
    if !leaderless.is_empty() {
        println!("shards without a leader now (left alone): {leaderless:?}");
    }
    println!(
        "leaders now: {}",
        counts_line(&leader_counts(&shards, &reachable))
    );
    let moves = plan(&shards, &reachable);
    if moves.is_empty() {
        println!("leaders are balanced: nothing to move");
        return Ok(true);
    }
    println!("plan: {} transfer(s)", moves.len());
    for m in &moves {
        println!("  shard {}: node {} -> node {}", m.shard, m.from, m.to);
    }
    if dry_run {
        return Ok(true);
    }
    let mut all_done = true;
    for (done, m) in moves.iter().enumerate() {
        let started = Instant::now();
        let outcome = match peers.get(&m.to) {
            Some(peer) => transfer(peer, m).await,
            None => Err(anyhow::anyhow!("node {} has no peer address", m.to)),
        };
        let step = format!(
            "[{}/{}] shard {}: node {} -> node {}",
            done.saturating_add(1),
            moves.len(),
            m.shard,
            m.from,
            m.to
        );
        match outcome {
            Ok(()) => println!("{step}: done in {:.1} s", started.elapsed().as_secs_f64()),
            Err(error) => {
                all_done = false;
                println!("{step}: FAILED: {error:#}");
            }
        }
    }
    let after = crate::online::gather_status(addr).await?;
    let statuses: Vec<StatusResponse> = after.into_iter().filter_map(|(_, _, s)| s.ok()).collect();
    println!(
        "leaders after: {}",
        counts_line(&leader_counts(&view(&statuses), &reachable))
    );
    Ok(all_done)
}

/// Asks `m.to` (at `peer`) to take `m.shard` and waits until it reports leading it, asking
/// again every [`ELECT_AGAIN`].
async fn transfer(peer: &str, m: &Move) -> anyhow::Result<()> {
    crate::online::ask_to_lead(peer, m.to, m.shard).await?;
    let started = Instant::now();
    let deadline = started + TRANSFER_WAIT;
    let mut next_ask = started + ELECT_AGAIN;
    loop {
        if let Ok(status) = crate::online::status_of(peer).await
            && status
                .shards
                .iter()
                .any(|s| s.shard == m.shard && s.role == "leader")
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "node {} did not report leading shard {} within {TRANSFER_WAIT:?}",
                m.to,
                m.shard
            );
        }
        if Instant::now() >= next_ask {
            crate::online::ask_to_lead(peer, m.to, m.shard).await?;
            next_ask = Instant::now() + ELECT_AGAIN;
        }
        tokio::time::sleep(POLL).await;
    }
}
