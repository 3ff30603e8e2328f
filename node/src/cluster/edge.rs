//! The ephemeral side: presence held on shard leaders, typing broadcast to every node, and the
//! push hook for users with no live stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use courier_consensus::types::{GroupId, NodeId};
use courier_proto::ShardId;
use courier_proto::pb::peer::{self, PresenceReport};
use tokio::sync::mpsc;

use super::propose::Route;
use super::{Cluster, unavailable};
use crate::presence::REFRESH_INTERVAL;
use crate::status::ApiError;

/// The ephemeral side of a node: presence it holds as a shard leader, the streams it reports,
/// and the push hook.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Presence of the users of shards this node leads.
    pub presence: Arc<crate::presence::PresenceTable>,
    /// Device streams open on this node, reported to their shard leaders.
    pub reporter: Arc<crate::presence::Reporter>,
    /// Wakes devices of users with no live stream.
    pub pusher: crate::push::Pusher,
}

impl Cluster {
    /// Presence, stream reports and push.
    pub fn edge(&self) -> &Edge {
        &self.edge
    }

    /// Applies presence `reports` from node `node` to this node's table and answers `query`.
    pub fn presence_local(
        &self,
        node: NodeId,
        reports: &[PresenceReport],
        query: &[u64],
    ) -> Vec<courier_proto::pb::client::PresenceUpdate> {
        self.edge.presence.report(node, reports);
        query.iter().map(|u| self.edge.presence.query(*u)).collect()
    }

    /// Sends presence `reports` for users of `shard` to its leader and asks it about `query`.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the shard has no leader or it does not answer.
    pub async fn presence_exchange(
        &self,
        shard: ShardId,
        reports: Vec<PresenceReport>,
        query: Vec<u64>,
    ) -> Result<Vec<courier_proto::pb::client::PresenceUpdate>, ApiError> {
        match self.route(shard).await? {
            Route::Local(_) => Ok(self.presence_local(self.groups.node_id(), &reports, &query)),
            Route::Remote { addr, leader } => {
                let mut client = self
                    .peers
                    .forward(&addr)
                    .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
                let request = self.peers.request(peer::PresenceRequest {
                    node_id: self.groups.node_id(),
                    reports,
                    query,
                });
                let response = client.presence(request).await.map_err(|status| {
                    unavailable(format!("leader {leader:?}: {}", status.message()), leader)
                })?;
                Ok(response.into_inner().presence)
            }
        }
    }

    /// Sends a typing update for `to_users` to every other node at once (fire and forget, each
    /// call within one RPC timeout), so a node that does not answer delays no other.
    pub async fn broadcast_typing(
        &self,
        to_users: Vec<u64>,
        update: courier_proto::pb::client::TypingUpdate,
    ) {
        let Some(metadata) = self.groups.get(GroupId::Metadata) else {
            return;
        };
        let calls = metadata
            .state()
            .members
            .into_iter()
            .filter(|(id, _)| *id != self.groups.node_id())
            .filter_map(|(_, addr)| self.peers.forward(&addr))
            .map(|mut client| {
                let request = self.peers.request(peer::TypingRequest {
                    to_users: to_users.clone(),
                    update: Some(update),
                });
                async move {
                    let _ = client.typing(request).await;
                }
            });
        futures_util::future::join_all(calls).await;
    }

    /// On the recipient's shard leader: wakes `user`'s devices when none has a live stream.
    pub fn push_if_offline(&self, user: u64, message_id: Vec<u8>) {
        if !self.edge.presence.is_online(user) {
            self.edge
                .pusher
                .push(crate::push::PushJob { user, message_id });
        }
    }
}

/// Reports batched per flush at most.
const REPORT_BATCH_MAX: usize = 1024;

/// Sends this node's stream reports to the users' shard leaders until `shutdown`: as streams
/// open and close, and every open stream again every [`REFRESH_INTERVAL`].
pub async fn run_reporter(
    cluster: Cluster,
    mut reports: mpsc::Receiver<PresenceReport>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
    loop {
        let mut batch = tokio::select! {
            () = shutdown.cancelled() => return,
            report = reports.recv() => match report {
                Some(report) => vec![report],
                None => return,
            },
            _ = refresh.tick() => cluster.edge().reporter.snapshot(),
        };
        while batch.len() < REPORT_BATCH_MAX {
            let Ok(report) = reports.try_recv() else {
                break;
            };
            batch.push(report);
        }
        let Some(shard_count) = cluster.groups().shard_count() else {
            continue;
        };
        let mut failed = std::collections::BTreeSet::new();
        for (shard, reports) in calls(batch, shard_count) {
            // A shard whose leader did not answer one call is not called again in this round:
            // each call could wait a whole RPC timeout, and the rounds of the other shards (and
            // the queue of opens and closes) would wait behind them.
            if failed.contains(&shard) {
                continue;
            }
            if let Err(error) = cluster.presence_exchange(shard, reports, Vec::new()).await {
                // The next refresh repeats every open stream.
                tracing::debug!(%shard, %error, "presence report not delivered");
                failed.insert(shard);
            }
        }
    }
}

/// `reports` as presence calls: by the users' shards, at most [`REPORT_BATCH_MAX`] a call (a
/// refresh repeats every open stream of the node, far more than one message may carry).
fn calls(reports: Vec<PresenceReport>, shard_count: u16) -> Vec<(ShardId, Vec<PresenceReport>)> {
    let mut by_shard: BTreeMap<u16, Vec<PresenceReport>> = BTreeMap::new();
    for report in reports {
        if let Some(user) = courier_proto::UserId::new(report.user) {
            by_shard
                .entry(courier_proto::shard_of(user, shard_count).get())
                .or_default()
                .push(report);
        }
    }
    by_shard
        .into_iter()
        .flat_map(|(shard, reports)| {
            reports
                .chunks(REPORT_BATCH_MAX)
                .map(|chunk| (ShardId::new(shard), chunk.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_of_many_streams_is_sent_in_bounded_calls() {
        let reports: Vec<PresenceReport> = (1..=5_000_u64)
            .map(|user| PresenceReport {
                user,
                device: 1,
                online: true,
                hide_last_seen: false,
                at_ms: 1,
            })
            .collect();
        let calls = calls(reports, 2);
        assert!(calls.iter().all(|(_, call)| call.len() <= REPORT_BATCH_MAX));
        assert_eq!(
            calls.iter().map(|(_, call)| call.len()).sum::<usize>(),
            5_000
        );
        for (shard, call) in &calls {
            for report in call {
                let user = courier_proto::UserId::new(report.user).expect("nonzero");
                assert_eq!(courier_proto::shard_of(user, 2), *shard);
            }
        }
        assert!(
            calls.len() >= 5,
            "5,000 reports need at least 5 calls: {}",
            calls.len()
        );
    }
}
