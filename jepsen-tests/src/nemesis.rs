//! The nemesis: injects one fault at a time on a schedule, heals it, and records both as
//! `Fault` records.
//!
//! ```text
//!  quiet ──▶ [fault ─ hold 3–10 s ─ heal ─ gap 1–3 s]* ──▶ end of the fault window ──▶ final heal
//! ```
//!
//! Faults:
//! - kill: SIGKILL one node / the leader of a random shard / a minority; restart after 2–5 s
//!   on the same data directory and addresses;
//! - pause: SIGSTOP one node / a shard leader / a minority; SIGCONT after 3–8 s;
//! - pause-then-kill: SIGSTOP a node, SIGKILL it while stopped, restart it (NATS-style);
//! - partition (nftables drops between node addresses): isolate one node, isolate a shard
//!   leader, a random majority/minority split, a bridge (two halves that only one node sees);
//! - clock: step one node's wall clock 5–300 s forwards or backwards (libfaketime, re-read by
//!   the running node every second), hold 3–10 s, step it back;
//! - membership: add the spare node as a voter (learner, caught up, then voter, on every shard),
//!   hold 2–5 s, remove another voter; the removed node is wiped and restarted empty as the
//!   next spare, so membership changes keep coming with 3 voters and one spare;
//! - move (clusters that place R < N replicas per shard): one replica of a random shard moves
//!   to a node without one, sometimes with a node killed mid-move; drain: every replica of one
//!   node moves off it that way; replace: the spare node joins the placed cluster holding no
//!   replica, a member is drained, removed (`RemoveNode`, refused while it holds a replica) and
//!   wiped as the next spare (see `nemesis/moves.rs`).
//!
//! While it runs, the nemesis also watches for nodes that exit on their own (a crash is a
//! finding: it is reported and fails the run) and restarts them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom as _, SliceRandom as _};
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminNode, MembershipChange, statuses};
use crate::history::{Fault, Record};
use crate::net::{Grudge, Network};
use crate::nodes::{Crash, Nodes};
use crate::recorder::Recorder;

mod moves;

/// One action on one node of the cluster (kill, start, pause, resume).
type NodeAction = fn(&mut Nodes, u32) -> anyhow::Result<()>;

/// The fault families a scenario draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultFamily {
    /// SIGKILL and restart.
    Kill,
    /// SIGSTOP and SIGCONT.
    Pause,
    /// SIGSTOP, then SIGKILL while stopped, then restart.
    PauseThenKill,
    /// nftables partitions.
    Partition,
    /// Wall-clock steps on one node (libfaketime).
    Clock,
    /// Add a voter, then remove another (needs a spare node).
    Membership,
    /// Move a shard's replica to another node (needs more nodes than replicas per shard).
    Move,
    /// Move every replica off one node, one at a time (needs more nodes than replicas).
    Drain,
    /// The spare node joins a placed cluster; a member is drained, removed, and wiped as the
    /// next spare (needs a spare node and more nodes than replicas).
    Replace,
}

/// Which nodes a process fault hits.
#[derive(Clone, Copy, Debug)]
enum Target {
    One,
    Leader,
    Minority,
}

/// What the nemesis did, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NemesisStats {
    /// Faults injected, by kind ("kill", "pause", "pause-kill", "partition").
    pub injected: BTreeMap<String, usize>,
    /// Heals, restarts and resumes, by kind.
    pub healed: BTreeMap<String, usize>,
    /// Nodes that exited on their own.
    pub crashes: Vec<String>,
    /// Nemesis actions that failed (a failed action is a harness failure).
    pub errors: Vec<String>,
}

impl NemesisStats {
    /// Faults injected, all kinds.
    pub fn injected_total(&self) -> usize {
        self.injected.values().sum()
    }
}

/// The nemesis's handles on the cluster.
#[derive(Debug)]
pub struct Nemesis {
    /// The node processes.
    pub nodes: Arc<Mutex<Nodes>>,
    /// The network (partitions).
    pub network: Arc<Network>,
    /// Admin clients, to find leaders.
    pub admin: Vec<AdminNode>,
    /// The history.
    pub recorder: Arc<Recorder>,
    /// The fault families to draw from (empty: no faults, crash watching only).
    pub families: Vec<FaultFamily>,
    /// The cluster's voters now (membership faults change it; the final phase reads it).
    pub members: Arc<Mutex<BTreeSet<u32>>>,
    /// What was done.
    pub stats: Mutex<NemesisStats>,
}

impl Nemesis {
    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The voters, in id order.
    pub fn member_ids(&self) -> Vec<u32> {
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// Admin clients of the voters.
    pub fn member_admin(&self) -> Vec<AdminNode> {
        let members = self.member_ids();
        self.admin
            .iter()
            .filter(|a| members.contains(&a.id))
            .cloned()
            .collect()
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, NemesisStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, description: String) {
        tracing::info!(fault = %description, "nemesis");
        self.recorder.record(&Record::Fault(Fault {
            time_ms: self.recorder.now_ms(),
            description,
        }));
    }

    fn injected(&self, kind: &str, description: String) {
        *self.stats().injected.entry(kind.to_owned()).or_default() += 1;
        self.record(description);
    }

    fn healed(&self, kind: &str, description: String) {
        *self.stats().healed.entry(kind.to_owned()).or_default() += 1;
        self.record(description);
    }

    fn error(&self, error: &anyhow::Error) {
        tracing::error!(error = %format!("{error:#}"), "nemesis action failed");
        self.stats().errors.push(format!("{error:#}"));
    }

    /// Restarts nodes that exited on their own, recording each crash.
    pub fn watch_crashes(&self) {
        let crashes: Vec<Crash> = self.lock_nodes().reap_crashes();
        for crash in crashes {
            let text = format!("node {} exited on its own ({})", crash.node, crash.status);
            tracing::error!(%text, "node crash");
            self.stats().crashes.push(text);
            let restarted = self.lock_nodes().start(crash.node);
            if let Err(error) = restarted {
                self.error(&error);
            }
        }
    }

    /// Sleeps `duration` (or until `stop`), watching for crashes every 200 ms.
    async fn hold(&self, duration: Duration, stop: &CancellationToken) {
        let end = Instant::now() + duration;
        while Instant::now() < end && !stop.is_cancelled() {
            self.watch_crashes();
            let step = end
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(step) => {}
            }
        }
    }

    /// Runs the schedule: `quiet`, then faults until `window_end`, then the final heal. With
    /// no fault families it only watches for crashes until `window_end`. `stop` cuts the
    /// schedule short (the final heal still runs).
    pub async fn run(
        &self,
        seed: u64,
        quiet: Duration,
        window_end: Instant,
        stop: CancellationToken,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        self.hold(quiet, &stop).await;
        while !self.families.is_empty() && !stop.is_cancelled() {
            let remaining = window_end.saturating_duration_since(Instant::now());
            if remaining < Duration::from_secs(3) {
                break;
            }
            let Some(family) = self.families.choose(&mut rng).copied() else {
                break;
            };
            let result = match family {
                FaultFamily::Kill => self.kill(&mut rng, remaining, &stop).await,
                FaultFamily::Pause => self.pause(&mut rng, remaining, &stop).await,
                FaultFamily::PauseThenKill => {
                    self.pause_then_kill(&mut rng, remaining, &stop).await
                }
                FaultFamily::Partition => self.partition(&mut rng, remaining, &stop).await,
                FaultFamily::Clock => self.clock(&mut rng, remaining, &stop).await,
                FaultFamily::Membership => self.membership(&mut rng, remaining, &stop).await,
                FaultFamily::Move => self.move_replica(&mut rng, &stop).await,
                FaultFamily::Drain => self.drain(&mut rng, &stop).await,
                FaultFamily::Replace => self.replace(&mut rng, &stop).await,
            };
            if let Err(error) = result {
                self.error(&error);
            }
            let gap = Duration::from_millis(rng.random_range(1_000..3_000));
            self.hold(
                gap.min(window_end.saturating_duration_since(Instant::now())),
                &stop,
            )
            .await;
        }
        let rest = window_end.saturating_duration_since(Instant::now());
        self.hold(rest, &stop).await;
        self.final_heal();
    }

    /// Heals everything: partitions removed, clocks set right, paused nodes resumed, stopped
    /// nodes started.
    pub fn final_heal(&self) {
        if let Err(error) = self.network.heal() {
            self.error(&error);
        }
        if self.families.contains(&FaultFamily::Clock) {
            let ids = self.lock_nodes().ids();
            for id in ids {
                let reset = self.lock_nodes().set_clock_offset(id, 0);
                if let Err(error) = reset {
                    self.error(&error);
                }
            }
        }
        self.watch_crashes();
        let touched = self.lock_nodes().heal_all();
        match touched {
            Ok(touched) => self.healed("final", format!("final heal (nodes touched: {touched:?})")),
            Err(error) => self.error(&error),
        }
    }

    /// The nodes a process fault hits, and why ("node 2", "node 2 (leader of shard 1)").
    async fn targets(&self, rng: &mut StdRng) -> (Vec<u32>, String) {
        let ids = self.member_ids();
        let target = *[Target::One, Target::Leader, Target::Minority]
            .choose(rng)
            .unwrap_or(&Target::One);
        match target {
            Target::Leader => {
                if let Some((shard, leader)) = self.random_leader(rng).await {
                    return (
                        vec![leader],
                        format!("node {leader} (leader of shard {shard})"),
                    );
                }
                let node = ids.choose(rng).copied().unwrap_or(1);
                (vec![node], format!("node {node} (no leader known)"))
            }
            Target::Minority => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(rng);
                let size = (ids.len().saturating_sub(1) / 2).max(1);
                shuffled.truncate(size);
                shuffled.sort_unstable();
                let text = format!("minority {shuffled:?}");
                (shuffled, text)
            }
            Target::One => {
                let node = ids.choose(rng).copied().unwrap_or(1);
                (vec![node], format!("node {node}"))
            }
        }
    }

    /// The leader of a random shard, as the live nodes report it.
    async fn random_leader(&self, rng: &mut StdRng) -> Option<(u32, u32)> {
        let live = self.live_members();
        let statuses = statuses(&live).await;
        let leaders: BTreeSet<(u32, u32)> = statuses
            .values()
            .flat_map(|s| s.shards.iter())
            .filter(|s| s.leader != 0)
            .filter_map(|s| Some((s.shard, u32::try_from(s.leader).ok()?)))
            .collect();
        let leaders: Vec<(u32, u32)> = leaders.into_iter().collect();
        leaders.choose(rng).copied()
    }

    async fn kill(
        &self,
        rng: &mut StdRng,
        remaining: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (targets, why) = self.targets(rng).await;
        let down = Duration::from_millis(rng.random_range(2_000..5_000)).min(remaining);
        self.held_fault(
            &targets,
            ("kill", format!("kill {why}")),
            (|nodes, id| nodes.kill(id).map(drop), down),
            ("restart", |nodes, id| nodes.start(id)),
            stop,
        )
        .await
    }

    async fn pause(
        &self,
        rng: &mut StdRng,
        remaining: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (targets, why) = self.targets(rng).await;
        let held = Duration::from_millis(rng.random_range(3_000..8_000)).min(remaining);
        self.held_fault(
            &targets,
            ("pause", format!("pause {why}")),
            (|nodes, id| nodes.pause(id).map(drop), held),
            ("resume", |nodes, id| nodes.resume(id).map(drop)),
            stop,
        )
        .await
    }

    /// Applies a fault to every target, records it, holds it, undoes it, records the heal.
    async fn held_fault(
        &self,
        targets: &[u32],
        (kind, description): (&'static str, String),
        (apply, held): (NodeAction, Duration),
        (heal, undo): (&'static str, NodeAction),
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        for node in targets {
            apply(&mut self.lock_nodes(), *node)?;
        }
        self.injected(kind, description);
        self.hold(held, stop).await;
        for node in targets {
            undo(&mut self.lock_nodes(), *node)?;
        }
        self.healed(heal, format!("{heal} {targets:?}"));
        Ok(())
    }

    async fn pause_then_kill(
        &self,
        rng: &mut StdRng,
        remaining: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (targets, why) = self.targets(rng).await;
        for node in &targets {
            self.lock_nodes().pause(*node)?;
        }
        self.injected(
            "pause-kill",
            format!("pause {why}, to be killed while paused"),
        );
        let paused = Duration::from_millis(rng.random_range(1_000..4_000)).min(remaining);
        self.hold(paused, stop).await;
        for node in &targets {
            self.lock_nodes().kill(*node)?;
        }
        self.record(format!("kill paused {targets:?}"));
        let down = Duration::from_millis(rng.random_range(2_000..4_000));
        self.hold(down, stop).await;
        for node in &targets {
            self.lock_nodes().start(*node)?;
        }
        self.healed("restart", format!("restart {targets:?}"));
        Ok(())
    }

    async fn partition(
        &self,
        rng: &mut StdRng,
        remaining: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let ids = self.member_ids();
        let (grudge, why) = match rng.random_range(0..4) {
            0 => {
                let node = ids.choose(rng).copied().unwrap_or(1);
                (isolate(&ids, &[node]), format!("isolate node {node}"))
            }
            1 => match self.random_leader(rng).await {
                Some((shard, leader)) => (
                    isolate(&ids, &[leader]),
                    format!("isolate node {leader} (leader of shard {shard})"),
                ),
                None => {
                    let node = ids.choose(rng).copied().unwrap_or(1);
                    (
                        isolate(&ids, &[node]),
                        format!("isolate node {node} (no leader known)"),
                    )
                }
            },
            2 => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(rng);
                let minority: Vec<u32> = shuffled
                    .iter()
                    .take((ids.len().saturating_sub(1) / 2).max(1))
                    .copied()
                    .collect();
                (
                    isolate(&ids, &minority),
                    format!("split minority {minority:?} from the rest"),
                )
            }
            _ => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(rng);
                let (grudge, middle) = bridge(&shuffled);
                (
                    grudge,
                    format!("bridge through node {middle}: {shuffled:?}"),
                )
            }
        };
        self.network.apply_grudge(&grudge)?;
        self.injected("partition", format!("partition: {why}"));
        let held = Duration::from_millis(rng.random_range(3_000..10_000)).min(remaining);
        self.hold(held, stop).await;
        self.network.heal()?;
        self.healed("heal", "heal partition".to_owned());
        Ok(())
    }
}

impl Nemesis {
    /// Admin clients of the voters that run and are not paused.
    fn live_members(&self) -> Vec<AdminNode> {
        let members = self.member_admin();
        let nodes = self.lock_nodes();
        members
            .into_iter()
            .filter(|a| nodes.is_live(a.id))
            .collect()
    }

    async fn clock(
        &self,
        rng: &mut StdRng,
        remaining: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let node = self.member_ids().choose(rng).copied().unwrap_or(1);
        let magnitude: i64 = rng.random_range(5..=300);
        let offset = if rng.random_bool(0.5) {
            magnitude
        } else {
            -magnitude
        };
        self.lock_nodes().set_clock_offset(node, offset)?;
        self.injected(
            "clock",
            format!("clock of node {node} stepped {offset:+} s"),
        );
        let held = Duration::from_millis(rng.random_range(3_000..10_000)).min(remaining);
        self.hold(held, stop).await;
        self.lock_nodes().set_clock_offset(node, 0)?;
        self.healed("clock", format!("clock of node {node} set right"));
        Ok(())
    }

    /// Sends `change` through the live voters in turn until one accepts it.
    async fn change_membership(&self, change: &MembershipChange) -> anyhow::Result<()> {
        let mut last = anyhow::anyhow!("no live voter to send {change:?} to");
        for via in self.live_members() {
            match via.change_membership(change).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "membership change refused; trying another node");
                    last = error;
                }
            }
        }
        Err(last)
    }

    async fn membership(
        &self,
        rng: &mut StdRng,
        remaining: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let members = self.member_ids();
        let joiner = self.join_spare("membership").await?;
        self.injected("membership", format!("node {joiner} added as a voter"));
        let held = Duration::from_millis(rng.random_range(2_000..5_000)).min(remaining);
        self.hold(held, stop).await;
        let leaving = members.choose(rng).copied().unwrap_or(1);
        self.change_membership(&MembershipChange::Remove(leaving))
            .await?;
        self.set_member(leaving, false);
        self.injected("membership", format!("node {leaving} removed"));
        self.lock_nodes().wipe_and_start(leaving)?;
        self.healed(
            "wipe",
            format!("node {leaving} wiped and restarted as the spare"),
        );
        Ok(())
    }

    /// Adds the spare node (the started node that is not a member) through a live member, and
    /// counts it a member. Returns its id.
    async fn join_spare(&self, fault: &str) -> anyhow::Result<u32> {
        let members = self.member_ids();
        let all = self.lock_nodes().ids();
        let Some(joiner) = all.iter().copied().find(|id| !members.contains(id)) else {
            anyhow::bail!("{fault} fault without a spare node");
        };
        let spec = self.lock_nodes().spec(joiner)?.clone();
        self.change_membership(&MembershipChange::Add(spec)).await?;
        self.set_member(joiner, true);
        Ok(joiner)
    }

    fn set_member(&self, id: u32, member: bool) {
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        if member {
            members.insert(id);
        } else {
            members.remove(&id);
        }
    }
}

/// A grudge cutting `side` off from every other node.
pub fn isolate(all: &[u32], side: &[u32]) -> Grudge {
    let mut grudge = Grudge::new();
    for a in side {
        for b in all.iter().filter(|b| !side.contains(b)) {
            grudge.entry(*a).or_default().insert(*b);
            grudge.entry(*b).or_default().insert(*a);
        }
    }
    grudge
}

/// A bridge over `order`: the first half and the second half cannot talk to each other; the
/// middle node talks to both. Returns the grudge and the middle node.
pub fn bridge(order: &[u32]) -> (Grudge, u32) {
    let middle_index = order.len() / 2;
    let middle = order.get(middle_index).copied().unwrap_or(1);
    let (left, right) = order.split_at(middle_index);
    let right = right.get(1..).unwrap_or(&[]);
    let mut grudge = Grudge::new();
    for a in left {
        for b in right {
            grudge.entry(*a).or_default().insert(*b);
            grudge.entry(*b).or_default().insert(*a);
        }
    }
    (grudge, middle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolate_is_symmetric_and_spares_the_majority_links() {
        let grudge = isolate(&[1, 2, 3], &[2]);
        assert_eq!(grudge.get(&2).cloned(), Some(BTreeSet::from([1, 3])));
        assert_eq!(grudge.get(&1).cloned(), Some(BTreeSet::from([2])));
        assert_eq!(grudge.get(&3).cloned(), Some(BTreeSet::from([2])));
    }

    #[test]
    fn bridge_keeps_the_middle_connected() {
        let (grudge, middle) = bridge(&[3, 1, 2]);
        assert_eq!(middle, 1);
        assert_eq!(grudge.get(&3).cloned(), Some(BTreeSet::from([2])));
        assert_eq!(grudge.get(&2).cloned(), Some(BTreeSet::from([3])));
        assert!(
            !grudge.contains_key(&1),
            "the middle node talks to everyone"
        );
    }
}
