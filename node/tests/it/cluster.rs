//! A real cluster: nodes elect a leader per shard, forwarded batches commit on a quorum and apply
//! on every replica with equal digests; in the multi-process test a node leading shards is
//! SIGKILLed, its shards fail over, and after a restart it catches up (by snapshot when the log
//! was purged meanwhile).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::forward_client::ForwardClient;
use courier_proto::pb::peer::{
    ForwardBatchRequest, InitClusterRequest, NodeInfo, StatusRequest, StatusResponse,
};

use crate::support::{
    NodeProcess, config_on_ports, config_text, connect, free_port, peer_channel, peer_tls,
    wait_addrs,
};

pub(crate) const SHARDS: u32 = 4;
/// The source shard id used for test forwards (a shard outside the data shards would be refused,
/// so tests forward "from" shard 0 to every shard, itself included).
const SOURCE: u32 = 0;

pub(crate) async fn status(peer: &str) -> StatusResponse {
    AdminClient::new(peer_channel(peer).await)
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

pub(crate) async fn try_status(peer: &str) -> Result<StatusResponse, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("https://{peer}"))
        .expect("a valid uri")
        .tls_config(peer_tls(courier_tls::dev::OPERATOR))
        .expect("tls config")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(AdminClient::new(channel)
        .status(StatusRequest {})
        .await?
        .into_inner())
}

/// The phone-hash key the test clusters are created with, so that tests can compute user ids
/// ([`crate::messaging::user_of`]); a real cluster generates its own and never returns it.
pub(crate) const PHONE_KEY: [u8; courier_proto::PHONE_KEY_BYTES] = [0x5a; 32];

/// Bootstraps a cluster of `peers` (node ids 1, 2, 3, … in order) through the first of them.
pub(crate) async fn init(peers: &[String]) {
    AdminClient::new(peer_channel(&peers[0]).await)
        .init_cluster(init_request(peers, PHONE_KEY.to_vec()))
        .await
        .expect("init");
}

/// The request that bootstraps `peers` (ids 1, 2, 3, … in order) with `phone_hash_key`.
pub(crate) fn init_request(peers: &[String], phone_hash_key: Vec<u8>) -> InitClusterRequest {
    InitClusterRequest {
        members: peers
            .iter()
            .zip(1_u64..)
            .map(|(addr, id)| NodeInfo {
                node_id: id,
                peer_addr: addr.clone(),
                client_addr: String::new(),
            })
            .collect(),
        shard_count: SHARDS,
        replication_factor: 0,
        init_shards: Vec::new(),
        phone_hash_key,
        // By name: a member that does not read it fails the init instead of leaving format 1.
        event_format: courier_proto::FORMAT_VERSION,
    }
}

/// Waits until every shard has the same leader on every given node.
pub(crate) async fn wait_leaders(peers: &[String], timeout: Duration) -> BTreeMap<u32, u64> {
    let started = Instant::now();
    loop {
        let mut leaders: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for peer in peers {
            if let Ok(mut client) = tokio::time::timeout(Duration::from_secs(2), async {
                AdminClient::new(peer_channel(peer).await)
            })
            .await
                && let Ok(response) = client.status(StatusRequest {}).await
            {
                for shard in response.into_inner().shards {
                    leaders.entry(shard.shard).or_default().push(shard.leader);
                }
            }
        }
        let agreed: BTreeMap<u32, u64> = leaders
            .iter()
            .filter(|(_, ls)| {
                ls.len() == peers.len() && ls[0] != 0 && ls.iter().all(|l| *l == ls[0])
            })
            .map(|(s, ls)| (*s, ls[0]))
            .collect();
        if agreed.len() == usize::try_from(SHARDS).expect("small") {
            return agreed;
        }
        assert!(
            started.elapsed() < timeout,
            "no agreed leader for every shard within {timeout:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn delivered(dest_user: u64, dest: u32, pos: u64) -> Event {
    let message_id = forwarded_id(dest, pos);
    Event {
        kind: Some(Kind::MessageDelivered(events::MessageDelivered {
            message_id: message_id.to_vec(),
            recipient_user: dest_user,
            sender_user: 1,
            sender_device: 1,
            conversation: Some(events::Conversation {
                with: Some(events::conversation::With::User(1)),
            }),
            content: Some(events::Content {
                body: vec![b'x'; 64],
                media: None,
            }),
            sent_at_ms: 1,
            stored_at_ms: 0,
            source_shard: SOURCE,
            source_pos: pos,
            group_index: 0,
            trace_parent: String::new(),
            origin_shard: None,
            addressed_to: 0,
            receipts_sent: 0,
        })),
    }
}

/// Forwards `count` messages starting at position `first` to `dest` through `peer`.
pub(crate) async fn forward(
    peer: &str,
    dest: u32,
    first: u64,
    count: u64,
) -> Result<u64, tonic::Status> {
    forward_for(peer, dest, 100 + u64::from(dest), first, count).await
}

/// The id of the message [`forward`] and [`forward_for`] send to `dest` at outbox position `pos`.
pub(crate) fn forwarded_id(dest: u32, pos: u64) -> [u8; 16] {
    let mut message_id = [0_u8; 16];
    message_id[..8].copy_from_slice(&(u64::from(dest) << 32 | pos).to_be_bytes());
    message_id[15] = 7;
    message_id
}

/// Forwards `count` messages for `user` starting at position `first` to `dest` through `peer`.
pub(crate) async fn forward_for(
    peer: &str,
    dest: u32,
    user: u64,
    first: u64,
    count: u64,
) -> Result<u64, tonic::Status> {
    let events = (first..first + count)
        .map(|pos| delivered(user, dest, pos))
        .collect();
    forward_events(peer, dest, first, events).await
}

/// As [`forward_events`], retrying as a forwarder does while the answer is UNAVAILABLE (a
/// leader changing) or the call's 5 s deadline passed (three debug nodes in one test process
/// on a loaded machine take seconds over a 1 MiB entry, and their leaders change meanwhile);
/// answers where the destination stored up to, and whether it took a retry (an attempt may
/// have committed before its answer was lost).
pub(crate) async fn forward_retrying(
    peer: &str,
    dest: u32,
    first: u64,
    events: &[Event],
) -> (u64, bool) {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match forward_events(peer, dest, first, events.to_vec()).await {
            Ok(stored) => return (stored, attempts > 1),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) =>
            {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "still not stored after 90 s: {status:?}"
                );
                eprintln!("attempt {attempts}: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!(
                "forward of {} events from {first}: {status:?}",
                events.len()
            ),
        }
    }
}

/// Forwards `events`, at positions from `first` on, to `dest` through `peer`.
pub(crate) async fn forward_events(
    peer: &str,
    dest: u32,
    first: u64,
    events: Vec<Event>,
) -> Result<u64, tonic::Status> {
    let request = ForwardBatchRequest {
        source_shard: SOURCE,
        dest_shard: dest,
        first_pos: first,
        events,
    };
    // Forwarding is node to node: the caller holds node 1's certificate.
    let mut client = ForwardClient::new(connect(peer, peer_tls("node-1")).await);
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(5));
    client
        .forward_batch(request)
        .await
        .map(|r| r.into_inner().stored_up_to)
}

/// Waits until every node reports the same applied index and digest for every shard.
pub(crate) async fn wait_converged(
    peers: &[String],
    timeout: Duration,
) -> BTreeMap<u32, (u64, String)> {
    let started = Instant::now();
    loop {
        let mut seen: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
        for peer in peers {
            // A node that is still starting does not answer yet: try again next round.
            let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(2), try_status(peer)).await
            else {
                continue;
            };
            for shard in response.shards {
                seen.entry(shard.shard)
                    .or_default()
                    .push((shard.applied, shard.digest));
            }
        }
        let converged = seen.len() == usize::try_from(SHARDS).expect("small")
            && seen
                .values()
                .all(|v| v.len() == peers.len() && v.iter().all(|x| *x == v[0]));
        if converged {
            return seen.into_iter().map(|(s, v)| (s, v[0].clone())).collect();
        }
        assert!(
            started.elapsed() < timeout,
            "replicas did not converge within {timeout:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three in-process nodes: each shard elects a leader, leaders spread over the nodes, forwarded
/// batches routed through any node commit, and every replica ends with the same digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_commit_and_converge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let config =
            courier_node::Config::parse(&fast_config(id, &dir.path().join(format!("n{id}"))))
                .expect("config");
        nodes.push(courier_node::start(config).await.expect("start"));
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    {
        tracing::info!("bootstrap from node 1; a retry with the same members is accepted");
        init(&peers).await;
        init(&peers).await;
    }
    let leaders = wait_leaders(&peers, Duration::from_secs(20)).await;
    {
        tracing::info!("leaders are spread: more than one node leads a shard");
        let distinct: std::collections::BTreeSet<u64> = leaders.values().copied().collect();
        assert!(
            distinct.len() >= 2,
            "leaders spread over nodes: {leaders:?}"
        );
    }
    {
        tracing::info!(
            "forward 3 batches of 20 to every shard through node 2 (routing to leaders)"
        );
        for shard in 0..SHARDS {
            for batch in 0..3_u64 {
                let stored = forward(&peers[1], shard, 1 + batch * 20, 20)
                    .await
                    .expect("forward commits");
                assert_eq!(stored, 20 * (batch + 1));
            }
            tracing::info!("a retried batch is answered without applying twice");
            assert_eq!(forward(&peers[2], shard, 21, 20).await.expect("retry"), 40);
        }
    }
    let converged = wait_converged(&peers, Duration::from_secs(20)).await;
    for (shard, (applied, _)) in &converged {
        assert!(
            *applied >= 4,
            "shard {shard} applied its entries: {applied}"
        );
    }
    {
        tracing::info!(
            "a linearizable read on each shard's leader sees all 60; a follower refuses it"
        );
        use courier_node::cluster::ReadConsistency;
        for (shard, leader) in &leaders {
            let shard_id = courier_proto::ShardId::new(u16::try_from(*shard).expect("small"));
            let leader_node = &nodes[usize::try_from(*leader - 1).expect("small")];
            leader_node
                .cluster()
                .read_barrier(shard_id, ReadConsistency::Linearizable)
                .await
                .expect("leader read");
            assert_eq!(inbox_tail(leader_node, *shard, 100 + u64::from(*shard)), 60);
            let follower = nodes
                .iter()
                .find(|n| n.peer_addr != leader_node.peer_addr)
                .expect("a follower");
            let refused = follower
                .cluster()
                .read_barrier(shard_id, ReadConsistency::Linearizable)
                .await;
            assert!(
                refused.is_err(),
                "a follower cannot serve a linearizable read"
            );
            tracing::info!("a follower serves a read at the leader's applied index");
            let index = courier_proto::LogIndex::new(converged[shard].0);
            follower
                .cluster()
                .read_barrier(shard_id, ReadConsistency::AtLeast(index))
                .await
                .expect("follower read");
            assert_eq!(inbox_tail(follower, *shard, 100 + u64::from(*shard)), 60);
        }
    }
    {
        tracing::info!("/metrics exports apply lag and outbox length per shard");
        let text = crate::support::scrape(nodes[0].metrics_addr.expect("metrics configured")).await;
        for shard in 0..SHARDS {
            assert!(
                text.contains(&format!(
                    "courier_shard_apply_lag_entries{{shard=\"{shard}\"}}"
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "courier_shard_outbox_len_entries{{shard=\"{shard}\"}} 0"
                )),
                "{text}"
            );
        }
        assert!(
            text.contains(&format!("courier_node_shard_replicas{{}} {SHARDS}")),
            "{text}"
        );
        // The same scrape's per-shard leader flags add up to the node's leader count.
        let leads = text
            .lines()
            .filter(|line| line.starts_with("courier_shard_is_leader{") && line.ends_with(" 1"))
            .count();
        assert!(
            text.contains(&format!("courier_node_shard_leaders{{}} {leads}")),
            "the node leads {leads}: {text}"
        );
        // The messages just sent are still in the log cache, within its default budget.
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{name}{{}} ")))
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        let (cached, max) = (
            value("courier_node_log_cache_bytes"),
            value("courier_node_log_cache_bytes_max"),
        );
        assert_eq!(max, 256 << 20, "raft.log-cache-bytes-max's default");
        assert!(cached > 0 && cached <= max, "{cached} of {max}");
    }
    {
        tracing::info!("every message was stored exactly once: 60 per shard on every replica");
        for node in &nodes {
            let db = node.groups().list();
            assert!(
                db.len() == usize::try_from(SHARDS).expect("small") + 1,
                "metadata + shards"
            );
        }
        let status = status(&peers[0]).await;
        for shard in status.shards {
            assert!(
                shard.fsyncs > 0 && shard.entries_appended >= shard.fsyncs,
                "{shard:?}"
            );
        }
    }
    for node in nodes {
        node.stop().await;
    }
}

/// Fast elections for tests; snapshots every 50 entries, keeping 10, so a lagging node is caught
/// up by snapshot.
pub(crate) fn fast_config(id: u64, dir: &std::path::Path) -> String {
    with_fast_raft(config_text(id, dir))
}

/// Adds fast raft timing to a config.
pub(crate) fn with_fast_raft(config: String) -> String {
    with_limits(config, 10_000)
}

/// As [`with_limits`] at 10,000 sends a second, with a slower heartbeat and elections for tests
/// whose raft entries reach the largest size (1 MiB): openraft gives an append-entries call one
/// heartbeat interval, and a maximal entry crosses in a few ms in a release build but not always
/// within the tests' 50 ms in a debug build on a busy machine (it is then sent again until it
/// does, and the followers' elections start meanwhile).
pub(crate) fn with_slow_heartbeat(text: String) -> String {
    with_limits(text, 10_000)
        .replace("heartbeat = \"50ms\"", "heartbeat = \"250ms\"")
        .replace(
            "election-timeout-min = \"300ms\"",
            "election-timeout-min = \"1500ms\"",
        )
        .replace(
            "election-timeout-max = \"600ms\"",
            "election-timeout-max = \"3000ms\"",
        )
}

/// Adds fast raft timing and a per-device send rate (tests that send fast lift the default 20/s).
pub(crate) fn with_limits(config: String, sends_per_second: u32) -> String {
    let config = format!(
        "{config}\n[limits]\nsends-per-second-per-device = {sends_per_second}\nsend-burst-per-device = {sends_per_second}\npresence-lookups-per-second-per-device = 1000\npresence-lookup-burst-per-device = 1000\n"
    );
    format!(
        "{}\n[raft]\nheartbeat = \"50ms\"\nelection-timeout-min = \"300ms\"\nelection-timeout-max = \"600ms\"\nrpc-timeout = \"1s\"\nsnapshot-logs-since-last = 50\nlogs-to-keep = 10\n",
        config
    )
}

/// Node processes on fixed ports (a restarted node must come back at the address its peers know),
/// with fast raft timing.
pub(crate) struct Processes {
    pub(crate) procs: Vec<NodeProcess>,
    pub(crate) addrs: Vec<crate::support::Addrs>,
    pub(crate) peers: Vec<String>,
    root: tempfile::TempDir,
    ports: BTreeMap<u64, (u16, u16)>,
    /// Appended to every node's configuration.
    extra_config: String,
}

impl Processes {
    /// Starts `n` nodes, bootstraps the cluster and waits for every shard's leader.
    pub(crate) async fn start_initialized(n: u64) -> (Self, BTreeMap<u32, u64>) {
        Self::start_initialized_with(n, "").await
    }

    /// As [`Processes::start_initialized`], with `extra_config` appended to every node's
    /// configuration (whole TOML tables).
    pub(crate) async fn start_initialized_with(
        n: u64,
        extra_config: &str,
    ) -> (Self, BTreeMap<u32, u64>) {
        let this = Self::start_uninitialized(n, extra_config);
        init(&this.peers).await;
        let leaders = wait_leaders(&this.peers, Duration::from_secs(30)).await;
        (this, leaders)
    }

    /// Starts `n` nodes (ids 1..=n), up and listening, with no cluster bootstrapped.
    pub(crate) fn start_uninitialized(n: u64, extra_config: &str) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let ports: BTreeMap<u64, (u16, u16)> =
            (1..=n).map(|id| (id, (free_port(), free_port()))).collect();
        let mut this = Self {
            procs: Vec::new(),
            addrs: Vec::new(),
            peers: Vec::new(),
            root,
            ports,
            extra_config: extra_config.to_owned(),
        };
        let mut procs: Vec<NodeProcess> = (1..=n).map(|id| this.spawn(id)).collect();
        for (id, proc) in (1..=n).zip(procs.iter_mut()) {
            let addrs = match proc.addrs_or_exit(Duration::from_secs(20)) {
                Some(addrs) => addrs,
                None => {
                    let (again, addrs) = this.spawn_on_free_ports(id);
                    *proc = again;
                    addrs
                }
            };
            this.addrs.push(addrs);
        }
        this.procs = procs;
        this.peers = this.addrs.iter().map(|a| a.peer.clone()).collect();
        this
    }

    fn spawn(&self, id: u64) -> NodeProcess {
        let ports = self.ports.clone();
        let extra = self.extra_config.clone();
        let make_config = move |id: u64, data_dir: &std::path::Path| {
            let (client, peer) = ports[&id];
            format!(
                "{}\n{extra}",
                with_fast_raft(config_on_ports(id, data_dir, client, peer))
            )
        };
        NodeProcess::start_with(id, self.root.path(), &make_config)
    }

    /// Starts a new node `id` on fresh ports whose data directory may already hold a restored
    /// database; returns its index. It is not a member until added.
    pub(crate) fn start_new(&mut self, id: u64) -> usize {
        let (proc, addrs) = self.spawn_on_free_ports(id);
        self.peers.push(addrs.peer.clone());
        self.addrs.push(addrs);
        self.procs.push(proc);
        self.procs.len() - 1
    }

    /// Starts node `id` on new free ports, choosing others when the node exits before it is up (a
    /// port taken between [`free_port`] and the node's bind, by a test running alongside): up to
    /// five tries.
    fn spawn_on_free_ports(&mut self, id: u64) -> (NodeProcess, crate::support::Addrs) {
        for _ in 0..5 {
            self.ports.insert(id, (free_port(), free_port()));
            let mut proc = self.spawn(id);
            if let Some(addrs) = proc.addrs_or_exit(Duration::from_secs(20)) {
                return (proc, addrs);
            }
            tracing::warn!(id, "node exited before it was up; trying other ports");
        }
        panic!("node {id} did not come up on five sets of free ports");
    }

    /// The directory the nodes' data directories sit in (and their shared log archive).
    pub(crate) fn root(&self) -> &std::path::Path {
        self.root.path()
    }

    /// The data directory node `id` has (or will have).
    pub(crate) fn data_dir_of(&self, id: u64) -> std::path::PathBuf {
        self.root.path().join(format!("node{id}"))
    }

    /// SIGKILLs the node at `index`.
    pub(crate) fn kill(&mut self, index: usize) {
        self.procs[index].child.kill().expect("SIGKILL");
        self.procs[index].child.wait().expect("reaped");
    }

    /// Restarts the node at `index` on its ports and data directory.
    pub(crate) fn restart(&mut self, index: usize) {
        let id = u64::try_from(index).expect("small") + 1;
        self.procs[index] = self.spawn(id);
        wait_addrs(&self.procs[index].data_dir, Duration::from_secs(20));
    }
}

/// Three `courier-node` processes: writes flow, the node leading shard 0 is SIGKILLed, its
/// shards elect new leaders and accept writes again; the node restarts and catches up (by
/// snapshot: it missed more than the log keeps) and every replica converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_leader_fails_over_and_the_node_catches_up() {
    let (mut cluster, leaders) = Processes::start_initialized(3).await;
    let peers = cluster.peers.clone();
    let mut next_pos: BTreeMap<u32, u64> = (0..SHARDS).map(|s| (s, 1)).collect();
    for shard in 0..SHARDS {
        let pos = next_pos[&shard];
        forward(&peers[0], shard, pos, 10)
            .await
            .expect("writes before the kill");
        next_pos.insert(shard, pos + 10);
    }

    let victim = leaders[&0];
    let victim_index = usize::try_from(victim - 1).expect("small");
    let survivors: Vec<String> = peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim_index)
        .map(|(_, p)| p.clone())
        .collect();
    let led: Vec<u32> = leaders
        .iter()
        .filter(|(_, l)| **l == victim)
        .map(|(s, _)| *s)
        .collect();
    let victim_applied_at_kill = status(&peers[victim_index])
        .await
        .shards
        .iter()
        .map(|s| s.applied)
        .max()
        .unwrap_or(0);
    let killed_at = Instant::now();
    cluster.kill(victim_index);
    {
        tracing::info!("the shards the victim led accept writes again through a survivor");
        for &shard in &led {
            loop {
                let pos = next_pos[&shard];
                match forward(&survivors[0], shard, pos, 10).await {
                    Ok(_) => {
                        next_pos.insert(shard, pos + 10);
                        break;
                    }
                    Err(status) => {
                        assert!(
                            killed_at.elapsed() < Duration::from_secs(15),
                            "shard {shard} still refuses writes: {status}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        let failover = killed_at.elapsed();
        eprintln!(
            "failover: shards {led:?} accepted writes {failover:?} after SIGKILL of node {victim}"
        );
    }
    {
        tracing::info!("keep writing past the snapshot threshold while the victim is down");
        for shard in 0..SHARDS {
            for _ in 0..70 {
                let pos = next_pos[&shard];
                forward(&survivors[0], shard, pos, 2)
                    .await
                    .expect("writes with one node down");
                next_pos.insert(shard, pos + 2);
            }
        }
        tracing::info!("the survivors snapshotted and purged past what the victim has");
        // Purging follows the snapshot asynchronously: wait for it, up to 20 s.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let survivor = status(&survivors[0]).await;
            let behind: Vec<_> = survivor
                .shards
                .iter()
                .filter(|s| s.purged_index <= victim_applied_at_kill)
                .collect();
            if behind.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "shards not purged past the victim: {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    {
        tracing::info!("restart the victim: it catches up and every replica converges");
        cluster.restart(victim_index);
        let converged = wait_converged(&peers, Duration::from_secs(60)).await;
        eprintln!("converged after restart: {converged:?}");
    }
    let victim_status = status(&peers[victim_index]).await;
    for shard in victim_status.shards {
        assert!(
            shard.applied > 50,
            "shard {} caught up: {shard:?}",
            shard.shard
        );
    }
}

/// Returns the inbox tail of `user` on `shard` in a node's database.
fn inbox_tail(node: &courier_node::NodeHandle, shard: u32, user: u64) -> u64 {
    use courier_storage::kv::Staged;
    use courier_storage::projection::{Projection, View, inbox};
    let db = node.groups().db().clone();
    let mut staged = Staged::new(db.as_ref(), BTreeMap::new());
    let shard = courier_proto::ShardId::new(u16::try_from(shard).expect("small"));
    let view = View::new(
        &mut staged,
        shard,
        courier_proto::LogIndex::ZERO,
        Projection::Inbox,
    );
    inbox::tail(&view, courier_proto::UserId::new(user).expect("nonzero"))
        .expect("read")
        .get()
}

/// Leaders per node in an agreed leader map (every node of `nodes` listed).
fn leaders_per_node(leaders: &BTreeMap<u32, u64>, nodes: u64) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = (1..=nodes).map(|n| (n, 0)).collect();
    for leader in leaders.values() {
        *counts.entry(*leader).or_default() += 1;
    }
    counts
}

/// Three `courier-node` processes. Every shard's leadership is moved to node 1, as a failover
/// of the other two would leave it; `courier-ops leader rebalance --dry-run` only prints the
/// plan, then `leader rebalance` spreads the leaders again (within one of each other), a second
/// rebalance finds nothing to move, and every shard still commits a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_rebalance_spreads_what_a_failover_piled_on_one_node() {
    let (cluster, mut leaders) = Processes::start_initialized(3).await;
    let node1 = cluster.peers[0].clone();
    let started = Instant::now();
    while leaders.values().any(|leader| *leader != 1) {
        for (shard, leader) in &leaders {
            if *leader != 1 {
                let shard = shard.to_string();
                let (code, _, stderr) = crate::support::ops(&[
                    "leader", "transfer", "--addr", &node1, "--node", "1", "--shard", &shard,
                ]);
                assert_eq!(code, 0, "transfer: {stderr}");
            }
        }
        // Longer than the leader lease (election-timeout-max, 600 ms here): an election asked
        // for while the current leader's lease runs is refused, and asking again too soon after
        // the old leader won the next election back finds a fresh lease every time.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        leaders = wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node 1 did not take every shard: {leaders:?}"
        );
    }

    let (code, stdout, stderr) =
        crate::support::ops(&["leader", "rebalance", "--addr", &node1, "--dry-run"]);
    assert_eq!(code, 0, "dry run: {stdout}{stderr}");
    assert!(stdout.contains("plan: "), "{stdout}");
    let unchanged = wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
    assert!(
        unchanged.values().all(|l| *l == 1),
        "a dry run moved {unchanged:?}"
    );

    let (code, stdout, stderr) =
        crate::support::ops(&["leader", "rebalance", "--addr", &cluster.peers[1]]);
    assert_eq!(code, 0, "rebalance: {stdout}{stderr}");
    let after = wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
    let counts = leaders_per_node(&after, 3);
    let (min, max) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    assert!(max - min <= 1, "leaders not balanced: {counts:?}\n{stdout}");

    let (code, stdout, _) = crate::support::ops(&["leader", "rebalance", "--addr", &node1]);
    assert_eq!(code, 0);
    assert!(stdout.contains("nothing to move"), "{stdout}");
    // The status's placement table shows the same: every node holds every shard, leaders spread.
    // (Status and leaders are read apart: an election in between is read again, a few times.)
    for attempt in 1.. {
        let (code, stdout, _) = crate::support::ops(&["cluster", "status", "--addr", &node1]);
        assert_eq!(code, 0, "{stdout}");
        let leaders = wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
        let missing: Vec<String> = leaders_per_node(&leaders, 3)
            .into_iter()
            .map(|(node, leads)| format!("node {node}: {SHARDS} replicas, leads {leads}"))
            .filter(|line| !stdout.contains(line))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(attempt < 5, "no {missing:?} in\n{stdout}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for dest in 0..SHARDS {
        let applied = forward(&node1, dest, 1, 1).await.expect("a write commits");
        assert!(applied > 0);
    }
}

/// Three `courier-node` processes with the automatic rebalancer on
/// (`cluster.leader-rebalance-interval`). Node 3 is SIGKILLed, so the shard it led fails over to
/// nodes 1 and 2; when it restarts it leads nothing, and without the rebalancer it would stay so.
/// Node 3's own rebalancer takes its share again (a node only elects itself): every node's
/// leader count ends within one of the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automatic_rebalancer_gives_a_restarted_node_its_leaders_back() {
    let (mut cluster, _) =
        Processes::start_initialized_with(3, "[cluster]\nleader-rebalance-interval = \"2s\"").await;
    cluster.kill(2);
    let survivors = cluster.peers[..2].to_vec();
    let started = Instant::now();
    loop {
        // The survivors name node 3 until they elect a new leader for its shard.
        let failed_over = wait_leaders(&survivors, Duration::from_secs(30)).await;
        if failed_over.values().all(|l| *l != 3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failover: {failed_over:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.restart(2);
    let started = Instant::now();
    loop {
        let leaders = wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
        let counts = leaders_per_node(&leaders, 3);
        let (min, max) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        if max - min <= 1 && counts[&3] > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the restarted node got no leaders back: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Grows the cluster 3 -> 4 and shrinks it back while a writer keeps forwarding: every
/// acknowledged message is stored exactly once on every replica, including the new node while it
/// was a member; removing below 3 voters is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_four_and_shrink_back_while_writing() {
    use courier_proto::pb::peer::{AddNodeRequest, RemoveNodeRequest};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    for id in 1..=4 {
        let config =
            courier_node::Config::parse(&fast_config(id, &dir.path().join(format!("n{id}"))))
                .expect("config");
        nodes.push(courier_node::start(config).await.expect("start"));
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    init(&peers[..3]).await;
    wait_leaders(&peers[..3], Duration::from_secs(20)).await;

    let writer_peer = peers[0].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked: BTreeMap<u32, u64> = BTreeMap::new();
            let mut next: BTreeMap<u32, u64> = (0..SHARDS).map(|s| (s, 1)).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for shard in 0..SHARDS {
                    let pos = next[&shard];
                    // A failed or unknown attempt is retried at the same position (dedup makes
                    // the retry safe).
                    if let Ok(stored) = forward(&writer_peer, shard, pos, 5).await {
                        acked.insert(shard, stored);
                        next.insert(shard, pos + 5);
                    }
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        tracing::info!("add node 4 through node 2 while the writer runs");
        let node4 = NodeInfo {
            node_id: 4,
            peer_addr: peers[3].clone(),
            client_addr: String::new(),
        };
        AdminClient::new(peer_channel(&peers[1]).await)
            .add_node(AddNodeRequest {
                node: Some(node4),
                group: None,
            })
            .await
            .expect("add node 4");
        let status = status(&peers[0]).await;
        for shard in &status.shards {
            assert_eq!(
                shard.replicas,
                vec![1, 2, 3, 4],
                "shard {} has four voters",
                shard.shard
            );
        }
        ForwardClient::new(connect(&peers[0], peer_tls("node-4")).await)
            .typing(courier_proto::pb::peer::TypingRequest::default())
            .await
            .expect("a member's certificate is served");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    assert!(
        acked.values().all(|stored| *stored >= 10),
        "the writer made progress on every shard: {acked:?}"
    );
    {
        tracing::info!("all four replicas converge and hold every acknowledged message once");
        wait_converged(&peers, Duration::from_secs(30)).await;
        for node in &nodes {
            for (shard, stored) in &acked {
                assert_eq!(
                    inbox_tail(node, *shard, 100 + u64::from(*shard)),
                    *stored,
                    "shard {shard} on node at {}",
                    node.peer_addr
                );
            }
        }
    }
    {
        tracing::info!("remove node 4 again; a further removal below 3 voters is refused");
        AdminClient::new(peer_channel(&peers[2]).await)
            .remove_node(RemoveNodeRequest {
                node_id: 4,
                group: None,
            })
            .await
            .expect("remove node 4");
        let status = status(&peers[0]).await;
        for shard in &status.shards {
            assert_eq!(
                shard.replicas,
                vec![1, 2, 3],
                "shard {} is back to three voters",
                shard.shard
            );
        }
        let removed = ForwardClient::new(connect(&peers[0], peer_tls("node-4")).await)
            .typing(courier_proto::pb::peer::TypingRequest::default())
            .await
            .expect_err("a removed node's certificate is refused");
        assert_eq!(
            crate::messaging::code_of(&removed),
            "COURIER:Peer:NotAMember",
            "{removed:?}"
        );
        let refused = AdminClient::new(peer_channel(&peers[0]).await)
            .remove_node(RemoveNodeRequest {
                node_id: 3,
                group: None,
            })
            .await
            .expect_err("2 voters would remain");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
        let more = forward(&peers[0], 0, acked[&0] + 1, 5)
            .await
            .expect("writes after shrinking");
        assert_eq!(more, acked[&0] + 5);
    }
    for node in nodes {
        node.stop().await;
    }
}

/// A backup taken while writes flow is a consistent database: every shard in the checkpoint
/// verifies against a replay of its own log, and an existing target is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_a_consistent_checkpoint() {
    let (cluster, _) = Processes::start_initialized(3).await;
    let peers = cluster.peers.clone();
    let writer = {
        let peer = peers[0].clone();
        tokio::spawn(async move {
            for round in 0..10_u64 {
                for shard in 0..SHARDS {
                    let _ = forward(&peer, shard, 1 + round * 5, 5).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let backup = cluster.procs[2].data_dir.with_file_name("node3-backup");
    let response = AdminClient::new(peer_channel(&peers[2]).await)
        .backup(courier_proto::pb::peer::BackupRequest {
            dir: backup.display().to_string(),
        })
        .await
        .expect("backup")
        .into_inner();
    assert_eq!(
        response.shards.len(),
        usize::try_from(SHARDS).expect("small")
    );
    let refused = AdminClient::new(peer_channel(&peers[2]).await)
        .backup(courier_proto::pb::peer::BackupRequest {
            dir: backup.display().to_string(),
        })
        .await
        .expect_err("an existing directory is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let outside = std::env::temp_dir().join(format!("courier-outside-{}", std::process::id()));
    for dir in [outside.display().to_string(), "../escape".to_owned()] {
        let refused = AdminClient::new(peer_channel(&peers[2]).await)
            .backup(courier_proto::pb::peer::BackupRequest { dir: dir.clone() })
            .await
            .expect_err("a directory outside the backup root is refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{dir}");
        assert_eq!(crate::messaging::code_of(&refused), "COURIER:Backup:Dir");
    }
    assert!(!outside.exists(), "nothing written outside the root");
    writer.await.expect("writer");
    {
        tracing::info!("every shard in the checkpoint equals a replay of its log");
        use courier_storage::{Db, LogStore, OpenMode, Projection, ShardState, rebuild};
        let db = std::sync::Arc::new(
            Db::open(&backup, OpenMode::ReadOnly).expect("the checkpoint opens"),
        );
        for shard in 0..SHARDS {
            let shard = courier_proto::ShardId::new(u16::try_from(shard).expect("small"));
            let live = ShardState::load(db.as_ref(), shard).expect("load");
            let log = LogStore::new(db.clone(), shard);
            let rebuilt = rebuild::replay_from_start(&log, live.applied).expect("replay");
            for comparison in rebuild::compare(db.as_ref(), &live, &rebuilt, &Projection::ALL, 3)
                .expect("compare")
            {
                assert!(comparison.is_equal(), "{shard}: {comparison:?}");
            }
        }
    }
}

/// The format of the newest entry with events in `shard`'s log on the node at `peer`.
async fn newest_format(peer: &str, shard: u32) -> u32 {
    let page = AdminClient::new(peer_channel(peer).await)
        .read_log(courier_proto::pb::peer::ReadLogRequest {
            shard,
            from: 0,
            to: 0,
            limit: 0,
        })
        .await
        .expect("read log")
        .into_inner();
    assert!(
        page.last <= page.entries.last().map_or(0, |e| e.index),
        "one page"
    );
    page.entries
        .iter()
        .rev()
        .find_map(|entry| entry.events.as_ref())
        .expect("an entry with events")
        .format_version
}

/// A cluster created at event format 1 (as by a build before format 2) writes format 1 until
/// the operator raises it, which `cluster raise-format` does only while every member answers
/// with a build that reads format 2; every node's leaders then write format 2. A raise never
/// lowers the format and refuses one past the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_format_is_raised_only_when_every_member_reads_it() {
    use courier_proto::FORMAT_VERSION;
    use courier_proto::pb::peer::RaiseEventFormatRequest;

    let mut cluster = Processes::start_uninitialized(3, "");
    let peers = cluster.peers.clone();
    let response = AdminClient::new(peer_channel(&peers[0]).await)
        .init_cluster(InitClusterRequest {
            event_format: 1,
            ..init_request(&peers, PHONE_KEY.to_vec())
        })
        .await
        .expect("init")
        .into_inner();
    assert_eq!(response.event_format, 1);
    wait_leaders(&peers, Duration::from_secs(30)).await;
    for peer in &peers {
        let status = status(peer).await;
        assert_eq!(
            (status.event_format, status.event_format_max),
            (1, FORMAT_VERSION)
        );
    }
    forward(&peers[0], 0, 1, 1).await.expect("forward");
    assert_eq!(
        newest_format(&peers[0], 0).await,
        1,
        "written as the cluster's format"
    );

    cluster.kill(2);
    let unreachable = AdminClient::new(peer_channel(&peers[0]).await)
        .raise_event_format(RaiseEventFormatRequest::default())
        .await
        .expect_err("a member did not answer");
    assert_eq!(unreachable.code(), tonic::Code::Unavailable);
    assert_eq!(
        crate::messaging::code_of(&unreachable),
        "COURIER:Cluster:MemberUnreachable"
    );
    assert_eq!(status(&peers[1]).await.event_format, 1, "nothing changed");
    cluster.restart(2);

    let deadline = Instant::now() + Duration::from_secs(30);
    let stdout = loop {
        let (code, stdout, stderr) =
            crate::support::ops(&["cluster", "raise-format", "--addr", &peers[1]]);
        if code == 0 {
            break stdout;
        }
        assert!(
            stderr.contains("MemberUnreachable") && Instant::now() < deadline,
            "{stdout}{stderr}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        stdout.contains(&format!("event format {FORMAT_VERSION}")),
        "{stdout}"
    );
    for peer in &peers {
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(peer).await.event_format != FORMAT_VERSION {
            assert!(Instant::now() < deadline, "{peer} never applied the raise");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    forward(&peers[0], 0, 2, 1).await.expect("forward");
    assert_eq!(newest_format(&peers[0], 0).await, FORMAT_VERSION);

    let mut admin = AdminClient::new(peer_channel(&peers[2]).await);
    let lower = admin
        .raise_event_format(RaiseEventFormatRequest {
            event_format: 1,
            leader_only: false,
        })
        .await
        .expect("a lower format changes nothing")
        .into_inner();
    assert_eq!(lower.event_format, FORMAT_VERSION, "never lowered");
    let unknown = admin
        .raise_event_format(RaiseEventFormatRequest {
            event_format: FORMAT_VERSION + 1,
            leader_only: false,
        })
        .await
        .expect_err("past this build");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        crate::messaging::code_of(&unknown),
        "COURIER:Cluster:UnknownFormat"
    );
}
