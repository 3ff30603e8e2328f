//! Inbox, read state, cursors and dedup tables: given events, the expected views, and the
//! invalid sequences that must panic.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, ReceiptState};
use courier_proto::{ConversationId, LogIndex, UserId};

use super::projection_test::{
    SHARD, apply_one, assert_projections_unchanged, assert_refused, delivered, direct, sent_event,
    tracing_phase, view_of,
};
use crate::cf::Cf;
use crate::kv::{MemKv, ReadKv, Staged};
use crate::projection::{Applied, Projection, View, readstate};
use crate::shard::ShardState;

/// Inbox sequences are dense, unread counts exact, receipts go out once and in order.
#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one story in linear phases: each phase reads the state the previous one left"
)]
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
    apply_one(&mut kv, &mut state, vec![read_by_1(2, 2, 20)]);
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
            keep_recent: 0,
            trim_max: 0,
        })],
    );
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Outbox);
    let pending = crate::projection::outbox::pending(&view, SHARD, 5, 100).expect("memory");
    assert_eq!(pending.len(), 1, "one new receipt");
}

/// An ack past the inbox tail is refused as invalid (it cannot come from a validating leader)
/// and changes nothing.
#[test]
fn ack_past_tail_is_refused() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, vec![delivered(1, 2, 1)]);
    let before = state.clone();
    let outcome = apply_one(
        &mut kv,
        &mut state,
        vec![Kind::DeliveryAcked(events::DeliveryAcked {
            user: 1,
            device: 1,
            up_to_seq: 2,
            acked_at_ms: 1,
            trim_delivered: false,
            keep_recent: 0,
            trim_max: 0,
        })],
    );
    assert_refused(&outcome, "past user 1's inbox tail 1");
    assert_projections_unchanged(&before, &state);
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

/// Sends older than the dedup window are found by the time index, oldest first; forgetting them
/// removes their records and index entries (the projection is as if they never had one), a
/// second forget is a no-op, and a retry of a forgotten client id is a new send.
#[test]
fn forgotten_sends_leave_the_dedup_projection() {
    let (mut kv, mut state) = applied(vec![
        sent_event(1, "a", 0, 100),
        sent_event(2, "b", 0, 200),
        sent_event(3, "c", 0, 300),
    ]);
    let due = |kv: &MemKv, before_ms: u64| {
        in_dedup(kv, |view| super::dedup::sent_before(view, before_ms, 10)).expect("memory")
    };
    let found = due(&kv, 300);
    let ids: Vec<(&str, u64)> = found
        .iter()
        .map(|s| (s.client_msg_id.as_str(), s.sent_at_ms))
        .collect();
    assert_eq!(
        ids,
        vec![("a", 100), ("b", 200)],
        "before 300, oldest first"
    );
    assert_eq!(due(&kv, 300).len(), 2);
    assert_eq!(due(&kv, 100), Vec::new(), "nothing sent before 100");
    let forget = Kind::SendsForgotten(events::SendsForgotten {
        sends: found.clone(),
        at_ms: 400,
    });
    apply_one(&mut kv, &mut state, vec![forget.clone()]);
    let left: Vec<String> = due(&kv, u64::MAX)
        .into_iter()
        .map(|s| s.client_msg_id)
        .collect();
    assert_eq!(
        left,
        vec!["c".to_owned()],
        "only the newest send is still known"
    );
    let before = kv.clone();
    apply_one(&mut kv, &mut state, vec![forget.clone()]);
    let forget_again = forget;
    assert_eq!(
        dedup_records(&before),
        dedup_records(&kv),
        "forgetting again changes nothing"
    );
    let retry = apply_one(&mut kv, &mut state, vec![sent_event(4, "a", 0, 500)]);
    match &retry[..] {
        [
            Applied::Sent {
                result,
                duplicate: false,
            },
        ] => assert_eq!(
            result.message_id,
            vec![4; 16],
            "a new send, not the first result"
        ),
        other => panic!("unexpected {other:?}"),
    }
    tracing_phase("the first forget applied again spares the new send of the same client id");
    apply_one(&mut kv, &mut state, vec![forget_again]);
    let known = in_dedup(&kv, |view| {
        super::dedup::lookup(
            view,
            UserId::new(1).expect("nonzero"),
            courier_proto::DeviceId::new(1).expect("nonzero"),
            "a",
        )
    })
    .expect("memory")
    .expect("the new send of a is still known");
    assert_eq!(known.message_id, vec![4; 16]);
    let rest = due(&kv, u64::MAX);
    assert_eq!(rest.len(), 2, "c and the new a");
    let last = apply_one(
        &mut kv,
        &mut state,
        vec![Kind::SendsForgotten(events::SendsForgotten {
            sends: rest,
            at_ms: 600,
        })],
    );
    assert_eq!(last, vec![Applied::Done]);
    assert_eq!(
        dedup_records(&kv),
        dedup_records(&MemKv::default()),
        "every send forgotten: nothing of dedup left"
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

/// A batch names the users whose device records it changed (their streams re-check the device),
/// and never a user read out of a phone-hash key.
#[test]
fn device_changes_touch_their_user() {
    let kv = MemKv::default();
    let state = ShardState::empty(SHARD);
    let payload = events::EntryPayload {
        format_version: courier_proto::FORMAT_VERSION,
        events: registered(7, 0, 0xff)
            .into_iter()
            .map(|kind| events::Event { kind: Some(kind) })
            .collect(),
    };
    let batch = state
        .apply_batch(
            &kv,
            &[crate::shard::Committed {
                index: LogIndex::new(1),
                payload: Some(&payload),
            }],
            Vec::new(),
        )
        .expect("memory");
    assert!(batch.touched.devices);
    assert_eq!(batch.touched.users, vec![UserId::new(7).expect("nonzero")]);
}

/// A user registering with `phone` (hashed to 16 copies of it) and its primary `device`.
fn registered(user: u64, device: u32, phone: u8) -> Vec<Kind> {
    vec![
        Kind::UserRegistered(events::UserRegistered {
            user,
            phone_hash: vec![phone; 16],
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
        }),
        Kind::DeviceRegistered(events::DeviceRegistered {
            user,
            device,
            token_hash: vec![1; 32],
            primary: true,
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
            companions_max: 0,
            approver_token_hash: Vec::new(),
            revokes_companions: false,
        }),
    ]
}

/// User 1 read the conversation with user `with` up to `up_to_seq`.
fn read_by_1(with: u64, up_to_seq: u64, read_at_ms: u64) -> Kind {
    Kind::ReadUpTo(events::ReadUpTo {
        user: 1,
        conversation: direct(with),
        up_to_seq,
        read_at_ms,
    })
}

/// Every record of `projection`.
fn records(kv: &MemKv, projection: Projection) -> Vec<(Vec<u8>, Vec<u8>)> {
    kv.scan(Cf::Projection(projection), &[], &[0xff], usize::MAX)
        .expect("memory")
}

/// Trimmed stubs older than the window leave the inbox with their indexes; a read message's
/// position leaves with its stub, an unread one keeps where its READ receipt goes and leaves
/// once read; a read naming a forgotten message changes nothing; a second forget is a no-op.
#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one story in linear phases: each phase reads the state the previous one left"
)]
fn forgotten_stubs_leave_the_inbox_and_their_receipts_still_go_out() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let user = UserId::new(1).expect("nonzero");
    tracing_phase("user 1 (one device) gets two messages from 2 and one from 3");
    let stored = apply_one(
        &mut kv,
        &mut state,
        [
            registered(1, 1, 1),
            vec![delivered(1, 2, 1), delivered(1, 2, 2), delivered(1, 3, 3)],
        ]
        .concat(),
    );
    assert!(
        matches!(stored[1], Applied::DeviceRegistered { .. }),
        "{stored:?}"
    );
    let stubs = |kv: &MemKv, before_ms: u64| {
        let mut staged = Staged::new(kv, BTreeMap::new());
        let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
        super::inbox::stubs_before(&view, before_ms, 10).expect("memory")
    };
    assert_eq!(stubs(&kv, u64::MAX), Vec::new(), "nothing trimmed yet");
    tracing_phase("user 1 reads the conversation with 2 up to seq 1, then acks all and trims");
    apply_one(
        &mut kv,
        &mut state,
        vec![
            read_by_1(2, 1, 12),
            Kind::DeliveryAcked(events::DeliveryAcked {
                user: 1,
                device: 1,
                up_to_seq: 3,
                acked_at_ms: 13,
                trim_delivered: true,
                keep_recent: 0,
                trim_max: 0,
            }),
        ],
    );
    assert_eq!(stubs(&kv, 11), Vec::new(), "stored at 11: not before 11");
    let found = stubs(&kv, 12);
    let named: Vec<(u64, u8)> = found.iter().map(|s| (s.seq, s.message_id[0])).collect();
    assert_eq!(
        named,
        vec![(1, 1), (2, 2), (3, 3)],
        "every trimmed stub, by id"
    );
    let inbox_before = records(&kv, Projection::Inbox);
    let outbox_before = records(&kv, Projection::Outbox);
    tracing_phase("a forget naming another message id or another stored time is a no-op");
    let mut stale = found.clone();
    stale[0].message_id = vec![9; 16];
    stale[1].stored_at_ms = 99;
    stale.truncate(2);
    let digests = state.digests.clone();
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::InboxForgotten(events::InboxForgotten {
            messages: stale,
            at_ms: 20,
        })],
    );
    assert_eq!(state.digests, digests, "nothing was forgotten");
    tracing_phase("the stubs are forgotten (read seq 1 named twice: the second is a no-op)");
    let mut named_twice = found.clone();
    named_twice.push(found[0].clone());
    let forget = Kind::InboxForgotten(events::InboxForgotten {
        messages: named_twice,
        at_ms: 20,
    });
    apply_one(&mut kv, &mut state, vec![forget.clone()]);
    assert_eq!(stubs(&kv, u64::MAX), Vec::new(), "the stub index is empty");
    let inbox_after = records(&kv, Projection::Inbox);
    assert_eq!(
        inbox_after.len(),
        inbox_before.len() - 3 * 3,
        "each stub leaves with its message-id and stub index entries; the inbox state stays"
    );
    let positions = |kv: &MemKv| {
        let mut staged = Staged::new(kv, BTreeMap::new());
        let view = view_of(&mut staged);
        (1..=3)
            .map(|seq| {
                readstate::position(&view, user, courier_proto::InboxSeq::new(seq)).expect("memory")
            })
            .collect::<Vec<_>>()
    };
    let [one, two, three] = positions(&kv).try_into().expect("three seqs");
    assert_eq!(one, None, "seq 1 was read: its position left");
    let two = two.expect("seq 2 is unread: its position stays");
    let target = two.forgotten.expect("with where its READ receipt goes");
    assert_eq!(
        (target.message_id, target.sender_user),
        (vec![2; 16], 2),
        "the stub's message and sender"
    );
    assert!(three.is_some_and(|p| p.forgotten.is_some()));
    tracing_phase("forgetting again changes nothing");
    let digests = state.digests.clone();
    apply_one(&mut kv, &mut state, vec![forget]);
    assert_eq!(state.digests, digests, "a second forget is a no-op");
    tracing_phase("a read naming forgotten seq 1 is a no-op, not invalid");
    let again = apply_one(&mut kv, &mut state, vec![read_by_1(2, 1, 21)]);
    assert_eq!(again, vec![Applied::Done]);
    assert_eq!(state.digests, digests, "it changed nothing");
    tracing_phase("so does one naming forgotten seq 1 under another conversation: no receipts");
    let elsewhere = apply_one(&mut kv, &mut state, vec![read_by_1(3, 1, 21)]);
    assert_eq!(elsewhere, vec![Applied::Done]);
    assert_eq!(
        state.digests, digests,
        "no READ for seq 3 (unread, in that conversation) and no read position moved"
    );
    tracing_phase("a read past the tail is still invalid");
    let past = apply_one(&mut kv, &mut state, vec![read_by_1(2, 4, 21)]);
    assert_refused(&past, "not a message of its conversation");
    tracing_phase("reading seq 2 sends its READ receipt and its position leaves");
    apply_one(&mut kv, &mut state, vec![read_by_1(2, 2, 22)]);
    let [_, two, _] = positions(&kv).try_into().expect("three seqs");
    assert_eq!(two, None, "read, and its stub forgotten: the position left");
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = view_of(&mut staged);
    let with_2 = readstate::get(
        &view,
        user,
        ConversationId::Direct(UserId::new(2).expect("nonzero")),
    )
    .expect("memory");
    assert_eq!(readstate::unread(&with_2), 0);
    let new_receipts: Vec<(u8, u64, i32)> = records(&kv, Projection::Outbox)
        .into_iter()
        .filter(|record| !outbox_before.contains(record))
        .filter(|(key, _)| key.get(2) == Some(&crate::keys::tag::PRIMARY))
        .filter_map(|(_, value)| {
            let (_, bytes) = super::unframe(&value)?;
            let entry: courier_proto::pb::store::OutboxEntry =
                prost::Message::decode(bytes).ok()?;
            match entry.event?.kind? {
                Kind::ReceiptRecorded(r) => Some((r.message_id[0], r.sender_user, r.state)),
                _ => None,
            }
        })
        .collect();
    assert_eq!(
        new_receipts,
        vec![(2, 2, i32::from(ReceiptState::Read))],
        "one READ receipt for the forgotten message, to its sender"
    );
}

/// A read naming a forgotten (read) message under another conversation moves nothing there: no
/// READ receipt for that conversation's unread messages below it, no read position.
#[test]
fn a_read_of_a_forgotten_message_under_another_conversation_sends_nothing() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    tracing_phase("seq 1 from user 3 (unread), seq 2 from user 2 (read), both acked and trimmed");
    apply_one(
        &mut kv,
        &mut state,
        [
            registered(1, 1, 1),
            vec![
                delivered(1, 3, 1),
                delivered(1, 2, 2),
                read_by_1(2, 2, 12),
                Kind::DeliveryAcked(events::DeliveryAcked {
                    user: 1,
                    device: 1,
                    up_to_seq: 2,
                    acked_at_ms: 13,
                    trim_delivered: true,
                    keep_recent: 0,
                    trim_max: 0,
                }),
            ],
        ]
        .concat(),
    );
    tracing_phase("seq 2 alone is forgotten: its read position leaves");
    let seq_2: Vec<events::ForgottenMessage> = {
        let mut staged = Staged::new(&kv, BTreeMap::new());
        let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
        super::inbox::stubs_before(&view, u64::MAX, 10).expect("memory")
    }
    .into_iter()
    .filter(|stub| stub.seq == 2)
    .collect();
    assert_eq!(seq_2.len(), 1);
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::InboxForgotten(events::InboxForgotten {
            messages: seq_2,
            at_ms: 20,
        })],
    );
    let digests = state.digests.clone();
    let outcome = apply_one(&mut kv, &mut state, vec![read_by_1(3, 2, 21)]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(
        state.digests, digests,
        "seq 1 (user 3's, unread) gets no READ receipt and its conversation stays unread"
    );
}

/// User 1 (device 1) with six messages delivered from user 2, none acked.
fn six_delivered_to_user_1() -> (MemKv, ShardState) {
    applied(
        [
            registered(1, 1, 1),
            (1..=6).map(|seq| delivered(1, 2, seq)).collect(),
        ]
        .concat(),
    )
}

/// A `DeliveryAcked` with `trim_max` clears at most that many bodies past the inbox's
/// `trimmed_up_to`: a backlog (here five messages acked without trimming) is cleared over
/// several entries, the repeated acks included, and 0 clears it all at once as before.
#[test]
fn an_ack_clears_at_most_trim_max_bodies() {
    let (mut kv, mut state) = six_delivered_to_user_1();
    let user = UserId::new(1).expect("nonzero");
    let ack = |up_to_seq: u64, trim_delivered: bool, trim_max: u32| {
        Kind::DeliveryAcked(events::DeliveryAcked {
            user: 1,
            device: 1,
            up_to_seq,
            acked_at_ms: 10,
            trim_delivered,
            keep_recent: 0,
            trim_max,
        })
    };
    let trimmed = |kv: &MemKv| {
        let mut staged = Staged::new(kv, BTreeMap::new());
        let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
        super::inbox::state(&view, user)
            .expect("memory")
            .trimmed_up_to
    };
    apply_one(&mut kv, &mut state, vec![ack(5, false, 0)]);
    assert_eq!(trimmed(&kv), 0, "acked, not trimmed (keep-delivered)");
    apply_one(&mut kv, &mut state, vec![ack(5, true, 2)]);
    assert_eq!(trimmed(&kv), 2, "a repeated ack clears two of the five");
    apply_one(&mut kv, &mut state, vec![ack(6, true, 2)]);
    assert_eq!(trimmed(&kv), 4, "one moving the cursor, two more");
    apply_one(&mut kv, &mut state, vec![ack(6, true, 0)]);
    assert_eq!(trimmed(&kv), 6, "no bound: the rest at once");
}

/// In an entry of event format 1 `trim_max` is ignored, as the builds before it ignored it: a
/// replica of either build clears the same bodies.
#[test]
fn a_format_1_ack_ignores_trim_max() {
    let (mut kv, mut state) = six_delivered_to_user_1();
    let user = UserId::new(1).expect("nonzero");
    let ack = Kind::DeliveryAcked(events::DeliveryAcked {
        user: 1,
        device: 1,
        up_to_seq: 5,
        acked_at_ms: 10,
        trim_delivered: true,
        keep_recent: 0,
        trim_max: 2,
    });
    super::projection_test::apply_one_in(1, &mut kv, &mut state, vec![ack]);
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
    let inbox = super::inbox::state(&view, user).expect("memory");
    assert_eq!(
        inbox.trimmed_up_to, 5,
        "every acked body, as format 1 means"
    );
}

/// A byte-bounded read ends where the bound would be passed, with at least one message, and says
/// how far it read; within the bound it reads the whole range, however many steps it takes, and
/// read in one scan it answers the same.
#[test]
fn a_read_within_bytes_ends_at_the_bound() {
    use courier_proto::InboxSeq;

    use crate::projection::inbox::{ENTRY_BYTES_MAX, entries_within};

    let (kv, _) = six_delivered_to_user_1();
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = view_of(&mut staged);
    let user = UserId::new(1).expect("nonzero");
    let (zero, six) = (InboxSeq::ZERO, InboxSeq::new(6));
    let read_as = |stepped: bool, after: u64, bytes_max: usize| {
        let range = (InboxSeq::new(after), six);
        let (messages, reached) =
            entries_within(&view, user, range, bytes_max, stepped).expect("memory");
        let seqs: Vec<u64> = messages.iter().map(|(seq, _)| seq.get()).collect();
        (seqs, reached.get())
    };
    let (all, _) = entries_within(&view, user, (zero, six), usize::MAX, true).expect("memory");
    let size = prost::Message::encoded_len(&all[0].1);
    // Read in steps or in one scan, the same answers.
    for stepped in [true, false] {
        let read = |after: u64, bytes_max: usize| read_as(stepped, after, bytes_max);
        assert_eq!(read(0, usize::MAX), (vec![1, 2, 3, 4, 5, 6], 6), "all fit");
        assert_eq!(
            read(0, size * 2 + size / 2),
            (vec![1, 2], 2),
            "a third would pass the bound"
        );
        assert_eq!(read(2, size * 2), (vec![3, 4], 4), "exactly two fit");
        assert_eq!(
            read(0, 1),
            (vec![1], 1),
            "one larger than the bound is read alone"
        );
        assert_eq!(read(6, 1), (vec![], 6), "nothing after the tail");
        // Bounds of a few entries at their largest: several steps, the same messages.
        assert_eq!(read(0, ENTRY_BYTES_MAX * 2), (vec![1, 2, 3, 4, 5, 6], 6));
        assert_eq!(read(0, ENTRY_BYTES_MAX), (vec![1, 2, 3, 4, 5, 6], 6));
    }
}

/// A user's sends recorded on a shard are found by user, with their send times, and a
/// `SendsForgotten` naming them removes them with their time index entries: what a node does on
/// a group's shard before it closes the account.
#[test]
fn a_users_sends_are_found_to_be_forgotten() {
    let (mut kv, mut state) = applied(vec![sent_event(1, "a", 0, 100), sent_event(2, "b", 0, 200)]);
    let sends_of = |kv: &MemKv, user: u64, limit: usize| {
        let user = UserId::new(user).expect("nonzero");
        in_dedup(kv, |view| super::dedup::sends_of(view, user, limit)).expect("memory")
    };
    let found = sends_of(&kv, 1, 10);
    let named: Vec<(u64, u32, &str, u64)> = found
        .iter()
        .map(|s| {
            (
                s.sender_user,
                s.sender_device,
                s.client_msg_id.as_str(),
                s.sent_at_ms,
            )
        })
        .collect();
    assert_eq!(named, vec![(1, 1, "a", 100), (1, 1, "b", 200)]);
    assert_eq!(sends_of(&kv, 1, 1).len(), 1, "at most the limit");
    assert!(
        sends_of(&kv, 2, 10).is_empty(),
        "another user's sends are not"
    );
    let forget = Kind::SendsForgotten(events::SendsForgotten {
        sends: found,
        at_ms: 300,
    });
    apply_one(&mut kv, &mut state, vec![forget]);
    assert!(sends_of(&kv, 1, 10).is_empty());
    assert_eq!(
        dedup_records(&kv),
        dedup_records(&MemKv::default()),
        "records and time index are gone"
    );
}

/// A shard's store and state after one entry of `kinds`.
fn applied(kinds: Vec<Kind>) -> (MemKv, ShardState) {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, kinds);
    (kv, state)
}

/// Runs `read` over the dedup projection of `kv`.
fn in_dedup<R>(kv: &MemKv, read: impl FnOnce(&View<'_, '_>) -> R) -> R {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Dedup);
    read(&view)
}

/// Every record of the dedup projection of `kv`, its time index included.
fn dedup_records(kv: &MemKv) -> Vec<(Vec<u8>, Vec<u8>)> {
    kv.scan(Cf::Projection(Projection::Dedup), &[], &[0xff], usize::MAX)
        .expect("memory")
}
