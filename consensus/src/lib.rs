//! courier's consensus layer: openraft over the storage crate.
//!
//! ```text
//!   node ──client_write(Proposal)──▶ Raft (one per shard, + metadata) ──▶ LogStore ──▶ storage log
//!                                            │ committed                    (synced append)
//!                                            ▼
//!                                      StateMachine ──apply_batch──▶ projections (one WriteBatch)
//!   peers ◀──gRPC (group id + postcard payload)── network::PeerNetwork / network::RaftService
//!                  (one pipe::Pipe stream per peer for appends and votes; snapshots unary)
//! ```
//!
//! Storage never sees openraft: this crate encodes openraft's entries, votes and log ids into the
//! storage crate's records.

// openraft's storage traits return `openraft::StorageError` (224 bytes) by value; our helpers
// return the same type so that `?` works inside the trait methods.
#![allow(clippy::result_large_err)]
#![warn(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::too_many_lines
)]

pub mod bugs;
pub mod groups;
pub mod leadership;
pub mod log_store;
pub mod maintenance;
pub mod network;
pub mod pipe;
pub mod placement;
pub mod proposer;
pub mod snapshot_data;
pub mod state_machine;
pub mod types;
pub mod watch;

pub use log_store::{AppliedMark, LogStore};
pub use state_machine::StateMachine;
pub use types::{ClusterSettings, GroupId, NodeId, Proposal, ProposalResponse, Raft, TypeConfig};
