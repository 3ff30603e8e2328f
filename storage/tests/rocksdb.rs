//! Storage on a real RocksDB: the conformance suite (same histories on RocksDB and in memory),
//! the log store (append, read, truncate, purge, raft state), checksum faults, snapshots, and a
//! crash test that SIGKILLs a child process while it appends and applies.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_proto::{LogIndex, ShardId};
use courier_storage::kv::Change;
use courier_storage::rebuild::{self, Rebuilt};
use courier_storage::shard::Committed;
use courier_storage::testkit::{self, EventGen, Rng};
use courier_storage::{
    AtThisMoment, Cf, Db, LogRecord, LogStore, MemKv, OpenMode, Projection, ReadKv, ShardState,
    StorageError,
};

const SHARD: ShardId = ShardId::new(2);

fn open(dir: &std::path::Path) -> Arc<Db> {
    Arc::new(Db::open(dir, OpenMode::ReadWrite).expect("opens"))
}

/// Appends generated entries to the log and applies them, `batch` entries at a time, as a
/// replica would.
fn append_and_apply(
    db: &Db,
    log: &LogStore,
    state: &mut ShardState,
    generator: &mut EventGen,
    entries: usize,
    batch: usize,
) {
    let mut left = entries;
    while left > 0 {
        let n = batch.min(left);
        left -= n;
        testkit::append_and_apply(db, log, state, &generator.payloads(n, 4));
    }
}

fn all_pairs(kv: &dyn ReadKv, cf: Cf) -> Vec<(Vec<u8>, Vec<u8>)> {
    kv.scan(cf, &[], &[0xff, 0xff, 0xff], usize::MAX)
        .expect("scan")
}

/// The conformance suite: RocksDB and memory hold the same pairs and digests after the same
/// history, and a rebuild from the RocksDB log matches both.
#[test]
fn rocksdb_and_memory_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let log = LogStore::new(db.clone(), SHARD);
    let mut state = ShardState::empty(SHARD);
    append_and_apply(&db, &log, &mut state, &mut EventGen::new(SHARD, 7), 400, 16);

    let mut mem = MemKv::default();
    let mut mem_state = ShardState::empty(SHARD);
    let mut generator = EventGen::new(SHARD, 7);
    for payload in generator.payloads(400, 4) {
        let index = mem_state.applied.next();
        let batch = mem_state
            .apply_batch(
                &mem,
                &[Committed {
                    index,
                    payload: Some(&payload),
                }],
                Vec::new(),
            )
            .expect("memory");
        mem.write(batch.changes);
        mem_state = batch.next;
    }
    assert_eq!(state, mem_state, "same applied index and digests");
    for projection in Projection::ALL {
        let cf = Cf::Projection(projection);
        assert_eq!(
            all_pairs(db.as_ref(), cf),
            all_pairs(&mem, cf),
            "{}",
            projection.name()
        );
    }
    let reopened = ShardState::load(db.as_ref(), SHARD).expect("load");
    assert_eq!(
        reopened, state,
        "the applied state is stored with the projections"
    );

    let rebuilt = rebuild::replay_from_start(&log, state.applied).expect("replay");
    let comparisons =
        rebuild::compare(db.as_ref(), &state, &rebuilt, &Projection::ALL, 5).expect("compare");
    for comparison in comparisons {
        assert!(comparison.is_equal(), "{comparison:?}");
    }

    // A replay may hold at most the memory it is given: bounded below what the projections
    // take, it stops with ReplayTooLarge instead of growing on.
    let taken = rebuilt.kv.bytes();
    assert!(taken > 0);
    let bounded = |max: usize| {
        rebuild::replay(
            &log,
            (MemKv::default(), ShardState::empty(SHARD)),
            state.applied,
            max,
            &mut |_, _| {},
        )
    };
    match bounded(taken - 1) {
        Err(StorageError::ReplayTooLarge { bytes, max, .. }) => {
            assert_eq!(max, taken - 1);
            assert!(bytes > max, "{bytes} > {max}");
        }
        other => panic!("expected ReplayTooLarge, got {:?}", other.map(|r| r.events)),
    }
}

#[test]
fn log_store_append_read_truncate_purge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let log = LogStore::new(db.clone(), SHARD);
    let other = LogStore::new(db, ShardId::new(3));
    let record = |i: u64| LogRecord {
        index: LogIndex::new(i),
        term: 1 + i / 10,
        payload: vec![i as u8; 8],
    };
    log.append(&(1..=30).map(record).collect::<Vec<_>>())
        .expect("append");
    other.append(&[record(1)]).expect("append to another shard");
    assert_eq!(
        log.read_range(LogIndex::new(5), LogIndex::new(8))
            .expect("read"),
        (5..8).map(record).collect::<Vec<_>>()
    );
    assert_eq!(log.last().expect("last"), Some(record(30)));
    log.truncate_from(LogIndex::new(21)).expect("truncate");
    assert_eq!(log.last().expect("last"), Some(record(20)));
    log.purge_up_to(LogIndex::new(10)).expect("purge");
    assert_eq!(log.first_index().expect("first"), Some(LogIndex::new(11)));
    assert_eq!(
        other.last().expect("other shard untouched"),
        Some(record(1))
    );
    log.save_state(1, b"vote-bytes").expect("save");
    assert_eq!(
        log.read_state(1).expect("read").as_deref(),
        Some(&b"vote-bytes"[..])
    );
    assert_eq!(other.read_state(1).expect("read"), None);
}

/// `stores_every` sees a hole a snapshot install left (`delete_between`) and a missing end, in
/// any chunk of its scan, and says yes only for a range wholly stored.
#[test]
fn stores_every_finds_holes_and_missing_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::new(open(dir.path()), SHARD);
    let entries = u64::try_from(LogStore::CHECK_CHUNK * 2 + 100).expect("fits");
    let records: Vec<_> = (1..=entries)
        .map(|i| LogRecord {
            index: LogIndex::new(i),
            term: 1,
            payload: vec![1; 4],
        })
        .collect();
    log.append(&records).expect("append");
    let every = |from: u64, to: u64| {
        log.stores_every(LogIndex::new(from), LogIndex::new(to))
            .expect("reads")
    };
    assert!(every(1, entries), "all of it");
    assert!(!every(1, entries + 1), "one past the last");
    let hole = entries - 50;
    log.delete_between(LogIndex::new(hole), LogIndex::new(hole + 2))
        .expect("delete");
    assert!(!every(1, entries), "a hole in the third chunk");
    assert!(every(1, hole - 1) && every(hole + 2, entries), "around it");
    log.purge_up_to(LogIndex::new(10)).expect("purge");
    assert!(!every(5, 20), "purged below");
    assert!(every(11, 20));
}

/// Flipping one byte of a stored entry makes reading it a checksum fault, never a skip.
#[test]
fn corrupted_entry_is_a_checksum_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let log = LogStore::new(db.clone(), SHARD);
    let records: Vec<LogRecord> = (1..=3)
        .map(|i| LogRecord {
            index: LogIndex::new(i),
            term: 1,
            payload: b"payload".to_vec(),
        })
        .collect();
    log.append(&records).expect("append");
    let key = courier_storage::keys::log_entry(SHARD, LogIndex::new(2));
    let mut value = db.get(Cf::Log, &key).expect("get").expect("stored");
    let last = value.len() - 1;
    value[last] ^= 0x01;
    let change: Change = (Cf::Log, key, Some(value));
    db.commit([change], true).expect("overwrite");
    let err = log
        .read_range(LogIndex::new(1), LogIndex::new(4))
        .expect_err("corruption is detected");
    assert!(matches!(err, StorageError::Checksum { .. }), "{err}");
    assert!(
        err.to_string().contains("index 2"),
        "names the entry: {err}"
    );

    log.save_state(1, b"vote").expect("save");
    let key = courier_storage::keys::raft_state(SHARD, 1);
    let mut value = db.get(Cf::RaftState, &key).expect("get").expect("stored");
    value[5] ^= 0xff;
    db.commit([(Cf::RaftState, key, Some(value))], true)
        .expect("overwrite");
    assert!(matches!(
        log.read_state(1),
        Err(StorageError::Checksum { .. })
    ));
}

/// A second process cannot open a database in use.
#[test]
fn database_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _db = open(dir.path());
    let err = Db::open(dir.path(), OpenMode::ReadWrite).expect_err("locked");
    assert!(
        err.to_string().contains("LOCK") || err.to_string().contains("lock"),
        "{err}"
    );
}

/// A snapshot from one replica installs on another database and matches digest for digest.
#[test]
fn snapshot_installs_on_rocksdb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let log = LogStore::new(db.clone(), SHARD);
    let mut state = ShardState::empty(SHARD);
    append_and_apply(
        &db,
        &log,
        &mut state,
        &mut EventGen::new(SHARD, 11),
        200,
        10,
    );
    let chunks = courier_storage::snapshot::export(db.as_ref(), &state).expect("export");
    assert!(chunks.len() >= 2, "applied state plus records");

    let dir2 = tempfile::tempdir().expect("tempdir");
    let db2 = open(dir2.path());
    let install = courier_storage::snapshot::prepare_install(SHARD, chunks).expect("verifies");
    db2.replace_ranges(&install.clear, install.changes, true)
        .expect("install");
    assert_eq!(ShardState::load(db2.as_ref(), SHARD).expect("load"), state);
    for projection in Projection::ALL {
        let cf = Cf::Projection(projection);
        assert_eq!(
            all_pairs(db.as_ref(), cf),
            all_pairs(db2.as_ref(), cf),
            "{}",
            projection.name()
        );
    }
}

/// A snapshot pinned with `Db::at_this_moment` exports the shard as it was when pinned while
/// applying goes on beside it (a raft snapshot no longer holds the apply lock while it
/// exports): the export installs as exactly the pinned state, and its digests (checked by
/// `prepare_install`) would refuse data read after the moment.
#[test]
fn a_pinned_export_sees_its_moment_while_applying_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let log = LogStore::new(db.clone(), SHARD);
    let mut state = ShardState::empty(SHARD);
    let mut generator = EventGen::new(SHARD, 12);
    append_and_apply(&db, &log, &mut state, &mut generator, 200, 10);
    let pinned = state.clone();
    let (go, wait) = std::sync::mpsc::sync_channel::<()>(1);
    let export = {
        let pinned = pinned.clone();
        Db::at_this_moment(&db, move |kv| {
            wait.recv().expect("released by the test");
            courier_storage::snapshot::export(kv, &pinned)
        })
        .expect("pins")
    };
    // The export waits for `go`: if it held up writes, this would never return.
    append_and_apply(&db, &log, &mut state, &mut generator, 100, 10);
    assert_ne!(state, pinned, "the shard moved on after the moment");
    go.send(()).expect("the export waits");
    let chunks = match export {
        AtThisMoment::Running(thread) => thread.join().expect("thread").expect("export"),
        AtThisMoment::Done(_) => panic!("RocksDB exports on its own thread"),
    };
    let dir2 = tempfile::tempdir().expect("tempdir");
    let db2 = open(dir2.path());
    let install = courier_storage::snapshot::prepare_install(SHARD, chunks)
        .expect("the export matches the pinned digests");
    db2.replace_ranges(&install.clear, install.changes, true)
        .expect("install");
    assert_eq!(ShardState::load(db2.as_ref(), SHARD).expect("load"), pinned);
}

const CHILD_ENV: &str = "COURIER_STORAGE_CRASH_CHILD";
const CHILD_SHARD_ENV: &str = "COURIER_STORAGE_CRASH_SHARD";

/// Child side of the crash test: append and apply forever on a fresh shard, reporting each
/// durable append.
fn crash_child(dir: &str, shard: ShardId, seed: u64) {
    let db = open(std::path::Path::new(dir));
    let log = LogStore::new(db.clone(), shard);
    let mut state = ShardState::load(db.as_ref(), shard).expect("load");
    assert_eq!(
        state.applied,
        LogIndex::ZERO,
        "each child starts a fresh shard"
    );
    let mut generator = EventGen::new(shard, seed);
    let mut stdout = std::io::stdout();
    loop {
        let records_from = log
            .last()
            .expect("last")
            .map_or(LogIndex::ZERO, |r| r.index)
            .next();
        let payloads = generator.payloads(4, 3);
        let records = testkit::records(records_from, &payloads);
        log.append(&records).expect("append");
        let last = records.last().expect("four records").index;
        writeln!(stdout, "durable {last}").expect("parent reads");
        stdout.flush().expect("flush");
        if state.applied.next() == records_from {
            testkit::apply(db.as_ref(), &mut state, &records, &payloads);
        }
    }
}

/// Kills a child process at random points while it appends and applies; after each kill, the
/// log holds every entry reported durable, and the applied projections equal a rebuild from the
/// log at the same index.
#[test]
// The harness times the child's run; the clock ban is for projections, not for test harnesses.
#[allow(clippy::disallowed_methods)]
fn crash_keeps_every_durable_append() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let shard: u16 = std::env::var(CHILD_SHARD_ENV)
            .expect("shard")
            .parse()
            .expect("a shard");
        crash_child(&dir, ShardId::new(shard), 99);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(0x00c0_ffee);
    let iterations: u16 = 12;
    for iteration in 0..iterations {
        let shard = ShardId::new(iteration);
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "crash_keeps_every_durable_append",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(CHILD_SHARD_ENV, iteration.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("piped");
        // The kill lands at a random point 0-250 ms after the child's first durable append
        // (measured from its first report, so a slow start under load cannot void the run).
        let run_for = Duration::from_millis(rng.below(250));
        let (first_tx, first_rx) = std::sync::mpsc::sync_channel(1);
        let reader = std::thread::spawn(move || {
            let mut durable = LogIndex::ZERO;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(index) = line.strip_prefix("durable ") {
                    if durable == LogIndex::ZERO {
                        let _ = first_tx.try_send(());
                    }
                    durable = LogIndex::new(index.parse().expect("an index"));
                }
            }
            durable
        });
        first_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child reports its first append");
        let started = Instant::now();
        while started.elapsed() < run_for {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        let durable = reader.join().expect("reader");

        let db = open(dir.path());
        let log = LogStore::new(db.clone(), shard);
        let last = log
            .last()
            .expect("last")
            .map_or(LogIndex::ZERO, |r| r.index);
        assert!(
            durable > LogIndex::ZERO,
            "iteration {iteration}: the child appended before it was killed"
        );
        assert!(
            last >= durable,
            "iteration {iteration}: log ends at {last}, child reported {durable} durable"
        );
        let state = ShardState::load(db.as_ref(), shard).expect("load");
        assert!(state.applied <= last, "nothing is applied beyond the log");
        let rebuilt: Rebuilt = rebuild::replay_from_start(&log, state.applied).expect("replay");
        for comparison in
            rebuild::compare(db.as_ref(), &state, &rebuilt, &Projection::ALL, 3).expect("compare")
        {
            assert!(
                comparison.is_equal(),
                "iteration {iteration}: {comparison:?}"
            );
        }
        drop(log);
        drop(db);
    }
}

/// Copies the files of a closed database into a fresh directory.
fn copy_db(from: &std::path::Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.path().join(entry.file_name())).expect("copy");
        }
    }
    to
}

/// The write-ahead log of a closed database (its entries are still there: nothing flushed them
/// to a table file).
fn wal_of(dir: &std::path::Path) -> std::path::PathBuf {
    let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .filter(|path| std::fs::metadata(path).is_ok_and(|m| m.len() > 0))
        .collect();
    logs.sort();
    logs.pop().expect("a write-ahead log with records")
}

/// RocksDB's write-ahead log after a crash: a torn last record (a write that never returned)
/// is dropped and the database opens with every earlier write; a damaged record before the
/// end refuses the open instead of recovering to the point before it, which would silently
/// drop appends that were acknowledged as durable (raft entries and votes included).
#[test]
fn a_damaged_wal_record_refuses_the_open_and_a_torn_tail_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = open(dir.path());
        let log = LogStore::new(db.clone(), SHARD);
        let payloads = EventGen::new(SHARD, 11).payloads(40, 2);
        // One synced write per entry: one WAL record each.
        for (n, payload) in payloads.iter().enumerate() {
            let index = LogIndex::new(u64::try_from(n).expect("small") + 1);
            log.append(&testkit::records(index, std::slice::from_ref(payload)))
                .expect("append");
        }
    }

    let torn = copy_db(dir.path());
    let wal = wal_of(torn.path());
    let len = std::fs::metadata(&wal).expect("wal").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .expect("open wal")
        .set_len(len - 5)
        .expect("truncate");
    let db = open(torn.path());
    let last = LogStore::new(db.clone(), SHARD)
        .last()
        .expect("last")
        .expect("entries")
        .index;
    assert_eq!(
        last,
        LogIndex::new(39),
        "the torn last write is dropped, every one before it kept"
    );
    drop(db);

    let damaged = copy_db(dir.path());
    let wal = wal_of(damaged.path());
    let mut bytes = std::fs::read(&wal).expect("read wal");
    // Inside the first record's payload (after the 7-byte record header): its checksum fails.
    bytes[64] ^= 0xff;
    std::fs::write(&wal, &bytes).expect("write wal");
    match Db::open(damaged.path(), OpenMode::ReadWrite) {
        Err(StorageError::Db { .. }) => {}
        Err(other) => panic!("expected a RocksDB corruption error, got {other:?}"),
        Ok(db) => {
            let last = LogStore::new(Arc::new(db), SHARD).last().expect("last");
            panic!("a damaged record before the end opened, the log now ending at {last:?}");
        }
    }
}
