//! Column families, declared once with their tuning.
//!
//! One RocksDB per node process holds every shard replica on that node; every key starts with
//! the shard id (2 bytes, big-endian), so one shard's data is one contiguous key range in each
//! family. Projections get one family each, so that a projection's digest, verify and rebuild
//! cover exactly one family (a reason to prefer per-projection names over STYLE's `key_value`
//! names: each family holds several record kinds behind a one-byte tag, see `keys.rs`).

/// A column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries: `shard | index` → checksummed entry.
    Log,
    /// Raft vote, committed index and last purged id: `shard | tag` → checksummed bytes.
    RaftState,
    /// Per shard: applied index and projection digests, written with every apply batch.
    Meta,
    /// A projection's family; see [`crate::projection::Projection`].
    Projection(crate::projection::Projection),
}

impl Cf {
    /// Every family, in a fixed order.
    pub fn all() -> impl Iterator<Item = Cf> {
        [Cf::Log, Cf::RaftState, Cf::Meta].into_iter().chain(
            crate::projection::Projection::ALL
                .into_iter()
                .map(Cf::Projection),
        )
    }

    /// The family's name in RocksDB.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::RaftState => "raftstate",
            Cf::Meta => "meta",
            Cf::Projection(projection) => projection.name(),
        }
    }

    /// Options for this family. The log is written sequentially and read mostly from the tail;
    /// projections take point lookups, so they get bloom filters.
    pub(crate) fn options(self) -> rocksdb::Options {
        let mut options = rocksdb::Options::default();
        match self {
            Cf::Log => {
                options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            }
            Cf::RaftState | Cf::Meta => {}
            Cf::Projection(_) => {
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                options.set_block_based_table_factory(&table);
                options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            }
        }
        options
    }
}
