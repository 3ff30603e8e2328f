//! Device cursors: per device, the inbox sequence it acked up to.
//!
//! Invariants (asserted): a cursor only moves forward and never passes the user's inbox tail.
//! An ack at or below the cursor (two acks racing from one device) changes nothing.

use courier_proto::pb::events::event::Kind;
use courier_proto::{DeviceId, InboxSeq, UserId};

use super::{Projection, View, inbox};
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
pub fn apply(view: &mut View<'_, '_>, event: &Kind) -> Result<()> {
    match event {
        Kind::DeliveryAcked(ack) => {
            let user = UserId::new(ack.user).expect("leader validated the user");
            let device = DeviceId::new(ack.device).expect("leader validated the device");
            let up_to = InboxSeq::new(ack.up_to_seq);
            assert!(
                up_to <= inbox::tail(view, user)?,
                "acks never pass the inbox tail"
            );
            if up_to > acked(view, user, device)? {
                view.put_u64(keys::cursor(view.shard(), user, device), up_to.get())?;
            }
            Ok(())
        }
        Kind::MessageSent(_)
        | Kind::MessageDelivered(_)
        | Kind::ReadUpTo(_)
        | Kind::ReceiptRecorded(_)
        | Kind::OutboxTrimmed(_)
        | Kind::UserRegistered(_)
        | Kind::DeviceRegistered(_)
        | Kind::DeviceRevoked(_)
        | Kind::GroupCreated(_)
        | Kind::MemberAdded(_)
        | Kind::MemberRemoved(_)
        | Kind::MessageExpired(_) => Ok(()),
    }
}
