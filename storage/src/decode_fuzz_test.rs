//! Every decoder of stored and logged bytes, fed arbitrary bytes (a bounded fuzz in `make test`).
//!
//! Goal: no input makes a decoder panic; a corrupt or hostile value is an error value, which the
//! caller turns into a refusal or a stopped replica on purpose. Method: proptest, arbitrary byte
//! strings into each decoder; where one decodes, its re-encoding decodes to the same value.

use courier_proto::pb::events::{EntryPayload, Event};
use courier_proto::pb::store::{
    AppliedState, DeviceRecord, ExpiryEntry, GroupRecord, InboxEntry, InboxState, LogEntry,
    MemberRecord, OutboxEntry, OutboxState, ReadState, Receipt, SeqPosition, SnapshotChunk,
    UserRecord,
};
use courier_proto::{LogIndex, ShardId};
use proptest::prelude::*;
use prost::Message;

use crate::log::{LogRecord, decode_record, encode_record};
use crate::projection::{decode, unframe};

const SHARD: ShardId = ShardId::new(1);

/// Decodes `bytes` as `M`; when it decodes, the re-encoding decodes to the same message.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> bool {
    match M::decode(bytes) {
        Ok(message) => M::decode(message.encode_to_vec().as_slice()).as_ref() == Ok(&message),
        Err(_) => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn stored_and_logged_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        prop_assert!(round_trip::<EntryPayload>(&bytes));
        prop_assert!(round_trip::<Event>(&bytes));
        prop_assert!(round_trip::<LogEntry>(&bytes));
        prop_assert!(round_trip::<InboxEntry>(&bytes));
        prop_assert!(round_trip::<InboxState>(&bytes));
        prop_assert!(round_trip::<ReadState>(&bytes));
        prop_assert!(round_trip::<SeqPosition>(&bytes));
        prop_assert!(round_trip::<OutboxEntry>(&bytes));
        prop_assert!(round_trip::<OutboxState>(&bytes));
        prop_assert!(round_trip::<Receipt>(&bytes));
        prop_assert!(round_trip::<DeviceRecord>(&bytes));
        prop_assert!(round_trip::<UserRecord>(&bytes));
        prop_assert!(round_trip::<GroupRecord>(&bytes));
        prop_assert!(round_trip::<MemberRecord>(&bytes));
        prop_assert!(round_trip::<ExpiryEntry>(&bytes));
        prop_assert!(round_trip::<AppliedState>(&bytes));
        prop_assert!(round_trip::<SnapshotChunk>(&bytes));
        // Events that decode as protobuf go through the domain decoder: a value or an error.
        if let Ok(payload) = EntryPayload::decode(bytes.as_slice()) {
            for kind in payload.events.iter().filter_map(|event| event.kind.as_ref()) {
                let _ = decode::decode(kind);
            }
        }
        // A log record verifies its checksum; a good record decodes back to itself.
        let at = LogIndex::new(7);
        if let Ok(record) = decode_record(SHARD, at, &bytes) {
            prop_assert_eq!(decode_record(SHARD, at, &encode_record(&record)).ok(), Some(record));
        }
        let record = LogRecord { index: at, term: 1, payload: bytes.clone() };
        let _ = crate::rebuild::decode_entry(SHARD, &record);
        let _ = crate::snapshot::decode(SHARD, &bytes);
        let _ = unframe(&bytes);
        let _ = crate::keys::inbox_message_seq(&bytes);
        let _ = crate::keys::seq_position_seq(&bytes);
        let _ = crate::keys::outbox_entry_pos(&bytes);
        let _ = crate::keys::log_entry_index(&bytes);
        let _ = crate::keys::read_state_conversation(&bytes);
        let _ = crate::keys::receipt_feed_parts(&bytes);
        let _ = crate::keys::expiry_parts(&bytes);
        let _ = crate::keys::user_after_tag(&bytes);
    }
}
