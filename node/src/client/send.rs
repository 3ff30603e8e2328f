//! The one send path: `Send` and `SendToGroup` both propose one `MessageSent` on the shard that
//! stores it (the sender's, or the group's) through `ClientApi::propose_send`, and read its
//! outcome the same way. What differs stays with the caller: a 1:1 send checks its recipient and
//! may wake them, a group send retries when the membership epoch moved under it.

use courier_consensus::types::EventOutcome;
use courier_proto::ShardId;
use courier_proto::pb::client::SendResponse;
use courier_proto::pb::events::{Event, MessageSent, event::Kind};

use super::ClientApi;
use crate::status::ApiError;

/// How the shard's leader answered one proposed send.
#[derive(Debug)]
pub(crate) enum Proposed {
    /// Stored, or a retry answered with the first result (`duplicate`).
    Sent(SendResponse),
    /// Refused at apply: nothing changed.
    Rejected {
        /// The stable refusal code.
        code: String,
        /// Why, for people.
        message: String,
    },
}

impl ClientApi {
    /// Proposes the client send `sent` on `shard` and waits until it applied.
    ///
    /// # Errors
    /// `UNAVAILABLE` (no leader; the client retries with the same client message id) and any
    /// other proposal failure; `INTERNAL` for an outcome a send cannot have.
    pub(crate) async fn propose_send(
        &self,
        shard: ShardId,
        sent: MessageSent,
    ) -> Result<Proposed, ApiError> {
        let outcomes = self
            .cluster
            .propose(
                shard,
                vec![Event {
                    kind: Some(Kind::MessageSent(sent)),
                }],
            )
            .await?;
        match outcomes.into_iter().next() {
            Some(EventOutcome::Sent {
                message_id,
                sent_at_ms,
                duplicate,
                ..
            }) => Ok(Proposed::Sent(SendResponse {
                message_id,
                sent_at_ms,
                duplicate,
            })),
            Some(EventOutcome::Rejected { code, message }) => {
                Ok(Proposed::Rejected { code, message })
            }
            other => Err(unexpected(other.as_ref())),
        }
    }
}

/// An outcome a send cannot have, as an error.
pub(crate) fn unexpected(outcome: Option<&EventOutcome>) -> ApiError {
    ApiError::Internal {
        code: "COURIER:Node:Outcome",
        message: format!("unexpected outcome {outcome:?}"),
    }
}
