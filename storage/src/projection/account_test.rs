//! Account deletion: `AccountDeleted` leaves no record of the user and no hash of the number in
//! any projection, closes the inbox to later deliveries, keeps what the user already sent on its
//! way, and the number registers again into an empty account.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, ReceiptState};
use courier_proto::{ShardId, UserId};

use super::projection_test::{
    SHARD, TOKEN_HASH, apply_one, assert_projections_unchanged, assert_refused, delivered,
    device_of, direct, send_by_1, tracing_phase, user_with_primary,
};
use crate::cf::Cf;
use crate::keys;
use crate::kv::{MemKv, ReadKv};
use crate::projection::{Applied, Projection};
use crate::shard::ShardState;

const OTHER: ShardId = ShardId::new(2);
const PHONE: [u8; 16] = [0xa1; 16];

/// An ack by `device` of user 1, trimming delivered bodies or not.
fn ack(device: u32, up_to_seq: u64, trim_delivered: bool) -> Kind {
    Kind::DeliveryAcked(events::DeliveryAcked {
        user: 1,
        device,
        up_to_seq,
        acked_at_ms: 90,
        trim_delivered,
        keep_recent: 0,
        trim_max: 0,
    })
}

/// User 1 (number [`PHONE`]) with its primary and a companion; user 2 beside it.
fn user_1_with_companion_beside_user_2(kv: &mut MemKv, state: &mut ShardState) {
    apply_one(
        kv,
        state,
        [
            user_with_primary(1, &PHONE),
            vec![device_of(1, false)],
            user_with_primary(2, &[0xb2; 16]),
        ]
        .concat(),
    );
}

/// A deletion of `user`'s account asked by `device` with `token_hash`.
fn deleted_by(user: u64, device: u32, token_hash: [u8; 32]) -> Kind {
    Kind::AccountDeleted(events::AccountDeleted {
        user,
        at_ms: 100,
        device,
        token_hash: token_hash.to_vec(),
        moved_to: 0,
        moved_to_shard: 0,
    })
}

/// A deletion asked by `user`'s primary (device 1, registered with [`TOKEN_HASH`]).
fn deleted(user: u64) -> Kind {
    deleted_by(user, 1, TOKEN_HASH)
}

/// Every record of user 1 and every key or value holding the number's hash, in any projection
/// (user-keyed records by their user field; time indexes by the user they name).
fn traces_of_user_1(kv: &MemKv) -> Vec<(Projection, Vec<u8>)> {
    let user = UserId::new(1).expect("nonzero");
    let mut found = Vec::new();
    for projection in Projection::ALL {
        let records = kv
            .scan(Cf::Projection(projection), &[], &[0xff], usize::MAX)
            .expect("memory");
        for (key, value) in records {
            let holds_phone = |bytes: &[u8]| bytes.windows(PHONE.len()).any(|w| w == PHONE);
            let tag = key.get(2).copied();
            let names_user = match (projection, tag) {
                (Projection::Outbox | Projection::Groups, _) => false,
                (Projection::Inbox, Some(keys::tag::QUATERNARY)) => {
                    keys::inbox_stub_by_time_parts(&key).is_some_and(|(_, u, _)| u == user)
                }
                (Projection::Receipts, Some(keys::tag::TERTIARY)) => {
                    keys::receipt_by_time_parts(&key)
                        .is_some_and(|(_, sender, _, _)| sender == user)
                }
                (Projection::Dedup, Some(keys::tag::SECONDARY)) => {
                    keys::dedup_by_time_parts(&key).is_some_and(|(_, u, _, _)| u == user)
                }
                (Projection::Expiry, _) => {
                    keys::expiry_parts(&key).is_some_and(|(_, u, _)| u == user)
                }
                (
                    Projection::Devices,
                    Some(keys::tag::PRIMARY | keys::tag::QUATERNARY | keys::tag::QUINARY),
                ) => false,
                _ => keys::user_after_tag(&key) == Some(user),
            };
            let closed_inbox =
                projection == Projection::Inbox && key == keys::inbox_state(SHARD, user);
            if (names_user && !closed_inbox) || holds_phone(&key) || holds_phone(&value) {
                found.push((projection, key));
            }
        }
    }
    found
}

/// A user with a companion, keys, a live code, messages in (some trimmed, one unread), sends
/// out (receipts, dedup records, one forward queued) deletes the account: nothing of it stays but
/// a closed inbox; the queued forward still goes; a delivery to it stores nothing; a second
/// deletion is refused; the number registers again into an empty inbox.
#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one story in linear phases: each phase reads the state the previous one left"
)]
fn a_deleted_account_leaves_nothing_behind() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    tracing_phase("user 1 with a companion, keys and a live code; user 2 beside it");
    user_1_with_companion_beside_user_2(&mut kv, &mut state);
    apply_one(
        &mut kv,
        &mut state,
        vec![
            Kind::CodeIssued(events::CodeIssued {
                phone_hash: PHONE.to_vec(),
                code_hash: vec![9; 32],
                expires_at_ms: 10_000,
                attempts: 5,
                limit: Some(events::RateLimit {
                    per_hour: 10,
                    burst: 5,
                }),
                at_ms: 3,
            }),
            Kind::KeysUploaded(events::KeysUploaded {
                user: 1,
                device: 1,
                identity_key: vec![4; 32],
                signed_prekey: Some(events::PreKey {
                    key_id: 1,
                    public_key: vec![5; 32],
                    signature: vec![6; 64],
                }),
                one_time_prekeys: (1..=3)
                    .map(|key_id| events::PreKey {
                        key_id,
                        public_key: vec![7; 32],
                        signature: Vec::new(),
                    })
                    .collect(),
                at_ms: 4,
            }),
        ],
    );
    tracing_phase("messages in: two read and trimmed, one unread; sends out, here and elsewhere");
    apply_one(
        &mut kv,
        &mut state,
        vec![delivered(1, 2, 1), delivered(1, 2, 2), delivered(1, 3, 3)],
    );
    apply_one(
        &mut kv,
        &mut state,
        vec![
            ack(1, 2, true),
            ack(2, 2, true),
            Kind::ReadUpTo(events::ReadUpTo {
                user: 1,
                conversation: direct(2),
                up_to_seq: 2,
                read_at_ms: 91,
            }),
        ],
    );
    apply_one(
        &mut kv,
        &mut state,
        vec![send_by_1(10, 2, SHARD), send_by_1(11, 9, OTHER)],
    );
    assert!(
        !traces_of_user_1(&kv).is_empty(),
        "the history leaves records of user 1 to find"
    );
    let queued = |kv: &MemKv| {
        kv.scan(
            Cf::Projection(Projection::Outbox),
            &keys::outbox_dest_prefix(SHARD, OTHER),
            &[0xff],
            usize::MAX,
        )
        .expect("memory")
        .len()
    };
    let queued_before = queued(&kv);
    assert!(queued_before > 0);

    tracing_phase("a companion, or the primary with another token, deletes nothing");
    for refused in [deleted_by(1, 2, TOKEN_HASH), deleted_by(1, 1, [4; 32])] {
        let before = state.clone();
        let outcome = apply_one(&mut kv, &mut state, vec![refused]);
        assert_refused(&outcome, "not its active primary");
        assert_projections_unchanged(&before, &state);
    }

    tracing_phase("the account is deleted");
    let outcome = apply_one(&mut kv, &mut state, vec![deleted(1)]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(traces_of_user_1(&kv), Vec::new(), "nothing of user 1 stays");
    assert_eq!(queued(&kv), queued_before, "what it sent still goes");
    let user_2_inbox = kv
        .scan(
            Cf::Projection(Projection::Inbox),
            &keys::inbox_user_prefix(SHARD, UserId::new(2).expect("nonzero")),
            &keys::prefix_end(&keys::inbox_user_prefix(
                SHARD,
                UserId::new(2).expect("nonzero"),
            ))
            .expect("prefix"),
            usize::MAX,
        )
        .expect("memory");
    assert_eq!(user_2_inbox.len(), 1, "the recipient keeps the message");

    tracing_phase("a delivery to the deleted account stores nothing; deleting again is refused");
    let before = state.clone();
    let outcome = apply_one(&mut kv, &mut state, vec![delivered(1, 2, 20)]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(traces_of_user_1(&kv), Vec::new());
    assert_projections_unchanged(&before, &state);
    let outcome = apply_one(&mut kv, &mut state, vec![deleted(1)]);
    assert_refused(&outcome, "not its active primary");

    tracing_phase("the number registers again: an empty inbox that stores from seq 1");
    let again = apply_one(&mut kv, &mut state, user_with_primary(1, &PHONE));
    assert!(
        matches!(again[1], Applied::DeviceRegistered { device: 1, .. }),
        "{again:?}"
    );
    let stored = apply_one(&mut kv, &mut state, vec![delivered(1, 2, 21)]);
    assert!(
        matches!(stored[..], [Applied::Stored { seq, duplicate: false, .. }] if seq.get() == 1),
        "{stored:?}"
    );
}

/// The pending events on `from`'s outbox to `dest`, in position order.
fn pending(kv: &MemKv, from: ShardId, dest: ShardId) -> Vec<Kind> {
    let mut staged = crate::kv::Staged::new(kv, std::collections::BTreeMap::new());
    let view = crate::projection::View::new(
        &mut staged,
        from,
        courier_proto::LogIndex::new(1),
        Projection::Outbox,
    );
    crate::projection::outbox::pending(&view, dest, 1, usize::MAX)
        .expect("memory")
        .into_iter()
        .filter_map(|(_, event)| event.kind)
        .collect()
}

/// The `MessageDelivered`s among `kinds`.
fn deliveries(kinds: &[Kind]) -> Vec<&events::MessageDelivered> {
    kinds
        .iter()
        .filter_map(|kind| match kind {
            Kind::MessageDelivered(delivered) => Some(delivered),
            _ => None,
        })
        .collect()
}

/// A change of number: user 1's primary (which acked message 1; its companion acked up to 2)
/// moves the account to user 7 on another shard. Messages 2 and 3, which the primary had not
/// acked, are re-queued to user 7 in order, naming user 1 as the addressee and this shard as
/// their origin; so is a delivery that reaches the closed inbox later; nothing of user 1 stays.
/// On the new shard they are stored for user 7, and its ack sends DELIVERED receipts back to the
/// origin naming user 1, whom the sender addressed, for those the old inbox had not sent one for.
/// A move to the account itself is refused.
#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one story in linear phases: each phase reads the state the previous one left"
)]
fn a_changed_number_takes_what_the_device_had_not_acked() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let moved = |moved_to: u64, shard: ShardId| {
        Kind::AccountDeleted(events::AccountDeleted {
            user: 1,
            at_ms: 100,
            device: 1,
            token_hash: TOKEN_HASH.to_vec(),
            moved_to,
            moved_to_shard: u32::from(shard.get()),
        })
    };
    tracing_phase("user 1 with a companion; three messages from user 2, acked 1 and 2");
    user_1_with_companion_beside_user_2(&mut kv, &mut state);
    apply_one(
        &mut kv,
        &mut state,
        vec![delivered(1, 2, 1), delivered(1, 2, 2), delivered(1, 2, 3)],
    );
    apply_one(
        &mut kv,
        &mut state,
        vec![ack(1, 1, false), ack(2, 2, false)],
    );
    let receipts_here = |kv: &MemKv| {
        pending(kv, SHARD, SHARD)
            .iter()
            .filter(|kind| matches!(kind, Kind::ReceiptRecorded(_)))
            .count()
    };
    assert_eq!(receipts_here(&kv), 2, "DELIVERED for 1 and 2");

    tracing_phase("a move to the account itself is refused");
    let before = state.clone();
    let outcome = apply_one(&mut kv, &mut state, vec![moved(1, SHARD)]);
    assert_refused(&outcome, "moving to itself");
    assert_projections_unchanged(&before, &state);

    tracing_phase("the number changes: 2 and 3 follow the account to user 7");
    let outcome = apply_one(&mut kv, &mut state, vec![moved(7, OTHER)]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(traces_of_user_1(&kv), Vec::new(), "nothing of user 1 stays");
    let queued = pending(&kv, SHARD, OTHER);
    let requeued = deliveries(&queued);
    assert_eq!(
        requeued
            .iter()
            .map(|d| (
                d.message_id[0],
                d.recipient_user,
                d.addressed_to,
                d.origin_shard
            ))
            .collect::<Vec<_>>(),
        vec![
            (2, 7, 1, Some(u32::from(SHARD.get()))),
            (3, 7, 1, Some(u32::from(SHARD.get()))),
        ],
        "what the asking device had not acked, in inbox order"
    );
    assert!(
        requeued
            .iter()
            .all(|d| d.content.is_some() && d.sender_user == 2),
        "bodies and senders travel as they were"
    );
    assert_eq!(receipts_here(&kv), 2, "no receipt queued by the move");
    assert_eq!(
        requeued
            .iter()
            .map(|d| d.receipts_sent())
            .collect::<Vec<_>>(),
        vec![ReceiptState::Delivered, ReceiptState::Unspecified],
        "2 was delivered (to the companion): its DELIVERED went already"
    );

    tracing_phase("a delivery reaching the closed inbox later follows too");
    let outcome = apply_one(&mut kv, &mut state, vec![delivered(1, 2, 4)]);
    assert_eq!(outcome, vec![Applied::Done]);
    assert_eq!(traces_of_user_1(&kv), Vec::new());
    let queued = pending(&kv, SHARD, OTHER);
    assert_eq!(
        deliveries(&queued)
            .iter()
            .map(|d| (d.message_id[0], d.source_pos))
            .collect::<Vec<_>>(),
        vec![(2, 1), (3, 2), (4, 3)]
    );

    tracing_phase("the new shard stores them for user 7; its ack names user 1 in the receipts");
    let mut other = ShardState::empty(OTHER);
    apply_one(&mut kv, &mut other, user_with_primary(7, &[0xc7; 16]));
    let outcome = apply_one(&mut kv, &mut other, queued);
    assert!(
        outcome.iter().all(|applied| matches!(
            applied,
            Applied::Stored {
                duplicate: false,
                ..
            }
        )),
        "{outcome:?}"
    );
    let user_7 = UserId::new(7).expect("nonzero");
    let mut staged = crate::kv::Staged::new(&kv, std::collections::BTreeMap::new());
    let view = crate::projection::View::new(
        &mut staged,
        OTHER,
        courier_proto::LogIndex::new(1),
        Projection::Inbox,
    );
    let stored = crate::projection::inbox::entries_between(
        &view,
        user_7,
        courier_proto::InboxSeq::new(0),
        courier_proto::InboxSeq::new(10),
    )
    .expect("memory");
    assert_eq!(
        stored
            .iter()
            .map(|(_, e)| (e.message_id[0], e.source_shard, e.addressed_to))
            .collect::<Vec<_>>(),
        vec![
            (2, u32::from(SHARD.get()), 1),
            (3, u32::from(SHARD.get()), 1),
            (4, u32::from(SHARD.get()), 1),
        ]
    );
    apply_one(
        &mut kv,
        &mut other,
        vec![Kind::DeliveryAcked(events::DeliveryAcked {
            user: 7,
            device: 1,
            up_to_seq: 3,
            acked_at_ms: 120,
            trim_delivered: false,
            keep_recent: 0,
            trim_max: 0,
        })],
    );
    let receipts: Vec<(u8, u64, u64)> = pending(&kv, OTHER, SHARD)
        .iter()
        .filter_map(|kind| match kind {
            Kind::ReceiptRecorded(r) => Some((r.message_id[0], r.sender_user, r.recipient_user)),
            _ => None,
        })
        .collect();
    assert_eq!(
        receipts,
        vec![(3, 2, 1), (4, 2, 1)],
        "DELIVERED once per message: 2's came from the old inbox"
    );
}
