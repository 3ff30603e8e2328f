//! openraft's `RaftLogStorage` over `courier_storage::LogStore`.
//!
//! Entries are stored as `LogEntry { raft, events }`: the events of a normal shard entry go to
//! `events` as protobuf, readable by `courier-ops` without openraft; everything raft-specific (the
//! log id, membership, cluster settings) is postcard in `raft`.
//!
//! Indexes: openraft's first entry has index 0, while storage reserves index 0 for "nothing", so
//! storage index = raft index + 1 everywhere in this crate ([`storage_index`]).
//!
//! Appends are synced before the flush callback fires: one `append` call is one write batch,
//! however many entries openraft batched into it (group commit), and the node's log writer
//! (`courier_storage::writer`) merges the appends of every group on the node that wait at the
//! same time into one fsync.
//!
//! The entries appended last are also kept decoded in memory ([`RECENT_ENTRIES_MAX`], at most
//! [`RECENT_BYTES_MAX`] per group, and all groups of a node together within one
//! [`LogCacheBudget`], `raft.log-cache-bytes-max`): replication to the followers and apply read
//! them back within milliseconds, and take them from there instead of reading, checking and
//! decoding them again. Truncation and purge drop them from memory as from disk.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use courier_proto::LogIndex;
use courier_storage::keys::raft_tag;
use courier_storage::rebuild::decode_entry;
use courier_storage::{LogRecord, StorageError};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, EntryPayload, LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use prost::Message;
use serde::{Deserialize, Serialize};

use courier_proto::{PHONE_KEY_BYTES, PhoneKey};

use crate::placement::Placement;
use crate::types::{ClusterSettings, LogId, Node, NodeId, Proposal, RaftStorageError, TypeConfig};

/// How often a purge that waits for the state machine looks again (`LogStore::purge`): it waits
/// only while a snapshot installs, which takes milliseconds to seconds.
const PURGE_WAIT_POLL: Duration = Duration::from_millis(5);

/// How far a group's state machine holds its entries: set by the state machine after every
/// applied batch and snapshot install, read by the log store's purge.
#[derive(Debug, Default)]
pub struct AppliedMark {
    /// The applied raft index + 1 (0: nothing applied).
    next: AtomicU64,
    /// A snapshot install failed: what it would have covered is not held, and never will be.
    failed: AtomicBool,
}

impl AppliedMark {
    /// The state machine applied (or installed) up to `log_id`.
    pub fn applied(&self, log_id: Option<LogId>) {
        let next = log_id.map_or(0, |id| id.index.saturating_add(1));
        self.next.fetch_max(next, Ordering::Release);
    }

    /// A snapshot install failed.
    pub fn install_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    fn holds(&self, index: u64) -> bool {
        self.next.load(Ordering::Acquire) > index
    }
}

/// The raft-specific part of a stored entry.
#[derive(Serialize, Deserialize)]
enum RaftPart {
    Blank(LogId),
    Events(LogId),
    Cluster(LogId, ClusterSettings),
    Membership(LogId, openraft::Membership<NodeId, Node>),
    // Appended: postcard tags variants by position, so stored entries keep their meaning.
    ClusterKeyed(LogId, ClusterSettings, [u8; PHONE_KEY_BYTES]),
    ClusterPlaced(LogId, ClusterSettings, [u8; PHONE_KEY_BYTES], Placement),
    PlacementMoved(LogId, u16, NodeId, NodeId),
    Draining(LogId, NodeId, bool),
    EventFormat(LogId, u32),
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
            (RaftPart::Events(log_id), Some(payload.as_ref()))
        }
        EntryPayload::Normal(Proposal::Cluster(settings)) => {
            (RaftPart::Cluster(log_id, *settings), None)
        }
        EntryPayload::Normal(Proposal::ClusterKeyed(settings, key)) => (
            RaftPart::ClusterKeyed(log_id, *settings, *key.expose()),
            None,
        ),
        EntryPayload::Normal(Proposal::ClusterPlaced(settings, key, placement)) => (
            RaftPart::ClusterPlaced(log_id, *settings, *key.expose(), placement.as_ref().clone()),
            None,
        ),
        EntryPayload::Normal(Proposal::PlacementMoved(shard, from, to)) => (
            RaftPart::PlacementMoved(log_id, shard.get(), *from, *to),
            None,
        ),
        EntryPayload::Normal(Proposal::Draining(node, on)) => {
            (RaftPart::Draining(log_id, *node, *on), None)
        }
        EntryPayload::Normal(Proposal::EventFormat(format)) => {
            (RaftPart::EventFormat(log_id, *format), None)
        }
        EntryPayload::Membership(membership) => {
            (RaftPart::Membership(log_id, membership.clone()), None)
        }
    };
    let raft = postcard::to_stdvec(&raft).map_err(|e| codec_fault("encode entry", e))?;
    // `LogEntry { raft, events }` field by field, so the shared events are not cloned to
    // build one.
    let mut payload = Vec::with_capacity(
        raft.len()
            .saturating_add(events.map_or(0, Message::encoded_len))
            .saturating_add(16),
    );
    prost::encoding::bytes::encode(1, &raft, &mut payload);
    if let Some(events) = events {
        prost::encoding::message::encode(2, events, &mut payload);
    }
    Ok(LogRecord {
        index: storage_index(log_id.index),
        term: log_id.leader_id.term,
        payload,
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
            (
                log_id,
                EntryPayload::Normal(Proposal::Events(Arc::new(events))),
            )
        }
        RaftPart::Cluster(log_id, settings) => {
            (log_id, EntryPayload::Normal(Proposal::Cluster(settings)))
        }
        RaftPart::ClusterKeyed(log_id, settings, key) => (
            log_id,
            EntryPayload::Normal(Proposal::ClusterKeyed(settings, PhoneKey::new(key))),
        ),
        RaftPart::ClusterPlaced(log_id, settings, key, placement) => (
            log_id,
            EntryPayload::Normal(Proposal::ClusterPlaced(
                settings,
                PhoneKey::new(key),
                Arc::new(placement),
            )),
        ),
        RaftPart::PlacementMoved(log_id, shard, from, to) => (
            log_id,
            EntryPayload::Normal(Proposal::PlacementMoved(
                courier_proto::ShardId::new(shard),
                from,
                to,
            )),
        ),
        RaftPart::Draining(log_id, node, on) => {
            (log_id, EntryPayload::Normal(Proposal::Draining(node, on)))
        }
        RaftPart::EventFormat(log_id, format) => {
            (log_id, EntryPayload::Normal(Proposal::EventFormat(format)))
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

/// Counters of the group-commit effect: appends and entries appended.
#[derive(Debug, Default)]
pub struct AppendStats {
    /// `append` calls, each one write batch waiting for a synced write (which the node's log
    /// writer shares with the appends of other groups: the node's `synced_writes` counts the
    /// fsyncs themselves).
    pub fsyncs: AtomicU64,
    /// Entries written by those calls.
    pub entries: AtomicU64,
    /// Nanoseconds those calls waited for their write and fsync.
    pub sync_nanos: AtomicU64,
    /// Notified after every append flushed: the proposer dispatches its next batch then, so
    /// that proposals arriving during an fsync merge into one entry.
    pub flushed: tokio::sync::Notify,
}

/// One in this many of openraft's `save_committed` calls writes the commit index to storage
/// (the first one included); the others only remember it in memory (ARCHITECTURE.md,
/// "Durability").
pub const COMMITTED_SAVE_EVERY: u64 = 16;

/// Entries kept decoded in memory per group at most.
pub const RECENT_ENTRIES_MAX: usize = 2048;
/// Encoded bytes of the entries kept in memory per group at most.
pub const RECENT_BYTES_MAX: usize = 16 << 20;

/// The encoded bytes all groups of a node keep in memory as recent entries at most
/// (`raft.log-cache-bytes-max`), and how many they keep now.
///
/// Past the budget, room is made where the entries are least likely to be read again: the
/// groups that appended least recently give up their oldest entries first, the appending group
/// its own last (`LogCacheBudget::make_room`). So idle groups do not keep the budget from the
/// busy ones until their next purge.
#[derive(Debug)]
pub struct LogCacheBudget {
    max: usize,
    used: AtomicUsize,
    /// Stamps each append, to tell which group appended least recently (a count, not a clock:
    /// the same in every run of the simulation).
    appends: AtomicU64,
    /// The recent entries of every group caching within this budget.
    groups: Mutex<Vec<Weak<Mutex<Recent>>>>,
}

impl LogCacheBudget {
    /// A budget of `max` bytes (0: no entry is kept).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
            appends: AtomicU64::new(0),
            groups: Mutex::new(Vec::new()),
        }
    }

    /// The budget's bytes in use, at most.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The bytes kept now, over all groups sharing this budget.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.max
    }

    fn take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// A new group's recent entries, kept within this budget.
    fn join(self: &Arc<Self>) -> Arc<Mutex<Recent>> {
        let recent = Arc::new(Mutex::new(Recent::within(self.clone())));
        let mut groups = self.groups.lock().expect("budget lock is never poisoned");
        groups.retain(|group| group.strong_count() > 0);
        groups.push(Arc::downgrade(&recent));
        recent
    }

    /// Brings the bytes kept back within the budget after `appending` went past it: the other
    /// groups give up their oldest entries, the group that appended least recently first, down
    /// to a sixteenth below the budget (so the next appends need not come here again); then, if
    /// that is not enough, `appending` gives up its own oldest, down to none.
    ///
    /// Called holding no group's lock; the others' are only tried, so two groups making room at
    /// once never wait for each other (a group busy now is not the idlest one anyway).
    fn make_room(&self, appending: &Arc<Mutex<Recent>>) {
        let others: Vec<Arc<Mutex<Recent>>> = self
            .groups
            .lock()
            .expect("budget lock is never poisoned")
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|group| !Arc::ptr_eq(group, appending))
            .collect();
        let target = self.max.saturating_sub(self.max / 16);
        // Each group's lock is held only to read when it appended, then only while it gives
        // up entries: one at a time, so the others' reads are not held up meanwhile.
        let mut idlest: Vec<(u64, &Arc<Mutex<Recent>>)> = others
            .iter()
            .filter_map(|group| {
                let recent = group.try_lock().ok()?;
                (!recent.entries.is_empty()).then_some((recent.appended, group))
            })
            .collect();
        idlest.sort_by_key(|(appended, _)| *appended);
        for (_, group) in idlest {
            if let Ok(mut recent) = group.try_lock() {
                while self.used() > target && recent.pop_oldest() {}
            }
            if self.used() <= target {
                return;
            }
        }
        let mut own = appending
            .lock()
            .expect("recent entries lock is never poisoned");
        while self.over() && own.pop_oldest() {}
    }
}

impl Default for LogCacheBudget {
    /// No bound beyond each group's own ([`RECENT_BYTES_MAX`]): a store used on its own.
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

/// The last entries appended, contiguous, oldest first, with their encoded sizes; their bytes
/// are counted in the node's `budget` until they leave.
#[derive(Debug, Default)]
struct Recent {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
    budget: Arc<LogCacheBudget>,
    /// When this group appended last, in the budget's count of appends.
    appended: u64,
}

impl Drop for Recent {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

impl Recent {
    fn within(budget: Arc<LogCacheBudget>) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
            appended: 0,
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.budget.give_back(self.bytes);
        self.bytes = 0;
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.log_id.index)
    }

    /// Keeps `entry` (of `bytes` encoded) within this group's own bounds; true when the node's
    /// budget is now exceeded ([`LogCacheBudget::make_room`] then brings it back).
    #[must_use]
    fn push(&mut self, entry: Entry<TypeConfig>, bytes: usize) -> bool {
        let next = self
            .entries
            .back()
            .map(|(last, _)| last.log_id.index.saturating_add(1));
        if next.is_some_and(|next| next != entry.log_id.index) {
            // Not contiguous with what is cached (cannot happen after a truncate): start over.
            self.clear();
        }
        self.entries.push_back((entry, bytes));
        self.bytes = self.bytes.saturating_add(bytes);
        self.budget.take(bytes);
        self.appended = self.budget.appends.fetch_add(1, Ordering::Relaxed);
        while (self.entries.len() > RECENT_ENTRIES_MAX || self.bytes > RECENT_BYTES_MAX)
            && self.pop_oldest()
        {}
        self.budget.over()
    }

    /// Keeps the entries `group` just appended, with their encoded sizes, and brings the node's
    /// budget back if they exceed it.
    fn keep(
        group: &Arc<Mutex<Self>>,
        entries: impl IntoIterator<Item = (Entry<TypeConfig>, usize)>,
    ) {
        let mut recent = group.lock().expect("recent entries lock is never poisoned");
        let mut over = false;
        for (entry, bytes) in entries {
            over |= recent.push(entry, bytes);
        }
        let budget = recent.budget.clone();
        drop(recent);
        if over {
            budget.make_room(group);
        }
    }

    /// Gives up the oldest entry kept (a read of it then goes to disk); false when none is.
    fn pop_oldest(&mut self) -> bool {
        let Some((_, dropped)) = self.entries.pop_front() else {
            return false;
        };
        self.bytes = self.bytes.saturating_sub(dropped);
        self.budget.give_back(dropped);
        true
    }

    /// Keeps only entries with an index in `keep`.
    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.entries.retain(|(entry, _)| keep(entry.log_id.index));
        let bytes = self.entries.iter().map(|(_, bytes)| bytes).sum();
        self.budget.give_back(self.bytes.saturating_sub(bytes));
        self.bytes = bytes;
    }

    /// Entries `[start, end)`, when every one of them is here.
    fn range(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        if start < first || end <= start {
            return None;
        }
        let skip = usize::try_from(start.saturating_sub(first)).ok()?;
        let take = usize::try_from(end.saturating_sub(start)).ok()?;
        if skip.saturating_add(take) > self.entries.len() {
            return None;
        }
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(entry, _)| entry.clone())
                .collect(),
        )
    }
}

/// One raft group's log storage.
#[derive(Clone, Debug)]
pub struct LogStore {
    log: courier_storage::LogStore,
    /// How far the group's state machine holds its entries; a purge past it waits (`purge`).
    applied: Option<Arc<AppliedMark>>,
    /// Group-commit counters, shared with metrics.
    pub stats: Arc<AppendStats>,
    recent: Arc<Mutex<Recent>>,
    /// The last commit index openraft gave `save_committed` in this process, and how many
    /// calls it made.
    committed: Option<Option<LogId>>,
    commit_calls: u64,
}

impl LogStore {
    /// The log of one group.
    pub fn new(log: courier_storage::LogStore) -> Self {
        Self {
            log,
            applied: None,
            stats: Arc::default(),
            recent: Arc::default(),
            committed: None,
            commit_calls: 0,
        }
    }

    /// Recent entries are kept within `budget`, shared by all groups of the node.
    #[must_use]
    pub fn caching_within(mut self, budget: Arc<LogCacheBudget>) -> Self {
        self.recent = budget.join();
        self
    }

    /// Purges wait until the state machine behind `applied` holds what they purge (`purge`
    /// says why). Without it (a store used on its own, as openraft's conformance suite does) a
    /// purge goes ahead at once.
    #[must_use]
    pub fn purging_behind(mut self, applied: Arc<AppliedMark>) -> Self {
        self.applied = Some(applied);
        self
    }

    /// Waits until the state machine applied (or installed) up to `log_id`.
    async fn wait_applied(&self, log_id: LogId) -> Result<(), RaftStorageError> {
        let Some(applied) = &self.applied else {
            return Ok(());
        };
        if crate::bugs::purge_before_install() {
            return Ok(());
        }
        let mut waited = false;
        loop {
            if applied.holds(log_id.index) {
                return Ok(());
            }
            if applied.failed.load(Ordering::Acquire) {
                return Err(StorageIOError::write(&std::io::Error::other(
                    "a snapshot install failed: the entries it covers are not purged",
                ))
                .into());
            }
            if !waited {
                waited = true;
                tracing::info!(
                    upto = log_id.index,
                    "purge waits for the state machine to hold the snapshot it covers"
                );
            }
            tokio::time::sleep(PURGE_WAIT_POLL).await;
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent
            .lock()
            .expect("recent entries lock is never poisoned")
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
        if let Some(entries) = self.recent().range(start, end) {
            return Ok(entries);
        }
        // Entries at or below the purge point may still be stored until the archive holds them
        // (see `purge`); raft never sees them.
        let start = match self.read_id(raft_tag::PURGED)? {
            Some(purged) => start.max(purged.index.saturating_add(1)),
            None => start,
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
        let stored = self
            .log
            .last()
            .map_err(fault)?
            .map(|record| decode_record(self.log.shard(), &record).map(|entry| entry.log_id))
            .transpose()?;
        // Entries raft purged may still be stored until the archive holds them: the last log
        // id is never below the purge point.
        let last_log_id = stored.max(last_purged_log_id);
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
        // Not synced, and written once in COMMITTED_SAVE_EVERY calls (ARCHITECTURE.md,
        // "Durability"): openraft treats the stored commit index as a hint that lets a restarted
        // node apply sooner; one older than the applied index is raised to it at start, a lost
        // one is re-learned from the leader, and every entry it names was synced before it.
        self.committed = Some(committed);
        let call = self.commit_calls;
        self.commit_calls = call.wrapping_add(1);
        if !call.is_multiple_of(COMMITTED_SAVE_EVERY) {
            return Ok(());
        }
        let bytes = postcard::to_stdvec(&committed).map_err(|e| codec_fault("raft state", e))?;
        self.log
            .save_state_unsynced(raft_tag::COMMITTED, &bytes)
            .map_err(fault)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        if let Some(committed) = self.committed {
            return Ok(committed);
        }
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
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let records = entries
            .iter()
            .map(encode_entry)
            .collect::<Result<Vec<_>, _>>()?;
        let count = u64::try_from(records.len()).unwrap_or(u64::MAX);
        // Synced before the callback: openraft counts the entries as durable only after it. The
        // node's log writer merges this append with the other groups' into one fsync; this
        // group's next write waits for it, which keeps the group's writes in order.
        let started = std::time::Instant::now();
        let (written, durable) = tokio::sync::oneshot::channel();
        self.log.append_merged(
            &records,
            Box::new(move |result| {
                // The receiver is gone only if this task was dropped: nothing waits then.
                let _ = written.send(result);
            }),
        );
        let result = durable.await.unwrap_or_else(|_| {
            Err(StorageError::Disk {
                op: "write",
                reason: "the log writer dropped an append".to_owned(),
            })
        });
        if result.is_ok() {
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.stats.entries.fetch_add(count, Ordering::Relaxed);
            self.stats.sync_nanos.fetch_add(took, Ordering::Relaxed);
            let sizes = records.iter().map(|record| record.payload.len());
            Recent::keep(&self.recent, entries.into_iter().zip(sizes));
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
        self.recent().retain(|index| index < log_id.index);
        self.log
            .truncate_from(storage_index(log_id.index))
            .map_err(fault)
    }

    /// Raft's purge: from here on raft never reads these entries again, but they are deleted
    /// only as far as the log archive holds them (`raft_tag::ARCHIVED`); the node's archiver
    /// deletes the rest once it archived them. Purge never passes what is archived.
    ///
    /// openraft 0.9 purges the entries an installed snapshot covers right after it hands the
    /// install to the state machine, without waiting for it to finish. A crash in between would
    /// leave a log purged past the applied state, which openraft refuses to start from (and whose
    /// entries no replica may have any more). So a purge past what the state machine holds waits
    /// for it; the synced purge record then also makes the applied state before it durable.
    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.wait_applied(log_id).await?;
        // Record the purge point first, so a crash in between never loses track of it.
        self.save(raft_tag::PURGED, &log_id)?;
        self.recent().retain(|index| index > log_id.index);
        let archived = self.log.archived_up_to().map_err(fault)?;
        let up_to = storage_index(log_id.index).min(archived);
        if up_to.get() == 0 {
            return Ok(());
        }
        self.log.purge_up_to(up_to).map_err(fault)
    }
}

#[cfg(test)]
mod tests {
    use courier_proto::pb::events::{EntryPayload as Events, Event};
    use courier_proto::pb::store::LogEntry;
    use openraft::CommittedLeaderId;

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal::Events(Arc::new(Events {
                format_version: courier_proto::FORMAT_VERSION,
                events: vec![Event { kind: None }; usize::try_from(index % 3).unwrap_or(0)],
            }))),
        }
    }

    #[test]
    fn an_entry_is_encoded_as_the_log_entry_message_would_be() {
        let entry = entry(4);
        let record = encode_entry(&entry).expect("encodes");
        let EntryPayload::Normal(Proposal::Events(events)) = &entry.payload else {
            unreachable!("built as events");
        };
        let raft = postcard::to_stdvec(&RaftPart::Events(entry.log_id)).expect("postcard");
        let expected = LogEntry {
            raft,
            events: Some(events.as_ref().clone()),
        }
        .encode_to_vec();
        assert_eq!(record.payload, expected);
        let decoded = decode_record(courier_proto::ShardId::new(0), &record).expect("decodes back");
        assert_eq!(decoded, entry);
    }

    fn store_on_memdisk() -> (LogStore, Arc<AppliedMark>) {
        let db = Arc::new(courier_storage::Db::on_memdisk(
            Arc::new(courier_storage::MemDisk::new()),
            std::path::Path::new("purge-test"),
        ));
        let mark = Arc::new(AppliedMark::default());
        let log = courier_storage::LogStore::new(db, courier_proto::ShardId::new(0));
        (LogStore::new(log).purging_behind(mark.clone()), mark)
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// openraft 0.9 purges an installed snapshot's entries while the state machine still
    /// installs it: the purge point is recorded only once the state machine holds it, so a
    /// crash in between leaves a log openraft starts from.
    #[tokio::test]
    async fn a_purge_past_the_applied_state_waits_for_the_state_machine() {
        let (mut store, mark) = store_on_memdisk();
        mark.applied(Some(log_id(5)));
        store
            .purge(log_id(5))
            .await
            .expect("purges what is applied at once");
        assert_eq!(
            store.read_id(raft_tag::PURGED).expect("reads"),
            Some(log_id(5))
        );

        let purge = tokio::spawn(async move { store.purge(log_id(40)).await.map(|()| store) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !purge.is_finished(),
            "the purge waits while the install runs"
        );
        mark.applied(Some(log_id(40)));
        let store = purge.await.expect("joins").expect("purges once installed");
        assert_eq!(
            store.read_id(raft_tag::PURGED).expect("reads"),
            Some(log_id(40))
        );
    }

    #[tokio::test]
    async fn a_purge_behind_a_failed_install_fails_and_records_nothing() {
        let (mut store, mark) = store_on_memdisk();
        mark.applied(Some(log_id(5)));
        let purge = tokio::spawn(async move {
            let result = store.purge(log_id(40)).await;
            (result, store)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        mark.install_failed();
        let (result, store) = purge.await.expect("joins");
        assert!(
            result.is_err(),
            "a failed install stops the purge (and the group)"
        );
        assert_eq!(store.read_id(raft_tag::PURGED).expect("reads"), None);
    }

    #[test]
    fn recent_entries_answer_only_ranges_they_hold_whole() {
        let mut recent = Recent::default();
        for index in 10..20 {
            assert!(!recent.push(entry(index), 100));
        }
        let got = recent.range(12, 15).expect("held");
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![12, 13, 14]
        );
        assert!(recent.range(9, 12).is_none(), "starts before the cache");
        assert!(recent.range(18, 21).is_none(), "ends after the cache");
        recent.retain(|index| index < 15); // truncate at 15
        assert!(recent.range(14, 16).is_none());
        assert_eq!(recent.bytes, 500);
        assert!(!recent.push(entry(15), 100));
        recent.retain(|index| index > 11); // purge up to 11
        assert_eq!(recent.first_index(), Some(12));
        // A gap (not contiguous) starts the cache over instead of answering wrongly.
        assert!(!recent.push(entry(30), 100));
        assert!(recent.range(12, 13).is_none());
        assert!(recent.range(30, 31).is_some());
    }

    #[test]
    fn recent_entries_stay_within_their_bounds() {
        let mut recent = Recent::default();
        for index in 0..u64::try_from(RECENT_ENTRIES_MAX + 10).unwrap_or(u64::MAX) {
            assert!(!recent.push(entry(index), 1));
        }
        assert_eq!(recent.entries.len(), RECENT_ENTRIES_MAX);
        assert!(!recent.push(
            entry(u64::try_from(RECENT_ENTRIES_MAX + 10).unwrap_or(0)),
            RECENT_BYTES_MAX,
        ));
        assert!(recent.bytes <= RECENT_BYTES_MAX);
    }

    /// The groups of a node keep their recent entries within one budget. Past it, the groups
    /// that appended least recently give up their oldest entries first (down to a sixteenth
    /// below the budget), the appending group its own last, down to none; a truncation, a purge
    /// or a group that goes away gives its bytes back.
    #[test]
    fn the_groups_of_a_node_share_one_budget() {
        let budget = Arc::new(LogCacheBudget::new(1600));
        let (a, b, c) = (budget.join(), budget.join(), budget.join());
        let lock = |group: &Arc<Mutex<Recent>>| {
            let recent = group.lock().expect("not poisoned");
            (recent.first_index(), recent.bytes)
        };
        let keep = |group: &Arc<Mutex<Recent>>, indexes: std::ops::Range<u64>, bytes| {
            Recent::keep(group, indexes.map(|index| (entry(index), bytes)));
        };
        keep(&a, 0..8, 100);
        keep(&c, 0..4, 100);
        assert_eq!(budget.used(), 1200);
        keep(&b, 0..4, 100);
        assert_eq!(budget.used(), 1600, "up to the budget all is kept");
        keep(&b, 4..5, 100);
        assert_eq!(budget.used(), 1500, "room is made down to 1600 - 100");
        assert_eq!(
            lock(&a),
            (Some(2), 600),
            "a appended least recently: it gave up its oldest"
        );
        assert_eq!(lock(&c), (Some(0), 400), "c appended after a: it kept all");
        assert_eq!(lock(&b), (Some(0), 500), "b, appending, kept all");
        keep(&b, 5..7, 400);
        assert_eq!(lock(&a), (None, 0), "a gave up all it had");
        assert_eq!(lock(&c), (Some(2), 200), "then c, the next idlest");
        assert_eq!(lock(&b), (Some(0), 1300));
        assert_eq!(budget.used(), 1500);
        keep(&c, 4..5, 1700);
        assert_eq!(lock(&b), (None, 0));
        assert_eq!(lock(&c), (None, 0), "nothing of c fits: it keeps none");
        assert_eq!(budget.used(), 0);
        keep(&a, 8..12, 100);
        keep(&b, 7..11, 100);
        b.lock().expect("not poisoned").retain(|index| index < 9); // a truncation at 9
        assert_eq!(budget.used(), 600);
        drop(a);
        assert_eq!(budget.used(), 200, "a group gone gives its bytes back");
        let off = Arc::new(LogCacheBudget::new(0));
        let none = off.join();
        Recent::keep(&none, [(entry(0), 1)]);
        assert!(lock(&none).0.is_none(), "a budget of 0 keeps nothing");
        assert_eq!(off.used(), 0);
    }
}
