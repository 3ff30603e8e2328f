//! Conversions of the shared event types (conversations, content) and helpers to build them.

use crate::error::WireError;
use crate::limits::{
    MEDIA_URL_BYTES_MAX, MESSAGE_BODY_BYTES_MAX, MIME_TYPE_BYTES_MAX, THUMBNAIL_BYTES_MAX,
};
use crate::pb::events as pb;
use crate::types::{ConversationId, GroupId, UserId};

impl TryFrom<&pb::Conversation> for ConversationId {
    type Error = WireError;

    fn try_from(wire: &pb::Conversation) -> Result<Self, WireError> {
        match wire.with {
            Some(pb::conversation::With::User(user)) => {
                Ok(Self::Direct(UserId::from_wire(user, "conversation.user")?))
            }
            Some(pb::conversation::With::Group(group)) => Ok(Self::Group(GroupId::from_wire(
                group,
                "conversation.group",
            )?)),
            None => Err(WireError::Missing {
                field: "conversation",
            }),
        }
    }
}

impl From<ConversationId> for pb::Conversation {
    fn from(conversation: ConversationId) -> Self {
        let with = match conversation {
            ConversationId::Direct(user) => pb::conversation::With::User(user.get()),
            ConversationId::Group(group) => pb::conversation::With::Group(group.get()),
        };
        Self { with: Some(with) }
    }
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        Err(WireError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

/// Validated message content: a body of at most 64 KiB and/or media with a thumbnail of at most
/// 32 KiB; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidContent(pb::Content);

impl ValidContent {
    /// Returns the wire form, for the event the leader proposes.
    pub fn into_inner(self) -> pb::Content {
        self.0
    }

    /// Returns the stored size in bytes (body plus thumbnail), for metrics and limits.
    pub fn size_bytes(&self) -> usize {
        self.0.body.len()
            + self
                .0
                .media
                .as_ref()
                .map_or(0, |media| media.thumbnail.len())
    }
}

impl TryFrom<Option<pb::Content>> for ValidContent {
    type Error = WireError;

    fn try_from(wire: Option<pb::Content>) -> Result<Self, WireError> {
        let content = wire.ok_or(WireError::Missing { field: "content" })?;
        check_len("content.body", content.body.len(), MESSAGE_BODY_BYTES_MAX)?;
        match &content.media {
            Some(media) => {
                if media.url.is_empty() {
                    return Err(WireError::Missing {
                        field: "content.media.url",
                    });
                }
                check_len("content.media.url", media.url.len(), MEDIA_URL_BYTES_MAX)?;
                check_len(
                    "content.media.thumbnail",
                    media.thumbnail.len(),
                    THUMBNAIL_BYTES_MAX,
                )?;
                check_len(
                    "content.media.mime_type",
                    media.mime_type.len(),
                    MIME_TYPE_BYTES_MAX,
                )?;
            }
            None if content.body.is_empty() => {
                return Err(WireError::Missing {
                    field: "content.body",
                });
            }
            None => {}
        }
        Ok(Self(content))
    }
}
