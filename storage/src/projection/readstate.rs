//! Read state: per user and conversation, how many messages were stored, how far the user read,
//! and how many unread ones expired, so that `unread = count - read_pos - expired_unread` is
//! exact without scanning. Per inbox sequence it records the message's conversation and position.
//!
//! The sender's own copies (multi-device history) take no position: they were read by sending.
//!
//! Invariants (asserted): a read names a stored message of that conversation, or one whose
//! position already left (read, then forgotten: changes nothing); `read_pos` only moves forward
//! (a read at or below it changes nothing); `expired_unread` never underflows.
//!
//! A position leaves once it can no longer matter: an expired message's, or one whose inbox stub
//! was forgotten, when a read passes it; a read message's when its stub is forgotten. An unread
//! message whose stub is forgotten keeps its position, which then carries where its READ receipt
//! goes ([`SeqPosition::forgotten`]). So a missing position at or below the inbox tail always
//! means "read".

use courier_proto::pb::store::{ReadState, ReceiptTarget, SeqPosition};
use courier_proto::{ConversationId, InboxSeq, UserId};

use super::{Decoded, Projection, View, inbox};
use crate::error::Result;
use crate::keys;

/// The conversation of a stored position (checked when the message was delivered).
fn stored_conversation(position: &SeqPosition) -> ConversationId {
    ConversationId::try_from(
        position
            .conversation
            .as_ref()
            .expect("positions name a conversation"),
    )
    .expect("stored conversations are valid")
}

/// Returns the read state of one conversation of `user`.
///
/// # Errors
/// A storage fault.
pub fn get(view: &View<'_, '_>, user: UserId, conv: ConversationId) -> Result<ReadState> {
    Ok(view
        .get(
            Projection::ReadState,
            &keys::read_state(view.shard(), user, conv),
        )?
        .unwrap_or_default())
}

/// Returns where inbox message `seq` of `user` sits in its conversation.
///
/// # Errors
/// A storage fault.
pub fn position(view: &View<'_, '_>, user: UserId, seq: InboxSeq) -> Result<Option<SeqPosition>> {
    view.get(
        Projection::ReadState,
        &keys::seq_position(view.shard(), user, seq),
    )
}

/// What a read of `user`'s inbox up to a seq names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadTarget {
    /// A message with its position (its conversation, where it sits).
    Position(SeqPosition),
    /// A message whose position left: read already (a missing position at or below the inbox
    /// tail means "read"), so the read changes nothing.
    ReadAlready,
    /// No message: zero, or past the inbox tail.
    Unknown,
}

/// What a read of `user` up to `seq` names: the one place the rule "a missing position at or
/// below the inbox tail means read" lives (the invalid check, the outbox, the stream).
///
/// # Errors
/// A storage fault.
pub fn read_target(view: &View<'_, '_>, user: UserId, seq: InboxSeq) -> Result<ReadTarget> {
    if let Some(found) = position(view, user, seq)? {
        return Ok(ReadTarget::Position(found));
    }
    Ok(if seq.get() > 0 && seq <= inbox::tail(view, user)? {
        ReadTarget::ReadAlready
    } else {
        ReadTarget::Unknown
    })
}

/// Returns the positions of `user`'s messages with `after < seq <= up_to` in `conv`.
///
/// # Errors
/// A storage fault.
pub fn positions_between(
    view: &View<'_, '_>,
    user: UserId,
    conv: ConversationId,
    after: InboxSeq,
    up_to: InboxSeq,
) -> Result<Vec<(InboxSeq, SeqPosition)>> {
    if up_to <= after {
        return Ok(Vec::new());
    }
    let from = keys::seq_position(view.shard(), user, after.next());
    // Saturating: no inbox reaches seq u64::MAX, and a caller's bound must not panic here.
    let to = keys::seq_position(
        view.shard(),
        user,
        InboxSeq::new(up_to.get().saturating_add(1)),
    );
    let limit = usize::try_from(up_to.get().saturating_sub(after.get())).unwrap_or(usize::MAX);
    let wire_conv = courier_proto::pb::events::Conversation::from(conv);
    Ok(view
        .scan::<SeqPosition>(Projection::ReadState, &from, &to, limit)?
        .into_iter()
        .filter(|(_, position)| position.conversation.as_ref() == Some(&wire_conv))
        .map(|(key, position)| {
            let seq = keys::seq_position_seq(&key).expect("position keys end with the sequence");
            (seq, position)
        })
        .collect())
}

/// Folds one event into the read state.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        Decoded::MessageDelivered(decoded) if decoded.own => {
            // The sender's own copy is read by sending it: no position, never unread, and a
            // read that names it changes nothing (a missing position at or below the tail).
            Ok(())
        }
        Decoded::MessageDelivered(decoded) => {
            let (user, conv, delivered) = (decoded.recipient, decoded.conversation, decoded.event);
            let seq = inbox::tail(view, user)?.next();
            let mut state = get(view, user, conv)?;
            state.count = state
                .count
                .checked_add(1)
                .expect("conversation count overflow");
            state.last_seq = seq.get();
            // A fresh seq: no position has this key yet.
            view.put_new(
                keys::seq_position(shard, user, seq),
                &SeqPosition {
                    conversation: delivered.conversation,
                    pos: state.count,
                    expired: false,
                    forgotten: None,
                },
            );
            view.put(keys::read_state(shard, user, conv), &state)
        }
        Decoded::ReadUpTo(read) => {
            let (user, conv, up_to) = (read.user, read.conversation, read.up_to);
            let Some(target) = position(view, user, up_to)? else {
                // Read and then forgotten (checked against the inbox tail): nothing moves.
                return Ok(());
            };
            assert_eq!(
                target.conversation, read.event.conversation,
                "reads name a message of their conversation"
            );
            let mut state = get(view, user, conv)?;
            if target.pos <= state.read_pos {
                return Ok(());
            }
            let newly_read =
                positions_between(view, user, conv, InboxSeq::new(state.read_seq), up_to)?;
            let mut expired_now_read = 0_u64;
            for (seq, position) in newly_read {
                if position.expired {
                    expired_now_read = expired_now_read.checked_add(1).expect("count fits u64");
                }
                // Neither an expired message nor a forgotten one has a stub left that a later
                // read or receipt could need: its position leaves with the read.
                if position.expired || position.forgotten.is_some() {
                    view.delete(keys::seq_position(shard, user, seq))?;
                }
            }
            state.expired_unread = state
                .expired_unread
                .checked_sub(expired_now_read)
                .expect("expired unread messages were counted when they expired");
            state.read_pos = target.pos;
            state.read_seq = up_to.get();
            view.put(keys::read_state(shard, user, conv), &state)
        }
        Decoded::MessageExpired(expired) => {
            let (user, seq) = (expired.user, expired.seq);
            let Some(mut target) = position(view, user, seq)? else {
                let stored = inbox::entry(view, user, seq)?.expect("an expiring message is stored");
                assert_eq!(
                    stored.sender_user,
                    user.get(),
                    "only the sender's own copies have no position"
                );
                return Ok(());
            };
            assert!(!target.expired, "a message expires once");
            target.expired = true;
            let conv = stored_conversation(&target);
            let mut state = get(view, user, conv)?;
            if target.pos > state.read_pos {
                state.expired_unread = state.expired_unread.checked_add(1).expect("count overflow");
                view.put(keys::read_state(shard, user, conv), &state)?;
            }
            view.put(keys::seq_position(shard, user, seq), &target)
        }
        Decoded::InboxForgotten(messages) => forget_positions(view, messages),
        Decoded::AccountDeleted { user, .. } => {
            view.delete_prefix(&keys::user_records(shard, keys::tag::PRIMARY, *user))?;
            view.delete_prefix(&keys::user_records(shard, keys::tag::SECONDARY, *user))
        }
        Decoded::MessageSent(_)
        | Decoded::DeliveryAcked(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::UserRegistered(_)
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

/// `InboxForgotten`: the positions of forgotten stubs leave the read state (applied before the
/// inbox, so the stubs are still there to read).
fn forget_positions(
    view: &mut View<'_, '_>,
    messages: &[super::decode::ForgottenMessage<'_>],
) -> Result<()> {
    let shard = view.shard();
    // Applied before the inbox, so the stubs are still there to read.
    for message in messages {
        let Some(stub) = inbox::forgettable(view, message)? else {
            continue;
        };
        let (user, seq) = (message.user, message.seq);
        // A stored stub has a position, unless this event named it before (the inbox,
        // applied after this, still shows the stub): that read position already left.
        let Some(mut target) = position(view, user, seq)? else {
            continue;
        };
        let read_pos = get(view, user, stored_conversation(&target))?.read_pos;
        if target.pos <= read_pos {
            view.delete(keys::seq_position(shard, user, seq))?;
        } else {
            target.forgotten = Some(receipt_target(&stub));
            view.put(keys::seq_position(shard, user, seq), &target)?;
        }
    }
    Ok(())
}

/// Where the receipts of a stored message go.
pub fn receipt_target(entry: &courier_proto::pb::store::InboxEntry) -> ReceiptTarget {
    ReceiptTarget {
        message_id: entry.message_id.clone(),
        sender_user: entry.sender_user,
        source_shard: entry.source_shard,
        addressed_to: entry.addressed_to,
        receipts_sent: entry.receipts_sent,
    }
}

/// Up to `limit` conversations of `user` that follow `after` (1:1 ones by the other user's id,
/// then groups by id), each with its read state, and whether more follow.
///
/// # Errors
/// A storage fault.
pub fn conversations(
    view: &View<'_, '_>,
    user: UserId,
    after: Option<ConversationId>,
    limit: usize,
) -> Result<(Vec<(ConversationId, ReadState)>, bool)> {
    let prefix = keys::read_state_user_prefix(view.shard(), user);
    let end = keys::prefix_end(&prefix).expect("read state prefixes end below 0xff..");
    let from = match after {
        Some(conversation) => keys::after(keys::read_state(view.shard(), user, conversation)),
        None => prefix,
    };
    let mut page: Vec<(ConversationId, ReadState)> = view
        .scan::<ReadState>(Projection::ReadState, &from, &end, limit.saturating_add(1))?
        .into_iter()
        .filter_map(|(key, state)| Some((keys::read_state_conversation(&key)?, state)))
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    Ok((page, more))
}

/// Returns the exact unread count of a read state.
pub fn unread(state: &ReadState) -> u64 {
    state
        .count
        .checked_sub(state.read_pos)
        .and_then(|unread| unread.checked_sub(state.expired_unread))
        .expect("read_pos + expired_unread never exceed count")
}
