//! What a node's database did since it was opened: the cost counters the node reports
//! (`Admin.Status`, `/metrics`, `make bench`'s cost per message), shared by the database handle
//! and its log writer.

use std::sync::atomic::{AtomicU64, Ordering};

/// What this database did since it was opened, for the node's counters (`Admin.Status`,
/// `/metrics`, `make bench`'s cost per message).
#[derive(Debug, Default)]
pub struct DbCounters {
    /// Synced writes: every write batch with `sync` and every WAL fsync
    /// ([`Db::sync_wal`](crate::Db::sync_wal)).
    pub synced_writes: AtomicU64,
    /// Write batches of any kind.
    pub write_batches: AtomicU64,
    /// Synced writes the log writer merged into its batches
    /// ([`Db::commit_synced`](crate::Db::commit_synced)): divided by the writer's share of
    /// `synced_writes`, the writes one fsync covered.
    pub merged_writes: AtomicU64,
    /// Point reads and range scans the apply fold made against the database (reads it answered
    /// from its own batch are not counted).
    pub apply_reads: AtomicU64,
    /// Puts and deletes the apply fold wrote.
    pub apply_writes: AtomicU64,
    /// Committed events refused as invalid at apply (`COURIER:Event:Invalid`): each one is an
    /// event no validating leader proposed.
    pub invalid_events: AtomicU64,
}

impl DbCounters {
    /// Adds one apply batch's reads and writes.
    pub fn note_apply(&self, reads: u64, writes: u64) {
        self.apply_reads.fetch_add(reads, Ordering::Relaxed);
        self.apply_writes.fetch_add(writes, Ordering::Relaxed);
    }

    /// Adds `count` events refused as invalid at apply.
    pub fn note_invalid(&self, count: u64) {
        self.invalid_events.fetch_add(count, Ordering::Relaxed);
    }
}
