//! Outbox and receipts tables: forwarding order, duplicates, receipts moving forward, and the
//! receipt feed.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, ReceiptState};
use courier_proto::{LogIndex, UserId};

use super::projection_test::{
    SHARD, apply_one, assert_projections_unchanged, assert_refused, delivered, tracing_phase,
    view_of,
};
use crate::kv::{MemKv, Staged};
use crate::projection::Applied;
use crate::shard::ShardState;

/// A receipt moving backwards is refused as invalid and leaves the receipt where it was; the
/// position it came at is consumed (the source trims past every position the destination
/// committed, so an unconsumed one would stop the pair: the next position applies).
#[test]
fn receipt_going_backwards_is_refused() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let receipt = |state: ReceiptState, pos: u64| {
        Kind::ReceiptRecorded(events::ReceiptRecorded {
            message_id: vec![5; 16],
            sender_user: 1,
            recipient_user: 2,
            state: state.into(),
            at_ms: 1,
            source_shard: 2,
            source_pos: pos,
        })
    };
    apply_one(&mut kv, &mut state, vec![receipt(ReceiptState::Read, 1)]);
    let before = state.clone();
    let outcome = apply_one(
        &mut kv,
        &mut state,
        vec![receipt(ReceiptState::Delivered, 2)],
    );
    assert_refused(&outcome, "receipts only move forward");
    for projection in crate::projection::Projection::ALL {
        if projection != crate::projection::Projection::Outbox {
            assert_eq!(
                before.digest(projection),
                state.digest(projection),
                "{} unchanged",
                projection.name()
            );
        }
    }
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let watermark =
        crate::projection::outbox::inbound_applied(&view_of(&mut staged), 2).expect("memory");
    assert_eq!(watermark, 2, "the refused receipt's position is consumed");
    drop(staged);
    let next = apply_one(
        &mut kv,
        &mut state,
        vec![Kind::ReceiptRecorded(events::ReceiptRecorded {
            message_id: vec![6; 16],
            sender_user: 1,
            recipient_user: 2,
            state: ReceiptState::Delivered.into(),
            at_ms: 2,
            source_shard: 2,
            source_pos: 3,
        })],
    );
    assert_eq!(next, [Applied::Done], "the next position applies");
}

/// A forwarded event past the next position from its source is refused as invalid; the next
/// position still applies afterwards.
#[test]
fn forwarded_gap_is_refused() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let at = |pos: u64| {
        let mut event = delivered(1, 2, 1);
        if let Kind::MessageDelivered(d) = &mut event {
            d.source_shard = 2;
            d.source_pos = pos;
        }
        event
    };
    let before = state.clone();
    let outcome = apply_one(&mut kv, &mut state, vec![at(2)]);
    assert_refused(&outcome, "forwarded position 2 from shard 2; the next is 1");
    assert_projections_unchanged(&before, &state);
    let outcome = apply_one(&mut kv, &mut state, vec![at(1)]);
    assert!(
        matches!(
            outcome.as_slice(),
            [Applied::Stored {
                duplicate: false,
                ..
            }]
        ),
        "{outcome:?}"
    );
}

/// A forwarded copy of an already stored message at a new position is a duplicate, yet it moves
/// the inbound watermark, so the next forwarded position still applies.
#[test]
fn forwarded_duplicate_message_moves_the_watermark() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let forwarded = |pos: u64, id: u8| {
        let mut event = delivered(1, 2, id);
        if let Kind::MessageDelivered(d) = &mut event {
            d.source_shard = 2;
            d.source_pos = pos;
        }
        event
    };
    apply_one(&mut kv, &mut state, vec![forwarded(1, 7)]);
    let again = apply_one(&mut kv, &mut state, vec![forwarded(2, 7)]);
    assert!(
        matches!(
            again[0],
            Applied::Stored {
                duplicate: true,
                ..
            }
        ),
        "{again:?}"
    );
    let next = apply_one(&mut kv, &mut state, vec![forwarded(3, 8)]);
    assert!(
        matches!(
            next[0],
            Applied::Stored {
                duplicate: false,
                ..
            }
        ),
        "{next:?}"
    );
}

/// One log entry carrying 2,500 receipt changes of one sender (an ack of many messages): the feed
/// pages through the entry by change position, without skipping or repeating a change, resumes
/// in the middle of the entry, and "after the whole entry" skips exactly that entry.
#[test]
fn receipt_feed_pages_through_one_large_entry() {
    use courier_proto::ReceiptFeedPosition;

    use crate::projection::receipts;

    const CHANGES: u64 = 2_500;
    const PAGE: usize = 256;
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let receipt = |n: u64| {
        let mut message_id = vec![0_u8; 16];
        message_id[8..].copy_from_slice(&(n + 1).to_be_bytes());
        Kind::ReceiptRecorded(events::ReceiptRecorded {
            message_id,
            sender_user: 1,
            recipient_user: 2 + n % 3,
            state: ReceiptState::Delivered.into(),
            at_ms: 1,
            source_shard: 2,
            source_pos: n + 1,
        })
    };
    apply_one(&mut kv, &mut state, vec![receipt(0)]);
    apply_one(&mut kv, &mut state, (1..=CHANGES).map(receipt).collect());
    apply_one(&mut kv, &mut state, vec![receipt(CHANGES + 1)]);
    let big_entry = LogIndex::new(2);
    let sender = UserId::new(1).expect("non-zero");
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = view_of(&mut staged);
    let read_all = |after: ReceiptFeedPosition| {
        let mut seen = Vec::new();
        let mut cursor = after;
        loop {
            let page = receipts::feed(&view, sender, &cursor, PAGE).expect("memory");
            let Some(last) = page.last() else {
                return seen;
            };
            cursor = last.position();
            seen.extend(page);
        }
    };

    tracing_phase("from the start: every change once, in feed order");
    let all = read_all(ReceiptFeedPosition::after_entry(LogIndex::ZERO));
    assert_eq!(all.len(), usize::try_from(CHANGES).expect("small") + 2);
    let positions: Vec<ReceiptFeedPosition> =
        all.iter().map(receipts::FeedItem::position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions strictly increase"
    );
    let in_big: Vec<_> = all.iter().filter(|item| item.set_at == big_entry).collect();
    assert_eq!(in_big.len(), usize::try_from(CHANGES).expect("small"));

    tracing_phase("resumed after the 1,000th change of the big entry: the other 1,500 and after");
    let resumed = read_all(in_big[999].position());
    assert_eq!(resumed.len(), 1_500 + 1);
    assert_eq!(resumed[0].position(), in_big[1_000].position());
    assert_eq!(resumed.last().map(|i| i.set_at), Some(LogIndex::new(3)));

    tracing_phase("after the whole big entry: only the next entry");
    let after = read_all(ReceiptFeedPosition::after_entry(big_entry));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].set_at, LogIndex::new(3));
}

/// An outbox entry that holds no event stops the forwarder's read with a decode error: skipped,
/// it would leave a gap the destination refuses on every retry, with nothing reported.
#[test]
fn an_outbox_entry_without_its_event_stops_the_read() {
    use courier_proto::ShardId;
    use courier_proto::pb::store::OutboxEntry;

    use crate::error::StorageError;
    use crate::keys;
    use crate::projection::{Projection, View, outbox};

    let kv = MemKv::default();
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let mut view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Outbox);
    let dest = ShardId::new(2);
    view.put(keys::outbox_entry(SHARD, dest, 1), &OutboxEntry::default())
        .expect("memory");
    let error = outbox::pending(&view, dest, 1, 16).expect_err("an entry without its event");
    assert!(matches!(error, StorageError::Decode { .. }), "{error:?}");
}
