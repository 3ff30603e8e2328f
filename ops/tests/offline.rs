//! `courier-ops verify` and `log dump` on a real data directory: a healthy shard verifies; a
//! projection value changed behind the log's back is reported with its shard, divergent index
//! and key, and the command exits 1.

// Functions stay within clippy.toml's too-many-lines-threshold (STYLE.md section 10).
#![warn(clippy::too_many_lines)]

use std::process::Command;
use std::sync::Arc;

use courier_proto::ShardId;
use courier_storage::testkit::{self, EventGen};
use courier_storage::{Cf, Db, LogStore, OpenMode, Projection, ReadKv, ShardState};

const SHARD: ShardId = ShardId::new(4);

/// A data directory holding one replica of `SHARD`: its log, projections and a raft state record
/// (a vote), which is what makes a shard one of a directory's replicas.
fn populate(data_dir: &std::path::Path) {
    let db = Arc::new(Db::open(&data_dir.join("db"), OpenMode::ReadWrite).expect("open"));
    let log = LogStore::new(db.clone(), SHARD);
    log.save_state(1, b"vote").expect("vote");
    let mut state = ShardState::empty(SHARD);
    let mut generator = EventGen::new(SHARD, 5);
    for _ in 0..20 {
        testkit::append_and_apply(db.as_ref(), &log, &mut state, &generator.payloads(10, 4));
    }
    db.sync_wal().expect("sync");
}

fn ops(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_courier-ops"))
        .args(args)
        .output()
        .expect("run courier-ops");
    (
        output.status.code().expect("exited"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn verify_finds_a_corrupted_projection_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    let data_dir = dir.path().to_str().expect("utf-8");

    let (code, out) = ops(&["verify", "--data-dir", data_dir, "--shard", "4"]);
    assert_eq!(code, 0, "a healthy shard verifies:\n{out}");
    assert_eq!(out.matches(" ok").count(), Projection::ALL.len(), "{out}");

    let (code, out) = ops(&[
        "log",
        "dump",
        "--data-dir",
        data_dir,
        "--shard",
        "4",
        "--from",
        "1",
        "--to",
        "3",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .all(|l| l.starts_with("1 ") || l.starts_with("2 ") || l.starts_with("3 ")),
        "{out}"
    );

    // Change one inbox value behind the log's back (same key, different bytes).
    let (key, corrupted) = {
        let db = Db::open(&dir.path().join("db"), OpenMode::ReadWrite).expect("open");
        let cf = Cf::Projection(Projection::Inbox);
        let (key, mut value) = db
            .scan(cf, &[0, 4], &[0, 5], 1)
            .expect("scan")
            .pop()
            .expect("an inbox entry");
        let last = value.len() - 1;
        value[last] ^= 0x5a;
        db.commit([(cf, key.clone(), Some(value.clone()))], true)
            .expect("corrupt");
        (key, value)
    };
    let (code, out) = ops(&[
        "verify",
        "--data-dir",
        data_dir,
        "--shard",
        "4",
        "--projection",
        "inbox",
    ]);
    assert_eq!(code, 1, "a mismatch exits 1:\n{out}");
    assert!(out.contains("MISMATCH"), "{out}");
    let key_hex = courier_storage::projection::hex(&key);
    assert!(
        out.contains(&format!("key {key_hex}")),
        "names the key {key_hex}:\n{out}"
    );
    assert!(
        out.contains(&courier_storage::projection::hex(&corrupted)),
        "shows the actual value:\n{out}"
    );
    let set_at = u64::from_be_bytes(corrupted[..8].try_into().expect("8 bytes"));
    assert!(
        out.contains(&format!("first divergent index {set_at}")),
        "names the index:\n{out}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _) = ops(&[
        "verify",
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
        "--shard",
        "0",
    ]);
    assert_eq!(code, 2, "an empty directory is a usage error");
    let (code, _) = ops(&["health", "--addr", "127.0.0.1:1"]);
    assert_eq!(code, 2, "an unreachable address is a connection error");
}

/// `inspect user --at` shows the inbox as it was at that index (checked against a replay to the
/// same index), with the index that set each value.
#[test]
fn inspect_shows_earlier_state() {
    use courier_proto::{LogIndex, UserId, shard_of};
    use courier_storage::kv::Staged;
    use courier_storage::projection::{View, inbox};
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    // A (user, shard count) pair that places a generated user (1..=4) on the populated shard.
    let (user, shards) = (1..=4_u64)
        .flat_map(|u| (5..=200_u16).map(move |s| (u, s)))
        .find(|(u, s)| shard_of(UserId::new(*u).expect("id"), *s) == SHARD)
        .expect("some shard count maps a user to shard 4");
    let db = Arc::new(Db::open(&dir.path().join("db"), OpenMode::ReadOnly).expect("open"));
    let log = LogStore::new(db.clone(), SHARD);
    let tail_at = |at: u64| {
        let rebuilt =
            courier_storage::rebuild::replay_from_start(&log, LogIndex::new(at)).expect("replay");
        let mut staged = Staged::new(&rebuilt.kv, std::collections::BTreeMap::new());
        let view = View::new(&mut staged, SHARD, LogIndex::ZERO, Projection::Inbox);
        inbox::tail(&view, UserId::new(user).expect("id"))
            .expect("read")
            .get()
    };
    let (early, late) = (tail_at(40), tail_at(200));
    assert!(
        early < late,
        "the user received messages between index 40 and 200 ({early} vs {late})"
    );
    drop(db);
    let data_dir = dir.path().to_str().expect("utf-8");
    let (user_arg, shards_arg) = (user.to_string(), shards.to_string());
    let (code, out) = ops(&[
        "inspect",
        "user",
        "--data-dir",
        data_dir,
        "--user",
        &user_arg,
        "--shards",
        &shards_arg,
        "--at",
        "40",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("at log index 40"), "{out}");
    assert!(
        out.contains(&format!("inbox: tail {early} ")),
        "the earlier tail {early}:\n{out}"
    );
    let (code, out) = ops(&[
        "inspect",
        "user",
        "--data-dir",
        data_dir,
        "--user",
        &user_arg,
        "--shards",
        &shards_arg,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("inbox: tail {late} ")),
        "the current tail {late}:\n{out}"
    );
    assert!(
        out.contains("(set at "),
        "values carry the index that set them:\n{out}"
    );
}

/// A restore whose checkpoint has a log entry that fails its checksum reports the shard as not
/// verified, exits 1 and leaves nothing behind, so it can be retried from another checkpoint
/// into the same directory (before, the fault ended the command with exit 2 and the unverified
/// copy stayed in place, where the retry was refused and a node could start on it).
#[test]
fn a_restore_that_meets_a_corrupt_log_entry_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoint = dir.path().join("checkpoint");
    populate(&checkpoint);
    {
        let db = Db::open(&checkpoint.join("db"), OpenMode::ReadWrite).expect("open");
        let key = courier_storage::keys::log_entry(SHARD, courier_proto::LogIndex::new(7));
        let mut value = db.get(Cf::Log, &key).expect("get").expect("stored");
        let last = value.len() - 1;
        value[last] ^= 0x01;
        db.commit([(Cf::Log, key, Some(value))], true)
            .expect("corrupt");
    }
    let target = dir.path().join("node4");
    std::fs::create_dir_all(&target).expect("mkdir");
    let from = checkpoint.join("db");
    let args = [
        "restore",
        "--from",
        from.to_str().expect("utf-8"),
        "--data-dir",
        target.to_str().expect("utf-8"),
    ];
    let (code, out) = ops(&args);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("NOT VERIFIED") && out.contains("checksum"),
        "{out}"
    );
    assert!(out.contains("restore FAILED"), "{out}");
    assert!(
        !target.join("db").exists(),
        "the unverified copy is removed"
    );
}

/// Asking about what a data directory does not hold, or for a range that names nothing, is a
/// usage error (exit 2), never an "ok": a shard with no replica here verified as equal before
/// (an empty replay against nothing), and `log dump --to 0` dumped the whole log.
#[test]
fn a_shard_or_range_that_is_not_there_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    let data_dir = dir.path().to_str().expect("utf-8");

    let (code, out) = ops(&["verify", "--data-dir", data_dir, "--shard", "3"]);
    assert_eq!(code, 2, "shard 3 has no replica here: {out}");
    let (code, out) = ops(&[
        "rebuild",
        "--data-dir",
        data_dir,
        "--shard",
        "3",
        "--projection",
        "inbox",
        "--yes",
    ]);
    assert_eq!(code, 2, "nothing to rebuild: {out}");
    for range in [["--from", "5", "--to", "3"], ["--from", "1", "--to", "0"]] {
        let mut args = vec!["log", "dump", "--data-dir", data_dir, "--shard", "4"];
        args.extend(range);
        let (code, out) = ops(&args);
        assert_eq!(code, 2, "{range:?}: {out}");
        assert!(out.is_empty(), "{range:?} printed entries: {out}");
    }
    let inspect_user_7 = |shards: &str| {
        ops(&[
            "inspect",
            "user",
            "--data-dir",
            data_dir,
            "--user",
            "7",
            "--shards",
            shards,
        ])
    };
    let (code, _) = inspect_user_7("0");
    assert_eq!(code, 2, "a shard count of 0 is refused, not a panic");
    // With 4 shards every user is on shards 0..=3, none of which has a replica here (shard 4
    // does): refused, not printed as an empty user.
    let (code, out) = inspect_user_7("4");
    assert_eq!(code, 2, "the user's shard has no replica here: {out}");
    assert!(out.is_empty(), "printed a state: {out}");
}
