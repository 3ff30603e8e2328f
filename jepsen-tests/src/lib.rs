//! courier-jepsen: real node processes under faults, a recorded history, and a checker that proves
//! nothing acknowledged was lost, duplicated or reordered (issue #9; ../shared/TESTING.md tier 2).
//!
//! ```text
//!  scenario ─┬─ net       bridge + one netns per node, nftables partitions
//!            ├─ nodes     courier-node processes: start, SIGKILL, SIGSTOP/SIGCONT, crash watch
//!            │            (config from node_config: docs/node-config.template.toml)
//!            ├─ admin     InitCluster, Status (leaders, convergence), VerifyProjection
//!            ├─ workload  users × 2 devices, send workers, device streams, final drain
//!            ├─ nemesis   the fault schedule
//!            └─ recorder  history.jsonl  ──▶  checker::check  ──▶  report.txt / report.json
//! ```
//!
//! The binary (`src/main.rs`) is `courier-jepsen run | check | cleanup`:
//!
//! ```text
//! cargo build -p courier-node --bin courier-node -p courier-jepsen
//! sudo target/debug/courier-jepsen run --scenario kill-partition --seconds 60 [--seed N] [--out DIR]
//! target/debug/courier-jepsen check DIR/history.jsonl
//! sudo target/debug/courier-jepsen cleanup          # leftovers of runs whose harness died
//! ```
//!
//! A run needs root, `ip` (iproute2) and `nft` (nftables); without them it exits non-zero and
//! never runs without faults. The mutation self-test uses the node built with deliberate bugs:
//! `--node-binary target/debug/courier-node-bugs --bug skip-dedup`.

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

pub mod admin;
pub mod checker;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod node_config;
#[cfg(test)]
mod node_config_test;
pub mod nodes;
pub mod recorder;
pub mod scenario;
pub mod tls;
pub mod workload;

/// Lower-case hex of `bytes` (message ids, tokens in the bearer header): the one helper of
/// `courier_proto`.
pub use courier_proto::hex;
