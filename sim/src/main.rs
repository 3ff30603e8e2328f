//! `courier-sim`: runs seeds of the deterministic simulation and reports each.
//!
//! ```text
//! courier-sim --seed 17                      one seed, with the full checker report
//! courier-sim --layer node --seeds 20        whole nodes and jepsen-tests' clients
//! courier-sim --first 0 --seeds 200          a budget of seeds (what CI runs)
//! courier-sim --seeds 20 --bug ack-before-commit --expect-failure
//!                                            the deliberate bug must be found (feature `bugs`;
//!                                            also `unsynced-log-appends`,
//!                                            `purge-before-install`)
//! ```
//!
//! Exit codes: 0 every seed passed (or, with `--expect-failure`, at least one failed); 1
//! otherwise; 2 a simulation could not run.

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

use std::time::Instant;

use clap::Parser;
use courier_sim::{Bug, Layer, Options, Report};

#[derive(Debug, Parser)]
#[command(version, about = "courier deterministic simulation")]
struct Args {
    /// What is simulated: `raft` (the consensus layer, clients propose directly) or `node`
    /// (whole courier-node servers, clients use the gRPC client API).
    #[arg(long, default_value = "raft")]
    layer: Layer,
    /// Run only this seed and print its whole report.
    #[arg(long)]
    seed: Option<u64>,
    /// First seed of a budget.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Number of seeds.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Simulated seconds of workload and faults per seed.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// A deliberate bug (needs the `bugs` feature): ack-before-commit, unsynced-log-appends or
    /// purge-before-install.
    #[arg(long = "bug")]
    bug_name: Option<String>,
    /// Succeed only if some seed fails (proves the bug is found).
    #[arg(long)]
    expect_failure: bool,
    /// Run every seed twice and fail unless both runs record the same history (fingerprint and
    /// ticks): exact replay.
    #[arg(long)]
    check_replay: bool,
}

fn main() {
    let args = Args::parse();
    // COURIER_SIM_LOG=<filter> (e.g. `warn`, `openraft=debug`) prints the nodes' logs.
    if let Ok(filter) = std::env::var("COURIER_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let bug = match args.bug_name.as_deref().map(str::parse::<Bug>).transpose() {
        Ok(bug) => bug,
        Err(error) => {
            eprintln!("courier-sim: {error}");
            std::process::exit(2);
        }
    };
    let template = Options {
        layer: args.layer,
        seed: 0,
        seconds: args.seconds,
        bug,
    };
    let (first, count) = args.seed.map_or((args.first, args.seeds), |seed| (seed, 1));
    if args.check_replay {
        std::process::exit(check_replay(&args, first, count));
    }
    if let Some(seed) = args.seed {
        let options = Options { seed, ..template };
        match courier_sim::run(&options) {
            Ok(report) => {
                print_report(&report, true);
                std::process::exit(i32::from(!report.passed()));
            }
            Err(error) => {
                eprintln!("courier-sim: seed {seed}: {error:#}");
                std::process::exit(2);
            }
        }
    }
    std::process::exit(run_budget(&args, first, count));
}

fn print_report(report: &Report, whole: bool) {
    println!(
        "seed {:>6}: {} shards, {} clients, {} ticks, {} faults {:?}, {} violations, {} anomalies, history {:016x}: {}",
        report.seed,
        report.shards,
        report.clients,
        report.ticks,
        report.faults_total(),
        report.faults,
        report.violations.len(),
        report.checker.anomaly_total(),
        report.fingerprint,
        if report.passed() { "ok" } else { "FAILED" }
    );
    if whole || !report.passed() {
        for violation in &report.violations {
            println!("  violation: {violation}");
        }
        print!("{}", report.checker);
    }
}

fn layer_name(layer: Layer) -> &'static str {
    match layer {
        Layer::Raft => "raft",
        Layer::Node => "node",
    }
}

/// One seed in a fresh process (`--seed S`): what a person replaying it runs, so every seed of a
/// budget replays exactly (in one process, state of the libraries that outlives a run — tokio's
/// task ids, which order a crashed host's tasks are dropped in — would make a seed depend on the
/// seeds before it). Returns the child's exit code and its output; its stderr is passed on once
/// it ended, and a panic's first line (where it panicked) is added to the output.
fn run_child(args: &Args, seed: u64) -> Option<(i32, String)> {
    let exe = std::env::current_exe().ok()?;
    let mut command = std::process::Command::new(exe);
    command
        .args([
            "--layer",
            layer_name(args.layer),
            "--seed",
            &seed.to_string(),
        ])
        .args(["--seconds", &args.seconds.to_string()])
        .stderr(std::process::Stdio::piped());
    if let Some(bug) = &args.bug_name {
        command.args(["--bug", bug]);
    }
    let output = command.output().ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprint!("{stderr}");
    let mut stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    // The first panic's line and its message (the line after it).
    let lines: Vec<&str> = stderr.lines().collect();
    if let Some(at) = lines.iter().position(|line| line.contains("panicked at ")) {
        for line in lines.iter().skip(at).take(2) {
            stdout.push_str(line);
            stdout.push('\n');
        }
    }
    Some((output.status.code().unwrap_or(2), stdout))
}

/// Ticks in a report line ("…, N ticks, …").
fn ticks_of(line: &str) -> u64 {
    line.split(" ticks")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether a seed's process ended on a panic inside the storage fold's projections (an invariant
/// of the applied state, `storage/src/projection/`), or on openraft's own finding that an entry
/// it committed is gone from the log when it applies it (openraft 0.9.25, pinned:
/// `apply_to_state_machine` at `src/core/raft_core.rs:761`, "index out of bounds"): the mark of
/// appends lost after they were acknowledged, which is what the deliberate bug
/// `unsynced-log-appends` does (SIMULATION.md; sessions 10, 11 and 34 saw it).
fn stopped_on_an_invariant(output: &str) -> bool {
    let lines: Vec<&str> = output.lines().collect();
    let projection = lines
        .iter()
        .any(|line| line.contains("panicked at storage/src/projection/"));
    let entry_gone = lines.windows(2).any(|pair| {
        pair[0].contains("panicked at")
            && pair[0].contains("/openraft-0.9.25/src/core/raft_core.rs:761:")
            && pair[1].starts_with("index out of bounds")
    });
    projection || entry_gone
}

/// Runs seeds `first..first + count`, each in its own process; returns the exit code. With
/// `--expect-failure` it stops at the first failing seed and succeeds only if there is one.
fn run_budget(args: &Args, first: u64, count: u64) -> i32 {
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut ran = 0_u64;
    let mut ticks = 0_u64;
    for seed in first..first.saturating_add(count) {
        let Some((code, output)) = run_child(args, seed) else {
            eprintln!("courier-sim: seed {seed} could not be started");
            return 2;
        };
        ran += 1;
        let line = output.lines().next().unwrap_or_default();
        ticks += ticks_of(line);
        match code {
            0 => println!("{line}"),
            1 => {
                print!("{output}");
                failed.push(seed);
            }
            _ if args.expect_failure && stopped_on_an_invariant(&output) => {
                // With a deliberate bug on, a replica that stopped on a projection's invariant
                // (the fold asserts that receipts only move forward, that acks never pass the
                // tail, ...) or on openraft's check that a committed entry is still there was
                // stopped by the divergence the bug caused: that is the bug found, as in
                // production, where such a replica stops. Without `--expect-failure` the same
                // exit fails the run below.
                print!("{output}");
                println!(
                    "seed {seed}: a replica stopped on an invariant of its applied state or log: the bug is found"
                );
                failed.push(seed);
            }
            _ => {
                print!("{output}");
                eprintln!("courier-sim: seed {seed} could not run (exit {code})");
                return 2;
            }
        }
        if args.expect_failure && !failed.is_empty() {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "courier-sim: {ran} seeds in {elapsed:.1} s ({:.1} seeds/min, {:.0} ticks/s); failed seeds: {failed:?}",
        ran as f64 * 60.0 / elapsed.max(0.001),
        ticks as f64 / elapsed.max(0.001),
    );
    let ok = if args.expect_failure {
        !failed.is_empty()
    } else {
        failed.is_empty()
    };
    i32::from(!ok)
}

/// Runs each seed twice, each time in a fresh process (`--seed S`, as a person replaying it
/// would), and compares the report lines' history fingerprint and ticks. Returns the exit code
/// (0: every seed replayed exactly). In one process a second run of a seed is not guaranteed to
/// match: some process-wide state of the libraries outlives a run (docs/SIMULATION.md).
fn check_replay(args: &Args, first: u64, count: u64) -> i32 {
    let mut differ = Vec::new();
    for seed in first..first.saturating_add(count) {
        let once = || {
            let (_, output) = run_child(args, seed)?;
            let line = output.lines().next()?.to_owned();
            let history = line.split("history ").nth(1)?.get(..16)?.to_owned();
            Some((history, ticks_of(&line)))
        };
        let (Some(one), Some(two)) = (once(), once()) else {
            eprintln!("courier-sim: seed {seed} could not run");
            return 2;
        };
        let same = one == two;
        println!(
            "seed {seed:>6}: history {} / {}, ticks {} / {}: {}",
            one.0,
            two.0,
            one.1,
            two.1,
            if same { "replayed" } else { "DIFFERENT" }
        );
        if !same {
            differ.push(seed);
        }
    }
    println!("courier-sim: {count} seeds run twice; not replayed: {differ:?}");
    i32::from(!differ.is_empty())
}

#[cfg(test)]
mod tests {
    use super::stopped_on_an_invariant;

    #[test]
    fn a_replica_stopped_on_its_applied_state_or_a_lost_entry_counts_as_the_bug_found() {
        let projection = "thread 'main' panicked at storage/src/projection/receipts.rs:90:9:\nreceipts only move forward";
        assert!(stopped_on_an_invariant(projection));
        let entry_gone = "thread 'main' (31373) panicked at /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/openraft-0.9.25/src/core/raft_core.rs:761:35:\nindex out of bounds: the len is 0 but the index is 18446744073709551615";
        assert!(stopped_on_an_invariant(entry_gone));
        let other_openraft = "thread 'main' panicked at /x/openraft-0.9.25/src/core/raft_core.rs:100:5:\nassertion failed: self.is_leader()";
        assert!(
            !stopped_on_an_invariant(other_openraft),
            "another openraft panic is no finding"
        );
        let elsewhere = "thread 'main' panicked at sim/src/cluster.rs:10:5:\nindex out of bounds";
        assert!(!stopped_on_an_invariant(elsewhere));
    }
}
