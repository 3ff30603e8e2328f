//! End to end: the harness binary runs a short `kill-partition` scenario against real
//! `courier-node` processes in network namespaces, and the run must pass with faults injected.
//!
//! Method: run `courier-jepsen run` as a child process, then read its `report.json`. The test
//! needs root (namespaces, bridge, nftables) and the node binary next to the harness binary
//! (`cargo build -p courier-node --bin courier-node`, which a workspace test build does). Without
//! either it fails with a message saying so: it never passes without injecting faults.

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::Command;

/// Seconds of workload (and fault window) of the end-to-end run.
const SECONDS: &str = "20";

fn effective_uid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn kill_partition_run_passes_with_faults_injected() {
    let uid = effective_uid();
    assert_eq!(
        uid, "0",
        "the Jepsen end-to-end test needs root (network namespaces, a bridge, nftables); \
         effective uid is {uid}. It fails rather than pass without faults."
    );
    let out: PathBuf =
        std::env::temp_dir().join(format!("courier-jepsen-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(env!("CARGO_BIN_EXE_courier-jepsen"))
        .args([
            "run",
            "--scenario",
            "kill-partition",
            "--seconds",
            SECONDS,
            "--seed",
            "9",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("courier-jepsen runs");
    let stdout = tail(&output.stdout, 40);
    let stderr = tail(&output.stderr, 40);
    let report = std::fs::read_to_string(out.join("report.json")).unwrap_or_else(|error| {
        panic!(
            "no report.json in {} ({error}); exit {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.display(),
            output.status.code()
        )
    });
    let report: serde_json::Value = serde_json::from_str(&report).expect("report.json is JSON");
    assert!(
        report["passed"].as_bool() == Some(true) && output.status.success(),
        "the run failed (kept in {}):\n{stdout}\n--- stderr\n{stderr}",
        out.display()
    );
    let faults = report["faults_injected"].as_u64().unwrap_or(0);
    assert!(faults >= 1, "no fault was injected:\n{stdout}");
    let acked = report["checker"]["counts"]["sends_acked"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        acked >= 50,
        "only {acked} acknowledged sends; the workload did not run:\n{stdout}"
    );
    let drains = report["checker"]["counts"]["drain_sessions"]
        .as_u64()
        .unwrap_or(0);
    assert!(drains > 0, "no drain sessions:\n{stdout}");
    // A passing run keeps history and report, not the node data.
    assert!(out.join("history.jsonl").is_file(), "the history is kept");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn check_command_rejects_a_history_with_a_lost_send() {
    let dir = std::env::temp_dir().join(format!("courier-jepsen-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("history.jsonl");
    // One acked send to user 2, and a drain of user 2 that does not contain it.
    let lines = [
        r#"{"type":"invoke","process":0,"op_id":1,"time_ms":1,"op":{"from_user":1,"to_user":2,"client_id":"0-1"}}"#,
        r#"{"type":"complete","process":0,"op_id":1,"time_ms":2,"outcome":{"status":"ok","message_id":"aa"}}"#,
        r#"{"type":"session_start","session":1,"user":2,"device":1,"node":1,"resume_after_seq":0,"time_ms":3,"drain":true}"#,
    ];
    std::fs::write(&path, lines.join("\n")).expect("write history");
    let output = Command::new(env!("CARGO_BIN_EXE_courier-jepsen"))
        .arg("check")
        .arg(&path)
        .output()
        .expect("courier-jepsen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "anomalies exit 1:\n{stdout}");
    assert!(
        stdout.contains("lost: 1"),
        "the lost send is reported:\n{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
