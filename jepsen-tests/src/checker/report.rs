//! The checker's verdict: the anomaly kinds, the findings the checks add, and the [`Report`]
//! that summarises them (counts per kind and class, the first few examples of each).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// How many examples the report keeps per anomaly kind.
pub const EXAMPLES_MAX: usize = 10;

/// The kinds of anomaly the checker looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// An acknowledged send missing from a final drain of its recipient. Classes `lost-prefix`,
    /// `lost-middle`, `lost-postfix`.
    Lost,
    /// A recipient without any drain session: its sends could not be checked.
    Undrained,
    /// A delivered message that should not exist or does not match its send.
    Unexpected,
    /// A send applied twice, or two sends sharing one message id.
    Duplicate,
    /// Inconsistent seq mapping, gaps or regressions in a stream, or per-sender FIFO broken.
    Order,
    /// A receipt that regressed or refers to a message or recipient it should not.
    Receipts,
    /// Replicas of a shard disagree (applied index, digests, or who reports the shard).
    Divergence,
    /// No replica status was recorded, so convergence could not be checked.
    NoReplicaStatus,
    /// A projection differs from its rebuild from the log, or was never verified.
    RebuildMismatch,
    /// The history breaks the harness's own invariants, so it cannot be fully trusted.
    Malformed,
}

impl AnomalyKind {
    /// Every kind, in report order.
    pub const ALL: [AnomalyKind; 10] = [
        Self::Lost,
        Self::Undrained,
        Self::Unexpected,
        Self::Duplicate,
        Self::Order,
        Self::Receipts,
        Self::Divergence,
        Self::NoReplicaStatus,
        Self::RebuildMismatch,
        Self::Malformed,
    ];

    /// The snake_case name used in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Undrained => "undrained",
            Self::Unexpected => "unexpected",
            Self::Duplicate => "duplicate",
            Self::Order => "order",
            Self::Receipts => "receipts",
            Self::Divergence => "divergence",
            Self::NoReplicaStatus => "no_replica_status",
            Self::RebuildMismatch => "rebuild_mismatch",
            Self::Malformed => "malformed",
        }
    }
}

/// Operation and record counts of a history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Send attempts invoked.
    pub ops_invoked: usize,
    /// Attempts that completed ok.
    pub ops_ok: usize,
    /// Attempts that completed fail.
    pub ops_fail: usize,
    /// Attempts that completed info.
    pub ops_info: usize,
    /// Attempts that never completed (treated like info).
    pub ops_pending: usize,
    /// Distinct client ids invoked.
    pub sends: usize,
    /// Distinct client ids with at least one ok attempt.
    pub sends_acked: usize,
    /// `Delivered` records.
    pub deliveries: usize,
    /// Stream sessions, live and drain.
    pub sessions: usize,
    /// Final drain sessions.
    pub drain_sessions: usize,
    /// `Receipt` records.
    pub receipts: usize,
    /// Nemesis events.
    pub faults: usize,
    /// Distinct (node, shard) replica status reports.
    pub replicas: usize,
    /// `Verify` records.
    pub verifies: usize,
}

/// The findings of one anomaly kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AnomalySummary {
    /// How many anomalies of this kind were found.
    pub count: usize,
    /// Count per class (for example `lost-middle`).
    pub classes: BTreeMap<&'static str, usize>,
    /// The first [`EXAMPLES_MAX`] findings, as `"[class] detail"`.
    pub examples: Vec<String>,
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// What the history contains.
    pub counts: Counts,
    /// Every [`AnomalyKind`], including those with a zero count, so the report shows what was
    /// checked.
    pub anomalies: BTreeMap<AnomalyKind, AnomalySummary>,
}

impl Report {
    /// True if no anomaly of any kind was found.
    pub fn is_valid(&self) -> bool {
        self.anomaly_total() == 0
    }

    /// The number of anomalies of all kinds.
    pub fn anomaly_total(&self) -> usize {
        self.anomalies.values().map(|summary| summary.count).sum()
    }

    /// The number of anomalies of one kind.
    pub fn count(&self, kind: AnomalyKind) -> usize {
        self.anomalies.get(&kind).map_or(0, |summary| summary.count)
    }

    /// The number of anomalies of one kind and class.
    pub fn class_count(&self, kind: AnomalyKind, class: &str) -> usize {
        self.anomalies
            .get(&kind)
            .and_then(|summary| summary.classes.get(class).copied())
            .unwrap_or(0)
    }

    /// The kept examples of one kind.
    pub fn examples(&self, kind: AnomalyKind) -> &[String] {
        self.anomalies
            .get(&kind)
            .map_or(&[], |summary| summary.examples.as_slice())
    }

    pub(super) fn from_findings(counts: Counts, findings: Findings) -> Self {
        let mut anomalies: BTreeMap<AnomalyKind, AnomalySummary> = AnomalyKind::ALL
            .iter()
            .map(|kind| (*kind, AnomalySummary::default()))
            .collect();
        for finding in findings.0 {
            let summary = anomalies.entry(finding.kind).or_default();
            summary.count = summary.count.saturating_add(1);
            let class = summary.classes.entry(finding.class).or_default();
            *class = class.saturating_add(1);
            if summary.examples.len() < EXAMPLES_MAX {
                summary
                    .examples
                    .push(format!("[{}] {}", finding.class, finding.detail));
            }
        }
        Self { counts, anomalies }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_valid() { "VALID" } else { "INVALID" };
        writeln!(
            f,
            "history check: {verdict} ({} anomalies)",
            self.anomaly_total()
        )?;
        let c = &self.counts;
        writeln!(
            f,
            "  ops: {} invoked, {} ok, {} fail, {} info, {} pending; {} sends, {} acked",
            c.ops_invoked, c.ops_ok, c.ops_fail, c.ops_info, c.ops_pending, c.sends, c.sends_acked
        )?;
        writeln!(
            f,
            "  streams: {} deliveries in {} sessions ({} drain); {} receipts; {} faults",
            c.deliveries, c.sessions, c.drain_sessions, c.receipts, c.faults
        )?;
        writeln!(
            f,
            "  status: {} replica reports, {} verifications",
            c.replicas, c.verifies
        )?;
        for (kind, summary) in &self.anomalies {
            write!(f, "  {}: {}", kind.name(), summary.count)?;
            let classes: Vec<String> = summary
                .classes
                .iter()
                .map(|(class, count)| format!("{class} {count}"))
                .collect();
            if !classes.is_empty() {
                write!(f, " ({})", classes.join(", "))?;
            }
            writeln!(f)?;
            for example in &summary.examples {
                writeln!(f, "      {example}")?;
            }
        }
        Ok(())
    }
}

/// One anomaly before it is summarised.
struct Finding {
    kind: AnomalyKind,
    class: &'static str,
    detail: String,
}

/// Every anomaly found, in the order found.
#[derive(Default)]
pub(super) struct Findings(Vec<Finding>);

impl Findings {
    pub(super) fn add(&mut self, kind: AnomalyKind, class: &'static str, detail: String) {
        self.0.push(Finding {
            kind,
            class,
            detail,
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::checker::fixture::lost_report;

    /// Goal: the report serialises to JSON with every kind present.
    #[test]
    fn report_serialises_to_json() {
        let report = lost_report(&["0-2"]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["anomalies"]["lost"]["count"], 1, "{json}");
        assert_eq!(
            json["anomalies"]["lost"]["classes"]["lost-middle"], 1,
            "{json}"
        );
        assert_eq!(json["anomalies"]["no_replica_status"]["count"], 0, "{json}");
        assert_eq!(json["counts"]["sends_acked"], 4, "{json}");
        let text = report.to_string();
        assert!(
            text.contains("INVALID") && text.contains("[lost-middle] 0-2"),
            "{text}"
        );
    }
}
