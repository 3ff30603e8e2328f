//! Projections: every state the cluster serves, folded from the shard's event log.
//!
//! Each projection lives in its own file with a pure `apply(&mut View, &Kind)`: no clock, no
//! randomness, no I/O but reads and staged writes through the [`View`]. Anything
//! non-deterministic was decided by the leader and travels inside the event.
//!
//! Order: for each event, projections apply in [`Projection::APPLY_ORDER`]. A projection may
//! read any family but writes only its own. Inbox applies last and outbox first, so that every
//! projection reading the inbox or the read state sees them as they were *before* the event.
//!
//! Duplicates are decided once, here, before any projection runs: a `MessageSent` whose client
//! id is known, a local `MessageDelivered` whose message id is stored, and a forwarded event at
//! or below the inbound watermark of its source shard change nothing.

pub mod cursors;
pub mod decode;
pub mod dedup;
pub mod devices;
pub mod expiry;
pub mod groups;
pub mod inbox;
pub mod invalid;
pub mod outbox;
pub mod prekeys;
pub mod readstate;
pub mod receipts;
pub mod refusal;
pub mod registration;
mod view;

#[cfg(test)]
mod account_test;
#[cfg(test)]
mod groups_test;
#[cfg(test)]
mod history_test;
#[cfg(test)]
mod inbox_test;
#[cfg(test)]
mod outbox_test;
#[cfg(test)]
mod prekeys_test;
#[cfg(test)]
mod projection_test;
#[cfg(test)]
mod receipts_test;
#[cfg(test)]
mod registration_test;
#[cfg(test)]
mod remote_test;

use std::borrow::Cow;
use std::ops::ControlFlow;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, Event};
use courier_proto::pb::store::SendResult;
use courier_proto::{InboxSeq, LogIndex, ShardId, UserId};

use crate::error::{Result, StorageError};
use crate::kv::Staged;

pub use self::decode::{DecodeError, Decoded, Target};
pub use self::invalid::{INVALID_CODE, Invalid};
pub use self::refusal::{GroupRefusal, GroupRefusalCode};
pub use self::registration::CodeOutcome;
pub use self::view::{View, frame, unframe};
pub use crate::cf::Projection;

/// Folds one event into one projection.
fn apply_projection(
    projection: Projection,
    view: &mut View<'_, '_>,
    event: &Decoded<'_>,
) -> Result<()> {
    match projection {
        Projection::Inbox => inbox::apply(view, event),
        Projection::Cursors => cursors::apply(view, event),
        Projection::ReadState => readstate::apply(view, event),
        Projection::Receipts => receipts::apply(view, event),
        Projection::Dedup => dedup::apply(view, event),
        Projection::Outbox => outbox::apply(view, event),
        Projection::Devices => {
            devices::apply(view, event)?;
            prekeys::apply(view, event)
        }
        Projection::Groups => groups::apply(view, event),
        Projection::Expiry => expiry::apply(view, event),
    }
}

/// Lower-case hex, for keys in errors and reports (keys hold ids, never bodies or phones).
/// Re-exported from `courier_proto`, where every crate finds it.
pub use courier_proto::hex;

/// What applying one event produced, for the caller waiting on the proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A `MessageSent`: the send's result; `duplicate` when the client id was already known
    /// (then `result` is the first send's).
    Sent {
        /// The (first) result.
        result: SendResult,
        /// Whether this was a retry.
        duplicate: bool,
    },
    /// A `MessageDelivered`: where the message sits in the recipient's inbox.
    Stored {
        /// The recipient.
        user: UserId,
        /// Its inbox sequence.
        seq: InboxSeq,
        /// Whether it was already stored.
        duplicate: bool,
    },
    /// A forwarded event at or below its source's inbound watermark: nothing changed.
    DuplicateForward,
    /// A `DeviceRegistered`: the device id it was given.
    DeviceRegistered {
        /// The user.
        user: UserId,
        /// The device id assigned at apply (1, 2, 3, … per user).
        device: u32,
    },
    /// A registration-code event: what it did.
    Code(CodeOutcome),
    /// A `KeysUploaded`: the device's stock of one-time prekeys after it.
    KeyStock(u32),
    /// A `PreKeysClaimed`: the encoded `KeyBundle` handed out.
    Bundle(Vec<u8>),
    /// Refused at apply by the state at this position (group events): nothing changed.
    Rejected {
        /// Stable code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// Any other event.
    Done,
}

/// Decides a forwarded event (source shard, position) before any projection runs: `Break` for
/// one already applied or one past the next position, `Continue` for the next.
fn admit_forwarded(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    source: ShardId,
    source_pos: u64,
) -> Result<ControlFlow<Applied>> {
    let view = View::new(staged, shard, at, Projection::Outbox);
    Ok(match invalid::inbound(&view, source, source_pos)? {
        invalid::Inbound::Duplicate => ControlFlow::Break(Applied::DuplicateForward),
        invalid::Inbound::Next => ControlFlow::Continue(()),
        invalid::Inbound::Gap { expected } => ControlFlow::Break(
            Invalid::ForwardGap {
                source_shard: source.get(),
                expected,
                got: source_pos,
            }
            .into(),
        ),
    })
}

/// The source shard and outbox position of a forwarded event.
fn forwarded_position(event: &Decoded<'_>) -> Option<(ShardId, u64)> {
    match event {
        Decoded::MessageDelivered(delivered) => delivered.forwarded,
        Decoded::ReceiptRecorded(receipt) => Some((receipt.source, receipt.event.source_pos)),
        _ => None,
    }
}

/// `event` with the meaning it has in an entry of event format `format`: the fields a later
/// format added are ignored, as the builds before them ignored them, so that replicas of both
/// builds apply an older entry alike (a newer build may have filled them in before the
/// cluster's format was raised). Format 2 added `DeliveryAcked.trim_max` and
/// `DeviceRegistered.companions_max`; format 3 `DeviceRegistered.approver_token_hash` and
/// `DeviceRegistered.revokes_companions`.
pub fn as_written_in(format: u32, event: &Event) -> Cow<'_, Event> {
    if format >= 3 {
        return Cow::Borrowed(event);
    }
    match &event.kind {
        Some(Kind::DeliveryAcked(acked)) if format < 2 && acked.trim_max != 0 => {
            Cow::Owned(Event {
                kind: Some(Kind::DeliveryAcked(events::DeliveryAcked {
                    trim_max: 0,
                    ..*acked
                })),
            })
        }
        Some(Kind::DeviceRegistered(registered))
            if (format < 2 && registered.companions_max != 0)
                || !registered.approver_token_hash.is_empty()
                || registered.revokes_companions =>
        {
            Cow::Owned(Event {
                kind: Some(Kind::DeviceRegistered(events::DeviceRegistered {
                    companions_max: if format < 2 {
                        0
                    } else {
                        registered.companions_max
                    },
                    approver_token_hash: Vec::new(),
                    revokes_companions: false,
                    ..registered.clone()
                })),
            })
        }
        _ => Cow::Borrowed(event),
    }
}

/// Folds one committed event into every projection.
///
/// An event that does not decode (a zero id, a malformed message id, …) or that the state at
/// `at` shows no validating leader proposed (an ack past the inbox tail, a receipt moving
/// backwards, …) changes nothing and is [`Applied::Rejected`] with [`INVALID_CODE`], the same
/// way on every replica (see [`invalid`]).
///
/// # Errors
/// A storage fault, or [`StorageError::UnknownEvent`] for an event this build does not know.
pub fn apply_event(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    event: &Event,
) -> Result<Applied> {
    let Some(kind) = &event.kind else {
        return Err(StorageError::UnknownEvent {
            shard,
            index: at,
            reason: "event of an unknown kind (a newer build wrote it)".to_owned(),
        });
    };
    // The leader validates every event before proposing it, so an event that does not decode
    // came from a bug or from outside; every replica decodes the same bytes the same way and so
    // refuses the same event.
    match decode::decode(kind) {
        Ok(decoded) => apply_decoded(staged, shard, at, &decoded),
        Err(error) => Ok(Invalid::from(error).into()),
    }
}

fn apply_decoded(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    event: &Decoded<'_>,
) -> Result<Applied> {
    let outcome = match admit(staged, shard, at, event)? {
        ControlFlow::Break(unchanged) => return Ok(unchanged),
        ControlFlow::Continue(outcome) => outcome,
    };
    let view = View::new(staged, shard, at, Projection::Outbox);
    if let Some(invalid) = invalid::check(&view, event)? {
        // A forwarded event refused here still takes its position (it was the next one, or
        // `admit` would have stopped it): the source trims its outbox past every position the
        // destination committed, so a position left unconsumed would stop the pair for good.
        if let Some((source, pos)) = forwarded_position(event) {
            let mut view = View::new(staged, shard, at, Projection::Outbox);
            outbox::set_inbound(&mut view, source, pos)?;
        }
        return Ok(invalid.into());
    }
    for projection in Projection::APPLY_ORDER {
        let mut view = View::new(staged, shard, at, projection);
        apply_projection(projection, &mut view, event)?;
    }
    if let Decoded::MessageSent(sent) = event {
        store_local_copies(staged, shard, at, sent)?;
    }
    if let (Decoded::DeviceRegistered(registered), Applied::Done) = (event, &outcome) {
        let view = View::new(staged, shard, at, Projection::Devices);
        let device = devices::devices_registered(&view, registered.user)?;
        return Ok(Applied::DeviceRegistered {
            user: registered.user,
            device,
        });
    }
    Ok(outcome)
}

/// Decides, before any projection runs, whether `event` changes anything: `Break` with the
/// outcome of an event that changes nothing (a duplicate, a refusal, a stale expiry), or
/// `Continue` with the outcome to answer once the projections applied it.
fn admit(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    event: &Decoded<'_>,
) -> Result<ControlFlow<Applied, Applied>> {
    let outcome = match event {
        Decoded::MessageSent(sent) => {
            let view = View::new(staged, shard, at, Projection::Dedup);
            if let Some(result) =
                dedup::lookup(&view, sent.sender, sent.device, &sent.event.client_msg_id)?
            {
                return Ok(ControlFlow::Break(Applied::Sent {
                    result,
                    duplicate: true,
                }));
            }
            let view = View::new(staged, shard, at, Projection::Groups);
            if let Some(refusal) = groups::check(&view, event)? {
                return Ok(ControlFlow::Break(refusal.into()));
            }
            Applied::Sent {
                result: SendResult {
                    message_id: sent.event.message_id.clone(),
                    sent_at_ms: sent.event.sent_at_ms,
                    log_index: at.get(),
                },
                duplicate: false,
            }
        }
        Decoded::MessageDelivered(delivered) => {
            return admit_delivery(staged, shard, at, delivered);
        }
        Decoded::ReceiptRecorded(receipt) => {
            let pos = receipt.event.source_pos;
            if let ControlFlow::Break(unchanged) =
                admit_forwarded(staged, shard, at, receipt.source, pos)?
            {
                return Ok(ControlFlow::Break(unchanged));
            }
            Applied::Done
        }
        Decoded::GroupCreated(_) | Decoded::MemberAdded(_) | Decoded::MemberRemoved(_) => {
            let view = View::new(staged, shard, at, Projection::Groups);
            if let Some(refusal) = groups::check(&view, event)? {
                return Ok(ControlFlow::Break(refusal.into()));
            }
            Applied::Done
        }
        Decoded::MessageExpired(expired) => {
            let view = View::new(staged, shard, at, Projection::Inbox);
            if !inbox::expirable(&view, expired.user, expired.seq, &expired.event.message_id)? {
                // Acked, or expired by an earlier proposal, between the leader's scan and this
                // commit: nothing left to expire.
                return Ok(ControlFlow::Break(Applied::Done));
            }
            Applied::Done
        }
        Decoded::Code(code) => {
            let view = View::new(staged, shard, at, Projection::Devices);
            match registration::outcome(&view, *code)? {
                // An empty bucket changes nothing (not even the bucket's time).
                limited @ CodeOutcome::RateLimited { .. } => {
                    return Ok(ControlFlow::Break(Applied::Code(limited)));
                }
                outcome => Applied::Code(outcome),
            }
        }
        Decoded::Keys(keys_event) => {
            let view = View::new(staged, shard, at, Projection::Devices);
            if let Some((code, message)) = prekeys::refusal(&view, *keys_event)? {
                return Ok(ControlFlow::Break(Applied::Rejected { code, message }));
            }
            match keys_event {
                decode::KeysEvent::Uploaded { .. } => {
                    Applied::KeyStock(prekeys::stock_after(&view, *keys_event)?)
                }
                decode::KeysEvent::Claimed { user, .. } => {
                    Applied::Bundle(prekeys::bundle_bytes(&view, *user)?)
                }
            }
        }
        Decoded::UserRegistered(_) | Decoded::DeviceRegistered(_) | Decoded::DeviceRevoked(_) => {
            if let Some(refusal) = registration_refusal(staged, shard, at, event)? {
                return Ok(ControlFlow::Break(refusal));
            }
            Applied::Done
        }
        Decoded::DeliveryAcked(_)
        | Decoded::ReadUpTo(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::AccountDeleted { .. } => Applied::Done,
    };
    Ok(ControlFlow::Continue(outcome))
}

/// [`admit`] for a registration event: refused when it depends on a code its entry did not use,
/// or links a companion past its `companions_max`.
fn registration_refusal(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    event: &Decoded<'_>,
) -> Result<Option<Applied>> {
    let view = View::new(staged, shard, at, Projection::Devices);
    if let Some(phone_hash) = redeemed_phone_hash(event)
        && !registration::redeemed_here(&view, phone_hash)?
    {
        return Ok(Some(Applied::Rejected {
            code: registration::NOT_REDEEMED,
            message: "the entry did not use the number's code".to_owned(),
        }));
    }
    match event {
        Decoded::DeviceRegistered(registered) => {
            if let Some(refused) = devices::approver_refusal(&view, registered)? {
                return Ok(Some(refused));
            }
            devices::companion_refusal(&view, registered)
        }
        _ => Ok(None),
    }
}

/// The number a registration event depends on (its entry must have used that number's code).
fn redeemed_phone_hash<'e>(event: &Decoded<'e>) -> Option<&'e [u8]> {
    let hash: &[u8] = match event {
        Decoded::UserRegistered(e) => &e.event.redeemed_phone_hash,
        Decoded::DeviceRegistered(e) => &e.event.redeemed_phone_hash,
        Decoded::DeviceRevoked(e) => &e.event.redeemed_phone_hash,
        _ => return None,
    };
    (!hash.is_empty()).then_some(hash)
}

/// [`admit`] for a `MessageDelivered`: a forward already applied, or a message already stored
/// for its recipient, changes nothing (but a stored message's new forward position still moves
/// the watermark).
fn admit_delivery(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    delivered: &decode::Delivered<'_>,
) -> Result<ControlFlow<Applied, Applied>> {
    let user = delivered.recipient;
    if let Some((source, pos)) = delivered.forwarded
        && let ControlFlow::Break(unchanged) = admit_forwarded(staged, shard, at, source, pos)?
    {
        return Ok(ControlFlow::Break(unchanged));
    }
    if delivered.own {
        let view = View::new(staged, shard, at, Projection::Devices);
        if !devices::has_companions(&view, user)? {
            // No other device to show it to: nothing is stored, the position is consumed.
            if let Some((source, pos)) = delivered.forwarded {
                let mut outbox = View::new(staged, shard, at, Projection::Outbox);
                outbox::set_inbound(&mut outbox, source, pos)?;
            }
            return Ok(ControlFlow::Break(Applied::Done));
        }
    }
    let view = View::new(staged, shard, at, Projection::Inbox);
    let inbox_state = inbox::state(&view, user)?;
    if inbox_state.closed {
        // The account was deleted: nothing is stored here, the position is consumed; after a
        // change of number the message follows the account.
        let mut outbox = View::new(staged, shard, at, Projection::Outbox);
        if let Some((source, pos)) = delivered.forwarded {
            outbox::set_inbound(&mut outbox, source, pos)?;
        }
        if let Some(moved_to) = UserId::new(inbox_state.moved_to) {
            let dest = ShardId::new(
                u16::try_from(inbox_state.moved_to_shard).expect("stored shard ids were checked"),
            );
            outbox::requeue(&mut outbox, (moved_to, dest), delivered.event.clone())?;
        }
        return Ok(ControlFlow::Break(Applied::Done));
    }
    if let Some(seq) = inbox::stored_seq(&view, user, &delivered.event.message_id)? {
        if let Some((source, pos)) = delivered.forwarded {
            // The position is new even though the message is not: the watermark moves, or the
            // next forward from that shard would look like a gap.
            let mut outbox = View::new(staged, shard, at, Projection::Outbox);
            outbox::set_inbound(&mut outbox, source, pos)?;
        }
        return Ok(ControlFlow::Break(Applied::Stored {
            user,
            seq,
            duplicate: true,
        }));
    }
    Ok(ControlFlow::Continue(Applied::Stored {
        user,
        seq: InboxSeq::new(inbox_state.tail_seq).next(),
        duplicate: false,
    }))
}

/// Stores the copies of a send for recipients on this shard in the same entry (no forward): the
/// 1:1 recipient, or the group's members here, and the sender's own copy for their other
/// devices (the sender's shard takes a 1:1 send; a group's fan-out includes the sender). Runs after dedup and the group check, so a
/// retried or refused send stores nothing. `source_pos` 0 marks "no forward"; `source_shard` is
/// this shard, where the receipts go.
fn store_local_copies(
    staged: &mut Staged<'_>,
    shard: ShardId,
    at: LogIndex,
    sent: &decode::Sent<'_>,
) -> Result<()> {
    let local: Vec<events::MessageDelivered> = match sent.to {
        Some(Target::User(recipient, recipient_shard)) => {
            let mut local = Vec::with_capacity(2);
            if recipient_shard == shard {
                local.extend(outbox::delivery_of(sent, sent.event.sent_at_ms));
            }
            let view = View::new(staged, shard, at, Projection::Devices);
            if sent.event.own_copies
                && recipient != sent.sender
                && devices::has_companions(&view, sent.sender)?
            {
                // Built only for a sender with another device (one read otherwise; no copy of
                // the content).
                local.extend(outbox::own_copy_of(sent));
            }
            local
        }
        None => Vec::new(),
        Some(Target::Group(_)) => {
            let view = View::new(staged, shard, at, Projection::Groups);
            outbox::group_deliveries(&view, sent, at, sent.event.sent_at_ms)?
                .into_iter()
                .filter(|(member_shard, _)| *member_shard == shard)
                .map(|(_, delivered)| delivered)
                .collect()
        }
    };
    for mut delivered in local {
        delivered.source_shard = u32::from(shard.get());
        apply_event(
            staged,
            shard,
            at,
            &Event {
                kind: Some(Kind::MessageDelivered(delivered)),
            },
        )?;
    }
    Ok(())
}
