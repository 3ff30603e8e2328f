//! Inbox projection: for each user, the gap-free sequence of messages stored for them, the tail,
//! and the highest sequence any device acked (`delivered_up_to`).
//!
//! With `trim_delivered`, a body leaves once every active device acked it, except in the user's
//! last `keep_recent` messages (the history a companion linked later can fetch).
//!
//! Invariants (asserted in `apply`):
//! - A user's `InboxSeq` values are 1, 2, 3, … with no gaps; an expired message leaves a hole
//!   that is never reused.
//! - `delivered_up_to` only moves forward and never passes the tail.
//! - Only undelivered messages expire.
//! - A trimmed stub has an entry in the stub index (by the time it was stored) until an
//!   `InboxForgotten` names it; then the stub, its message-id index entry and its stub index
//!   entry leave together, and its sequence stays a hole that is never reused.

use courier_proto::pb::events::ForgottenMessage;
use courier_proto::pb::store::{InboxEntry, InboxState};
use courier_proto::{InboxSeq, MessageId, ShardId, UserId};
use prost::Message as _;

use super::decode::{self, Acked};
use super::{Decoded, Projection, View};
use crate::error::Result;
use crate::keys;

/// Returns a user's inbox state (zeroes for a user with no messages).
///
/// # Errors
/// A storage fault.
pub fn state(view: &View<'_, '_>, user: UserId) -> Result<InboxState> {
    Ok(view
        .get(Projection::Inbox, &keys::inbox_state(view.shard(), user))?
        .unwrap_or_default())
}

/// Returns the last sequence stored for `user`.
///
/// # Errors
/// A storage fault.
pub fn tail(view: &View<'_, '_>, user: UserId) -> Result<InboxSeq> {
    Ok(InboxSeq::new(state(view, user)?.tail_seq))
}

/// Returns where a message id was stored for `user`, if it was.
///
/// # Errors
/// A storage fault.
pub fn stored_seq(
    view: &View<'_, '_>,
    user: UserId,
    message_id: &[u8],
) -> Result<Option<InboxSeq>> {
    let Ok(message) = MessageId::from_wire(message_id, "message_id") else {
        return Ok(None);
    };
    let key = keys::inbox_message_id(view.shard(), user, message);
    Ok(view.get_u64(Projection::Inbox, &key)?.map(InboxSeq::new))
}

/// Returns one stored message.
///
/// # Errors
/// A storage fault.
pub fn entry(view: &View<'_, '_>, user: UserId, seq: InboxSeq) -> Result<Option<InboxEntry>> {
    view.get(
        Projection::Inbox,
        &keys::inbox_message(view.shard(), user, seq),
    )
}

/// Returns the stored messages with `after < seq <= up_to`, in order (expired ones are absent).
///
/// # Errors
/// A storage fault.
pub fn entries_between(
    view: &View<'_, '_>,
    user: UserId,
    after: InboxSeq,
    up_to: InboxSeq,
) -> Result<Vec<(InboxSeq, InboxEntry)>> {
    if up_to <= after {
        return Ok(Vec::new());
    }
    let from = keys::inbox_message(view.shard(), user, after.next());
    let to = keys::inbox_message(view.shard(), user, up_to.next());
    let limit = usize::try_from(up_to.get().saturating_sub(after.get())).unwrap_or(usize::MAX);
    view.scan::<InboxEntry>(Projection::Inbox, &from, &to, limit)?
        .into_iter()
        .map(|(key, entry)| {
            let seq = keys::inbox_message_seq(&key).expect("inbox keys end with the sequence");
            Ok((seq, entry))
        })
        .collect()
}

/// About the most bytes one inbox entry encodes to: a message's content at its limits, with its
/// ids, conversation, times and trace context.
pub const ENTRY_BYTES_MAX: usize = courier_proto::limits::MESSAGE_CONTENT_BYTES_MAX + 1024;

/// The stored messages with `after < seq <= up_to`, in order, up to `bytes_max` encoded bytes (and
/// at least one message, so that a message larger than the bound is still read, alone); and the
/// sequence read up to: `up_to`, or the last message returned when the bound ended the read.
///
/// With `stepped`, the range is read in steps of as many messages as the bytes left would hold
/// at [`ENTRY_BYTES_MAX`] each, so a read holds at most `bytes_max` plus one entry, however large
/// the range and its messages. Without, it is read in one scan and then cut: for a range small
/// enough to read whole, over a view whose reads cost per call (a replica on another node, whose
/// every round asks all of its reads again, so steps would add up).
///
/// # Errors
/// A storage fault.
pub fn entries_within(
    view: &View<'_, '_>,
    user: UserId,
    (after, up_to): (InboxSeq, InboxSeq),
    bytes_max: usize,
    stepped: bool,
) -> Result<(Vec<(InboxSeq, InboxEntry)>, InboxSeq)> {
    let mut messages: Vec<(InboxSeq, InboxEntry)> = Vec::new();
    let mut bytes = 0_usize;
    let mut read_to = after;
    while read_to < up_to {
        let step = if stepped {
            u64::try_from((bytes_max.saturating_sub(bytes) / ENTRY_BYTES_MAX).max(1))
                .unwrap_or(u64::MAX)
        } else {
            up_to.get().saturating_sub(read_to.get())
        };
        let step_to = InboxSeq::new(up_to.get().min(read_to.get().saturating_add(step)));
        for (seq, entry) in entries_between(view, user, read_to, step_to)? {
            let size = entry.encoded_len();
            if let Some((last, _)) = messages.last()
                && bytes.saturating_add(size) > bytes_max
            {
                let last = *last;
                return Ok((messages, last));
            }
            bytes = bytes.saturating_add(size);
            messages.push((seq, entry));
        }
        read_to = step_to;
    }
    Ok((messages, up_to))
}

/// Whether message `seq` of `user` can still expire: stored under that id and not delivered.
///
/// # Errors
/// A storage fault.
pub fn expirable(
    view: &View<'_, '_>,
    user: UserId,
    seq: InboxSeq,
    message_id: &[u8],
) -> Result<bool> {
    if seq.get() <= state(view, user)?.delivered_up_to {
        return Ok(false);
    }
    Ok(entry(view, user, seq)?.is_some_and(|stored| stored.message_id == message_id))
}

/// Returns up to `limit` trimmed stubs of messages stored before `stored_before_ms`, oldest
/// first: the ones an `InboxForgotten` may name.
///
/// # Errors
/// A storage fault.
pub fn stubs_before(
    view: &View<'_, '_>,
    stored_before_ms: u64,
    limit: usize,
) -> Result<Vec<ForgottenMessage>> {
    let from = keys::inbox_stub_by_time_start(view.shard());
    let to = keys::inbox_stub_by_time_end(view.shard(), stored_before_ms);
    let mut stubs = Vec::new();
    for (key, ()) in view.scan::<()>(Projection::Inbox, &from, &to, limit)? {
        let Some((stored_at_ms, user, seq)) = keys::inbox_stub_by_time_parts(&key) else {
            continue;
        };
        let message_id = entry(view, user, seq)?.map_or_else(Vec::new, |stub| stub.message_id);
        stubs.push(ForgottenMessage {
            user: user.get(),
            seq: seq.get(),
            message_id,
            stored_at_ms,
        });
    }
    Ok(stubs)
}

/// The stub an `InboxForgotten` names, if it is still there to forget: stored, trimmed, of that
/// message and stored at that time. Anything else (forgotten already, a stale or forged name)
/// forgets nothing.
///
/// # Errors
/// A storage fault.
pub fn forgettable(
    view: &View<'_, '_>,
    message: &decode::ForgottenMessage<'_>,
) -> Result<Option<InboxEntry>> {
    Ok(entry(view, message.user, message.seq)?.filter(|stub| {
        stub.trimmed
            && stub.message_id == message.event.message_id
            && stub.stored_at_ms == message.event.stored_at_ms
    }))
}

/// The highest seq every active (not revoked) device of `user` acked, counting `acked`.
fn acked_by_every_device(
    view: &View<'_, '_>,
    user: UserId,
    (acking, up_to): (courier_proto::DeviceId, InboxSeq),
) -> Result<u64> {
    let mut lowest = u64::MAX;
    for (device, record) in super::devices::devices_of(view, user)? {
        if record.revoked {
            continue;
        }
        let cursor = match courier_proto::DeviceId::new(device) {
            Some(id) => super::cursors::acked(view, user, id)?.get(),
            None => 0,
        };
        let cursor = if device == acking.get() {
            cursor.max(up_to.get())
        } else {
            cursor
        };
        lowest = lowest.min(cursor);
    }
    Ok(if lowest == u64::MAX { 0 } else { lowest })
}

/// How far an ack by `acking` up to `up_to` lets `user`'s inbox be trimmed (with
/// `trim_delivered`): what every active device acked, but for the last `keep_recent` messages.
/// A trim moves only when this passes `inbox.trimmed_up_to`, so a node can tell a repeated ack
/// that would change nothing from one that would trim.
///
/// # Errors
/// A storage fault.
pub fn trimmable_up_to(
    view: &View<'_, '_>,
    user: UserId,
    ack: (courier_proto::DeviceId, InboxSeq),
    keep_recent: u32,
    inbox: &InboxState,
) -> Result<u64> {
    Ok(acked_by_every_device(view, user, ack)?
        .min(inbox.tail_seq.saturating_sub(u64::from(keep_recent))))
}

/// Clears the bodies of the messages every active device of the acking user has now acked, but
/// for the last `keep_recent` of the inbox (companion history), and indexes their stubs by
/// time; returns whether `inbox` changed.
fn trim(view: &mut View<'_, '_>, acked: &Acked<'_>, inbox: &mut InboxState) -> Result<bool> {
    let (shard, user) = (view.shard(), acked.user);
    let mut all_acked = trimmable_up_to(
        view,
        user,
        (acked.device, acked.up_to),
        acked.event.keep_recent,
        inbox,
    )?;
    if acked.event.trim_max > 0 {
        all_acked = all_acked.min(
            inbox
                .trimmed_up_to
                .saturating_add(u64::from(acked.event.trim_max)),
        );
    }
    if all_acked <= inbox.trimmed_up_to {
        return Ok(false);
    }
    for (seq, mut entry) in entries_between(
        view,
        user,
        InboxSeq::new(inbox.trimmed_up_to),
        InboxSeq::new(all_acked),
    )? {
        entry.content = None;
        entry.trimmed = true;
        view.put(keys::inbox_message(shard, user, seq), &entry)?;
        // Trimmed once (`trimmed_up_to` only grows): a new index entry.
        view.put_new(
            keys::inbox_stub_by_time(shard, entry.stored_at_ms, user, seq),
            &(),
        );
    }
    inbox.trimmed_up_to = all_acked;
    Ok(true)
}

/// Removes one stub an `InboxForgotten` names, with its message-id and stub index entries, if it
/// is [`forgettable`].
fn forget(view: &mut View<'_, '_>, message: &decode::ForgottenMessage<'_>) -> Result<()> {
    let Some(stub) = forgettable(view, message)? else {
        return Ok(());
    };
    let (shard, user, seq) = (view.shard(), message.user, message.seq);
    let id =
        MessageId::from_wire(&stub.message_id, "message_id").expect("stored message ids are valid");
    view.delete(keys::inbox_message(shard, user, seq))?;
    view.delete(keys::inbox_message_id(shard, user, id))?;
    view.delete(keys::inbox_stub_by_time(
        shard,
        stub.stored_at_ms,
        user,
        seq,
    ))
}

/// `AccountDeleted`: every message of `user` leaves with its indexes, and the inbox is closed
/// (after a change of number, with the user it moved to: later deliveries follow it).
fn close(view: &mut View<'_, '_>, user: UserId, moved_to: Option<(UserId, ShardId)>) -> Result<()> {
    let shard = view.shard();
    let inbox = state(view, user)?;
    for (seq, entry) in
        entries_between(view, user, InboxSeq::new(0), InboxSeq::new(inbox.tail_seq))?
    {
        let id =
            MessageId::from_wire(&entry.message_id, "message_id").expect("stored ids are valid");
        view.delete(keys::inbox_message_id(shard, user, id))?;
        if entry.trimmed {
            view.delete(keys::inbox_stub_by_time(
                shard,
                entry.stored_at_ms,
                user,
                seq,
            ))?;
        }
        view.delete(keys::inbox_message(shard, user, seq))?;
    }
    view.put(
        keys::inbox_state(shard, user),
        &InboxState {
            closed: true,
            moved_to: moved_to.map_or(0, |(user, _)| user.get()),
            moved_to_shard: moved_to.map_or(0, |(_, shard)| u32::from(shard.get())),
            ..InboxState::default()
        },
    )
}

/// Folds one event into the inbox.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        Decoded::MessageDelivered(decoded) => {
            let (user, message, delivered) = (decoded.recipient, decoded.message, decoded.event);
            let mut inbox = state(view, user)?;
            let seq = InboxSeq::new(inbox.tail_seq).next();
            inbox.tail_seq = seq.get();
            // A fresh seq and a message id not stored (duplicates were dropped before).
            view.put_new(
                keys::inbox_message(shard, user, seq),
                &InboxEntry {
                    message_id: delivered.message_id.clone(),
                    sender_user: delivered.sender_user,
                    sender_device: delivered.sender_device,
                    conversation: delivered.conversation,
                    content: delivered.content.clone(),
                    sent_at_ms: delivered.sent_at_ms,
                    stored_at_ms: delivered.stored_at_ms,
                    // Where receipts go (and a group message's content is): the origin of a
                    // message re-queued after a change of number, else the source.
                    source_shard: delivered.origin_shard.unwrap_or(delivered.source_shard),
                    group_index: delivered.group_index,
                    trace_parent: delivered.trace_parent.clone(),
                    trimmed: false,
                    addressed_to: delivered.addressed_to,
                    receipts_sent: delivered.receipts_sent,
                },
            );
            view.put_u64_new(keys::inbox_message_id(shard, user, message), seq.get());
            view.put(keys::inbox_state(shard, user), &inbox)
        }
        Decoded::DeliveryAcked(acked) => {
            let (user, up_to) = (acked.user, acked.up_to.get());
            let mut inbox = state(view, user)?;
            assert!(up_to <= inbox.tail_seq, "acks never pass the inbox tail");
            let mut changed = false;
            if up_to > inbox.delivered_up_to {
                inbox.delivered_up_to = up_to;
                changed = true;
            }
            if acked.event.trim_delivered {
                changed |= trim(view, acked, &mut inbox)?;
            }
            if changed {
                view.put(keys::inbox_state(shard, user), &inbox)?;
            }
            Ok(())
        }
        Decoded::MessageExpired(expired) => {
            let (user, seq) = (expired.user, expired.seq);
            let inbox = state(view, user)?;
            assert!(
                seq.get() > inbox.delivered_up_to,
                "only undelivered messages expire"
            );
            let stored = entry(view, user, seq)?.expect("an expiring message is in the inbox");
            assert_eq!(
                stored.message_id, expired.event.message_id,
                "expiry names the stored message"
            );
            let message = MessageId::from_wire(&stored.message_id, "message_id")
                .expect("stored message ids are valid");
            view.delete(keys::inbox_message(shard, user, seq))?;
            view.delete(keys::inbox_message_id(shard, user, message))
        }
        Decoded::InboxForgotten(messages) => {
            for message in messages {
                forget(view, message)?;
            }
            Ok(())
        }
        Decoded::AccountDeleted { user, moved_to, .. } => close(view, *user, *moved_to),
        Decoded::UserRegistered(registered) => {
            // The number of a deleted account registers again: its inbox opens, empty.
            if state(view, registered.user)?.closed {
                view.delete(keys::inbox_state(shard, registered.user))?;
            }
            Ok(())
        }
        Decoded::MessageSent(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::DeviceRegistered(_)
        | Decoded::DeviceRevoked(_)
        | Decoded::GroupCreated(_)
        | Decoded::MemberAdded(_)
        | Decoded::MemberRemoved(_)
        | Decoded::SendsForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::Code(_)
        | Decoded::Keys(_) => Ok(()),
    }
}
