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
    AddNodeRequest, InitClusterRequest, NodeInfo, RemoveNodeRequest, StatusRequest, StatusResponse,
    VerifyProjectionRequest, projection_job_update,
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

/// The shard → leader map if every node answers, knows `shards` shards, and every shard has
/// the same non-zero leader on every node.
pub fn agreed_leaders(
    statuses: &BTreeMap<u32, StatusResponse>,
    nodes: usize,
    shards: u32,
) -> Option<BTreeMap<u32, u64>> {
    if statuses.len() < nodes {
        return None;
    }
    let mut leaders: BTreeMap<u32, u64> = BTreeMap::new();
    for status in statuses.values() {
        if status.shards.len() != usize::try_from(shards).ok()? {
            return None;
        }
        for shard in &status.shards {
            if shard.leader == 0 {
                return None;
            }
            if *leaders.entry(shard.shard).or_insert(shard.leader) != shard.leader {
                return None;
            }
        }
    }
    Some(leaders)
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

/// True if every node answered and, per shard, all report the same applied index.
pub fn converged(statuses: &BTreeMap<u32, StatusResponse>, nodes: usize) -> bool {
    if statuses.len() < nodes {
        return false;
    }
    let mut applied: BTreeMap<u32, u64> = BTreeMap::new();
    for status in statuses.values() {
        for shard in &status.shards {
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
    true
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
