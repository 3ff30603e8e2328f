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
///
/// The segments are listed when it is made, and again when an entry is in neither the live log
/// nor the segments listed: a replay of a busy shard takes long enough for the archiver to write
/// new segments and purge the live log past where the first listing ended.
pub struct ArchivedLog<'a> {
    live: LogStore,
    archive: &'a dyn SegmentStore,
    segments: RefCell<Vec<(LogIndex, LogIndex)>>,
    held: RefCell<Option<(LogIndex, Vec<LogRecord>)>>,
}

impl std::fmt::Debug for ArchivedLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchivedLog")
            .field("shard", &self.live.shard())
            .field("segments", &self.segments.borrow().len())
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
            segments: RefCell::new(segments),
            held: RefCell::new(None),
        })
    }

    /// The segment holding `index`, listing the archive again when none listed so far does.
    ///
    /// # Errors
    /// Listing the archive failed, or no segment holds `index`.
    fn segment_of(&self, index: LogIndex) -> Result<(LogIndex, LogIndex)> {
        let find = |segments: &[(LogIndex, LogIndex)]| {
            let at = segments.partition_point(|(first, _)| *first <= index);
            let (first, last) = *segments.get(at.checked_sub(1)?)?;
            (index <= last).then_some((first, last))
        };
        if let Some(segment) = find(&self.segments.borrow()) {
            return Ok(segment);
        }
        let listed = self.archive.segments(self.shard())?;
        let found = find(&listed);
        *self.segments.borrow_mut() = listed;
        found.ok_or_else(|| self.missing(index))
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
        let (first, last) = self.segment_of(from)?;
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
        let mut hole = false;
        for (first, last) in self.segments.borrow().iter() {
            if live_first.is_some_and(|live| live <= next) {
                return Ok(());
            }
            if *first > next {
                hole = true;
                break;
            }
            next = next.max(last.next());
        }
        match live_first {
            Some(live) if live <= next => Ok(()),
            // No live log: the segments alone, from index 1 without a hole.
            None if !hole => Ok(()),
            _ => Err(self.missing(next)),
        }
    }

    fn bounds(&self) -> Result<Option<(LogIndex, LogIndex)>> {
        let segments = self.segments.borrow();
        let archived = segments
            .first()
            .zip(segments.last())
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

    /// Segments held in memory (more may be written while a log reads them).
    struct MemSegments(std::sync::Mutex<Vec<Vec<LogRecord>>>);

    fn segments(held: Vec<Vec<LogRecord>>) -> MemSegments {
        MemSegments(std::sync::Mutex::new(held))
    }

    impl SegmentStore for MemSegments {
        fn segments(&self, _: ShardId) -> Result<Vec<(LogIndex, LogIndex)>> {
            Ok(self
                .0
                .lock()
                .expect("not poisoned")
                .iter()
                .filter_map(|s| Some((s.first()?.index, s.last()?.index)))
                .collect())
        }

        fn read_segment(&self, _: ShardId, first: LogIndex, _: LogIndex) -> Result<Vec<LogRecord>> {
            self.0
                .lock()
                .expect("not poisoned")
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

    /// An empty log of `SHARD` in a new database in `dir`.
    fn live_log(dir: &std::path::Path) -> LogStore {
        LogStore::new(
            Arc::new(Db::open(dir, OpenMode::ReadWrite).expect("opens")),
            SHARD,
        )
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
        let live = live_log(dir.path());
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

        let archive = segments(vec![records(1, 10), records(11, 20)]);
        let log = ArchivedLog::new(live.clone(), &archive).expect("archived log");
        let all: Vec<u64> = (1..=30).collect();
        assert_eq!(indexes(&log, 30).expect("whole log"), all);

        let without = segments(vec![records(1, 10)]);
        let log = ArchivedLog::new(live, &without).expect("archived log");
        assert!(matches!(
            indexes(&log, 30),
            Err(StorageError::MissingEntry { index, .. }) if index == LogIndex::new(11)
        ));
    }

    /// A replay of a busy shard outlasts the archive listing it started with: the archiver
    /// writes new segments and purges the live log past them meanwhile. The read lists the
    /// archive again instead of calling the purged entries missing.
    #[test]
    fn segments_written_during_a_read_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_log(dir.path());
        live.append(&records(11, 30)).expect("append");
        let archive = segments(vec![records(1, 10)]);
        let log = ArchivedLog::new(live.clone(), &archive).expect("archived log");
        assert_eq!(
            log.read_range(LogIndex::new(1), LogIndex::new(3))
                .expect("read")
                .len(),
            2
        );

        archive
            .0
            .lock()
            .expect("not poisoned")
            .push(records(11, 20));
        live.delete_between(LogIndex::new(11), LogIndex::new(21))
            .expect("purge");
        let got = log
            .read_range(LogIndex::new(11), LogIndex::new(21))
            .expect("listed again");
        let got: Vec<u64> = got.iter().map(|record| record.index.get()).collect();
        assert_eq!(got, (11..=20).collect::<Vec<_>>());
        assert!(matches!(
            log.read_range(LogIndex::new(31), LogIndex::new(32)),
            Err(StorageError::MissingEntry { index, .. }) if index == LogIndex::new(31)
        ));
    }

    /// With no live log, the log is whole only when the segments run from index 1 without a hole.
    #[test]
    fn without_a_live_log_the_segments_alone_must_be_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_log(dir.path());
        let whole = segments(vec![records(1, 10), records(11, 20)]);
        let log = ArchivedLog::new(live.clone(), &whole).expect("archived log");
        log.require_full().expect("1..=20 from the archive");
        for (held, missing) in [
            (vec![records(11, 20)], 1),
            (vec![records(1, 10), records(21, 30)], 11),
        ] {
            let holes = segments(held);
            let log = ArchivedLog::new(live.clone(), &holes).expect("archived log");
            assert!(matches!(
                log.require_full(),
                Err(StorageError::MissingEntry { index, .. }) if index == LogIndex::new(missing)
            ));
        }
    }
}
