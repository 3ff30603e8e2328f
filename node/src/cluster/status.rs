//! What this node reports about itself: every group's role, leader and indexes, outbox lengths,
//! and checkpoints of its database.

use courier_consensus::types::GroupId;
use courier_proto::ShardId;
use courier_proto::pb::peer::{self, ShardStatus, StatusResponse};
use courier_storage::projection::{Projection, outbox};
use tracing::info;

use super::{Cluster, internal, invalid};
use crate::status::ApiError;

impl Cluster {
    /// Takes a consistent checkpoint of the node's database into `dir`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for an empty or existing `dir`; `INTERNAL` when RocksDB fails.
    pub fn backup(&self, dir: &str) -> Result<peer::BackupResponse, ApiError> {
        if dir.is_empty() || std::path::Path::new(dir).exists() {
            return Err(invalid(
                "COURIER:Backup:Dir",
                format!("{dir:?} must be a path that does not exist yet"),
            ));
        }
        let status = self.status();
        self.db
            .checkpoint(std::path::Path::new(dir))
            .map_err(|e| internal(e.to_string()))?;
        info!(dir, "checkpoint written");
        Ok(peer::BackupResponse {
            dir: dir.to_owned(),
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
                fsyncs: handle
                    .stats
                    .fsyncs
                    .load(std::sync::atomic::Ordering::Relaxed),
                entries_appended: handle
                    .stats
                    .entries
                    .load(std::sync::atomic::Ordering::Relaxed),
                // Reported as storage indexes (raft index + 1), like every index here.
                snapshot_index: state.snapshot_index.map_or(0, |i| i.saturating_add(1)),
                purged_index: state.purged_index.map_or(0, |i| i.saturating_add(1)),
            });
        }
        StatusResponse {
            node_id: self.groups.node_id(),
            shards,
            nodes,
        }
    }

    fn outbox_len(&self, shard: ShardId) -> u64 {
        self.outbox_by_dest(shard).iter().map(|(_, len)| len).sum()
    }

    /// Outbox entries of `shard` not yet forwarded and trimmed, per destination shard.
    pub fn outbox_by_dest(&self, shard: ShardId) -> Vec<(u16, u64)> {
        outbox::states(&self.db.read(shard).view(Projection::Outbox))
            .map(|states| {
                states
                    .iter()
                    .map(|(dest, s)| (dest.get(), s.last_pos.saturating_sub(s.trimmed_up_to)))
                    .collect()
            })
            .unwrap_or_default()
    }
}
