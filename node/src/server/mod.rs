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
//!
//! Layout: this module tells the story; `io` holds the connection types an [`Environment`]
//! provides, `routers` the gRPC routers and the listeners they serve on.

mod io;
mod routers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier_consensus::groups::{ConsensusError, Groups};
use courier_consensus::network::ChannelPool;
use courier_storage::{Db, OpenMode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use io::{Connection, Environment, Incoming, Io};

use crate::archive::Archive;
use crate::client::ClientApi;
use crate::cluster::{Cluster, Edge};
use crate::config::Config;
use routers::{Bound, Serving, bind_listeners, client_router, peer_router, write_addr_file};

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
    /// A TLS file could not be read.
    #[error("tls: {0}")]
    Tls(#[from] courier_tls::TlsError),
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
    let (db, archive) = open_storage(&config, environment.db)?;
    let tls = load_tls(&config)?;
    let pool = environment
        .pool
        .unwrap_or_else(|| peer_pool(&config, tls.as_ref()));
    let groups = Groups::open_with(config.node_id, db.clone(), &config.raft, pool)
        .await
        .map_err(Box::new)?;
    info!(groups = groups.list().len(), "raft groups open");
    let shutdown = CancellationToken::new();
    let (edge, presence_reports, push_task) = edge(&config);
    let cluster = Cluster::new(
        groups.clone(),
        db.clone(),
        config.raft.rpc_timeout,
        edge,
        archive.clone(),
    );

    // Every listener is bound before anything is spawned, so a failed start leaves nothing running.
    let Bound {
        listeners,
        client_addr,
        peer_addr,
        metrics: metrics_listener,
    } = bind_listeners(&config, environment.listeners).await?;
    write_addr_file(&config, client_addr, peer_addr)?;
    info!(%client_addr, %peer_addr, "listening");

    let tasks = TaskTracker::new();
    let (error_tx, errors) = tokio::sync::mpsc::channel(2);

    let sms = crate::sms::sender(&config);
    let metrics = crate::metrics::Metrics::new(cluster.clone(), archive.clone());
    tasks.spawn(
        metrics
            .clone()
            .watch_leaders(cluster.clone(), shutdown.clone()),
    );
    let client_api = ClientApi::new(
        cluster.clone(),
        config.limits.clone(),
        sms,
        shutdown.clone(),
        metrics.clone(),
        crate::client::Trimming {
            keep_delivered: config.retention.keep_delivered,
            companion_history: config.retention.companion_history,
        },
    );
    let live = client_api.live();
    let (client_tls, peer_tls) = listener_tls(tls.as_ref(), &config);
    let client_router = client_router(&config, client_api, client_tls).await?;
    let jobs = crate::maintenance::Jobs::new(groups.clone(), &config, archive.clone());
    let peer_router = peer_router(
        cluster.clone(),
        live,
        jobs,
        peer_tls,
        config.backup_root.clone(),
        shutdown.clone(),
        config.limits.peer_streams_per_connection_max,
    )
    .await?;
    let serving = Serving {
        tasks: &tasks,
        shutdown: &shutdown,
        errors: &error_tx,
        db: &db,
        metrics: &metrics,
    };
    serving.serve(&config, listeners, client_router, peer_router);
    spawn_background(
        &tasks,
        &shutdown,
        &cluster,
        &config,
        presence_reports,
        push_task,
        archive,
    );
    let metrics_addr =
        metrics_listener.and_then(|l| serve_metrics(&tasks, l, &metrics, &shutdown, &config));
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

/// The TLS of the client and peer listeners (none when plaintext).
fn listener_tls(
    tls: Option<&Tls>,
    config: &Config,
) -> (
    Option<tonic::transport::ServerTlsConfig>,
    Option<tonic::transport::ServerTlsConfig>,
) {
    match tls {
        Some(tls) => (
            Some(tls.listener.clone()),
            Some(tls.peer.server(config.limits.tls_handshake_timeout)),
        ),
        None => (None, None),
    }
}

/// The channels to other nodes: TLS with this node's certificate unless plaintext.
fn peer_pool(config: &Config, tls: Option<&Tls>) -> Arc<ChannelPool> {
    let pool = ChannelPool::new(config.raft.rpc_timeout);
    Arc::new(match tls {
        Some(tls) => pool.with_tls(tls.peer.client()),
        None => pool,
    })
}

/// The TLS of both listeners, read from the configured files.
struct Tls {
    /// The node's certificate, key and the cluster CA: the peer listener and dialing peers.
    peer: courier_tls::PeerTls,
    /// The client listener's server side.
    listener: tonic::transport::ServerTlsConfig,
}

/// Reads the TLS files; `None`, with a warning, under `tls.insecure-plaintext`.
fn load_tls(config: &Config) -> Result<Option<Tls>, ServerError> {
    let Some(paths) = &config.tls else {
        tracing::warn!(
            "tls.insecure-plaintext: both listeners serve plaintext and the peer listener \
             checks no caller; anyone who reaches the peer port can read and rewrite the log. \
             Development only"
        );
        return Ok(None);
    };
    let peer = courier_tls::PeerTls::load(&paths.ca, &paths.cert, &paths.key)?;
    let expected = courier_tls::Role::Node(config.node_id);
    let found = peer.role()?;
    if found != expected {
        return Err(courier_tls::TlsError::WrongRole { expected, found }.into());
    }
    let tls = Tls {
        peer,
        listener: courier_tls::client_listener(
            &paths.listener_cert,
            &paths.listener_key,
            config.limits.tls_handshake_timeout,
        )?,
    };
    info!(ca = %paths.ca.display(), cert = %paths.cert.display(), "tls on both listeners");
    Ok(Some(tls))
}

/// Serves `/metrics` on `listener`, `limits.metrics-connections-max` scrapes at once; returns its
/// address.
fn serve_metrics(
    tasks: &TaskTracker,
    listener: tokio::net::TcpListener,
    metrics: &Arc<crate::metrics::Metrics>,
    shutdown: &CancellationToken,
    config: &Config,
) -> Option<SocketAddr> {
    let bound = listener.local_addr().ok();
    let connections_max = config.limits.metrics_connections_max;
    let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
    tasks.spawn(async move {
        crate::metrics::serve(listener, metrics, shutdown, connections_max).await;
    });
    info!(bound = ?bound, "metrics endpoint");
    bound
}

/// The node's database (its own RocksDB, or the embedder's) and its log archive. A node given its
/// database by the embedder (the simulation's memory disk) runs no archiver: its purges wait
/// (the simulation runs with snapshots off).
fn open_storage(
    config: &Config,
    provided: Option<Arc<Db>>,
) -> Result<(Arc<Db>, Option<Arc<Archive>>), ServerError> {
    if let Some(db) = provided {
        return Ok((db, None));
    }
    let db_path = config.data_dir.join("db");
    let db = Arc::new(Db::open(&db_path, OpenMode::ReadWrite)?);
    info!(path = %db_path.display(), "storage open");
    let archive = Arc::new(Archive::open(&config.archive)?);
    Ok((db, Some(archive)))
}

/// The ephemeral side: the presence table, the stream reporter (and its reports, for the task
/// that sends them) and the push hook (and its task, when a URL is configured).
fn edge(
    config: &Config,
) -> (
    Edge,
    tokio::sync::mpsc::Receiver<courier_proto::pb::peer::PresenceReport>,
    Option<crate::push::PushTask>,
) {
    let (reporter, presence_reports) = crate::presence::Reporter::new(
        usize::try_from(config.presence.report_queue_max).unwrap_or(usize::MAX),
    );
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
    let edge = Edge {
        presence: Arc::new(crate::presence::PresenceTable::new(
            usize::try_from(config.presence.users_max).unwrap_or(usize::MAX),
            config.presence.last_seen_ttl.0,
        )),
        reporter: Arc::new(reporter),
        pusher,
    };
    (edge, presence_reports, push_task)
}

/// The node's background tasks: outbox forwarders, the presence reporter, the push hook and
/// retention.
fn spawn_background(
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    cluster: &Cluster,
    config: &Config,
    presence_reports: tokio::sync::mpsc::Receiver<courier_proto::pb::peer::PresenceReport>,
    push_task: Option<crate::push::PushTask>,
    archive: Option<Arc<Archive>>,
) {
    if let Some(archive) = archive {
        let (groups, shutdown) = (cluster.groups().clone(), shutdown.clone());
        let interval = config.archive.interval;
        tasks.spawn(crate::archive::run(groups, archive, interval, shutdown));
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
        tasks.spawn(async move { crate::cluster::keep_warm(cluster, shutdown).await });
    }
    if let Some(interval) = config.leader_rebalance {
        let (cluster, shutdown) = (cluster.clone(), shutdown.clone());
        tasks.spawn(crate::cluster::run_leader_rebalancer(
            cluster, interval, shutdown,
        ));
        info!(?interval, "leader rebalancer on");
    }
    if let Some(interval) = config.replica_rebalance {
        let (cluster, shutdown) = (cluster.clone(), shutdown.clone());
        tasks.spawn(crate::cluster::run_replica_rebalancer(
            cluster, interval, shutdown,
        ));
        info!(?interval, "replica rebalancer on");
    }
    {
        let cluster = cluster.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            crate::cluster::run_reporter(cluster, presence_reports, shutdown).await;
        });
    }
    if let Some(task) = push_task {
        tasks.spawn(task.run(shutdown.clone()));
        info!("push hook on");
    }
    {
        let cluster = cluster.clone();
        let shutdown = shutdown.clone();
        let windows = crate::retention::Windows {
            undelivered: config.retention.undelivered.0,
            dedup: config.retention.dedup.0,
            interval: config.retention.scan_interval.0,
            forget_group_copies: !config.retention.keep_delivered,
            batch_max: usize::try_from(config.retention.batch_max).unwrap_or(usize::MAX),
            rounds_max: config.retention.batches_per_pass_max,
        };
        tasks.spawn(async move {
            crate::retention::run(cluster, windows, shutdown).await;
        });
    }
}
