//! Retention: on every shard this node leads, undelivered messages older than
//! `retention.undelivered` are expired by proposing `MessageExpired` events, and the dedup
//! records of sends older than `retention.dedup` are forgotten by proposing `SendsForgotten`, and
//! so are the trimmed inbox stubs (bodies every device acked) of messages stored longer ago than
//! that, by proposing `InboxForgotten`. The decision is the leader's (its clock, its scan of the
//! expiry, dedup or stub time index); the effect is a log event, so every replica and every
//! rebuild agrees on what left. An expiry that races an ack, or a second proposal for the same
//! message or send from a new leader, applies as a no-op.

use std::time::Duration;

use courier_consensus::types::GroupId;
use courier_proto::ShardId;
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_storage::projection::{Projection, dedup, expiry, inbox};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::now_ms;
use crate::cluster::Cluster;

/// `MessageExpired` events proposed per shard per pass at most (one proposal).
pub const EXPIRE_BATCH_MAX: usize = 256;

/// Forgotten sends, and forgotten inbox stubs, proposed per shard per pass at most (one
/// proposal).
pub const FORGET_BATCH_MAX: usize = 256;

/// How long things are kept (`[retention]`), and how often the leader looks.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// Undelivered messages expire after this.
    pub undelivered: Duration,
    /// Dedup records are forgotten this long after their send, trimmed inbox stubs this long
    /// after their message was stored.
    pub dedup: Duration,
    /// Time between passes.
    pub interval: Duration,
}

/// Runs the expirer of this node until `shutdown`.
pub async fn run(cluster: Cluster, windows: Windows, shutdown: CancellationToken) {
    let millis = |window: Duration| u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let (retention_ms, dedup_ms) = (millis(windows.undelivered), millis(windows.dedup));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(windows.interval) => {}
        }
        let Some(shard_count) = cluster.groups().shard_count() else {
            continue;
        };
        for shard in (0..shard_count).map(ShardId::new) {
            pass_on(&cluster, shard, retention_ms, dedup_ms).await;
        }
    }
}

/// One pass over `shard`, if this node leads it: expires the undelivered messages and forgets
/// the sends and inbox stubs that are due, in one proposal.
async fn pass_on(cluster: &Cluster, shard: ShardId, retention_ms: u64, dedup_ms: u64) {
    let Some(handle) = cluster.groups().get(GroupId::Shard(shard)) else {
        return;
    };
    if !handle.is_leader() {
        return;
    }
    let now = now_ms();
    let (due, sends, stubs) = {
        let mut reader = cluster.groups().db().read(shard);
        let due = expiry::due(
            &reader.view(Projection::Expiry),
            now.saturating_sub(retention_ms),
            EXPIRE_BATCH_MAX,
        );
        let sends = dedup::sent_before(
            &reader.view(Projection::Dedup),
            now.saturating_sub(dedup_ms),
            FORGET_BATCH_MAX,
        );
        let stubs = inbox::stubs_before(
            &reader.view(Projection::Inbox),
            now.saturating_sub(dedup_ms),
            FORGET_BATCH_MAX,
        );
        match (due, sends, stubs) {
            (Ok(due), Ok(sends), Ok(stubs)) => (due, sends, stubs),
            (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
                warn!(%shard, %error, "reading the retention indexes failed");
                return;
            }
        }
    };
    let (expired, forgotten, stubs_forgotten) = (due.len(), sends.len(), stubs.len());
    let mut events: Vec<Event> = due
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
    if !sends.is_empty() {
        events.push(Event {
            kind: Some(Kind::SendsForgotten(events::SendsForgotten {
                sends,
                at_ms: now,
            })),
        });
    }
    if !stubs.is_empty() {
        events.push(Event {
            kind: Some(Kind::InboxForgotten(events::InboxForgotten {
                messages: stubs,
                at_ms: now,
            })),
        });
    }
    if events.is_empty() {
        return;
    }
    match cluster.propose(shard, events).await {
        Ok(_) => info!(
            %shard, expired, forgotten, stubs_forgotten,
            "retention: messages expired, sends and inbox stubs forgotten"
        ),
        // Lost leadership or quorum: the next leader's pass proposes them again.
        Err(error) => warn!(
            %shard, expired, forgotten, stubs_forgotten, %error,
            "retention proposal failed; retried next pass"
        ),
    }
}
