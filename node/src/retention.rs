//! Retention: on every shard this node leads, undelivered messages older than
//! `retention.undelivered` are expired by proposing `MessageExpired` events, and the dedup
//! records of sends older than `retention.dedup` are forgotten by proposing `SendsForgotten`, and
//! so are the trimmed inbox stubs (bodies every device acked) of messages stored longer ago than
//! that, by proposing `InboxForgotten`, and the receipts set longer ago than that, by proposing
//! `ReceiptsForgotten`. Unless delivered messages are kept (`retention.keep-delivered`), the
//! stored copies of group messages sent longer ago than both windows together leave by
//! `GroupMessagesForgotten` (a member's device away that long then misses them). The decision
//! is the leader's (its clock, its scan of the expiry, dedup, stub, receipt or group message
//! index); the effect is a log event, so every replica and every rebuild agrees on what left.
//! Registration records (codes and the per-number limits) with nothing left to remember leave
//! by `RegistrationsForgotten`. An expiry that races an ack, or a second proposal for the same message or send from a new
//! leader, applies as a no-op.
//!
//! Each proposal carries at most `retention.batch-max` of each kind. A round proposes once per
//! shard it leads; while some kind filled its batch on a shard, another round follows at once
//! for those shards, up to `retention.batches-per-pass-max` rounds per `scan-interval`. So each
//! kind leaves at up to `batch-max × batches-per-pass-max` per scan interval per shard (256 × 64
//! per 10 s by default), and a backlog drains instead of growing with the traffic.

use std::time::Duration;

use courier_consensus::types::GroupId;
use courier_proto::LogIndex;
use courier_proto::ShardId;
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_storage::projection::{
    Projection, dedup, expiry, groups, inbox, receipts, registration,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::now_ms;
use crate::cluster::Cluster;

/// How long things are kept (`[retention]`), and how often the leader looks.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// Undelivered messages expire after this.
    pub undelivered: Duration,
    /// Dedup records are forgotten this long after their send, trimmed inbox stubs this long
    /// after their message was stored, receipts this long after they were set.
    pub dedup: Duration,
    /// Time between passes.
    pub interval: Duration,
    /// Whether stored group message copies leave once older than `undelivered` + `dedup` (not
    /// when delivered messages are kept).
    pub forget_group_copies: bool,
    /// Expired messages, and forgotten sends, inbox stubs, receipts and group copies (each), in
    /// one proposal at most (`retention.batch-max`).
    pub batch_max: usize,
    /// Rounds of proposals per pass at most (`retention.batches-per-pass-max`).
    pub rounds_max: u32,
}

/// The retention windows of one pass, in milliseconds, and the size of its proposals.
#[derive(Clone, Copy, Debug)]
struct Millis {
    undelivered: u64,
    dedup: u64,
    /// `None`: group message copies are kept.
    group_copies: Option<u64>,
    batch_max: usize,
}

/// Runs the expirer of this node until `shutdown`.
pub async fn run(cluster: Cluster, windows: Windows, shutdown: CancellationToken) {
    let millis = |window: Duration| u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let (undelivered, dedup) = (millis(windows.undelivered), millis(windows.dedup));
    let windows_ms = Millis {
        undelivered,
        dedup,
        group_copies: windows
            .forget_group_copies
            .then_some(undelivered.saturating_add(dedup)),
        batch_max: windows.batch_max,
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(windows.interval) => {}
        }
        let Some(shard_count) = cluster.groups().shard_count() else {
            continue;
        };
        // Round-robin over the shards with more due, so that one shard's backlog does not hold
        // back the others. One clock reading per pass: its rounds drain what was due when it
        // started, and stop rather than chase what falls due while they run (the next pass
        // takes that).
        let now = now_ms();
        let mut due: Vec<ShardId> = (0..shard_count).map(ShardId::new).collect();
        for _ in 0..windows.rounds_max {
            let mut more = Vec::new();
            for shard in due {
                if round_on(&cluster, shard, now, windows_ms).await == Round::More {
                    more.push(shard);
                }
            }
            if more.is_empty() || shutdown.is_cancelled() {
                break;
            }
            due = more;
        }
    }
}

/// What a round left on a shard.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// Nothing known to be left: the shard waits for the next pass.
    Done,
    /// The round was committed and more may be due now: some kind filled its batch, or it
    /// forgot group copies or registration records, whose scans cannot tell a full batch
    /// (`Found::more_may_be_due`).
    More,
}

/// What one pass found due on a shard, oldest first.
struct Found {
    expired: Vec<expiry::Due>,
    sends: Vec<events::ForgottenSend>,
    stubs: Vec<events::ForgottenMessage>,
    receipts: Vec<events::ForgottenReceipt>,
    /// The group message copies due: the last index and the cutoff time.
    group_copies: Option<(LogIndex, u64)>,
    /// Registration records with nothing left to remember (no live code, full buckets).
    registrations: usize,
}

impl Found {
    /// Reads the retention indexes of `shard` on this replica.
    fn read(
        cluster: &Cluster,
        shard: ShardId,
        now: u64,
        windows: Millis,
    ) -> courier_storage::Result<Self> {
        let mut reader = cluster.groups().db().read(shard);
        let dedup_cutoff = now.saturating_sub(windows.dedup);
        let group_copies = match windows.group_copies {
            Some(window) => {
                let before_ms = now.saturating_sub(window);
                groups::messages_sent_before(
                    &reader.view(Projection::Groups),
                    before_ms,
                    windows.batch_max,
                )?
                .map(|last| (last, before_ms))
            }
            None => None,
        };
        Ok(Self {
            group_copies,
            registrations: registration::forgettable(&reader.view(Projection::Devices), now)?.len(),
            expired: expiry::due(
                &reader.view(Projection::Expiry),
                now.saturating_sub(windows.undelivered),
                windows.batch_max,
            )?,
            sends: dedup::sent_before(
                &reader.view(Projection::Dedup),
                dedup_cutoff,
                windows.batch_max,
            )?,
            stubs: inbox::stubs_before(
                &reader.view(Projection::Inbox),
                dedup_cutoff,
                windows.batch_max,
            )?,
            receipts: receipts::set_before(
                &reader.view(Projection::Receipts),
                dedup_cutoff,
                windows.batch_max,
            )?,
        })
    }

    /// Whether more may be due once these leave: a kind filled its batch (registration records:
    /// the most one event forgets). Whether the group copies did is not known (their scan stops
    /// at the first one not due), so any found count: the copies a proposal names leave at
    /// apply, and the next round, at the same cutoff, finds the next ones or none.
    fn more_may_be_due(&self, batch_max: usize) -> bool {
        [
            self.expired.len(),
            self.sends.len(),
            self.stubs.len(),
            self.receipts.len(),
        ]
        .contains(&batch_max)
            || self.group_copies.is_some()
            || self.registrations >= registration::FORGET_PER_EVENT_MAX
    }

    /// The proposal: one `MessageExpired` per message, one event per kind of forget.
    fn events(self, now: u64) -> Vec<Event> {
        let mut events: Vec<Event> = self
            .expired
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
        let forgets = [
            (!self.sends.is_empty()).then_some(Kind::SendsForgotten(events::SendsForgotten {
                sends: self.sends,
                at_ms: now,
            })),
            (!self.stubs.is_empty()).then_some(Kind::InboxForgotten(events::InboxForgotten {
                messages: self.stubs,
                at_ms: now,
            })),
            (!self.receipts.is_empty()).then_some(Kind::ReceiptsForgotten(
                events::ReceiptsForgotten {
                    receipts: self.receipts,
                    at_ms: now,
                },
            )),
            self.group_copies.map(|(last, before_ms)| {
                Kind::GroupMessagesForgotten(events::GroupMessagesForgotten {
                    up_to_index: last.get(),
                    before_ms,
                })
            }),
            (self.registrations > 0).then_some(Kind::RegistrationsForgotten(
                events::RegistrationsForgotten { before_ms: now },
            )),
        ];
        events.extend(
            forgets
                .into_iter()
                .flatten()
                .map(|kind| Event { kind: Some(kind) }),
        );
        events
    }
}

/// One round over `shard`, if this node leads it: expires the undelivered messages and forgets
/// the sends, inbox stubs, receipts and group message copies that are due, in one proposal of at
/// most `batch_max` of each.
async fn round_on(cluster: &Cluster, shard: ShardId, now: u64, windows: Millis) -> Round {
    let Some(handle) = cluster.groups().get(GroupId::Shard(shard)) else {
        return Round::Done;
    };
    if !handle.is_leader() {
        return Round::Done;
    }
    let due = match Found::read(cluster, shard, now, windows) {
        Ok(due) => due,
        Err(error) => {
            warn!(%shard, %error, "reading the retention indexes failed");
            return Round::Done;
        }
    };
    let (expired, sends, stubs, receipts, registrations) = (
        due.expired.len(),
        due.sends.len(),
        due.stubs.len(),
        due.receipts.len(),
        due.registrations,
    );
    let group_copies_up_to = due.group_copies.map_or(0, |(last, _)| last.get());
    let full = due.more_may_be_due(windows.batch_max);
    let events = due.events(now);
    if events.is_empty() {
        return Round::Done;
    }
    match cluster.propose(shard, events).await {
        Ok(_) => {
            info!(
                %shard, expired, sends, stubs, receipts, group_copies_up_to, registrations,
                "retention: messages expired; sends, inbox stubs, receipts, group copies and \
                 registration records forgotten"
            );
            if full { Round::More } else { Round::Done }
        }
        // Lost leadership or quorum: the next leader's pass proposes them again.
        Err(error) => {
            warn!(
                %shard, expired, sends, stubs, receipts, %error,
                "retention proposal failed; retried next pass"
            );
            Round::Done
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found() -> Found {
        Found {
            expired: Vec::new(),
            sends: Vec::new(),
            stubs: Vec::new(),
            receipts: Vec::new(),
            group_copies: None,
            registrations: 0,
        }
    }

    /// Another round follows while a kind fills its batch (registration records: one event's
    /// worth), or any group copies left (their count is not known); not for a short batch.
    #[test]
    fn a_round_is_followed_by_another_while_more_may_be_due() {
        assert!(!found().more_may_be_due(2), "nothing found");
        let short = Found {
            sends: vec![events::ForgottenSend::default()],
            registrations: 5,
            ..found()
        };
        assert!(!short.more_may_be_due(2), "a batch short of the maximum");
        let registrations = Found {
            registrations: registration::FORGET_PER_EVENT_MAX,
            ..found()
        };
        assert!(
            registrations.more_may_be_due(2),
            "as many registration records as one event forgets"
        );
        let full = Found {
            stubs: vec![events::ForgottenMessage::default(); 2],
            ..found()
        };
        assert!(full.more_may_be_due(2), "a full batch");
        let copies = Found {
            group_copies: Some((LogIndex::new(7), 1_000)),
            ..found()
        };
        assert!(copies.more_may_be_due(2), "group copies found");
    }
}
