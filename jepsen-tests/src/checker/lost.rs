//! `undrained` and `lost`: every acked send, and every message any session saw, must be in
//! every final drain of its recipient (every device on every node, after the heal), unless the
//! run's nodes trim delivered messages and every device of the recipient acked it
//! ([`Index::trimmable_up_to`]). A recipient with no drain at all cannot be checked, which is an
//! anomaly of its own, never a pass.

use std::collections::{BTreeMap, BTreeSet};

use super::index::{Inboxes, Index, describe_session};
use super::report::{AnomalyKind, Findings};
use crate::history::SessionStart;

/// `undrained`: a user who was sent to, or who streamed, but has no drain session. Without a
/// drain nothing can be said about lost messages of that user, so the run must not pass.
pub(super) fn check_undrained(index: &Index<'_>, findings: &mut Findings) {
    let mut users: BTreeSet<u64> = index
        .sends
        .values()
        .flat_map(|send| index.inboxes_of(send))
        .collect();
    users.extend(index.sessions.values().map(|session| session.start.user));
    for user in users {
        if index.drain_sessions(user).next().is_some() {
            continue;
        }
        let acked = index
            .sends
            .values()
            .filter(|send| send.ack.is_some() && index.inboxes_of(send).contains(&user))
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
pub(super) fn check_lost(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    // (from, to) → [(ack time, client id)], sorted by ack time.
    let mut streams: BTreeMap<(u64, u64), Vec<(u64, &str)>> = BTreeMap::new();
    for (client_id, send) in &index.sends {
        if let Some((ack_ms, _)) = send.ack {
            for inbox in index.inboxes_of(send) {
                let stream = streams.entry((send.from_user, inbox)).or_default();
                stream.push((ack_ms, client_id));
            }
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
            .map(|(_, client_id)| missing_drains(index, inboxes, (to, client_id), &drains))
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
pub(super) fn check_vanished(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    for (user, inbox) in &inboxes.by_user {
        let drains: Vec<&SessionStart> = index.drain_sessions(*user).map(|s| s.start).collect();
        if drains.is_empty() {
            continue; // Reported by check_undrained.
        }
        for (client_id, seen) in &inbox.by_client {
            let acked_here = index
                .sends
                .get(client_id)
                .is_some_and(|send| send.ack.is_some() && index.inboxes_of(send).contains(user));
            if acked_here {
                continue;
            }
            let missing = missing_drains(index, inboxes, (*user, client_id), &drains);
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

/// The drain sessions of `user` that never delivered `client_id`; none when its seq is one the
/// nodes may have trimmed (every device of the user acked it).
fn missing_drains<'s>(
    index: &Index<'_>,
    inboxes: &Inboxes<'_>,
    (user, client_id): (u64, &str),
    drains: &[&'s SessionStart],
) -> Vec<&'s SessionStart> {
    if inboxes
        .seq_of(user, client_id)
        .is_some_and(|seq| seq <= index.trimmable_up_to(user))
    {
        return Vec::new();
    }
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

#[cfg(test)]
mod tests {
    use crate::checker::fixture::*;
    use crate::checker::{AnomalyKind, check};

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

    /// Goal: when the nodes trim delivered bodies, a drain may leave out exactly the messages
    /// every device of the recipient received and acked; anything else it leaves out is lost,
    /// and with bodies kept nothing is excused.
    #[test]
    fn trimmed_messages_are_excused_only_when_every_device_acked_them() {
        let run = |keep_delivered: bool, acks: [u64; 2]| {
            let mut b = traffic();
            b.retention(keep_delivered);
            b.stream((2, 2, 1), 0, false, &inbox_of_2());
            for (device, up_to) in (1..).zip(acks) {
                b.acked(2, device, up_to);
            }
            // Every node trimmed seqs 1 and 2 (0-1 and 0-2).
            b.drain(2, &inbox_of_2()[2..]);
            b.drain(1, &inbox_of_1());
            b.healthy_status();
            check(&b.history())
        };
        let report = run(false, [2, 3]);
        assert!(report.is_valid(), "both devices acked seq 2: {report}");

        let report = run(false, [2, 1]);
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "lost-postfix"),
            1,
            "device 2 acked only seq 1, so 0-2 must still be there: {report}"
        );
        assert_eq!(
            report.class_count(AnomalyKind::Order, "session-skip"),
            6,
            "and every drain of user 2 skips seq 2: {report}"
        );
        assert_eq!(report.anomaly_total(), 7, "{report}");

        let report = run(true, [2, 3]);
        assert_eq!(
            report.class_count(AnomalyKind::Lost, "lost-prefix"),
            2,
            "bodies kept: nothing is excused: {report}"
        );
        assert_eq!(report.anomaly_total(), 8, "{report}");
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
}
