//! courier's storage: the raft log and the projections folded from it, in one RocksDB per node.
//!
//! ```text
//!   consensus ──append/read/truncate/purge──▶ log::LogStore ──▶ cf `log`, `raftstate`
//!       │
//!       └──committed entries──▶ shard::ShardState::apply_batch ──▶ projection::apply_event
//!                                     │ one WriteBatch: projections + applied index + digests
//!                                     ▼
//!                              db::Db (RocksDB, or memdisk::MemDisk in the simulation)
//!                              | kv::MemKv (tests, scratch rebuilds)
//! ```
//!
//! This crate knows nothing of openraft or tonic: consensus adapts to it. Projections are pure
//! folds (`projection::*::apply`); rebuild and verify replay the same folds (`rebuild`);
//! snapshots export and install a shard's projections (`snapshot`). Every error is a fault
//! that stops the replica (`error`).

#![warn(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::too_many_lines
)]

pub mod archive;
pub mod bugs;
pub mod cf;
pub mod checkpoint;
pub mod counters;
pub mod db;
#[cfg(test)]
mod decode_fuzz_test;
pub mod error;
pub mod inspect;
pub mod install;
pub mod keys;
pub mod kv;
pub mod log;
pub mod memdisk;
pub mod projection;
pub mod reader;
pub mod rebuild;
pub mod remote;
pub mod segment;
pub mod shard;
pub mod snapshot;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod writer;

pub use cf::Cf;
pub use db::{AtThisMoment, Db, OpenMode};
pub use error::{Result, StorageError};
pub use kv::{Digest, MemKv, ReadKv};
pub use log::{LogRecord, LogStore};
pub use memdisk::MemDisk;
pub use projection::{Applied, Projection};
pub use shard::{Batch, Committed, ShardState, Touched};
