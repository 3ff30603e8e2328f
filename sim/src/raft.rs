//! The raft layer under simulation: on every node the consensus layer and its state machine
//! (openraft groups over courier-storage on the node's `MemDisk`, the raft service on turmoil
//! TCP); on the client host, senders that propose `MessageSent` events to the groups directly
//! and a membership changer that swaps the spare node in and out, the node it swapped out
//! dropping its replica as the end of a shard move does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use courier_consensus::groups::{Groups, RaftTiming};
use courier_consensus::network::{ChannelPool, RaftService};
use courier_consensus::types::EventOutcome;
use courier_consensus::{GroupId, NodeId};
use courier_jepsen::history::{
    Complete, Delivered, Fault, History, Invoke, Outcome, Record, SendOp, SessionStart,
};
use courier_jepsen::{checker, hex};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::peer::raft_server::RaftServer;
use courier_proto::{InboxSeq, LogIndex, ShardId, UserId, shard_of};
use courier_storage::kv::Staged;
use courier_storage::projection::{View, inbox};
use courier_storage::{Db, Projection};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::{
    LIVENESS_WAIT, NODES, Options, Report, VOTERS, World, converged, host, leader_of, members, net,
    node, now_ms, timing,
};

/// How long a proposal may take before the client calls its outcome unknown.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts of one send before the client gives up on it (its outcome stays unknown).
const ATTEMPTS_MAX: u32 = 30;

/// One simulated node: its database, groups and raft service, until the host is crashed.
async fn node_main(
    id: NodeId,
    timing: RaftTiming,
    shards: u16,
    world: Arc<World>,
) -> turmoil::Result {
    let disk = world
        .disks
        .get(&id)
        .cloned()
        .ok_or_else(|| format!("no disk for node {id}"))?;
    let db = Arc::new(Db::on_memdisk(
        disk,
        Path::new(&format!("memdisk/{}", host(id))),
    ));
    let pool = Arc::new(ChannelPool::with_connector(
        timing.rpc_timeout,
        net::connector(),
    ));
    let groups = Groups::open_with(id, db, &timing, pool).await?;
    for shard in 0..shards {
        match groups
            .get_or_create(GroupId::Shard(ShardId::new(shard)))
            .await
        {
            // A replica this node dropped starts again only when a leader adds it back.
            Ok(_) | Err(courier_consensus::groups::ConsensusError::Dropped { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    world.lock_nodes().insert(id, groups.clone());
    tonic::transport::Server::builder()
        .add_service(RaftServer::new(RaftService::new(groups)))
        .serve_with_incoming(net::listen(net::PEER_PORT).await?)
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
        let body = courier_jepsen::workload::body::body(&client_id, &mut rng);
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
                        body: body.clone(),
                        media: None,
                    }),
                    sent_at_ms: now_ms(),
                    recipient_shard: u32::from(shard.get()),
                    group_epoch: 0,
                    trace_parent: String::new(),
                    own_copies: false,
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
            readmit(&world, joining, shard, &raft).await?;
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
                let dropped = drop_replica(&world, leaving, ShardId::new(shard)).await;
                format!("shard {shard}: voters {voters:?} -> {next:?}{dropped}")
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

/// What a move to `node` does first: readmit the replica it may have dropped earlier, for a
/// leader of `leader`'s term or later (a dropped replica answers no raft message until then).
/// A node that is down cannot be added.
async fn readmit(
    world: &World,
    node: NodeId,
    shard: u16,
    leader: &courier_consensus::Raft,
) -> Result<(), String> {
    let term = leader.metrics().borrow().current_term;
    let groups = world
        .lock_nodes()
        .get(&node)
        .cloned()
        .ok_or_else(|| format!("n{node} is down"))?;
    groups
        .readmit(ShardId::new(shard), term)
        .await
        .map_err(|error| error.to_string())
}

/// What a shard move does last (`Admin.MoveShard`): the node a replica left, when it runs,
/// stops its group of the shard and deletes the shard's keys (`Groups::drop_shard`). The final
/// phase may add the node back, so a dropped replica is refilled from the leader under the same
/// faults. Keys left behind after a drop that reported success are a violation; a drop that
/// failed (an fsync fault) stopped that replica, as it must.
async fn drop_replica(world: &World, node: NodeId, shard: ShardId) -> String {
    let (groups, others) = {
        let nodes = world.lock_nodes();
        let standard = members();
        let others: Vec<Arc<Groups>> = nodes
            .iter()
            .filter(|(id, _)| **id != node && standard.contains_key(id))
            .map(|(_, groups)| groups.clone())
            .collect();
        (nodes.get(&node).cloned(), others)
    };
    let Some(groups) = groups else {
        return format!("; n{node} is down and keeps its copy");
    };
    // The log from genesis must outlive the drop (the final checks verify every replica from
    // it): a node keeps its copy unless the other running nodes among the final voters (n1..n3)
    // hold, between them, every entry it holds. The raft layer has no archive; in a cluster the
    // archive is that other copy.
    let held = |groups: &Groups| -> BTreeSet<u64> {
        let (from, to) = courier_storage::keys::shard_range(shard);
        courier_storage::ReadKv::scan(
            groups.db().as_ref(),
            courier_storage::Cf::Log,
            &from,
            &to,
            usize::MAX,
        )
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|(key, _)| courier_storage::keys::log_entry_index(key))
                .map(LogIndex::get)
                .collect()
        })
        .unwrap_or_default()
    };
    let mine = held(&groups);
    let elsewhere: BTreeSet<u64> = others.iter().flat_map(|other| held(other)).collect();
    if !mine.is_subset(&elsewhere) {
        return format!(
            "; n{node} keeps its copy (it holds entries no other running node among n1..n3 does)"
        );
    }
    match groups.drop_shard(shard).await {
        Ok(0) => {
            world.replicas_dropped.fetch_add(1, Ordering::SeqCst);
            world.note_dropped(node, shard.get());
            format!("; n{node}'s replica dropped")
        }
        Ok(left) => {
            world.host_violation(format!(
                "n{node} dropped its replica of {shard}, but {left} column families still hold its keys"
            ));
            format!("; n{node}'s replica dropped, {left} column families left")
        }
        Err(error) => format!("; n{node}'s drop failed: {error}"),
    }
}

/// The clients' host: bootstrap, senders until the heal, then wait for leaders and convergence.
async fn clients_main(world: Arc<World>, shards: u16, clients: u32, seed: u64) -> turmoil::Result {
    bootstrap(&world, shards).await;
    world.ready.store(true, Ordering::SeqCst);
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
                        readmit(&world, *id, shard, &raft).await.map_err(drop)?;
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

/// Runs one seed of the raft layer.
pub(crate) fn run(options: &Options) -> anyhow::Result<Report> {
    let seed = options.seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let shards: u16 = rng.random_range(2..=3);
    let clients: u32 = rng.random_range(6..=12);
    let latency_max = Duration::from_millis(rng.random_range(2..=25));
    let install_latency = Duration::from_millis(rng.random_range(crate::INSTALL_LATENCY_MS));
    let world = Arc::new(World::with_disks(NODES, install_latency));
    let window_ms = options.seconds * 1_000;
    let mut sim = crate::simulation(
        seed,
        latency_max,
        Duration::from_millis(window_ms) + LIVENESS_WAIT * 3,
    );
    for id in 1..=NODES {
        let timing = timing(id, &mut rng);
        let world = world.clone();
        sim.host(host(id), move || {
            node_main(id, timing.clone(), shards, world.clone())
        });
    }
    {
        let world = world.clone();
        sim.client("clients", clients_main(world, shards, clients, seed));
    }
    let driven = crate::drive(&mut sim, &world, shards, window_ms, seed);
    let mut violations = driven.violations;
    if !world.settled.load(Ordering::SeqCst) || !converged(&world, shards) {
        violations.push(format!(
            "liveness: no agreed leader and equal applied index on every shard {LIVENESS_WAIT:?} after the heal"
        ));
    }
    crate::debug_dump(&world, shards);
    crate::replica_records(&world, shards);
    violations.extend(drain_inboxes(&world, shards));
    let history: History =
        std::mem::take(&mut *world.history.lock().unwrap_or_else(PoisonError::into_inner)).into();
    let report = checker::check(&history);
    let fingerprint = crate::fingerprint(&history);
    // Drop the nodes (their disks) before the simulation.
    world.lock_nodes().clear();
    drop(sim);
    let mut faults = driven.faults;
    let changes = world.membership_changes.load(Ordering::SeqCst);
    if changes > 0 {
        faults.insert("membership", usize::try_from(changes).unwrap_or(usize::MAX));
    }
    let dropped = world.replicas_dropped.load(Ordering::SeqCst);
    if dropped > 0 {
        faults.insert(
            "replica drop",
            usize::try_from(dropped).unwrap_or(usize::MAX),
        );
    }
    Ok(Report {
        seed,
        shards,
        clients,
        ticks: driven.ticks,
        faults,
        violations,
        checker: report,
        fingerprint,
    })
}

/// After the run: every user's inbox drained from every voter of the user's shard, as history
/// records. Returns the violations it saw itself: an inbox whose sequence numbers are not 1, 2,
/// 3, ….
fn drain_inboxes(world: &World, shards: u16) -> Vec<String> {
    let mut violations = Vec::new();
    let nodes = world.lock_nodes().clone();
    let voters = crate::voters(world, shards);
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
            let entries = drain(&db, *shard, *user);
            if let Some(gap) = entries
                .iter()
                .zip(1_u64..)
                .find(|((seq, _), expected)| seq != expected)
            {
                violations.push(format!(
                    "n{node}: inbox of user {user} is not dense: seq {} where {} was due",
                    (gap.0).0,
                    gap.1
                ));
            }
            for (seq, entry) in entries {
                world.record(Record::Delivered(Delivered {
                    session,
                    seq,
                    message_id: hex(&entry.message_id),
                    from_user: entry.sender_user,
                    client_id: entry
                        .content
                        .map(|c| courier_jepsen::workload::body::client_id_of(&c.body))
                        .unwrap_or_default(),
                    time_ms: 0,
                }));
            }
        }
    }
    violations
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
