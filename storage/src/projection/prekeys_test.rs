//! The key directory: uploads only for active devices and within the stock limit, each one-time
//! prekey handed out once (lowest id first), a revoked or replaced device's keys leave with it.

#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::limits::PREKEYS_STOCK_MAX;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, PreKey};
use courier_proto::pb::store::KeyBundle;
use courier_proto::{DeviceId, LogIndex, UserId};
use prost::Message as _;

use super::projection_test::{SHARD, apply_one, tracing_phase};
use crate::kv::{MemKv, Staged};
use crate::projection::{Applied, Projection, View, prekeys};
use crate::shard::ShardState;

const USER: u64 = 5;

fn register(kv: &mut MemKv, state: &mut ShardState, primary: bool) {
    let mut kinds = Vec::new();
    if primary {
        kinds.push(Kind::UserRegistered(events::UserRegistered {
            user: USER,
            phone_hash: vec![5; 16],
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
        }));
    }
    kinds.push(Kind::DeviceRegistered(events::DeviceRegistered {
        user: USER,
        device: 0,
        token_hash: vec![1; 32],
        primary,
        at_ms: 1,
        redeemed_phone_hash: Vec::new(),
        companions_max: 0,
        approver_token_hash: Vec::new(),
        revokes_companions: false,
    }));
    apply_one(kv, state, kinds);
}

fn key(id: u32) -> PreKey {
    PreKey {
        key_id: id,
        public_key: vec![id as u8; 33],
        signature: Vec::new(),
    }
}

fn upload(device: u32, ids: std::ops::Range<u32>) -> Kind {
    Kind::KeysUploaded(events::KeysUploaded {
        user: USER,
        device,
        identity_key: vec![device as u8; 33],
        signed_prekey: Some(PreKey {
            key_id: 1,
            public_key: vec![9; 33],
            signature: vec![8; 64],
        }),
        one_time_prekeys: ids.map(key).collect(),
        at_ms: 2,
    })
}

fn claim() -> Kind {
    Kind::PrekeysClaimed(events::PreKeysClaimed {
        user: USER,
        by_user: 9,
        at_ms: 3,
    })
}

fn one(kv: &mut MemKv, state: &mut ShardState, kind: Kind) -> Applied {
    apply_one(kv, state, vec![kind]).pop().expect("one outcome")
}

/// (device, one-time key id handed out, left) per device of a claim.
fn claimed(kv: &mut MemKv, state: &mut ShardState) -> Vec<(u32, Option<u32>, u32)> {
    let Applied::Bundle(bytes) = one(kv, state, claim()) else {
        panic!("a claim answers a bundle");
    };
    KeyBundle::decode(bytes.as_slice())
        .expect("a bundle")
        .devices
        .into_iter()
        .map(|d| {
            (
                d.device,
                d.one_time_prekey.map(|k| k.key_id),
                d.one_time_prekeys_left,
            )
        })
        .collect()
}

/// The one-time prekey records a device holds.
fn records(kv: &MemKv, device: u32) -> usize {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Devices);
    let user = UserId::new(USER).expect("nonzero");
    let device = DeviceId::new(device).expect("nonzero");
    let prefix = crate::keys::one_time_prekey_prefix(SHARD, user, device);
    let end = crate::keys::prefix_end(&prefix).expect("an end");
    view.scan::<PreKey>(Projection::Devices, &prefix, &end, usize::MAX)
        .expect("memory")
        .len()
}

fn stock(kv: &MemKv, device: u32) -> Option<u32> {
    let mut staged = Staged::new(kv, BTreeMap::new());
    let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Devices);
    let user = UserId::new(USER).expect("nonzero");
    let device = DeviceId::new(device).expect("nonzero");
    prekeys::device_keys(&view, user, device)
        .expect("memory")
        .map(|k| k.one_time_prekeys)
}

fn refused_with(applied: &Applied) -> &str {
    match applied {
        Applied::Rejected { code, .. } => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn each_one_time_prekey_is_handed_out_once() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    tracing_phase("an upload for a device that does not exist is refused");
    let refused = one(&mut kv, &mut state, upload(1, 0..3));
    assert_eq!(refused_with(&refused), prekeys::UNKNOWN_DEVICE);
    register(&mut kv, &mut state, true);
    register(&mut kv, &mut state, false);
    assert_eq!(
        one(&mut kv, &mut state, upload(1, 10..13)),
        Applied::KeyStock(3)
    );
    assert_eq!(
        one(&mut kv, &mut state, upload(2, 20..22)),
        Applied::KeyStock(2)
    );
    tracing_phase("claims take the lowest id of each device, once");
    assert_eq!(
        claimed(&mut kv, &mut state),
        vec![(1, Some(10), 2), (2, Some(20), 1)]
    );
    assert_eq!(
        claimed(&mut kv, &mut state),
        vec![(1, Some(11), 1), (2, Some(21), 0)]
    );
    assert_eq!(
        claimed(&mut kv, &mut state),
        vec![(1, Some(12), 0), (2, None, 0)],
        "a device whose stock ran out still gives its identity and signed prekey"
    );
    assert_eq!((stock(&kv, 1), stock(&kv, 2)), (Some(0), Some(0)));
    tracing_phase("a re-upload of ids already held replaces them, counted once");
    assert_eq!(
        one(&mut kv, &mut state, upload(1, 0..2)),
        Applied::KeyStock(2)
    );
    assert_eq!(
        one(&mut kv, &mut state, upload(1, 1..3)),
        Applied::KeyStock(3)
    );
    assert_eq!(
        claimed(&mut kv, &mut state),
        vec![(1, Some(0), 2), (2, None, 0)]
    );
    assert_eq!(records(&kv, 1), 2, "the count is the records");
    tracing_phase("a new identity key: the prekeys made under the old one leave");
    let Kind::KeysUploaded(mut new_identity) = upload(1, 50..51) else {
        unreachable!("an upload");
    };
    new_identity.identity_key = vec![77; 33];
    assert_eq!(
        one(&mut kv, &mut state, Kind::KeysUploaded(new_identity)),
        Applied::KeyStock(1)
    );
    assert_eq!(records(&kv, 1), 1);
    assert_eq!(
        claimed(&mut kv, &mut state),
        vec![(1, Some(50), 0), (2, None, 0)]
    );
}

#[test]
fn a_stock_never_passes_its_limit() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    register(&mut kv, &mut state, true);
    let per_upload = 100;
    let mut held = 0;
    while held + per_upload <= PREKEYS_STOCK_MAX {
        assert_eq!(
            one(&mut kv, &mut state, upload(1, held..held + per_upload)),
            Applied::KeyStock(held + per_upload)
        );
        held += per_upload;
    }
    let refused = one(&mut kv, &mut state, upload(1, held..held + 1));
    assert_eq!(refused_with(&refused), prekeys::STOCK_FULL);
    assert_eq!(
        stock(&kv, 1),
        Some(PREKEYS_STOCK_MAX),
        "a refusal changes nothing"
    );
}

#[test]
fn a_revoked_or_replaced_device_loses_its_keys() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    register(&mut kv, &mut state, true);
    register(&mut kv, &mut state, false);
    one(&mut kv, &mut state, upload(1, 0..3));
    one(&mut kv, &mut state, upload(2, 0..3));
    tracing_phase("device 2 is revoked");
    apply_one(
        &mut kv,
        &mut state,
        vec![Kind::DeviceRevoked(events::DeviceRevoked {
            user: USER,
            device: 2,
            at_ms: 4,
            redeemed_phone_hash: Vec::new(),
        })],
    );
    assert_eq!(stock(&kv, 2), None);
    assert_eq!(records(&kv, 2), 0, "its one-time prekeys left too");
    assert_eq!(claimed(&mut kv, &mut state), vec![(1, Some(0), 2)]);
    let refused = one(&mut kv, &mut state, upload(2, 5..6));
    assert_eq!(refused_with(&refused), prekeys::UNKNOWN_DEVICE);
    tracing_phase("a new primary (device 3) replaces device 1 and its keys");
    register(&mut kv, &mut state, true);
    assert_eq!(stock(&kv, 1), None);
    assert_eq!(
        claimed(&mut kv, &mut state),
        Vec::new(),
        "no device published keys"
    );
    assert_eq!(
        one(&mut kv, &mut state, upload(3, 0..1)),
        Applied::KeyStock(1)
    );
    assert_eq!(claimed(&mut kv, &mut state), vec![(3, Some(0), 0)]);
}

/// Over generated histories (codes and keys among every other event): every registration record
/// has exactly one time-index entry, at its `forget_at_ms`, and no entry points nowhere; every
/// device's stock count equals its one-time prekey records, and no prekey outlives its device's
/// keys.
#[test]
fn generated_histories_keep_the_directory_consistent() {
    use courier_proto::pb::store::{DeviceKeys, RegistrationRecord};

    use crate::keys::tag;
    use crate::projection::projection_test::fold;
    use crate::testkit::{EventGen, Rng};

    let mut exercised = 0;
    for seed in 0..8 {
        let payloads = EventGen::new(SHARD, seed).payloads(400, 4);
        let (kv, _) = fold(&payloads, &mut Rng::new(seed), 8);
        let mut staged = Staged::new(&kv, BTreeMap::new());
        let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Devices);
        // Every key of one record kind: shard, then the tag.
        let family = |t: u8| {
            let shard = SHARD.get().to_be_bytes();
            ([&shard[..], &[t]].concat(), [&shard[..], &[t + 1]].concat())
        };
        let (from, to) = family(tag::QUATERNARY);
        let records = view
            .scan::<RegistrationRecord>(Projection::Devices, &from, &to, usize::MAX)
            .expect("memory");
        let (from, to) = family(tag::QUINARY);
        let index = view
            .scan::<()>(Projection::Devices, &from, &to, usize::MAX)
            .expect("memory");
        assert_eq!(
            records.len(),
            index.len(),
            "seed {seed}: one index entry per record"
        );
        for (key, record) in &records {
            let phone = &key[3..];
            let entry = crate::keys::registration_by_time(SHARD, record.forget_at_ms, phone);
            assert!(
                index.iter().any(|(k, ())| *k == entry),
                "seed {seed}: a record's index entry is at its forget time"
            );
        }
        let (from, to) = family(tag::SENARY);
        let published = view
            .scan::<DeviceKeys>(Projection::Devices, &from, &to, usize::MAX)
            .expect("memory");
        let (from, to) = family(tag::SEPTENARY);
        let prekeys = view
            .scan::<PreKey>(Projection::Devices, &from, &to, usize::MAX)
            .expect("memory");
        let held: u32 = published.iter().map(|(_, k)| k.one_time_prekeys).sum();
        assert_eq!(
            held as usize,
            prekeys.len(),
            "seed {seed}: counts equal records"
        );
        for (key, _) in &prekeys {
            // shard | 7 | user | device | key id  →  shard | 6 | user | device
            let device_keys = [&key[..2], &[tag::SENARY], &key[3..15]].concat();
            assert!(
                published.iter().any(|(k, _)| *k == device_keys),
                "seed {seed}: a one-time prekey belongs to a device with keys"
            );
        }
        if !records.is_empty() && !published.is_empty() {
            exercised += 1;
        }
    }
    // A history can end with its users' keys deleted (AccountDeleted), so the exercise is
    // counted over the seeds: most of them must end holding both.
    assert!(exercised >= 5, "{exercised} of 8 histories exercised both");
}
