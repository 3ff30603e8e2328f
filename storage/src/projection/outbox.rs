//! Outbox: per destination shard, the ordered events this shard still has to forward, and per
//! source shard, the highest forwarded position applied here (the inbound watermark).
//!
//! ```text
//!  MessageSent (recipient elsewhere) ──▶ MessageDelivered template ─┐
//!  DeliveryAcked (newly delivered)   ──▶ ReceiptRecorded DELIVERED ─┼─▶ outbox[dest] pos 1,2,3…
//!  ReadUpTo (newly read)             ──▶ [DELIVERED,] READ         ─┘        │ forwarder
//!  OutboxTrimmed(dest, up_to)        ◀── destination committed up_to ◀───────┘
//! ```
//!
//! Receipts always travel through the outbox, also when sender and recipient share the shard
//! (the destination is then this shard), so they are ordered with everything else.
//!
//! Invariants (asserted): positions are 1, 2, 3, … per destination; trims never pass the last
//! position; each message gets DELIVERED before READ, and each at most once.

use courier_proto::pb::events::conversation::With;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, Event, ReceiptState};
use courier_proto::pb::store::{InboundState, OutboxEntry, OutboxState, ReceiptTarget};
use courier_proto::{ConversationId, InboxSeq, ShardId, UserId};

use super::decode::{Acked, Read, Sent, Trimmed};
use super::{Decoded, Projection, Target, View, inbox, readstate};
use crate::error::Result;
use crate::keys;

/// A shard id read back from stored data, checked when the event that stored it was decoded.
fn stored_shard(raw: u32) -> ShardId {
    ShardId::new(u16::try_from(raw).expect("stored shard ids were checked at decode"))
}

/// Returns the inbound watermark from `source`.
///
/// # Errors
/// A storage fault.
///
/// # Panics
/// When `source` does not fit a shard id.
pub fn inbound_applied(view: &View<'_, '_>, source: u32) -> Result<u64> {
    let source = ShardId::new(u16::try_from(source).expect("source shard ids fit u16"));
    inbound_applied_from(view, source)
}

/// Returns the inbound watermark from `source`.
///
/// # Errors
/// A storage fault.
pub fn inbound_applied_from(view: &View<'_, '_>, source: ShardId) -> Result<u64> {
    let key = keys::inbound_state(view.shard(), source);
    Ok(view
        .get::<InboundState>(Projection::Outbox, &key)?
        .map_or(0, |state| state.applied_pos))
}

/// Returns the state of the queue to `dest`.
///
/// # Errors
/// A storage fault.
pub fn state(view: &View<'_, '_>, dest: ShardId) -> Result<OutboxState> {
    Ok(view
        .get(Projection::Outbox, &keys::outbox_state(view.shard(), dest))?
        .unwrap_or_default())
}

/// Returns the queue state of every destination this shard ever queued for, with one range scan
/// (never a lookup per possible destination).
///
/// # Errors
/// A storage fault.
pub fn states(view: &View<'_, '_>) -> Result<Vec<(ShardId, OutboxState)>> {
    let prefix = keys::outbox_state_prefix(view.shard());
    let end = keys::prefix_end(&prefix).expect("outbox prefixes end below 0xff..");
    Ok(view
        .scan::<OutboxState>(Projection::Outbox, &prefix, &end, usize::MAX)?
        .into_iter()
        .filter_map(|(key, state)| Some((keys::outbox_state_dest(&key)?, state)))
        .collect())
}

/// Returns up to `limit` pending entries to `dest` from position `from_pos` on.
///
/// # Errors
/// A storage fault.
pub fn pending(
    view: &View<'_, '_>,
    dest: ShardId,
    from_pos: u64,
    limit: usize,
) -> Result<Vec<(u64, Event)>> {
    let from = keys::outbox_entry(view.shard(), dest, from_pos);
    let prefix = keys::outbox_dest_prefix(view.shard(), dest);
    let to = keys::prefix_end(&prefix).expect("outbox prefixes end below 0xff..");
    // A record that does not decode stops the read: skipped, it would leave a gap that the
    // destination refuses on every retry, and the pair would stall with nothing reported.
    view.scan::<OutboxEntry>(Projection::Outbox, &from, &to, limit)?
        .into_iter()
        .map(|(key, entry)| {
            let pos = keys::outbox_entry_pos(&key);
            match (pos, entry.event) {
                (Some(pos), Some(event)) => Ok((pos, event)),
                _ => Err(crate::error::StorageError::Decode {
                    cf: Projection::Outbox.name(),
                    shard: view.shard(),
                    what: format!("key {}", super::hex(&key)),
                    reason: "no position in its key or no event".to_owned(),
                }),
            }
        })
        .collect()
}

/// The `MessageDelivered` a 1:1 `MessageSent` becomes on the recipient's shard (`None` for a
/// group message); `source_shard`/`source_pos` are filled in when it is queued for forwarding.
pub fn delivery_of(sent: &Sent<'_>, stored_at_ms: u64) -> Option<events::MessageDelivered> {
    let Some(Target::User(recipient, _)) = sent.to else {
        return None;
    };
    let (sender, sent) = (sent.sender, sent.event);
    Some(events::MessageDelivered {
        message_id: sent.message_id.clone(),
        recipient_user: recipient.get(),
        sender_user: sent.sender_user,
        sender_device: sent.sender_device,
        conversation: Some(ConversationId::Direct(sender).into()),
        content: sent.content.clone(),
        sent_at_ms: sent.sent_at_ms,
        stored_at_ms,
        source_shard: 0,
        source_pos: 0,
        group_index: 0,
        trace_parent: sent.trace_parent.clone(),
        origin_shard: None,
        addressed_to: 0,
        receipts_sent: 0,
    })
}

/// The sender's own copy of a 1:1 send (`None` for a group message), for the sender's other
/// devices: stored on the sender's shard, in the conversation with the recipient, in the same
/// entry as the send.
pub fn own_copy_of(sent: &Sent<'_>) -> Option<events::MessageDelivered> {
    let Some(Target::User(recipient, _)) = sent.to else {
        return None;
    };
    let mut own = delivery_of(sent, sent.event.sent_at_ms)?;
    own.recipient_user = sent.sender.get();
    own.conversation = Some(ConversationId::Direct(recipient).into());
    Some(own)
}

/// The pointer copies of a group message for its members, with each member's shard: the content
/// stays in the group shard's log at `at` (`group_index`). With `own_copies` the sender is one
/// of them: their own copy, for their other devices, stored only if they have one
/// (`admit_delivery`).
///
/// # Errors
/// A storage fault.
pub fn group_deliveries(
    view: &View<'_, '_>,
    decoded: &Sent<'_>,
    at: courier_proto::LogIndex,
    stored_at_ms: u64,
) -> Result<Vec<(ShardId, events::MessageDelivered)>> {
    let Some(Target::Group(group)) = decoded.to else {
        return Ok(Vec::new());
    };
    let sent = decoded.event;
    Ok(super::groups::members(view, group)?
        .into_iter()
        .filter(|(user, _)| sent.own_copies || *user != decoded.sender)
        .map(|(user, member)| {
            (
                stored_shard(member.shard),
                events::MessageDelivered {
                    message_id: sent.message_id.clone(),
                    recipient_user: user.get(),
                    sender_user: sent.sender_user,
                    sender_device: sent.sender_device,
                    conversation: Some(ConversationId::Group(group).into()),
                    content: None,
                    sent_at_ms: sent.sent_at_ms,
                    stored_at_ms,
                    source_shard: 0,
                    source_pos: 0,
                    group_index: at.get(),
                    trace_parent: sent.trace_parent.clone(),
                    origin_shard: None,
                    addressed_to: 0,
                    receipts_sent: 0,
                },
            )
        })
        .collect())
}

fn push(view: &mut View<'_, '_>, dest: ShardId, mut kind: Kind) -> Result<()> {
    let mut state = state(view, dest)?;
    let pos = state
        .last_pos
        .checked_add(1)
        .expect("outbox position overflow");
    let source_shard = u32::from(view.shard().get());
    match &mut kind {
        Kind::MessageDelivered(delivered) => {
            delivered.source_shard = source_shard;
            delivered.source_pos = pos;
        }
        Kind::ReceiptRecorded(receipt) => {
            receipt.source_shard = source_shard;
            receipt.source_pos = pos;
        }
        _ => unreachable!("only deliveries and receipts are forwarded"),
    }
    state.last_pos = pos;
    // Positions are never reused.
    view.put_new(
        keys::outbox_entry(view.shard(), dest, pos),
        &OutboxEntry {
            event: Some(Event { kind: Some(kind) }),
        },
    );
    view.put(keys::outbox_state(view.shard(), dest), &state)
}

fn push_receipt(
    view: &mut View<'_, '_>,
    recipient: UserId,
    target: &ReceiptTarget,
    state: ReceiptState,
    at_ms: u64,
) -> Result<()> {
    if state <= target.receipts_sent() {
        // A message re-queued after a change of number whose old inbox sent this one already.
        return Ok(());
    }
    let receipt = events::ReceiptRecorded {
        message_id: target.message_id.clone(),
        sender_user: target.sender_user,
        // A message re-queued after a change of number names whom the sender addressed.
        recipient_user: match target.addressed_to {
            0 => recipient.get(),
            addressed_to => addressed_to,
        },
        state: state.into(),
        at_ms,
        source_shard: 0,
        source_pos: 0,
    };
    push(
        view,
        stored_shard(target.source_shard),
        Kind::ReceiptRecorded(receipt),
    )
}

/// Raises the inbound watermark from `source` to `pos`.
///
/// # Errors
/// A storage fault.
pub fn set_inbound(view: &mut View<'_, '_>, source: ShardId, pos: u64) -> Result<()> {
    let key = keys::inbound_state(view.shard(), source);
    view.put(key, &InboundState { applied_pos: pos })
}

/// Folds one event into the outbox.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    match event {
        Decoded::MessageSent(sent) => queue_send(view, sent),
        Decoded::MessageDelivered(delivered) => match delivered.forwarded {
            Some((source, pos)) => set_inbound(view, source, pos),
            None => Ok(()),
        },
        Decoded::ReceiptRecorded(receipt) => {
            set_inbound(view, receipt.source, receipt.event.source_pos)
        }
        Decoded::DeliveryAcked(acked) => queue_ack_receipts(view, acked),
        Decoded::ReadUpTo(read) => queue_read_receipts(view, read),
        Decoded::OutboxTrimmed(trimmed) => trim(view, trimmed),
        Decoded::UserRegistered(_)
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
        // A change of number: what the asking device had not acked follows the account.
        Decoded::AccountDeleted {
            user,
            device,
            moved_to: Some(moved_to),
            ..
        } => requeue_unacked(view, *user, *device, *moved_to),
        // What the user sent before deleting still reaches its recipients.
        Decoded::AccountDeleted { moved_to: None, .. } => Ok(()),
    }
}

/// `AccountDeleted` with `moved_to`: re-queues every message of `user`'s inbox past `device`'s
/// cursor that still has its body, in inbox order, to the user the account moved to, with the
/// receipt the old inbox already sent for it. (Runs before the cursors and inbox projections
/// remove the user: see `APPLY_ORDER`.)
fn requeue_unacked(
    view: &mut View<'_, '_>,
    user: UserId,
    device: courier_proto::DeviceId,
    moved_to: (UserId, ShardId),
) -> Result<()> {
    let acked = super::cursors::acked(view, user, device)?;
    let inbox = inbox::state(view, user)?;
    for (seq, entry) in inbox::entries_between(view, user, acked, InboxSeq::new(inbox.tail_seq))? {
        if entry.trimmed {
            continue; // every device had it; its body is gone
        }
        // What another device did with it already reached the sender (own copies have none).
        let receipts_sent = if already_read(view, user, seq)? {
            ReceiptState::Read
        } else if seq.get() <= inbox.delivered_up_to {
            ReceiptState::Delivered
        } else {
            entry.receipts_sent()
        }
        .max(entry.receipts_sent());
        let delivered = events::MessageDelivered {
            message_id: entry.message_id,
            recipient_user: user.get(),
            sender_user: entry.sender_user,
            sender_device: entry.sender_device,
            conversation: entry.conversation,
            content: entry.content,
            sent_at_ms: entry.sent_at_ms,
            stored_at_ms: 0,
            source_shard: 0,
            source_pos: 0,
            group_index: entry.group_index,
            trace_parent: entry.trace_parent,
            origin_shard: Some(entry.source_shard),
            addressed_to: entry.addressed_to,
            receipts_sent: receipts_sent.into(),
        };
        requeue(view, moved_to, delivered)?;
    }
    Ok(())
}

/// Queues a delivery for an inbox closed by a change of number to the user it moved to: the
/// origin shard (where receipts go and a group message's content is) and the recipient the
/// sender addressed are kept, so receipts reach and name what they always would; what the user
/// sent itself (own copies, notes to self) becomes the new user's. `stored_at_ms` is left to
/// the destination's leader.
///
/// # Errors
/// A storage fault.
pub fn requeue(
    view: &mut View<'_, '_>,
    (moved_to, dest): (UserId, ShardId),
    mut delivered: events::MessageDelivered,
) -> Result<()> {
    let old = delivered.recipient_user;
    delivered.origin_shard = Some(delivered.origin_shard.unwrap_or(delivered.source_shard));
    if delivered.addressed_to == 0 {
        delivered.addressed_to = old;
    }
    if delivered.sender_user == old {
        delivered.sender_user = moved_to.get();
        delivered.addressed_to = moved_to.get();
        let note_to_self = matches!(
            delivered.conversation.as_ref().and_then(|c| c.with),
            Some(With::User(peer)) if peer == old
        );
        if note_to_self {
            delivered.conversation = Some(ConversationId::Direct(moved_to).into());
            // Its receipts are the new user's own, kept on the new user's shard.
            delivered.origin_shard = Some(u32::from(dest.get()));
        }
    }
    delivered.recipient_user = moved_to.get();
    delivered.stored_at_ms = 0;
    delivered.source_shard = 0;
    delivered.source_pos = 0;
    push(view, dest, Kind::MessageDelivered(delivered))
}

/// Queues the copies of a send for recipients on other shards.
fn queue_send(view: &mut View<'_, '_>, sent: &Sent<'_>) -> Result<()> {
    match sent.to {
        Some(Target::User(_, dest)) if dest == view.shard() => {
            Ok(()) // stored in the same entry (see `apply_event`)
        }
        Some(Target::User(_, dest)) => match delivery_of(sent, 0) {
            // The destination leader decides `stored_at_ms`.
            Some(delivered) => push(view, dest, Kind::MessageDelivered(delivered)),
            None => unreachable!("a 1:1 send has a delivery"),
        },
        Some(Target::Group(_)) => {
            // Group fan-out: one pointer per member elsewhere (members here were stored by the
            // same entry).
            let here = view.shard();
            for (dest, delivered) in group_deliveries(view, sent, view.at(), 0)? {
                if dest != here {
                    push(view, dest, Kind::MessageDelivered(delivered))?;
                }
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// Queues DELIVERED receipts for the messages an ack newly delivered.
fn queue_ack_receipts(view: &mut View<'_, '_>, acked: &Acked<'_>) -> Result<()> {
    let user = acked.user;
    let after = InboxSeq::new(inbox::state(view, user)?.delivered_up_to);
    for (seq, entry) in inbox::entries_between(view, user, after, acked.up_to)? {
        if super::decode::is_own(entry.sender_user, user.get(), entry.conversation.as_ref()) {
            continue; // the sender's own copy: its receipts come from its recipients
        }
        if already_read(view, user, seq)? {
            continue; // the read already carried DELIVERED and READ
        }
        push_receipt(
            view,
            user,
            &readstate::receipt_target(&entry),
            ReceiptState::Delivered,
            acked.event.acked_at_ms,
        )?;
    }
    Ok(())
}

/// Queues READ receipts (preceded by DELIVERED for undelivered ones) for the messages a read
/// newly covers.
fn queue_read_receipts(view: &mut View<'_, '_>, read: &Read<'_>) -> Result<()> {
    let (user, conv, up_to) = (read.user, read.conversation, read.up_to);
    if readstate::position(view, user, up_to)?.is_none() {
        // Read already, and its position forgotten: the read moves nothing (as in readstate),
        // whatever conversation it names.
        return Ok(());
    }
    let read_at_ms = read.event.read_at_ms;
    let state = readstate::get(view, user, conv)?;
    let delivered_up_to = inbox::state(view, user)?.delivered_up_to;
    for (seq, position) in
        readstate::positions_between(view, user, conv, InboxSeq::new(state.read_seq), up_to)?
    {
        if position.expired || position.pos <= state.read_pos {
            continue;
        }
        // A stub forgotten unread left its receipt target in the position.
        let target = match position.forgotten {
            Some(target) => target,
            None => readstate::receipt_target(
                &inbox::entry(view, user, seq)?.expect("unexpired positions are in the inbox"),
            ),
        };
        if seq.get() > delivered_up_to {
            push_receipt(view, user, &target, ReceiptState::Delivered, read_at_ms)?;
        }
        push_receipt(view, user, &target, ReceiptState::Read, read_at_ms)?;
    }
    Ok(())
}

/// Deletes the entries to a destination up to the trimmed position.
fn trim(view: &mut View<'_, '_>, trimmed: &Trimmed<'_>) -> Result<()> {
    let (dest, up_to) = (trimmed.dest, trimmed.event.up_to);
    let mut state = state(view, dest)?;
    assert!(
        up_to <= state.last_pos,
        "trims never pass the last outbox position"
    );
    if up_to <= state.trimmed_up_to {
        return Ok(()); // a retried trim
    }
    let mut pos = state.trimmed_up_to;
    while pos < up_to {
        pos = pos.checked_add(1).expect("bounded by up_to");
        view.delete(keys::outbox_entry(view.shard(), dest, pos))?;
    }
    state.trimmed_up_to = up_to;
    view.put(keys::outbox_state(view.shard(), dest), &state)
}

/// Returns whether inbox message `seq` of `user` is read (at or below its conversation's
/// read position).
fn already_read(view: &View<'_, '_>, user: UserId, seq: InboxSeq) -> Result<bool> {
    let Some(position) = readstate::position(view, user, seq)? else {
        return Ok(false);
    };
    let conv = ConversationId::try_from(
        position
            .conversation
            .as_ref()
            .expect("positions name a conversation"),
    )
    .expect("stored conversations are valid");
    Ok(position.pos <= readstate::get(view, user, conv)?.read_pos)
}
