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
