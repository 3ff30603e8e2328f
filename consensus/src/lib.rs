//! courier's consensus layer: openraft over the storage crate.
//!
//! ```text
//!   node ──client_write(Proposal)──▶ Raft (one per shard, + metadata) ──▶ LogStore ──▶ storage log
//!                                            │ committed                    (synced append)
//!                                            ▼
//!                                      StateMachine ──apply_batch──▶ projections (one WriteBatch)
//!   peers ◀──gRPC (group id + postcard payload)── network::PeerNetwork / network::RaftService
//! ```
//!
//! Storage never sees openraft: this crate encodes openraft's entries, votes and log ids into the
//! storage crate's records.

pub mod groups;
pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::StateMachine;
pub use types::{ClusterSettings, GroupId, NodeId, Proposal, ProposalResponse, Raft, TypeConfig};
