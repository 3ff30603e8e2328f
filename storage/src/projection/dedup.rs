//! Dedup projection: (sender user, sender device, client message id) → the first send result.
//!
//! Invariants: a key is written once (the dispatcher turns a known client id into a no-op before
//! any projection runs). Entries are kept for as long as the shard keeps the message; retention
//! of dedup entries is a later decision (docs/EVENTS.md).

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::store::SendResult;
use courier_proto::{DeviceId, UserId};

use super::{Projection, View};
use crate::error::Result;
use crate::keys;

/// Returns the first result of a send, if this client id was seen.
///
/// # Errors
/// A storage fault.
pub fn lookup(
    view: &View<'_, '_>,
    user: UserId,
    device: DeviceId,
    client_msg_id: &str,
) -> Result<Option<SendResult>> {
    view.get(
        Projection::Dedup,
        &keys::dedup(view.shard(), user, device, client_msg_id),
    )
}

/// Folds one event into the dedup projection.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Kind) -> Result<()> {
    match event {
        Kind::MessageSent(sent) => {
            let user = UserId::new(sent.sender_user).expect("leader validated the sender");
            let device = DeviceId::new(sent.sender_device).expect("leader validated the device");
            let key = keys::dedup(view.shard(), user, device, &sent.client_msg_id);
            let result = SendResult {
                message_id: sent.message_id.clone(),
                sent_at_ms: sent.sent_at_ms,
                log_index: view.at().get(),
            };
            view.put(key, &result)
        }
        Kind::MessageDelivered(_)
        | Kind::DeliveryAcked(_)
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
