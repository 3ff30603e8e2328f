//! Storage errors. Every variant is a **fault**: the replica that meets one stops. Rejections of
//! client input never reach this layer (the leader validates before proposing), so nothing here
//! is retried or skipped.

use courier_proto::{LogIndex, ShardId};

/// A fault of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB failed (I/O, fsync, corruption found by RocksDB itself).
    #[error("rocksdb {op} on column family `{cf}` failed: {source}")]
    Db {
        /// What was being done (`get`, `write`, `open`, …).
        op: &'static str,
        /// The column family, or `*` for the whole database.
        cf: &'static str,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// The simulation's disk ([`MemDisk`](crate::MemDisk)) failed: an injected fsync error, or a
    /// handle that outlived its node's crash.
    #[error("disk {op} failed: {reason}")]
    Disk {
        /// What was being done (`write`, `fsync`, `get`, …).
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// A stored log entry or raft state value does not match its checksum.
    #[error(
        "checksum mismatch in `{cf}` for {shard} at {what}: stored {stored:#010x}, computed {computed:#010x}"
    )]
    Checksum {
        /// The column family.
        cf: &'static str,
        /// The shard whose data is corrupt.
        shard: ShardId,
        /// Which record (`index 42`, `vote`, …).
        what: String,
        /// The checksum stored with the record.
        stored: u32,
        /// The checksum of the bytes read.
        computed: u32,
    },
    /// A stored value cannot be decoded.
    #[error("cannot decode `{cf}` value for {shard} at {what}: {reason}")]
    Decode {
        /// The column family.
        cf: &'static str,
        /// The shard.
        shard: ShardId,
        /// Which record.
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// A log entry holds an event this build does not know, or a newer format version.
    /// Skipping it would fork the projections, so the replica stops.
    #[error("{shard} log index {index}: {reason}")]
    UnknownEvent {
        /// The shard.
        shard: ShardId,
        /// The log index of the entry.
        index: LogIndex,
        /// What is unknown.
        reason: String,
    },
    /// A replay into memory outgrew the memory it may take.
    #[error(
        "replaying {shard} into memory needs more than {max} bytes (about {bytes} reached at log index {index})"
    )]
    ReplayTooLarge {
        /// The shard.
        shard: ShardId,
        /// The index the replay had reached.
        index: LogIndex,
        /// What the replayed projections took, as `MemKv::bytes` counts it.
        bytes: usize,
        /// The bound.
        max: usize,
    },
    /// The log does not hold an entry the caller needs (purged or never written).
    #[error("{shard} log has no entry at index {index}")]
    MissingEntry {
        /// The shard.
        shard: ShardId,
        /// The missing index.
        index: LogIndex,
    },
    /// A snapshot stream is malformed.
    #[error("snapshot for {shard} is malformed: {reason}")]
    Snapshot {
        /// The shard.
        shard: ShardId,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot install of the shard was interrupted and is not finished yet.
    #[error(
        "a snapshot install of {shard} is unfinished (its projections are half written); \
         starting the node finishes it"
    )]
    InstallPending {
        /// The shard.
        shard: ShardId,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Returns a closure mapping a RocksDB error to [`StorageError::Db`].
pub(crate) fn db_err(
    op: &'static str,
    cf: &'static str,
) -> impl FnOnce(rocksdb::Error) -> StorageError {
    move |source| StorageError::Db { op, cf, source }
}

/// [`StorageError::ReplayTooLarge`] when a replay of `shard` that reached `index` holds `bytes`,
/// more than `max`.
///
/// # Errors
/// As above.
pub fn within_memory(shard: ShardId, index: LogIndex, bytes: usize, max: usize) -> Result<()> {
    if bytes > max {
        return Err(StorageError::ReplayTooLarge {
            shard,
            index,
            bytes,
            max,
        });
    }
    Ok(())
}
