//! Dedup projection: (sender user, sender device, client message id) → the first send result,
//! and a time index of the same sends (sent time first) so that the sender's shard leader finds
//! the ones older than the dedup window (`retention.dedup`) with one bounded scan and proposes
//! `SendsForgotten` for them.
//!
//! Invariants: a record is written once (the dispatcher turns a known client id into a no-op
//! before any projection runs); a record and its index entry exist together, from its
//! `MessageSent` until a `SendsForgotten` names it (by client id and sent time, so a forget
//! applied late never removes a later send's record). A retry after that is a new send: the
//! exactly-once window (docs/API.md).

use courier_proto::pb::events::ForgottenSend;
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

/// Returns up to `limit` sends made before `sent_before_ms`, oldest first: the ones a
/// `SendsForgotten` may name.
///
/// # Errors
/// A storage fault.
pub fn sent_before(
    view: &View<'_, '_>,
    sent_before_ms: u64,
    limit: usize,
) -> Result<Vec<ForgottenSend>> {
    let from = keys::dedup_by_time_start(view.shard());
    let to = keys::dedup_by_time_end(view.shard(), sent_before_ms);
    Ok(view
        .scan::<()>(Projection::Dedup, &from, &to, limit)?
        .into_iter()
        .filter_map(|(key, ())| {
            let (sent_at_ms, user, device, client_msg_id) = keys::dedup_by_time_parts(&key)?;
            Some(ForgottenSend {
                sender_user: user.get(),
                sender_device: device.get(),
                client_msg_id: client_msg_id.to_owned(),
                sent_at_ms,
            })
        })
        .collect())
}

/// Returns up to `limit` of `user`'s sends recorded on this shard, in key order: the ones a
/// `SendsForgotten` names when the account closes. Its group sends are recorded on their groups'
/// shards, which its `AccountDeleted` does not reach, and a later registration of the number
/// counts its devices from 1 again: a client id it reused would be answered an old send's result.
///
/// # Errors
/// A storage fault.
pub fn sends_of(view: &View<'_, '_>, user: UserId, limit: usize) -> Result<Vec<ForgottenSend>> {
    let prefix = keys::user_records(view.shard(), keys::tag::PRIMARY, user);
    let end = keys::prefix_end(&prefix).expect("dedup prefixes end below 0xff..");
    Ok(view
        .scan::<SendResult>(Projection::Dedup, &prefix, &end, limit)?
        .into_iter()
        .filter_map(|(key, result)| {
            let (user, device, client_msg_id) = keys::dedup_parts(&key)?;
            Some(ForgottenSend {
                sender_user: user.get(),
                sender_device: device.get(),
                client_msg_id: client_msg_id.to_owned(),
                sent_at_ms: result.sent_at_ms,
            })
        })
        .collect())
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
            view.put(key, &result)?;
            // A new record, so a new index entry (the forget that removed an earlier record of
            // this client id removed its entry too).
            view.put_new(
                keys::dedup_by_time(
                    view.shard(),
                    sent.event.sent_at_ms,
                    sent.sender,
                    sent.device,
                    &sent.event.client_msg_id,
                ),
                &(),
            );
            Ok(())
        }
        Decoded::SendsForgotten(sends) => {
            for send in sends {
                let client_msg_id = &send.event.client_msg_id;
                let key = keys::dedup(view.shard(), send.sender, send.device, client_msg_id);
                // Only the send named: a later send of the same client id (after an earlier
                // forget) keeps its record, even if this event is applied again.
                let named = view
                    .get::<SendResult>(Projection::Dedup, &key)?
                    .is_some_and(|known| known.sent_at_ms == send.event.sent_at_ms);
                if named {
                    view.delete(key)?;
                }
                view.delete(keys::dedup_by_time(
                    view.shard(),
                    send.event.sent_at_ms,
                    send.sender,
                    send.device,
                    client_msg_id,
                ))?;
            }
            Ok(())
        }
        Decoded::AccountDeleted { user, .. } => {
            // The user's sends recorded here (a group send's record lives on the group's shard:
            // the node closing the account forgets those first, `sends_of`).
            let prefix = keys::user_records(view.shard(), keys::tag::PRIMARY, *user);
            let end = keys::prefix_end(&prefix).expect("dedup prefixes end below 0xff..");
            for (key, result) in
                view.scan::<SendResult>(Projection::Dedup, &prefix, &end, usize::MAX)?
            {
                let by_time = keys::dedup_by_time_of(&key, result.sent_at_ms)
                    .expect("dedup keys start with a shard");
                view.delete(by_time)?;
                view.delete(key)?;
            }
            Ok(())
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
        | Decoded::MessageExpired(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::Code(_)
        | Decoded::Keys(_) => Ok(()),
    }
}
