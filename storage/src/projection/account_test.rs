//! Account deletion: `AccountDeleted` leaves no record of the user and no hash of the number in
//! any projection, closes the inbox to later deliveries, keeps what the user already sent on its
//! way, and the number registers again into an empty account.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self};
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

fn ack(device: u32, up_to_seq: u64) -> Kind {
    Kind::DeliveryAcked(events::DeliveryAcked {
        user: 1,
        device,
        up_to_seq,
        acked_at_ms: 90,
        trim_delivered: true,
        keep_recent: 0,
    })
}

/// A deletion of `user`'s account asked by `device` with `token_hash`.
fn deleted_by(user: u64, device: u32, token_hash: [u8; 32]) -> Kind {
    Kind::AccountDeleted(events::AccountDeleted {
        user,
        at_ms: 100,
        device,
        token_hash: token_hash.to_vec(),
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
    apply_one(
        &mut kv,
        &mut state,
        [
            user_with_primary(1, &PHONE),
            vec![device_of(1, false)],
            user_with_primary(2, &[0xb2; 16]),
        ]
        .concat(),
    );
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
            ack(1, 2),
            ack(2, 2),
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
