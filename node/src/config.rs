//! The node's configuration: one TOML file, kebab-case keys, human units, unknown keys refused.
//! [`RawConfig::validate`] turns it into a [`Config`] once, reporting each broken relation as a
//! named [`ConfigError`]; the rest of the node only ever sees a validated `Config`.
//!
//! `docs/config.example.toml` documents every key; a test parses it so it cannot rot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use courier_proto::limits;
use serde::Deserialize;

use crate::units::{ByteSize, HumanDuration};

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
}

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
    /// Largest number of entries in one append-entries RPC. Default 256.
    #[serde(default = "defaults::append_entries")]
    pub append_entries_max: u64,
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
    /// Outbox batches this node forwards at once, one per (source, destination) shard pair.
    /// Default 8; 1 forwards one pair at a time.
    #[serde(default = "defaults::forward_in_flight")]
    pub forward_batches_in_flight: u32,
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
}

/// `[retention]`: how long undelivered messages wait for their recipient.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionRaw {
    /// An undelivered message older than this expires (a `MessageExpired` event proposed by the
    /// shard's leader). Default `"30d"`.
    #[serde(default = "defaults::undelivered")]
    pub undelivered: HumanDuration,
    /// How often each shard leader looks for expired messages. Default `"10s"`.
    #[serde(default = "defaults::expiry_scan")]
    pub scan_interval: HumanDuration,
    /// Keep message bodies in the inbox after every device of the user acked them (history on
    /// the server). Default `false`: server-centric, bodies leave once delivered everywhere.
    #[serde(default)]
    pub keep_delivered: bool,
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
    pub(super) fn forward_in_flight() -> u32 {
        8
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
    pub(super) fn log_format() -> LogFormat {
        LogFormat::Json
    }
    pub(super) fn log_level() -> String {
        "info".to_owned()
    }
    pub(super) fn raft() -> RaftRaw {
        toml::from_str("").expect("every raft key has a default")
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
    pub(super) fn expiry_scan() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
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
    /// Outbox batches forwarded at once.
    pub forward_batches_in_flight: u32,
    /// Code requests per phone number per hour.
    pub code_requests_per_hour_per_phone: u32,
    /// Code request burst per phone number.
    pub code_request_burst_per_phone: u32,
    /// Register attempts per phone number per hour.
    pub register_attempts_per_hour_per_phone: u32,
    /// Register attempt burst per phone number.
    pub register_attempt_burst_per_phone: u32,
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

fn bounded(name: &'static str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::ZeroLimit { name });
    }
    if value > max {
        return Err(ConfigError::AboveProtocolMax { name, value, max });
    }
    Ok(())
}

fn nonzero(name: &'static str, value: u32) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::ZeroLimit { name })
    } else {
        Ok(())
    }
}

impl RawConfig {
    /// Checks every relation and returns the validated config.
    ///
    /// # Errors
    /// The first broken relation, as a named [`ConfigError`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::NodeIdZero);
        }
        if self.listen.client == self.listen.peer && self.listen.client.port() != 0 {
            return Err(ConfigError::SameListenAddress {
                addr: self.listen.client,
            });
        }
        let ms = |d: HumanDuration| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX);
        let (heartbeat_ms, min_ms, max_ms) = (
            ms(self.raft.heartbeat),
            ms(self.raft.election_timeout_min),
            ms(self.raft.election_timeout_max),
        );
        if heartbeat_ms == 0 {
            return Err(ConfigError::ZeroLimit {
                name: "raft.heartbeat",
            });
        }
        if min_ms < heartbeat_ms.saturating_mul(3) {
            return Err(ConfigError::ElectionTimeoutNotAboveHeartbeat {
                election_timeout_ms_min: min_ms,
                heartbeat_ms,
            });
        }
        if max_ms <= min_ms {
            return Err(ConfigError::ElectionTimeoutRangeEmpty {
                election_timeout_ms_min: min_ms,
                election_timeout_ms_max: max_ms,
            });
        }
        if ms(self.raft.rpc_timeout) == 0 {
            return Err(ConfigError::ZeroLimit {
                name: "raft.rpc-timeout",
            });
        }
        let l = &self.limits;
        bounded(
            "limits.message-body-max",
            l.message_body_max.0,
            limits::MESSAGE_BODY_BYTES_MAX as u64,
        )?;
        bounded(
            "limits.thumbnail-max",
            l.thumbnail_max.0,
            limits::THUMBNAIL_BYTES_MAX as u64,
        )?;
        bounded(
            "limits.group-members-max",
            u64::from(l.group_members_max),
            u64::from(limits::GROUP_MEMBERS_MAX),
        )?;
        bounded(
            "limits.companion-devices-max",
            u64::from(l.companion_devices_max),
            u64::from(limits::COMPANION_DEVICES_MAX),
        )?;
        nonzero("limits.connections-max", l.connections_max)?;
        nonzero(
            "limits.streams-per-connection-max",
            l.streams_per_connection_max,
        )?;
        nonzero(
            "limits.sends-per-second-per-device",
            l.sends_per_second_per_device,
        )?;
        nonzero("limits.send-burst-per-device", l.send_burst_per_device)?;
        nonzero("limits.stream-buffer-frames", l.stream_buffer_frames)?;
        nonzero(
            "limits.forward-batches-in-flight",
            l.forward_batches_in_flight,
        )?;
        nonzero(
            "limits.code-requests-per-hour-per-phone",
            l.code_requests_per_hour_per_phone,
        )?;
        nonzero(
            "limits.code-request-burst-per-phone",
            l.code_request_burst_per_phone,
        )?;
        nonzero(
            "limits.register-attempts-per-hour-per-phone",
            l.register_attempts_per_hour_per_phone,
        )?;
        nonzero(
            "limits.register-attempt-burst-per-phone",
            l.register_attempt_burst_per_phone,
        )?;
        nonzero("presence.users-max", self.presence.users_max)?;
        nonzero("push.queue-max", self.push.queue_max)?;
        nonzero("push.attempts-max", self.push.attempts_max)?;
        if !self.push.url.is_empty() {
            crate::push::parse_url(&self.push.url)
                .map_err(|reason| ConfigError::PushUrl { reason })?;
        }
        for (name, value) in [
            ("retention.undelivered", self.retention.undelivered.0),
            ("retention.scan-interval", self.retention.scan_interval.0),
            ("presence.last-seen-ttl", self.presence.last_seen_ttl.0),
            ("push.timeout", self.push.timeout.0),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroLimit { name });
            }
        }
        Ok(Config {
            node_id: self.node_id,
            data_dir: self.data_dir,
            listen: self.listen,
            raft: RaftConfig {
                heartbeat: self.raft.heartbeat.0,
                election_timeout_min: self.raft.election_timeout_min.0,
                election_timeout_max: self.raft.election_timeout_max.0,
                rpc_timeout: self.raft.rpc_timeout.0,
                snapshot_logs_since_last: self.raft.snapshot_logs_since_last,
                logs_to_keep: self.raft.logs_to_keep,
                snapshot_chunk_bytes: self.raft.snapshot_chunk.0,
                append_entries_max: self.raft.append_entries_max,
            },
            limits: Limits {
                message_body_bytes_max: l.message_body_max.bytes(),
                thumbnail_bytes_max: l.thumbnail_max.bytes(),
                connections_max: l.connections_max,
                streams_per_connection_max: l.streams_per_connection_max,
                group_members_max: l.group_members_max,
                companion_devices_max: l.companion_devices_max,
                sends_per_second_per_device: l.sends_per_second_per_device,
                send_burst_per_device: l.send_burst_per_device,
                stream_buffer_frames: l.stream_buffer_frames,
                forward_batches_in_flight: l.forward_batches_in_flight,
                code_requests_per_hour_per_phone: l.code_requests_per_hour_per_phone,
                code_request_burst_per_phone: l.code_request_burst_per_phone,
                register_attempts_per_hour_per_phone: l.register_attempts_per_hour_per_phone,
                register_attempt_burst_per_phone: l.register_attempt_burst_per_phone,
            },
            retention: self.retention,
            presence: self.presence,
            push: self.push,
            tracing: self.tracing,
            log: self.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        node-id = 1
        data-dir = "/tmp/courier-1"
        [listen]
        client = "127.0.0.1:7001"
        peer = "127.0.0.1:7101"
    "#;

    /// The documented example lists every key and stays parseable.
    #[test]
    fn example_config_parses() {
        let text = include_str!("../../docs/config.example.toml");
        let config = Config::parse(text).expect("docs/config.example.toml is valid");
        assert_eq!(config.node_id, 1);
        assert_eq!(config.limits.message_body_bytes_max, 64 * 1024);
        assert_eq!(config.raft.heartbeat, Duration::from_millis(100));
    }

    #[test]
    fn defaults_fill_optional_sections() {
        let config = Config::parse(MINIMAL).expect("minimal config");
        assert_eq!(config.limits.group_members_max, 1024);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{MINIMAL}\n{extra}"))
    }

    #[test]
    fn each_validation_error_fires() {
        let zero = MINIMAL.replace("node-id = 1", "node-id = 0");
        assert!(matches!(Config::parse(&zero), Err(ConfigError::NodeIdZero)));
        let same = MINIMAL.replace("7101", "7001");
        assert!(matches!(
            Config::parse(&same),
            Err(ConfigError::SameListenAddress { .. })
        ));
        assert!(matches!(
            with("[raft]\nheartbeat = \"200ms\"\nelection-timeout-min = \"300ms\""),
            Err(ConfigError::ElectionTimeoutNotAboveHeartbeat {
                election_timeout_ms_min: 300,
                heartbeat_ms: 200
            })
        ));
        assert!(matches!(
            with("[raft]\nelection-timeout-min = \"900ms\"\nelection-timeout-max = \"900ms\""),
            Err(ConfigError::ElectionTimeoutRangeEmpty { .. })
        ));
        assert!(matches!(
            with("[limits]\nmessage-body-max = \"65KiB\""),
            Err(ConfigError::AboveProtocolMax {
                name: "limits.message-body-max",
                ..
            })
        ));
        assert!(matches!(
            with("[limits]\ngroup-members-max = 0"),
            Err(ConfigError::ZeroLimit {
                name: "limits.group-members-max"
            })
        ));
        assert!(matches!(
            with("[limits]\nsends-per-second-per-device = 0"),
            Err(ConfigError::ZeroLimit {
                name: "limits.sends-per-second-per-device"
            })
        ));
        assert!(matches!(
            with("[limits]\ncode-requests-per-hour-per-phone = 0"),
            Err(ConfigError::ZeroLimit {
                name: "limits.code-requests-per-hour-per-phone"
            })
        ));
        assert!(matches!(
            with("[retention]\nundelivered = \"0s\""),
            Err(ConfigError::ZeroLimit {
                name: "retention.undelivered"
            })
        ));
        assert!(matches!(
            with("[presence]\nusers-max = 0"),
            Err(ConfigError::ZeroLimit {
                name: "presence.users-max"
            })
        ));
        assert!(matches!(
            with("[push]\nurl = \"https://push.example/x\""),
            Err(ConfigError::PushUrl { .. })
        ));
        assert!(matches!(
            with("[push]\nattempts-max = 0"),
            Err(ConfigError::ZeroLimit {
                name: "push.attempts-max"
            })
        ));
        assert!(matches!(
            with("[limits]\nmessage-body-max = \"64kb\""),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            with("unknown-key = 1"),
            Err(ConfigError::Parse(_))
        ));
    }
}
