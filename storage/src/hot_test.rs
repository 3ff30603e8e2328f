//! The apply cache: it answers what the store holds, evicts what it will not keep, stays within
//! its budget, and a fold read through it (any budget, any batching) writes exactly what a fold
//! without it writes, with the same digests and results.

// Test arithmetic works on small generated values; overflow would be a test bug.
#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use courier_proto::pb::events::EntryPayload;
use courier_proto::{LogIndex, ShardId};
use proptest::prelude::*;

use super::{ApplyCache, CachedKv};
use crate::cf::{Cf, Projection};
use crate::kv::{MemKv, ReadKv};
use crate::shard::{Committed, ShardState};
use crate::testkit::{EventGen, Rng};

const SHARD: ShardId = ShardId::new(1);
const INBOX: Cf = Cf::Projection(Projection::Inbox);

#[test]
fn a_record_is_read_from_the_store_once_then_from_memory_with_each_batchs_changes() {
    let mut store = MemKv::default();
    store.write([(INBOX, b"a".to_vec(), Some(b"1".to_vec()))]);
    let mut cache = ApplyCache::new(1 << 20);

    let kv = CachedKv::new(&store, &cache);
    assert_eq!(kv.get(INBOX, b"a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(kv.get(INBOX, b"new").unwrap(), None);
    let (reads, store_reads) = kv.finish();
    assert_eq!(store_reads, 2);
    let changes = vec![
        (INBOX, b"a".to_vec(), Some(b"2".to_vec())),
        (INBOX, b"new".to_vec(), Some(b"3".to_vec())),
    ];
    cache.absorb(reads, &changes);
    store.write(changes);

    let kv = CachedKv::new(&store, &cache);
    assert_eq!(kv.get(INBOX, b"a").unwrap(), Some(b"2".to_vec()));
    assert_eq!(kv.get(INBOX, b"new").unwrap(), Some(b"3".to_vec()));
    let (_, store_reads) = kv.finish();
    assert_eq!(store_reads, 0, "both came from memory");
}

#[test]
fn a_value_too_large_to_keep_evicts_the_cached_one_instead_of_leaving_it_stale() {
    let mut cache = ApplyCache::new(1024);
    cache.absorb(
        Vec::new(),
        &[(INBOX, b"k".to_vec(), Some(b"small".to_vec()))],
    );
    let big = vec![7_u8; 4096];
    cache.absorb(Vec::new(), &[(INBOX, b"k".to_vec(), Some(big.clone()))]);
    let mut store = MemKv::default();
    store.write([(INBOX, b"k".to_vec(), Some(big.clone()))]);
    let kv = CachedKv::new(&store, &cache);
    assert_eq!(kv.get(INBOX, b"k").unwrap(), Some(big));
    assert_eq!(
        kv.finish().1,
        1,
        "read from the store, not the stale small value"
    );
}

#[test]
fn the_cache_stays_within_its_budget_and_keeps_what_was_used_last() {
    let budget = 4096;
    let mut cache = ApplyCache::new(budget);
    let mut store = MemKv::default();
    for i in 0_u32..1000 {
        let change = (INBOX, i.to_be_bytes().to_vec(), Some(vec![1_u8; 16]));
        cache.absorb(Vec::new(), std::slice::from_ref(&change));
        store.write([change]);
        assert!(cache.bytes() <= budget, "{} bytes after {i}", cache.bytes());
        // Key 0 is read after every write: it stays, by moving back to the young generation.
        let kv = CachedKv::new(&store, &cache);
        kv.get(INBOX, &0_u32.to_be_bytes()).unwrap();
        let (reads, store_reads) = kv.finish();
        assert_eq!(store_reads, 0, "key 0 stays in memory");
        cache.absorb(reads, &[]);
    }
    let kv = CachedKv::new(&store, &cache);
    kv.get(INBOX, &1_u32.to_be_bytes()).unwrap();
    assert_eq!(kv.finish().1, 1, "an old record unused since was evicted");
}

#[test]
fn only_projection_records_are_kept_and_a_zero_budget_keeps_nothing() {
    let mut cache = ApplyCache::new(1 << 20);
    cache.absorb(
        Vec::new(),
        &[(Cf::Meta, b"m".to_vec(), Some(b"1".to_vec()))],
    );
    assert_eq!(cache.bytes(), 0);
    let mut off = ApplyCache::new(0);
    off.absorb(Vec::new(), &[(INBOX, b"k".to_vec(), Some(b"1".to_vec()))]);
    assert_eq!(off.bytes(), 0);
    cache.absorb(Vec::new(), &[(INBOX, b"k".to_vec(), Some(b"1".to_vec()))]);
    assert!(cache.bytes() > 0);
    cache.clear();
    assert_eq!(cache.bytes(), 0);
}

/// Applies `payloads` in random batch sizes, reading through a cache of `budget` bytes when
/// given one: the data, the state and every event's result.
fn fold(
    payloads: &[EntryPayload],
    sizes: &mut Rng,
    batch_max: u64,
    budget: Option<usize>,
) -> (MemKv, ShardState, Vec<String>) {
    let mut kv = MemKv::default();
    let mut state = ShardState::empty(SHARD);
    let mut cache = budget.map(ApplyCache::new);
    let mut results = Vec::new();
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
        let batch = match &mut cache {
            None => state.apply_batch(&kv, &entries, Vec::new()),
            Some(cache) => {
                let through = CachedKv::new(&kv, cache);
                let batch = state.apply_batch(&through, &entries, Vec::new());
                let (reads, _) = through.finish();
                if let Ok(batch) = &batch {
                    cache.absorb(reads, &batch.changes);
                }
                batch
            }
        }
        .expect("memory never faults");
        results.extend(batch.results.iter().map(|r| format!("{r:?}")));
        kv.write(batch.changes);
        state = batch.next;
        rest = later;
    }
    (kv, state, results)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// A fold read through the cache (no room, a few records, plenty) equals one without it.
    #[test]
    fn a_fold_through_the_cache_writes_what_a_fold_without_it_writes(
        seed in any::<u64>(),
        entries in 1_usize..150,
        batch_max in 1_u64..20,
        budget in prop_oneof![Just(0_usize), 200_usize..2000, Just(1_usize << 20)],
    ) {
        let payloads = EventGen::new(SHARD, seed).payloads(entries, 4);
        let (plain, plain_state, plain_results) =
            fold(&payloads, &mut Rng::new(seed), batch_max, None);
        let (cached, cached_state, cached_results) =
            fold(&payloads, &mut Rng::new(seed), batch_max, Some(budget));
        prop_assert_eq!(&plain, &cached);
        prop_assert_eq!(&plain_state, &cached_state);
        prop_assert_eq!(plain_results, cached_results);
    }
}
