//! Sending 1:1 messages, receipt lookups and the conversation list.

use courier_consensus::types::EventOutcome;
use courier_proto::convert::messaging::{ConversationsPage, SendCommand, receipt_lookup};
use courier_proto::pb::client::{
    ConversationSummary, GetPresenceRequest, GetPresenceResponse, GetReceiptsRequest,
    GetReceiptsResponse, ListConversationsRequest, ListConversationsResponse, MessageReceipts,
    ReceiptUpdate, SendRequest, SendResponse,
};
use courier_proto::pb::events;
use courier_proto::{ConversationId, GroupId, UserId};
use courier_storage::projection::{devices, readstate, receipts};

use super::send::{Proposed, unexpected};
use super::{ClientApi, auth::Caller, now_ms};
use crate::bugs;
use crate::status::ApiError;

impl ClientApi {
    /// `Send`: stores the message on a quorum of the sender's shard and answers "sent".
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` (malformed, over a configured limit), `NOT_FOUND` (unknown recipient;
    /// past `limits.unknown-recipients-per-hour-per-device` such answers, `RESOURCE_EXHAUSTED`
    /// instead), `UNAVAILABLE` (no leader; retry with the same client message id).
    pub async fn send(
        &self,
        caller: Caller,
        request: SendRequest,
    ) -> Result<SendResponse, ApiError> {
        let command = SendCommand::try_from(request)?;
        let content = self.admit_send(caller, command.content)?;
        let recipient_shard = self.shard_of(command.to)?;
        let epoch = self.cluster.groups().watch().devices_epoch();
        // The epoch moves only with what this node applies: no cache for a shard held elsewhere.
        let cacheable = self.cluster.holds(recipient_shard);
        let known = (cacheable && self.device_cache.recipient_known(command.to, epoch)) || {
            let registered = self
                .read(recipient_shard, |view| {
                    devices::devices_registered(view, command.to)
                })
                .await?
                > 0;
            if registered && cacheable {
                self.device_cache.remember_recipient(command.to, epoch);
            }
            registered
        };
        if !known {
            // Each "no such user" answer costs a token, so that the answer cannot be used to
            // enumerate registered users at the send rate.
            self.limiters
                .unknown_recipient
                .take(&(caller.user.get(), caller.device.get()))?;
            return Err(ApiError::NotFound {
                code: "COURIER:Messaging:UnknownRecipient",
                message: format!("{} is not registered", command.to),
            });
        }
        let mut sent = events::MessageSent {
            message_id: crate::env::uuid_v7().as_bytes().to_vec(),
            sender_user: caller.user.get(),
            sender_device: caller.device.get(),
            client_msg_id: command.client_msg_id.as_str().to_owned(),
            to: Some(ConversationId::Direct(command.to).into()),
            content: Some(content),
            sent_at_ms: now_ms(),
            recipient_shard: u32::from(recipient_shard.get()),
            group_epoch: 0,
            trace_parent: crate::telemetry::current_traceparent(),
            own_copies: true,
        };
        let shard = self.shard_of(caller.user)?;
        if let Some(answer) = bugs::on_send(&self.cluster, shard, &mut sent) {
            return Ok(answer);
        }
        let response = match self.propose_send(shard, sent).await? {
            Proposed::Sent(response) => response,
            Proposed::Rejected { code, message } => {
                return Err(unexpected(Some(&EventOutcome::Rejected { code, message })));
            }
        };
        // A same-shard recipient who is offline is pushed by the shard leader as it commits
        // (`Cluster::propose_via`), without a presence call per send.
        Ok(response)
    }

    /// What every send passes first: the device's rate limit, then the configured size limits.
    /// Returns the content to store.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` (rate), `INVALID_ARGUMENT` (sizes).
    pub(crate) fn admit_send(
        &self,
        caller: Caller,
        content: courier_proto::convert::events::ValidContent,
    ) -> Result<events::Content, ApiError> {
        // Invalid input changes nothing, not even the caller's rate bucket.
        let content = content.into_inner();
        self.check_content_limits(&content)?;
        self.limiters
            .send
            .take(&(caller.user.get(), caller.device.get()))?;
        Ok(content)
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

    /// `GetReceipts`: the caller's own messages only (others' ids come back empty); with
    /// `group_id`, messages the caller sent to that group. `overall` is the least advanced
    /// recipient's state.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed lookup.
    pub async fn get_receipts(
        &self,
        caller: Caller,
        request: GetReceiptsRequest,
    ) -> Result<GetReceiptsResponse, ApiError> {
        let group = request.group_id;
        let ids = receipt_lookup(request)?;
        // A group message's receipts live on the group's shard, one per member it was sent to.
        let shard = match group {
            0 => self.shard_of(caller.user)?,
            raw => courier_proto::shard_of_group(
                GroupId::from_wire(raw, "group_id")?,
                self.shard_count()?,
            ),
        };
        let receipts = self
            .read(shard, |view| {
                ids.iter()
                    .map(|id| {
                        let recipients: Vec<ReceiptUpdate> =
                            receipts::of_message(view, caller.user, *id)?
                                .into_iter()
                                .map(|(recipient, receipt)| ReceiptUpdate {
                                    message_id: id.as_bytes().to_vec(),
                                    recipient_user: recipient.get(),
                                    state: receipt.state,
                                    at_ms: receipt.at_ms,
                                    feed_index: 0,
                                    feed_position: Vec::new(),
                                })
                                .collect();
                        let overall = recipients.iter().map(|r| r.state).min().unwrap_or(0);
                        Ok(MessageReceipts {
                            message_id: id.as_bytes().to_vec(),
                            recipients,
                            overall,
                        })
                    })
                    .collect::<courier_storage::Result<Vec<_>>>()
            })
            .await?;
        Ok(GetReceiptsResponse { receipts })
    }

    /// `ListConversations`: one page of the caller's conversations with exact unread counts.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a page limit above 10,000 or a malformed `after`; storage faults.
    pub async fn list_conversations(
        &self,
        caller: Caller,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, ApiError> {
        let page = ConversationsPage::try_from(request)?;
        let shard = self.shard_of(caller.user)?;
        let (conversations, more) = self
            .read(shard, |view| {
                readstate::conversations(view, caller.user, page.after, page.limit)
            })
            .await?;
        Ok(ListConversationsResponse {
            more,
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

impl ClientApi {
    /// Whether `user` received anything from `from` in their 1:1 conversation.
    pub(super) async fn received(&self, user: UserId, from: UserId) -> Result<bool, ApiError> {
        self.read(self.shard_of(user)?, |view| {
            Ok(readstate::get(view, user, ConversationId::Direct(from))?.count > 0)
        })
        .await
    }

    /// Whether `caller` may see `other`'s presence: one received a 1:1 message from the other,
    /// or both are members of one group (`caller_groups`: the caller's groups, read once per
    /// request). Read on this node's replicas.
    ///
    /// # Errors
    /// A storage fault.
    async fn shares_with(
        &self,
        caller: UserId,
        other: UserId,
        caller_groups: &mut Option<Vec<GroupId>>,
    ) -> Result<bool, ApiError> {
        use courier_storage::projection::groups;
        if caller == other {
            return Ok(true);
        }
        if self.received(caller, other).await? || self.received(other, caller).await? {
            return Ok(true);
        }
        if caller_groups.is_none() {
            let mut ids = Vec::new();
            for shard in 0..self.shard_count()? {
                ids.extend(
                    self.read(courier_proto::ShardId::new(shard), |view| {
                        groups::groups_of(view, caller)
                    })
                    .await?,
                );
            }
            *caller_groups = Some(ids);
        }
        for group in caller_groups.iter().flatten() {
            let shard = self.group_shard(*group)?;
            if self
                .read(shard, |view| groups::member(view, *group, other))
                .await?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `GetPresence`: each user's online state and last seen, from their shard leaders, for the
    /// users who share a 1:1 conversation or a group with the caller; the others are left out of
    /// the answer (a stranger's presence is not told).
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` past `limits.presence-lookups-per-second-per-device`;
    /// `INVALID_ARGUMENT` for 0 or more than 100 users or a zero id; `UNAVAILABLE` when a shard
    /// has no leader.
    pub async fn get_presence(
        &self,
        caller: Caller,
        request: GetPresenceRequest,
    ) -> Result<GetPresenceResponse, ApiError> {
        let max = courier_proto::limits::PRESENCE_LOOKUP_USERS_MAX;
        if request.users.is_empty() || request.users.len() > max {
            return Err(ApiError::Wire(courier_proto::WireError::OutOfRange {
                field: "users (count)",
                value: u64::try_from(request.users.len()).unwrap_or(u64::MAX),
                min: 1,
                max: max as u64,
            }));
        }
        let ids = request
            .users
            .iter()
            .map(|&user| UserId::from_wire(user, "users"))
            .collect::<Result<Vec<UserId>, _>>()?;
        // After the shape and id checks: a malformed request costs no token.
        self.limiters
            .presence
            .take(&(caller.user.get(), caller.device.get()))?;
        let mut by_shard: std::collections::BTreeMap<u16, Vec<u64>> =
            std::collections::BTreeMap::new();
        let mut caller_groups = None;
        for id in ids {
            let user = id.get();
            if !self
                .shares_with(caller.user, id, &mut caller_groups)
                .await?
            {
                continue; // a stranger's presence is not answered
            }
            by_shard
                .entry(self.shard_of(id)?.get())
                .or_default()
                .push(user);
        }
        let mut presence = Vec::with_capacity(request.users.len());
        for (shard, users) in by_shard {
            presence.extend(
                self.cluster
                    .presence_exchange(courier_proto::ShardId::new(shard), Vec::new(), users)
                    .await?,
            );
        }
        Ok(GetPresenceResponse { presence })
    }
}
