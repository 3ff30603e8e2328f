//! openraft's storage conformance suite (35 cases) on the RocksDB-backed log store and state
//! machine, and again on the simulation's in-memory disk (`MemDisk`), so the simulation runs
//! the consensus layer on a store that passes the same suite. Runs from plain `#[test]`s: the
//! suite builds its own runtime per case.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use courier_consensus::types::{GroupId, RaftStorageError, TypeConfig};
use courier_consensus::{LogStore, StateMachine};
use courier_storage::{Db, MemDisk, OpenMode};
use openraft::testing::{StoreBuilder, Suite};

struct Builder {
    root: tempfile::TempDir,
    next: AtomicU64,
    memdisk: bool,
}

fn group(n: u64) -> GroupId {
    GroupId::Shard(courier_proto::ShardId::new(
        u16::try_from(n % 7).expect("small"),
    ))
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), RaftStorageError> {
        // One directory per build: some cases build two stores at once.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::tempdir_in(self.root.path()).expect("tempdir");
        let db = Arc::new(if self.memdisk {
            Db::on_memdisk(Arc::new(MemDisk::new()), dir.path())
        } else {
            Db::open(dir.path(), OpenMode::ReadWrite).expect("open")
        });
        let group = group(n);
        let log = LogStore::new(courier_storage::LogStore::new(
            db.clone(),
            group.storage_prefix(),
        ));
        let sm = StateMachine::open(db, group)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    let builder = Builder {
        root: tempfile::tempdir().expect("tempdir"),
        next: AtomicU64::new(0),
        memdisk: false,
    };
    Suite::test_all(builder).expect("every case of openraft's storage suite passes");
}

#[test]
fn openraft_storage_suite_on_memdisk() {
    let builder = Builder {
        root: tempfile::tempdir().expect("tempdir"),
        next: AtomicU64::new(0),
        memdisk: true,
    };
    Suite::test_all(builder).expect("every case of openraft's storage suite passes on MemDisk");
}

/// The commit index is written once in `COMMITTED_SAVE_EVERY` calls (the first included): a
/// store opened again reads the last one written, never one ahead of what openraft gave, while
/// the store that was given them answers the latest.
#[test]
fn the_commit_index_is_written_once_in_every_few_calls() {
    use courier_consensus::log_store::COMMITTED_SAVE_EVERY;
    use openraft::storage::RaftLogStorage;
    use openraft::{CommittedLeaderId, LogId};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("open"));
        let prefix = group(0).storage_prefix();
        let open = || LogStore::new(courier_storage::LogStore::new(db.clone(), prefix));
        let id = |index| Some(LogId::new(CommittedLeaderId::new(1, 1), index));
        let mut store = open();
        let calls = COMMITTED_SAVE_EVERY + 3;
        for index in 1..=calls {
            store.save_committed(id(index)).await.expect("saved");
        }
        assert_eq!(store.read_committed().await.expect("read"), id(calls));
        let reopened = open().read_committed().await.expect("read");
        // Calls 1 and COMMITTED_SAVE_EVERY + 1 were written.
        assert_eq!(reopened, id(COMMITTED_SAVE_EVERY + 1));
    });
}
