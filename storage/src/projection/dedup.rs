//! Dedup projection: (sender user, sender device, client message id) → the first send result.
//!
//! Invariants: a key is written once (the dispatcher turns a known client id into a no-op before
//! any projection runs). Entries are kept for as long as the shard keeps the message; retention
//! of dedup entries is a later decision (docs/EVENTS.md).

use courier_proto::pb::store::SendResult;
use courier_proto::{DeviceId, UserId};

use super::{Decoded, Projection, View};
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
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    match event {
        Decoded::MessageSent(sent) => {
            let key = keys::dedup(
                view.shard(),
                sent.sender,
                sent.device,
                &sent.event.client_msg_id,
            );
            let result = SendResult {
                message_id: sent.event.message_id.clone(),
                sent_at_ms: sent.event.sent_at_ms,
                log_index: view.at().get(),
            };
            view.put(key, &result)
        }
        Decoded::MessageDelivered(_)
        | Decoded::DeliveryAcked(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::UserRegistered(_)
        | Decoded::DeviceRegistered(_)
        | Decoded::DeviceRevoked(_)
        | Decoded::GroupCreated(_)
        | Decoded::MemberAdded(_)
        | Decoded::MemberRemoved(_)
        | Decoded::MessageExpired(_) => Ok(()),
    }
}
