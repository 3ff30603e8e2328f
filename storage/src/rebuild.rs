//! Rebuild and verify: replay a shard's log through the same `apply` into scratch space, then
//! compare with the live projections, digest for digest and, where they differ, key by key.
//!
//! The live side is re-hashed from its data, not taken from the stored digest, so a corrupted
//! value on disk is found even though the stored digest never saw it.

use courier_proto::pb::store::LogEntry;
use courier_proto::{LogIndex, ShardId};
use prost::Message;

use crate::archive::{LogSource, SegmentStore, log_source};
use crate::cf::Cf;
use crate::error::{Result, StorageError};
use crate::keys;
use crate::kv::{Digest, MemKv, Pair, ReadKv};
use crate::log::{LogRecord, LogStore};
use crate::projection::{Projection, unframe};
use crate::shard::{Committed, ShardState};

/// Entries read and applied per step of a replay.
pub const REPLAY_BATCH_ENTRIES: u64 = crate::archive::READ_BATCH_ENTRIES;
/// Pairs read per step of a comparison scan.
const COMPARE_PAGE_PAIRS: usize = 4096;

/// Decodes the application part of a stored log record.
///
/// # Errors
/// [`StorageError::Decode`].
pub fn decode_entry(shard: ShardId, record: &LogRecord) -> Result<LogEntry> {
    LogEntry::decode(record.payload.as_slice()).map_err(|error| StorageError::Decode {
        cf: Cf::Log.name(),
        shard,
        what: format!("index {}", record.index),
        reason: error.to_string(),
    })
}

/// A shard's projections replayed into memory.
#[derive(Debug)]
pub struct Rebuilt {
    /// The rebuilt projections.
    pub kv: MemKv,
    /// The rebuilt applied state.
    pub state: ShardState,
    /// How many events were applied.
    pub events: u64,
}

/// Replays `log` from `base` (a snapshot's projections, or empty) up to and including `up_to`,
/// the replayed projections taking at most `memory_max` bytes (as [`MemKv::bytes`] counts them).
/// `progress` is called after each step with the index reached.
///
/// # Errors
/// A storage fault, a checksum mismatch in the log, a missing entry (the log was purged below
/// `base`), or [`StorageError::ReplayTooLarge`].
pub fn replay(
    log: &dyn LogSource,
    base: (MemKv, ShardState),
    up_to: LogIndex,
    memory_max: usize,
    progress: &mut dyn FnMut(LogIndex, u64),
) -> Result<Rebuilt> {
    let shard = log.shard();
    let (mut kv, mut state) = base;
    let mut events = 0_u64;
    let within = |kv: &MemKv, index: LogIndex| {
        crate::error::within_memory(shard, index, kv.bytes(), memory_max)
    };
    within(&kv, state.applied)?;
    while state.applied < up_to {
        let from = state.applied.next();
        let to = from
            .checked_add(REPLAY_BATCH_ENTRIES)
            .map_or(up_to.next(), |to| to.min(up_to.next()));
        let records = log.read_range(from, to)?;
        if records.first().map(|record| record.index) != Some(from) {
            return Err(StorageError::MissingEntry { shard, index: from });
        }
        let entries: Vec<LogEntry> = records
            .iter()
            .map(|record| decode_entry(shard, record))
            .collect::<Result<_>>()?;
        let committed: Vec<Committed<'_>> = records
            .iter()
            .zip(&entries)
            .map(|(record, entry)| Committed {
                index: record.index,
                payload: entry.events.as_ref(),
            })
            .collect();
        let consensus_state = entries.last().map(|e| e.raft.clone()).unwrap_or_default();
        let results = state.apply_in_place(&mut kv, &committed, consensus_state)?;
        let applied_events: usize = results.iter().map(Vec::len).sum();
        events = events.saturating_add(u64::try_from(applied_events).unwrap_or(u64::MAX));
        within(&kv, state.applied)?;
        progress(state.applied, events);
    }
    Ok(Rebuilt { kv, state, events })
}

/// Replays `log` from its first entry (index 1, an empty state) up to and including `up_to`.
///
/// # Errors
/// As [`replay`].
pub fn replay_from_start(log: &LogStore, up_to: LogIndex) -> Result<Rebuilt> {
    replay(
        log,
        (MemKv::default(), ShardState::empty(log.shard())),
        up_to,
        usize::MAX,
        &mut |_, _| {},
    )
}

/// One key whose live value differs from the rebuilt one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The projection.
    pub projection: Projection,
    /// The key.
    pub key: Vec<u8>,
    /// The rebuilt (expected) framed value; `None` when the key should not exist.
    pub expected: Option<Vec<u8>>,
    /// The live framed value; `None` when the key is missing.
    pub actual: Option<Vec<u8>>,
    /// The earliest log index that set either value: where the two histories diverge.
    pub first_divergent_index: LogIndex,
}

/// The outcome of comparing one projection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// The projection.
    pub projection: Projection,
    /// Digest re-hashed from the live data.
    pub live: Digest,
    /// Digest stored with the live applied index (maintained incrementally).
    pub stored: Digest,
    /// Digest of the rebuild.
    pub rebuilt: Digest,
    /// Up to `mismatches_max` differing keys, earliest divergence first.
    pub mismatches: Vec<Mismatch>,
}

impl Comparison {
    /// Whether live data, stored digest and rebuild all agree.
    pub fn is_equal(&self) -> bool {
        self.live == self.rebuilt && self.stored == self.rebuilt && self.mismatches.is_empty()
    }
}

/// Streams every pair of one shard in one family, in key order, page by page.
fn for_each_pair(kv: &dyn ReadKv, cf: Cf, shard: ShardId, f: &mut dyn FnMut(Pair)) -> Result<()> {
    let (mut from, to) = keys::shard_range(shard);
    loop {
        let page = kv.scan(cf, &from, &to, COMPARE_PAGE_PAIRS)?;
        let full = page.len() == COMPARE_PAGE_PAIRS;
        let mut last = None;
        for (key, value) in page {
            last = Some(key.clone());
            f((key, value));
        }
        match last {
            Some(mut key) if full => {
                key.push(0);
                from = key;
            }
            _ => return Ok(()),
        }
    }
}

/// Re-hashes one projection of one shard from its data.
///
/// # Errors
/// A storage fault.
pub fn digest_of(kv: &dyn ReadKv, shard: ShardId, projection: Projection) -> Result<Digest> {
    let mut digest = Digest::default();
    for_each_pair(kv, Cf::Projection(projection), shard, &mut |(
        key,
        value,
    )| {
        digest.add(&key, &value)
    })?;
    Ok(digest)
}

fn set_at(value: Option<&Vec<u8>>) -> Option<LogIndex> {
    value.and_then(|value| unframe(value)).map(|(at, _)| at)
}

/// Compares the live projections of a shard with a rebuild at the same applied index.
///
/// # Errors
/// A storage fault.
///
/// # Panics
/// If the rebuild is not at the live applied index.
pub fn compare(
    live: &dyn ReadKv,
    live_state: &ShardState,
    rebuilt: &Rebuilt,
    projections: &[Projection],
    mismatches_max: usize,
) -> Result<Vec<Comparison>> {
    assert_eq!(
        live_state.applied, rebuilt.state.applied,
        "comparisons are at one applied index"
    );
    let shard = live_state.shard.expect("live state names its shard");
    let mut out = Vec::with_capacity(projections.len());
    for &projection in projections {
        let cf = Cf::Projection(projection);
        let mut live_pairs = Vec::new();
        let mut live_digest = Digest::default();
        for_each_pair(live, cf, shard, &mut |(key, value)| {
            live_digest.add(&key, &value);
            live_pairs.push((key, value));
        })?;
        let rebuilt_digest = rebuilt.state.digest(projection);
        let mut mismatches = Vec::new();
        if live_digest != rebuilt_digest {
            let mut expected = std::collections::BTreeMap::new();
            for_each_pair(&rebuilt.kv, cf, shard, &mut |(key, value)| {
                expected.insert(key, value);
            })?;
            for (key, actual) in live_pairs {
                match expected.remove(&key) {
                    Some(want) if want == actual => {}
                    want => mismatches.push(mismatch(projection, key, want, Some(actual))),
                }
            }
            for (key, want) in expected {
                mismatches.push(mismatch(projection, key, Some(want), None));
            }
            mismatches.sort_by_key(|m| m.first_divergent_index);
            mismatches.truncate(mismatches_max);
        }
        out.push(Comparison {
            projection,
            live: live_digest,
            stored: live_state.digest(projection),
            rebuilt: rebuilt_digest,
            mismatches,
        });
    }
    Ok(out)
}

fn mismatch(
    projection: Projection,
    key: Vec<u8>,
    expected: Option<Vec<u8>>,
    actual: Option<Vec<u8>>,
) -> Mismatch {
    let first_divergent_index = [set_at(expected.as_ref()), set_at(actual.as_ref())]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_default();
    Mismatch {
        projection,
        key,
        expected,
        actual,
        first_divergent_index,
    }
}

/// Swapping one rebuilt projection in for the live one, as one atomic write.
#[derive(Debug)]
pub struct Swap {
    /// The live key range to clear.
    pub clear: (Cf, Vec<u8>, Vec<u8>),
    /// The rebuilt pairs, then the applied state carrying the rebuilt digest.
    pub changes: Vec<crate::kv::Change>,
    /// The live state after the swap.
    pub next: ShardState,
}

/// Builds the write that replaces `projection` of the live shard with its rebuild.
///
/// # Panics
/// If the rebuild is not at the live applied index.
pub fn swap(live: &ShardState, rebuilt: &Rebuilt, projection: Projection) -> Swap {
    assert_eq!(
        live.applied, rebuilt.state.applied,
        "a rebuild is swapped in at the applied index it was built at"
    );
    let shard = live.shard.expect("live state names its shard");
    let cf = Cf::Projection(projection);
    let (start, end) = keys::shard_range(shard);
    let mut changes: Vec<crate::kv::Change> = rebuilt
        .kv
        .range(cf, &start, &end)
        .map(|(k, v)| (cf, k.clone(), Some(v.clone())))
        .collect();
    let mut next = live.clone();
    next.digests
        .insert(projection, rebuilt.state.digest(projection));
    changes.push(next.applied_state_record());
    Swap {
        clear: (cf, start, end),
        changes,
        next,
    }
}

/// Differing keys reported per projection by a verify.
pub const VERIFY_MISMATCHES_MAX: usize = 5;

/// Where a verify's replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Index 1: every entry is replayed.
    Genesis,
    /// The archive's newest checkpoint at or below the applied index, if there is one.
    Checkpoint,
}

/// Where a replay up to `up_to` starts: the archive's newest checkpoint at or below it (with
/// [`ReplayFrom::Checkpoint`] and an archive), else an empty state at index 0, which needs
/// `source` to hold every entry from index 1. A checkpoint larger than `memory_max` is not
/// decoded.
///
/// # Errors
/// [`StorageError::MissingEntry`] when a replay from index 1 cannot read every entry; a damaged
/// checkpoint; [`StorageError::ReplayTooLarge`]; store faults.
pub fn replay_base(
    source: &dyn LogSource,
    (archive, from): (Option<&dyn SegmentStore>, ReplayFrom),
    up_to: LogIndex,
    memory_max: usize,
) -> Result<(MemKv, ShardState)> {
    let shard = source.shard();
    if from == ReplayFrom::Checkpoint
        && let Some(archive) = archive
        && let Some(checkpoint) = crate::checkpoint::latest(archive, shard, up_to, memory_max)?
    {
        return Ok(checkpoint);
    }
    source.require_full()?;
    Ok((MemKv::default(), ShardState::empty(shard)))
}

impl ReplayFrom {
    /// [`ReplayFrom::Genesis`] when `from_genesis`, else [`ReplayFrom::Checkpoint`].
    pub fn genesis_if(from_genesis: bool) -> Self {
        if from_genesis {
            Self::Genesis
        } else {
            Self::Checkpoint
        }
    }
}

/// What a verify found.
#[derive(Debug)]
pub struct Verified {
    /// The checkpoint the replay started from (`None`: index 1).
    pub from: Option<LogIndex>,
    /// The live state the comparison was made at.
    pub live: ShardState,
    /// The replay.
    pub rebuilt: Rebuilt,
    /// One comparison per projection asked for.
    pub comparisons: Vec<Comparison>,
}

/// Replays `shard`'s log from index 1 (or from the archive's newest checkpoint, with
/// [`ReplayFrom::Checkpoint`]) up to the applied index recorded in `db` and compares
/// `projections` with the live ones. `db` must not change meanwhile (a stopped node's database
/// or a RocksDB checkpoint). Entries purged from the live log are read from `archive`.
///
/// # Errors
/// An entry neither the log nor the archive holds ([`StorageError::MissingEntry`]), a damaged
/// checkpoint, storage faults.
pub fn verify(
    db: &std::sync::Arc<crate::Db>,
    shard: ShardId,
    (archive, from): (Option<&dyn SegmentStore>, ReplayFrom),
    projections: &[Projection],
    memory_max: usize,
    progress: &mut dyn FnMut(LogIndex, u64),
) -> Result<Verified> {
    let source = log_source(LogStore::new(db.clone(), shard), archive)?;
    verify_over(
        db,
        source.as_ref(),
        (archive, from),
        projections,
        memory_max,
        progress,
    )
}

/// [`replay_base`] then [`replay`] up to and including `up_to`: returns where the replay
/// started (index 0: from index 1; else the checkpoint's index) and the rebuilt state.
///
/// # Errors
/// As [`replay_base`] and [`replay`].
pub fn replay_up_to(
    source: &dyn LogSource,
    (archive, from): (Option<&dyn SegmentStore>, ReplayFrom),
    up_to: LogIndex,
    memory_max: usize,
    progress: &mut dyn FnMut(LogIndex, u64),
) -> Result<(LogIndex, Rebuilt)> {
    let base = replay_base(source, (archive, from), up_to, memory_max)?;
    let start = base.1.applied;
    Ok((start, replay(source, base, up_to, memory_max, progress)?))
}

/// [`verify`] with the log read from `source` rather than the replica's own log and archive:
/// for a harness that holds the log elsewhere (the simulation reads a replica's entries from
/// any replica that holds them, as it runs no archive).
///
/// # Errors
/// As [`verify`].
pub fn verify_over(
    db: &std::sync::Arc<crate::Db>,
    source: &dyn LogSource,
    (archive, from): (Option<&dyn SegmentStore>, ReplayFrom),
    projections: &[Projection],
    memory_max: usize,
    progress: &mut dyn FnMut(LogIndex, u64),
) -> Result<Verified> {
    let live = ShardState::load(db.as_ref(), source.shard())?;
    let (start, rebuilt) =
        replay_up_to(source, (archive, from), live.applied, memory_max, progress)?;
    let from = (start > LogIndex::new(0)).then_some(start);
    let comparisons = compare(
        db.as_ref(),
        &live,
        &rebuilt,
        projections,
        VERIFY_MISMATCHES_MAX,
    )?;
    Ok(Verified {
        from,
        live,
        rebuilt,
        comparisons,
    })
}
