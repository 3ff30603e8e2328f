//! Proposal outcomes on the peer wire (the answer of the peer `Propose` RPC).

use courier_consensus::types::{CodeResult, EventOutcome};
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
        EventOutcome::Code(result) => W::Code(code_to_wire(result)),
        EventOutcome::KeyStock(stock) => W::KeyStock(stock),
        EventOutcome::Bundle(bundle) => W::Bundle(bundle),
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
        Some(W::Code(code)) => EventOutcome::Code(code_from_wire(&code)?),
        Some(W::KeyStock(stock)) => EventOutcome::KeyStock(stock),
        Some(W::Bundle(bundle)) => EventOutcome::Bundle(bundle),
        Some(W::Done(_)) => EventOutcome::Done,
        None => {
            return Err(internal(
                "a peer answered an outcome of unknown kind".to_owned(),
            ));
        }
    })
}

fn code_to_wire(result: CodeResult) -> peer::event_outcome::Code {
    let code = |verdict| peer::event_outcome::Code {
        verdict,
        ..Default::default()
    };
    match result {
        CodeResult::Issued => code(1),
        CodeResult::Accepted => code(2),
        CodeResult::Wrong { attempts_left } => peer::event_outcome::Code {
            attempts_left,
            ..code(3)
        },
        CodeResult::NoCode => code(4),
        CodeResult::RateLimited { retry_after_ms } => peer::event_outcome::Code {
            retry_after_ms,
            ..code(5)
        },
        CodeResult::Withdrawn(voided) => peer::event_outcome::Code {
            count: u64::from(voided),
            ..code(6)
        },
        CodeResult::Forgotten(count) => peer::event_outcome::Code { count, ..code(7) },
    }
}

fn code_from_wire(code: &peer::event_outcome::Code) -> Result<CodeResult, ApiError> {
    Ok(match code.verdict {
        1 => CodeResult::Issued,
        2 => CodeResult::Accepted,
        3 => CodeResult::Wrong {
            attempts_left: code.attempts_left,
        },
        4 => CodeResult::NoCode,
        5 => CodeResult::RateLimited {
            retry_after_ms: code.retry_after_ms,
        },
        6 => CodeResult::Withdrawn(code.count > 0),
        7 => CodeResult::Forgotten(code.count),
        other => {
            return Err(internal(format!(
                "a peer answered a code outcome of unknown verdict {other}"
            )));
        }
    })
}
