//! `unexpected`: every delivered message must match a send that may have been applied: the
//! right recipient, sender and message id, and not a send whose every attempt failed.

use super::index::{Inboxes, Index};
use super::report::{AnomalyKind, Findings};

/// `unexpected`: a delivered client id that was never invoked (`never-invoked`), that reached a
/// user other than its recipient (`wrong-recipient`) or claims another sender (`wrong-sender`),
/// that carries a message id its ok attempt did not return (`wrong-message-id`), or whose every
/// attempt failed (`failed-send-delivered`: fail means definitely not applied).
pub(super) fn check_unexpected(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
    for (user, inbox) in &inboxes.by_user {
        for (client_id, seen) in &inbox.by_client {
            let seqs = format!("seqs {:?}, sessions {:?}", seen.seqs, seen.sessions);
            let Some(send) = index.sends.get(client_id) else {
                let detail =
                    format!("{client_id} delivered to user {user} ({seqs}) was never invoked");
                findings.add(AnomalyKind::Unexpected, "never-invoked", detail);
                continue;
            };
            if !index.inboxes_of(send).contains(user) {
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

#[cfg(test)]
mod tests {
    use crate::checker::fixture::*;
    use crate::checker::{AnomalyKind, check};

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

    /// [`traffic`] drained with each send in its sender's inbox too, user 1's being
    /// `user_1_inbox`; `own_copies`: the run says its users have a second device.
    fn with_own_copies(own_copies: bool, user_1_inbox: &[Msg]) -> crate::history::History {
        let mut b = traffic();
        if own_copies {
            b.own_copies();
        }
        let mut inbox_2 = inbox_of_2();
        inbox_2.push(msg(4, "m11", 2, "1-1"));
        b.drain(2, &inbox_2);
        b.drain(1, user_1_inbox);
        b.healthy_status();
        b.history()
    }

    /// User 1's inbox with its own copies: its sends 0-1, 0-2 and the indeterminate 0-5, then
    /// user 2's message.
    fn inbox_of_1_with_own_copies() -> Vec<Msg> {
        vec![
            msg(1, "m01", 1, "0-1"),
            msg(2, "m02", 1, "0-2"),
            msg(3, "m05", 1, "0-5"),
            msg(4, "m11", 2, "1-1"),
        ]
    }

    /// Goal: in a run whose users have a second device, each send in its sender's inbox is
    /// expected, not unexpected.
    #[test]
    fn own_copies_pass_when_the_run_has_them() {
        let report = check(&with_own_copies(true, &inbox_of_1_with_own_copies()));
        assert_eq!(report.anomaly_total(), 0, "{report}");
    }

    /// Goal: an acked send missing from its sender's inbox is lost when own copies are due.
    #[test]
    fn a_missing_own_copy_is_lost() {
        let inbox = vec![
            msg(1, "m01", 1, "0-1"),
            msg(2, "m05", 1, "0-5"),
            msg(3, "m11", 2, "1-1"),
        ];
        let report = check(&with_own_copies(true, &inbox));
        assert_only(&report, AnomalyKind::Lost, "lost-postfix", 1);
    }

    /// Goal: without a second device a send has no business in its sender's inbox.
    #[test]
    fn own_copies_are_unexpected_when_the_run_has_none() {
        let report = check(&with_own_copies(false, &inbox_of_1_with_own_copies()));
        assert_only(&report, AnomalyKind::Unexpected, "wrong-recipient", 4);
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
}
