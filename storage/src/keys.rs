//! Every key of every column family, built from big-endian integers so that byte order equals
//! numeric order: iterating a prefix walks sequences and log indexes in order.
//!
//! All keys start with the shard id (`u16`). Projection families then carry a one-byte record
//! tag. Layout (`|` concatenates; integers big-endian; `conv` is 9 bytes, a kind byte 1 = user,
//! 2 = group, then the id):
//!
//! | family | key | value |
//! | --- | --- | --- |
//! | log | shard \| index:u64 | crc32c:u32 \| term:u64 \| payload |
//! | raftstate | shard \| tag:u8 (1 vote, 2 committed, 3 purged) | crc32c:u32 \| bytes |
//! | meta | shard \| 1 | AppliedState |
//! | inbox | shard \| 1 \| user \| seq | InboxEntry |
//! | inbox | shard \| 2 \| user | InboxState |
//! | inbox | shard \| 3 \| user \| message_id:16 | seq:u64 |
//! | cursors | shard \| 1 \| user \| device:u32 | acked seq:u64 |
//! | readstate | shard \| 1 \| user \| conv | ReadState |
//! | readstate | shard \| 2 \| user \| seq | SeqPosition |
//! | receipts | shard \| 1 \| sender \| message_id:16 \| recipient | Receipt |
//! | receipts | shard \| 2 \| sender \| set_at:u64 \| message_id:16 \| recipient | Receipt (feed) |
//! | dedup | shard \| 1 \| user \| device \| client_msg_id | SendResult |
//! | outbox | shard \| 1 \| dest:u16 \| pos:u64 | OutboxEntry |
//! | outbox | shard \| 2 \| dest:u16 | OutboxState |
//! | outbox | shard \| 3 \| source:u16 | InboundState |
//! | devices | shard \| 1 \| phone_hash:16 | user:u64 |
//! | devices | shard \| 2 \| user | UserRecord |
//! | devices | shard \| 3 \| user \| device | DeviceRecord |
//! | groups | shard \| 1 \| group | GroupRecord |
//! | groups | shard \| 2 \| group \| user | MemberRecord |
//! | expiry | shard \| 1 \| stored_at_ms:u64 \| user \| seq | ExpiryEntry |
//!
//! Projection values are framed by `value.rs` (`set_at` index, then the message).

use courier_proto::{
    ConversationId, DeviceId, GroupId, InboxSeq, LogIndex, MessageId, ShardId, UserId,
};

/// Record tags inside the raftstate family.
pub mod raft_tag {
    /// The last vote.
    pub const VOTE: u8 = 1;
    /// The last known committed log id.
    pub const COMMITTED: u8 = 2;
    /// The last purged log id.
    pub const PURGED: u8 = 3;
}

/// Record tags inside projection families (see the module table).
pub mod tag {
    /// inbox: a message; cursors, readstate, receipts, dedup, devices: the main record.
    pub const PRIMARY: u8 = 1;
    /// inbox: per-user state; readstate: seq → position; outbox: per-destination state;
    /// devices: user record; groups: member record.
    pub const SECONDARY: u8 = 2;
    /// inbox: message id → seq; outbox: inbound watermark; devices: device record; groups: a
    /// user's membership (user → group).
    pub const TERTIARY: u8 = 3;
    /// groups: the one stored copy of a group message.
    pub const QUATERNARY: u8 = 4;
}

/// Appends big-endian fields to a key.
#[derive(Debug, Default)]
pub struct KeyBuf(Vec<u8>);

impl KeyBuf {
    /// Starts a key with the shard prefix.
    pub fn shard(shard: ShardId) -> Self {
        let mut key = Vec::with_capacity(48);
        key.extend_from_slice(&shard.get().to_be_bytes());
        Self(key)
    }

    /// Appends one byte.
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    /// Appends a `u16`.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes (only as the last field, or with a fixed length).
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }

    /// Appends a conversation (9 bytes).
    pub fn conv(self, conversation: ConversationId) -> Self {
        match conversation {
            ConversationId::Direct(user) => self.u8(1).u64(user.get()),
            ConversationId::Group(group) => self.u8(2).u64(group.get()),
        }
    }

    /// Returns the key.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// The first key after every key that starts with `prefix` (for range ends), or `None` when the
/// prefix is all `0xff`.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last.wrapping_add(1));
            return Some(end);
        }
    }
    None
}

/// The shard's whole key range in any family: `[shard, shard + 1)`.
pub fn shard_range(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    let start = KeyBuf::shard(shard).done();
    let end = prefix_end(&start).unwrap_or_else(|| vec![0xff; 3]);
    (start, end)
}

/// log: one entry.
pub fn log_entry(shard: ShardId, index: LogIndex) -> Vec<u8> {
    KeyBuf::shard(shard).u64(index.get()).done()
}

/// Decodes the index of a log key.
pub fn log_entry_index(key: &[u8]) -> Option<LogIndex> {
    let bytes: [u8; 8] = key.get(2..10)?.try_into().ok()?;
    Some(LogIndex::new(u64::from_be_bytes(bytes)))
}

/// raftstate: one record.
pub fn raft_state(shard: ShardId, tag: u8) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag).done()
}

/// meta: the shard's applied state.
pub fn applied_state(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(1).done()
}

/// inbox: one message.
pub fn inbox_message(shard: ShardId, user: UserId, seq: InboxSeq) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(user.get())
        .u64(seq.get())
        .done()
}

/// inbox: prefix of one user's messages.
pub fn inbox_user_prefix(shard: ShardId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::PRIMARY).u64(user.get()).done()
}

/// inbox: one user's state.
pub fn inbox_state(shard: ShardId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(user.get())
        .done()
}

/// inbox: message id → seq, for delivery dedup.
pub fn inbox_message_id(shard: ShardId, user: UserId, message: MessageId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u64(user.get())
        .bytes(message.as_bytes())
        .done()
}

/// cursors: one device's acked sequence.
pub fn cursor(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(user.get())
        .u32(device.get())
        .done()
}

/// readstate: one conversation of one user.
pub fn read_state(shard: ShardId, user: UserId, conversation: ConversationId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(user.get())
        .conv(conversation)
        .done()
}

/// readstate: prefix of one user's conversations.
pub fn read_state_user_prefix(shard: ShardId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::PRIMARY).u64(user.get()).done()
}

/// readstate: where inbox message `seq` sits in its conversation.
pub fn seq_position(shard: ShardId, user: UserId, seq: InboxSeq) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(user.get())
        .u64(seq.get())
        .done()
}

/// receipts: one recipient's state of one message.
pub fn receipt(shard: ShardId, sender: UserId, message: MessageId, recipient: UserId) -> Vec<u8> {
    receipt_message_prefix(shard, sender, message)
        .into_iter()
        .chain(recipient.get().to_be_bytes())
        .collect()
}

/// receipts: prefix of all recipients of one message.
pub fn receipt_message_prefix(shard: ShardId, sender: UserId, message: MessageId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(sender.get())
        .bytes(message.as_bytes())
        .done()
}

/// receipts: one entry of a sender's receipt feed, ordered by the log index that set it.
pub fn receipt_feed(
    shard: ShardId,
    sender: UserId,
    set_at: LogIndex,
    message: MessageId,
    recipient: UserId,
) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(sender.get())
        .u64(set_at.get())
        .bytes(message.as_bytes())
        .u64(recipient.get())
        .done()
}

/// receipts: the first feed key of `sender` strictly after `position` (the position's own key
/// followed by a zero byte, the next key in byte order).
pub fn receipt_feed_after(
    shard: ShardId,
    sender: UserId,
    position: &courier_proto::ReceiptFeedPosition,
) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(sender.get())
        .u64(position.set_at.get())
        .bytes(&position.message)
        .u64(position.recipient)
        .u8(0)
        .done()
}

/// receipts: prefix of a sender's receipt feed.
pub fn receipt_feed_prefix(shard: ShardId, sender: UserId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(sender.get())
        .done()
}

/// dedup: one client send.
pub fn dedup(shard: ShardId, user: UserId, device: DeviceId, client_msg_id: &str) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(user.get())
        .u32(device.get())
        .bytes(client_msg_id.as_bytes())
        .done()
}

/// outbox: one entry to a destination shard.
pub fn outbox_entry(shard: ShardId, dest: ShardId, pos: u64) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u16(dest.get())
        .u64(pos)
        .done()
}

/// outbox: prefix of the entries to one destination.
pub fn outbox_dest_prefix(shard: ShardId, dest: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::PRIMARY).u16(dest.get()).done()
}

/// outbox: state of the queue to one destination.
pub fn outbox_state(shard: ShardId, dest: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u16(dest.get())
        .done()
}

/// outbox: prefix of every destination's state.
pub fn outbox_state_prefix(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::SECONDARY).done()
}

/// outbox: the inbound watermark from one source shard.
pub fn inbound_state(shard: ShardId, source: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u16(source.get())
        .done()
}

/// devices: phone hash → user.
pub fn phone(shard: ShardId, phone_hash: &[u8]) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .bytes(phone_hash)
        .done()
}

/// devices: one user.
pub fn user_record(shard: ShardId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(user.get())
        .done()
}

/// devices: one device.
pub fn device_record(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u64(user.get())
        .u32(device.get())
        .done()
}

/// devices: prefix of one user's devices.
pub fn device_user_prefix(shard: ShardId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u64(user.get())
        .done()
}

/// groups: one group.
pub fn group(shard: ShardId, group: GroupId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(group.get())
        .done()
}

/// groups: one member of one group.
pub fn group_member(shard: ShardId, group: GroupId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(group.get())
        .u64(user.get())
        .done()
}

/// groups: prefix of one group's members.
pub fn group_member_prefix(shard: ShardId, group: GroupId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(group.get())
        .done()
}

/// groups: the one stored copy of the group message sent at log index `at` of this shard.
pub fn group_message(shard: ShardId, at: LogIndex) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::QUATERNARY)
        .u64(at.get())
        .done()
}

/// groups: a user's membership of a group on this shard (for listing a user's groups).
pub fn user_group(shard: ShardId, user: UserId, group: GroupId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u64(user.get())
        .u64(group.get())
        .done()
}

/// groups: prefix of one user's memberships on this shard.
pub fn user_group_prefix(shard: ShardId, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u64(user.get())
        .done()
}

/// expiry: an undelivered message, ordered by when it was stored.
pub fn expiry(shard: ShardId, stored_at_ms: u64, user: UserId, seq: InboxSeq) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(stored_at_ms)
        .u64(user.get())
        .u64(seq.get())
        .done()
}

/// expiry: prefix of every entry of the shard.
pub fn expiry_prefix(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::PRIMARY).done()
}

/// Reads big-endian fields back out of a key, in the order [`KeyBuf`] appended them.
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

    /// Reads a conversation (9 bytes, as [`KeyBuf::conv`] wrote it).
    pub fn conv(&mut self) -> Option<ConversationId> {
        let kind = self.u8()?;
        let id = self.u64()?;
        match kind {
            1 => Some(ConversationId::Direct(UserId::new(id)?)),
            2 => Some(ConversationId::Group(GroupId::new(id)?)),
            _ => None,
        }
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

/// Decodes the sequence of an [`inbox_message`] key.
pub fn inbox_message_seq(key: &[u8]) -> Option<InboxSeq> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let seq = key.u64()?;
    key.end(InboxSeq::new(seq))
}

/// Decodes the conversation of a [`read_state`] key.
pub fn read_state_conversation(key: &[u8]) -> Option<ConversationId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let conversation = key.conv()?;
    key.end(conversation)
}

/// Decodes the sequence of a [`seq_position`] key.
pub fn seq_position_seq(key: &[u8]) -> Option<InboxSeq> {
    inbox_message_seq(key)
}

/// Decodes the recipient of a [`receipt`] key.
pub fn receipt_recipient(key: &[u8]) -> Option<UserId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    key.message()?;
    let recipient = UserId::new(key.u64()?)?;
    key.end(recipient)
}

/// Decodes `(set_at, message, recipient)` of a [`receipt_feed`] key.
pub fn receipt_feed_parts(key: &[u8]) -> Option<(LogIndex, MessageId, UserId)> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let set_at = LogIndex::new(key.u64()?);
    let message = key.message()?;
    let recipient = UserId::new(key.u64()?)?;
    key.end((set_at, message, recipient))
}

/// Decodes the position of an [`outbox_entry`] key.
pub fn outbox_entry_pos(key: &[u8]) -> Option<u64> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    key.u16()?;
    let pos = key.u64()?;
    key.end(pos)
}

/// Decodes the destination of an [`outbox_state`] key.
pub fn outbox_state_dest(key: &[u8]) -> Option<ShardId> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let dest = ShardId::new(key.u16()?);
    key.end(dest)
}

/// Decodes the raw device id of a [`device_record`] key.
pub fn device_record_device(key: &[u8]) -> Option<u32> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let device = key.u32()?;
    key.end(device)
}

/// Decodes the member of a [`group_member`] key.
pub fn group_member_user(key: &[u8]) -> Option<UserId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let user = UserId::new(key.u64()?)?;
    key.end(user)
}

/// Decodes the group of a [`user_group`] key.
pub fn user_group_group(key: &[u8]) -> Option<GroupId> {
    let mut key = KeyReader::after(key, ID_PREFIX_BYTES)?;
    let group = GroupId::new(key.u64()?)?;
    key.end(group)
}

/// Decodes `(stored_at_ms, user, seq)` from an [`expiry`] key.
pub fn expiry_parts(key: &[u8]) -> Option<(u64, UserId, InboxSeq)> {
    let mut key = KeyReader::after(key, RECORD_PREFIX_BYTES)?;
    let stored_at_ms = key.u64()?;
    let user = UserId::new(key.u64()?)?;
    let seq = InboxSeq::new(key.u64()?);
    key.end((stored_at_ms, user, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_is_numeric_order() {
        let shard = ShardId::new(1);
        let user = UserId::new(7).expect("nonzero");
        let a = inbox_message(shard, user, InboxSeq::new(255));
        let b = inbox_message(shard, user, InboxSeq::new(256));
        assert!(a < b, "seq 255 sorts before 256");
        let a = log_entry(shard, LogIndex::new(9));
        let b = log_entry(ShardId::new(2), LogIndex::new(1));
        assert!(a < b, "shards are contiguous ranges");
        assert_eq!(
            log_entry_index(&log_entry(shard, LogIndex::new(77))),
            Some(LogIndex::new(77))
        );
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let (start, end) = shard_range(ShardId::new(3));
        assert_eq!((start, end), (vec![0, 3], vec![0, 4]));
    }

    #[test]
    fn expiry_keys_decode() {
        let user = UserId::new(5).expect("nonzero");
        let key = expiry(ShardId::new(0), 1234, user, InboxSeq::new(9));
        assert_eq!(expiry_parts(&key), Some((1234, user, InboxSeq::new(9))));
    }

    #[test]
    fn decoders_read_what_encoders_wrote() {
        let shard = ShardId::new(4);
        let user = UserId::new(5).expect("nonzero");
        let other = UserId::new(6).expect("nonzero");
        let group = GroupId::new(8).expect("nonzero");
        let seq = InboxSeq::new(9);
        let message = MessageId::from_bytes([3; 16]);
        assert_eq!(key_shard(&inbox_message(shard, user, seq)), Some(shard));
        assert_eq!(
            inbox_message_seq(&inbox_message(shard, user, seq)),
            Some(seq)
        );
        assert_eq!(seq_position_seq(&seq_position(shard, user, seq)), Some(seq));
        for conversation in [ConversationId::Direct(other), ConversationId::Group(group)] {
            let key = read_state(shard, user, conversation);
            assert_eq!(read_state_conversation(&key), Some(conversation));
        }
        let key = receipt(shard, user, message, other);
        assert_eq!(receipt_recipient(&key), Some(other));
        let key = receipt_feed(shard, user, LogIndex::new(11), message, other);
        assert_eq!(
            receipt_feed_parts(&key),
            Some((LogIndex::new(11), message, other))
        );
        let dest = ShardId::new(12);
        assert_eq!(outbox_entry_pos(&outbox_entry(shard, dest, 13)), Some(13));
        assert_eq!(outbox_state_dest(&outbox_state(shard, dest)), Some(dest));
        let device = DeviceId::new(14).expect("nonzero");
        assert_eq!(
            device_record_device(&device_record(shard, user, device)),
            Some(14)
        );
        assert_eq!(
            group_member_user(&group_member(shard, group, other)),
            Some(other)
        );
        assert_eq!(
            user_group_group(&user_group(shard, user, group)),
            Some(group)
        );
    }

    #[test]
    fn decoders_refuse_short_and_long_keys() {
        let shard = ShardId::new(1);
        let user = UserId::new(2).expect("nonzero");
        let mut key = inbox_message(shard, user, InboxSeq::new(3));
        key.push(0);
        assert_eq!(inbox_message_seq(&key), None);
        assert_eq!(inbox_message_seq(&key[..key.len() - 2]), None);
        assert_eq!(key_shard(&[7]), None);
    }
}
