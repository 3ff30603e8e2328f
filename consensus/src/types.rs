//! The openraft type configuration and what travels through raft: proposals (a batch of events
//! for a shard, or cluster settings for the metadata group) and their responses.

use std::sync::Arc;

use courier_proto::pb::events::EntryPayload;
use courier_proto::{InboxSeq, PHONE_KEY_BYTES, PhoneKey, ShardId, UserId};
use courier_storage::Applied;
use courier_storage::projection::CodeOutcome;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::placement::Placement;

/// A node of the cluster, as raft knows it: its peer address.
pub type Node = openraft::BasicNode;
/// A node id (at least 1).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// courier's raft types.
    pub TypeConfig:
        D = Proposal,
        R = ProposalResponse,
        SnapshotData = SnapshotData,
);

/// One raft group's handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A raft log id.
pub type LogId = openraft::LogId<NodeId>;
/// A stored membership.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
/// openraft's storage error, as the storage traits return it.
pub type RaftStorageError = openraft::StorageError<NodeId>;

pub use courier_proto::shard::METADATA_PREFIX;

/// A raft group: one per shard, plus the cluster metadata group on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupId {
    /// The metadata group: cluster settings and the node list (its membership).
    Metadata,
    /// A data shard.
    Shard(ShardId),
}

impl GroupId {
    /// Where the group's log and state live in the node's RocksDB.
    pub fn storage_prefix(self) -> ShardId {
        match self {
            GroupId::Metadata => METADATA_PREFIX,
            GroupId::Shard(shard) => shard,
        }
    }

    /// The group that owns a storage prefix.
    pub fn from_storage_prefix(prefix: ShardId) -> Self {
        if prefix == METADATA_PREFIX {
            GroupId::Metadata
        } else {
            GroupId::Shard(prefix)
        }
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupId::Metadata => f.write_str("metadata"),
            GroupId::Shard(shard) => shard.fmt(f),
        }
    }
}

/// Cluster-wide settings, fixed when the cluster is created and stored in the metadata group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Number of shards `S`.
    pub shard_count: u16,
    /// Replicas per shard `R`.
    pub replication_factor: u16,
}

/// What a client of raft proposes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "ProposalWire", try_from = "ProposalWire")]
pub enum Proposal {
    /// A batch of events for a shard (several client commands share one entry). Shared: openraft
    /// clones entries for replication, the recent-entries cache and apply, and none of them
    /// changes the events.
    Events(Arc<EntryPayload>),
    /// Cluster settings without a phone-hash key: what bootstrap proposed before the key
    /// existed. Still decoded and applied (such a cluster keeps its unkeyed phone hash); no
    /// longer proposed.
    Cluster(ClusterSettings),
    /// Cluster settings and the phone-hash key, proposed to the metadata group at bootstrap by
    /// builds before placement. Still decoded and applied (such a cluster holds every shard on
    /// every member); no longer proposed.
    ClusterKeyed(ClusterSettings, PhoneKey),
    /// Cluster settings, the phone-hash key and the shards' placement, proposed once to the
    /// metadata group at bootstrap.
    ClusterPlaced(ClusterSettings, PhoneKey, Arc<Placement>),
    /// A shard's replica moved from one node to another (the placement table's change after a
    /// shard move; applied only when the table shows the shard on the first node and not on
    /// the second).
    PlacementMoved(ShardId, NodeId, NodeId),
    /// A node is marked draining (`true`: shard moves take its replicas away and put none on it)
    /// or no longer (`false`). Metadata group only.
    Draining(NodeId, bool),
    /// The event format the cluster's leaders write from now on (`EntryPayload.format_version`;
    /// never lowered: a lower one changes nothing). Metadata group only.
    EventFormat(u32),
}

/// Stored and wire form. Variants are only ever appended (postcard tags them by position).
#[derive(Serialize, Deserialize)]
enum ProposalWire {
    Events(Vec<u8>),
    Cluster(ClusterSettings),
    ClusterKeyed(ClusterSettings, [u8; PHONE_KEY_BYTES]),
    ClusterPlaced(ClusterSettings, [u8; PHONE_KEY_BYTES], Placement),
    PlacementMoved(u16, NodeId, NodeId),
    Draining(NodeId, bool),
    EventFormat(u32),
}

impl From<Proposal> for ProposalWire {
    fn from(proposal: Proposal) -> Self {
        match proposal {
            Proposal::Events(payload) => ProposalWire::Events(payload.encode_to_vec()),
            Proposal::Cluster(settings) => ProposalWire::Cluster(settings),
            Proposal::ClusterKeyed(settings, key) => {
                ProposalWire::ClusterKeyed(settings, *key.expose())
            }
            Proposal::ClusterPlaced(settings, key, placement) => {
                ProposalWire::ClusterPlaced(settings, *key.expose(), placement.as_ref().clone())
            }
            Proposal::PlacementMoved(shard, from, to) => {
                ProposalWire::PlacementMoved(shard.get(), from, to)
            }
            Proposal::Draining(node, on) => ProposalWire::Draining(node, on),
            Proposal::EventFormat(format) => ProposalWire::EventFormat(format),
        }
    }
}

impl TryFrom<ProposalWire> for Proposal {
    type Error = prost::DecodeError;

    fn try_from(wire: ProposalWire) -> Result<Self, Self::Error> {
        match wire {
            ProposalWire::Events(bytes) => Ok(Proposal::Events(Arc::new(EntryPayload::decode(
                bytes.as_slice(),
            )?))),
            ProposalWire::Cluster(settings) => Ok(Proposal::Cluster(settings)),
            ProposalWire::ClusterKeyed(settings, key) => {
                Ok(Proposal::ClusterKeyed(settings, PhoneKey::new(key)))
            }
            ProposalWire::ClusterPlaced(settings, key, placement) => Ok(Proposal::ClusterPlaced(
                settings,
                PhoneKey::new(key),
                Arc::new(placement),
            )),
            ProposalWire::PlacementMoved(shard, from, to) => {
                Ok(Proposal::PlacementMoved(ShardId::new(shard), from, to))
            }
            ProposalWire::Draining(node, on) => Ok(Proposal::Draining(node, on)),
            ProposalWire::EventFormat(format) => Ok(Proposal::EventFormat(format)),
        }
    }
}

/// What applying one event produced (see `courier_storage::Applied`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventOutcome {
    /// A send: its (first) result.
    Sent {
        /// 16 bytes.
        message_id: Vec<u8>,
        /// Leader clock at the first send, unix ms.
        sent_at_ms: u64,
        /// Log index of the first send.
        log_index: u64,
        /// Whether this was a retry of a known client id.
        duplicate: bool,
    },
    /// A message stored in an inbox.
    Stored {
        /// The recipient.
        user: u64,
        /// Its inbox sequence.
        seq: u64,
        /// Whether it was already stored.
        duplicate: bool,
    },
    /// A forwarded event that was already applied.
    DuplicateForward,
    /// A device registration: the id assigned at apply.
    DeviceRegistered {
        /// The user.
        user: u64,
        /// The device id.
        device: u32,
    },
    /// A registration-code event: what it did.
    Code(CodeResult),
    /// A key upload: the device's stock of one-time prekeys after it.
    KeyStock(u32),
    /// A prekey bundle fetch: the encoded `courier_proto::pb::store::KeyBundle` handed out.
    Bundle(Vec<u8>),
    /// Refused at apply (group events): nothing changed.
    Rejected {
        /// Stable code (`COURIER:Group:*`).
        code: String,
        /// Why.
        message: String,
    },
    /// Anything else.
    Done,
}

impl From<Applied> for EventOutcome {
    fn from(applied: Applied) -> Self {
        match applied {
            Applied::Sent { result, duplicate } => EventOutcome::Sent {
                message_id: result.message_id,
                sent_at_ms: result.sent_at_ms,
                log_index: result.log_index,
                duplicate,
            },
            Applied::Stored {
                user,
                seq,
                duplicate,
            } => EventOutcome::Stored {
                user: UserId::get(user),
                seq: InboxSeq::get(seq),
                duplicate,
            },
            Applied::DuplicateForward => EventOutcome::DuplicateForward,
            Applied::DeviceRegistered { user, device } => EventOutcome::DeviceRegistered {
                user: user.get(),
                device,
            },
            Applied::Rejected { code, message } => EventOutcome::Rejected {
                code: code.to_owned(),
                message,
            },
            Applied::Code(outcome) => EventOutcome::Code(outcome.into()),
            Applied::KeyStock(stock) => EventOutcome::KeyStock(stock),
            Applied::Bundle(bundle) => EventOutcome::Bundle(bundle),
            Applied::Done => EventOutcome::Done,
        }
    }
}

/// What a registration-code event did (`courier_storage::projection::CodeOutcome`, which this
/// crate's responses carry in serde form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeResult {
    /// The code is the number's code now.
    Issued,
    /// The right, live code: consumed.
    Accepted,
    /// A wrong code; this many tries are left (0: the code is void).
    Wrong {
        /// Tries left.
        attempts_left: u32,
    },
    /// The number has no live code.
    NoCode,
    /// The number's bucket is empty: nothing changed.
    RateLimited {
        /// Milliseconds until the next token.
        retry_after_ms: u64,
    },
    /// The code was voided (`false`: it was no longer the number's code).
    Withdrawn(bool),
    /// Records forgotten.
    Forgotten(u64),
}

impl From<CodeOutcome> for CodeResult {
    fn from(outcome: CodeOutcome) -> Self {
        match outcome {
            CodeOutcome::Issued => CodeResult::Issued,
            CodeOutcome::Accepted => CodeResult::Accepted,
            CodeOutcome::Wrong { attempts_left } => CodeResult::Wrong { attempts_left },
            CodeOutcome::NoCode => CodeResult::NoCode,
            CodeOutcome::RateLimited { retry_after_ms } => {
                CodeResult::RateLimited { retry_after_ms }
            }
            CodeOutcome::Withdrawn(voided) => CodeResult::Withdrawn(voided),
            CodeOutcome::Forgotten(count) => {
                CodeResult::Forgotten(u64::try_from(count).unwrap_or(u64::MAX))
            }
        }
    }
}

/// The response to one proposal: one outcome per event, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalResponse {
    /// Per event.
    pub outcomes: Vec<EventOutcome>,
}

pub use crate::snapshot_data::SnapshotData;
