//! `courier-jepsen`: run a scenario against real `courier-node` processes, re-check a saved
//! history, or clean up what aborted runs left behind. See the library's docs for the layout.

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use courier_jepsen::checker::AnomalyKind;
use courier_jepsen::scenario::{self, RunConfig, Scenario};
use courier_jepsen::{checker, history, net};

/// Jepsen-style tests of courier: faults, a history, a checker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a scenario: nodes in network namespaces, workload, nemesis, drain, checker.
    /// Needs root. Exit 0: passed; 1: anomalies or harness errors (the run directory is kept);
    /// 2: the run could not be carried out.
    Run(RunArgs),
    /// Re-runs the checker on a saved history (exit 0: valid, 1: anomalies).
    Check {
        /// The `history.jsonl` of a run.
        history: PathBuf,
    },
    /// Removes namespaces, links, bridges and node processes left by runs whose harness is gone.
    Cleanup {
        /// Also removes those of runs that still seem alive.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The fault mix.
    #[arg(long, value_enum, default_value_t = Scenario::KillPartition)]
    scenario: Scenario,
    /// Seconds of workload (the fault window).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Node processes (at least 4 for a move scenario: 3 replicas per shard and a node without).
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Shards of the cluster.
    #[arg(long, default_value_t = 3)]
    shards: u32,
    /// Users, two devices each.
    #[arg(long, default_value_t = 8)]
    users: u32,
    /// Send workers (Jepsen processes).
    #[arg(long, default_value_t = 6)]
    workers: u32,
    /// Target sends per second over all workers.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// The courier-node binary (default: next to this binary, else
    /// $CARGO_TARGET_DIR/debug/courier-node).
    #[arg(long, env = "COURIER_NODE_BINARY")]
    node_binary: Option<PathBuf>,
    /// A deliberate bug for the nodes (`COURIER_BUG`; needs the courier-node-bugs binary).
    #[arg(long)]
    bug: Option<String>,
    /// Seed of the harness's random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// The run directory (default: <target>/jepsen/<scenario>-<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Mutation self-test: the run passes (exit 0) only if the checker reports at least one
    /// anomaly of this kind (e.g. `lost`, `duplicate`, `receipts`) and the harness itself had
    /// no problem. Used with `--bug`.
    #[arg(long, value_parser = anomaly_kind)]
    expect_anomaly: Option<AnomalyKind>,
}

fn anomaly_kind(name: &str) -> Result<AnomalyKind, String> {
    AnomalyKind::ALL
        .into_iter()
        .find(|kind| kind.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = AnomalyKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown anomaly kind {name:?}; one of {}", names.join(", "))
        })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match args.command {
        Command::Check { history } => check(&history),
        Command::Cleanup { all } => cleanup(all),
        Command::Run(run) => match run_command(run) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("courier-jepsen: {error:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn check(path: &Path) -> ExitCode {
    match history::read_jsonl(path) {
        Ok(history) => {
            let report = checker::check(&history);
            print!("{report}");
            if report.is_valid() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("courier-jepsen: {error}");
            ExitCode::from(2)
        }
    }
}

fn cleanup(all: bool) -> ExitCode {
    let me = std::process::id();
    let select = |tag: u32| tag != me && (all || !net::harness_alive(tag));
    match net::cleanup(&select) {
        Ok(removed) => {
            for item in &removed {
                println!("removed {item}");
            }
            println!("{} leftovers removed", removed.len());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("courier-jepsen cleanup: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The node binary: the flag, else `courier-node` next to this binary, else
/// `$CARGO_TARGET_DIR/debug/courier-node`.
fn node_binary(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag {
        if !path.is_file() {
            bail!("--node-binary {} does not exist", path.display());
        }
        return Ok(path);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("courier-node"));
        // Test binaries live one level deeper, in target/debug/deps.
        if let Some(up) = dir.parent() {
            candidates.push(up.join("courier-node"));
        }
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("debug").join("courier-node"));
    }
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no courier-node binary (looked at {candidates:?}); build it with \
                 `cargo build -p courier-node --bin courier-node` or pass --node-binary"
            )
        })
}

/// `<target>/jepsen/<scenario>-<seed>` when this binary lives in a cargo target directory,
/// else under the system temp directory.
fn default_out(scenario: Scenario, seed: u64) -> PathBuf {
    let name = format!("{}-{seed}", scenario.name());
    let target = std::env::current_exe().ok().and_then(|exe| {
        let profile_dir = exe.parent()?;
        let is_profile = matches!(profile_dir.file_name()?.to_str()?, "debug" | "release");
        is_profile.then(|| profile_dir.parent().map(Path::to_path_buf))?
    });
    target
        .unwrap_or_else(|| std::env::temp_dir().join("courier-jepsen"))
        .join("jepsen")
        .join(name)
}

fn run_command(args: RunArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let out = args.out.unwrap_or_else(|| default_out(args.scenario, seed));
    if out.join("history.jsonl").exists() {
        bail!("{} already holds a run; pick another --out", out.display());
    }
    let config = RunConfig {
        scenario: args.scenario,
        seconds: args.seconds,
        // A move scenario needs a node without a replica of the shard it moves.
        nodes: args.nodes.max(args.scenario.nodes_min()),
        shards: args.shards,
        users: args.users.max(2),
        workers: args.workers.max(1),
        rate: args.rate,
        node_binary: node_binary(args.node_binary)?,
        bug: args.bug,
        seed,
        out,
    };
    install_panic_cleanup();
    println!(
        "courier-jepsen: scenario {} seed {} for {} s on {} nodes; run directory {}",
        config.scenario.name(),
        config.seed,
        config.seconds,
        config.nodes,
        config.out.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = config.out.clone();
    let expect = args.expect_anomaly;
    let result = runtime
        .block_on(run_with_deadline(config))
        .map(|report| match expect {
            None => report.passed,
            Some(kind) => {
                let found = report.checker.count(kind);
                println!("expected anomaly {}: {found} found", kind.name());
                found > 0 && report.harness_errors.is_empty()
            }
        });
    // Spawned tasks still holding clients are dropped with the runtime; teardown already ran.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => {
            eprintln!("courier-jepsen: RUN FAILED; kept {}", out.display());
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            eprintln!("courier-jepsen: {error:#}");
            eprintln!("courier-jepsen: run not completed; kept {}", out.display());
            Ok(ExitCode::from(2))
        }
    }
}

/// Runs the scenario under its overall deadline and Ctrl-C/SIGTERM. Dropping the run future
/// (deadline or signal) runs its teardown guard.
async fn run_with_deadline(config: RunConfig) -> anyhow::Result<scenario::RunReport> {
    use tokio::signal::unix::{SignalKind, signal};
    let deadline = config.deadline();
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::select! {
        result = tokio::time::timeout(deadline, scenario::run(config)) => match result {
            Ok(report) => report,
            Err(_) => bail!("overall deadline of {deadline:?} passed; the run was stopped"),
        },
        _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT); cleaned up"),
        _ = term.recv() => bail!("terminated (SIGTERM); cleaned up"),
    }
}

/// On panic, removes this run's namespaces and nodes before the default hook runs: release
/// builds abort on panic, so drop guards would not.
fn install_panic_cleanup() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let me = std::process::id();
        let _ = net::cleanup(&|tag| tag == me);
        default(info);
    }));
}
