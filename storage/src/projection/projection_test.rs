//! The fold law, and the helpers the per-area projection tests share (`inbox_test.rs`,
//! `outbox_test.rs`, `groups_test.rs`).
//!
//! Goal: a projection is a deterministic function of the log. Method: generate valid random
//! histories (`testkit::EventGen`), apply them one entry per batch and in random batch sizes,
//! and compare data and digests; re-hash the data to check the maintained digests; feed invalid
//! sequences and expect the invariant's panic message.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, EntryPayload, Event};
use courier_proto::{ConversationId, FORMAT_VERSION, LogIndex, ShardId, UserId};
use proptest::prelude::*;

use crate::kv::{MemKv, Staged};
use crate::projection::{Applied, Projection, View};
use crate::rebuild::digest_of;
use crate::shard::{Committed, ShardState};
use crate::testkit::{Adversary, EventGen, Rng};

pub(super) const SHARD: ShardId = ShardId::new(1);

/// Applies `payloads` in batches whose sizes come from `sizes`, starting at index 1.
pub(super) fn fold(
    payloads: &[EntryPayload],
    sizes: &mut Rng,
    batch_max: u64,
) -> (MemKv, ShardState) {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let mut rest = payloads;
    while !rest.is_empty() {
        let n = usize::try_from(1 + sizes.below(batch_max))
            .expect("small")
            .min(rest.len());
        let (now, later) = rest.split_at(n);
        let entries = committed(state.applied, now);
        let batch = state
            .apply_batch(&kv, &entries, Vec::new())
            .expect("memory never faults");
        kv.write(batch.changes);
        state = batch.next;
        rest = later;
    }
    (kv, state)
}

/// `payloads` as committed entries after `applied`.
fn committed(applied: LogIndex, payloads: &[EntryPayload]) -> Vec<Committed<'_>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| Committed {
            index: LogIndex::new(applied.get() + 1 + i as u64),
            payload: Some(payload),
        })
        .collect()
}

pub(super) fn apply_one(kv: &mut MemKv, state: &mut ShardState, kinds: Vec<Kind>) -> Vec<Applied> {
    apply_one_in(FORMAT_VERSION, kv, state, kinds)
}

/// [`apply_one`] in an entry of event format `format`.
pub(super) fn apply_one_in(
    format: u32,
    kv: &mut MemKv,
    state: &mut ShardState,
    kinds: Vec<Kind>,
) -> Vec<Applied> {
    let payload = EntryPayload {
        format_version: format,
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

    /// No committed event stops a replica: arbitrary and adversarial events (zero and unknown
    /// ids, acks past the tail, reads of other conversations, receipts going backwards,
    /// forwarded gaps, …), alone or mixed into a valid history, are applied or refused the same
    /// way in any batching, and the maintained digests equal the data re-hashed.
    #[test]
    fn adversarial_events_never_stop_a_replica(seed in any::<u64>(), entries in 1_usize..80, batch_max in 1_u64..20, mixed in any::<bool>()) {
        let mut adversary = Adversary::new(SHARD, seed);
        let payloads = if mixed {
            let valid = EventGen::new(SHARD, seed).payloads(entries, 3);
            let forged = adversary.payloads(entries, 3);
            valid.into_iter().zip(forged).flat_map(|(v, f)| [v, f]).collect()
        } else {
            adversary.payloads(entries, 4)
        };
        let (one_by_one, state_one) = fold(&payloads, &mut Rng::new(seed), 1);
        let (batched, state_batched) = fold(&payloads, &mut Rng::new(seed ^ 1), batch_max);
        prop_assert_eq!(&one_by_one, &batched);
        prop_assert_eq!(&state_one, &state_batched);
        for projection in Projection::ALL {
            let rehashed = digest_of(&batched, SHARD, projection).expect("memory");
            prop_assert_eq!(rehashed, state_batched.digest(projection), "{}", projection.name());
        }
    }

    /// A replay's in-place fold (writes straight into memory, no overlay) gives exactly the
    /// data, digests and outcomes of staged batches committed one after another, for valid and
    /// adversarial histories in any batching.
    #[test]
    fn in_place_fold_equals_staged_batches(seed in any::<u64>(), entries in 1_usize..100, batch_max in 1_u64..40, forged in any::<bool>()) {
        let payloads = if forged {
            Adversary::new(SHARD, seed).payloads(entries, 4)
        } else {
            EventGen::new(SHARD, seed).payloads(entries, 4)
        };
        let (staged, staged_state) = fold(&payloads, &mut Rng::new(seed), 1);
        let mut in_place = MemKv::default();
        let mut state = ShardState::empty(SHARD);
        let mut sizes = Rng::new(seed ^ 2);
        let mut rest = payloads.as_slice();
        let mut outcomes = Vec::new();
        while !rest.is_empty() {
            let n = usize::try_from(1 + sizes.below(batch_max)).expect("small").min(rest.len());
            let (now, later) = rest.split_at(n);
            let entries = committed(state.applied, now);
            outcomes.extend(state.apply_in_place(&mut in_place, &entries, Vec::new()).expect("memory"));
            rest = later;
        }
        prop_assert_eq!(&in_place, &staged);
        prop_assert_eq!(&state, &staged_state);
        let staged_outcomes = ShardState::empty(SHARD)
            .apply_batch(&MemKv::default(), &committed(LogIndex::ZERO, &payloads), Vec::new())
            .expect("memory")
            .results;
        prop_assert_eq!(outcomes, staged_outcomes);
    }

    /// Applying a history, snapshotting and installing it elsewhere reproduces it exactly.
    #[test]
    fn snapshot_round_trip(seed in any::<u64>(), entries in 1_usize..80) {
        let payloads = EventGen::new(SHARD, seed).payloads(entries, 3);
        let (kv, state) = fold(&payloads, &mut Rng::new(seed), 8);
        let chunks = crate::snapshot::export(&kv, &state).expect("memory");
        let bytes = crate::snapshot::encode(&chunks);
        let mut streamed = Vec::new();
        let written = crate::snapshot::export_to(&kv, &state, &mut streamed).expect("memory");
        prop_assert_eq!(&streamed, &bytes, "streaming writes the bytes of the whole export");
        prop_assert_eq!(written, bytes.len() as u64);
        let install = crate::snapshot::prepare_install(SHARD, crate::snapshot::decode(SHARD, &bytes).expect("decodes"))
            .expect("a fresh snapshot verifies");
        let mut other = MemKv::default();
        other.replace_ranges(&install.clear, install.changes);
        prop_assert_eq!(&install.state, &state);
        prop_assert_eq!(&other, &kv);
    }
}

pub(super) fn direct(user: u64) -> Option<events::Conversation> {
    Some(ConversationId::Direct(UserId::new(user).expect("nonzero")).into())
}

pub(super) fn delivered(user: u64, from: u64, id: u8) -> Kind {
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
        origin_shard: None,
        addressed_to: 0,
        receipts_sent: 0,
    })
}

/// A 1:1 send from user 1 (device 1) to user 2.
pub(super) fn sent_event(
    id: u8,
    client_msg_id: &str,
    recipient_shard: u32,
    sent_at_ms: u64,
) -> Kind {
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
        own_copies: false,
    })
}

/// `user` registered with `phone_hash`, and its primary device 1 (token hash [`TOKEN_HASH`]).
pub(super) fn user_with_primary(user: u64, phone_hash: &[u8]) -> Vec<Kind> {
    vec![
        Kind::UserRegistered(events::UserRegistered {
            user,
            phone_hash: phone_hash.to_vec(),
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
        }),
        device_of(user, true),
    ]
}

/// The token hash of the devices [`device_of`] registers.
pub(super) const TOKEN_HASH: [u8; 32] = [3; 32];

/// The next device of `user` (a primary, or a linked companion).
pub(super) fn device_of(user: u64, primary: bool) -> Kind {
    Kind::DeviceRegistered(events::DeviceRegistered {
        user,
        device: 0,
        token_hash: TOKEN_HASH.to_vec(),
        primary,
        at_ms: 2,
        redeemed_phone_hash: Vec::new(),
        companions_max: 0,
        approver_token_hash: Vec::new(),
        revokes_companions: false,
    })
}

/// User 1's (device 1) send `id` (client id `c{id}`, body three bytes `id`) to `to` on `shard`,
/// from a build that stores own copies.
pub(super) fn send_by_1(id: u8, to: u64, shard: ShardId) -> Kind {
    Kind::MessageSent(events::MessageSent {
        message_id: vec![id; 16],
        sender_user: 1,
        sender_device: 1,
        client_msg_id: format!("c{id}"),
        to: direct(to),
        content: Some(events::Content {
            body: vec![id; 3],
            media: None,
        }),
        sent_at_ms: 100 + u64::from(id),
        recipient_shard: u32::from(shard.get()),
        group_epoch: 0,
        trace_parent: String::new(),
        own_copies: true,
    })
}

pub(super) fn view_of<'s, 'a>(staged: &'s mut Staged<'a>) -> View<'s, 'a> {
    View::new(staged, SHARD, LogIndex::ZERO, Projection::ReadState)
}

/// Asserts `outcome` is one event refused as invalid, with `why` in its message.
pub(super) fn assert_refused(outcome: &[Applied], why: &str) {
    match outcome {
        [Applied::Rejected { code, message }] => {
            assert_eq!(*code, crate::projection::INVALID_CODE);
            assert!(message.contains(why), "{message}");
        }
        other => panic!("expected one invalid event, got {other:?}"),
    }
}

/// Asserts no projection changed between two states (their maintained digests are equal).
pub(super) fn assert_projections_unchanged(before: &ShardState, after: &ShardState) {
    for projection in Projection::ALL {
        assert_eq!(
            before.digest(projection),
            after.digest(projection),
            "{}",
            projection.name()
        );
    }
}

pub(super) fn tracing_phase(why: &str) {
    eprintln!("phase: {why}");
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

/// The generator reaches every event kind (forgetting included: it needs trims first), so the
/// properties above fold each of them.
#[test]
fn the_generator_emits_every_event_kind() {
    let mut generator = EventGen::new(SHARD, 7);
    let seen: std::collections::BTreeSet<&str> = (0..5000)
        .filter_map(|_| {
            let event = generator.next_event();
            event.kind.as_ref().map(super::decode::kind_name)
        })
        .collect();
    assert_eq!(seen.len(), 24, "{seen:?}");
}
