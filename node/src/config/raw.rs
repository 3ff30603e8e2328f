//! The config file's sections as parsed, before validation, with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use courier_proto::limits;
use serde::Deserialize;

use crate::units::{ByteSize, HumanDuration};

/// `[listen]`: where the node serves.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Listen {
    /// Address of the client (phone) API. Port 0 picks a free port (written to
    /// `<data-dir>/node.addr`).
    pub client: SocketAddr,
    /// Address of the peer API (raft, forwarding, admin).
    pub peer: SocketAddr,
    /// Address of the Prometheus endpoint (`GET /metrics`); absent: no endpoint.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// `[raft]`: consensus timing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RaftRaw {
    /// Leader heartbeat interval. Default `"100ms"`.
    #[serde(default = "defaults::heartbeat")]
    pub heartbeat: HumanDuration,
    /// Lower bound of the randomized election timeout. Default `"500ms"`.
    #[serde(default = "defaults::election_timeout_min")]
    pub election_timeout_min: HumanDuration,
    /// Upper bound of the randomized election timeout. Default `"1000ms"`.
    #[serde(default = "defaults::election_timeout_max")]
    pub election_timeout_max: HumanDuration,
    /// Deadline of one raft or forward RPC. Default `"2s"`.
    #[serde(default = "defaults::rpc_timeout")]
    pub rpc_timeout: HumanDuration,
    /// Log entries between snapshots of a shard. Default 10000.
    #[serde(default = "defaults::snapshot_logs")]
    pub snapshot_logs_since_last: u64,
    /// Log entries kept below a snapshot for slow followers. Default 1000.
    #[serde(default = "defaults::logs_to_keep")]
    pub logs_to_keep: u64,
    /// Snapshot chunk size on the wire. Default `"1MiB"`.
    #[serde(default = "defaults::snapshot_chunk")]
    pub snapshot_chunk: ByteSize,
    /// Largest number of entries in one append-entries RPC. Default 256. A call of more than
    /// one entry also stops at `courier_consensus::network::APPEND_PAYLOAD_BYTES_MAX` bytes.
    #[serde(default = "defaults::append_entries")]
    pub append_entries_max: u64,
    /// Proposals waiting per shard for their raft entry at most; one more is refused with
    /// `UNAVAILABLE COURIER:Shard:Overloaded`. Default 4096.
    #[serde(default = "defaults::proposal_queue")]
    pub proposal_queue_max: u32,
    /// Bytes of proposals waiting per shard at most (at least 1MiB, one maximal proposal); past
    /// it, `COURIER:Shard:Overloaded` too. Default `"64MiB"`.
    #[serde(default = "defaults::proposal_queue_bytes")]
    pub proposal_queue_bytes_max: ByteSize,
    /// Encoded bytes of recent log entries all shards of the node keep decoded in memory at most,
    /// for replication and apply to read back (0: none kept, every read goes to disk). Default
    /// `"256MiB"`.
    #[serde(default = "defaults::log_cache_bytes")]
    pub log_cache_bytes_max: ByteSize,
}

/// `[cluster]`: what the nodes do for the cluster as a whole.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterRaw {
    /// How often each node evens out shard leadership for itself: each round, when every shard
    /// has a leader, a node that the rebalance plan (`courier_proto::placement::plan`) gives a
    /// shard starts an election for that one shard. `"0s"` (the default) leaves leadership where
    /// elections put it; `courier-ops leader rebalance` moves it by hand.
    #[serde(default = "defaults::leader_rebalance_interval")]
    pub leader_rebalance_interval: HumanDuration,
    /// How often each node of a cluster that places shards moves one of its own replicas when
    /// the replica plan asks it to: off a node marked draining, else from the nodes holding most
    /// to those holding fewest (`courier_proto::placement::{drain_plan, rebalance_plan}`). One
    /// move at a time per node. `"0s"` (the default) moves nothing by itself; `courier-ops shard
    /// rebalance` and `node drain` move by hand.
    #[serde(default = "defaults::replica_rebalance_interval")]
    pub replica_rebalance_interval: HumanDuration,
}

/// `[limits]`: everything a client can exhaust.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsRaw {
    /// Largest message body. Default `"64KiB"`, at most the protocol's 64 KiB.
    #[serde(default = "defaults::message_body")]
    pub message_body_max: ByteSize,
    /// Largest media thumbnail. Default `"32KiB"`, at most the protocol's 32 KiB.
    #[serde(default = "defaults::thumbnail")]
    pub thumbnail_max: ByteSize,
    /// Concurrent client connections per node. Default 10000.
    #[serde(default = "defaults::connections")]
    pub connections_max: u32,
    /// Concurrent HTTP/2 streams per client connection. Default 128.
    #[serde(default = "defaults::streams")]
    pub streams_per_connection_max: u32,
    /// Concurrent connections on the peer listener (other nodes and operators). Default 1024.
    #[serde(default = "defaults::peer_connections")]
    pub peer_connections_max: u32,
    /// Concurrent HTTP/2 streams per peer connection (a node's raft pipe, forwards, proposals
    /// and reads to one other node share one). Default 4096.
    #[serde(default = "defaults::peer_streams")]
    pub peer_streams_per_connection_max: u32,
    /// Members per group. Default 1024, at most the protocol's 1024.
    #[serde(default = "defaults::group_members")]
    pub group_members_max: u32,
    /// Companion devices per user. Default 4, at most the protocol's 4.
    #[serde(default = "defaults::companions")]
    pub companion_devices_max: u32,
    /// Sustained sends per second per device (token bucket rate). Default 20.
    #[serde(default = "defaults::send_rate")]
    pub sends_per_second_per_device: u32,
    /// Send burst per device (token bucket size). Default 40.
    #[serde(default = "defaults::send_burst")]
    pub send_burst_per_device: u32,
    /// Frames buffered per device stream before it falls back to reading the inbox. Default 256.
    #[serde(default = "defaults::stream_buffer")]
    pub stream_buffer_frames: u32,
    /// Encoded bytes of the frames buffered per device stream at most (a frame larger than this
    /// waits for an empty buffer), and of the messages of one page of the inbox its pusher reads
    /// (at least one message). Default `"1MiB"`, at most `"256MiB"`.
    #[serde(default = "defaults::stream_buffer_bytes")]
    pub stream_buffer_bytes: ByteSize,
    /// Inbox messages one `DeliveryAcked` log entry acks (and bodies it clears) at most, and
    /// messages of a conversation one `ReadUpTo` reads: a device's ack or read of more (a phone
    /// back after a long time offline) is proposed as several entries, so that no one entry's
    /// apply (receipts, trimmed bodies) grows with the inbox. Default 256.
    #[serde(default = "defaults::ack_span")]
    pub ack_span_max: u32,
    /// Outbox batches this node forwards at once, one per (source, destination) shard pair.
    /// Default 2; 1 forwards one pair at a time.
    #[serde(default = "defaults::forward_in_flight")]
    pub forward_batches_in_flight: u32,
    /// Devices (and recipients) whose check against this node's replica is remembered until a
    /// device change is applied here. Default 65536; when full, the cache starts over.
    #[serde(default = "defaults::device_cache")]
    pub device_cache_entries: u32,
    /// Presence lookups (`GetPresence` calls) per second per device (token bucket rate).
    /// Default 2.
    #[serde(default = "defaults::presence_rate")]
    pub presence_lookups_per_second_per_device: u32,
    /// Presence lookup burst per device. Default 10.
    #[serde(default = "defaults::presence_burst")]
    pub presence_lookup_burst_per_device: u32,
    /// Sends to unknown users (answered `NOT_FOUND`) per hour per device (token bucket rate), so
    /// that the answer is no fast oracle of who is registered. Default 60.
    #[serde(default = "defaults::unknown_rate")]
    pub unknown_recipients_per_hour_per_device: u32,
    /// Burst of sends to unknown users per device. Default 10.
    #[serde(default = "defaults::unknown_burst")]
    pub unknown_recipient_burst_per_device: u32,
    /// Device streams one device may hold open on this node at once. Default 4.
    #[serde(default = "defaults::streams_per_device")]
    pub streams_per_device_max: u32,
    /// A TLS handshake not finished within this is dropped, on both listeners (a connection
    /// that never finishes one would hold its slot under the connection cap). Default `"10s"`.
    #[serde(default = "defaults::tls_handshake_timeout")]
    pub tls_handshake_timeout: HumanDuration,
    /// HTTP/2 keepalive pings on client connections: every this long. Default `"30s"`.
    #[serde(default = "defaults::keepalive_interval")]
    pub keepalive_interval: HumanDuration,
    /// A client connection whose ping goes unanswered this long is closed. Default `"10s"`.
    #[serde(default = "defaults::keepalive_timeout")]
    pub keepalive_timeout: HumanDuration,
    /// Registration codes a phone number may request per hour (token bucket rate). Default 10.
    #[serde(default = "defaults::code_rate")]
    pub code_requests_per_hour_per_phone: u32,
    /// Code request burst per phone number. Default 3.
    #[serde(default = "defaults::code_burst")]
    pub code_request_burst_per_phone: u32,
    /// Register attempts (right or wrong code) per phone number per hour. Default 20.
    #[serde(default = "defaults::register_rate")]
    pub register_attempts_per_hour_per_phone: u32,
    /// Register attempt burst per phone number. Default 5.
    #[serde(default = "defaults::register_burst")]
    pub register_attempt_burst_per_phone: u32,
    /// Code requests one client address may make per hour on one node (in that node's memory;
    /// the per-number limits above hold cluster-wide). Default 120.
    #[serde(default = "defaults::address_code_rate")]
    pub code_requests_per_hour_per_address: u32,
    /// Code request burst per client address. Default 60.
    #[serde(default = "defaults::address_code_burst")]
    pub code_request_burst_per_address: u32,
    /// Register attempts one client address may make per hour on one node. Default 240.
    #[serde(default = "defaults::address_register_rate")]
    pub register_attempts_per_hour_per_address: u32,
    /// Register attempt burst per client address. Default 120.
    #[serde(default = "defaults::address_register_burst")]
    pub register_attempt_burst_per_address: u32,
    /// Prekey bundle fetches per device per hour, on each node (each takes a one-time prekey
    /// from every device of the user fetched). Default 120.
    #[serde(default = "defaults::prekey_fetch_rate")]
    pub prekey_fetches_per_hour_per_device: u32,
    /// Prekey bundle fetch burst per device. Default 30.
    #[serde(default = "defaults::prekey_fetch_burst")]
    pub prekey_fetch_burst_per_device: u32,
    /// Fetches of one user's bundle by one other user per hour, on each node. Default 20.
    #[serde(default = "defaults::prekey_pair_rate")]
    pub prekey_fetches_per_hour_per_pair: u32,
    /// Fetch burst of one user's bundle by one other user. Default 5.
    #[serde(default = "defaults::prekey_pair_burst")]
    pub prekey_fetch_burst_per_pair: u32,
    /// Key uploads per device per hour. Default 60.
    #[serde(default = "defaults::key_upload_rate")]
    pub key_uploads_per_hour_per_device: u32,
    /// Key upload burst per device. Default 10.
    #[serde(default = "defaults::key_upload_burst")]
    pub key_upload_burst_per_device: u32,
    /// Group changes (`CreateGroup`, `AddMember`, `RemoveMember`, `LeaveGroup`) per device per
    /// hour. Default 3600.
    #[serde(default = "defaults::group_change_rate")]
    pub group_changes_per_hour_per_device: u32,
    /// Group change burst per device. Default 200.
    #[serde(default = "defaults::group_change_burst")]
    pub group_change_burst_per_device: u32,
    /// `StartPairing` calls per client address per hour, on each node. Default 60.
    #[serde(default = "defaults::pairing_rate")]
    pub pairings_per_hour_per_address: u32,
    /// `StartPairing` burst per client address. Default 20.
    #[serde(default = "defaults::pairing_burst")]
    pub pairing_burst_per_address: u32,
    /// Pairings outstanding on one node at once (started, not yet completed or expired); one
    /// more is refused with `RESOURCE_EXHAUSTED COURIER:Pairing:TooMany`. Default 10000.
    #[serde(default = "defaults::pairings_max")]
    pub pairings_max: u32,
    /// How long a started pairing waits for its approval and completion. Default `"2m"`.
    #[serde(default = "defaults::pairing_ttl")]
    pub pairing_ttl: HumanDuration,
    /// Typing updates one device may broadcast per second; more are dropped (typing is
    /// ephemeral). Default 5.
    #[serde(default = "defaults::typing_rate")]
    pub typing_per_second_per_device: u32,
    /// Typing update burst per device. Default 10.
    #[serde(default = "defaults::typing_burst")]
    pub typing_burst_per_device: u32,
    /// Keys (devices, addresses, user pairs) each in-memory rate limiter of a node tracks at
    /// most; past it, refilled buckets and then the keys idle longest are forgotten, 1 % of the
    /// map at once. Default 100000.
    #[serde(default = "defaults::rate_limit_keys")]
    pub rate_limit_keys_max: u32,
    /// Typing updates being handed to the other nodes at once, node-wide; past it an update is
    /// dropped (typing is best effort). Default 1024.
    #[serde(default = "defaults::typing_broadcasts")]
    pub typing_broadcasts_max: u32,
    /// Projection jobs (verify, rebuild, inspect) running at once on a node, each replaying a
    /// whole log on a thread of its own; past it `COURIER:Maintenance:Busy`. Default 1.
    #[serde(default = "defaults::projection_jobs")]
    pub projection_jobs_max: u32,
    /// Memory one projection job's replay may hold (the shard's projections as of the replayed
    /// index, counted as their keys and values plus 64 bytes a pair); past it the job stops with
    /// `COURIER:Maintenance:TooLarge`. Default `"2GiB"`, at most `"1024GiB"`.
    #[serde(default = "defaults::projection_job_memory")]
    pub projection_job_memory_max: ByteSize,
    /// Scrapes of `/metrics` served at once; further connections wait to be accepted. Default 16.
    #[serde(default = "defaults::metrics_connections")]
    pub metrics_connections_max: u32,
}

/// `[retention]`: how long undelivered messages wait for their recipient, and how long a send's
/// client message id is remembered.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionRaw {
    /// An undelivered message older than this expires (a `MessageExpired` event proposed by the
    /// shard's leader). Default `"30d"`.
    #[serde(default = "defaults::undelivered")]
    pub undelivered: HumanDuration,
    /// The exactly-once window: a send's dedup record (its client message id) is forgotten
    /// this long after it was sent (a `SendsForgotten` event proposed by the sender's shard
    /// leader), and a retry after that is a new message. The stub of a delivered message (its
    /// body gone once every device acked) is forgotten this long after it was stored (an
    /// `InboxForgotten`), and a receipt this long after it was set (a `ReceiptsForgotten`).
    /// With `keep-delivered = false`, a group message's stored copy is forgotten `undelivered`
    /// + this after it was sent (a `GroupMessagesForgotten`). Default `"7d"`.
    #[serde(default = "defaults::dedup")]
    pub dedup: HumanDuration,
    /// How often each shard leader looks for expired messages, and sends, stubs, receipts and
    /// group message copies to forget. Default `"10s"`.
    #[serde(default = "defaults::expiry_scan")]
    pub scan_interval: HumanDuration,
    /// Keep message bodies in the inbox after every device of the user acked them (history on
    /// the server). Default `false`: server-centric, bodies leave once delivered everywhere.
    #[serde(default)]
    pub keep_delivered: bool,
    /// With `keep-delivered = false`: the user's last this many inbox messages keep their bodies
    /// although every device acked them, so that a companion linked later gets that much recent
    /// history (0: none). At most 1000. Default 100.
    #[serde(default = "defaults::companion_history")]
    pub companion_history: u32,
    /// Expired messages, and forgotten sends, inbox stubs, receipts and group message copies
    /// (each), in one retention proposal at most. At most 1000. Default 256.
    #[serde(default = "defaults::retention_batch")]
    pub batch_max: u32,
    /// Retention proposals in a row per shard per scan at most, while a kind still fills its
    /// batch: each kind leaves at up to `batch-max × batches-per-pass-max` per `scan-interval`
    /// per shard. Default 64.
    #[serde(default = "defaults::retention_batches")]
    pub batches_per_pass_max: u32,
}

/// `[presence]`: online and last seen, in memory on each user's shard leader.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PresenceRaw {
    /// Users whose presence one node holds at most. Default 1000000.
    #[serde(default = "defaults::presence_users")]
    pub users_max: u32,
    /// How long a user's last-seen time is kept after their last stream closed. Default `"7d"`.
    #[serde(default = "defaults::last_seen_ttl")]
    pub last_seen_ttl: HumanDuration,
    /// Presence reports (a stream opened or closed) waiting to be sent to their users' shard
    /// leaders; a full queue drops new ones (the leader's staleness deadline corrects the user's
    /// state). Default 4096.
    #[serde(default = "defaults::presence_reports")]
    pub report_queue_max: u32,
}

/// `[push]`: waking devices of users with no live stream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PushRaw {
    /// `http://host:port/path` receiving `{"user":U,"message_id":"hex"}` POSTs; empty (the
    /// default): push is off.
    #[serde(default)]
    pub url: String,
    /// Pushes waiting to be sent; a full queue drops (and counts) new ones. Default 10000.
    #[serde(default = "defaults::push_queue")]
    pub queue_max: u32,
    /// Attempts per push, with exponential backoff. Default 5.
    #[serde(default = "defaults::push_attempts")]
    pub attempts_max: u32,
    /// Deadline of one attempt. Default `"2s"`.
    #[serde(default = "defaults::push_timeout")]
    pub timeout: HumanDuration,
}

/// `[tracing]`: distributed traces over OTLP (off unless an endpoint is set).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TracingRaw {
    /// OTLP/gRPC collector, e.g. `"http://127.0.0.1:4317"`; empty (the default): no export.
    #[serde(default)]
    pub otlp_endpoint: String,
    /// `service.name` of this node's spans. Default `"courier-node"`.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
}

/// `[log]`: the node's own logs (structured; never bodies, phone numbers or tokens).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogRaw {
    /// `"json"` (default) or `"text"`.
    #[serde(default = "defaults::log_format")]
    pub format: LogFormat,
    /// A tracing filter, e.g. `"info"` or `"courier_node=debug,info"`. Default `"info"`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

/// `[sms]`: how registration codes reach phones: the development outbox or an HTTP provider, not
/// both.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SmsRaw {
    /// Development only: append `number code` lines, in plain text, to this file. Unset (the
    /// default), and no `[sms.http]`: no SMS sender, and `RequestCode` answers `UNAVAILABLE`.
    #[serde(default)]
    pub dev_outbox: Option<PathBuf>,
    /// An HTTP SMS provider.
    #[serde(default)]
    pub http: Option<SmsHttpRaw>,
}

/// `[sms.http]`: an HTTP SMS provider, one request per code.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SmsHttpRaw {
    /// The provider's endpoint: `https://...`, or `http://...` with `allow-http`.
    pub url: String,
    /// Accept a plain `http://` URL (a relay on the same host, a test server). Default false.
    #[serde(default)]
    pub allow_http: bool,
    /// `"POST"` (the default), `"PUT"` or `"GET"`.
    #[serde(default)]
    pub method: SmsMethod,
    /// The header carrying the credential. Default `"Authorization"`.
    #[serde(default = "defaults::sms_auth_header")]
    pub auth_header: String,
    /// A file holding the credential header's value (e.g. `Bearer ...`), read at start; the value
    /// never appears in the config, the logs or errors. Unset: no credential header.
    #[serde(default)]
    pub auth_value_file: Option<PathBuf>,
    /// The body's content type. Default `"application/json"`.
    #[serde(default = "defaults::sms_content_type")]
    pub content_type: String,
    /// The body, with `{phone}` and `{code}` (both required), each replaced by its value escaped
    /// for the content type.
    pub body_template: String,
    /// Deadline of one attempt, in milliseconds. Default 5000.
    #[serde(default = "defaults::sms_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after an attempt failed with a connection error, a timeout, a 5xx or a 429.
    /// Default 2.
    #[serde(default = "defaults::sms_retries")]
    pub retries: u32,
}

/// The method of `[sms.http]`'s request.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum SmsMethod {
    /// `POST` (the default).
    #[default]
    #[serde(rename = "POST")]
    Post,
    /// `PUT`.
    #[serde(rename = "PUT")]
    Put,
    /// `GET` (still with the templated body).
    #[serde(rename = "GET")]
    Get,
}

/// `[admin]`: what operators may make a node do on its machine.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminRaw {
    /// `Admin.Backup` writes checkpoints only under this directory (created when needed).
    /// Default `<data-dir>/backups` (the same filesystem, so checkpoints hard-link files).
    #[serde(default)]
    pub backup_root: Option<PathBuf>,
}

/// `[tls]`: the certificates of both listeners. Required, unless `insecure-plaintext = true`
/// (development only; the node warns at start).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsRaw {
    /// The cluster CA certificate (PEM): peers and operators must present a certificate it
    /// signed.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM, URI `spiffe://courier/node/<node-id>`, DNS `courier-node`):
    /// served on the peer listener and presented when dialing peers.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The client listener's certificate (PEM, the host names phones dial).
    #[serde(default)]
    pub listener_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub listener_key: Option<PathBuf>,
    /// Serve both listeners and dial peers without TLS: anyone who reaches the peer port can
    /// call every peer RPC. Development and the simulation only. Default false.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// The file as parsed, before validation.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawConfig {
    /// This node's id in the cluster, at least 1, unique.
    pub node_id: u64,
    /// Where the node keeps its RocksDB and dev-mode files.
    pub data_dir: PathBuf,
    /// Listen addresses.
    pub listen: Listen,
    /// Consensus timing.
    #[serde(default = "defaults::raft")]
    pub raft: RaftRaw,
    /// Cluster-wide duties.
    #[serde(default = "defaults::cluster")]
    pub cluster: ClusterRaw,
    /// Limits.
    #[serde(default = "defaults::limits")]
    pub limits: LimitsRaw,
    /// Retention of undelivered messages.
    #[serde(default = "defaults::retention")]
    pub retention: RetentionRaw,
    /// Presence.
    #[serde(default = "defaults::presence")]
    pub presence: PresenceRaw,
    /// The push hook.
    #[serde(default = "defaults::push")]
    pub push: PushRaw,
    /// Distributed tracing.
    #[serde(default = "defaults::tracing")]
    pub tracing: TracingRaw,
    /// Logging.
    #[serde(default = "defaults::log")]
    pub log: LogRaw,
    /// Certificates.
    #[serde(default)]
    pub tls: TlsRaw,
    /// Operator actions on the node's machine.
    #[serde(default)]
    pub admin: AdminRaw,
    /// Registration codes.
    #[serde(default)]
    pub sms: SmsRaw,
    /// The log archive.
    #[serde(default)]
    pub archive: ArchiveRaw,
}

/// `[archive]`: where purged log entries go, so the whole log stays readable.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArchiveRaw {
    /// The archive directory. Default `<data-dir>/../archive`: outside the data directory, and
    /// shared by nodes whose data directories sit side by side (segments are identical on every
    /// replica, so sharing is safe and fills each one's gaps).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Entries per segment, at least 16. Default 4096. Every node writing to one archive must
    /// use the same value.
    #[serde(default)]
    pub segment_entries: Option<u64>,
    /// How often the archiver looks for full segments. Default `"1s"`.
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// An S3-compatible bucket instead of `dir`.
    #[serde(default)]
    pub s3: Option<S3Raw>,
}

/// `[archive.s3]`: the archive in an S3-compatible bucket; credentials from the environment.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct S3Raw {
    /// The bucket (it must exist).
    pub bucket: String,
    /// A path inside the bucket. Default: the bucket's root.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The endpoint of an S3-compatible service. Default: AWS (or `AWS_ENDPOINT`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region. Default: `AWS_REGION`, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Accept a plain `http://` endpoint (a local test server). Default false.
    #[serde(default)]
    pub allow_http: bool,
}

mod defaults {
    use super::*;

    pub(super) fn heartbeat() -> HumanDuration {
        HumanDuration(Duration::from_millis(100))
    }
    pub(super) fn election_timeout_min() -> HumanDuration {
        HumanDuration(Duration::from_millis(500))
    }
    pub(super) fn election_timeout_max() -> HumanDuration {
        HumanDuration(Duration::from_millis(1000))
    }
    pub(super) fn rpc_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(2))
    }
    pub(super) fn snapshot_logs() -> u64 {
        10_000
    }
    pub(super) fn logs_to_keep() -> u64 {
        1_000
    }
    pub(super) fn snapshot_chunk() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub(super) fn append_entries() -> u64 {
        256
    }
    pub(super) fn proposal_queue() -> u32 {
        4096
    }
    pub(super) fn proposal_queue_bytes() -> ByteSize {
        ByteSize(64 << 20)
    }
    pub(super) fn log_cache_bytes() -> ByteSize {
        ByteSize(256 << 20)
    }
    pub(super) fn message_body() -> ByteSize {
        ByteSize(limits::MESSAGE_BODY_BYTES_MAX as u64)
    }
    pub(super) fn thumbnail() -> ByteSize {
        ByteSize(limits::THUMBNAIL_BYTES_MAX as u64)
    }
    pub(super) fn connections() -> u32 {
        10_000
    }
    pub(super) fn streams() -> u32 {
        128
    }
    pub(super) fn peer_connections() -> u32 {
        1024
    }
    pub(super) fn peer_streams() -> u32 {
        4096
    }
    pub(super) fn group_members() -> u32 {
        limits::GROUP_MEMBERS_MAX
    }
    pub(super) fn companions() -> u32 {
        limits::COMPANION_DEVICES_MAX
    }
    pub(super) fn send_rate() -> u32 {
        20
    }
    pub(super) fn send_burst() -> u32 {
        40
    }
    pub(super) fn stream_buffer() -> u32 {
        256
    }
    pub(super) fn stream_buffer_bytes() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub(super) fn ack_span() -> u32 {
        256
    }
    pub(super) fn device_cache() -> u32 {
        65_536
    }
    pub(super) fn streams_per_device() -> u32 {
        4
    }
    pub(super) fn unknown_rate() -> u32 {
        60
    }
    pub(super) fn unknown_burst() -> u32 {
        10
    }
    pub(super) fn presence_rate() -> u32 {
        2
    }
    pub(super) fn presence_burst() -> u32 {
        10
    }
    pub(super) fn tls_handshake_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub(super) fn keepalive_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub(super) fn keepalive_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub(super) fn forward_in_flight() -> u32 {
        2
    }
    pub(super) fn code_rate() -> u32 {
        10
    }
    pub(super) fn code_burst() -> u32 {
        3
    }
    pub(super) fn register_rate() -> u32 {
        20
    }
    pub(super) fn register_burst() -> u32 {
        5
    }
    pub(super) fn address_code_rate() -> u32 {
        120
    }
    pub(super) fn address_code_burst() -> u32 {
        60
    }
    pub(super) fn address_register_rate() -> u32 {
        240
    }
    pub(super) fn address_register_burst() -> u32 {
        120
    }
    pub(super) fn prekey_fetch_rate() -> u32 {
        120
    }
    pub(super) fn prekey_fetch_burst() -> u32 {
        30
    }
    pub(super) fn prekey_pair_rate() -> u32 {
        20
    }
    pub(super) fn prekey_pair_burst() -> u32 {
        5
    }
    pub(super) fn key_upload_rate() -> u32 {
        60
    }
    pub(super) fn key_upload_burst() -> u32 {
        10
    }
    pub(super) fn group_change_rate() -> u32 {
        3600
    }
    pub(super) fn group_change_burst() -> u32 {
        200
    }
    pub(super) fn pairing_rate() -> u32 {
        60
    }
    pub(super) fn pairing_burst() -> u32 {
        20
    }
    pub(super) fn pairings_max() -> u32 {
        10_000
    }
    pub(super) fn pairing_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(120))
    }
    pub(super) fn typing_rate() -> u32 {
        5
    }
    pub(super) fn typing_burst() -> u32 {
        10
    }
    pub(super) fn rate_limit_keys() -> u32 {
        100_000
    }
    pub(super) fn typing_broadcasts() -> u32 {
        1024
    }
    pub(super) fn projection_jobs() -> u32 {
        1
    }
    pub(super) fn projection_job_memory() -> ByteSize {
        ByteSize(2 << 30)
    }
    pub(super) fn metrics_connections() -> u32 {
        16
    }
    pub(super) fn log_format() -> LogFormat {
        LogFormat::Json
    }
    pub(super) fn log_level() -> String {
        "info".to_owned()
    }
    pub(super) fn raft() -> RaftRaw {
        toml::from_str("").expect("every raft key has a default")
    }
    pub(super) fn cluster() -> ClusterRaw {
        toml::from_str("").expect("every cluster key has a default")
    }
    pub(super) fn leader_rebalance_interval() -> HumanDuration {
        HumanDuration(Duration::ZERO)
    }
    pub(super) fn replica_rebalance_interval() -> HumanDuration {
        HumanDuration(Duration::ZERO)
    }
    pub(super) fn limits() -> LimitsRaw {
        toml::from_str("").expect("every limit has a default")
    }
    pub(super) fn log() -> LogRaw {
        toml::from_str("").expect("every log key has a default")
    }
    pub(super) fn retention() -> RetentionRaw {
        toml::from_str("").expect("every retention key has a default")
    }
    pub(super) fn presence() -> PresenceRaw {
        toml::from_str("").expect("every presence key has a default")
    }
    pub(super) fn push() -> PushRaw {
        toml::from_str("").expect("every push key has a default")
    }
    pub(super) fn tracing() -> TracingRaw {
        toml::from_str("").expect("every tracing key has a default")
    }
    pub(super) fn service_name() -> String {
        "courier-node".to_owned()
    }
    pub(super) fn presence_users() -> u32 {
        1_000_000
    }
    pub(super) fn presence_reports() -> u32 {
        4096
    }
    pub(super) fn last_seen_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(7 * 86_400))
    }
    pub(super) fn push_queue() -> u32 {
        10_000
    }
    pub(super) fn push_attempts() -> u32 {
        5
    }
    pub(super) fn push_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(2))
    }
    pub(super) fn undelivered() -> HumanDuration {
        HumanDuration(Duration::from_secs(30 * 86_400))
    }
    pub(super) const fn companion_history() -> u32 {
        100
    }
    pub(super) const fn retention_batch() -> u32 {
        256
    }
    pub(super) const fn retention_batches() -> u32 {
        64
    }
    pub(super) fn dedup() -> HumanDuration {
        HumanDuration(Duration::from_secs(7 * 86_400))
    }
    pub(super) fn expiry_scan() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub(super) fn sms_auth_header() -> String {
        "Authorization".to_owned()
    }
    pub(super) fn sms_content_type() -> String {
        "application/json".to_owned()
    }
    pub(super) fn sms_timeout_ms() -> u64 {
        crate::sms::TIMEOUT_MS_DEFAULT
    }
    pub(super) fn sms_retries() -> u32 {
        crate::sms::RETRIES_DEFAULT
    }
}
