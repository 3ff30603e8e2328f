//! Groups tables: fan-out follows the membership; refused events change nothing.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self};
use courier_proto::{ConversationId, LogIndex, ShardId, UserId};

use super::projection_test::{SHARD, apply_one};
use crate::kv::{MemKv, Staged};
use crate::projection::{Applied, Projection, View};
use crate::shard::ShardState;

fn group_send(client_msg_id: &str, id: u8, sender: u64, epoch: u64) -> Kind {
    group_send_at(client_msg_id, id, sender, epoch, 50)
}

fn group_send_at(client_msg_id: &str, id: u8, sender: u64, epoch: u64, sent_at_ms: u64) -> Kind {
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
        sent_at_ms,
        recipient_shard: u32::from(SHARD.get()),
        group_epoch: epoch,
        trace_parent: String::new(),
        own_copies: false,
    })
}

/// Group 77 created by user 1 on this shard.
fn group_created() -> Kind {
    Kind::GroupCreated(events::GroupCreated {
        group: 77,
        creator: 1,
        name: "g".to_owned(),
        at_ms: 1,
        creator_shard: u32::from(SHARD.get()),
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
        replaces: 0,
    })
}

/// A group message is stored once: members on the group's shard get a pointer in their inbox
/// in the same entry, members elsewhere a pointer through the outbox, each with a SENT receipt;
/// a removed member gets nothing later; refused events (non-admin adds, non-member sends, a stale
/// epoch) change nothing.
#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one membership story in linear phases: each phase reads the state the previous one left"
)]
fn group_fan_out_follows_the_membership() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let created = apply_one(
        &mut kv,
        &mut state,
        vec![
            group_created(),
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

fn forget_group_messages(up_to: LogIndex, before_ms: u64) -> Kind {
    Kind::GroupMessagesForgotten(events::GroupMessagesForgotten {
        up_to_index: up_to.get(),
        before_ms,
    })
}

/// What the group shard holds of its stored copies: the indexes left and the watermark.
fn stored_copies(kv: &MemKv) -> (Vec<u64>, LogIndex) {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Groups);
    let left = (1..100)
        .filter(|at| {
            crate::projection::groups::message_at(&view, LogIndex::new(*at))
                .expect("memory")
                .is_some()
        })
        .collect();
    let watermark = crate::projection::groups::messages_forgotten_up_to(&view).expect("memory");
    (left, watermark)
}

/// The leader finds the copies due by their send times (an untimed copy, stored before the field
/// existed, only when a later timed one is due); a forget removes the copies up to its index,
/// oldest first, whatever their times (apply depends on the log alone), at most
/// `COPIES_PER_FORGET_MAX` per event; the watermark records the last index that left and never
/// moves back; a forget naming its own index or later is refused and changes nothing.
#[test]
fn group_message_copies_are_forgotten_oldest_first() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(
        &mut kv,
        &mut state,
        vec![group_created(), member_added(3, 1, 9)],
    );
    let mut sent = Vec::new();
    for (i, at_ms) in [10, 20, 0, 40, 60].into_iter().enumerate() {
        sent.push(state.applied.next().get());
        let id = u8::try_from(i + 1).expect("small");
        apply_one(
            &mut kv,
            &mut state,
            vec![group_send_at(&format!("m{id}"), id, 1, 2, at_ms)],
        );
    }
    assert_eq!(stored_copies(&kv), (sent.clone(), LogIndex::ZERO));
    let due = |kv: &MemKv, before_ms: u64, limit: usize| {
        let mut staged = Staged::new(kv, BTreeMap::new());
        let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Groups);
        crate::projection::groups::messages_sent_before(&view, before_ms, limit).expect("memory")
    };
    assert_eq!(due(&kv, 5, 10), None, "nothing sent before 5");
    assert_eq!(
        due(&kv, 35, 10),
        Some(LogIndex::new(sent[1])),
        "the untimed copy waits"
    );
    assert_eq!(
        due(&kv, 50, 10),
        Some(LogIndex::new(sent[3])),
        "the untimed copy is older than a due one"
    );
    assert_eq!(
        due(&kv, 50, 2),
        Some(LogIndex::new(sent[1])),
        "at most `limit` copies"
    );

    apply_one(
        &mut kv,
        &mut state,
        vec![forget_group_messages(LogIndex::new(sent[1]), 35)],
    );
    assert_eq!(
        stored_copies(&kv),
        (sent[2..].to_vec(), LogIndex::new(sent[1]))
    );
    // The leader decided; the time in the event does not filter at apply.
    apply_one(
        &mut kv,
        &mut state,
        vec![forget_group_messages(LogIndex::new(sent[3]), 1)],
    );
    assert_eq!(
        stored_copies(&kv),
        (sent[4..].to_vec(), LogIndex::new(sent[3]))
    );
    let before = state.digests.clone();
    let ahead = state.applied.next();
    let refused = apply_one(&mut kv, &mut state, vec![forget_group_messages(ahead, 1)]);
    assert!(
        matches!(refused[0], Applied::Rejected { .. }),
        "no copy can be at the forget's own index: {refused:?}"
    );
    assert_eq!(state.digests, before, "a refused forget changes nothing");
    // A forget naming an index below the watermark leaves it where it is.
    apply_one(
        &mut kv,
        &mut state,
        vec![forget_group_messages(LogIndex::new(sent[0]), 1)],
    );
    assert_eq!(
        stored_copies(&kv),
        (sent[4..].to_vec(), LogIndex::new(sent[3]))
    );
}

/// One forget removes at most `COPIES_PER_FORGET_MAX` copies, the oldest, whatever index it names.
#[test]
fn one_forget_removes_a_bounded_number_of_copies() {
    use crate::projection::groups::COPIES_PER_FORGET_MAX;
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, vec![group_created()]);
    let first = state.applied.next();
    let sends: Vec<Kind> = (0..COPIES_PER_FORGET_MAX + 3)
        .map(|i| {
            let mut send = group_send_at(&format!("b{i}"), 1, 1, 1, 5);
            if let Kind::MessageSent(sent) = &mut send {
                sent.message_id = u128::try_from(i + 1).expect("small").to_be_bytes().to_vec();
            }
            send
        })
        .collect();
    for send in sends {
        apply_one(&mut kv, &mut state, vec![send]);
    }
    let last = state.applied;
    apply_one(&mut kv, &mut state, vec![forget_group_messages(last, 10)]);
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Groups);
    let watermark = crate::projection::groups::messages_forgotten_up_to(&view).expect("memory");
    assert_eq!(
        watermark.get(),
        first.get() + COPIES_PER_FORGET_MAX as u64 - 1,
        "the oldest COPIES_PER_FORGET_MAX left"
    );
    assert!(
        crate::projection::groups::message_at(&view, last)
            .expect("memory")
            .is_some(),
        "the newest stay for the next forget"
    );
}

/// A change of number in a group: the new user takes the replaced member's place with its
/// admin flag, in one event (the count stays, the epoch moves); only the member itself hands its
/// place on, and not to someone already in the group; the old user's index entry goes.
#[test]
fn a_member_is_replaced_by_its_new_number() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let replaced_by = |user: u64, by: u64, replaces: u64| {
        Kind::MemberAdded(events::MemberAdded {
            group: 77,
            user,
            by,
            admin: false,
            at_ms: 2,
            user_shard: 9,
            replaces,
        })
    };
    apply_one(
        &mut kv,
        &mut state,
        vec![group_created(), member_added(2, 1, 9)],
    );
    let before = state.digests.clone();
    let refused = apply_one(
        &mut kv,
        &mut state,
        vec![
            replaced_by(5, 2, 1),
            replaced_by(2, 1, 1),
            replaced_by(5, 3, 3),
        ],
    );
    for (outcome, code) in refused.iter().zip([
        "COURIER:Group:NotAdmin",
        "COURIER:Group:AlreadyMember",
        "COURIER:Group:NotMember",
    ]) {
        assert!(
            matches!(outcome, Applied::Rejected { code: got, .. } if *got == code),
            "{outcome:?} is not {code}"
        );
    }
    assert_eq!(state.digests, before, "refusals change nothing");

    let outcome = apply_one(&mut kv, &mut state, vec![replaced_by(5, 1, 1)]);
    assert_eq!(outcome, vec![Applied::Done]);
    let mut staged = Staged::new(&kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::new(1), Projection::Groups);
    let group = courier_proto::GroupId::new(77).expect("nonzero");
    let members: Vec<(u64, bool, u32)> = crate::projection::groups::members(&view, group)
        .expect("memory")
        .into_iter()
        .map(|(user, record)| (user.get(), record.admin, record.shard))
        .collect();
    assert_eq!(
        members,
        vec![(2, false, 9), (5, true, 9)],
        "5 holds 1's place as admin"
    );
    let of = |user: u64| {
        crate::projection::groups::groups_of(&view, UserId::new(user).expect("nonzero"))
            .expect("memory")
    };
    assert_eq!(of(1), Vec::new());
    assert_eq!(of(5), vec![group]);
    let record = crate::projection::groups::record(&view, group)
        .expect("memory")
        .expect("the group exists");
    assert_eq!((record.members, record.epoch), (2, 3));
}
