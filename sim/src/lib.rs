//! courier's deterministic simulation (issue #11, tier 1 of TESTING.md): courier on simulated
//! nodes in one process, on turmoil's network and clock, each node's storage on a [`MemDisk`]
//! that loses what was never fsynced when the node loses power. Two layers:
//!
//! * [`Layer::Raft`] (`raft.rs`): the consensus layer and its state machine — openraft groups over
//!   courier-storage, raft RPCs over tonic; clients propose events to the groups directly. Fast:
//!   the CI budget runs 200 seeds of it.
//! * [`Layer::Node`] (`cluster.rs`): whole `courier-node` servers (client API, peer API, outbox
//!   forwarders, device streams); jepsen-tests' own clients register, send, stream, ack, read
//!   and drain over gRPC.
//!
//! ```text
//!  seed ─▶ topology (shards, clients, latency, election timeouts)
//!       ─▶ turmoil: hosts n1..nN (a MemDisk each) and a host "clients"
//!       ─▶ every tick (faults.rs): faults on schedule from the moment the clients are ready
//!                      (partition shapes, power loss of one, a majority or every node losing
//!                      unsynced writes, failing fsyncs, link hold/release), invariants (applied
//!                      index never back while a node lives, an applied index never changes its
//!                      leader id)
//!       ─▶ end of the fault window: heal, liveness (a leader per shard, replicas converge)
//!       ─▶ checks: every replica's projections == a rebuild from its log; the jepsen-tests
//!                  checker on the recorded history (lost, duplicate, order, unexpected, ...)
//! ```
//!
//! One seed decides everything the simulation decides; `courier-sim --seed S` replays it. What
//! is still outside the seed is listed in docs/SIMULATION.md (tokio's own `select!` randomness
//! without `--cfg tokio_unstable`).

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

pub mod cluster;
mod faults;
pub mod net;
mod raft;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use courier_consensus::groups::{Groups, RaftTiming};
use courier_consensus::proposer::Proposer;
use courier_consensus::types::Node;
use courier_consensus::{GroupId, NodeId};
use courier_jepsen::checker;
use courier_jepsen::history::{History, Record, Replica, Verify};
use courier_proto::{LogIndex, ShardId};
use courier_storage::archive::LogSource;
use courier_storage::{
    LogRecord, LogStore, MemDisk, Projection, ShardState, StorageError, rebuild,
};
use rand::Rng as _;
use rand::rngs::StdRng;

use crate::faults::{Invariants, Nemesis};

/// Simulated nodes: 3 voters and a spare that membership changes swap in.
pub const NODES: u64 = 4;
/// Voters of every shard.
pub const VOTERS: u64 = 3;
/// After the heal: how long the cluster has to elect leaders and converge.
pub(crate) const LIVENESS_WAIT: Duration = Duration::from_secs(30);
/// How long a snapshot install takes on a seed's disks, in ms (drawn per seed): long enough for
/// a crash or power loss to fall inside one, as it can on a real disk.
pub(crate) const INSTALL_LATENCY_MS: std::ops::RangeInclusive<u64> = 1..=40;

/// What a run simulates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layer {
    /// The consensus layer and state machine; clients propose events to raft directly.
    #[default]
    Raft,
    /// Whole `courier-node` servers; jepsen-tests' clients use the client API over gRPC.
    Node,
}

impl std::str::FromStr for Layer {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "raft" => Ok(Self::Raft),
            "node" => Ok(Self::Node),
            other => Err(format!("unknown layer {other:?} (known: raft, node)")),
        }
    }
}

/// What one run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// What is simulated.
    pub layer: Layer,
    /// Decides topology, faults, timings and workload.
    pub seed: u64,
    /// Simulated seconds of workload and faults (then heal and liveness).
    pub seconds: u64,
    /// A deliberate bug to turn on (feature `bugs`), to prove the simulation finds it.
    pub bug: Option<Bug>,
}

/// The deliberate bugs a run can turn on (compiled in only with the feature `bugs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// courier-consensus: the leader's proposer answers once raft took the batch, before commit.
    AckBeforeCommit,
    /// courier-storage: log appends are written without an fsync.
    UnsyncedLogAppends,
    /// courier-consensus: a purge up to a received snapshot does not wait for its install.
    PurgeBeforeInstall,
}

impl std::str::FromStr for Bug {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "ack-before-commit" => Ok(Self::AckBeforeCommit),
            "unsynced-log-appends" => Ok(Self::UnsyncedLogAppends),
            "purge-before-install" => Ok(Self::PurgeBeforeInstall),
            other => Err(format!(
                "unknown bug {other:?} (known: ack-before-commit, unsynced-log-appends, \
                 purge-before-install)"
            )),
        }
    }
}

/// What one run found.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Shards in this seed's topology.
    pub shards: u16,
    /// Sending clients.
    pub clients: u32,
    /// Simulation steps (1 ms of simulated time each).
    pub ticks: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Invariant violations seen during or after the run (each fails the seed).
    pub violations: Vec<String>,
    /// The history checker's verdict.
    pub checker: checker::Report,
    /// xxh3 of the whole recorded history: two runs of one seed must agree (replay check).
    pub fingerprint: u64,
}

impl Report {
    /// True when no invariant was violated and the history is valid.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.checker.is_valid()
    }

    /// Faults injected, all kinds.
    pub fn faults_total(&self) -> usize {
        self.faults.values().sum()
    }
}

/// State shared by the driver (outside the simulation) and the simulated hosts.
#[derive(Default)]
pub(crate) struct World {
    /// Where records go in the node layer (jepsen-tests' recorder, made by the client host so
    /// its clock is the simulated one); unset: into `history`.
    recorder: std::sync::OnceLock<Arc<courier_jepsen::recorder::Recorder>>,
    /// Set by the clients once the cluster is up (and, in the node layer, users registered):
    /// the fault window starts then.
    ready: AtomicBool,
    /// Violations the simulated hosts saw themselves (liveness after the heal).
    host_violations: Mutex<Vec<String>>,
    /// Every node's disk; it outlives the node's crashes.
    disks: BTreeMap<NodeId, Arc<MemDisk>>,
    /// The running nodes' groups (removed before a crash, so the crashed node's database closes).
    nodes: Mutex<BTreeMap<NodeId, Arc<Groups>>>,
    /// The history, in the order records were made.
    history: Mutex<Vec<Record>>,
    /// Set at the end of the fault window: clients stop starting new sends.
    healed: AtomicBool,
    /// Unique attempt ids.
    next_op: AtomicU64,
    /// The clients finished their liveness wait.
    settled: AtomicBool,
    /// Membership changes that completed.
    membership_changes: AtomicU64,
    /// Replicas dropped by the node a membership change removed (what a shard move ends with).
    replicas_dropped: AtomicU64,
    /// (node, shard) of the drops the invariants have not seen yet: such a replica starts over
    /// (its applied index goes back to what a leader sends it), as after a restart.
    dropped: Mutex<Vec<(NodeId, u16)>>,
}

impl World {
    /// A world of nodes n1..=n`nodes`, each with an empty disk whose snapshot installs take
    /// `install_latency`.
    pub(crate) fn with_disks(nodes: u64, install_latency: Duration) -> Self {
        Self {
            disks: (1..=nodes)
                .map(|id| {
                    let disk = MemDisk::new();
                    disk.set_install_latency(install_latency);
                    (id, Arc::new(disk))
                })
                .collect(),
            ..Self::default()
        }
    }

    pub(crate) fn lock_nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Arc<Groups>>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn record(&self, record: Record) {
        match self.recorder.get() {
            Some(recorder) => recorder.record(&record),
            None => self
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(record),
        }
    }

    pub(crate) fn note_dropped(&self, node: NodeId, shard: u16) {
        self.dropped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((node, shard));
    }

    pub(crate) fn take_dropped(&self) -> Vec<(NodeId, u16)> {
        std::mem::take(&mut *self.dropped.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn host_violation(&self, text: String) {
        self.host_violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(text);
    }

    pub(crate) fn proposer(&self, node: NodeId, shard: ShardId) -> Option<Proposer> {
        let groups = self.lock_nodes().get(&node).cloned()?;
        Some(groups.get(GroupId::Shard(shard))?.proposer)
    }
}

pub(crate) fn host(id: NodeId) -> String {
    format!("n{id}")
}

pub(crate) fn node(id: NodeId) -> Node {
    Node::new(format!("{}:{}", host(id), net::PEER_PORT))
}

/// The first voters of every shard (node 4 is the spare).
pub(crate) fn members() -> BTreeMap<NodeId, Node> {
    (1..=VOTERS).map(|id| (id, node(id))).collect()
}

/// The node that leads `shard` (the highest term among those that say so) and its voters.
pub(crate) fn leader_of(
    world: &World,
    shard: u16,
) -> Option<(NodeId, courier_consensus::Raft, BTreeSet<NodeId>)> {
    let nodes = world.lock_nodes().clone();
    nodes
        .iter()
        .filter_map(|(id, groups)| {
            let raft = groups.get(GroupId::Shard(ShardId::new(shard)))?.raft;
            let metrics = raft.metrics().borrow().clone();
            (metrics.state == openraft::ServerState::Leader).then(|| {
                let voters = metrics.membership_config.membership().voter_ids().collect();
                (metrics.current_term, *id, raft.clone(), voters)
            })
        })
        .max_by_key(|(term, id, _, _)| (*term, *id))
        .map(|(_, id, raft, voters)| (id, raft, voters))
}

/// Milliseconds of simulated time, as the driver (outside every host) sees it.
pub(crate) fn elapsed_ms(sim: &turmoil::Sim<'_>) -> u64 {
    u64::try_from(sim.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds of simulated time (0 outside a simulated host).
pub(crate) fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Raft timing of node `id`: election ranges of width 1 ms, staggered per node and drawn from the
/// seed, so openraft's own random draw inside the range cannot differ between runs.
pub(crate) fn timing(id: NodeId, rng: &mut StdRng) -> RaftTiming {
    let min = rng.random_range(150..300) + 40 * id;
    RaftTiming {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(min),
        election_timeout_max: Duration::from_millis(min + 1),
        rpc_timeout: Duration::from_millis(500),
        // Snapshots under the faults, as in the node layer (`cluster.rs`): a few per shard in a
        // run, so replicas that fell behind install one.
        snapshot_logs_since_last: 150,
        logs_to_keep: 30,
        snapshot_chunk_bytes: 1 << 20,
        append_entries_max: 64,
        log_cache_bytes_max: 256 << 20,
        proposal_queue: courier_consensus::proposer::QueueLimits::default(),
    }
}

/// Every shard has a leader that all its voters agree on, and every voter applied the same index.
pub(crate) fn converged(world: &World, shards: u16) -> bool {
    let nodes = world.lock_nodes().clone();
    (0..shards).all(|shard| {
        let Some((_, _, voters)) = leader_of(world, shard) else {
            return false;
        };
        let mut leaders = BTreeSet::new();
        let mut applied = BTreeSet::new();
        for voter in &voters {
            let Some(handle) = nodes
                .get(voter)
                .and_then(|groups| groups.get(GroupId::Shard(ShardId::new(shard))))
            else {
                return false;
            };
            let metrics = handle.raft.metrics().borrow().clone();
            leaders.insert(metrics.current_leader);
            applied.insert(metrics.last_applied.map(|l| l.index));
        }
        leaders.len() == 1 && !leaders.contains(&None) && applied.len() == 1
    })
}

/// What driving a simulation to its end found.
pub(crate) struct Driven {
    /// Steps taken.
    pub(crate) ticks: u64,
    /// Faults injected, by kind.
    pub(crate) faults: BTreeMap<&'static str, usize>,
    /// Invariant violations, the simulation's own errors, and what the hosts reported.
    pub(crate) violations: Vec<String>,
}

/// Steps `sim` to its end: from the moment the clients say the cluster is ready, the nemesis
/// injects faults on `nodes` nodes for `window_ms`, then heals; the invariants run after every
/// step.
pub(crate) fn drive(
    sim: &mut turmoil::Sim<'_>,
    world: &World,
    shards: u16,
    window_ms: u64,
    seed: u64,
) -> Driven {
    let nodes = u64::try_from(world.disks.len()).unwrap_or(NODES);
    let mut invariants = Invariants::default();
    let mut nemesis = Nemesis::new(seed, nodes);
    let mut ticks = 0_u64;
    let mut violations = Vec::new();
    let mut ready_at = None;
    let debug = std::env::var_os("COURIER_SIM_DEBUG").is_some();
    let invalid_before = courier_consensus::state_machine::invalid_events_in_process();
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                violations.push(format!("simulation error: {error}"));
                break;
            }
        }
        ticks += 1;
        let now = elapsed_ms(sim);
        if debug && ticks.is_multiple_of(1_000) {
            eprintln!("courier-sim: tick {ticks}, simulated {now} ms");
        }
        if ready_at.is_none() && world.ready.load(Ordering::SeqCst) {
            ready_at = Some(now);
            nemesis.first_fault_at(now + 1_000);
        }
        if let Some(ready) = ready_at {
            if now < ready + window_ms {
                nemesis.step(sim, world, now);
            } else if !world.healed.load(Ordering::SeqCst) {
                nemesis.heal(sim, world);
                world.healed.store(true, Ordering::SeqCst);
            }
        }
        for node in nemesis.take_crashed() {
            invariants.restarted(node);
        }
        invariants.check(world, shards, ticks);
    }
    if ready_at.is_none() {
        violations.push("the clients never reported the cluster ready".to_owned());
    }
    let invalid = courier_consensus::state_machine::invalid_events_in_process()
        .saturating_sub(invalid_before);
    if invalid > 0 {
        // The workload proposes only what leaders validated: a refusal at apply means a
        // replica's state differs from the leader's (lost or reordered log entries).
        violations.push(format!(
            "{invalid} committed events refused as invalid at apply"
        ));
    }
    let mut all = std::mem::take(&mut invariants.violations);
    all.extend(violations);
    all.extend(std::mem::take(
        &mut *world
            .host_violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    ));
    Driven {
        ticks,
        faults: nemesis.faults,
        violations: all,
    }
}

/// A turmoil simulation with courier's network settings: 1 ms ticks, latency 1 ms to
/// `latency_max`, no random loss (turmoil's TCP does not retransmit, so a lost segment would
/// corrupt a stream rather than delay it; loss comes from partitions, then repaired).
pub(crate) fn simulation<'a>(
    seed: u64,
    latency_max: Duration,
    duration: Duration,
) -> turmoil::Sim<'a> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(duration)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(latency_max)
        .fail_rate(0.0)
        .tcp_capacity(1 << 16)
        .build()
}

/// With `COURIER_SIM_DEBUG` set: every group's raft metrics on stderr.
pub(crate) fn debug_dump(world: &World, shards: u16) {
    if std::env::var_os("COURIER_SIM_DEBUG").is_none() {
        return;
    }
    for (node, groups) in world.lock_nodes().iter() {
        for shard in 0..shards {
            if let Some(handle) = groups.get(GroupId::Shard(ShardId::new(shard))) {
                let m = handle.raft.metrics().borrow().clone();
                eprintln!(
                    "n{node} s{shard}: {:?} term {} leader {:?} last_log {:?} applied {:?} replication {:?}",
                    m.state,
                    m.current_term,
                    m.current_leader,
                    m.last_log_index,
                    m.last_applied,
                    m.replication
                );
            }
            // The runs of log entries the node stores (holes, what a drop or an install left).
            let (from, to) = courier_storage::keys::shard_range(ShardId::new(shard));
            let pairs = courier_storage::ReadKv::scan(
                groups.db().as_ref(),
                courier_storage::Cf::Log,
                &from,
                &to,
                usize::MAX,
            )
            .unwrap_or_default();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for index in pairs
                .iter()
                .filter_map(|(key, _)| courier_storage::keys::log_entry_index(key))
            {
                match runs.last_mut() {
                    Some((_, end)) if *end + 1 == index.get() => *end = index.get(),
                    _ => runs.push((index.get(), index.get())),
                }
            }
            eprintln!("n{node} s{shard}: stored log runs {runs:?}");
        }
    }
}

/// Runs one seed.
///
/// # Errors
/// The simulation could not be set up; everything that goes wrong in it is a violation.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    #[cfg(feature = "bugs")]
    {
        courier_consensus::bugs::set_ack_before_commit(options.bug == Some(Bug::AckBeforeCommit));
        courier_consensus::bugs::set_purge_before_install(
            options.bug == Some(Bug::PurgeBeforeInstall),
        );
        courier_storage::bugs::set_unsynced_log_appends(
            options.bug == Some(Bug::UnsyncedLogAppends),
        );
    }
    #[cfg(not(feature = "bugs"))]
    anyhow::ensure!(
        options.bug.is_none(),
        "deliberate bugs need the `bugs` feature"
    );
    match options.layer {
        Layer::Raft => raft::run(options),
        Layer::Node => cluster::run(options),
    }
}

/// xxh3-64 over the history's JSON lines.
pub(crate) fn fingerprint(history: &History) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for record in &history.records {
        if let Ok(line) = serde_json::to_vec(record) {
            hasher.update(&line);
        }
    }
    hasher.digest()
}

/// The voters of every shard: the leader's view, or every node without a leader (liveness has
/// failed then anyway).
pub(crate) fn voters(world: &World, shards: u16) -> BTreeMap<u16, BTreeSet<NodeId>> {
    let all: BTreeSet<NodeId> = world.disks.keys().copied().collect();
    (0..shards)
        .map(|shard| {
            let voters = leader_of(world, shard).map_or_else(|| all.clone(), |(_, _, v)| v);
            (shard, voters)
        })
        .collect()
}

/// A shard's log as the replicas hold it together: each entry from the first of `logs` (the
/// verified replica's own first) that holds it. The simulation runs no log archive, so a replica
/// that installed a snapshot holds its log only from where it applied itself and from the
/// snapshot on; the entries in between come from another replica. Every replica's entries at or
/// below its applied index are committed ones (an install deletes the entries between the two),
/// and the verify reads only up to the verified replica's applied index, which every replica
/// reached once the run converged. After the voters come the nodes outside the shard's final
/// voters (the spare, a node a replica moved away from that kept its copy): in a cluster the
/// archive holds what no replica does, and they stand in for it. They are read one entry at a
/// time and only for an entry no voter holds; an entry there that was never committed differs
/// from what the replica applied and fails the verify, so they cannot hide a loss.
struct ReplicasLog {
    shard: ShardId,
    logs: Vec<LogStore>,
    /// The other nodes' logs, read one entry at a time and only where no voter holds it.
    fallback: Vec<LogStore>,
}

impl ReplicasLog {
    fn missing(&self, index: LogIndex) -> StorageError {
        StorageError::MissingEntry {
            shard: self.shard,
            index,
        }
    }
}

impl LogSource for ReplicasLog {
    fn shard(&self) -> ShardId {
        self.shard
    }

    fn read_range(&self, from: LogIndex, to: LogIndex) -> courier_storage::Result<Vec<LogRecord>> {
        if from >= to {
            return Ok(Vec::new());
        }
        // The run from the first replica that holds `from` (up to a hole in its log); the
        // caller asks again from where it ends.
        for log in &self.logs {
            let records = log.read_run(from, to)?;
            if records.first().is_some_and(|r| r.index == from) {
                return Ok(records);
            }
        }
        let next = LogIndex::new(from.get().saturating_add(1));
        for log in &self.fallback {
            let records = log.read_run(from, next)?;
            if records.first().is_some_and(|r| r.index == from) {
                return Ok(records);
            }
        }
        Err(self.missing(from))
    }

    fn require_full(&self) -> courier_storage::Result<()> {
        // A replay reads every entry and names the first that no replica holds.
        Ok(())
    }

    fn bounds(&self) -> courier_storage::Result<Option<(LogIndex, LogIndex)>> {
        let mut bounds: Option<(LogIndex, LogIndex)> = None;
        for log in self.logs.iter().chain(&self.fallback) {
            if let Some((first, last)) = log.bounds()? {
                bounds = Some(bounds.map_or((first, last), |(f, l)| (f.min(first), l.max(last))));
            }
        }
        Ok(bounds)
    }
}

/// After the run: every voter's replica status and a verification of every projection against
/// a rebuild from the log (its own entries, and those it got by a snapshot from the other
/// voters: [`ReplicasLog`]), as history records.
pub(crate) fn replica_records(world: &World, shards: u16) {
    let nodes = world.lock_nodes().clone();
    let voters = voters(world, shards);
    let is_voter = |node: NodeId, shard: u16| voters.get(&shard).is_some_and(|v| v.contains(&node));
    for (node, groups) in &nodes {
        let node32 = u32::try_from(*node).unwrap_or(u32::MAX);
        let db = groups.db().clone();
        for shard in (0..shards).filter(|shard| is_voter(*node, *shard)) {
            let shard_id = ShardId::new(shard);
            let replica = match ShardState::load(db.as_ref(), shard_id) {
                Ok(state) => Replica {
                    node: node32,
                    shard: u32::from(shard),
                    applied_index: state.applied.get(),
                    digests: state
                        .digests
                        .iter()
                        .map(|(p, d)| (format!("{p:?}"), format!("{d:?}")))
                        .collect(),
                },
                Err(error) => {
                    world.record(Record::Verify(Verify {
                        node: node32,
                        shard: u32::from(shard),
                        ok: false,
                        detail: format!("cannot load the shard state: {error}"),
                    }));
                    continue;
                }
            };
            world.record(Record::Replica(replica));
            // Its own log, the other voters', then the other nodes' (see `ReplicasLog`).
            let log = ReplicasLog {
                shard: shard_id,
                fallback: nodes
                    .iter()
                    .filter(|(other, _)| !is_voter(**other, shard))
                    .map(|(_, groups)| LogStore::new(groups.db().clone(), shard_id))
                    .collect(),
                logs: std::iter::once(*node)
                    .chain(
                        nodes
                            .keys()
                            .copied()
                            .filter(|other| other != node && is_voter(*other, shard)),
                    )
                    .filter_map(|id| nodes.get(&id))
                    .map(|groups| LogStore::new(groups.db().clone(), shard_id))
                    .collect(),
            };
            let verify = match rebuild::verify_over(
                &db,
                &log,
                (None, rebuild::ReplayFrom::Genesis),
                &Projection::ALL,
                usize::MAX,
                &mut |_, _| {},
            ) {
                Ok(verified) => {
                    let ok = verified
                        .comparisons
                        .iter()
                        .all(rebuild::Comparison::is_equal);
                    Verify {
                        node: node32,
                        shard: u32::from(shard),
                        ok,
                        detail: if ok {
                            format!("verified at {}", verified.live.applied)
                        } else {
                            format!("{:?}", verified.comparisons)
                        },
                    }
                }
                Err(error) => Verify {
                    node: node32,
                    shard: u32::from(shard),
                    ok: false,
                    detail: error.to_string(),
                },
            };
            world.record(Record::Verify(verify));
        }
    }
}
