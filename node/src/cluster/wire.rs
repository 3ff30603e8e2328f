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

/// A refusal of one proposal of a peer `ProposeMany` in its wire form: the status a unary
/// `Propose` would have answered, with its ASCII metadata (courier's code, retry hint, leader).
pub fn status_to_wire(status: &tonic::Status) -> peer::PeerStatus {
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    peer::PeerStatus {
        code: i32::from(status.code()),
        message: status.message().to_owned(),
        metadata,
    }
}

/// The status a [`status_to_wire`] refusal stands for; metadata that is not valid ASCII
/// metadata is left out.
pub(super) fn status_from_wire(wire: peer::PeerStatus) -> tonic::Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (key, value) in wire.metadata {
        if let (Ok(key), Ok(value)) = (
            key.parse::<tonic::metadata::AsciiMetadataKey>(),
            value.parse::<tonic::metadata::AsciiMetadataValue>(),
        ) {
            metadata.insert(key, value);
        }
    }
    tonic::Status::with_metadata(tonic::Code::from(wire.code), wire.message, metadata)
}

#[cfg(test)]
mod tests {
    use super::{status_from_wire, status_to_wire};

    /// A refusal crosses `ProposeMany` as the status a unary call carries: code, message and the
    /// ASCII metadata the caller maps (courier's code, retry hint, leader); binary metadata,
    /// which courier never sets on refusals, stays behind.
    #[test]
    fn a_refusal_crosses_the_wire_as_the_status_it_was() {
        let mut status = tonic::Status::unavailable("shard 3 is overloaded; retry");
        let metadata = status.metadata_mut();
        metadata.insert("courier-code", "COURIER:Shard:Overloaded".parse().unwrap());
        metadata.insert("retry-after-ms", "250".parse().unwrap());
        metadata.insert("leader-node", "2".parse().unwrap());
        metadata.insert_bin(
            "trace-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\0\x01"),
        );
        let back = status_from_wire(status_to_wire(&status));
        assert_eq!(back.code(), tonic::Code::Unavailable);
        assert_eq!(back.message(), "shard 3 is overloaded; retry");
        for key in ["courier-code", "retry-after-ms", "leader-node"] {
            assert_eq!(
                back.metadata().get(key),
                status.metadata().get(key),
                "{key}"
            );
        }
        assert!(back.metadata().get_bin("trace-bin").is_none());
        let mapped = crate::status::ApiError::passed_on_from_leader(&back);
        assert!(
            matches!(
                mapped,
                Some(crate::status::ApiError::Unavailable {
                    code: "COURIER:Shard:Overloaded",
                    retry_after_ms: 250,
                    leader: Some(2),
                    ..
                })
            ),
            "{mapped:?}"
        );
    }
}
