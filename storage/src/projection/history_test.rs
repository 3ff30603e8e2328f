//! Multi-device history: a sender with another active device gets their own copy of what they
//! send (1:1 and group), read already, with no receipts; a sender without one stores nothing
//! more; an ack keeps the last `keep_recent` bodies for companions linked later.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::pb::events;
use courier_proto::pb::events::event::Kind;
use courier_proto::{ConversationId, GroupId, InboxSeq, LogIndex, ShardId, UserId};

use super::projection_test::{
    SHARD, apply_one, assert_projections_unchanged, delivered, device_of, direct, send_by_1,
    tracing_phase, user_with_primary,
};
use crate::kv::{MemKv, Staged};
use crate::projection::{Applied, Projection, View, inbox, outbox, readstate};
use crate::shard::ShardState;

const OTHER: ShardId = ShardId::new(2);

fn uid(raw: u64) -> UserId {
    UserId::new(raw).expect("nonzero")
}

fn ack(user: u64, device: u32, up_to_seq: u64, keep_recent: u32) -> Kind {
    Kind::DeliveryAcked(events::DeliveryAcked {
        user,
        device,
        up_to_seq,
        acked_at_ms: 500,
        trim_delivered: true,
        keep_recent,
        trim_max: 0,
    })
}

fn read<T>(kv: &MemKv, projection: Projection, f: impl FnOnce(&View<'_, '_>) -> T) -> T {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, projection);
    f(&view)
}

fn inbox_of(kv: &MemKv, user: u64) -> Vec<(u64, events::Content, u64, ConversationId)> {
    read(kv, Projection::Inbox, |view| {
        inbox::entries_between(
            view,
            uid(user),
            InboxSeq::new(0),
            InboxSeq::new(u64::MAX - 1),
        )
        .expect("memory")
        .into_iter()
        .map(|(seq, entry)| {
            let conversation =
                ConversationId::try_from(entry.conversation.as_ref().expect("stored with one"))
                    .expect("valid");
            (
                seq.get(),
                entry.content.unwrap_or_default(),
                entry.sender_user,
                conversation,
            )
        })
        .collect()
    })
}

fn bodies(kv: &MemKv, user: u64) -> Vec<(u64, Vec<u8>)> {
    inbox_of(kv, user)
        .into_iter()
        .map(|(seq, content, _, _)| (seq, content.body))
        .collect()
}

/// A 1:1 send stores the sender's own copy once the sender has a second active device: same
/// shard or not, in the conversation with the recipient, never for a retry; it is read already
/// (no unread count, a read naming it changes nothing), an ack of it queues no receipt, and it
/// can expire; revoking the companion stops the copies.
#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one story in linear phases: each phase reads the state the previous one left"
)]
fn a_senders_other_devices_get_their_own_copy() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(
        &mut kv,
        &mut state,
        [
            user_with_primary(1, &[1; 16]),
            user_with_primary(2, &[2; 16]),
        ]
        .concat(),
    );
    tracing_phase("one device: a send stores nothing for the sender");
    apply_one(&mut kv, &mut state, vec![send_by_1(1, 2, SHARD)]);
    assert_eq!(bodies(&kv, 1), Vec::new());
    assert_eq!(bodies(&kv, 2), vec![(1, vec![1; 3])]);

    tracing_phase("a companion linked: sends here and elsewhere store an own copy, in order");
    apply_one(&mut kv, &mut state, vec![device_of(1, false)]);
    apply_one(
        &mut kv,
        &mut state,
        vec![send_by_1(2, 2, SHARD), send_by_1(3, 9, OTHER)],
    );
    let own = inbox_of(&kv, 1);
    assert_eq!(
        own.iter()
            .map(|(seq, content, from, conversation)| (
                *seq,
                content.body.clone(),
                *from,
                *conversation
            ))
            .collect::<Vec<_>>(),
        vec![
            (1, vec![2; 3], 1, ConversationId::Direct(uid(2))),
            (2, vec![3; 3], 1, ConversationId::Direct(uid(9))),
        ],
        "the sender's copies, in the conversations with their recipients"
    );
    assert_eq!(bodies(&kv, 2), vec![(1, vec![1; 3]), (2, vec![2; 3])]);

    tracing_phase("a send written before own copies (own_copies = false) applies as it did");
    let before = inbox_of(&kv, 1).len();
    let mut old = send_by_1(6, 2, SHARD);
    if let Kind::MessageSent(sent) = &mut old {
        sent.own_copies = false;
    }
    apply_one(&mut kv, &mut state, vec![old]);
    assert_eq!(
        inbox_of(&kv, 1).len(),
        before,
        "no own copy from an older entry"
    );
    assert_eq!(bodies(&kv, 2).len(), 3, "the recipient gets it");

    tracing_phase("a retried send stores no second own copy");
    let before = state.clone();
    let retried = apply_one(&mut kv, &mut state, vec![send_by_1(3, 9, OTHER)]);
    assert!(
        matches!(
            retried[..],
            [Applied::Sent {
                duplicate: true,
                ..
            }]
        ),
        "{retried:?}"
    );
    assert_projections_unchanged(&before, &state);

    tracing_phase("own copies are read already: nothing unread, a read naming one is a no-op");
    let unread = |kv: &MemKv, with: u64| {
        read(kv, Projection::ReadState, |view| {
            readstate::unread(
                &readstate::get(view, uid(1), ConversationId::Direct(uid(with))).expect("memory"),
            )
        })
    };
    assert_eq!((unread(&kv, 2), unread(&kv, 9)), (0, 0));
    let before = state.clone();
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::ReadUpTo(events::ReadUpTo {
            user: 1,
            conversation: direct(2),
            up_to_seq: 1,
            read_at_ms: 300,
        })],
    );
    assert_projections_unchanged(&before, &state);

    tracing_phase("both devices ack the own copies: bodies leave, no receipt is queued");
    let queued = |kv: &MemKv| {
        read(kv, Projection::Outbox, |view| {
            outbox::states(view)
                .expect("memory")
                .into_iter()
                .map(|(dest, s)| (dest.get(), s.last_pos))
                .collect::<Vec<_>>()
        })
    };
    let queued_before = queued(&kv);
    assert_eq!(
        queued_before,
        vec![(OTHER.get(), 1)],
        "only the forward of send 3"
    );
    apply_one(&mut kv, &mut state, vec![ack(1, 1, 2, 0), ack(1, 2, 2, 0)]);
    assert_eq!(queued(&kv), queued_before, "own copies get no receipts");
    assert_eq!(
        bodies(&kv, 1),
        vec![(1, Vec::new()), (2, Vec::new())],
        "trimmed"
    );

    tracing_phase("an undelivered own copy expires like any message");
    apply_one(&mut kv, &mut state, vec![send_by_1(4, 2, SHARD)]);
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::MessageExpired(events::MessageExpired {
            user: 1,
            seq: 3,
            message_id: vec![4; 16],
            at_ms: 400,
        })],
    );
    assert_eq!(inbox_of(&kv, 1).len(), 2, "seq 3 expired");

    tracing_phase("the companion revoked: one active device again, no more own copies");
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::DeviceRevoked(events::DeviceRevoked {
            user: 1,
            device: 2,
            at_ms: 450,
            redeemed_phone_hash: Vec::new(),
        })],
    );
    apply_one(&mut kv, &mut state, vec![send_by_1(5, 2, SHARD)]);
    assert_eq!(inbox_of(&kv, 1).len(), 2);
    assert_eq!(bodies(&kv, 2).len(), 5, "the recipient still gets it");

    tracing_phase("a third device linked: devices 1 and 3 are active, the copies resume");
    apply_one(&mut kv, &mut state, vec![device_of(1, false)]);
    apply_one(&mut kv, &mut state, vec![send_by_1(7, 2, SHARD)]);
    assert_eq!(
        inbox_of(&kv, 1)
            .iter()
            .map(|(seq, content, ..)| (*seq, content.body.clone()))
            .collect::<Vec<_>>(),
        vec![(1, Vec::new()), (2, Vec::new()), (4, vec![7; 3])],
        "the revoked device 2 between the two active ones is skipped"
    );
}

/// A group's fan-out includes the sender's own pointer copy: stored here, on the sender's shard,
/// only if the sender has another active device; forwarded from elsewhere, it consumes its
/// position either way.
#[test]
fn a_group_senders_other_devices_get_their_own_copy() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(
        &mut kv,
        &mut state,
        [
            user_with_primary(1, &[1; 16]),
            user_with_primary(3, &[3; 16]),
        ]
        .concat(),
    );
    let group = GroupId::new(77).expect("nonzero");
    let pointer = |user: u64, id: u8, source_pos: u64| {
        Kind::MessageDelivered(events::MessageDelivered {
            message_id: vec![id; 16],
            recipient_user: user,
            sender_user: user,
            sender_device: 1,
            conversation: Some(ConversationId::Group(group).into()),
            content: None,
            sent_at_ms: 10,
            stored_at_ms: 11,
            source_shard: u32::from(OTHER.get()),
            source_pos,
            group_index: 40,
            trace_parent: String::new(),
            origin_shard: None,
            addressed_to: 0,
            receipts_sent: 0,
        })
    };
    tracing_phase("user 3 (one device): the forwarded own copy stores nothing");
    let outcome = apply_one(&mut kv, &mut state, vec![pointer(3, 1, 1)]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(inbox_of(&kv, 3), Vec::new());
    let watermark = |kv: &MemKv| {
        read(kv, Projection::Outbox, |view| {
            outbox::inbound_applied_from(view, OTHER).expect("memory")
        })
    };
    assert_eq!(watermark(&kv), 1, "its position is consumed");
    tracing_phase("user 1 with a companion: the own copy is stored, read already");
    apply_one(&mut kv, &mut state, vec![device_of(1, false)]);
    let outcome = apply_one(&mut kv, &mut state, vec![pointer(1, 2, 2)]);
    assert!(
        matches!(
            outcome[..],
            [Applied::Stored {
                duplicate: false,
                ..
            }]
        ),
        "{outcome:?}"
    );
    assert_eq!(watermark(&kv), 2);
    let own = inbox_of(&kv, 1);
    assert_eq!(own.len(), 1);
    assert_eq!((own[0].2, own[0].3), (1, ConversationId::Group(group)));
    let unread = read(&kv, Projection::ReadState, |view| {
        readstate::unread(
            &readstate::get(view, uid(1), ConversationId::Group(group)).expect("memory"),
        )
    });
    assert_eq!(unread, 0);
    tracing_phase("a message from someone else in the group is unread as before");
    apply_one(&mut kv, &mut state, vec![delivered(1, 3, 3)]);
    let unread = read(&kv, Projection::ReadState, |view| {
        readstate::unread(
            &readstate::get(view, uid(1), ConversationId::Direct(uid(3))).expect("memory"),
        )
    });
    assert_eq!(unread, 1);
}

/// An ack with `keep_recent` trims the bodies every device acked except the user's last
/// `keep_recent` messages; a later ack trims on as the inbox grows.
#[test]
fn an_ack_keeps_the_last_bodies_for_companions() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, user_with_primary(1, &[1; 16]));
    apply_one(
        &mut kv,
        &mut state,
        (1..=5).map(|id| delivered(1, 2, id)).collect(),
    );
    apply_one(&mut kv, &mut state, vec![ack(1, 1, 5, 2)]);
    let kept: Vec<u64> = bodies(&kv, 1)
        .into_iter()
        .filter(|(_, body)| !body.is_empty())
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(kept, vec![4, 5], "the last two keep their bodies");
    apply_one(
        &mut kv,
        &mut state,
        vec![delivered(1, 2, 6), ack(1, 1, 6, 2)],
    );
    let kept: Vec<u64> = bodies(&kv, 1)
        .into_iter()
        .filter(|(_, body)| !body.is_empty())
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(kept, vec![5, 6]);
}
