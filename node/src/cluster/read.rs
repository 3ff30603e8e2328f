//! Read barriers: when this replica of a shard may serve a read.

use std::time::Duration;

use courier_consensus::types::GroupId;
use courier_proto::{LogIndex, ShardId};

use super::{Cluster, unavailable};
use crate::status::ApiError;

/// How long a read at a given index waits for this replica to catch up.
pub const READ_WAIT: Duration = Duration::from_secs(5);

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before the read started (leader only).
    Linearizable,
    /// Reflects at least the log up to this index (any replica).
    AtLeast(LogIndex),
}

impl Cluster {
    /// Waits until this replica of `shard` can serve a read with the given consistency.
    ///
    /// `Linearizable` confirms leadership with a quorum (raft's read index) and waits until
    /// the state machine applied up to it, so the read reflects every write acknowledged before
    /// it started; only the leader can do this. `AtLeast(index)` waits until this replica, leader
    /// or follower, applied `index` (a device resuming at a cursor), up to [`READ_WAIT`].
    ///
    /// # Errors
    /// `UNAVAILABLE` (with the leader hint) when a linearizable read reaches a follower or the
    /// leader lost its quorum, or when the replica does not reach `index` in time.
    pub async fn read_barrier(
        &self,
        shard: ShardId,
        consistency: ReadConsistency,
    ) -> Result<(), ApiError> {
        let handle = self
            .groups
            .get(GroupId::Shard(shard))
            .ok_or_else(|| ApiError::unknown_shard(shard))?;
        match consistency {
            ReadConsistency::Linearizable => {
                handle
                    .ensure_linearizable()
                    .await
                    .map_err(|error| unavailable(format!("{shard}: {error}"), error.leader))?;
                Ok(())
            }
            ReadConsistency::AtLeast(index) => {
                let deadline = tokio::time::Instant::now() + READ_WAIT;
                loop {
                    let applied = handle.applied_index();
                    if applied >= index {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(unavailable(
                            format!("{shard} applied {applied}, behind {index}"),
                            None,
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}
