//! openraft's `RaftStateMachine` over the storage fold: committed entries are applied through
//! `ShardState::apply_batch` into one write batch together with the applied index, the digests,
//! and this layer's own state (last applied log id, membership, cluster settings).
//!
//! Snapshots are the storage crate's shard snapshot (projections + applied state), encoded as
//! length-delimited chunks; openraft streams them to followers in chunks of
//! `snapshot_max_chunk_size` bytes.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use courier_proto::{PHONE_KEY_BYTES, PhoneKey};
use courier_storage::projection::INVALID_CODE;
use courier_storage::shard::Committed;
use courier_storage::{Applied, AtThisMoment, Db, ShardState, snapshot};
use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta};
use serde::{Deserialize, Serialize};

use crate::log_store::{AppliedMark, fault, storage_index};
use crate::placement::Placement;
use crate::snapshot_data::SnapshotData;
use crate::types::{
    ClusterSettings, GroupId, LogId, Node, NodeId, Proposal, ProposalResponse, RaftStorageError,
    StoredMembership, TypeConfig,
};
use crate::watch::ApplyWatch;

/// This layer's part of the applied state, stored opaquely by storage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RaftApplied {
    /// The last applied log id.
    pub last_applied: Option<LogId>,
    /// The last applied membership.
    pub membership: StoredMembership,
    /// Cluster settings (metadata group only).
    pub settings: Option<ClusterSettings>,
    /// The phone-hash key (metadata group only; `None` in a cluster created before the key
    /// existed, which keeps its unkeyed hash).
    pub phone_key: Option<PhoneKey>,
    /// Where each shard's replicas are (metadata group only; `None` in a cluster created before
    /// placement existed, which holds every shard on every member).
    pub placement: Option<Arc<Placement>>,
    /// Members marked draining (metadata group only): moves take their replicas away and put
    /// none on them.
    pub draining: BTreeSet<NodeId>,
    /// The event format the cluster's leaders write (metadata group only; 0 and 1 both mean
    /// format 1: never raised).
    pub event_format: u32,
}

/// The first stored form: postcard of the three fields, no version tag. Its first byte is the
/// tag of `Option<LogId>` (0 or 1), which is how a version tag of 2 or more tells it apart.
#[derive(Serialize, Deserialize)]
struct RaftAppliedV1 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    settings: Option<ClusterSettings>,
}

/// Version 2 (`RAFT_APPLIED_V2` ‖ postcard): adds the phone-hash key.
#[derive(Serialize, Deserialize)]
struct RaftAppliedV2 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    settings: Option<ClusterSettings>,
    phone_key: Option<[u8; PHONE_KEY_BYTES]>,
}

/// The version tag of [`RaftAppliedV2`]'s stored form.
const RAFT_APPLIED_V2: u8 = 2;

/// Version 3 (`RAFT_APPLIED_V3` ‖ postcard): adds the placement.
#[derive(Serialize, Deserialize)]
struct RaftAppliedV3 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    settings: Option<ClusterSettings>,
    phone_key: Option<[u8; PHONE_KEY_BYTES]>,
    placement: Option<Placement>,
}

/// The version tag of [`RaftAppliedV3`]'s stored form.
const RAFT_APPLIED_V3: u8 = 3;

/// Version 4 (`RAFT_APPLIED_V4` ‖ postcard): adds the draining marks. Written only while some
/// node is marked, so a cluster that never drains keeps a form older builds open.
#[derive(Serialize, Deserialize)]
struct RaftAppliedV4 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    settings: Option<ClusterSettings>,
    phone_key: Option<[u8; PHONE_KEY_BYTES]>,
    placement: Option<Placement>,
    draining: BTreeSet<NodeId>,
}

/// The version tag of [`RaftAppliedV4`]'s stored form.
const RAFT_APPLIED_V4: u8 = 4;

/// Version 5 (`RAFT_APPLIED_V5` ‖ postcard): adds the event format. Written only once the format
/// was raised past 1, when every member runs a build that reads this form.
#[derive(Serialize, Deserialize)]
struct RaftAppliedV5 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    settings: Option<ClusterSettings>,
    phone_key: Option<[u8; PHONE_KEY_BYTES]>,
    placement: Option<Placement>,
    draining: BTreeSet<NodeId>,
    event_format: u32,
}

/// The version tag of [`RaftAppliedV5`]'s stored form.
const RAFT_APPLIED_V5: u8 = 5;

/// A stored form: its version tag, then its postcard bytes.
fn tagged(tag: u8, form: &impl Serialize) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend(postcard::to_stdvec(form).expect("postcard encodes plain data"));
    bytes
}

impl RaftApplied {
    fn decode(bytes: &[u8]) -> Result<Self, RaftStorageError> {
        let corrupt = |e: &dyn std::fmt::Display| -> RaftStorageError {
            openraft::StorageIOError::read(&std::io::Error::other(format!(
                "raft applied state: {e}"
            )))
            .into()
        };
        match bytes.first() {
            None => Ok(Self::default()),
            Some(0 | 1) => {
                let v1: RaftAppliedV1 = postcard::from_bytes(bytes).map_err(|e| corrupt(&e))?;
                Ok(Self {
                    last_applied: v1.last_applied,
                    membership: v1.membership,
                    settings: v1.settings,
                    ..Self::default()
                })
            }
            Some(&RAFT_APPLIED_V2) => {
                let v2: RaftAppliedV2 =
                    postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(&e))?;
                Ok(Self {
                    last_applied: v2.last_applied,
                    membership: v2.membership,
                    settings: v2.settings,
                    phone_key: v2.phone_key.map(PhoneKey::new),
                    ..Self::default()
                })
            }
            Some(&RAFT_APPLIED_V3) => {
                let v3: RaftAppliedV3 =
                    postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(&e))?;
                Ok(Self {
                    last_applied: v3.last_applied,
                    membership: v3.membership,
                    settings: v3.settings,
                    phone_key: v3.phone_key.map(PhoneKey::new),
                    placement: v3.placement.map(Arc::new),
                    ..Self::default()
                })
            }
            Some(&RAFT_APPLIED_V4) => {
                let v4: RaftAppliedV4 =
                    postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(&e))?;
                Ok(Self {
                    last_applied: v4.last_applied,
                    membership: v4.membership,
                    settings: v4.settings,
                    phone_key: v4.phone_key.map(PhoneKey::new),
                    placement: v4.placement.map(Arc::new),
                    draining: v4.draining,
                    ..Self::default()
                })
            }
            Some(&RAFT_APPLIED_V5) => {
                let v5: RaftAppliedV5 =
                    postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(&e))?;
                Ok(Self {
                    last_applied: v5.last_applied,
                    membership: v5.membership,
                    settings: v5.settings,
                    phone_key: v5.phone_key.map(PhoneKey::new),
                    placement: v5.placement.map(Arc::new),
                    draining: v5.draining,
                    event_format: v5.event_format,
                })
            }
            Some(version) => Err(corrupt(&format!(
                "unknown version {version} (written by a newer courier?)"
            ))),
        }
    }

    fn encode(&self) -> Vec<u8> {
        if self.event_format > 1 {
            let v5 = RaftAppliedV5 {
                last_applied: self.last_applied,
                membership: self.membership.clone(),
                settings: self.settings,
                phone_key: self.phone_key.map(|key| *key.expose()),
                placement: self.placement.as_deref().cloned(),
                draining: self.draining.clone(),
                event_format: self.event_format,
            };
            return tagged(RAFT_APPLIED_V5, &v5);
        }
        if self.placement.is_none() && self.draining.is_empty() {
            // Without a table the state is what version 2 holds: written as version 2, so that
            // nodes of a build before placement can still open it (a rolling upgrade's snapshots).
            let v2 = RaftAppliedV2 {
                last_applied: self.last_applied,
                membership: self.membership.clone(),
                settings: self.settings,
                phone_key: self.phone_key.map(|key| *key.expose()),
            };
            return tagged(RAFT_APPLIED_V2, &v2);
        }
        if !self.draining.is_empty() {
            let v4 = RaftAppliedV4 {
                last_applied: self.last_applied,
                membership: self.membership.clone(),
                settings: self.settings,
                phone_key: self.phone_key.map(|key| *key.expose()),
                placement: self.placement.as_deref().cloned(),
                draining: self.draining.clone(),
            };
            return tagged(RAFT_APPLIED_V4, &v4);
        }
        let v3 = RaftAppliedV3 {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            settings: self.settings,
            phone_key: self.phone_key.map(|key| *key.expose()),
            placement: self.placement.as_deref().cloned(),
        };
        tagged(RAFT_APPLIED_V3, &v3)
    }
}

/// What a group has applied, shared read-only with status and metrics.
#[derive(Clone, Debug, Default)]
pub struct AppliedView {
    /// The storage-level state (index, digests).
    pub shard: ShardState,
    /// The raft-level state.
    pub raft: RaftApplied,
}

/// The state a group's machine owns, behind one lock shared with the maintenance handle so that an
/// online projection swap and the apply of new entries never interleave.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) state: ShardState,
    pub(crate) raft: RaftApplied,
    /// Set when the replica is dropped (moved away): nothing may write the shard after.
    pub(crate) dropped: bool,
}

impl Machine {
    /// Refuses work on a dropped replica: its data is being deleted.
    pub(crate) fn check_not_dropped(&self) -> Result<(), RaftStorageError> {
        if self.dropped {
            return Err(openraft::StorageIOError::write(&std::io::Error::other(
                "this replica was dropped (moved to another node)",
            ))
            .into());
        }
        Ok(())
    }
}

/// One raft group's state machine.
#[derive(Debug)]
pub struct StateMachine {
    pub(crate) db: Arc<Db>,
    pub(crate) group: GroupId,
    pub(crate) machine: Arc<tokio::sync::Mutex<Machine>>,
    pub(crate) shared: Arc<RwLock<AppliedView>>,
    pub(crate) watch: Arc<ApplyWatch>,
    /// How far this machine holds its entries, for the log store's purge.
    mark: Arc<AppliedMark>,
}

impl StateMachine {
    /// Loads a group's state machine from `db`.
    ///
    /// # Errors
    /// A storage fault.
    pub fn open(db: Arc<Db>, group: GroupId) -> Result<Self, RaftStorageError> {
        use courier_storage::install::{Resumed, resume};
        match resume(&db, group.storage_prefix()).map_err(fault)? {
            None => {}
            Some(Resumed::Finished(state)) => tracing::warn!(
                group = %group,
                applied = state.applied.get(),
                "finished a snapshot install that a stop interrupted"
            ),
            // An error, not a warning: the file was fsynced before the install began, so a file
            // that no longer verifies means the disk lost or changed synced bytes. The replica is
            // safe (nothing of the shard was written yet), but the disk wants looking at.
            Some(Resumed::Abandoned(error)) => tracing::error!(
                group = %group,
                %error,
                "dropped a snapshot install that a stop interrupted, as its synced file no longer \
                 verifies (check this disk); the replica is as it was before it, and its leader \
                 sends a snapshot again"
            ),
        }
        let state = ShardState::load(db.as_ref(), group.storage_prefix()).map_err(fault)?;
        let raft = RaftApplied::decode(&state.consensus_state)?;
        let shared = Arc::new(RwLock::new(AppliedView {
            shard: state.clone(),
            raft: raft.clone(),
        }));
        let mark = Arc::new(AppliedMark::default());
        mark.applied(raft.last_applied);
        Ok(Self {
            db,
            group,
            machine: Arc::new(tokio::sync::Mutex::new(Machine {
                state,
                raft,
                dropped: false,
            })),
            shared,
            watch: Arc::default(),
            mark,
        })
    }

    /// How far this machine holds its entries (the group's log store purges behind it).
    pub fn applied_mark(&self) -> Arc<AppliedMark> {
        self.mark.clone()
    }

    /// Installs a received snapshot (`install_snapshot`).
    async fn install(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), RaftStorageError> {
        let prefix = self.group.storage_prefix();
        let mut machine = self.machine.lock().await;
        machine.check_not_dropped()?;
        let state = match *snapshot {
            SnapshotData::Memory(cursor) => {
                // The simulation's disk: the whole shard in one atomic batch, after the time a
                // real install would spend writing it (so that a crash can fall inside it).
                let latency = self.db.simulated_install_begins();
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let chunks = snapshot::decode(prefix, cursor.get_ref()).map_err(fault)?;
                let install = snapshot::prepare_install(prefix, chunks).map_err(fault)?;
                // Entries above what this replica applied and up to the snapshot may be an
                // old leader's, never committed: delete them before the archiver (which
                // archives what is at or below the applied index) could take them for
                // committed ones.
                courier_storage::LogStore::new(self.db.clone(), prefix)
                    .delete_between(machine.state.applied.next(), install.state.applied.next())
                    .map_err(fault)?;
                self.db
                    .replace_ranges(&install.clear, install.changes, true)
                    .map_err(fault)?;
                self.db.simulated_install_ends();
                install.state
            }
            SnapshotData::File(file) => {
                // A real disk: from the spool file, in bounded memory (`install` says how it
                // stays atomic across a crash).
                let mut file = file.into_std().await;
                std::io::Seek::rewind(&mut file).map_err(|error| {
                    RaftStorageError::from(openraft::StorageIOError::read_snapshot(
                        Some(meta.signature()),
                        &error,
                    ))
                })?;
                let db = self.db.clone();
                tokio::task::spawn_blocking(move || {
                    courier_storage::install::install(&db, prefix, file)
                })
                .await
                .expect("the install thread does not panic")
                .map_err(fault)?
            }
        };
        let raft = RaftApplied::decode(&state.consensus_state)?;
        assert_eq!(
            raft.last_applied, meta.last_log_id,
            "a snapshot's data matches its meta"
        );
        machine.state = state;
        machine.raft = raft;
        publish(&self.shared, &machine);
        self.note_event_format(&machine.raft);
        self.watch.everything();
        Ok(())
    }

    /// A read-only view of what this group applied, updated after every batch.
    pub fn shared(&self) -> Arc<RwLock<AppliedView>> {
        self.shared.clone()
    }

    /// Sets the node's watch that applied batches report to (default: a private one).
    pub fn with_watch(mut self, watch: Arc<ApplyWatch>) -> Self {
        self.watch = watch;
        let raft = self
            .shared
            .read()
            .expect("applied view lock is never poisoned")
            .raft
            .clone();
        self.note_event_format(&raft);
        self
    }

    /// The metadata group tells the node's proposers which event format to write.
    fn note_event_format(&self, raft: &RaftApplied) {
        if self.group == GroupId::Metadata {
            self.watch.note_event_format(raft.event_format);
        }
    }

    /// Starts a snapshot of what `machine` applied: returns once the data is pinned at this
    /// applied index (a RocksDB snapshot), so the caller can release the apply lock while the
    /// export runs on its own thread (`Db::at_this_moment`). Applying goes on meanwhile.
    fn start_snapshot(&self, machine: &Machine) -> Result<PendingSnapshot, RaftStorageError> {
        let last = machine.raft.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: machine.raft.membership.clone(),
            // Determined by the applied log id alone, so a follower that installed this snapshot
            // reports the same id.
            snapshot_id: last.map_or_else(
                || "empty".to_owned(),
                |l| format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            ),
        };
        let state = machine.state.clone();
        let spool = self.db.spool_dir().map(Path::to_path_buf);
        let export = Db::at_this_moment(&self.db, move |kv| export(kv, &state, spool.as_deref()))
            .map_err(fault)?;
        Ok(PendingSnapshot { meta, export })
    }
}

/// Exports the shard `state` describes from `kv`: chunk by chunk into an unnamed spool file in
/// `spool` (memory stays bounded by a chunk whatever the shard's size), or into memory on the
/// simulation's disk (no `spool`).
fn export(
    kv: &dyn courier_storage::ReadKv,
    state: &ShardState,
    spool: Option<&Path>,
) -> courier_storage::Result<SnapshotData> {
    let Some(dir) = spool else {
        let bytes = snapshot::encode(&snapshot::export(kv, state)?);
        return Ok(SnapshotData::Memory(Cursor::new(bytes)));
    };
    let disk = |op: &'static str| {
        move |error: std::io::Error| courier_storage::StorageError::Disk {
            op,
            reason: error.to_string(),
        }
    };
    let file = tempfile::tempfile_in(dir).map_err(disk("create snapshot spool file"))?;
    let mut out = std::io::BufWriter::new(file);
    snapshot::export_to(kv, state, &mut out)?;
    let file = out
        .into_inner()
        .map_err(|error| disk("write snapshot spool file")(error.into_error()))?;
    SnapshotData::from_written(file).map_err(disk("rewind snapshot spool file"))
}

/// A snapshot whose data is pinned and being exported.
#[derive(Debug)]
struct PendingSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    export: AtThisMoment<courier_storage::Result<SnapshotData>>,
}

impl PendingSnapshot {
    async fn finish(self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let bytes = match self.export {
            AtThisMoment::Done(bytes) => bytes,
            AtThisMoment::Running(thread) => tokio::task::spawn_blocking(move || thread.join())
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or_else(|| -> RaftStorageError {
                    openraft::StorageIOError::read(&std::io::Error::other(
                        "the snapshot export thread panicked",
                    ))
                    .into()
                })?,
        }
        .map_err(fault)?;
        Ok(Snapshot {
            meta: self.meta,
            snapshot: Box::new(bytes),
        })
    }
}

/// Committed events refused as invalid by every state machine in this process, for the
/// simulation, which runs whole clusters in one process and counts any as a bug: its workload
/// proposes only what leaders validated.
static INVALID_EVENTS_IN_PROCESS: AtomicU64 = AtomicU64::new(0);

/// How many committed events every state machine in this process refused as invalid.
pub fn invalid_events_in_process() -> u64 {
    INVALID_EVENTS_IN_PROCESS.load(Ordering::Relaxed)
}

/// Counts and logs (once, on this replica, ids only) every committed event refused as invalid
/// at apply: each one is an event no validating leader proposed — a forged peer call or a bug.
fn note_invalid(
    db: &Db,
    shard: Option<courier_proto::ShardId>,
    committed: &[Committed<'_>],
    results: &[Vec<Applied>],
) {
    let mut count = 0_u64;
    for (entry, outcomes) in committed.iter().zip(results) {
        for (event, outcome) in outcomes.iter().enumerate() {
            if let Applied::Rejected { code, message } = outcome
                && *code == INVALID_CODE
            {
                count = count.saturating_add(1);
                tracing::warn!(
                    shard = ?shard.map(courier_proto::ShardId::get),
                    index = entry.index.get(),
                    event,
                    code,
                    reason = %message,
                    "committed event refused as invalid; nothing changed"
                );
            }
        }
    }
    if count > 0 {
        db.counters().note_invalid(count);
        INVALID_EVENTS_IN_PROCESS.fetch_add(count, Ordering::Relaxed);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let pending = {
            let machine = self.machine.lock().await;
            self.start_snapshot(&machine)?
        };
        pending.finish().await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        let machine = self.machine.lock().await;
        Ok((machine.raft.last_applied, machine.raft.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ProposalResponse>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut machine = self.machine.lock().await;
        machine.check_not_dropped()?;
        let mut raft = machine.raft.clone();
        let mut committed = Vec::with_capacity(entries.len());
        for entry in &entries {
            raft.last_applied = Some(entry.log_id);
            let payload = match &entry.payload {
                EntryPayload::Normal(Proposal::Events(payload)) => Some(payload.as_ref()),
                EntryPayload::Normal(Proposal::Cluster(settings)) => {
                    raft.settings.get_or_insert(*settings);
                    None
                }
                EntryPayload::Normal(Proposal::ClusterKeyed(settings, key)) => {
                    // The first settings entry wins, the key with them: a cluster never
                    // changes how it hashes phone numbers.
                    if raft.settings.is_none() {
                        raft.settings = Some(*settings);
                        raft.phone_key = Some(*key);
                    }
                    None
                }
                EntryPayload::Normal(Proposal::PlacementMoved(shard, from, to)) => {
                    // Applied only where it fits the table: a repeated or stale move changes
                    // nothing, on every replica alike.
                    if let Some(moved) = raft
                        .placement
                        .as_ref()
                        .and_then(|placement| placement.moved(*shard, *from, *to))
                    {
                        raft.placement = Some(Arc::new(moved));
                    }
                    None
                }
                EntryPayload::Normal(Proposal::Draining(node, on)) => {
                    // Only a member is marked: a mark racing the node's removal changes nothing.
                    let member = raft
                        .membership
                        .membership()
                        .nodes()
                        .any(|(id, _)| id == node);
                    if *on && member {
                        raft.draining.insert(*node);
                    } else if !*on {
                        raft.draining.remove(node);
                    }
                    None
                }
                EntryPayload::Normal(Proposal::EventFormat(format)) => {
                    // Never lowered: a stale or repeated raise changes nothing.
                    raft.event_format = raft.event_format.max(*format);
                    None
                }
                EntryPayload::Normal(Proposal::ClusterPlaced(settings, key, placement)) => {
                    // As above, the placement with them.
                    if raft.settings.is_none() {
                        raft.settings = Some(*settings);
                        raft.phone_key = Some(*key);
                        raft.placement = Some(placement.clone());
                    }
                    None
                }
                EntryPayload::Membership(membership) => {
                    raft.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                    // A node that leaves is not draining any more (nor when it joins again).
                    raft.draining
                        .retain(|node| membership.nodes().any(|(id, _)| id == node));
                    None
                }
                EntryPayload::Blank => None,
            };
            committed.push(Committed {
                index: storage_index(entry.log_id.index),
                payload,
            });
        }
        let batch = machine
            .state
            .apply_batch(self.db.as_ref(), &committed, raft.encode())
            .map_err(fault)?;
        // Not synced on its own: the entries are durable in the log and ordered before this write
        // in the WAL, so a crash replays them; purges sync the WAL first.
        self.db.commit(batch.changes, false).map_err(fault)?;
        let (reads, writes) = batch.io;
        self.db.counters().note_apply(reads, writes);
        note_invalid(&self.db, machine.state.shard, &committed, &batch.results);
        machine.state = batch.next;
        machine.raft = raft;
        publish(&self.shared, &machine);
        self.note_event_format(&machine.raft);
        self.mark.applied(machine.raft.last_applied);
        self.watch.applied(machine.state.shard, &batch.touched);
        Ok(batch
            .results
            .into_iter()
            .map(|outcomes| ProposalResponse {
                outcomes: outcomes.into_iter().map(Into::into).collect(),
            })
            .collect())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The data is pinned at this applied index under the lock; the export itself runs
        // after the lock is released, beside applying.
        let machine = self.machine.lock().await;
        SnapshotBuilder {
            pending: Some(self.start_snapshot(&machine)),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, RaftStorageError> {
        let spool = SnapshotData::spool(self.db.spool_dir()).map_err(|error| {
            RaftStorageError::from(openraft::StorageIOError::write_snapshot(None, &error))
        })?;
        Ok(Box::new(spool))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), RaftStorageError> {
        let installed = self.install(meta, snapshot).await;
        match &installed {
            Ok(()) => self.mark.applied(meta.last_log_id),
            Err(_) => self.mark.install_failed(),
        }
        installed
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let pending = {
            let machine = self.machine.lock().await;
            if machine.raft.last_applied.is_none() {
                return Ok(None);
            }
            self.start_snapshot(&machine)?
        };
        pending.finish().await.map(Some)
    }
}

/// Publishes what `machine` applied to readers (the caller then wakes whoever waits for it).
pub(crate) fn publish(shared: &RwLock<AppliedView>, machine: &Machine) {
    let mut view = shared.write().expect("applied view lock is never poisoned");
    view.shard = machine.state.clone();
    view.raft = machine.raft.clone();
}

/// A snapshot pinned at the moment openraft asked for the builder, exported beside applying.
#[derive(Debug)]
pub struct SnapshotBuilder {
    pending: Option<Result<PendingSnapshot, RaftStorageError>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        self.pending
            .take()
            .expect("openraft builds each snapshot once")?
            .finish()
            .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;

    fn sample(phone_key: Option<PhoneKey>) -> RaftApplied {
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 41);
        let voters = BTreeSet::from([1_u64, 2, 3]);
        RaftApplied {
            last_applied: Some(log_id),
            membership: StoredMembership::new(Some(log_id), Membership::new(vec![voters], None)),
            settings: Some(ClusterSettings {
                shard_count: 8,
                replication_factor: 3,
            }),
            phone_key,
            placement: None,
            draining: BTreeSet::new(),
            event_format: 0,
        }
    }

    /// A state written before the key existed (postcard of the three fields, no tag) still
    /// opens, as a cluster without a key; one written before placement (version 2) opens
    /// without a placement; versions 3 (placement), 4 (draining marks, only while a node is
    /// marked) and 5 (the event format, once raised past 1) round-trip.
    #[test]
    fn both_stored_forms_of_the_applied_state_open() {
        let old = sample(None);
        let v1 = postcard::to_stdvec(&RaftAppliedV1 {
            last_applied: old.last_applied,
            membership: old.membership.clone(),
            settings: old.settings,
        })
        .expect("encode v1");
        assert_eq!(RaftApplied::decode(&v1).expect("v1 opens"), old);

        let keyed = sample(Some(PhoneKey::new([7; PHONE_KEY_BYTES])));
        let mut v2 = vec![RAFT_APPLIED_V2];
        v2.extend(
            postcard::to_stdvec(&RaftAppliedV2 {
                last_applied: keyed.last_applied,
                membership: keyed.membership.clone(),
                settings: keyed.settings,
                phone_key: Some([7; PHONE_KEY_BYTES]),
            })
            .expect("encode v2"),
        );
        assert_eq!(RaftApplied::decode(&v2).expect("v2 opens"), keyed);

        assert_eq!(
            keyed.encode(),
            v2,
            "without a table the state is written as version 2"
        );

        let placed = RaftApplied {
            placement: Some(Arc::new(Placement::spread(&[1, 2, 3, 4].into(), 8, 3))),
            ..keyed
        };
        assert_eq!(placed.encode()[0], RAFT_APPLIED_V3, "no node draining");
        assert_eq!(
            RaftApplied::decode(&placed.encode()).expect("v3 opens"),
            placed
        );
        let draining = RaftApplied {
            draining: BTreeSet::from([2]),
            ..placed
        };
        assert_eq!(draining.encode()[0], RAFT_APPLIED_V4);
        assert_eq!(
            RaftApplied::decode(&draining.encode()).expect("v4 opens"),
            draining
        );
        let first_format = RaftApplied {
            event_format: 1,
            ..draining.clone()
        };
        assert_eq!(
            first_format.encode()[0],
            RAFT_APPLIED_V4,
            "format 1 is written in the form older builds open"
        );
        let raised = RaftApplied {
            event_format: 2,
            draining: BTreeSet::new(),
            ..draining
        };
        assert_eq!(raised.encode()[0], RAFT_APPLIED_V5);
        assert_eq!(
            RaftApplied::decode(&raised.encode()).expect("v5 opens"),
            raised
        );
        assert_eq!(
            RaftApplied::decode(&[]).expect("empty"),
            RaftApplied::default()
        );
    }

    /// A tag this version does not know is a fault, not a guess.
    #[test]
    fn an_unknown_version_is_refused() {
        let mut bytes = sample(None).encode();
        bytes[0] = 9;
        let error = RaftApplied::decode(&bytes).expect_err("unknown version");
        assert!(error.to_string().contains("unknown version 9"), "{error}");
    }
}
