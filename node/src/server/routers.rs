//! The client and peer gRPC routers, the listeners they serve on, and the addresses file.

use std::net::SocketAddr;
use std::sync::Arc;

use courier_consensus::groups::Groups;
use courier_consensus::network::RaftService;
use courier_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use courier_proto::pb::client::groups_server::GroupsServer;
use courier_proto::pb::client::keys_server::KeysServer;
use courier_proto::pb::client::messaging_server::MessagingServer;
use courier_proto::pb::client::registration_server::RegistrationServer;
use courier_proto::pb::peer::admin_server::AdminServer;
use courier_proto::pb::peer::forward_server::ForwardServer;
use courier_proto::pb::peer::raft_server::RaftServer;
use courier_storage::Db;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tracing::info;

use super::{Incoming, ServerError};
use crate::client::ClientApi;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::peer_auth::PeerAuth;
use crate::services::PeerApi;

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The listeners of a node, bound, and the addresses they are bound to.
pub(super) struct Bound {
    /// The client and peer listeners.
    pub(super) listeners: Listeners,
    /// The client listener's address (the configured one when provided).
    pub(super) client_addr: SocketAddr,
    /// The peer listener's address (the configured one when provided).
    pub(super) peer_addr: SocketAddr,
    /// The metrics listener, when configured.
    pub(super) metrics: Option<TcpListener>,
}

/// Binds the client, peer and metrics listeners (or takes the provided client and peer ones).
pub(super) async fn bind_listeners(
    config: &Config,
    provided: Option<(Incoming, Incoming)>,
) -> Result<Bound, ServerError> {
    let listeners = match provided {
        Some((client, peer)) => Listeners::Provided { client, peer },
        None => Listeners::Tcp {
            client: bind(config.listen.client).await?,
            peer: bind(config.listen.peer).await?,
        },
    };
    let (client_addr, peer_addr) = match &listeners {
        Listeners::Tcp { client, peer } => (
            client.local_addr().map_err(|source| ServerError::Bind {
                addr: config.listen.client,
                source,
            })?,
            peer.local_addr().map_err(|source| ServerError::Bind {
                addr: config.listen.peer,
                source,
            })?,
        ),
        Listeners::Provided { .. } => (config.listen.client, config.listen.peer),
    };
    let metrics = match config.listen.metrics {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    Ok(Bound {
        listeners,
        client_addr,
        peer_addr,
        metrics,
    })
}

/// The client and peer listeners: TCP, or provided by the environment.
pub(super) enum Listeners {
    Tcp {
        client: TcpListener,
        peer: TcpListener,
    },
    Provided {
        client: Incoming,
        peer: Incoming,
    },
}

/// What every gRPC server task of a node shares.
pub(super) struct Serving<'a> {
    pub(super) tasks: &'a TaskTracker,
    pub(super) shutdown: &'a CancellationToken,
    pub(super) errors: &'a tokio::sync::mpsc::Sender<ServerError>,
    pub(super) db: &'a Arc<Db>,
    pub(super) metrics: &'a crate::metrics::Metrics,
}

impl Serving<'_> {
    /// Serves the client and peer routers on their listeners; TCP listeners get their
    /// connection caps here.
    pub(super) fn serve(
        &self,
        config: &Config,
        listeners: Listeners,
        client_router: tonic::transport::server::Router,
        peer_router: tonic::transport::server::Router,
    ) {
        match listeners {
            Listeners::Tcp { client, peer } => {
                let connections_max = config.limits.connections_max;
                let client = crate::listener::limited(
                    client,
                    connections_max,
                    self.metrics.connections_refused("client"),
                );
                self.spawn("client", client_router, client);
                self.spawn(
                    "peer",
                    peer_router,
                    crate::listener::limited(
                        peer,
                        config.limits.peer_connections_max,
                        self.metrics.connections_refused("peer"),
                    ),
                );
            }
            Listeners::Provided { client, peer } => {
                self.spawn("client", client_router, client);
                self.spawn("peer", peer_router, peer);
            }
        }
    }

    /// Serves `router` on `incoming` until shutdown; a failure is reported to the node.
    fn spawn<S, IO>(
        &self,
        name: &'static str,
        router: tonic::transport::server::Router,
        incoming: S,
    ) where
        S: Stream<Item = std::io::Result<IO>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Send + Unpin + 'static,
    {
        let (shutdown, error_tx, db) =
            (self.shutdown.clone(), self.errors.clone(), self.db.clone());
        self.tasks.spawn(async move {
            let served = router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await;
            if let Err(error) = served {
                tracing::error!(server = name, %error, "grpc server failed");
                let _ = error_tx.try_send(ServerError::Transport(error));
            }
            info!(server = name, "grpc server stopped");
            drop(db);
        });
    }
}

pub(super) fn write_addr_file(
    config: &Config,
    client: SocketAddr,
    peer: SocketAddr,
) -> Result<(), ServerError> {
    let path = config.data_dir.join("node.addr");
    let body = serde_json::json!({ "node_id": config.node_id, "client": client, "peer": peer });
    let tmp = path.with_extension("addr.tmp");
    std::fs::write(&tmp, body.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| ServerError::AddrFile { path, source })
}

/// Reflection listing exactly the services of one listener (`services`), plus health and
/// reflection itself.
fn reflection(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    ServerError,
> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(courier_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for service in services {
        builder = builder.with_service_name(*service);
    }
    Ok(builder.build_v1()?)
}

pub(super) async fn client_router(
    config: &Config,
    api: ClientApi,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::server::Router, ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RegistrationServer<ClientApi>>()
        .await;
    reporter.set_serving::<MessagingServer<ClientApi>>().await;
    reporter.set_serving::<GroupsServer<ClientApi>>().await;
    reporter.set_serving::<KeysServer<ClientApi>>().await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .http2_keepalive_interval(Some(config.limits.keepalive_interval))
        .http2_keepalive_timeout(Some(config.limits.keepalive_timeout))
        .concurrency_limit_per_connection(
            usize::try_from(config.limits.streams_per_connection_max).unwrap_or(usize::MAX),
        )
        .max_concurrent_streams(Some(config.limits.streams_per_connection_max))
        .add_service(health)
        .add_service(reflection(&[
            <RegistrationServer<ClientApi> as NamedService>::NAME,
            <MessagingServer<ClientApi> as NamedService>::NAME,
            <GroupsServer<ClientApi> as NamedService>::NAME,
            <KeysServer<ClientApi> as NamedService>::NAME,
        ])?)
        .add_service(
            RegistrationServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            MessagingServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(KeysServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX))
        .add_service(GroupsServer::new(api).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)))
}

pub(super) async fn peer_router(
    cluster: Cluster,
    live: Arc<crate::client::live::LiveStreams>,
    jobs: crate::maintenance::Jobs,
    tls: Option<tonic::transport::ServerTlsConfig>,
    backup_root: std::path::PathBuf,
    shutdown: CancellationToken,
    streams_max: u32,
) -> Result<tonic::transport::server::Router, ServerError> {
    let groups = cluster.groups().clone();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RaftServer<RaftService<Groups>>>()
        .await;
    reporter.set_serving::<ForwardServer<PeerApi>>().await;
    reporter.set_serving::<AdminServer<PeerApi>>().await;
    let auth = PeerAuth::new(groups.clone(), tls.is_some());
    let api = PeerApi::new(cluster, live, jobs, auth.clone(), backup_root);
    let raft = RaftService::new(groups).until(shutdown);
    // Pings find peers that vanished without closing their connection (their raft pipes would
    // otherwise be served forever).
    // A stream past the limit waits on its caller's side (HTTP/2 flow control), so a node's
    // long-lived raft pipe and its calls share the connection without any of them failing.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(courier_consensus::pipe::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(courier_consensus::pipe::KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(streams_max));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .add_service(health)
        .add_service(reflection(&[
            <RaftServer<RaftService<Groups>> as NamedService>::NAME,
            <ForwardServer<PeerApi> as NamedService>::NAME,
            <AdminServer<PeerApi> as NamedService>::NAME,
        ])?)
        .add_service(InterceptedService::new(
            RaftServer::new(raft)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
            move |request| auth.raft(request),
        ))
        .add_service(
            ForwardServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(AdminServer::new(api).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)))
}
