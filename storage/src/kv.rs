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

/// An in-memory store, for unit tests, rebuilds into scratch space and `inspect --at`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemKv {
    families: BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemKv {
    /// Applies committed changes.
    pub fn write(&mut self, changes: impl IntoIterator<Item = Change>) {
        for (cf, key, value) in changes {
            let family = self.families.entry(cf).or_default();
            match value {
                Some(value) => family.insert(key, value),
                None => family.remove(&key),
            };
        }
        // Empty families are dropped so that equal contents compare equal.
        self.families.retain(|_, family| !family.is_empty());
    }

    /// Borrows the value of `key` in `cf`.
    pub fn value(&self, cf: Cf, key: &[u8]) -> Option<&Vec<u8>> {
        self.families.get(&cf).and_then(|family| family.get(key))
    }

    /// Removes `key` from `cf`, returning its value; a family left empty is dropped, as
    /// [`MemKv::write`] does.
    fn remove(&mut self, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
        let family = self.families.get_mut(&cf)?;
        let old = family.remove(key);
        if family.is_empty() {
            self.families.remove(&cf);
        }
        old
    }

    /// Clears `ranges`, then applies `changes`.
    pub fn replace_ranges(&mut self, ranges: &[(Cf, Vec<u8>, Vec<u8>)], changes: Vec<Change>) {
        for (cf, from, to) in ranges {
            if let Some(family) = self.families.get_mut(cf) {
                let doomed: Vec<Vec<u8>> = family
                    .range::<[u8], _>((
                        Bound::Included(from.as_slice()),
                        Bound::Excluded(to.as_slice()),
                    ))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in doomed {
                    family.remove(&key);
                }
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
            let family = kv.families.entry(cf).or_default();
            if let Some(old) = family.get_mut(&key) {
                digest.remove(&key, old);
                *old = value;
            } else {
                family.insert(key, value);
            }
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
            Base::Direct(kv) => {
                kv.families.entry(cf).or_default().insert(key, value);
            }
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
