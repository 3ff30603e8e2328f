//! Protocol maxima. Operational limits in the node's config are validated against these; the
//! compile-time assertions below keep related limits consistent.

/// Largest message body, in bytes.
pub const MESSAGE_BODY_BYTES_MAX: usize = 64 * 1024;
/// Largest inline media thumbnail, in bytes.
pub const THUMBNAIL_BYTES_MAX: usize = 32 * 1024;
/// Largest media URL, in bytes.
pub const MEDIA_URL_BYTES_MAX: usize = 2048;
/// Largest media MIME type, in bytes.
pub const MIME_TYPE_BYTES_MAX: usize = 128;
/// Largest client message id, in bytes (ids are 1..=64 bytes).
pub const CLIENT_MSG_ID_BYTES_MAX: usize = 64;
/// Largest device name, in bytes.
pub const DEVICE_NAME_BYTES_MAX: usize = 64;
/// Largest group name, in bytes.
pub const GROUP_NAME_BYTES_MAX: usize = 128;
/// Largest phone number, in bytes (E.164 is at most 15 digits plus `+`).
pub const PHONE_NUMBER_BYTES_MAX: usize = 16;
/// Smallest phone number, in bytes.
pub const PHONE_NUMBER_BYTES_MIN: usize = 8;
/// Length of a registration code, in digits.
pub const REGISTRATION_CODE_DIGITS: usize = 6;
/// Length of a device token, in bytes.
pub const DEVICE_TOKEN_BYTES: usize = 32;
/// Largest number of companion devices linked to one user.
pub const COMPANION_DEVICES_MAX: u32 = 4;
/// Largest group, in members (the configured limit may be lower).
pub const GROUP_MEMBERS_MAX: u32 = 1024;
/// Largest number of users in one presence lookup.
pub const PRESENCE_LOOKUP_USERS_MAX: usize = 100;
/// Largest number of message ids in one receipts lookup.
pub const RECEIPT_LOOKUP_IDS_MAX: usize = 256;
/// Largest number of shards a cluster can be created with.
pub const SHARD_COUNT_MAX: u32 = 4096;
/// Largest replication factor.
pub const REPLICATION_FACTOR_MAX: u32 = 7;
/// Largest encoded raft entry payload (one batch of events), in bytes.
pub const PROPOSAL_BYTES_MAX: usize = 1024 * 1024;
/// Largest number of events forwarded to another shard in one batch.
pub const FORWARD_BATCH_EVENTS_MAX: usize = 512;
/// Most bytes the destination adds to one forwarded event's encoding before it proposes it: it
/// stamps when a delivery was stored (`stored_at_ms`, a one-byte tag and a varint of at most 10
/// bytes, where the source queued 0, which takes no bytes), and the delivery's length prefix
/// inside the event can grow by one byte.
pub const FORWARD_STAMP_BYTES_MAX: usize = 12;
/// Largest sum of the encoded events of one forwarded batch, in bytes, as the source queued them:
/// the destination stamps them and proposes them as one proposal, so a batch leaves room for the
/// stamps of its most events within one proposal (1 MiB less 6 KiB).
pub const FORWARD_BATCH_BYTES_MAX: usize =
    PROPOSAL_BYTES_MAX - FORWARD_BATCH_EVENTS_MAX * FORWARD_STAMP_BYTES_MAX;
/// Largest gRPC message a node decodes, in bytes.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest public key (identity key, signed or one-time prekey) in the key directory, in bytes:
/// room for a post-quantum (Kyber-1024) prekey of 1,569 bytes.
pub const PREKEY_BYTES_MAX: usize = 1600;
/// Largest signature of a signed prekey, in bytes.
pub const PREKEY_SIGNATURE_BYTES_MAX: usize = 128;
/// Largest number of one-time prekeys in one upload.
pub const PREKEYS_PER_UPLOAD_MAX: usize = 100;
/// Largest stock of one-time prekeys one device holds.
pub const PREKEYS_STOCK_MAX: u32 = 200;
/// Below this many one-time prekeys a device is told to upload more (`KeysLow`).
pub const PREKEYS_LOW: u32 = 10;
/// The most inbox messages per user whose bodies are kept for companions linked later
/// (`retention.companion-history`).
pub const COMPANION_HISTORY_MAX: u32 = 1000;
/// Conversations per `ListConversations` page when the request names no limit.
pub const CONVERSATIONS_PAGE_DEFAULT: u32 = 1000;
/// Conversations per `ListConversations` page at most (≈ 40 bytes each).
pub const CONVERSATIONS_PAGE_MAX: u32 = 10_000;
/// Groups per `ListGroups` page when the request names no limit.
pub const GROUPS_PAGE_DEFAULT: u32 = 100;
/// Groups per `ListGroups` page at most: a group of [`GROUP_MEMBERS_MAX`] members is ≈ 16 KB.
pub const GROUPS_PAGE_MAX: u32 = 200;

/// Upper bound of one message's encoded content: body, thumbnail, URL, MIME type, framing.
pub const MESSAGE_CONTENT_BYTES_MAX: usize =
    MESSAGE_BODY_BYTES_MAX + THUMBNAIL_BYTES_MAX + MEDIA_URL_BYTES_MAX + MIME_TYPE_BYTES_MAX + 256;

const _: () = assert!(
    GROUPS_PAGE_MAX as usize * (GROUP_MEMBERS_MAX as usize * 16 + GROUP_NAME_BYTES_MAX + 64)
        < GRPC_MESSAGE_BYTES_MAX,
    "a page of the largest groups fits in one gRPC message"
);

const _: () = assert!(
    MESSAGE_CONTENT_BYTES_MAX * 4 <= PROPOSAL_BYTES_MAX,
    "several maximal messages fit in one proposal"
);
const _: () = assert!(
    PROPOSAL_BYTES_MAX * 2 <= GRPC_MESSAGE_BYTES_MAX,
    "a maximal proposal fits one gRPC message twice over (an append-entries call, a forwarded batch)"
);
const _: () = assert!(
    FORWARD_BATCH_BYTES_MAX + FORWARD_BATCH_EVENTS_MAX * FORWARD_STAMP_BYTES_MAX
        <= PROPOSAL_BYTES_MAX,
    "a forwarded batch, stamped by its destination, fits one proposal"
);
const _: () = assert!(
    FORWARD_BATCH_BYTES_MAX + FORWARD_BATCH_EVENTS_MAX * 16 + 64 <= GRPC_MESSAGE_BYTES_MAX,
    "a forwarded batch, with its framing, fits one gRPC message"
);
const _: () = assert!(
    THUMBNAIL_BYTES_MAX <= MESSAGE_BODY_BYTES_MAX,
    "a thumbnail is smaller than a body"
);
const _: () = assert!(SHARD_COUNT_MAX <= 1 << 16, "shard ids fit in u16");
const _: () = assert!(
    PREKEYS_PER_UPLOAD_MAX * (PREKEY_BYTES_MAX + 16) + 2 * PREKEY_BYTES_MAX + 1024
        <= PROPOSAL_BYTES_MAX,
    "a maximal key upload fits in one proposal"
);
