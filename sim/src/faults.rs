//! The nemesis (one fault at a time, drawn from the seed) and the invariants checked after every
//! step of a simulation. Besides its drawn faults, the nemesis cuts the power inside one snapshot
//! install in [`INSTALL_CRASH_ONE_IN`], the moment that install begins.

use std::collections::BTreeMap;

use courier_consensus::{GroupId, NodeId};
use courier_jepsen::history::{Fault, Record};
use courier_proto::ShardId;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::{World, elapsed_ms, host};

/// One snapshot install in this many loses power inside it.
pub(crate) const INSTALL_CRASH_ONE_IN: u32 = 4;

/// Invariants checked after every step.
///
/// No "one leader per term" check: openraft 0.9 runs in its default ("advanced") mode, where a
/// leader id is (term, node id), ordered lexicographically, so a node may win a term another node
/// already leads and supersede it (the first seeds run flagged exactly that, by design). What must
/// hold is checked instead: an index, once applied anywhere, is applied everywhere with the same
/// leader id (committed entries never change, log matching on what was applied).
#[derive(Default)]
pub(crate) struct Invariants {
    /// (node, shard) → highest applied index seen since the node last started.
    applied: BTreeMap<(NodeId, u16), u64>,
    /// (shard, index) → the leader id (term, node) of the entry applied there.
    committed: BTreeMap<(u16, u64), (u64, NodeId)>,
    pub(crate) violations: Vec<String>,
}

impl Invariants {
    pub(crate) fn check(&mut self, world: &World, shards: u16, tick: u64) {
        for dropped in world.take_dropped() {
            self.applied.remove(&dropped);
        }
        let nodes = world.lock_nodes().clone();
        for (node, groups) in &nodes {
            for shard in 0..shards {
                let Some(handle) = groups.get(GroupId::Shard(ShardId::new(shard))) else {
                    continue;
                };
                let Some(last) = handle.raft.metrics().borrow().last_applied else {
                    continue;
                };
                let high = self.applied.get(&(*node, shard)).copied().unwrap_or(0);
                if last.index < high {
                    self.violate(format!(
                        "tick {tick}: node {node} shard {shard} applied index went back from {high} to {} without a restart",
                        last.index
                    ));
                }
                self.applied.insert((*node, shard), high.max(last.index));
                let leader = (last.leader_id.term, last.leader_id.node_id);
                let first = *self.committed.entry((shard, last.index)).or_insert(leader);
                if first != leader {
                    self.violate(format!(
                        "tick {tick}: shard {shard} index {} was applied under leader {first:?} and under {leader:?} (node {node})",
                        last.index
                    ));
                }
            }
        }
    }

    /// `node` lost power: its applied index may go back to what its disk kept (the state
    /// machine's batches are not fsynced; raft applies the committed entries again).
    pub(crate) fn restarted(&mut self, node: NodeId) {
        self.applied.retain(|(n, _), _| *n != node);
    }

    fn violate(&mut self, text: String) {
        if self.violations.len() < 20 {
            self.violations.push(text);
        }
    }
}

/// The nemesis: one fault at a time, drawn from the seed.
pub(crate) struct Nemesis {
    /// Nodes n1..=n`nodes` are fair game.
    nodes: u64,
    rng: StdRng,
    next_at: u64,
    heal_at: Option<u64>,
    crashed: Vec<NodeId>,
    /// Nodes crashed since the driver last asked (their applied index may go back).
    crashed_now: Vec<NodeId>,
    /// The node whose disk fails every fsync, until the heal.
    failing_disk: Option<NodeId>,
    partitioned: bool,
    held: bool,
    pub(crate) faults: BTreeMap<&'static str, usize>,
    /// Simulated milliseconds of the current step (fault records carry it).
    now: u64,
    /// Per node, the snapshot installs its disk began that the nemesis has seen.
    installs_seen: BTreeMap<NodeId, u64>,
}

impl Nemesis {
    pub(crate) fn new(seed: u64, nodes: u64) -> Self {
        Self {
            nodes,
            rng: StdRng::seed_from_u64(seed ^ 0x5EED_FA17),
            next_at: 1_000,
            heal_at: None,
            crashed: Vec::new(),
            crashed_now: Vec::new(),
            failing_disk: None,
            partitioned: false,
            held: false,
            faults: BTreeMap::new(),
            now: 0,
            installs_seen: BTreeMap::new(),
        }
    }

    fn note(&mut self, world: &World, kind: &'static str, description: String) {
        *self.faults.entry(kind).or_default() += 1;
        world.record(Record::Fault(Fault {
            time_ms: self.now,
            description,
        }));
    }

    /// Power loss on `node`: its host stops, and its disk keeps what was synced plus a random
    /// prefix of what was not. Returns what the disk lost, for the fault record.
    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, world: &World, node: NodeId) -> String {
        world.lock_nodes().remove(&node);
        sim.crash(host(node));
        let loss = world
            .disks
            .get(&node)
            .map(|disk| disk.crash(|pending| self.rng.random_range(0..=pending)));
        self.crashed.push(node);
        self.crashed_now.push(node);
        loss.map_or_else(String::new, |loss| {
            format!(
                "n{node} (unsynced batches: {} lost, {} kept)",
                loss.lost, loss.kept
            )
        })
    }

    /// A node to lose power inside the snapshot install it just began, with probability
    /// 1 / [`INSTALL_CRASH_ONE_IN`] per install: where a crash must find the log and the state
    /// machine agreeing (a purge never passes what an install put in place), and where a crash
    /// at a random moment almost never falls.
    fn install_to_cut(&mut self, world: &World) -> Option<NodeId> {
        for (&node, disk) in &world.disks {
            let (installing, begun) = disk.installing();
            let seen = self.installs_seen.entry(node).or_default();
            if !installing || *seen == begun {
                continue;
            }
            *seen = begun;
            let up = !self.crashed.contains(&node) && self.failing_disk != Some(node);
            if up && self.rng.random_ratio(1, INSTALL_CRASH_ONE_IN) {
                return Some(node);
            }
        }
        None
    }

    /// No fault before `at` (simulated ms).
    pub(crate) fn first_fault_at(&mut self, at: u64) {
        self.next_at = at;
    }

    /// Nodes crashed since the last call.
    pub(crate) fn take_crashed(&mut self) -> Vec<NodeId> {
        std::mem::take(&mut self.crashed_now)
    }

    pub(crate) fn step(&mut self, sim: &mut turmoil::Sim<'_>, world: &World, now: u64) {
        self.now = now;
        if let Some(node) = self.install_to_cut(world) {
            let what = self.crash(sim, world, node);
            self.note(
                world,
                "install crash",
                format!("power loss inside a snapshot install on {what}"),
            );
            if self.heal_at.is_none() {
                self.heal_at = Some(now + self.rng.random_range(500..3_000));
            }
        }
        if let Some(at) = self.heal_at {
            if now >= at {
                self.heal(sim, world);
                self.next_at = now + self.rng.random_range(200..1_000);
            }
            return;
        }
        if now < self.next_at {
            return;
        }
        let hold = self.rng.random_range(500..3_000);
        self.heal_at = Some(now + hold);
        let a = self.rng.random_range(1..=self.nodes);
        let b = a % self.nodes + 1;
        match self.rng.random_range(0..8) {
            0 => {
                for other in (1..=self.nodes).filter(|n| *n != a) {
                    sim.partition(host(a), host(other));
                    sim.partition(host(a), "clients");
                }
                self.partitioned = true;
                self.note(world, "partition", format!("isolate n{a}"));
            }
            1 => {
                // A bridge: a and b cannot talk; the others talk to both.
                sim.partition(host(a), host(b));
                self.partitioned = true;
                self.note(world, "partition", format!("bridge: n{a} and n{b} cut"));
            }
            2 | 3 => {
                let what = self.crash(sim, world, a);
                self.note(world, "crash", format!("power loss on {what}"));
            }
            4 => {
                // Messages between a and b are held (delayed), then released at once (reorder).
                sim.hold(host(a), host(b));
                self.held = true;
                self.note(world, "hold", format!("hold n{a} <-> n{b}"));
            }
            5 => {
                let first = self.crash(sim, world, a);
                let second = self.crash(sim, world, b);
                self.note(
                    world,
                    "crash",
                    format!("power loss on a majority: {first}, {second}"),
                );
            }
            6 => {
                // The disk fails every fsync: the replica must stop rather than ack; at the heal
                // the operator restarts it (what it never synced is gone).
                if let Some(disk) = world.disks.get(&a) {
                    disk.fail_syncs(true);
                }
                self.failing_disk = Some(a);
                self.note(world, "disk", format!("fsync fails on n{a}"));
            }
            _ => {
                let lost: Vec<String> = (1..=self.nodes)
                    .map(|n| self.crash(sim, world, n))
                    .collect();
                self.note(
                    world,
                    "crash",
                    format!("power loss on every node: {}", lost.join(", ")),
                );
            }
        }
    }

    pub(crate) fn heal(&mut self, sim: &mut turmoil::Sim<'_>, world: &World) {
        self.now = elapsed_ms(sim);
        self.heal_at = None;
        if self.partitioned {
            for a in 1..=self.nodes {
                for b in (1..=self.nodes).filter(|b| *b != a) {
                    sim.repair(host(a), host(b));
                }
                sim.repair(host(a), "clients");
            }
            self.partitioned = false;
        }
        if self.held {
            for a in 1..=self.nodes {
                for b in (1..=self.nodes).filter(|b| *b != a) {
                    sim.release(host(a), host(b));
                }
            }
            self.held = false;
        }
        if let Some(node) = self.failing_disk.take() {
            if let Some(disk) = world.disks.get(&node) {
                disk.fail_syncs(false);
            }
            let what = self.crash(sim, world, node);
            self.note(
                world,
                "crash",
                format!("stopped replica after failed fsync: {what}"),
            );
        }
        for node in std::mem::take(&mut self.crashed) {
            sim.bounce(host(node));
            self.note(world, "restart", format!("restart n{node}"));
        }
    }
}
