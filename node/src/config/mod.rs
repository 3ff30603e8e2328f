//! The node's configuration: one TOML file, kebab-case keys, human units, unknown keys refused.
//! [`RawConfig::validate`] turns it into a [`Config`] once, reporting each broken relation as a
//! named [`ConfigError`]; the rest of the node only ever sees a validated `Config`.
//!
//! `docs/config.example.toml` documents every key; a test parses it so it cannot rot.
//!
//! Layout: `raw` holds the file's sections as parsed (and their defaults), `validate` the
//! relations checked between them, this module the validated types.

#[cfg(test)]
mod config_test;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use raw::{
    AdminRaw, ClusterRaw, LimitsRaw, Listen, LogFormat, LogRaw, PresenceRaw, PushRaw, RaftRaw,
    RawConfig, RetentionRaw, SmsHttpRaw, SmsMethod, SmsRaw, TlsRaw, TracingRaw,
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, bad unit).
    #[error("cannot parse config: {0}")]
    Parse(#[from] toml::de::Error),
    /// `node-id` is zero.
    #[error("node-id must be at least 1")]
    NodeIdZero,
    /// A TLS file is not configured and `tls.insecure-plaintext` is not set.
    #[error(
        "{name} is required: both listeners use TLS (tls.insecure-plaintext = true turns TLS off, for development only)"
    )]
    TlsMissing {
        /// The missing key.
        name: &'static str,
    },
    /// `tls.insecure-plaintext = true` together with certificate files.
    #[error("tls.insecure-plaintext = true and {name} are both set: choose one")]
    TlsAndPlaintext {
        /// A certificate key that is set.
        name: &'static str,
    },
    /// The client and peer listeners share an address.
    #[error("listen.client and listen.peer must differ (both {addr})")]
    SameListenAddress {
        /// The shared address.
        addr: SocketAddr,
    },
    /// The election timeout does not exceed the heartbeat interval enough to tolerate a lost
    /// heartbeat.
    #[error(
        "raft.election-timeout-min ({election_timeout_ms_min} ms) must be at least 3 x raft.heartbeat ({heartbeat_ms} ms)"
    )]
    ElectionTimeoutNotAboveHeartbeat {
        /// The minimum election timeout.
        election_timeout_ms_min: u64,
        /// The heartbeat interval.
        heartbeat_ms: u64,
    },
    /// The election timeout range is empty.
    #[error(
        "raft.election-timeout-max ({election_timeout_ms_max} ms) must exceed raft.election-timeout-min ({election_timeout_ms_min} ms)"
    )]
    ElectionTimeoutRangeEmpty {
        /// The minimum.
        election_timeout_ms_min: u64,
        /// The maximum.
        election_timeout_ms_max: u64,
    },
    /// The push URL is not a plain `http://host[:port]/path` URL.
    #[error("push.url: {reason}")]
    PushUrl {
        /// What is wrong.
        reason: String,
    },
    /// A limit is zero.
    #[error("{name} must be greater than zero")]
    ZeroLimit {
        /// The key.
        name: &'static str,
    },
    /// A limit exceeds the protocol maximum it is bounded by.
    #[error("{name} = {value} exceeds the protocol maximum {max}")]
    AboveProtocolMax {
        /// The key.
        name: &'static str,
        /// The configured value.
        value: u64,
        /// The protocol maximum.
        max: u64,
    },
    /// A limit is below the smallest value that works.
    #[error("{name} = {value} is below the minimum {min}")]
    BelowMinimum {
        /// The key.
        name: &'static str,
        /// The configured value.
        value: u64,
        /// The minimum.
        min: u64,
    },
    /// `archive.segment-entries` is below the minimum.
    #[error("archive.segment-entries = {value} is below the minimum {min}")]
    ArchiveSegmentTooSmall {
        /// The configured value.
        value: u64,
        /// The minimum.
        min: u64,
    },
    /// `[archive.s3]` is not usable as given.
    #[error("archive.s3: {0}")]
    ArchiveS3(&'static str),
    /// A `[sms.http]` key is not usable as given.
    #[error("{key}: {reason}")]
    SmsHttp {
        /// The key, e.g. `sms.http.url`.
        key: &'static str,
        /// What is wrong (never the credential).
        reason: String,
    },
    /// `cluster.leader-rebalance-interval` or `cluster.replica-rebalance-interval` is set below
    /// twice the election timeout: a node would act again before its last change settled.
    #[error(
        "{key} ({interval_ms} ms) must be 0 (off) or at least twice raft.election-timeout-max ({election_timeout_ms_max} ms)"
    )]
    RebalanceIntervalTooShort {
        /// The key, e.g. `cluster.leader-rebalance-interval`.
        key: &'static str,
        /// The interval asked for.
        interval_ms: u64,
        /// The election timeout's upper bound.
        election_timeout_ms_max: u64,
    },
    /// `sms.dev-outbox` and `[sms.http]` are both set.
    #[error("sms.dev-outbox and sms.http are both set: choose one")]
    SmsOutboxAndHttp,
}

/// Consensus timing, validated: the consensus crate's own settings type.
pub type RaftConfig = courier_consensus::groups::RaftTiming;

/// Limits, validated against the protocol maxima.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message body, bytes.
    pub message_body_bytes_max: usize,
    /// Largest thumbnail, bytes.
    pub thumbnail_bytes_max: usize,
    /// Concurrent client connections.
    pub connections_max: u32,
    /// Concurrent streams per connection.
    pub streams_per_connection_max: u32,
    /// Concurrent connections on the peer listener.
    pub peer_connections_max: u32,
    /// Concurrent streams per peer connection.
    pub peer_streams_per_connection_max: u32,
    /// Members per group.
    pub group_members_max: u32,
    /// Companion devices per user.
    pub companion_devices_max: u32,
    /// Sends per second per device.
    pub sends_per_second_per_device: u32,
    /// Send burst per device.
    pub send_burst_per_device: u32,
    /// Frames buffered per device stream.
    pub stream_buffer_frames: u32,
    /// Encoded bytes of the frames buffered per device stream, and of one page of the inbox its
    /// pusher reads.
    pub stream_buffer_bytes: u32,
    /// Inbox messages one `DeliveryAcked` acks (or clears), or one `ReadUpTo` reads, at most.
    pub ack_span_max: u32,
    /// Outbox batches forwarded at once.
    pub forward_batches_in_flight: u32,
    /// Device and recipient checks remembered per node.
    pub device_cache_entries: u32,
    /// Device streams one device may hold open on this node.
    pub streams_per_device_max: u32,
    /// Sends to unknown users per hour per device.
    pub unknown_recipients_per_hour_per_device: u32,
    /// Burst of sends to unknown users per device.
    pub unknown_recipient_burst_per_device: u32,
    /// Presence lookups per second per device.
    pub presence_lookups_per_second_per_device: u32,
    /// Presence lookup burst per device.
    pub presence_lookup_burst_per_device: u32,
    /// TLS handshake deadline on both listeners.
    pub tls_handshake_timeout: std::time::Duration,
    /// HTTP/2 keepalive interval on client connections.
    pub keepalive_interval: std::time::Duration,
    /// Unanswered keepalive deadline.
    pub keepalive_timeout: std::time::Duration,
    /// Code requests per phone number per hour.
    pub code_requests_per_hour_per_phone: u32,
    /// Code request burst per phone number.
    pub code_request_burst_per_phone: u32,
    /// Register attempts per phone number per hour.
    pub register_attempts_per_hour_per_phone: u32,
    /// Register attempt burst per phone number.
    pub register_attempt_burst_per_phone: u32,
    /// Code requests per client address per hour, per node.
    pub code_requests_per_hour_per_address: u32,
    /// Code request burst per client address.
    pub code_request_burst_per_address: u32,
    /// Register attempts per client address per hour, per node.
    pub register_attempts_per_hour_per_address: u32,
    /// Register attempt burst per client address.
    pub register_attempt_burst_per_address: u32,
    /// Prekey bundle fetches per device per hour.
    pub prekey_fetches_per_hour_per_device: u32,
    /// Prekey bundle fetch burst per device.
    pub prekey_fetch_burst_per_device: u32,
    /// Fetches of one user's bundle by one other user per hour.
    pub prekey_fetches_per_hour_per_pair: u32,
    /// Fetch burst of one user's bundle by one other user.
    pub prekey_fetch_burst_per_pair: u32,
    /// Key uploads per device per hour.
    pub key_uploads_per_hour_per_device: u32,
    /// Key upload burst per device.
    pub key_upload_burst_per_device: u32,
    /// Group changes per device per hour.
    pub group_changes_per_hour_per_device: u32,
    /// Group change burst per device.
    pub group_change_burst_per_device: u32,
    /// `StartPairing` calls per client address per hour (per node).
    pub pairings_per_hour_per_address: u32,
    /// `StartPairing` burst per client address.
    pub pairing_burst_per_address: u32,
    /// Pairings outstanding on this node at once.
    pub pairings_max: u32,
    /// How long a started pairing lives.
    pub pairing_ttl: std::time::Duration,
    /// Typing updates per second per device.
    pub typing_per_second_per_device: u32,
    /// Typing update burst per device.
    pub typing_burst_per_device: u32,
    /// Keys each in-memory rate limiter tracks at most.
    pub rate_limit_keys_max: u32,
    /// Typing updates being handed to the other nodes at once, node-wide.
    pub typing_broadcasts_max: u32,
    /// Projection jobs (verify, rebuild, inspect) running at once on the node.
    pub projection_jobs_max: u32,
    /// Bytes one projection job's replay may hold in memory.
    pub projection_job_memory_max: u64,
    /// Scrapes of `/metrics` served at once.
    pub metrics_connections_max: u32,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub node_id: u64,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen addresses.
    pub listen: Listen,
    /// Consensus timing.
    pub raft: RaftConfig,
    /// How often each node takes its share of shard leadership back
    /// (`cluster.leader-rebalance-interval`; `None`: never).
    pub leader_rebalance: Option<std::time::Duration>,
    /// How often each node moves one of its replicas when the replica plan asks it to
    /// (`cluster.replica-rebalance-interval`; `None`: never).
    pub replica_rebalance: Option<std::time::Duration>,
    /// Limits.
    pub limits: Limits,
    /// Retention of undelivered messages.
    pub retention: RetentionRaw,
    /// Presence.
    pub presence: PresenceRaw,
    /// The push hook.
    pub push: PushRaw,
    /// Distributed tracing.
    pub tracing: TracingRaw,
    /// Logging.
    pub log: LogRaw,
    /// TLS on both listeners (`None`: `insecure-plaintext`).
    pub tls: Option<TlsPaths>,
    /// Where `Admin.Backup` may write (`admin.backup-root`).
    pub backup_root: PathBuf,
    /// The development SMS outbox file (`sms.dev-outbox`), when configured.
    pub sms_dev_outbox: Option<PathBuf>,
    /// The HTTP SMS provider (`[sms.http]`), when configured (never together with the outbox).
    pub sms_http: Option<SmsHttpConfig>,
    /// The log archive.
    pub archive: ArchiveConfig,
}

/// The HTTP SMS provider (`[sms.http]`), validated.
#[derive(Clone, Debug)]
pub struct SmsHttpConfig {
    /// The endpoint: `https`, or `http` with `allow-http`.
    pub url: reqwest::Url,
    /// The request's method.
    pub method: reqwest::Method,
    /// The credential header's name.
    pub auth_header: reqwest::header::HeaderName,
    /// Its value, read from `auth-value-file`; `None`: no credential header.
    pub auth_value: Option<Secret>,
    /// The body's content type.
    pub content_type: reqwest::header::HeaderValue,
    /// The body, with `{phone}` and `{code}` in it.
    pub body_template: String,
    /// Deadline of one attempt.
    pub timeout: std::time::Duration,
    /// Retries after a retryable failure.
    pub retries: u32,
}

/// A credential read from a file: its `Debug` shows no value, so neither does a logged config.
#[derive(Clone)]
pub struct Secret(reqwest::header::HeaderValue);

impl Secret {
    /// Trims `text` (a file's content, its final newline included) into a header value.
    ///
    /// # Errors
    /// When nothing is left, or the rest is not a valid header value (a stable text that never
    /// shows the value).
    pub fn from_file_text(text: &str) -> Result<Self, &'static str> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the file is empty");
        }
        let mut value = reqwest::header::HeaderValue::from_str(text)
            .map_err(|_| "the file holds characters a header value cannot")?;
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// The value, marked sensitive, for the one header that carries it.
    pub fn header_value(&self) -> &reqwest::header::HeaderValue {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The log archive, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// Its directory (unless `s3` is set).
    pub dir: PathBuf,
    /// An S3-compatible bucket instead of the directory.
    pub s3: Option<S3Archive>,
    /// Entries per segment.
    pub segment_entries: u64,
    /// How often the archiver looks for full segments.
    pub interval: std::time::Duration,
}

/// The log archive in an S3-compatible bucket (`[archive.s3]`), validated.
pub use courier_archive::S3Archive;

/// Entries per archive segment unless configured.
pub const ARCHIVE_SEGMENT_ENTRIES: u64 = 4096;
/// Largest `limits.pairings-max`: every pairing call walks the node's pairings.
pub const PAIRINGS_MAX_MAX: u64 = 100_000;
/// Largest `retention.batch-max`: a proposal of that many of each kind stays under the
/// proposer's events per entry and the proposal size.
pub const RETENTION_BATCH_MAX_MAX: u32 = 1000;
// A retention proposal: one `MessageExpired` per message, plus one event per kind of forget
// (sends, stubs, receipts, group copies, registrations), each of at most `batch-max` items of
// well under 200 bytes.
const _: () = assert!(
    RETENTION_BATCH_MAX_MAX as usize + 5 <= courier_consensus::proposer::BATCH_EVENTS_MAX
        && RETENTION_BATCH_MAX_MAX as usize * 4 * 200 <= courier_proto::limits::PROPOSAL_BYTES_MAX,
    "a retention proposal fits one raft entry"
);
/// Longest `limits.pairing-ttl`, in seconds (a day).
pub const PAIRING_TTL_S_MAX: u64 = 86_400;
/// Largest `limits.rate-limit-keys-max` (each key is a few dozen bytes, per limiter).
pub const RATE_LIMIT_KEYS_MAX_MAX: u64 = 10_000_000;
/// Largest `limits.ack-span-max`: one entry's apply reads that many messages.
pub const ACK_SPAN_MAX_MAX: u64 = 4096;
/// Largest `raft.snapshot-chunk`: a chunk and its call's framing fit one raft message.
pub const SNAPSHOT_CHUNK_BYTES_MAX: u64 =
    (courier_consensus::network::RAFT_MESSAGE_BYTES_MAX - 64 * 1024) as u64;
/// Largest `raft.append-entries-max`.
pub const APPEND_ENTRIES_MAX_MAX: u64 = 4096;
/// Largest `archive.segment-entries`: the archiver holds a segment in memory while it writes
/// and checks it.
pub const ARCHIVE_SEGMENT_ENTRIES_MAX: u64 = 65_536;
/// Largest `limits.stream-buffer-frames`.
pub const STREAM_BUFFER_FRAMES_MAX: u64 = 65_536;
/// Largest `limits.projection-job-memory-max`.
pub const PROJECTION_JOB_MEMORY_MAX_MAX: u64 = 1 << 40;
/// Largest `limits.stream-buffer-bytes`.
pub const STREAM_BUFFER_BYTES_MAX: u64 = 256 << 20;
/// Largest `raft.proposal-queue-max`.
pub const PROPOSAL_QUEUE_MAX_MAX: u64 = 65_536;
/// Largest `raft.proposal-queue-bytes-max` (per shard).
pub const PROPOSAL_QUEUE_BYTES_MAX_MAX: u64 = 1 << 30;
/// Largest `raft.log-cache-bytes-max` (64 GiB).
pub const LOG_CACHE_BYTES_MAX_MAX: u64 = 64 << 30;
/// The smallest segment a node accepts.
pub const ARCHIVE_SEGMENT_ENTRIES_MIN: u64 = 16;

/// The certificate files of a node with TLS (validated: all present).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// The cluster CA.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The client listener's certificate.
    pub listener_cert: PathBuf,
    /// Its key.
    pub listener_key: PathBuf,
}

impl Config {
    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming what is wrong.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// [`ConfigError`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str::<RawConfig>(text)?.validate()
    }
}
