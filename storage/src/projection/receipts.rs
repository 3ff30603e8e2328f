//! Receipts: on the sender's shard, per sent message and recipient, the state the recipient's
//! copy reached: sent → delivered → read.
//!
//! Invariants (asserted): a recorded receipt moves strictly forward. Receipts arrive through the
//! outbox, exactly once and in order per source shard (duplicates were dropped by the
//! dispatcher), and the recipient's shard emits DELIVERED before READ for each message, so a
//! receipt that does not move forward is a bug.
//!
//! Beside each receipt: its entry in the sender's feed (by the log index that set it) and in a
//! time index (by `at_ms`), from which the shard leader proposes `ReceiptsForgotten` for the
//! receipts set longer than the exactly-once window ago. All three leave together; a receipt
//! that arrives after that is stored again as new (its earlier state is gone, so nothing checks
//! that it moves forward from there: each copy's receipts arrive in order, DELIVERED before
//! READ, so a late one is the copy's next state).

use courier_proto::pb::events::{ForgottenReceipt, ReceiptState};
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

/// Returns up to `limit` receipts set before `set_before_ms`, oldest first: the ones a
/// `ReceiptsForgotten` may name.
///
/// # Errors
/// A storage fault.
pub fn set_before(
    view: &View<'_, '_>,
    set_before_ms: u64,
    limit: usize,
) -> Result<Vec<ForgottenReceipt>> {
    let from = keys::receipt_by_time_start(view.shard());
    let to = keys::receipt_by_time_end(view.shard(), set_before_ms);
    Ok(view
        .scan::<()>(Projection::Receipts, &from, &to, limit)?
        .into_iter()
        .filter_map(|(key, ())| {
            let (set_at_ms, sender, message, recipient) = keys::receipt_by_time_parts(&key)?;
            Some(ForgottenReceipt {
                sender_user: sender.get(),
                message_id: message.as_bytes().to_vec(),
                recipient_user: recipient.get(),
                set_at_ms,
            })
        })
        .collect())
}

/// Writes a receipt and moves its feed and time index entries to the current index and time.
fn record(
    view: &mut View<'_, '_>,
    sender: UserId,
    message: MessageId,
    recipient: UserId,
    receipt: &Receipt,
) -> Result<()> {
    let shard = view.shard();
    let key = keys::receipt(shard, sender, message, recipient);
    let by_time = |at_ms| keys::receipt_by_time(shard, at_ms, sender, message, recipient);
    let old = view.get_with_index::<Receipt>(Projection::Receipts, &key)?;
    if let Some((old_at, _)) = &old {
        view.delete(keys::receipt_feed(
            shard, sender, *old_at, message, recipient,
        ))?;
    }
    match old {
        // Two states set in the same millisecond (DELIVERED and READ by one read): the same
        // index entry.
        Some((_, old)) if old.at_ms == receipt.at_ms => {}
        Some((_, old)) => {
            view.delete(by_time(old.at_ms))?;
            view.put_new(by_time(receipt.at_ms), &());
        }
        None => view.put_new(by_time(receipt.at_ms), &()),
    }
    // Keyed by this entry's index: no earlier entry wrote it, and a receipt moves once per
    // (message, recipient) per event.
    view.put_new(
        keys::receipt_feed(shard, sender, view.at(), message, recipient),
        receipt,
    );
    view.put(key, receipt)
}

/// Removes a receipt a `ReceiptsForgotten` names, with its feed and time index entries, if it is
/// still the one set at that time.
fn forget(view: &mut View<'_, '_>, forgotten: &super::decode::ForgottenReceipt<'_>) -> Result<()> {
    let shard = view.shard();
    let (sender, message, recipient) = (forgotten.sender, forgotten.message, forgotten.recipient);
    let key = keys::receipt(shard, sender, message, recipient);
    let Some((set_at, receipt)) = view.get_with_index::<Receipt>(Projection::Receipts, &key)?
    else {
        return Ok(());
    };
    if receipt.at_ms != forgotten.event.set_at_ms {
        return Ok(()); // moved on since the leader looked: its new time is indexed
    }
    view.delete(keys::receipt_feed(
        shard, sender, set_at, message, recipient,
    ))?;
    view.delete(keys::receipt_by_time(
        shard,
        receipt.at_ms,
        sender,
        message,
        recipient,
    ))?;
    view.delete(key)
}

/// `AccountDeleted`: every receipt of what `sender` sent that this shard holds leaves, with its
/// feed and time index entries (receipts arriving later are kept until retention forgets them).
fn forget_sender(view: &mut View<'_, '_>, sender: UserId) -> Result<()> {
    let shard = view.shard();
    let prefix = keys::user_records(shard, keys::tag::PRIMARY, sender);
    let end = keys::prefix_end(&prefix).expect("receipt prefixes end below 0xff..");
    for (key, receipt) in view.scan::<Receipt>(Projection::Receipts, &prefix, &end, usize::MAX)? {
        let (message, recipient) =
            keys::receipt_message_recipient(&key).expect("receipt keys name message and recipient");
        view.delete(keys::receipt_by_time(
            shard,
            receipt.at_ms,
            sender,
            message,
            recipient,
        ))?;
        view.delete(key)?;
    }
    view.delete_prefix(&keys::receipt_feed_prefix(shard, sender))
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
        Decoded::ReceiptsForgotten(receipts) => {
            for forgotten in receipts {
                forget(view, forgotten)?;
            }
            Ok(())
        }
        Decoded::AccountDeleted { user, .. } => forget_sender(view, *user),
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
        | Decoded::InboxForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::Code(_)
        | Decoded::Keys(_) => Ok(()),
    }
}
