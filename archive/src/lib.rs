//! The log archive's store: segments and verify checkpoints as objects (`object_store`) in a
//! local directory or an S3-compatible bucket. The node writes it (its archiver, `node/src/
//! archive.rs`); the node and the ops tool read it as a [`SegmentStore`], so `verify`, `rebuild`,
//! `inspect` and `log dump` read a bucket as they read a directory, online and offline.
//!
//! ```text
//!   node archiver ──put/list/delete──▶ ArchiveStore ──▶ LocalFileSystem (fsynced) | AmazonS3 (+ prefix)
//!   replays (node, ops) ──SegmentStore──┘
//! ```
//!
//! Calls are async; [`ArchiveStore::block_on`] runs one from the blocking code of a replay. A
//! node's store runs on the node's runtime; the ops tool's ([`ArchiveStore::open_standalone`]) on
//! a runtime of its own.

#![warn(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::too_many_lines
)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use courier_proto::{LogIndex, ShardId};
use courier_storage::archive::SegmentStore;
use courier_storage::{LogRecord, StorageError, segment};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;

/// An archive in an S3-compatible bucket, validated ([`S3Archive::new`]). Credentials come from
/// the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the
/// instance's role), never from a file or a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Archive {
    /// The bucket (it must exist).
    pub bucket: String,
    /// A path inside the bucket the archive lives under (empty: the bucket's root).
    pub prefix: String,
    /// The endpoint of an S3-compatible service (`None`: AWS, or `AWS_ENDPOINT`).
    pub endpoint: Option<String>,
    /// The region (`None`: `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Whether a plain `http://` endpoint is accepted (a local test server).
    pub allow_http: bool,
}

impl S3Archive {
    /// Checks the settings: a bucket name, a relative prefix, an http(s) endpoint (plain http
    /// only when allowed).
    ///
    /// # Errors
    /// What is wrong, for the operator.
    pub fn new(
        bucket: &str,
        prefix: &str,
        endpoint: Option<String>,
        region: Option<String>,
        allow_http: bool,
    ) -> Result<Self, &'static str> {
        let bucket = bucket.trim();
        if bucket.is_empty() || bucket.contains('/') {
            return Err("bucket must be a bucket name (no '/')");
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "..") {
            return Err("prefix must not contain '..'");
        }
        if let Some(endpoint) = &endpoint {
            let plain = endpoint.starts_with("http://");
            if !plain && !endpoint.starts_with("https://") {
                return Err("endpoint must be an http:// or https:// URL");
            }
            if plain && !allow_http {
                return Err(
                    "a plain http:// endpoint needs allow-http (`allow-http = true` in a node's \
                     config, --s3-allow-http for courier-ops)",
                );
            }
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            region,
            allow_http,
        })
    }

    /// The archive's address, `s3://bucket/prefix`.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// The object of `shard`'s segment `first..=last` (`courier_storage::segment::object_name`).
pub fn segment_path(shard: ShardId, first: LogIndex, last: LogIndex) -> ObjectPath {
    ObjectPath::from(segment::object_name(shard, first, last))
}

/// The object of `shard`'s verify checkpoint at `index`.
pub fn checkpoint_path(shard: ShardId, index: LogIndex) -> ObjectPath {
    ObjectPath::from(segment::checkpoint_name(shard, index))
}

/// A store failure, as the storage layer reports faults.
/// fsyncs one file or directory.
fn sync_path(path: &Path) -> Result<(), StorageError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| store_fault("fsync", e))
}

pub fn store_fault(op: &'static str, error: impl std::fmt::Display) -> StorageError {
    StorageError::Disk {
        op,
        reason: format!("archive: {error}"),
    }
}

/// The archive store (see the module docs).
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    /// The directory of a local store (its writes are fsynced); `None` for a bucket, where a
    /// write that answered is durable.
    local: Option<PathBuf>,
    /// Where the archive is, for logs (`dir` or `s3://bucket/prefix`).
    location: String,
    runtime: tokio::runtime::Handle,
    /// The runtime of a standalone store (the ops tool), shut down when the store goes.
    own: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Drop for ArchiveStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another runtime's task.
        if let Some(runtime) = self.own.take() {
            runtime.shutdown_background();
        }
    }
}

impl ArchiveStore {
    /// A node's archive: its bucket when `s3` is set, else the directory `dir` (created). Runs
    /// on the current runtime.
    ///
    /// # Errors
    /// The directory cannot be created or opened; the bucket's settings are refused.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn open(dir: &Path, s3: Option<&S3Archive>) -> Result<Self, StorageError> {
        let (store, local, location): (Arc<dyn ObjectStore>, _, _) = match s3 {
            Some(s3) => (s3_store(s3)?, None, s3.url()),
            None => {
                std::fs::create_dir_all(dir).map_err(|e| store_fault("create archive dir", e))?;
                // The root's own entry in its parent, which `create_dir_all` may just have made.
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_path(parent)?;
                }
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| store_fault("open archive", e))?;
                (
                    Arc::new(store),
                    Some(dir.to_path_buf()),
                    dir.display().to_string(),
                )
            }
        };
        Ok(Self {
            store,
            local,
            location,
            runtime: tokio::runtime::Handle::current(),
            own: None,
        })
    }

    /// A bucket archive for a tool that reads it from blocking code run anywhere, inside an
    /// async task or not (the ops tool): it runs on a runtime of its own.
    ///
    /// # Errors
    /// The bucket's settings are refused, or the runtime cannot start.
    pub fn open_standalone(s3: &S3Archive) -> Result<Self, StorageError> {
        // The bucket first: a runtime dropped on this error path would panic inside a task.
        let store = s3_store(s3)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("courier-archive")
            .enable_all()
            .build()
            .map_err(|e| store_fault("start runtime", e))?;
        Ok(Self {
            store,
            local: None,
            location: s3.url(),
            runtime: runtime.handle().clone(),
            own: Some(runtime),
        })
    }

    /// Where the archive is, for logs (`dir` or `s3://bucket/prefix`).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs `work` to its end from blocking code: on this thread for a node's store (called from
    /// a blocking thread of its runtime) and for a standalone one called outside any runtime; on
    /// a thread of its own for a standalone one called inside another runtime (the ops tool's
    /// replays), where blocking on a runtime is refused.
    pub fn block_on<T: Send>(&self, work: impl Future<Output = T> + Send) -> T {
        if self.own.is_none() || tokio::runtime::Handle::try_current().is_err() {
            return self.runtime.block_on(work);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.runtime.block_on(work))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The bytes of the object at `path`; `None` when there is none.
    ///
    /// # Errors
    /// The store failed.
    pub async fn fetch(&self, path: &ObjectPath) -> Result<Option<bytes::Bytes>, StorageError> {
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

    /// The bytes of the object at `path`, which must be there (blocking).
    fn fetch_existing(&self, path: &ObjectPath) -> Result<bytes::Bytes, StorageError> {
        self.block_on(self.fetch(path))?
            .ok_or_else(|| store_fault("get", format!("{path} is not in the archive")))
    }

    /// Writes `bytes` at `path` durably: a local store fsyncs the file and its directory (a
    /// bucket's write is durable once it answered). The fsync blocks: poll this from a blocking
    /// thread (`block_on`), not on the async workers.
    ///
    /// # Errors
    /// The store failed.
    pub async fn put(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.store
            .put(path, bytes.into())
            .await
            .map_err(|e| store_fault("put", e))?;
        self.sync(path)
    }

    /// Deletes the object at `path`.
    ///
    /// # Errors
    /// The store failed.
    pub async fn delete(&self, path: &ObjectPath) -> Result<(), StorageError> {
        self.store
            .delete(path)
            .await
            .map_err(|e| store_fault("delete", e))
    }

    /// Makes the object at `path` durable on a local archive: the file, then every directory from
    /// its own up to the archive's root, so that a directory the store created for it (a shard's
    /// first segment) survives a power loss too. An S3 store's answer to the put is its
    /// durability. Also for an object found already there: the store may have renamed it into
    /// place and the process died before its fsync.
    ///
    /// # Errors
    /// An fsync failed.
    pub fn sync(&self, path: &ObjectPath) -> Result<(), StorageError> {
        let Some(root) = &self.local else {
            return Ok(());
        };
        let file = root.join(path.as_ref());
        sync_path(&file)?;
        let mut dir = file.parent();
        while let Some(current) = dir {
            sync_path(current)?;
            if current == root.as_path() {
                break;
            }
            dir = current.parent();
        }
        Ok(())
    }

    /// The objects in `shard`'s directory whose names `parse` accepts, parsed and sorted.
    ///
    /// # Errors
    /// The store failed.
    pub async fn list<T: Ord>(
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
}

impl SegmentStore for ArchiveStore {
    fn segments(&self, shard: ShardId) -> courier_storage::Result<Vec<(LogIndex, LogIndex)>> {
        self.block_on(self.list(shard, segment::parse_file_name))
    }

    fn checkpoints(&self, shard: ShardId) -> courier_storage::Result<Vec<LogIndex>> {
        self.block_on(self.list(shard, segment::parse_checkpoint_name))
    }

    fn read_checkpoint(&self, shard: ShardId, index: LogIndex) -> courier_storage::Result<Vec<u8>> {
        Ok(self
            .fetch_existing(&checkpoint_path(shard, index))?
            .to_vec())
    }

    fn read_segment(
        &self,
        shard: ShardId,
        first: LogIndex,
        last: LogIndex,
    ) -> courier_storage::Result<Vec<LogRecord>> {
        let bytes = self.fetch_existing(&segment_path(shard, first, last))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the bucket settings a node's config and the ops tool accept are the ones the store
    /// can use. Method: each rule on its own.
    #[test]
    fn bucket_settings_are_checked() {
        let ok = S3Archive::new(" archive ", "/cluster-a/", None, None, false).expect("valid");
        assert_eq!(
            (ok.bucket.as_str(), ok.prefix.as_str()),
            ("archive", "cluster-a")
        );
        assert_eq!(ok.url(), "s3://archive/cluster-a");
        assert!(S3Archive::new("a/b", "", None, None, false).is_err());
        assert!(S3Archive::new("", "", None, None, false).is_err());
        assert!(S3Archive::new("a", "x/../y", None, None, false).is_err());
        assert!(S3Archive::new("a", "", Some("ftp://h".to_owned()), None, false).is_err());
        assert!(S3Archive::new("a", "", Some("http://h".to_owned()), None, false).is_err());
        assert!(S3Archive::new("a", "", Some("http://h".to_owned()), None, true).is_ok());
    }

    /// Goal: a directory store reads back what it wrote, as segments, from a blocking thread.
    /// Method: write one segment through `put`, read it as a `SegmentStore` from
    /// `spawn_blocking`. (The standalone store, a bucket, is tested against moto in the node's
    /// `the_archive_can_live_in_an_s3_bucket`.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_store_reads_back_its_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArchiveStore::open(dir.path(), None).expect("opens");
        let shard = ShardId::new(2);
        let records = courier_storage::testkit::opaque_records(1, 16);
        let path = segment_path(shard, LogIndex::new(1), LogIndex::new(16));
        store
            .put(&path, segment::encode(shard, &records))
            .await
            .expect("put");
        let store = Arc::new(store);
        let read = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                let segments = store.segments(shard)?;
                let back = store.read_segment(shard, LogIndex::new(1), LogIndex::new(16))?;
                Ok::<_, StorageError>((segments, back))
            })
            .await
            .expect("joins")
            .expect("reads")
        };
        assert_eq!(read.0, vec![(LogIndex::new(1), LogIndex::new(16))]);
        assert_eq!(read.1, records);
    }
}
