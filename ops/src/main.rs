//! `courier-ops`: what an operator runs against a courier node.
//!
//! Online commands talk gRPC to a node's peer (admin) or client address; offline commands open a
//! stopped node's data directory read-only. Exit codes: 0 success, 1 the check failed (unhealthy,
//! projection mismatch), 2 usage or connection error.

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// jemalloc, as the node uses: an offline rebuild or verify decodes and stores small values for
/// every event it replays (the storage bench's rebuild: a median of 145k events/s against 99k on
/// glibc's malloc, docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod balance;
mod demo;
mod inspect;
mod jobs;
mod offline;
mod online;
mod progress;
mod transport;

/// Operate a courier cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    tls: transport::TlsArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks gRPC health of a node address (client or peer); exits 1 unless SERVING.
    Health {
        /// host:port of the node.
        #[arg(long)]
        addr: String,
        /// Keep retrying until healthy or this many seconds pass.
        #[arg(long, default_value_t = 0)]
        wait_s: u64,
    },
    /// Lists the gRPC services a node address serves (server reflection).
    Services {
        /// host:port of the node.
        #[arg(long)]
        addr: String,
    },
    /// Cluster administration over the admin gRPC API (a node's peer address).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Moves shard leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Adds or removes a node (every group, each on its leader; on a cluster that places shards,
    /// the metadata group: `shard rebalance` gives a new node replicas, `node drain` takes them
    /// away before a removal).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Moves shard replicas between nodes (a cluster that places shards on some nodes).
    #[command(subcommand)]
    Shard(ShardCommand),
    /// Takes a consistent RocksDB checkpoint of a running node (written on the node's machine).
    Backup {
        /// Peer address of the node.
        #[arg(long)]
        addr: String,
        /// Directory to create on the node's machine (must not exist).
        #[arg(long)]
        dir: String,
    },
    /// Restores a checkpoint (from `backup`) into the data directory of a new node, verifying
    /// every shard of it; the node then joins with `node add` under a new id.
    Restore {
        /// The checkpoint directory `backup` wrote.
        #[arg(long)]
        from: PathBuf,
        /// The new node's data directory (its `db/` must not exist).
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        archive: jobs::ArchiveDir,
    },
    /// Inspects state as it was at a log index (offline: replays the log into memory).
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Rebuilds one projection of a shard from its log and swaps it in atomically; the old
    /// projection stays until the swap. Online (`--addr`: on that running replica) or offline
    /// (`--data-dir` of a stopped node).
    Rebuild {
        #[command(flatten)]
        target: jobs::Target,
        #[command(flatten)]
        archive: jobs::ArchiveDir,
        /// The shard.
        #[arg(long)]
        shard: u16,
        /// The projection to rebuild.
        #[arg(long)]
        projection: String,
        /// Confirms the rewrite (refused without it).
        #[arg(long)]
        yes: bool,
        /// Replay every entry from index 1, ignoring the archive's verify checkpoints (after an
        /// upgrade that changed how the projection is stored: a checkpoint holds the old form).
        #[arg(long)]
        from_genesis: bool,
    },
    /// Dev-mode demo: two users on different shards talk through a running cluster.
    Demo {
        /// Client address of the node Alice uses.
        #[arg(long)]
        alice_addr: String,
        /// That node's data directory (its dev SMS outbox holds the code).
        #[arg(long)]
        alice_data_dir: PathBuf,
        /// Client address of the node Bob uses.
        #[arg(long)]
        bob_addr: String,
        /// That node's data directory.
        #[arg(long)]
        bob_data_dir: PathBuf,
        /// The cluster's shard count.
        #[arg(long, default_value_t = 8)]
        shards: u16,
        /// Messages for the send → arrival latency measurement (0: skip).
        #[arg(long, default_value_t = 200)]
        latency_samples: usize,
    },
    /// Reads a shard's event log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Replays a shard's log into scratch space and compares every projection with the live
    /// one, digest for digest, at one applied index; names the first divergent index and key on
    /// a mismatch. Online (`--addr`: on that running replica, from a checkpoint) or offline
    /// (`--data-dir` of a stopped node). Exits 1 on a mismatch.
    Verify {
        #[command(flatten)]
        target: jobs::Target,
        /// The shard to verify (default: every shard).
        #[arg(long)]
        shard: Option<u16>,
        /// Only this projection (default: all).
        #[arg(long)]
        projection: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        archive: jobs::ArchiveDir,
        /// Replay every entry from index 1. By default the replay starts from the archive's
        /// newest verify checkpoint (a state an earlier verify attested; a running node writes
        /// one after each verify whose every projection matched).
        #[arg(long)]
        from_genesis: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Generates a development PKI into a directory: a CA (ca.pem), `node-<id>.pem`/`.key` for
    /// each node, operator.pem/.key, listener.pem/.key (for localhost, 127.0.0.1 and --host
    /// names).
    /// For development and tests only: the CA's key is not kept.
    Dev {
        /// The directory to write (created if missing; files are replaced).
        #[arg(long)]
        dir: PathBuf,
        /// Node ids 1..=N get certificates.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// More DNS names for the client listener certificate.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Bootstraps a new cluster from the node at `--addr`. Safe to retry with the same members.
    Init {
        /// Peer address of the node to bootstrap from.
        #[arg(long)]
        addr: String,
        /// Members as `ID=HOST:PORT` (peer addresses), repeated or comma-separated.
        #[arg(long = "member", value_delimiter = ',', required = true)]
        members: Vec<String>,
        /// Number of shards `S` (fixed for the life of the cluster).
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Replicas per shard `R`: odd, at most 7 and at most the member count (or exactly the
        /// member count). 0: three, or every member of a smaller cluster.
        #[arg(long, default_value_t = 0)]
        replicas: u32,
        /// A file holding the cluster's phone-hash key as 64 hex digits. Without it the node
        /// generates the key, which then never leaves the cluster (the usual choice; supply one
        /// only to compute user ids outside the cluster, as the benchmark does).
        #[arg(long, value_name = "FILE")]
        phone_key_file: Option<PathBuf>,
        /// The event format the cluster starts at. 0: the newest this build writes, once every
        /// member reads it (otherwise 1, raised later with `cluster raise-format`).
        #[arg(long, default_value_t = 0)]
        event_format: u32,
    },
    /// Raises the event format the cluster's leaders write, once every member runs a build that
    /// reads it (after a rolling upgrade: docs/RUNBOOK.md, "Upgrading a cluster"). Never lowers
    /// it.
    RaiseFormat {
        /// Peer address of any node.
        #[arg(long)]
        addr: String,
        /// The format to raise to. 0: the newest the node at `--addr` writes.
        #[arg(long, default_value_t = 0)]
        event_format: u32,
    },
    /// Prints a table of every shard on every node: role, term, leader, applied, lag, outbox.
    Status {
        /// Peer address of any node; the others are found through its membership.
        #[arg(long)]
        addr: String,
        /// One JSON object per node instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LeaderCommand {
    /// Spreads shard leadership evenly over the reachable nodes again (after a failover left
    /// one node leading most shards): plans the fewest transfers that bring every node's leader
    /// count within one of the others', then carries them out one at a time, each confirmed by
    /// its new leader. Exits 1 if a transfer did not complete.
    Rebalance {
        /// Peer address of any node; the others are found through its membership.
        #[arg(long)]
        addr: String,
        /// Print the plan without moving anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Moves leadership of a shard to a node (that node starts an election).
    Transfer {
        /// Peer address of the node that should lead.
        #[arg(long)]
        addr: String,
        /// Its node id.
        #[arg(long)]
        node: u64,
        /// The shard.
        #[arg(long)]
        shard: u32,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Adds a started, empty node: learner first (it catches up), then voter. On a cluster that
    /// places shards it joins holding none; run `shard rebalance` next.
    Add {
        /// Peer address of any current member.
        #[arg(long)]
        addr: String,
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's peer address.
        #[arg(long)]
        peer: String,
    },
    /// Marks a node draining (no move puts a replica on it; `node undrain` ends that), then
    /// moves every shard replica off it (a cluster that places shards on some nodes), one move
    /// at a time, each to the node without the shard that holds fewest; then remove it.
    Drain {
        /// Peer address of any member.
        #[arg(long)]
        addr: String,
        /// The node to empty.
        #[arg(long)]
        id: u64,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ends a node's draining mark (`node drain` sets it): moves may put replicas on it again.
    Undrain {
        /// Peer address of any member.
        #[arg(long)]
        addr: String,
        /// The node.
        #[arg(long)]
        id: u64,
    },
    /// Removes a node; refused when fewer than 3 voters would remain, or (a cluster that places
    /// shards) while it holds replicas: `node drain` it first.
    Remove {
        /// Peer address of any member.
        #[arg(long)]
        addr: String,
        /// The node to remove.
        #[arg(long)]
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ShardCommand {
    /// Moves `--shard`'s replica from node `--from` to node `--to`: `--to` joins and catches up
    /// (progress shown), leadership leaves `--from`, `--from` leaves, the placement table records
    /// it, and the shard's data on `--from` is deleted and checked gone. Run it again to resume
    /// an interrupted move.
    Move {
        /// Peer address of any member.
        #[arg(long)]
        addr: String,
        /// The shard.
        #[arg(long)]
        shard: u32,
        /// The node the replica leaves.
        #[arg(long)]
        from: u64,
        /// The node the replica goes to.
        #[arg(long)]
        to: u64,
    },
    /// Evens out replicas per node (after a node joined the metadata group), one move at a
    /// time, until every node's count is within one of the others'.
    Rebalance {
        /// Peer address of any member.
        #[arg(long)]
        addr: String,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum InspectCommand {
    /// A user's inbox tail, device cursors, unread counts, receipts and devices at `--at`, each
    /// with the index of the event that last set it.
    User {
        #[command(flatten)]
        target: jobs::Target,
        /// The user id.
        #[arg(long)]
        user: u64,
        /// With --data-dir: the cluster's shard count (to find the user's shard). A running
        /// node knows it.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        shards: Option<u16>,
        /// The log index of the user's shard (default: the applied index).
        #[arg(long)]
        at: Option<u64>,
        #[command(flatten)]
        archive: jobs::ArchiveDir,
    },
    /// Follows one message: sent, forwarded, delivered, acked, read, with the log positions on
    /// the sender's and the recipient's shards.
    Message {
        /// The data directory of a stopped node.
        #[arg(long)]
        data_dir: PathBuf,
        /// The message id (32 hex digits, as `log dump` and the API show it).
        #[arg(long)]
        id: String,
        #[command(flatten)]
        archive: jobs::ArchiveDir,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Prints the events of a shard's log, one entry per line; from a stopped node's data
    /// directory or, online, from a running replica.
    Dump {
        #[command(flatten)]
        target: jobs::Target,
        #[command(flatten)]
        archive: jobs::ArchiveDir,
        /// The shard.
        #[arg(long)]
        shard: u16,
        /// First index (default: the first stored).
        #[arg(long)]
        from: Option<u64>,
        /// Last index, inclusive (default: the last stored).
        #[arg(long)]
        to: Option<u64>,
        /// One JSON object per event instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("courier-ops: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// `courier-ops shard …`.
fn shard_command(command: ShardCommand) -> anyhow::Result<bool> {
    match command {
        ShardCommand::Move {
            addr,
            shard,
            from,
            to,
        } => runtime()?.block_on(online::shard_move(&addr, shard, from, to)),
        ShardCommand::Rebalance { addr, dry_run } => {
            runtime()?.block_on(online::replica_plan(&addr, None, dry_run))
        }
    }
}

/// `courier-ops cluster …`.
fn cluster(command: ClusterCommand) -> anyhow::Result<bool> {
    match command {
        ClusterCommand::Init {
            addr,
            members,
            shards,
            replicas,
            phone_key_file,
            event_format,
        } => runtime()?
            .block_on(online::cluster_init(
                &addr,
                &members,
                shards,
                replicas,
                phone_key_file.as_deref(),
                event_format,
            ))
            .map(|()| true),
        ClusterCommand::RaiseFormat { addr, event_format } => runtime()?
            .block_on(online::raise_event_format(&addr, event_format))
            .map(|()| true),
        ClusterCommand::Status { addr, json } => {
            runtime()?.block_on(online::cluster_status(&addr, json))
        }
    }
}

/// `courier-ops inspect …`.
fn inspect_command(command: InspectCommand) -> anyhow::Result<bool> {
    match command {
        InspectCommand::User {
            target,
            user,
            shards,
            at,
            archive,
        } => runtime()?
            .block_on(jobs::inspect_user(target, &archive, user, shards, at))
            .map(|()| true),
        InspectCommand::Message {
            data_dir,
            id,
            archive,
        } => inspect::message(&data_dir, archive.open()?.as_deref(), &id),
    }
}

/// Runs a `node` subcommand.
fn node_command(command: NodeCommand) -> anyhow::Result<bool> {
    match command {
        NodeCommand::Add { addr, id, peer } => runtime()?
            .block_on(online::node_add(&addr, id, &peer))
            .map(|()| true),
        NodeCommand::Drain { addr, id, dry_run } => {
            runtime()?.block_on(online::replica_plan(&addr, Some(id), dry_run))
        }
        NodeCommand::Undrain { addr, id } => runtime()?
            .block_on(online::mark_draining(&addr, id, false))
            .map(|()| {
                println!("node {id} is no longer draining");
                true
            }),
        NodeCommand::Remove { addr, id } => runtime()?
            .block_on(online::node_remove(&addr, id))
            .map(|()| true),
    }
}

/// Runs one command; `Ok(false)` means the check ran and failed.
fn run(cli: Cli) -> anyhow::Result<bool> {
    transport::install(&cli.tls)?;
    match cli.command {
        Command::Health { addr, wait_s } => {
            runtime()?.block_on(online::health(&addr, Duration::from_secs(wait_s)))
        }
        Command::Services { addr } => {
            let services = runtime()?.block_on(online::services(&addr))?;
            for service in services {
                println!("{service}");
            }
            Ok(true)
        }
        Command::Cluster(command) => cluster(command),
        Command::Leader(LeaderCommand::Rebalance { addr, dry_run }) => {
            runtime()?.block_on(balance::rebalance(&addr, dry_run))
        }
        Command::Leader(LeaderCommand::Transfer { addr, node, shard }) => runtime()?
            .block_on(online::transfer_leader(&addr, node, shard))
            .map(|()| true),
        Command::Node(command) => node_command(command),
        Command::Shard(command) => shard_command(command),
        Command::Inspect(command) => inspect_command(command),
        Command::Restore {
            from,
            data_dir,
            archive,
        } => offline::restore(&from, &data_dir, archive.open()?.as_deref()),
        Command::Backup { addr, dir } => runtime()?
            .block_on(online::backup(&addr, &dir))
            .map(|()| true),
        Command::Rebuild {
            target,
            archive,
            shard,
            projection,
            yes,
            from_genesis,
        } => runtime()?
            .block_on(jobs::rebuild(
                target,
                (&archive, from_genesis),
                shard,
                &projection,
                yes,
            ))
            .map(|()| true),
        Command::Demo {
            alice_addr,
            alice_data_dir,
            bob_addr,
            bob_data_dir,
            shards,
            latency_samples,
        } => {
            let demo = demo::Demo {
                alice_node: (alice_addr, alice_data_dir),
                bob_node: (bob_addr, bob_data_dir),
                shards,
                latency_samples,
            };
            runtime()?.block_on(demo::run(demo)).map(|()| true)
        }
        Command::Log(LogCommand::Dump {
            target,
            archive,
            shard,
            from,
            to,
            json,
        }) => runtime()?
            .block_on(jobs::log_dump(target, &archive, shard, (from, to), json))
            .map(|()| true),
        Command::Verify {
            target,
            shard,
            projection,
            json,
            archive,
            from_genesis,
        } => runtime()?.block_on(jobs::verify(
            target,
            shard,
            projection,
            json,
            (&archive, from_genesis),
        )),
        Command::Certs(CertsCommand::Dev { dir, nodes, hosts }) => {
            let ids: Vec<u64> = (1..=nodes).collect();
            let mut names: Vec<&str> = vec!["localhost"];
            names.extend(hosts.iter().map(String::as_str));
            let pki = courier_tls::dev::DevPki {
                listener_hosts: &names,
                ..courier_tls::dev::DevPki::local(&ids)
            };
            courier_tls::dev::generate(&dir, &pki)?;
            println!("development PKI for nodes 1..={nodes} in {}", dir.display());
            Ok(true)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Checks that a data directory looks like a node's.
fn db_path(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let db = data_dir.join("db");
    if !db.join("CURRENT").exists() {
        bail!(
            "{} holds no courier database (expected {}/CURRENT)",
            data_dir.display(),
            db.display()
        );
    }
    Ok(db)
}
