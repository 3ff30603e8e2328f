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
//!   counted; entries are never lost.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use courier_consensus::groups::Groups;
use courier_consensus::log_store::storage_index;
use courier_consensus::types::GroupId;
use courier_proto::{LogIndex, ShardId};
use courier_storage::archive::SegmentStore;
use courier_storage::segment;
use courier_storage::{LogRecord, LogStore, StorageError};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ArchiveConfig, S3Archive};

/// Verify checkpoints kept per shard (the newest); older ones are deleted when one is written.
pub const CHECKPOINTS_KEPT: usize = 2;

/// What the archive did since the node started, for `/metrics`.
#[derive(Debug, Default)]
pub struct ArchiveCounters {
    /// Segments written (or found already written by another replica).
    pub segments: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Failed attempts (store errors, a segment that did not read back): purging waits.
    pub failures: AtomicU64,
    /// Ranges skipped because this replica never held them (installed by a snapshot).
    pub gaps: AtomicU64,
}

/// The archive store of this node.
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    /// The directory of a local store (its writes are fsynced); `None` for a bucket, where a
    /// write that answered is durable.
    local: Option<PathBuf>,
    /// Where the archive is, for logs (`dir` or `s3://bucket/prefix`).
    location: String,
    segment_entries: u64,
    runtime: tokio::runtime::Handle,
    counters: ArchiveCounters,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("location", &self.location)
            .field("segment_entries", &self.segment_entries)
            .finish_non_exhaustive()
    }
}

/// The object of `shard`'s segment `first..=last` (`courier_storage::segment::object_name`).
fn object_path(shard: ShardId, first: LogIndex, last: LogIndex) -> ObjectPath {
    ObjectPath::from(segment::object_name(shard, first, last))
}

fn store_fault(op: &'static str, error: impl std::fmt::Display) -> StorageError {
    StorageError::Disk {
        op,
        reason: format!("archive: {error}"),
    }
}

impl Archive {
    /// Opens the archive of `config`: its bucket (`[archive.s3]`), else its directory (created).
    ///
    /// # Errors
    /// The directory cannot be created or opened; the bucket's settings are refused.
    pub fn open(config: &ArchiveConfig) -> Result<Self, StorageError> {
        let (store, local, location): (Arc<dyn ObjectStore>, _, _) = match &config.s3 {
            Some(s3) => {
                let store = s3_store(s3)?;
                let location = format!("s3://{}/{}", s3.bucket, s3.prefix);
                (store, None, location)
            }
            None => {
                std::fs::create_dir_all(&config.dir)
                    .map_err(|e| store_fault("create archive dir", e))?;
                let store = LocalFileSystem::new_with_prefix(&config.dir)
                    .map_err(|e| store_fault("open archive", e))?;
                let location = config.dir.display().to_string();
                (Arc::new(store), Some(config.dir.clone()), location)
            }
        };
        Ok(Self {
            store,
            local,
            location,
            segment_entries: config.segment_entries,
            runtime: tokio::runtime::Handle::current(),
            counters: ArchiveCounters::default(),
        })
    }

    /// Counters for `/metrics`.
    pub fn counters(&self) -> &ArchiveCounters {
        &self.counters
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

    /// Writes `records` (one whole segment of `shard`) durably and verifies it read back. An
    /// object already there must hold the same entries.
    async fn put_segment(&self, shard: ShardId, records: &[LogRecord]) -> Result<(), StorageError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let path = object_path(shard, first.index, last.index);
        let bytes = segment::encode(shard, records);
        if let Some(existing) = self.fetch(&path).await? {
            let (_, stored) = segment::decode(shard, &existing)?;
            if stored != records {
                return Err(store_fault(
                    "compare",
                    format!("{path} holds other entries than this replica's log"),
                ));
            }
            self.counters.segments.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let len = bytes.len();
        self.store
            .put(&path, bytes.into())
            .await
            .map_err(|e| store_fault("put", e))?;
        self.sync(&path)?;
        let back = self
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

    /// The bytes of the object at `path`; `None` when there is none.
    async fn fetch(&self, path: &ObjectPath) -> Result<Option<bytes::Bytes>, StorageError> {
        match self.store.get(path).await {
            Ok(object) => object
                .bytes()
                .await
                .map(Some)
                .map_err(|e| store_fault("read", e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(store_fault("get", error)),
        }
    }

    /// The bytes of the object at `path`, which must be there (blocking: from a blocking thread).
    fn fetch_existing(&self, path: &ObjectPath) -> Result<bytes::Bytes, StorageError> {
        self.runtime
            .block_on(self.fetch(path))?
            .ok_or_else(|| store_fault("get", format!("{path} is not in the archive")))
    }

    /// Makes a written object durable: fsync of the file and of its directory in a local store
    /// (a bucket's write is durable once it answered).
    fn sync(&self, path: &ObjectPath) -> Result<(), StorageError> {
        let Some(dir) = &self.local else {
            return Ok(());
        };
        let file = dir.join(path.as_ref());
        let sync = |p: &std::path::Path| {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|e| store_fault("fsync", e))
        };
        sync(&file)?;
        match file.parent() {
            Some(dir) => sync(dir),
            None => Ok(()),
        }
    }

    /// The objects in `shard`'s directory whose names `parse` accepts, parsed and sorted.
    async fn list<T: Ord>(
        &self,
        shard: ShardId,
        parse: fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, StorageError> {
        use futures_util::TryStreamExt as _;
        let prefix = ObjectPath::from(segment::shard_dir(shard));
        let objects: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| store_fault("list", e))?;
        let mut found: Vec<T> = objects
            .iter()
            .filter_map(|object| parse(object.location.filename()?))
            .collect();
        found.sort_unstable();
        Ok(found)
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
        let path = ObjectPath::from(segment::checkpoint_name(shard, index));
        self.runtime.block_on(async {
            self.store
                .put(&path, bytes.into())
                .await
                .map_err(|e| store_fault("put", e))
        })?;
        self.sync(&path)?;
        // Older checkpoints are superseded: keep a few, so the archive does not grow by one
        // shard state per verify.
        let all = self
            .runtime
            .block_on(self.list(shard, segment::parse_checkpoint_name))?;
        let stale = all.len().saturating_sub(CHECKPOINTS_KEPT);
        for old in all.into_iter().take(stale) {
            let old = ObjectPath::from(segment::checkpoint_name(shard, old));
            self.runtime
                .block_on(self.store.delete(&old))
                .map_err(|e| store_fault("delete", e))?;
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
    ) -> Result<(), StorageError> {
        let shard = log.shard();
        loop {
            let next = log.archived_up_to()?.next();
            let end = self.segment_end(next);
            if end > applied {
                break;
            }
            // A hole (a snapshot installed above the applied index deleted what lay between)
            // makes the segment not whole: a gap, like entries this replica never held.
            let records = log.read_run(next, end.next())?;
            let whole = u64::try_from(records.len()).ok()
                == Some(end.get().saturating_sub(next.get()).saturating_add(1));
            if records.first().map(|r| r.index) != Some(next) || !whole {
                // Not all of it is here: this replica got these entries by a snapshot.
                self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                warn!(
                    %shard,
                    from = next.get(),
                    to = end.get(),
                    "archive gap: this replica never held these entries"
                );
                log.set_archived_up_to(end)?;
                continue;
            }
            self.put_segment(shard, &records).await?;
            log.set_archived_up_to(end)?;
        }
        if let Some(purged) = purged {
            let up_to = purged.min(log.archived_up_to()?);
            if let Some(first) = log.first_index()?
                && first <= up_to
            {
                log.purge_up_to(up_to)?;
            }
        }
        Ok(())
    }
}

impl SegmentStore for Archive {
    fn segments(&self, shard: ShardId) -> courier_storage::Result<Vec<(LogIndex, LogIndex)>> {
        self.runtime
            .block_on(self.list(shard, segment::parse_file_name))
    }

    fn checkpoints(&self, shard: ShardId) -> courier_storage::Result<Vec<LogIndex>> {
        self.runtime
            .block_on(self.list(shard, segment::parse_checkpoint_name))
    }

    fn read_checkpoint(&self, shard: ShardId, index: LogIndex) -> courier_storage::Result<Vec<u8>> {
        let path = ObjectPath::from(segment::checkpoint_name(shard, index));
        Ok(self.fetch_existing(&path)?.to_vec())
    }

    fn read_segment(
        &self,
        shard: ShardId,
        first: LogIndex,
        last: LogIndex,
    ) -> courier_storage::Result<Vec<LogRecord>> {
        let bytes = self.fetch_existing(&object_path(shard, first, last))?;
        segment::checked(shard, first, last, &bytes)
    }
}

/// The bucket of `s3`: credentials and unset settings from the environment (`AWS_*`), then the
/// configured bucket, endpoint and region, under the configured prefix.
fn s3_store(s3: &S3Archive) -> Result<Arc<dyn ObjectStore>, StorageError> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_allow_http(s3.allow_http);
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    let bucket = builder.build().map_err(|e| store_fault("open bucket", e))?;
    Ok(if s3.prefix.is_empty() {
        Arc::new(bucket)
    } else {
        Arc::new(PrefixStore::new(bucket, s3.prefix.as_str()))
    })
}

/// Runs the archiver of this node until `shutdown`: every `interval`, each shard replica here
/// archives its whole segments and deletes what raft purged and the archive holds.
pub async fn run(
    groups: Arc<Groups>,
    archive: Arc<Archive>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    info!(location = %archive.location, segment_entries = archive.segment_entries, "log archive on");
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
        let Some(handle) = groups.get(GroupId::Shard(shard)) else {
            continue;
        };
        let applied = handle
            .applied
            .read()
            .expect("applied view lock is never poisoned")
            .shard
            .applied;
        let purged = handle.state().purged_index.map(storage_index);
        let log = LogStore::new(groups.db().clone(), shard);
        if let Err(error) = archive
            .runtime
            .block_on(archive.archive_log(&log, applied, purged))
        {
            archive.counters.failures.fetch_add(1, Ordering::Relaxed);
            warn!(%shard, %error, "archiving failed; purging waits for it");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use courier_storage::{Db, OpenMode};

    use super::*;
    use courier_storage::testkit::opaque_records as records;

    /// A replica that installed a snapshot above its applied index has a hole in its log
    /// (`delete_between`): the segments the hole touches are gaps (another replica archives
    /// them), the whole ones around it are archived, and the purge goes on past the hole. Before,
    /// the read of a segment that held entries and then the hole failed, every pass, so this
    /// replica never archived or purged again.
    #[tokio::test]
    async fn a_hole_left_by_a_snapshot_is_a_gap_not_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(&dir.path().join("db"), OpenMode::ReadWrite).expect("opens"));
        let shard = ShardId::new(1);
        let log = LogStore::new(db, shard);
        log.append(&records(1, 40)).expect("append");
        // Applied up to 12, then a snapshot at 17 installed: 13..=17 deleted.
        log.delete_between(LogIndex::new(13), LogIndex::new(18))
            .expect("delete");
        let archive = Archive::open(&ArchiveConfig {
            dir: dir.path().join("archive"),
            s3: None,
            segment_entries: 10,
            interval: Duration::from_millis(250),
        })
        .expect("archive");

        archive
            .archive_log(&log, LogIndex::new(40), Some(LogIndex::new(17)))
            .await
            .expect("a hole is no failure");

        let segments = archive
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
}
