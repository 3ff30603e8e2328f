//! A read-only look at one shard's projections, for code that answers questions (the node's
//! client reads, forwarders, retention) rather than applying entries.
//!
//! The projection read functions take a [`View`], which is built for the apply path: it stages
//! writes and names the log index being applied. A [`Reader`] owns that plumbing and hands out
//! views that read the database as it is; nothing it stages is ever written, and no log index is
//! being applied (the views report [`LogIndex::ZERO`]).

use std::collections::BTreeMap;

use courier_proto::{LogIndex, ShardId};

use crate::kv::{ReadKv, Staged};
use crate::projection::{Projection, View};

/// Reads one shard's projections as they are in the database (see the module docs).
pub struct Reader<'a> {
    staged: Staged<'a>,
    shard: ShardId,
}

impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl<'a> Reader<'a> {
    /// A reader of `shard` over `base` (the node's [`crate::Db`], or a [`crate::MemKv`]).
    pub fn new(base: &'a dyn ReadKv, shard: ShardId) -> Self {
        Self {
            staged: Staged::new(base, BTreeMap::new()),
            shard,
        }
    }

    /// The shard this reader reads.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// A view of `projection` for the projection's read functions (`outbox::states`,
    /// `dedup::lookup`, …). Nothing written through it reaches the database.
    pub fn view(&mut self, projection: Projection) -> View<'_, 'a> {
        View::new(&mut self.staged, self.shard, LogIndex::ZERO, projection)
    }
}
