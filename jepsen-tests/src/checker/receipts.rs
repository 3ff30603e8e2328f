//! `receipts`: a receipt never goes back in time, refers to a message that exists, and names
//! that message's sender as observer and its recipient; Delivered and Read need a delivery.

use std::collections::BTreeMap;

use super::index::{Inboxes, Index};
use super::report::{AnomalyKind, Findings};
use crate::history::{Receipt, ReceiptState};

/// `receipts`: per (observer, message, recipient) the observed states never go back in time
/// (`regression`); a receipt's message must exist (`unknown-message`), belong to the observer
/// (`wrong-observer`) and be addressed to the recipient (`wrong-recipient`); and a Delivered or
/// Read receipt needs the message in some session of the recipient (`not-delivered`).
pub(super) fn check_receipts(index: &Index<'_>, inboxes: &Inboxes<'_>, findings: &mut Findings) {
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

#[cfg(test)]
mod tests {
    use crate::checker::fixture::*;
    use crate::checker::{AnomalyKind, check};
    use crate::history::ReceiptState;

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
}
