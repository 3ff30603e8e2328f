//! courier's deterministic simulation (issue #11, tier 1 of TESTING.md), first slice: the
//! consensus layer and its state machine — openraft groups over courier-storage on RocksDB, raft
//! RPCs over tonic — on three simulated nodes, in one process, on turmoil's network and clock.
//!
//! ```text
//!  seed ─▶ topology (shards, clients, latency, drop rate, election timeouts)
//!       ─▶ turmoil: hosts n1..n3 (RocksDB in a temp dir, Groups, raft service over turmoil TCP)
//!                   host "clients" (bootstrap, 6–12 senders proposing MessageSent with retries)
//!       ─▶ every tick: faults on schedule (partition shapes, crash + restart, link hold/release),
//!                      invariants (applied index never back, an applied index never changes its
//!                      leader id)
//!       ─▶ end of the fault window: heal, liveness (a leader per shard, replicas converge)
//!       ─▶ checks: every replica's projections == a rebuild from its log; the jepsen-tests
//!                  checker on the recorded history (lost, duplicate, order, unexpected, ...)
//! ```
//!
//! One seed decides everything the simulation decides; `courier-sim --seed S` replays it. What
//! is still outside the seed, and so not yet exactly replayable, is listed in
//! docs/SIMULATION.md (tokio's own `select!` randomness without `--cfg tokio_unstable`).

pub mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use courier_consensus::groups::{Groups, RaftTiming};
use courier_consensus::network::{ChannelPool, RaftService};
use courier_consensus::proposer::Proposer;
use courier_consensus::types::EventOutcome;
use courier_consensus::types::Node;
use courier_consensus::{GroupId, NodeId};
use courier_jepsen::history::{
    Complete, Delivered, Fault, History, Invoke, Outcome, Record, Replica, SendOp, SessionStart,
    Verify,
};
use courier_jepsen::{checker, hex};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::peer::raft_server::RaftServer;
use courier_proto::{InboxSeq, LogIndex, ShardId, UserId, shard_of};
use courier_storage::kv::Staged;
use courier_storage::projection::{View, inbox};
use courier_storage::{Db, OpenMode, Projection, ShardState, rebuild};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Simulated nodes: 3 voters and a spare that membership changes swap in.
pub const NODES: u64 = 4;
/// Voters of every shard.
pub const VOTERS: u64 = 3;
/// How long a proposal may take before the client calls its outcome unknown.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts of one send before the client gives up on it (its outcome stays unknown).
const ATTEMPTS_MAX: u32 = 30;
/// After the heal: how long the cluster has to elect leaders and converge.
const LIVENESS_WAIT: Duration = Duration::from_secs(30);

/// What one run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Decides topology, faults, timings and workload.
    pub seed: u64,
    /// Simulated seconds of workload and faults (then heal and liveness).
    pub seconds: u64,
    /// Turn on the consensus layer's deliberate ack-before-commit bug (feature `bugs`).
    pub ack_before_commit: bool,
    /// Where node data directories go (a tmpfs keeps fsyncs cheap); removed at the end.
    pub dir: PathBuf,
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
struct World {
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
}

impl World {
    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Arc<Groups>>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, record: Record) {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    fn proposer(&self, node: NodeId, shard: ShardId) -> Option<Proposer> {
        let groups = self.lock_nodes().get(&node).cloned()?;
        Some(groups.get(GroupId::Shard(shard))?.proposer)
    }
}

fn host(id: NodeId) -> String {
    format!("n{id}")
}

fn node(id: NodeId) -> Node {
    Node::new(format!("{}:{}", host(id), net::RAFT_PORT))
}

/// The first voters of every shard (node 4 is the spare).
fn members() -> BTreeMap<NodeId, Node> {
    (1..=VOTERS).map(|id| (id, node(id))).collect()
}

/// The node that leads `shard` (the highest term among those that say so) and its voters.
fn leader_of(
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
fn elapsed_ms(sim: &turmoil::Sim<'_>) -> u64 {
    u64::try_from(sim.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds of simulated time (0 outside a simulated host).
fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Raft timing of node `id`: election ranges of width 1 ms, staggered per node and drawn from the
/// seed, so openraft's own random draw inside the range cannot differ between runs.
fn timing(id: NodeId, rng: &mut StdRng) -> RaftTiming {
    let min = rng.random_range(150..300) + 40 * id;
    RaftTiming {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(min),
        election_timeout_max: Duration::from_millis(min + 1),
        rpc_timeout: Duration::from_millis(500),
        snapshot_logs_since_last: 1_000_000,
        logs_to_keep: 1_000,
        snapshot_chunk_bytes: 1 << 20,
        append_entries_max: 64,
    }
}

/// One simulated node: its database, groups and raft service, until the host is crashed.
async fn node_main(
    id: NodeId,
    dir: PathBuf,
    timing: RaftTiming,
    shards: u16,
    world: Arc<World>,
) -> turmoil::Result {
    let db = Arc::new(Db::open(&dir, OpenMode::ReadWrite)?);
    let pool = Arc::new(ChannelPool::with_connector(
        timing.rpc_timeout,
        net::connector(),
    ));
    let groups = Groups::open_with(id, db, &timing, pool).await?;
    for shard in 0..shards {
        groups
            .get_or_create(GroupId::Shard(ShardId::new(shard)))
            .await?;
    }
    world.lock_nodes().insert(id, groups.clone());
    tonic::transport::Server::builder()
        .add_service(RaftServer::new(RaftService::new(groups)))
        .serve_with_incoming(net::incoming().await?)
        .await?;
    Ok(())
}

/// Initializes every shard on one node (shard `s` on node `s mod 3 + 1`), retrying until it
/// took or the group already was.
async fn bootstrap(world: &World, shards: u16) {
    for shard in 0..shards {
        let node = u64::from(shard) % VOTERS + 1;
        loop {
            let groups = world.lock_nodes().get(&node).cloned();
            if let Some(handle) = groups.and_then(|g| g.get(GroupId::Shard(ShardId::new(shard)))) {
                let _ = handle.raft.initialize(members()).await;
                if handle.raft.is_initialized().await.unwrap_or(false) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A sending client: user `from` sends to `to` (both on `shard`) until the heal; each send
/// retries with the same client id after an unknown outcome.
async fn client(world: Arc<World>, process: u32, from: u64, to: u64, shard: ShardId, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut leader: Option<NodeId> = None;
    let mut counter = 0_u64;
    while !world.healed.load(Ordering::SeqCst) {
        counter += 1;
        let client_id = format!("{process}-{counter}");
        for attempt in 0..ATTEMPTS_MAX {
            let op_id = world.next_op.fetch_add(1, Ordering::SeqCst);
            let mut message_id = [0_u8; 16];
            message_id[..4].copy_from_slice(&process.to_be_bytes());
            message_id[4..12].copy_from_slice(&counter.to_be_bytes());
            message_id[12..].copy_from_slice(&attempt.to_be_bytes());
            world.record(Record::Invoke(Invoke {
                process,
                op_id,
                time_ms: now_ms(),
                op: SendOp {
                    from_user: from,
                    to_user: to,
                    client_id: client_id.clone(),
                },
            }));
            let node = leader.unwrap_or_else(|| rng.random_range(1..=NODES));
            let event = Event {
                kind: Some(Kind::MessageSent(events::MessageSent {
                    message_id: message_id.to_vec(),
                    sender_user: from,
                    sender_device: 1,
                    client_msg_id: client_id.clone(),
                    to: Some(events::Conversation {
                        with: Some(events::conversation::With::User(to)),
                    }),
                    content: Some(events::Content {
                        body: client_id.clone().into_bytes(),
                        media: None,
                    }),
                    sent_at_ms: now_ms(),
                    recipient_shard: u32::from(shard.get()),
                    group_epoch: 0,
                    trace_parent: String::new(),
                })),
            };
            let outcome = match world.proposer(node, shard) {
                None => Err(format!("node {node} is down")),
                Some(proposer) => {
                    match tokio::time::timeout(PROPOSE_TIMEOUT, proposer.propose(vec![event])).await
                    {
                        Err(_) => Err("timed out".to_owned()),
                        Ok(Err(courier_consensus::proposer::ProposeError::NotLeader {
                            leader: hint,
                        })) => {
                            leader = hint;
                            Err(format!("node {node} is not the leader"))
                        }
                        Ok(Err(error)) => Err(error.to_string()),
                        Ok(Ok(outcomes)) => Ok(match outcomes.first() {
                            Some(EventOutcome::Sent { message_id, .. }) => message_id.clone(),
                            _ => message_id.to_vec(),
                        }),
                    }
                }
            };
            let time_ms = now_ms();
            match outcome {
                Ok(id) => {
                    leader = Some(node);
                    world.record(Record::Complete(Complete {
                        process,
                        op_id,
                        time_ms,
                        outcome: Outcome::Ok {
                            message_id: hex(&id),
                        },
                    }));
                    break;
                }
                Err(error) => {
                    if !error.contains("not the leader") {
                        leader = None;
                    }
                    // Unknown: it may have committed; the retry reuses the client id.
                    world.record(Record::Complete(Complete {
                        process,
                        op_id,
                        time_ms,
                        outcome: Outcome::Info { error },
                    }));
                    tokio::time::sleep(Duration::from_millis(rng.random_range(10..100))).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..50))).await;
    }
}

/// A user id on `shard`, found by walking ids from `start`.
fn user_on(shard: ShardId, shards: u16, start: u64) -> u64 {
    (start..)
        .find(|id| UserId::new(*id).is_some_and(|u| shard_of(u, shards) == shard))
        .unwrap_or(start)
}

/// Membership changes until the heal: every 1.5–4 s one shard's leader adds the node that is not
/// a voter of that shard as a learner (caught up), then replaces a random voter with it. A
/// change that fails (a fault got in the way) is recorded and tried again later.
async fn membership_changes(world: Arc<World>, shards: u16, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x00AB_CDEF);
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..4_000))).await;
        if world.healed.load(Ordering::SeqCst) {
            return;
        }
        let shard = rng.random_range(0..shards);
        let Some((_, raft, voters)) = leader_of(&world, shard) else {
            continue;
        };
        let Some(joining) = (1..=NODES).find(|n| !voters.contains(n)) else {
            continue;
        };
        let voter_list: Vec<NodeId> = voters.iter().copied().collect();
        let leaving = voter_list[rng.random_range(0..voter_list.len())];
        let mut next = voters.clone();
        next.remove(&leaving);
        next.insert(joining);
        let change = async {
            raft.add_learner(joining, node(joining), true)
                .await
                .map_err(|e| e.to_string())?;
            raft.change_membership(next.clone(), false)
                .await
                .map_err(|e| e.to_string())
        };
        let description = match tokio::time::timeout(Duration::from_secs(5), change).await {
            Ok(Ok(_)) => {
                world.membership_changes.fetch_add(1, Ordering::SeqCst);
                format!("shard {shard}: voters {voters:?} -> {next:?}")
            }
            Ok(Err(error)) => format!("shard {shard}: membership change failed: {error}"),
            Err(_) => format!("shard {shard}: membership change timed out"),
        };
        world.record(Record::Fault(Fault {
            time_ms: now_ms(),
            description,
        }));
    }
}

/// The clients' host: bootstrap, senders until the heal, then wait for leaders and convergence.
async fn clients_main(world: Arc<World>, shards: u16, clients: u32, seed: u64) -> turmoil::Result {
    bootstrap(&world, shards).await;
    let mut tasks = Vec::new();
    for process in 0..clients {
        let shard = ShardId::new(u16::try_from(process % u32::from(shards)).unwrap_or(0));
        let from = user_on(shard, shards, 1_000 + 100 * u64::from(process));
        let to = user_on(shard, shards, 50_000 + 100 * u64::from(process));
        let seed = seed
            .wrapping_add(u64::from(process))
            .wrapping_mul(0x9E37_79B9);
        tasks.push(tokio::spawn(client(
            world.clone(),
            process,
            from,
            to,
            shard,
            seed,
        )));
    }
    tasks.push(tokio::spawn(membership_changes(
        world.clone(),
        shards,
        seed,
    )));
    for task in tasks {
        task.await?;
    }
    let deadline = tokio::time::Instant::now() + LIVENESS_WAIT;
    // Every shard back to voters n1..n3, so every replica the final checks compare holds every
    // shard (the checker expects each node that reports one shard to report all of them).
    let standard: BTreeSet<NodeId> = members().into_keys().collect();
    for shard in 0..shards {
        while tokio::time::Instant::now() < deadline {
            if let Some((_, raft, voters)) = leader_of(&world, shard) {
                if voters == standard {
                    break;
                }
                let change = async {
                    for id in standard.difference(&voters) {
                        raft.add_learner(*id, node(*id), true).await.map_err(drop)?;
                    }
                    raft.change_membership(standard.clone(), false)
                        .await
                        .map_err(drop)
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), change).await {
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    while tokio::time::Instant::now() < deadline {
        if converged(&world, shards) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.settled.store(true, Ordering::SeqCst);
    Ok(())
}

/// Every shard has a leader that all its voters agree on, and every voter applied the same index.
fn converged(world: &World, shards: u16) -> bool {
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

/// Invariants checked after every step.
///
/// No "one leader per term" check: openraft 0.9 runs in its default ("advanced") mode, where a
/// leader id is (term, node id), ordered lexicographically, so a node may win a term another node
/// already leads and supersede it (the first seeds run flagged exactly that, by design). What must
/// hold is checked instead: an index, once applied anywhere, is applied everywhere with the same
/// leader id (committed entries never change, log matching on what was applied).
#[derive(Default)]
struct Invariants {
    /// (node, shard) → highest applied index seen.
    applied: BTreeMap<(NodeId, u16), u64>,
    /// (shard, index) → the leader id (term, node) of the entry applied there.
    committed: BTreeMap<(u16, u64), (u64, NodeId)>,
    violations: Vec<String>,
}

impl Invariants {
    fn check(&mut self, world: &World, shards: u16, tick: u64) {
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
                        "tick {tick}: node {node} shard {shard} applied index went back from {high} to {}",
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

    fn violate(&mut self, text: String) {
        if self.violations.len() < 20 {
            self.violations.push(text);
        }
    }
}

/// The nemesis: one fault at a time, drawn from the seed.
struct Nemesis {
    rng: StdRng,
    next_at: u64,
    heal_at: Option<u64>,
    crashed: Vec<NodeId>,
    partitioned: bool,
    held: bool,
    faults: BTreeMap<&'static str, usize>,
    /// Simulated milliseconds of the current step (fault records carry it).
    now: u64,
}

impl Nemesis {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed ^ 0x5EED_FA17),
            next_at: 1_000,
            heal_at: None,
            crashed: Vec::new(),
            partitioned: false,
            held: false,
            faults: BTreeMap::new(),
            now: 0,
        }
    }

    fn note(&mut self, world: &World, kind: &'static str, description: String) {
        *self.faults.entry(kind).or_default() += 1;
        world.record(Record::Fault(Fault {
            time_ms: self.now,
            description,
        }));
    }

    fn step(&mut self, sim: &mut turmoil::Sim<'_>, world: &World, now: u64) {
        self.now = now;
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
        let a = self.rng.random_range(1..=NODES);
        let b = a % NODES + 1;
        match self.rng.random_range(0..5) {
            0 => {
                for other in (1..=NODES).filter(|n| *n != a) {
                    sim.partition(host(a), host(other));
                    sim.partition(host(a), "clients");
                }
                self.partitioned = true;
                self.note(world, "partition", format!("isolate n{a}"));
            }
            1 => {
                // A bridge: a and b cannot talk; the third node talks to both.
                sim.partition(host(a), host(b));
                self.partitioned = true;
                self.note(world, "partition", format!("bridge: n{a} and n{b} cut"));
            }
            2 => {
                world.lock_nodes().remove(&a);
                sim.crash(host(a));
                self.crashed.push(a);
                self.note(world, "crash", format!("crash n{a}"));
            }
            3 => {
                // Messages between a and b are held (delayed), then released at once (reorder).
                sim.hold(host(a), host(b));
                self.held = true;
                self.note(world, "hold", format!("hold n{a} <-> n{b}"));
            }
            _ => {
                world.lock_nodes().remove(&a);
                world.lock_nodes().remove(&b);
                sim.crash(host(a));
                sim.crash(host(b));
                self.crashed.extend([a, b]);
                self.note(world, "crash", format!("crash a majority: n{a}, n{b}"));
            }
        }
    }

    fn heal(&mut self, sim: &mut turmoil::Sim<'_>, world: &World) {
        self.now = elapsed_ms(sim);
        self.heal_at = None;
        if self.partitioned {
            for a in 1..=NODES {
                for b in (1..=NODES).filter(|b| *b != a) {
                    sim.repair(host(a), host(b));
                }
                sim.repair(host(a), "clients");
            }
            self.partitioned = false;
        }
        if self.held {
            for a in 1..=NODES {
                for b in (1..=NODES).filter(|b| *b != a) {
                    sim.release(host(a), host(b));
                }
            }
            self.held = false;
        }
        for node in std::mem::take(&mut self.crashed) {
            sim.bounce(host(node));
            self.note(world, "restart", format!("restart n{node}"));
        }
    }
}

/// Runs one seed.
///
/// # Errors
/// The simulation itself failed (a host returned an error, the time limit passed) — reported as
/// a violation where it can be, otherwise as the error.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    #[cfg(feature = "bugs")]
    courier_consensus::bugs::set_ack_before_commit(options.ack_before_commit);
    #[cfg(not(feature = "bugs"))]
    anyhow::ensure!(
        !options.ack_before_commit,
        "the ack-before-commit bug needs the `bugs` feature"
    );
    let seed = options.seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let shards: u16 = rng.random_range(2..=3);
    let clients: u32 = rng.random_range(6..=12);
    let latency_max = Duration::from_millis(rng.random_range(2..=25));
    std::fs::create_dir_all(&options.dir)?;
    let root = tempfile::Builder::new()
        .prefix(&format!("courier-sim-{seed}-"))
        .tempdir_in(&options.dir)?;
    let world = Arc::new(World::default());
    let fault_window_ms = options.seconds * 1_000;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_millis(fault_window_ms) + LIVENESS_WAIT * 3)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(latency_max)
        // No random loss: turmoil's TCP does not retransmit, so a lost segment would corrupt a
        // stream rather than delay it. Loss comes from partitions (whole links, then repaired).
        .fail_rate(0.0)
        .tcp_capacity(1 << 16)
        .build();
    for id in 1..=NODES {
        let dir = root.path().join(host(id));
        let timing = timing(id, &mut rng);
        let world = world.clone();
        sim.host(host(id), move || {
            node_main(id, dir.clone(), timing.clone(), shards, world.clone())
        });
    }
    {
        let world = world.clone();
        sim.client("clients", clients_main(world, shards, clients, seed));
    }
    let mut invariants = Invariants::default();
    let mut nemesis = Nemesis::new(seed);
    let mut ticks = 0_u64;
    let mut run_error = None;
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                run_error = Some(format!("simulation error: {error}"));
                break;
            }
        }
        ticks += 1;
        let now = elapsed_ms(&sim);
        if now < fault_window_ms {
            nemesis.step(&mut sim, &world, now);
        } else if !world.healed.load(Ordering::SeqCst) {
            nemesis.heal(&mut sim, &world);
            world.healed.store(true, Ordering::SeqCst);
        }
        invariants.check(&world, shards, ticks);
    }
    let mut violations = std::mem::take(&mut invariants.violations);
    violations.extend(run_error);
    if !world.settled.load(Ordering::SeqCst) || !converged(&world, shards) {
        violations.push(format!(
            "liveness: no agreed leader and equal applied index on every shard {LIVENESS_WAIT:?} after the heal"
        ));
    }
    if std::env::var_os("COURIER_SIM_DEBUG").is_some() {
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
            }
        }
    }
    final_records(&world, shards);
    let history: History =
        std::mem::take(&mut *world.history.lock().unwrap_or_else(PoisonError::into_inner)).into();
    let report = checker::check(&history);
    let fingerprint = fingerprint(&history);
    // Drop the nodes (their databases) before the directory goes.
    world.lock_nodes().clear();
    drop(sim);
    Ok(Report {
        seed,
        shards,
        clients,
        ticks,
        faults: {
            let mut faults = nemesis.faults;
            let changes = world.membership_changes.load(Ordering::SeqCst);
            if changes > 0 {
                faults.insert("membership", usize::try_from(changes).unwrap_or(usize::MAX));
            }
            faults
        },
        violations,
        checker: report,
        fingerprint,
    })
}

/// xxh3-64 over the history's JSON lines.
fn fingerprint(history: &History) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for record in &history.records {
        if let Ok(line) = serde_json::to_vec(record) {
            hasher.update(&line);
        }
    }
    hasher.digest()
}

/// After the run: every voter's replica status, a verification of every projection against a
/// rebuild from the log, and a drain of every user's inbox from every voter of the user's shard,
/// as history records. (Without an agreed leader every node counts; liveness already failed.)
fn final_records(world: &World, shards: u16) {
    let nodes = world.lock_nodes().clone();
    let voters: BTreeMap<u16, BTreeSet<NodeId>> = (0..shards)
        .map(|shard| {
            let voters =
                leader_of(world, shard).map_or_else(|| (1..=NODES).collect(), |(_, _, v)| v);
            (shard, voters)
        })
        .collect();
    let is_voter = |node: NodeId, shard: u16| voters.get(&shard).is_some_and(|v| v.contains(&node));
    let mut session = 0_u64;
    let users: Vec<(u64, ShardId)> = {
        let history = world.history.lock().unwrap_or_else(PoisonError::into_inner);
        let mut users = BTreeMap::new();
        for record in history.iter() {
            if let Record::Invoke(invoke) = record {
                users.insert(invoke.op.to_user, ());
            }
        }
        users
            .into_keys()
            .filter_map(|u| Some((u, shard_of(UserId::new(u)?, shards))))
            .collect()
    };
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
            let verify = match rebuild::verify(&db, shard_id, &Projection::ALL, &mut |_, _| {}) {
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
        for (user, shard) in users.iter().filter(|(_, s)| is_voter(*node, s.get())) {
            session += 1;
            world.record(Record::SessionStart(SessionStart {
                session,
                user: *user,
                device: 1,
                node: node32,
                resume_after_seq: 0,
                time_ms: 0,
                drain: true,
            }));
            for (seq, entry) in drain(&db, *shard, *user) {
                world.record(Record::Delivered(Delivered {
                    session,
                    seq,
                    message_id: hex(&entry.message_id),
                    from_user: entry.sender_user,
                    client_id: entry
                        .content
                        .map(|c| String::from_utf8_lossy(&c.body).into_owned())
                        .unwrap_or_default(),
                    time_ms: 0,
                }));
            }
        }
    }
}

/// Every inbox entry of `user` on this replica, in seq order.
fn drain(
    db: &Arc<Db>,
    shard: ShardId,
    user: u64,
) -> Vec<(u64, courier_proto::pb::store::InboxEntry)> {
    let Some(user) = UserId::new(user) else {
        return Vec::new();
    };
    let mut staged = Staged::new(db.as_ref(), BTreeMap::new());
    let view = View::new(&mut staged, shard, LogIndex::ZERO, Projection::Inbox);
    let Ok(tail) = inbox::tail(&view, user) else {
        return Vec::new();
    };
    inbox::entries_between(&view, user, InboxSeq::ZERO, tail)
        .unwrap_or_default()
        .into_iter()
        .map(|(seq, entry)| (seq.get(), entry))
        .collect()
}

/// Runs seeds `first..first + count` and returns their reports, calling `each` after every seed;
/// with `stop_at_failure`, stops after the first seed that fails.
///
/// # Errors
/// A seed's simulation could not run at all.
pub fn run_many(
    template: &Options,
    first: u64,
    count: u64,
    stop_at_failure: bool,
    each: &mut dyn FnMut(&Report),
) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::new();
    for seed in first..first.saturating_add(count) {
        let options = Options {
            seed,
            ..template.clone()
        };
        let report = run(&options).with_context(|| format!("seed {seed}"))?;
        each(&report);
        let failed = !report.passed();
        reports.push(report);
        if stop_at_failure && failed {
            break;
        }
    }
    Ok(reports)
}
