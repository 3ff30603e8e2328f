//! Registration records: a code is consumed once, wrong tries run out, the buckets refuse and
//! refill exactly, a withdrawn code is void, and a record leaves once nothing in it matters.

#![allow(clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use courier_proto::LogIndex;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, RateLimit};
use courier_proto::pb::store::{DeviceRecord, RegistrationRecord};

use super::projection_test::{SHARD, apply_one, tracing_phase};
use crate::kv::{MemKv, Staged};
use crate::projection::registration::{self, CodeOutcome};
use crate::projection::{Applied, Projection, View};
use crate::shard::ShardState;

const PHONE: [u8; 16] = [7; 16];
const HOUR_MS: u64 = 3_600_000;

fn limit(per_hour: u32, burst: u32) -> Option<RateLimit> {
    Some(RateLimit { per_hour, burst })
}

fn issue(code: u8, at_ms: u64) -> Kind {
    Kind::CodeIssued(events::CodeIssued {
        phone_hash: PHONE.to_vec(),
        code_hash: vec![code; 32],
        expires_at_ms: at_ms + 600_000,
        attempts: 3,
        limit: limit(10, 3),
        at_ms,
    })
}

fn attempt(code: u8, at_ms: u64) -> Kind {
    Kind::CodeAttempted(events::CodeAttempted {
        phone_hash: PHONE.to_vec(),
        code_hash: vec![code; 32],
        limit: limit(60, 20),
        at_ms,
    })
}

fn outcome(kv: &mut MemKv, state: &mut ShardState, kind: Kind) -> CodeOutcome {
    match apply_one(kv, state, vec![kind]).pop() {
        Some(Applied::Code(outcome)) => outcome,
        other => panic!("a code event answers a code outcome, got {other:?}"),
    }
}

fn stored(kv: &MemKv) -> Option<RegistrationRecord> {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Devices);
    registration::record(&view, &PHONE).expect("memory")
}

/// A `DeviceRegistered` of `user` (its id assigned at apply).
fn device_registered(user: u64, primary: bool, redeemed: bool, companions_max: u32) -> Kind {
    Kind::DeviceRegistered(events::DeviceRegistered {
        user,
        device: 0,
        token_hash: vec![1; 32],
        primary,
        at_ms: 1,
        redeemed_phone_hash: if redeemed { PHONE.to_vec() } else { Vec::new() },
        companions_max,
        approver_token_hash: Vec::new(),
        revokes_companions: false,
    })
}

/// `user`'s devices as the devices projection in `kv` holds them.
fn devices_of(kv: &MemKv, user: u64) -> Vec<(u32, DeviceRecord)> {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Devices);
    crate::projection::devices::devices_of(
        &view,
        courier_proto::UserId::new(user).expect("nonzero"),
    )
    .expect("memory")
}

fn index_entries(kv: &MemKv) -> usize {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Devices);
    registration::forgettable(&view, u64::MAX)
        .expect("memory")
        .len()
}

#[test]
fn a_code_is_consumed_once_and_wrong_tries_run_out() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    tracing_phase("no code yet");
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(1, 10)),
        CodeOutcome::NoCode
    );
    tracing_phase("code 1 issued; the right code is accepted once");
    assert_eq!(
        outcome(&mut kv, &mut state, issue(1, 20)),
        CodeOutcome::Issued
    );
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(1, 30)),
        CodeOutcome::Accepted
    );
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(1, 40)),
        CodeOutcome::NoCode
    );
    tracing_phase("code 2: three wrong tries void it, the right one comes too late");
    assert_eq!(
        outcome(&mut kv, &mut state, issue(2, 50)),
        CodeOutcome::Issued
    );
    for left in [2, 1, 0] {
        assert_eq!(
            outcome(&mut kv, &mut state, attempt(9, 60)),
            CodeOutcome::Wrong {
                attempts_left: left
            }
        );
    }
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(2, 70)),
        CodeOutcome::NoCode
    );
    tracing_phase("code 3 expires");
    assert_eq!(
        outcome(&mut kv, &mut state, issue(3, 100)),
        CodeOutcome::Issued
    );
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(3, 100 + 600_000)),
        CodeOutcome::NoCode,
        "at its expiry the code is void"
    );
    tracing_phase("a new code replaces the old one");
    assert_eq!(
        outcome(&mut kv, &mut state, issue(4, HOUR_MS)),
        CodeOutcome::Issued
    );
    assert_eq!(
        outcome(&mut kv, &mut state, issue(5, HOUR_MS)),
        CodeOutcome::Issued
    );
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(4, HOUR_MS + 1)),
        CodeOutcome::Wrong { attempts_left: 2 }
    );
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(5, HOUR_MS + 2)),
        CodeOutcome::Accepted
    );
}

#[test]
fn the_request_bucket_refuses_and_refills_exactly() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    for at in [0, 1, 2] {
        assert_eq!(
            outcome(&mut kv, &mut state, issue(1, at)),
            CodeOutcome::Issued
        );
    }
    let before = stored(&kv);
    assert_eq!(
        outcome(&mut kv, &mut state, issue(2, 3)),
        CodeOutcome::RateLimited {
            retry_after_ms: HOUR_MS / 10 - 3
        },
        "10 an hour: a token every 6 minutes, counted from the first take"
    );
    assert_eq!(stored(&kv), before, "a refusal changes nothing");
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(1, 4)),
        CodeOutcome::Accepted,
        "the refused issue did not replace code 1"
    );
    assert_eq!(
        outcome(&mut kv, &mut state, issue(2, HOUR_MS / 10 - 1)),
        CodeOutcome::RateLimited { retry_after_ms: 1 }
    );
    assert_eq!(
        outcome(&mut kv, &mut state, issue(2, HOUR_MS / 10)),
        CodeOutcome::Issued
    );
}

#[test]
fn a_withdrawn_code_is_void_and_only_its_own() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let withdraw = |code: u8| {
        Kind::CodeWithdrawn(events::CodeWithdrawn {
            phone_hash: PHONE.to_vec(),
            code_hash: vec![code; 32],
            at_ms: 5,
        })
    };
    assert_eq!(
        outcome(&mut kv, &mut state, issue(1, 0)),
        CodeOutcome::Issued
    );
    assert_eq!(
        outcome(&mut kv, &mut state, withdraw(2)),
        CodeOutcome::Withdrawn(false),
        "another code's withdrawal leaves code 1"
    );
    assert_eq!(
        outcome(&mut kv, &mut state, withdraw(1)),
        CodeOutcome::Withdrawn(true)
    );
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(1, 6)),
        CodeOutcome::NoCode
    );
}

#[test]
fn a_record_leaves_once_nothing_in_it_matters() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let forget =
        |before_ms| Kind::RegistrationsForgotten(events::RegistrationsForgotten { before_ms });
    assert_eq!(
        outcome(&mut kv, &mut state, issue(1, 0)),
        CodeOutcome::Issued
    );
    let record = stored(&kv).expect("a record");
    assert_eq!(
        record.forget_at_ms, 600_000,
        "the live code (10 minutes) outlasts the request bucket's refill (6 minutes)"
    );
    assert_eq!(index_entries(&kv), 1, "one time-index entry per record");
    assert_eq!(
        outcome(&mut kv, &mut state, attempt(1, 10)),
        CodeOutcome::Accepted
    );
    let record = stored(&kv).expect("a record");
    assert_eq!(
        record.forget_at_ms,
        HOUR_MS / 10,
        "without a live code the request bucket's refill decides (the attempt bucket, 60 an \
         hour, is full again after one minute)"
    );
    assert_eq!(index_entries(&kv), 1, "the index entry moved, not copied");
    assert_eq!(
        outcome(&mut kv, &mut state, forget(HOUR_MS / 10)),
        CodeOutcome::Forgotten(0),
        "not before its time"
    );
    assert!(stored(&kv).is_some());
    assert_eq!(
        outcome(&mut kv, &mut state, forget(HOUR_MS / 10 + 1)),
        CodeOutcome::Forgotten(1)
    );
    assert_eq!(stored(&kv), None);
    assert_eq!(index_entries(&kv), 0);
    assert_eq!(
        outcome(&mut kv, &mut state, issue(2, HOUR_MS)),
        CodeOutcome::Issued,
        "a forgotten number starts with full buckets"
    );
}

/// A proposer whose clock is behind gains nothing: its event counts as happening at the latest
/// time the record saw, so the next event from a right clock does not refill the bucket twice.
#[test]
fn a_clock_behind_refills_nothing() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let t = 10 * HOUR_MS;
    assert_eq!(
        outcome(&mut kv, &mut state, issue(1, t)),
        CodeOutcome::Issued
    );
    assert_eq!(
        outcome(&mut kv, &mut state, issue(2, t - HOUR_MS / 6)),
        CodeOutcome::Issued,
        "a node 10 minutes behind"
    );
    assert_eq!(
        outcome(&mut kv, &mut state, issue(3, t)),
        CodeOutcome::Issued
    );
    assert!(
        matches!(
            outcome(&mut kv, &mut state, issue(4, t)),
            CodeOutcome::RateLimited { .. }
        ),
        "three tokens of a burst of 3 were taken, whatever the clocks said"
    );
    assert_eq!(stored(&kv).expect("a record").seen_at_ms, t);
}

/// A registration that depends on its code (`redeemed_phone_hash`) applies only in the entry
/// whose attempt used the code: a wrong code changes nothing but the attempt count (the
/// companion stays, no device is added), and no later entry can ride on an earlier redemption.
#[test]
fn registration_events_apply_only_with_their_code() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let user = 9_u64;
    let registered = |primary: bool, redeemed: bool| device_registered(user, primary, redeemed, 0);
    let user_registered = Kind::UserRegistered(events::UserRegistered {
        user,
        phone_hash: PHONE.to_vec(),
        at_ms: 1,
        redeemed_phone_hash: PHONE.to_vec(),
    });
    let revoke_companion = Kind::DeviceRevoked(events::DeviceRevoked {
        user,
        device: 2,
        at_ms: 2,
        redeemed_phone_hash: PHONE.to_vec(),
    });
    let devices = |kv: &MemKv| -> Vec<(u32, bool)> {
        devices_of(kv, user)
            .into_iter()
            .map(|(id, record)| (id, record.revoked))
            .collect()
    };
    tracing_phase("the first registration, with its code");
    apply_one(&mut kv, &mut state, vec![issue(1, 10)]);
    let outcomes = apply_one(
        &mut kv,
        &mut state,
        vec![
            attempt(1, 20),
            user_registered.clone(),
            registered(true, true),
        ],
    );
    assert_eq!(outcomes[0], Applied::Code(CodeOutcome::Accepted));
    assert!(matches!(
        outcomes[2],
        Applied::DeviceRegistered { device: 1, .. }
    ));
    apply_one(&mut kv, &mut state, vec![registered(false, false)]);
    assert_eq!(
        devices(&kv),
        vec![(1, false), (2, false)],
        "a primary and a companion"
    );

    tracing_phase("a wrong code: the revocation and the new primary are refused");
    apply_one(&mut kv, &mut state, vec![issue(2, 30)]);
    let outcomes = apply_one(
        &mut kv,
        &mut state,
        vec![
            attempt(9, 40),
            revoke_companion.clone(),
            registered(true, true),
        ],
    );
    assert_eq!(
        outcomes[0],
        Applied::Code(CodeOutcome::Wrong { attempts_left: 2 })
    );
    for refused in &outcomes[1..] {
        assert!(
            matches!(refused, Applied::Rejected { code, .. } if *code == registration::NOT_REDEEMED),
            "{refused:?}"
        );
    }
    assert_eq!(
        devices(&kv),
        vec![(1, false), (2, false)],
        "nothing changed"
    );

    tracing_phase("no attempt in the entry: refused, even after an earlier redemption");
    let outcomes = apply_one(&mut kv, &mut state, vec![revoke_companion.clone()]);
    assert!(matches!(outcomes[0], Applied::Rejected { .. }));

    tracing_phase("the right code: the companion and the old primary go, a new primary comes");
    let outcomes = apply_one(
        &mut kv,
        &mut state,
        vec![attempt(2, 50), revoke_companion, registered(true, true)],
    );
    assert_eq!(outcomes[0], Applied::Code(CodeOutcome::Accepted));
    assert_eq!(devices(&kv), vec![(1, true), (2, true), (3, false)]);
}

/// A companion's `DeviceRegistered` carrying `companions_max` applies only while the user has
/// fewer linked, unrevoked companions: two approvals that passed the node's check at once (on
/// two nodes) cannot both link the last slot. A revoked companion frees its slot; a primary and
/// an entry without the field (0) are not counted against it.
#[test]
fn a_companion_past_the_limit_is_refused_at_apply() {
    use crate::projection::devices::TOO_MANY_COMPANIONS;

    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let user = 11_u64;
    let registered = |primary: bool, companions_max: u32| {
        device_registered(user, primary, false, companions_max)
    };
    let companions = |kv: &MemKv| -> usize {
        devices_of(kv, user)
            .iter()
            .filter(|(_, record)| !record.primary && !record.revoked)
            .count()
    };
    apply_one(&mut kv, &mut state, with_primary(user, 2));
    // Two approvals in one entry, as two racing commits would land: the second is past 2.
    let outcomes = apply_one(
        &mut kv,
        &mut state,
        vec![
            registered(false, 2),
            registered(false, 2),
            registered(false, 2),
        ],
    );
    assert!(matches!(
        outcomes[0],
        Applied::DeviceRegistered { device: 2, .. }
    ));
    assert!(matches!(
        outcomes[1],
        Applied::DeviceRegistered { device: 3, .. }
    ));
    assert!(
        matches!(&outcomes[2], Applied::Rejected { code, .. } if *code == TOO_MANY_COMPANIONS),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(companions(&kv), 2);
    let outcomes = apply_one(&mut kv, &mut state, vec![registered(false, 0)]);
    assert!(
        matches!(outcomes[0], Applied::DeviceRegistered { device: 4, .. }),
        "an entry written before the field applies as before: {:?}",
        outcomes[0]
    );
    apply_one(
        &mut kv,
        &mut state,
        vec![
            Kind::DeviceRevoked(events::DeviceRevoked {
                user,
                device: 2,
                at_ms: 2,
                redeemed_phone_hash: Vec::new(),
            }),
            Kind::DeviceRevoked(events::DeviceRevoked {
                user,
                device: 3,
                at_ms: 2,
                redeemed_phone_hash: Vec::new(),
            }),
        ],
    );
    let outcomes = apply_one(&mut kv, &mut state, vec![registered(false, 2)]);
    assert!(
        matches!(outcomes[0], Applied::DeviceRegistered { device: 5, .. }),
        "revoked companions free their slots: {:?}",
        outcomes[0]
    );
    assert_eq!(companions(&kv), 2);
}

/// `user` registering with its primary device, under a `companions_max` of `companions_max`.
fn with_primary(user: u64, companions_max: u32) -> Vec<Kind> {
    vec![
        Kind::UserRegistered(events::UserRegistered {
            user,
            phone_hash: PHONE.to_vec(),
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
        }),
        device_registered(user, true, false, companions_max),
    ]
}

/// In an entry of event format 1 `companions_max` is ignored, as the builds before it ignored
/// it: a replica of either build links the same companions.
#[test]
fn a_format_1_registration_ignores_companions_max() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let user = 12_u64;
    apply_one(&mut kv, &mut state, with_primary(user, 1));
    let outcomes = super::projection_test::apply_one_in(
        1,
        &mut kv,
        &mut state,
        vec![
            device_registered(user, false, false, 1),
            device_registered(user, false, false, 1),
        ],
    );
    assert!(
        matches!(outcomes[1], Applied::DeviceRegistered { device: 3, .. }),
        "format 1 has no limit at apply: {:?}",
        outcomes[1]
    );
}

/// Format 3: a companion applies only while the primary that approved it (`approver_token_hash`)
/// is the user's active primary, and a primary's registration with `revokes_companions` revokes
/// every device of the user. So a primary replaced by a new registration of the number cannot
/// link a companion to the new owner's account by racing that registration, whichever commits
/// first. In a format-2 entry both fields are ignored, as the builds before them ignored them.
#[test]
fn a_new_owner_of_a_number_inherits_no_companion_in_either_order() {
    use super::projection_test::apply_one_in;
    use crate::projection::devices::APPROVER_REVOKED;

    let user = 13_u64;
    let primary = |token: u8| {
        Kind::DeviceRegistered(events::DeviceRegistered {
            user,
            device: 0,
            token_hash: vec![token; 32],
            primary: true,
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
            companions_max: 0,
            approver_token_hash: Vec::new(),
            revokes_companions: true,
        })
    };
    let companion = |approver: u8| {
        Kind::DeviceRegistered(events::DeviceRegistered {
            user,
            device: 0,
            token_hash: vec![9; 32],
            primary: false,
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
            companions_max: 4,
            approver_token_hash: vec![approver; 32],
            revokes_companions: false,
        })
    };
    let user_registered = Kind::UserRegistered(events::UserRegistered {
        user,
        phone_hash: PHONE.to_vec(),
        at_ms: 1,
        redeemed_phone_hash: Vec::new(),
    });
    let active = |kv: &MemKv| -> Vec<(u32, bool)> {
        devices_of(kv, user)
            .into_iter()
            .filter(|(_, record)| !record.revoked)
            .map(|(id, record)| (id, record.primary))
            .collect()
    };
    let registered_as = |outcome: &Applied| match outcome {
        Applied::DeviceRegistered { device, .. } => Some(*device),
        _ => None,
    };

    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(
        &mut kv,
        &mut state,
        vec![user_registered.clone(), primary(1)],
    );
    let outcomes = apply_one(&mut kv, &mut state, vec![companion(1)]);
    assert_eq!(
        registered_as(&outcomes[0]),
        Some(2),
        "its primary approved it"
    );
    tracing_phase("the companion commits first: the new owner's registration revokes it too");
    apply_one(&mut kv, &mut state, vec![primary(2)]);
    assert_eq!(active(&kv), vec![(3, true)]);
    tracing_phase("the old primary's approval commits after it: refused, nothing changes");
    let outcomes = apply_one(&mut kv, &mut state, vec![companion(1)]);
    assert!(
        matches!(&outcomes[0], Applied::Rejected { code, .. } if *code == APPROVER_REVOKED),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(active(&kv), vec![(3, true)]);
    let outcomes = apply_one(&mut kv, &mut state, vec![companion(2)]);
    assert_eq!(
        registered_as(&outcomes[0]),
        Some(4),
        "the new primary links one"
    );

    tracing_phase("in format-2 entries both fields are ignored");
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one_in(2, &mut kv, &mut state, vec![user_registered, primary(1)]);
    apply_one_in(2, &mut kv, &mut state, vec![companion(1)]);
    apply_one_in(2, &mut kv, &mut state, vec![primary(2)]);
    assert_eq!(
        active(&kv),
        vec![(2, false), (3, true)],
        "only the primary revoked"
    );
    let outcomes = apply_one_in(2, &mut kv, &mut state, vec![companion(1)]);
    assert_eq!(registered_as(&outcomes[0]), Some(4), "no approver check");
}
