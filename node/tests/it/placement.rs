//! Placement: a cluster of four nodes with three replicas per shard. Each shard's group holds
//! exactly its placed nodes; clients on any node register, send and stream (reads and writes of
//! shards a node does not hold go to their replicas); a send still succeeds with one node
//! stopped; moves, drains and the automatic replica rebalancer; a node leaves only once it holds
//! no replica.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use courier_consensus::placement::Placement;
use courier_proto::ShardId;
use courier_proto::pb::client::SendRequest;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::peer::admin_client::AdminClient;

use crate::cluster::{PHONE_KEY, SHARDS, fast_config, init_request, status, try_status};
use crate::messaging::{
    Device, authed, body, code_is, collect, open_stream, phones_on_different_shards, register,
};
use crate::remote::message_ids;
use crate::support::{channel, peer_channel, scrape};

const NODES: u64 = 4;
const REPLICAS: u32 = 3;

/// Per shard, the nodes whose status shows themselves among the shard's voters, with the leader
/// and the applied index and digest each reports.
async fn replicas_seen(peers: &[String]) -> BTreeMap<u32, BTreeMap<u64, (u64, u64, String)>> {
    let mut seen: BTreeMap<u32, BTreeMap<u64, (u64, u64, String)>> = BTreeMap::new();
    for (peer, id) in peers.iter().zip(1_u64..) {
        // A stopped node does not answer: it holds nothing now.
        let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), try_status(peer)).await
        else {
            continue;
        };
        for shard in response.shards {
            if shard.replicas.contains(&id) {
                seen.entry(shard.shard)
                    .or_default()
                    .insert(id, (shard.leader, shard.applied, shard.digest.clone()));
            }
        }
    }
    seen
}

/// Waits until every shard's placed replicas (among `up`) agree on a leader and on their applied
/// index and digest.
async fn wait_placed_converged(peers: &[String], placement: &Placement, up: &BTreeSet<u64>) {
    let started = Instant::now();
    loop {
        let seen = replicas_seen(peers).await;
        let agreed = (0..SHARDS).all(|shard| {
            let placed: BTreeSet<u64> = placement
                .replicas(ShardId::new(u16::try_from(shard).expect("small")))
                .iter()
                .copied()
                .filter(|id| up.contains(id))
                .collect();
            let Some(reports) = seen.get(&shard) else {
                return false;
            };
            let first = reports.values().next();
            reports.keys().copied().collect::<BTreeSet<_>>() == placed
                && first.is_some_and(|(leader, ..)| *leader != 0)
                && reports.values().all(|report| Some(report) == first)
        });
        if agreed {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the placed replicas did not agree: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `id` from `from` to `to` through the node at `addr`, retrying `UNAVAILABLE` with the same
/// client message id as a client does (a move or a stopped node makes a leader step down; the
/// retry answers the first attempt's message if it landed).
async fn send(addr: &str, from: &Device, to: &Device, id: &str) -> Vec<u8> {
    let started = Instant::now();
    loop {
        let attempt = MessagingClient::new(channel(addr).await)
            .send(authed(
                from,
                SendRequest {
                    client_msg_id: id.to_owned(),
                    to_user: to.user,
                    content: body(id),
                },
            ))
            .await;
        match attempt {
            Ok(response) => return response.into_inner().message_id,
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && started.elapsed() < Duration::from_secs(20) =>
            {
                tracing::info!(%status, "send {id} unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("send {id}: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_hold_three_replicas_of_each_shard_and_serve_clients_on_any_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=NODES {
        let dir = root.path().join(format!("n{id}"));
        let text = fast_config(id, &dir);
        let config = courier_node::Config::parse(&text).expect("config");
        nodes.push(Some(courier_node::start(config).await.expect("start")));
        dirs.push(dir);
    }
    let peers: Vec<String> = nodes
        .iter()
        .flatten()
        .map(|n| n.peer_addr.to_string())
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .flatten()
        .map(|n| n.client_addr.to_string())
        .collect();
    let mut request = init_request(&peers, PHONE_KEY.to_vec());
    request.replication_factor = REPLICAS;
    AdminClient::new(peer_channel(&peers[0]).await)
        .init_cluster(request.clone())
        .await
        .expect("init with three replicas per shard");
    AdminClient::new(peer_channel(&peers[0]).await)
        .init_cluster(request)
        .await
        .expect("init again: nothing changes");

    let all: BTreeSet<u64> = (1..=NODES).collect();
    let placement = Placement::spread(&all, u16::try_from(SHARDS).expect("small"), 3);
    wait_placed_converged(&peers, &placement, &all).await;
    let seen = replicas_seen(&peers).await;
    for node in 1..=NODES {
        let held = seen
            .values()
            .filter(|reports| reports.contains_key(&node))
            .count();
        assert_eq!(
            held, 3,
            "node {node} holds three of the four shards: {seen:?}"
        );
    }

    let reported = status(&peers[1]).await;
    assert_eq!(reported.replication_factor, REPLICAS, "status names R");
    let table: Vec<(u32, Vec<u64>)> = reported
        .placement
        .iter()
        .map(|shard| (shard.shard, shard.replicas.clone()))
        .collect();
    let expected: Vec<(u32, Vec<u64>)> = (0..SHARDS)
        .map(|shard| {
            let id = ShardId::new(u16::try_from(shard).expect("small"));
            (shard, placement.replicas(id).to_vec())
        })
        .collect();
    assert_eq!(table, expected, "status shows the placement table");
    for node in nodes.iter().flatten() {
        let metrics = scrape(node.metrics_addr.expect("metrics listener")).await;
        assert!(
            metrics.contains("courier_node_shard_replicas{} 3"),
            "every node is a voter of three shards: {metrics}"
        );
    }

    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addrs[3], &dirs[3], &alice_phone).await;
    let bob = register(&addrs[0], &dirs[0], &bob_phone).await;
    // Visible on every replica once converged (a follower may answer a read before applying).
    wait_placed_converged(&peers, &placement, &all).await;
    let mut sent = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        sent.push(send(addr, &alice, &bob, &format!("through-{i}")).await);
    }
    let mut stream = open_stream(&addrs[2], &bob, 0).await;
    let ids = message_ids;
    receive_exactly(
        &mut stream,
        &sent,
        "Bob gets every send through every node, in order, once",
    )
    .await;

    let placement = {
        tracing::info!("a replica of node 1 moves to the node without one, under client traffic");
        let (shard, to) = a_move_off_node_1(&placement, &all);
        let moved = placement.moved(shard, 1, to).expect("a possible move");
        let args: Vec<String> = [
            "shard",
            "move",
            "--addr",
            &peers[1],
            "--shard",
            &shard.get().to_string(),
            "--from",
            "1",
            "--to",
            &to.to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        let run = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                crate::support::ops(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
        };
        let moving = run(args.clone());
        // Node 1 runs the move: its status names the move and its step while it runs.
        let mut seen = Vec::new();
        while seen.is_empty() && !moving.is_finished() {
            seen = status(&peers[0]).await.moves;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let during = send(&addrs[1], &alice, &bob, "during-move").await;
        let (code, stdout, stderr) = moving.await.expect("ops ran");
        assert_eq!(code, 0, "the move succeeds: {stdout}{stderr}");
        assert!(stdout.contains("verified empty"), "{stdout}");
        assert!(
            seen.iter().any(|m| (m.shard, m.from_node, m.to_node)
                == (u32::from(shard.get()), 1, to)
                && !m.step.is_empty()),
            "node 1's status showed the move while it ran: {seen:?}"
        );
        let ended = status(&peers[0]).await;
        assert!(ended.moves.is_empty(), "no move runs after it ended");
        let counters = ended.counters.expect("counters");
        assert_eq!(
            (counters.moves_done, counters.moves_failed),
            (1, 0),
            "one move, done"
        );
        let after = send(&addrs[0], &alice, &bob, "after-move").await;
        let got = collect(&mut stream, Duration::from_secs(20), |frames| {
            ids(frames).len() >= 2
        })
        .await;
        assert_eq!(
            ids(&got),
            vec![during, after],
            "sends during and after the move arrive once"
        );
        let table: Vec<Vec<u64>> = status(&peers[2])
            .await
            .placement
            .into_iter()
            .map(|shard| shard.replicas)
            .collect();
        let expected: Vec<Vec<u64>> = (0..SHARDS)
            .map(|s| {
                moved
                    .replicas(ShardId::new(u16::try_from(s).expect("small")))
                    .to_vec()
            })
            .collect();
        assert_eq!(table, expected, "the placement table records the move");
        wait_placed_converged(&peers, &moved, &all).await;
        assert!(
            status(&peers[0])
                .await
                .shards
                .iter()
                .all(|s| s.shard != u32::from(shard.get())),
            "node 1 runs no group of the shard it moved away"
        );
        let (code, stdout, stderr) = run(args).await.expect("ops ran");
        assert_eq!(code, 0, "a repeated move succeeds: {stdout}{stderr}");
        assert!(stdout.contains("was already moved"), "{stdout}");

        tracing::info!("the replica moves back to node 1, which dropped its copy");
        let back = moved.moved(shard, to, 1).expect("a possible move back");
        let (to_text, shard_text) = (to.to_string(), shard.get().to_string());
        let args: Vec<String> = [
            "shard",
            "move",
            "--addr",
            &peers[1],
            "--shard",
            &shard_text,
            "--from",
            &to_text,
            "--to",
            "1",
        ]
        .map(str::to_owned)
        .to_vec();
        let (code, stdout, stderr) = run(args).await.expect("ops ran");
        assert_eq!(code, 0, "the move back succeeds: {stdout}{stderr}");
        wait_placed_converged(&peers, &back, &all).await;
        let returned = send(&addrs[0], &alice, &bob, "after-move-back").await;
        receive_exactly(
            &mut stream,
            &[returned],
            "a send after the move back arrives once",
        )
        .await;
        back
    };

    {
        tracing::info!("node 1 stops: every shard keeps two of its three replicas");
        nodes[0].take().expect("node 1").stop().await;
        let up: BTreeSet<u64> = (2..=NODES).collect();
        let late = send(&addrs[1], &alice, &bob, "with-node-1-down").await;
        receive_exactly(
            &mut stream,
            &[late],
            "the send made with node 1 down arrives, once",
        )
        .await;
        wait_placed_converged(&peers, &placement, &up).await;

        tracing::info!("node 1 is drained while down: its replicas go to the others");
        let (code, stdout, stderr) =
            ops(&["node", "drain", "--addr", &peers[1], "--id", "1"]).await;
        assert_eq!(
            code, 0,
            "the drain of a stopped node succeeds: {stdout}{stderr}"
        );
        assert!(
            stdout.contains("did not answer"),
            "its data stays on its disk: {stdout}"
        );
        let table = table_of(&peers[1]).await;
        assert!(
            table
                .values()
                .all(|replicas| replicas.len() == 3 && !replicas.contains(&1)),
            "every shard has three replicas, none on node 1: {table:?}"
        );
        let drained = Placement::spread(&up, u16::try_from(SHARDS).expect("small"), 3);
        assert!(
            (0..SHARDS).all(|s| {
                let shard = ShardId::new(u16::try_from(s).expect("small"));
                let placed: BTreeSet<u64> = table[&s].iter().copied().collect();
                placed == drained.replicas(shard).iter().copied().collect()
            }),
            "three nodes hold every shard: {table:?}"
        );
        let last = send(&addrs[2], &alice, &bob, "after-drain").await;
        let got = collect(&mut stream, Duration::from_secs(20), |frames| {
            !ids(frames).is_empty()
        })
        .await;
        assert_eq!(
            ids(&got),
            vec![last],
            "a send after the drain arrives, once"
        );
    }

    tracing::info!("node 2 holds replicas: its removal is refused; drained node 1 leaves");
    let members = |status: courier_proto::pb::peer::StatusResponse| -> BTreeSet<u64> {
        status.nodes.iter().map(|node| node.node_id).collect()
    };
    let (code, stdout, stderr) = ops(&["node", "remove", "--addr", &peers[1], "--id", "2"]).await;
    assert_ne!(code, 0, "node 2 still holds replicas: {stdout}");
    assert!(
        stderr.contains("COURIER:Cluster:HoldsReplicas"),
        "refused as holding replicas: {stderr}"
    );
    assert_eq!(
        members(status(&peers[2]).await),
        (1..=NODES).collect(),
        "nothing changed"
    );
    let (code, stdout, stderr) = ops(&["node", "remove", "--addr", &peers[1], "--id", "1"]).await;
    assert_eq!(code, 0, "the drained node leaves: {stdout}{stderr}");
    let rest: BTreeSet<u64> = (2..=NODES).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = members(status(&peers[2]).await);
    while seen != rest && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = members(status(&peers[2]).await);
    }
    assert_eq!(seen, rest, "node 1 is no longer a member");
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
}

/// The table as `peer` reports it, shard by shard.
async fn table_of(peer: &str) -> BTreeMap<u32, Vec<u64>> {
    status(peer)
        .await
        .placement
        .into_iter()
        .map(|shard| (shard.shard, shard.replicas))
        .collect()
}

/// Replicas per node of `table`, every node of `nodes` listed.
fn counts(table: &BTreeMap<u32, Vec<u64>>, nodes: &BTreeSet<u64>) -> BTreeMap<u64, usize> {
    nodes
        .iter()
        .map(|node| (*node, table.values().filter(|r| r.contains(node)).count()))
        .collect()
}

/// Drains node 2 with `courier-ops node drain` through node 1; the table afterwards, as node 4
/// reports it, with every shard on three nodes and none on node 2.
async fn drain_node_2(peers: &[String]) -> BTreeMap<u32, Vec<u64>> {
    let (code, stdout, stderr) = ops(&["node", "drain", "--addr", &peers[0], "--id", "2"]).await;
    assert_eq!(code, 0, "the drain succeeds: {stdout}{stderr}");
    let table = table_of(&peers[3]).await;
    assert!(
        table
            .values()
            .all(|replicas| replicas.len() == 3 && !replicas.contains(&2)),
        "every shard on three nodes, none on node 2: {table:?}"
    );
    table
}

/// A shard node 1 holds and a node of `all` without it: the first such move, in shard order.
fn a_move_off_node_1(placement: &Placement, all: &BTreeSet<u64>) -> (ShardId, u64) {
    (0..SHARDS)
        .map(|s| ShardId::new(u16::try_from(s).expect("small")))
        .find_map(|shard| {
            let to = all.iter().copied().find(|n| !placement.holds(*n, shard))?;
            placement.holds(1, shard).then_some((shard, to))
        })
        .expect("node 1 holds a shard that some node lacks")
}

/// Opens a stream of `device` on the node at `addr` from the start and checks it brings exactly
/// `sent`, in order ([`receive_exactly`]).
async fn receive_all(addr: &str, device: &Device, sent: &[Vec<u8>], why: &str) {
    let mut stream = open_stream(addr, device, 0).await;
    receive_exactly(&mut stream, sent, why).await;
}

/// Reads `stream` until it brought as many messages as `sent` (at most 20 s) and asserts they
/// are exactly `sent`, in order.
async fn receive_exactly(stream: &mut crate::messaging::Stream, sent: &[Vec<u8>], why: &str) {
    let got = collect(stream, Duration::from_secs(20), |frames| {
        message_ids(frames).len() >= sent.len()
    })
    .await;
    assert_eq!(message_ids(&got), sent, "{why}");
}

/// Runs courier-ops off the runtime's workers (the nodes run on them).
async fn ops(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        crate::support::ops(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("ops ran")
}

/// A fifth node joins a four-node, three-replica cluster (`node add`: the metadata group, no
/// replica); `shard
/// rebalance` gives it its share (counts within one); `node drain` then empties node 2; a user
/// registered before receives, exactly once and in order, what was sent before, between and
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_is_filled_by_a_rebalance_and_a_drained_node_is_emptied() {
    let root = tempfile::tempdir().expect("tempdir");
    let (nodes, dirs, peers, addrs) = five_nodes_four_placed(root.path(), "").await;
    let four: BTreeSet<u64> = (1..=NODES).collect();
    let placement = Placement::spread(&four, u16::try_from(SHARDS).expect("small"), 3);
    let (code, stdout, stderr) = ops(&[
        "node", "add", "--addr", &peers[0], "--id", "5", "--peer", &peers[4],
    ])
    .await;
    assert_eq!(
        code, 0,
        "node 5 joins (the metadata group): {stdout}{stderr}"
    );
    assert!(
        table_of(&peers[0]).await.values().all(|r| !r.contains(&5)),
        "a node joins holding no replica"
    );

    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addrs[0], &dirs[0], &alice_phone).await;
    let bob = register(&addrs[1], &dirs[1], &bob_phone).await;
    // Registrations made through one node are visible on every replica once they converge (a
    // replica may answer a read before it applied them, as on any follower).
    wait_placed_converged(&peers[..4], &placement, &four).await;
    let mut sent = vec![send(&addrs[4], &alice, &bob, "before").await];

    let five: BTreeSet<u64> = (1..=NODES + 1).collect();
    let (code, stdout, stderr) = ops(&["shard", "rebalance", "--addr", &peers[0]]).await;
    assert_eq!(code, 0, "the rebalance succeeds: {stdout}{stderr}");
    let table = table_of(&peers[2]).await;
    let spread = counts(&table, &five);
    let (min, max) = (
        spread.values().min().copied().unwrap_or(0),
        spread.values().max().copied().unwrap_or(0),
    );
    assert!(
        max - min <= 1 && spread[&5] >= 2,
        "node 5 got its share: {spread:?}"
    );
    let (code, stdout, _) = ops(&["shard", "rebalance", "--addr", &peers[0], "--dry-run"]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("0 moves planned"),
        "an even table needs no moves: {stdout}"
    );
    sent.push(send(&addrs[2], &alice, &bob, "between").await);

    let table = drain_node_2(&peers).await;
    let rest: BTreeSet<u64> = five.iter().copied().filter(|n| *n != 2).collect();
    sent.push(send(&addrs[1], &alice, &bob, "after").await);
    receive_all(
        &addrs[4],
        &bob,
        &sent,
        "before, between and after arrive once, in order",
    )
    .await;
    assert!(
        counts(&table, &rest).values().all(|count| *count >= 2),
        "the drained replicas spread over the others: {table:?}"
    );
    for node in nodes {
        node.stop().await;
    }
}

/// `nodes` real `courier-node` processes (each with `extra_config`) initialized with three
/// replicas per shard, once every shard's placed replicas agree; the members and the placement.
async fn start_placed(
    nodes: u64,
    extra_config: &str,
) -> (crate::cluster::Processes, BTreeSet<u64>, Placement) {
    let cluster = crate::cluster::Processes::start_uninitialized(nodes, extra_config);
    let peers = cluster.peers.clone();
    let mut request = init_request(&peers, PHONE_KEY.to_vec());
    request.replication_factor = REPLICAS;
    AdminClient::new(peer_channel(&peers[0]).await)
        .init_cluster(request)
        .await
        .expect("init with three replicas per shard");
    let all: BTreeSet<u64> = (1..=nodes).collect();
    let placement = Placement::spread(&all, u16::try_from(SHARDS).expect("small"), 3);
    wait_placed_converged(&peers, &placement, &all).await;
    (cluster, all, placement)
}

/// Five real `courier-node` processes with three replicas per shard: `courier-ops` moves a
/// replica of node 1 and drains node 2; the drained node still serves a device stream (from the
/// replicas), and the user receives what was sent before, between and after, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_processes_with_three_replicas_move_and_drain() {
    let (cluster, all, placement) = start_placed(5, "").await;
    let peers = cluster.peers.clone();
    let clients: Vec<String> = cluster.addrs.iter().map(|a| a.client.clone()).collect();

    let (alice_phone, bob_phone) = phones_on_different_shards();
    let data_dir = cluster.procs[0].data_dir.clone();
    let alice = register(&clients[0], &data_dir, &alice_phone).await;
    let bob = register(&clients[0], &data_dir, &bob_phone).await;
    wait_placed_converged(&peers, &placement, &all).await;
    let mut sent = vec![send(&clients[4], &alice, &bob, "before").await];

    let (shard, to) = a_move_off_node_1(&placement, &all);
    let (code, stdout, stderr) = ops(&[
        "shard",
        "move",
        "--addr",
        &peers[2],
        "--shard",
        &shard.get().to_string(),
        "--from",
        "1",
        "--to",
        &to.to_string(),
    ])
    .await;
    assert_eq!(code, 0, "the move succeeds: {stdout}{stderr}");
    assert!(stdout.contains("verified empty"), "{stdout}");
    sent.push(send(&clients[2], &alice, &bob, "between").await);

    let table = drain_node_2(&peers).await;
    // The drain may bring the moved shard back to node 1 (it held fewest after the move).
    assert!(
        table[&u32::from(shard.get())].contains(&to),
        "the moved shard keeps its new replica: {table:?}"
    );
    sent.push(send(&clients[3], &alice, &bob, "after").await);
    receive_all(
        &clients[1],
        &bob,
        &sent,
        "through the drained node: before, between and after, once, in order",
    )
    .await;
}

/// Five real `courier-node` processes with three replicas per shard: two moves of one shard
/// run at once, each sent to the node its replica leaves, to the two nodes without one. Each
/// membership change names only its own node, so neither writes the other's new voter out, and
/// a removal counts the voters under the leader's gate: whatever each move answers, the shard's
/// voters end equal to its replicas in the table, three of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_moves_of_one_shard_at_once_leave_its_voters_as_the_table_says() {
    let (cluster, all, placement) = start_placed(5, "").await;
    let peers = cluster.peers.clone();
    let shard = ShardId::new(0);
    let replicas = placement.replicas(shard).to_vec();
    let lacking: Vec<u64> = all
        .iter()
        .copied()
        .filter(|node| !placement.holds(*node, shard))
        .collect();
    let moves: Vec<(u64, u64)> = replicas.iter().copied().zip(lacking).collect();
    assert_eq!(moves.len(), 2, "{replicas:?}");
    let runs = moves.iter().map(|(from, to)| {
        let addr = peers[usize::try_from(*from - 1).expect("small")].clone();
        let (shard, from, to) = (shard.get().to_string(), from.to_string(), to.to_string());
        async move {
            let args = [
                "shard", "move", "--addr", &addr, "--shard", &shard, "--from", &from, "--to", &to,
            ];
            ops(&args).await
        }
    });
    let answers = futures_util::future::join_all(runs).await;
    assert!(
        answers.iter().any(|(code, ..)| *code == 0),
        "at least one move is made: {answers:?}"
    );

    let started = Instant::now();
    loop {
        let table: BTreeSet<u64> = table_of(&peers[4]).await[&0].iter().copied().collect();
        let seen = replicas_seen(&peers).await;
        let voters: BTreeSet<u64> = seen
            .get(&0)
            .map(|reports| reports.keys().copied().collect())
            .unwrap_or_default();
        if voters == table && table.len() == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "shard 0's voters {voters:?} are not its replicas in the table {table:?} ({answers:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Four real `courier-node` processes with three replicas per shard and the automatic leader
/// rebalancer on. Node 1 is SIGKILLed, so the shard it led fails over; restarted, it leads
/// nothing until its rebalancer, whose view of the shards it does not hold comes from their
/// replicas, takes its share back: leaders end within one of each other on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_leaders_are_rebalanced_after_a_failover() {
    let (mut cluster, all, _) =
        start_placed(NODES, "[cluster]\nleader-rebalance-interval = \"2s\"").await;
    let peers = cluster.peers.clone();
    // Per shard, the leader its replicas agree on (shards they do not agree on are left out).
    let leaders = |seen: &BTreeMap<u32, BTreeMap<u64, (u64, u64, String)>>| -> BTreeMap<u32, u64> {
        seen.iter()
            .filter_map(|(shard, reports)| {
                let leader = reports.values().next()?.0;
                let agreed = leader != 0 && reports.values().all(|report| report.0 == leader);
                agreed.then_some((*shard, leader))
            })
            .collect()
    };
    let led_by_1 = leaders(&replicas_seen(&peers).await)
        .values()
        .filter(|leader| **leader == 1)
        .count();
    assert!(led_by_1 > 0, "node 1 leads a shard at first");

    cluster.kill(0);
    let rest: BTreeSet<u64> = (2..=NODES).collect();
    let started = Instant::now();
    loop {
        let seen = replicas_seen(&peers).await;
        let now = leaders(&seen);
        if now.len() == usize::try_from(SHARDS).expect("small")
            && now.values().all(|leader| rest.contains(leader))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failover off node 1: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.restart(0);
    let started = Instant::now();
    loop {
        let seen = replicas_seen(&peers).await;
        let now = leaders(&seen);
        let mut counts: BTreeMap<u64, usize> = all.iter().map(|node| (*node, 0)).collect();
        for leader in now.values() {
            *counts.entry(*leader).or_default() += 1;
        }
        let (min, max) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        if now.len() == usize::try_from(SHARDS).expect("small") && max - min <= 1 && counts[&1] > 0
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node 1 got no leaders back: {counts:?} ({seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Five nodes with the automatic replica rebalancer on, four of them in the table. Node 5
/// joins (`node add`) and the rebalancer gives it its share; node 2 is marked draining and the
/// rebalancer (node 2 moving its own replicas) empties it, and does not refill it while the
/// mark stands; `node remove` of node 2 then ends the mark. A user registered first receives
/// what was sent before, between and after, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_rebalancer_fills_a_new_node_and_empties_a_draining_one() {
    let root = tempfile::tempdir().expect("tempdir");
    let (nodes, dirs, peers, addrs) = five_nodes_four_placed(
        root.path(),
        "[cluster]\nreplica-rebalance-interval = \"1200ms\"\n",
    )
    .await;
    let four: BTreeSet<u64> = (1..=NODES).collect();
    let placement = Placement::spread(&four, u16::try_from(SHARDS).expect("small"), 3);
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addrs[0], &dirs[0], &alice_phone).await;
    let bob = register(&addrs[1], &dirs[1], &bob_phone).await;
    wait_placed_converged(&peers[..4], &placement, &four).await;
    let mut sent = vec![send(&addrs[2], &alice, &bob, "before").await];

    let (code, stdout, stderr) = ops(&[
        "node", "add", "--addr", &peers[0], "--id", "5", "--peer", &peers[4],
    ])
    .await;
    assert_eq!(code, 0, "node 5 joins: {stdout}{stderr}");
    let five: BTreeSet<u64> = (1..=NODES + 1).collect();
    let even = wait_table(&peers[0], Duration::from_secs(120), |table| {
        let spread = counts(table, &five);
        let (min, max) = (
            spread.values().min().copied().unwrap_or(0),
            spread.values().max().copied().unwrap_or(0),
        );
        max - min <= 1 && table.values().all(|r| r.len() == 3)
    })
    .await;
    assert!(
        counts(&even, &five)[&5] >= 2,
        "node 5 got its share: {even:?}"
    );
    sent.push(send(&addrs[4], &alice, &bob, "between").await);

    AdminClient::new(peer_channel(&peers[0]).await)
        .mark_draining(courier_proto::pb::peer::MarkDrainingRequest {
            node_id: 2,
            draining: true,
            leader_only: false,
        })
        .await
        .expect("node 2 marked draining");
    wait_draining(&peers[3], &[2]).await;
    let rest: BTreeSet<u64> = five.iter().copied().filter(|n| *n != 2).collect();
    let drained = wait_table(&peers[0], Duration::from_secs(180), |table| {
        table.values().all(|r| r.len() == 3 && !r.contains(&2))
    })
    .await;
    // Rounds later the table still leaves node 2 out, though it now holds fewest.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = table_of(&peers[0]).await;
    assert!(
        later.values().all(|r| !r.contains(&2)),
        "nothing goes back to a draining node: {drained:?} then {later:?}"
    );
    // Sent to the replica that would leave (a node without the shard refuses as WrongNode).
    let from = later[&0][0];
    let via = &peers[usize::try_from(from - 1).expect("small")];
    let moves_to_2 = AdminClient::new(peer_channel(via).await)
        .move_shard(courier_proto::pb::peer::MoveShardRequest {
            shard: 0,
            from_node: from,
            to_node: 2,
            ..courier_proto::pb::peer::MoveShardRequest::default()
        })
        .await
        .expect_err("a move to a draining node");
    code_is(
        &moves_to_2,
        tonic::Code::FailedPrecondition,
        "COURIER:Cluster:Draining",
    );
    sent.push(send(&addrs[0], &alice, &bob, "after").await);
    receive_all(
        &addrs[3],
        &bob,
        &sent,
        "before, between and after arrive once, in order",
    )
    .await;
    assert!(
        counts(&later, &rest).values().all(|count| *count == 3),
        "node 2's replicas spread over the others: {later:?}"
    );

    let (code, stdout, stderr) = ops(&["node", "remove", "--addr", &peers[0], "--id", "2"]).await;
    assert_eq!(code, 0, "the drained node leaves: {stdout}{stderr}");
    wait_draining(&peers[0], &[]).await;
    for node in nodes {
        node.stop().await;
    }
}

/// Polls the table `peer` reports until `done` holds (at most `within`); returns it.
async fn wait_table(
    peer: &str,
    within: Duration,
    done: impl Fn(&BTreeMap<u32, Vec<u64>>) -> bool,
) -> BTreeMap<u32, Vec<u64>> {
    let started = Instant::now();
    loop {
        let table = table_of(peer).await;
        if done(&table) {
            return table;
        }
        assert!(
            started.elapsed() < within,
            "the table did not get there in {within:?}: {table:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls `peer`'s status until the nodes it shows draining are `expected` (at most 10 s).
async fn wait_draining(peer: &str, expected: &[u64]) {
    let started = Instant::now();
    loop {
        let draining = status(peer).await.draining;
        if draining == expected {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "draining {draining:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Five in-process nodes under `root` (`extra` appended to each configuration), the first four
/// initialised with three replicas per shard and converged; node 5 runs outside the cluster.
/// Returns the nodes, their data directories, peer and client addresses.
async fn five_nodes_four_placed(
    root: &std::path::Path,
    extra: &str,
) -> (
    Vec<courier_node::NodeHandle>,
    Vec<std::path::PathBuf>,
    Vec<String>,
    Vec<String>,
) {
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=NODES + 1 {
        let dir = root.join(format!("n{id}"));
        let text = format!("{}\n{extra}", fast_config(id, &dir));
        let config = courier_node::Config::parse(&text).expect("config");
        nodes.push(courier_node::start(config).await.expect("start"));
        dirs.push(dir);
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let mut request = init_request(&peers[..4], PHONE_KEY.to_vec());
    request.replication_factor = REPLICAS;
    AdminClient::new(peer_channel(&peers[0]).await)
        .init_cluster(request)
        .await
        .expect("init");
    let four: BTreeSet<u64> = (1..=NODES).collect();
    let placement = Placement::spread(&four, u16::try_from(SHARDS).expect("small"), 3);
    wait_placed_converged(&peers[..4], &placement, &four).await;
    (nodes, dirs, peers, addrs)
}
