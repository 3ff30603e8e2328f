//! What this node reports about itself: every group's role, leader and indexes, outbox lengths,
//! and checkpoints of its database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use courier_consensus::types::GroupId;
use courier_proto::ShardId;
use courier_proto::pb::peer::{self, ShardStatus, StatusResponse};
use courier_storage::projection::{Projection, outbox};
use tracing::info;

use super::{Cluster, internal, invalid};
use crate::status::ApiError;

/// Passes of this node's device-stream pushers and outbox forwarders since start: with targeted
/// wake-ups a pass happens only when something its stream or pair waits for was applied.
#[derive(Debug, Default)]
pub struct Passes {
    pusher: AtomicU64,
    forwarder: AtomicU64,
}

impl Passes {
    /// Counts one pusher pass.
    pub fn pusher(&self) {
        self.pusher.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one forwarder pass.
    pub fn forwarder(&self) {
        self.forwarder.fetch_add(1, Ordering::Relaxed);
    }
}

impl Cluster {
    /// Takes a consistent checkpoint of the node's database into `dir`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for an empty or existing `dir`; `INTERNAL` when RocksDB fails.
    pub fn backup(&self, root: &Path, dir: &str) -> Result<peer::BackupResponse, ApiError> {
        let target = backup_target(root, dir)?;
        if target.exists() {
            return Err(invalid(
                "COURIER:Backup:Dir",
                format!(
                    "{} exists; a checkpoint needs a new directory",
                    target.display()
                ),
            ));
        }
        std::fs::create_dir_all(root).map_err(|e| internal(format!("backup root: {e}")))?;
        let status = self.status();
        self.db
            .checkpoint(&target)
            .map_err(|e| internal(e.to_string()))?;
        // A replica installing a snapshot has half its projections written and the rest in an
        // install file the checkpoint does not hold: such a checkpoint cannot be restored.
        let installing = courier_storage::Db::open(&target, courier_storage::OpenMode::ReadOnly)
            .and_then(|copy| courier_storage::install::pending(&copy))
            .map_err(|e| internal(e.to_string()))?;
        if let Some(shard) = installing.first() {
            let _ = std::fs::remove_dir_all(&target);
            return Err(ApiError::Unavailable {
                code: "COURIER:Backup:Installing",
                message: format!(
                    "this node's replica of shard {} was installing a snapshot; the checkpoint \
                     was removed, retry",
                    shard.get()
                ),
                retry_after_ms: 1000,
                leader: None,
            });
        }
        info!(dir = %target.display(), "checkpoint written");
        Ok(peer::BackupResponse {
            dir: target.display().to_string(),
            shards: status.shards,
        })
    }

    /// Reports every group this node runs.
    pub fn status(&self) -> StatusResponse {
        let mut shards = Vec::new();
        let mut nodes = Vec::new();
        for (group, handle) in self.groups.list() {
            let state = handle.state();
            let view = handle.applied.read().expect("applied view lock").clone();
            let GroupId::Shard(shard) = group else {
                nodes = state
                    .members
                    .into_iter()
                    .map(|(node_id, peer_addr)| peer::NodeInfo {
                        node_id,
                        peer_addr,
                        client_addr: String::new(),
                    })
                    .collect();
                continue;
            };
            let last_log_index = state.last_log_index.map_or(0, |i| i.saturating_add(1));
            let applied = view.shard.applied.get();
            let digest = view
                .shard
                .digests
                .values()
                .fold(0_u128, |sum, d| sum.wrapping_add(d.sum));
            shards.push(ShardStatus {
                shard: u32::from(shard.get()),
                role: state.role.as_str().to_owned(),
                term: state.term,
                leader: state.current_leader.unwrap_or(0),
                replicas: state.voters.into_iter().collect(),
                last_log_index,
                committed: applied,
                applied,
                apply_lag: last_log_index.saturating_sub(applied),
                outbox_len_entries: self.outbox_len(shard),
                digest: format!("{digest:032x}"),
                fsyncs: handle.stats.fsyncs.load(Ordering::Relaxed),
                entries_appended: handle.stats.entries.load(Ordering::Relaxed),
                // Reported as storage indexes (raft index + 1), like every index here.
                snapshot_index: state.snapshot_index.map_or(0, |i| i.saturating_add(1)),
                purged_index: state.purged_index.map_or(0, |i| i.saturating_add(1)),
                projections: view
                    .shard
                    .digests
                    .iter()
                    .map(|(projection, digest)| peer::ProjectionPairs {
                        projection: projection.name().to_owned(),
                        pairs: digest.entries,
                    })
                    .collect(),
            });
        }
        let placement = self.groups.placement().map_or_else(Vec::new, |placement| {
            (0..placement.shard_count())
                .filter_map(|shard| u16::try_from(shard).ok().map(ShardId::new))
                .map(|shard| peer::ShardPlacement {
                    shard: u32::from(shard.get()),
                    replicas: placement.replicas(shard).to_vec(),
                })
                .collect()
        });
        StatusResponse {
            node_id: self.groups.node_id(),
            shards,
            nodes,
            counters: Some(self.counters()),
            replication_factor: self
                .groups
                .settings()
                .map_or(0, |settings| u32::from(settings.replication_factor)),
            placement,
            moves: self.moves.list(),
            draining: self.groups.draining().into_iter().collect(),
            event_format_max: courier_proto::FORMAT_VERSION,
            event_format: self.groups.event_format(),
        }
    }

    /// What this node did since start, summed over its groups.
    pub fn counters(&self) -> peer::NodeCounters {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let db = self.db.counters();
        let (moves_done, moves_failed) = self.moves.ended();
        let (mut raft_entries, mut log_appends) = (0_u64, 0_u64);
        for (_, handle) in self.groups.list() {
            raft_entries = raft_entries.saturating_add(load(&handle.stats.entries));
            log_appends = log_appends.saturating_add(load(&handle.stats.fsyncs));
        }
        peer::NodeCounters {
            synced_writes: load(&db.synced_writes),
            write_batches: load(&db.write_batches),
            raft_entries,
            log_appends,
            apply_reads: load(&db.apply_reads),
            apply_writes: load(&db.apply_writes),
            peer_calls: self.groups.pool().calls(),
            pusher_passes: load(&self.passes.pusher),
            forwarder_passes: load(&self.passes.forwarder),
            wakeups: self.groups.watch().wakeups(),
            invalid_events: load(&db.invalid_events),
            merged_writes: load(&db.merged_writes),
            pipe_calls: load(&self.groups.pool().pipe_counters().calls),
            pipes_opened: load(&self.groups.pool().pipe_counters().opened),
            moves_done,
            moves_failed,
        }
    }

    fn outbox_len(&self, shard: ShardId) -> u64 {
        self.outbox_by_dest(shard).iter().map(|(_, len)| len).sum()
    }

    /// Outbox entries of `shard` not yet forwarded and trimmed, per destination shard.
    /// Empty while a snapshot install writes the shard (its outbox is half written then).
    pub fn outbox_by_dest(&self, shard: ShardId) -> Vec<(u16, u64)> {
        self.db
            .read_whole(shard, |reader| {
                outbox::states(&reader.view(Projection::Outbox))
            })
            .and_then(Result::ok)
            .map(|states| {
                states
                    .iter()
                    .map(|(dest, s)| (dest.get(), s.last_pos.saturating_sub(s.trimmed_up_to)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Where a backup named `dir` goes: a relative name under `root`, or an absolute path inside it;
/// never a path with `..`, and never outside `root`.
///
/// # Errors
/// `INVALID_ARGUMENT` `COURIER:Backup:Dir`.
fn backup_target(root: &Path, dir: &str) -> Result<PathBuf, ApiError> {
    let path = Path::new(dir);
    let refused = |why: &str| {
        invalid(
            "COURIER:Backup:Dir",
            format!("{dir:?} {why} (backups go under {})", root.display()),
        )
    };
    if dir.is_empty() {
        return Err(refused("is empty"));
    }
    if path
        .components()
        .any(|part| matches!(part, std::path::Component::ParentDir))
    {
        return Err(refused("climbs with .."));
    }
    let target = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    if target == root || !target.starts_with(root) {
        return Err(refused("is not inside the backup root"));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names land under the root; `..`, other absolute paths and the root itself are refused.
    #[test]
    fn backups_stay_under_the_root() {
        let root = Path::new("/srv/courier/backups");
        assert_eq!(
            backup_target(root, "monday").ok(),
            Some(root.join("monday"))
        );
        assert_eq!(
            backup_target(root, "/srv/courier/backups/tuesday").ok(),
            Some(root.join("tuesday"))
        );
        for bad in [
            "",
            "../etc",
            "a/../../x",
            "/etc/cron.d",
            "/srv/courier/backups",
        ] {
            assert!(backup_target(root, bad).is_err(), "{bad}");
        }
    }
}
