//! The log as one sequence at any age: entries raft purged are read back from archive segments
//! ([`crate::segment`]), the rest from the live log. Replays (verify, rebuild) read through
//! [`LogSource`], so they work the same before and after purges.
//!
//! The archive store itself (a directory or a bucket, through `object_store`) lives in the node;
//! this crate sees it through [`SegmentStore`].

use std::cell::RefCell;

use courier_proto::{LogIndex, ShardId};

use crate::error::{Result, StorageError};
use crate::log::{LogRecord, LogStore};
use crate::segment;

/// Where a replay reads the log from.
pub trait LogSource {
    /// The shard whose log this is.
    fn shard(&self) -> ShardId;

    /// Entries `[from, to)` in order, starting at `from`; fewer when a segment or the live log
    /// ends first (the caller asks again from where it got to). An entry that should be there
    /// and is not is [`StorageError::MissingEntry`].
    ///
    /// # Errors
    /// Faults, and a missing entry.
    fn read_range(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogRecord>>;

    /// Checks that a replay from index 1 can read every entry.
    ///
    /// # Errors
    /// [`StorageError::MissingEntry`] naming the first entry neither the archive nor the live log
    /// holds.
    fn require_full(&self) -> Result<()>;

    /// The first and the last index this log can read (`None`: nothing at all). Between them a
    /// range may still be missing (a replica that never held it); reading it says which entry.
    ///
    /// # Errors
    /// Faults.
    fn bounds(&self) -> Result<Option<(LogIndex, LogIndex)>>;
}

impl LogSource for LogStore {
    fn shard(&self) -> ShardId {
        LogStore::shard(self)
    }

    fn read_range(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogRecord>> {
        LogStore::read_range(self, from, to)
    }

    fn require_full(&self) -> Result<()> {
        match self.first_index()? {
            Some(first) if first > LogIndex::new(1) => Err(StorageError::MissingEntry {
                shard: LogStore::shard(self),
                index: LogIndex::new(1),
            }),
            _ => Ok(()),
        }
    }

    fn bounds(&self) -> Result<Option<(LogIndex, LogIndex)>> {
        let Some(first) = self.first_index()? else {
            return Ok(None);
        };
        let last = self.last()?.map_or(first, |record| record.index);
        Ok(Some((first, last)))
    }
}

/// `live` alone, or the archive and `live` as one log when there is an archive.
///
/// # Errors
/// Listing the archive failed.
pub fn log_source<'a>(
    live: LogStore,
    archive: Option<&'a dyn SegmentStore>,
) -> Result<Box<dyn LogSource + 'a>> {
    Ok(match archive {
        Some(archive) => Box::new(ArchivedLog::new(live, archive)?),
        None => Box::new(live),
    })
}

/// Entries read at once by a walk over the log ([`for_each_entry`], replays).
pub const READ_BATCH_ENTRIES: u64 = 1024;

/// Calls `each` with every entry `from..=to` of `log`, in order, a batch at a time (what `log
/// dump`, `inspect` and `ReadLog` walk); stops early when `each` returns false.
///
/// # Errors
/// An entry in the range that `log` cannot read ([`StorageError::MissingEntry`]), faults, and
/// whatever `each` returns.
pub fn for_each_entry(
    log: &dyn LogSource,
    from: LogIndex,
    to: LogIndex,
    each: &mut dyn FnMut(&LogRecord) -> Result<bool>,
) -> Result<()> {
    let end = to.next();
    let mut at = from;
    while at < end {
        let until = at
            .checked_add(READ_BATCH_ENTRIES)
            .map_or(end, |until| until.min(end));
        let records = log.read_range(at, until)?;
        if records.first().map(|record| record.index) != Some(at) {
            return Err(StorageError::MissingEntry {
                shard: log.shard(),
                index: at,
            });
        }
        for record in &records {
            if !each(record)? {
                return Ok(());
            }
            at = record.index.next();
        }
    }
    Ok(())
}

/// Archived segments of the cluster's shards, read-only (implemented by the node over its
/// archive store; blocking calls, made from blocking threads).
pub trait SegmentStore: Send + Sync {
    /// `shard`'s archived segments as `(first, last)` index ranges, in order.
    ///
    /// # Errors
    /// The store failed.
    fn segments(&self, shard: ShardId) -> Result<Vec<(LogIndex, LogIndex)>>;

    /// The records of `shard`'s segment `first..=last`, verified.
    ///
    /// # Errors
    /// The store failed, or the segment is damaged (checksum) or not the one named.
    fn read_segment(
        &self,
        shard: ShardId,
        first: LogIndex,
        last: LogIndex,
    ) -> Result<Vec<LogRecord>>;

    /// The indexes of `shard`'s verify checkpoints (`crate::checkpoint`), in order.
    ///
    /// # Errors
    /// The store failed.
    fn checkpoints(&self, shard: ShardId) -> Result<Vec<LogIndex>>;

    /// The bytes of `shard`'s checkpoint at `index` (checked by `crate::checkpoint::decode`).
    ///
    /// # Errors
    /// The store failed.
    fn read_checkpoint(&self, shard: ShardId, index: LogIndex) -> Result<Vec<u8>>;
}

/// The archive and the live log of one shard as one log: entries below the live log's first
/// come from segments, one segment held in memory at a time.
pub struct ArchivedLog<'a> {
    live: LogStore,
    archive: &'a dyn SegmentStore,
    segments: Vec<(LogIndex, LogIndex)>,
    held: RefCell<Option<(LogIndex, Vec<LogRecord>)>>,
}

impl std::fmt::Debug for ArchivedLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchivedLog")
            .field("shard", &self.live.shard())
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

impl<'a> ArchivedLog<'a> {
    /// `live` with `archive` below it.
    ///
    /// # Errors
    /// Listing the archive failed.
    pub fn new(live: LogStore, archive: &'a dyn SegmentStore) -> Result<Self> {
        let segments = archive.segments(live.shard())?;
        Ok(Self {
            live,
            archive,
            segments,
            held: RefCell::new(None),
        })
    }

    /// The segment holding `index`.
    fn segment_of(&self, index: LogIndex) -> Option<(LogIndex, LogIndex)> {
        let at = self.segments.partition_point(|(first, _)| *first <= index);
        let (first, last) = *self.segments.get(at.checked_sub(1)?)?;
        (index <= last).then_some((first, last))
    }

    fn missing(&self, index: LogIndex) -> StorageError {
        StorageError::MissingEntry {
            shard: self.live.shard(),
            index,
        }
    }
}

impl LogSource for ArchivedLog<'_> {
    fn shard(&self) -> ShardId {
        self.live.shard()
    }

    fn read_range(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogRecord>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let live_first = self.live.first_index()?;
        if live_first.is_some_and(|first| first <= from) {
            // The live log may have a hole at `from`: a snapshot installed above the replica's
            // applied index deleted the entries between, and the archiver has not purged below
            // it yet. Those entries come from the archive, like purged ones.
            let records = self.live.read_run(from, to)?;
            if records.first().map(|record| record.index) == Some(from) {
                return Ok(records);
            }
        }
        let (first, last) = self.segment_of(from).ok_or_else(|| self.missing(from))?;
        let mut held = self.held.borrow_mut();
        if held.as_ref().is_none_or(|(at, _)| *at != first) {
            let records = self.archive.read_segment(self.shard(), first, last)?;
            *held = Some((first, records));
        }
        let (_, records) = held.as_ref().expect("just filled");
        let skip = usize::try_from(from.get().saturating_sub(first.get())).unwrap_or(usize::MAX);
        let take = usize::try_from(to.get().saturating_sub(from.get())).unwrap_or(usize::MAX);
        Ok(records.iter().skip(skip).take(take).cloned().collect())
    }

    fn require_full(&self) -> Result<()> {
        let live_first = self.live.first_index()?;
        let mut next = LogIndex::new(1);
        for (first, last) in &self.segments {
            if live_first.is_some_and(|live| live <= next) {
                return Ok(());
            }
            if *first > next {
                break;
            }
            next = next.max(last.next());
        }
        match live_first {
            Some(live) if live <= next => Ok(()),
            None => Ok(()),
            Some(_) => Err(self.missing(next)),
        }
    }

    fn bounds(&self) -> Result<Option<(LogIndex, LogIndex)>> {
        let archived = self
            .segments
            .first()
            .zip(self.segments.last())
            .map(|((first, _), (_, last))| (*first, *last));
        Ok(match (archived, self.live.bounds()?) {
            (None, live) => live,
            (archived, None) => archived,
            (Some((a_first, a_last)), Some((l_first, l_last))) => {
                Some((a_first.min(l_first), a_last.max(l_last)))
            }
        })
    }
}

/// An archive in a local directory, read with plain file reads: what the offline tools use on a
/// stopped node's archive (the node itself goes through `object_store`).
#[derive(Clone, Debug)]
pub struct DirArchive {
    dir: std::path::PathBuf,
}

impl DirArchive {
    /// The archive in `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

fn io_fault(op: &'static str, error: &std::io::Error) -> StorageError {
    StorageError::Disk {
        op,
        reason: format!("archive: {error}"),
    }
}

impl DirArchive {
    /// The names in `shard`'s directory that `parse` accepts, parsed and sorted.
    fn listed<T: Ord>(&self, shard: ShardId, parse: fn(&str) -> Option<T>) -> Result<Vec<T>> {
        let dir = self.dir.join(segment::shard_dir(shard));
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_fault("list", &error)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_fault("list", &e))?;
            if let Some(parsed) = entry.file_name().to_str().and_then(parse) {
                found.push(parsed);
            }
        }
        found.sort_unstable();
        Ok(found)
    }
}

impl SegmentStore for DirArchive {
    fn segments(&self, shard: ShardId) -> Result<Vec<(LogIndex, LogIndex)>> {
        self.listed(shard, segment::parse_file_name)
    }

    fn checkpoints(&self, shard: ShardId) -> Result<Vec<LogIndex>> {
        self.listed(shard, segment::parse_checkpoint_name)
    }

    fn read_checkpoint(&self, shard: ShardId, index: LogIndex) -> Result<Vec<u8>> {
        let path = self.dir.join(segment::checkpoint_name(shard, index));
        std::fs::read(&path).map_err(|e| io_fault("read", &e))
    }

    fn read_segment(
        &self,
        shard: ShardId,
        first: LogIndex,
        last: LogIndex,
    ) -> Result<Vec<LogRecord>> {
        let path = self.dir.join(segment::object_name(shard, first, last));
        let bytes = std::fs::read(&path).map_err(|e| io_fault("read", &e))?;
        segment::checked(shard, first, last, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testkit::opaque_records as records;
    use crate::{Db, OpenMode};

    const SHARD: ShardId = ShardId::new(2);

    /// Segments held in memory.
    struct MemSegments(Vec<Vec<LogRecord>>);

    impl SegmentStore for MemSegments {
        fn segments(&self, _: ShardId) -> Result<Vec<(LogIndex, LogIndex)>> {
            Ok(self
                .0
                .iter()
                .filter_map(|s| Some((s.first()?.index, s.last()?.index)))
                .collect())
        }

        fn read_segment(&self, _: ShardId, first: LogIndex, _: LogIndex) -> Result<Vec<LogRecord>> {
            self.0
                .iter()
                .find(|s| s.first().map(|r| r.index) == Some(first))
                .cloned()
                .ok_or(StorageError::MissingEntry {
                    shard: SHARD,
                    index: first,
                })
        }

        fn checkpoints(&self, _: ShardId) -> Result<Vec<LogIndex>> {
            Ok(Vec::new())
        }

        fn read_checkpoint(&self, _: ShardId, index: LogIndex) -> Result<Vec<u8>> {
            Err(StorageError::MissingEntry {
                shard: SHARD,
                index,
            })
        }
    }

    fn indexes(log: &dyn LogSource, to: u64) -> Result<Vec<u64>> {
        let mut seen = Vec::new();
        for_each_entry(log, LogIndex::new(1), LogIndex::new(to), &mut |record| {
            seen.push(record.index.get());
            Ok(true)
        })?;
        Ok(seen)
    }

    /// A replica that installed a snapshot above its applied index holds its live log with a
    /// hole (entries 11..=20 deleted) until the archiver purges below it: the hole is read from
    /// the archive, and without a segment there the read names the first missing entry.
    #[test]
    fn a_hole_in_the_live_log_is_read_from_the_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("opens"));
        let live = LogStore::new(db, SHARD);
        live.append(&records(1, 30)).expect("append");
        live.delete_between(LogIndex::new(11), LogIndex::new(21))
            .expect("delete");

        let run = live
            .read_run(LogIndex::new(1), LogIndex::new(31))
            .expect("run");
        assert_eq!(run, records(1, 10), "a run stops at the hole");
        assert!(matches!(
            live.read_range(LogIndex::new(1), LogIndex::new(31)),
            Err(StorageError::MissingEntry { index, .. }) if index == LogIndex::new(11)
        ));

        let archive = MemSegments(vec![records(1, 10), records(11, 20)]);
        let log = ArchivedLog::new(live.clone(), &archive).expect("archived log");
        let all: Vec<u64> = (1..=30).collect();
        assert_eq!(indexes(&log, 30).expect("whole log"), all);

        let without = MemSegments(vec![records(1, 10)]);
        let log = ArchivedLog::new(live, &without).expect("archived log");
        assert!(matches!(
            indexes(&log, 30),
            Err(StorageError::MissingEntry { index, .. }) if index == LogIndex::new(11)
        ));
    }
}
