//! Prometheus metrics over HTTP (`GET /metrics`, text exposition) on `listen.metrics`, through
//! `prometheus-client`. Two kinds:
//!
//! * events counted as they happen: sends by outcome, send-to-commit and send-to-stream latency
//!   histograms, live device streams, leader changes per shard;
//! * state read at scrape time by a collector (nothing kept twice): per shard the primary health
//!   gauges (apply lag, outbox length per destination shard), role, term, applied index, and the
//!   log's fsync count, entries appended and time spent in synced appends; push hook outcomes.
//!
//! The endpoint is deliberately small: one request per connection, at most
//! `limits.metrics-connections-max` at once, requests up to [`REQUEST_BYTES_MAX`], a read
//! deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use courier_consensus::types::GroupId;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::status::ApiError;

/// Largest request read, bytes.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Deadline to read a request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often leadership is sampled for `courier_shard_leader_changes_total`.
pub const LEADER_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Why a `Send` ended as it did.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SendOutcome {
    /// Stored on a quorum (a first send).
    accepted,
    /// A retry answered with the first result.
    duplicate,
    /// The device's token bucket was empty.
    rate_limited,
    /// Malformed or over a limit.
    invalid,
    /// No valid credential.
    unauthenticated,
    /// Unknown recipient.
    not_found,
    /// No leader or quorum: retry.
    unavailable,
    /// A fault in this node.
    internal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: SendOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: u32,
}

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sends: Family<OutcomeLabel, Counter>,
    send_commit: Histogram,
    send_to_stream: Histogram,
    live_streams: Gauge,
    leader_changes: Family<ShardLabel, Counter>,
    connections_refused: Family<ListenerLabel, Counter>,
}

impl Metrics {
    /// Every metric of a node serving `cluster` (and archiving to `archive`).
    pub fn new(cluster: Cluster, archive: Option<Arc<crate::archive::Archive>>) -> Arc<Self> {
        let mut registry = Registry::default();
        let sends = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "courier_sends",
            "Send requests answered by this node, by outcome",
            sends.clone(),
        );
        // 0.5 ms .. ~16 s.
        let send_commit = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "courier_send_commit_seconds",
            "From a Send reaching this node to its commit on a quorum (fsync) and apply",
            send_commit.clone(),
        );
        let send_to_stream = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "courier_send_to_stream_seconds",
            "From a message's send (sender leader clock) to its push on a live device stream here",
            send_to_stream.clone(),
        );
        let live_streams = Gauge::default();
        registry.register(
            "courier_live_streams",
            "Device streams open on this node",
            live_streams.clone(),
        );
        let leader_changes = Family::<ShardLabel, Counter>::default();
        registry.register(
            "courier_shard_leader_changes",
            "Changes of a shard's known leader seen by this node (sampled every 250 ms)",
            leader_changes.clone(),
        );
        let connections_refused = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "courier_connections_refused",
            "Connections closed at once because the listener was at its connection cap",
            connections_refused.clone(),
        );
        registry.register_collector(Box::new(ShardCollector { cluster, archive }));
        Arc::new(Self {
            registry,
            sends,
            send_commit,
            send_to_stream,
            live_streams,
            leader_changes,
            connections_refused,
        })
    }

    /// The counter of connections `listener` (`"client"`, `"peer"`) refused at its cap.
    pub fn connections_refused(&self, listener: &'static str) -> Counter {
        self.connections_refused
            .get_or_create(&ListenerLabel { listener })
            .clone()
    }

    /// Counts one answered `Send`.
    pub fn send_answered(&self, result: &Result<bool, ApiError>) {
        let outcome = match result {
            Ok(false) => SendOutcome::accepted,
            Ok(true) => SendOutcome::duplicate,
            Err(ApiError::RateLimited { .. }) => SendOutcome::rate_limited,
            Err(
                ApiError::Wire(_) | ApiError::Invalid { .. } | ApiError::ResourceExhausted { .. },
            ) => SendOutcome::invalid,
            Err(ApiError::Unauthenticated { .. } | ApiError::PermissionDenied { .. }) => {
                SendOutcome::unauthenticated
            }
            Err(ApiError::NotFound { .. }) => SendOutcome::not_found,
            Err(ApiError::Unavailable { .. } | ApiError::FailedPrecondition { .. }) => {
                SendOutcome::unavailable
            }
            Err(ApiError::Internal { .. }) => SendOutcome::internal,
        };
        self.sends.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Records a send's time to commit.
    pub fn send_committed(&self, took: Duration) {
        self.send_commit.observe(took.as_secs_f64());
    }

    /// Records a live push, `latency_ms` after the message was sent.
    pub fn pushed_live(&self, latency_ms: u64) {
        self.send_to_stream.observe(latency_ms as f64 / 1000.0);
    }

    /// Counts a device stream open until the guard drops.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGauge {
        self.live_streams.inc();
        StreamGauge(self.clone())
    }

    /// Renders the metrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Samples every shard's leader until `shutdown`, counting changes.
    pub async fn watch_leaders(self: Arc<Self>, cluster: Cluster, shutdown: CancellationToken) {
        let mut last: BTreeMap<u32, Option<u64>> = BTreeMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LEADER_SAMPLE_INTERVAL) => {}
            }
            for (group, handle) in cluster.groups().list() {
                let GroupId::Shard(shard) = group else {
                    continue;
                };
                let leader = handle.current_leader();
                let shard = u32::from(shard.get());
                if last
                    .insert(shard, leader)
                    .is_some_and(|before| before != leader)
                {
                    self.leader_changes
                        .get_or_create(&ShardLabel { shard })
                        .inc();
                }
            }
        }
    }
}

/// Keeps `courier_live_streams` counting one stream while alive.
#[derive(Debug)]
pub struct StreamGauge(Arc<Metrics>);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.live_streams.dec();
    }
}

/// Per-shard state, read from the cluster at scrape time.
#[derive(Debug)]
struct ShardCollector {
    cluster: Cluster,
    archive: Option<Arc<crate::archive::Archive>>,
}

type Gauges = Vec<(Vec<(&'static str, String)>, i64)>;

fn gauge_family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &Gauges,
    counter: bool,
) -> Result<(), std::fmt::Error> {
    let kind = if counter {
        ConstCounter::new(0_u64).metric_type()
    } else {
        ConstGauge::new(0_i64).metric_type()
    };
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let metric = family.encode_family(labels)?;
        if counter {
            ConstCounter::new(u64::try_from(*value).unwrap_or(0)).encode(metric)?;
        } else {
            ConstGauge::new(*value).encode(metric)?;
        }
    }
    Ok(())
}

impl Collector for ShardCollector {
    // The catalogue of metric families, one `put` each: split, it would be read in pieces.
    #[allow(clippy::too_many_lines)]
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = self.cluster.status();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut families: BTreeMap<&'static str, (&'static str, bool, Gauges)> = BTreeMap::new();
        let mut put = |name: &'static str, help: &'static str, counter: bool, labels, value| {
            families
                .entry(name)
                .or_insert((help, counter, Vec::new()))
                .2
                .push((labels, value));
        };
        let stats: BTreeMap<u32, _> = self
            .cluster
            .groups()
            .list()
            .into_iter()
            .filter_map(|(group, handle)| match group {
                GroupId::Shard(shard) => Some((u32::from(shard.get()), handle.stats)),
                GroupId::Metadata => None,
            })
            .collect();
        for shard in &status.shards {
            let labels = || vec![("shard", shard.shard.to_string())];
            put(
                "courier_shard_apply_lag_entries",
                "Log entries stored but not yet applied on this replica",
                false,
                labels(),
                as_i64(shard.apply_lag),
            );
            put(
                "courier_shard_applied_index",
                "Last applied log index",
                false,
                labels(),
                as_i64(shard.applied),
            );
            put(
                "courier_shard_term",
                "Current raft term",
                false,
                labels(),
                as_i64(shard.term),
            );
            put(
                "courier_shard_is_leader",
                "1 when this node leads the shard",
                false,
                labels(),
                i64::from(shard.role == "leader"),
            );
            put(
                "courier_log_fsyncs",
                "Log appends since start (each waits for a synced write the node's log writer shares with other shards' appends)",
                true,
                labels(),
                as_i64(shard.fsyncs),
            );
            put(
                "courier_log_entries_appended",
                "Log entries appended since start (entries / fsyncs = group commit)",
                true,
                labels(),
                as_i64(shard.entries_appended),
            );
            if let Some(stats) = stats.get(&shard.shard) {
                let micros = stats.sync_nanos.load(Ordering::Relaxed) / 1_000;
                put(
                    "courier_log_fsync_micros",
                    "Microseconds spent in synced log appends since start (divide by fsyncs for the mean)",
                    true,
                    labels(),
                    as_i64(micros),
                );
            }
            put(
                "courier_shard_outbox_len_entries",
                "Outbox entries not yet forwarded and trimmed, all destinations",
                false,
                labels(),
                as_i64(shard.outbox_len_entries),
            );
            for (dest, len) in self.cluster.outbox_by_dest(courier_proto::ShardId::new(
                u16::try_from(shard.shard).unwrap_or(u16::MAX),
            )) {
                put(
                    "courier_shard_outbox_dest_entries",
                    "Outbox entries to one destination shard not yet forwarded and trimmed",
                    false,
                    vec![
                        ("shard", shard.shard.to_string()),
                        ("dest", dest.to_string()),
                    ],
                    as_i64(len),
                );
            }
        }
        if let Some(archive) = &self.archive {
            let db = self.cluster.groups().db().clone();
            for shard in &status.shards {
                let id =
                    courier_proto::ShardId::new(u16::try_from(shard.shard).unwrap_or(u16::MAX));
                let archived = courier_storage::LogStore::new(db.clone(), id)
                    .archived_up_to()
                    .map_or(0, |i| i.get());
                put(
                    "courier_archive_lag_entries",
                    "Applied log entries not yet in the archive (purging waits for them)",
                    false,
                    vec![("shard", shard.shard.to_string())],
                    as_i64(shard.applied.saturating_sub(archived)),
                );
            }
            let counters = archive.counters();
            for (name, help, value) in [
                (
                    "courier_archive_segments",
                    "Archive segments written (or found written by another replica) and verified",
                    &counters.segments,
                ),
                (
                    "courier_archive_bytes",
                    "Bytes of archive segments written",
                    &counters.bytes,
                ),
                (
                    "courier_archive_failures",
                    "Failed archive passes (a store failure: purging waits until the archive holds the entries; a fault of a replica's own log: that replica stopped, see the error log): alert on any",
                    &counters.failures,
                ),
                (
                    "courier_archive_gaps",
                    "Runs of segments skipped because this replica never held their entries (installed by a snapshot)",
                    &counters.gaps,
                ),
                (
                    "courier_archive_repairs",
                    "Damaged archive segments (failing their checksum, or not segments) written again from this replica's log",
                    &counters.repairs,
                ),
            ] {
                let value = value.load(Ordering::Relaxed);
                put(name, help, true, Vec::new(), as_i64(value));
            }
        }
        // Voter groups only: a node may run an empty group of a shard placed elsewhere.
        let held: Vec<_> = status
            .shards
            .iter()
            .filter(|shard| shard.replicas.contains(&status.node_id))
            .collect();
        let leads = held.iter().filter(|s| s.role == "leader").count();
        put(
            "courier_node_shard_replicas",
            "Shards this node is a voter of (its placed replicas)",
            false,
            Vec::new(),
            i64::try_from(held.len()).unwrap_or(i64::MAX),
        );
        put(
            "courier_node_shard_leaders",
            "Shards this node leads (compare across nodes: `courier-ops leader rebalance` evens them out)",
            false,
            Vec::new(),
            i64::try_from(leads).unwrap_or(i64::MAX),
        );
        let log_cache = self.cluster.groups().log_cache();
        for (name, help, value) in [
            (
                "courier_node_log_cache_bytes",
                "Encoded bytes of recent log entries all shards of this node keep in memory for replication and apply",
                log_cache.used(),
            ),
            (
                "courier_node_log_cache_bytes_max",
                "The budget of courier_node_log_cache_bytes (raft.log-cache-bytes-max): past it the shards that appended least recently give up their oldest entries",
                log_cache.max(),
            ),
        ] {
            put(
                name,
                help,
                false,
                Vec::new(),
                i64::try_from(value).unwrap_or(i64::MAX),
            );
        }
        if let Some(counters) = &status.counters {
            for (name, help, value) in [
                (
                    "courier_node_synced_writes",
                    "Every fsync of the node's database: log appends, vote and purge records, WAL syncs",
                    counters.synced_writes,
                ),
                (
                    "courier_node_apply_reads",
                    "Point reads and scans of the database made by the apply fold (reads answered from its batch are not counted)",
                    counters.apply_reads,
                ),
                (
                    "courier_node_apply_writes",
                    "Puts and deletes staged by the apply fold",
                    counters.apply_writes,
                ),
                (
                    "courier_node_merged_writes",
                    "Log appends of every group the node's log writer merged into its fsyncs (divide by synced writes for appends per fsync)",
                    counters.merged_writes,
                ),
                (
                    "courier_node_invalid_events",
                    "Committed events refused as invalid at apply (no validating leader proposed them; see SECURITY.md)",
                    counters.invalid_events,
                ),
                (
                    "courier_node_peer_calls",
                    "gRPC messages this node sent its peers: unary calls (raft, forward, admin) and raft pipe frames",
                    counters.peer_calls,
                ),
                (
                    "courier_node_raft_pipe_calls",
                    "Raft calls (appends, votes) sent to peers in pipe frames",
                    counters.pipe_calls,
                ),
                (
                    "courier_node_raft_pipes_opened",
                    "Raft pipes opened to peers (more than one per peer: the stream broke and was re-established)",
                    counters.pipes_opened,
                ),
                (
                    "courier_node_pusher_passes",
                    "Device-stream passes over an inbox and receipt feed (one per wake-up)",
                    counters.pusher_passes,
                ),
                (
                    "courier_node_forwarder_passes",
                    "Outbox forwarder passes",
                    counters.forwarder_passes,
                ),
                (
                    "courier_node_apply_wakeups",
                    "Wake-ups delivered after apply to the streams of the users a batch touched and to the forwarder",
                    counters.wakeups,
                ),
            ] {
                put(name, help, true, Vec::new(), as_i64(value));
            }
            for (outcome, value) in [
                ("done", counters.moves_done),
                ("failed", counters.moves_failed),
            ] {
                put(
                    "courier_node_shard_moves",
                    "Shard moves this node ran (Admin.MoveShard), by how they ended: done, failed (sent again, a move resumes)",
                    true,
                    vec![("outcome", outcome.to_owned())],
                    as_i64(value),
                );
            }
        }
        put(
            "courier_node_shard_moves_running",
            "Shard moves running on this node now (each one's step is in Admin.Status)",
            false,
            Vec::new(),
            i64::try_from(status.moves.len()).unwrap_or(i64::MAX),
        );
        let push = &self.cluster.edge().pusher.stats;
        for (outcome, value) in [
            ("sent", &push.sent),
            ("failed", &push.failed),
            ("dropped", &push.dropped),
            ("attempt_failed", &push.attempt_failures),
        ] {
            put(
                "courier_push",
                "Push hook outcomes: sent (2xx), failed (every attempt failed), dropped (queue full), attempt_failed (each failed attempt)",
                true,
                vec![("outcome", outcome.to_owned())],
                as_i64(value.load(Ordering::Relaxed)),
            );
        }
        for (name, (help, counter, values)) in &families {
            gauge_family(&mut encoder, name, help, values, *counter)?;
        }
        Ok(())
    }
}

/// Serves `/metrics` on `listener` until `shutdown`, `connections_max` scrapes at once (further
/// connections wait in the listen backlog).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    connections_max: u32,
) {
    let permits = Arc::new(Semaphore::new(
        usize::try_from(connections_max).unwrap_or(usize::MAX),
    ));
    loop {
        // We never close the semaphore, so acquiring cannot fail.
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut request = vec![0_u8; REQUEST_BYTES_MAX];
            let Ok(Ok(read)) = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut request)).await
            else {
                return;
            };
            let head = String::from_utf8_lossy(&request[..read]);
            let response = if head.starts_with("GET /metrics ") {
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
