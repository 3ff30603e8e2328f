//! Commands against a running node over gRPC.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::{
    AddNodeRequest, InitClusterRequest, MarkDrainingRequest, MoveShardRequest, NodeInfo,
    RaiseEventFormatRequest, RemoveNodeRequest, ShardStatus, StatusRequest, StatusResponse,
    TransferLeaderRequest,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Connect deadline for one attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts while waiting for health.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    crate::transport::endpoint(addr, None, CONNECT_TIMEOUT)?
        .timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

async fn check(addr: &str) -> anyhow::Result<ServingStatus> {
    let mut client = HealthClient::new(channel(addr).await?);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Prints and returns whether `addr` is SERVING, retrying for up to `wait`.
///
/// # Errors
/// A connection error once `wait` has passed.
pub(crate) async fn health(addr: &str, wait: Duration) -> anyhow::Result<bool> {
    let started = Instant::now();
    loop {
        match check(addr).await {
            Ok(ServingStatus::Serving) => {
                println!("{addr} SERVING");
                return Ok(true);
            }
            Ok(status) if started.elapsed() >= wait => {
                println!("{addr} {}", status.as_str_name());
                return Ok(false);
            }
            Err(error) if started.elapsed() >= wait => return Err(error),
            _ => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

/// Returns the services `addr` lists by reflection.
///
/// # Errors
/// Connection or protocol errors.
pub(crate) async fn services(addr: &str) -> anyhow::Result<Vec<String>> {
    let mut client = ServerReflectionClient::new(channel(addr).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    match stream.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => bail!("unexpected reflection answer: {other:?}"),
    }
}

/// An admin client connected to `addr`.
///
/// # Errors
/// A malformed or unreachable address.
pub(crate) async fn admin_at(addr: &str) -> anyhow::Result<AdminClient<Channel>> {
    Ok(admin(channel(addr).await?))
}

fn admin(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel)
}

/// Bootstraps a cluster from `addr` with `members` (`ID=HOST:PORT`).
///
/// # Errors
/// Malformed members, connection errors, or the node's refusal (printed with its code).
pub(crate) async fn cluster_init(
    addr: &str,
    members: &[String],
    shards: u32,
    replicas: u32,
    phone_key_file: Option<&std::path::Path>,
    event_format: u32,
) -> anyhow::Result<()> {
    let phone_hash_key = match phone_key_file {
        Some(path) => read_phone_key(path)?.expose().to_vec(),
        None => Vec::new(),
    };
    let members = members
        .iter()
        .map(|member| {
            let (id, peer) = member
                .split_once('=')
                .with_context(|| format!("{member:?} is not ID=HOST:PORT"))?;
            let node_id: u64 = id
                .parse()
                .with_context(|| format!("{id:?} is not a node id"))?;
            Ok(NodeInfo {
                node_id,
                peer_addr: peer.to_owned(),
                client_addr: String::new(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = InitClusterRequest {
        members,
        shard_count: shards,
        replication_factor: replicas,
        init_shards: Vec::new(),
        phone_hash_key,
        event_format,
    };
    let response = admin(channel(addr).await?)
        .init_cluster(request)
        .await
        .map_err(describe)?
        .into_inner();
    if response.already_initialized {
        println!("cluster already initialized with these members; shards checked");
    } else {
        let per_shard = if replicas == 0 {
            "default".to_owned()
        } else {
            replicas.to_string()
        };
        println!(
            "cluster initialized: {shards} shards, replicas per shard: {per_shard}, event format {}",
            response.event_format
        );
    }
    Ok(())
}

/// Raises the cluster's event format to `event_format` (0: the newest the node at `addr`
/// writes), through the node at `addr`.
///
/// # Errors
/// Connection errors or the cluster's refusal (a member of an older build, or one that did not
/// answer).
pub(crate) async fn raise_event_format(addr: &str, event_format: u32) -> anyhow::Result<()> {
    let response = admin(channel(addr).await?)
        .raise_event_format(RaiseEventFormatRequest {
            event_format,
            leader_only: false,
        })
        .await
        .map_err(describe)?
        .into_inner();
    println!(
        "the cluster's leaders write event format {}",
        response.event_format
    );
    Ok(())
}

/// Reads a phone-hash key file: 64 hex digits (surrounding whitespace ignored).
///
/// # Errors
/// An unreadable file or anything but 64 hex digits (the key is not echoed).
pub(crate) fn read_phone_key(path: &std::path::Path) -> anyhow::Result<courier_proto::PhoneKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the phone-hash key {}", path.display()))?;
    courier_proto::PhoneKey::from_hex(&text)
        .with_context(|| format!("{}: a phone-hash key is 64 hex digits", path.display()))
}

pub(crate) fn describe(status: tonic::Status) -> anyhow::Error {
    let code = status
        .metadata()
        .get("courier-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    anyhow::anyhow!("{}: {} ({code})", status.code(), status.message())
}

/// Every node's status, as `(node id, peer address, status or why not)`: the node at `addr`
/// first, then the others its membership names.
///
/// # Errors
/// When the node at `addr` cannot be reached.
pub(crate) async fn gather_status(
    addr: &str,
) -> anyhow::Result<Vec<(u64, String, anyhow::Result<StatusResponse>)>> {
    let first = status_of(addr).await?;
    let mut nodes = vec![(first.node_id, addr.to_owned(), Ok(first.clone()))];
    for node in &first.nodes {
        if node.node_id == first.node_id {
            continue;
        }
        let status = status_of(&node.peer_addr).await;
        nodes.push((node.node_id, node.peer_addr.clone(), status));
    }
    Ok(nodes)
}

/// The status of the node at `addr`.
///
/// # Errors
/// Connection errors or the node's refusal.
pub(crate) async fn status_of(addr: &str) -> anyhow::Result<StatusResponse> {
    Ok(admin(channel(addr).await?)
        .status(StatusRequest {})
        .await
        .map_err(describe)?
        .into_inner())
}

/// Prints every node's status; returns whether every shard has a leader on every node.
///
/// # Errors
/// When the first node cannot be reached.
pub(crate) async fn cluster_status(addr: &str, json: bool) -> anyhow::Result<bool> {
    let nodes = gather_status(addr).await?;
    // The placement table (text only) is built from every status before the rows consume them.
    let reachable: Vec<StatusResponse> = nodes
        .iter()
        .filter_map(|(_, _, status)| status.as_ref().ok().cloned())
        .collect();
    let placement = (!json).then(|| courier_proto::placement::view(&reachable));
    let mut healthy = true;
    if !json {
        println!(
            "{:>4} {:<21} {:>5} {:<9} {:>5} {:>6} {:>8} {:>8} {:>5} {:>7} {:>6}",
            "node",
            "peer",
            "shard",
            "role",
            "term",
            "leader",
            "last_log",
            "applied",
            "lag",
            "outbox",
            "e/sync"
        );
    }
    for (id, peer, status) in nodes {
        match status {
            Err(error) => {
                healthy = false;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"node_id": id, "peer": peer, "error": error.to_string()})
                    );
                } else {
                    println!("{id:>4} {peer:<21} UNREACHABLE: {error}");
                }
            }
            Ok(status) => {
                healthy &= status.shards.iter().all(|s| s.leader != 0);
                if json {
                    let shards: Vec<_> = status.shards.iter().map(|s| serde_json::json!({
                        "shard": s.shard, "role": s.role, "term": s.term, "leader": s.leader,
                        "replicas": s.replicas, "last_log_index": s.last_log_index, "applied": s.applied,
                        "apply_lag": s.apply_lag, "outbox_len_entries": s.outbox_len_entries, "digest": s.digest,
                        "fsyncs": s.fsyncs, "entries_appended": s.entries_appended,
                        "snapshot_index": s.snapshot_index, "purged_index": s.purged_index,
                    })).collect();
                    let moves: Vec<_> = status
                        .moves
                        .iter()
                        .map(|m| {
                            serde_json::json!({
                                "shard": m.shard, "from_node": m.from_node, "to_node": m.to_node,
                                "step": m.step, "elapsed_ms": m.elapsed_ms,
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"node_id": id, "peer": peer, "shards": shards, "moves": moves, "draining": status.draining, "event_format": status.event_format, "event_format_max": status.event_format_max})
                    );
                    continue;
                }
                for s in status.shards {
                    let per_sync = if s.fsyncs == 0 {
                        0.0
                    } else {
                        s.entries_appended as f64 / s.fsyncs as f64
                    };
                    println!(
                        "{id:>4} {peer:<21} {:>5} {:<9} {:>5} {:>6} {:>8} {:>8} {:>5} {:>7} {:>6.1}",
                        s.shard,
                        s.role,
                        s.term,
                        s.leader,
                        s.last_log_index,
                        s.applied,
                        s.apply_lag,
                        s.outbox_len_entries,
                        per_sync
                    );
                }
            }
        }
    }
    if let Some(shards) = placement {
        print_placement(&shards);
        print_moves(&reachable);
    }
    Ok(healthy)
}

/// The shard moves the nodes run now, with the step each is at; the nodes marked draining; the
/// event format and what each node's build reads.
fn print_moves(statuses: &[StatusResponse]) {
    if let Some(first) = statuses.first() {
        let reads: Vec<String> = statuses
            .iter()
            .map(|status| {
                format!(
                    "node {} up to {}",
                    status.node_id,
                    status.event_format_max.max(1)
                )
            })
            .collect();
        println!(
            "\nevent format: {} (builds read: {})",
            first.event_format.max(1),
            reads.join(", ")
        );
    }
    if let Some(first) = statuses.first()
        && !first.draining.is_empty()
    {
        println!(
            "\ndraining (no move puts a replica on them): nodes {:?}",
            first.draining
        );
    }
    let moves: Vec<_> = statuses
        .iter()
        .flat_map(|status| status.moves.iter().map(move |m| (status.node_id, m)))
        .collect();
    if moves.is_empty() {
        return;
    }
    println!("\nmoves in progress:");
    for (node, m) in moves {
        println!(
            "shard {} from node {} to node {}: {} for {:.1} s (run by node {node})",
            m.shard,
            m.from_node,
            m.to_node,
            m.step,
            Duration::from_millis(m.elapsed_ms).as_secs_f64()
        );
    }
}

/// The placement table: each shard's voters and leader, then replicas and leaders per node.
fn print_placement(shards: &std::collections::BTreeMap<u32, courier_proto::placement::ShardView>) {
    println!("\n{:>5} {:>6} voters", "shard", "leader");
    for (shard, view) in shards {
        let voters: Vec<String> = view.voters.iter().map(u64::to_string).collect();
        let leader = view.leader.map_or("-".to_owned(), |l| l.to_string());
        println!("{shard:>5} {leader:>6} {}", voters.join(","));
    }
    let replicas = courier_proto::placement::replica_counts(shards);
    let nodes: std::collections::BTreeSet<u64> = replicas.keys().copied().collect();
    let leaders = courier_proto::placement::leader_counts(shards, &nodes);
    for (node, count) in &replicas {
        println!(
            "node {node}: {count} replicas, leads {}",
            leaders.get(node).copied().unwrap_or(0)
        );
    }
}

/// Asks the node at `addr` (node id `node`) to take leadership of `shard`.
///
/// # Errors
/// Connection errors or the node's refusal.
pub(crate) async fn transfer_leader(addr: &str, node: u64, shard: u32) -> anyhow::Result<()> {
    ask_to_lead(addr, node, shard).await?;
    println!("node {node} started an election for shard {shard}");
    Ok(())
}

/// Asks the node at `addr` (node id `node`) to start an election for `shard`.
///
/// # Errors
/// Connection errors or the node's refusal.
pub(crate) async fn ask_to_lead(addr: &str, node: u64, shard: u32) -> anyhow::Result<()> {
    admin(channel(addr).await?)
        .transfer_leader(TransferLeaderRequest {
            shard,
            to_node: node,
        })
        .await
        .map_err(describe)?;
    Ok(())
}

/// Adds node `id` at `peer` to the cluster that `addr` belongs to.
///
/// # Errors
/// Connection errors or the cluster's refusal.
pub(crate) async fn node_add(addr: &str, id: u64, peer: &str) -> anyhow::Result<()> {
    let node = NodeInfo {
        node_id: id,
        peer_addr: peer.to_owned(),
        client_addr: String::new(),
    };
    admin(channel(addr).await?)
        .add_node(AddNodeRequest {
            node: Some(node),
            group: None,
        })
        .await
        .map_err(describe)?;
    println!(
        "node {id} added as a voter (a cluster that places shards: to the metadata group; \
         `shard rebalance` gives it replicas)"
    );
    Ok(())
}

/// How long `shard move` waits for the move (catching up a large shard takes a while).
const MOVE_WAIT: Duration = Duration::from_secs(3600);
/// How often `shard move` reports the new replica's progress.
const MOVE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Moves `shard`'s replica from node `from` to node `to` in the cluster `addr` belongs to, with
/// the new replica's catch-up progress on stderr.
///
/// # Errors
/// Connection errors, an unknown node, or the cluster's refusal.
pub(crate) async fn shard_move(addr: &str, shard: u32, from: u64, to: u64) -> anyhow::Result<bool> {
    let nodes = gather_status(addr).await?;
    let peer_of = |id: u64| {
        nodes
            .iter()
            .find(|(node, ..)| *node == id)
            .map(|(_, peer, _)| peer.clone())
            .with_context(|| format!("node {id} is not a member of the cluster"))
    };
    let (mut from_peer, to_peer) = (peer_of(from)?, peer_of(to)?);
    if status_of(&from_peer).await.is_err() {
        // `from` is down: another placed replica of the shard runs the move (no delete on `from`).
        let first = nodes
            .iter()
            .find_map(|(_, _, status)| status.as_ref().ok())
            .context("no node of the cluster answers")?;
        let other = first
            .placement
            .iter()
            .find(|placed| placed.shard == shard)
            .and_then(|placed| {
                placed.replicas.iter().copied().find(|id| {
                    *id != from
                        && nodes
                            .iter()
                            .any(|(node, _, status)| node == id && status.is_ok())
                })
            })
            .with_context(|| {
                format!("node {from} is down and no other replica of shard {shard} answers")
            })?;
        eprintln!("node {from} does not answer: node {other} runs the move");
        from_peer = peer_of(other)?;
    }
    let mut request = tonic::Request::new(MoveShardRequest {
        shard,
        from_node: from,
        to_node: to,
        placement_only: false,
        readmit: false,
        readmit_term: 0,
    });
    request.set_timeout(MOVE_WAIT);
    // Not `channel`: its per-call deadline is for quick calls, a move waits for a catch-up.
    let long = crate::transport::endpoint(&from_peer, None, CONNECT_TIMEOUT)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {from_peer}"))?;
    let mut client = admin(long);
    let moving = client.move_shard(request);
    tokio::pin!(moving);
    let started = Instant::now();
    let response = loop {
        tokio::select! {
            response = &mut moving => break response.map_err(describe)?.into_inner(),
            () = tokio::time::sleep(MOVE_PROGRESS_EVERY) => {
                eprintln!("{}", move_progress(shard, &from_peer, &to_peer, started).await);
            }
        }
    };
    if !response.deleted {
        println!(
            "shard {shard} moved from node {from} to node {to}; node {from} did not answer, so its copy of the shard stays on its disk: once node {from} answers, run this move again to delete it there (do not wipe the node: it is still a voter of its other shards)"
        );
        return Ok(true);
    }
    if response.families_left != 0 {
        // The move ran; its check of the old replica's delete failed: exit 1, not a usage error.
        println!(
            "shard {shard} moved to node {to}, but {} column families on node {from} still hold its keys: NOT verified empty",
            response.families_left
        );
        return Ok(false);
    }
    let done = if response.already_moved {
        "was already moved"
    } else {
        "moved"
    };
    println!(
        "shard {shard} {done} from node {from} to node {to}; its data on node {from} is deleted (verified empty)"
    );
    Ok(true)
}

/// Plans and carries out replica moves, one at a time: every replica off node `drain`, or (with
/// `None`) the moves that even out replicas per node. Prints the plan first; `dry_run` stops
/// there. `Ok(false)` when a shard of a drained node had nowhere to go.
///
/// # Errors
/// Connection errors, a cluster that does not place shards, or a move the cluster refused
/// (run the command again: the plan is recomputed from the table, and a move resumes).
pub(crate) async fn replica_plan(
    addr: &str,
    drain: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<bool> {
    let status = status_of(addr).await?;
    if status.placement.is_empty() {
        bail!("every shard is on every member of this cluster: there is nothing to move");
    }
    let table: std::collections::BTreeMap<u32, Vec<u64>> = status
        .placement
        .iter()
        .map(|shard| (shard.shard, shard.replicas.clone()))
        .collect();
    // Nodes marked draining take no replica (a drain marks its node first, so neither this
    // command run again nor the automatic rebalancer refills it).
    let nodes: std::collections::BTreeSet<u64> = status
        .nodes
        .iter()
        .map(|node| node.node_id)
        .filter(|node| !status.draining.contains(node) || Some(*node) == drain)
        .collect();
    if let Some(node) = drain
        && !dry_run
        && !status.draining.contains(&node)
    {
        mark_draining(addr, node, true).await?;
        println!("node {node} marked draining");
    }
    let moves = match drain {
        Some(node) => courier_proto::placement::drain_plan(&table, &nodes, node),
        None => courier_proto::placement::rebalance_plan(&table, &nodes),
    };
    let stuck = drain.map_or(0, |node| {
        let held = table.values().filter(|r| r.contains(&node)).count();
        held.saturating_sub(moves.len())
    });
    println!("{} moves planned", moves.len());
    for step in &moves {
        println!(
            "  shard {}: node {} -> node {}",
            step.shard, step.from, step.to
        );
    }
    if stuck > 0 {
        println!("{stuck} shards have nowhere to go: every other member holds them");
    }
    if dry_run {
        return Ok(stuck == 0);
    }
    let mut verified = true;
    for step in &moves {
        verified &= shard_move(addr, step.shard, step.from, step.to).await?;
    }
    Ok(stuck == 0 && verified)
}

/// One progress line of a move: the new replica's applied index against the shard's last log
/// index on the old one.
async fn move_progress(shard: u32, from_peer: &str, to_peer: &str, started: Instant) -> String {
    let index = |status: &anyhow::Result<StatusResponse>, pick: fn(&ShardStatus) -> u64| {
        status
            .as_ref()
            .ok()
            .and_then(|s| s.shards.iter().find(|x| x.shard == shard))
            .map_or(0, pick)
    };
    let source = status_of(from_peer).await;
    let target = status_of(to_peer).await;
    let last = index(&source, |s| s.last_log_index);
    let applied = index(&target, |s| s.applied);
    format!(
        "[{:>4} s] shard {shard}: new replica applied {applied} of {last}",
        started.elapsed().as_secs()
    )
}

/// Marks node `id` draining (`on`) or not, through the node at `addr`.
///
/// # Errors
/// Connection errors or the cluster's refusal.
pub(crate) async fn mark_draining(addr: &str, id: u64, on: bool) -> anyhow::Result<()> {
    admin(channel(addr).await?)
        .mark_draining(MarkDrainingRequest {
            node_id: id,
            draining: on,
            leader_only: false,
        })
        .await
        .map_err(describe)?;
    Ok(())
}

/// Removes node `id` from the cluster that `addr` belongs to.
///
/// # Errors
/// Connection errors or the cluster's refusal.
pub(crate) async fn node_remove(addr: &str, id: u64) -> anyhow::Result<()> {
    admin(channel(addr).await?)
        .remove_node(RemoveNodeRequest {
            node_id: id,
            group: None,
        })
        .await
        .map_err(describe)?;
    println!("node {id} removed (every group it was in)");
    Ok(())
}

/// Asks the node at `addr` for a checkpoint into `dir`.
///
/// # Errors
/// Connection errors or the node's refusal.
pub(crate) async fn backup(addr: &str, dir: &str) -> anyhow::Result<()> {
    let response = admin(channel(addr).await?)
        .backup(courier_proto::pb::peer::BackupRequest {
            dir: dir.to_owned(),
        })
        .await
        .map_err(describe)?
        .into_inner();
    println!("checkpoint written to {} on the node", response.dir);
    for shard in response.shards {
        println!(
            "  shard {:>4} applied {:>10} digest {}",
            shard.shard, shard.applied, shard.digest
        );
    }
    Ok(())
}
