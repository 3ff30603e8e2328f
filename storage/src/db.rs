//! The node's one RocksDB: open, read, and atomic batch writes. Every shard replica on the node
//! shares it, separated by the shard prefix of every key.
//!
//! Durability: log appends and raft state writes are synced (WAL fsync) before they return; there
//! is no switch to turn this off. Apply batches are written without their own fsync: they are
//! ordered after the synced log writes in the same WAL and can always be re-derived from the log,
//! and [`Db::sync_wal`] runs before anything the log cannot re-derive (a purge).

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use crate::cf::Cf;
use crate::error::{Result, StorageError, db_err};
use crate::kv::{Change, Pair, ReadKv};

/// How a database is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// A node's own database: created if missing, exclusive (RocksDB's lock file).
    ReadWrite,
    /// An operator tool on a stopped node's database: nothing is written.
    ReadOnly,
}

/// One RocksDB with courier's column families.
pub struct Db {
    db: DB,
    path: PathBuf,
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
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    /// The directory this database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every `Cf` is created at open (create_missing_column_families), so the handle exists.
        self.db
            .cf_handle(cf.name())
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
        let mut batch = WriteBatch::default();
        for (cf, from, to) in ranges {
            batch.delete_range_cf(self.handle(*cf), from, to);
        }
        for (cf, key, value) in changes {
            match value {
                Some(value) => batch.put_cf(self.handle(cf), key, value),
                None => batch.delete_cf(self.handle(cf), key),
            }
        }
        self.write(batch, sync)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db
            .write_opt(batch, &options)
            .map_err(db_err("write", "*"))
    }

    /// Fsyncs the WAL, making every earlier write durable.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(db_err("flush_wal", "*"))
    }

    /// Returns the last pair of `cf` in `[from, to)`.
    ///
    /// # Errors
    /// [`StorageError::Db`].
    pub fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<Pair>> {
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(from.to_vec());
        options.set_iterate_upper_bound(to.to_vec());
        let mut iter = self
            .db
            .iterator_cf_opt(self.handle(cf), options, IteratorMode::End);
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
        let checkpoint =
            rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(db_err("checkpoint", "*"))?;
        checkpoint
            .create_checkpoint(dir)
            .map_err(db_err("checkpoint", "*"))
    }
}

impl ReadKv for Db {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.handle(cf), key)
            .map_err(db_err("get", cf.name()))
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(to.to_vec());
        let iter = self.db.iterator_cf_opt(
            self.handle(cf),
            options,
            IteratorMode::From(from, rocksdb::Direction::Forward),
        );
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
}
