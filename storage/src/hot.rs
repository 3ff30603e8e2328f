//! The projection records a shard replica keeps in memory from one apply batch to the next.
//!
//! Every batch reads the same few records again (an inbox's state, an outbox's state, the
//! inbound watermark), and reads back records an earlier batch wrote moments ago: a trim reads
//! the outbox entries it deletes, a delivery the receipt its send wrote, each for the digest.
//! [`Staged`](crate::kv::Staged) caches reads within one batch only; [`ApplyCache`] carries what
//! a batch read and wrote over to the next ones, within a byte budget.
//!
//! ```text
//!   Staged ──get miss──▶ CachedKv ──hit──▶ ApplyCache (young, then old generation)
//!                           │ miss
//!                           └────────────▶ RocksDB
//!   after the batch: ApplyCache::absorb(what CachedKv read, the batch's changes), then commit
//! ```
//!
//! The cache holds, for each key it knows, exactly what the store holds: every change of an
//! apply batch passes through [`ApplyCache::absorb`] (a value it will not keep evicts the key),
//! and whatever else writes the shard's projections (a snapshot install, a projection swap)
//! clears it. Eviction is by generation: when the young generation fills half the budget it
//! becomes the old one and the previous old one is dropped; a hit in the old generation moves
//! the record back to the young one. Digests, verify and rebuild do not depend on it: a cached
//! value is the stored one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::cf::Cf;
use crate::error::Result;
use crate::kv::{Change, Pair, ReadKv};

/// What one cached record costs beyond its key and value bytes (two maps' slots, two vectors'
/// headers), counted against the budget.
const ENTRY_OVERHEAD: usize = 64;

/// A record as the store held it when read (`None`: absent).
pub type Read = (Cf, Vec<u8>, Option<Vec<u8>>);

/// One generation: per family, each key's stored value (`None`: known absent).
#[derive(Default)]
struct Generation {
    families: HashMap<Cf, HashMap<Vec<u8>, Option<Vec<u8>>>>,
    bytes: usize,
}

impl Generation {
    fn get(&self, cf: Cf, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.families.get(&cf).and_then(|family| family.get(key))
    }

    fn remove(&mut self, cf: Cf, key: &[u8]) {
        if let Some(old) = self
            .families
            .get_mut(&cf)
            .and_then(|family| family.remove(key))
        {
            self.bytes = self.bytes.saturating_sub(cost(key, old.as_deref()));
        }
    }

    fn insert(&mut self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.bytes = self.bytes.saturating_add(cost(&key, value.as_deref()));
        match self.families.entry(cf).or_default().entry(key) {
            Entry::Occupied(mut slot) => {
                let old = slot.insert(value);
                self.bytes = self.bytes.saturating_sub(cost(slot.key(), old.as_deref()));
            }
            Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
}

fn cost(key: &[u8], value: Option<&[u8]>) -> usize {
    key.len()
        .saturating_add(value.map_or(0, <[u8]>::len))
        .saturating_add(ENTRY_OVERHEAD)
}

/// One shard replica's projection records kept between apply batches, within `budget` bytes.
pub struct ApplyCache {
    budget: usize,
    young: Generation,
    old: Generation,
}

impl std::fmt::Debug for ApplyCache {
    // The sizes only: the records are users' data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyCache")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl ApplyCache {
    /// An empty cache holding at most `budget` bytes (keys and values, and 64 bytes per record
    /// for the maps, over both generations); 0 keeps nothing.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            young: Generation::default(),
            old: Generation::default(),
        }
    }

    /// The stored value of `key` in `cf` if the cache knows it (`Some(None)`: known absent), and
    /// whether the hit was in the old generation.
    fn get(&self, cf: Cf, key: &[u8]) -> Option<(Option<&[u8]>, bool)> {
        if let Some(value) = self.young.get(cf, key) {
            return Some((value.as_deref(), false));
        }
        self.old.get(cf, key).map(|value| (value.as_deref(), true))
    }

    /// Bytes held, over both generations.
    pub fn bytes(&self) -> usize {
        self.young.bytes.saturating_add(self.old.bytes)
    }

    /// Forgets everything: for writes to the shard that bypass apply (a snapshot install, a
    /// projection swap) and a commit that failed.
    pub fn clear(&mut self) {
        self.young = Generation::default();
        self.old = Generation::default();
    }

    /// Records that the store holds `value` under `key` (`None`: absent). A record too large to
    /// keep is evicted instead, so the cache never holds a stale value.
    fn note(&mut self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
        if !matches!(cf, Cf::Projection(_)) {
            return;
        }
        self.old.remove(cf, &key);
        let half = self.budget / 2;
        if cost(&key, value.as_deref()) > half {
            self.young.remove(cf, &key);
            return;
        }
        self.young.insert(cf, key, value);
        if self.young.bytes > half {
            self.old = std::mem::take(&mut self.young);
        }
    }

    /// Takes in one apply batch before it is committed: what it read from the store (values as
    /// they were before the batch), then its `changes`, which the commit makes the stored values.
    /// A commit that fails must be followed by [`ApplyCache::clear`].
    pub fn absorb(&mut self, reads: Vec<Read>, changes: &[Change]) {
        if self.budget == 0 {
            return;
        }
        for (cf, key, value) in reads {
            self.note(cf, key, value);
        }
        for (cf, key, value) in changes {
            self.note(*cf, key.clone(), value.clone());
        }
    }
}

/// A store read through an [`ApplyCache`], recording what it read for
/// [`ApplyCache::absorb`]; scans go to the store.
pub struct CachedKv<'a> {
    base: &'a dyn ReadKv,
    cache: &'a ApplyCache,
    reads: RefCell<Vec<Read>>,
    store_reads: Cell<u64>,
}

impl<'a> CachedKv<'a> {
    /// Reads `base` through `cache`.
    pub fn new(base: &'a dyn ReadKv, cache: &'a ApplyCache) -> Self {
        Self {
            base,
            cache,
            reads: RefCell::default(),
            store_reads: Cell::new(0),
        }
    }

    /// Ends the reading: the records to absorb (every store read, and every old-generation hit
    /// to move to the young one), and how many reads went to the store (point reads the cache
    /// missed, and scans).
    pub fn finish(self) -> (Vec<Read>, u64) {
        (self.reads.into_inner(), self.store_reads.get())
    }
}

impl ReadKv for CachedKv<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some((value, old)) = self.cache.get(cf, key) {
            let value = value.map(<[u8]>::to_vec);
            if old {
                self.reads
                    .borrow_mut()
                    .push((cf, key.to_vec(), value.clone()));
            }
            return Ok(value);
        }
        self.store_reads
            .set(self.store_reads.get().saturating_add(1));
        let value = self.base.get(cf, key)?;
        if self.cache.budget > 0 {
            self.reads
                .borrow_mut()
                .push((cf, key.to_vec(), value.clone()));
        }
        Ok(value)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        self.store_reads
            .set(self.store_reads.get().saturating_add(1));
        self.base.scan(cf, from, to, limit)
    }
}

#[cfg(test)]
#[path = "hot_test.rs"]
mod hot_test;
