//! The history indexed for the checks: each attempt of each send, what clients know of each
//! logical send (one client id), every stream session, the status records, and every user's
//! inbox as the union of all its sessions saw it.
//!
//! Building the index is also where records that break the harness's own invariants are found
//! (`malformed`): an op invoked or completed twice, a completion without an invoke, a delivery
//! outside any session.

use std::collections::{BTreeMap, BTreeSet};

use super::report::{AnomalyKind, Counts, Findings};
use crate::history::{
    Complete, Delivered, History, Invoke, Outcome, Receipt, Record, Replica, SessionStart, Verify,
};

/// One attempt of a send.
struct Op<'h> {
    invoke: &'h Invoke,
    complete: Option<&'h Complete>,
}

/// What the clients know about one logical send (one client id), over all its attempts.
pub(super) struct Send<'h> {
    pub(super) from_user: u64,
    pub(super) to_user: u64,
    /// The earliest invoke of any attempt: the send cannot have been applied before it.
    pub(super) first_invoke_ms: u64,
    /// The earliest ok completion, with its message id.
    pub(super) ack: Option<(u64, &'h str)>,
    /// Every message id an ok attempt returned (more than one means dedup failed).
    pub(super) acked_ids: BTreeSet<&'h str>,
    /// Some attempt ended info or never completed, so the send may have been applied.
    pub(super) indeterminate: bool,
}

/// One stream session and what it received, in record order.
pub(super) struct Session<'h> {
    pub(super) start: &'h SessionStart,
    pub(super) deliveries: Vec<&'h Delivered>,
}

/// The history, indexed for the checks.
#[derive(Default)]
pub(super) struct Index<'h> {
    ops: BTreeMap<u64, Op<'h>>,
    pub(super) sends: BTreeMap<&'h str, Send<'h>>,
    pub(super) sessions: BTreeMap<u64, Session<'h>>,
    pub(super) receipts: Vec<&'h Receipt>,
    /// The last report per (shard, node): the harness may poll until replicas converge.
    pub(super) replicas: BTreeMap<(u32, u32), &'h Replica>,
    pub(super) verifies: Vec<&'h Verify>,
    pub(super) deliveries: usize,
    pub(super) faults: usize,
    /// Per user, the seqs the nodes may have trimmed (see [`Index::trimmable_up_to`]); empty
    /// when the run kept delivered bodies ([`crate::history::Retention`]).
    trimmable: BTreeMap<u64, u64>,
    /// Each send is stored for its sender too ([`crate::history::Retention::own_copies`]).
    own_copies: bool,
}

impl<'h> Index<'h> {
    /// Indexes every record; records that break the harness's invariants become `malformed`.
    pub(super) fn build(history: &'h History, findings: &mut Findings) -> Self {
        let mut index = Index::default();
        let mut acked: BTreeMap<(u64, u32), u64> = BTreeMap::new();
        let mut keep_delivered = true;
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
                Record::Acked(a) => {
                    let up_to = acked.entry((a.user, a.device)).or_default();
                    *up_to = (*up_to).max(a.up_to_seq);
                }
                Record::Retention(retention) => {
                    keep_delivered = retention.keep_delivered;
                    index.own_copies = retention.own_copies;
                }
            }
        }
        index.mark_pending_indeterminate();
        if !keep_delivered {
            index.trimmable = index.lowest_acks(&acked);
        }
        index
    }

    /// Per user, the lowest seq every device of the user acked (the devices its sessions show;
    /// a device that never acked counts 0).
    fn lowest_acks(&self, acked: &BTreeMap<(u64, u32), u64>) -> BTreeMap<u64, u64> {
        let devices: BTreeSet<(u64, u32)> = self
            .sessions
            .values()
            .map(|s| (s.start.user, s.start.device))
            .collect();
        let mut lowest: BTreeMap<u64, u64> = BTreeMap::new();
        for (user, device) in devices {
            let seq = acked.get(&(user, device)).copied().unwrap_or(0);
            lowest
                .entry(user)
                .and_modify(|l| *l = (*l).min(seq))
                .or_insert(seq);
        }
        lowest
    }

    /// The seqs of `user`'s inbox the nodes may have trimmed: up to the lowest seq every device
    /// of the user acked, or none when bodies are kept. A drain need not return these. A device
    /// acks only up to what its sessions delivered, and those sessions are checked for gaps, so
    /// every device received each of them.
    /// The users whose inbox `send` must reach: its recipient, and its sender when the run's
    /// users have a second device (the sender's own copy).
    pub(super) fn inboxes_of(&self, send: &Send<'_>) -> Vec<u64> {
        let mut users = vec![send.to_user];
        if self.own_copies && send.from_user != send.to_user {
            users.push(send.from_user);
        }
        users
    }

    pub(super) fn trimmable_up_to(&self, user: u64) -> u64 {
        self.trimmable.get(&user).copied().unwrap_or(0)
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
    pub(super) fn drain_sessions(&self, user: u64) -> impl Iterator<Item = &Session<'h>> {
        self.sessions
            .values()
            .filter(move |session| session.start.drain && session.start.user == user)
    }

    pub(super) fn counts(&self) -> Counts {
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
pub(super) struct Seen<'h> {
    pub(super) seqs: BTreeSet<u64>,
    pub(super) message_ids: BTreeSet<&'h str>,
    pub(super) from_users: BTreeSet<u64>,
    pub(super) sessions: BTreeSet<u64>,
}

/// One user's inbox as the union of all its sessions (every device, node, live and drain).
#[derive(Default)]
pub(super) struct Inbox<'h> {
    /// seq → (client id, message id) → sessions that saw that message at that seq.
    pub(super) by_seq: BTreeMap<u64, BTreeMap<(&'h str, &'h str), BTreeSet<u64>>>,
    pub(super) by_client: BTreeMap<&'h str, Seen<'h>>,
}

/// Every user's inbox, plus message-id lookups for the receipt and duplicate checks.
#[derive(Default)]
pub(super) struct Inboxes<'h> {
    pub(super) by_user: BTreeMap<u64, Inbox<'h>>,
    /// message id → client ids carrying it, from ok completions and deliveries.
    pub(super) message_clients: BTreeMap<&'h str, BTreeSet<&'h str>>,
    /// (recipient, message id) pairs seen in some session of that recipient.
    pub(super) delivered_to: BTreeSet<(u64, &'h str)>,
}

impl<'h> Inboxes<'h> {
    pub(super) fn build(index: &Index<'h>) -> Self {
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
    pub(super) fn seq_of(&self, user: u64, client_id: &str) -> Option<u64> {
        let seen = self.by_user.get(&user)?.by_client.get(client_id)?;
        seen.seqs.first().copied()
    }
}

/// "session 4 (user 2, device 1, node 3)".
pub(super) fn describe_session(start: &SessionStart) -> String {
    format!(
        "session {} (user {}, device {}, node {})",
        start.session, start.user, start.device, start.node
    )
}

#[cfg(test)]
mod tests {
    use crate::checker::fixture::{assert_only, clean};
    use crate::checker::{AnomalyKind, check};

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
}
