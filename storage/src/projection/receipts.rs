//! Receipts: on the sender's shard, per sent message and recipient, the state the recipient's
//! copy reached: sent → delivered → read.
//!
//! Invariants (asserted): a recorded receipt moves strictly forward. Receipts arrive through the
//! outbox, exactly once and in order per source shard (duplicates were dropped by the
//! dispatcher), and the recipient's shard emits DELIVERED before READ for each message, so a
//! receipt that does not move forward is a bug.

use courier_proto::pb::events::ReceiptState;
use courier_proto::pb::store::Receipt;
use courier_proto::{MessageId, ReceiptFeedPosition, UserId};

use super::{Decoded, Projection, Target, View};
use crate::error::Result;
use crate::keys;

/// Returns every recipient's receipt of one message, by recipient.
///
/// # Errors
/// A storage fault.
pub fn of_message(
    view: &View<'_, '_>,
    sender: UserId,
    message: MessageId,
) -> Result<Vec<(UserId, Receipt)>> {
    let prefix = keys::receipt_message_prefix(view.shard(), sender, message);
    let end = keys::prefix_end(&prefix).expect("receipt prefixes end below 0xff..");
    Ok(view
        .scan::<Receipt>(Projection::Receipts, &prefix, &end, usize::MAX)?
        .into_iter()
        .filter_map(|(key, receipt)| Some((keys::receipt_recipient(&key)?, receipt)))
        .collect())
}

/// One change in a sender's receipt feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedItem {
    /// The log index that set this state (the feed is ordered by it).
    pub set_at: courier_proto::LogIndex,
    /// The message.
    pub message: MessageId,
    /// The recipient whose copy moved.
    pub recipient: UserId,
    /// Its state.
    pub receipt: Receipt,
}

impl FeedItem {
    /// This change's position in the feed, from which a device resumes after it.
    pub fn position(&self) -> ReceiptFeedPosition {
        ReceiptFeedPosition::of_change(self.set_at, self.message, self.recipient)
    }
}

/// Returns up to `limit` receipt changes of `sender`'s messages strictly after `after`, in feed
/// order (log index, then message id, then recipient): what a sender's device stream pushes. A
/// caller pages through the feed by passing the last item's [`FeedItem::position`]; one log entry
/// may hold any number of changes, and paging resumes inside it.
///
/// # Errors
/// A storage fault.
pub fn feed(
    view: &View<'_, '_>,
    sender: UserId,
    after: &ReceiptFeedPosition,
    limit: usize,
) -> Result<Vec<FeedItem>> {
    let prefix = keys::receipt_feed_prefix(view.shard(), sender);
    let from = keys::receipt_feed_after(view.shard(), sender, after);
    let to = keys::prefix_end(&prefix).expect("feed prefixes end below 0xff..");
    Ok(view
        .scan::<Receipt>(Projection::Receipts, &from, &to, limit)?
        .into_iter()
        .filter_map(|(key, receipt)| {
            let (set_at, message, recipient) = keys::receipt_feed_parts(&key)?;
            Some(FeedItem {
                set_at,
                message,
                recipient,
                receipt,
            })
        })
        .collect())
}

/// Writes a receipt and moves its feed entry to the current index.
fn record(
    view: &mut View<'_, '_>,
    sender: UserId,
    message: MessageId,
    recipient: UserId,
    receipt: &Receipt,
) -> Result<()> {
    let shard = view.shard();
    let key = keys::receipt(shard, sender, message, recipient);
    if let Some((old_at, _)) = view.get_with_index::<Receipt>(Projection::Receipts, &key)? {
        view.delete(keys::receipt_feed(
            shard, sender, old_at, message, recipient,
        ))?;
    }
    // Keyed by this entry's index: no earlier entry wrote it, and a receipt moves once per
    // (message, recipient) per event.
    view.put_new(
        keys::receipt_feed(shard, sender, view.at(), message, recipient),
        receipt,
    );
    view.put(key, receipt)
}

/// Folds one event into the receipts.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        Decoded::MessageSent(sent) => {
            // A 1:1 message has one recipient; a group message one per member other than the
            // sender (members at this position: the epoch the message was accepted under).
            let recipients: Vec<UserId> = match sent.to {
                Some(Target::User(recipient, _)) => vec![recipient],
                Some(Target::Group(group)) => super::groups::members(view, group)?
                    .into_iter()
                    .map(|(member, _)| member)
                    .filter(|member| *member != sent.sender)
                    .collect(),
                None => return Ok(()),
            };
            let receipt = Receipt {
                state: ReceiptState::Sent.into(),
                at_ms: sent.event.sent_at_ms,
            };
            for recipient in recipients {
                record(view, sent.sender, sent.message, recipient, &receipt)?;
            }
            Ok(())
        }
        Decoded::ReceiptRecorded(decoded) => {
            let (sender, message, recipient, recorded) = (
                decoded.sender,
                decoded.message,
                decoded.recipient,
                decoded.event,
            );
            let key = keys::receipt(shard, sender, message, recipient);
            let old = view
                .get::<Receipt>(Projection::Receipts, &key)?
                .map_or(ReceiptState::Unspecified, |r| r.state());
            let new = recorded.state();
            assert!(new > old, "receipts only move forward: {old:?} -> {new:?}");
            record(
                view,
                sender,
                message,
                recipient,
                &Receipt {
                    state: recorded.state,
                    at_ms: recorded.at_ms,
                },
            )
        }
        Decoded::MessageDelivered(_)
        | Decoded::DeliveryAcked(_)
        | Decoded::ReadUpTo(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::UserRegistered(_)
        | Decoded::DeviceRegistered(_)
        | Decoded::DeviceRevoked(_)
        | Decoded::GroupCreated(_)
        | Decoded::MemberAdded(_)
        | Decoded::MemberRemoved(_)
        | Decoded::MessageExpired(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_) => Ok(()),
    }
}
