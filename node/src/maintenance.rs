//! The admin API's projection jobs on this replica: verify, rebuild, and reading the log, all
//! while the node keeps serving. The work itself is `courier_consensus::maintenance`; this layer
//! validates requests, runs up to `limits.projection-jobs-max` jobs at once (1 by default), each
//! on a blocking thread, and streams progress.

use std::path::PathBuf;
use std::sync::Arc;

use courier_consensus::GroupId;
use courier_consensus::groups::{GroupHandle, Groups};
use courier_consensus::maintenance::RebuildOutcome;
use courier_proto::pb::peer::{
    self, InspectUserRequest, InspectUserResponse, JobProgress, ProjectionJobUpdate,
    ReadLogRequest, ReadLogResponse, RebuildProjectionRequest, RebuildProjectionResponse,
    StoredPair, VerifyProjectionRequest, VerifyProjectionResponse, projection_job_update::Update,
};
use courier_proto::{LogIndex, ShardId, UserId, shard_of};
use courier_storage::archive::{SegmentStore, for_each_entry, log_source};
use courier_storage::rebuild::{self, ReplayFrom, Verified};
use courier_storage::{LogStore, Projection, StorageError};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::archive::Archive;
use crate::status::ApiError;

/// Progress updates buffered per job; a slow reader misses intermediate ones, never the result.
pub const PROGRESS_QUEUE: usize = 16;
/// Log entries returned by one `ReadLog` call at most.
pub const READ_LOG_ENTRIES_MAX: u32 = 1000;
/// Bytes of log records one `ReadLog` call returns at most (beyond its first entry): a page of
/// large entries ends early, so that it fits one gRPC message; the caller asks for the rest.
pub const READ_LOG_BYTES_MAX: usize = courier_proto::limits::GRPC_MESSAGE_BYTES_MAX / 2;

const _: () = assert!(
    READ_LOG_BYTES_MAX + courier_proto::limits::PROPOSAL_BYTES_MAX * 3 / 2
        <= courier_proto::limits::GRPC_MESSAGE_BYTES_MAX,
    "a page and the largest entry fit one gRPC message"
);

/// A job's stream of updates.
pub type JobStream = ReceiverStream<Result<ProjectionJobUpdate, tonic::Status>>;

/// Verify, rebuild and log reads for the admin service.
#[derive(Clone)]
pub struct Jobs {
    groups: Arc<Groups>,
    scratch: PathBuf,
    /// Where purged log entries are read from.
    archive: Option<Arc<Archive>>,
    slots: JobSlots,
    /// Numbers the verifies, so that two of one shard at once checkpoint into directories of
    /// their own.
    verifies: Arc<std::sync::atomic::AtomicU64>,
    /// What one job's replay may hold in memory (`limits.projection-job-memory-max`).
    memory_max: usize,
}

/// The jobs that may run at once on a node (`limits.projection-jobs-max`).
#[derive(Clone)]
struct JobSlots {
    permits: Arc<Semaphore>,
    max: u32,
}

impl JobSlots {
    fn new(max: u32) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(usize::try_from(max).unwrap_or(usize::MAX))),
            max,
        }
    }

    /// A slot for one job, held until the job ends.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` `COURIER:Maintenance:Busy` when every slot is taken.
    fn take(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::ResourceExhausted {
                code: "COURIER:Maintenance:Busy",
                message: format!(
                    "{} projection job(s) already running on this node (limits.projection-jobs-max); retry when done",
                    self.max
                ),
            })
    }
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

fn storage_error(error: &StorageError) -> ApiError {
    match error {
        StorageError::ReplayTooLarge { .. } => ApiError::FailedPrecondition {
            code: "COURIER:Maintenance:TooLarge",
            message: format!(
                "{error}; raise limits.projection-job-memory-max if the node has the memory, or \
                 run the job offline with courier-ops against a stopped replica"
            ),
        },
        StorageError::MissingEntry { shard, index } => ApiError::FailedPrecondition {
            code: "COURIER:Log:Purged",
            message: format!(
                "{shard}: log entry {index} was purged below a snapshot; a replay needs the whole log"
            ),
        },
        other => ApiError::fault(other.to_string()),
    }
}

/// Whether `error` shows the replica's own log corrupt: a committed entry that fails its
/// checksum. (A segment's own checksum, which a bit flipped inside it fails first, names the
/// archive; a payload that does not decode behind a good checksum is a bug, not a disk fault.)
fn corrupts_the_log(error: &StorageError) -> bool {
    matches!(
        error,
        StorageError::Checksum { cf, .. } if *cf == courier_storage::Cf::Log.name()
    )
}

/// The answer to a job that failed with `error` on `shard`. A corrupt entry in the replica's own
/// log stops the replica first, as raft's own reads would and as the archiver does: it never
/// serves or votes past what it knows is corrupt (replace it: RUNBOOK, "The log archive").
fn job_failed(shard: ShardId, handle: &GroupHandle, error: &StorageError) -> ApiError {
    if corrupts_the_log(error) {
        tracing::error!(%shard, %error, "a job found the replica's log corrupt; the replica stops");
        if let Err(error) = tokio::runtime::Handle::current().block_on(handle.raft.shutdown()) {
            warn!(%shard, %error, "raft group did not stop cleanly");
        }
    }
    storage_error(error)
}

fn projections_named(name: &str) -> Result<Vec<Projection>, ApiError> {
    if name.is_empty() {
        return Ok(Projection::ALL.to_vec());
    }
    Projection::from_name(name)
        .map(|p| vec![p])
        .ok_or_else(|| ApiError::Invalid {
            code: "COURIER:Projection:Unknown",
            message: format!(
                "unknown projection {name:?}; known: {}",
                Projection::ALL.map(Projection::name).join(", ")
            ),
        })
}

fn progress_update(done: LogIndex, total: LogIndex, events: u64) -> ProjectionJobUpdate {
    ProjectionJobUpdate {
        update: Some(Update::Progress(JobProgress {
            entries_done: done.get(),
            entries_total: total.get().max(done.get()),
            events,
        })),
    }
}

impl Jobs {
    /// Jobs over `groups`, at most `limits.projection-jobs-max` at once, with checkpoints for
    /// verify under `data-dir/scratch` (cleared now: whatever a crashed job left there is
    /// garbage).
    pub fn new(
        groups: Arc<Groups>,
        config: &crate::config::Config,
        archive: Option<Arc<Archive>>,
    ) -> Self {
        let scratch = config.data_dir.join("scratch");
        let _ = std::fs::remove_dir_all(&scratch);
        Self {
            groups,
            scratch,
            archive,
            slots: JobSlots::new(config.limits.projection_jobs_max),
            verifies: Arc::default(),
            memory_max: usize::try_from(config.limits.projection_job_memory_max)
                .unwrap_or(usize::MAX),
        }
    }

    fn shard(&self, shard: u32) -> Result<(ShardId, GroupHandle), ApiError> {
        let unknown = || ApiError::NotFound {
            code: "COURIER:Shard:Unknown",
            message: format!("shard {shard} does not exist on this node"),
        };
        let id = u16::try_from(shard)
            .map(ShardId::new)
            .map_err(|_| unknown())?;
        let handle = self.groups.get(GroupId::Shard(id)).ok_or_else(unknown)?;
        Ok((id, handle))
    }

    /// Starts `job` on a blocking thread once a slot is free; its progress and result stream back.
    fn spawn<F>(&self, job: F) -> Result<JobStream, ApiError>
    where
        F: FnOnce(
                &mpsc::Sender<Result<ProjectionJobUpdate, tonic::Status>>,
            ) -> Result<Update, ApiError>
            + Send
            + 'static,
    {
        let permit = self.slots.take()?;
        let (tx, rx) = mpsc::channel(PROGRESS_QUEUE);
        tokio::task::spawn_blocking(move || {
            let result = job(&tx).map(|update| ProjectionJobUpdate {
                update: Some(update),
            });
            drop(permit);
            // The reader may have gone away: the job's effect stands either way.
            let _ = tx.blocking_send(result.map_err(tonic::Status::from));
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Verifies projections of one shard on this replica.
    ///
    /// # Errors
    /// Unknown shard or projection; another job running.
    pub fn verify(&self, request: &VerifyProjectionRequest) -> Result<JobStream, ApiError> {
        let projections = projections_named(&request.projection)?;
        let (shard, handle) = self.shard(request.shard)?;
        let job = self
            .verifies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch = self.scratch.join(format!("verify-{}-{job}", shard.get()));
        let archive = self.archive.clone();
        let from = ReplayFrom::genesis_if(request.from_genesis);
        let memory_max = self.memory_max;
        self.spawn(move |tx| {
            let total = handle.maintenance.applied_now();
            let _ = std::fs::create_dir_all(scratch.parent().unwrap_or(&scratch));
            let segments = archive.as_deref().map(|a| a.store() as &dyn SegmentStore);
            let verified = handle
                .maintenance
                .verify_blocking(
                    &scratch,
                    (segments, from),
                    &projections,
                    memory_max,
                    &mut |done, events| {
                        let _ = tx.try_send(Ok(progress_update(done, total, events)));
                    },
                )
                .map_err(|e| job_failed(shard, &handle, &e))?;
            let mut response = verify_response(&verified);
            let ok = verified.comparisons.iter().all(|c| c.is_equal());
            let whole = projections.len() == Projection::ALL.len();
            if let Some(archive) = archive.as_deref().filter(|_| ok && whole) {
                response.checkpoint_written = write_checkpoint(archive, shard, &verified);
            }
            info!(%shard, applied = %verified.live.applied, from_checkpoint = ?verified.from, ok, "verify finished");
            if !ok {
                warn!(%shard, mismatches = response.mismatches.len(), "projection differs from its log");
            }
            Ok(Update::Verified(response))
        })
    }

    /// Rebuilds one projection of one shard on this replica.
    ///
    /// # Errors
    /// Unknown shard, missing or unknown projection; another job running.
    pub fn rebuild(&self, request: &RebuildProjectionRequest) -> Result<JobStream, ApiError> {
        if request.projection.is_empty() {
            return Err(ApiError::Invalid {
                code: "COURIER:Projection:Unknown",
                message: "name the projection to rebuild".to_owned(),
            });
        }
        let projection = projections_named(&request.projection)?[0];
        let (shard, handle) = self.shard(request.shard)?;
        let archive = self.archive.clone();
        let from = ReplayFrom::genesis_if(request.from_genesis);
        let memory_max = self.memory_max;
        self.spawn(move |tx| {
            let total = handle.maintenance.applied_now();
            let archive = archive.as_deref().map(|a| a.store() as &dyn SegmentStore);
            let outcome: RebuildOutcome = handle
                .maintenance
                .rebuild_blocking((archive, from), projection, memory_max, &mut |done, events| {
                    let _ = tx.try_send(Ok(progress_update(done, total, events)));
                })
                .map_err(|e| job_failed(shard, &handle, &e))?;
            info!(%shard, projection = projection.name(), applied = %outcome.applied, events = outcome.events, "projection rebuilt and swapped in");
            Ok(Update::Rebuilt(RebuildProjectionResponse {
                applied_index: outcome.applied.get(),
                events_replayed: outcome.events,
                entries: outcome.entries,
            }))
        })
    }

    /// A user's state at a log index of the user's shard on this replica (`inspect user`):
    /// replayed into memory from the archive and the live log, from the newest verify checkpoint
    /// at or below that index. Answers the user's stored pairs, as many as `inspect` shows.
    ///
    /// # Errors
    /// A user id of 0 or an index past the applied one (`INVALID_ARGUMENT`), an uninitialized
    /// cluster, the user's shard not on this node, another job running; when the job runs, a
    /// purged range the archive does not hold.
    pub fn inspect_user(&self, request: &InspectUserRequest) -> Result<JobStream, ApiError> {
        let user = UserId::new(request.user).ok_or_else(|| ApiError::Invalid {
            code: "COURIER:Inspect:User",
            message: "user ids start at 1".to_owned(),
        })?;
        let shards = self
            .groups
            .shard_count()
            .ok_or_else(ApiError::not_initialized)?;
        let (shard, handle) = self.shard(u32::from(shard_of(user, shards).get()))?;
        let applied = handle.maintenance.applied_now();
        let at = match request.at {
            0 => applied,
            at => LogIndex::new(at),
        };
        if at > applied {
            return Err(ApiError::Invalid {
                code: "COURIER:Inspect:Future",
                message: format!("{shard} applied up to {applied}; index {at} is in the future"),
            });
        }
        let archive = self.archive.clone();
        let memory_max = self.memory_max;
        self.spawn(move |tx| {
            let segments = archive.as_deref().map(|a| a.store() as &dyn SegmentStore);
            let (from, rebuilt) = handle
                .maintenance
                .replay_at_blocking(segments, at, memory_max, &mut |done, events| {
                    let _ = tx.try_send(Ok(progress_update(done, at, events)));
                })
                .map_err(|e| job_failed(shard, &handle, &e))?;
            info!(%shard, at = %rebuilt.state.applied, from = %from, events = rebuilt.events, "user inspected");
            Ok(Update::Inspected(InspectUserResponse {
                shard: u32::from(shard.get()),
                at: rebuilt.state.applied.get(),
                applied_index: applied.get(),
                from_checkpoint: from.get(),
                events_replayed: rebuilt.events,
                pairs: courier_storage::inspect::user_pairs(&rebuilt.kv, shard, user)
                    .into_iter()
                    .map(|(projection, key, value)| StoredPair {
                        projection: projection.name().to_owned(),
                        key,
                        value,
                    })
                    .collect(),
            }))
        })
    }

    /// Reads entries of one shard's log on this replica: the archive and the live log as one
    /// log, so entries raft purged are read back from their segments.
    ///
    /// # Errors
    /// Unknown shard; storage faults (a checksum mismatch names the index); a range neither the
    /// live log nor the archive holds.
    pub async fn read_log(&self, request: ReadLogRequest) -> Result<ReadLogResponse, ApiError> {
        let (shard, handle) = self.shard(request.shard)?;
        let db = self.groups.db().clone();
        let archive = self.archive.clone();
        // Segment reads and RocksDB scans block: off the async workers.
        tokio::task::spawn_blocking(move || {
            let archive = archive.as_deref().map(|a| a.store() as &dyn SegmentStore);
            read_log_blocking(LogStore::new(db, shard), archive, &request)
                .map_err(|e| job_failed(shard, &handle, &e))
        })
        .await
        .map_err(|e| ApiError::task_ended("log read", &e))?
    }
}

fn read_log_blocking(
    live: LogStore,
    archive: Option<&dyn SegmentStore>,
    request: &ReadLogRequest,
) -> Result<ReadLogResponse, StorageError> {
    let shard = live.shard();
    let log = log_source(live, archive)?;
    let Some((first, last)) = log.bounds()? else {
        return Ok(ReadLogResponse::default());
    };
    let limit = match request.limit {
        0 => READ_LOG_ENTRIES_MAX,
        n => n.min(READ_LOG_ENTRIES_MAX),
    };
    let from = LogIndex::new(request.from).max(first);
    let to = match request.to {
        0 => last,
        n => LogIndex::new(n).min(last),
    };
    let to = from
        .checked_add(u64::from(limit).saturating_sub(1))
        .map_or(to, |t| t.min(to));
    let mut entries = Vec::new();
    let mut bytes = 0_usize;
    for_each_entry(log.as_ref(), from, to, &mut |record| {
        bytes = bytes.saturating_add(record.payload.len());
        if bytes > READ_LOG_BYTES_MAX && !entries.is_empty() {
            return Ok(false);
        }
        let entry = rebuild::decode_entry(shard, record)?;
        entries.push(peer::LogEntryView {
            index: record.index.get(),
            term: record.term,
            events: entry.events,
        });
        Ok(true)
    })?;
    Ok(ReadLogResponse {
        entries,
        first: first.get(),
        last: last.get(),
    })
}

/// Records a verify whose every projection matched as a checkpoint in the archive, unless it
/// started from a checkpoint at the same index. A failure to write is logged, not the verify's.
fn write_checkpoint(archive: &Archive, shard: ShardId, verified: &Verified) -> bool {
    let at = verified.rebuilt.state.applied;
    if verified.from == Some(at) || at == LogIndex::new(0) {
        return false;
    }
    let written =
        courier_storage::checkpoint::encode(&verified.rebuilt.kv, &verified.rebuilt.state)
            .and_then(|bytes| archive.put_checkpoint(shard, at, bytes));
    match written {
        Ok(()) => {
            info!(%shard, index = %at, "verify checkpoint written");
            true
        }
        Err(error) => {
            warn!(%shard, %error, "verify checkpoint not written");
            false
        }
    }
}

fn verify_response(verified: &Verified) -> VerifyProjectionResponse {
    VerifyProjectionResponse {
        from_checkpoint: verified.from.map_or(0, LogIndex::get),
        checkpoint_written: false,
        applied_index: verified.live.applied.get(),
        events_replayed: verified.rebuilt.events,
        digests: verified
            .comparisons
            .iter()
            .map(|c| courier_proto::pb::store::ProjectionDigest {
                projection: c.projection.name().to_owned(),
                digest: c.live.sum.to_be_bytes().to_vec(),
                entries: c.live.entries,
            })
            .collect(),
        mismatches: verified
            .comparisons
            .iter()
            .flat_map(|c| {
                let digest_only = c.mismatches.is_empty() && !c.is_equal();
                c.mismatches
                    .iter()
                    .map(|m| peer::ProjectionMismatch {
                        projection: m.projection.name().to_owned(),
                        first_divergent_index: m.first_divergent_index.get(),
                        key: m.key.clone(),
                        expected: m.expected.clone().unwrap_or_default(),
                        actual: m.actual.clone().unwrap_or_default(),
                    })
                    .chain(digest_only.then(|| peer::ProjectionMismatch {
                        // The data equals the rebuild but the stored digest does not.
                        projection: c.projection.name().to_owned(),
                        ..Default::default()
                    }))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `limits.projection-jobs-max` jobs run at once; one more is refused with
    /// `COURIER:Maintenance:Busy` naming the limit, and a slot frees when its job ends.
    #[test]
    fn jobs_past_the_limit_are_refused_until_one_ends() {
        let slots = JobSlots::new(2);
        let first = slots.take().expect("first slot");
        let _second = slots.take().expect("second slot");
        match slots.take() {
            Err(ApiError::ResourceExhausted { code, message }) => {
                assert_eq!(code, "COURIER:Maintenance:Busy");
                assert!(message.starts_with("2 projection job(s)"), "{message}");
            }
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        drop(first);
        let _third = slots.take().expect("the ended job's slot");
    }
}
