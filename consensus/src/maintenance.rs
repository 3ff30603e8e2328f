//! Online maintenance of a running replica: verify its projections against a replay of its log,
//! and rebuild one projection in place, without stopping the node.
//!
//! Verify works on a RocksDB checkpoint (a consistent point-in-time copy made of hard links), so
//! it never holds up the apply of new entries. Rebuild replays the log up to the applied index
//! without any lock, then takes the state machine's lock, replays the few entries applied
//! meanwhile, and swaps the rebuilt projection in with one atomic write: the old projection
//! stays until that write.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use courier_proto::LogIndex;
use courier_storage::archive::{SegmentStore, log_source};
use courier_storage::rebuild::{self, Verified};
use courier_storage::{Db, LogStore, OpenMode, Projection, StorageError};

use crate::state_machine::{AppliedView, Machine, publish};
use crate::types::GroupId;
use crate::watch::ApplyWatch;

/// What a rebuild did.
#[derive(Debug, Clone, Copy)]
pub struct RebuildOutcome {
    /// The applied index the rebuilt projection was swapped in at.
    pub applied: LogIndex,
    /// Events replayed.
    pub events: u64,
    /// Pairs in the rebuilt projection.
    pub entries: u64,
}

/// Maintenance operations on one group of this node.
#[derive(Clone)]
pub struct Maintenance {
    db: Arc<Db>,
    group: GroupId,
    machine: Arc<tokio::sync::Mutex<Machine>>,
    shared: Arc<RwLock<AppliedView>>,
    watch: Arc<ApplyWatch>,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// Removes a scratch directory when dropped, whether the operation finished or failed.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Maintenance {
    /// Fences the replica before its data is deleted (a shard moved away): waits for the apply,
    /// snapshot install or projection swap under way, after which none starts again.
    pub async fn fence_for_drop(&self) {
        self.machine.lock().await.dropped = true;
    }
}

impl crate::state_machine::StateMachine {
    /// The handle for online maintenance (projection rebuilds) of this group.
    pub fn maintenance(&self) -> Maintenance {
        Maintenance::new(
            self.db.clone(),
            self.group,
            self.machine.clone(),
            self.shared.clone(),
            self.watch.clone(),
        )
    }
}

impl Maintenance {
    fn new(
        db: Arc<Db>,
        group: GroupId,
        machine: Arc<tokio::sync::Mutex<Machine>>,
        shared: Arc<RwLock<AppliedView>>,
        watch: Arc<ApplyWatch>,
    ) -> Self {
        Self {
            db,
            group,
            machine,
            shared,
            watch,
        }
    }

    /// The applied index now (what a progress report counts towards).
    pub fn applied_now(&self) -> LogIndex {
        self.shared
            .read()
            .expect("applied view lock is never poisoned")
            .shard
            .applied
    }

    /// Verifies `projections` at one applied index: checkpoints the database into `scratch`
    /// (removed afterwards), then replays the shard's log there — purged entries from `archive`
    /// — into at most `memory_max` bytes, and compares. Blocking: run it on a blocking thread.
    ///
    /// # Errors
    /// An entry neither the log nor the archive holds ([`StorageError::MissingEntry`]), a replay
    /// past `memory_max` ([`StorageError::ReplayTooLarge`]), storage faults.
    pub fn verify_blocking(
        &self,
        scratch: &Path,
        archive: (Option<&dyn SegmentStore>, rebuild::ReplayFrom),
        projections: &[Projection],
        memory_max: usize,
        progress: &mut dyn FnMut(LogIndex, u64),
    ) -> Result<Verified, StorageError> {
        self.db.checkpoint(scratch)?;
        let _cleanup = Scratch(scratch.to_path_buf());
        let copy = Arc::new(Db::open(scratch, OpenMode::ReadOnly)?);
        rebuild::verify(
            &copy,
            self.group.storage_prefix(),
            archive,
            projections,
            memory_max,
            progress,
        )
    }

    /// Every projection as it was at `at` (at most the applied index), replayed into memory
    /// from the log (purged entries from `archive`, at most `memory_max` bytes) without holding
    /// anything up. Returns the index the replay started from (the archive's newest verify
    /// checkpoint at or below `at`, or 0 for index 1) and the replayed state. Blocking: run it on
    /// a blocking thread.
    ///
    /// # Errors
    /// An entry neither the log nor the archive holds ([`StorageError::MissingEntry`]), a replay
    /// past `memory_max` ([`StorageError::ReplayTooLarge`]), storage faults.
    pub fn replay_at_blocking(
        &self,
        archive: Option<&dyn SegmentStore>,
        at: LogIndex,
        memory_max: usize,
        progress: &mut dyn FnMut(LogIndex, u64),
    ) -> Result<(LogIndex, rebuild::Rebuilt), StorageError> {
        let source = log_source(
            LogStore::new(self.db.clone(), self.group.storage_prefix()),
            archive,
        )?;
        rebuild::replay_up_to(
            source.as_ref(),
            (archive, rebuild::ReplayFrom::Checkpoint),
            at.min(self.applied_now()),
            memory_max,
            progress,
        )
    }

    /// Rebuilds `projection` from the log (purged entries from `archive`, replayed into at most
    /// `memory_max` bytes) and swaps it in. Blocking: run it on a blocking thread. New entries
    /// keep being applied during the replay and wait only for the swap.
    ///
    /// # Errors
    /// An entry neither the log nor the archive holds ([`StorageError::MissingEntry`]), a replay
    /// past `memory_max` ([`StorageError::ReplayTooLarge`]), storage faults.
    pub fn rebuild_blocking(
        &self,
        (archive, from): (Option<&dyn SegmentStore>, rebuild::ReplayFrom),
        projection: Projection,
        memory_max: usize,
        progress: &mut dyn FnMut(LogIndex, u64),
    ) -> Result<RebuildOutcome, StorageError> {
        let source = log_source(
            LogStore::new(self.db.clone(), self.group.storage_prefix()),
            archive,
        )?;
        let (_, first) = rebuild::replay_up_to(
            source.as_ref(),
            (archive, from),
            self.applied_now(),
            memory_max,
            progress,
        )?;
        let mut machine = self.machine.blocking_lock();
        if machine.dropped {
            return Err(StorageError::Disk {
                op: "rebuild",
                reason: "this replica was dropped (moved to another node)".to_owned(),
            });
        }
        let rebuilt = rebuild::replay(
            source.as_ref(),
            (first.kv, first.state),
            machine.state.applied,
            memory_max,
            progress,
        )?;
        let swap = rebuild::swap(&machine.state, &rebuilt, projection);
        self.db.replace_ranges(&[swap.clear], swap.changes, true)?;
        machine.state = swap.next;
        publish(&self.shared, &machine);
        self.watch.everything();
        Ok(RebuildOutcome {
            applied: machine.state.applied,
            events: first.events.saturating_add(rebuilt.events),
            entries: machine.state.digest(projection).entries,
        })
    }
}
