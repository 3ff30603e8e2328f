//! Receipts and their forgetting: the time index follows each receipt, a forget names a receipt
//! by the time it was set, and a receipt that arrives after one was forgotten is stored again.

use std::collections::BTreeMap;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, ReceiptState};
use courier_proto::{LogIndex, MessageId, UserId};

use super::projection_test::{SHARD, apply_one, sent_event, tracing_phase};
use crate::kv::{MemKv, Staged};
use crate::projection::{Applied, Projection, View, receipts};
use crate::shard::ShardState;

/// A receipt of message `id` from user 1 to user 2, forwarded from shard 0 at `pos`.
fn receipt(id: u8, state: ReceiptState, at_ms: u64, pos: u64) -> Kind {
    Kind::ReceiptRecorded(events::ReceiptRecorded {
        message_id: vec![id; 16],
        sender_user: 1,
        recipient_user: 2,
        state: state.into(),
        at_ms,
        source_shard: 0,
        source_pos: pos,
    })
}

fn set_before(kv: &MemKv, before_ms: u64) -> Vec<events::ForgottenReceipt> {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Receipts);
    receipts::set_before(&view, before_ms, 10).expect("memory")
}

/// User 2's receipt of message `id` and user 1's whole feed.
fn stored(kv: &MemKv, id: u8) -> (Option<ReceiptState>, Vec<receipts::FeedItem>) {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Receipts);
    let sender = UserId::new(1).expect("nonzero");
    let message = MessageId::from_wire(&[id; 16], "id").expect("16 bytes");
    let state = receipts::of_message(&view, sender, message)
        .expect("memory")
        .into_iter()
        .map(|(_, receipt)| receipt.state())
        .next();
    let feed = receipts::feed(
        &view,
        sender,
        &courier_proto::ReceiptFeedPosition::after_entry(LogIndex::ZERO),
        100,
    )
    .expect("memory");
    (state, feed)
}

/// The time index follows a receipt as it moves; a forget naming another time is a no-op; the
/// named one leaves with its feed and index entries; a later receipt is stored again.
#[test]
fn forgotten_receipts_leave_and_later_ones_are_stored_again() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    tracing_phase("user 1 sends message 1 to user 2 on shard 0 at 100, delivered at 200");
    apply_one(&mut kv, &mut state, vec![sent_event(1, "a", 0, 100)]);
    let sent = set_before(&kv, u64::MAX);
    assert_eq!(
        sent.iter().map(|r| r.set_at_ms).collect::<Vec<_>>(),
        vec![100],
        "SENT is indexed at its send time"
    );
    apply_one(
        &mut kv,
        &mut state,
        vec![receipt(1, ReceiptState::Delivered, 200, 1)],
    );
    assert_eq!(set_before(&kv, 200), Vec::new(), "SENT's entry moved");
    let due = set_before(&kv, 201);
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].sender_user, due[0].recipient_user, due[0].set_at_ms),
        (1, 2, 200)
    );
    tracing_phase("a forget naming the SENT time changes nothing");
    let digests = state.digests.clone();
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::ReceiptsForgotten(events::ReceiptsForgotten {
            receipts: sent,
            at_ms: 300,
        })],
    );
    assert_eq!(state.digests, digests, "a stale forget is a no-op");
    tracing_phase("forgetting DELIVERED removes the receipt, its feed entry and its index entry");
    let forget = Kind::ReceiptsForgotten(events::ReceiptsForgotten {
        receipts: due,
        at_ms: 300,
    });
    let outcome = apply_one(&mut kv, &mut state, vec![forget.clone()]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(stored(&kv, 1), (None, Vec::new()));
    assert_eq!(set_before(&kv, u64::MAX), Vec::new());
    let digests = state.digests.clone();
    apply_one(&mut kv, &mut state, vec![forget]);
    assert_eq!(state.digests, digests, "forgetting again changes nothing");
    tracing_phase("READ arriving later is stored again and indexed");
    let read = apply_one(
        &mut kv,
        &mut state,
        vec![receipt(1, ReceiptState::Read, 400, 2)],
    );
    assert_eq!(read, vec![Applied::Done], "not refused as a backward move");
    let (now, feed) = stored(&kv, 1);
    assert_eq!(now, Some(ReceiptState::Read));
    assert_eq!(feed.len(), 1, "one feed entry");
    assert_eq!(
        set_before(&kv, u64::MAX)
            .iter()
            .map(|r| r.set_at_ms)
            .collect::<Vec<_>>(),
        vec![400]
    );
}
