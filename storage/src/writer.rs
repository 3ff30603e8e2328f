//! The node's log writer: one thread that writes the synced batches of every raft group on the
//! node (their log appends) as one RocksDB write batch with one WAL fsync.
//!
//! Each group's storage task hands its batch over and waits for the completion; the thread
//! takes the first request, then everything queued behind it (up to [`MERGE_MAX`]), writes them
//! together, and completes them in the order they arrived. The more groups append at once, the
//! more batches one fsync covers: fsyncs per message fall with load instead of rising, and no
//! tokio worker blocks in an fsync.
//!
//! Per group, order is kept by the caller: a group's storage task waits for one append before it
//! issues the next write. Across groups the batches are independent (disjoint key ranges).
//!
//! A failed write fails every request it carried and every later one: after an fsync error
//! nothing that was written can be trusted to be durable, so the replicas stop (the caller turns
//! the error into openraft's storage error).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rocksdb::{DB, WriteBatch, WriteOptions};

use crate::counters::DbCounters;
use crate::error::{Result, StorageError};
use crate::kv::Change;

/// Requests the writer queues at most: one per raft group a node can hold (every shard and the
/// metadata group). Each group has at most one append waiting (its storage task awaits it), so
/// the queue never fills and no caller blocks on it; a caller that did find it full would wait
/// for room.
#[allow(
    clippy::as_conversions,
    reason = "u32 into usize in a const, lossless on the 64-bit targets courier builds for"
)]
pub const QUEUE_MAX: usize = courier_proto::limits::SHARD_COUNT_MAX as usize + 1;
/// Requests merged into one write batch at most.
pub const MERGE_MAX: usize = 256;

/// Called once with the outcome of a synced write.
pub type Done = Box<dyn FnOnce(Result<()>) + Send>;

struct Request {
    changes: Vec<Change>,
    done: Done,
}

/// The handle of the writer thread. Dropping it lets the thread finish what is queued and waits
/// for it.
pub(crate) struct Writer {
    /// `None` only while dropping: closing it lets the thread finish.
    queue: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread over `db`.
    ///
    /// # Panics
    /// When the operating system refuses a thread.
    pub(crate) fn start(db: Arc<DB>, counters: Arc<DbCounters>) -> Self {
        let (queue, requests) = sync_channel(QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("courier-log-writer".to_owned())
            .spawn(move || run(&db, &requests, &counters))
            .expect("the log writer thread starts");
        Self {
            queue: Some(queue),
            thread: Some(thread),
        }
    }

    /// Queues `changes` for the next synced batch; `done` runs on the writer thread once it is
    /// durable (or failed).
    pub(crate) fn submit(&self, changes: Vec<Change>, done: Done) {
        let request = Request { changes, done };
        // Never full (see QUEUE_MAX); a full queue would make this wait for room.
        let sent = match &self.queue {
            Some(queue) => queue.send(request).map_err(|refused| refused.0),
            None => Err(request),
        };
        if let Err(request) = sent {
            (request.done)(Err(stopped()));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // A completion that dropped the last handle runs on the writer thread itself, which
            // ends on its own once the queue is closed; any other thread waits for it.
            if thread.thread().id() != std::thread::current().id() {
                // The thread ends once the queue is drained; a panic in it is already reported.
                let _ = thread.join();
            }
        }
    }
}

fn stopped() -> StorageError {
    StorageError::Disk {
        op: "write",
        reason: "the log writer has stopped".to_owned(),
    }
}

fn failed(error: &rocksdb::Error) -> StorageError {
    StorageError::Db {
        op: "synced write",
        cf: "*",
        source: error.clone(),
    }
}

fn run(db: &DB, requests: &Receiver<Request>, counters: &DbCounters) {
    let mut poisoned: Option<rocksdb::Error> = None;
    let mut options = WriteOptions::default();
    options.set_sync(true);
    while let Ok(first) = requests.recv() {
        let mut merged = vec![first];
        while merged.len() < MERGE_MAX {
            match requests.try_recv() {
                Ok(request) => merged.push(request),
                Err(_) => break,
            }
        }
        if poisoned.is_none() {
            let mut batch = WriteBatch::default();
            for request in &mut merged {
                for (cf, key, value) in request.changes.drain(..) {
                    let handle = db
                        .cf_handle(cf.name())
                        .expect("column family declared in cf.rs exists");
                    match value {
                        Some(value) => batch.put_cf(handle, key, value),
                        None => batch.delete_cf(handle, key),
                    }
                }
            }
            if let Err(error) = db.write_opt(batch, &options) {
                poisoned = Some(error);
            }
            counters.synced_writes.fetch_add(1, Ordering::Relaxed);
            counters.write_batches.fetch_add(1, Ordering::Relaxed);
            counters.merged_writes.fetch_add(
                u64::try_from(merged.len()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
        for request in merged {
            (request.done)(poisoned.as_ref().map_or(Ok(()), |e| Err(failed(e))));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::SyncSender as Sender;

    use super::*;
    use crate::cf::Cf;
    use crate::db::OpenMode;
    use crate::kv::ReadKv;

    fn rocks(path: &std::path::Path, mode: OpenMode) -> Arc<DB> {
        let families: Vec<_> = Cf::all()
            .map(|cf| rocksdb::ColumnFamilyDescriptor::new(cf.name(), cf.options()))
            .collect();
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        Arc::new(
            match mode {
                OpenMode::ReadWrite => DB::open_cf_descriptors(&options, path, families),
                OpenMode::ReadOnly => {
                    DB::open_cf_descriptors_read_only(&options, path, families, false)
                }
            }
            .expect("open"),
        )
    }

    /// Queues `count` one-key writes (key = its number) whose completions report to `done`.
    fn queue(count: u16, done: &Sender<(u16, bool)>) -> Receiver<Request> {
        let (queue, requests) = sync_channel(QUEUE_MAX);
        for i in 0..count {
            let done = done.clone();
            let request = Request {
                changes: vec![(Cf::Log, i.to_be_bytes().to_vec(), Some(vec![7]))],
                done: Box::new(move |result| done.send((i, result.is_ok())).expect("test waits")),
            };
            queue.send(request).expect("room");
        }
        requests
    }

    #[test]
    fn what_waits_together_is_one_fsync_completed_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = rocks(dir.path(), OpenMode::ReadWrite);
        let counters = DbCounters::default();
        let (done, completions) = sync_channel(QUEUE_MAX);
        // Everything is queued before the writer runs: it must take it as one batch, except
        // what passes MERGE_MAX.
        let count = u16::try_from(MERGE_MAX.saturating_add(10)).expect("small");
        run(&db, &queue(count, &done), &counters);
        drop(done);
        let order: Vec<(u16, bool)> = completions.iter().collect();
        assert_eq!(
            order,
            (0..count).map(|i| (i, true)).collect::<Vec<_>>(),
            "every request completes once, in the order it was queued"
        );
        assert_eq!(counters.synced_writes.load(Ordering::Relaxed), 2);
        assert_eq!(
            counters.merged_writes.load(Ordering::Relaxed),
            u64::from(count)
        );
        drop(db);
        let reopened = crate::db::Db::open(dir.path(), OpenMode::ReadOnly).expect("reopen");
        for i in 0..count {
            assert_eq!(
                reopened.get(Cf::Log, &i.to_be_bytes()).expect("read"),
                Some(vec![7]),
                "request {i} is stored"
            );
        }
    }

    #[test]
    fn a_failed_write_fails_every_request_it_carried() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(rocks(dir.path(), OpenMode::ReadWrite));
        // RocksDB refuses writes to a database opened read-only: the writer's batch fails.
        let db = rocks(dir.path(), OpenMode::ReadOnly);
        let counters = DbCounters::default();
        let (done, completions) = sync_channel(QUEUE_MAX);
        run(&db, &queue(3, &done), &counters);
        drop(done);
        let order: Vec<(u16, bool)> = completions.iter().collect();
        assert_eq!(order, vec![(0, false), (1, false), (2, false)]);
    }

    #[test]
    fn a_database_handle_writes_through_its_writer_and_closes_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::db::Db::open(dir.path(), OpenMode::ReadWrite).expect("open");
        let (done, completion) = sync_channel(1);
        db.commit_synced(
            vec![(Cf::Log, b"k".to_vec(), Some(b"v".to_vec()))],
            Box::new(move |result| done.send(result.is_ok()).expect("test waits")),
        );
        assert!(completion.recv().expect("completed"));
        assert_eq!(db.counters().merged_writes.load(Ordering::Relaxed), 1);
        // Dropping the handle stops the writer and closes RocksDB: the lock is free again.
        drop(db);
        let reopened = crate::db::Db::open(dir.path(), OpenMode::ReadWrite).expect("reopen");
        assert_eq!(
            reopened.get(Cf::Log, b"k").expect("read"),
            Some(b"v".to_vec())
        );
    }
}
