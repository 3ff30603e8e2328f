//! The admin API's projection jobs on this replica: verify, rebuild, and reading the log, all
//! while the node keeps serving. The work itself is `courier_consensus::maintenance`; this layer
//! validates requests, runs one job at a time on a blocking thread, and streams progress.

use std::path::PathBuf;
use std::sync::Arc;

use courier_consensus::GroupId;
use courier_consensus::groups::{GroupHandle, Groups};
use courier_consensus::maintenance::RebuildOutcome;
use courier_proto::pb::peer::{
    self, JobProgress, ProjectionJobUpdate, ReadLogRequest, ReadLogResponse,
    RebuildProjectionRequest, RebuildProjectionResponse, VerifyProjectionRequest,
    VerifyProjectionResponse, projection_job_update::Update,
};
use courier_proto::{LogIndex, ShardId};
use courier_storage::archive::SegmentStore;
use courier_storage::rebuild::{self, Verified};
use courier_storage::{LogStore, Projection, StorageError};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::archive::Archive;
use crate::status::ApiError;

/// Projection jobs (verify, rebuild) running at once on one node: each replays a whole log.
pub const JOBS_MAX: usize = 1;
/// Progress updates buffered per job; a slow reader misses intermediate ones, never the result.
pub const PROGRESS_QUEUE: usize = 16;
/// Log entries returned by one `ReadLog` call at most.
pub const READ_LOG_ENTRIES_MAX: u32 = 1000;

/// A job's stream of updates.
pub type JobStream = ReceiverStream<Result<ProjectionJobUpdate, tonic::Status>>;

/// Verify, rebuild and log reads for the admin service.
#[derive(Clone)]
pub struct Jobs {
    groups: Arc<Groups>,
    scratch: PathBuf,
    /// Where purged log entries are read from.
    archive: Option<Arc<Archive>>,
    slots: Arc<Semaphore>,
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
        StorageError::MissingEntry { shard, index } => ApiError::FailedPrecondition {
            code: "COURIER:Log:Purged",
            message: format!(
                "{shard}: log entry {index} was purged below a snapshot; a replay needs the whole log"
            ),
        },
        other => ApiError::Internal {
            code: "COURIER:Node:Fault",
            message: other.to_string(),
        },
    }
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
    /// Jobs over `groups`, with checkpoints for verify under `scratch` (cleared now: whatever a
    /// crashed job left there is garbage).
    pub fn new(groups: Arc<Groups>, scratch: PathBuf, archive: Option<Arc<Archive>>) -> Self {
        let _ = std::fs::remove_dir_all(&scratch);
        Self {
            groups,
            scratch,
            archive,
            slots: Arc::new(Semaphore::new(JOBS_MAX)),
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
        let permit =
            self.slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| ApiError::ResourceExhausted {
                    code: "COURIER:Maintenance:Busy",
                    message: format!(
                        "{JOBS_MAX} projection job(s) already running on this node; retry when done"
                    ),
                })?;
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
        let scratch = self.scratch.join(format!("verify-{}", shard.get()));
        let archive = self.archive.clone();
        self.spawn(move |tx| {
            let total = handle.maintenance.applied_now();
            let _ = std::fs::create_dir_all(scratch.parent().unwrap_or(&scratch));
            let archive = archive.as_deref().map(|a| a as &dyn SegmentStore);
            let verified = handle
                .maintenance
                .verify_blocking(&scratch, archive, &projections, &mut |done, events| {
                    let _ = tx.try_send(Ok(progress_update(done, total, events)));
                })
                .map_err(|e| storage_error(&e))?;
            let response = verify_response(&verified);
            let ok = verified.comparisons.iter().all(|c| c.is_equal());
            info!(%shard, applied = %verified.live.applied, ok, "verify finished");
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
        self.spawn(move |tx| {
            let total = handle.maintenance.applied_now();
            let archive = archive.as_deref().map(|a| a as &dyn SegmentStore);
            let outcome: RebuildOutcome = handle
                .maintenance
                .rebuild_blocking(archive, projection, &mut |done, events| {
                    let _ = tx.try_send(Ok(progress_update(done, total, events)));
                })
                .map_err(|e| storage_error(&e))?;
            info!(%shard, projection = projection.name(), applied = %outcome.applied, events = outcome.events, "projection rebuilt and swapped in");
            Ok(Update::Rebuilt(RebuildProjectionResponse {
                applied_index: outcome.applied.get(),
                events_replayed: outcome.events,
                entries: outcome.entries,
            }))
        })
    }

    /// Reads entries of one shard's log on this replica.
    ///
    /// # Errors
    /// Unknown shard; storage faults (a checksum mismatch names the index).
    pub fn read_log(&self, request: &ReadLogRequest) -> Result<ReadLogResponse, ApiError> {
        let (shard, _) = self.shard(request.shard)?;
        let log = LogStore::new(self.groups.db().clone(), shard);
        let fault = |e: StorageError| storage_error(&e);
        let Some(first) = log.first_index().map_err(fault)? else {
            return Ok(ReadLogResponse::default());
        };
        let last = log.last().map_err(fault)?.map_or(first, |r| r.index);
        let limit = match request.limit {
            0 => READ_LOG_ENTRIES_MAX,
            n => n.min(READ_LOG_ENTRIES_MAX),
        };
        let from = LogIndex::new(request.from).max(first);
        let to = match request.to {
            0 => last,
            n => LogIndex::new(n).min(last),
        };
        let until = from
            .checked_add(u64::from(limit))
            .map_or(to.next(), |u| u.min(to.next()));
        let mut entries = Vec::new();
        for record in log.read_range(from, until).map_err(fault)? {
            let entry = rebuild::decode_entry(shard, &record).map_err(fault)?;
            entries.push(peer::LogEntryView {
                index: record.index.get(),
                term: record.term,
                events: entry.events,
            });
        }
        Ok(ReadLogResponse {
            entries,
            first: first.get(),
            last: last.get(),
        })
    }
}

fn verify_response(verified: &Verified) -> VerifyProjectionResponse {
    VerifyProjectionResponse {
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
