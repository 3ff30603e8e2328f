//! The move fault: one replica of a random shard goes from a node that holds it to one that
//! does not (`Admin.MoveShard`, what `courier-ops shard move` sends), on a cluster that places
//! R < N replicas per shard.
//!
//! ```text
//!   pick (shard, from, to) from the table ─▶ MoveShard on `from` ─┬─▶ done: data on `from` gone
//!                                                                  └─▶ 1 in 3: a random node is
//!   killed 0.2–2 s into the move, restarted 2–5 s later; the move is sent again until it is done
//! ```
//!
//! A move interrupted anywhere must resume when sent again; one that does not finish within
//! [`MOVE_RESUME`] is a nemesis error, which fails the run. The drain fault moves every replica
//! off one node that way, as `courier-ops node drain` does.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng as _;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Nemesis;
use crate::admin::{AdminNode, MembershipChange, statuses};

/// How long a move is sent again, after a failure, before the nemesis gives up on it.
const MOVE_RESUME: Duration = Duration::from_secs(120);
/// Pause before a failed move is sent again.
const MOVE_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long the removal of a drained node is sent again (a node whose table lags the drain's
/// last move refuses it as still holding a replica) before the nemesis gives up.
const REMOVE_RESUME: Duration = Duration::from_secs(30);
/// Drains of the leaving node a replacement makes at most (each over a fresh table).
const DRAIN_PASSES: usize = 3;

impl Nemesis {
    /// The placement table (shard → replicas) as a live member reports it; `None` for a cluster
    /// with every shard on every member.
    async fn placement(&self) -> Option<BTreeMap<u32, Vec<u32>>> {
        let statuses = statuses(&self.live_members()).await;
        let status = statuses.values().find(|s| !s.placement.is_empty())?;
        Some(
            status
                .placement
                .iter()
                .map(|placed| {
                    let replicas = placed
                        .replicas
                        .iter()
                        .filter_map(|id| u32::try_from(*id).ok())
                        .collect();
                    (placed.shard, replicas)
                })
                .collect(),
        )
    }

    /// [`Nemesis::placement`], or an error naming the `fault` that needs one.
    async fn placed_table(&self, fault: &str) -> anyhow::Result<BTreeMap<u32, Vec<u32>>> {
        self.placement().await.ok_or_else(|| {
            anyhow::anyhow!("{fault} fault on a cluster that holds every shard on every member")
        })
    }

    pub(super) async fn move_replica(
        &self,
        rng: &mut StdRng,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let table = self.placed_table("move").await?;
        let members = self.member_ids();
        let moves: Vec<(u32, u32, u32)> = table
            .iter()
            .flat_map(|(shard, replicas)| {
                let members = &members;
                replicas.iter().flat_map(move |from| {
                    members
                        .iter()
                        .filter(|to| !replicas.contains(to))
                        .map(move |to| (*shard, *from, *to))
                })
            })
            .collect();
        let Some((shard, from, to)) = moves.choose(rng).copied() else {
            anyhow::bail!("no replica can move: every member holds every shard ({table:?})");
        };
        self.injected(
            "move",
            format!("move shard {shard} from node {from} to node {to}"),
        );
        self.carry_out(rng, (shard, from, to), stop).await
    }

    /// Drains a random member: every replica it holds moves, one at a time, to the member without
    /// one of that shard that holds fewest (`courier-ops node drain`), each move as in
    /// [`Nemesis::move_replica`] (some interrupted by a kill). The drained node keeps serving
    /// clients from the other nodes' replicas; later moves fill it again.
    pub(super) async fn drain(
        &self,
        rng: &mut StdRng,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let table = self.placed_table("drain").await?;
        let members = self.member_ids();
        let holders: Vec<u32> = members
            .iter()
            .copied()
            .filter(|node| table.values().any(|replicas| replicas.contains(node)))
            .collect();
        let Some(node) = holders.choose(rng).copied() else {
            anyhow::bail!("no member holds a replica ({table:?})");
        };
        self.injected("drain", format!("drain node {node}"));
        if self.drain_node(rng, node, table, stop).await? {
            self.healed("drain", format!("node {node} drained"));
        }
        Ok(())
    }

    /// Moves every replica of `node` in `table` off it, one at a time, each to the member
    /// without one of that shard that holds fewest. Returns whether it got through them all
    /// (the fault window may end first).
    async fn drain_node(
        &self,
        rng: &mut StdRng,
        node: u32,
        table: BTreeMap<u32, Vec<u32>>,
        stop: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let members = self.member_ids();
        let mut table = table;
        let shards: Vec<u32> = table
            .iter()
            .filter(|(_, replicas)| replicas.contains(&node))
            .map(|(shard, _)| *shard)
            .collect();
        for shard in shards {
            if stop.is_cancelled() {
                return Ok(false);
            }
            let count = |member: u32, table: &BTreeMap<u32, Vec<u32>>| {
                table.values().filter(|r| r.contains(&member)).count()
            };
            let replicas = table.get(&shard).cloned().unwrap_or_default();
            let Some(to) = members
                .iter()
                .copied()
                .filter(|member| !replicas.contains(member))
                .min_by_key(|member| (count(*member, &table), *member))
            else {
                anyhow::bail!("shard {shard} has nowhere to go from node {node} ({table:?})");
            };
            self.carry_out(rng, (shard, node, to), stop).await?;
            if let Some(replicas) = table.get_mut(&shard) {
                replicas.retain(|id| *id != node);
                replicas.push(to);
            }
        }
        Ok(true)
    }

    /// Grows and shrinks the placed cluster: the spare node joins (`Admin.AddNode`: the
    /// metadata group, holding no replica; later moves and this drain fill it), a random other
    /// member is drained and removed (`Admin.RemoveNode`, which a node refuses while the table
    /// still puts a replica on it), then wiped and restarted empty as the next spare.
    pub(super) async fn replace(
        &self,
        rng: &mut StdRng,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let members = self.member_ids();
        let Some(leaving) = members.choose(rng).copied() else {
            anyhow::bail!("replace fault without members");
        };
        let joiner = self.join_spare("replace").await?;
        self.injected(
            "replace",
            format!("node {joiner} joined, holding no replica"),
        );
        // A move refused as planned on a lagging table leaves a replica behind: drain again
        // from a fresh table until the node holds none.
        for _ in 0..DRAIN_PASSES {
            let table = self.placed_table("replace").await?;
            if !table.values().any(|replicas| replicas.contains(&leaving)) {
                break;
            }
            if !self.drain_node(rng, leaving, table, stop).await? {
                return Ok(());
            }
        }
        let started = Instant::now();
        loop {
            match self
                .change_membership(&MembershipChange::Remove(leaving))
                .await
            {
                Ok(()) => break,
                Err(error) if started.elapsed() < REMOVE_RESUME => {
                    tracing::info!(error = %format!("{error:#}"), "removal refused; sending it again");
                    self.hold(MOVE_RETRY_PAUSE, &CancellationToken::new()).await;
                }
                Err(error) => {
                    return Err(error.context(format!(
                        "drained node {leaving} was not removed within {REMOVE_RESUME:?}"
                    )));
                }
            }
        }
        self.set_member(leaving, false);
        self.injected("replace", format!("node {leaving} drained and removed"));
        self.lock_nodes().wipe_and_start(leaving)?;
        self.healed(
            "wipe",
            format!("node {leaving} wiped and restarted as the spare"),
        );
        Ok(())
    }

    /// Sends the move of `shard` from `from` to `to`; one time in three a random member is
    /// killed while it runs and restarted 2–5 s later; sends it again until it finishes.
    async fn carry_out(
        &self,
        rng: &mut StdRng,
        (shard, from, to): (u32, u32, u32),
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let members = self.member_ids();
        let via = self.admin_of(from)?;
        let started = Instant::now();
        let first = async { via.move_shard(shard, from, to).await };
        let interrupted = if rng.random_bool(1.0 / 3.0) {
            let victim = members.choose(rng).copied().unwrap_or(from);
            let after = Duration::from_millis(rng.random_range(200..2_000));
            let down = Duration::from_millis(rng.random_range(2_000..5_000));
            let interrupt = async {
                tokio::time::sleep(after).await;
                self.interrupt(victim, down, stop).await
            };
            let (first, interrupt) = tokio::join!(first, interrupt);
            interrupt?;
            first
        } else {
            first.await
        };
        let mut last = match interrupted {
            Ok(response) => return self.moved(shard, from, to, &response, started),
            Err(error) => error,
        };
        while started.elapsed() < MOVE_RESUME {
            if format!("{last:#}").contains("COURIER:Cluster:BadMove") {
                // The table this move was planned on was a lagging node's: nothing to resume.
                self.record(format!("move of shard {shard} refused: {last:#}"));
                return Ok(());
            }
            tracing::info!(error = %format!("{last:#}"), "move not done; sending it again");
            self.hold(MOVE_RETRY_PAUSE, &CancellationToken::new()).await;
            match via.move_shard(shard, from, to).await {
                Ok(response) => return self.moved(shard, from, to, &response, started),
                Err(error) => last = error,
            }
        }
        Err(last.context(format!(
            "the move of shard {shard} from node {from} to node {to} did not finish within \
             {MOVE_RESUME:?}"
        )))
    }

    fn admin_of(&self, id: u32) -> anyhow::Result<AdminNode> {
        self.admin
            .iter()
            .find(|admin| admin.id == id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no admin client for node {id}"))
    }

    /// Kills `victim` while a move runs, holds it down for `down`, restarts it.
    async fn interrupt(
        &self,
        victim: u32,
        down: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        self.lock_nodes().kill(victim)?;
        self.injected("kill", format!("kill node {victim} during the move"));
        self.hold(down, stop).await;
        self.lock_nodes().start(victim)?;
        self.healed("restart", format!("restart [{victim}]"));
        Ok(())
    }

    /// Records a finished move; a move whose old replica kept keys of the shard is an error.
    fn moved(
        &self,
        shard: u32,
        from: u32,
        to: u32,
        response: &courier_proto::pb::peer::MoveShardResponse,
        started: Instant,
    ) -> anyhow::Result<()> {
        if !response.deleted || response.families_left != 0 {
            anyhow::bail!(
                "shard {shard} moved from node {from} to node {to}, but node {from}'s copy was \
                 not deleted (deleted {}, column families left {})",
                response.deleted,
                response.families_left
            );
        }
        self.healed(
            "move",
            format!(
                "shard {shard} moved from node {from} to node {to} in {:.1} s{}",
                started.elapsed().as_secs_f64(),
                if response.already_moved {
                    " (resumed after the table recorded it)"
                } else {
                    ""
                }
            ),
        );
        Ok(())
    }
}
