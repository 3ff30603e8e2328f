//! Key layout tests: byte order is numeric order, and every decoder reads what its encoder wrote.

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
