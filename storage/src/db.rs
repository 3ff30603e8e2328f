//! The node's one RocksDB: open, read, and atomic batch writes. Every shard replica on the node
//! shares it, separated by the shard prefix of every key.
//!
//! Durability: log appends and raft state writes are synced (WAL fsync) before they return; there
//! is no switch to turn this off. Apply batches are written without their own fsync: they are
//! ordered after the synced log writes in the same WAL and can always be re-derived from the log,
//! and [`Db::sync_wal`] runs before anything the log cannot re-derive (a purge).
//!
//! The deterministic simulation opens the same `Db` on a [`MemDisk`] instead
//! ([`Db::on_memdisk`]), which keeps written and synced data apart so a simulated crash loses
//! what no fsync covered. Everything above this type is the same code either way.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use crate::cf::Cf;
pub use crate::counters::DbCounters;
use crate::error::{Result, StorageError, db_err};
use crate::kv::{Change, Pair, ReadKv};
use crate::memdisk::{MemDisk, Op};
use crate::reader::Reader;
use crate::writer::Writer;

/// How a database is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// A node's own database: created if missing, exclusive (RocksDB's lock file).
    ReadWrite,
    /// An operator tool on a stopped node's database: nothing is written.
    ReadOnly,
}

/// One RocksDB with courier's column families (or, in the simulation, a [`MemDisk`]).
pub struct Db {
    engine: Engine,
    path: PathBuf,
    counters: Arc<DbCounters>,
    installs: InstallStamps,
    /// The log writer of a database opened read-write on a real disk.
    writer: Option<Writer>,
}

/// Per shard, a count of snapshot installs that is odd while one is writing the shard's
/// projections (`crate::install`), so readers can tell they may have read half of one.
#[derive(Debug, Default)]
struct InstallStamps(std::sync::Mutex<std::collections::HashMap<u16, u64>>);

impl InstallStamps {
    fn update(&self, shard: courier_proto::ShardId, odd: bool) {
        let mut stamps = self
            .0
            .lock()
            .expect("install stamps lock is never poisoned");
        let stamp = stamps.entry(shard.get()).or_default();
        if stamp.is_multiple_of(2) == odd {
            *stamp = stamp.wrapping_add(1);
        }
    }

    fn get(&self, shard: courier_proto::ShardId) -> u64 {
        let stamps = self
            .0
            .lock()
            .expect("install stamps lock is never poisoned");
        stamps.get(&shard.get()).copied().unwrap_or(0)
    }
}

enum Engine {
    Rocks(Arc<DB>),
    Memory {
        disk: Arc<MemDisk>,
        incarnation: u64,
    },
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    /// [`StorageError::Db`] when RocksDB cannot open it, including when another process holds it
    /// (the message then names the `LOCK` file).
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_paranoid_checks(true);
        // A torn last record of the write-ahead log (a write that never returned) is dropped; a
        // damaged record before it refuses the open. RocksDB's default, point-in-time recovery,
        // would open with everything after the damage gone: appends acknowledged as durable,
        // votes and raft state among them, silently lost.
        options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        options.set_max_background_jobs(2);
        let families: Vec<_> = Cf::all()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf.options()))
            .collect();
        let db = match mode {
            OpenMode::ReadWrite => DB::open_cf_descriptors(&options, path, families),
            OpenMode::ReadOnly => {
                DB::open_cf_descriptors_read_only(&options, path, families, false)
            }
        }
        .map_err(db_err("open", "*"))?;
        let db = Arc::new(db);
        let counters = Arc::new(DbCounters::default());
        let writer = (mode == OpenMode::ReadWrite)
            .then(|| Writer::start(Arc::clone(&db), Arc::clone(&counters)));
        Ok(Self {
            engine: Engine::Rocks(db),
            path: path.to_path_buf(),
            counters,
            installs: InstallStamps::default(),
            writer,
        })
    }

    /// Opens a handle on a simulated disk: it sees what the disk holds now (after its last
    /// crash) and dies with the disk's next crash. `path` only names it (checkpoints and
    /// messages).
    pub fn on_memdisk(disk: Arc<MemDisk>, path: &Path) -> Self {
        let incarnation = disk.attach();
        Self {
            engine: Engine::Memory { disk, incarnation },
            path: path.to_path_buf(),
            counters: Arc::default(),
            installs: InstallStamps::default(),
            writer: None,
        }
    }

    /// A snapshot install begins: on the simulation's disk it is marked under way, and the answer
    /// is how long it is to take ([`MemDisk::set_install_latency`]); on RocksDB, where the
    /// install's own writes take their time, zero.
    pub fn simulated_install_begins(&self) -> std::time::Duration {
        match &self.engine {
            Engine::Rocks(_) => std::time::Duration::ZERO,
            Engine::Memory { disk, .. } => disk.begin_install(),
        }
    }

    /// The install begun by [`Db::simulated_install_begins`] has written what it installs.
    pub fn simulated_install_ends(&self) {
        if let Engine::Memory { disk, .. } = &self.engine {
            disk.end_install();
        }
    }

    /// What this database did since it was opened.
    pub fn counters(&self) -> &DbCounters {
        &self.counters
    }

    /// The directory this database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where large transient files (raft snapshots being built, sent or received) may be
    /// written unnamed: the database's directory on a real disk, `None` on the simulation's
    /// memory disk, which has no files.
    pub fn spool_dir(&self) -> Option<&Path> {
        match self.engine {
            Engine::Rocks(_) => Some(&self.path),
            Engine::Memory { .. } => None,
        }
    }

    /// A stamp of `shard`'s snapshot installs for a reader that reads the shard's projections
    /// directly (client reads): `None` while an install is writing them (they are half
    /// written; retry later). A read is whole if the stamp was `Some` and the same before and
    /// after it.
    pub fn read_stamp(&self, shard: courier_proto::ShardId) -> Option<u64> {
        let stamp = self.installs.get(shard);
        stamp.is_multiple_of(2).then_some(stamp)
    }

    /// Runs `read` over `shard`'s projections as they are now, unless a snapshot install wrote
    /// them meanwhile: `None` then (what was read may be half of one; retry later).
    pub fn read_whole<R>(
        &self,
        shard: courier_proto::ShardId,
        read: impl FnOnce(&mut Reader<'_>) -> R,
    ) -> Option<R> {
        let stamp = self.read_stamp(shard)?;
        let result = read(&mut self.read(shard));
        (self.read_stamp(shard) == Some(stamp)).then_some(result)
    }

    /// An install starts writing `shard`'s projections (`crate::install`).
    pub(crate) fn begin_install(&self, shard: courier_proto::ShardId) {
        self.installs.update(shard, true);
    }

    /// The install of `shard` wrote its last batch.
    pub(crate) fn end_install(&self, shard: courier_proto::ShardId) {
        self.installs.update(shard, false);
    }

    fn handle(db: &DB, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every `Cf` is created at open (create_missing_column_families), so the handle exists.
        db.cf_handle(cf.name())
            .expect("column family declared in cf.rs exists")
    }

    /// Commits `changes` in one atomic write batch. With `sync` the WAL is fsynced before this
    /// returns.
    ///
    /// # Errors
    /// [`StorageError::Db`]: a fault; the caller stops the replica.
    pub fn commit(&self, changes: impl IntoIterator<Item = Change>, sync: bool) -> Result<()> {
        self.replace_ranges(&[], changes.into_iter().collect(), sync)
    }

    /// Commits `changes` synced, merged by the node's log writer with the synced writes other
    /// raft groups make meanwhile into one write batch and one WAL fsync; `done` runs with the
    /// outcome once they are durable, on the writer's thread (or at once, on the calling thread,
    /// on the simulation's disk, which stays deterministic).
    pub fn commit_synced(&self, changes: Vec<Change>, done: crate::writer::Done) {
        match &self.writer {
            Some(writer) => writer.submit(changes, done),
            None => done(self.commit(changes, true)),
        }
    }

    /// Deletes `[from, to)` of `cf` (log truncation and purge).
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn delete_range(&self, cf: Cf, from: &[u8], to: &[u8], sync: bool) -> Result<()> {
        self.replace_ranges(&[(cf, from.to_vec(), to.to_vec())], Vec::new(), sync)
    }

    /// Clears `ranges`, then applies `changes`, in one atomic batch (snapshot install,
    /// projection swap).
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn replace_ranges(
        &self,
        ranges: &[(Cf, Vec<u8>, Vec<u8>)],
        changes: Vec<Change>,
        sync: bool,
    ) -> Result<()> {
        self.counters.write_batches.fetch_add(1, Ordering::Relaxed);
        if sync {
            self.counters.synced_writes.fetch_add(1, Ordering::Relaxed);
        }
        let db = match &self.engine {
            Engine::Rocks(db) => db,
            Engine::Memory { disk, incarnation } => {
                let ops = ranges
                    .iter()
                    .map(|(cf, from, to)| Op::DeleteRange(*cf, from.clone(), to.clone()))
                    .chain(
                        changes
                            .into_iter()
                            .map(|(cf, key, value)| Op::Set(cf, key, value)),
                    )
                    .collect();
                return disk.write(*incarnation, ops, sync);
            }
        };
        let mut batch = WriteBatch::default();
        for (cf, from, to) in ranges {
            batch.delete_range_cf(Self::handle(db, *cf), from, to);
        }
        for (cf, key, value) in changes {
            match value {
                Some(value) => batch.put_cf(Self::handle(db, cf), key, value),
                None => batch.delete_cf(Self::handle(db, cf), key),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        db.write_opt(batch, &options).map_err(db_err("write", "*"))
    }

    /// Fsyncs the WAL, making every earlier write durable.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn sync_wal(&self) -> Result<()> {
        self.counters.synced_writes.fetch_add(1, Ordering::Relaxed);
        match &self.engine {
            Engine::Rocks(db) => db.flush_wal(true).map_err(db_err("flush_wal", "*")),
            Engine::Memory { disk, incarnation } => disk.sync(*incarnation),
        }
    }

    /// Returns the last pair of `cf` in `[from, to)`.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<Pair>> {
        let db = match &self.engine {
            Engine::Rocks(db) => db,
            Engine::Memory { disk, incarnation } => {
                let range = (Bound::Included(from), Bound::Excluded(to));
                return Ok(disk.scan(*incarnation, cf, range, 1, true)?.pop());
            }
        };
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(from.to_vec());
        options.set_iterate_upper_bound(to.to_vec());
        let mut iter = db.iterator_cf_opt(Self::handle(db, cf), options, IteratorMode::End);
        match iter.next() {
            Some(Ok((key, value))) => Ok(Some((key.to_vec(), value.to_vec()))),
            Some(Err(source)) => Err(StorageError::Db {
                op: "iterate",
                cf: cf.name(),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Creates a consistent checkpoint (hard links where possible) of the whole database in
    /// `dir`, which must not exist.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn checkpoint(&self, dir: &Path) -> Result<()> {
        let db = match &self.engine {
            Engine::Rocks(db) => db,
            Engine::Memory { disk, incarnation } => {
                // A real RocksDB holding what the simulated disk shows now.
                let copy = Self::open(dir, OpenMode::ReadWrite)?;
                for (cf, pairs) in disk.visible(*incarnation)? {
                    let changes = pairs.into_iter().map(|(key, value)| (cf, key, Some(value)));
                    copy.commit(changes, true)?;
                }
                return Ok(());
            }
        };
        let checkpoint =
            rocksdb::checkpoint::Checkpoint::new(db).map_err(db_err("checkpoint", "*"))?;
        checkpoint
            .create_checkpoint(dir)
            .map_err(db_err("checkpoint", "*"))
    }

    /// A read-only look at `shard`'s projections as they are now (see [`Reader`]).
    pub fn read(&self, shard: courier_proto::ShardId) -> Reader<'_> {
        Reader::new(self, shard)
    }

    /// Runs `work` over the database as it is at this moment, without holding up writes: on
    /// RocksDB this returns as soon as a RocksDB snapshot is taken, and `work` reads that
    /// snapshot on its own thread while writers go on. On the simulation's memory disk `work`
    /// runs here and now (the simulation stays on one thread, deterministic).
    ///
    /// # Errors
    /// [`StorageError::Disk`] when the thread cannot be started.
    pub fn at_this_moment<T: Send + 'static>(
        db: &Arc<Db>,
        work: impl FnOnce(&dyn ReadKv) -> T + Send + 'static,
    ) -> Result<AtThisMoment<T>> {
        if matches!(db.engine, Engine::Memory { .. }) {
            return Ok(AtThisMoment::Done(work(db.as_ref())));
        }
        let db = db.clone();
        let (taken, is_taken) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("courier-snapshot".to_owned())
            .spawn(move || {
                let Engine::Rocks(rocks) = &db.engine else {
                    unreachable!("checked above: a RocksDB engine");
                };
                let view = RocksAt {
                    db: rocks,
                    snapshot: rocks.snapshot(),
                };
                // The receiver waits for this; if it is gone, nobody wants the result either.
                let _ = taken.send(());
                work(&view)
            })
            .map_err(|error| StorageError::Disk {
                op: "spawn snapshot thread",
                reason: error.to_string(),
            })?;
        // Microseconds: the thread starts and takes the snapshot, nothing more.
        is_taken.recv().map_err(|_| StorageError::Disk {
            op: "take snapshot",
            reason: "the snapshot thread ended before taking it".to_owned(),
        })?;
        Ok(AtThisMoment::Running(handle))
    }
}

/// What [`Db::at_this_moment`] started.
#[derive(Debug)]
pub enum AtThisMoment<T> {
    /// Finished already (memory disk).
    Done(T),
    /// Reading a RocksDB snapshot on its own thread; join it for the result.
    Running(std::thread::JoinHandle<T>),
}

/// A RocksDB snapshot, read like the database.
struct RocksAt<'a> {
    db: &'a DB,
    snapshot: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl ReadKv for RocksAt<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snapshot
            .get_cf(Db::handle(self.db, cf), key)
            .map_err(db_err("get", cf.name()))
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(to.to_vec());
        let iter = self.snapshot.iterator_cf_opt(
            Db::handle(self.db, cf),
            options,
            IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        collect(iter, cf, limit)
    }
}

/// Up to `limit` pairs of a RocksDB iterator.
fn collect(
    iter: impl Iterator<Item = std::result::Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
    cf: Cf,
    limit: usize,
) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for item in iter.take(limit) {
        let (key, value) = item.map_err(|source| StorageError::Db {
            op: "iterate",
            cf: cf.name(),
            source,
        })?;
        pairs.push((key.to_vec(), value.to_vec()));
    }
    Ok(pairs)
}

impl ReadKv for Db {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match &self.engine {
            Engine::Rocks(db) => db
                .get_cf(Self::handle(db, cf), key)
                .map_err(db_err("get", cf.name())),
            Engine::Memory { disk, incarnation } => disk.get(*incarnation, cf, key),
        }
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let db = match &self.engine {
            Engine::Rocks(db) => db,
            Engine::Memory { disk, incarnation } => {
                let range = (Bound::Included(from), Bound::Excluded(to));
                return disk.scan(*incarnation, cf, range, limit, false);
            }
        };
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(to.to_vec());
        let iter = db.iterator_cf_opt(
            Self::handle(db, cf),
            options,
            IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        collect(iter, cf, limit)
    }
}
