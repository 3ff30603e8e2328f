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
//! | meta | shard \| 2 | snapshot install marker: index:u64 \| phase:u8 (`crate::install`) |
//! | inbox | shard \| 1 \| user \| seq | InboxEntry |
//! | inbox | shard \| 2 \| user | InboxState |
//! | inbox | shard \| 3 \| user \| message_id:16 | seq:u64 |
//! | inbox | shard \| 4 \| stored_at_ms:u64 \| user \| seq | () (trimmed stubs by time) |
//! | cursors | shard \| 1 \| user \| device:u32 | acked seq:u64 |
//! | readstate | shard \| 1 \| user \| conv | ReadState |
//! | readstate | shard \| 2 \| user \| seq | SeqPosition |
//! | receipts | shard \| 1 \| sender \| message_id:16 \| recipient | Receipt |
//! | receipts | shard \| 2 \| sender \| set_at:u64 \| message_id:16 \| recipient | Receipt (feed) |
//! | receipts | shard \| 3 \| at_ms:u64 \| sender \| message_id:16 \| recipient | () (by time) |
//! | dedup | shard \| 1 \| user \| device \| client_msg_id | SendResult |
//! | dedup | shard \| 2 \| sent_at_ms:u64 \| user \| device \| client_msg_id | () (by time) |
//! | outbox | shard \| 1 \| dest:u16 \| pos:u64 | OutboxEntry |
//! | outbox | shard \| 2 \| dest:u16 | OutboxState |
//! | outbox | shard \| 3 \| source:u16 | InboundState |
//! | devices | shard \| 1 \| phone_hash:16 | user:u64 |
//! | devices | shard \| 2 \| user | UserRecord |
//! | devices | shard \| 3 \| user \| device | DeviceRecord |
//! | devices | shard \| 4 \| phone_hash:16 | RegistrationRecord (codes and limits) |
//! | devices | shard \| 5 \| forget_at_ms:u64 \| phone_hash:16 | () (registrations by time) |
//! | devices | shard \| 6 \| user \| device | DeviceKeys (identity key, signed prekey, stock) |
//! | devices | shard \| 7 \| user \| device \| key_id:u32 | PreKey (one one-time prekey) |
//! | groups | shard \| 1 \| group | GroupRecord |
//! | groups | shard \| 2 \| group \| user | MemberRecord |
//! | expiry | shard \| 1 \| stored_at_ms:u64 \| user \| seq | ExpiryEntry |
//!
//! Projection values are framed by `projection/view.rs` (`set_at` index, then the message).
//! Each key kind that is scanned has its decoder in `read.rs`, re-exported here beside the
//! encoders.

use courier_proto::{
    ConversationId, DeviceId, GroupId, InboxSeq, LogIndex, MessageId, ShardId, UserId,
};

mod read;

pub use self::read::*;

/// Record tags inside the raftstate family.
pub mod raft_tag {
    /// The last vote.
    pub const VOTE: u8 = 1;
    /// The last known committed log id.
    pub const COMMITTED: u8 = 2;
    /// The last purged log id.
    pub const PURGED: u8 = 3;
    /// The storage index up to which the log is archived (verified segments), u64 big-endian:
    /// no entry above it is ever deleted by a purge.
    pub const ARCHIVED: u8 = 4;
    /// This node's replica of the shard was dropped (it moved to another node): the lowest
    /// raft term (u64 big-endian) of a leader whose entries may start it again; `u64::MAX`
    /// until a move back readmits it. Until then the group is not started and has no vote. The
    /// only record of a dropped shard.
    pub const DROPPED: u8 = 5;
}

/// Record tags inside projection families (see the module table).
pub mod tag {
    /// inbox: a message; cursors, readstate, receipts, dedup, devices: the main record.
    pub const PRIMARY: u8 = 1;
    /// inbox: per-user state; readstate: seq → position; outbox: per-destination state;
    /// devices: user record; groups: member record.
    pub const SECONDARY: u8 = 2;
    /// inbox: message id → seq; outbox: inbound watermark; devices: device record; groups: a
    /// user's membership (user → group); receipts: receipts by time.
    pub const TERTIARY: u8 = 3;
    /// groups: the one stored copy of a group message; inbox: trimmed stubs by time; devices: a
    /// number's registration record.
    pub const QUATERNARY: u8 = 4;
    /// groups: how far the stored copies of group messages were forgotten; devices:
    /// registration records by time.
    pub const QUINARY: u8 = 5;
    /// devices: a device's published keys.
    pub const SENARY: u8 = 6;
    /// devices: a device's one-time prekeys.
    pub const SEPTENARY: u8 = 7;
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

/// The first key after `key` itself (for ranges that resume past a key already read).
pub fn after(mut key: Vec<u8>) -> Vec<u8> {
    key.push(0);
    key
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

/// meta: marks an unfinished snapshot install of the shard (`crate::install`): the index the
/// snapshot installs (big-endian) and the install's phase.
pub fn snapshot_install(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(2).done()
}

/// The user of a key laid out as shard, tag, user (every key of the inbox and receipts families
/// but their time indexes, [`inbox_stub_by_time`] and [`receipt_by_time`]), or `None` for a
/// shorter key.
pub fn user_after_tag(key: &[u8]) -> Option<UserId> {
    let bytes: [u8; 8] = key.get(3..11)?.try_into().ok()?;
    UserId::new(u64::from_be_bytes(bytes))
}

/// inbox: one message.
pub fn inbox_message(shard: ShardId, user: UserId, seq: InboxSeq) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::PRIMARY)
        .u64(user.get())
        .u64(seq.get())
        .done()
}

/// Any projection family: the prefix of one user's records of a kind laid out as shard, `tag`,
/// user (for `AccountDeleted`, which removes them all).
pub fn user_records(shard: ShardId, tag: u8, user: UserId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag).u64(user.get()).done()
}

/// dedup: the time index entry of the send whose record key is `record_key` (a [`dedup`] key),
/// sent at `sent_at_ms`.
pub fn dedup_by_time_of(record_key: &[u8], sent_at_ms: u64) -> Option<Vec<u8>> {
    let shard = key_shard(record_key)?;
    let fields = record_key.get(3..)?;
    Some(
        KeyBuf::shard(shard)
            .u8(tag::SECONDARY)
            .u64(sent_at_ms)
            .bytes(fields)
            .done(),
    )
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

/// inbox: the index of trimmed stubs by the time their message was stored, which the leader
/// scans for the ones to forget.
pub fn inbox_stub_by_time(
    shard: ShardId,
    stored_at_ms: u64,
    user: UserId,
    seq: InboxSeq,
) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::QUATERNARY)
        .u64(stored_at_ms)
        .u64(user.get())
        .u64(seq.get())
        .done()
}

/// inbox: the first key of the stub index.
pub fn inbox_stub_by_time_start(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::QUATERNARY).done()
}

/// inbox: the first key after the stub index entries of messages stored before
/// `stored_before_ms`.
pub fn inbox_stub_by_time_end(shard: ShardId, stored_before_ms: u64) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::QUATERNARY)
        .u64(stored_before_ms)
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

/// receipts: the index of receipts by the time they were set (`Receipt::at_ms`), which the
/// leader scans for the ones to forget.
pub fn receipt_by_time(
    shard: ShardId,
    at_ms: u64,
    sender: UserId,
    message: MessageId,
    recipient: UserId,
) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::TERTIARY)
        .u64(at_ms)
        .u64(sender.get())
        .bytes(message.as_bytes())
        .u64(recipient.get())
        .done()
}

/// receipts: the first key of the time index.
pub fn receipt_by_time_start(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::TERTIARY).done()
}

/// receipts: the first key after the time index entries of receipts set before `before_ms`.
pub fn receipt_by_time_end(shard: ShardId, before_ms: u64) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::TERTIARY).u64(before_ms).done()
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

/// dedup: the time index of one client send (when it was sent, then the record's fields), so
/// the sends older than the dedup window are found with one bounded scan.
pub fn dedup_by_time(
    shard: ShardId,
    sent_at_ms: u64,
    user: UserId,
    device: DeviceId,
    client_msg_id: &str,
) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(sent_at_ms)
        .u64(user.get())
        .u32(device.get())
        .bytes(client_msg_id.as_bytes())
        .done()
}

/// dedup: the first key after the time index entries of sends before `sent_before_ms` (the first
/// key of the index is [`dedup_by_time_start`]).
pub fn dedup_by_time_end(shard: ShardId, sent_before_ms: u64) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SECONDARY)
        .u64(sent_before_ms)
        .done()
}

/// dedup: the first key of the time index.
pub fn dedup_by_time_start(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::SECONDARY).done()
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

/// devices: one number's registration record (codes and limits).
pub fn registration(shard: ShardId, phone_hash: &[u8]) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::QUATERNARY)
        .bytes(phone_hash)
        .done()
}

/// devices: a registration record's entry in the time index, at the time it can be forgotten.
pub fn registration_by_time(shard: ShardId, forget_at_ms: u64, phone_hash: &[u8]) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::QUINARY)
        .u64(forget_at_ms)
        .bytes(phone_hash)
        .done()
}

/// devices: the first key of the registrations' time index.
pub fn registration_by_time_start(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::QUINARY).done()
}

/// devices: the end (exclusive) of the time index's entries forgettable before `before_ms`.
pub fn registration_by_time_end(shard: ShardId, before_ms: u64) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::QUINARY).u64(before_ms).done()
}

/// The phone hash of a registration time-index key (shard, tag, time, then the hash).
pub fn registration_by_time_phone(key: &[u8]) -> Option<&[u8]> {
    key.get(2 + 1 + 8..)
}

/// devices: one device's published keys.
pub fn device_keys(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SENARY)
        .u64(user.get())
        .u32(device.get())
        .done()
}

/// devices: one one-time prekey of a device.
pub fn one_time_prekey(shard: ShardId, user: UserId, device: DeviceId, key_id: u32) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SEPTENARY)
        .u64(user.get())
        .u32(device.get())
        .u32(key_id)
        .done()
}

/// devices: the prefix of one device's one-time prekeys.
pub fn one_time_prekey_prefix(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    KeyBuf::shard(shard)
        .u8(tag::SEPTENARY)
        .u64(user.get())
        .u32(device.get())
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

/// groups: prefix of every stored group message copy of this shard.
pub fn group_message_prefix(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::QUATERNARY).done()
}

/// groups: the log index up to which stored group message copies were forgotten (`u64`).
pub fn group_messages_forgotten(shard: ShardId) -> Vec<u8> {
    KeyBuf::shard(shard).u8(tag::QUINARY).done()
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

#[cfg(test)]
mod keys_test;
