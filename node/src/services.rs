//! The gRPC services. The peer services (raft transport, forwarding, admin) are live; client
//! RPCs answer `UNIMPLEMENTED` through the generated default stubs until the messaging issue
//! implements them: never a fake success.

use courier_proto::pb::client::groups_server::Groups;
use courier_proto::pb::client::messaging_server::Messaging;
use courier_proto::pb::client::registration_server::Registration;
use courier_proto::pb::peer::admin_server::Admin;
use courier_proto::pb::peer::forward_server::Forward;
use courier_proto::pb::peer::{
    AddNodeRequest, AddNodeResponse, ForwardBatchRequest, ForwardBatchResponse, InitClusterRequest,
    InitClusterResponse, ProposeRequest, ProposeResponse, RemoveNodeRequest, RemoveNodeResponse,
    StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, outcome_to_wire, was_forwarded};
use crate::status::ApiError;

/// The client-facing services of one node.
#[derive(Clone, Debug, Default)]
pub struct ClientApi;

impl Registration for ClientApi {}
impl Messaging for ClientApi {}
impl Groups for ClientApi {}

/// The peer-facing forwarding and admin services of one node (raft is
/// `courier_consensus::network::RaftService`).
#[derive(Clone, Debug)]
pub struct PeerApi {
    cluster: Cluster,
}

impl PeerApi {
    /// The services over this node's cluster view.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl Forward for PeerApi {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        let forwarded = was_forwarded(request.metadata());
        let request = request.into_inner();
        let shard_count = self.cluster.groups().shard_count().unwrap_or(0);
        let shard = courier_proto::ShardId::from_wire(request.shard, shard_count)
            .map_err(ApiError::from)?;
        let outcomes = self
            .cluster
            .propose(shard, request.events, forwarded)
            .await?;
        Ok(Response::new(ProposeResponse {
            outcomes: outcomes.into_iter().map(outcome_to_wire).collect(),
        }))
    }

    async fn forward_batch(
        &self,
        request: Request<ForwardBatchRequest>,
    ) -> Result<Response<ForwardBatchResponse>, Status> {
        let forwarded = was_forwarded(request.metadata());
        Ok(Response::new(
            self.cluster
                .forward_batch(request.into_inner(), forwarded)
                .await?,
        ))
    }
}

#[tonic::async_trait]
impl Admin for PeerApi {
    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<InitClusterResponse>, Status> {
        Ok(Response::new(
            self.cluster.init(request.into_inner()).await?,
        ))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.cluster.status()))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<AddNodeResponse>, Status> {
        self.cluster.add_node(request.into_inner()).await?;
        Ok(Response::new(AddNodeResponse {}))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.cluster.remove_node(request.into_inner()).await?;
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.cluster.transfer_leader(request.into_inner()).await?;
        Ok(Response::new(TransferLeaderResponse {}))
    }
}
