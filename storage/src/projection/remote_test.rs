//! Remote reads (`crate::remote`): a read function run here over a replica's answers gives what
//! it gives on the replica, even when the replica changes between rounds; a read that keeps
//! finding new reads stops.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use courier_proto::{LogIndex, ShardId, UserId};

use super::projection_test::{SHARD, apply_one, device_of, user_with_primary};
use super::view::frame;
use crate::cf::{Cf, Projection};
use crate::error::Result;
use crate::keys;
use crate::kv::{MemKv, ReadKv};
use crate::projection::{View, devices};
use crate::reader::Reader;
use crate::remote::{READ_ROUNDS_MAX, ReadAnswer, ReadOp, RemoteRead, RemoteReadError, answer};
use crate::shard::ShardState;

const PHONE: [u8; 16] = [0xa1; 16];

/// A read with a dependent step: the user behind a number, then that user's devices.
fn devices_by_phone(view: &View<'_, '_>) -> Result<Option<(UserId, Vec<u32>)>> {
    let Some(user) = devices::user_by_phone(view, &PHONE)? else {
        return Ok(None);
    };
    let devices = devices::devices_of(view, user)?;
    Ok(Some((
        user,
        devices.into_iter().map(|(id, _)| id).collect(),
    )))
}

/// Runs `f` remotely against `replica`, calling `between` before each call to the replica;
/// returns the result and the number of calls made.
fn run_remote<R>(
    replica: &mut MemKv,
    f: impl Fn(&View<'_, '_>) -> Result<R>,
    mut between: impl FnMut(&mut MemKv, usize),
) -> (std::result::Result<R, RemoteReadError>, usize) {
    let mut read = RemoteRead::new();
    let mut answers = Vec::new();
    let mut calls = 0;
    loop {
        match read.attempt(SHARD, answers, &f) {
            Ok(Some(result)) => return (Ok(result.expect("memory never faults")), calls),
            Ok(None) => {}
            Err(error) => return (Err(error), calls),
        }
        between(replica, calls);
        calls += 1;
        answers = answer(&*replica, read.ops()).expect("memory never faults");
    }
}

fn local<R>(kv: &MemKv, f: impl Fn(&View<'_, '_>) -> Result<R>) -> R {
    f(&Reader::new(kv, SHARD).view(Projection::Inbox)).expect("memory never faults")
}

#[test]
fn a_remote_read_gives_what_the_replica_gives_in_one_round_per_dependent_step() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(
        &mut kv,
        &mut state,
        [user_with_primary(7, &PHONE), vec![device_of(7, false)]].concat(),
    );
    let expected = local(&kv, devices_by_phone);
    assert_eq!(
        expected
            .as_ref()
            .map(|(user, devices)| (user.get(), devices.len())),
        Some((7, 2)),
        "the shard holds user 7 with two devices"
    );
    let (got, calls) = run_remote(&mut kv, devices_by_phone, |_, _| {});
    assert_eq!(got, Ok(expected), "the remote read equals the local one");
    // The number, then the user's devices (found only once the number is answered).
    assert_eq!(calls, 2, "one call per dependent step");

    let (absent, calls) = run_remote(&mut MemKv::default(), devices_by_phone, |_, _| {});
    assert_eq!(absent, Ok(None), "an empty replica answers absent");
    assert_eq!(calls, 1, "an absent number ends the chain after one call");
}

#[test]
fn a_replica_that_changes_between_rounds_gives_its_latest_state_never_a_mix() {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, user_with_primary(7, &PHONE));
    let mut final_state = None;
    let (got, calls) = run_remote(&mut kv, devices_by_phone, |replica, call| {
        // After the first call answered the number, user 7 links a companion: the second call
        // sees two devices. Every later state is recorded as the one to compare with.
        if call == 1 {
            apply_one(replica, &mut state, vec![device_of(7, false)]);
        }
        final_state = Some(replica.clone());
    });
    let final_state = final_state.expect("at least one call");
    assert_eq!(
        got,
        Ok(local(&final_state, devices_by_phone)),
        "the result is the replica's state at the last call"
    );
    assert_eq!(
        got.expect("read").map(|(_, devices)| devices.len()),
        Some(2),
        "the companion linked between the rounds is seen"
    );
    assert_eq!(calls, 2, "two dependent steps, two calls");

    // Between the rounds the number comes to belong to another user (user 7 deleted, user 8
    // registered it): the answer is user 8's, not user 7's devices under user 8's number.
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    apply_one(&mut kv, &mut state, user_with_primary(7, &PHONE));
    apply_one(&mut kv, &mut state, vec![device_of(7, false)]);
    let (got, calls) = run_remote(&mut kv, devices_by_phone, |replica, call| {
        if call == 1 {
            let mut moved = MemKv::default();
            apply_one(
                &mut moved,
                &mut ShardState::empty(SHARD),
                user_with_primary(8, &PHONE),
            );
            *replica = moved;
        }
    });
    assert_eq!(
        got.expect("read")
            .map(|(user, devices)| (user.get(), devices)),
        Some((8, vec![1])),
        "the new owner of the number and its one device"
    );
    assert_eq!(calls, 3, "the new owner's devices took one more call");
}

/// A replica whose devices family holds a chain: the key of user `i` holds `i + 1`.
fn chain_replica() -> MemKv {
    let mut kv = MemKv::default();
    kv.write((1..=2 * READ_ROUNDS_MAX as u64).map(|i| {
        let key = keys::user_record(SHARD, UserId::new(i).expect("nonzero"));
        let value = frame(LogIndex::new(1), &(i + 1).to_be_bytes());
        (Cf::Projection(Projection::Devices), key, Some(value))
    }));
    kv
}

/// Follows the chain from user 1 for `links` reads, each key named by the previous answer.
fn follow(links: usize) -> impl Fn(&View<'_, '_>) -> Result<u64> {
    move |view| {
        let mut next = 1_u64;
        for _ in 0..links {
            let key = keys::user_record(SHARD, UserId::new(next).expect("nonzero"));
            next = view.get_u64(Projection::Devices, &key)?.unwrap_or(1);
        }
        Ok(next)
    }
}

#[test]
fn a_chain_of_dependent_reads_takes_one_call_per_link_up_to_the_limit() {
    let mut kv = chain_replica();
    let (got, calls) = run_remote(&mut kv, follow(READ_ROUNDS_MAX), |_, _| {});
    assert_eq!(
        got,
        Ok(READ_ROUNDS_MAX as u64 + 1),
        "the chain's end, as read locally"
    );
    assert_eq!(
        local(&kv, follow(READ_ROUNDS_MAX)),
        READ_ROUNDS_MAX as u64 + 1,
        "local"
    );
    assert_eq!(calls, READ_ROUNDS_MAX, "one call per link");

    let (got, calls) = run_remote(&mut kv, follow(READ_ROUNDS_MAX + 1), |_, _| {});
    assert_eq!(
        got,
        Err(RemoteReadError::TooDeep),
        "one link too many: the read gives up"
    );
    assert_eq!(calls, READ_ROUNDS_MAX, "after the calls allowed");
}

#[test]
fn answers_that_do_not_match_the_reads_are_refused() {
    let mut read = RemoteRead::new();
    assert!(
        read.attempt(SHARD, Vec::new(), &devices_by_phone)
            .expect("first run")
            .is_none(),
        "the first run only finds reads"
    );
    assert_eq!(
        read.attempt(SHARD, Vec::new(), &devices_by_phone).err(),
        Some(RemoteReadError::Mismatch { asked: 1, got: 0 }),
        "no answer to the one read asked"
    );
    assert_eq!(read.ops().len(), 1, "the number's lookup");
    let answers = vec![ReadAnswer::Value(None)];
    let done = read
        .attempt(SHARD, answers, &devices_by_phone)
        .expect("answers match")
        .expect("nothing left to read")
        .expect("memory never faults");
    assert_eq!(done, None, "answered: the number is not registered");
}

#[test]
fn a_replica_answers_only_reads_inside_the_shard() {
    let (start, end) = keys::shard_range(SHARD);
    let get = |key: Vec<u8>| ReadOp::Get {
        cf: Cf::Projection(Projection::Devices),
        key,
    };
    let scan = |from: Vec<u8>, to: Vec<u8>| ReadOp::Scan {
        cf: Cf::Projection(Projection::Devices),
        from,
        to,
        limit: 10,
    };
    assert!(get(start.clone()).within(SHARD), "the shard's first key");
    assert!(
        !get(end.clone()).within(SHARD),
        "the next shard's first key"
    );
    assert!(
        scan(start.clone(), end.clone()).within(SHARD),
        "the whole shard"
    );
    assert!(
        !scan(start.clone(), keys::shard_range(ShardId::new(3)).1).within(SHARD),
        "a scan into later shards"
    );
    assert!(!scan(end, start).within(SHARD), "a reversed range");
    // `answer` itself reads whatever it is given; the node checks `within` first.
    assert_eq!(
        answer(&MemKv::default(), &[get(vec![0, 1, 2])]).expect("memory"),
        vec![ReadAnswer::Value(None)],
        "one answer per read"
    );
    let _: &dyn ReadKv = &MemKv::default();
}
