//! Each rejection of each `TryFrom`, and round trips of events through prost.

use prost::Message as _;

use super::events::ValidContent;
use super::messaging::{CreateGroupCommand, SendCommand, StreamCommand, receipt_lookup};
use super::registration::{PhoneNumber, RegisterCommand};
use crate::error::WireError;
use crate::limits::{
    CLIENT_MSG_ID_BYTES_MAX, MEDIA_URL_BYTES_MAX, MESSAGE_BODY_BYTES_MAX, RECEIPT_LOOKUP_IDS_MAX,
    THUMBNAIL_BYTES_MAX,
};
use crate::pb::{client, events};
use crate::types::{ConversationId, InboxSeq, MessageId, UserId};

fn body(bytes: usize) -> Option<events::Content> {
    Some(events::Content {
        body: vec![7; bytes],
        media: None,
    })
}

fn send(
    client_msg_id: &str,
    to_user: u64,
    content: Option<events::Content>,
) -> client::SendRequest {
    client::SendRequest {
        client_msg_id: client_msg_id.to_owned(),
        to_user,
        content,
    }
}

#[test]
fn send_accepts_a_valid_request() {
    let command = SendCommand::try_from(send("a-1", 9, body(MESSAGE_BODY_BYTES_MAX)))
        .expect("a maximal body is valid");
    assert_eq!(command.to, UserId::new(9).expect("nonzero"));
    assert_eq!(command.client_msg_id.as_str(), "a-1");
    assert_eq!(command.content.size_bytes(), MESSAGE_BODY_BYTES_MAX);
}

#[test]
fn send_rejects_each_bad_field() {
    let long_id = "x".repeat(CLIENT_MSG_ID_BYTES_MAX + 1);
    let cases = [
        (
            send("", 9, body(1)),
            WireError::Missing {
                field: "client_msg_id",
            },
        ),
        (
            send(&long_id, 9, body(1)),
            WireError::TooLong {
                field: "client_msg_id",
                len: CLIENT_MSG_ID_BYTES_MAX + 1,
                max: CLIENT_MSG_ID_BYTES_MAX,
            },
        ),
        (send("a", 0, body(1)), WireError::Zero { field: "to_user" }),
        (send("a", 9, None), WireError::Missing { field: "content" }),
        (
            send("a", 9, body(0)),
            WireError::Missing {
                field: "content.body",
            },
        ),
        (
            send("a", 9, body(MESSAGE_BODY_BYTES_MAX + 1)),
            WireError::TooLong {
                field: "content.body",
                len: MESSAGE_BODY_BYTES_MAX + 1,
                max: MESSAGE_BODY_BYTES_MAX,
            },
        ),
    ];
    for (request, want) in cases {
        assert_eq!(SendCommand::try_from(request), Err(want.clone()), "{want}");
    }
}

#[test]
fn media_limits() {
    let media = |url: &str, thumbnail: usize| {
        Some(events::Content {
            body: Vec::new(),
            media: Some(events::MediaRef {
                url: url.to_owned(),
                thumbnail: vec![1; thumbnail],
                mime_type: "image/jpeg".to_owned(),
                size_bytes: 1 << 20,
            }),
        })
    };
    assert!(ValidContent::try_from(media("https://m/1", THUMBNAIL_BYTES_MAX)).is_ok());
    assert_eq!(
        ValidContent::try_from(media("https://m/1", THUMBNAIL_BYTES_MAX + 1)),
        Err(WireError::TooLong {
            field: "content.media.thumbnail",
            len: THUMBNAIL_BYTES_MAX + 1,
            max: THUMBNAIL_BYTES_MAX
        })
    );
    assert_eq!(
        ValidContent::try_from(media("", 1)),
        Err(WireError::Missing {
            field: "content.media.url"
        })
    );
    let long_url = "u".repeat(MEDIA_URL_BYTES_MAX + 1);
    assert!(matches!(
        ValidContent::try_from(media(&long_url, 1)),
        Err(WireError::TooLong {
            field: "content.media.url",
            ..
        })
    ));
}

#[test]
fn stream_frames() {
    let frame = |frame| client::ClientFrame { frame: Some(frame) };
    assert_eq!(
        StreamCommand::try_from(frame(client::client_frame::Frame::Open(client::Open {
            resume_after_seq: 0,
            hide_last_seen: true,
            receipts_after_index: 9,
            receipts_after_position: Vec::new(),
        }))),
        Ok(StreamCommand::Open {
            resume_after: InboxSeq::ZERO,
            hide_last_seen: true,
            receipts_after: Some(crate::ReceiptFeedPosition::after_entry(
                crate::LogIndex::new(9)
            )),
        })
    );
    let position = crate::ReceiptFeedPosition {
        set_at: crate::LogIndex::new(9),
        message: [7; 16],
        recipient: 42,
    };
    assert_eq!(
        StreamCommand::try_from(frame(client::client_frame::Frame::Open(client::Open {
            resume_after_seq: 3,
            hide_last_seen: false,
            receipts_after_index: 2,
            receipts_after_position: position.to_wire(),
        }))),
        Ok(StreamCommand::Open {
            resume_after: InboxSeq::new(3),
            hide_last_seen: false,
            receipts_after: Some(position),
        }),
        "an exact position takes precedence over the entry index"
    );
    assert!(
        matches!(
            StreamCommand::try_from(frame(client::client_frame::Frame::Open(client::Open {
                resume_after_seq: 0,
                hide_last_seen: false,
                receipts_after_index: 0,
                receipts_after_position: vec![1; 31],
            }))),
            Err(WireError::Malformed {
                field: "open.receipts_after_position",
                ..
            })
        ),
        "a position of the wrong length is refused"
    );
    assert_eq!(
        StreamCommand::try_from(frame(client::client_frame::Frame::Open(client::Open {
            resume_after_seq: 0,
            hide_last_seen: false,
            receipts_after_index: 0,
            receipts_after_position: Vec::new(),
        }))),
        Ok(StreamCommand::Open {
            resume_after: InboxSeq::ZERO,
            hide_last_seen: false,
            receipts_after: None,
        }),
        "no position: changes from now"
    );
    assert_eq!(
        StreamCommand::try_from(client::ClientFrame { frame: None }),
        Err(WireError::Missing { field: "frame" })
    );
    assert_eq!(
        StreamCommand::try_from(frame(client::client_frame::Frame::Ack(client::Ack {
            up_to_seq: 0
        }))),
        Err(WireError::Zero {
            field: "ack.up_to_seq"
        })
    );
    assert_eq!(
        StreamCommand::try_from(frame(client::client_frame::Frame::Read(client::Read {
            conversation: None,
            up_to_seq: 3
        }))),
        Err(WireError::Missing {
            field: "conversation"
        })
    );
    let read = StreamCommand::try_from(frame(client::client_frame::Frame::Read(client::Read {
        conversation: Some(events::Conversation {
            with: Some(events::conversation::With::User(5)),
        }),
        up_to_seq: 3,
    })));
    assert_eq!(
        read,
        Ok(StreamCommand::Read {
            conversation: ConversationId::Direct(UserId::new(5).expect("nonzero")),
            up_to: InboxSeq::new(3)
        })
    );
    assert_eq!(
        ConversationId::try_from(&events::Conversation {
            with: Some(events::conversation::With::Group(0))
        }),
        Err(WireError::Zero {
            field: "conversation.group"
        })
    );
}

#[test]
fn message_ids_and_receipt_lookups() {
    assert!(matches!(
        MessageId::from_wire(&[1; 15], "id"),
        Err(WireError::Malformed { .. })
    ));
    assert_eq!(
        MessageId::from_wire(&[0; 16], "id"),
        Err(WireError::Zero { field: "id" })
    );
    assert_eq!(
        receipt_lookup(client::GetReceiptsRequest {
            message_ids: vec![],
            group_id: 0,
        }),
        Err(WireError::Missing {
            field: "message_ids"
        })
    );
    let too_many = vec![vec![1_u8; 16]; RECEIPT_LOOKUP_IDS_MAX + 1];
    assert!(matches!(
        receipt_lookup(client::GetReceiptsRequest {
            message_ids: too_many,
            group_id: 0,
        }),
        Err(WireError::TooLong { .. })
    ));
    assert_eq!(
        receipt_lookup(client::GetReceiptsRequest {
            message_ids: vec![vec![2; 16]],
            group_id: 0,
        }),
        Ok(vec![MessageId::from_bytes([2; 16])])
    );
}

#[test]
fn registration() {
    for bad in [
        "",
        "15551234567",
        "+1555abc4567",
        "+12345",
        "+1234567890123456",
    ] {
        assert!(
            PhoneNumber::try_from(bad.to_owned()).is_err(),
            "{bad:?} is rejected"
        );
    }
    let phone = PhoneNumber::try_from("+15551234567".to_owned()).expect("valid E.164");
    assert_eq!(
        format!("{phone:?}"),
        "PhoneNumber(<redacted>)",
        "Debug never shows the number"
    );
    let register = |code: &str| client::RegisterRequest {
        phone_number: "+15551234567".to_owned(),
        code: code.to_owned(),
        device_name: "phone".to_owned(),
    };
    assert!(RegisterCommand::try_from(register("123456")).is_ok());
    assert_eq!(
        RegisterCommand::try_from(register("")),
        Err(WireError::Missing { field: "code" })
    );
    assert!(matches!(
        RegisterCommand::try_from(register("12345a")),
        Err(WireError::Malformed { field: "code", .. })
    ));
}

#[test]
fn groups() {
    let create = |name: &str, members: Vec<u64>| client::CreateGroupRequest {
        name: name.to_owned(),
        members,
    };
    let group = CreateGroupCommand::try_from(create("g", vec![3, 2, 3])).expect("valid group");
    assert_eq!(group.members.len(), 2, "duplicates are removed");
    assert_eq!(
        CreateGroupCommand::try_from(create("", vec![])),
        Err(WireError::Missing { field: "name" })
    );
    assert_eq!(
        CreateGroupCommand::try_from(create("g", vec![0])),
        Err(WireError::Zero { field: "members" })
    );
    let max = usize::try_from(crate::limits::GROUP_MEMBERS_MAX).expect("small");
    let ids = |n: usize| (1..=u64::try_from(n).expect("small")).collect::<Vec<u64>>();
    assert_eq!(
        CreateGroupCommand::try_from(create("g", ids(max)))
            .expect("the protocol maximum is left to the node's Group:Full check")
            .members
            .len(),
        max
    );
    assert_eq!(
        CreateGroupCommand::try_from(create("g", ids(max + 1))),
        Err(WireError::TooLong {
            field: "members",
            len: max + 1,
            max
        })
    );
}

/// Every event variant survives an encode/decode round trip unchanged.
#[test]
fn events_round_trip_through_prost() {
    use events::event::Kind;
    let message_id = vec![9_u8; 16];
    let kinds = vec![
        Kind::MessageSent(events::MessageSent {
            message_id: message_id.clone(),
            sender_user: 1,
            sender_device: 1,
            client_msg_id: "c-1".to_owned(),
            to: Some(ConversationId::Direct(UserId::new(2).expect("nonzero")).into()),
            content: body(10),
            sent_at_ms: 1_700_000_000_000,
            recipient_shard: 3,
            group_epoch: 0,
            trace_parent: String::new(),
            own_copies: false,
        }),
        Kind::MessageDelivered(events::MessageDelivered {
            message_id: message_id.clone(),
            recipient_user: 2,
            sender_user: 1,
            sender_device: 1,
            conversation: Some(ConversationId::Direct(UserId::new(1).expect("nonzero")).into()),
            content: body(3),
            sent_at_ms: 1,
            stored_at_ms: 2,
            source_shard: 0,
            source_pos: 1,
            group_index: 0,
            trace_parent: String::new(),
            origin_shard: None,
            addressed_to: 0,
            receipts_sent: 0,
        }),
        Kind::DeliveryAcked(events::DeliveryAcked {
            user: 2,
            device: 1,
            up_to_seq: 5,
            acked_at_ms: 3,
            trim_delivered: false,
            keep_recent: 0,
            trim_max: 0,
        }),
        Kind::ReadUpTo(events::ReadUpTo {
            user: 2,
            conversation: None,
            up_to_seq: 5,
            read_at_ms: 4,
        }),
        Kind::ReceiptRecorded(events::ReceiptRecorded {
            message_id: message_id.clone(),
            sender_user: 1,
            recipient_user: 2,
            state: events::ReceiptState::Read.into(),
            at_ms: 5,
            source_shard: 2,
            source_pos: 3,
        }),
        Kind::OutboxTrimmed(events::OutboxTrimmed {
            dest_shard: 2,
            up_to: 10,
        }),
        Kind::UserRegistered(events::UserRegistered {
            user: 1,
            phone_hash: vec![1; 16],
            at_ms: 1,
            redeemed_phone_hash: Vec::new(),
        }),
        Kind::DeviceRegistered(events::DeviceRegistered {
            user: 1,
            device: 2,
            token_hash: vec![3; 32],
            primary: false,
            at_ms: 6,
            redeemed_phone_hash: Vec::new(),
            companions_max: 0,
            approver_token_hash: vec![4; 32],
            revokes_companions: true,
        }),
        Kind::DeviceRevoked(events::DeviceRevoked {
            user: 1,
            device: 1,
            at_ms: 7,
            redeemed_phone_hash: Vec::new(),
        }),
        Kind::GroupCreated(events::GroupCreated {
            group: 4,
            creator: 1,
            name: "g".to_owned(),
            at_ms: 8,
            creator_shard: 0,
        }),
        Kind::MemberAdded(events::MemberAdded {
            group: 4,
            user: 2,
            by: 1,
            admin: false,
            at_ms: 9,
            user_shard: 0,
            replaces: 0,
        }),
        Kind::MemberRemoved(events::MemberRemoved {
            group: 4,
            user: 2,
            by: 2,
            at_ms: 10,
        }),
        Kind::MessageExpired(events::MessageExpired {
            user: 2,
            seq: 1,
            message_id,
            at_ms: 11,
        }),
        Kind::SendsForgotten(events::SendsForgotten {
            sends: vec![events::ForgottenSend {
                sender_user: 1,
                sender_device: 1,
                client_msg_id: "c-1".to_owned(),
                sent_at_ms: 1_700_000_000_000,
            }],
            at_ms: 12,
        }),
        Kind::InboxForgotten(events::InboxForgotten {
            messages: vec![events::ForgottenMessage {
                user: 2,
                seq: 1,
                message_id: vec![7; 16],
                stored_at_ms: 1_700_000_000_000,
            }],
            at_ms: 13,
        }),
        Kind::ReceiptsForgotten(events::ReceiptsForgotten {
            receipts: vec![events::ForgottenReceipt {
                sender_user: 1,
                message_id: vec![7; 16],
                recipient_user: 2,
                set_at_ms: 1_700_000_000_000,
            }],
            at_ms: 14,
        }),
        Kind::GroupMessagesForgotten(events::GroupMessagesForgotten {
            up_to_index: 40,
            before_ms: 1_700_000_000_000,
        }),
    ];
    assert_eq!(kinds.len(), 17, "one case per event variant");
    let payload = events::EntryPayload {
        format_version: crate::FORMAT_VERSION,
        events: kinds
            .into_iter()
            .map(|kind| events::Event { kind: Some(kind) })
            .collect(),
    };
    let bytes = payload.encode_to_vec();
    let decoded = events::EntryPayload::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, payload);
}

#[test]
fn list_pages_default_and_refuse_an_oversize_limit() {
    use crate::convert::messaging::{ConversationsPage, GroupsPage};
    use crate::limits::{CONVERSATIONS_PAGE_MAX, GROUPS_PAGE_DEFAULT, GROUPS_PAGE_MAX};
    use crate::types::GroupId;
    let first = ConversationsPage::try_from(client::ListConversationsRequest::default())
        .expect("an empty request is the first page");
    assert_eq!(first.limit, 1000);
    assert_eq!(first.after, None);
    let next = ConversationsPage::try_from(client::ListConversationsRequest {
        limit: 5,
        after: Some(ConversationId::Group(GroupId::new(9).expect("nonzero")).into()),
    })
    .expect("a later page");
    assert_eq!(
        next,
        ConversationsPage {
            limit: 5,
            after: Some(ConversationId::Group(GroupId::new(9).expect("nonzero"))),
        }
    );
    assert_eq!(
        ConversationsPage::try_from(client::ListConversationsRequest {
            limit: CONVERSATIONS_PAGE_MAX + 1,
            after: None,
        }),
        Err(WireError::OutOfRange {
            field: "limit",
            value: u64::from(CONVERSATIONS_PAGE_MAX) + 1,
            min: 0,
            max: u64::from(CONVERSATIONS_PAGE_MAX),
        })
    );
    assert!(
        ConversationsPage::try_from(client::ListConversationsRequest {
            limit: 1,
            after: Some(events::Conversation { with: None }),
        })
        .is_err(),
        "an `after` naming no conversation is malformed"
    );
    let groups = GroupsPage::try_from(client::ListGroupsRequest::default()).expect("first");
    assert_eq!(
        (groups.limit, groups.after),
        (GROUPS_PAGE_DEFAULT as usize, None)
    );
    let later = GroupsPage::try_from(client::ListGroupsRequest {
        limit: GROUPS_PAGE_MAX,
        after_group_id: 7,
    })
    .expect("the largest page");
    assert_eq!(later.after, GroupId::new(7));
    assert!(matches!(
        GroupsPage::try_from(client::ListGroupsRequest {
            limit: GROUPS_PAGE_MAX + 1,
            after_group_id: 0,
        }),
        Err(WireError::OutOfRange { field: "limit", .. })
    ));
}
