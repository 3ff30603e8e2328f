//! Startup and shutdown, in order.
//!
//! ```text
//!   start: data dir ─▶ RocksDB ─▶ bind client + peer listeners ─▶ node.addr ─▶ serve
//!   stop:  cancel ─▶ gRPC servers drain ─▶ tasks joined ─▶ RocksDB closed (WAL synced)
//! ```
//!
//! [`start`] is what `courier-node` runs. [`start_in`] takes an [`Environment`] instead of the
//! defaults — storage, peer channels, listeners — which is how the deterministic simulation
//! (`sim/`) runs this same code on simulated disks and a simulated network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use courier_proto::pb::client::groups_server::GroupsServer;
use courier_proto::pb::client::messaging_server::MessagingServer;
use courier_proto::pb::client::registration_server::RegistrationServer;
use courier_proto::pb::peer::admin_server::AdminServer;
use courier_proto::pb::peer::forward_server::ForwardServer;
use courier_proto::pb::peer::raft_server::RaftServer;
use courier_storage::{Db, OpenMode};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tracing::info;

use courier_consensus::groups::{ConsensusError, Groups};
use courier_consensus::network::{ChannelPool, RaftService};

use crate::client::ClientApi;
use crate::client::registration::DevFileSms;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::services::PeerApi;

/// Connections the peer listener accepts at once (nodes and operator tools, not phones).
pub const PEER_CONNECTIONS_MAX: u32 = 1024;

/// How long shutdown waits for in-flight RPCs before giving up on them.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Why a node failed to start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Storage failed to open (for example: another node process holds this data directory).
    #[error("storage: {0}")]
    Storage(#[from] courier_storage::StorageError),
    /// Raft groups failed to start.
    #[error("consensus: {0}")]
    Consensus(#[from] Box<ConsensusError>),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The addresses file could not be written.
    #[error("cannot write {path}: {source}")]
    AddrFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// gRPC reflection could not load the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    /// The bound client API address.
    pub client_addr: SocketAddr,
    /// The bound peer API address.
    pub peer_addr: SocketAddr,
    /// The bound metrics address, when configured.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    errors: tokio::sync::mpsc::Receiver<ServerError>,
    groups: Arc<Groups>,
    cluster: Cluster,
}

impl NodeHandle {
    /// Stops the node: servers drain (up to [`SHUTDOWN_DEADLINE`]), tasks are joined.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_DEADLINE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                deadline_s = SHUTDOWN_DEADLINE.as_secs(),
                "shutdown deadline passed"
            );
        }
        self.groups.shutdown().await;
        info!("raft groups stopped");
    }

    /// This node's view of the cluster (reads, admin).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// This node's raft groups (for tests and status).
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// Waits until `signal` resolves or a server fails, then stops the node.
    ///
    /// # Errors
    /// The first server error, if one happened before the signal.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        let outcome = tokio::select! {
            () = signal => Ok(()),
            Some(error) = self.errors.recv() => Err(error),
        };
        self.stop().await;
        outcome
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// A stream of accepted connections, boxed (the simulation's listeners).
pub type Incoming =
    std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Connection>> + Send + 'static>>;

/// Any byte stream a gRPC server can serve.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// One accepted connection of an [`Incoming`] stream.
pub struct Connection(pub Box<dyn Io>);

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// What a node runs on when it is not the defaults: each `None` is what `courier-node` uses.
#[derive(Default)]
pub struct Environment {
    /// Storage; `None` opens RocksDB in `data-dir/db`.
    pub db: Option<Arc<Db>>,
    /// Channels to peers (raft and forwarding); `None` dials TCP.
    pub pool: Option<Arc<ChannelPool>>,
    /// The client and peer listeners; `None` binds `listen.client` and `listen.peer` (and
    /// applies `limits.connections-max`, which a provided listener must apply itself).
    pub listeners: Option<(Incoming, Incoming)>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("db", &self.db)
            .field("pool", &self.pool.is_some())
            .field("listeners", &self.listeners.is_some())
            .finish()
    }
}

/// Starts a node: opens storage, binds both listeners and serves until stopped.
///
/// # Errors
/// [`ServerError`] when the data directory, storage, or a listener cannot be set up.
pub async fn start(config: Config) -> Result<NodeHandle, ServerError> {
    start_in(config, Environment::default()).await
}

/// Starts a node in `environment` (see [`Environment`]).
///
/// # Errors
/// As [`start`].
pub async fn start_in(config: Config, environment: Environment) -> Result<NodeHandle, ServerError> {
    info!(node_id = config.node_id, data_dir = %config.data_dir.display(), "starting node");
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;

    let db = match environment.db {
        Some(db) => db,
        None => {
            let db_path = config.data_dir.join("db");
            let db = Arc::new(Db::open(&db_path, OpenMode::ReadWrite)?);
            info!(path = %db_path.display(), "storage open");
            db
        }
    };

    let pool = environment
        .pool
        .unwrap_or_else(|| Arc::new(ChannelPool::new(config.raft.rpc_timeout)));
    let groups = Groups::open_with(config.node_id, db.clone(), &config.raft, pool)
        .await
        .map_err(Box::new)?;
    info!(groups = groups.list().len(), "raft groups open");
    let shutdown = CancellationToken::new();
    let (reporter, presence_reports) = crate::presence::Reporter::new();
    let (pusher, push_task) = if config.push.url.is_empty() {
        (crate::push::Pusher::disabled(), None)
    } else {
        let (pusher, task) = crate::push::Pusher::new(crate::push::PushConfig {
            url: config.push.url.clone(),
            queue_max: usize::try_from(config.push.queue_max).unwrap_or(usize::MAX),
            attempts_max: config.push.attempts_max,
            timeout: config.push.timeout.0,
        });
        (pusher, Some(task))
    };
    let edge = crate::cluster::Edge {
        presence: Arc::new(crate::presence::PresenceTable::new(
            usize::try_from(config.presence.users_max).unwrap_or(usize::MAX),
            config.presence.last_seen_ttl.0,
        )),
        reporter: Arc::new(reporter),
        pusher,
    };
    let cluster = Cluster::new(groups.clone(), db.clone(), config.raft.rpc_timeout, edge);

    let listeners = match environment.listeners {
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
    // Every listener is bound before anything is spawned, so a failed start leaves nothing running.
    let metrics_listener = match config.listen.metrics {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    write_addr_file(&config, client_addr, peer_addr)?;
    info!(%client_addr, %peer_addr, "listening");

    let tasks = TaskTracker::new();
    let (error_tx, errors) = tokio::sync::mpsc::channel(2);

    let sms = Arc::new(DevFileSms::new(config.data_dir.join("sms-outbox.log")));
    let metrics = crate::metrics::Metrics::new(cluster.clone());
    tasks.spawn(
        metrics
            .clone()
            .watch_leaders(cluster.clone(), shutdown.clone()),
    );
    let client_api = ClientApi::new(
        cluster.clone(),
        db.clone(),
        config.limits.clone(),
        sms,
        shutdown.clone(),
        metrics.clone(),
        config.retention.keep_delivered,
    );
    let live = client_api.live();
    let client_router = client_router(&config, client_api).await?;
    let jobs = crate::maintenance::Jobs::new(groups.clone(), config.data_dir.join("scratch"));
    let peer_router = peer_router(cluster.clone(), groups.clone(), live, jobs).await?;
    let serving = Serving {
        tasks: &tasks,
        shutdown: &shutdown,
        errors: &error_tx,
        db: &db,
    };
    match listeners {
        Listeners::Tcp { client, peer } => {
            let connections_max = config.limits.connections_max;
            let client = crate::listener::limited(client, connections_max);
            serving.spawn("client", client_router, client);
            serving.spawn(
                "peer",
                peer_router,
                crate::listener::limited(peer, PEER_CONNECTIONS_MAX),
            );
        }
        Listeners::Provided { client, peer } => {
            serving.spawn("client", client_router, client);
            serving.spawn("peer", peer_router, peer);
        }
    }
    {
        let cluster = cluster.clone();
        let shutdown = shutdown.clone();
        let in_flight = usize::try_from(config.limits.forward_batches_in_flight).unwrap_or(1);
        tasks.spawn(async move { crate::forwarder::run(cluster, in_flight, shutdown).await });
    }
    info!("outbox forwarders running");
    {
        let cluster = cluster.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            crate::presence::run_reporter(cluster, presence_reports, shutdown).await;
        });
    }
    if let Some(task) = push_task {
        tasks.spawn(task.run(shutdown.clone()));
        info!("push hook on");
    }
    {
        let cluster = cluster.clone();
        let shutdown = shutdown.clone();
        let (undelivered, interval) = (
            config.retention.undelivered.0,
            config.retention.scan_interval.0,
        );
        tasks.spawn(async move {
            crate::retention::run(cluster, undelivered, interval, shutdown).await;
        });
    }
    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let bound = listener.local_addr().ok();
            let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
            tasks.spawn(async move { crate::metrics::serve(listener, metrics, shutdown).await });
            info!(bound = ?bound, "metrics endpoint");
            bound
        }
        None => None,
    };
    Ok(NodeHandle {
        client_addr,
        peer_addr,
        metrics_addr,
        shutdown,
        tasks,
        errors,
        groups,
        cluster,
    })
}

enum Listeners {
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
struct Serving<'a> {
    tasks: &'a TaskTracker,
    shutdown: &'a CancellationToken,
    errors: &'a tokio::sync::mpsc::Sender<ServerError>,
    db: &'a Arc<Db>,
}

impl Serving<'_> {
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

fn write_addr_file(
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

async fn client_router(
    config: &Config,
    api: ClientApi,
) -> Result<tonic::transport::server::Router, ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RegistrationServer<ClientApi>>()
        .await;
    reporter.set_serving::<MessagingServer<ClientApi>>().await;
    reporter.set_serving::<GroupsServer<ClientApi>>().await;
    Ok(tonic::transport::Server::builder()
        .concurrency_limit_per_connection(
            usize::try_from(config.limits.streams_per_connection_max).unwrap_or(usize::MAX),
        )
        .max_concurrent_streams(Some(config.limits.streams_per_connection_max))
        .add_service(health)
        .add_service(reflection(&[
            <RegistrationServer<ClientApi> as NamedService>::NAME,
            <MessagingServer<ClientApi> as NamedService>::NAME,
            <GroupsServer<ClientApi> as NamedService>::NAME,
        ])?)
        .add_service(
            RegistrationServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            MessagingServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(GroupsServer::new(api).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)))
}

async fn peer_router(
    cluster: Cluster,
    groups: Arc<Groups>,
    live: Arc<crate::client::live::LiveStreams>,
    jobs: crate::maintenance::Jobs,
) -> Result<tonic::transport::server::Router, ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RaftServer<RaftService<Groups>>>()
        .await;
    reporter.set_serving::<ForwardServer<PeerApi>>().await;
    reporter.set_serving::<AdminServer<PeerApi>>().await;
    let api = PeerApi::new(cluster, live, jobs);
    let raft = RaftService::new(groups);
    Ok(tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection(&[
            <RaftServer<RaftService<Groups>> as NamedService>::NAME,
            <ForwardServer<PeerApi> as NamedService>::NAME,
            <AdminServer<PeerApi> as NamedService>::NAME,
        ])?)
        .add_service(
            RaftServer::new(raft)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            ForwardServer::new(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(AdminServer::new(api).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)))
}
