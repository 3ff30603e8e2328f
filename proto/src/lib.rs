//! courier's wire protocol and event schema, and the domain types every other crate speaks.
//!
//! Layout:
//! - [`pb`]: prost types generated from `proto/courier/*.proto` (with the `grpc` feature also
//!   the tonic client and server stubs). The event log stores [`pb::events::EntryPayload`].
//! - [`types`]: newtypes (`UserId`, `ShardId`, `InboxSeq`, …) with checked arithmetic.
//! - [`limits`]: protocol maxima, tied together by compile-time assertions.
//! - [`convert`]: wire → domain conversions that reject what the wire can lie about.
//! - [`shard`]: `shard_of`, the stable user → shard hash.
//! - [`hex`](mod@hex): lower-case hex for ids and keys in errors and reports.

pub mod convert;
pub mod error;
pub mod hex;
pub mod limits;
pub mod placement;
pub mod shard;
pub mod types;

pub use error::{CODE_KEY, WireError};
pub use hex::hex;
pub use shard::{PHONE_KEY_BYTES, PhoneHasher, PhoneKey, shard_of, shard_of_group};
pub use types::{
    ClientMsgId, ConversationId, DeviceId, GroupId, InboxSeq, LogIndex, MessageId,
    ReceiptFeedPosition, ShardId, UserId,
};

/// The newest event format this build writes and the highest it can read (docs/EVENTS.md,
/// "Entries and format version"): 1, the first; 2, `DeliveryAcked.trim_max` and
/// `DeviceRegistered.companions_max` take effect (in a format-1 entry they are ignored, as
/// builds before them did); 3, `DeviceRegistered.approver_token_hash` and
/// `DeviceRegistered.revokes_companions` take effect (ignored in entries of formats 1 and 2). A
/// leader writes the cluster's format (the metadata group's), which is raised only once every
/// member reads it.
pub const FORMAT_VERSION: u32 = 3;

/// Generated protobuf types, one module per proto package (nested as the packages are, so that
/// cross-package references resolve), re-exported under short names.
#[allow(missing_docs, unreachable_pub, clippy::all, unused_qualifications)]
pub mod pb {
    /// The `courier.*.v1` packages.
    pub mod courier {
        /// `courier.events.v1`.
        pub mod events {
            /// Version 1.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/courier.events.v1.rs"));
            }
        }
        /// `courier.store.v1`.
        pub mod store {
            /// Version 1.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/courier.store.v1.rs"));
            }
        }
        /// `courier.client.v1`.
        pub mod client {
            /// Version 1.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/courier.client.v1.rs"));
            }
        }
        /// `courier.peer.v1`.
        pub mod peer {
            /// Version 1.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/courier.peer.v1.rs"));
            }
        }
    }
    /// `courier.client.v1`: the phone-facing API.
    pub use courier::client::v1 as client;
    /// `courier.events.v1`: the event log's on-disk format.
    pub use courier::events::v1 as events;
    /// `courier.peer.v1`: raft transport, forwarding and admin between nodes.
    pub use courier::peer::v1 as peer;
    /// `courier.store.v1`: projection values stored in RocksDB.
    pub use courier::store::v1 as store;
}

/// The encoded `FileDescriptorSet` of every courier proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/courier_descriptor.bin"));
