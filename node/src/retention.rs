//! Retention: on every shard this node leads, undelivered messages older than
//! `retention.undelivered` are expired by proposing `MessageExpired` events. The decision is the
//! leader's (its clock, its scan of the expiry index); the effect is a log event, so every
//! replica and every rebuild agrees on what expired. An expiry that races an ack, or a second
//! proposal for the same message from a new leader, applies as a no-op.

use std::time::Duration;

use courier_consensus::types::GroupId;
use courier_proto::ShardId;
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_storage::projection::{Projection, expiry};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::now_ms;
use crate::cluster::Cluster;

/// `MessageExpired` events proposed per shard per pass at most (one proposal).
pub const EXPIRE_BATCH_MAX: usize = 256;

/// Runs the expirer of this node until `shutdown`.
pub async fn run(
    cluster: Cluster,
    undelivered: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let retention_ms = u64::try_from(undelivered.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let Some(shard_count) = cluster.groups().shard_count() else {
            continue;
        };
        for shard in (0..shard_count).map(ShardId::new) {
            expire_on(&cluster, shard, retention_ms).await;
        }
    }
}

/// One pass over `shard`, if this node leads it: proposes expiry for what is due.
async fn expire_on(cluster: &Cluster, shard: ShardId, retention_ms: u64) {
    let Some(handle) = cluster.groups().get(GroupId::Shard(shard)) else {
        return;
    };
    if !handle.is_leader() {
        return;
    }
    let now = now_ms();
    let due = {
        let mut reader = cluster.groups().db().read(shard);
        expiry::due(
            &reader.view(Projection::Expiry),
            now.saturating_sub(retention_ms),
            EXPIRE_BATCH_MAX,
        )
    };
    let due = match due {
        Ok(due) if !due.is_empty() => due,
        Ok(_) => return,
        Err(error) => {
            warn!(%shard, %error, "reading the expiry index failed");
            return;
        }
    };
    let count = due.len();
    let events = due
        .into_iter()
        .map(|d| Event {
            kind: Some(Kind::MessageExpired(events::MessageExpired {
                user: d.user.get(),
                seq: d.seq.get(),
                message_id: d.message_id,
                at_ms: now,
            })),
        })
        .collect();
    match cluster.propose(shard, events).await {
        Ok(_) => info!(%shard, count, "undelivered messages expired"),
        // Lost leadership or quorum: the next leader's pass proposes them again.
        Err(error) => warn!(%shard, count, %error, "expiry proposal failed; retried next pass"),
    }
}
