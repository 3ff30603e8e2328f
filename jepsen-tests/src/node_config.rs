//! The node config that test harnesses write, from one template
//! (`docs/node-config.template.toml`) filled by [`NodeConfig`]. Three harnesses use it: this
//! crate's real node processes, the simulation's nodes (`courier-sim`) and node's own
//! integration tests.
//!
//! This file uses nothing but `std`, and it must stay that way: node's integration tests may not
//! depend on courier-jepsen (nothing depends on the harnesses, STYLE.md section 1, enforced by
//! `scripts/check-deps`), so they compile this same file with `#[path]` instead of linking the
//! crate. That keeps one template and one filler without an edge up the crate graph.
//!
//! Filling is line by line: a line whose placeholder was not set is left out, so the node uses
//! its default; a table left without keys is left out too, so a caller may append that table
//! itself (node's tests add their own `[raft]` and `[limits]`).
//!
//! Its tests are in `node_config_test.rs`, declared by the crate root, so that node's test
//! binary, which compiles this file, does not run them a second time.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;

/// The template: TOML with `{name}` placeholders, comment lines that are not copied.
pub const TEMPLATE: &str = include_str!("../../docs/node-config.template.toml");

/// Per-device sends per second granted to a workload (the default 20/s would throttle it).
pub const WORKLOAD_SENDS_PER_SECOND_PER_DEVICE: u32 = 1_000;

/// Log entries between snapshots under a workload. High enough that no run purges its log: the
/// simulation's nodes run no log archive, so `VerifyProjection` from index 1 would refuse
/// (`COURIER:Log:Purged`) once a snapshot purged a log's beginning, and the checker requires
/// every replica verified. courier-jepsen's real nodes archive, and set their own
/// (`nodes::SNAPSHOT_LOGS_SINCE_LAST`).
pub const WORKLOAD_SNAPSHOT_LOGS_SINCE_LAST: u64 = 1_000_000;

/// A node config being filled in: values for the template's placeholders.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    values: BTreeMap<&'static str, String>,
}

impl NodeConfig {
    /// Node `node_id` with its data in `data_dir`; nothing else set yet.
    pub fn new(node_id: impl Display, data_dir: &Path) -> Self {
        let config = Self {
            values: BTreeMap::new(),
        };
        // The harnesses read registration codes from the development SMS outbox.
        config
            .set("node_id", node_id)
            .set("data_dir", data_dir.display())
            .set("sms_dev_outbox", data_dir.join("sms-outbox.log").display())
    }

    /// Sets the placeholder `{name}` (the key's name in snake_case, see the template).
    ///
    /// # Panics
    ///
    /// If the template has no `{name}`: a misspelt name would otherwise leave the key out
    /// silently.
    pub fn set(mut self, name: &'static str, value: impl Display) -> Self {
        let placeholder = format!("{{{name}}}");
        assert!(
            TEMPLATE
                .lines()
                .any(|line| !line.starts_with('#') && line.contains(&placeholder)),
            "docs/node-config.template.toml has no placeholder {placeholder}"
        );
        self.values.insert(name, value.to_string());
        self
    }

    /// Out of a workload's way: limits raised so it is never throttled, no snapshot within a
    /// run unless the caller sets one (see [`WORKLOAD_SNAPSHOT_LOGS_SINCE_LAST`]), and delivered bodies kept on the server
    /// (`keep-delivered`): a final drain re-reads every inbox from seq 1, which the
    /// server-centric default (bodies trimmed once every device acked) would leave empty.
    pub fn for_workload(self) -> Self {
        self.set(
            "snapshot_logs_since_last",
            WORKLOAD_SNAPSHOT_LOGS_SINCE_LAST,
        )
        .set(
            "sends_per_second_per_device",
            WORKLOAD_SENDS_PER_SECOND_PER_DEVICE,
        )
        .set(
            "send_burst_per_device",
            WORKLOAD_SENDS_PER_SECOND_PER_DEVICE,
        )
        .set("code_requests_per_hour_per_phone", 1_000)
        .set("code_request_burst_per_phone", 100)
        .set("register_attempts_per_hour_per_phone", 1_000)
        .set("register_attempt_burst_per_phone", 100)
        // Under partitions a device reconnects before its node sees the old stream die.
        .set("streams_per_device_max", 1_000)
        .set("keep_delivered", true)
    }

    /// TLS from a development PKI in `pki` (the files `courier_tls::dev::generate` writes: the
    /// CA, `node-<id>` and `listener`), for node `node_id`.
    pub fn dev_tls(self, node_id: impl Display, pki: &Path) -> Self {
        let file = |name: String| pki.join(name).display().to_string();
        self.set("tls_ca", file("ca.pem".to_owned()))
            .set("tls_cert", file(format!("node-{node_id}.pem")))
            .set("tls_key", file(format!("node-{node_id}.key")))
            .set("tls_listener_cert", file("listener.pem".to_owned()))
            .set("tls_listener_key", file("listener.key".to_owned()))
    }

    /// Both listeners in plaintext, no caller checked on the peer listener: for harnesses whose
    /// clients do not speak TLS (the simulation's network).
    pub fn insecure_plaintext(self) -> Self {
        self.set("insecure_plaintext", true)
    }

    /// The config text: the template with every set placeholder filled, lines of unset ones
    /// and tables without keys left out.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut table: Option<&str> = None;
        for line in TEMPLATE.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with('[') {
                table = Some(line);
                continue;
            }
            let Some(filled) = self.fill(line) else {
                continue;
            };
            if let Some(header) = table.take() {
                out.push('\n');
                out.push_str(header);
                out.push('\n');
            }
            out.push_str(&filled);
            out.push('\n');
        }
        out
    }

    /// `line` with its placeholders filled, or `None` if one of them is not set.
    fn fill(&self, line: &str) -> Option<String> {
        let mut out = String::new();
        let mut rest = line;
        while let Some(open) = rest.find('{') {
            let (before, after) = rest.split_at(open);
            let close = after.find('}')?;
            let name = after.get(1..close)?;
            out.push_str(before);
            out.push_str(self.values.get(name)?);
            rest = after.get(close.saturating_add(1)..)?;
        }
        out.push_str(rest);
        Some(out)
    }
}
