//! `duplicate`: a send is applied at most once (retries included), and a message id names one
//! send.

use super::index::{Inboxes, Index};
use super::report::{AnomalyKind, Findings};

/// `duplicate`: one client id at two seqs of one inbox (`client-id-twice`; an indeterminate
/// send may appear once or never, never twice), two client ids sharing one message id
/// (`message-id-shared`), or one client id acked with two message ids (`acked-twice`: the
/// server's dedup of retries failed).
pub(super) fn check_duplicates(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
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

#[cfg(test)]
mod tests {
    use crate::checker::fixture::*;
    use crate::checker::{AnomalyKind, check};

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
}
