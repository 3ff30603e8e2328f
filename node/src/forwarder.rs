//! Outbox forwarders: on every shard this node leads, the events queued for each destination
//! shard are sent in order, in batches, to the destination leader; once it answers
//! `stored_up_to` (after its commit), `OutboxTrimmed` is proposed here.
//!
//! Each pass runs the due (source, destination) pairs concurrently, up to
//! `limits.forward-batches-in-flight` at once and one batch per pair, so order within a pair is
//! kept while one pair's forward and commits overlap with the others'.
//!
//! A new leader resumes from the replicated outbox, so nothing is lost; the destination's inbound
//! watermark drops re-sent positions, so nothing is stored twice. Failures back off
//! exponentially with jitter, per (source, destination), up to [`BACKOFF_MAX`]. The loop wakes on
//! every applied batch (the groups' apply signal), with [`POLL_INTERVAL`] as a safety net.

use std::collections::BTreeMap;
use std::time::Duration;

use courier_consensus::types::GroupId;
use courier_proto::ShardId;
use courier_proto::limits::FORWARD_BATCH_EVENTS_MAX;
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::peer::ForwardBatchRequest;
use courier_proto::pb::store::OutboxState;
use courier_storage::projection::{Projection, outbox};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::cluster::Cluster;

/// How long the forwarder waits for the apply signal before looking anyway (every applied batch
/// wakes it at once).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// First retry delay after a failed forward.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Per (source, destination) pair: when the next attempt is due, and the last backoff delay.
type Backoff = BTreeMap<(u16, u16), (Instant, Duration)>;

/// Runs the forwarders of this node until `shutdown`, with at most `in_flight` batches (pairs)
/// at once.
pub async fn run(cluster: Cluster, in_flight: usize, shutdown: CancellationToken) {
    let mut backoff = Backoff::new();
    let signal = cluster.groups().applied_signal().clone();
    loop {
        // Registered before the pass, so a batch applied during it wakes the next one at once.
        let applied = signal.notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        if let Some(shard_count) = cluster.groups().shard_count() {
            let mut due = Vec::new();
            for source in 0..shard_count {
                due.extend(due_pairs(&cluster, ShardId::new(source), &backoff));
            }
            for chunk in due.chunks(in_flight.max(1)) {
                let results =
                    futures_util::future::join_all(chunk.iter().map(|(source, dest, state)| {
                        forward_once(&cluster, *source, *dest, state)
                    }))
                    .await;
                for ((source, dest, _), result) in chunk.iter().zip(results) {
                    note_result(&mut backoff, *source, *dest, result);
                }
            }
        }
        // Sleep until the next apply, or until the earliest retry is due.
        let wait = next_wait(&mut backoff, Instant::now());
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = applied => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long the forwarder may sleep after a pass at `now`: until the earliest scheduled retry,
/// at most [`POLL_INTERVAL`]. A retry that came due but was not made in the pass (this node no
/// longer leads the source, or the queue drained) is forgotten: left in place it would make
/// every later wait zero, a loop that never sleeps (found by the simulation, node layer seed 0).
fn next_wait(backoff: &mut Backoff, now: Instant) -> Duration {
    backoff.retain(|_, (at, _)| *at > now);
    backoff
        .values()
        .map(|(at, _)| at.saturating_duration_since(now))
        .min()
        .unwrap_or(POLL_INTERVAL)
        .min(POLL_INTERVAL)
}

/// The destinations `source` has pending entries for and whose backoff has passed, with their
/// queue state, if this node leads `source`.
fn due_pairs(
    cluster: &Cluster,
    source: ShardId,
    backoff: &Backoff,
) -> Vec<(ShardId, ShardId, OutboxState)> {
    let Some(handle) = cluster.groups().get(GroupId::Shard(source)) else {
        return Vec::new();
    };
    if !handle.is_leader() {
        return Vec::new();
    }
    let mut reader = cluster.groups().db().read(source);
    let states = match outbox::states(&reader.view(Projection::Outbox)) {
        Ok(states) => states,
        Err(error) => {
            tracing::error!(source = source.get(), %error, "cannot read the outbox");
            return Vec::new();
        }
    };
    let now = Instant::now();
    states
        .into_iter()
        .filter(|(_, s)| s.last_pos > s.trimmed_up_to)
        .filter(|(dest, _)| {
            backoff
                .get(&(source.get(), dest.get()))
                .is_none_or(|(at, _)| *at <= now)
        })
        .map(|(dest, state)| (source, dest, state))
        .collect()
}

/// Clears a pair's backoff after a success; doubles it (with jitter) after a failure.
fn note_result(
    backoff: &mut Backoff,
    source: ShardId,
    dest: ShardId,
    result: Result<(), crate::status::ApiError>,
) {
    let key = (source.get(), dest.get());
    match result {
        Ok(()) => {
            backoff.remove(&key);
        }
        Err(error) => {
            let delay = backoff
                .get(&key)
                .map_or(BACKOFF_MIN, |(_, d)| (*d * 2).min(BACKOFF_MAX));
            let half = u64::try_from(delay.as_millis() / 2).unwrap_or(u64::MAX);
            let jitter = Duration::from_millis(crate::env::random_range(0..=half));
            tracing::warn!(source = source.get(), dest = dest.get(), %error, retry_ms = (delay + jitter).as_millis(), "forward failed");
            backoff.insert(key, (Instant::now() + delay + jitter, delay));
        }
    }
}

/// Sends one batch of what `source` queued for `dest` (its queue `state` as just read), then
/// trims.
async fn forward_once(
    cluster: &Cluster,
    source: ShardId,
    dest: ShardId,
    state: &OutboxState,
) -> Result<(), crate::status::ApiError> {
    let pending = {
        let mut reader = cluster.groups().db().read(source);
        outbox::pending(
            &reader.view(Projection::Outbox),
            dest,
            state.trimmed_up_to.saturating_add(1),
            FORWARD_BATCH_EVENTS_MAX,
        )
        .map_err(crate::status::ApiError::from)?
    };
    let Some((first_pos, _)) = pending.first() else {
        return Ok(());
    };
    let request = ForwardBatchRequest {
        source_shard: u32::from(source.get()),
        dest_shard: u32::from(dest.get()),
        first_pos: *first_pos,
        events: pending.into_iter().map(|(_, event)| event).collect(),
    };
    // One batch carries many sends; it joins the trace of its first message.
    let span = tracing::info_span!("forward.batch", %source, %dest, first_pos = request.first_pos, events = request.events.len());
    if let Some(Kind::MessageDelivered(first)) =
        request.events.first().and_then(|e| e.kind.as_ref())
    {
        crate::telemetry::adopt_traceparent(&span, &first.trace_parent);
    }
    let response = cluster
        .forward_batch(request, false)
        .instrument(span)
        .await?;
    if response.stored_up_to > state.trimmed_up_to {
        let trim = Event {
            kind: Some(Kind::OutboxTrimmed(events::OutboxTrimmed {
                dest_shard: u32::from(dest.get()),
                up_to: response.stored_up_to,
            })),
        };
        cluster.propose(source, vec![trim]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_that_was_not_made_does_not_make_the_wait_zero() {
        let now = Instant::now();
        let mut backoff = Backoff::new();
        // Due 10 ms ago, never retried (the node lost the lead of shard 0).
        backoff.insert((0, 1), (now - Duration::from_millis(10), BACKOFF_MIN));
        assert_eq!(next_wait(&mut backoff, now), POLL_INTERVAL);
        assert!(backoff.is_empty(), "the stale retry is forgotten");
    }

    #[test]
    fn the_wait_ends_at_the_earliest_scheduled_retry() {
        let now = Instant::now();
        let mut backoff = Backoff::new();
        backoff.insert((0, 1), (now + Duration::from_millis(70), BACKOFF_MIN));
        backoff.insert((1, 0), (now + Duration::from_millis(30), BACKOFF_MIN));
        assert_eq!(next_wait(&mut backoff, now), Duration::from_millis(30));
        assert_eq!(backoff.len(), 2);
    }
}
