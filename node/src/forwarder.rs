//! Outbox forwarders: on every shard this node leads, the events queued for each destination
//! shard are sent in order, in batches, to the destination leader; once it answers
//! `stored_up_to` (after its commit), `OutboxTrimmed` is queued on the source shard's proposer,
//! where it rides in the next batch instead of taking a raft round of its own.
//!
//! Each (source, destination) pair has at most one batch in flight, so order within a pair is
//! kept; up to `limits.forward-batches-in-flight` pairs are in flight at once, each started as
//! soon as it has entries and a free slot (no pass waits for another pair's batch). While a
//! pair's batch is in flight its queue grows, so the next batch carries what arrived meanwhile.
//! Under load a short queue lingers up to [`FORWARD_LINGER`] to fill (`hold_until`); a lone
//! message on a quiet pair goes at once.
//!
//! What a destination stored is remembered here (`sent`) until the trim applies, so the next
//! batch starts after it. A new leader (or this one after an error) starts from the replicated
//! outbox instead; the destination's inbound watermark drops re-sent positions, so nothing is
//! stored twice and nothing is lost. Failures back off exponentially with jitter, per pair, up
//! to [`BACKOFF_MAX`]. The loop wakes when an applied batch changed an outbox (`ApplyWatch`),
//! when a batch comes back, and at least every [`POLL_INTERVAL`] (leadership changes wake
//! nobody).
//!
//! A pass reads a led shard's queue states only when its outbox changed since the last read
//! (`ApplyWatch::outbox_epoch`) or the read is [`STATES_MAX_AGE`] old: the state records are
//! rewritten with every queued message, and a range scan over them walks RocksDB's obsolete
//! versions of each (it was ≈ 6 % of the nodes' CPU under load, docs/BENCHMARKS.md).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use courier_consensus::types::GroupId;
use courier_consensus::watch::OutboxEpoch;
use courier_proto::ShardId;
use courier_proto::limits::{FORWARD_BATCH_BYTES_MAX, FORWARD_BATCH_EVENTS_MAX};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::peer::ForwardBatchRequest;
use courier_proto::pb::store::OutboxState;
use courier_storage::projection::{Projection, outbox};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::cluster::Cluster;

/// How long the forwarder waits for an outbox change before looking anyway.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// First retry delay after a failed forward.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Under load, a pair with fewer events than this waiting is held up to [`FORWARD_LINGER`] so
/// that its batch fills (one destination commit carries more messages).
pub const FORWARD_FILL_EVENTS: u64 = 64;
/// Longest a pair's waiting events are held to fill a batch while other batches are in flight,
/// or while the pair itself is busy (it started a batch within [`FORWARD_QUIET`]).
pub const FORWARD_LINGER: Duration = Duration::from_millis(2);
/// A pair that started no batch for this long is quiet: with nothing else in flight, its next
/// message is sent at once, so a lone message is not held. A pair busier than that (one sender
/// sending back to back) lingers, and one destination commit carries several of its messages.
/// Measured in docs/BENCHMARKS.md (session 28): 0.91–0.93× the CPU per cross-shard message at 1
/// and 64 senders, for up to ≈ 2 ms more send → delivery at one sender.
pub const FORWARD_QUIET: Duration = Duration::from_millis(10);
/// Longest a shard's queue states read by an earlier pass are used again while its outbox epoch
/// has not moved (a bound on any missed change, not the way changes are noticed).
pub const STATES_MAX_AGE: Duration = Duration::from_millis(500);
/// Events read from an outbox at a time while a batch is cut: a batch's read holds at most this
/// many events beyond the ones it sends (≤ 32 maximal messages, 8 MiB), where reading the whole
/// [`FORWARD_BATCH_EVENTS_MAX`] at once held up to 512 of them before the byte cut.
pub const FORWARD_READ_PAGE: usize = 32;
/// How long a trim queued on the proposer may take to apply before it is queued again (it may
/// have been refused by a full queue or lost with a leader change).
pub const TRIM_RETRY: Duration = Duration::from_secs(1);

/// A (source, destination) pair of shards.
type Pair = (u16, u16);
/// Per pair: when the next attempt is due, and the last backoff delay.
type Backoff = BTreeMap<Pair, (Instant, Duration)>;

/// Per pair: the position the destination stored up to (its answer), and when a trim up to it was
/// last queued.
type Sent = BTreeMap<Pair, (u64, Instant)>;

/// Per led source shard: its queue states as last read, the outbox epoch before that read, and
/// when it was made.
type States = HashMap<ShardId, (OutboxEpoch, Instant, Vec<(ShardId, OutboxState)>)>;

/// Runs the forwarders of this node until `shutdown`, with at most `in_flight` batches (pairs)
/// at once.
pub async fn run(cluster: Cluster, in_flight: usize, shutdown: CancellationToken) {
    let mut backoff = Backoff::new();
    let mut sent = Sent::new();
    let mut flying: JoinSet<Result<u64, crate::status::ApiError>> = JoinSet::new();
    // The pair each task in `flying` sends for, so that a task that ends without an answer (a
    // panic in a debug build) still frees its pair instead of leaving it busy for good.
    let mut flying_pairs = HashMap::<tokio::task::Id, Pair>::new();
    let mut busy = std::collections::BTreeSet::<Pair>::new();
    let mut started = BTreeMap::<Pair, Instant>::new();
    let mut waiting_since = BTreeMap::<Pair, Instant>::new();
    let mut states = States::new();
    let watch = cluster.groups().watch().clone();
    loop {
        // Registered before the pass, so an outbox change during it wakes the next one at once.
        let applied = watch.outbox().notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        cluster.passes().forwarder();
        let now = Instant::now();
        let mut linger_until = None;
        if let Some(shard_count) = cluster.groups().shard_count() {
            let mut ready = Vec::new();
            for source in 0..shard_count {
                let source = ShardId::new(source);
                let due = due_pairs(&cluster, source, &backoff, &mut sent, &mut states);
                for (dest, state) in due {
                    let pair = (source.get(), dest.get());
                    let from = sent
                        .get(&pair)
                        .map_or(state.trimmed_up_to, |(up_to, _)| *up_to)
                        .max(state.trimmed_up_to);
                    if busy.contains(&pair) || state.last_pos <= from {
                        continue;
                    }
                    let waiting = Waiting {
                        since: *waiting_since.entry(pair).or_insert(now),
                        events: state.last_pos.saturating_sub(from),
                        last_started: started.get(&pair).copied(),
                    };
                    match hold_until(&waiting, !flying.is_empty(), now) {
                        None => ready.push((waiting.last_started, pair, from)),
                        Some(fill_by) => {
                            linger_until =
                                Some(linger_until.map_or(fill_by, |t: Instant| t.min(fill_by)));
                        }
                    }
                }
            }
            // Fair: the pairs that waited longest since their last batch go first (never
            // started before all), so no pair starves when more are ready than slots are free.
            ready.sort_unstable();
            let free = in_flight.max(1).saturating_sub(flying.len());
            for (_, pair, from) in ready.into_iter().take(free) {
                busy.insert(pair);
                waiting_since.remove(&pair);
                started.insert(pair, now);
                let (source, dest) = (ShardId::new(pair.0), ShardId::new(pair.1));
                let cluster = cluster.clone();
                let task =
                    flying.spawn(async move { forward_once(&cluster, source, dest, from).await });
                flying_pairs.insert(task.id(), pair);
            }
        }
        // Sleep until an outbox changes, a batch comes back, a lingering pair is due, or the
        // earliest retry is due.
        let mut wait = next_wait(&mut backoff, Instant::now());
        if let Some(until) = linger_until {
            wait = wait.min(until.saturating_duration_since(Instant::now()));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = applied => {}
            Some(done) = flying.join_next_with_id() => {
                let Some((pair, result)) = finished(&mut flying_pairs, done) else { continue };
                busy.remove(&pair);
                note_result(&cluster, &mut backoff, &mut sent, pair, result);
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The pair a finished forward task sent for, and its answer; a task that panicked (or was
/// cancelled) answers a fault, so its pair is freed and backs off like any failed batch.
fn finished(
    flying_pairs: &mut HashMap<tokio::task::Id, Pair>,
    done: Result<(tokio::task::Id, Result<u64, crate::status::ApiError>), tokio::task::JoinError>,
) -> Option<(Pair, Result<u64, crate::status::ApiError>)> {
    match done {
        Ok((id, result)) => flying_pairs.remove(&id).map(|pair| (pair, result)),
        Err(error) => {
            let pair = flying_pairs.remove(&error.id())?;
            tracing::error!(source = pair.0, dest = pair.1, %error, "a forward task ended without an answer");
            Some((
                pair,
                Err(crate::status::ApiError::task_ended("forward", &error)),
            ))
        }
    }
}

/// A pair's queue as one pass sees it.
struct Waiting {
    /// Since when it has had events waiting.
    since: Instant,
    /// How many.
    events: u64,
    /// When its last batch started.
    last_started: Option<Instant>,
}

/// Whether a pair's waiting events go now (`None`) or are held to fill the batch, until when.
/// Under load (another batch in flight, or the pair itself started one within
/// [`FORWARD_QUIET`]), a short queue waits up to [`FORWARD_LINGER`]; a quiet pair on an idle
/// forwarder, a full batch and a queue that waited long enough go at once.
fn hold_until(waiting: &Waiting, others_in_flight: bool, now: Instant) -> Option<Instant> {
    let pair_busy = waiting
        .last_started
        .is_some_and(|at| now.saturating_duration_since(at) < FORWARD_QUIET);
    let fill_by = waiting.since + FORWARD_LINGER;
    let under_load = others_in_flight || pair_busy;
    (under_load && waiting.events < FORWARD_FILL_EVENTS && now < fill_by).then_some(fill_by)
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
/// queue state, if this node leads `source`. Forgets what was sent from a shard this node no
/// longer leads, and queues again a trim that has not applied within [`TRIM_RETRY`].
fn due_pairs(
    cluster: &Cluster,
    source: ShardId,
    backoff: &Backoff,
    sent: &mut Sent,
    cache: &mut States,
) -> Vec<(ShardId, OutboxState)> {
    let handle = cluster.groups().get(GroupId::Shard(source));
    let Some(handle) = handle.filter(courier_consensus::groups::GroupHandle::is_leader) else {
        sent.retain(|(from, _), _| *from != source.get());
        cache.remove(&source);
        return Vec::new();
    };
    let now = Instant::now();
    let Some(states) = queue_states(cluster, source, now, cache) else {
        return Vec::new();
    };
    for (dest, state) in states {
        let pair = (source.get(), dest.get());
        if let Some((up_to, queued_at)) = sent.get_mut(&pair) {
            if *up_to <= state.trimmed_up_to {
                sent.remove(&pair); // the trim applied
            } else if now.duration_since(*queued_at) >= TRIM_RETRY {
                *queued_at = now;
                queue_trim(&handle, *dest, *up_to);
            }
        }
    }
    states
        .iter()
        .filter(|(_, s)| s.last_pos > s.trimmed_up_to)
        .filter(|(dest, _)| {
            backoff
                .get(&(source.get(), dest.get()))
                .is_none_or(|(at, _)| *at <= now)
        })
        .cloned()
        .collect()
}

/// `source`'s queue states: as an earlier pass read them while its outbox epoch has not moved
/// and the read is younger than [`STATES_MAX_AGE`], read again otherwise. `None` after a storage
/// fault (logged).
fn queue_states<'c>(
    cluster: &Cluster,
    source: ShardId,
    now: Instant,
    cache: &'c mut States,
) -> Option<&'c [(ShardId, OutboxState)]> {
    let epoch = cluster.groups().watch().outbox_epoch(source);
    let fresh = cache.get(&source).is_some_and(|(read_at, when, _)| {
        *read_at == epoch && now.duration_since(*when) < STATES_MAX_AGE
    });
    if fresh {
        return cache.get(&source).map(|(_, _, states)| states.as_slice());
    }
    let mut reader = cluster.groups().db().read(source);
    match outbox::states(&reader.view(Projection::Outbox)) {
        Ok(states) => Some(
            &cache
                .entry(source)
                .insert_entry((epoch, now, states))
                .into_mut()
                .2,
        ),
        Err(error) => {
            cache.remove(&source);
            tracing::error!(source = source.get(), %error, "cannot read the outbox");
            None
        }
    }
}

/// Queues `OutboxTrimmed` up to `up_to` on the source shard's proposer, to ride in its next batch.
fn queue_trim(handle: &courier_consensus::groups::GroupHandle, dest: ShardId, up_to: u64) {
    let trim = Event {
        kind: Some(Kind::OutboxTrimmed(events::OutboxTrimmed {
            dest_shard: u32::from(dest.get()),
            up_to,
        })),
    };
    if !handle.proposer.submit(vec![trim]) {
        tracing::debug!(
            dest = dest.get(),
            up_to,
            "trim not queued (queue full); retried later"
        );
    }
}

/// After a batch came back: on success remembers what the destination stored, queues the trim
/// and clears the pair's backoff; after a failure forgets what was sent (the next batch starts
/// from the replicated outbox) and doubles the backoff (with jitter).
fn note_result(
    cluster: &Cluster,
    backoff: &mut Backoff,
    sent: &mut Sent,
    pair: Pair,
    result: Result<u64, crate::status::ApiError>,
) {
    let (source, dest) = (ShardId::new(pair.0), ShardId::new(pair.1));
    match result {
        Ok(stored_up_to) => {
            backoff.remove(&pair);
            let known = sent.get(&pair).map_or(0, |(up_to, _)| *up_to);
            if stored_up_to > known {
                sent.insert(pair, (stored_up_to, Instant::now()));
                if let Some(handle) = cluster.groups().get(GroupId::Shard(source)) {
                    queue_trim(&handle, dest, stored_up_to);
                }
            }
        }
        Err(error) => {
            sent.remove(&pair);
            let delay = backoff
                .get(&pair)
                .map_or(BACKOFF_MIN, |(_, d)| (*d * 2).min(BACKOFF_MAX));
            let half = u64::try_from(delay.as_millis() / 2).unwrap_or(u64::MAX);
            let jitter = Duration::from_millis(crate::env::random_range(0..=half));
            tracing::warn!(source = source.get(), dest = dest.get(), %error, retry_ms = (delay + jitter).as_millis(), "forward failed");
            backoff.insert(pair, (Instant::now() + delay + jitter, delay));
        }
    }
}

/// Sends one batch of what `source` queued for `dest` after position `after`; answers the
/// position the destination stored up to.
async fn forward_once(
    cluster: &Cluster,
    source: ShardId,
    dest: ShardId,
    after: u64,
) -> Result<u64, crate::status::ApiError> {
    let pending = {
        let mut reader = cluster.groups().db().read(source);
        let view = reader.view(Projection::Outbox);
        read_fitting(
            |from, limit| outbox::pending(&view, dest, from, limit),
            after.saturating_add(1),
            FORWARD_BATCH_EVENTS_MAX,
            FORWARD_BATCH_BYTES_MAX,
        )
        .map_err(crate::status::ApiError::from)?
    };
    let Some((first_pos, _)) = pending.first() else {
        return Ok(after);
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
    Ok(response.stored_up_to)
}

/// Reads the next batch from `from_pos` on, [`FORWARD_READ_PAGE`] events at a time
/// (`read_page(from, limit)`): the longest run of at most `events_max` events whose encoded sizes
/// sum to at most `bytes_max`, and never less than its first event (one event always fits one
/// proposal: `MESSAGE_CONTENT_BYTES_MAX`). The destination proposes a batch as one proposal,
/// which its proposer refuses beyond `PROPOSAL_BYTES_MAX`; a batch cut by count alone was refused
/// on every retry, and the pair never moved again.
fn read_fitting<E>(
    mut read_page: impl FnMut(u64, usize) -> Result<Vec<(u64, Event)>, E>,
    from_pos: u64,
    events_max: usize,
    bytes_max: usize,
) -> Result<Vec<(u64, Event)>, E> {
    let mut batch: Vec<(u64, Event)> = Vec::new();
    let mut bytes = 0_usize;
    let mut from = from_pos;
    while batch.len() < events_max {
        let want = events_max
            .saturating_sub(batch.len())
            .min(FORWARD_READ_PAGE);
        let page = read_page(from, want)?;
        let last_page = page.len() < want;
        for (pos, event) in page {
            if pos != from && !batch.is_empty() {
                // A trim applied between two pages (another node's forward stored these): the
                // batch ends before the gap instead of carrying it to the destination, which
                // would refuse it (`COURIER:Forward:Position`).
                return Ok(batch);
            }
            bytes = bytes.saturating_add(prost::Message::encoded_len(&event));
            if bytes > bytes_max && !batch.is_empty() {
                return Ok(batch);
            }
            from = pos.saturating_add(1);
            batch.push((pos, event));
        }
        if last_page {
            break;
        }
    }
    Ok(batch)
}

#[cfg(test)]
pub(crate) mod tests {
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

    #[tokio::test]
    async fn a_forward_task_that_panics_frees_its_pair_with_a_fault() {
        let mut flying: JoinSet<Result<u64, crate::status::ApiError>> = JoinSet::new();
        let mut flying_pairs = HashMap::new();
        let answers = flying.spawn(async { Ok(7) });
        flying_pairs.insert(answers.id(), (0, 1));
        let panics = flying.spawn(async { panic!("a bug in a forward") });
        flying_pairs.insert(panics.id(), (2, 1));
        let mut freed = Vec::new();
        while let Some(done) = flying.join_next_with_id().await {
            freed.push(finished(&mut flying_pairs, done).expect("every task's pair is known"));
        }
        freed.sort_unstable_by_key(|(pair, _)| *pair);
        assert!(matches!(freed[0], ((0, 1), Ok(7))), "{freed:?}");
        let ((2, 1), Err(error)) = &freed[1] else {
            panic!("the panicked task's pair is not freed with an error: {freed:?}")
        };
        assert!(error.to_string().contains("forward task ended"), "{error}");
        assert!(flying_pairs.is_empty());
    }

    fn waiting(now: Instant, events: u64, last_started_ago: Option<Duration>) -> Waiting {
        Waiting {
            since: now,
            events,
            last_started: last_started_ago.map(|ago| now - ago),
        }
    }

    #[test]
    fn a_quiet_pair_on_an_idle_forwarder_sends_at_once() {
        let now = Instant::now() + FORWARD_QUIET;
        assert_eq!(hold_until(&waiting(now, 1, None), false, now), None);
        let quiet = waiting(now, 1, Some(FORWARD_QUIET));
        assert_eq!(hold_until(&quiet, false, now), None);
    }

    #[test]
    fn a_busy_pair_lingers_to_fill_its_batch_even_when_nothing_else_flies() {
        let now = Instant::now() + FORWARD_QUIET;
        let busy = waiting(now, 1, Some(FORWARD_QUIET / 2));
        assert_eq!(hold_until(&busy, false, now), Some(now + FORWARD_LINGER));
        // Held no longer than the linger.
        assert_eq!(hold_until(&busy, false, now + FORWARD_LINGER), None);
    }

    #[test]
    fn other_batches_in_flight_make_a_short_queue_linger() {
        let now = Instant::now() + FORWARD_QUIET;
        let quiet = waiting(now, 1, None);
        assert_eq!(hold_until(&quiet, true, now), Some(now + FORWARD_LINGER));
    }

    /// A delivery with a body of `body_bytes`, as a source's outbox queues it (not stamped).
    pub(crate) fn delivered(body_bytes: usize) -> Event {
        Event {
            kind: Some(Kind::MessageDelivered(events::MessageDelivered {
                content: Some(events::Content {
                    body: vec![b'x'; body_bytes],
                    media: None,
                }),
                ..events::MessageDelivered::default()
            })),
        }
    }

    /// Reads `queue` as an outbox would, counting the events read.
    fn read(queue: &[(u64, Event)], bytes_max: usize, read: &mut usize) -> Vec<u64> {
        let page = |from: u64, limit: usize| -> Result<Vec<(u64, Event)>, ()> {
            let page: Vec<_> = queue
                .iter()
                .filter(|(pos, _)| *pos >= from)
                .take(limit)
                .cloned()
                .collect();
            *read += page.len();
            Ok(page)
        };
        let batch = read_fitting(page, 1, FORWARD_BATCH_EVENTS_MAX, bytes_max).unwrap();
        batch.into_iter().map(|(pos, _)| pos).collect()
    }

    #[test]
    fn a_batch_holds_no_more_bytes_than_one_proposal() {
        let one = prost::Message::encoded_len(&delivered(1000));
        let queue: Vec<(u64, Event)> = (1..=10).map(|pos| (pos, delivered(1000))).collect();
        let mut n = 0;
        assert_eq!(read(&queue, 3 * one + one / 2, &mut n), [1, 2, 3]);
        assert_eq!(read(&queue, 3 * one, &mut n).len(), 3, "up to the limit");
        assert_eq!(
            read(&queue, 10 * one, &mut n),
            (1..=10).collect::<Vec<_>>(),
            "all when they fit"
        );
        assert_eq!(
            read(&queue, one / 2, &mut n),
            [1],
            "never less than one event"
        );
        assert!(read(&[], one, &mut n).is_empty());
    }

    #[test]
    fn a_batch_reads_pages_until_its_cut() {
        let one = prost::Message::encoded_len(&delivered(10));
        let long = FORWARD_BATCH_EVENTS_MAX as u64 + 100;
        let queue: Vec<(u64, Event)> = (1..=long).map(|pos| (pos, delivered(10))).collect();
        // Small events: pages until the count limit, in order, without gaps or repeats.
        let mut read_events = 0;
        let batch = read(&queue, usize::MAX, &mut read_events);
        assert_eq!(
            batch,
            (1..=FORWARD_BATCH_EVENTS_MAX as u64).collect::<Vec<_>>()
        );
        assert_eq!(
            read_events, FORWARD_BATCH_EVENTS_MAX,
            "no more than the batch"
        );
        // A byte cut after 40 events stops reading within one page of it.
        let mut read_events = 0;
        assert_eq!(read(&queue, 40 * one, &mut read_events).len(), 40);
        assert!(
            read_events <= 40 + FORWARD_READ_PAGE,
            "read {read_events} events for a batch of 40"
        );
    }

    /// Stamps `event` as a destination does, with the widest `stored_at_ms`.
    pub(crate) fn stamped(mut event: Event) -> Event {
        if let Some(Kind::MessageDelivered(delivered)) = event.kind.as_mut() {
            delivered.stored_at_ms = u64::MAX;
        }
        event
    }

    #[test]
    fn a_batch_still_fits_one_proposal_once_its_destination_stamps_it() {
        // Maximal messages, then small ones: the byte cut falls among the small ones, so
        // hundreds of events end within a few bytes of the limit.
        let big = courier_proto::limits::MESSAGE_BODY_BYTES_MAX;
        let queue: Vec<(u64, Event)> = (1..=15)
            .map(|pos| (pos, delivered(big)))
            .chain((16..=1000).map(|pos| (pos, delivered(150))))
            .collect();
        let mut n = 0;
        let batch = read(&queue, FORWARD_BATCH_BYTES_MAX, &mut n);
        assert!(
            batch.len() > 100 && batch.len() < FORWARD_BATCH_EVENTS_MAX,
            "cut by bytes among the small events: {}",
            batch.len()
        );
        let unstamped: usize = queue[..batch.len()]
            .iter()
            .map(|(_, event)| prost::Message::encoded_len(event))
            .sum();
        let proposed: usize = queue[..batch.len()]
            .iter()
            .map(|(_, event)| prost::Message::encoded_len(&stamped(event.clone())))
            .sum();
        assert!(
            proposed <= courier_proto::limits::PROPOSAL_BYTES_MAX,
            "the destination proposes {proposed} bytes ({unstamped} as queued)"
        );
    }

    #[test]
    fn a_batch_ends_at_a_gap_a_trim_left_between_two_pages() {
        let mut trimmed = false;
        // The first page reads 1..=32; then a trim up to 50 applies.
        let page = |from: u64, limit: usize| -> Result<Vec<(u64, Event)>, ()> {
            let floor = if trimmed { 51 } else { 1 };
            trimmed = true;
            Ok((from.max(floor)..from.max(floor) + limit as u64)
                .map(|pos| (pos, delivered(10)))
                .collect())
        };
        let batch = read_fitting(page, 1, FORWARD_BATCH_EVENTS_MAX, usize::MAX).unwrap();
        let positions: Vec<u64> = batch.iter().map(|(pos, _)| *pos).collect();
        assert_eq!(
            positions,
            (1..=FORWARD_READ_PAGE as u64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_full_batch_never_waits() {
        let now = Instant::now() + FORWARD_QUIET;
        let full = waiting(now, FORWARD_FILL_EVENTS, Some(Duration::ZERO));
        assert_eq!(hold_until(&full, true, now), None);
    }
}
