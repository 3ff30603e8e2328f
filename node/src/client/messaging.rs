//! Sending 1:1 messages, receipt lookups and the conversation list.

use courier_consensus::types::EventOutcome;
use courier_proto::ConversationId;
use courier_proto::convert::messaging::{SendCommand, receipt_lookup};
use courier_proto::pb::client::{
    ConversationSummary, GetReceiptsRequest, GetReceiptsResponse, ListConversationsResponse,
    MessageReceipts, ReceiptUpdate, SendRequest, SendResponse,
};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_storage::projection::{devices, readstate, receipts};

use super::{ClientApi, auth::Caller, now_ms};
use crate::bugs::{self, Bug};
use crate::status::ApiError;

impl ClientApi {
    /// `Send`: stores the message on a quorum of the sender's shard and answers "sent".
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` (malformed, over a configured limit), `NOT_FOUND` (unknown recipient),
    /// `UNAVAILABLE` (no leader; retry with the same client message id).
    pub async fn send(
        &self,
        caller: Caller,
        request: SendRequest,
    ) -> Result<SendResponse, ApiError> {
        let command = SendCommand::try_from(request)?;
        self.send_limiter
            .take(&(caller.user.get(), caller.device.get()))?;
        let content = command.content.into_inner();
        self.check_content_limits(&content)?;
        let recipient_shard = self.shard_of(command.to)?;
        let known = self.read(recipient_shard, |view| {
            devices::devices_registered(view, command.to)
        })? > 0;
        if !known {
            return Err(ApiError::NotFound {
                code: "COURIER:Messaging:UnknownRecipient",
                message: format!("{} is not registered", command.to),
            });
        }
        let mut sent = events::MessageSent {
            message_id: uuid::Uuid::now_v7().as_bytes().to_vec(),
            sender_user: caller.user.get(),
            sender_device: caller.device.get(),
            client_msg_id: command.client_msg_id.as_str().to_owned(),
            to: Some(ConversationId::Direct(command.to).into()),
            content: Some(content),
            sent_at_ms: now_ms(),
            recipient_shard: u32::from(recipient_shard.get()),
            group_epoch: 0,
        };
        if bugs::active(Bug::SkipDedup) {
            // A fresh idempotency key per attempt: a retry is stored again.
            sent.client_msg_id = format!("{}#{:08x}", sent.client_msg_id, rand::random::<u32>());
        }
        let shard = self.shard_of(caller.user)?;
        if bugs::active(Bug::AckBeforeCommit) {
            let answer = SendResponse {
                message_id: sent.message_id.clone(),
                sent_at_ms: sent.sent_at_ms,
                duplicate: false,
            };
            let cluster = self.cluster.clone();
            let events = vec![Event {
                kind: Some(Kind::MessageSent(sent)),
            }];
            tokio::spawn(async move { cluster.propose(shard, events, false).await });
            return Ok(answer);
        }
        let outcomes = self
            .cluster
            .propose(
                shard,
                vec![Event {
                    kind: Some(Kind::MessageSent(sent)),
                }],
                false,
            )
            .await?;
        match outcomes.first() {
            Some(EventOutcome::Sent {
                message_id,
                sent_at_ms,
                duplicate,
                ..
            }) => Ok(SendResponse {
                message_id: message_id.clone(),
                sent_at_ms: *sent_at_ms,
                duplicate: *duplicate,
            }),
            other => Err(ApiError::Internal {
                code: "COURIER:Node:Outcome",
                message: format!("unexpected outcome {other:?}"),
            }),
        }
    }

    fn check_content_limits(&self, content: &events::Content) -> Result<(), ApiError> {
        let over = |field: &'static str, len: usize, max: usize| {
            ApiError::Wire(courier_proto::WireError::TooLong { field, len, max })
        };
        if content.body.len() > self.limits.message_body_bytes_max {
            return Err(over(
                "content.body",
                content.body.len(),
                self.limits.message_body_bytes_max,
            ));
        }
        if let Some(media) = &content.media
            && media.thumbnail.len() > self.limits.thumbnail_bytes_max
        {
            return Err(over(
                "content.media.thumbnail",
                media.thumbnail.len(),
                self.limits.thumbnail_bytes_max,
            ));
        }
        Ok(())
    }

    /// `GetReceipts`: the caller's own messages only (others' ids come back empty).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed lookup.
    pub fn get_receipts(
        &self,
        caller: Caller,
        request: GetReceiptsRequest,
    ) -> Result<GetReceiptsResponse, ApiError> {
        let ids = receipt_lookup(request)?;
        let shard = self.shard_of(caller.user)?;
        let receipts = self.read(shard, |view| {
            ids.iter()
                .map(|id| {
                    let recipients = receipts::of_message(view, caller.user, *id)?
                        .into_iter()
                        .map(|(recipient, receipt)| ReceiptUpdate {
                            message_id: id.as_bytes().to_vec(),
                            recipient_user: recipient.get(),
                            state: receipt.state,
                            at_ms: receipt.at_ms,
                        })
                        .collect();
                    Ok(MessageReceipts {
                        message_id: id.as_bytes().to_vec(),
                        recipients,
                    })
                })
                .collect::<courier_storage::Result<Vec<_>>>()
        })?;
        Ok(GetReceiptsResponse { receipts })
    }

    /// `ListConversations`: every conversation with exact unread counts.
    ///
    /// # Errors
    /// Storage faults.
    pub fn list_conversations(
        &self,
        caller: Caller,
    ) -> Result<ListConversationsResponse, ApiError> {
        let shard = self.shard_of(caller.user)?;
        let conversations = self.read(shard, |view| readstate::conversations(view, caller.user))?;
        Ok(ListConversationsResponse {
            conversations: conversations
                .into_iter()
                .map(|(conversation, state)| ConversationSummary {
                    conversation: Some(conversation.into()),
                    unread: readstate::unread(&state),
                    last_seq: state.last_seq,
                })
                .collect(),
        })
    }
}
