//! The key-value seam under projections: a read trait implemented by RocksDB and by an in-memory
//! map, and [`Staged`], the write overlay one apply batch fills before it is committed atomically.
//!
//! ```text
//!   projection::apply ──put/delete──▶ Staged (overlay + digest deltas) ──commit──▶ WriteBatch
//!          │                              │ read-through
//!          └──────────get/scan────────────┴──────────▶ ReadKv (RocksDB | MemKv)
//! ```
//!
//! Reads inside a batch see the batch's own earlier writes, so applying N entries in one batch
//! gives exactly the state of applying them one by one.

use std::cell::{Cell, RefCell};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use xxhash_rust::xxh3::Xxh3;

use crate::cf::Cf;
use crate::cf::Projection;
use crate::error::Result;

/// One key/value pair, as returned by scans.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Read access to stored data.
pub trait ReadKv {
    /// Returns the value of `key` in `cf`.
    ///
    /// # Errors
    /// A storage fault.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Returns up to `limit` pairs with `from <= key < to`, in key order.
    ///
    /// # Errors
    /// A storage fault.
    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>>;
}

/// A write to be committed: `None` deletes the key.
pub type Change = (Cf, Vec<u8>, Option<Vec<u8>>);

/// What one stored pair costs in memory beyond its key and value bytes, as [`MemKv::bytes`]
/// counts it: the two `Vec` headers and about a pair's share of the B-tree's nodes.
pub const PAIR_OVERHEAD_BYTES: usize = 64;

/// An in-memory store, for unit tests, rebuilds into scratch space and `inspect --at`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemKv {
    families: BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// What the pairs cost in memory ([`MemKv::bytes`]); a function of the contents, so equal
    /// contents still compare equal.
    bytes: usize,
}

/// What `key` and `value` cost in memory as a stored pair.
fn pair_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len()
        .saturating_add(value.len())
        .saturating_add(PAIR_OVERHEAD_BYTES)
}

impl MemKv {
    /// Applies committed changes.
    pub fn write(&mut self, changes: impl IntoIterator<Item = Change>) {
        for (cf, key, value) in changes {
            match value {
                Some(value) => self.put(cf, key, value, |_, _| {}),
                None => {
                    self.remove(cf, &key);
                }
            }
        }
    }

    /// About how much memory the stored pairs take: their keys and values, and
    /// [`PAIR_OVERHEAD_BYTES`] each.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `value` under `key` in `cf` (one search of the family); when that replaces a
    /// value, `replaced` is called with the key and the old value.
    fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>, replaced: impl FnOnce(&[u8], &[u8])) {
        match self.families.entry(cf).or_default().entry(key) {
            Entry::Occupied(mut stored) => {
                self.bytes = self
                    .bytes
                    .saturating_sub(stored.get().len())
                    .saturating_add(value.len());
                let old = stored.insert(value);
                replaced(stored.key(), &old);
            }
            Entry::Vacant(slot) => {
                self.bytes = self.bytes.saturating_add(pair_bytes(slot.key(), &value));
                slot.insert(value);
            }
        }
    }

    /// Borrows the value of `key` in `cf`.
    pub fn value(&self, cf: Cf, key: &[u8]) -> Option<&Vec<u8>> {
        self.families.get(&cf).and_then(|family| family.get(key))
    }

    /// Removes `key` from `cf`, returning its value; a family left empty is dropped, so that
    /// equal contents compare equal.
    fn remove(&mut self, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
        let family = self.families.get_mut(&cf)?;
        let old = family.remove(key);
        if family.is_empty() {
            self.families.remove(&cf);
        }
        if let Some(old) = &old {
            self.bytes = self.bytes.saturating_sub(pair_bytes(key, old));
        }
        old
    }

    /// Clears `ranges`, then applies `changes`.
    pub fn replace_ranges(&mut self, ranges: &[(Cf, Vec<u8>, Vec<u8>)], changes: Vec<Change>) {
        for (cf, from, to) in ranges {
            let doomed: Vec<Vec<u8>> = self
                .range(*cf, from, to)
                .map(|(key, _)| key.clone())
                .collect();
            for key in doomed {
                self.remove(*cf, &key);
            }
        }
        self.write(changes);
    }

    /// Returns every pair of `cf` in `[from, to)`.
    pub fn range(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
    ) -> impl DoubleEndedIterator<Item = (&Vec<u8>, &Vec<u8>)> {
        self.families.get(&cf).into_iter().flat_map(move |family| {
            family.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
        })
    }
}

impl ReadKv for MemKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.value(cf, key).cloned())
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        Ok(self
            .range(cf, from, to)
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// An order-independent digest of a projection's live key/value pairs: the wrapping sum of
/// xxh3-128 over each pair, and the pair count. Two replicas (or a replica and a rebuild) with
/// equal digests at the same applied index hold the same data, up to hash collisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    /// Wrapping sum of the pair hashes.
    pub sum: u128,
    /// Number of live pairs.
    pub entries: u64,
}

impl Digest {
    /// Hashes one pair; the key length is included so that (k, v) splits cannot collide.
    pub fn pair_hash(key: &[u8], value: &[u8]) -> u128 {
        let mut hasher = Xxh3::new();
        let key_len = u32::try_from(key.len()).unwrap_or(u32::MAX);
        hasher.update(&key_len.to_be_bytes());
        hasher.update(key);
        hasher.update(value);
        hasher.digest128()
    }

    /// Accounts for a pair that became live.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        self.sum = self.sum.wrapping_add(Self::pair_hash(key, value));
        self.entries = self
            .entries
            .checked_add(1)
            .expect("digest entry count overflow");
    }

    /// Accounts for a pair that stopped being live.
    pub fn remove(&mut self, key: &[u8], value: &[u8]) {
        self.sum = self.sum.wrapping_sub(Self::pair_hash(key, value));
        self.entries = self
            .entries
            .checked_sub(1)
            .expect("digest removes a pair it never added");
    }

    /// The 16-byte big-endian form stored in `AppliedState`.
    pub fn to_bytes(self) -> Vec<u8> {
        self.sum.to_be_bytes().to_vec()
    }

    /// Parses the stored form.
    pub fn from_parts(bytes: &[u8], entries: u64) -> Option<Self> {
        Some(Self {
            sum: u128::from_be_bytes(bytes.try_into().ok()?),
            entries,
        })
    }
}

/// One family's values as the base held them, for the keys a batch read (`None`: absent).
type ReadCache = HashMap<Vec<u8>, Option<Vec<u8>>>;

/// The write overlay of one apply batch, with the projections' digests kept up to date.
///
/// Point reads of the base are cached for the rest of the batch, misses too: the projections of
/// one event (and the events of one entry) read the same few records over and over (an inbox's
/// state, an outbox's state, a watermark), and every put reads the old value for the digest.
pub struct Staged<'a> {
    base: Base<'a>,
    // Per family, so that lookups borrow the key instead of allocating one.
    writes: BTreeMap<Cf, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    // What the base held, for keys this batch read and has not written.
    read: RefCell<BTreeMap<Cf, ReadCache>>,
    digests: BTreeMap<Projection, Digest>,
    base_reads: Cell<u64>,
    writes_made: u64,
}

/// What a [`Staged`] batch reads and writes through.
enum Base<'a> {
    /// A store the batch only reads: writes stay in the overlay until [`Staged::finish`].
    Read(&'a dyn ReadKv),
    /// Scratch memory the batch writes straight into (a replay): no overlay, no read cache.
    Direct(&'a mut MemKv),
}

impl<'a> Staged<'a> {
    /// Starts a batch over `base`, whose projections currently have `digests`.
    pub fn new(base: &'a dyn ReadKv, digests: BTreeMap<Projection, Digest>) -> Self {
        Self::over(Base::Read(base), digests)
    }

    /// Starts a batch that writes straight into `kv`, whose projections currently have
    /// `digests`: each put or delete is one map operation, and [`Staged::finish`] returns no
    /// changes. For replays into scratch memory, where a failed batch discards the whole
    /// replay (a failure leaves `kv` holding part of the batch).
    pub fn direct(kv: &'a mut MemKv, digests: BTreeMap<Projection, Digest>) -> Self {
        Self::over(Base::Direct(kv), digests)
    }

    fn over(base: Base<'a>, digests: BTreeMap<Projection, Digest>) -> Self {
        Self {
            base,
            writes: BTreeMap::new(),
            read: RefCell::default(),
            digests,
            base_reads: Cell::new(0),
            writes_made: 0,
        }
    }

    /// Returns the value of `key`, seeing this batch's writes.
    ///
    /// # Errors
    /// A storage fault.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let base = match &self.base {
            Base::Direct(kv) => return Ok(kv.value(cf, key).cloned()),
            Base::Read(base) => *base,
        };
        if let Some(staged) = self.writes.get(&cf).and_then(|family| family.get(key)) {
            return Ok(staged.clone());
        }
        if let Some(cached) = self
            .read
            .borrow()
            .get(&cf)
            .and_then(|family| family.get(key))
        {
            return Ok(cached.clone());
        }
        self.base_reads.set(self.base_reads.get().saturating_add(1));
        let value = base.get(cf, key)?;
        self.read
            .borrow_mut()
            .entry(cf)
            .or_default()
            .insert(key.to_vec(), value.clone());
        Ok(value)
    }

    /// Reads of the base made so far (point reads that missed the batch's cache, and scans), and
    /// puts and deletes staged.
    pub fn io(&self) -> (u64, u64) {
        (self.base_reads.get(), self.writes_made)
    }

    /// Returns up to `limit` pairs of `cf` in `[from, to)`, seeing this batch's writes.
    ///
    /// # Errors
    /// A storage fault.
    pub fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let base = match &self.base {
            Base::Direct(kv) => return kv.scan(cf, from, to, limit),
            Base::Read(base) => *base,
        };
        let staged: Vec<_> = self
            .writes
            .get(&cf)
            .into_iter()
            .flat_map(|family| {
                family.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        self.base_reads.set(self.base_reads.get().saturating_add(1));
        if staged.is_empty() {
            return base.scan(cf, from, to, limit);
        }
        // Each staged delete can hide at most one base pair, so this many base pairs suffice.
        let base_limit = limit.saturating_add(staged.len());
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            base.scan(cf, from, to, base_limit)?.into_iter().collect();
        for (key, value) in staged {
            match value {
                Some(value) => merged.insert(key, value),
                None => merged.remove(&key),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// Writes `value` under `key` in a projection's family.
    ///
    /// # Errors
    /// A storage fault while reading the old value (needed for the digest).
    pub fn put(&mut self, projection: Projection, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        let cf = Cf::Projection(projection);
        self.writes_made = self.writes_made.saturating_add(1);
        let digest = self.digests.entry(projection).or_default();
        digest.add(&key, &value);
        if let Base::Direct(kv) = &mut self.base {
            kv.put(cf, key, value, |key, old| digest.remove(key, old));
            return Ok(());
        }
        let old = self.get(cf, &key)?;
        if let Some(old) = &old {
            self.digests
                .entry(projection)
                .or_default()
                .remove(&key, old);
        }
        self.writes.entry(cf).or_default().insert(key, Some(value));
        Ok(())
    }

    /// Writes `value` under `key`, a key the caller knows is new (a fresh inbox seq, outbox
    /// position or feed index): no read of an old value for the digest. Debug builds check that
    /// the key is indeed absent.
    ///
    /// # Panics
    /// In debug builds, when `key` holds a value.
    pub fn put_new(&mut self, projection: Projection, key: Vec<u8>, value: Vec<u8>) {
        let cf = Cf::Projection(projection);
        debug_assert!(
            matches!(self.get(cf, &key), Ok(None)),
            "put_new on a key that holds a value ({})",
            crate::projection::hex(&key)
        );
        self.digests
            .entry(projection)
            .or_default()
            .add(&key, &value);
        self.writes_made = self.writes_made.saturating_add(1);
        match &mut self.base {
            Base::Direct(kv) => kv.put(cf, key, value, |_, _| {}),
            Base::Read(_) => {
                self.writes.entry(cf).or_default().insert(key, Some(value));
            }
        }
    }

    /// Deletes `key` from a projection's family (a no-op when absent).
    ///
    /// # Errors
    /// A storage fault while reading the old value.
    pub fn delete(&mut self, projection: Projection, key: Vec<u8>) -> Result<()> {
        let cf = Cf::Projection(projection);
        if let Base::Direct(kv) = &mut self.base {
            if let Some(old) = kv.remove(cf, &key) {
                self.digests
                    .entry(projection)
                    .or_default()
                    .remove(&key, &old);
                self.writes_made = self.writes_made.saturating_add(1);
            }
            return Ok(());
        }
        if let Some(old) = self.get(cf, &key)? {
            self.digests
                .entry(projection)
                .or_default()
                .remove(&key, &old);
            self.writes_made = self.writes_made.saturating_add(1);
            self.writes.entry(cf).or_default().insert(key, None);
        }
        Ok(())
    }

    /// Ends the batch: the changes to commit and the projections' new digests.
    pub fn finish(self) -> (Vec<Change>, BTreeMap<Projection, Digest>) {
        let changes = self
            .writes
            .into_iter()
            .flat_map(|(cf, family)| family.into_iter().map(move |(key, value)| (cf, key, value)))
            .collect();
        (changes, self.digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kv`'s pairs cost, counted from scratch.
    fn recounted(kv: &MemKv) -> usize {
        kv.families
            .values()
            .flat_map(|family| family.iter())
            .map(|(key, value)| pair_bytes(key, value))
            .sum()
    }

    /// The memory count follows every way of writing: new keys, replaced values, deletes,
    /// cleared ranges, and a replay's direct puts and deletes.
    #[test]
    fn the_memory_count_follows_the_contents() {
        let cf = Cf::Projection(Projection::Inbox);
        let mut kv = MemKv::default();
        kv.write([
            (cf, b"a".to_vec(), Some(vec![1; 10])),
            (cf, b"b".to_vec(), Some(vec![2; 20])),
            (cf, b"c".to_vec(), Some(vec![3; 30])),
        ]);
        assert_eq!(kv.bytes(), 63 + 3 * PAIR_OVERHEAD_BYTES);
        kv.write([
            (cf, b"a".to_vec(), Some(vec![1; 100])),
            (cf, b"b".to_vec(), None),
            (cf, b"z".to_vec(), None),
        ]);
        assert_eq!(kv.bytes(), recounted(&kv));
        kv.replace_ranges(
            &[(cf, b"a".to_vec(), b"b".to_vec())],
            vec![(cf, b"d".to_vec(), Some(vec![4; 5]))],
        );
        assert_eq!(kv.bytes(), recounted(&kv));
        assert_eq!(kv.bytes(), 2 + 35 + 2 * PAIR_OVERHEAD_BYTES, "keys c and d");

        let mut staged = Staged::direct(&mut kv, BTreeMap::new());
        staged
            .put(Projection::Inbox, b"c".to_vec(), vec![9; 3])
            .expect("memory");
        staged.put_new(Projection::Inbox, b"e".to_vec(), vec![9; 7]);
        staged
            .delete(Projection::Inbox, b"d".to_vec())
            .expect("memory");
        drop(staged);
        assert_eq!(kv.bytes(), recounted(&kv));
        assert_eq!(kv.bytes(), 2 + 10 + 2 * PAIR_OVERHEAD_BYTES);
        kv.write([(cf, b"c".to_vec(), None), (cf, b"e".to_vec(), None)]);
        assert_eq!(kv, MemKv::default(), "empty again, count included");
    }
}
