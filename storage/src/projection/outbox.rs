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

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, Event, ReceiptState};
use courier_proto::pb::store::{InboundState, InboxEntry, OutboxEntry, OutboxState};
use courier_proto::{ConversationId, InboxSeq, ShardId, UserId};

use super::{Projection, View, inbox, readstate};
use crate::error::Result;
use crate::keys;

fn shard_id(raw: u32) -> ShardId {
    ShardId::new(u16::try_from(raw).expect("leader validated the shard id"))
}

/// Returns the inbound watermark from `source`.
///
/// # Errors
/// A storage fault.
pub fn inbound_applied(view: &View<'_, '_>, source: u32) -> Result<u64> {
    let key = keys::inbound_state(view.shard(), shard_id(source));
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
        .filter_map(|(key, state)| {
            let dest = u16::from_be_bytes(key.get(prefix.len()..)?.try_into().ok()?);
            Some((ShardId::new(dest), state))
        })
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
    Ok(view
        .scan::<OutboxEntry>(Projection::Outbox, &from, &to, limit)?
        .into_iter()
        .filter_map(|(key, entry)| {
            let pos = key
                .get(prefix.len()..)?
                .try_into()
                .ok()
                .map(u64::from_be_bytes)?;
            Some((pos, entry.event?))
        })
        .collect())
}

/// The `MessageDelivered` a 1:1 `MessageSent` becomes on the recipient's shard (`None` for a
/// group message); `source_shard`/`source_pos` are filled in when it is queued for forwarding.
pub fn delivery_of(
    sent: &events::MessageSent,
    stored_at_ms: u64,
) -> Option<events::MessageDelivered> {
    let Some(events::conversation::With::User(recipient)) = sent.to.as_ref().and_then(|to| to.with)
    else {
        return None;
    };
    let sender = UserId::new(sent.sender_user).expect("leader validated the sender");
    Some(events::MessageDelivered {
        message_id: sent.message_id.clone(),
        recipient_user: recipient,
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
    })
}

/// The pointer copies of a group message for its members other than the sender, with each
/// member's shard: the content stays in the group shard's log at `at` (`group_index`).
///
/// # Errors
/// A storage fault.
pub fn group_deliveries(
    view: &View<'_, '_>,
    sent: &events::MessageSent,
    at: courier_proto::LogIndex,
    stored_at_ms: u64,
) -> Result<Vec<(ShardId, events::MessageDelivered)>> {
    let Some(events::conversation::With::Group(raw)) = sent.to.as_ref().and_then(|to| to.with)
    else {
        return Ok(Vec::new());
    };
    let group = courier_proto::GroupId::new(raw).expect("leader validated the group");
    Ok(super::groups::members(view, group)?
        .into_iter()
        .filter(|(user, _)| user.get() != sent.sender_user)
        .map(|(user, member)| {
            (
                shard_id(member.shard),
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
    view.put(
        keys::outbox_entry(view.shard(), dest, pos),
        &OutboxEntry {
            event: Some(Event { kind: Some(kind) }),
        },
    )?;
    view.put(keys::outbox_state(view.shard(), dest), &state)
}

fn push_receipt(
    view: &mut View<'_, '_>,
    recipient: UserId,
    entry: &InboxEntry,
    state: ReceiptState,
    at_ms: u64,
) -> Result<()> {
    let receipt = events::ReceiptRecorded {
        message_id: entry.message_id.clone(),
        sender_user: entry.sender_user,
        recipient_user: recipient.get(),
        state: state.into(),
        at_ms,
        source_shard: 0,
        source_pos: 0,
    };
    push(
        view,
        shard_id(entry.source_shard),
        Kind::ReceiptRecorded(receipt),
    )
}

/// Raises the inbound watermark from `source` to `pos`.
///
/// # Errors
/// A storage fault.
pub fn set_inbound(view: &mut View<'_, '_>, source: u32, pos: u64) -> Result<()> {
    let key = keys::inbound_state(view.shard(), shard_id(source));
    view.put(key, &InboundState { applied_pos: pos })
}

/// Folds one event into the outbox.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Kind) -> Result<()> {
    match event {
        Kind::MessageSent(sent) => {
            let direct = matches!(
                sent.to.as_ref().and_then(|to| to.with),
                Some(events::conversation::With::User(_))
            );
            if direct && sent.recipient_shard == u32::from(view.shard().get()) {
                return Ok(()); // stored in the same entry (see `apply_event`)
            }
            match delivery_of(sent, 0) {
                // The destination leader decides `stored_at_ms`.
                Some(delivered) => push(
                    view,
                    shard_id(sent.recipient_shard),
                    Kind::MessageDelivered(delivered),
                ),
                None => {
                    // Group fan-out: one pointer per member elsewhere (members here were stored
                    // by the same entry).
                    let here = view.shard();
                    for (dest, delivered) in group_deliveries(view, sent, view.at(), 0)? {
                        if dest != here {
                            push(view, dest, Kind::MessageDelivered(delivered))?;
                        }
                    }
                    Ok(())
                }
            }
        }
        Kind::MessageDelivered(delivered) => {
            if delivered.source_pos > 0 {
                set_inbound(view, delivered.source_shard, delivered.source_pos)?;
            }
            Ok(())
        }
        Kind::ReceiptRecorded(receipt) => {
            set_inbound(view, receipt.source_shard, receipt.source_pos)
        }
        Kind::DeliveryAcked(acked) => {
            let user = UserId::new(acked.user).expect("leader validated the user");
            let after = InboxSeq::new(inbox::state(view, user)?.delivered_up_to);
            for (seq, entry) in
                inbox::entries_between(view, user, after, InboxSeq::new(acked.up_to_seq))?
            {
                if already_read(view, user, seq)? {
                    continue; // the read already carried DELIVERED and READ
                }
                push_receipt(
                    view,
                    user,
                    &entry,
                    ReceiptState::Delivered,
                    acked.acked_at_ms,
                )?;
            }
            Ok(())
        }
        Kind::ReadUpTo(read) => {
            let user = UserId::new(read.user).expect("leader validated the user");
            let conv = ConversationId::try_from(
                read.conversation
                    .as_ref()
                    .expect("leader validated the conversation"),
            )
            .expect("leader validated the conversation");
            let state = readstate::get(view, user, conv)?;
            let delivered_up_to = inbox::state(view, user)?.delivered_up_to;
            let up_to = InboxSeq::new(read.up_to_seq);
            for (seq, position) in readstate::positions_between(
                view,
                user,
                conv,
                InboxSeq::new(state.read_seq),
                up_to,
            )? {
                if position.expired || position.pos <= state.read_pos {
                    continue;
                }
                let entry =
                    inbox::entry(view, user, seq)?.expect("unexpired positions are in the inbox");
                if seq.get() > delivered_up_to {
                    push_receipt(view, user, &entry, ReceiptState::Delivered, read.read_at_ms)?;
                }
                push_receipt(view, user, &entry, ReceiptState::Read, read.read_at_ms)?;
            }
            Ok(())
        }
        Kind::OutboxTrimmed(trimmed) => {
            let dest = shard_id(trimmed.dest_shard);
            let mut state = state(view, dest)?;
            assert!(
                trimmed.up_to <= state.last_pos,
                "trims never pass the last outbox position"
            );
            if trimmed.up_to <= state.trimmed_up_to {
                return Ok(()); // a retried trim
            }
            let mut pos = state.trimmed_up_to;
            while pos < trimmed.up_to {
                pos = pos.checked_add(1).expect("bounded by up_to");
                view.delete(keys::outbox_entry(view.shard(), dest, pos))?;
            }
            state.trimmed_up_to = trimmed.up_to;
            view.put(keys::outbox_state(view.shard(), dest), &state)
        }
        Kind::UserRegistered(_)
        | Kind::DeviceRegistered(_)
        | Kind::DeviceRevoked(_)
        | Kind::GroupCreated(_)
        | Kind::MemberAdded(_)
        | Kind::MemberRemoved(_)
        | Kind::MessageExpired(_) => Ok(()),
    }
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
