//! Forwarded batches: deliveries and receipts another shard's forwarder sends, stored on the
//! destination shard's leader. The batch is routed first and checked only where it is stored.

use courier_consensus::groups::GroupHandle;
use courier_consensus::types::{EventOutcome, NodeId};
use courier_proto::ShardId;
use courier_proto::limits::{FORWARD_BATCH_EVENTS_MAX, PROPOSAL_BYTES_MAX};
use courier_proto::pb::events::{Event, event::Kind};
use courier_proto::pb::peer::{ForwardBatchRequest, ForwardBatchResponse};
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
    /// `INVALID_ARGUMENT` for a malformed batch; `UNAVAILABLE` when the shard has no leader, or
    /// when the batch did not commit within `raft.rpc-timeout` (it may still: retry).
    pub async fn forward_batch(
        &self,
        request: ForwardBatchRequest,
        already_forwarded: bool,
    ) -> Result<ForwardBatchResponse, ApiError> {
        let shard_count = self
            .groups
            .shard_count()
            .ok_or_else(|| unavailable("the cluster is not initialized".to_owned(), None))?;
        let dest = ShardId::from_wire(request.dest_shard, shard_count)?;
        let source = ShardId::from_wire(request.source_shard, shard_count)?;
        check_shape(&request)?;
        let handle = match self.route(dest).await? {
            Route::Local(handle) => handle,
            Route::Remote { addr, leader } if !already_forwarded => {
                return self.forward_to(&addr, request, leader).await;
            }
            Route::Remote { leader, .. } => {
                return Err(unavailable(
                    format!("{dest} moved its leader; retry"),
                    leader,
                ));
            }
        };
        let ForwardBatchRequest {
            first_pos, events, ..
        } = request;
        let events = validate_events(events, first_pos, source)?;
        let last = first_pos
            .saturating_add(u64::try_from(events.len()).unwrap_or(u64::MAX))
            .saturating_sub(1);
        let applied = outbox::inbound_applied(
            &self.db.read(dest).view(Projection::Outbox),
            u32::from(source.get()),
        )
        .map_err(|e| internal(e.to_string()))?;
        if applied.saturating_add(1) < first_pos {
            return Err(invalid(
                "COURIER:Forward:Gap",
                format!(
                    "{dest} applied up to {applied} from {source}; the batch starts at {first_pos}"
                ),
            ));
        }
        let mut fresh: Vec<Event> = events
            .into_iter()
            .zip(first_pos..)
            .filter(|(_, pos)| *pos > applied)
            .map(|(event, _)| event)
            .collect();
        // Stamped, the batch may no longer fit one proposal (a source cutting at the whole
        // proposal size, as before `FORWARD_STAMP_BYTES_MAX`): store the prefix that fits and
        // answer up to it, so the pair moves on instead of being refused on every retry.
        let kept = fitting_prefix(&fresh);
        let first_new = first_pos.max(applied.saturating_add(1));
        let mut last = if kept < fresh.len() {
            fresh.truncate(kept);
            first_new
                .saturating_add(u64::try_from(kept).unwrap_or(u64::MAX))
                .saturating_sub(1)
        } else {
            last
        };
        if !fresh.is_empty() {
            let landed: Vec<Option<Vec<u8>>> = fresh
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
            let outcomes = self.commit_forwarded(&handle, dest, fresh, landed).await?;
            let stored = stored_through(first_new, &outcomes);
            if stored < last {
                tracing::error!(
                    %dest,
                    %source,
                    stored,
                    last,
                    "forwarded events refused at apply; answered up to what applied"
                );
                last = stored;
            }
        }
        // Everything up to `last` is now committed here (fresh events just now, the rest earlier).
        Ok(ForwardBatchResponse { stored_up_to: last })
    }

    /// Pushes, to recipients with no live stream, the messages that landed new in their inbox.
    fn push_landed(&self, outcomes: &[EventOutcome], landed: Vec<Option<Vec<u8>>>) {
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

    /// Commits a forwarded batch's new events on `dest`, which this node leads, and pushes the
    /// messages that `landed` new to offline recipients. Waits at most `raft.rpc-timeout`, like
    /// the hop to a leader elsewhere: a leader that lost its quorum keeps leading (openraft 0.9
    /// does not step down), and a forwarder waiting on it would hold one of its pairs' slots
    /// until the partition healed. The commit goes on in its own task past that, and still
    /// pushes what it stored: the retry finds those positions at or below the watermark and
    /// stores (and pushes) nothing again.
    async fn commit_forwarded(
        &self,
        handle: &GroupHandle,
        dest: ShardId,
        fresh: Vec<Event>,
        landed: Vec<Option<Vec<u8>>>,
    ) -> Result<Vec<EventOutcome>, ApiError> {
        let (cluster, proposer) = (self.clone(), handle.proposer.clone());
        let commit = tokio::spawn(
            async move {
                let outcomes = proposer.propose(fresh).await;
                if let Ok(outcomes) = &outcomes {
                    cluster.push_landed(outcomes, landed);
                }
                outcomes
            }
            .instrument(tracing::info_span!("raft.commit", shard = %dest)),
        );
        match tokio::time::timeout(self.rpc_timeout, commit).await {
            Ok(Ok(outcomes)) => outcomes.map_err(propose_error),
            Ok(Err(ended)) => Err(ApiError::task_ended("forward commit", &ended)),
            Err(_) => Err(unavailable(
                format!(
                    "{dest} did not commit the batch within {:?}; retry",
                    self.rpc_timeout
                ),
                None,
            )),
        }
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
                ApiError::passed_on_from_forward(&status).unwrap_or_else(|| {
                    unavailable(
                        format!("leader {leader:?} at {addr}: {}", status.message()),
                        leader,
                    )
                })
            })
    }
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

/// The position a batch is stored up to once its new events, at positions from `first_new` on,
/// came back from apply with `outcomes` (one per event; a missing one counts as not stored):
/// through the last event that applied with every one before it. An event refused at apply is
/// not counted, nor is anything after it, so the source keeps them and sends them again instead
/// of trimming them away. A forward gap leaves the inbound watermark where it was; an event
/// refused as invalid takes its position (`projection::apply_decoded`), so the retry finds it
/// below the watermark and the answer moves past it then, one round later. A gap is unreachable
/// while every batch starts at or below the watermark read before it is proposed and the
/// proposer keeps queue order, also when a batch whose commit outlived its call
/// (`commit_forwarded`) and its retry are in flight together: the retry's positions already
/// stored are duplicates at apply. This answer must stay truthful if either ever changes.
fn stored_through(first_new: u64, outcomes: &[EventOutcome]) -> u64 {
    let applied = outcomes
        .iter()
        .take_while(|outcome| !matches!(outcome, EventOutcome::Rejected { .. }))
        .count();
    first_new
        .saturating_sub(1)
        .saturating_add(u64::try_from(applied).unwrap_or(u64::MAX))
}

/// How many of `events`, from the first, fit one proposal (never fewer than one: one event always
/// fits, `MESSAGE_CONTENT_BYTES_MAX`).
fn fitting_prefix(events: &[Event]) -> usize {
    let mut bytes = 0_usize;
    events
        .iter()
        .position(|event| {
            bytes = bytes.saturating_add(prost::Message::encoded_len(event));
            bytes > PROPOSAL_BYTES_MAX
        })
        .map_or(events.len(), |over| over.max(1))
}

/// Checks a forwarded batch's events on the destination: only deliveries and receipts, from
/// `source`, at consecutive positions starting at `first_pos`, each of which decodes as apply
/// will decode it; stamps when deliveries were stored.
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
        // As apply decodes it: an event that fails there is refused without consuming its
        // position, so every later position of the pair would be refused as a gap for good.
        // Refused here, the batch is answered INVALID_ARGUMENT and nothing enters the log.
        if let Some(kind) = &event.kind {
            courier_storage::projection::decode::decode(kind)
                .map_err(|error| ApiError::Wire(error.source))?;
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

    /// A forwarded event that would not decode at apply is refused before it is proposed (a
    /// delivery to the sender's own conversation with no recipient conversation, say): at apply
    /// it would be refused without consuming its position and stall the pair.
    #[test]
    fn an_event_apply_would_not_decode_is_refused_before_it_is_proposed() {
        let mut event = delivered(16);
        if let Some(Kind::MessageDelivered(delivered)) = event.kind.as_mut() {
            delivered.source_shard = 0;
            delivered.source_pos = 1;
            delivered.conversation = None;
        }
        let decodes = event
            .kind
            .as_ref()
            .is_some_and(|kind| courier_storage::projection::decode::decode(kind).is_ok());
        assert!(!decodes, "the test's event must be one apply refuses");
        let refused = validate_events(vec![event], 1, ShardId::new(0))
            .expect_err("refused before it is proposed");
        assert!(matches!(refused, ApiError::Wire(_)), "{refused:?}");
    }

    #[test]
    fn a_batch_is_answered_only_up_to_what_applied() {
        let stored = EventOutcome::Stored {
            user: 9,
            seq: 1,
            duplicate: false,
        };
        let refused = EventOutcome::Rejected {
            code: "COURIER:Event:Invalid".to_owned(),
            message: "forwarded position 13 from shard 1; the next is 12".to_owned(),
        };
        let all = [
            stored.clone(),
            EventOutcome::DuplicateForward,
            stored.clone(),
        ];
        assert_eq!(stored_through(11, &all), 13, "all applied");
        let gap = [stored.clone(), refused, stored.clone()];
        assert_eq!(
            stored_through(11, &gap),
            11,
            "not the refused one nor after it"
        );
        assert_eq!(
            stored_through(11, &all[..1]),
            11,
            "an unanswered event is not stored"
        );
        assert_eq!(stored_through(1, &[]), 0);
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
    }
}
