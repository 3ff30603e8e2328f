//! The raft transport over gRPC.
//!
//! Client side: one lazily connected tonic `Channel` per peer address ([`ChannelPool`]), shared by
//! every raft group that talks to that peer; each RPC carries its group id. Server side:
//! [`RaftService`] decodes the group id and dispatches to that group's `Raft`, creating the group
//! on first contact (a node learns of a shard when its leader first replicates to it).
//!
//! Payloads are openraft's own request and response types in postcard. Every call has the
//! deadline openraft asks for (`RPCOption::soft_ttl`, inside its own `hard_ttl`), bounded by the
//! configured RPC timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_proto::ShardId;
use courier_proto::pb::peer::{self, RaftRequest, RaftResponse, raft_client::RaftClient};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::pipe::{Pipe, PipeCounters};
use crate::types::{GroupId, Node, NodeId, Raft, TypeConfig};

/// Largest raft message sent or accepted, in bytes.
pub const RAFT_MESSAGE_BYTES_MAX: usize = courier_proto::limits::GRPC_MESSAGE_BYTES_MAX;

/// Converts a group id to its wire form.
pub fn group_to_wire(group: GroupId) -> peer::GroupId {
    let kind = match group {
        GroupId::Metadata => peer::group_id::Kind::Metadata(true),
        GroupId::Shard(shard) => peer::group_id::Kind::Shard(u32::from(shard.get())),
    };
    peer::GroupId { kind: Some(kind) }
}

/// Converts a wire group id, rejecting shards outside the protocol's range.
///
/// # Errors
/// A client-facing description of what is wrong.
pub fn group_from_wire(wire: Option<&peer::GroupId>) -> Result<GroupId, String> {
    match wire.and_then(|g| g.kind.as_ref()) {
        Some(peer::group_id::Kind::Metadata(_)) => Ok(GroupId::Metadata),
        Some(peer::group_id::Kind::Shard(shard)) => u16::try_from(*shard)
            .ok()
            .filter(|s| u32::from(*s) < courier_proto::limits::SHARD_COUNT_MAX)
            .map(|s| GroupId::Shard(ShardId::new(s)))
            .ok_or_else(|| format!("shard {shard} is out of range")),
        None => Err("missing group id".to_owned()),
    }
}

/// Turns a configured endpoint into a lazily connecting channel. The default is
/// `Endpoint::connect_lazy` (TCP); the deterministic simulation passes one that connects over its
/// simulated network (`Endpoint::connect_with_connector_lazy`).
pub type Connector = Arc<dyn Fn(Endpoint) -> Channel + Send + Sync>;

/// One channel per peer address, shared by all groups.
#[derive(Default)]
pub struct ChannelPool {
    channels: Mutex<BTreeMap<String, Channel>>,
    /// Per peer address: RPC timeouts since its last answer (all groups together).
    timeouts: Mutex<BTreeMap<String, u32>>,
    connect_timeout: Duration,
    connector: Option<Connector>,
    /// TLS for every channel (`None`: plaintext, only with `insecure-plaintext`).
    tls: Option<ClientTlsConfig>,
    calls: AtomicU64,
    /// Per peer address: its raft pipe, or that it does not serve pipes.
    pipes: Mutex<BTreeMap<String, PipeSlot>>,
    pipe_counters: Arc<PipeCounters>,
}

/// A peer's raft pipe, as the pool knows it.
#[derive(Debug)]
enum PipeSlot {
    Open(Pipe),
    /// The peer answered `UNIMPLEMENTED` at this instant (an older node): unary calls until
    /// [`PIPE_RETRY_AFTER`] passed (it may have been upgraded since) or its channel is replaced.
    Unary(tokio::time::Instant),
}

/// How long a peer that does not serve pipes is called unary before a pipe is tried again.
pub const PIPE_RETRY_AFTER: Duration = Duration::from_secs(60);

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPool")
            .field("connect_timeout", &self.connect_timeout)
            .field("custom_connector", &self.connector.is_some())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ChannelPool {
    /// A pool whose channels give up connecting after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            channels: Mutex::default(),
            timeouts: Mutex::default(),
            connect_timeout,
            connector: None,
            tls: None,
            calls: AtomicU64::new(0),
            pipes: Mutex::default(),
            pipe_counters: Arc::default(),
        }
    }

    /// This pool's channels dial with TLS `tls` (the node's certificate, the cluster CA).
    #[must_use]
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A pool whose channels are made by `connector` (the simulation's network).
    pub fn with_connector(connect_timeout: Duration, connector: Connector) -> Self {
        Self {
            connector: Some(connector),
            ..Self::new(connect_timeout)
        }
    }

    /// Returns the channel to `addr` (host:port), creating it lazily; `None` when `addr` is not a
    /// valid authority.
    pub fn channel(&self, addr: &str) -> Option<Channel> {
        let mut channels = self
            .channels
            .lock()
            .expect("channel pool lock is never poisoned");
        if let Some(channel) = channels.get(addr) {
            return Some(channel.clone());
        }
        let channel = self.connect(self.endpoint(addr)?);
        channels.insert(addr.to_owned(), channel.clone());
        Some(channel)
    }

    /// The endpoint of `addr`, configured as every channel of this pool is.
    fn endpoint(&self, addr: &str) -> Option<Endpoint> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
            .ok()?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).ok()?;
        }
        Some(endpoint)
    }

    fn connect(&self, endpoint: Endpoint) -> Channel {
        match &self.connector {
            Some(connector) => connector(endpoint),
            None => endpoint.connect_lazy(),
        }
    }

    /// Connects the channel to each of `addrs` that is not connected yet (and checks those that
    /// are), one after another, each bounded by the connect timeout. A node keeps its channels
    /// to every member warm this way, so that the first call to a new leader after a failover
    /// does not wait for a connection and its TLS handshake.
    pub async fn warm(&self, addrs: impl IntoIterator<Item = String>) {
        for addr in addrs {
            let Some(channel) = self.channel(&addr) else {
                continue;
            };
            let mut grpc = tonic::client::Grpc::new(channel);
            let _ = tokio::time::timeout(self.connect_timeout, grpc.ready()).await;
        }
    }

    /// Counts one call made over this pool's channels (every unary raft RPC and every
    /// node-to-node request; `Admin.Status`'s `peer_calls` with the pipes' frames).
    pub fn note_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// gRPC messages sent since start: unary calls and pipe frames.
    pub fn calls(&self) -> u64 {
        self.calls
            .load(Ordering::Relaxed)
            .saturating_add(self.pipe_counters.frames.load(Ordering::Relaxed))
    }

    /// What this pool's raft pipes did since start.
    pub fn pipe_counters(&self) -> &PipeCounters {
        &self.pipe_counters
    }

    /// The raft pipe to `addr`, opened if there is none or the last one closed; `None` when the
    /// peer does not serve pipes or `addr` is not a valid authority.
    pub fn pipe(&self, addr: &str) -> Option<Pipe> {
        let mut pipes = self.pipes.lock().expect("pipe lock is never poisoned");
        match pipes.get(addr) {
            Some(PipeSlot::Unary(since)) if since.elapsed() < PIPE_RETRY_AFTER => return None,
            Some(PipeSlot::Open(pipe)) if !pipe.is_closed() => return Some(pipe.clone()),
            _ => {}
        }
        // A connection of its own, pinged while idle: a pipe the peer stopped reading must not
        // hold up the pool's channel (snapshots, forwarding), and a peer that vanished without
        // closing the connection is noticed.
        let endpoint = self
            .endpoint(addr)?
            .http2_keep_alive_interval(crate::pipe::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(crate::pipe::KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = self.connect(endpoint);
        let pipe = Pipe::open(
            channel,
            self.connect_timeout.saturating_mul(2),
            self.pipe_counters.clone(),
        );
        pipes.insert(addr.to_owned(), PipeSlot::Open(pipe.clone()));
        Some(pipe)
    }

    /// `addr` answered a pipe with `UNIMPLEMENTED`: call it unary until its channel is replaced.
    fn pipes_unsupported(&self, addr: &str) {
        self.pipes
            .lock()
            .expect("pipe lock is never poisoned")
            .insert(
                addr.to_owned(),
                PipeSlot::Unary(tokio::time::Instant::now()),
            );
    }

    /// Counts an RPC timeout to `addr`; after [`RECONNECT_AFTER_TIMEOUTS`] with no answer in
    /// between (from any group), drops its channel and returns true.
    pub fn timed_out(&self, addr: &str) -> bool {
        let mut timeouts = self
            .timeouts
            .lock()
            .expect("channel pool lock is never poisoned");
        let count = timeouts.entry(addr.to_owned()).or_default();
        *count = count.saturating_add(1);
        if *count < RECONNECT_AFTER_TIMEOUTS {
            return false;
        }
        *count = 0;
        drop(timeouts);
        self.forget(addr);
        true
    }

    /// An RPC to `addr` was answered: its timeout count starts again.
    pub fn answered(&self, addr: &str) {
        let mut timeouts = self
            .timeouts
            .lock()
            .expect("channel pool lock is never poisoned");
        if timeouts.get(addr).is_some_and(|count| *count > 0) {
            timeouts.insert(addr.to_owned(), 0);
        }
    }

    /// Drops the channel to `addr`, so the next [`ChannelPool::channel`] opens a new connection.
    /// Called after an RPC timed out: a connection whose packets a partition dropped can stay
    /// open and wedged (HTTP/2 flow control out of step) long after the network healed.
    pub fn forget(&self, addr: &str) {
        self.channels
            .lock()
            .expect("channel pool lock is never poisoned")
            .remove(addr);
        // The pipe rode on that connection: its task stops once the last call holding it ends.
        self.pipes
            .lock()
            .expect("pipe lock is never poisoned")
            .remove(addr);
    }
}

/// Creates per-target raft clients for one group.
#[derive(Clone, Debug)]
pub struct PeerNetwork {
    group: GroupId,
    pool: Arc<ChannelPool>,
    rpc_timeout: Duration,
}

impl PeerNetwork {
    /// The network of `group`, over `pool`.
    pub fn new(group: GroupId, pool: Arc<ChannelPool>, rpc_timeout: Duration) -> Self {
        Self {
            group,
            pool,
            rpc_timeout,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = GroupClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> GroupClient {
        GroupClient {
            group: self.group,
            target,
            pool: self.pool.clone(),
            addr: node.addr.clone(),
            rpc_timeout: self.rpc_timeout,
            large_append_warned: None,
        }
    }
}

/// Raft RPCs of one group to one target node.
#[derive(Debug)]
pub struct GroupClient {
    group: GroupId,
    target: NodeId,
    pool: Arc<ChannelPool>,
    addr: String,
    rpc_timeout: Duration,
    /// When a large append's timeout was last logged ([`LARGE_APPEND_WARN_EVERY`]).
    large_append_warned: Option<std::time::Instant>,
}

/// An append-entries request at least this large that times out is logged as a warning:
/// openraft gives the call one heartbeat interval, and one that carries entries this large may
/// need longer on this link (or on a starved follower), which only `raft.heartbeat` can give. It
/// is sent again whole every time, so it may never get through (docs/RUNBOOK.md, "Raft timing").
pub const LARGE_APPEND_BYTES: usize = 256 * 1024;

/// Shortest time between two warnings of [`LARGE_APPEND_BYTES`] from one group to one peer.
pub const LARGE_APPEND_WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether a timed-out call of `action` with `bytes` of payload is a large append whose warning
/// is due at `now` (none logged by this client within [`LARGE_APPEND_WARN_EVERY`]).
fn large_append_warning_due(
    action: RPCTypes,
    bytes: usize,
    last: Option<std::time::Instant>,
    now: std::time::Instant,
) -> bool {
    matches!(action, RPCTypes::AppendEntries)
        && bytes >= LARGE_APPEND_BYTES
        && last.is_none_or(|at| now.saturating_duration_since(at) >= LARGE_APPEND_WARN_EVERY)
}

/// Consecutive RPC timeouts to one peer after which its pooled channel is replaced. One slow
/// answer under load is not a wedged connection; several in a row are (or might as well be).
pub const RECONNECT_AFTER_TIMEOUTS: u32 = 3;

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, NetworkError> {
    postcard::to_stdvec(value).map_err(|e| NetworkError::new(&e))
}

/// Largest encoded append-entries request sent with more than one entry: one maximal proposal
/// and room for its envelope. openraft gives an append-entries call one heartbeat interval; a
/// call of `max_payload_entries` large entries (up to 256 MiB) could never finish in it, nor be
/// accepted (`RAFT_MESSAGE_BYTES_MAX`), and was sent again forever: replication stopped.
pub const APPEND_PAYLOAD_BYTES_MAX: usize = courier_proto::limits::PROPOSAL_BYTES_MAX + 64 * 1024;

/// What the entries of a cut append-entries request may take: room is left for its other fields
/// (vote, previous log id, commit index).
const APPEND_ENTRIES_BYTES_MAX: usize = APPEND_PAYLOAD_BYTES_MAX - 1024;

const _: () = assert!(
    APPEND_PAYLOAD_BYTES_MAX + 1024 <= RAFT_MESSAGE_BYTES_MAX,
    "an append-entries request of one maximal entry fits the receiver's message limit"
);

/// How many leading `entries` fit in `bytes_max` when encoded (at least one): the hint a too
/// large append-entries request is answered with.
fn entries_within(
    entries: &[openraft::Entry<TypeConfig>],
    bytes_max: usize,
) -> Result<u64, NetworkError> {
    let mut bytes = 0_usize;
    let mut fit = 0_u64;
    for entry in entries {
        bytes = bytes.saturating_add(
            postcard::experimental::serialized_size(entry).map_err(|e| NetworkError::new(&e))?,
        );
        if bytes > bytes_max {
            break;
        }
        fit = fit.saturating_add(1);
    }
    Ok(fit.max(1))
}

impl GroupClient {
    /// After a timeout: once [`RECONNECT_AFTER_TIMEOUTS`] came to this peer with no answer in
    /// between, the pool drops its connection and the next call of every group opens a new one
    /// (see [`ChannelPool::forget`]). A large append's timeout is also logged
    /// ([`LARGE_APPEND_BYTES`]).
    fn timed_out(&mut self, action: RPCTypes, bytes: usize, timeout: Duration) {
        self.pool.timed_out(&self.addr);
        let now = std::time::Instant::now();
        if large_append_warning_due(action, bytes, self.large_append_warned, now) {
            self.large_append_warned = Some(now);
            tracing::warn!(
                group = %self.group,
                target = self.target,
                bytes,
                timeout_ms = timeout.as_millis(),
                "a large append-entries call timed out; if it keeps doing so, raise raft.heartbeat"
            );
        }
    }

    async fn call<Resp, E>(
        &mut self,
        action: RPCTypes,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        // The pool's channel at every call, never one kept from an earlier call: a group whose
        // client kept the connection it started with would stay on a connection the pool has
        // since replaced (a peer that restarted), timing out forever while the other groups'
        // answers over the new connection keep resetting the count that would replace it (the
        // simulation's node layer, seed 68: one shard's replica stayed a candidate behind the
        // others after the heal).
        let channel = self.pool.channel(&self.addr).ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
                "invalid peer address",
            )))
        })?;
        // openraft wraps this call in its own timeout of `hard_ttl`; ending ours at `soft_ttl`
        // (as openraft asks) makes sure ours fires first, so the timeout is counted towards
        // replacing a wedged connection instead of being cancelled from outside unseen.
        let timeout = option.soft_ttl().min(self.rpc_timeout);
        let bytes = payload.len();
        let request = RaftRequest {
            group: Some(group_to_wire(self.group)),
            payload,
        };
        let piped = match action {
            RPCTypes::AppendEntries => Some(peer::RaftCallKind::AppendEntries),
            RPCTypes::Vote => Some(peer::RaftCallKind::Vote),
            RPCTypes::InstallSnapshot => None,
        };
        let call = async {
            if let Some(kind) = piped
                && request.payload.len() <= crate::pipe::CALL_BYTES_MAX
                && let Some(pipe) = self.pool.pipe(&self.addr)
            {
                match pipe.call(kind, request.clone(), timeout).await {
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        self.pool.pipes_unsupported(&self.addr);
                    }
                    answered => return answered,
                }
            }
            self.unary(channel, action, request, timeout).await
        };
        let response = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                self.timed_out(action, bytes, timeout);
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: 0,
                    target: self.target,
                    timeout,
                }));
            }
            // tonic reports its own client-side deadline (`set_timeout`) as CANCELLED
            // "Timeout expired"; the server's as DEADLINE_EXCEEDED.
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) =>
            {
                self.timed_out(action, bytes, timeout);
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: 0,
                    target: self.target,
                    timeout,
                }));
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(response)) => {
                self.pool.answered(&self.addr);
                response
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&response.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// One unary raft RPC over `channel`.
    async fn unary(
        &self,
        channel: Channel,
        action: RPCTypes,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftResponse, tonic::Status> {
        self.pool.note_call();
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        let response = match action {
            RPCTypes::AppendEntries => client.append_entries(request).await,
            RPCTypes::Vote => client.vote(request).await,
            RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
        };
        response.map(tonic::Response::into_inner)
    }
}

impl RaftNetwork<TypeConfig> for GroupClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let payload = encode(&rpc).map_err(RPCError::Network)?;
        if payload.len() > APPEND_PAYLOAD_BYTES_MAX && rpc.entries.len() > 1 {
            // openraft sends up to `max_payload_entries` entries whatever their size; ask it
            // for fewer (it retries at once). Always fewer than this call had, so that the
            // retries end: a single entry always goes.
            let fit = entries_within(&rpc.entries, APPEND_ENTRIES_BYTES_MAX)?;
            let sent = u64::try_from(rpc.entries.len()).unwrap_or(u64::MAX);
            let hint = fit.min(sent.saturating_sub(1)).max(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.call(RPCTypes::AppendEntries, payload, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let payload = encode(&rpc).map_err(RPCError::Network)?;
        self.call(RPCTypes::InstallSnapshot, payload, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let payload = encode(&rpc).map_err(RPCError::Network)?;
        self.call(RPCTypes::Vote, payload, &option).await
    }
}

/// Finds (or creates) the `Raft` of a group, for the server side.
pub trait GroupRouter: Send + Sync + 'static {
    /// Returns the group's raft, creating an empty member on first contact. `leader_term` is
    /// the term of the leader that sent entries or a snapshot (`None` for a vote request): a
    /// replica dropped here starts again only for a readmitted leader (see `Groups::readmit`).
    fn raft(
        &self,
        group: GroupId,
        leader_term: Option<u64>,
    ) -> impl Future<Output = Result<Raft, tonic::Status>> + Send;

    /// Whether `node`, whose certificate the caller proved, may still call: checked on every
    /// frame of a pipe (a unary call is checked by the listener's interceptor at each call).
    fn admits(&self, _node: NodeId) -> bool {
        true
    }
}

/// The node a raft request came from, as its certificate proves (put in the request's
/// extensions by the node's peer authentication). When present, the node a request claims to
/// come from (the candidate of a vote, the leader of an append or a snapshot) must be this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerNode(pub NodeId);

/// The node a raft request claims to come from.
trait Claimed {
    fn claimed(&self) -> NodeId;

    /// The term of the leader that sent it (entries, a snapshot); `None` from a candidate.
    fn leader_term(&self) -> Option<u64>;
}

impl Claimed for AppendEntriesRequest<TypeConfig> {
    fn claimed(&self) -> NodeId {
        self.vote.leader_id().voted_for().unwrap_or_default()
    }

    fn leader_term(&self) -> Option<u64> {
        Some(self.vote.leader_id().term)
    }
}

impl Claimed for VoteRequest<NodeId> {
    fn claimed(&self) -> NodeId {
        self.vote.leader_id().voted_for().unwrap_or_default()
    }

    fn leader_term(&self) -> Option<u64> {
        None
    }
}

impl Claimed for InstallSnapshotRequest<TypeConfig> {
    fn claimed(&self) -> NodeId {
        self.vote.leader_id().voted_for().unwrap_or_default()
    }

    fn leader_term(&self) -> Option<u64> {
        Some(self.vote.leader_id().term)
    }
}

/// The gRPC raft service: decodes the group id and dispatches.
#[derive(Debug)]
pub struct RaftService<R> {
    router: Arc<R>,
    /// Ends every pipe this service serves (their streams would otherwise keep a draining
    /// server waiting: the peer holds them open).
    stop: CancellationToken,
}

impl<R> RaftService<R> {
    /// A service dispatching through `router`.
    pub fn new(router: Arc<R>) -> Self {
        Self {
            router,
            stop: CancellationToken::new(),
        }
    }

    /// This service's pipes end when `stop` is cancelled (the node shutting down).
    #[must_use]
    pub fn until(mut self, stop: CancellationToken) -> Self {
        self.stop = stop;
        self
    }
}

fn decode_request<T: DeserializeOwned>(payload: &[u8]) -> Result<T, tonic::Status> {
    postcard::from_bytes(payload)
        .map_err(|e| tonic::Status::invalid_argument(format!("undecodable raft payload: {e}")))
}

fn encode_response<T: Serialize>(value: &T) -> Result<RaftResponse, tonic::Status> {
    let payload =
        postcard::to_stdvec(value).map_err(|e| tonic::Status::internal(format!("encode: {e}")))?;
    Ok(RaftResponse { payload })
}

/// Decodes a request, checks who sent it, finds its group and hands the decoded request to
/// `call`; the response encoded. What both a unary call and a pipe call go through.
async fn dispatch<R, Req, Resp, F, Fut>(
    router: &R,
    caller: Option<CallerNode>,
    request: RaftRequest,
    call: F,
) -> Result<RaftResponse, tonic::Status>
where
    R: GroupRouter,
    Req: DeserializeOwned + Claimed,
    Resp: Serialize,
    F: FnOnce(Raft, Req) -> Fut,
    Fut: Future<Output = Resp>,
{
    let group = group_from_wire(request.group.as_ref()).map_err(tonic::Status::invalid_argument)?;
    let rpc: Req = decode_request(&request.payload)?;
    if let Some(CallerNode(caller)) = caller
        && rpc.claimed() != caller
    {
        let mut status = tonic::Status::permission_denied(format!(
            "node {caller} sent a raft request as node {}",
            rpc.claimed()
        ));
        status.metadata_mut().insert(
            courier_proto::CODE_KEY,
            tonic::metadata::MetadataValue::from_static("COURIER:Peer:WrongNode"),
        );
        return Err(status);
    }
    let raft = router.raft(group, rpc.leader_term()).await?;
    encode_response(&call(raft, rpc).await)
}

async fn append_entries(raft: Raft, rpc: AppendEntriesRequest<TypeConfig>) -> impl Serialize {
    raft.append_entries(rpc).await
}

async fn vote(raft: Raft, rpc: VoteRequest<NodeId>) -> impl Serialize {
    raft.vote(rpc).await
}

async fn install_snapshot(raft: Raft, rpc: InstallSnapshotRequest<TypeConfig>) -> impl Serialize {
    raft.install_snapshot(rpc).await
}

/// One call read from a pipe, dispatched as its unary RPC would be.
async fn dispatch_piped<R: GroupRouter>(
    router: Arc<R>,
    caller: Option<CallerNode>,
    kind: peer::RaftCallKind,
    request: RaftRequest,
) -> Result<RaftResponse, tonic::Status> {
    match kind {
        peer::RaftCallKind::AppendEntries => {
            dispatch(&*router, caller, request, append_entries).await
        }
        peer::RaftCallKind::Vote => dispatch(&*router, caller, request, vote).await,
        peer::RaftCallKind::Unspecified => Err(tonic::Status::invalid_argument(
            "a raft call of unknown kind",
        )),
    }
}

impl<R: GroupRouter> RaftService<R> {
    /// A unary call: who sent it comes from the request's extensions.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        request: tonic::Request<RaftRequest>,
        call: F,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status>
    where
        Req: DeserializeOwned + Claimed,
        Resp: Serialize,
        F: FnOnce(Raft, Req) -> Fut,
        Fut: Future<Output = Resp>,
    {
        let caller = request.extensions().get::<CallerNode>().copied();
        dispatch(&*self.router, caller, request.into_inner(), call)
            .await
            .map(tonic::Response::new)
    }
}

#[tonic::async_trait]
impl<R: GroupRouter> peer::raft_server::Raft for RaftService<R> {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        self.unary(request, append_entries).await
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        self.unary(request, vote).await
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        self.unary(request, install_snapshot).await
    }

    async fn pipe(
        &self,
        request: tonic::Request<tonic::Streaming<peer::RaftFrame>>,
    ) -> Result<tonic::Response<tonic::codegen::BoxStream<peer::RaftReplyFrame>>, tonic::Status>
    {
        let caller = request.extensions().get::<CallerNode>().copied();
        let (replies, outbound) = tokio::sync::mpsc::channel(crate::pipe::FRAMES_QUEUED_MAX);
        let (router, admitting) = (self.router.clone(), self.router.clone());
        tokio::spawn(crate::pipe::serve(
            (caller.map(|CallerNode(node)| node), move |node| {
                admitting.admits(node)
            }),
            request.into_inner(),
            (replies, self.stop.clone()),
            move |kind, request| dispatch_piped(router.clone(), caller, kind, request),
        ));
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(
            outbound,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An entry of one event whose body is `body_bytes` long.
    fn entry(index: u64, body_bytes: usize) -> openraft::Entry<TypeConfig> {
        use courier_proto::pb::events::{self, Event, event::Kind};
        let event = Event {
            kind: Some(Kind::MessageDelivered(events::MessageDelivered {
                content: Some(events::Content {
                    body: vec![7; body_bytes],
                    media: None,
                }),
                ..events::MessageDelivered::default()
            })),
        };
        openraft::Entry {
            log_id: crate::types::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(crate::types::Proposal::Events(Arc::new(
                events::EntryPayload {
                    format_version: courier_proto::FORMAT_VERSION,
                    events: vec![event],
                },
            ))),
        }
    }

    #[test]
    fn a_large_append_that_times_out_is_warned_of_at_most_every_interval() {
        let now = std::time::Instant::now() + LARGE_APPEND_WARN_EVERY;
        let due = |action, bytes, last| large_append_warning_due(action, bytes, last, now);
        assert!(due(RPCTypes::AppendEntries, LARGE_APPEND_BYTES, None));
        assert!(
            !due(RPCTypes::AppendEntries, LARGE_APPEND_BYTES - 1, None),
            "small"
        );
        assert!(
            !due(RPCTypes::Vote, LARGE_APPEND_BYTES, None),
            "not an append"
        );
        let recently = Some(now - LARGE_APPEND_WARN_EVERY / 2);
        assert!(!due(
            RPCTypes::AppendEntries,
            APPEND_PAYLOAD_BYTES_MAX,
            recently
        ));
        let long_ago = Some(now - LARGE_APPEND_WARN_EVERY);
        assert!(due(
            RPCTypes::AppendEntries,
            APPEND_PAYLOAD_BYTES_MAX,
            long_ago
        ));
    }

    #[test]
    fn a_too_large_append_is_cut_to_the_entries_that_fit() {
        let entries: Vec<_> = (1..=8).map(|index| entry(index, 100_000)).collect();
        let one = postcard::experimental::serialized_size(&entries[0]).expect("size");
        assert_eq!(
            entries_within(&entries, 3 * one + one / 2).expect("hint"),
            3
        );
        assert_eq!(entries_within(&entries, 8 * one).expect("hint"), 8);
        assert_eq!(
            entries_within(&entries, one / 2).expect("hint"),
            1,
            "never fewer than one entry"
        );
        let maximal: Vec<_> = (1..=4)
            .map(|index| entry(index, courier_proto::limits::PROPOSAL_BYTES_MAX - 1024))
            .collect();
        let whole = encode(&maximal).expect("encode").len();
        assert!(
            whole > APPEND_PAYLOAD_BYTES_MAX,
            "four maximal entries are too many"
        );
        assert_eq!(
            entries_within(&maximal, APPEND_PAYLOAD_BYTES_MAX).expect("hint"),
            1
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Goal: no raft payload from the wire panics its decoder (a bounded fuzz in `make
        /// test`). Method: arbitrary bytes as each request type; a payload that decodes
        /// re-encodes to one that decodes to the same request.
        #[test]
        fn raft_payloads_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(vote) = decode_request::<VoteRequest<NodeId>>(&bytes) {
                let again = postcard::to_stdvec(&vote).expect("encode");
                prop_assert_eq!(decode_request::<VoteRequest<NodeId>>(&again).ok(), Some(vote));
            }
            if let Ok(append) = decode_request::<AppendEntriesRequest<TypeConfig>>(&bytes) {
                let again = postcard::to_stdvec(&append).expect("encode");
                let decoded = decode_request::<AppendEntriesRequest<TypeConfig>>(&again).ok();
                prop_assert_eq!(decoded.map(|d| d.entries.len()), Some(append.entries.len()));
            }
            if let Ok(snapshot) = decode_request::<InstallSnapshotRequest<TypeConfig>>(&bytes) {
                let again = postcard::to_stdvec(&snapshot).expect("encode");
                prop_assert_eq!(decode_request::<InstallSnapshotRequest<TypeConfig>>(&again).ok(), Some(snapshot));
            }
        }
    }
}

#[cfg(test)]
mod pipe_tests {

    use courier_proto::pb::peer::raft_server::{Raft as RaftRpc, RaftServer};
    use openraft::network::{RPCOption, RaftNetwork as _, RaftNetworkFactory as _};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
    use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use std::sync::atomic::{AtomicU64, Ordering};

    use courier_proto::pb::peer::{RaftCallKind, RaftFrame, RaftReplyFrame};
    use tokio::sync::mpsc;

    use super::*;
    use crate::pipe::serve;

    /// A peer that grants every vote and accepts every append, unary or piped (when `pipes` is
    /// on), and counts how.
    #[derive(Clone)]
    struct Granting {
        pipes: bool,
        unary_votes: Arc<AtomicU64>,
        piped_votes: Arc<AtomicU64>,
        unary_appends: Arc<AtomicU64>,
        piped_appends: Arc<AtomicU64>,
    }

    fn accepted() -> RaftResponse {
        let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::Success);
        RaftResponse {
            payload: postcard::to_stdvec(&answer).expect("encode"),
        }
    }

    fn granted(request: &RaftRequest) -> Result<RaftResponse, tonic::Status> {
        let vote: VoteRequest<NodeId> = postcard::from_bytes(&request.payload)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let answer: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            Ok(VoteResponse::new(vote.vote, None, true));
        Ok(RaftResponse {
            payload: postcard::to_stdvec(&answer).expect("encode"),
        })
    }

    #[tonic::async_trait]
    impl RaftRpc for Granting {
        async fn append_entries(
            &self,
            _request: tonic::Request<RaftRequest>,
        ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
            self.unary_appends.fetch_add(1, Ordering::Relaxed);
            Ok(tonic::Response::new(accepted()))
        }

        async fn vote(
            &self,
            request: tonic::Request<RaftRequest>,
        ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
            self.unary_votes.fetch_add(1, Ordering::Relaxed);
            granted(request.get_ref()).map(tonic::Response::new)
        }

        async fn pipe(
            &self,
            request: tonic::Request<tonic::Streaming<RaftFrame>>,
        ) -> Result<tonic::Response<tonic::codegen::BoxStream<RaftReplyFrame>>, tonic::Status>
        {
            if !self.pipes {
                return Err(tonic::Status::unimplemented("an older node"));
            }
            let (replies, outbound) = mpsc::channel(4);
            let (piped_votes, piped_appends) =
                (self.piped_votes.clone(), self.piped_appends.clone());
            tokio::spawn(serve(
                (None, |_node| true),
                request.into_inner(),
                (replies, CancellationToken::new()),
                move |kind, request| {
                    std::future::ready(if kind == RaftCallKind::Vote {
                        piped_votes.fetch_add(1, Ordering::Relaxed);
                        granted(&request)
                    } else {
                        piped_appends.fetch_add(1, Ordering::Relaxed);
                        Ok(accepted())
                    })
                },
            ));
            Ok(tonic::Response::new(Box::pin(ReceiverStream::new(
                outbound,
            ))))
        }
    }

    async fn peer(pipes: bool) -> (String, Granting) {
        let service = Granting {
            pipes,
            unary_votes: Arc::default(),
            piped_votes: Arc::default(),
            unary_appends: Arc::default(),
            piped_appends: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tonic::transport::Server::builder()
            .add_service(RaftServer::new(service.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (addr, service)
    }

    async fn votes(pool: &Arc<ChannelPool>, addr: &str, count: u64) {
        let mut network = PeerNetwork::new(GroupId::Metadata, pool.clone(), Duration::from_secs(5));
        let mut client = network.new_client(2, &BasicNode::new(addr)).await;
        for term in 1..=count {
            let request = VoteRequest::new(Vote::new(term, 1), None);
            let option = RPCOption::new(Duration::from_secs(5));
            let answer = client
                .vote(request, option)
                .await
                .expect("a vote is answered");
            assert!(answer.vote_granted, "term {term}");
            assert_eq!(answer.vote, Vote::new(term, 1));
        }
    }

    /// Goal: raft calls to a peer go over one pipe, and a peer without pipes (an older node,
    /// `UNIMPLEMENTED`) is still called, unary. Method: one pool calls two peers ten votes each;
    /// the piped peer sees every vote on its pipe and none unary, the other the reverse; the
    /// pool opened one pipe per peer and counted each piped call.
    #[tokio::test]
    async fn calls_ride_one_pipe_and_an_older_peer_is_called_unary() {
        let pool = Arc::new(ChannelPool::new(Duration::from_secs(2)));
        let (piped_addr, piped) = peer(true).await;
        let (older_addr, older) = peer(false).await;
        votes(&pool, &piped_addr, 10).await;
        votes(&pool, &older_addr, 10).await;
        assert_eq!(piped.piped_votes.load(Ordering::Relaxed), 10);
        assert_eq!(piped.unary_votes.load(Ordering::Relaxed), 0);
        assert_eq!(older.piped_votes.load(Ordering::Relaxed), 0);
        assert_eq!(older.unary_votes.load(Ordering::Relaxed), 10);
        let counters = pool.pipe_counters();
        assert_eq!(counters.calls.load(Ordering::Relaxed), 10);
        assert_eq!(counters.opened.load(Ordering::Relaxed), 2, "one per peer");
    }

    /// An append of `entries` blank entries to the peer at `addr`.
    async fn append(pool: &Arc<ChannelPool>, addr: &str, entries: u64) {
        let mut network = PeerNetwork::new(GroupId::Metadata, pool.clone(), Duration::from_secs(5));
        let mut client = network.new_client(2, &BasicNode::new(addr)).await;
        let leader = CommittedLeaderId::new(1, 1);
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: (1..=entries)
                .map(|index| Entry {
                    log_id: LogId::new(leader, index),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: None,
        };
        let option = RPCOption::new(Duration::from_secs(5));
        let answer = client
            .append_entries(request, option)
            .await
            .expect("an append is answered");
        assert_eq!(answer, AppendEntriesResponse::Success);
    }

    /// Goal: a large call (a catch-up append) does not ride the pipe, where it would hold up
    /// every group's heartbeats behind it. Method: a heartbeat and a small append go piped; an
    /// append of 30,000 blank entries (more than `CALL_BYTES_MAX` encoded) goes unary.
    #[tokio::test]
    async fn a_large_append_goes_unary_beside_the_pipe() {
        let pool = Arc::new(ChannelPool::new(Duration::from_secs(2)));
        let (addr, peer) = peer(true).await;
        append(&pool, &addr, 0).await;
        append(&pool, &addr, 10).await;
        assert_eq!(peer.piped_appends.load(Ordering::Relaxed), 2);
        append(&pool, &addr, 30_000).await;
        assert_eq!(peer.piped_appends.load(Ordering::Relaxed), 2);
        assert_eq!(peer.unary_appends.load(Ordering::Relaxed), 1);
    }
}
