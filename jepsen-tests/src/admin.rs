//! Talking to the nodes' Admin service and building gRPC channels: bootstrap, leaders, replica
//! status and the "projection == rebuild from log" verification.
//!
//! Every call has a deadline: a SIGSTOPped node accepts TCP connections (the kernel answers
//! for it) but never replies, so an unbounded call would hang the harness.

use std::collections::BTreeMap;
use std::time::Duration;

// tokio's clock: real time in a jepsen run, simulated time in courier-sim.
use tokio::time::Instant;

use anyhow::{Context as _, bail};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::{
    AddNodeRequest, InitClusterRequest, MoveShardRequest, MoveShardResponse, NodeInfo,
    RemoveNodeRequest, ShardStatus, StatusRequest, StatusResponse, VerifyProjectionRequest,
    projection_job_update,
};
use courier_tls::ClientTlsConfig;
use tonic::transport::{Channel, Endpoint};

use crate::nodes::NodeSpec;

/// Deadline of one Status call.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of one whole VerifyProjection job (it replays the shard's log).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one AddNode / RemoveNode call (adding waits for the learner to catch up on every
/// shard).
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one MoveShard call (the new replica catches up before it becomes a voter).
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a verify that met a purged range the archive does not hold yet is retried.
pub const ARCHIVE_CATCH_UP: Duration = Duration::from_secs(30);
/// Pause between polls while waiting for leaders or convergence.
const POLL_PAUSE: Duration = Duration::from_millis(250);

/// A lazily connecting channel to a client listener at `addr` (`host:port`). HTTP/2 keepalive
/// pings detect a dead or paused peer within a few seconds, so streams on it fail instead of
/// hanging forever.
///
/// # Errors
///
/// `addr` is not a valid authority.
pub fn channel(addr: &str) -> anyhow::Result<Channel> {
    let tls = crate::tls::current().map(|tls| tls.phone.clone());
    Ok(secured(addr, tls)?.connect_lazy())
}

/// As [`channel`], to a peer listener, as the operator.
///
/// # Errors
///
/// `addr` is not a valid authority.
pub fn peer_channel(addr: &str) -> anyhow::Result<Channel> {
    let tls = crate::tls::current().map(|tls| tls.operator.clone());
    Ok(secured(addr, tls)?.connect_lazy())
}

/// [`endpoint`] with `tls` (`None`: plaintext).
fn secured(addr: &str, tls: Option<ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    let Some(tls) = tls else {
        return endpoint(addr);
    };
    Ok(Endpoint::from_shared(format!("https://{addr}"))
        .with_context(|| format!("{addr:?} is not host:port"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true))
}

/// The clients' endpoint settings for `addr` (`host:port`): connect timeout 1 s, HTTP/2
/// keepalive every second, dead after 2 s without an answer. courier-sim connects it over its
/// simulated network.
///
/// # Errors
///
/// `addr` is not a valid authority.
pub fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("{addr:?} is not host:port"))?
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true))
}

/// A short description of a status: code, courier code, message.
pub fn describe(status: &tonic::Status) -> String {
    let code = status
        .metadata()
        .get("courier-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    format!("{:?} {code}: {}", status.code(), status.message())
}

/// Admin client for one node.
#[derive(Clone, Debug)]
pub struct AdminNode {
    /// The node id.
    pub id: u32,
    client: AdminClient<Channel>,
}

impl AdminNode {
    /// A client for `spec`'s peer address.
    ///
    /// # Errors
    ///
    /// The address is malformed.
    pub fn new(spec: &NodeSpec) -> anyhow::Result<Self> {
        Ok(Self::over(spec.id, peer_channel(&spec.peer_addr())?))
    }

    /// A client for node `id` over `channel` (the simulation's network).
    pub fn over(id: u32, channel: Channel) -> Self {
        Self {
            id,
            client: AdminClient::new(channel),
        }
    }

    /// `Admin.Status`, within [`STATUS_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// Timeout or RPC error.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        let mut client = self.client.clone();
        let response = tokio::time::timeout(STATUS_TIMEOUT, client.status(StatusRequest {}))
            .await
            .with_context(|| format!("node {} status timed out", self.id))?
            .map_err(|s| anyhow::anyhow!("node {} status: {}", self.id, describe(&s)))?;
        Ok(response.into_inner())
    }

    /// `Admin.VerifyProjection` of every projection of `shard`, from index 1, retried for up
    /// to [`ARCHIVE_CATCH_UP`] while the replica answers `COURIER:Log:Purged`: a replica that
    /// installed a snapshot holds its log only above it, and reads the rest from the run's
    /// archive once a replica that held those entries copied their segment there.
    pub async fn verify(&self, shard: u32) -> Verification {
        let deadline = Instant::now() + ARCHIVE_CATCH_UP;
        loop {
            let verification = self.verify_once(shard).await;
            if verification.ok
                || !verification.detail.contains("COURIER:Log:Purged")
                || Instant::now() >= deadline
            {
                return verification;
            }
            tracing::info!(
                node = self.id,
                shard,
                "verify met a range not archived yet; retrying"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One verify: reads the job's stream up to its result. An RPC failure is `ok = false` with
    /// the error as detail, because an unverifiable replica must not pass.
    async fn verify_once(&self, shard: u32) -> Verification {
        let mut client = self.client.clone();
        let job = async move {
            // From index 1, always: the checker attests the whole log, not a checkpoint.
            let request = VerifyProjectionRequest {
                shard,
                projection: String::new(),
                from_genesis: true,
            };
            let mut updates = client
                .verify_projection(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            while let Some(update) = updates.message().await.map_err(|s| describe(&s))? {
                // Progress updates are skipped; the result ends the job.
                if let Some(projection_job_update::Update::Verified(verified)) = update.update {
                    return Ok(verified);
                }
            }
            Err("the job's stream ended without a result".to_owned())
        };
        let failed = |detail: String| Verification {
            ok: false,
            detail,
            applied_index: None,
            digests: BTreeMap::new(),
        };
        let verified = match tokio::time::timeout(VERIFY_TIMEOUT, job).await {
            Err(_) => return failed(format!("verification timed out after {VERIFY_TIMEOUT:?}")),
            Ok(Err(error)) => return failed(format!("verification failed: {error}")),
            Ok(Ok(verified)) => verified,
        };
        let digests = verified
            .digests
            .iter()
            .map(|d| (d.projection.clone(), crate::hex(&d.digest)))
            .collect();
        let ok = verified.mismatches.is_empty();
        let detail = if ok {
            format!(
                "applied index {}, {} events replayed, {} projections equal",
                verified.applied_index,
                verified.events_replayed,
                verified.digests.len()
            )
        } else {
            let first: Vec<String> = verified
                .mismatches
                .iter()
                .take(3)
                .map(|m| {
                    format!(
                        "{} from index {} key {}",
                        m.projection,
                        m.first_divergent_index,
                        crate::hex(&m.key)
                    )
                })
                .collect();
            format!(
                "{} mismatches at applied index {}: {}",
                verified.mismatches.len(),
                verified.applied_index,
                first.join("; ")
            )
        };
        Verification {
            ok,
            detail,
            applied_index: Some(verified.applied_index),
            digests,
        }
    }
}

/// The outcome of one replica's verification.
#[derive(Clone, Debug)]
pub struct Verification {
    /// True if every live projection matched its rebuild.
    pub ok: bool,
    /// A summary, or what differed.
    pub detail: String,
    /// The applied index verified at, when the job finished.
    pub applied_index: Option<u64>,
    /// Projection name → hex digest of the live projection at that index.
    pub digests: BTreeMap<String, String>,
}

/// Bootstraps the cluster from the first node with every node as a member, retrying while the
/// nodes come up.
///
/// # Errors
///
/// Still failing after `timeout`.
pub async fn init_cluster(
    specs: &[NodeSpec],
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let first = specs.first().context("no nodes")?;
    let members: Vec<NodeInfo> = specs
        .iter()
        .map(|spec| NodeInfo {
            node_id: u64::from(spec.id),
            peer_addr: spec.peer_addr(),
            client_addr: spec.client_addr(),
        })
        .collect();
    init_cluster_over(peer_channel(&first.peer_addr())?, members, shards, timeout).await
}

/// `Admin.InitCluster` with `members` over `channel` (to the first member), retried every
/// 500 ms until it is accepted or `timeout` passes.
///
/// # Errors
///
/// Not accepted within `timeout`; the error is the last answer.
pub async fn init_cluster_over(
    channel: Channel,
    members: Vec<NodeInfo>,
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut client = AdminClient::new(channel);
    let started = Instant::now();
    loop {
        let request = InitClusterRequest {
            members: members.clone(),
            shard_count: shards,
            replication_factor: 0,
            init_shards: Vec::new(),
            phone_hash_key: Vec::new(),
            // The newest format every member reads.
            event_format: 0,
        };
        let error =
            match tokio::time::timeout(Duration::from_secs(10), client.init_cluster(request)).await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status)) => describe(&status),
                Err(_) => "timed out".to_owned(),
            };
        if started.elapsed() > timeout {
            bail!("InitCluster failed for {timeout:?}: {error}");
        }
        tracing::debug!(%error, "InitCluster not yet accepted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A membership change of the whole cluster (every group), sent to `via`'s admin API.
#[derive(Clone, Debug)]
pub enum MembershipChange {
    /// Add `spec`'s node: learner, caught up, then voter.
    Add(NodeSpec),
    /// Remove this node id.
    Remove(u32),
}

impl AdminNode {
    /// `Admin.AddNode` / `Admin.RemoveNode` through this node (which delegates to each group's
    /// leader), within [`MEMBERSHIP_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// Timeout or RPC error.
    pub async fn change_membership(&self, change: &MembershipChange) -> anyhow::Result<()> {
        let mut client = self.client.clone();
        let call = async {
            match change {
                MembershipChange::Add(spec) => client
                    .add_node(AddNodeRequest {
                        node: Some(NodeInfo {
                            node_id: u64::from(spec.id),
                            peer_addr: spec.peer_addr(),
                            client_addr: spec.client_addr(),
                        }),
                        group: None,
                    })
                    .await
                    .map(drop),
                MembershipChange::Remove(id) => client
                    .remove_node(RemoveNodeRequest {
                        node_id: u64::from(*id),
                        group: None,
                    })
                    .await
                    .map(drop),
            }
        };
        tokio::time::timeout(MEMBERSHIP_TIMEOUT, call)
            .await
            .with_context(|| format!("{change:?} via node {} timed out", self.id))?
            .map_err(|s| anyhow::anyhow!("{change:?} via node {}: {}", self.id, describe(&s)))
    }
}

impl AdminNode {
    /// `Admin.MoveShard`: one replica of `shard` from node `from` (this node) to node `to`,
    /// within [`MOVE_TIMEOUT`]. Sent again after a failure, a move resumes where it stopped.
    ///
    /// # Errors
    ///
    /// Timeout or RPC error.
    pub async fn move_shard(
        &self,
        shard: u32,
        from: u32,
        to: u32,
    ) -> anyhow::Result<MoveShardResponse> {
        let mut client = self.client.clone();
        let request = MoveShardRequest {
            shard,
            from_node: u64::from(from),
            to_node: u64::from(to),
            placement_only: false,
            readmit: false,
            readmit_term: 0,
        };
        let what = format!("move of shard {shard} from node {from} to node {to}");
        let response = tokio::time::timeout(MOVE_TIMEOUT, client.move_shard(request))
            .await
            .with_context(|| format!("{what} timed out"))?
            .map_err(|s| anyhow::anyhow!("{what}: {}", describe(&s)))?;
        Ok(response.into_inner())
    }
}

/// The shards `status`'s node holds a replica of: it is a voter of the shard's group, and placed
/// there when the cluster places shards (a node a replica moved away from may still run an
/// empty group of the shard, or one that never learned it was removed).
pub fn held(status: &StatusResponse) -> impl Iterator<Item = &ShardStatus> {
    let me = status.node_id;
    status.shards.iter().filter(move |shard| {
        shard.replicas.contains(&me)
            && (status.placement.is_empty()
                || status
                    .placement
                    .iter()
                    .any(|placed| placed.shard == shard.shard && placed.replicas.contains(&me)))
    })
}

/// Replicas per shard: the placement table's R when the cluster places shards, else `nodes`
/// (every shard on every member).
fn replicas_per_shard(statuses: &BTreeMap<u32, StatusResponse>, nodes: usize) -> usize {
    statuses
        .values()
        .find(|status| status.replication_factor > 0 && !status.placement.is_empty())
        .and_then(|status| usize::try_from(status.replication_factor).ok())
        .unwrap_or(nodes)
}

/// Every node's status, by node id (nodes that do not answer are missing).
pub async fn statuses(nodes: &[AdminNode]) -> BTreeMap<u32, StatusResponse> {
    let calls = nodes
        .iter()
        .map(|node| async move { (node.id, node.status().await) });
    let mut out = BTreeMap::new();
    for (id, result) in futures_util::future::join_all(calls).await {
        if let Ok(status) = result {
            out.insert(id, status);
        }
    }
    out
}

/// The shard → leader map if every node answers, each of the `shards` shards is held by as
/// many of them as it has replicas ([`held`]), and the holders of a shard agree on a non-zero
/// leader.
pub fn agreed_leaders(
    statuses: &BTreeMap<u32, StatusResponse>,
    nodes: usize,
    shards: u32,
) -> Option<BTreeMap<u32, u64>> {
    if statuses.len() < nodes {
        return None;
    }
    let mut leaders: BTreeMap<u32, u64> = BTreeMap::new();
    let mut holders: BTreeMap<u32, usize> = BTreeMap::new();
    for status in statuses.values() {
        for shard in held(status) {
            if shard.leader == 0 {
                return None;
            }
            if *leaders.entry(shard.shard).or_insert(shard.leader) != shard.leader {
                return None;
            }
            *holders.entry(shard.shard).or_default() += 1;
        }
    }
    let replicas = replicas_per_shard(statuses, nodes);
    let all_held = (0..shards).all(|shard| holders.get(&shard) == Some(&replicas));
    all_held.then_some(leaders)
}

/// Waits until every node reports a leader for every shard and they agree.
///
/// # Errors
///
/// Not within `timeout`; the error says what the nodes last reported.
pub async fn wait_leaders(
    nodes: &[AdminNode],
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<u32, u64>> {
    let started = Instant::now();
    loop {
        let statuses = statuses(nodes).await;
        if let Some(leaders) = agreed_leaders(&statuses, nodes.len(), shards) {
            return Ok(leaders);
        }
        if started.elapsed() > timeout {
            bail!(
                "no agreed leader for every shard within {timeout:?}; last status: {}",
                summarize(&statuses)
            );
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// True if every node answered and, per shard, as many holders ([`held`]) as it has replicas
/// report the same applied index.
pub fn converged(statuses: &BTreeMap<u32, StatusResponse>, nodes: usize) -> bool {
    if statuses.len() < nodes {
        return false;
    }
    let mut applied: BTreeMap<u32, u64> = BTreeMap::new();
    let mut holders: BTreeMap<u32, usize> = BTreeMap::new();
    for status in statuses.values() {
        for shard in held(status) {
            *holders.entry(shard.shard).or_default() += 1;
            // Every outbox forwarded (and trimmed): a message acked just before the heal may still
            // be on its way to the recipient's shard, and a drain must not start before it lands.
            if shard.outbox_len_entries > 0 {
                return false;
            }
            if *applied.entry(shard.shard).or_insert(shard.applied) != shard.applied {
                return false;
            }
        }
    }
    // Every shard any node runs a group of, held by all its replicas.
    let replicas = replicas_per_shard(statuses, nodes);
    statuses
        .values()
        .flat_map(|status| status.shards.iter().map(|shard| shard.shard))
        .all(|shard| holders.get(&shard) == Some(&replicas))
}

/// Polls until the replicas of every shard report the same applied index, or `timeout`.
/// Returns the last statuses and whether they converged (the caller records them either way:
/// the checker judges divergence).
pub async fn wait_converged(
    nodes: &[AdminNode],
    timeout: Duration,
) -> (BTreeMap<u32, StatusResponse>, bool) {
    let started = Instant::now();
    loop {
        let statuses = statuses(nodes).await;
        if converged(&statuses, nodes.len()) {
            return (statuses, true);
        }
        if started.elapsed() > timeout {
            return (statuses, false);
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// One line per node: `n1: s0 leader 2 applied 40, ...`.
pub fn summarize(statuses: &BTreeMap<u32, StatusResponse>) -> String {
    if statuses.is_empty() {
        return "no node answered".to_owned();
    }
    statuses
        .iter()
        .map(|(id, status)| {
            let shards: Vec<String> = status
                .shards
                .iter()
                .map(|s| {
                    format!(
                        "s{} {} leader {} applied {}",
                        s.shard, s.role, s.leader, s.applied
                    )
                })
                .collect();
            format!("n{id}: {}", shards.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use courier_proto::pb::peer::{ShardPlacement, ShardStatus, StatusResponse};

    use super::{agreed_leaders, converged, held};

    /// Node `node`'s status of a cluster placing shard 0 on nodes 1–3 and shard 1 on nodes 2–4;
    /// `groups` are the groups it runs: (shard, voters, leader, applied).
    fn status(node: u64, groups: &[(u32, &[u64], u64, u64)]) -> StatusResponse {
        StatusResponse {
            node_id: node,
            shards: groups
                .iter()
                .map(|(shard, voters, leader, applied)| ShardStatus {
                    shard: *shard,
                    leader: *leader,
                    replicas: voters.to_vec(),
                    applied: *applied,
                    ..ShardStatus::default()
                })
                .collect(),
            replication_factor: 3,
            placement: vec![
                ShardPlacement {
                    shard: 0,
                    replicas: vec![1, 2, 3],
                },
                ShardPlacement {
                    shard: 1,
                    replicas: vec![2, 3, 4],
                },
            ],
            ..StatusResponse::default()
        }
    }

    #[test]
    fn only_the_placed_voters_of_a_shard_count() {
        let placed = [(0, &[1_u64, 2, 3][..], 1, 7), (1, &[2, 3, 4][..], 4, 9)];
        // Node 1 still runs shard 1's group from before a move, with itself among the voters it
        // last heard of and a stale leader; node 4 runs an empty group of shard 0.
        let statuses: BTreeMap<u32, StatusResponse> = BTreeMap::from([
            (1, status(1, &[placed[0], (1, &[1, 3, 4], 1, 3)])),
            (2, status(2, &placed)),
            (3, status(3, &placed)),
            (4, status(4, &[(0, &[], 0, 0), placed[1]])),
        ]);
        assert_eq!(held(&statuses[&1]).count(), 1, "node 1 holds shard 0 only");
        assert_eq!(held(&statuses[&4]).count(), 1, "node 4 holds shard 1 only");
        assert_eq!(
            agreed_leaders(&statuses, 4, 2),
            Some(BTreeMap::from([(0, 1), (1, 4)]))
        );
        assert!(converged(&statuses, 4));
        // A placed replica that lags is not converged; one that does not report is not agreed.
        let mut lagging = statuses.clone();
        lagging.insert(3, status(3, &[placed[0], (1, &[2, 3, 4], 4, 8)]));
        assert!(!converged(&lagging, 4));
        let mut missing = statuses;
        missing.insert(3, status(3, &[placed[0]]));
        assert_eq!(agreed_leaders(&missing, 4, 2), None);
        assert!(!converged(&missing, 4), "a shard with 2 of its 3 replicas");
    }
}
