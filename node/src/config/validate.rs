//! [`RawConfig::validate`]: every relation between the parsed values, checked once.

use courier_proto::limits;

use super::{
    Config, ConfigError, Limits, LimitsRaw, RaftConfig, RaftRaw, RawConfig, Secret, SmsHttpConfig,
    SmsHttpRaw, SmsMethod, SmsRaw, TlsPaths, TlsRaw,
};
use crate::sms::{RETRIES_MAX, TIMEOUT_MS_MAX, TIMEOUT_MS_MIN};
use crate::units::HumanDuration;

fn bounded(name: &'static str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::ZeroLimit { name });
    }
    at_most(name, value, max)
}

/// A limit where 0 means "none" (switched off), refused only above `max`.
fn at_most(name: &'static str, value: u64, max: u64) -> Result<(), ConfigError> {
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
        let raft = validate_raft(&self.raft)?;
        let leader_rebalance = validate_rebalance(
            "cluster.leader-rebalance-interval",
            self.cluster.leader_rebalance_interval.0,
            &raft,
        )?;
        let replica_rebalance = validate_rebalance(
            "cluster.replica-rebalance-interval",
            self.cluster.replica_rebalance_interval.0,
            &raft,
        )?;
        let limits = validate_limits(&self.limits)?;
        self.validate_edge()?;
        let tls = validate_tls(self.tls)?;
        let backup_root = self
            .admin
            .backup_root
            .unwrap_or_else(|| self.data_dir.join("backups"));
        let archive = validate_archive(&self.archive, &self.data_dir)?;
        let (sms_dev_outbox, sms_http) = validate_sms(self.sms)?;
        Ok(Config {
            node_id: self.node_id,
            data_dir: self.data_dir,
            listen: self.listen,
            raft,
            leader_rebalance,
            replica_rebalance,
            limits,
            retention: self.retention,
            presence: self.presence,
            push: self.push,
            tracing: self.tracing,
            log: self.log,
            tls,
            backup_root,
            sms_dev_outbox,
            sms_http,
            archive,
        })
    }

    /// Presence, push and retention: sizes and durations that must not be zero, a push URL that
    /// parses.
    fn validate_edge(&self) -> Result<(), ConfigError> {
        nonzero("presence.users-max", self.presence.users_max)?;
        nonzero("presence.report-queue-max", self.presence.report_queue_max)?;
        nonzero("push.queue-max", self.push.queue_max)?;
        nonzero("push.attempts-max", self.push.attempts_max)?;
        bounded(
            "retention.batch-max",
            u64::from(self.retention.batch_max),
            u64::from(super::RETENTION_BATCH_MAX_MAX),
        )?;
        nonzero(
            "retention.batches-per-pass-max",
            self.retention.batches_per_pass_max,
        )?;
        if !self.push.url.is_empty() {
            crate::push::parse_url(&self.push.url)
                .map_err(|reason| ConfigError::PushUrl { reason })?;
        }
        if self.retention.companion_history > limits::COMPANION_HISTORY_MAX {
            return Err(ConfigError::AboveProtocolMax {
                name: "retention.companion-history",
                value: u64::from(self.retention.companion_history),
                max: u64::from(limits::COMPANION_HISTORY_MAX),
            });
        }
        for (name, value) in [
            ("retention.undelivered", self.retention.undelivered.0),
            ("retention.dedup", self.retention.dedup.0),
            ("retention.scan-interval", self.retention.scan_interval.0),
            ("presence.last-seen-ttl", self.presence.last_seen_ttl.0),
            ("push.timeout", self.push.timeout.0),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroLimit { name });
            }
        }
        Ok(())
    }
}

/// TLS: every file, or `insecure-plaintext` and none.
fn validate_tls(tls: TlsRaw) -> Result<Option<TlsPaths>, ConfigError> {
    let files = [
        ("tls.ca", tls.ca),
        ("tls.cert", tls.cert),
        ("tls.key", tls.key),
        ("tls.listener-cert", tls.listener_cert),
        ("tls.listener-key", tls.listener_key),
    ];
    if tls.insecure_plaintext {
        return match files.into_iter().find(|(_, path)| path.is_some()) {
            Some((name, _)) => Err(ConfigError::TlsAndPlaintext { name }),
            None => Ok(None),
        };
    }
    let [ca, cert, key, listener_cert, listener_key] =
        files.map(|(name, path)| path.ok_or(ConfigError::TlsMissing { name }));
    Ok(Some(TlsPaths {
        ca: ca?,
        cert: cert?,
        key: key?,
        listener_cert: listener_cert?,
        listener_key: listener_key?,
    }))
}

/// Raft timing: a heartbeat well inside the election timeout, a non-empty timeout range.
fn validate_raft(raft: &RaftRaw) -> Result<RaftConfig, ConfigError> {
    let ms = |d: HumanDuration| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX);
    let (heartbeat_ms, min_ms, max_ms) = (
        ms(raft.heartbeat),
        ms(raft.election_timeout_min),
        ms(raft.election_timeout_max),
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
    if ms(raft.rpc_timeout) == 0 {
        return Err(ConfigError::ZeroLimit {
            name: "raft.rpc-timeout",
        });
    }
    bounded(
        "raft.proposal-queue-max",
        u64::from(raft.proposal_queue_max),
        super::PROPOSAL_QUEUE_MAX_MAX,
    )?;
    bounded(
        "raft.proposal-queue-bytes-max",
        raft.proposal_queue_bytes_max.0,
        super::PROPOSAL_QUEUE_BYTES_MAX_MAX,
    )?;
    bounded(
        "raft.snapshot-chunk",
        raft.snapshot_chunk.0,
        super::SNAPSHOT_CHUNK_BYTES_MAX,
    )?;
    bounded(
        "raft.append-entries-max",
        raft.append_entries_max,
        super::APPEND_ENTRIES_MAX_MAX,
    )?;
    at_most(
        "raft.log-cache-bytes-max",
        raft.log_cache_bytes_max.0,
        super::LOG_CACHE_BYTES_MAX_MAX,
    )?;
    let min = limits::PROPOSAL_BYTES_MAX as u64;
    if raft.proposal_queue_bytes_max.0 < min {
        return Err(ConfigError::BelowMinimum {
            name: "raft.proposal-queue-bytes-max",
            value: raft.proposal_queue_bytes_max.0,
            min,
        });
    }
    Ok(RaftConfig {
        heartbeat: raft.heartbeat.0,
        election_timeout_min: raft.election_timeout_min.0,
        election_timeout_max: raft.election_timeout_max.0,
        rpc_timeout: raft.rpc_timeout.0,
        snapshot_logs_since_last: raft.snapshot_logs_since_last,
        logs_to_keep: raft.logs_to_keep,
        snapshot_chunk_bytes: raft.snapshot_chunk.0,
        append_entries_max: raft.append_entries_max,
        log_cache_bytes_max: usize::try_from(raft.log_cache_bytes_max.0).unwrap_or(usize::MAX),
        proposal_queue: courier_consensus::proposer::QueueLimits {
            proposals: usize::try_from(raft.proposal_queue_max).unwrap_or(usize::MAX),
            bytes: usize::try_from(raft.proposal_queue_bytes_max.0).unwrap_or(usize::MAX),
        },
    })
}

/// An automatic rebalancer's interval (`key`): off at 0, else at least twice the election
/// timeout, so what each round starts (an election, a move's leadership change) settles before
/// the next round.
fn validate_rebalance(
    key: &'static str,
    interval: std::time::Duration,
    raft: &RaftConfig,
) -> Result<Option<std::time::Duration>, ConfigError> {
    if interval.is_zero() {
        return Ok(None);
    }
    let floor = raft.election_timeout_max.saturating_mul(2);
    if interval < floor {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        return Err(ConfigError::RebalanceIntervalTooShort {
            key,
            interval_ms: ms(interval),
            election_timeout_ms_max: ms(raft.election_timeout_max),
        });
    }
    Ok(Some(interval))
}

/// Counts, rates, bursts and durations that must not be zero.
fn nonzero_limits(l: &LimitsRaw) -> Result<(), ConfigError> {
    for (name, value) in [
        ("limits.connections-max", l.connections_max),
        (
            "limits.streams-per-connection-max",
            l.streams_per_connection_max,
        ),
        ("limits.peer-connections-max", l.peer_connections_max),
        (
            "limits.peer-streams-per-connection-max",
            l.peer_streams_per_connection_max,
        ),
        (
            "limits.sends-per-second-per-device",
            l.sends_per_second_per_device,
        ),
        ("limits.send-burst-per-device", l.send_burst_per_device),
        ("limits.stream-buffer-frames", l.stream_buffer_frames),
        ("limits.ack-span-max", l.ack_span_max),
        (
            "limits.forward-batches-in-flight",
            l.forward_batches_in_flight,
        ),
        ("limits.device-cache-entries", l.device_cache_entries),
        ("limits.streams-per-device-max", l.streams_per_device_max),
        (
            "limits.unknown-recipients-per-hour-per-device",
            l.unknown_recipients_per_hour_per_device,
        ),
        (
            "limits.unknown-recipient-burst-per-device",
            l.unknown_recipient_burst_per_device,
        ),
        (
            "limits.presence-lookups-per-second-per-device",
            l.presence_lookups_per_second_per_device,
        ),
        (
            "limits.presence-lookup-burst-per-device",
            l.presence_lookup_burst_per_device,
        ),
        ("limits.pairings-max", l.pairings_max),
        (
            "limits.typing-per-second-per-device",
            l.typing_per_second_per_device,
        ),
        ("limits.typing-burst-per-device", l.typing_burst_per_device),
        ("limits.rate-limit-keys-max", l.rate_limit_keys_max),
        ("limits.typing-broadcasts-max", l.typing_broadcasts_max),
        ("limits.projection-jobs-max", l.projection_jobs_max),
        ("limits.metrics-connections-max", l.metrics_connections_max),
    ] {
        nonzero(name, value)?;
    }
    nonzero_account_limits(l)?;
    for (name, value) in [
        ("limits.tls-handshake-timeout", l.tls_handshake_timeout.0),
        ("limits.keepalive-interval", l.keepalive_interval.0),
        ("limits.keepalive-timeout", l.keepalive_timeout.0),
        ("limits.pairing-ttl", l.pairing_ttl.0),
    ] {
        if value.is_zero() {
            return Err(ConfigError::ZeroLimit { name });
        }
    }
    Ok(())
}

/// The registration and key-directory rates and bursts, none zero.
fn nonzero_account_limits(l: &LimitsRaw) -> Result<(), ConfigError> {
    for (name, value) in [
        (
            "limits.code-requests-per-hour-per-phone",
            l.code_requests_per_hour_per_phone,
        ),
        (
            "limits.code-request-burst-per-phone",
            l.code_request_burst_per_phone,
        ),
        (
            "limits.register-attempts-per-hour-per-phone",
            l.register_attempts_per_hour_per_phone,
        ),
        (
            "limits.register-attempt-burst-per-phone",
            l.register_attempt_burst_per_phone,
        ),
        (
            "limits.code-requests-per-hour-per-address",
            l.code_requests_per_hour_per_address,
        ),
        (
            "limits.code-request-burst-per-address",
            l.code_request_burst_per_address,
        ),
        (
            "limits.register-attempts-per-hour-per-address",
            l.register_attempts_per_hour_per_address,
        ),
        (
            "limits.register-attempt-burst-per-address",
            l.register_attempt_burst_per_address,
        ),
        (
            "limits.prekey-fetches-per-hour-per-device",
            l.prekey_fetches_per_hour_per_device,
        ),
        (
            "limits.prekey-fetch-burst-per-device",
            l.prekey_fetch_burst_per_device,
        ),
        (
            "limits.prekey-fetches-per-hour-per-pair",
            l.prekey_fetches_per_hour_per_pair,
        ),
        (
            "limits.prekey-fetch-burst-per-pair",
            l.prekey_fetch_burst_per_pair,
        ),
        (
            "limits.key-uploads-per-hour-per-device",
            l.key_uploads_per_hour_per_device,
        ),
        (
            "limits.key-upload-burst-per-device",
            l.key_upload_burst_per_device,
        ),
        (
            "limits.group-changes-per-hour-per-device",
            l.group_changes_per_hour_per_device,
        ),
        (
            "limits.group-change-burst-per-device",
            l.group_change_burst_per_device,
        ),
        (
            "limits.pairings-per-hour-per-address",
            l.pairings_per_hour_per_address,
        ),
        (
            "limits.pairing-burst-per-address",
            l.pairing_burst_per_address,
        ),
    ] {
        nonzero(name, value)?;
    }
    Ok(())
}

/// Every limit within its bounds: the protocol maxima, and never zero.
fn check_limits(l: &LimitsRaw) -> Result<(), ConfigError> {
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
        "limits.projection-job-memory-max",
        l.projection_job_memory_max.0,
        super::PROJECTION_JOB_MEMORY_MAX_MAX,
    )?;
    bounded(
        "limits.stream-buffer-bytes",
        l.stream_buffer_bytes.0,
        super::STREAM_BUFFER_BYTES_MAX,
    )?;
    bounded(
        "limits.companion-devices-max",
        u64::from(l.companion_devices_max),
        u64::from(limits::COMPANION_DEVICES_MAX),
    )?;
    nonzero_limits(l)?;
    for (name, value, max) in [
        (
            "limits.pairings-max",
            u64::from(l.pairings_max),
            super::PAIRINGS_MAX_MAX,
        ),
        (
            "limits.pairing-ttl (seconds)",
            l.pairing_ttl.0.as_secs(),
            super::PAIRING_TTL_S_MAX,
        ),
        (
            "limits.rate-limit-keys-max",
            u64::from(l.rate_limit_keys_max),
            super::RATE_LIMIT_KEYS_MAX_MAX,
        ),
        (
            "limits.ack-span-max",
            u64::from(l.ack_span_max),
            super::ACK_SPAN_MAX_MAX,
        ),
        (
            "limits.stream-buffer-frames",
            u64::from(l.stream_buffer_frames),
            super::STREAM_BUFFER_FRAMES_MAX,
        ),
    ] {
        if value > max {
            return Err(ConfigError::AboveProtocolMax { name, value, max });
        }
    }
    Ok(())
}

/// Limits: each within its protocol maximum, none zero.
fn validate_limits(l: &LimitsRaw) -> Result<Limits, ConfigError> {
    check_limits(l)?;
    Ok(Limits {
        message_body_bytes_max: l.message_body_max.bytes(),
        thumbnail_bytes_max: l.thumbnail_max.bytes(),
        connections_max: l.connections_max,
        streams_per_connection_max: l.streams_per_connection_max,
        peer_connections_max: l.peer_connections_max,
        peer_streams_per_connection_max: l.peer_streams_per_connection_max,
        group_members_max: l.group_members_max,
        companion_devices_max: l.companion_devices_max,
        sends_per_second_per_device: l.sends_per_second_per_device,
        send_burst_per_device: l.send_burst_per_device,
        stream_buffer_frames: l.stream_buffer_frames,
        stream_buffer_bytes: u32::try_from(l.stream_buffer_bytes.0)
            .expect("limits.stream-buffer-bytes was checked against its maximum"),
        ack_span_max: l.ack_span_max,
        forward_batches_in_flight: l.forward_batches_in_flight,
        device_cache_entries: l.device_cache_entries,
        streams_per_device_max: l.streams_per_device_max,
        unknown_recipients_per_hour_per_device: l.unknown_recipients_per_hour_per_device,
        unknown_recipient_burst_per_device: l.unknown_recipient_burst_per_device,
        presence_lookups_per_second_per_device: l.presence_lookups_per_second_per_device,
        presence_lookup_burst_per_device: l.presence_lookup_burst_per_device,
        tls_handshake_timeout: l.tls_handshake_timeout.0,
        keepalive_interval: l.keepalive_interval.0,
        keepalive_timeout: l.keepalive_timeout.0,
        code_requests_per_hour_per_phone: l.code_requests_per_hour_per_phone,
        code_request_burst_per_phone: l.code_request_burst_per_phone,
        register_attempts_per_hour_per_phone: l.register_attempts_per_hour_per_phone,
        register_attempt_burst_per_phone: l.register_attempt_burst_per_phone,
        code_requests_per_hour_per_address: l.code_requests_per_hour_per_address,
        code_request_burst_per_address: l.code_request_burst_per_address,
        register_attempts_per_hour_per_address: l.register_attempts_per_hour_per_address,
        register_attempt_burst_per_address: l.register_attempt_burst_per_address,
        prekey_fetches_per_hour_per_device: l.prekey_fetches_per_hour_per_device,
        prekey_fetch_burst_per_device: l.prekey_fetch_burst_per_device,
        prekey_fetches_per_hour_per_pair: l.prekey_fetches_per_hour_per_pair,
        prekey_fetch_burst_per_pair: l.prekey_fetch_burst_per_pair,
        key_uploads_per_hour_per_device: l.key_uploads_per_hour_per_device,
        key_upload_burst_per_device: l.key_upload_burst_per_device,
        group_changes_per_hour_per_device: l.group_changes_per_hour_per_device,
        group_change_burst_per_device: l.group_change_burst_per_device,
        pairings_per_hour_per_address: l.pairings_per_hour_per_address,
        pairing_burst_per_address: l.pairing_burst_per_address,
        pairings_max: l.pairings_max,
        pairing_ttl: l.pairing_ttl.0,
        typing_per_second_per_device: l.typing_per_second_per_device,
        typing_burst_per_device: l.typing_burst_per_device,
        rate_limit_keys_max: l.rate_limit_keys_max,
        typing_broadcasts_max: l.typing_broadcasts_max,
        projection_jobs_max: l.projection_jobs_max,
        projection_job_memory_max: l.projection_job_memory_max.0,
        metrics_connections_max: l.metrics_connections_max,
    })
}

/// `[archive]`: a directory (default beside the data directory) and a segment size.
fn validate_archive(
    raw: &super::raw::ArchiveRaw,
    data_dir: &std::path::Path,
) -> Result<super::ArchiveConfig, ConfigError> {
    let segment_entries = raw
        .segment_entries
        .unwrap_or(super::ARCHIVE_SEGMENT_ENTRIES);
    if segment_entries < super::ARCHIVE_SEGMENT_ENTRIES_MIN {
        return Err(ConfigError::ArchiveSegmentTooSmall {
            value: segment_entries,
            min: super::ARCHIVE_SEGMENT_ENTRIES_MIN,
        });
    }
    bounded(
        "archive.segment-entries",
        segment_entries,
        super::ARCHIVE_SEGMENT_ENTRIES_MAX,
    )?;
    let dir = raw.dir.clone().unwrap_or_else(|| {
        data_dir.parent().map_or_else(
            || std::path::PathBuf::from("archive"),
            |p| p.join("archive"),
        )
    });
    Ok(super::ArchiveConfig {
        dir,
        s3: raw.s3.as_ref().map(validate_s3).transpose()?,
        segment_entries,
        interval: raw
            .interval
            .map_or(std::time::Duration::from_secs(1), |d| d.0),
    })
}

/// `[archive.s3]`: a bucket name, a relative prefix, an http(s) endpoint (plain http only when
/// allowed).
fn validate_s3(raw: &super::raw::S3Raw) -> Result<super::S3Archive, ConfigError> {
    super::S3Archive::new(
        &raw.bucket,
        raw.prefix.as_deref().unwrap_or(""),
        raw.endpoint.clone(),
        raw.region.clone(),
        raw.allow_http,
    )
    .map_err(ConfigError::ArchiveS3)
}

/// `[sms]`: the development outbox or an HTTP provider, not both.
fn validate_sms(
    raw: SmsRaw,
) -> Result<(Option<std::path::PathBuf>, Option<SmsHttpConfig>), ConfigError> {
    if raw.dev_outbox.is_some() && raw.http.is_some() {
        return Err(ConfigError::SmsOutboxAndHttp);
    }
    Ok((
        raw.dev_outbox,
        raw.http.as_ref().map(validate_sms_http).transpose()?,
    ))
}

/// `[sms.http]`: an https URL (http only when allowed), a header name, a readable credential
/// file, a template with both placeholders, an attempt deadline and retries within bounds.
fn validate_sms_http(raw: &SmsHttpRaw) -> Result<SmsHttpConfig, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::SmsHttp { key, reason };
    let url = reqwest::Url::parse(&raw.url)
        .map_err(|error| invalid("sms.http.url", format!("not a URL ({error})")))?;
    match url.scheme() {
        "https" => {}
        "http" if raw.allow_http => {}
        "http" => {
            return Err(invalid(
                "sms.http.url",
                "plain http:// needs sms.http.allow-http = true".to_owned(),
            ));
        }
        _ => return Err(invalid("sms.http.url", "not an https:// URL".to_owned())),
    }
    let auth_header = reqwest::header::HeaderName::from_bytes(raw.auth_header.as_bytes())
        .map_err(|_| invalid("sms.http.auth-header", "not a header name".to_owned()))?;
    let auth_value = match &raw.auth_value_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| {
                invalid(
                    "sms.http.auth-value-file",
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            Some(
                Secret::from_file_text(&text)
                    .map_err(|reason| invalid("sms.http.auth-value-file", reason.to_owned()))?,
            )
        }
        None => None,
    };
    let content_type = reqwest::header::HeaderValue::from_str(&raw.content_type)
        .ok()
        .filter(|value| !value.is_empty())
        .ok_or_else(|| invalid("sms.http.content-type", "not a header value".to_owned()))?;
    for placeholder in ["{phone}", "{code}"] {
        if !raw.body_template.contains(placeholder) {
            return Err(invalid(
                "sms.http.body-template",
                format!("{placeholder} is missing"),
            ));
        }
    }
    if !(TIMEOUT_MS_MIN..=TIMEOUT_MS_MAX).contains(&raw.timeout_ms) {
        return Err(invalid(
            "sms.http.timeout-ms",
            format!(
                "{} is outside {TIMEOUT_MS_MIN}..={TIMEOUT_MS_MAX}",
                raw.timeout_ms
            ),
        ));
    }
    if raw.retries > RETRIES_MAX {
        return Err(invalid(
            "sms.http.retries",
            format!("{} exceeds the maximum {RETRIES_MAX}", raw.retries),
        ));
    }
    Ok(SmsHttpConfig {
        url,
        method: match raw.method {
            SmsMethod::Post => reqwest::Method::POST,
            SmsMethod::Put => reqwest::Method::PUT,
            SmsMethod::Get => reqwest::Method::GET,
        },
        auth_header,
        auth_value,
        content_type,
        body_template: raw.body_template.clone(),
        timeout: std::time::Duration::from_millis(raw.timeout_ms),
        retries: raw.retries,
    })
}
