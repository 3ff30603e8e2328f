//! The cluster as this node sees it: bootstrap, status, leader transfer, and proposing to a
//! shard's leader wherever it is.
//!
//! ```text
//!   ForwardBatch(dest shard) ─▶ local raft leads it? ─yes─▶ client_write ─▶ answer after commit
//!                                   │ no
//!                                   ├─ leader known ─▶ ForwardBatch to the leader's node (one hop)
//!                                   └─ no leader    ─▶ UNAVAILABLE + retry-after-ms
//! ```
//!
//! One [`Cluster`] type, its methods grouped by concern:
//! - `propose`: routing to a shard's leader and proposing there, holding requests through a
//!   failover ([`Cluster::propose`], [`Cluster::propose_forwarded`]).
//! - `forward`: storing a batch another shard's forwarder sent ([`Cluster::forward_batch`]).
//! - `bootstrap`: creating the cluster ([`Cluster::init`]).
//! - `membership`: adding and removing nodes, leader transfer.
//! - `moves`: moving a shard's replica between nodes ([`Cluster::move_shard`]).
//! - `balance`: the opt-in automatic leader rebalancer.
//! - `edge`: presence, typing and push ([`Edge`]).
//! - `read`: read barriers ([`ReadConsistency`]).
//! - `remote`: reads of any shard from any node ([`Cluster::read`]).
//! - `status`: status reports, outbox lengths, backups.
//! - `wire`: proposal outcomes on the peer wire.
//! - `peer`: `PeerClient`, which builds every node-to-node call.

mod balance;
mod bootstrap;
mod edge;
mod format;
mod forward;
mod membership;
mod moves;
mod peer;
mod propose;
mod read;
mod rebalance;
mod remote;
mod status;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use courier_consensus::groups::{GroupHandle, Groups};
use courier_consensus::types::{GroupId, NodeId};
use courier_storage::Db;

pub use balance::run_leader_rebalancer;
pub use bootstrap::REPLICATION_FACTOR_DEFAULT;
pub use edge::{Edge, run_reporter};
pub use membership::VOTERS_MIN;
pub use peer::{keep_warm, was_forwarded};
pub use read::{READ_WAIT, ReadConsistency};
pub use rebalance::run_replica_rebalancer;
pub use remote::{LEADER_HINT_TTL, READ_ANSWER_BYTES_MAX};
pub use status::Passes;
pub use wire::outcome_to_wire;

use crate::status::ApiError;

/// Retry hint when a shard has no leader and the request was not held (bootstrap, membership,
/// forwarded batches, which their callers retry), ms. Client proposals are held and get a hint
/// from the election timeout instead ([`Cluster::advise_retry`]).
const NO_LEADER_RETRY_MS: u64 = 500;

/// This node's view of the cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    groups: Arc<Groups>,
    db: Arc<Db>,
    rpc_timeout: Duration,
    peers: peer::PeerClient,
    edge: Edge,
    sends: Arc<crate::sends::SendsInFlight>,
    passes: Arc<Passes>,
    elsewhere: remote::SharedElsewhere,
    moves: Arc<moves::Moves>,
    /// The node's log archive (none on an embedder's disk): a move checks what only this node's
    /// replica holds is kept before it deletes the replica.
    archive: Option<Arc<crate::archive::Archive>>,
    /// Held by the metadata leader across a raise of the event format (its check of the
    /// members and its write) and across adding a member (its check of the new node's build
    /// and the membership change), so neither slips past the other.
    format_gate: Arc<tokio::sync::Mutex<()>>,
    /// One per group, held by its leader while it checks and commits the removal of a voter
    /// (`membership.rs`), so two removals of one group at once cannot both pass the check.
    voters_gates:
        Arc<std::sync::Mutex<std::collections::BTreeMap<GroupId, Arc<tokio::sync::Mutex<()>>>>>,
}

fn unavailable(message: String, leader: Option<NodeId>) -> ApiError {
    ApiError::Unavailable {
        code: "COURIER:Shard:NoLeader",
        message,
        retry_after_ms: NO_LEADER_RETRY_MS,
        leader,
    }
}

/// Whether `status` carries the stable `code` (in its `courier-code` metadata).
fn code_is(status: &tonic::Status, code: &str) -> bool {
    status
        .metadata()
        .get(courier_proto::CODE_KEY)
        .is_some_and(|value| value == code)
}

fn internal(message: String) -> ApiError {
    ApiError::fault(message)
}

fn invalid(code: &'static str, message: String) -> ApiError {
    ApiError::Invalid { code, message }
}

impl Cluster {
    /// The cluster view over this node's groups.
    pub fn new(
        groups: Arc<Groups>,
        db: Arc<Db>,
        rpc_timeout: Duration,
        edge: Edge,
        archive: Option<Arc<crate::archive::Archive>>,
    ) -> Self {
        Self {
            archive,
            peers: peer::PeerClient::new(groups.pool(), rpc_timeout),
            groups,
            db,
            rpc_timeout,
            edge,
            sends: Arc::default(),
            passes: Arc::default(),
            elsewhere: Arc::default(),
            moves: Arc::default(),
            format_gate: Arc::default(),
            voters_gates: Arc::default(),
        }
    }

    /// The node's raft groups.
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// Pusher and forwarder passes of this node (cost counters).
    pub fn passes(&self) -> &Passes {
        &self.passes
    }

    async fn group(&self, group: GroupId) -> Result<GroupHandle, ApiError> {
        self.groups
            .get_or_create(group)
            .await
            .map_err(|e| internal(e.to_string()))
    }
}
