//! Column families, declared once with their tuning.
//!
//! One RocksDB per node process holds every shard replica on that node; every key starts with
//! the shard id (2 bytes, big-endian), so one shard's data is one contiguous key range in each
//! family. Projections get one family each, so that a projection's digest, verify and rebuild
//! cover exactly one family (a reason to prefer per-projection names over STYLE's `key_value`
//! names: each family holds several record kinds behind a one-byte tag, see `keys.rs`).
//!
//! [`Projection`] names the projections here, at the bottom of the crate, so that the families,
//! the key-value layer and the folds (`projection/`) all depend on this file and never on each
//! other in a circle.

/// A column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries: `shard | index` → checksummed entry.
    Log,
    /// Raft vote, committed index and last purged id: `shard | tag` → checksummed bytes.
    RaftState,
    /// Per shard: applied index and projection digests, written with every apply batch.
    Meta,
    /// A projection's family.
    Projection(Projection),
}

impl Cf {
    /// Every family, in a fixed order.
    pub fn all() -> impl Iterator<Item = Cf> {
        [Cf::Log, Cf::RaftState, Cf::Meta]
            .into_iter()
            .chain(Projection::ALL.into_iter().map(Cf::Projection))
    }

    /// The family named `name` (as [`Cf::name`] gives it), if any.
    pub fn from_name(name: &str) -> Option<Cf> {
        Cf::all().find(|cf| cf.name() == name)
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
                // A bloom filter over whole keys in the memtable too: most point reads of the
                // apply fold and the send path look for keys that are absent (a new client id,
                // a new message id), and would otherwise search the memtable's skip list.
                options.set_memtable_whole_key_filtering(true);
                options.set_memtable_prefix_bloom_ratio(0.05);
            }
        }
        options
    }
}

/// A projection, and its column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    /// Per user, gap-free `InboxSeq` → message.
    Inbox,
    /// Per device, the acked-up-to sequence.
    Cursors,
    /// Per user and conversation, read-up-to and exact unread counts.
    ReadState,
    /// Per sent message and recipient: sent → delivered → read.
    Receipts,
    /// (sender device, client message id) → the first send result.
    Dedup,
    /// Per destination shard, events still to forward; per source shard, the inbound watermark.
    Outbox,
    /// Phone → user, devices with token hashes, revocations.
    Devices,
    /// Group records, members and membership epochs.
    Groups,
    /// Undelivered messages by the time they were stored, for retention.
    Expiry,
}

impl Projection {
    /// Every projection.
    pub const ALL: [Projection; 9] = [
        Projection::Inbox,
        Projection::Cursors,
        Projection::ReadState,
        Projection::Receipts,
        Projection::Dedup,
        Projection::Outbox,
        Projection::Devices,
        Projection::Groups,
        Projection::Expiry,
    ];

    /// The order in which projections apply each event (see [`crate::projection`]).
    pub const APPLY_ORDER: [Projection; 9] = [
        Projection::Dedup,
        Projection::Devices,
        Projection::Groups,
        Projection::Outbox,
        Projection::Receipts,
        Projection::Expiry,
        Projection::Cursors,
        Projection::ReadState,
        Projection::Inbox,
    ];

    /// The projection's (and its column family's) name.
    pub fn name(self) -> &'static str {
        match self {
            Projection::Inbox => "inbox",
            Projection::Cursors => "cursors",
            Projection::ReadState => "readstate",
            Projection::Receipts => "receipts",
            Projection::Dedup => "dedup",
            Projection::Outbox => "outbox",
            Projection::Devices => "devices",
            Projection::Groups => "groups",
            Projection::Expiry => "expiry",
        }
    }

    /// Parses a name as printed by [`Projection::name`].
    pub fn from_name(name: &str) -> Option<Projection> {
        Projection::ALL
            .into_iter()
            .find(|projection| projection.name() == name)
    }
}
