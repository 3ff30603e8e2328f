//! Proposal outcomes on the peer wire (the answer of the peer `Propose` RPC).

use courier_consensus::types::EventOutcome;
use courier_proto::pb::peer;

use super::internal;
use crate::status::ApiError;

/// An outcome in its wire form (peer `Propose`).
pub fn outcome_to_wire(outcome: EventOutcome) -> peer::EventOutcome {
    use peer::event_outcome::Kind as W;
    let kind = match outcome {
        EventOutcome::Sent {
            message_id,
            sent_at_ms,
            log_index,
            duplicate,
        } => W::Sent(peer::event_outcome::Sent {
            message_id,
            sent_at_ms,
            log_index,
            duplicate,
        }),
        EventOutcome::Stored {
            user,
            seq,
            duplicate,
        } => W::Stored(peer::event_outcome::Stored {
            user,
            seq,
            duplicate,
        }),
        EventOutcome::DuplicateForward => W::DuplicateForward(true),
        EventOutcome::DeviceRegistered { user, device } => {
            W::DeviceRegistered(peer::event_outcome::DeviceRegistered { user, device })
        }
        EventOutcome::Rejected { code, message } => {
            W::Rejected(peer::event_outcome::Rejected { code, message })
        }
        EventOutcome::Done => W::Done(true),
    };
    peer::EventOutcome { kind: Some(kind) }
}

pub(super) fn outcome_from_wire(wire: peer::EventOutcome) -> Result<EventOutcome, ApiError> {
    use peer::event_outcome::Kind as W;
    Ok(match wire.kind {
        Some(W::Sent(s)) => EventOutcome::Sent {
            message_id: s.message_id,
            sent_at_ms: s.sent_at_ms,
            log_index: s.log_index,
            duplicate: s.duplicate,
        },
        Some(W::Stored(s)) => EventOutcome::Stored {
            user: s.user,
            seq: s.seq,
            duplicate: s.duplicate,
        },
        Some(W::DuplicateForward(_)) => EventOutcome::DuplicateForward,
        Some(W::DeviceRegistered(d)) => EventOutcome::DeviceRegistered {
            user: d.user,
            device: d.device,
        },
        Some(W::Rejected(r)) => EventOutcome::Rejected {
            code: r.code,
            message: r.message,
        },
        Some(W::Done(_)) => EventOutcome::Done,
        None => {
            return Err(internal(
                "a peer answered an outcome of unknown kind".to_owned(),
            ));
        }
    })
}
