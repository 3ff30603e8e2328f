//! Decoding a committed event into checked domain values, once, before any projection runs.
//!
//! The leader validates every event before proposing it, so a committed event that fails to
//! decode here is a bug (or a log written by something else). The decision is made in one place,
//! [`decode`], and returned as a [`DecodeError`] naming the field; [`super::apply_event`] is the
//! one place that turns it into a panic, so every replica stops on the same entry.
//!
//! Each decoded variant keeps a reference to the wire event for the fields projections store as
//! they are (contents, timestamps, the wire conversation), so stored values stay bit for bit what
//! they were.

use courier_proto::pb::events::conversation::With;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, Conversation};
use courier_proto::{
    ConversationId, DeviceId, GroupId, InboxSeq, LogIndex, MessageId, ShardId, UserId, WireError,
};

/// A committed event that does not decode into domain values: which event, and which field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{event} failed validation: {source}")]
pub struct DecodeError {
    /// The event's name (`MessageSent`, …).
    pub event: &'static str,
    /// The field and what is wrong with it.
    #[source]
    pub source: WireError,
}

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A 1:1 message to this user, on this shard (`recipient_shard`).
    User(UserId, ShardId),
    /// A group message.
    Group(GroupId),
}

/// A decoded `MessageSent`.
#[derive(Clone, Copy, Debug)]
pub struct Sent<'e> {
    /// The wire event.
    pub event: &'e events::MessageSent,
    /// The sender.
    pub sender: UserId,
    /// The sender's device.
    pub device: DeviceId,
    /// The message id.
    pub message: MessageId,
    /// Where it goes (`None` when the event names no conversation).
    pub to: Option<Target>,
}

/// A decoded `MessageDelivered`.
#[derive(Clone, Copy, Debug)]
pub struct Delivered<'e> {
    /// The wire event.
    pub event: &'e events::MessageDelivered,
    /// The recipient.
    pub recipient: UserId,
    /// The message id.
    pub message: MessageId,
    /// The conversation.
    pub conversation: ConversationId,
    /// For a forwarded copy (`source_pos > 0`): the source shard and the position in its outbox.
    pub forwarded: Option<(ShardId, u64)>,
    /// The sender's own copy, for the sender's other devices (multi-device history): stored for
    /// the sender in a conversation with someone else. A note to oneself (a 1:1 send to one's
    /// own user) is an ordinary message.
    pub own: bool,
}

/// A decoded `DeliveryAcked`.
#[derive(Clone, Copy, Debug)]
pub struct Acked<'e> {
    /// The wire event.
    pub event: &'e events::DeliveryAcked,
    /// The user.
    pub user: UserId,
    /// The acking device.
    pub device: DeviceId,
    /// Acked up to this sequence.
    pub up_to: InboxSeq,
}

/// A decoded `ReadUpTo`.
#[derive(Clone, Copy, Debug)]
pub struct Read<'e> {
    /// The wire event.
    pub event: &'e events::ReadUpTo,
    /// The reader.
    pub user: UserId,
    /// The conversation.
    pub conversation: ConversationId,
    /// Read up to this inbox sequence.
    pub up_to: InboxSeq,
}

/// A decoded `ReceiptRecorded`.
#[derive(Clone, Copy, Debug)]
pub struct Receipt<'e> {
    /// The wire event.
    pub event: &'e events::ReceiptRecorded,
    /// The message's sender.
    pub sender: UserId,
    /// The message.
    pub message: MessageId,
    /// The recipient whose copy moved.
    pub recipient: UserId,
    /// The recipient's shard, which forwarded the receipt.
    pub source: ShardId,
}

/// A decoded `OutboxTrimmed`.
#[derive(Clone, Copy, Debug)]
pub struct Trimmed<'e> {
    /// The wire event.
    pub event: &'e events::OutboxTrimmed,
    /// The destination whose queue is trimmed.
    pub dest: ShardId,
}

/// A decoded `UserRegistered` or `DeviceRegistered` (the device id is assigned at apply).
#[derive(Clone, Debug)]
pub struct Registered<'e, E> {
    /// The wire event.
    pub event: &'e E,
    /// The user.
    pub user: UserId,
}

/// A decoded registration-code event (the number's hash and the code hash checked for length).
#[derive(Clone, Copy, Debug)]
pub enum CodeEvent<'e> {
    /// `CodeIssued`.
    Issued(&'e events::CodeIssued),
    /// `CodeAttempted`.
    Attempted(&'e events::CodeAttempted),
    /// `CodeWithdrawn`.
    Withdrawn(&'e events::CodeWithdrawn),
    /// `RegistrationsForgotten`: records with nothing left to remember before this time leave.
    Forgotten {
        /// The leader's clock when it proposed the event.
        before_ms: u64,
    },
}

/// A decoded key-directory event.
#[derive(Clone, Copy, Debug)]
pub enum KeysEvent<'e> {
    /// `KeysUploaded`.
    Uploaded {
        /// The wire event.
        event: &'e events::KeysUploaded,
        /// The owner.
        user: UserId,
        /// The device whose keys these are.
        device: DeviceId,
    },
    /// `PreKeysClaimed`.
    Claimed {
        /// The wire event.
        event: &'e events::PreKeysClaimed,
        /// Whose bundle was fetched.
        user: UserId,
    },
}

/// A public key's size: 1..=`PREKEY_BYTES_MAX` bytes (`max` for signatures).
fn key_bytes(bytes: &[u8], max: usize, field: &'static str) -> Result<(), WireError> {
    if bytes.is_empty() {
        return Err(WireError::Missing { field });
    }
    if bytes.len() > max {
        return Err(WireError::TooLong {
            field,
            len: bytes.len(),
            max,
        });
    }
    Ok(())
}

fn keys_uploaded(event: &events::KeysUploaded) -> Result<KeysEvent<'_>, WireError> {
    use courier_proto::limits::{
        PREKEY_BYTES_MAX, PREKEY_SIGNATURE_BYTES_MAX, PREKEYS_PER_UPLOAD_MAX,
    };
    key_bytes(&event.identity_key, PREKEY_BYTES_MAX, "identity_key")?;
    let signed = event.signed_prekey.as_ref().ok_or(WireError::Missing {
        field: "signed_prekey",
    })?;
    key_bytes(
        &signed.public_key,
        PREKEY_BYTES_MAX,
        "signed_prekey.public_key",
    )?;
    key_bytes(
        &signed.signature,
        PREKEY_SIGNATURE_BYTES_MAX,
        "signed_prekey.signature",
    )?;
    if event.one_time_prekeys.len() > PREKEYS_PER_UPLOAD_MAX {
        return Err(WireError::TooLong {
            field: "one_time_prekeys",
            len: event.one_time_prekeys.len(),
            max: PREKEYS_PER_UPLOAD_MAX,
        });
    }
    for key in &event.one_time_prekeys {
        key_bytes(
            &key.public_key,
            PREKEY_BYTES_MAX,
            "one_time_prekeys.public_key",
        )?;
    }
    Ok(KeysEvent::Uploaded {
        event,
        user: user(event.user, "user")?,
        device: DeviceId::from_wire(event.device, "device")?,
    })
}

fn prekeys_claimed(event: &events::PreKeysClaimed) -> Result<KeysEvent<'_>, WireError> {
    Ok(KeysEvent::Claimed {
        event,
        user: user(event.user, "user")?,
    })
}

/// The length of a phone hash (`PhoneHasher::phone_hash`).
pub const PHONE_HASH_BYTES: usize = 16;
/// The length of a code hash (`PhoneHasher::code_hash`).
pub const CODE_HASH_BYTES: usize = 32;

fn exact_len(bytes: &[u8], len: usize, field: &'static str) -> Result<(), WireError> {
    if bytes.len() == len {
        Ok(())
    } else {
        Err(WireError::Malformed {
            field,
            reason: "not the hash's length",
        })
    }
}

fn limit(limit: Option<&events::RateLimit>) -> Result<(), WireError> {
    match limit {
        None => Err(WireError::Missing { field: "limit" }),
        Some(l) if l.per_hour == 0 || l.burst == 0 => Err(WireError::Zero {
            field: "limit.per_hour and limit.burst",
        }),
        Some(_) => Ok(()),
    }
}

/// Decodes a registration-code event (any other kind is malformed here).
fn code_event(kind: &Kind) -> Result<CodeEvent<'_>, WireError> {
    Ok(match kind {
        Kind::CodeIssued(event) => {
            exact_len(&event.phone_hash, PHONE_HASH_BYTES, "phone_hash")?;
            exact_len(&event.code_hash, CODE_HASH_BYTES, "code_hash")?;
            limit(event.limit.as_ref())?;
            if event.attempts == 0 {
                return Err(WireError::Zero { field: "attempts" });
            }
            CodeEvent::Issued(event)
        }
        Kind::CodeAttempted(event) => {
            exact_len(&event.phone_hash, PHONE_HASH_BYTES, "phone_hash")?;
            exact_len(&event.code_hash, CODE_HASH_BYTES, "code_hash")?;
            limit(event.limit.as_ref())?;
            CodeEvent::Attempted(event)
        }
        Kind::CodeWithdrawn(event) => {
            exact_len(&event.phone_hash, PHONE_HASH_BYTES, "phone_hash")?;
            exact_len(&event.code_hash, CODE_HASH_BYTES, "code_hash")?;
            CodeEvent::Withdrawn(event)
        }
        Kind::RegistrationsForgotten(event) => CodeEvent::Forgotten {
            before_ms: event.before_ms,
        },
        _ => {
            return Err(WireError::Malformed {
                field: "kind",
                reason: "not a registration-code event",
            });
        }
    })
}

/// A decoded `DeviceRevoked`.
#[derive(Clone, Copy, Debug)]
pub struct Revoked<'e> {
    /// The wire event.
    pub event: &'e events::DeviceRevoked,
    /// The user.
    pub user: UserId,
    /// The revoked device.
    pub device: DeviceId,
}

/// A decoded `GroupCreated`.
#[derive(Clone, Copy, Debug)]
pub struct GroupCreated<'e> {
    /// The wire event.
    pub event: &'e events::GroupCreated,
    /// The group.
    pub group: GroupId,
    /// Its creator (the first admin).
    pub creator: UserId,
    /// The creator's shard.
    pub creator_shard: ShardId,
}

/// A decoded `MemberAdded` or `MemberRemoved`.
#[derive(Clone, Debug)]
pub struct Membership<'e, E> {
    /// The wire event.
    pub event: &'e E,
    /// The group.
    pub group: GroupId,
    /// The member added or removed.
    pub user: UserId,
    /// Who did it; `None` for a zero id, which is never an admin (the group check refuses it).
    pub by: Option<UserId>,
}

/// A decoded `MessageExpired`.
#[derive(Clone, Copy, Debug)]
pub struct Expired<'e> {
    /// The wire event.
    pub event: &'e events::MessageExpired,
    /// The recipient.
    pub user: UserId,
    /// The expiring inbox sequence.
    pub seq: InboxSeq,
}

/// One send of a decoded `SendsForgotten`.
#[derive(Clone, Copy, Debug)]
pub struct ForgottenSend<'e> {
    /// The wire entry.
    pub event: &'e events::ForgottenSend,
    /// The sender.
    pub sender: UserId,
    /// The sender's device.
    pub device: DeviceId,
}

/// One message of a decoded `InboxForgotten`.
#[derive(Clone, Copy, Debug)]
pub struct ForgottenMessage<'e> {
    /// The wire entry.
    pub event: &'e events::ForgottenMessage,
    /// The recipient.
    pub user: UserId,
    /// Its inbox sequence.
    pub seq: InboxSeq,
}

/// One receipt of a decoded `ReceiptsForgotten`.
#[derive(Clone, Copy, Debug)]
pub struct ForgottenReceipt<'e> {
    /// The wire entry.
    pub event: &'e events::ForgottenReceipt,
    /// The message's sender.
    pub sender: UserId,
    /// The message.
    pub message: MessageId,
    /// The recipient.
    pub recipient: UserId,
}

/// One committed event with its ids checked.
#[derive(Clone, Debug)]
pub enum Decoded<'e> {
    /// `MessageSent`.
    MessageSent(Sent<'e>),
    /// `MessageDelivered`.
    MessageDelivered(Delivered<'e>),
    /// `DeliveryAcked`.
    DeliveryAcked(Acked<'e>),
    /// `ReadUpTo`.
    ReadUpTo(Read<'e>),
    /// `ReceiptRecorded`.
    ReceiptRecorded(Receipt<'e>),
    /// `OutboxTrimmed`.
    OutboxTrimmed(Trimmed<'e>),
    /// `UserRegistered`.
    UserRegistered(Registered<'e, events::UserRegistered>),
    /// `DeviceRegistered`.
    DeviceRegistered(Registered<'e, events::DeviceRegistered>),
    /// `DeviceRevoked`.
    DeviceRevoked(Revoked<'e>),
    /// `GroupCreated`.
    GroupCreated(GroupCreated<'e>),
    /// `MemberAdded`.
    MemberAdded(Membership<'e, events::MemberAdded>),
    /// `MemberRemoved`.
    MemberRemoved(Membership<'e, events::MemberRemoved>),
    /// `MessageExpired`.
    MessageExpired(Expired<'e>),
    /// `SendsForgotten`: the sends whose dedup records leave.
    SendsForgotten(Vec<ForgottenSend<'e>>),
    /// `InboxForgotten`: the inbox stubs that leave.
    InboxForgotten(Vec<ForgottenMessage<'e>>),
    /// `ReceiptsForgotten`: the receipts that leave.
    ReceiptsForgotten(Vec<ForgottenReceipt<'e>>),
    /// `GroupMessagesForgotten`: stored group message copies up to an index leave (the time
    /// the leader decided by stays in the wire event, for readers of the log).
    GroupMessagesForgotten {
        /// The last log index whose copy leaves.
        up_to: LogIndex,
    },
    /// A registration-code event.
    Code(CodeEvent<'e>),
    /// A key-directory event.
    Keys(KeysEvent<'e>),
    /// `AccountDeleted`: the user whose account leaves, and the primary device that asked (with
    /// its token's hash).
    AccountDeleted {
        /// The user.
        user: UserId,
        /// The device that asked.
        device: DeviceId,
        /// SHA-256 of that device's token.
        token_hash: &'e [u8],
        /// A change of number: the user the account moved to, and that user's shard.
        moved_to: Option<(UserId, ShardId)>,
    },
}

fn user(raw: u64, field: &'static str) -> Result<UserId, WireError> {
    UserId::from_wire(raw, field)
}

fn shard(raw: u32, field: &'static str) -> Result<ShardId, WireError> {
    u16::try_from(raw)
        .map(ShardId::new)
        .map_err(|_| WireError::OutOfRange {
            field,
            value: u64::from(raw),
            min: 0,
            max: u64::from(u16::MAX),
        })
}

fn conversation(
    wire: Option<&Conversation>,
    field: &'static str,
) -> Result<ConversationId, WireError> {
    ConversationId::try_from(wire.ok_or(WireError::Missing { field })?)
}

fn sent(event: &events::MessageSent) -> Result<Sent<'_>, WireError> {
    let to = match event.to.as_ref().and_then(|to| to.with) {
        Some(With::User(recipient)) => Some(Target::User(
            user(recipient, "to.user")?,
            shard(event.recipient_shard, "recipient_shard")?,
        )),
        Some(With::Group(group)) => Some(Target::Group(GroupId::from_wire(group, "to.group")?)),
        None => None,
    };
    Ok(Sent {
        event,
        sender: user(event.sender_user, "sender_user")?,
        device: DeviceId::from_wire(event.sender_device, "sender_device")?,
        message: MessageId::from_wire(&event.message_id, "message_id")?,
        to,
    })
}

/// Whether `event` is the sender's own copy of a message (for the sender's other devices): stored
/// for the sender, in a conversation with someone else. A note to oneself is not one.
pub fn own_copy(event: &events::MessageDelivered) -> bool {
    is_own(
        event.sender_user,
        event.recipient_user,
        event.conversation.as_ref(),
    )
}

/// Whether a message from `sender` stored for `user` in `conversation` is the sender's own copy.
pub fn is_own(sender: u64, user: u64, conversation: Option<&Conversation>) -> bool {
    sender == user
        && !matches!(
            conversation.and_then(|c| c.with),
            Some(With::User(peer)) if peer == user
        )
}

fn delivered(event: &events::MessageDelivered) -> Result<Delivered<'_>, WireError> {
    // Stored with the message even when not forwarded: receipts go back to it.
    let source = shard(event.source_shard, "source_shard")?;
    let forwarded = (event.source_pos > 0).then_some((source, event.source_pos));
    if let Some(origin) = event.origin_shard {
        shard(origin, "origin_shard")?;
    }
    Ok(Delivered {
        event,
        recipient: user(event.recipient_user, "recipient_user")?,
        message: MessageId::from_wire(&event.message_id, "message_id")?,
        conversation: conversation(event.conversation.as_ref(), "conversation")?,
        forwarded,
        own: own_copy(event),
    })
}

fn receipt(event: &events::ReceiptRecorded) -> Result<Receipt<'_>, WireError> {
    Ok(Receipt {
        event,
        sender: user(event.sender_user, "sender_user")?,
        message: MessageId::from_wire(&event.message_id, "message_id")?,
        recipient: user(event.recipient_user, "recipient_user")?,
        source: shard(event.source_shard, "source_shard")?,
    })
}

fn membership<'e, E>(
    event: &'e E,
    group: u64,
    member: u64,
    by: u64,
) -> Result<Membership<'e, E>, WireError> {
    Ok(Membership {
        event,
        group: GroupId::from_wire(group, "group")?,
        user: user(member, "user")?,
        by: UserId::new(by),
    })
}

/// The name of an event kind, for errors.
pub fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::MessageSent(_) => "MessageSent",
        Kind::MessageDelivered(_) => "MessageDelivered",
        Kind::DeliveryAcked(_) => "DeliveryAcked",
        Kind::ReadUpTo(_) => "ReadUpTo",
        Kind::ReceiptRecorded(_) => "ReceiptRecorded",
        Kind::OutboxTrimmed(_) => "OutboxTrimmed",
        Kind::UserRegistered(_) => "UserRegistered",
        Kind::DeviceRegistered(_) => "DeviceRegistered",
        Kind::DeviceRevoked(_) => "DeviceRevoked",
        Kind::GroupCreated(_) => "GroupCreated",
        Kind::MemberAdded(_) => "MemberAdded",
        Kind::MemberRemoved(_) => "MemberRemoved",
        Kind::MessageExpired(_) => "MessageExpired",
        Kind::SendsForgotten(_) => "SendsForgotten",
        Kind::InboxForgotten(_) => "InboxForgotten",
        Kind::ReceiptsForgotten(_) => "ReceiptsForgotten",
        Kind::GroupMessagesForgotten(_) => "GroupMessagesForgotten",
        Kind::CodeIssued(_) => "CodeIssued",
        Kind::CodeAttempted(_) => "CodeAttempted",
        Kind::CodeWithdrawn(_) => "CodeWithdrawn",
        Kind::RegistrationsForgotten(_) => "RegistrationsForgotten",
        Kind::KeysUploaded(_) => "KeysUploaded",
        Kind::PrekeysClaimed(_) => "PreKeysClaimed",
        Kind::AccountDeleted(_) => "AccountDeleted",
    }
}

/// Decodes one committed event's ids into domain values.
///
/// Checks exactly what the projections rely on: non-zero user, device and group ids, 16-byte
/// message ids, shard ids that fit `u16` where they are used, and a conversation where one is
/// stored. Pure; the same event decodes the same way on every replica.
///
/// # Errors
/// [`DecodeError`] naming the event and the field that does not decode.
pub fn decode(kind: &Kind) -> Result<Decoded<'_>, DecodeError> {
    decode_fields(kind).map_err(|source| DecodeError {
        event: kind_name(kind),
        source,
    })
}

fn forgotten_receipts(
    event: &events::ReceiptsForgotten,
) -> Result<Vec<ForgottenReceipt<'_>>, WireError> {
    event
        .receipts
        .iter()
        .map(|receipt| {
            Ok(ForgottenReceipt {
                event: receipt,
                sender: user(receipt.sender_user, "sender_user")?,
                message: MessageId::from_wire(&receipt.message_id, "message_id")?,
                recipient: user(receipt.recipient_user, "recipient_user")?,
            })
        })
        .collect()
}

fn decode_fields(kind: &Kind) -> Result<Decoded<'_>, WireError> {
    Ok(match kind {
        Kind::MessageSent(event) => Decoded::MessageSent(sent(event)?),
        Kind::MessageDelivered(event) => Decoded::MessageDelivered(delivered(event)?),
        Kind::DeliveryAcked(event) => Decoded::DeliveryAcked(Acked {
            event,
            user: user(event.user, "user")?,
            device: DeviceId::from_wire(event.device, "device")?,
            up_to: InboxSeq::new(event.up_to_seq),
        }),
        Kind::ReadUpTo(event) => Decoded::ReadUpTo(Read {
            event,
            user: user(event.user, "user")?,
            conversation: conversation(event.conversation.as_ref(), "conversation")?,
            up_to: InboxSeq::new(event.up_to_seq),
        }),
        Kind::ReceiptRecorded(event) => Decoded::ReceiptRecorded(receipt(event)?),
        Kind::OutboxTrimmed(event) => Decoded::OutboxTrimmed(Trimmed {
            event,
            dest: shard(event.dest_shard, "dest_shard")?,
        }),
        Kind::UserRegistered(event) => Decoded::UserRegistered(Registered {
            event,
            user: user(event.user, "user")?,
        }),
        Kind::DeviceRegistered(event) => Decoded::DeviceRegistered(Registered {
            event,
            user: user(event.user, "user")?,
        }),
        Kind::DeviceRevoked(event) => Decoded::DeviceRevoked(Revoked {
            event,
            user: user(event.user, "user")?,
            device: DeviceId::from_wire(event.device, "device")?,
        }),
        Kind::GroupCreated(event) => Decoded::GroupCreated(GroupCreated {
            event,
            // Stored in the member record, where group fan-out reads it back.
            creator_shard: shard(event.creator_shard, "creator_shard")?,
            group: GroupId::from_wire(event.group, "group")?,
            creator: user(event.creator, "creator")?,
        }),
        Kind::MemberAdded(event) => {
            // Stored in the member record, where group fan-out reads it back.
            shard(event.user_shard, "user_shard")?;
            Decoded::MemberAdded(membership(event, event.group, event.user, event.by)?)
        }
        Kind::MemberRemoved(event) => {
            Decoded::MemberRemoved(membership(event, event.group, event.user, event.by)?)
        }
        Kind::MessageExpired(event) => Decoded::MessageExpired(Expired {
            event,
            user: user(event.user, "user")?,
            seq: InboxSeq::new(event.seq),
        }),
        Kind::SendsForgotten(event) => Decoded::SendsForgotten(
            event
                .sends
                .iter()
                .map(|send| {
                    Ok(ForgottenSend {
                        event: send,
                        sender: user(send.sender_user, "sender_user")?,
                        device: DeviceId::from_wire(send.sender_device, "sender_device")?,
                    })
                })
                .collect::<Result<_, WireError>>()?,
        ),
        Kind::InboxForgotten(event) => Decoded::InboxForgotten(
            event
                .messages
                .iter()
                .map(|message| {
                    Ok(ForgottenMessage {
                        event: message,
                        user: user(message.user, "user")?,
                        seq: InboxSeq::new(message.seq),
                    })
                })
                .collect::<Result<_, WireError>>()?,
        ),
        Kind::ReceiptsForgotten(event) => Decoded::ReceiptsForgotten(forgotten_receipts(event)?),
        Kind::GroupMessagesForgotten(event) => Decoded::GroupMessagesForgotten {
            up_to: LogIndex::new(event.up_to_index),
        },
        Kind::CodeIssued(_)
        | Kind::CodeAttempted(_)
        | Kind::CodeWithdrawn(_)
        | Kind::RegistrationsForgotten(_) => Decoded::Code(code_event(kind)?),
        Kind::KeysUploaded(event) => Decoded::Keys(keys_uploaded(event)?),
        Kind::PrekeysClaimed(event) => Decoded::Keys(prekeys_claimed(event)?),
        Kind::AccountDeleted(event) => Decoded::AccountDeleted {
            user: user(event.user, "user")?,
            device: DeviceId::from_wire(event.device, "device")?,
            token_hash: &event.token_hash,
            moved_to: match event.moved_to {
                0 => None,
                moved_to => Some((
                    user(moved_to, "moved_to")?,
                    shard(event.moved_to_shard, "moved_to_shard")?,
                )),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zero sender is refused by name, not decoded.
    #[test]
    fn zero_ids_are_named() {
        let kind = Kind::MessageSent(events::MessageSent {
            message_id: vec![1; 16],
            sender_device: 1,
            ..Default::default()
        });
        let error = decode(&kind).unwrap_err();
        assert_eq!(error.event, "MessageSent");
        assert_eq!(
            error.source,
            WireError::Zero {
                field: "sender_user"
            }
        );
    }

    /// A shard id past `u16` is out of range.
    #[test]
    fn oversized_shards_are_refused() {
        let kind = Kind::OutboxTrimmed(events::OutboxTrimmed {
            dest_shard: 70_000,
            up_to: 1,
        });
        assert!(matches!(
            decode(&kind).unwrap_err().source,
            WireError::OutOfRange {
                field: "dest_shard",
                ..
            }
        ));
    }
}
