//! Tests of the node config template and its filler (`node_config.rs`).

use std::path::Path;

use crate::node_config::{NodeConfig, TEMPLATE};

/// The placeholders [`NodeConfig::for_workload`] sets.
const WORKLOAD: [&str; 9] = [
    "snapshot_logs_since_last",
    "sends_per_second_per_device",
    "send_burst_per_device",
    "code_requests_per_hour_per_phone",
    "code_request_burst_per_phone",
    "register_attempts_per_hour_per_phone",
    "register_attempt_burst_per_phone",
    "streams_per_device_max",
    "keep_delivered",
];

/// Goal: unset placeholders and tables without keys are left out, set ones are filled (`new`
/// sets the development SMS outbox, where the harnesses read registration codes).
#[test]
fn unset_keys_and_empty_tables_are_left_out() {
    let text = NodeConfig::new(3, Path::new("/tmp/n3"))
        .set("client", "127.0.0.1:0")
        .set("log_level", "info")
        .text();
    assert_eq!(
        text,
        "node-id = 3\ndata-dir = \"/tmp/n3\"\n\n[listen]\nclient = \"127.0.0.1:0\"\n\n[sms]\ndev-outbox = \"/tmp/n3/sms-outbox.log\"\n\n[log]\nlevel = \"info\"\n"
    );
}

/// Goal: every placeholder of the template can be set, and then every key is written.
#[test]
fn a_full_config_fills_every_placeholder() {
    let mut config = NodeConfig::new(1, Path::new("d")).for_workload();
    for line in TEMPLATE.lines().filter(|line| !line.starts_with('#')) {
        if let Some((_, after)) = line.split_once('{') {
            let name = after.split_once('}').expect("closed placeholder").0;
            if !["node_id", "data_dir"].contains(&name) && !WORKLOAD.contains(&name) {
                let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
                config = config.set(name, "x");
            }
        }
    }
    let text = config.text();
    assert!(!text.contains('{'), "{text}");
    let keys = TEMPLATE.lines().filter(|line| line.contains(" = ")).count();
    assert_eq!(
        text.lines().filter(|line| line.contains(" = ")).count(),
        keys,
        "{text}"
    );
}

/// Goal: a misspelt placeholder fails loudly instead of leaving its key out.
#[test]
#[should_panic(expected = "no placeholder {hearbeat}")]
fn a_misspelt_placeholder_panics() {
    let _ = NodeConfig::new(1, Path::new("d")).set("hearbeat", "50ms");
}
