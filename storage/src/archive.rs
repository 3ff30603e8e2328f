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
            return self.live.read_range(from, to);
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

impl SegmentStore for DirArchive {
    fn segments(&self, shard: ShardId) -> Result<Vec<(LogIndex, LogIndex)>> {
        let dir = self.dir.join(segment::shard_dir(shard));
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_fault("list", &error)),
        };
        let mut segments = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_fault("list", &e))?;
            if let Some(range) = entry
                .file_name()
                .to_str()
                .and_then(segment::parse_file_name)
            {
                segments.push(range);
            }
        }
        segments.sort_unstable();
        Ok(segments)
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
