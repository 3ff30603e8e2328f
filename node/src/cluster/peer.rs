//! Every node-to-node call this node makes goes out through [`PeerClient`]: one place sets the
//! deadline, carries the caller's trace context, and marks a request that took its one
//! forwarding hop (so that its receiver answers itself instead of forwarding again).

use std::sync::Arc;
use std::time::Duration;

use courier_consensus::network::ChannelPool;
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::forward_client::ForwardClient;
use tonic::transport::Channel;

/// Metadata marking a forward that already took its one hop.
const FORWARDED_KEY: &str = "courier-forwarded";

/// Builds the calls to other nodes, over the node's shared channels.
#[derive(Clone)]
pub(super) struct PeerClient {
    pool: Arc<ChannelPool>,
    rpc_timeout: Duration,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("rpc_timeout", &self.rpc_timeout)
            .finish_non_exhaustive()
    }
}

impl PeerClient {
    /// Calls over `pool`'s channels, each with the deadline `rpc_timeout` unless said otherwise.
    pub(super) fn new(pool: Arc<ChannelPool>, rpc_timeout: Duration) -> Self {
        Self { pool, rpc_timeout }
    }

    /// The forward service (propose, forward, presence, typing) of the node at `addr`; `None`
    /// when `addr` is not a valid host:port.
    pub(super) fn forward(&self, addr: &str) -> Option<ForwardClient<Channel>> {
        self.pool.channel(addr).map(ForwardClient::new)
    }

    /// The admin service (bootstrap, membership) of the node at `addr`; `None` when `addr` is
    /// not a valid host:port.
    pub(super) fn admin(&self, addr: &str) -> Option<AdminClient<Channel>> {
        self.pool.channel(addr).map(AdminClient::new)
    }

    /// A request with the RPC deadline and the current span's trace context.
    pub(super) fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.request_within(message, self.rpc_timeout)
    }

    /// A request with deadline `timeout` and the current span's trace context.
    pub(super) fn request_within<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        self.pool.note_call();
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        crate::telemetry::inject(request.metadata_mut());
        request
    }

    /// A request that takes this node's one forwarding hop: its receiver answers itself.
    pub(super) fn forwarded<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.request(message);
        request.metadata_mut().insert(
            FORWARDED_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        request
    }
}

/// How often a node checks its channels to the other members.
const WARM_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps this node's channels to every other member of the cluster connected (see
/// [`ChannelPool::warm`]) until `shutdown`.
pub async fn keep_warm(cluster: super::Cluster, shutdown: tokio_util::sync::CancellationToken) {
    let groups = cluster.groups().clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(WARM_INTERVAL) => {}
        }
        let Some(metadata) = groups.get(courier_consensus::types::GroupId::Metadata) else {
            continue;
        };
        let me = groups.node_id();
        let others: Vec<String> = metadata
            .state()
            .members
            .into_iter()
            .filter(|(id, _)| *id != me)
            .map(|(_, addr)| addr)
            .collect();
        groups.pool().warm(others).await;
    }
}

/// Whether a request already took its one forwarding hop.
pub fn was_forwarded(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.contains_key(FORWARDED_KEY)
}
