//! Events the state at their log position shows no validating leader proposed: refused at apply,
//! the same way on every replica, instead of stopping the replica.
//!
//! Leaders validate every event before proposing it, and the projections assert what that
//! validation guarantees (an ack never passes the inbox tail, a receipt only moves forward, …).
//! An event that reached the log some other way — a forged peer call, a bug in a proposer — must
//! not be able to trip those asserts: with `panic = "abort"` every replica would stop on the same
//! committed entry and stop again on restart, for good. So `check` tests each precondition
//! the projections assert, before any of them runs, and an event that fails one becomes
//! `Applied::Rejected` with [`INVALID_CODE`]: nothing changes, the digests stay equal on every
//! replica, and the node counts and logs it. The asserts stay, now as statements of what
//! `check` guarantees.

use courier_proto::pb::events::ReceiptState;
use courier_proto::pb::store::{DeviceRecord, Receipt, UserRecord};
use courier_proto::{DeviceId, ShardId, UserId};

use super::decode::DecodeError;
use super::{Applied, Decoded, Projection, View, inbox, outbox, readstate};
use crate::error::Result;
use crate::keys;

/// The stable code of every event refused as invalid at apply.
pub const INVALID_CODE: &str = "COURIER:Event:Invalid";

/// Why a committed event was refused as invalid at apply. Ids only, never bodies or phones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// An id that does not decode (zero, out of range, malformed).
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A device registered for a user that was never registered.
    #[error("DeviceRegistered for unregistered user {user}")]
    UnknownUser {
        /// The user.
        user: u64,
    },
    /// An account deletion asked by a device that is not the user's active primary with that
    /// token (revoked, replaced, or the account is gone).
    #[error("AccountDeleted of user {user} by device {device}: not its active primary")]
    NotThePrimary {
        /// The user.
        user: u64,
        /// The device named.
        device: u32,
    },
    /// A change of number to the account's own user (its re-queued deliveries would come back
    /// to its own closed inbox for ever).
    #[error("AccountDeleted of user {user} moving to itself")]
    MoveToSelf {
        /// The user.
        user: u64,
    },
    /// A revocation of a device that was never registered.
    #[error("DeviceRevoked of unregistered device {device} of user {user}")]
    UnknownDevice {
        /// The user.
        user: u64,
        /// The device.
        device: u32,
    },
    /// A registration naming a device id other than the next one (or the id space is spent).
    #[error("DeviceRegistered names device {named}; the next id is {next}")]
    DeviceOutOfOrder {
        /// The id the event named.
        named: u32,
        /// The next id (`u32::MAX + 1` when none is left).
        next: u64,
    },
    /// A phone hash registered again for a different user.
    #[error("UserRegistered of user {user} for a phone hash user {owner} holds")]
    PhoneTaken {
        /// The user the event names.
        user: u64,
        /// The user the phone hash belongs to.
        owner: u64,
    },
    /// An ack past the recipient's inbox tail.
    #[error("DeliveryAcked up to {up_to} past user {user}'s inbox tail {tail}")]
    AckPastTail {
        /// The user.
        user: u64,
        /// The acked sequence.
        up_to: u64,
        /// The tail.
        tail: u64,
    },
    /// A read naming a sequence with no stored message, or one of another conversation.
    #[error("ReadUpTo names sequence {seq} of user {user}, not a message of its conversation")]
    ReadNotInConversation {
        /// The reader.
        user: u64,
        /// The sequence.
        seq: u64,
    },
    /// A receipt that does not move forward (or names no state).
    #[error("ReceiptRecorded moves {from:?} to {to:?}; receipts only move forward")]
    ReceiptNotForward {
        /// The stored state.
        from: ReceiptState,
        /// The state the event names.
        to: ReceiptState,
    },
    /// A forwarded event past the next position from its source.
    #[error("forwarded position {got} from shard {source_shard}; the next is {expected}")]
    ForwardGap {
        /// The source shard.
        source_shard: u16,
        /// The next position (the inbound watermark + 1).
        expected: u64,
        /// The position the event names.
        got: u64,
    },
    /// A forget of group message copies at or past its own log index (no copy can be there).
    #[error("GroupMessagesForgotten up to index {up_to} at index {at}")]
    ForgetsAhead {
        /// The index named.
        up_to: u64,
        /// The event's own index.
        at: u64,
    },
    /// A trim past the last queued position.
    #[error("OutboxTrimmed up to {up_to} past the last position {last} to shard {dest}")]
    TrimPastEnd {
        /// The destination shard.
        dest: u16,
        /// The trimmed position.
        up_to: u64,
        /// The last queued position.
        last: u64,
    },
}

impl From<Invalid> for Applied {
    fn from(invalid: Invalid) -> Self {
        Applied::Rejected {
            code: INVALID_CODE,
            message: invalid.to_string(),
        }
    }
}

/// Where a forwarded position stands against the inbound watermark of its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Inbound {
    /// At or below the watermark: already applied.
    Duplicate,
    /// The watermark + 1.
    Next,
    /// Past the watermark + 1.
    Gap {
        /// The watermark + 1.
        expected: u64,
    },
}

/// Places forwarded position `pos` from `source` against this shard's inbound watermark.
///
/// # Errors
/// A storage fault.
pub(super) fn inbound(view: &View<'_, '_>, source: ShardId, pos: u64) -> Result<Inbound> {
    let applied = outbox::inbound_applied_from(view, source)?;
    if pos <= applied {
        return Ok(Inbound::Duplicate);
    }
    // `pos > applied`, so `applied < u64::MAX`.
    let expected = applied.saturating_add(1);
    Ok(if pos == expected {
        Inbound::Next
    } else {
        Inbound::Gap { expected }
    })
}

/// `AccountDeleted` asked by a device that is not, at this position, `user`'s active primary
/// with that token hash.
fn deletion_by_non_primary(
    view: &View<'_, '_>,
    user: UserId,
    device: DeviceId,
    token_hash: &[u8],
) -> Result<Option<Invalid>> {
    let key = keys::device_record(view.shard(), user, device);
    let record: Option<DeviceRecord> = view.get(Projection::Devices, &key)?;
    let asked_by_primary =
        record.is_some_and(|r| r.primary && !r.revoked && r.token_hash.as_slice() == token_hash);
    Ok((!asked_by_primary).then_some(Invalid::NotThePrimary {
        user: user.get(),
        device: device.get(),
    }))
}

/// Tests `event` against every precondition a projection asserts, at its log position; `None`
/// when it may apply. Runs after duplicates were decided (a duplicate changes nothing either way).
///
/// # Errors
/// A storage fault.
pub(super) fn check(view: &View<'_, '_>, event: &Decoded<'_>) -> Result<Option<Invalid>> {
    let shard = view.shard();
    Ok(match event {
        Decoded::UserRegistered(registered) => {
            super::devices::user_by_phone(view, &registered.event.phone_hash)?
                .filter(|owner| *owner != registered.user)
                .map(|owner| Invalid::PhoneTaken {
                    user: registered.user.get(),
                    owner: owner.get(),
                })
        }
        Decoded::DeviceRegistered(registered) => {
            let user = registered.user;
            match view.get::<UserRecord>(Projection::Devices, &keys::user_record(shard, user))? {
                None => Some(Invalid::UnknownUser { user: user.get() }),
                Some(record) => {
                    let next = u64::from(record.devices_registered).saturating_add(1);
                    let named = registered.event.device;
                    let fits = u32::try_from(next).is_ok();
                    (!fits || (named != 0 && u64::from(named) != next))
                        .then_some(Invalid::DeviceOutOfOrder { named, next })
                }
            }
        }
        Decoded::AccountDeleted {
            user,
            moved_to: Some((moved_to, _)),
            ..
        } if moved_to == user => Some(Invalid::MoveToSelf { user: user.get() }),
        Decoded::AccountDeleted {
            user,
            device,
            token_hash,
            ..
        } => deletion_by_non_primary(view, *user, *device, token_hash)?,
        Decoded::DeviceRevoked(revoked) => view
            .get::<DeviceRecord>(
                Projection::Devices,
                &keys::device_record(shard, revoked.user, revoked.device),
            )?
            .is_none()
            .then_some(Invalid::UnknownDevice {
                user: revoked.user.get(),
                device: revoked.device.get(),
            }),
        Decoded::DeliveryAcked(acked) => {
            let tail = inbox::tail(view, acked.user)?;
            (acked.up_to > tail).then_some(Invalid::AckPastTail {
                user: acked.user.get(),
                up_to: acked.up_to.get(),
                tail: tail.get(),
            })
        }
        Decoded::ReadUpTo(read) => {
            let names_its_message = match readstate::read_target(view, read.user, read.up_to)? {
                readstate::ReadTarget::Position(target) => {
                    target.conversation == read.event.conversation
                }
                // A position leaves only once read: a read of it changes nothing.
                readstate::ReadTarget::ReadAlready => true,
                readstate::ReadTarget::Unknown => false,
            };
            (!names_its_message).then_some(Invalid::ReadNotInConversation {
                user: read.user.get(),
                seq: read.up_to.get(),
            })
        }
        Decoded::ReceiptRecorded(receipt) => {
            let key = keys::receipt(shard, receipt.sender, receipt.message, receipt.recipient);
            let from = view
                .get::<Receipt>(Projection::Receipts, &key)?
                .map_or(ReceiptState::Unspecified, |stored| stored.state());
            let to = receipt.event.state();
            (to <= from).then_some(Invalid::ReceiptNotForward { from, to })
        }
        Decoded::OutboxTrimmed(trimmed) => {
            let last = outbox::state(view, trimmed.dest)?.last_pos;
            let up_to = trimmed.event.up_to;
            (up_to > last).then_some(Invalid::TrimPastEnd {
                dest: trimmed.dest.get(),
                up_to,
                last,
            })
        }
        Decoded::GroupMessagesForgotten { up_to } => {
            (*up_to >= view.at()).then_some(Invalid::ForgetsAhead {
                up_to: up_to.get(),
                at: view.at().get(),
            })
        }
        // Group events are checked by `groups::check` (refusals with their own codes); an
        // expiry that names nothing expirable is a no-op decided in `admit`; sends and
        // deliveries assert nothing a sender controls; a code event's outcome is decided from its
        // number's record, whatever it holds; key uploads are refused in `admit`.
        Decoded::MessageSent(_)
        | Decoded::Code(_)
        | Decoded::Keys(_)
        | Decoded::MessageDelivered(_)
        | Decoded::GroupCreated(_)
        | Decoded::MemberAdded(_)
        | Decoded::MemberRemoved(_)
        | Decoded::MessageExpired(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_) => None,
    })
}
