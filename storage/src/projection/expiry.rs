//! Expiry: undelivered inbox messages ordered by the time they were stored, so the leader can
//! find what passed the retention limit with one bounded scan and propose `MessageExpired`.
//! Expiry itself is an event, so every replica and every rebuild agree on what expired.
//!
//! Invariants: an entry exists exactly for each stored message above the user's
//! `delivered_up_to` that has not expired.

use courier_proto::pb::store::ExpiryEntry;
use courier_proto::{InboxSeq, UserId};

use super::{Decoded, Projection, View, inbox};
use crate::error::Result;
use crate::keys;

/// An undelivered message due for expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// When it was stored in the inbox (leader clock, unix ms).
    pub stored_at_ms: u64,
    /// The recipient.
    pub user: UserId,
    /// Its inbox sequence.
    pub seq: InboxSeq,
    /// Its message id.
    pub message_id: Vec<u8>,
}

/// Returns up to `limit` undelivered messages stored before `cutoff_ms`, oldest first.
///
/// # Errors
/// A storage fault.
pub fn due(view: &View<'_, '_>, cutoff_ms: u64, limit: usize) -> Result<Vec<Due>> {
    let from = keys::expiry_prefix(view.shard());
    let to = keys::KeyBuf::shard(view.shard())
        .u8(keys::tag::PRIMARY)
        .u64(cutoff_ms)
        .done();
    Ok(view
        .scan::<ExpiryEntry>(Projection::Expiry, &from, &to, limit)?
        .into_iter()
        .filter_map(|(key, entry)| {
            let (stored_at_ms, user, seq) = keys::expiry_parts(&key)?;
            Some(Due {
                stored_at_ms,
                user,
                seq,
                message_id: entry.message_id,
            })
        })
        .collect())
}

/// Folds one event into the expiry index.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        Decoded::MessageDelivered(delivered) => {
            let user = delivered.recipient;
            let seq = inbox::tail(view, user)?.next();
            // A fresh seq: no entry has this key yet.
            view.put_new(
                keys::expiry(shard, delivered.event.stored_at_ms, user, seq),
                &ExpiryEntry {
                    message_id: delivered.event.message_id.clone(),
                },
            );
            Ok(())
        }
        Decoded::DeliveryAcked(acked) => {
            let user = acked.user;
            let state = inbox::state(view, user)?;
            let after = InboxSeq::new(state.delivered_up_to);
            for (seq, entry) in inbox::entries_between(view, user, after, acked.up_to)? {
                view.delete(keys::expiry(shard, entry.stored_at_ms, user, seq))?;
            }
            Ok(())
        }
        Decoded::AccountDeleted { user, .. } => {
            // Applied before the inbox: its undelivered messages are still there to read.
            let state = inbox::state(view, *user)?;
            let (after, tail) = (
                InboxSeq::new(state.delivered_up_to),
                InboxSeq::new(state.tail_seq),
            );
            for (seq, entry) in inbox::entries_between(view, *user, after, tail)? {
                view.delete(keys::expiry(shard, entry.stored_at_ms, *user, seq))?;
            }
            Ok(())
        }
        Decoded::MessageExpired(expired) => {
            let (user, seq) = (expired.user, expired.seq);
            let entry =
                inbox::entry(view, user, seq)?.expect("an expiring message is in the inbox");
            view.delete(keys::expiry(shard, entry.stored_at_ms, user, seq))
        }
        Decoded::MessageSent(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::UserRegistered(_)
        | Decoded::DeviceRegistered(_)
        | Decoded::DeviceRevoked(_)
        | Decoded::GroupCreated(_)
        | Decoded::MemberAdded(_)
        | Decoded::MemberRemoved(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::Code(_)
        | Decoded::Keys(_) => Ok(()),
    }
}
