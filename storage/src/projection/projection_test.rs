//! Projection tables and the fold law.
//!
//! Goal: a projection is a deterministic function of the log. Method: generate valid random
//! histories (`testkit::EventGen`), apply them one entry per batch and in random batch sizes,
//! and compare data and digests; re-hash the data to check the maintained digests; feed invalid
//! sequences and expect the invariant's panic message.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, EntryPayload, Event, ReceiptState};
use courier_proto::{ConversationId, FORMAT_VERSION, LogIndex, ShardId, UserId};
use proptest::prelude::*;

use crate::cf::Cf;
use crate::kv::{MemKv, ReadKv, Staged};
use crate::projection::{Applied, Projection, View, readstate};
use crate::rebuild::digest_of;
use crate::shard::{Committed, ShardState};
use crate::testkit::{EventGen, Rng};

const SHARD: ShardId = ShardId::new(1);

/// Applies `payloads` in batches whose sizes come from `sizes`, starting at index 1.
fn fold(payloads: &[EntryPayload], sizes: &mut Rng, batch_max: u64) -> (MemKv, ShardState) {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let mut rest = payloads;
    while !rest.is_empty() {
        let n = usize::try_from(1 + sizes.below(batch_max))
            .expect("small")
            .min(rest.len());
        let (now, later) = rest.split_at(n);
        let entries: Vec<Committed<'_>> = now
            .iter()
            .enumerate()
            .map(|(i, payload)| Committed {
                index: LogIndex::new(state.applied.get() + 1 + i as u64),
                payload: Some(payload),
            })
            .collect();
        let batch = state
            .apply_batch(&kv, &entries, Vec::new())
            .expect("memory never faults");
        kv.write(batch.changes);
        state = batch.next;
        rest = later;
    }
    (kv, state)
}

fn apply_one(kv: &mut MemKv, state: &mut ShardState, kinds: Vec<Kind>) -> Vec<Applied> {
    let payload = EntryPayload {
        format_version: FORMAT_VERSION,
        events: kinds
            .into_iter()
            .map(|kind| Event { kind: Some(kind) })
            .collect(),
    };
    let index = state.applied.next();
    let mut batch = state
        .apply_batch(
            kv,
            &[Committed {
                index,
                payload: Some(&payload),
            }],
            Vec::new(),
        )
        .expect("memory");
    kv.write(batch.changes);
    *state = batch.next;
    batch.results.pop().expect("one entry")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Incremental apply (random batch sizes) == one entry at a time == the digests re-hashed.
    #[test]
    fn fold_is_batch_independent(seed in any::<u64>(), entries in 1_usize..120, batch_max in 1_u64..40) {
        let payloads = EventGen::new(SHARD, seed).payloads(entries, 4);
        let (one_by_one, state_one) = fold(&payloads, &mut Rng::new(seed), 1);
        let (batched, state_batched) = fold(&payloads, &mut Rng::new(seed ^ 1), batch_max);
        prop_assert_eq!(&one_by_one, &batched);
        prop_assert_eq!(&state_one, &state_batched);
        for projection in Projection::ALL {
            let rehashed = digest_of(&batched, SHARD, projection).expect("memory");
            prop_assert_eq!(rehashed, state_batched.digest(projection), "{}", projection.name());
        }
    }

    /// Applying a history, snapshotting and installing it elsewhere reproduces it exactly.
    #[test]
    fn snapshot_round_trip(seed in any::<u64>(), entries in 1_usize..80) {
        let payloads = EventGen::new(SHARD, seed).payloads(entries, 3);
        let (kv, state) = fold(&payloads, &mut Rng::new(seed), 8);
        let chunks = crate::snapshot::export(&kv, &state).expect("memory");
        let bytes = crate::snapshot::encode(&chunks);
        let install = crate::snapshot::prepare_install(SHARD, crate::snapshot::decode(SHARD, &bytes).expect("decodes"))
            .expect("a fresh snapshot verifies");
        let mut other = MemKv::default();
        other.replace_ranges(&install.clear, install.changes);
        prop_assert_eq!(&install.state, &state);
        prop_assert_eq!(&other, &kv);
    }
}

fn direct(user: u64) -> Option<events::Conversation> {
    Some(ConversationId::Direct(UserId::new(user).expect("nonzero")).into())
}

fn delivered(user: u64, from: u64, id: u8) -> Kind {
    Kind::MessageDelivered(events::MessageDelivered {
        message_id: vec![id; 16],
        recipient_user: user,
        sender_user: from,
        sender_device: 1,
        conversation: direct(from),
        content: Some(events::Content {
            body: b"hi".to_vec(),
            media: None,
        }),
        sent_at_ms: 10,
        stored_at_ms: 11,
        source_shard: u32::from(SHARD.get()),
        source_pos: 0,
        group_index: 0,
        trace_parent: String::new(),
    })
}

/// A 1:1 send from user 1 (device 1) to user 2.
fn sent_event(id: u8, client_msg_id: &str, recipient_shard: u32, sent_at_ms: u64) -> Kind {
    Kind::MessageSent(events::MessageSent {
        message_id: vec![id; 16],
        sender_user: 1,
        sender_device: 1,
        client_msg_id: client_msg_id.to_owned(),
        to: direct(2),
        content: Some(events::Content {
            body: b"x".to_vec(),
            media: None,
        }),
        sent_at_ms,
        recipient_shard,
        group_epoch: 0,
        trace_parent: String::new(),
    })
}

fn view_of<'s, 'a>(staged: &'s mut Staged<'a>) -> View<'s, 'a> {
    View::new(staged, SHARD, LogIndex::ZERO, Projection::ReadState)
}

/// Inbox sequences are dense, unread counts exact, receipts go out once and in order.
#[test]
fn inbox_readstate_and_receipts_table() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    tracing_phase("three messages from user 2 and one from user 3 land in user 1's inbox");
    let results = apply_one(
        &mut kv,
        &mut state,
        vec![
            delivered(1, 2, 1),
            delivered(1, 2, 2),
            delivered(1, 3, 3),
            delivered(1, 2, 4),
        ],
    );
    let seqs: Vec<u64> = results
        .iter()
        .map(|r| match r {
            Applied::Stored {
                seq,
                duplicate: false,
                ..
            } => seq.get(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "sequences are dense and start at 1");
    tracing_phase("the same message id again is a duplicate and changes nothing");
    let before = kv.clone();
    let again = apply_one(&mut kv, &mut state, vec![delivered(1, 2, 2)]);
    assert_eq!(
        again,
        vec![Applied::Stored {
            user: UserId::new(1).expect("nonzero"),
            seq: courier_proto::InboxSeq::new(2),
            duplicate: true
        }]
    );
    assert_eq!(
        before
            .scan(Cf::Projection(Projection::Inbox), &[], &[0xff], usize::MAX)
            .expect("memory"),
        kv.scan(Cf::Projection(Projection::Inbox), &[], &[0xff], usize::MAX)
            .expect("memory"),
        "a duplicate changes no inbox entry"
    );
    tracing_phase("reading the conversation with user 2 up to seq 2 leaves 1 unread there");
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::ReadUpTo(events::ReadUpTo {
            user: 1,
            conversation: direct(2),
            up_to_seq: 2,
            read_at_ms: 20,
        })],
    );
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = view_of(&mut staged);
    let with_2 = readstate::get(
        &view,
        UserId::new(1).expect("nonzero"),
        ConversationId::Direct(UserId::new(2).expect("nonzero")),
    )
    .expect("memory");
    assert_eq!(readstate::unread(&with_2), 1);
    let with_3 = readstate::get(
        &view,
        UserId::new(1).expect("nonzero"),
        ConversationId::Direct(UserId::new(3).expect("nonzero")),
    )
    .expect("memory");
    assert_eq!(readstate::unread(&with_3), 1);
    tracing_phase("the unread message from user 3 expires: its conversation has 0 unread");
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::MessageExpired(events::MessageExpired {
            user: 1,
            seq: 3,
            message_id: vec![3; 16],
            at_ms: 30,
        })],
    );
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = view_of(&mut staged);
    let with_3 = readstate::get(
        &view,
        UserId::new(1).expect("nonzero"),
        ConversationId::Direct(UserId::new(3).expect("nonzero")),
    )
    .expect("memory");
    assert_eq!(
        readstate::unread(&with_3),
        0,
        "expired unread messages are not unread"
    );
    tracing_phase("expiring it again, or a seq under another message id, changes nothing");
    let before = state.digests.clone();
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::MessageExpired(events::MessageExpired {
            user: 1,
            seq: 3,
            message_id: vec![3; 16],
            at_ms: 31,
        })],
    );
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::MessageExpired(events::MessageExpired {
            user: 1,
            seq: 4,
            message_id: vec![9; 16],
            at_ms: 31,
        })],
    );
    assert_eq!(state.digests, before, "a stale expiry is a no-op");
    tracing_phase("outbox: the read emitted DELIVERED+READ for seqs 1 and 2, to this shard");
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Outbox);
    let pending = crate::projection::outbox::pending(&view, SHARD, 1, 100).expect("memory");
    let states: Vec<(u8, i32)> = pending
        .iter()
        .map(|(_, event)| match &event.kind {
            Some(Kind::ReceiptRecorded(r)) => (r.message_id[0], r.state),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let (d, r) = (
        i32::from(ReceiptState::Delivered),
        i32::from(ReceiptState::Read),
    );
    assert_eq!(states, vec![(1, d), (1, r), (2, d), (2, r)]);
    tracing_phase("a device acks up to 4: only seq 4 gets DELIVERED (1, 2 were read, 3 expired)");
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::DeliveryAcked(events::DeliveryAcked {
            user: 1,
            device: 1,
            up_to_seq: 4,
            acked_at_ms: 40,
            trim_delivered: false,
        })],
    );
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Outbox);
    let pending = crate::projection::outbox::pending(&view, SHARD, 5, 100).expect("memory");
    assert_eq!(pending.len(), 1, "one new receipt");
}

fn tracing_phase(why: &str) {
    eprintln!("phase: {why}");
}

#[test]
#[should_panic(expected = "acks never pass the inbox tail")]
fn ack_past_tail_panics() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, vec![delivered(1, 2, 1)]);
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::DeliveryAcked(events::DeliveryAcked {
            user: 1,
            device: 1,
            up_to_seq: 2,
            acked_at_ms: 1,
            trim_delivered: false,
        })],
    );
}

#[test]
#[should_panic(expected = "receipts only move forward")]
fn receipt_going_backwards_panics() {
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
    apply_one(
        &mut kv,
        &mut state,
        vec![receipt(ReceiptState::Delivered, 2)],
    );
}

#[test]
#[should_panic(expected = "log entries apply once, in order")]
fn applied_index_not_increasing_panics() {
    let kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    state.applied = LogIndex::new(5);
    let payload = EntryPayload {
        format_version: FORMAT_VERSION,
        events: vec![],
    };
    let _ = state.apply_batch(
        &kv,
        &[Committed {
            index: LogIndex::new(5),
            payload: Some(&payload),
        }],
        Vec::new(),
    );
}

#[test]
#[should_panic(expected = "forwarded events from shard 2 apply in position order without gaps")]
fn forwarded_gap_panics() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let mut event = delivered(1, 2, 1);
    if let Kind::MessageDelivered(d) = &mut event {
        d.source_shard = 2;
        d.source_pos = 2;
    }
    apply_one(&mut kv, &mut state, vec![event]);
}

#[test]
fn unknown_event_and_future_format_are_faults() {
    let kv = MemKv::default();
    let state = ShardState::empty(SHARD);
    let unknown = EntryPayload {
        format_version: FORMAT_VERSION,
        events: vec![Event { kind: None }],
    };
    let err = state
        .apply_batch(
            &kv,
            &[Committed {
                index: LogIndex::new(1),
                payload: Some(&unknown),
            }],
            Vec::new(),
        )
        .expect_err("an unknown event is fatal");
    assert!(
        matches!(err, crate::StorageError::UnknownEvent { .. }),
        "{err}"
    );
    let future = EntryPayload {
        format_version: FORMAT_VERSION + 1,
        events: vec![],
    };
    let err = state
        .apply_batch(
            &kv,
            &[Committed {
                index: LogIndex::new(1),
                payload: Some(&future),
            }],
            Vec::new(),
        )
        .expect_err("a newer format is fatal");
    assert!(err.to_string().contains("format version"), "{err}");
}

#[test]
fn dedup_returns_the_first_result() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let sent = |id: u8| sent_event(id, "same", 0, u64::from(id));
    let first = apply_one(&mut kv, &mut state, vec![sent(1)]);
    let before = kv.clone();
    let second = apply_one(&mut kv, &mut state, vec![sent(2)]);
    match (&first[0], &second[0]) {
        (
            Applied::Sent {
                result: a,
                duplicate: false,
            },
            Applied::Sent {
                result: b,
                duplicate: true,
            },
        ) => {
            assert_eq!(a, b, "the retry gets the first result");
        }
        other => panic!("unexpected {other:?}"),
    }
    for projection in Projection::ALL {
        let cf = Cf::Projection(projection);
        assert_eq!(
            before.scan(cf, &[], &[0xff], usize::MAX).expect("memory"),
            kv.scan(cf, &[], &[0xff], usize::MAX).expect("memory"),
            "a retried send changes nothing in {}",
            projection.name()
        );
    }
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

/// A send within one shard stores the message in the recipient's inbox in the same entry; its
/// retry (same client id, new message id) stores nothing.
#[test]
fn same_shard_send_stores_once() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let sent = |id: u8| sent_event(id, "only-once", u32::from(SHARD.get()), 5);
    apply_one(&mut kv, &mut state, vec![sent(1)]);
    apply_one(&mut kv, &mut state, vec![sent(2)]);
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
    let user = UserId::new(2).expect("nonzero");
    assert_eq!(
        crate::projection::inbox::tail(&view, user)
            .expect("memory")
            .get(),
        1,
        "stored once"
    );
    let entry = crate::projection::inbox::entry(&view, user, courier_proto::InboxSeq::new(1))
        .expect("memory")
        .expect("stored");
    assert_eq!(entry.message_id, vec![1; 16], "the first send's message");
    assert_eq!(entry.stored_at_ms, 5, "stored when it was sent");
}

fn group_send(client_msg_id: &str, id: u8, sender: u64, epoch: u64) -> Kind {
    Kind::MessageSent(events::MessageSent {
        message_id: vec![id; 16],
        sender_user: sender,
        sender_device: 1,
        client_msg_id: client_msg_id.to_owned(),
        to: Some(ConversationId::Group(courier_proto::GroupId::new(77).expect("nonzero")).into()),
        content: Some(events::Content {
            body: b"to the group".to_vec(),
            media: None,
        }),
        sent_at_ms: 50,
        recipient_shard: u32::from(SHARD.get()),
        group_epoch: epoch,
        trace_parent: String::new(),
    })
}

fn member_added(user: u64, by: u64, user_shard: u32) -> Kind {
    Kind::MemberAdded(events::MemberAdded {
        group: 77,
        user,
        by,
        admin: false,
        at_ms: 1,
        user_shard,
    })
}

/// A group message is stored once: members on the group's shard get a pointer in their inbox
/// in the same entry, members elsewhere a pointer through the outbox, each with a SENT receipt;
/// a removed member gets nothing later; refused events (non-admin adds, non-member sends, a stale
/// epoch) change nothing.
#[test]
fn group_fan_out_follows_the_membership() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let created = apply_one(
        &mut kv,
        &mut state,
        vec![
            Kind::GroupCreated(events::GroupCreated {
                group: 77,
                creator: 1,
                name: "g".to_owned(),
                at_ms: 1,
                creator_shard: u32::from(SHARD.get()),
            }),
            member_added(2, 1, u32::from(SHARD.get())),
            member_added(3, 1, 9),
            member_added(4, 2, 9),
        ],
    );
    assert_eq!(created[..3], [Applied::Done, Applied::Done, Applied::Done]);
    assert!(
        matches!(
            created[3],
            Applied::Rejected {
                code: "COURIER:Group:NotAdmin",
                ..
            }
        ),
        "{:?}",
        created[3]
    );
    let before = state.digests.clone();
    let refused = apply_one(
        &mut kv,
        &mut state,
        vec![group_send("x", 9, 4, 3), group_send("y", 9, 1, 2)],
    );
    assert!(matches!(
        refused[0],
        Applied::Rejected {
            code: "COURIER:Group:NotMember",
            ..
        }
    ));
    assert!(matches!(
        refused[1],
        Applied::Rejected {
            code: "COURIER:Group:EpochChanged",
            ..
        }
    ));
    assert_eq!(state.digests, before, "refusals change nothing");

    let sent_at = state.applied.next();
    let sent = apply_one(&mut kv, &mut state, vec![group_send("a", 1, 1, 3)]);
    assert!(matches!(
        sent[0],
        Applied::Sent {
            duplicate: false,
            ..
        }
    ));
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
    let two = UserId::new(2).expect("nonzero");
    let entry = crate::projection::inbox::entry(&view, two, courier_proto::InboxSeq::new(1))
        .expect("memory")
        .expect("user 2, on the group's shard, has it");
    assert_eq!(entry.content, None, "a pointer, not a copy");
    assert_eq!(entry.group_index, sent_at.get());
    assert_eq!(entry.source_shard, u32::from(SHARD.get()));
    let pending =
        crate::projection::outbox::pending(&view, ShardId::new(9), 1, 100).expect("memory");
    assert_eq!(pending.len(), 1, "one pointer to user 3's shard");
    let receipts = crate::projection::receipts::of_message(
        &view,
        UserId::new(1).expect("nonzero"),
        courier_proto::MessageId::from_bytes([1; 16]),
    )
    .expect("memory");
    let recipients: Vec<u64> = receipts.iter().map(|(u, _)| u.get()).collect();
    assert_eq!(
        recipients,
        vec![2, 3],
        "SENT for every member but the sender"
    );
    drop(staged);

    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::MemberRemoved(events::MemberRemoved {
            group: 77,
            user: 3,
            by: 1,
            at_ms: 2,
        })],
    );
    apply_one(&mut kv, &mut state, vec![group_send("b", 2, 1, 4)]);
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Outbox);
    let pending =
        crate::projection::outbox::pending(&view, ShardId::new(9), 1, 100).expect("memory");
    assert_eq!(pending.len(), 1, "nothing more for the removed member");
    let receipts = crate::projection::receipts::of_message(
        &view,
        UserId::new(1).expect("nonzero"),
        courier_proto::MessageId::from_bytes([2; 16]),
    )
    .expect("memory");
    assert_eq!(receipts.len(), 1, "only user 2 is a recipient now");
    let groups = crate::projection::groups::groups_of(&view, UserId::new(3).expect("nonzero"))
        .expect("memory");
    assert!(groups.is_empty(), "user 3 left the group's index");
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
