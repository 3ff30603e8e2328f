//! openraft's `RaftLogStorage` over `courier_storage::LogStore`.
//!
//! Entries are stored as `LogEntry { raft, events }`: the events of a normal shard entry go to
//! `events` as protobuf, readable by `courier-ops` without openraft; everything raft-specific (the
//! log id, membership, cluster settings) is postcard in `raft`.
//!
//! Indexes: openraft's first entry has index 0, while storage reserves index 0 for "nothing", so
//! storage index = raft index + 1 everywhere in this crate ([`storage_index`]).
//!
//! Appends are synced before the flush callback fires: one `append` call is one write batch and
//! one fsync, however many entries openraft batched into it (group commit).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use courier_proto::LogIndex;
use courier_proto::pb::store::LogEntry;
use courier_storage::keys::raft_tag;
use courier_storage::rebuild::decode_entry;
use courier_storage::{LogRecord, StorageError};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, EntryPayload, LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::types::{ClusterSettings, LogId, Node, NodeId, Proposal, RaftStorageError, TypeConfig};

/// The raft-specific part of a stored entry.
#[derive(Serialize, Deserialize)]
enum RaftPart {
    Blank(LogId),
    Events(LogId),
    Cluster(LogId, ClusterSettings),
    Membership(LogId, openraft::Membership<NodeId, Node>),
}

/// Maps a storage fault to openraft's storage error (which stops the raft group).
pub(crate) fn fault(error: StorageError) -> RaftStorageError {
    StorageIOError::write(&error).into()
}

fn codec_fault(what: &str, error: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::read(&std::io::Error::other(format!("{what}: {error}"))).into()
}

/// The storage index of a raft index (raft starts at 0, storage at 1).
pub fn storage_index(raft_index: u64) -> LogIndex {
    LogIndex::new(raft_index.checked_add(1).expect("raft index overflow"))
}

/// Encodes an openraft entry as a storage record.
pub fn encode_entry(entry: &Entry<TypeConfig>) -> Result<LogRecord, RaftStorageError> {
    let log_id = entry.log_id;
    let (raft, events) = match &entry.payload {
        EntryPayload::Blank => (RaftPart::Blank(log_id), None),
        EntryPayload::Normal(Proposal::Events(payload)) => {
            (RaftPart::Events(log_id), Some(payload.clone()))
        }
        EntryPayload::Normal(Proposal::Cluster(settings)) => {
            (RaftPart::Cluster(log_id, *settings), None)
        }
        EntryPayload::Membership(membership) => {
            (RaftPart::Membership(log_id, membership.clone()), None)
        }
    };
    let raft = postcard::to_stdvec(&raft).map_err(|e| codec_fault("encode entry", e))?;
    Ok(LogRecord {
        index: storage_index(log_id.index),
        term: log_id.leader_id.term,
        payload: LogEntry { raft, events }.encode_to_vec(),
    })
}

/// Decodes a storage record into an openraft entry.
pub fn decode_record(
    group: courier_proto::ShardId,
    record: &LogRecord,
) -> Result<Entry<TypeConfig>, RaftStorageError> {
    let stored = decode_entry(group, record).map_err(fault)?;
    let raft: RaftPart =
        postcard::from_bytes(&stored.raft).map_err(|e| codec_fault("decode entry", e))?;
    let (log_id, payload) = match raft {
        RaftPart::Blank(log_id) => (log_id, EntryPayload::Blank),
        RaftPart::Events(log_id) => {
            let events = stored
                .events
                .ok_or_else(|| codec_fault("decode entry", "normal entry without events"))?;
            (log_id, EntryPayload::Normal(Proposal::Events(events)))
        }
        RaftPart::Cluster(log_id, settings) => {
            (log_id, EntryPayload::Normal(Proposal::Cluster(settings)))
        }
        RaftPart::Membership(log_id, membership) => (log_id, EntryPayload::Membership(membership)),
    };
    assert_eq!(
        storage_index(log_id.index),
        record.index,
        "a stored entry sits at its own index"
    );
    Ok(Entry { log_id, payload })
}

/// Counters of the group-commit effect: appends (one fsync each) and entries appended.
#[derive(Debug, Default)]
pub struct AppendStats {
    /// `append` calls, each one synced write batch.
    pub fsyncs: AtomicU64,
    /// Entries written by those calls.
    pub entries: AtomicU64,
    /// Nanoseconds spent in those calls (write + fsync).
    pub sync_nanos: AtomicU64,
    /// Notified after every append flushed: the proposer dispatches its next batch then, so
    /// that proposals arriving during an fsync merge into one entry.
    pub flushed: tokio::sync::Notify,
}

/// One raft group's log storage.
#[derive(Clone, Debug)]
pub struct LogStore {
    log: courier_storage::LogStore,
    /// Group-commit counters, shared with metrics.
    pub stats: Arc<AppendStats>,
}

impl LogStore {
    /// The log of one group.
    pub fn new(log: courier_storage::LogStore) -> Self {
        Self {
            log,
            stats: Arc::default(),
        }
    }

    fn read_id(&self, tag: u8) -> Result<Option<LogId>, RaftStorageError> {
        match self.log.read_state(tag).map_err(fault)? {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| codec_fault("raft state", e)),
        }
    }

    fn save<T: Serialize>(&self, tag: u8, value: &T) -> Result<(), RaftStorageError> {
        let bytes = postcard::to_stdvec(value).map_err(|e| codec_fault("raft state", e))?;
        self.log.save_state(tag, &bytes).map_err(fault)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        let (start, end) = (storage_index(start), LogIndex::new(end.saturating_add(1)));
        let records = self.log.read_range(start, end).map_err(fault)?;
        records
            .iter()
            .map(|record| decode_record(self.log.shard(), record))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged_log_id = self.read_id(raft_tag::PURGED)?;
        let last_log_id = match self.log.last().map_err(fault)? {
            Some(record) => Some(decode_record(self.log.shard(), &record)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.save(raft_tag::VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        match self.log.read_state(raft_tag::VOTE).map_err(fault)? {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| codec_fault("vote", e)),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        // Not synced (ARCHITECTURE.md, "Durability"): openraft treats the stored commit index as
        // a hint that lets a restarted node apply sooner; a lost one is re-learned from the
        // leader, and every entry it names was synced before it.
        let bytes = postcard::to_stdvec(&committed).map_err(|e| codec_fault("raft state", e))?;
        self.log
            .save_state_unsynced(raft_tag::COMMITTED, &bytes)
            .map_err(fault)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        match self.log.read_state(raft_tag::COMMITTED).map_err(fault)? {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| codec_fault("committed", e)),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records = entries
            .into_iter()
            .map(|entry| encode_entry(&entry))
            .collect::<Result<Vec<_>, _>>()?;
        let count = u64::try_from(records.len()).unwrap_or(u64::MAX);
        // Synced before the callback: openraft counts the entries as durable only after it.
        let started = std::time::Instant::now();
        let result = self.log.append(&records);
        if result.is_ok() {
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.stats.entries.fetch_add(count, Ordering::Relaxed);
            self.stats.sync_nanos.fetch_add(took, Ordering::Relaxed);
            self.stats.flushed.notify_waiters();
        }
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result.map_err(fault)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.log
            .truncate_from(storage_index(log_id.index))
            .map_err(fault)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        // Record the purge point first, so a crash in between never loses track of it.
        self.save(raft_tag::PURGED, &log_id)?;
        self.log
            .purge_up_to(storage_index(log_id.index))
            .map_err(fault)
    }
}
