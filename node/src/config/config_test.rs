//! The config's parsing, defaults and every validation error.

use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
    node-id = 1
    data-dir = "/tmp/courier-1"
    [listen]
    client = "127.0.0.1:7001"
    peer = "127.0.0.1:7101"
    [tls]
    insecure-plaintext = true
"#;

/// TLS is required: without `[tls]` a node refuses to start, naming the first missing file;
/// plaintext together with files is refused too; all five files are a TLS config.
#[test]
fn tls_is_required_unless_plaintext_is_asked_for() {
    let without = MINIMAL.replace("[tls]\n    insecure-plaintext = true", "");
    assert!(
        matches!(
            Config::parse(&without),
            Err(ConfigError::TlsMissing { name: "tls.ca" })
        ),
        "{without}"
    );
    let both = MINIMAL.replace(
        "insecure-plaintext = true",
        "insecure-plaintext = true\n    ca = \"ca.pem\"",
    );
    assert!(matches!(
        Config::parse(&both),
        Err(ConfigError::TlsAndPlaintext { name: "tls.ca" })
    ));
    let files = MINIMAL.replace(
        "insecure-plaintext = true",
        "ca = \"a\"\n cert = \"b\"\n key = \"c\"\n listener-cert = \"d\"\n listener-key = \"e\"",
    );
    let config = Config::parse(&files).expect("five files");
    assert_eq!(
        config.tls.map(|tls| tls.listener_key),
        Some(PathBuf::from("e"))
    );
    assert!(Config::parse(MINIMAL).expect("plaintext").tls.is_none());
}

/// The documented example lists every key and stays parseable.
#[test]
fn example_config_parses() {
    let text = include_str!("../../../docs/config.example.toml");
    let config = Config::parse(text).expect("docs/config.example.toml is valid");
    assert_eq!(config.node_id, 1);
    assert_eq!(config.limits.message_body_bytes_max, 64 * 1024);
    assert_eq!(config.raft.heartbeat, Duration::from_millis(100));
    assert_eq!(
        config.leader_rebalance, None,
        "the example keeps the rebalancer off"
    );
}

/// The automatic leader rebalancer is off unless an interval is set.
#[test]
fn leader_rebalance_is_opt_in() {
    assert_eq!(
        Config::parse(MINIMAL).expect("minimal").leader_rebalance,
        None
    );
    let on = with("[cluster]\nleader-rebalance-interval = \"30s\"").expect("on");
    assert_eq!(on.leader_rebalance, Some(Duration::from_secs(30)));
    let unknown = with("[cluster]\nrebalance = true");
    assert!(unknown.is_err(), "an unknown key is refused");
    let eager = with("[cluster]\nleader-rebalance-interval = \"1s\"");
    assert!(
        matches!(
            eager,
            Err(ConfigError::RebalanceIntervalTooShort {
                key: "cluster.leader-rebalance-interval",
                interval_ms: 1000,
                election_timeout_ms_max: 1000
            })
        ),
        "an interval below twice the election timeout is refused: {eager:?}"
    );
}

/// The automatic replica rebalancer is off unless an interval is set, and held to the same
/// floor as the leader rebalancer.
#[test]
fn replica_rebalance_is_opt_in() {
    assert_eq!(
        Config::parse(MINIMAL).expect("minimal").replica_rebalance,
        None
    );
    let on = with("[cluster]\nreplica-rebalance-interval = \"10s\"").expect("on");
    assert_eq!(on.replica_rebalance, Some(Duration::from_secs(10)));
    let eager = with("[cluster]\nreplica-rebalance-interval = \"500ms\"");
    assert!(
        matches!(
            eager,
            Err(ConfigError::RebalanceIntervalTooShort {
                key: "cluster.replica-rebalance-interval",
                interval_ms: 500,
                ..
            })
        ),
        "{eager:?}"
    );
}

/// The commented `[sms.http]` of the example is a valid provider once uncommented (without its
/// credential file, which does not exist here).
#[test]
fn example_sms_provider_parses() {
    let text = include_str!("../../../docs/config.example.toml");
    let is_key = |line: &str| {
        line.split_once(" = ").is_some_and(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
    };
    let keys: Vec<&str> = text
        .lines()
        .skip_while(|line| *line != "# [sms.http]")
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| *line == "[sms.http]" || is_key(line))
        .filter(|line| !line.starts_with("auth-value-file"))
        .collect();
    assert!(keys.len() > 5, "{keys:?}");
    let config = with(&keys.join("\n")).expect("the example provider");
    let http = config.sms_http.expect("[sms.http]");
    assert_eq!(http.url.scheme(), "https");
    assert_eq!(
        http.timeout,
        Duration::from_millis(crate::sms::TIMEOUT_MS_DEFAULT)
    );
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
        with("[retention]\ncompanion-history = 1001"),
        Err(ConfigError::AboveProtocolMax {
            name: "retention.companion-history",
            value: 1001,
            max: 1000
        })
    ));
    assert!(with("[retention]\ncompanion-history = 0").is_ok());
    assert!(matches!(
        with("[retention]\ndedup = \"0s\""),
        Err(ConfigError::ZeroLimit {
            name: "retention.dedup"
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

/// `[archive.s3]`: a usable bucket setting is taken as given (prefix without its slashes); a
/// bucket name with '/', a prefix with '..', an endpoint that is no http(s) URL and plain http
/// without `allow-http` are each refused at start.
#[test]
fn an_s3_archive_is_validated() {
    let config = with(
        "[archive.s3]\nbucket = \"courier\"\nprefix = \"/cluster-a/\"\nendpoint = \"http://127.0.0.1:9000\"\nallow-http = true",
    )
    .expect("a bucket");
    assert_eq!(
        config.archive.s3,
        Some(S3Archive {
            bucket: "courier".to_owned(),
            prefix: "cluster-a".to_owned(),
            endpoint: Some("http://127.0.0.1:9000".to_owned()),
            region: None,
            allow_http: true,
        })
    );
    assert_eq!(Config::parse(MINIMAL).expect("minimal").archive.s3, None);
    for bad in [
        "bucket = \"a/b\"",
        "bucket = \"\"",
        "bucket = \"c\"\nprefix = \"x/../y\"",
        "bucket = \"c\"\nendpoint = \"ftp://host\"",
        "bucket = \"c\"\nendpoint = \"http://host\"",
    ] {
        assert!(
            matches!(
                with(&format!("[archive.s3]\n{bad}")),
                Err(ConfigError::ArchiveS3(_))
            ),
            "{bad}"
        );
    }
}

const SMS_HTTP: &str = r#"
    [sms.http]
    url = "https://sms.example/v1/messages"
    body-template = '{"to":"{phone}","text":"Your code: {code}"}'
"#;

/// `[sms.http]`: the defaults fill what is left out, the credential comes from its file (trimmed)
/// and never shows in the config's `Debug`.
#[test]
fn an_sms_provider_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("sms-auth");
    std::fs::write(&secret, "Bearer s3cr3t-t0ken\n").expect("write the credential");
    let config = with(&format!(
        "{SMS_HTTP}\nauth-value-file = \"{}\"",
        secret.display()
    ))
    .expect("an https provider");
    let http = config.sms_http.as_ref().expect("[sms.http]");
    assert_eq!(http.url.as_str(), "https://sms.example/v1/messages");
    assert_eq!(http.method, reqwest::Method::POST);
    assert_eq!(http.auth_header, "authorization");
    assert_eq!(
        http.auth_value.as_ref().map(Secret::header_value),
        Some(&reqwest::header::HeaderValue::from_static(
            "Bearer s3cr3t-t0ken"
        ))
    );
    assert_eq!(http.content_type, "application/json");
    assert_eq!(http.timeout, Duration::from_millis(5000));
    assert_eq!(http.retries, 2);
    assert!(config.sms_dev_outbox.is_none());
    let debug = format!("{config:?}");
    assert!(debug.contains("Secret(<redacted>)"), "{debug}");
    assert!(!debug.contains("s3cr3t"), "the credential leaked: {debug}");

    let put = with(&format!(
        "{SMS_HTTP}\nmethod = \"PUT\"\ntimeout-ms = 100\nretries = 0\ncontent-type = \"text/plain\""
    ))
    .expect("a PUT provider");
    let http = put.sms_http.expect("[sms.http]");
    assert_eq!(http.method, reqwest::Method::PUT);
    assert_eq!(http.timeout, Duration::from_millis(100));
    assert_eq!(http.retries, 0);
    assert!(http.auth_value.is_none());
    assert!(Config::parse(MINIMAL).expect("minimal").sms_http.is_none());
}

/// Each unusable `[sms.http]` setting stops the node at start, naming its key: a template without
/// a placeholder, plain http without `allow-http`, another scheme, a bad header name, an
/// unreadable or empty credential file, a deadline or retry count out of bounds; and the outbox
/// together with a provider.
#[test]
fn each_sms_provider_error_fires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let missing = dir.path().join("missing");
    let template = "body-template = '{\"to\":\"{phone}\",\"text\":\"{code}\"}'";
    let provider =
        |keys: &str| format!("[sms.http]\nurl = \"https://sms.example/send\"\n{template}\n{keys}");
    for (bad, key) in [
        (
            "[sms.http]\nurl = \"https://sms.example/\"\nbody-template = \"code {code}\""
                .to_owned(),
            "sms.http.body-template",
        ),
        (
            "[sms.http]\nurl = \"https://sms.example/\"\nbody-template = \"to {phone}\"".to_owned(),
            "sms.http.body-template",
        ),
        (
            format!("[sms.http]\nurl = \"http://127.0.0.1:8080/send\"\n{template}"),
            "sms.http.url",
        ),
        (
            format!("[sms.http]\nurl = \"ftp://sms.example/\"\n{template}"),
            "sms.http.url",
        ),
        (
            format!("[sms.http]\nurl = \"sms.example\"\n{template}"),
            "sms.http.url",
        ),
        (provider("auth-header = \"X Key\""), "sms.http.auth-header"),
        (
            provider(&format!("auth-value-file = \"{}\"", missing.display())),
            "sms.http.auth-value-file",
        ),
        (
            provider(&format!("auth-value-file = \"{}\"", empty.display())),
            "sms.http.auth-value-file",
        ),
        (provider("content-type = \"\""), "sms.http.content-type"),
        (provider("timeout-ms = 99"), "sms.http.timeout-ms"),
        (provider("timeout-ms = 60001"), "sms.http.timeout-ms"),
        (provider("retries = 6"), "sms.http.retries"),
    ] {
        match with(&bad) {
            Err(error @ ConfigError::SmsHttp { key: got, .. }) => {
                assert_eq!(got, key, "{bad}");
                assert!(error.to_string().starts_with(key), "{error}");
            }
            other => panic!("{bad}: expected an error on {key}, got {other:?}"),
        }
    }
    assert_eq!(
        with(&format!(
            "[sms.http]\nurl = \"http://127.0.0.1:8080/send\"\nallow-http = true\n{template}"
        ))
        .expect("plain http when allowed")
        .sms_http
        .map(|http| http.url.scheme().to_owned()),
        Some("http".to_owned())
    );
    let both = format!("[sms]\ndev-outbox = \"outbox.log\"\n{}", provider(""));
    let error = with(&both).expect_err("outbox and provider");
    assert!(matches!(error, ConfigError::SmsOutboxAndHttp), "{error:?}");
    assert_eq!(
        error.to_string(),
        "sms.dev-outbox and sms.http are both set: choose one"
    );
    for bad in ["method = \"PATCH\"", "unknown = 1"] {
        assert!(
            matches!(with(&provider(bad)), Err(ConfigError::Parse(_))),
            "{bad}"
        );
    }
}

/// Each `(config line, key)` is refused as a zero limit naming that key.
fn assert_zero_refused(cases: &[(&str, &str)]) {
    for (line, name) in cases {
        match with(line) {
            Err(ConfigError::ZeroLimit { name: got }) => assert_eq!(got, *name),
            other => panic!("{line}: expected ZeroLimit, got {other:?}"),
        }
    }
}

/// The peer listener's connection and stream caps are configured values: 1,024 and 4,096 by
/// default, set from the file, never zero.
#[test]
fn peer_listener_limits_are_configured() {
    let values = |c: &Config| {
        (
            c.limits.peer_connections_max,
            c.limits.peer_streams_per_connection_max,
        )
    };
    assert_eq!(
        values(&Config::parse(MINIMAL).expect("minimal")),
        (1024, 4096)
    );
    let set = with("[limits]\npeer-connections-max = 16\npeer-streams-per-connection-max = 64")
        .expect("set");
    assert_eq!(values(&set), (16, 64));
    assert_zero_refused(&[
        (
            "[limits]\npeer-connections-max = 0",
            "limits.peer-connections-max",
        ),
        (
            "[limits]\npeer-streams-per-connection-max = 0",
            "limits.peer-streams-per-connection-max",
        ),
    ]);
}

/// The size of a retention proposal and the proposals in a row per scan are configured values:
/// 256 and 64 by default, set from the file, never zero, the batch at most 1,000.
#[test]
fn retention_batches_are_configured() {
    let values = |c: &Config| (c.retention.batch_max, c.retention.batches_per_pass_max);
    assert_eq!(values(&Config::parse(MINIMAL).expect("minimal")), (256, 64));
    let set = with("[retention]\nbatch-max = 1000\nbatches-per-pass-max = 3").expect("set");
    assert_eq!(values(&set), (1000, 3));
    assert_zero_refused(&[
        ("[retention]\nbatch-max = 0", "retention.batch-max"),
        (
            "[retention]\nbatches-per-pass-max = 0",
            "retention.batches-per-pass-max",
        ),
    ]);
    assert!(matches!(
        with("[retention]\nbatch-max = 1001"),
        Err(ConfigError::AboveProtocolMax {
            name: "retention.batch-max",
            value: 1001,
            max: 1000
        })
    ));
}

/// Checks a size limit of `[limits]` named `key`, read back by `pick`: `default` when unset,
/// `set` (a size and its bytes) when set, refused at zero and at `above`.
fn assert_size_limit(
    key: &str,
    pick: fn(&Config) -> u64,
    default: u64,
    set: (&str, u64),
    above: &str,
) {
    let name = format!("limits.{key}");
    assert_eq!(pick(&Config::parse(MINIMAL).expect("minimal")), default);
    let line = |size: &str| format!("[limits]\n{key} = \"{size}\"");
    assert_eq!(pick(&with(&line(set.0)).expect("set")), set.1);
    assert_zero_refused(&[(&line("0B"), &name)]);
    match with(&line(above)) {
        Err(ConfigError::AboveProtocolMax { name: got, .. }) => assert_eq!(got, name),
        other => panic!("{key} = {above}: expected AboveProtocolMax, got {other:?}"),
    }
}

/// A device stream's buffer is bounded in bytes as well as frames: 1 MiB by default, set from
/// the file, never zero, at most 256 MiB.
#[test]
fn stream_buffer_bytes_are_configured() {
    assert_size_limit(
        "stream-buffer-bytes",
        |c| u64::from(c.limits.stream_buffer_bytes),
        1 << 20,
        ("64KiB", 64 << 10),
        "257MiB",
    );
}

/// What one projection job's replay may hold in memory is configured: 2 GiB by default, set from
/// the file, never zero, at most 1,024 GiB.
#[test]
fn projection_job_memory_is_configured() {
    assert_size_limit(
        "projection-job-memory-max",
        |c| c.limits.projection_job_memory_max,
        2 << 30,
        ("512MiB", 512 << 20),
        "1025GiB",
    );
}

/// The node's own concurrency limits (typing broadcasts, projection jobs, metrics scrapes) are
/// configured values: 1,024, 1 and 16 by default, set from the file, never zero.
#[test]
fn node_concurrency_limits_are_configured() {
    let values = |c: &Config| {
        (
            c.limits.typing_broadcasts_max,
            c.limits.projection_jobs_max,
            c.limits.metrics_connections_max,
        )
    };
    assert_eq!(
        values(&Config::parse(MINIMAL).expect("minimal")),
        (1024, 1, 16)
    );
    let set = with(
        "[limits]\ntyping-broadcasts-max = 8\nprojection-jobs-max = 2\nmetrics-connections-max = 4",
    )
    .expect("set");
    assert_eq!(values(&set), (8, 2, 4));
    assert_zero_refused(&[
        (
            "[limits]\ntyping-broadcasts-max = 0",
            "limits.typing-broadcasts-max",
        ),
        (
            "[limits]\nprojection-jobs-max = 0",
            "limits.projection-jobs-max",
        ),
        (
            "[limits]\nmetrics-connections-max = 0",
            "limits.metrics-connections-max",
        ),
    ]);
}

/// The in-memory limits of pairing, typing, the rate limiters and presence reports are
/// configured values: defaults as documented, set from the file, never zero.
#[test]
fn node_memory_limits_are_configured() {
    // (pairings-max, pairing-ttl, typing rate, typing burst, rate-limit keys, report queue)
    let values = |c: &Config| {
        (
            c.limits.pairings_max,
            c.limits.pairing_ttl,
            c.limits.typing_per_second_per_device,
            c.limits.typing_burst_per_device,
            c.limits.rate_limit_keys_max,
            c.presence.report_queue_max,
        )
    };
    assert_eq!(
        values(&Config::parse(MINIMAL).expect("minimal")),
        (10_000, Duration::from_secs(120), 5, 10, 100_000, 4096)
    );
    let set = with(
        "[limits]\npairings-max = 7\npairing-ttl = \"30s\"\ntyping-per-second-per-device = 2\n\
         typing-burst-per-device = 3\nrate-limit-keys-max = 500\n[presence]\nreport-queue-max = 64",
    )
    .expect("set");
    assert_eq!(values(&set), (7, Duration::from_secs(30), 2, 3, 500, 64));
    assert_zero_refused(&[
        ("[limits]\npairings-max = 0", "limits.pairings-max"),
        ("[limits]\npairing-ttl = \"0s\"", "limits.pairing-ttl"),
        (
            "[limits]\ntyping-per-second-per-device = 0",
            "limits.typing-per-second-per-device",
        ),
        (
            "[limits]\ntyping-burst-per-device = 0",
            "limits.typing-burst-per-device",
        ),
        (
            "[limits]\nrate-limit-keys-max = 0",
            "limits.rate-limit-keys-max",
        ),
        (
            "[presence]\nreport-queue-max = 0",
            "presence.report-queue-max",
        ),
    ]);
    for (line, name) in [
        ("[limits]\npairings-max = 100001", "limits.pairings-max"),
        (
            "[limits]\npairing-ttl = \"2d\"",
            "limits.pairing-ttl (seconds)",
        ),
        (
            "[limits]\nrate-limit-keys-max = 10000001",
            "limits.rate-limit-keys-max",
        ),
        ("[limits]\nack-span-max = 4097", "limits.ack-span-max"),
        (
            "[limits]\nstream-buffer-frames = 65537",
            "limits.stream-buffer-frames",
        ),
        ("[raft]\nsnapshot-chunk = \"4MiB\"", "raft.snapshot-chunk"),
        (
            "[raft]\nappend-entries-max = 4097",
            "raft.append-entries-max",
        ),
        (
            "[archive]\nsegment-entries = 65537",
            "archive.segment-entries",
        ),
        (
            "[raft]\nproposal-queue-max = 65537",
            "raft.proposal-queue-max",
        ),
        (
            "[raft]\nproposal-queue-bytes-max = \"2GiB\"",
            "raft.proposal-queue-bytes-max",
        ),
    ] {
        match with(line) {
            Err(ConfigError::AboveProtocolMax { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{line}: expected AboveProtocolMax, got {other:?}"),
        }
    }
}

/// Each shard's proposal queue is bounded in proposals and in bytes, both configured; the byte
/// budget holds at least one maximal proposal.
#[test]
fn the_proposal_queue_is_bounded_in_count_and_bytes() {
    let defaults = Config::parse(MINIMAL).expect("minimal").raft.proposal_queue;
    assert_eq!((defaults.proposals, defaults.bytes), (4096, 64 << 20));
    let set = with("[raft]\nproposal-queue-max = 10\nproposal-queue-bytes-max = \"2MiB\"")
        .expect("set")
        .raft
        .proposal_queue;
    assert_eq!((set.proposals, set.bytes), (10, 2 << 20));
    assert!(matches!(
        with("[raft]\nproposal-queue-max = 0"),
        Err(ConfigError::ZeroLimit {
            name: "raft.proposal-queue-max"
        })
    ));
    assert!(matches!(
        with("[raft]\nproposal-queue-bytes-max = \"512KiB\""),
        Err(ConfigError::BelowMinimum {
            name: "raft.proposal-queue-bytes-max",
            min: 1_048_576,
            ..
        })
    ));
}

/// The recent log entries all shards of a node keep in memory are bounded by one configured
/// size: 256 MiB by default, set from the file, 0 to keep none, at most 64 GiB.
#[test]
fn the_log_cache_is_configured() {
    let pick = |config: &Config| config.raft.log_cache_bytes_max;
    assert_eq!(pick(&Config::parse(MINIMAL).expect("minimal")), 256 << 20);
    let line = |size: &str| format!("[raft]\nlog-cache-bytes-max = \"{size}\"");
    assert_eq!(pick(&with(&line("1GiB")).expect("set")), 1 << 30);
    assert_eq!(pick(&with(&line("0B")).expect("off")), 0);
    match with(&line("65GiB")) {
        Err(ConfigError::AboveProtocolMax { name, .. }) => {
            assert_eq!(name, "raft.log-cache-bytes-max");
        }
        other => panic!("expected AboveProtocolMax, got {other:?}"),
    }
}
