//! One run, start to verdict:
//!
//! ```text
//!  network + nodes ─▶ InitCluster ─▶ leaders ─▶ register users ─▶ workload + streams + nemesis
//!      ─▶ (fault window ends) final heal ─▶ leaders ─▶ streams settle ─▶ replicas converge
//!      ─▶ drain every device on every node ─▶ Replica + Verify records ─▶ checker ─▶ report
//! ```
//!
//! Teardown (killing nodes, deleting namespaces and the bridge) is owned by `Teardown`, a
//! drop guard: it runs when the run returns, fails, panics, or is dropped because the overall
//! deadline passed or a signal arrived. The binary's panic hook additionally cleans up by tag,
//! for builds that abort on panic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminNode, Verification};
use crate::checker::{self, Report};
use crate::history::{Record, Replica, Verify, read_jsonl};
use crate::nemesis::{FaultFamily, Nemesis, NemesisStats};
use crate::net::{self, Network};
use crate::nodes::Nodes;
use crate::recorder::Recorder;
use crate::workload::{self, ClientNode, Shared};

/// The named fault mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// No faults: the baseline.
    None,
    /// SIGKILL + restart.
    Kill,
    /// SIGSTOP + SIGCONT.
    Pause,
    /// nftables partitions.
    Partition,
    /// Kills and partitions.
    KillPartition,
    /// Pauses, kills, and kills of paused nodes.
    PauseKill,
    /// Wall-clock steps (libfaketime).
    Clock,
    /// Voters added and removed (one spare node).
    Membership,
    /// Clock steps and membership changes.
    ClockMembership,
    /// Everything.
    Mixed,
    /// Replica moves, some interrupted by a kill (R < N: run it with 4+ nodes).
    Move,
    /// Replica moves, node drains, kills and partitions (R < N: run it with 4+ nodes).
    MoveKillPartition,
    /// Replica moves, kills, and the cluster growing and shrinking: the spare node joins, a
    /// member is drained and removed, then wiped as the next spare (R < N: 4+ nodes and a
    /// spare).
    MoveReplace,
}

impl Scenario {
    /// The fault families this scenario draws from.
    pub fn families(self) -> Vec<FaultFamily> {
        use FaultFamily::{
            Clock, Drain, Kill, Membership, Move, Partition, Pause, PauseThenKill, Replace,
        };
        match self {
            Self::None => vec![],
            Self::Kill => vec![Kill],
            Self::Pause => vec![Pause],
            Self::Partition => vec![Partition],
            Self::KillPartition => vec![Kill, Partition],
            Self::PauseKill => vec![Pause, Kill, PauseThenKill],
            Self::Clock => vec![Clock],
            Self::Membership => vec![Membership],
            Self::ClockMembership => vec![Clock, Membership],
            Self::Mixed => vec![Kill, Pause, PauseThenKill, Partition, Clock, Membership],
            Self::Move => vec![Move],
            // Moves and drains are half the faults.
            Self::MoveKillPartition => vec![Move, Drain, Kill, Partition],
            Self::MoveReplace => vec![Move, Replace, Kill],
        }
    }

    /// The fewest voters the scenario runs with: moves need a node without a replica of a shard,
    /// so more nodes than the default 3 replicas per shard.
    pub fn nodes_min(self) -> u32 {
        let families = self.families();
        if [FaultFamily::Move, FaultFamily::Drain, FaultFamily::Replace]
            .iter()
            .any(|family| families.contains(family))
        {
            4
        } else {
            1
        }
    }

    /// Nodes started besides the voters: one spare for membership changes and replacements.
    pub fn spares(self) -> u32 {
        let families = self.families();
        u32::from(
            families.contains(&FaultFamily::Membership) || families.contains(&FaultFamily::Replace),
        )
    }

    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Kill => "kill",
            Self::Pause => "pause",
            Self::Partition => "partition",
            Self::KillPartition => "kill-partition",
            Self::PauseKill => "pause-kill",
            Self::Clock => "clock",
            Self::Membership => "membership",
            Self::ClockMembership => "clock-membership",
            Self::Mixed => "mixed",
            Self::Move => "move",
            Self::MoveKillPartition => "move-kill-partition",
            Self::MoveReplace => "move-replace",
        }
    }
}

/// Everything a run needs to know.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The fault mix.
    pub scenario: Scenario,
    /// Length of the workload (and fault window).
    pub seconds: u64,
    /// Voters at the start (the scenario may add a spare node).
    pub nodes: u32,
    /// Shard count.
    pub shards: u32,
    /// Users (two devices each).
    pub users: u32,
    /// Send workers.
    pub workers: u32,
    /// Target sends per second over all workers.
    pub rate: f64,
    /// The node binary.
    pub node_binary: PathBuf,
    /// `COURIER_BUG` for the nodes, if any.
    pub bug: Option<String>,
    /// Seed of every random choice of the harness.
    pub seed: u64,
    /// The run directory.
    pub out: PathBuf,
}

impl RunConfig {
    /// The overall deadline: the workload plus a generous budget for setup, heal, drain and
    /// verification, after which the run fails cleanly.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.seconds.saturating_add(360))
    }
}

/// The verdict of a run, as written to `report.json`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// The scenario.
    pub scenario: Scenario,
    /// The seed.
    pub seed: u64,
    /// Workload seconds asked for.
    pub seconds: u64,
    /// Nodes.
    pub nodes: u32,
    /// Shards.
    pub shards: u32,
    /// True if the run passed: a valid history, faults injected when asked for, and no
    /// harness problem.
    pub passed: bool,
    /// Wall-clock length of the whole run.
    pub duration_s: f64,
    /// Faults injected (all kinds).
    pub faults_injected: usize,
    /// What the nemesis did.
    pub nemesis: NemesisStats,
    /// Problems that fail the run besides anomalies (no leader after heal, failed drains, ...).
    pub harness_errors: Vec<String>,
    /// The checker's report.
    pub checker: Report,
}

/// Kills the nodes and removes the network when dropped.
struct Teardown {
    nodes: Arc<Mutex<Nodes>>,
    network: Arc<Network>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kill_all();
        self.network.destroy();
    }
}

/// Sets up the cluster of a run: network, nodes (voters and spares) started, the voters
/// bootstrapped, leaders elected. Returns admin clients of every node, voters first.
async fn set_up(config: &RunConfig) -> anyhow::Result<(Teardown, Vec<AdminNode>)> {
    net::preflight()?;
    let ids: Vec<u32> = (1..=config.nodes + config.scenario.spares()).collect();
    let network = Arc::new(Network::create(std::process::id(), &ids)?);
    tracing::info!(
        bridge = %network.bridge(),
        harness_ip = %network.bridge_ip(),
        "network created"
    );
    let nodes = Nodes::prepare(
        &config.node_binary,
        config.bug.clone(),
        config.scenario.families().contains(&FaultFamily::Clock),
        &network,
        &config.out,
        config.nodes + config.scenario.spares(),
    )?;
    let nodes = Arc::new(Mutex::new(nodes));
    let teardown = Teardown {
        nodes: nodes.clone(),
        network,
    };
    let specs = {
        let mut guard = nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for id in &ids {
            guard.start(*id)?;
        }
        guard.specs()
    };
    let started = Instant::now();
    loop {
        let listening = nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .all_listening()?;
        if listening {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the nodes did not start listening within 60 s (see nodes/n*/node.log)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let voters = specs
        .get(..config.nodes as usize)
        .context("fewer nodes than voters")?;
    admin::init_cluster(voters, config.shards, Duration::from_secs(60)).await?;
    let admin: Vec<AdminNode> = specs
        .iter()
        .map(AdminNode::new)
        .collect::<anyhow::Result<_>>()?;
    let voter_admin = admin.get(..voters.len()).unwrap_or(&admin);
    let leaders = admin::wait_leaders(voter_admin, config.shards, Duration::from_secs(60)).await?;
    tracing::info!(?leaders, "cluster up");
    Ok((teardown, admin))
}

/// Runs one scenario and writes its report. Returns the report; the caller decides the exit
/// code from [`RunReport::passed`].
///
/// # Errors
///
/// Harness failures before a history exists (no root, no namespaces, nodes not starting, no
/// leader, registration failing). Everything after that ends in a report.
pub async fn run(config: RunConfig) -> anyhow::Result<RunReport> {
    let wall = Instant::now();
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let (teardown, admin) = set_up(&config).await?;
    let specs = teardown
        .nodes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .specs();
    let recorder = Arc::new(Recorder::create(
        &config.out.join("history.jsonl"),
        crate::nodes::KEEP_DELIVERED,
        workload::LINKS_A_SECOND_DEVICE,
    )?);
    // Users register on the voters; a spare node answers NotInitialized until it joins.
    let voters = specs.get(..config.nodes as usize).unwrap_or(&specs);
    let users =
        workload::register_and_save(voters, config.users, &config.out.join("users.json")).await?;
    tracing::info!(users = users.len(), "users registered");
    let shared = Arc::new(Shared {
        recorder: recorder.clone(),
        users,
        nodes: ClientNode::all(&specs)?,
        highest_seq: Mutex::new(Default::default()),
        acked_seq: Mutex::new(Default::default()),
    });
    let nemesis = Arc::new(Nemesis {
        nodes: teardown.nodes.clone(),
        network: teardown.network.clone(),
        admin: admin.clone(),
        recorder: recorder.clone(),
        families: config.scenario.families(),
        members: Arc::new(Mutex::new((1..=config.nodes).collect())),
        stats: Mutex::new(NemesisStats::default()),
    });
    let mut harness_errors = Vec::new();
    run_workload(&config, &shared, &nemesis, &mut harness_errors).await;
    final_phase(&config, &shared, &nemesis, &mut harness_errors).await;
    let nemesis_stats = nemesis
        .stats
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    drop(nemesis);
    drop(teardown);
    if recorder.write_errors() > 0 {
        harness_errors.push(format!(
            "{} history records could not be written",
            recorder.write_errors()
        ));
    }
    let history = read_jsonl(config.out.join("history.jsonl"))?;
    let report = checker::check(&history);
    finish(
        &config,
        report,
        nemesis_stats,
        harness_errors,
        wall.elapsed(),
    )
}

/// The workload phase: streams, send workers and the nemesis for `seconds`, then the final heal.
async fn run_workload(
    config: &RunConfig,
    shared: &Arc<Shared>,
    nemesis: &Arc<Nemesis>,
    harness_errors: &mut Vec<String>,
) {
    let streams = TaskTracker::new();
    let stop_streams = CancellationToken::new();
    for (i, device) in shared
        .users
        .iter()
        .flat_map(|u| u.devices.iter())
        .enumerate()
    {
        let seed = config.seed.wrapping_add(1_000).wrapping_add(i as u64);
        streams.spawn(workload::stream_worker(
            shared.clone(),
            device.clone(),
            seed,
            stop_streams.clone(),
        ));
    }
    streams.close();
    let workers = TaskTracker::new();
    let stop_workers = CancellationToken::new();
    let pause_mean = Duration::from_secs_f64(f64::from(config.workers) / config.rate.max(0.1));
    for process in 0..config.workers {
        let seed = config.seed.wrapping_add(u64::from(process));
        workers.spawn(workload::send_worker(
            shared.clone(),
            process,
            seed,
            pause_mean,
            stop_workers.clone(),
        ));
    }
    workers.close();
    let window = Duration::from_secs(config.seconds);
    let window_end = Instant::now() + window;
    let quiet = Duration::from_secs((config.seconds / 6).clamp(3, 10));
    tracing::info!(
        scenario = config.scenario.name(),
        ?window,
        ?quiet,
        "workload and nemesis running"
    );
    let runner = nemesis.clone();
    let seed = config.seed.wrapping_add(7_777);
    let nemesis_task = tokio::spawn(async move {
        runner
            .run(seed, quiet, window_end, CancellationToken::new())
            .await;
    });
    // The nemesis ends at the end of the window, after its final heal.
    if nemesis_task.await.is_err() {
        harness_errors.push("the nemesis task panicked".to_owned());
        nemesis.final_heal();
    }
    stop_workers.cancel();
    if tokio::time::timeout(Duration::from_secs(15), workers.wait())
        .await
        .is_err()
    {
        harness_errors.push("send workers did not stop within 15 s".to_owned());
    }
    tracing::info!("workload stopped; waiting for leaders after the final heal");
    let admin = nemesis.member_admin();
    if let Err(error) = admin::wait_leaders(&admin, config.shards, Duration::from_secs(60)).await {
        harness_errors.push(format!("liveness after heal: {error:#}"));
    }
    // Streams keep receiving for a moment, so deliveries and receipts of the last sends arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_streams.cancel();
    if tokio::time::timeout(Duration::from_secs(15), streams.wait())
        .await
        .is_err()
    {
        harness_errors.push("device streams did not stop within 15 s".to_owned());
    }
    nemesis.watch_crashes();
}

/// After the heal: converge, drain, record replica status and verifications, all on the voters
/// of the moment (a spare holds no replica).
async fn final_phase(
    config: &RunConfig,
    shared: &Arc<Shared>,
    nemesis: &Nemesis,
    harness_errors: &mut Vec<String>,
) {
    let admin = &nemesis.member_admin();
    let (_, converged) = admin::wait_converged(admin, Duration::from_secs(30)).await;
    if !converged {
        tracing::warn!("replicas had not converged before the drain");
    }
    tracing::info!("draining every device on every node");
    let members = nemesis.member_ids().into_iter().collect();
    let failed = workload::drain_all(shared.clone(), &members).await;
    if failed > 0 {
        harness_errors.push(format!("{failed} drain sessions failed after retries"));
    }
    tracing::info!("filling every shard's last archive segment");
    let entries = crate::nodes::ARCHIVE_SEGMENT_ENTRIES.saturating_add(8);
    let failed = workload::fill_archive_segments(shared, &members, config.shards, entries).await;
    if failed > 0 {
        tracing::warn!(
            failed,
            "fill sends failed; a replica may not verify from index 1"
        );
    }
    tracing::info!("collecting replica status");
    let (statuses, converged) = admin::wait_converged(admin, Duration::from_secs(30)).await;
    if !converged {
        tracing::warn!(status = %admin::summarize(&statuses), "replicas did not converge within 30 s");
    }
    if statuses.len() < admin.len() {
        harness_errors.push(format!(
            "only {} of {} nodes answered Status after the heal",
            statuses.len(),
            admin.len()
        ));
    }
    let recorder = &shared.recorder;
    let mut replicas: BTreeMap<(u32, u32), Replica> = BTreeMap::new();
    for (node, status) in &statuses {
        for shard in admin::held(status) {
            let replica = Replica {
                node: *node,
                shard: shard.shard,
                applied_index: shard.applied,
                digests: [("projections".to_owned(), shard.digest.clone())].into(),
            };
            recorder.record(&Record::Replica(replica.clone()));
            replicas.insert((*node, shard.shard), replica);
        }
    }
    tracing::info!("verifying projection == rebuild on every replica");
    let mut verified: BTreeMap<(u32, u32), Verification> = BTreeMap::new();
    for node in admin {
        // Only the replicas a node holds: a node a replica moved away from has nothing to verify.
        let Some(status) = statuses.get(&node.id) else {
            continue;
        };
        let shards: Vec<u32> = admin::held(status).map(|shard| shard.shard).collect();
        for shard in shards {
            let verification = node.verify(shard).await;
            recorder.record(&Record::Verify(Verify {
                node: node.id,
                shard,
                ok: verification.ok,
                detail: verification.detail.clone(),
            }));
            verified.insert((node.id, shard), verification);
        }
    }
    refine_replicas(recorder, &replicas, &verified);
}

/// Re-records each shard's replica reports with the verification's per-projection digests,
/// so that a divergence names the projection (the checker keeps the last report per replica).
/// Only shards whose every replica was verified at the applied index its status reported are
/// refined: a replica with fewer digest names than its peers would read as a divergence.
fn refine_replicas(
    recorder: &Recorder,
    replicas: &BTreeMap<(u32, u32), Replica>,
    verified: &BTreeMap<(u32, u32), Verification>,
) {
    let shards: BTreeSet<u32> = replicas.keys().map(|(_, shard)| *shard).collect();
    for shard in shards {
        let of_shard: Vec<(&Replica, &Verification)> = replicas
            .iter()
            .filter(|((_, s), _)| *s == shard)
            .filter_map(|(key, replica)| Some((replica, verified.get(key)?)))
            .collect();
        let all_at_status_index = of_shard.len()
            == replicas.keys().filter(|(_, s)| *s == shard).count()
            && of_shard
                .iter()
                .all(|(r, v)| v.applied_index == Some(r.applied_index));
        if !all_at_status_index {
            continue;
        }
        for (replica, verification) in of_shard {
            let mut refined = replica.clone();
            refined.digests.extend(verification.digests.clone());
            recorder.record(&Record::Replica(refined));
        }
    }
}

/// Writes `report.txt` and `report.json`, deletes node data directories of a passing run, and
/// prints the verdict.
fn finish(
    config: &RunConfig,
    checker: Report,
    nemesis: NemesisStats,
    mut harness_errors: Vec<String>,
    elapsed: Duration,
) -> anyhow::Result<RunReport> {
    let faults_injected = nemesis.injected_total();
    if !config.scenario.families().is_empty() && faults_injected == 0 {
        harness_errors.push(format!(
            "scenario {} asks for faults but none was injected",
            config.scenario.name()
        ));
    }
    harness_errors.extend(nemesis.errors.iter().map(|e| format!("nemesis: {e}")));
    harness_errors.extend(nemesis.crashes.iter().map(|c| format!("crash: {c}")));
    let passed = checker.is_valid() && harness_errors.is_empty();
    let report = RunReport {
        scenario: config.scenario,
        seed: config.seed,
        seconds: config.seconds,
        nodes: config.nodes,
        shards: config.shards,
        passed,
        duration_s: elapsed.as_secs_f64(),
        faults_injected,
        nemesis,
        harness_errors,
        checker,
    };
    let text = render(&report);
    std::fs::write(config.out.join("report.txt"), &text)?;
    std::fs::write(
        config.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if passed {
        remove_data_dirs(&config.out);
    }
    print!("{text}");
    Ok(report)
}

/// The human-readable report.
pub fn render(report: &RunReport) -> String {
    let mut text = format!(
        "courier-jepsen: scenario {} seed {} ({} s of workload, {} nodes, {} shards) took {:.0} s\n",
        report.scenario.name(),
        report.seed,
        report.seconds,
        report.nodes,
        report.shards,
        report.duration_s
    );
    text.push_str(&format!(
        "faults injected: {} {:?}; heals {:?}\n",
        report.faults_injected, report.nemesis.injected, report.nemesis.healed
    ));
    for error in &report.harness_errors {
        text.push_str(&format!("HARNESS: {error}\n"));
    }
    text.push_str(&report.checker.to_string());
    text.push_str(if report.passed {
        "RUN PASSED\n"
    } else {
        "RUN FAILED\n"
    });
    text
}

/// Removes `nodes/n*/data` (logs and configs stay).
fn remove_data_dirs(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out.join("nodes")) else {
        return;
    };
    for entry in entries.flatten() {
        let data = entry.path().join("data");
        if let Err(error) = std::fs::remove_dir_all(&data) {
            tracing::warn!(%error, dir = %data.display(), "cannot remove data dir");
        }
    }
}
