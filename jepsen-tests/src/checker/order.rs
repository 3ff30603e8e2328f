//! `order`: every session of a user agrees on which message sits at each seq, each session
//! delivers a gap-free run of seqs from its resume point, and one sender's sequential sends to
//! one recipient keep their order in the recipient's inbox.

use std::collections::BTreeMap;

use super::index::{Inboxes, Index, describe_session};
use super::report::{AnomalyKind, Findings};

/// `order` / `inconsistent-seq`: every session of a user (all devices, all nodes, live and
/// drain) must map each seq to the same message.
pub(super) fn check_seq_agreement(inboxes: &Inboxes<'_>, findings: &mut Findings) {
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
/// the expectation restarts from the seq actually delivered, so one gap is one finding. A final
/// drain starts past the seqs the nodes may have trimmed ([`Index::trimmable_up_to`]): a live
/// session never resumes below them, since every device acked them.
pub(super) fn check_session_contiguity(index: &Index<'_>, findings: &mut Findings) {
    for session in index.sessions.values() {
        let start = session.start;
        let mut expected = start.resume_after_seq.saturating_add(1);
        if start.drain {
            let trimmed = index.trimmable_up_to(start.user);
            if let Some(first) = session.deliveries.first()
                && first.seq > expected
                && first.seq <= trimmed.saturating_add(1)
            {
                expected = first.seq;
            }
        }
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
pub(super) fn check_sender_fifo(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    let mut streams: BTreeMap<(u64, u64), Vec<Placed<'_>>> = BTreeMap::new();
    for (client_id, send) in &index.sends {
        let Some((ack_ms, _)) = send.ack else {
            continue;
        };
        // In the sender's own inbox (own copies) the stream is all of the sender's sends: one
        // shard applies them in commit order, so real-time order holds across recipients too.
        for inbox in index.inboxes_of(send) {
            let Some(seq) = inboxes.seq_of(inbox, client_id) else {
                continue;
            };
            let placed = Placed {
                client_id,
                ack_ms,
                invoke_ms: send.first_invoke_ms,
                seq,
            };
            streams
                .entry((send.from_user, inbox))
                .or_default()
                .push(placed);
        }
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

#[cfg(test)]
mod tests {
    use crate::checker::fixture::*;
    use crate::checker::{AnomalyKind, check};

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
}
