//! Device cursors: per device, the inbox sequence it acked up to.
//!
//! Invariants (asserted): a cursor only moves forward and never passes the user's inbox tail.
//! An ack at or below the cursor (two acks racing from one device) changes nothing.

use courier_proto::{DeviceId, InboxSeq, UserId};

use super::{Decoded, Projection, View, inbox};
use crate::error::Result;
use crate::keys;

/// Returns a device's acked sequence (zero when it never acked).
///
/// # Errors
/// A storage fault.
pub fn acked(view: &View<'_, '_>, user: UserId, device: DeviceId) -> Result<InboxSeq> {
    let key = keys::cursor(view.shard(), user, device);
    Ok(InboxSeq::new(
        view.get_u64(Projection::Cursors, &key)?.unwrap_or(0),
    ))
}

/// Folds one event into the cursors.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    match event {
        Decoded::DeliveryAcked(ack) => {
            let (user, device, up_to) = (ack.user, ack.device, ack.up_to);
            assert!(
                up_to <= inbox::tail(view, user)?,
                "acks never pass the inbox tail"
            );
            if up_to > acked(view, user, device)? {
                view.put_u64(keys::cursor(view.shard(), user, device), up_to.get())?;
            }
            Ok(())
        }
        Decoded::AccountDeleted { user, .. } => {
            view.delete_prefix(&keys::user_records(view.shard(), keys::tag::PRIMARY, *user))
        }
        Decoded::MessageSent(_)
        | Decoded::MessageDelivered(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
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
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::Code(_)
        | Decoded::Keys(_) => Ok(()),
    }
}
