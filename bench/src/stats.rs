//! Measurement plumbing shared by every workload: the run window (warm-up, then the measured
//! seconds), HDR latency histograms, and the JSON result each run writes for `report`.
//!
//! ```text
//!  setup ─▶ | warm-up (not counted) | measured window (counted) | drain (arrivals only) |
//!           start               measure_from                  until
//! ```
//!
//! An operation counts when it *completes* inside the measured window; its latency is recorded
//! then. End-to-end arrivals count when their send *started* inside the window, so the drain
//! after `until` still records the tail of messages sent just before the end.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::procstat::{MachineUsage, ProcessUsage, Sampler};

/// Largest latency a histogram records, microseconds (longer samples are clamped to it).
pub(crate) const LATENCY_US_MAX: u64 = 120_000_000;
/// Significant figures kept by every histogram.
const SIGNIFICANT_FIGURES: u8 = 3;

/// The phases of one run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// When the clock for every body timestamp started (process-wide base of offsets).
    pub(crate) base: Instant,
    /// End of the warm-up: completions from here on are counted.
    pub(crate) measure_from: Instant,
    /// End of the measured window: workers stop starting new operations.
    pub(crate) until: Instant,
}

impl Window {
    /// Starts a window now: `warmup` uncounted, then `seconds` counted.
    pub(crate) fn start(base: Instant, warmup: Duration, seconds: Duration) -> Self {
        let now = Instant::now();
        Self {
            base,
            measure_from: now + warmup,
            until: now + warmup + seconds,
        }
    }

    /// True while workers should keep issuing operations.
    pub(crate) fn running(&self) -> bool {
        Instant::now() < self.until
    }

    /// True when `t` is inside the measured window.
    pub(crate) fn counts(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.until
    }

    /// Length of the measured window.
    pub(crate) fn measured(&self) -> Duration {
        self.until - self.measure_from
    }

    /// Offset of `t` from the base, nanoseconds (what message bodies carry).
    pub(crate) fn offset_ns(&self, t: Instant) -> u64 {
        u64::try_from((t - self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant a body's offset names.
    pub(crate) fn at_offset(&self, offset_ns: u64) -> Instant {
        self.base + Duration::from_nanos(offset_ns)
    }
}

/// A latency histogram in microseconds.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_FIGURES)
        .expect("1..LATENCY_US_MAX with 3 significant figures is a valid histogram")
}

/// Records `latency` into `h`, clamped to the histogram's range.
pub(crate) fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, LATENCY_US_MAX);
    h.saturating_record(us);
}

/// What one closed-loop worker saw during the measured window.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Acknowledged operations completed inside the window.
    pub(crate) ok: u64,
    /// Failed operations (any phase).
    pub(crate) errors: u64,
    /// The first error's text, for the run's result.
    pub(crate) first_error: Option<String>,
    /// Acknowledgement latency of the counted operations.
    pub(crate) latency: Histogram<u64>,
}

impl Tally {
    /// An empty tally.
    pub(crate) fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            first_error: None,
            latency: histogram(),
        }
    }

    /// Records an operation started at `started` that just completed with `outcome`.
    pub(crate) fn finish<E: std::fmt::Display>(
        &mut self,
        window: &Window,
        started: Instant,
        outcome: Result<(), E>,
    ) {
        let now = Instant::now();
        match outcome {
            Ok(()) if window.counts(now) => {
                self.ok += 1;
                record(&mut self.latency, now - started);
            }
            Ok(()) => {}
            Err(error) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(error.to_string());
                }
            }
        }
    }

    /// Adds another worker's tally to this one.
    pub(crate) fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds merge");
    }
}

/// Percentiles of one latency histogram, milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Latency {
    /// Samples recorded.
    pub(crate) count: u64,
    /// Median.
    pub(crate) p50_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// 99.9th percentile.
    pub(crate) p999_ms: f64,
    /// Largest sample.
    pub(crate) max_ms: f64,
    /// Mean.
    pub(crate) mean_ms: f64,
}

impl Latency {
    /// Summarizes a histogram of microseconds.
    #[allow(
        clippy::cast_precision_loss,
        reason = "latencies are far below 2^52 µs"
    )]
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// Courier's raft log appends over the measured window, summed over every shard of a node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct LogAppends {
    /// The node's id.
    pub(crate) node_id: u64,
    /// Log appends during the window (each waits for a synced write its node's log writer may
    /// share with other appends: `counters.synced_writes` counts the fsyncs).
    pub(crate) fsyncs: u64,
    /// Entries written by those appends.
    pub(crate) entries: u64,
    /// The node's cost counters over the window (Admin.Status `counters`).
    #[serde(default)]
    pub(crate) counters: NodeCost,
}

/// One node's cost counters (Admin.Status `NodeCounters`), as a difference over the window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct NodeCost {
    pub(crate) synced_writes: u64,
    pub(crate) write_batches: u64,
    pub(crate) raft_entries: u64,
    pub(crate) log_appends: u64,
    pub(crate) apply_reads: u64,
    pub(crate) apply_writes: u64,
    pub(crate) peer_calls: u64,
    pub(crate) pusher_passes: u64,
    pub(crate) forwarder_passes: u64,
    pub(crate) wakeups: u64,
}

impl NodeCost {
    /// The counters as read from a node.
    pub(crate) fn from_wire(c: &courier_proto::pb::peer::NodeCounters) -> Self {
        Self {
            synced_writes: c.synced_writes,
            write_batches: c.write_batches,
            raft_entries: c.raft_entries,
            log_appends: c.log_appends,
            apply_reads: c.apply_reads,
            apply_writes: c.apply_writes,
            peer_calls: c.peer_calls,
            pusher_passes: c.pusher_passes,
            forwarder_passes: c.forwarder_passes,
            wakeups: c.wakeups,
        }
    }

    /// `self − before`, counter by counter.
    pub(crate) fn since(&self, before: &Self) -> Self {
        Self {
            synced_writes: self.synced_writes.saturating_sub(before.synced_writes),
            write_batches: self.write_batches.saturating_sub(before.write_batches),
            raft_entries: self.raft_entries.saturating_sub(before.raft_entries),
            log_appends: self.log_appends.saturating_sub(before.log_appends),
            apply_reads: self.apply_reads.saturating_sub(before.apply_reads),
            apply_writes: self.apply_writes.saturating_sub(before.apply_writes),
            peer_calls: self.peer_calls.saturating_sub(before.peer_calls),
            pusher_passes: self.pusher_passes.saturating_sub(before.pusher_passes),
            forwarder_passes: self
                .forwarder_passes
                .saturating_sub(before.forwarder_passes),
            wakeups: self.wakeups.saturating_sub(before.wakeups),
        }
    }
}

/// The result of one throughput run (`courier`, `etcd` or `nats`), as written to `--out`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct RunResult {
    /// `"throughput"`.
    pub(crate) kind: String,
    /// `courier`, `courier-same-shard`, `etcd`, `nats-sync` or `nats-default`.
    pub(crate) system: String,
    /// Concurrent closed-loop senders.
    pub(crate) concurrency: u32,
    /// Message (value, payload) size, bytes.
    pub(crate) size_bytes: u32,
    /// Warm-up, seconds.
    pub(crate) warmup_s: f64,
    /// Measured window, seconds.
    pub(crate) seconds: f64,
    /// Acknowledged operations inside the measured window.
    pub(crate) acked: u64,
    /// Failed operations.
    pub(crate) errors: u64,
    /// The first failure, if any.
    pub(crate) first_error: Option<String>,
    /// Acknowledged operations per second.
    pub(crate) throughput: f64,
    /// Send → acknowledgement latency.
    pub(crate) ack: Latency,
    /// Send → arrival on the recipient's stream (courier only).
    pub(crate) e2e: Option<Latency>,
    /// Acknowledged messages that never arrived within the drain (courier only).
    pub(crate) e2e_missing: u64,
    /// Arrivals out of inbox order (courier only; must be 0).
    pub(crate) e2e_out_of_order: u64,
    /// The servers' CPU and memory.
    pub(crate) processes: Vec<ProcessUsage>,
    /// The machine's CPU.
    pub(crate) machine: MachineUsage,
    /// Courier's log appends per node (from Admin.Status), when admin addresses were given.
    pub(crate) log_appends: Vec<LogAppends>,
    /// The command line that produced this result.
    pub(crate) command: String,
}

/// One step of a connection-scale run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ScaleStep {
    /// Idle device streams open on the node.
    pub(crate) streams: u64,
    /// Streams found closed by the server when checked after the step.
    pub(crate) streams_closed: u64,
    /// Seconds to open this step's new streams.
    pub(crate) open_s: f64,
    /// The node's resident set size with the streams open, MiB.
    pub(crate) rss_mib: f64,
    /// (RSS now − RSS before any stream) / streams, KiB.
    pub(crate) rss_per_stream_kib: f64,
    /// The node's CPU while the streams sit idle, percent of one core.
    pub(crate) idle_cpu_pct: f64,
    /// Live delivery latency (send → arrival on a probe device's stream) at this step.
    pub(crate) delivery: Latency,
    /// Probe messages that did not arrive within the timeout.
    pub(crate) delivery_missing: u64,
}

/// The result of a `scale` run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ScaleResult {
    /// `"scale"`.
    pub(crate) kind: String,
    /// Users whose devices hold the idle streams.
    pub(crate) users: u32,
    /// Streams multiplexed per HTTP/2 connection.
    pub(crate) streams_per_connection: u32,
    /// The node's RSS before any idle stream, MiB.
    pub(crate) rss_before_mib: f64,
    /// The node's CPU while idle before any idle stream was opened (raft heartbeats, timers,
    /// the probes' streams), % of a core: what the streams' idle cost is measured against.
    /// Absent in results written before it was measured.
    #[serde(default)]
    pub(crate) idle_cpu_before_pct: Option<f64>,
    /// The node's RSS with no idle streams after the bench closed them, MiB.
    pub(crate) rss_after_close_mib: f64,
    /// One entry per step.
    pub(crate) steps: Vec<ScaleStep>,
    /// The command line that produced this result.
    pub(crate) command: String,
}

/// The command line of this process, for results.
pub(crate) fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|p| {
            std::path::Path::new(&p)
                .file_name()
                .map_or(p.clone(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    std::iter::once(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `value` as pretty JSON to `path` (parent folders created).
///
/// # Errors
/// File system errors, with the path.
pub(crate) fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Fails when a run had no successful operation or failed more than `max_error_ratio` of them.
///
/// # Errors
/// The reason, with the first error seen.
#[allow(clippy::cast_precision_loss, reason = "ratios of counts")]
pub(crate) fn check_errors(result: &RunResult, max_error_ratio: f64) -> anyhow::Result<()> {
    let total = result.acked + result.errors;
    if result.acked == 0 {
        anyhow::bail!(
            "{} c={}: no acknowledged operation in the window (first error: {:?})",
            result.system,
            result.concurrency,
            result.first_error
        );
    }
    if result.errors as f64 > max_error_ratio * total as f64 {
        anyhow::bail!(
            "{} c={}: {} errors of {} operations (first: {:?})",
            result.system,
            result.concurrency,
            result.errors,
            total,
            result.first_error
        );
    }
    if result.e2e_missing > 0 || result.e2e_out_of_order > 0 {
        anyhow::bail!(
            "{} c={}: {} acknowledged messages never arrived, {} out of order",
            result.system,
            result.concurrency,
            result.e2e_missing,
            result.e2e_out_of_order
        );
    }
    Ok(())
}

/// The measured phase of a peer's run: waits for the window, samples the servers' CPU and RSS
/// through it, then merges the workers' tallies. Returns the tallies and the usage.
pub(crate) async fn measure_workers(
    window: &Window,
    pids: &[u32],
    mut workers: tokio::task::JoinSet<Tally>,
    what: &str,
) -> anyhow::Result<(Tally, (Vec<ProcessUsage>, MachineUsage))> {
    tokio::time::sleep_until(window.measure_from.into()).await;
    let mut sampler = Sampler::start(pids);
    sampler.poll_until(window.until).await;
    let usage = sampler.finish();
    let mut tally = Tally::new();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.with_context(|| format!("{what} panicked"))?);
    }
    Ok((tally, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles come out in milliseconds from microsecond samples.
    #[test]
    fn latency_percentiles() {
        let mut h = histogram();
        for us in 1..=1000 {
            record(&mut h, Duration::from_micros(us * 10));
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 5.0).abs() < 0.05, "p50 {}", l.p50_ms);
        assert!((l.p99_ms - 9.9).abs() < 0.05, "p99 {}", l.p99_ms);
        assert!((l.max_ms - 10.0).abs() < 0.05, "max {}", l.max_ms);
    }

    /// Completions before the measured window are not counted; errors always are.
    #[test]
    fn tally_counts_only_the_window() {
        let base = Instant::now();
        let window = Window::start(base, Duration::from_secs(3600), Duration::from_secs(1));
        let mut tally = Tally::new();
        tally.finish::<String>(&window, Instant::now(), Ok(()));
        tally.finish(&window, Instant::now(), Err("boom"));
        assert_eq!(tally.ok, 0);
        assert_eq!(tally.errors, 1);
        assert_eq!(tally.first_error.as_deref(), Some("boom"));
    }
}
