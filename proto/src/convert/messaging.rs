//! Client messaging requests and device-stream frames.

use crate::convert::events::ValidContent;
use crate::error::WireError;
use crate::limits::{GROUP_MEMBERS_MAX, GROUP_NAME_BYTES_MAX, RECEIPT_LOOKUP_IDS_MAX};
use crate::pb::client as pb;
use crate::types::{ClientMsgId, ConversationId, GroupId, InboxSeq, MessageId, UserId};

/// A validated 1:1 send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendCommand {
    /// The sending device's idempotency key.
    pub client_msg_id: ClientMsgId,
    /// The recipient.
    pub to: UserId,
    /// What the message carries.
    pub content: ValidContent,
}

impl TryFrom<pb::SendRequest> for SendCommand {
    type Error = WireError;

    fn try_from(wire: pb::SendRequest) -> Result<Self, WireError> {
        Ok(Self {
            client_msg_id: ClientMsgId::from_wire(wire.client_msg_id, "client_msg_id")?,
            to: UserId::from_wire(wire.to_user, "to_user")?,
            content: ValidContent::try_from(wire.content)?,
        })
    }
}

/// A validated group send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSendCommand {
    /// The sending device's idempotency key.
    pub client_msg_id: ClientMsgId,
    /// The group.
    pub group: GroupId,
    /// What the message carries.
    pub content: ValidContent,
}

impl TryFrom<pb::SendToGroupRequest> for GroupSendCommand {
    type Error = WireError;

    fn try_from(wire: pb::SendToGroupRequest) -> Result<Self, WireError> {
        Ok(Self {
            client_msg_id: ClientMsgId::from_wire(wire.client_msg_id, "client_msg_id")?,
            group: GroupId::from_wire(wire.group_id, "group_id")?,
            content: ValidContent::try_from(wire.content)?,
        })
    }
}

/// A validated frame from a device stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamCommand {
    /// Opens the stream after this inbox sequence (zero: from the start).
    Open {
        /// Send everything after this sequence.
        resume_after: InboxSeq,
        /// Hide the user's last-seen time while this stream is open.
        hide_last_seen: bool,
        /// Resume the receipt feed after this position (`None`: from now).
        receipts_after: Option<crate::ReceiptFeedPosition>,
    },
    /// This device received everything up to `up_to`.
    Ack {
        /// Inclusive.
        up_to: InboxSeq,
    },
    /// The user read `conversation` up to inbox sequence `up_to`.
    Read {
        /// Which conversation.
        conversation: ConversationId,
        /// Inclusive; a message of that conversation.
        up_to: InboxSeq,
    },
    /// The user started or stopped typing in `conversation`.
    Typing {
        /// Which conversation.
        conversation: ConversationId,
        /// Started (`true`) or stopped.
        typing: bool,
    },
}

impl TryFrom<pb::ClientFrame> for StreamCommand {
    type Error = WireError;

    fn try_from(wire: pb::ClientFrame) -> Result<Self, WireError> {
        let conversation = |c: Option<crate::pb::events::Conversation>| {
            ConversationId::try_from(&c.ok_or(WireError::Missing {
                field: "conversation",
            })?)
        };
        match wire.frame.ok_or(WireError::Missing { field: "frame" })? {
            pb::client_frame::Frame::Open(open) => {
                let receipts_after = if !open.receipts_after_position.is_empty() {
                    Some(crate::ReceiptFeedPosition::from_wire(
                        &open.receipts_after_position,
                        "open.receipts_after_position",
                    )?)
                } else if open.receipts_after_index > 0 {
                    Some(crate::ReceiptFeedPosition::after_entry(
                        crate::LogIndex::new(open.receipts_after_index),
                    ))
                } else {
                    None
                };
                Ok(Self::Open {
                    resume_after: InboxSeq::new(open.resume_after_seq),
                    hide_last_seen: open.hide_last_seen,
                    receipts_after,
                })
            }
            pb::client_frame::Frame::Ack(ack) => {
                if ack.up_to_seq == 0 {
                    return Err(WireError::Zero {
                        field: "ack.up_to_seq",
                    });
                }
                Ok(Self::Ack {
                    up_to: InboxSeq::new(ack.up_to_seq),
                })
            }
            pb::client_frame::Frame::Read(read) => {
                if read.up_to_seq == 0 {
                    return Err(WireError::Zero {
                        field: "read.up_to_seq",
                    });
                }
                Ok(Self::Read {
                    conversation: conversation(read.conversation)?,
                    up_to: InboxSeq::new(read.up_to_seq),
                })
            }
            pb::client_frame::Frame::Typing(typing) => Ok(Self::Typing {
                conversation: conversation(typing.conversation)?,
                typing: typing.typing,
            }),
        }
    }
}

/// A page size: `0` is `default`; above `max` is refused.
fn page_limit(limit: u32, default: u32, max: u32) -> Result<usize, WireError> {
    let limit = if limit == 0 { default } else { limit };
    if limit > max {
        return Err(WireError::OutOfRange {
            field: "limit",
            value: u64::from(limit),
            min: 0,
            max: u64::from(max),
        });
    }
    Ok(usize::try_from(limit).unwrap_or(usize::MAX))
}

/// A validated `ListConversations` page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationsPage {
    /// Conversations on the page at most.
    pub limit: usize,
    /// The page starts after this conversation (`None`: the first page).
    pub after: Option<ConversationId>,
}

impl TryFrom<pb::ListConversationsRequest> for ConversationsPage {
    type Error = WireError;

    fn try_from(wire: pb::ListConversationsRequest) -> Result<Self, WireError> {
        use crate::limits::{CONVERSATIONS_PAGE_DEFAULT, CONVERSATIONS_PAGE_MAX};
        Ok(Self {
            limit: page_limit(
                wire.limit,
                CONVERSATIONS_PAGE_DEFAULT,
                CONVERSATIONS_PAGE_MAX,
            )?,
            after: wire
                .after
                .as_ref()
                .map(ConversationId::try_from)
                .transpose()?,
        })
    }
}

/// A validated `ListGroups` page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupsPage {
    /// Groups on the page at most.
    pub limit: usize,
    /// The page starts after this group id (`None`: the first page).
    pub after: Option<GroupId>,
}

impl TryFrom<pb::ListGroupsRequest> for GroupsPage {
    type Error = WireError;

    fn try_from(wire: pb::ListGroupsRequest) -> Result<Self, WireError> {
        use crate::limits::{GROUPS_PAGE_DEFAULT, GROUPS_PAGE_MAX};
        Ok(Self {
            limit: page_limit(wire.limit, GROUPS_PAGE_DEFAULT, GROUPS_PAGE_MAX)?,
            after: GroupId::new(wire.after_group_id),
        })
    }
}

/// Validates a receipts lookup: 1..=256 message ids of 16 bytes each.
///
/// # Errors
/// [`WireError`] for an empty or oversize list or a malformed id.
pub fn receipt_lookup(wire: pb::GetReceiptsRequest) -> Result<Vec<MessageId>, WireError> {
    if wire.message_ids.is_empty() {
        return Err(WireError::Missing {
            field: "message_ids",
        });
    }
    if wire.message_ids.len() > RECEIPT_LOOKUP_IDS_MAX {
        return Err(WireError::TooLong {
            field: "message_ids",
            len: wire.message_ids.len(),
            max: RECEIPT_LOOKUP_IDS_MAX,
        });
    }
    wire.message_ids
        .iter()
        .map(|id| MessageId::from_wire(id, "message_ids"))
        .collect()
}

/// A validated group creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateGroupCommand {
    /// Display name, 1..=128 bytes.
    pub name: String,
    /// Initial members besides the creator, without duplicates.
    pub members: Vec<UserId>,
}

impl TryFrom<pb::CreateGroupRequest> for CreateGroupCommand {
    type Error = WireError;

    fn try_from(wire: pb::CreateGroupRequest) -> Result<Self, WireError> {
        if wire.name.is_empty() {
            return Err(WireError::Missing { field: "name" });
        }
        if wire.name.len() > GROUP_NAME_BYTES_MAX {
            return Err(WireError::TooLong {
                field: "name",
                len: wire.name.len(),
                max: GROUP_NAME_BYTES_MAX,
            });
        }
        // A list longer than any group can hold is refused before it is decoded into ids. A list
        // of exactly the protocol maximum passes: with the creator it is one member too many for
        // the node's `limits.group-members-max` check, which answers `Group:Full` as documented
        // (this answered `TooLong` for it before, so one condition had two codes).
        let max = usize::try_from(GROUP_MEMBERS_MAX).unwrap_or(usize::MAX);
        if wire.members.len() > max {
            return Err(WireError::TooLong {
                field: "members",
                len: wire.members.len(),
                max,
            });
        }
        let mut members = wire
            .members
            .into_iter()
            .map(|user| UserId::from_wire(user, "members"))
            .collect::<Result<Vec<_>, _>>()?;
        members.sort_unstable();
        members.dedup();
        Ok(Self {
            name: wire.name,
            members,
        })
    }
}

/// A validated membership change of one user in one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipCommand {
    /// The group.
    pub group: GroupId,
    /// The member added or removed.
    pub user: UserId,
}

impl TryFrom<pb::AddMemberRequest> for MembershipCommand {
    type Error = WireError;

    fn try_from(wire: pb::AddMemberRequest) -> Result<Self, WireError> {
        Ok(Self {
            group: GroupId::from_wire(wire.group_id, "group_id")?,
            user: UserId::from_wire(wire.user_id, "user_id")?,
        })
    }
}

impl TryFrom<pb::RemoveMemberRequest> for MembershipCommand {
    type Error = WireError;

    fn try_from(wire: pb::RemoveMemberRequest) -> Result<Self, WireError> {
        Ok(Self {
            group: GroupId::from_wire(wire.group_id, "group_id")?,
            user: UserId::from_wire(wire.user_id, "user_id")?,
        })
    }
}
