//! CPU and memory of server processes and of the machine, read from `/proc` (Linux only).
//!
//! A [`Sampler`] snapshots CPU counters at the start of the measured window and at its end, and
//! polls resident set sizes in between (every [`RSS_POLL`]) to keep the maximum.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// CPU and memory of one server process over the measured window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ProcessUsage {
    /// The process id.
    pub(crate) pid: u32,
    /// CPU time over the window divided by its length, percent of one core.
    pub(crate) cpu_pct: f64,
    /// Largest resident set size sampled during the window, MiB.
    pub(crate) rss_max_mib: f64,
    /// Resident set size at the end of the window, MiB.
    pub(crate) rss_end_mib: f64,
}

/// The whole machine's CPU over the measured window (from `/proc/stat`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct MachineUsage {
    /// Busy CPU over the window, percent of one core (200 = both cores of a 2-core machine).
    pub(crate) busy_pct: f64,
    /// This benchmark process's own CPU, percent of one core.
    pub(crate) bench_pct: f64,
    /// Busy CPU not spent by the servers measured nor by the benchmark: other load on the
    /// machine (builds, other tests), percent of one core.
    pub(crate) other_pct: f64,
    /// `/proc/loadavg` when the run started.
    pub(crate) loadavg_start: String,
}

/// How often resident set sizes are polled during a window.
pub(crate) const RSS_POLL: Duration = Duration::from_millis(500);

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// User + system CPU ticks of `pid` (`"self"` for this process), if it exists.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after its closing parenthesis are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of `pid`, MiB.
pub(crate) fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// (busy, total) ticks of the whole machine from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// `/proc/loadavg`, trimmed.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Counters at the start of a window.
#[derive(Debug)]
pub(crate) struct Sampler {
    pids: Vec<u32>,
    started: Instant,
    ticks: Vec<Option<u64>>,
    self_ticks: Option<u64>,
    machine: Option<(u64, u64)>,
    rss_max: Vec<f64>,
    loadavg: String,
    ticks_per_s: f64,
}

impl Sampler {
    /// Snapshots the counters of `pids`, of this process and of the machine now.
    pub(crate) fn start(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            started: Instant::now(),
            ticks: pids.iter().map(|p| process_ticks(&p.to_string())).collect(),
            self_ticks: process_ticks("self"),
            machine: machine_ticks(),
            rss_max: pids.iter().map(|p| rss_mib(*p).unwrap_or(0.0)).collect(),
            loadavg: loadavg(),
            ticks_per_s: clock_ticks(),
        }
    }

    /// Polls resident set sizes, keeping each maximum.
    pub(crate) fn poll(&mut self) {
        for (pid, max) in self.pids.iter().zip(self.rss_max.iter_mut()) {
            if let Some(rss) = rss_mib(*pid) {
                *max = max.max(rss);
            }
        }
    }

    /// Polls until `until`, every [`RSS_POLL`].
    pub(crate) async fn poll_until(&mut self, until: Instant) {
        while Instant::now() < until {
            self.poll();
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(RSS_POLL)).await;
        }
    }

    /// The usage since [`Sampler::start`].
    #[allow(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
    pub(crate) fn finish(mut self) -> (Vec<ProcessUsage>, MachineUsage) {
        self.poll();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = |before: Option<u64>, after: Option<u64>| match (before, after) {
            (Some(b), Some(a)) => a.saturating_sub(b) as f64 / self.ticks_per_s / elapsed * 100.0,
            _ => 0.0,
        };
        let processes: Vec<ProcessUsage> = self
            .pids
            .iter()
            .zip(&self.ticks)
            .zip(&self.rss_max)
            .map(|((pid, before), rss_max)| ProcessUsage {
                pid: *pid,
                cpu_pct: pct(*before, process_ticks(&pid.to_string())),
                rss_max_mib: *rss_max,
                rss_end_mib: rss_mib(*pid).unwrap_or(0.0),
            })
            .collect();
        let bench_pct = pct(self.self_ticks, process_ticks("self"));
        let busy_pct = match (self.machine, machine_ticks()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
                (busy1 - busy0) as f64 / (total1 - total0) as f64 * 100.0 * cores
            }
            _ => 0.0,
        };
        let servers: f64 = processes.iter().map(|p| p.cpu_pct).sum();
        let machine = MachineUsage {
            busy_pct,
            bench_pct,
            other_pct: (busy_pct - servers - bench_pct).max(0.0),
            loadavg_start: self.loadavg,
        };
        (processes, machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process can read its own counters.
    #[test]
    fn reads_own_process() {
        assert!(process_ticks("self").is_some(), "utime+stime of self");
        assert!(
            rss_mib(std::process::id()).is_some_and(|r| r > 0.0),
            "RSS of self"
        );
        assert!(
            machine_ticks().is_some_and(|(b, t)| t >= b),
            "machine ticks"
        );
    }
}
