//! The gRPC services: client (registration; messaging, with 1:1 and group sends, device
//! streams, receipts and presence; the key directory; groups) and peer (forwarding, proposing, presence, typing,
//! admin; raft is `courier_consensus::network::RaftService`). Client methods authenticate the
//! device where the API needs it and delegate to `ClientApi` (`crate::client`); peer methods
//! delegate to the cluster, the live streams and the maintenance jobs.

use courier_proto::convert::messaging::MembershipCommand;
use courier_proto::pb::client::groups_server::Groups;
use courier_proto::pb::client::keys_server::Keys;
use courier_proto::pb::client::messaging_server::Messaging;
use courier_proto::pb::client::registration_server::Registration;
use courier_proto::pb::client::{
    AddMemberRequest, ApprovePairingRequest, ApprovePairingResponse, ChangeNumberRequest,
    ChangeNumberResponse, ClientFrame, CreateGroupRequest, DeleteAccountRequest,
    DeleteAccountResponse, FinishPairingRequest, GetKeyCountRequest, GetKeyCountResponse,
    GetPreKeyBundleRequest, GetPreKeyBundleResponse, GetPresenceRequest, GetPresenceResponse,
    GetReceiptsRequest, GetReceiptsResponse, GroupInfo, LeaveGroupRequest, LeaveGroupResponse,
    ListConversationsRequest, ListConversationsResponse, ListDevicesRequest, ListDevicesResponse,
    ListGroupsRequest, ListGroupsResponse, RegisterRequest, RegisterResponse, RemoveMemberRequest,
    RequestCodeRequest, RequestCodeResponse, RevokeDeviceRequest, RevokeDeviceResponse,
    SendRequest, SendResponse, SendToGroupRequest, StartPairingRequest, StartPairingResponse,
    UploadKeysRequest, UploadKeysResponse,
};
use courier_proto::pb::peer::admin_server::Admin;
use courier_proto::pb::peer::forward_server::Forward;
use courier_proto::pb::peer::{
    AddNodeRequest, AddNodeResponse, BackupRequest, BackupResponse, BuildInfoRequest,
    BuildInfoResponse, ForwardBatchRequest, ForwardBatchResponse, InitClusterRequest,
    InitClusterResponse, InspectUserRequest, MarkDrainingRequest, MarkDrainingResponse,
    MoveShardRequest, MoveShardResponse, PresenceRequest, PresenceResponse, ProposeRequest,
    ProposeResponse, RaiseEventFormatRequest, RaiseEventFormatResponse, ReadLogRequest,
    ReadLogResponse, ReadShardRequest, ReadShardResponse, RebuildProjectionRequest,
    RemoveNodeRequest, RemoveNodeResponse, StatusRequest, StatusResponse, TransferLeaderRequest,
    TransferLeaderResponse, TypingRequest, TypingResponse, VerifyProjectionRequest,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

pub use crate::client::ClientApi;
use crate::client::stream::ServerStream;

use crate::cluster::{Cluster, outcome_to_wire, was_forwarded};
use crate::peer_auth::{Allowed, PeerAuth};
use crate::status::ApiError;

/// The client's address as the per-address limits key it (IPv4-mapped IPv6 as IPv4).
fn client_address<T>(request: &Request<T>) -> Option<std::net::IpAddr> {
    request
        .remote_addr()
        .map(|addr| crate::client::rate::address_key(addr.ip()))
}

#[tonic::async_trait]
impl Registration for ClientApi {
    async fn request_code(
        &self,
        request: Request<RequestCodeRequest>,
    ) -> Result<Response<RequestCodeResponse>, Status> {
        let address = client_address(&request);
        Ok(Response::new(
            ClientApi::request_code(self, request.into_inner(), address).await?,
        ))
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let address = client_address(&request);
        Ok(Response::new(
            ClientApi::register(self, request.into_inner(), address).await?,
        ))
    }

    async fn start_pairing(
        &self,
        request: Request<StartPairingRequest>,
    ) -> Result<Response<StartPairingResponse>, Status> {
        let address = client_address(&request);
        Ok(Response::new(ClientApi::start_pairing(
            self,
            request.into_inner(),
            address,
        )?))
    }

    async fn approve_pairing(
        &self,
        request: Request<ApprovePairingRequest>,
    ) -> Result<Response<ApprovePairingResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::approve_pairing(self, caller, request.into_inner()).await?,
        ))
    }

    async fn finish_pairing(
        &self,
        request: Request<FinishPairingRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(ClientApi::finish_pairing(
            self,
            request.get_ref(),
        )?))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(ClientApi::list_devices(self, caller).await?))
    }

    async fn revoke_device(
        &self,
        request: Request<RevokeDeviceRequest>,
    ) -> Result<Response<RevokeDeviceResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        ClientApi::revoke_device(self, caller, request.into_inner()).await?;
        Ok(Response::new(RevokeDeviceResponse {}))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::delete_account(self, caller, request.into_inner()).await?,
        ))
    }

    async fn change_number(
        &self,
        request: Request<ChangeNumberRequest>,
    ) -> Result<Response<ChangeNumberResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        let address = client_address(&request);
        Ok(Response::new(
            ClientApi::change_number(self, caller, request.into_inner(), address).await?,
        ))
    }
}

/// A send in flight, boxed so both kinds of send share [`ClientApi::counted_send`].
type SendFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<SendResponse, ApiError>> + Send + 'a>>;

impl ClientApi {
    /// Runs one send under a span named `name`, counting its outcome and its time to commit.
    async fn counted_send<'a>(
        &'a self,
        name: &'static str,
        caller: Result<crate::client::auth::Caller, ApiError>,
        send: impl FnOnce(&'a Self, crate::client::auth::Caller) -> SendFuture<'a>,
    ) -> Result<SendResponse, ApiError> {
        let started = std::time::Instant::now();
        let result = match caller {
            Ok(caller) => {
                let span = tracing::info_span!(
                    "client.send",
                    otel.name = name,
                    user = caller.user.get(),
                    device = caller.device.get()
                );
                send(self, caller).instrument(span).await
            }
            Err(error) => Err(error),
        };
        self.metrics
            .send_answered(&result.as_ref().map(|r| r.duplicate).map_err(Clone::clone));
        if result.is_ok() {
            self.metrics.send_committed(started.elapsed());
        }
        result
    }
}

#[tonic::async_trait]
impl Messaging for ClientApi {
    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await;
        let request = request.into_inner();
        Ok(Response::new(
            self.counted_send("client.Send", caller, |api, caller| {
                Box::pin(api.send(caller, request))
            })
            .await?,
        ))
    }

    async fn send_to_group(
        &self,
        request: Request<SendToGroupRequest>,
    ) -> Result<Response<SendResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await;
        let request = request.into_inner();
        Ok(Response::new(
            self.counted_send("client.SendToGroup", caller, |api, caller| {
                Box::pin(api.send_to_group(caller, request))
            })
            .await?,
        ))
    }

    async fn stream(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<ServerStream>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            self.open_stream(caller, request.into_inner()).await?,
        ))
    }

    async fn get_receipts(
        &self,
        request: Request<GetReceiptsRequest>,
    ) -> Result<Response<GetReceiptsResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::get_receipts(self, caller, request.into_inner()).await?,
        ))
    }

    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::list_conversations(self, caller, request.into_inner()).await?,
        ))
    }

    async fn get_presence(
        &self,
        request: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::get_presence(self, caller, request.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl Keys for ClientApi {
    async fn upload_keys(
        &self,
        request: Request<UploadKeysRequest>,
    ) -> Result<Response<UploadKeysResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::upload_keys(self, caller, request.into_inner()).await?,
        ))
    }

    async fn get_pre_key_bundle(
        &self,
        request: Request<GetPreKeyBundleRequest>,
    ) -> Result<Response<GetPreKeyBundleResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::get_prekey_bundle(self, caller, request.into_inner()).await?,
        ))
    }

    async fn get_key_count(
        &self,
        request: Request<GetKeyCountRequest>,
    ) -> Result<Response<GetKeyCountResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(ClientApi::get_key_count(self, caller).await?))
    }
}

#[tonic::async_trait]
impl Groups for ClientApi {
    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::create_group(self, caller, request.into_inner()).await?,
        ))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        let command = MembershipCommand::try_from(request.into_inner()).map_err(ApiError::from)?;
        Ok(Response::new(
            ClientApi::add_member(self, caller, command).await?,
        ))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        let command = MembershipCommand::try_from(request.into_inner()).map_err(ApiError::from)?;
        Ok(Response::new(
            ClientApi::remove_member(self, caller, command).await?,
        ))
    }

    async fn leave_group(
        &self,
        request: Request<LeaveGroupRequest>,
    ) -> Result<Response<LeaveGroupResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        ClientApi::leave_group(self, caller, request.into_inner()).await?;
        Ok(Response::new(LeaveGroupResponse {}))
    }

    async fn list_groups(
        &self,
        request: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        let caller = self.authenticate(request.metadata()).await?;
        Ok(Response::new(
            ClientApi::list_groups(self, caller, request.into_inner()).await?,
        ))
    }
}

/// The peer-facing forwarding and admin services of one node (raft is
/// `courier_consensus::network::RaftService`).
#[derive(Clone, Debug)]
pub struct PeerApi {
    cluster: Cluster,
    live: std::sync::Arc<crate::client::live::LiveStreams>,
    jobs: crate::maintenance::Jobs,
    auth: PeerAuth,
    backup_root: std::path::PathBuf,
}

impl PeerApi {
    /// The services over this node's cluster view.
    pub fn new(
        cluster: Cluster,
        live: std::sync::Arc<crate::client::live::LiveStreams>,
        jobs: crate::maintenance::Jobs,
        auth: PeerAuth,
        backup_root: std::path::PathBuf,
    ) -> Self {
        Self {
            cluster,
            live,
            jobs,
            auth,
            backup_root,
        }
    }
}

#[tonic::async_trait]
impl Forward for PeerApi {
    async fn presence(
        &self,
        request: Request<PresenceRequest>,
    ) -> Result<Response<PresenceResponse>, Status> {
        let caller = self.auth.check(&request, Allowed::Nodes)?;
        let request = request.into_inner();
        PeerAuth::require_claim(caller.as_ref(), request.node_id)?;
        Ok(Response::new(PresenceResponse {
            presence: self.cluster.presence_local(
                request.node_id,
                &request.reports,
                &request.query,
            ),
        }))
    }

    async fn read_shard(
        &self,
        request: Request<ReadShardRequest>,
    ) -> Result<Response<ReadShardResponse>, Status> {
        self.auth.check(&request, Allowed::Nodes)?;
        Ok(Response::new(
            self.cluster.read_shard(request.into_inner()).await?,
        ))
    }

    async fn build_info(
        &self,
        request: Request<BuildInfoRequest>,
    ) -> Result<Response<BuildInfoResponse>, Status> {
        self.auth.check(&request, Allowed::Nodes)?;
        Ok(Response::new(BuildInfoResponse {
            event_format_max: courier_proto::FORMAT_VERSION,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn typing(
        &self,
        request: Request<TypingRequest>,
    ) -> Result<Response<TypingResponse>, Status> {
        self.auth.check(&request, Allowed::Nodes)?;
        let request = request.into_inner();
        let delivered = request.update.map_or(0, |update| {
            request
                .to_users
                .iter()
                .map(|user| self.live.typing(*user, &update))
                .sum()
        });
        Ok(Response::new(TypingResponse {
            delivered_streams: delivered,
        }))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        self.auth.check(&request, Allowed::Nodes)?;
        let forwarded = was_forwarded(request.metadata());
        let span = tracing::info_span!("peer.Propose");
        crate::telemetry::adopt(&span, request.metadata());
        let request = request.into_inner();
        let shard_count = self.cluster.groups().shard_count().unwrap_or(0);
        let shard = courier_proto::ShardId::from_wire(request.shard, shard_count)
            .map_err(ApiError::from)?;
        if let Some(at) = request.events.iter().position(|event| event.kind.is_none()) {
            // A kind this build does not know would stop every replica at apply (an older build
            // cannot apply it); only a newer peer sends one, and it must wait for the upgrade.
            return Err(ApiError::Invalid {
                code: "COURIER:Propose:UnknownEvent",
                message: format!("event {at} is of a kind this node does not know"),
            }
            .into());
        }
        let outcomes = if forwarded {
            self.cluster
                .propose_forwarded(shard, request.events)
                .instrument(span)
                .await?
        } else if !self.cluster.holds(shard) {
            // Handed over by a node without a replica: handing it on again could go in a circle.
            return Err(ApiError::unknown_shard(shard).into());
        } else {
            self.cluster
                .propose(shard, request.events)
                .instrument(span)
                .await?
        };
        Ok(Response::new(ProposeResponse {
            outcomes: outcomes.into_iter().map(outcome_to_wire).collect(),
        }))
    }

    async fn forward_batch(
        &self,
        request: Request<ForwardBatchRequest>,
    ) -> Result<Response<ForwardBatchResponse>, Status> {
        self.auth.check(&request, Allowed::Nodes)?;
        let forwarded = was_forwarded(request.metadata());
        let span = tracing::info_span!("peer.ForwardBatch");
        crate::telemetry::adopt(&span, request.metadata());
        Ok(Response::new(
            self.cluster
                .forward_batch(request.into_inner(), forwarded)
                .instrument(span)
                .await?,
        ))
    }
}

/// The stream of a projection job's updates, as the generated admin service takes it.
type JobUpdates = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<
                Item = Result<courier_proto::pb::peer::ProjectionJobUpdate, Status>,
            > + Send,
    >,
>;

#[tonic::async_trait]
impl Admin for PeerApi {
    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<InitClusterResponse>, Status> {
        self.auth.check(&request, Allowed::NodesAndOperators)?;
        Ok(Response::new(
            self.cluster.init(request.into_inner()).await?,
        ))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        Ok(Response::new(self.cluster.status()))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<AddNodeResponse>, Status> {
        self.auth.check(&request, Allowed::NodesAndOperators)?;
        self.cluster.add_node(request.into_inner()).await?;
        Ok(Response::new(AddNodeResponse {}))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.auth.check(&request, Allowed::NodesAndOperators)?;
        self.cluster.remove_node(request.into_inner()).await?;
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn mark_draining(
        &self,
        request: Request<MarkDrainingRequest>,
    ) -> Result<Response<MarkDrainingResponse>, Status> {
        self.auth.check(&request, Allowed::NodesAndOperators)?;
        self.cluster.mark_draining(request.into_inner()).await?;
        Ok(Response::new(MarkDrainingResponse {}))
    }

    async fn raise_event_format(
        &self,
        request: Request<RaiseEventFormatRequest>,
    ) -> Result<Response<RaiseEventFormatResponse>, Status> {
        self.auth.check(&request, Allowed::NodesAndOperators)?;
        let event_format = self
            .cluster
            .raise_event_format(request.into_inner())
            .await?;
        Ok(Response::new(RaiseEventFormatResponse { event_format }))
    }

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupResponse>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        Ok(Response::new(
            self.cluster
                .backup(&self.backup_root, &request.into_inner().dir)?,
        ))
    }

    async fn move_shard(
        &self,
        request: Request<MoveShardRequest>,
    ) -> Result<Response<MoveShardResponse>, Status> {
        // Operators start moves (nodes delegate them); only nodes record one in the table, after
        // the raft changes they made, and readmit a replica they are about to add.
        let allowed = if request.get_ref().placement_only || request.get_ref().readmit {
            Allowed::Nodes
        } else {
            Allowed::NodesAndOperators
        };
        self.auth.check(&request, allowed)?;
        Ok(Response::new(
            self.cluster.move_shard(request.into_inner()).await?,
        ))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        self.cluster.transfer_leader(request.into_inner()).await?;
        Ok(Response::new(TransferLeaderResponse {}))
    }

    async fn verify_projection(
        &self,
        request: Request<VerifyProjectionRequest>,
    ) -> Result<Response<JobUpdates>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        Ok(Response::new(Box::pin(
            self.jobs.verify(request.get_ref())?,
        )))
    }

    async fn rebuild_projection(
        &self,
        request: Request<RebuildProjectionRequest>,
    ) -> Result<Response<JobUpdates>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        Ok(Response::new(Box::pin(
            self.jobs.rebuild(request.get_ref())?,
        )))
    }

    async fn inspect_user(
        &self,
        request: Request<InspectUserRequest>,
    ) -> Result<Response<JobUpdates>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        Ok(Response::new(Box::pin(
            self.jobs.inspect_user(request.get_ref())?,
        )))
    }

    async fn read_log(
        &self,
        request: Request<ReadLogRequest>,
    ) -> Result<Response<ReadLogResponse>, Status> {
        self.auth.check(&request, Allowed::Operators)?;
        Ok(Response::new(
            self.jobs.read_log(request.into_inner()).await?,
        ))
    }
}
