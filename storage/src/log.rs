//! The raft log of one shard replica, without openraft: entries are `(index, term, payload)`
//! with a crc32c per entry, verified on every read. The consensus crate serializes openraft's
//! entries into `payload` and its vote/committed/purged ids into raft state records.
//!
//! Invariants:
//! - Appends are durable (WAL fsynced) before [`LogStore::append`] returns.
//! - Stored indexes are contiguous; a read that finds a gap or a checksum mismatch is a fault.

use std::sync::Arc;

use courier_proto::{LogIndex, ShardId};

use crate::cf::Cf;
use crate::db::Db;
use crate::error::{Result, StorageError};
use crate::keys;
use crate::kv::{Change, ReadKv};

const CHECKSUM_BYTES: usize = 4;
const TERM_BYTES: usize = 8;
const HEADER_BYTES: usize = CHECKSUM_BYTES + TERM_BYTES;

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its index in the shard's log.
    pub index: LogIndex,
    /// The raft term it was proposed in.
    pub term: u64,
    /// The serialized raft entry.
    pub payload: Vec<u8>,
}

/// What a read does at a hole in the stored entries.
#[derive(Clone, Copy)]
enum Holes {
    /// Fail with [`StorageError::MissingEntry`].
    Refuse,
    /// Return the run read so far.
    Stop,
}

fn checksum(index: LogIndex, term: u64, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&index.get().to_be_bytes());
    let crc = crc32c::crc32c_append(crc, &term.to_be_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Encodes a record as stored: `crc32c | term | payload`.
pub fn encode_record(record: &LogRecord) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER_BYTES.saturating_add(record.payload.len()));
    value.extend_from_slice(&checksum(record.index, record.term, &record.payload).to_be_bytes());
    value.extend_from_slice(&record.term.to_be_bytes());
    value.extend_from_slice(&record.payload);
    value
}

/// Decodes and verifies a stored record.
///
/// # Errors
/// [`StorageError::Checksum`] on a mismatch, [`StorageError::Decode`] on a short value.
pub fn decode_record(shard: ShardId, index: LogIndex, value: &[u8]) -> Result<LogRecord> {
    let short = || StorageError::Decode {
        cf: Cf::Log.name(),
        shard,
        what: format!("index {index}"),
        reason: format!(
            "{} bytes, shorter than the {HEADER_BYTES}-byte header",
            value.len()
        ),
    };
    let stored = u32::from_be_bytes(
        value
            .get(..CHECKSUM_BYTES)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    );
    let term = u64::from_be_bytes(
        value
            .get(CHECKSUM_BYTES..HEADER_BYTES)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    );
    let payload = value.get(HEADER_BYTES..).ok_or_else(short)?;
    let computed = checksum(index, term, payload);
    if stored != computed {
        return Err(StorageError::Checksum {
            cf: Cf::Log.name(),
            shard,
            what: format!("index {index}"),
            stored,
            computed,
        });
    }
    Ok(LogRecord {
        index,
        term,
        payload: payload.to_vec(),
    })
}

/// The raft log and raft state of one shard replica.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Db>,
    shard: ShardId,
}

impl LogStore {
    /// The log of `shard` in `db`.
    pub fn new(db: Arc<Db>, shard: ShardId) -> Self {
        Self { db, shard }
    }

    /// Returns every shard prefix that has raft state (a vote or a log) in `db`: the groups this
    /// node is a member of.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn stored_shards(db: &Db) -> Result<Vec<ShardId>> {
        let pairs = db.scan(Cf::RaftState, &[], &[0xff, 0xff, 0xff], usize::MAX)?;
        let mut shards: Vec<ShardId> = pairs
            .iter()
            .filter_map(|(key, _)| keys::key_shard(key))
            .collect();
        shards.dedup();
        // A dropped replica holds only its marker: nothing to start.
        let dropped: Vec<ShardId> = pairs
            .iter()
            .filter_map(|(key, _)| {
                let shard = keys::key_shard(key)?;
                (*key == keys::raft_state(shard, keys::raft_tag::DROPPED)).then_some(shard)
            })
            .collect();
        shards.retain(|shard| !dropped.contains(shard));
        Ok(shards)
    }

    /// The write that marks this node's replica of `shard` dropped ([`keys::raft_tag::DROPPED`]),
    /// with the lowest term of a leader that may add it back, for the batch that deletes the
    /// shard's data.
    pub fn dropped_marker(shard: ShardId, term_floor: u64) -> Change {
        let bytes = term_floor.to_be_bytes();
        let mut value = crc32c::crc32c(&bytes).to_be_bytes().to_vec();
        value.extend_from_slice(&bytes);
        (
            Cf::RaftState,
            keys::raft_state(shard, keys::raft_tag::DROPPED),
            Some(value),
        )
    }

    /// The term floor of this node's replica of the shard if it was dropped and not added back
    /// since ([`LogStore::dropped_marker`]).
    ///
    /// # Errors
    /// [`StorageError::Checksum`], [`StorageError::Decode`] or [`StorageError::Db`].
    pub fn dropped(&self) -> Result<Option<u64>> {
        let Some(bytes) = self.read_state(keys::raft_tag::DROPPED)? else {
            return Ok(None);
        };
        let floor = <[u8; 8]>::try_from(bytes.as_slice()).map_err(|_| StorageError::Decode {
            cf: Cf::RaftState.name(),
            shard: self.shard,
            what: "dropped mark".to_owned(),
            reason: format!("{} bytes, not 8", bytes.len()),
        })?;
        Ok(Some(u64::from_be_bytes(floor)))
    }

    /// Clears the dropped mark (a leader added this node back), synced.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn clear_dropped(&self) -> Result<()> {
        self.db.commit(
            [(
                Cf::RaftState,
                keys::raft_state(self.shard, keys::raft_tag::DROPPED),
                None,
            )],
            true,
        )
    }

    /// The shard this log belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Appends `records` (contiguous indexes) in one synced write batch.
    ///
    /// # Errors
    /// [`StorageError::Db`]: the replica must stop.
    pub fn append(&self, records: &[LogRecord]) -> Result<()> {
        // Deliberate bug (feature `bugs` only): no fsync.
        self.db.commit(
            self.append_changes(records),
            !crate::bugs::unsynced_log_appends(),
        )
    }

    /// Appends `records` (contiguous indexes) through the node's log writer, merged with the
    /// appends other groups make meanwhile into one synced write batch ([`Db::commit_synced`]);
    /// `done` runs once they are durable, with a [`StorageError::Db`] if the write failed (the
    /// replica must stop). The caller issues this group's next write only after `done`.
    pub fn append_merged(&self, records: &[LogRecord], done: crate::writer::Done) {
        let changes = self.append_changes(records);
        if crate::bugs::unsynced_log_appends() {
            // Deliberate bug (feature `bugs` only): no fsync.
            done(self.db.commit(changes, false));
        } else {
            self.db.commit_synced(changes, done);
        }
    }

    fn append_changes(&self, records: &[LogRecord]) -> Vec<Change> {
        for pair in records.windows(2) {
            assert_eq!(
                pair[0].index.next(),
                pair[1].index,
                "appended log entries are contiguous"
            );
        }
        records
            .iter()
            .map(|record| {
                (
                    Cf::Log,
                    keys::log_entry(self.shard, record.index),
                    Some(encode_record(record)),
                )
            })
            .collect()
    }

    /// Reads entries `[from, to)`, verifying each checksum and that indexes are contiguous.
    ///
    /// # Errors
    /// [`StorageError::Checksum`], [`StorageError::Decode`] or [`StorageError::Db`]: faults;
    /// [`StorageError::MissingEntry`] for a hole after the first entry found.
    pub fn read_range(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogRecord>> {
        self.read(from, to, Holes::Refuse)
    }

    /// Reads the run of consecutive entries that starts at the first one stored in `[from, to)`,
    /// up to the first hole, verifying each checksum. A replica that installed a snapshot above
    /// its applied index has such a hole (`delete_between`) until the archiver purges below it;
    /// the archiver and the archive-backed reader take the hole as "not here" rather than fail.
    ///
    /// # Errors
    /// [`StorageError::Checksum`], [`StorageError::Decode`] or [`StorageError::Db`]: faults.
    pub fn read_run(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogRecord>> {
        self.read(from, to, Holes::Stop)
    }

    fn read(&self, from: LogIndex, to: LogIndex, holes: Holes) -> Result<Vec<LogRecord>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let start = keys::log_entry(self.shard, from);
        let end = keys::log_entry(self.shard, to);
        let limit = usize::try_from(to.get().saturating_sub(from.get())).unwrap_or(usize::MAX);
        let pairs = self.db.scan(Cf::Log, &start, &end, limit)?;
        let mut records = Vec::with_capacity(pairs.len());
        let mut expected = from;
        for (key, value) in pairs {
            let index = keys::log_entry_index(&key).ok_or_else(|| StorageError::Decode {
                cf: Cf::Log.name(),
                shard: self.shard,
                what: "key".to_owned(),
                reason: format!("{} bytes", key.len()),
            })?;
            if index != expected && !records.is_empty() {
                return match holes {
                    Holes::Stop => Ok(records),
                    Holes::Refuse => Err(StorageError::MissingEntry {
                        shard: self.shard,
                        index: expected,
                    }),
                };
            }
            expected = index.next();
            records.push(decode_record(self.shard, index, &value)?);
        }
        Ok(records)
    }

    /// Whether every entry of `[from, to]` is stored (no hole, none missing at either end). Reads
    /// the range in chunks of [`LogStore::CHECK_CHUNK`] entries, so memory stays bounded.
    ///
    /// # Errors
    /// [`StorageError::Db`] or a key that does not decode.
    pub fn stores_every(&self, from: LogIndex, to: LogIndex) -> Result<bool> {
        let mut expected = from;
        while expected <= to {
            let start = keys::log_entry(self.shard, expected);
            let end = keys::log_entry(self.shard, to.next());
            let pairs = self.db.scan(Cf::Log, &start, &end, Self::CHECK_CHUNK)?;
            if pairs.is_empty() {
                return Ok(false);
            }
            for (key, _) in pairs {
                if keys::log_entry_index(&key) != Some(expected) {
                    return Ok(false);
                }
                expected = expected.next();
            }
        }
        Ok(true)
    }

    /// Entries read at a time by [`LogStore::stores_every`].
    pub const CHECK_CHUNK: usize = 1024;

    /// Returns the last stored entry.
    ///
    /// # Errors
    /// Faults, as for [`LogStore::read_range`].
    pub fn last(&self) -> Result<Option<LogRecord>> {
        let (start, end) = keys::shard_range(self.shard);
        match self.db.last_in(Cf::Log, &start, &end)? {
            None => Ok(None),
            Some((key, value)) => {
                let index = keys::log_entry_index(&key).ok_or_else(|| StorageError::Decode {
                    cf: Cf::Log.name(),
                    shard: self.shard,
                    what: "key".to_owned(),
                    reason: format!("{} bytes", key.len()),
                })?;
                decode_record(self.shard, index, &value).map(Some)
            }
        }
    }

    /// Returns the first stored entry's index.
    ///
    /// # Errors
    /// Faults.
    pub fn first_index(&self) -> Result<Option<LogIndex>> {
        let (start, end) = keys::shard_range(self.shard);
        Ok(self
            .db
            .scan(Cf::Log, &start, &end, 1)?
            .first()
            .and_then(|(key, _)| keys::log_entry_index(key)))
    }

    /// The index up to which this log is archived (0: nothing yet).
    ///
    /// # Errors
    /// Faults, as for [`LogStore::read_state`].
    pub fn archived_up_to(&self) -> Result<LogIndex> {
        let bytes = self.read_state(keys::raft_tag::ARCHIVED)?;
        Ok(LogIndex::new(
            bytes
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes),
        ))
    }

    /// Records that every entry up to `up_to` is in the archive, verified (durably).
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn set_archived_up_to(&self, up_to: LogIndex) -> Result<()> {
        self.save_state(keys::raft_tag::ARCHIVED, &up_to.get().to_be_bytes())
    }

    /// Deletes the entries in `[from, to)`, durably.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn delete_between(&self, from: LogIndex, to: LogIndex) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        self.db.delete_range(
            Cf::Log,
            &keys::log_entry(self.shard, from),
            &keys::log_entry(self.shard, to),
            true,
        )
    }

    /// Deletes every entry at or after `since` (a conflicting suffix), durably.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn truncate_from(&self, since: LogIndex) -> Result<()> {
        let (_, end) = keys::shard_range(self.shard);
        self.db
            .delete_range(Cf::Log, &keys::log_entry(self.shard, since), &end, true)
    }

    /// Deletes every entry up to and including `up_to`. Everything written before (the applied
    /// state a snapshot covers) is made durable first.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn purge_up_to(&self, up_to: LogIndex) -> Result<()> {
        self.db.sync_wal()?;
        let (start, _) = keys::shard_range(self.shard);
        let end = keys::log_entry(self.shard, up_to.next());
        self.db.delete_range(Cf::Log, &start, &end, true)
    }

    /// Durably stores a raft state record (vote, committed, purged), checksummed.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn save_state(&self, tag: u8, bytes: &[u8]) -> Result<()> {
        self.write_state(tag, bytes, true)
    }

    /// Stores a raft state record that may be lost in a crash (the commit index: openraft
    /// re-learns it from the leader), checksummed, without an fsync of its own. It is ordered
    /// after every synced write before it in the WAL, so what survives a crash is a prefix.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn save_state_unsynced(&self, tag: u8, bytes: &[u8]) -> Result<()> {
        self.write_state(tag, bytes, false)
    }

    fn write_state(&self, tag: u8, bytes: &[u8], sync: bool) -> Result<()> {
        let mut value = crc32c::crc32c(bytes).to_be_bytes().to_vec();
        value.extend_from_slice(bytes);
        self.db.commit(
            [(
                Cf::RaftState,
                keys::raft_state(self.shard, tag),
                Some(value),
            )],
            sync,
        )
    }

    /// Reads a raft state record, verifying its checksum.
    ///
    /// # Errors
    /// [`StorageError::Checksum`] or [`StorageError::Db`].
    pub fn read_state(&self, tag: u8) -> Result<Option<Vec<u8>>> {
        let Some(value) = self
            .db
            .get(Cf::RaftState, &keys::raft_state(self.shard, tag))?
        else {
            return Ok(None);
        };
        let what = || format!("raft state tag {tag}");
        let (head, bytes) =
            value
                .split_at_checked(CHECKSUM_BYTES)
                .ok_or_else(|| StorageError::Decode {
                    cf: Cf::RaftState.name(),
                    shard: self.shard,
                    what: what(),
                    reason: "shorter than its checksum".to_owned(),
                })?;
        let stored = u32::from_be_bytes(head.try_into().expect("split at 4 bytes"));
        let computed = crc32c::crc32c(bytes);
        if stored != computed {
            return Err(StorageError::Checksum {
                cf: Cf::RaftState.name(),
                shard: self.shard,
                what: what(),
                stored,
                computed,
            });
        }
        Ok(Some(bytes.to_vec()))
    }
}
