//! The log archive: every replica copies its committed log, in fixed segments, into an archive
//! store (`object_store`: a directory, or an S3-compatible bucket) before raft's purge may delete
//! it, so verify, rebuild and inspect read the whole log at any age (`courier_storage::archive`).
//!
//! Decisions:
//! - **Each replica archives its own log**, not only the leader: purge is per replica, so each
//!   gates its own purge on what it archived, with no cross-node coordination. Segments are
//!   aligned (`[k·N + 1, (k + 1)·N]`) and their bytes are a function of the committed entries,
//!   so replicas sharing a store write identical objects; a write that finds the object already
//!   there checks it is the same.
//! - **Only entries this replica applied from its log**: entries at or below the applied index
//!   are committed. A range the replica never held (it installed a snapshot over it) is skipped
//!   and counted (`courier_archive_gaps_total`); another replica holds it.
//! - **Durable, then verified, then recorded**: a segment is written, fsynced (file and
//!   directory), read back and decoded (every checksum) before the replica's archived mark
//!   moves; only then may a purge delete those entries. A failing store stops purging and is
//!   counted; entries are never lost. A fault of the replica's own log met on the way (a
//!   checksum mismatch, a RocksDB error) stops the replica, as it would in raft's own reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use courier_archive::{ArchiveStore, checkpoint_path, segment_path, store_fault};
use courier_consensus::groups::Groups;
use courier_consensus::log_store::storage_index;
use courier_consensus::types::GroupId;
use courier_proto::{LogIndex, ShardId};
use courier_storage::archive::SegmentStore as _;
use courier_storage::segment;
use courier_storage::{LogRecord, LogStore, StorageError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ArchiveConfig;

/// Verify checkpoints kept per shard (the newest); older ones are deleted when one is written.
pub const CHECKPOINTS_KEPT: usize = 2;

/// What the archive did since the node started, for `/metrics`.
#[derive(Debug, Default)]
pub struct ArchiveCounters {
    /// Segments written (or found already written by another replica).
    pub segments: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Failed attempts (store errors, a segment that did not read back: purging waits; a fault
    /// of the replica's own log: the replica stopped).
    pub failures: AtomicU64,
    /// Ranges skipped because this replica never held them (installed by a snapshot).
    pub gaps: AtomicU64,
    /// Damaged segments (failing their checksum, or not segments at all) written again from
    /// this replica's log.
    pub repairs: AtomicU64,
}

/// This node's archive: its store and what the archiver did.
pub struct Archive {
    store: ArchiveStore,
    segment_entries: u64,
    counters: ArchiveCounters,
    /// Shards whose replica this archiver stopped over a fault of its log: later passes skip
    /// them (the replica stays stopped until the node restarts).
    stopped: std::sync::Mutex<std::collections::BTreeSet<ShardId>>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("location", &self.store.location())
            .field("segment_entries", &self.segment_entries)
            .finish_non_exhaustive()
    }
}

impl Archive {
    /// Opens the archive of `config`: its bucket (`[archive.s3]`), else its directory (created).
    ///
    /// # Errors
    /// The directory cannot be created or opened; the bucket's settings are refused.
    pub fn open(config: &ArchiveConfig) -> Result<Self, StorageError> {
        Ok(Self {
            store: ArchiveStore::open(&config.dir, config.s3.as_ref())?,
            segment_entries: config.segment_entries,
            counters: ArchiveCounters::default(),
            stopped: std::sync::Mutex::default(),
        })
    }

    /// The store, which replays read as a `SegmentStore`.
    pub fn store(&self) -> &ArchiveStore {
        &self.store
    }

    /// Counters for `/metrics`.
    pub fn counters(&self) -> &ArchiveCounters {
        &self.counters
    }

    /// Whether this archiver stopped `shard`'s replica over a fault of its log.
    fn is_stopped(&self, shard: ShardId) -> bool {
        self.stopped
            .lock()
            .expect("archive lock is never poisoned")
            .contains(&shard)
    }

    /// The last index of the aligned segment that holds `index`.
    fn segment_end(&self, index: LogIndex) -> LogIndex {
        let n = self.segment_entries;
        LogIndex::new(
            index
                .get()
                .saturating_sub(1)
                .checked_div(n)
                .unwrap_or(0)
                .saturating_add(1)
                .saturating_mul(n),
        )
    }

    /// The end of the segments a replica whose log (from some index on) starts at `held` never
    /// holds whole: those wholly below `held`, and `held`'s own unless `held` starts it; at most
    /// the last whole segment at or below `applied`.
    fn gap_below(&self, held: LogIndex, applied: LogIndex) -> LogIndex {
        let n = self.segment_entries.max(1);
        let own_end = self.segment_end(held).get();
        let own_start = own_end.saturating_sub(n).saturating_add(1);
        let gap_end = if held.get() == own_start {
            own_start.saturating_sub(1)
        } else {
            own_end
        };
        LogIndex::new(gap_end.min(applied.get() / n * n))
    }

    /// Writes `records` (one whole segment of `shard`) durably and verifies it read back. An
    /// object already there must hold the same entries; one that is damaged (it fails its
    /// checksum or is no segment: bit rot, a copy cut short) is written again from `records`,
    /// which are the committed entries it held: left as it is, it would stop every replica's
    /// archiving and purging of the shard for good.
    async fn put_segment(&self, shard: ShardId, records: &[LogRecord]) -> Result<(), StorageError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let path = segment_path(shard, first.index, last.index);
        let bytes = segment::encode(shard, records);
        let existing = match self.store.fetch(&path).await? {
            Some(existing) => match segment::decode(shard, &existing) {
                Ok((_, stored)) => Some(stored),
                Err(error) => {
                    warn!(%shard, %path, %error, "a damaged archive segment is written again from this replica's log");
                    self.counters.repairs.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
            None => None,
        };
        if let Some(stored) = existing {
            if stored != records {
                return Err(store_fault(
                    "compare",
                    format!("{path} holds other entries than this replica's log"),
                ));
            }
            // Found, not written by this call: a put that died between the store's rename and
            // its fsync leaves such an object; it must be durable before the log is purged.
            self.store.sync(&path)?;
            self.counters.segments.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let len = bytes.len();
        self.store.put(&path, bytes).await?;
        let back = self
            .store
            .fetch(&path)
            .await?
            .ok_or_else(|| store_fault("verify", format!("{path} is gone after its write")))?;
        let (_, stored) = segment::decode(shard, &back)?;
        if stored != records {
            return Err(store_fault("verify", format!("{path} did not read back")));
        }
        self.counters.segments.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(u64::try_from(len).unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(())
    }

    /// Writes `shard`'s verify checkpoint at `index` durably (blocking: from a blocking thread).
    /// Checkpoints are a function of the log, so a replica writing the same index writes the
    /// same bytes.
    ///
    /// # Errors
    /// The store failed.
    pub fn put_checkpoint(
        &self,
        shard: ShardId,
        index: LogIndex,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        let store = &self.store;
        store.block_on(store.put(&checkpoint_path(shard, index), bytes))?;
        // Older checkpoints are superseded: keep a few, so the archive does not grow by one
        // shard state per verify.
        let all = store.block_on(store.list(shard, segment::parse_checkpoint_name))?;
        let stale = all.len().saturating_sub(CHECKPOINTS_KEPT);
        for old in all.into_iter().take(stale) {
            store.block_on(store.delete(&checkpoint_path(shard, old)))?;
        }
        Ok(())
    }

    /// One pass over `log`: archives every whole segment at or below `applied`, then deletes
    /// what raft purged (`purged`, a storage index) and the archive now holds.
    async fn archive_log(
        &self,
        log: &LogStore,
        applied: LogIndex,
        purged: Option<LogIndex>,
    ) -> Result<(), PassError> {
        use PassError::Local;
        let shard = log.shard();
        loop {
            let next = log.archived_up_to().map_err(Local)?.next();
            let end = self.segment_end(next);
            if end > applied {
                break;
            }
            // A hole (a snapshot installed above the applied index deleted what lay between)
            // makes the segment not whole: a gap, like entries this replica never held.
            let records = log.read_run(next, end.next()).map_err(Local)?;
            let whole = u64::try_from(records.len()).ok()
                == Some(end.get().saturating_sub(next.get()).saturating_add(1));
            if records.first().map(|r| r.index) != Some(next) || !whole {
                // Not all of it is here: this replica got these entries by a snapshot. One gap
                // reaches to the segment before the first entry held from `next` on (or the
                // last segment at or below `applied`), not one segment per pass of the loop: a
                // replica joining at index 10⁸ would otherwise write a mark and a warning for
                // each of its millions of missing entries' segments.
                let held = match records.first() {
                    Some(record) => Some(record.index),
                    None => log.first_index().map_err(Local)?,
                };
                let gap_end = match held {
                    Some(held) if held > next => self.gap_below(held, applied).max(end),
                    _ => end,
                };
                self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                warn!(
                    %shard,
                    from = next.get(),
                    to = gap_end.get(),
                    "archive gap: this replica never held these entries"
                );
                log.set_archived_up_to(gap_end).map_err(Local)?;
                continue;
            }
            self.put_segment(shard, &records)
                .await
                .map_err(PassError::Store)?;
            log.set_archived_up_to(end).map_err(Local)?;
        }
        if let Some(purged) = purged {
            let up_to = purged.min(log.archived_up_to().map_err(Local)?);
            if let Some(first) = log.first_index().map_err(Local)?
                && first <= up_to
            {
                log.purge_up_to(up_to).map_err(Local)?;
            }
        }
        Ok(())
    }
}

/// Why an archive pass over one shard's log stopped.
#[derive(Debug)]
enum PassError {
    /// The replica's own log or marks failed: a checksum mismatch, a RocksDB or fsync fault, an
    /// entry missing inside what it applied. A fault of the replica, which stops it.
    Local(StorageError),
    /// The archive store failed, or holds other bytes than this log: retried on the next pass,
    /// and purging waits (entries are never lost).
    Store(StorageError),
}

/// The runs of `[from, to]` (inclusive) that none of `segments` (sorted, inclusive, as the store
/// lists them) covers.
pub fn not_covered(
    segments: &[(LogIndex, LogIndex)],
    from: LogIndex,
    to: LogIndex,
) -> Vec<(LogIndex, LogIndex)> {
    let mut runs = Vec::new();
    let mut next = from;
    for &(first, last) in segments {
        if next > to {
            break;
        }
        if last < next {
            continue;
        }
        if first > next {
            runs.push((next, LogIndex::new(first.get().saturating_sub(1)).min(to)));
        }
        next = last.next();
    }
    if next <= to {
        runs.push((next, to));
    }
    runs
}

/// The segments of `shard` in this node's archive (none without one).
fn archived(
    archive: Option<&Archive>,
    shard: ShardId,
) -> Result<Vec<(LogIndex, LogIndex)>, StorageError> {
    match archive {
        Some(archive) => archive.store.segments(shard),
        None => Ok(Vec::new()),
    }
}

/// What of `shard` only this node's replica keeps: the first and last of its committed entries
/// (stored, at or below the applied index) that its archive does not hold, or `None`. A move
/// checks another voter gives these back before it deletes the replica (blocking: from a
/// blocking thread).
///
/// # Errors
/// The replica has a log here but is not running (a fault: a move deletes only a replica it
/// runs); the store or the log failed.
pub fn only_in_log(
    groups: &Groups,
    archive: Option<&Archive>,
    shard: ShardId,
) -> Result<Option<(LogIndex, LogIndex)>, StorageError> {
    let log = LogStore::new(groups.db().clone(), shard);
    let Some(handle) = groups.get(GroupId::Shard(shard)) else {
        // Deleted already (a move sent again after its delete): nothing is left to lose.
        return match log.first_index()? {
            None => Ok(None),
            Some(_) => Err(store_fault(
                "check",
                format!("{shard} has a log on this node but no running replica"),
            )),
        };
    };
    only_in(&log, handle.applied_index(), &archived(archive, shard)?)
}

/// [`only_in_log`] over `log`, applied up to `applied`, with `segments` archived.
fn only_in(
    log: &LogStore,
    applied: LogIndex,
    segments: &[(LogIndex, LogIndex)],
) -> Result<Option<(LogIndex, LogIndex)>, StorageError> {
    let Some(first) = log.first_index()? else {
        return Ok(None);
    };
    if first > applied {
        return Ok(None);
    }
    let runs = not_covered(segments, first, applied);
    Ok(runs
        .first()
        .map(|first| first.0)
        .zip(runs.last().map(|last| last.1)))
}

/// Whether this node gives back every committed entry of `shard` in `[from, to]`: each is in
/// its archive, or in its replica's log at or below the applied index (entries a replica
/// applied are committed ones). Answers a move's old node (blocking: from a blocking thread).
///
/// # Errors
/// The store or the log failed.
pub fn gives_back(
    groups: &Groups,
    archive: Option<&Archive>,
    shard: ShardId,
    (from, to): (LogIndex, LogIndex),
) -> Result<bool, StorageError> {
    let Some(handle) = groups.get(GroupId::Shard(shard)) else {
        return Ok(false);
    };
    let log = LogStore::new(groups.db().clone(), shard);
    gives_back_from(
        &log,
        handle.applied_index(),
        (
            &archived(archive, shard)?,
            archive.map_or(0, |archive| archive.segment_entries),
        ),
        (from, to),
    )
}

/// [`gives_back`] from `log`, applied up to `applied`, with `segments` archived in segments of
/// `segment_entries` (0: no archive). What the archive lacks must be in the log from the start
/// of its segment: a log that starts inside a segment never archives it (the archiver takes
/// the segment for a gap and purges those entries unarchived).
fn gives_back_from(
    log: &LogStore,
    applied: LogIndex,
    (segments, segment_entries): (&[(LogIndex, LogIndex)], u64),
    (from, to): (LogIndex, LogIndex),
) -> Result<bool, StorageError> {
    for (first, last) in not_covered(segments, from, to) {
        let start = segment_start(first, segment_entries);
        if last > applied || !log.stores_every(start, last)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The first index of the aligned segment of `segment_entries` that holds `index` (`index`
/// itself when 0).
fn segment_start(index: LogIndex, segment_entries: u64) -> LogIndex {
    match index.get().saturating_sub(1).checked_div(segment_entries) {
        Some(k) => LogIndex::new(k.saturating_mul(segment_entries).saturating_add(1)),
        None => index,
    }
}

/// Runs the archiver of this node until `shutdown`: every `interval`, each shard replica here
/// archives its whole segments and deletes what raft purged and the archive holds.
pub async fn run(
    groups: Arc<Groups>,
    archive: Arc<Archive>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    info!(location = %archive.store.location(), segment_entries = archive.segment_entries, "log archive on");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        // RocksDB reads and writes and the segments' fsyncs block: off the async workers.
        let pass = {
            let (groups, archive) = (groups.clone(), archive.clone());
            tokio::task::spawn_blocking(move || archive_pass(&groups, &archive))
        };
        if let Err(error) = pass.await {
            warn!(%error, "archive pass did not finish");
        }
    }
}

/// One pass over every shard replica of this node (on a blocking thread).
fn archive_pass(groups: &Groups, archive: &Archive) {
    let Some(shard_count) = groups.shard_count() else {
        return;
    };
    for shard in (0..shard_count).map(ShardId::new) {
        // Held across the shard's pass: a replica being dropped (`Groups::drop_shard`) waits
        // for it, and a dropped one is not here any more, so no pass writes after its delete.
        let _fence = groups.archive_fence().blocking_lock();
        let Some(handle) = groups.get(GroupId::Shard(shard)) else {
            continue;
        };
        if archive.is_stopped(shard) {
            continue;
        }
        let applied = handle.applied_index();
        let purged = handle.state().purged_index.map(storage_index);
        let log = LogStore::new(groups.db().clone(), shard);
        match archive
            .store
            .block_on(archive.archive_log(&log, applied, purged))
        {
            Ok(()) => {}
            Err(PassError::Store(error)) => {
                archive.counters.failures.fetch_add(1, Ordering::Relaxed);
                warn!(%shard, %error, "archiving failed; purging waits for it");
            }
            Err(PassError::Local(error)) => {
                // As a fault met by raft's own reads and writes would: the replica stops (its
                // group's raft core shuts down), never serving or voting past corrupt data.
                archive.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%shard, %error, "the replica's log failed while archiving; the replica stops (replace it: RUNBOOK, \"The log archive\")");
                archive
                    .stopped
                    .lock()
                    .expect("archive lock is never poisoned")
                    .insert(shard);
                if let Err(error) = archive.store.block_on(handle.raft.shutdown()) {
                    warn!(%shard, %error, "raft group did not stop cleanly");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use courier_storage::{Db, OpenMode};

    use super::*;
    use courier_storage::testkit::opaque_records as records;

    /// An archive in `dir/archive` with segments of 10 entries.
    fn test_archive(dir: &std::path::Path) -> Archive {
        Archive::open(&ArchiveConfig {
            dir: dir.join("archive"),
            s3: None,
            segment_entries: 10,
            interval: Duration::from_millis(250),
        })
        .expect("archive")
    }

    /// `shard`'s log in a new database at `path`, holding entries `first..=last`.
    fn log_holding(path: &std::path::Path, shard: ShardId, (first, last): (u64, u64)) -> LogStore {
        let db = Arc::new(Db::open(path, OpenMode::ReadWrite).expect("opens"));
        let log = LogStore::new(db, shard);
        log.append(&records(first, last)).expect("append");
        log
    }

    fn at(first: u64, last: u64) -> (LogIndex, LogIndex) {
        (LogIndex::new(first), LogIndex::new(last))
    }

    #[test]
    fn not_covered_is_what_no_segment_holds() {
        let segments = [at(1, 10), at(21, 30), at(31, 40)];
        let runs = |from, to| not_covered(&segments, LogIndex::new(from), LogIndex::new(to));
        assert_eq!(runs(1, 40), vec![at(11, 20)]);
        assert_eq!(runs(5, 45), vec![at(11, 20), at(41, 45)]);
        assert_eq!(runs(12, 15), vec![at(12, 15)], "inside the missing segment");
        assert_eq!(runs(22, 38), Vec::new(), "wholly archived");
        assert_eq!(
            not_covered(&[], LogIndex::new(3), LogIndex::new(7)),
            vec![at(3, 7)]
        );
    }

    /// A move's old node, applied to 35 with segments 1..=20 archived, has 21..=35 on its log
    /// only. A voter gives them back when its log holds all of them at or below its applied
    /// index (from their segment's start), or its archive holds what its log lacks; not with a
    /// hole, a purge past 21 (and no segment), a log from inside the segment, or entries it has
    /// not applied yet (they may not be the committed ones).
    #[tokio::test]
    async fn what_only_a_leaving_replica_holds_and_who_gives_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(&dir.path().join("db"), OpenMode::ReadWrite).expect("opens"));
        let log = |shard: u16| LogStore::new(db.clone(), ShardId::new(shard));
        let leaving = log(1);
        leaving.append(&records(1, 40)).expect("append");
        let archived = [at(1, 10), at(11, 20)];
        assert_eq!(
            only_in(&leaving, LogIndex::new(35), &archived).expect("reads"),
            Some(at(21, 35))
        );
        assert_eq!(
            only_in(&leaving, LogIndex::new(20), &archived).expect("reads"),
            None,
            "all it applied is archived"
        );

        let range = at(21, 35);
        let applied = LogIndex::new(40);
        let whole = log(2);
        whole.append(&records(15, 40)).expect("append");
        assert!(gives_back_from(&whole, applied, (&[], 10), range).expect("reads"));
        assert!(
            !gives_back_from(&whole, LogIndex::new(30), (&[], 10), range).expect("reads"),
            "not applied up to 35"
        );
        let holed = log(3);
        holed.append(&records(15, 40)).expect("append");
        holed
            .delete_between(LogIndex::new(25), LogIndex::new(28))
            .expect("delete");
        assert!(!gives_back_from(&holed, applied, (&[], 10), range).expect("reads"));
        let purged = log(4);
        purged.append(&records(31, 40)).expect("append");
        assert!(!gives_back_from(&purged, applied, (&[], 10), range).expect("reads"));
        assert!(
            gives_back_from(&purged, applied, (&[at(21, 30)], 10), range).expect("reads"),
            "its archive holds what its log lacks"
        );
        let mid_segment = log(5);
        mid_segment.append(&records(23, 40)).expect("append");
        assert!(
            !gives_back_from(&mid_segment, applied, (&[], 10), at(23, 35)).expect("reads"),
            "a log from inside segment 21..=30 would take it for a gap and never archive it"
        );
        assert!(
            gives_back_from(&mid_segment, applied, (&[], 0), at(23, 35)).expect("reads"),
            "without an archive nothing is purged, so the log keeps them"
        );
    }

    /// A replica that installed a snapshot above its applied index has a hole in its log
    /// (`delete_between`): the segments the hole touches are gaps (another replica archives
    /// them), the whole ones around it are archived, and the purge goes on past the hole. Before,
    /// the read of a segment that held entries and then the hole failed, every pass, so this
    /// replica never archived or purged again.
    #[tokio::test]
    async fn a_hole_left_by_a_snapshot_is_a_gap_not_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shard = ShardId::new(1);
        let log = log_holding(&dir.path().join("db"), shard, (1, 40));
        // Applied up to 12, then a snapshot at 17 installed: 13..=17 deleted.
        log.delete_between(LogIndex::new(13), LogIndex::new(18))
            .expect("delete");
        let archive = test_archive(dir.path());

        archive
            .archive_log(&log, LogIndex::new(40), Some(LogIndex::new(17)))
            .await
            .expect("a hole is no failure");

        let segments = archive
            .store
            .list(shard, segment::parse_file_name)
            .await
            .expect("list");
        assert_eq!(
            segments,
            vec![
                (LogIndex::new(1), LogIndex::new(10)),
                (LogIndex::new(21), LogIndex::new(30)),
                (LogIndex::new(31), LogIndex::new(40))
            ]
        );
        assert_eq!(archive.counters().gaps.load(Ordering::Relaxed), 1);
        assert_eq!(log.archived_up_to().expect("mark"), LogIndex::new(40));
        assert_eq!(
            log.first_index().expect("first"),
            Some(LogIndex::new(18)),
            "purged up to raft's purge point, past the hole"
        );
    }
    /// A replica that joined by a snapshot holds its log from index 95 on: the segments below
    /// (1..=100, 95 being inside 91..=100) are one gap, marked at once, not ten passes of a mark
    /// and a warning each; the whole segments from 101 on are archived.
    #[tokio::test]
    async fn a_log_that_starts_late_is_one_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shard = ShardId::new(1);
        let log = log_holding(&dir.path().join("db"), shard, (95, 135));
        let archive = test_archive(dir.path());

        archive
            .archive_log(&log, LogIndex::new(135), None)
            .await
            .expect("archived");

        assert_eq!(archive.counters().gaps.load(Ordering::Relaxed), 1);
        assert_eq!(log.archived_up_to().expect("mark"), LogIndex::new(130));
        let segments = archive
            .store
            .list(shard, segment::parse_file_name)
            .await
            .expect("list");
        assert_eq!(segments, vec![at(101, 110), at(111, 120), at(121, 130)]);

        let starts_a_segment = log_holding(&dir.path().join("db2"), shard, (101, 112));
        let other = test_archive(&dir.path().join("other"));
        other
            .archive_log(&starts_a_segment, LogIndex::new(112), None)
            .await
            .expect("archived");
        assert_eq!(other.counters().gaps.load(Ordering::Relaxed), 1);
        assert_eq!(
            starts_a_segment.archived_up_to().expect("mark"),
            LogIndex::new(110),
            "101..=110 is whole: archived, not a gap"
        );
    }

    /// A segment object that is damaged (here: not a segment at all) is written again from the
    /// replica's log, which holds the same committed entries, instead of failing every pass and
    /// holding back archiving and purging for good.
    #[tokio::test]
    async fn a_damaged_segment_is_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shard = ShardId::new(1);
        let log = log_holding(&dir.path().join("db"), shard, (1, 25));
        let archive = test_archive(dir.path());
        let path = segment_path(shard, LogIndex::new(1), LogIndex::new(10));
        archive
            .store
            .put(&path, b"not a segment".to_vec())
            .await
            .expect("put");

        archive
            .archive_log(&log, LogIndex::new(25), Some(LogIndex::new(20)))
            .await
            .expect("repaired and archived");

        assert_eq!(archive.counters().repairs.load(Ordering::Relaxed), 1);
        let bytes = archive
            .store
            .fetch(&path)
            .await
            .expect("fetch")
            .expect("there");
        let (_, stored) = segment::decode(shard, &bytes).expect("a segment again");
        assert_eq!(stored, records(1, 10));
        assert_eq!(log.archived_up_to().expect("mark"), LogIndex::new(20));
        assert_eq!(log.first_index().expect("first"), Some(LogIndex::new(21)));
    }

    /// A committed entry that fails its checksum while the archiver reads it is a fault of the
    /// replica (which then stops), not a store failure to retry; nothing is archived past it and
    /// nothing is purged.
    #[tokio::test]
    async fn a_corrupt_entry_in_the_log_is_a_fault_of_the_replica_not_of_the_store() {
        use courier_storage::kv::Change;
        use courier_storage::{Cf, ReadKv as _};

        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(&dir.path().join("db"), OpenMode::ReadWrite).expect("opens"));
        let shard = ShardId::new(1);
        let log = LogStore::new(db.clone(), shard);
        log.append(&records(1, 30)).expect("append");
        let key = courier_storage::keys::log_entry(shard, LogIndex::new(15));
        let mut value = db.get(Cf::Log, &key).expect("get").expect("stored");
        let last = value.len().saturating_sub(1);
        value[last] ^= 0x01;
        let change: Change = (Cf::Log, key, Some(value));
        db.commit([change], true).expect("overwrite");
        let archive = test_archive(dir.path());

        let error = archive
            .archive_log(&log, LogIndex::new(30), Some(LogIndex::new(30)))
            .await
            .expect_err("the corrupt entry is met");

        assert!(
            matches!(error, PassError::Local(StorageError::Checksum { .. })),
            "{error:?}"
        );
        assert_eq!(log.archived_up_to().expect("mark"), LogIndex::new(10));
        assert_eq!(
            log.first_index().expect("first"),
            Some(LogIndex::new(1)),
            "nothing purged"
        );
    }
}
