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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::history::{
    Complete, Delivered, History, Invoke, Outcome, Receipt, ReceiptState, Record, Replica,
    SessionStart, Verify,
};

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

    fn from_findings(counts: Counts, findings: Findings) -> Self {
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

// ---------------------------------------------------------------------------------------------
// Findings and the index of the history.

/// One anomaly before it is summarised.
struct Finding {
    kind: AnomalyKind,
    class: &'static str,
    detail: String,
}

/// Every anomaly found, in the order found.
#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn add(&mut self, kind: AnomalyKind, class: &'static str, detail: String) {
        self.0.push(Finding {
            kind,
            class,
            detail,
        });
    }
}

/// One attempt of a send.
struct Op<'h> {
    invoke: &'h Invoke,
    complete: Option<&'h Complete>,
}

/// What the clients know about one logical send (one client id), over all its attempts.
struct Send<'h> {
    from_user: u64,
    to_user: u64,
    /// The earliest invoke of any attempt: the send cannot have been applied before it.
    first_invoke_ms: u64,
    /// The earliest ok completion, with its message id.
    ack: Option<(u64, &'h str)>,
    /// Every message id an ok attempt returned (more than one means dedup failed).
    acked_ids: BTreeSet<&'h str>,
    /// Some attempt ended info or never completed, so the send may have been applied.
    indeterminate: bool,
}

/// One stream session and what it received, in record order.
struct Session<'h> {
    start: &'h SessionStart,
    deliveries: Vec<&'h Delivered>,
}

/// The history, indexed for the checks.
#[derive(Default)]
struct Index<'h> {
    ops: BTreeMap<u64, Op<'h>>,
    sends: BTreeMap<&'h str, Send<'h>>,
    sessions: BTreeMap<u64, Session<'h>>,
    receipts: Vec<&'h Receipt>,
    /// The last report per (shard, node): the harness may poll until replicas converge.
    replicas: BTreeMap<(u32, u32), &'h Replica>,
    verifies: Vec<&'h Verify>,
    deliveries: usize,
    faults: usize,
}

impl<'h> Index<'h> {
    /// Indexes every record; records that break the harness's invariants become `malformed`.
    fn build(history: &'h History, findings: &mut Findings) -> Self {
        let mut index = Index::default();
        for record in &history.records {
            match record {
                Record::Invoke(invoke) => index.add_invoke(invoke, findings),
                Record::Complete(complete) => index.add_complete(complete, findings),
                Record::SessionStart(start) => index.add_session(start, findings),
                Record::Delivered(delivered) => index.add_delivered(delivered, findings),
                Record::Receipt(receipt) => index.receipts.push(receipt),
                Record::Replica(replica) => {
                    index
                        .replicas
                        .insert((replica.shard, replica.node), replica);
                }
                Record::Verify(verify) => index.verifies.push(verify),
                Record::Fault(_) => index.faults = index.faults.saturating_add(1),
            }
        }
        index.mark_pending_indeterminate();
        index
    }

    fn add_invoke(&mut self, invoke: &'h Invoke, findings: &mut Findings) {
        if self.ops.contains_key(&invoke.op_id) {
            let detail = format!("op_id {} invoked twice", invoke.op_id);
            findings.add(AnomalyKind::Malformed, "duplicate-op-id", detail);
            return;
        }
        self.ops.insert(
            invoke.op_id,
            Op {
                invoke,
                complete: None,
            },
        );
        let op = &invoke.op;
        let send = self.sends.entry(&op.client_id).or_insert(Send {
            from_user: op.from_user,
            to_user: op.to_user,
            first_invoke_ms: invoke.time_ms,
            ack: None,
            acked_ids: BTreeSet::new(),
            indeterminate: false,
        });
        send.first_invoke_ms = send.first_invoke_ms.min(invoke.time_ms);
        if (send.from_user, send.to_user) != (op.from_user, op.to_user) {
            let detail = format!(
                "retry op {} of {} is {}→{}, first attempt was {}→{}",
                invoke.op_id, op.client_id, op.from_user, op.to_user, send.from_user, send.to_user
            );
            findings.add(AnomalyKind::Malformed, "retry-changed-users", detail);
        }
    }

    fn add_complete(&mut self, complete: &'h Complete, findings: &mut Findings) {
        let Some(op) = self.ops.get_mut(&complete.op_id) else {
            let detail = format!("op_id {} completed but never invoked", complete.op_id);
            findings.add(AnomalyKind::Malformed, "complete-without-invoke", detail);
            return;
        };
        if op.complete.is_some() {
            let detail = format!("op_id {} completed twice", complete.op_id);
            findings.add(AnomalyKind::Malformed, "completed-twice", detail);
            return;
        }
        op.complete = Some(complete);
        let client_id = op.invoke.op.client_id.as_str();
        // The invoke created the send, so it exists; a missing one is skipped, not a panic.
        let Some(send) = self.sends.get_mut(client_id) else {
            return;
        };
        match &complete.outcome {
            Outcome::Ok { message_id } => {
                send.acked_ids.insert(message_id);
                if send
                    .ack
                    .is_none_or(|(time_ms, _)| complete.time_ms < time_ms)
                {
                    send.ack = Some((complete.time_ms, message_id));
                }
            }
            Outcome::Info { .. } => send.indeterminate = true,
            Outcome::Fail { .. } => {}
        }
    }

    fn add_session(&mut self, start: &'h SessionStart, findings: &mut Findings) {
        if self.sessions.contains_key(&start.session) {
            let detail = format!("session {} started twice", start.session);
            findings.add(AnomalyKind::Malformed, "duplicate-session", detail);
            return;
        }
        if start.drain && start.resume_after_seq != 0 {
            let detail = format!(
                "drain session {} resumes after seq {}, not 0",
                start.session, start.resume_after_seq
            );
            findings.add(AnomalyKind::Malformed, "partial-drain", detail);
        }
        let session = Session {
            start,
            deliveries: Vec::new(),
        };
        self.sessions.insert(start.session, session);
    }

    fn add_delivered(&mut self, delivered: &'h Delivered, findings: &mut Findings) {
        self.deliveries = self.deliveries.saturating_add(1);
        match self.sessions.get_mut(&delivered.session) {
            Some(session) => session.deliveries.push(delivered),
            None => {
                let detail = format!(
                    "{} delivered in session {}, which never started",
                    delivered.client_id, delivered.session
                );
                findings.add(AnomalyKind::Malformed, "delivery-without-session", detail);
            }
        }
    }

    /// An attempt without an outcome (the harness stopped waiting) may still be applied.
    fn mark_pending_indeterminate(&mut self) {
        for op in self.ops.values() {
            if op.complete.is_none()
                && let Some(send) = self.sends.get_mut(op.invoke.op.client_id.as_str())
            {
                send.indeterminate = true;
            }
        }
    }

    /// The drain sessions of `user`, by session id.
    fn drain_sessions(&self, user: u64) -> impl Iterator<Item = &Session<'h>> {
        self.sessions
            .values()
            .filter(move |session| session.start.drain && session.start.user == user)
    }

    fn counts(&self) -> Counts {
        let outcome_count = |wanted: fn(&Outcome) -> bool| {
            self.ops
                .values()
                .filter(|op| op.complete.is_some_and(|c| wanted(&c.outcome)))
                .count()
        };
        Counts {
            ops_invoked: self.ops.len(),
            ops_ok: outcome_count(|o| matches!(o, Outcome::Ok { .. })),
            ops_fail: outcome_count(|o| matches!(o, Outcome::Fail { .. })),
            ops_info: outcome_count(|o| matches!(o, Outcome::Info { .. })),
            ops_pending: self.ops.values().filter(|op| op.complete.is_none()).count(),
            sends: self.sends.len(),
            sends_acked: self
                .sends
                .values()
                .filter(|send| send.ack.is_some())
                .count(),
            deliveries: self.deliveries,
            sessions: self.sessions.len(),
            drain_sessions: self.sessions.values().filter(|s| s.start.drain).count(),
            receipts: self.receipts.len(),
            faults: self.faults,
            replicas: self.replicas.len(),
            verifies: self.verifies.len(),
        }
    }
}

/// What the sessions of one user saw of one client id.
#[derive(Default)]
struct Seen<'h> {
    seqs: BTreeSet<u64>,
    message_ids: BTreeSet<&'h str>,
    from_users: BTreeSet<u64>,
    sessions: BTreeSet<u64>,
}

/// One user's inbox as the union of all its sessions (every device, node, live and drain).
#[derive(Default)]
struct Inbox<'h> {
    /// seq → (client id, message id) → sessions that saw that message at that seq.
    by_seq: BTreeMap<u64, BTreeMap<(&'h str, &'h str), BTreeSet<u64>>>,
    by_client: BTreeMap<&'h str, Seen<'h>>,
}

/// Every user's inbox, plus message-id lookups for the receipt and duplicate checks.
#[derive(Default)]
struct Inboxes<'h> {
    by_user: BTreeMap<u64, Inbox<'h>>,
    /// message id → client ids carrying it, from ok completions and deliveries.
    message_clients: BTreeMap<&'h str, BTreeSet<&'h str>>,
    /// (recipient, message id) pairs seen in some session of that recipient.
    delivered_to: BTreeSet<(u64, &'h str)>,
}

impl<'h> Inboxes<'h> {
    fn build(index: &Index<'h>) -> Self {
        let mut inboxes = Inboxes::default();
        for (client_id, send) in &index.sends {
            for message_id in &send.acked_ids {
                inboxes.note_message(message_id, client_id);
            }
        }
        for session in index.sessions.values() {
            for delivered in &session.deliveries {
                inboxes.add(session.start, delivered);
            }
        }
        inboxes
    }

    fn note_message(&mut self, message_id: &'h str, client_id: &'h str) {
        self.message_clients
            .entry(message_id)
            .or_default()
            .insert(client_id);
    }

    fn add(&mut self, start: &SessionStart, delivered: &'h Delivered) {
        let client_id = delivered.client_id.as_str();
        let message_id = delivered.message_id.as_str();
        self.note_message(message_id, client_id);
        self.delivered_to.insert((start.user, message_id));
        let inbox = self.by_user.entry(start.user).or_default();
        inbox
            .by_seq
            .entry(delivered.seq)
            .or_default()
            .entry((client_id, message_id))
            .or_default()
            .insert(start.session);
        let seen = inbox.by_client.entry(client_id).or_default();
        seen.seqs.insert(delivered.seq);
        seen.message_ids.insert(message_id);
        seen.from_users.insert(delivered.from_user);
        seen.sessions.insert(start.session);
    }

    /// The lowest seq at which `user`'s sessions saw `client_id`.
    fn seq_of(&self, user: u64, client_id: &str) -> Option<u64> {
        let seen = self.by_user.get(&user)?.by_client.get(client_id)?;
        seen.seqs.first().copied()
    }
}

/// "session 4 (user 2, device 1, node 3)".
fn describe_session(start: &SessionStart) -> String {
    format!(
        "session {} (user {}, device {}, node {})",
        start.session, start.user, start.device, start.node
    )
}

// ---------------------------------------------------------------------------------------------
// The checks, one per anomaly kind (or sub-kind).

/// `undrained`: a user who was sent to, or who streamed, but has no drain session. Without a
/// drain nothing can be said about lost messages of that user, so the run must not pass.
fn check_undrained(index: &Index<'_>, findings: &mut Findings) {
    let mut users: BTreeSet<u64> = index.sends.values().map(|send| send.to_user).collect();
    users.extend(index.sessions.values().map(|session| session.start.user));
    for user in users {
        if index.drain_sessions(user).next().is_some() {
            continue;
        }
        let acked = index
            .sends
            .values()
            .filter(|send| send.to_user == user && send.ack.is_some())
            .count();
        let detail = format!("user {user} has no drain session; {acked} acked sends unchecked");
        findings.add(AnomalyKind::Undrained, "no-drain-session", detail);
    }
}

/// `lost`: an acked send missing from any drain session of its recipient (every device on every
/// node must return it after the heal).
///
/// Each lost send is classified against the acked sends of the same sender to the same
/// recipient, ordered by ack time: `lost-prefix` if every earlier one is lost too,
/// `lost-postfix` if every later one is, `lost-middle` otherwise. A send whose whole stream is
/// lost counts as a prefix. Middles are the worrying class: they rule out "the tail had not
/// arrived yet".
fn check_lost(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    // (from, to) → [(ack time, client id)], sorted by ack time.
    let mut streams: BTreeMap<(u64, u64), Vec<(u64, &str)>> = BTreeMap::new();
    for (client_id, send) in &index.sends {
        if let Some((ack_ms, _)) = send.ack {
            let stream = streams.entry((send.from_user, send.to_user)).or_default();
            stream.push((ack_ms, client_id));
        }
    }
    for ((from, to), mut stream) in streams {
        let drains: Vec<&SessionStart> = index.drain_sessions(to).map(|s| s.start).collect();
        if drains.is_empty() {
            continue; // Reported by check_undrained.
        }
        stream.sort_unstable();
        let missing: Vec<Vec<&SessionStart>> = stream
            .iter()
            .map(|(_, client_id)| missing_drains(inboxes, to, client_id, &drains))
            .collect();
        let lost: Vec<bool> = missing.iter().map(|m| !m.is_empty()).collect();
        for (position, (ack_ms, client_id)) in stream.iter().enumerate() {
            let Some(class) = lost_class(&lost, position) else {
                continue;
            };
            let sessions: Vec<String> = missing[position]
                .iter()
                .map(|start| describe_session(start))
                .collect();
            let detail = format!(
                "{client_id} ({from}→{to}, acked at {ack_ms} ms) missing from {} of {} drain \
                 sessions: {}",
                sessions.len(),
                drains.len(),
                sessions.join(", ")
            );
            findings.add(AnomalyKind::Lost, class, detail);
        }
    }
}

/// `lost` / `vanished`: a message some session of a user saw (live or drain) that is missing
/// from another drain session of that user. A message in an inbox is committed, so it must
/// survive even when its send was never acked. Acked sends to that user are left to
/// [`check_lost`], which classifies them.
fn check_vanished(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    for (user, inbox) in &inboxes.by_user {
        let drains: Vec<&SessionStart> = index.drain_sessions(*user).map(|s| s.start).collect();
        if drains.is_empty() {
            continue; // Reported by check_undrained.
        }
        for (client_id, seen) in &inbox.by_client {
            let acked_here = index
                .sends
                .get(client_id)
                .is_some_and(|send| send.ack.is_some() && send.to_user == *user);
            if acked_here {
                continue;
            }
            let missing = missing_drains(inboxes, *user, client_id, &drains);
            if missing.is_empty() {
                continue;
            }
            let sessions: Vec<String> = missing.iter().map(|s| describe_session(s)).collect();
            let detail = format!(
                "{client_id} (user {user}, seqs {:?}) seen by sessions {:?} but missing from \
                 drain {}",
                seen.seqs,
                seen.sessions,
                sessions.join(", ")
            );
            findings.add(AnomalyKind::Lost, "vanished", detail);
        }
    }
}

/// The drain sessions of `user` that never delivered `client_id`.
fn missing_drains<'s>(
    inboxes: &Inboxes<'_>,
    user: u64,
    client_id: &str,
    drains: &[&'s SessionStart],
) -> Vec<&'s SessionStart> {
    let seen = inboxes
        .by_user
        .get(&user)
        .and_then(|inbox| inbox.by_client.get(client_id));
    drains
        .iter()
        .filter(|start| !seen.is_some_and(|seen| seen.sessions.contains(&start.session)))
        .copied()
        .collect()
}

/// The lost class of the send at `position`, or `None` if it is not lost.
fn lost_class(lost: &[bool], position: usize) -> Option<&'static str> {
    if !lost.get(position).copied().unwrap_or(false) {
        return None;
    }
    let (earlier, later) = lost.split_at(position);
    let later = later.get(1..).unwrap_or(&[]);
    Some(if earlier.iter().all(|l| *l) {
        "lost-prefix"
    } else if later.iter().all(|l| *l) {
        "lost-postfix"
    } else {
        "lost-middle"
    })
}

/// `unexpected`: a delivered client id that was never invoked (`never-invoked`), that reached a
/// user other than its recipient (`wrong-recipient`) or claims another sender (`wrong-sender`),
/// that carries a message id its ok attempt did not return (`wrong-message-id`), or whose every
/// attempt failed (`failed-send-delivered`: fail means definitely not applied).
fn check_unexpected(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    for (user, inbox) in &inboxes.by_user {
        for (client_id, seen) in &inbox.by_client {
            let seqs = format!("seqs {:?}, sessions {:?}", seen.seqs, seen.sessions);
            let Some(send) = index.sends.get(client_id) else {
                let detail =
                    format!("{client_id} delivered to user {user} ({seqs}) was never invoked");
                findings.add(AnomalyKind::Unexpected, "never-invoked", detail);
                continue;
            };
            if send.to_user != *user {
                let detail = format!(
                    "{client_id} was sent to user {} but delivered to user {user} ({seqs})",
                    send.to_user
                );
                findings.add(AnomalyKind::Unexpected, "wrong-recipient", detail);
            }
            if seen.from_users.iter().any(|from| *from != send.from_user) {
                let detail = format!(
                    "{client_id} was sent by user {} but delivered to user {user} as from {:?}",
                    send.from_user, seen.from_users
                );
                findings.add(AnomalyKind::Unexpected, "wrong-sender", detail);
            }
            let foreign: Vec<&str> = seen
                .message_ids
                .iter()
                .filter(|id| !send.acked_ids.contains(*id))
                .copied()
                .collect();
            if send.ack.is_some() && !foreign.is_empty() {
                let detail = format!(
                    "{client_id} was acked as {:?} but delivered to user {user} as {foreign:?}",
                    send.acked_ids
                );
                findings.add(AnomalyKind::Unexpected, "wrong-message-id", detail);
            }
            if send.ack.is_none() && !send.indeterminate {
                let detail =
                    format!("{client_id}: every attempt failed, yet user {user} got it ({seqs})");
                findings.add(AnomalyKind::Unexpected, "failed-send-delivered", detail);
            }
        }
    }
}

/// `duplicate`: one client id at two seqs of one inbox (`client-id-twice`; an indeterminate
/// send may appear once or never, never twice), two client ids sharing one message id
/// (`message-id-shared`), or one client id acked with two message ids (`acked-twice`: the
/// server's dedup of retries failed).
fn check_duplicates(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    for (user, inbox) in &inboxes.by_user {
        for (client_id, seen) in &inbox.by_client {
            if seen.seqs.len() > 1 {
                let detail = format!("{client_id} at seqs {:?} of user {user}", seen.seqs);
                findings.add(AnomalyKind::Duplicate, "client-id-twice", detail);
            }
        }
    }
    for (message_id, clients) in &inboxes.message_clients {
        if clients.len() > 1 {
            let detail = format!("message id {message_id} carried by {clients:?}");
            findings.add(AnomalyKind::Duplicate, "message-id-shared", detail);
        }
    }
    for (client_id, send) in &index.sends {
        if send.acked_ids.len() > 1 {
            let detail = format!("{client_id} acked with message ids {:?}", send.acked_ids);
            findings.add(AnomalyKind::Duplicate, "acked-twice", detail);
        }
    }
}

/// `order` / `inconsistent-seq`: every session of a user (all devices, all nodes, live and
/// drain) must map each seq to the same message.
fn check_seq_agreement(inboxes: &Inboxes<'_>, findings: &mut Findings) {
    for (user, inbox) in &inboxes.by_user {
        for (seq, messages) in &inbox.by_seq {
            if messages.len() < 2 {
                continue;
            }
            let variants: Vec<String> = messages
                .iter()
                .map(|((client_id, message_id), sessions)| {
                    format!("{client_id}/{message_id} in sessions {sessions:?}")
                })
                .collect();
            let detail = format!("user {user} seq {seq}: {}", variants.join(" vs "));
            findings.add(AnomalyKind::Order, "inconsistent-seq", detail);
        }
    }
}

/// `order` / `session-skip`, `session-repeat`, `session-backward`: a session resuming after
/// seq k must deliver k+1, k+2, ... with no gap, no repeat and no step back. After a violation
/// the expectation restarts from the seq actually delivered, so one gap is one finding.
fn check_session_contiguity(index: &Index<'_>, findings: &mut Findings) {
    for session in index.sessions.values() {
        let start = session.start;
        let mut expected = start.resume_after_seq.saturating_add(1);
        let mut previous: Option<u64> = None;
        for delivered in &session.deliveries {
            if delivered.seq != expected {
                let class = if delivered.seq > expected {
                    "session-skip"
                } else if previous == Some(delivered.seq) {
                    "session-repeat"
                } else {
                    "session-backward"
                };
                let detail = format!(
                    "{}: expected seq {expected}, got seq {} ({})",
                    describe_session(start),
                    delivered.seq,
                    delivered.client_id
                );
                findings.add(AnomalyKind::Order, class, detail);
            }
            previous = Some(delivered.seq);
            expected = delivered.seq.saturating_add(1);
        }
    }
}

/// One acked send of a (sender, recipient) stream, placed in the recipient's inbox.
struct Placed<'h> {
    client_id: &'h str,
    ack_ms: u64,
    invoke_ms: u64,
    seq: u64,
}

/// `order` / `fifo`: if ok send A completed before ok send B (same sender and recipient) was
/// first invoked, A must sit at a lower seq than B in the recipient's inbox. Sends not seen in
/// the inbox are `lost`, not reordered, and are skipped here.
///
/// A sweep keeps it O(n log n): sends in order of first invoke, against the highest seq among
/// sends acked strictly before that invoke.
fn check_sender_fifo(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    let mut streams: BTreeMap<(u64, u64), Vec<Placed<'_>>> = BTreeMap::new();
    for (client_id, send) in &index.sends {
        let Some((ack_ms, _)) = send.ack else {
            continue;
        };
        let Some(seq) = inboxes.seq_of(send.to_user, client_id) else {
            continue;
        };
        let placed = Placed {
            client_id,
            ack_ms,
            invoke_ms: send.first_invoke_ms,
            seq,
        };
        let stream = streams.entry((send.from_user, send.to_user)).or_default();
        stream.push(placed);
    }
    for ((from, to), stream) in streams {
        let mut by_ack: Vec<&Placed<'_>> = stream.iter().collect();
        by_ack.sort_by_key(|p| (p.ack_ms, p.client_id));
        let mut by_invoke: Vec<&Placed<'_>> = stream.iter().collect();
        by_invoke.sort_by_key(|p| (p.invoke_ms, p.client_id));
        let mut acked = by_ack.iter().peekable();
        let mut highest: Option<&Placed<'_>> = None;
        for later in by_invoke {
            while let Some(earlier) = acked.next_if(|earlier| earlier.ack_ms < later.invoke_ms) {
                if highest.is_none_or(|h| earlier.seq > h.seq) {
                    highest = Some(earlier);
                }
            }
            if let Some(earlier) = highest.filter(|h| h.seq > later.seq) {
                let detail = format!(
                    "{from}→{to}: {} acked at {} ms is at seq {}, but {} invoked later at {} ms \
                     is at seq {}",
                    earlier.client_id,
                    earlier.ack_ms,
                    earlier.seq,
                    later.client_id,
                    later.invoke_ms,
                    later.seq
                );
                findings.add(AnomalyKind::Order, "fifo", detail);
            }
        }
    }
}

/// `receipts`: per (observer, message, recipient) the observed states never go back in time
/// (`regression`); a receipt's message must exist (`unknown-message`), belong to the observer
/// (`wrong-observer`) and be addressed to the recipient (`wrong-recipient`); and a Delivered or
/// Read receipt needs the message in some session of the recipient (`not-delivered`).
fn check_receipts(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    let mut by_key: BTreeMap<(u64, &str, u64), Vec<&Receipt>> = BTreeMap::new();
    for receipt in &index.receipts {
        let key = (
            receipt.observer_user,
            receipt.message_id.as_str(),
            receipt.recipient_user,
        );
        by_key.entry(key).or_default().push(receipt);
    }
    for ((observer, message_id, recipient), mut receipts) in by_key {
        // Stable: receipts with the same time keep their record order.
        receipts.sort_by_key(|receipt| receipt.time_ms);
        let key = format!("observer {observer}, message {message_id}, recipient {recipient}");
        check_receipt_regressions(&key, &receipts, findings);
        check_receipt_message(index, inboxes, (observer, message_id, recipient), findings);
        let highest = receipts.iter().map(|r| r.state).max();
        if highest >= Some(ReceiptState::Delivered)
            && !inboxes.delivered_to.contains(&(recipient, message_id))
        {
            let detail = format!("{key}: {highest:?} but no session of user {recipient} got it");
            findings.add(AnomalyKind::Receipts, "not-delivered", detail);
        }
    }
}

/// Reports each receipt that is lower than one observed before it.
fn check_receipt_regressions(key: &str, receipts: &[&Receipt], findings: &mut Findings) {
    let mut highest: Option<&Receipt> = None;
    for receipt in receipts {
        match highest {
            Some(high) if receipt.state < high.state => {
                let detail = format!(
                    "{key}: {:?} at {} ms, then {:?} at {} ms",
                    high.state, high.time_ms, receipt.state, receipt.time_ms
                );
                findings.add(AnomalyKind::Receipts, "regression", detail);
            }
            Some(high) if receipt.state == high.state => {}
            _ => highest = Some(receipt),
        }
    }
}

/// Checks that the receipt's message exists and that observer and recipient match its send.
fn check_receipt_message(
    index: &Index<'_>,
    inboxes: &Inboxes<'_>,
    (observer, message_id, recipient): (u64, &str, u64),
    findings: &mut Findings,
) {
    let key = format!("observer {observer}, message {message_id}, recipient {recipient}");
    let Some(clients) = inboxes.message_clients.get(message_id) else {
        let detail = format!("{key}: no ok send returned and no session delivered it");
        findings.add(AnomalyKind::Receipts, "unknown-message", detail);
        return;
    };
    // A message id shared by several client ids is a `duplicate`; any one will do here. One
    // never invoked is `unexpected`, with no send to compare against.
    let Some((client_id, send)) = clients
        .iter()
        .find_map(|client_id| Some((*client_id, index.sends.get(client_id)?)))
    else {
        return;
    };
    if send.from_user != observer {
        let detail = format!("{key}: {client_id} was sent by user {}", send.from_user);
        findings.add(AnomalyKind::Receipts, "wrong-observer", detail);
    }
    if send.to_user != recipient {
        let detail = format!("{key}: {client_id} was sent to user {}", send.to_user);
        findings.add(AnomalyKind::Receipts, "wrong-recipient", detail);
    }
}

/// `divergence`: every node reporting a shard must report the same applied index
/// (`applied-index`) and the same digest per projection (`digest`), and every shard must be
/// reported by as many nodes as the best-reported shard (`missing-shard`). Without any
/// replica status, `no_replica_status`.
fn check_divergence(index: &Index<'_>, findings: &mut Findings) {
    if index.replicas.is_empty() {
        let detail = "no replica status recorded; convergence unchecked".to_owned();
        findings.add(AnomalyKind::NoReplicaStatus, "no-replica-status", detail);
        return;
    }
    let mut shards: BTreeMap<u32, BTreeMap<u32, &Replica>> = BTreeMap::new();
    for ((shard, node), replica) in &index.replicas {
        shards.entry(*shard).or_default().insert(*node, replica);
    }
    let all_nodes: BTreeSet<u32> = index.replicas.keys().map(|(_, node)| *node).collect();
    let most = shards.values().map(BTreeMap::len).max().unwrap_or(0);
    for (shard, replicas) in &shards {
        if replicas.len() < most {
            let missing: Vec<&u32> = all_nodes
                .iter()
                .filter(|node| !replicas.contains_key(node))
                .collect();
            let detail = format!(
                "shard {shard} reported by {} nodes, others by {most}; missing nodes {missing:?}",
                replicas.len()
            );
            findings.add(AnomalyKind::Divergence, "missing-shard", detail);
        }
        check_shard_agreement(*shard, replicas, findings);
    }
}

/// Compares the applied index and each projection digest across the replicas of one shard.
fn check_shard_agreement(shard: u32, replicas: &BTreeMap<u32, &Replica>, findings: &mut Findings) {
    let indexes: BTreeSet<u64> = replicas.values().map(|r| r.applied_index).collect();
    if indexes.len() > 1 {
        let per_node: Vec<String> = replicas
            .iter()
            .map(|(node, r)| format!("node {node}={}", r.applied_index))
            .collect();
        let detail = format!("shard {shard} applied index: {}", per_node.join(", "));
        findings.add(AnomalyKind::Divergence, "applied-index", detail);
    }
    let names: BTreeSet<&str> = replicas
        .values()
        .flat_map(|r| r.digests.keys().map(String::as_str))
        .collect();
    for name in names {
        let values: BTreeSet<Option<&String>> =
            replicas.values().map(|r| r.digests.get(name)).collect();
        if values.len() < 2 {
            continue;
        }
        let per_node: Vec<String> = replicas
            .iter()
            .map(|(node, r)| {
                let digest = r.digests.get(name).map_or("<missing>", String::as_str);
                format!("node {node}={digest}")
            })
            .collect();
        let detail = format!("shard {shard} projection {name}: {}", per_node.join(", "));
        findings.add(AnomalyKind::Divergence, "digest", detail);
    }
}

/// `rebuild_mismatch`: a verification that failed (`verify-failed`), or a replica that
/// reported status but was never verified (`not-verified`).
fn check_rebuild(index: &Index<'_>, findings: &mut Findings) {
    for verify in &index.verifies {
        if !verify.ok {
            let detail = format!(
                "node {} shard {}: {}",
                verify.node, verify.shard, verify.detail
            );
            findings.add(AnomalyKind::RebuildMismatch, "verify-failed", detail);
        }
    }
    let verified: BTreeSet<(u32, u32)> = index
        .verifies
        .iter()
        .map(|verify| (verify.shard, verify.node))
        .collect();
    for (shard, node) in index.replicas.keys() {
        if !verified.contains(&(*shard, *node)) {
            let detail = format!("node {node} shard {shard}: replica status but no verification");
            findings.add(AnomalyKind::RebuildMismatch, "not-verified", detail);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Hand-made histories, each with exactly one planted bug (plus the anomalies that bug
    //! necessarily causes), asserting the kind and class the checker names.

    use super::*;
    use crate::history::{Fault, SendOp, parse_jsonl, read_jsonl};
    use crate::history::{HistoryError, HistoryWriter};

    const NODES: [u32; 3] = [1, 2, 3];
    const DEVICES: [u32; 2] = [1, 2];
    const SHARDS: [u32; 2] = [0, 1];

    /// One inbox entry as a session receives it.
    #[derive(Clone)]
    struct Msg {
        seq: u64,
        message_id: String,
        from_user: u64,
        client_id: String,
    }

    fn msg(seq: u64, message_id: &str, from_user: u64, client_id: &str) -> Msg {
        Msg {
            seq,
            message_id: message_id.to_owned(),
            from_user,
            client_id: client_id.to_owned(),
        }
    }

    /// Builds histories record by record; every record gets a later time than the previous.
    #[derive(Default)]
    struct Builder {
        records: Vec<Record>,
        time_ms: u64,
        next_op: u64,
        next_session: u64,
    }

    impl Builder {
        fn tick(&mut self) -> u64 {
            self.time_ms += 10;
            self.time_ms
        }

        fn invoke(&mut self, from_user: u64, to_user: u64, client_id: &str) -> u64 {
            self.next_op += 1;
            let (op_id, time_ms) = (self.next_op, self.tick());
            let op = SendOp {
                from_user,
                to_user,
                client_id: client_id.to_owned(),
            };
            self.records.push(Record::Invoke(Invoke {
                process: 0,
                op_id,
                time_ms,
                op,
            }));
            op_id
        }

        fn complete(&mut self, op_id: u64, outcome: Outcome) {
            let time_ms = self.tick();
            self.records.push(Record::Complete(Complete {
                process: 0,
                op_id,
                time_ms,
                outcome,
            }));
        }

        fn ok(&mut self, op_id: u64, message_id: &str) {
            let message_id = message_id.to_owned();
            self.complete(op_id, Outcome::Ok { message_id });
        }

        fn fail(&mut self, op_id: u64) {
            let error = "rejected".to_owned();
            self.complete(op_id, Outcome::Fail { error });
        }

        fn info(&mut self, op_id: u64) {
            let error = "timeout".to_owned();
            self.complete(op_id, Outcome::Info { error });
        }

        fn send_ok(&mut self, from_user: u64, to_user: u64, client_id: &str, message_id: &str) {
            let op_id = self.invoke(from_user, to_user, client_id);
            self.ok(op_id, message_id);
        }

        /// Starts a session and delivers `msgs` in order; returns the session id.
        fn stream(&mut self, at: (u64, u32, u32), resume: u64, drain: bool, msgs: &[Msg]) -> u64 {
            let (user, device, node) = at;
            self.next_session += 1;
            let (session, time_ms) = (self.next_session, self.tick());
            self.records.push(Record::SessionStart(SessionStart {
                session,
                user,
                device,
                node,
                resume_after_seq: resume,
                time_ms,
                drain,
            }));
            for m in msgs {
                let time_ms = self.tick();
                self.records.push(Record::Delivered(Delivered {
                    session,
                    seq: m.seq,
                    message_id: m.message_id.clone(),
                    from_user: m.from_user,
                    client_id: m.client_id.clone(),
                    time_ms,
                }));
            }
            session
        }

        /// A live (not drain) session of `user` on device 1 of `node`.
        fn live(&mut self, user: u64, node: u32, resume: u64, msgs: &[Msg]) {
            self.stream((user, 1, node), resume, false, msgs);
        }

        /// Drains `user` on every device of every node, each seeing `inbox(device, node)`.
        fn drain_by(&mut self, user: u64, inbox: impl Fn(u32, u32) -> Vec<Msg>) {
            for node in NODES {
                for device in DEVICES {
                    self.stream((user, device, node), 0, true, &inbox(device, node));
                }
            }
        }

        fn drain(&mut self, user: u64, inbox: &[Msg]) {
            self.drain_by(user, |_, _| inbox.to_vec());
        }

        fn receipt(&mut self, observer: u64, message_id: &str, recipient: u64, s: ReceiptState) {
            let time_ms = self.tick();
            self.records.push(Record::Receipt(Receipt {
                observer_user: observer,
                message_id: message_id.to_owned(),
                recipient_user: recipient,
                state: s,
                time_ms,
            }));
        }

        fn replica(&mut self, node: u32, shard: u32, applied_index: u64, digests: [&str; 2]) {
            let digests = [("inbox", digests[0]), ("receipts", digests[1])]
                .into_iter()
                .map(|(name, digest)| (name.to_owned(), digest.to_owned()))
                .collect();
            self.records.push(Record::Replica(Replica {
                node,
                shard,
                applied_index,
                digests,
            }));
        }

        fn verify(&mut self, node: u32, shard: u32, ok: bool) {
            let detail = if ok { "match" } else { "inbox differs" }.to_owned();
            self.records.push(Record::Verify(Verify {
                node,
                shard,
                ok,
                detail,
            }));
        }

        fn fault(&mut self, description: &str) {
            let time_ms = self.tick();
            let description = description.to_owned();
            self.records.push(Record::Fault(Fault {
                time_ms,
                description,
            }));
        }

        /// Every node reports every shard identically, and every verification passes.
        fn healthy_status(&mut self) {
            self.status_where(|_, _| Some((100, ["aa", "bb"])), |_, _| Some(true));
        }

        /// Status per (node, shard): `replica` gives (applied index, digests) or no report,
        /// `verify` gives the verification result or none.
        fn status_where(
            &mut self,
            replica: impl Fn(u32, u32) -> Option<(u64, [&'static str; 2])>,
            verify: impl Fn(u32, u32) -> Option<bool>,
        ) {
            for node in NODES {
                for shard in SHARDS {
                    if let Some((applied, digests)) = replica(node, shard) {
                        self.replica(node, shard, applied, digests);
                    }
                    if let Some(ok) = verify(node, shard) {
                        self.verify(node, shard, ok);
                    }
                }
            }
        }

        fn history(self) -> History {
            History::from(self.records)
        }
    }

    /// User 2's inbox in [`traffic`].
    fn inbox_of_2() -> Vec<Msg> {
        vec![
            msg(1, "m01", 1, "0-1"),
            msg(2, "m02", 1, "0-2"),
            msg(3, "m05", 1, "0-5"),
        ]
    }

    /// User 1's inbox in [`traffic`].
    fn inbox_of_1() -> Vec<Msg> {
        vec![msg(1, "m11", 2, "1-1")]
    }

    /// A healthy run before the drain: acked sends both ways, a retry (info, then ok), a failed
    /// send and an info send that never appear, an info send that appears once, live sessions
    /// (one resuming), receipts and faults.
    fn traffic() -> Builder {
        let mut b = Builder::default();
        b.fault("partition isolate node 3");
        b.send_ok(1, 2, "0-1", "m01");
        let first = b.invoke(1, 2, "0-2");
        b.info(first);
        let retry = b.invoke(1, 2, "0-2");
        b.ok(retry, "m02");
        let failed = b.invoke(1, 2, "0-3");
        b.fail(failed);
        let unknown = b.invoke(1, 2, "0-4");
        b.info(unknown);
        let appears = b.invoke(1, 2, "0-5");
        b.info(appears);
        b.send_ok(2, 1, "1-1", "m11");
        let inbox = inbox_of_2();
        b.live(2, 1, 0, &inbox[..2]);
        b.live(2, 2, 2, &inbox[2..]);
        b.receipt(1, "m01", 2, ReceiptState::Sent);
        b.receipt(1, "m01", 2, ReceiptState::Delivered);
        b.receipt(1, "m01", 2, ReceiptState::Read);
        b.receipt(1, "m01", 2, ReceiptState::Read);
        b.fault("heal");
        b
    }

    /// [`traffic`] with complete drains of both users.
    fn drained() -> Builder {
        let mut b = traffic();
        b.drain(2, &inbox_of_2());
        b.drain(1, &inbox_of_1());
        b
    }

    /// [`drained`] with healthy replica status: a history that must pass.
    fn clean() -> Builder {
        let mut b = drained();
        b.healthy_status();
        b
    }

    /// Asserts that the report holds exactly `expected` anomalies, all of `kind` and `class`.
    fn assert_only(report: &Report, kind: AnomalyKind, class: &str, expected: usize) {
        assert_eq!(report.class_count(kind, class), expected, "{report}");
        assert_eq!(report.anomaly_total(), expected, "{report}");
    }

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

    /// Four acked sends 1→2; the drains of user 2 hold all but `lost`, at dense seqs.
    fn lost_report(lost: &[&str]) -> Report {
        let mut b = Builder::default();
        for n in 1..=4 {
            b.send_ok(1, 2, &format!("0-{n}"), &format!("m{n}"));
        }
        let kept: Vec<Msg> = (1..=4)
            .map(|n| format!("0-{n}"))
            .filter(|client_id| !lost.contains(&client_id.as_str()))
            .zip(1..)
            .map(|(client_id, seq)| msg(seq, &client_id.replace("0-", "m"), 1, &client_id))
            .collect();
        b.drain(2, &kept);
        b.healthy_status();
        check(&b.history())
    }

    /// Goal: lost acked sends are classified by their position among the sender's acked sends.
    #[test]
    fn lost_sends_are_classified_prefix_middle_postfix() {
        let cases: [(&[&str], &str, usize); 5] = [
            (&["0-1"], "lost-prefix", 1),
            (&["0-1", "0-2"], "lost-prefix", 2),
            (&["0-2"], "lost-middle", 1),
            (&["0-2", "0-3"], "lost-middle", 2),
            (&["0-4"], "lost-postfix", 1),
        ];
        for (lost, class, expected) in cases {
            let report = lost_report(lost);
            assert_only(&report, AnomalyKind::Lost, class, expected);
            assert_eq!(report.count(AnomalyKind::Lost), expected, "{report}");
        }
        let report = lost_report(&["0-1", "0-4"]);
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "lost-prefix"),
            1,
            "{report}"
        );
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "lost-postfix"),
            1,
            "{report}"
        );
    }

    /// Goal: a send missing on one replica only is lost, and the report names that session.
    #[test]
    fn send_missing_from_one_node_is_lost() {
        let mut b = traffic();
        b.drain_by(2, |device, node| {
            let mut inbox = inbox_of_2();
            if (device, node) == (2, 3) {
                inbox.truncate(1); // Node 3 lost 0-2 and 0-5.
            }
            inbox
        });
        b.drain(1, &inbox_of_1());
        b.healthy_status();
        let report = check(&b.history());
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "lost-postfix"),
            1,
            "{report}"
        );
        // 0-5 was info, but user 2's sessions saw it, so it must survive too.
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "vanished"),
            1,
            "{report}"
        );
        assert_eq!(report.anomaly_total(), 2, "{report}");
        let example = &report.examples(AnomalyKind::Lost)[0];
        assert!(
            example.contains("0-2") && example.contains("1 of 6"),
            "{example}"
        );
        assert!(example.contains("device 2, node 3"), "{example}");
    }

    /// Goal: a recipient without a drain session fails the run instead of passing unchecked.
    #[test]
    fn recipient_without_drain_is_undrained() {
        let mut b = traffic();
        b.drain(2, &inbox_of_2());
        b.healthy_status();
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Undrained, "no-drain-session", 1);
        assert!(
            report.examples(AnomalyKind::Undrained)[0].contains("user 1"),
            "{report}"
        );
    }

    /// Goal: a message nobody sent is unexpected.
    #[test]
    fn never_invoked_message_is_unexpected() {
        let mut b = clean();
        b.live(2, 3, 3, &[msg(4, "m99", 1, "9-9")]);
        let report = check(&b.history());
        // The drains miss it as well.
        assert_eq!(
            report.class_count(AnomalyKind::Unexpected, "never-invoked"),
            1,
            "{report}"
        );
        assert_eq!(report.count(AnomalyKind::Unexpected), 1, "{report}");
    }

    /// Goal: a delivered message id other than the one the ok attempt returned is unexpected.
    #[test]
    fn delivery_with_other_message_id_is_unexpected() {
        let mut b = clean();
        b.live(2, 3, 0, &[msg(1, "mZZ", 1, "0-1")]);
        let report = check(&b.history());
        let class = "wrong-message-id";
        assert_eq!(
            report.class_count(AnomalyKind::Unexpected, class),
            1,
            "{report}"
        );
        assert_eq!(report.count(AnomalyKind::Unexpected), 1, "{report}");
    }

    /// Goal: a send whose every attempt failed must not appear anywhere.
    #[test]
    fn failed_send_delivered_is_unexpected() {
        let mut b = traffic();
        let mut inbox = inbox_of_2();
        inbox.push(msg(4, "m03", 1, "0-3"));
        b.drain(2, &inbox);
        b.drain(1, &inbox_of_1());
        b.healthy_status();
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Unexpected, "failed-send-delivered", 1);
    }

    /// Goal: an info send may appear once (see `clean`) but not twice.
    #[test]
    fn info_send_twice_is_duplicate() {
        let mut b = traffic();
        let mut inbox = inbox_of_2();
        inbox.push(msg(4, "m05", 1, "0-5"));
        b.drain(2, &inbox);
        b.drain(1, &inbox_of_1());
        b.healthy_status();
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Duplicate, "client-id-twice", 1);
        assert!(
            report.examples(AnomalyKind::Duplicate)[0].contains("{3, 4}"),
            "{report}"
        );
    }

    /// Goal: two sends must not share a message id.
    #[test]
    fn shared_message_id_is_duplicate() {
        let mut b = traffic();
        b.send_ok(2, 1, "1-2", "m11");
        b.drain(2, &inbox_of_2());
        let mut inbox = inbox_of_1();
        inbox.push(msg(2, "m11", 2, "1-2"));
        b.drain(1, &inbox);
        b.healthy_status();
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Duplicate, "message-id-shared", 1);
    }

    /// Goal: a session that jumps over a seq is an order anomaly.
    #[test]
    fn skip_inside_session_is_order() {
        let mut b = clean();
        let inbox = inbox_of_2();
        b.live(2, 3, 0, &[inbox[0].clone(), inbox[2].clone()]);
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Order, "session-skip", 1);
    }

    /// Goal: a session that repeats or steps back is an order anomaly, and a session must start
    /// right after its resume point.
    #[test]
    fn repeat_and_backward_inside_session_are_order() {
        let mut b = clean();
        let inbox = inbox_of_2();
        let replay = [&inbox[0], &inbox[1], &inbox[1], &inbox[0]].map(Msg::clone);
        b.live(2, 3, 0, &replay);
        b.live(2, 3, 1, &inbox[..1]);
        let report = check(&b.history());
        assert_eq!(
            report.class_count(AnomalyKind::Order, "session-repeat"),
            1,
            "{report}"
        );
        assert_eq!(
            report.class_count(AnomalyKind::Order, "session-backward"),
            2,
            "{report}"
        );
        assert_eq!(report.anomaly_total(), 3, "{report}");
    }

    /// Goal: two nodes mapping one seq to different messages is an order anomaly.
    #[test]
    fn inconsistent_seq_between_nodes_is_order() {
        let mut b = traffic();
        let other = b.invoke(1, 2, "0-6");
        b.info(other);
        b.drain_by(2, |_, node| {
            let mut inbox = inbox_of_2();
            if node == 3 {
                inbox[2] = msg(3, "m06", 1, "0-6");
            }
            inbox
        });
        b.drain(1, &inbox_of_1());
        b.healthy_status();
        let report = check(&b.history());
        assert_eq!(
            report.class_count(AnomalyKind::Order, "inconsistent-seq"),
            1,
            "{report}"
        );
        assert_eq!(report.count(AnomalyKind::Order), 1, "{report}");
        // Each version is missing from the other nodes' drains.
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "vanished"),
            2,
            "{report}"
        );
        assert!(
            report.examples(AnomalyKind::Order)[0].contains("seq 3"),
            "{report}"
        );
    }

    /// Goal: a send acked before another was invoked must come first in the inbox; concurrent
    /// sends may come in either order.
    #[test]
    fn fifo_violation_is_order() {
        let mut b = Builder::default();
        b.send_ok(1, 2, "0-1", "m1");
        b.send_ok(1, 2, "0-2", "m2");
        let third = b.invoke(1, 2, "0-3");
        let fourth = b.invoke(1, 2, "0-4");
        b.ok(third, "m3");
        b.ok(fourth, "m4");
        b.drain(
            2,
            &[
                msg(1, "m2", 1, "0-2"),
                msg(2, "m1", 1, "0-1"),
                msg(3, "m4", 1, "0-4"),
                msg(4, "m3", 1, "0-3"),
            ],
        );
        b.healthy_status();
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Order, "fifo", 1);
        let example = &report.examples(AnomalyKind::Order)[0];
        assert!(
            example.contains("0-1") && example.contains("0-2"),
            "{example}"
        );
    }

    /// Goal: a receipt going back from Read to Delivered is a receipts anomaly.
    #[test]
    fn receipt_regression_is_receipts() {
        let mut b = clean();
        b.receipt(1, "m01", 2, ReceiptState::Delivered);
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Receipts, "regression", 1);
        assert!(
            report.examples(AnomalyKind::Receipts)[0].contains("Read"),
            "{report}"
        );
    }

    /// Goal: receipts for unknown messages, or for a recipient that never got the message, are
    /// receipts anomalies.
    #[test]
    fn receipts_for_wrong_messages_are_receipts() {
        let mut b = clean();
        b.receipt(1, "m404", 2, ReceiptState::Sent);
        b.receipt(2, "m11", 2, ReceiptState::Delivered);
        let report = check(&b.history());
        let kind = AnomalyKind::Receipts;
        assert_eq!(report.class_count(kind, "unknown-message"), 1, "{report}");
        assert_eq!(report.class_count(kind, "wrong-recipient"), 1, "{report}");
        assert_eq!(report.class_count(kind, "not-delivered"), 1, "{report}");
        assert_eq!(report.anomaly_total(), 3, "{report}");
    }

    /// Goal: replicas with different digests diverge.
    #[test]
    fn digest_difference_is_divergence() {
        let mut b = drained();
        b.status_where(
            |node, shard| {
                Some((
                    100,
                    [if (node, shard) == (3, 1) { "xx" } else { "aa" }, "bb"],
                ))
            },
            |_, _| Some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Divergence, "digest", 1);
        let example = &report.examples(AnomalyKind::Divergence)[0];
        assert!(example.contains("shard 1 projection inbox"), "{example}");
        assert!(example.contains("node 3=xx"), "{example}");
    }

    /// Goal: replicas with different applied indexes diverge.
    #[test]
    fn applied_index_difference_is_divergence() {
        let mut b = drained();
        b.status_where(
            |node, shard| Some((if (node, shard) == (2, 0) { 99 } else { 100 }, ["aa", "bb"])),
            |_, _| Some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Divergence, "applied-index", 1);
        assert!(
            report.examples(AnomalyKind::Divergence)[0].contains("node 2=99"),
            "{report}"
        );
    }

    /// Goal: a shard one node does not report is divergence.
    #[test]
    fn shard_missing_on_a_node_is_divergence() {
        let mut b = drained();
        let reported = |node, shard| (node, shard) != (3, 1);
        b.status_where(
            |node, shard| reported(node, shard).then_some((100, ["aa", "bb"])),
            |node, shard| reported(node, shard).then_some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::Divergence, "missing-shard", 1);
        assert!(
            report.examples(AnomalyKind::Divergence)[0].contains("[3]"),
            "{report}"
        );
    }

    /// Goal: no replica status at all fails the run.
    #[test]
    fn no_status_is_no_replica_status() {
        let report = check(&drained().history());
        assert_only(
            &report,
            AnomalyKind::NoReplicaStatus,
            "no-replica-status",
            1,
        );
    }

    /// Goal: a failed verification, or a replica never verified, is a rebuild mismatch.
    #[test]
    fn failed_or_missing_verification_is_rebuild_mismatch() {
        let mut b = drained();
        b.status_where(
            |_, _| Some((100, ["aa", "bb"])),
            |node, shard| Some((node, shard) != (2, 0)),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::RebuildMismatch, "verify-failed", 1);
        assert!(report.examples(AnomalyKind::RebuildMismatch)[0].contains("node 2 shard 0"));

        let mut b = drained();
        b.status_where(
            |_, _| Some((100, ["aa", "bb"])),
            |node, shard| ((node, shard) != (1, 1)).then_some(true),
        );
        let report = check(&b.history());
        assert_only(&report, AnomalyKind::RebuildMismatch, "not-verified", 1);
    }

    /// Goal: records that break the harness's own invariants are reported, not ignored.
    #[test]
    fn complete_without_invoke_is_malformed() {
        let mut b = clean();
        b.ok(999, "m999");
        let report = check(&b.history());
        assert_only(
            &report,
            AnomalyKind::Malformed,
            "complete-without-invoke",
            1,
        );
    }

    /// Goal: every record type survives a JSON-lines round trip, in the documented shape.
    #[test]
    fn history_round_trips_through_json_lines() {
        let history = clean().history();
        let mut writer = HistoryWriter::new(Vec::new());
        for record in &history.records {
            writer.append(record).unwrap();
        }
        let bytes = writer.into_inner();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text.lines().count(),
            history.records.len(),
            "one line per record"
        );
        assert!(text.contains(r#""type":"invoke""#), "{text}");
        assert!(
            text.contains(r#""outcome":{"status":"ok","message_id":"m01"}"#),
            "{text}"
        );
        assert!(text.contains(r#""state":"read""#), "{text}");
        assert_eq!(parse_jsonl(bytes.as_slice()).unwrap(), history);

        let path =
            std::env::temp_dir().join(format!("courier-history-{}.jsonl", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let read = read_jsonl(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read.unwrap(), history);
    }

    /// Goal: a bad line is an error naming the line, not a silently shorter history.
    #[test]
    fn bad_line_is_a_parse_error_with_its_number() {
        let text = "{\"type\":\"fault\",\"time_ms\":1,\"description\":\"heal\"}\n\n{\"type\":\"inv";
        let error = parse_jsonl(text.as_bytes()).unwrap_err();
        assert!(
            matches!(error, HistoryError::Parse { line: 3, .. }),
            "{error}"
        );
    }

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
