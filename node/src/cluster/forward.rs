//! Forwarded batches: deliveries and receipts another shard's forwarder sends, stored on the
//! destination shard's leader. The batch is routed first and checked only where it is stored.

use courier_consensus::groups::GroupHandle;
use courier_consensus::types::{EventOutcome, NodeId};
use courier_proto::ShardId;
use courier_proto::limits::{FORWARD_BATCH_EVENTS_MAX, PROPOSAL_BYTES_MAX};
use courier_proto::pb::events::{Event, event::Kind};
use courier_proto::pb::peer::{
    ForwardBatchOutcome, ForwardBatchRequest, ForwardBatchResponse, ForwardBatchesRequest,
};
use courier_storage::projection::{Projection, outbox};
use tracing::Instrument as _;

use super::propose::{Route, propose_error};
use super::{Cluster, internal, invalid, unavailable};
use crate::env::now_ms;
use crate::status::ApiError;

impl Cluster {
    /// Stores a forwarded batch on the destination shard's leader, here or one hop away.
    ///
    /// The batch's shape (size, first position) is checked here; its events only where they are
    /// stored, so a batch passing through this node on its one hop is not copied to be checked.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed batch; `UNAVAILABLE` when the shard has no leader.
    pub async fn forward_batch(
        &self,
        request: ForwardBatchRequest,
        already_forwarded: bool,
    ) -> Result<ForwardBatchResponse, ApiError> {
        let shard_count = self.shard_count_or_unavailable()?;
        let dest = ShardId::from_wire(request.dest_shard, shard_count)?;
        let source = ShardId::from_wire(request.source_shard, shard_count)?;
        check_shape(&request)?;
        let handle = match self.route(dest).await? {
            Route::Local(handle) => handle,
            Route::Remote { addr, leader } if !already_forwarded => {
                return self.forward_to(&addr, request, leader).await;
            }
            Route::Remote { leader, .. } => return Err(moved(dest, leader)),
        };
        let answers = self
            .store_batches(&handle, dest, vec![(source, request)])
            .await?;
        let answer = answers
            .into_iter()
            .next()
            .ok_or_else(|| internal("a batch was not answered".to_owned()))?;
        answer.map(|stored_up_to| ForwardBatchResponse { stored_up_to })
    }

    /// Stores the batches several source shards queued for one destination shard, with one
    /// proposal on its leader, here or one hop away: one answer per batch, in order, either the
    /// position it is stored up to or why that batch alone was refused.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed call (no batch, too many events, another destination,
    /// a source twice); `UNAVAILABLE` when the shard has no leader.
    pub async fn forward_batches(
        &self,
        request: ForwardBatchesRequest,
        already_forwarded: bool,
    ) -> Result<Vec<Result<u64, ApiError>>, ApiError> {
        let shard_count = self.shard_count_or_unavailable()?;
        let dest = ShardId::from_wire(request.dest_shard, shard_count)?;
        let sources = check_group(&request, shard_count)?;
        let handle = match self.route(dest).await? {
            Route::Local(handle) => handle,
            Route::Remote { addr, leader } if !already_forwarded => {
                return self.forward_batches_to(&addr, request, leader).await;
            }
            Route::Remote { leader, .. } => return Err(moved(dest, leader)),
        };
        let batches = sources.into_iter().zip(request.batches).collect();
        self.store_batches(&handle, dest, batches).await
    }

    fn shard_count_or_unavailable(&self) -> Result<u16, ApiError> {
        self.groups
            .shard_count()
            .ok_or_else(|| unavailable("the cluster is not initialized".to_owned(), None))
    }

    /// Stores `batches` on `dest`, which this node leads: each batch's new events (past the
    /// destination's inbound watermark of its source) go into one proposal, as far as they fit
    /// it. Answers, per batch, the position stored up to, or the refusal of that batch alone.
    async fn store_batches(
        &self,
        handle: &GroupHandle,
        dest: ShardId,
        batches: Vec<(ShardId, ForwardBatchRequest)>,
    ) -> Result<Vec<Result<u64, ApiError>>, ApiError> {
        let mut answers = Vec::with_capacity(batches.len());
        let mut proposal: Vec<Event> = Vec::new();
        let mut room = Room::default();
        {
            let mut reader = self.db.read(dest);
            let view = reader.view(Projection::Outbox);
            for (source, batch) in batches {
                let applied = outbox::inbound_applied(&view, u32::from(source.get()))
                    .map_err(|e| internal(e.to_string()))?;
                answers.push(plan_batch(batch, source, applied, &mut room).map(
                    |Planned {
                         fresh,
                         stored_up_to,
                     }| {
                        proposal.extend(fresh);
                        stored_up_to
                    },
                ));
            }
        }
        if !proposal.is_empty() {
            let landed: Vec<Option<Vec<u8>>> = proposal
                .iter()
                .map(|event| match &event.kind {
                    // The sender's own copy wakes no device: the sender just sent it.
                    Some(Kind::MessageDelivered(d))
                        if !courier_storage::projection::decode::own_copy(d) =>
                    {
                        Some(d.message_id.clone())
                    }
                    _ => None,
                })
                .collect();
            let outcomes = handle
                .proposer
                .propose(proposal)
                .instrument(tracing::info_span!("raft.commit", shard = %dest))
                .await
                .map_err(propose_error)?;
            for (outcome, message_id) in outcomes.iter().zip(landed) {
                if let (
                    EventOutcome::Stored {
                        user,
                        duplicate: false,
                        ..
                    },
                    Some(message_id),
                ) = (outcome, message_id)
                {
                    self.push_if_offline(*user, message_id);
                }
            }
        }
        // Every answered batch is now committed here up to its answer (its new events just now,
        // the rest earlier).
        Ok(answers)
    }

    async fn forward_to(
        &self,
        addr: &str,
        request: ForwardBatchRequest,
        leader: Option<NodeId>,
    ) -> Result<ForwardBatchResponse, ApiError> {
        let mut client = self
            .peers
            .forward(addr)
            .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
        client
            .forward_batch(self.peers.forwarded(request))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                unavailable(
                    format!("leader {leader:?} at {addr}: {}", status.message()),
                    leader,
                )
            })
    }

    /// Hands a grouped forward to the destination leader's node; a node that does not serve
    /// `ForwardBatches` (an older version, `UNIMPLEMENTED`) is sent the batches one at a time.
    async fn forward_batches_to(
        &self,
        addr: &str,
        request: ForwardBatchesRequest,
        leader: Option<NodeId>,
    ) -> Result<Vec<Result<u64, ApiError>>, ApiError> {
        let mut client = self
            .peers
            .forward(addr)
            .ok_or_else(|| unavailable(format!("bad leader address {addr}"), leader))?;
        let count = request.batches.len();
        match client
            .forward_batches(self.peers.forwarded(request.clone()))
            .await
        {
            Ok(response) => {
                let outcomes = response.into_inner().outcomes;
                if outcomes.len() != count {
                    return Err(internal(format!(
                        "leader {leader:?} at {addr} answered {} of {count} batches",
                        outcomes.len()
                    )));
                }
                Ok(outcomes.into_iter().map(outcome_from_wire).collect())
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                let mut answers = Vec::with_capacity(count);
                for batch in request.batches {
                    answers.push(
                        self.forward_to(addr, batch, leader)
                            .await
                            .map(|r| r.stored_up_to),
                    );
                }
                Ok(answers)
            }
            Err(status) => Err(unavailable(
                format!("leader {leader:?} at {addr}: {}", status.message()),
                leader,
            )),
        }
    }
}

/// The answer for a batch that reached a node that no longer leads its destination.
fn moved(dest: ShardId, leader: Option<NodeId>) -> ApiError {
    unavailable(format!("{dest} moved its leader; retry"), leader)
}

/// The refusals a batch of a grouped forward may be answered with on its own, as the wire names
/// them; any other is reported as `COURIER:Forward:Refused`.
const BATCH_REFUSALS: [&str; 8] = [
    "COURIER:Forward:Gap",
    "COURIER:Forward:Position",
    "COURIER:Forward:EventKind",
    "COURIER:Forward:BatchSize",
    "COURIER:Wire:Missing",
    "COURIER:Wire:Zero",
    "COURIER:Wire:TooLong",
    "COURIER:Wire:Malformed",
];

/// One batch's answer as a grouped forward sends it.
#[must_use]
pub(crate) fn outcome_to_wire(answer: Result<u64, ApiError>) -> ForwardBatchOutcome {
    match answer {
        Ok(stored_up_to) => ForwardBatchOutcome {
            stored_up_to,
            ..ForwardBatchOutcome::default()
        },
        Err(error) => ForwardBatchOutcome {
            stored_up_to: 0,
            refused: error.code().to_owned(),
            detail: error.to_string(),
        },
    }
}

fn outcome_from_wire(outcome: ForwardBatchOutcome) -> Result<u64, ApiError> {
    if outcome.refused.is_empty() {
        return Ok(outcome.stored_up_to);
    }
    let code = BATCH_REFUSALS
        .into_iter()
        .find(|known| *known == outcome.refused)
        .unwrap_or("COURIER:Forward:Refused");
    Err(invalid(code, outcome.detail))
}

/// Checks a grouped forward's shape: at least one batch, at most [`FORWARD_BATCH_EVENTS_MAX`]
/// events in all, every batch for the call's destination and well-shaped, no source twice.
/// Answers the batches' source shards.
fn check_group(
    request: &ForwardBatchesRequest,
    shard_count: u16,
) -> Result<Vec<ShardId>, ApiError> {
    let events: usize = request.batches.iter().map(|b| b.events.len()).sum();
    if request.batches.is_empty() || events > FORWARD_BATCH_EVENTS_MAX {
        return Err(invalid(
            "COURIER:Forward:BatchSize",
            format!(
                "a grouped forward holds 1 batch or more and at most {FORWARD_BATCH_EVENTS_MAX} events, got {} batches of {events}",
                request.batches.len()
            ),
        ));
    }
    let mut sources = Vec::with_capacity(request.batches.len());
    for batch in &request.batches {
        if batch.dest_shard != request.dest_shard {
            return Err(invalid(
                "COURIER:Forward:Destination",
                format!(
                    "a batch for shard {} in a call for shard {}",
                    batch.dest_shard, request.dest_shard
                ),
            ));
        }
        let source = ShardId::from_wire(batch.source_shard, shard_count)?;
        if sources.contains(&source) {
            return Err(invalid(
                "COURIER:Forward:SourceTwice",
                format!("two batches from {source} in one call"),
            ));
        }
        check_shape(batch)?;
        sources.push(source);
    }
    Ok(sources)
}

/// What one batch adds to the destination's proposal, and the position it is then stored up to.
#[derive(Debug)]
struct Planned {
    fresh: Vec<Event>,
    stored_up_to: u64,
}

/// Checks one batch against its source's inbound watermark `applied` on the destination and
/// takes its new events, as many as still fit the proposal (`room`). Stamped, a batch may no
/// longer fit (a source cutting at the whole proposal size, as before `FORWARD_STAMP_BYTES_MAX`),
/// and the batches before it in the call take room too: the prefix that fits is stored and
/// answered, so the pair moves on instead of being refused on every retry.
fn plan_batch(
    batch: ForwardBatchRequest,
    source: ShardId,
    applied: u64,
    room: &mut Room,
) -> Result<Planned, ApiError> {
    let ForwardBatchRequest {
        first_pos,
        events,
        dest_shard,
        ..
    } = batch;
    let events = validate_events(events, first_pos, source)?;
    let last = first_pos
        .saturating_add(u64::try_from(events.len()).unwrap_or(u64::MAX))
        .saturating_sub(1);
    if applied.saturating_add(1) < first_pos {
        return Err(invalid(
            "COURIER:Forward:Gap",
            format!(
                "shard {dest_shard} applied up to {applied} from {source}; the batch starts at {first_pos}"
            ),
        ));
    }
    let mut fresh: Vec<Event> = events
        .into_iter()
        .zip(first_pos..)
        .filter(|(_, pos)| *pos > applied)
        .map(|(event, _)| event)
        .collect();
    let kept = room.take(&fresh);
    fresh.truncate(kept);
    // The first new position less one is the watermark (or the batch's start less one); with
    // nothing new, the whole batch was stored before.
    let stored_up_to = first_pos
        .max(applied.saturating_add(1))
        .saturating_sub(1)
        .saturating_add(u64::try_from(kept).unwrap_or(u64::MAX))
        .min(last);
    Ok(Planned {
        fresh,
        stored_up_to,
    })
}

/// Checks a forwarded batch's shape: within the batch limit, positions from 1.
fn check_shape(request: &ForwardBatchRequest) -> Result<(), ApiError> {
    if request.events.is_empty() || request.events.len() > FORWARD_BATCH_EVENTS_MAX {
        return Err(invalid(
            "COURIER:Forward:BatchSize",
            format!(
                "a batch holds 1..={FORWARD_BATCH_EVENTS_MAX} events, got {}",
                request.events.len()
            ),
        ));
    }
    if request.first_pos == 0 {
        return Err(invalid(
            "COURIER:Forward:Position",
            "positions start at 1".to_owned(),
        ));
    }
    Ok(())
}

/// The room a destination's one proposal has left as batches are added to it.
#[derive(Default)]
struct Room {
    bytes: usize,
    events: usize,
}

impl Room {
    /// How many of `events`, from the first, still fit the proposal ([`PROPOSAL_BYTES_MAX`]), now
    /// taken. The proposal's first event always fits (`MESSAGE_CONTENT_BYTES_MAX`).
    fn take(&mut self, events: &[Event]) -> usize {
        let mut kept = 0_usize;
        for event in events {
            let bytes = self
                .bytes
                .saturating_add(prost::Message::encoded_len(event));
            if bytes > PROPOSAL_BYTES_MAX && self.events > 0 {
                break;
            }
            self.bytes = bytes;
            self.events = self.events.saturating_add(1);
            kept = kept.saturating_add(1);
        }
        kept
    }
}

/// Checks a forwarded batch's events on the destination: only deliveries and receipts, from
/// `source`, at consecutive positions starting at `first_pos`; stamps when deliveries were
/// stored.
fn validate_events(
    mut events: Vec<Event>,
    first_pos: u64,
    source: ShardId,
) -> Result<Vec<Event>, ApiError> {
    let now_ms = now_ms();
    for (event, pos) in events.iter_mut().zip(first_pos..) {
        let source_shard = u32::from(source.get());
        match event.kind.as_mut() {
            Some(Kind::MessageDelivered(delivered)) => {
                courier_proto::MessageId::from_wire(&delivered.message_id, "message_id")?;
                courier_proto::UserId::from_wire(delivered.recipient_user, "recipient_user")?;
                if delivered.source_shard != source_shard || delivered.source_pos != pos {
                    return Err(invalid(
                        "COURIER:Forward:Position",
                        format!("event at {pos} names another position"),
                    ));
                }
                if delivered.stored_at_ms == 0 {
                    // The destination leader decides when the message was stored.
                    delivered.stored_at_ms = now_ms;
                }
            }
            Some(Kind::ReceiptRecorded(receipt)) => {
                courier_proto::MessageId::from_wire(&receipt.message_id, "message_id")?;
                if receipt.source_shard != source_shard || receipt.source_pos != pos {
                    return Err(invalid(
                        "COURIER:Forward:Position",
                        format!("event at {pos} names another position"),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "COURIER:Forward:EventKind",
                    "only MessageDelivered and ReceiptRecorded are forwarded".to_owned(),
                ));
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(body_bytes: usize) -> Event {
        crate::forwarder::tests::stamped(crate::forwarder::tests::delivered(body_bytes))
    }

    fn fitting_prefix(events: &[Event]) -> usize {
        Room::default().take(events)
    }

    #[test]
    fn a_stamped_batch_is_stored_up_to_the_prefix_that_fits_one_proposal() {
        let one = prost::Message::encoded_len(&delivered(1000));
        let fit = PROPOSAL_BYTES_MAX / one;
        let events: Vec<Event> = (0..fit + 3).map(|_| delivered(1000)).collect();
        assert_eq!(fitting_prefix(&events), fit);
        assert_eq!(fitting_prefix(&events[..fit]), fit, "all when they fit");
        assert_eq!(fitting_prefix(&[]), 0);
        let huge = [delivered(PROPOSAL_BYTES_MAX), delivered(10)];
        assert_eq!(fitting_prefix(&huge), 1, "never fewer than one event");
        // A later batch of the same call gets what room is left, and none once it is full.
        let mut room = Room::default();
        assert_eq!(room.take(&events[..fit - 2]), fit - 2);
        assert_eq!(room.take(&events), 2);
        assert_eq!(
            room.take(&events[..1]),
            0,
            "no event beyond a full proposal"
        );
    }

    /// A batch from `source` of `count` deliveries at positions from `first_pos`, as queued.
    fn batch(source: u16, first_pos: u64, count: u64, body_bytes: usize) -> ForwardBatchRequest {
        let events = (first_pos..first_pos + count)
            .map(|pos| {
                let mut event = crate::forwarder::tests::delivered(body_bytes);
                if let Some(Kind::MessageDelivered(d)) = event.kind.as_mut() {
                    d.source_shard = u32::from(source);
                    d.source_pos = pos;
                    d.recipient_user = 9;
                    d.message_id = [&[1_u8], &pos.to_be_bytes()[..], &[0_u8; 7]].concat();
                }
                event
            })
            .collect();
        ForwardBatchRequest {
            source_shard: u32::from(source),
            dest_shard: 7,
            first_pos,
            events,
        }
    }

    fn positions(planned: &Planned) -> Vec<u64> {
        planned
            .fresh
            .iter()
            .filter_map(|event| match &event.kind {
                Some(Kind::MessageDelivered(d)) => Some(d.source_pos),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_batch_stores_what_is_past_its_sources_watermark() {
        let mut room = Room::default();
        let source = ShardId::new(2);
        // Positions 5..=9, the destination applied up to 6 from this source.
        let planned = plan_batch(batch(2, 5, 5, 10), source, 6, &mut room).unwrap();
        assert_eq!(positions(&planned), [7, 8, 9]);
        assert_eq!(planned.stored_up_to, 9);
        // All of it stored before: nothing proposed, answered up to its last position.
        let again = plan_batch(batch(2, 5, 5, 10), source, 20, &mut room).unwrap();
        assert!(again.fresh.is_empty());
        assert_eq!(again.stored_up_to, 9);
        // A batch past the watermark's next position is refused, and takes no room.
        let taken = room.events;
        let gap = plan_batch(batch(2, 8, 2, 10), source, 6, &mut room);
        assert!(
            matches!(
                gap,
                Err(ApiError::Invalid {
                    code: "COURIER:Forward:Gap",
                    ..
                })
            ),
            "{gap:?}"
        );
        assert_eq!(room.events, taken);
    }

    #[test]
    fn a_later_batch_of_a_call_is_stored_up_to_the_room_the_earlier_ones_left() {
        // Positions of one varint length, so that every stamped event has one size.
        const AT: u64 = 1 << 20;
        let mut scratch = Room::default();
        let probe = plan_batch(batch(0, AT, 1, 1000), ShardId::new(0), AT - 1, &mut scratch);
        let one = prost::Message::encoded_len(&probe.unwrap().fresh[0]);
        let fit = PROPOSAL_BYTES_MAX / one;
        let count = (fit - 3) as u64;
        let mut room = Room::default();
        let first = plan_batch(
            batch(0, AT, count, 1000),
            ShardId::new(0),
            AT - 1,
            &mut room,
        );
        assert_eq!(first.unwrap().stored_up_to, AT + count - 1);
        // Ten more from another source from AT + 41 on: three fit.
        let second = plan_batch(
            batch(1, AT + 41, 10, 1000),
            ShardId::new(1),
            AT + 40,
            &mut room,
        );
        let second = second.unwrap();
        assert_eq!(positions(&second), [AT + 41, AT + 42, AT + 43]);
        assert_eq!(second.stored_up_to, AT + 43);
        // A third finds no room: nothing stored, answered up to its source's watermark.
        let third = plan_batch(
            batch(3, AT + 11, 5, 1000),
            ShardId::new(3),
            AT + 10,
            &mut room,
        );
        let third = third.unwrap();
        assert!(third.fresh.is_empty());
        assert_eq!(third.stored_up_to, AT + 10);
    }

    #[test]
    fn a_grouped_forward_is_checked_whole() {
        let group = |batches: Vec<ForwardBatchRequest>| ForwardBatchesRequest {
            dest_shard: 7,
            batches,
        };
        let code = |request: &ForwardBatchesRequest| match check_group(request, 8) {
            Ok(sources) => format!("ok {}", sources.len()),
            Err(ApiError::Invalid { code, .. }) => code.to_owned(),
            Err(other) => format!("{other:?}"),
        };
        assert_eq!(
            code(&group(vec![batch(0, 1, 2, 10), batch(1, 1, 2, 10)])),
            "ok 2"
        );
        assert_eq!(code(&group(vec![])), "COURIER:Forward:BatchSize");
        let too_many = FORWARD_BATCH_EVENTS_MAX as u64 / 2 + 1;
        assert_eq!(
            code(&group(vec![
                batch(0, 1, too_many, 10),
                batch(1, 1, too_many, 10)
            ])),
            "COURIER:Forward:BatchSize"
        );
        assert_eq!(
            code(&group(vec![batch(0, 1, 2, 10), batch(0, 3, 2, 10)])),
            "COURIER:Forward:SourceTwice"
        );
        let mut elsewhere = batch(1, 1, 2, 10);
        elsewhere.dest_shard = 6;
        assert_eq!(
            code(&group(vec![batch(0, 1, 2, 10), elsewhere])),
            "COURIER:Forward:Destination"
        );
    }

    #[test]
    fn a_refusal_crosses_the_wire_with_its_code() {
        let refused = outcome_to_wire(Err(invalid("COURIER:Forward:Gap", "a gap".to_owned())));
        assert_eq!(refused.refused, "COURIER:Forward:Gap");
        let back = outcome_from_wire(refused);
        assert!(
            matches!(back, Err(ApiError::Invalid { code: "COURIER:Forward:Gap", ref message }) if message == "a gap"),
            "{back:?}"
        );
        assert_eq!(outcome_from_wire(outcome_to_wire(Ok(12))).unwrap(), 12);
        let unknown = ForwardBatchOutcome {
            refused: "COURIER:Forward:Later".to_owned(),
            ..ForwardBatchOutcome::default()
        };
        assert!(matches!(
            outcome_from_wire(unknown),
            Err(ApiError::Invalid {
                code: "COURIER:Forward:Refused",
                ..
            })
        ));
    }
}
