//! The raft groups of one node: the metadata group and one group per shard replica, all sharing
//! the node's RocksDB and one gRPC channel per peer.
//!
//! Groups found on disk are started at open; a group a peer replicates to for the first time is
//! created empty on first contact (bounded by the cluster's shard count once it is known).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use courier_proto::PhoneHasher;
use courier_storage::Db;
use openraft::{Config, SnapshotPolicy};
use tracing::info;

use crate::log_store::{AppendStats, LogStore};
use crate::network::{ChannelPool, GroupRouter, PeerNetwork};
use crate::proposer::Proposer;
use crate::state_machine::{AppliedView, StateMachine};
use crate::types::{GroupId, NodeId, Raft, RaftStorageError};
use crate::watch::ApplyWatch;

/// Why a group could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// Storage failed while opening the group.
    #[error("storage of {group}: {source}")]
    Storage {
        /// The group.
        group: GroupId,
        /// The fault.
        #[source]
        source: RaftStorageError,
    },
    /// The raft configuration was refused by openraft.
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    /// openraft failed to start the group.
    #[error("raft of {group}: {reason}")]
    Raft {
        /// The group.
        group: GroupId,
        /// openraft's error.
        reason: String,
    },
    /// A shard outside the cluster's shard count.
    #[error("{group} is not a group of this cluster (shard count {shard_count})")]
    UnknownGroup {
        /// The group.
        group: GroupId,
        /// The cluster's shard count.
        shard_count: u16,
    },
    /// This node's replica of the shard was dropped (moved to another node): only the leader
    /// adding it back after a readmit starts it again ([`Groups::readmit`]).
    #[error(
        "{group} was dropped on this node (moved away); it starts again only when a move brings it back"
    )]
    Dropped {
        /// The group.
        group: GroupId,
    },
}

/// Raft timing and log retention, from the node's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftTiming {
    /// Leader heartbeat.
    pub heartbeat: Duration,
    /// Election timeout range.
    pub election_timeout_min: Duration,
    /// Election timeout range.
    pub election_timeout_max: Duration,
    /// Deadline of one peer RPC.
    pub rpc_timeout: Duration,
    /// Entries between snapshots.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log below a snapshot, for slow followers.
    pub logs_to_keep: u64,
    /// Snapshot chunk size on the wire, bytes.
    pub snapshot_chunk_bytes: u64,
    /// Largest number of entries in one append-entries RPC.
    pub append_entries_max: u64,
    /// Encoded bytes of recent entries all groups keep in memory at most
    /// (`log_store::LogCacheBudget`).
    pub log_cache_bytes_max: usize,
    /// What each group's proposer holds waiting at most.
    pub proposal_queue: crate::proposer::QueueLimits,
}

impl RaftTiming {
    fn openraft_config(&self) -> Result<Config, openraft::ConfigError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Config {
            cluster_name: "courier".to_owned(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.rpc_timeout),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_payload_entries: self.append_entries_max,
            ..Config::default()
        }
        .validate()
    }
}

/// One group's handles.
#[derive(Clone)]
pub struct GroupHandle {
    /// The raft.
    pub raft: Raft,
    /// What it applied.
    pub applied: Arc<RwLock<AppliedView>>,
    /// Group-commit counters.
    pub stats: Arc<AppendStats>,
    /// The group-commit front: propose events through it.
    pub proposer: Proposer,
    /// Online verify and rebuild of this replica's projections.
    pub maintenance: crate::maintenance::Maintenance,
}

/// Every raft group of this node.
pub struct Groups {
    node_id: NodeId,
    db: Arc<Db>,
    pool: Arc<ChannelPool>,
    config: Arc<Config>,
    rpc_timeout: Duration,
    proposal_queue: crate::proposer::QueueLimits,
    log_cache: Arc<crate::log_store::LogCacheBudget>,
    groups: RwLock<BTreeMap<GroupId, GroupHandle>>,
    creating: tokio::sync::Mutex<()>,
    /// Held by the node's log archiver over each shard's pass and by [`Groups::drop_shard`]
    /// over the delete, so no archive pass writes a dropped replica's keys again.
    archiving: tokio::sync::Mutex<()>,
    watch: Arc<ApplyWatch>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Groups {
    /// Opens the node's groups: every group with raft state on disk is started.
    ///
    /// # Errors
    /// [`ConsensusError`] when a group cannot be started.
    pub async fn open(
        node_id: NodeId,
        db: Arc<Db>,
        timing: &RaftTiming,
    ) -> Result<Arc<Self>, ConsensusError> {
        let pool = Arc::new(ChannelPool::new(timing.rpc_timeout));
        Self::open_with(node_id, db, timing, pool).await
    }

    /// [`Groups::open`] with the peer channels coming from `pool` (the simulation's network).
    ///
    /// # Errors
    /// [`ConsensusError`] when a group cannot be started.
    pub async fn open_with(
        node_id: NodeId,
        db: Arc<Db>,
        timing: &RaftTiming,
        pool: Arc<ChannelPool>,
    ) -> Result<Arc<Self>, ConsensusError> {
        let groups = Arc::new(Self {
            node_id,
            db: db.clone(),
            pool,
            config: Arc::new(timing.openraft_config()?),
            rpc_timeout: timing.rpc_timeout,
            proposal_queue: timing.proposal_queue,
            log_cache: Arc::new(crate::log_store::LogCacheBudget::new(
                timing.log_cache_bytes_max,
            )),
            groups: RwLock::default(),
            creating: tokio::sync::Mutex::new(()),
            archiving: tokio::sync::Mutex::new(()),
            watch: Arc::default(),
        });
        let stored = courier_storage::LogStore::stored_shards(db.as_ref()).map_err(|e| {
            ConsensusError::Storage {
                group: GroupId::Metadata,
                source: crate::log_store::fault(e),
            }
        })?;
        for prefix in stored {
            groups
                .get_or_create(GroupId::from_storage_prefix(prefix))
                .await?;
        }
        Ok(groups)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The node's database (shared by every group).
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Wake-ups after apply, per user and for the outbox, from every group of this node.
    pub fn watch(&self) -> &Arc<ApplyWatch> {
        &self.watch
    }

    /// The upper bound of the randomized election timeout: how long followers wait without a
    /// heartbeat before one of them stands for election.
    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.config.election_timeout_max)
    }

    /// The lower bound of the randomized election timeout.
    pub fn election_timeout_min(&self) -> Duration {
        Duration::from_millis(self.config.election_timeout_min)
    }

    /// How often a leader sends heartbeats to its followers (`raft.heartbeat`).
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat_interval)
    }

    /// The recent log entries all groups of this node keep in memory (`raft.log-cache-bytes-max`).
    pub fn log_cache(&self) -> &crate::log_store::LogCacheBudget {
        &self.log_cache
    }

    /// The shared channel pool (also used for forwarding to other nodes).
    pub fn pool(&self) -> Arc<ChannelPool> {
        self.pool.clone()
    }

    /// Returns a running group.
    pub fn get(&self, group: GroupId) -> Option<GroupHandle> {
        self.groups
            .read()
            .expect("groups lock is never poisoned")
            .get(&group)
            .cloned()
    }

    /// Returns every running group, in order.
    pub fn list(&self) -> Vec<(GroupId, GroupHandle)> {
        self.groups
            .read()
            .expect("groups lock is never poisoned")
            .iter()
            .map(|(g, h)| (*g, h.clone()))
            .collect()
    }

    /// The cluster's shard count, once the metadata group applied the settings.
    pub fn shard_count(&self) -> Option<u16> {
        self.settings().map(|settings| settings.shard_count)
    }

    /// The cluster settings, once the metadata group applied them.
    pub fn settings(&self) -> Option<crate::types::ClusterSettings> {
        let metadata = self.get(GroupId::Metadata)?;
        let view = metadata
            .applied
            .read()
            .expect("applied view lock is never poisoned");
        view.raft.settings
    }

    /// Where each shard's replicas are, once the metadata group applied the settings: the
    /// placed table, or `None` for a cluster that holds every shard on every member.
    pub fn placement(&self) -> Option<Arc<crate::placement::Placement>> {
        let metadata = self.get(GroupId::Metadata)?;
        let view = metadata
            .applied
            .read()
            .expect("applied view lock is never poisoned");
        view.raft.placement.clone()
    }

    /// The members marked draining (`Proposal::Draining`): moves take their replicas away and
    /// put none on them. Empty before the metadata group applied any.
    pub fn draining(&self) -> std::collections::BTreeSet<NodeId> {
        self.get(GroupId::Metadata)
            .map(|metadata| {
                metadata
                    .applied
                    .read()
                    .expect("applied view lock is never poisoned")
                    .raft
                    .draining
                    .clone()
            })
            .unwrap_or_default()
    }

    /// The event format the cluster's leaders write, as the metadata group applied it here (1
    /// before it applied a raise).
    pub fn event_format(&self) -> u32 {
        self.watch.event_format()
    }

    /// How this cluster hashes phone numbers; `None` before the cluster settings are applied
    /// here. The key never leaves the node through this: callers hash with it.
    pub fn phone_hasher(&self) -> Option<PhoneHasher> {
        let metadata = self.get(GroupId::Metadata)?;
        let view = metadata
            .applied
            .read()
            .expect("applied view lock is never poisoned");
        view.raft.settings?;
        Some(
            view.raft
                .phone_key
                .map_or(PhoneHasher::Unkeyed, PhoneHasher::Keyed),
        )
    }

    /// Returns a group, starting it (empty) if this node does not run it yet (never a replica
    /// dropped here: see [`Groups::readmit`]).
    ///
    /// # Errors
    /// [`ConsensusError`] when it cannot be started or is outside the cluster's shard count.
    pub async fn get_or_create(&self, group: GroupId) -> Result<GroupHandle, ConsensusError> {
        self.get_or_create_for(group, None).await
    }

    /// [`Groups::get_or_create`] for a raft message: `leader_term` is the term of the leader
    /// that sent entries or a snapshot (`None`: a vote request). Only such a leader, at or above
    /// the floor a readmit set, starts a replica dropped here; that clears the mark.
    async fn get_or_create_for(
        &self,
        group: GroupId,
        leader_term: Option<u64>,
    ) -> Result<GroupHandle, ConsensusError> {
        if let Some(handle) = self.get(group) {
            return Ok(handle);
        }
        if let (GroupId::Shard(shard), Some(shard_count)) = (group, self.shard_count())
            && shard.get() >= shard_count
        {
            return Err(ConsensusError::UnknownGroup { group, shard_count });
        }
        let _creating = self.creating.lock().await;
        if let Some(handle) = self.get(group) {
            return Ok(handle);
        }
        let prefix = group.storage_prefix();
        let stored = courier_storage::LogStore::new(self.db.clone(), prefix);
        let storage = |source| ConsensusError::Storage {
            group,
            source: crate::log_store::fault(source),
        };
        if let Some(floor) = stored.dropped().map_err(storage)? {
            if leader_term.is_none_or(|term| term < floor) {
                return Err(ConsensusError::Dropped { group });
            }
            info!(%group, floor, "the leader that adds this replica back starts it");
            stored.clear_dropped().map_err(storage)?;
        }
        let sm = StateMachine::open(self.db.clone(), group)
            .map(|sm| sm.with_watch(self.watch.clone()))
            .map_err(|source| ConsensusError::Storage { group, source })?;
        let log = LogStore::new(stored)
            .purging_behind(sm.applied_mark())
            .caching_within(self.log_cache.clone());
        let stats = log.stats.clone();
        let applied = sm.shared();
        let maintenance = sm.maintenance();
        let network = PeerNetwork::new(group, self.pool.clone(), self.rpc_timeout);
        let raft = Raft::new(self.node_id, self.config.clone(), network, log, sm)
            .await
            .map_err(|e| ConsensusError::Raft {
                group,
                reason: e.to_string(),
            })?;
        info!(%group, node_id = self.node_id, "raft group started");
        let proposer = Proposer::start(
            raft.clone(),
            stats.clone(),
            self.proposal_queue,
            self.watch.clone(),
        );
        let handle = GroupHandle {
            raft,
            applied,
            stats,
            proposer,
            maintenance,
        };
        self.groups
            .write()
            .expect("groups lock is never poisoned")
            .insert(group, handle.clone());
        Ok(handle)
    }

    /// Readmits this node's replica of `shard` if it was dropped here: a move to this node sends
    /// this first, with the term of the shard's leader as the moving node knows it. The group then
    /// starts on the first entries or snapshot of a leader of that term or a later one, which is
    /// the leader adding this node back; nothing else starts it. Raft assumes a voter never loses
    /// its log; a dropped replica has, so it must never count as one for a node that missed its
    /// removal:
    /// - a vote request never starts it: an empty replica grants any candidate its vote (no log
    ///   is behind an empty one), and a candidate whose log lacks the removal (and what was
    ///   committed with it) could win with that vote;
    /// - nor does a leader of an earlier term, or any leader before a readmit (a heartbeat sent
    ///   just before the removal committed): the replica would take that leader's log and then
    ///   vote with it.
    ///
    /// A leader at or above the floor was elected by voters that hold the removal (this replica
    /// votes for no one), so it reaches this node only when a later membership adds it back. If
    /// the move fails before that, the replica stays unstarted, as safe as when dropped.
    ///
    /// # Errors
    /// [`ConsensusError::Storage`] when the mark cannot be read or written.
    pub async fn readmit(
        &self,
        shard: courier_proto::ShardId,
        leader_term: u64,
    ) -> Result<(), ConsensusError> {
        let group = GroupId::Shard(shard);
        let _creating = self.creating.lock().await;
        let storage = |source| ConsensusError::Storage {
            group,
            source: crate::log_store::fault(source),
        };
        let stored = courier_storage::LogStore::new(self.db.clone(), shard);
        if stored.dropped().map_err(storage)?.is_some() {
            info!(%group, leader_term, "the dropped replica is readmitted: a leader adds it back");
            let floor = courier_storage::LogStore::dropped_marker(shard, leader_term);
            self.db.commit([floor], true).map_err(storage)?;
        }
        Ok(())
    }

    /// Stops this node's replica of `shard` and deletes the shard's data in every column family,
    /// in one synced batch, leaving only its dropped mark (nothing starts it again until a
    /// readmit: see [`Groups::readmit`]): what is left of a replica that was moved away (the
    /// caller checks it is out of the group's membership, and that the committed entries only
    /// its log held are archived or on another voter). Returns how many families still hold
    /// keys of the shard afterwards (0: verified empty).
    ///
    /// # Errors
    /// [`ConsensusError::Storage`] when the delete or the check fails.
    pub async fn drop_shard(&self, shard: courier_proto::ShardId) -> Result<u32, ConsensusError> {
        let group = GroupId::Shard(shard);
        // An archive pass over the shard ends first (before `creating` is held, so a slow store
        // does not hold up other groups); later passes find no replica.
        let _archiving = self.archiving.lock().await;
        let _creating = self.creating.lock().await;
        let handle = self
            .groups
            .write()
            .expect("groups lock is never poisoned")
            .remove(&group);
        if let Some(handle) = &handle {
            if let Err(error) = handle.raft.shutdown().await {
                tracing::warn!(%group, %error, "raft group did not stop cleanly before its drop");
            }
            // The state machine's worker outlives the raft core: fence it, so no apply or install
            // queued before the shutdown writes after the delete.
            handle.maintenance.fence_for_drop().await;
        }
        let storage = |source| ConsensusError::Storage {
            group,
            source: crate::log_store::fault(source),
        };
        // Appends queued in the node's log writer before the shutdown land before the delete: a
        // synced empty write through the writer completes after them.
        let (drained, written) = tokio::sync::oneshot::channel();
        self.db.commit_synced(
            Vec::new(),
            Box::new(move |result| {
                let _ = drained.send(result);
            }),
        );
        if let Ok(result) = written.await {
            result.map_err(storage)?;
        }
        let (from, to) = courier_storage::keys::shard_range(group.storage_prefix());
        let ranges: Vec<_> = courier_storage::Cf::all()
            .map(|cf| (cf, from.clone(), to.clone()))
            .collect();
        self.db
            .replace_ranges(
                &ranges,
                vec![courier_storage::LogStore::dropped_marker(shard, u64::MAX)],
                true,
            )
            .map_err(storage)?;
        let mut left = 0_u32;
        let marker = courier_storage::LogStore::dropped_marker(shard, u64::MAX).1;
        for cf in courier_storage::Cf::all() {
            let pairs = courier_storage::ReadKv::scan(self.db.as_ref(), cf, &from, &to, 2)
                .map_err(storage)?;
            if pairs.iter().any(|(key, _)| *key != marker) {
                left = left.saturating_add(1);
            }
        }
        tracing::info!(%group, families_left = left, "replica dropped");
        Ok(left)
    }

    /// The lock the log archiver holds over each shard's pass (the archive's writes of the
    /// replica's log and marks); [`Groups::drop_shard`] holds it over the delete.
    pub fn archive_fence(&self) -> &tokio::sync::Mutex<()> {
        &self.archiving
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        for (group, handle) in self.list() {
            if let Err(error) = handle.raft.shutdown().await {
                tracing::warn!(%group, %error, "raft group did not stop cleanly");
            }
        }
    }
}

impl GroupRouter for Groups {
    async fn raft(&self, group: GroupId, leader_term: Option<u64>) -> Result<Raft, tonic::Status> {
        match self.get_or_create_for(group, leader_term).await {
            Ok(handle) => Ok(handle.raft),
            Err(ConsensusError::UnknownGroup { .. }) => Err(tonic::Status::not_found(format!(
                "{group} is not a group of this cluster"
            ))),
            Err(error) => Err(tonic::Status::unavailable(error.to_string())),
        }
    }

    fn admits(&self, node: NodeId) -> bool {
        // A member, or this node has no membership yet (how a new node is first reached).
        self.get(GroupId::Metadata)
            .and_then(|metadata| metadata.has_member(node))
            != Some(false)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use courier_proto::ShardId;
    use courier_storage::{Db, OpenMode};

    use super::{ConsensusError, Groups, RaftTiming};
    use crate::network::GroupRouter as _;
    use crate::types::GroupId;

    fn timing() -> RaftTiming {
        RaftTiming {
            heartbeat: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            rpc_timeout: Duration::from_secs(1),
            snapshot_logs_since_last: 1000,
            logs_to_keep: 100,
            snapshot_chunk_bytes: 1 << 20,
            append_entries_max: 64,
            log_cache_bytes_max: 256 << 20,
            proposal_queue: crate::proposer::QueueLimits::default(),
        }
    }

    /// A dropped replica answers no raft message (a vote request or a leader's entries would
    /// both start it empty), is not started again when the node restarts, and once readmitted
    /// starts only for a leader of the readmit's term or later.
    #[tokio::test]
    async fn a_dropped_replica_starts_again_only_for_the_leader_that_readmits_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shard = ShardId::new(2);
        let group = GroupId::Shard(shard);
        {
            let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("db"));
            let groups = Groups::open(1, db, &timing()).await.expect("groups");
            let handle = groups.get_or_create(group).await.expect("group");
            handle
                .initialize(&BTreeMap::from([(1, "127.0.0.1:1".to_owned())]))
                .await
                .expect("initialize");
            let left = groups.drop_shard(shard).await.expect("drop");
            assert_eq!(left, 0, "only the dropped mark is left of the shard");
            assert!(groups.get(group).is_none(), "the group stopped");
            assert!(matches!(
                groups.get_or_create(group).await,
                Err(ConsensusError::Dropped { .. })
            ));
            for leader_term in [None, Some(1), Some(u64::MAX - 1)] {
                let refused = groups.raft(group, leader_term).await.err();
                assert_eq!(
                    refused.map(|status| status.code()),
                    Some(tonic::Code::Unavailable),
                    "no raft message starts it ({leader_term:?})"
                );
            }
            groups.shutdown().await;
        }
        let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("db"));
        let groups = Groups::open(1, db.clone(), &timing())
            .await
            .expect("reopen");
        assert!(groups.get(group).is_none(), "a restart does not start it");
        let stored = courier_storage::LogStore::new(db, shard);
        assert_eq!(stored.dropped().expect("mark"), Some(u64::MAX));
        groups.readmit(shard, 9).await.expect("readmit");
        assert_eq!(
            stored.dropped().expect("mark"),
            Some(9),
            "the adding leader's term"
        );
        for leader_term in [None, Some(8)] {
            let refused = groups.raft(group, leader_term).await.err();
            assert!(refused.is_some(), "not for {leader_term:?}");
        }
        groups
            .raft(group, Some(9))
            .await
            .expect("the readmitting leader's entries start it");
        assert_eq!(stored.dropped().expect("mark"), None, "the mark is gone");
        groups.shutdown().await;
    }
}
