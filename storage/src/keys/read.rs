//! Decoders of the keys built in `keys/mod.rs`: [`KeyReader`] reads back the big-endian fields
//! [`KeyBuf`](super::KeyBuf) appended, and one function per scanned key kind returns its fields,
//! or `None` for a key of another shape.

use courier_proto::{
    ConversationId, DeviceId, GroupId, InboxSeq, LogIndex, MessageId, ShardId, UserId,
};

/// Reads big-endian fields back out of a key, in the order [`KeyBuf`](super::KeyBuf) appended
/// them.
#[derive(Debug)]
pub struct KeyReader<'k> {
    rest: &'k [u8],
}

impl<'k> KeyReader<'k> {
    /// Starts reading `key` after its first `skip` bytes (a prefix already known).
    pub fn after(key: &'k [u8], skip: usize) -> Option<Self> {
        Some(Self {
            rest: key.get(skip..)?,
        })
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[byte]| byte)
    }

    /// Reads a `u16`.
    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }

    /// Reads a `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }

    /// Reads a `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }

    /// Reads a message id (16 bytes).
    pub fn message(&mut self) -> Option<MessageId> {
        self.take().map(MessageId::from_bytes)
    }

    /// Reads a conversation (9 bytes, as [`KeyBuf::conv`](super::KeyBuf::conv) wrote it).
    pub fn conv(&mut self) -> Option<ConversationId> {
        let kind = self.u8()?;
        let id = self.u64()?;
        match kind {
            1 => Some(ConversationId::Direct(UserId::new(id)?)),
            2 => Some(ConversationId::Group(GroupId::new(id)?)),
            _ => None,
        }
    }

    /// Reads the rest of the key as UTF-8 text (a trailing string field).
    pub fn rest_str(self) -> Option<&'k str> {
        std::str::from_utf8(self.rest).ok()
    }

    /// Returns `value` when the whole key was read, `None` when bytes are left over.
    pub fn end<T>(self, value: T) -> Option<T> {
        self.rest.is_empty().then_some(value)
    }
}

/// Bytes before the fields of a projection key: shard (2) and record tag (1).
const RECORD_PREFIX_BYTES: usize = 3;
/// Bytes before the fields of a projection key keyed by one id: shard, tag and the id (a user
/// or a group, 8).
const ID_PREFIX_BYTES: usize = 11;

/// Decodes the shard a key of any family starts with.
pub fn key_shard(key: &[u8]) -> Option<ShardId> {
    KeyReader::after(key, 0)?.u16().map(ShardId::new)
}

/// Decodes the sequence of an [`inbox_message`](super::inbox_message) key.
pub fn inbox_message_seq(key: &[u8]) -> Option<InboxSeq> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let seq = key.u64()?;
    key.end(InboxSeq::new(seq))
}

/// Decodes the conversation of a [`read_state`](super::read_state) key.
pub fn read_state_conversation(key: &[u8]) -> Option<ConversationId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let conversation = key.conv()?;
    key.end(conversation)
}

/// Decodes the sequence of a [`seq_position`](super::seq_position) key.
pub fn seq_position_seq(key: &[u8]) -> Option<InboxSeq> {
    inbox_message_seq(key)
}

/// Decodes the recipient of a [`receipt`](super::receipt) key.
pub fn receipt_recipient(key: &[u8]) -> Option<UserId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    key.message()?;
    let recipient = UserId::new(key.u64()?)?;
    key.end(recipient)
}

/// Decodes `(message, recipient)` of a [`receipt`](super::receipt) key.
pub fn receipt_message_recipient(key: &[u8]) -> Option<(MessageId, UserId)> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let message = key.message()?;
    let recipient = UserId::new(key.u64()?)?;
    key.end((message, recipient))
}

/// Decodes `(set_at, message, recipient)` of a [`receipt_feed`](super::receipt_feed) key.
pub fn receipt_feed_parts(key: &[u8]) -> Option<(LogIndex, MessageId, UserId)> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let set_at = LogIndex::new(key.u64()?);
    let message = key.message()?;
    let recipient = UserId::new(key.u64()?)?;
    key.end((set_at, message, recipient))
}

/// Decodes the position of an [`outbox_entry`](super::outbox_entry) key.
pub fn outbox_entry_pos(key: &[u8]) -> Option<u64> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    key.u16()?;
    let pos = key.u64()?;
    key.end(pos)
}

/// Decodes the destination of an [`outbox_state`](super::outbox_state) key.
pub fn outbox_state_dest(key: &[u8]) -> Option<ShardId> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let dest = ShardId::new(key.u16()?);
    key.end(dest)
}

/// Decodes the raw device id of a [`device_record`](super::device_record) key.
pub fn device_record_device(key: &[u8]) -> Option<u32> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let device = key.u32()?;
    key.end(device)
}

/// Whether a devices-family key is one of the records that say who may connect (a phone's
/// user, a user record, a device record), not a registration record or its time index.
pub fn is_device_key(key: &[u8]) -> bool {
    matches!(
        key.get(2),
        Some(&(super::tag::PRIMARY | super::tag::SECONDARY | super::tag::TERTIARY))
    )
}

/// Whether a devices-family key is a device's published keys or one of its one-time prekeys.
pub fn is_prekey_key(key: &[u8]) -> bool {
    matches!(
        key.get(2),
        Some(&(super::tag::SENARY | super::tag::SEPTENARY))
    )
}

/// The user of a devices-family key that is a [`device_record`](super::device_record) key.
pub fn device_record_user(key: &[u8]) -> Option<UserId> {
    if key.get(2) != Some(&super::tag::TERTIARY) || device_record_device(key).is_none() {
        return None;
    }
    super::user_after_tag(key)
}

/// Decodes the member of a [`group_member`](super::group_member) key.
pub fn group_member_user(key: &[u8]) -> Option<UserId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let user = UserId::new(key.u64()?)?;
    key.end(user)
}

/// Decodes the group of a [`user_group`](super::user_group) key.
pub fn user_group_group(key: &[u8]) -> Option<GroupId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let group = GroupId::new(key.u64()?)?;
    key.end(group)
}

/// Decodes `(user, device, client_msg_id)` from a [`dedup`](super::dedup) key.
pub fn dedup_parts(key: &[u8]) -> Option<(UserId, DeviceId, &str)> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let user = UserId::new(key.u64()?)?;
    let device = DeviceId::new(key.u32()?)?;
    Some((user, device, key.rest_str()?))
}

/// Decodes `(sent_at_ms, user, device, client_msg_id)` from a
/// [`dedup_by_time`](super::dedup_by_time) key.
pub fn dedup_by_time_parts(key: &[u8]) -> Option<(u64, UserId, DeviceId, &str)> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let sent_at_ms = key.u64()?;
    let user = UserId::new(key.u64()?)?;
    let device = DeviceId::new(key.u32()?)?;
    Some((sent_at_ms, user, device, key.rest_str()?))
}

/// Decodes `(at_ms, sender, message, recipient)` from a
/// [`receipt_by_time`](super::receipt_by_time) key.
pub fn receipt_by_time_parts(key: &[u8]) -> Option<(u64, UserId, MessageId, UserId)> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let at_ms = key.u64()?;
    let sender = UserId::new(key.u64()?)?;
    let message = key.message()?;
    let recipient = UserId::new(key.u64()?)?;
    key.end((at_ms, sender, message, recipient))
}

/// Decodes `(stored_at_ms, user, seq)` from an [`inbox_stub_by_time`](super::inbox_stub_by_time)
/// key.
pub fn inbox_stub_by_time_parts(key: &[u8]) -> Option<(u64, UserId, InboxSeq)> {
    expiry_parts(key)
}

/// Decodes `(stored_at_ms, user, seq)` from an [`expiry`](super::expiry) key.
pub fn expiry_parts(key: &[u8]) -> Option<(u64, UserId, InboxSeq)> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let stored_at_ms = key.u64()?;
    let user = UserId::new(key.u64()?)?;
    let seq = InboxSeq::new(key.u64()?);
    key.end((stored_at_ms, user, seq))
}

/// Decodes the log index of a [`group_message`](super::group_message) key.
pub fn group_message_index(key: &[u8]) -> Option<LogIndex> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let at = LogIndex::new(key.u64()?);
    key.end(at)
}
