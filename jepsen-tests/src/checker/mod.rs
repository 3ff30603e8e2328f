//! The history checker: decides whether a recorded run kept courier's promises.
//!
//! ```text
//!   History ──Index::build──▶ Index (ops, sends by client_id, sessions, status records)
//!                               │
//!                               ├──Inboxes::build──▶ per-user inbox as all sessions saw it
//!                               ▼
//!            one small check_* function per anomaly ──▶ Findings ──▶ Report
//! ```
//!
//! Each `check_*` function looks for one kind of anomaly ([`AnomalyKind`]) and tags every
//! finding with a class (for example `lost-middle` or `session-skip`), so tests and readers can
//! tell apart bugs of the same kind. The checker is conservative in one direction only: an
//! outcome it cannot decide (a recipient never drained, no replica status) is an anomaly of its
//! own, never a pass.
//!
//! Everything is kept in `BTreeMap`s, so the same history always gives the same report, with
//! examples in the same order.
//!
//! Layout: one file per property, each with the tests that plant its anomalies beside it.
//!
//! - `report`: [`AnomalyKind`], [`Report`] and the findings they summarise.
//! - `index`: the history indexed for the checks (sends, sessions, inboxes); `malformed`.
//! - `lost`: `undrained` and `lost` (acked sends, and committed messages that vanished).
//! - `unexpected`: deliveries that should not exist or do not match their send.
//! - `duplicates`: a send applied twice, a message id shared.
//! - `order`: seq agreement across sessions, session contiguity, per-sender FIFO.
//! - `receipts`: receipt monotonicity and what receipts may refer to.
//! - `convergence`: replica agreement (`divergence`, `no_replica_status`) and
//!   `rebuild_mismatch`.
//! - `fixture` (tests only): a builder of hand-made histories shared by those tests.

mod convergence;
mod duplicates;
#[cfg(test)]
pub(crate) mod fixture;
mod index;
mod lost;
mod order;
mod receipts;
mod report;
mod unexpected;

pub use report::{AnomalyKind, AnomalySummary, Counts, EXAMPLES_MAX, Report};

use crate::history::History;
use convergence::{check_divergence, check_rebuild};
use duplicates::check_duplicates;
use index::{Inboxes, Index};
use lost::{check_lost, check_undrained, check_vanished};
use order::{check_sender_fifo, check_seq_agreement, check_session_contiguity};
use receipts::check_receipts;
use report::Findings;
use unexpected::check_unexpected;

/// Checks a history against every invariant and returns the verdict.
pub fn check(history: &History) -> Report {
    let mut findings = Findings::default();
    let index = Index::build(history, &mut findings);
    let inboxes = Inboxes::build(&index);
    check_undrained(&index, &mut findings);
    check_lost(&index, &inboxes, &mut findings);
    check_vanished(&index, &inboxes, &mut findings);
    check_unexpected(&index, &inboxes, &mut findings);
    check_duplicates(&index, &inboxes, &mut findings);
    check_seq_agreement(&inboxes, &mut findings);
    check_session_contiguity(&index, &mut findings);
    check_sender_fifo(&index, &inboxes, &mut findings);
    check_receipts(&index, &inboxes, &mut findings);
    check_divergence(&index, &mut findings);
    check_rebuild(&index, &mut findings);
    Report::from_findings(index.counts(), findings)
}

#[cfg(test)]
mod tests {
    use crate::checker::check;
    use crate::checker::fixture::clean;

    /// Goal: the healthy run passes, and the counts add up.
    #[test]
    fn clean_history_is_valid() {
        let report = check(&clean().history());
        assert!(report.is_valid(), "{report}");
        let c = &report.counts;
        assert_eq!(
            (c.ops_invoked, c.ops_ok, c.ops_fail, c.ops_info),
            (7, 3, 1, 3),
            "{report}"
        );
        assert_eq!((c.sends, c.sends_acked, c.faults), (6, 3, 2), "{report}");
        assert_eq!((c.sessions, c.drain_sessions), (14, 12), "{report}");
        assert_eq!((c.replicas, c.verifies, c.receipts), (6, 6, 4), "{report}");
        assert!(report.to_string().contains("check: VALID"), "{report}");
    }
}
