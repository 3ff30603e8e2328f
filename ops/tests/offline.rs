//! `courier-ops verify` and `log dump` on a real data directory: a healthy shard verifies; a
//! projection value changed behind the log's back is reported with its shard, divergent index
//! and key, and the command exits 1.

use std::process::Command;
use std::sync::Arc;

use courier_proto::ShardId;
use courier_storage::testkit::{self, EventGen};
use courier_storage::{Cf, Db, LogStore, OpenMode, Projection, ReadKv, ShardState};

const SHARD: ShardId = ShardId::new(4);

fn populate(data_dir: &std::path::Path) {
    let db = Arc::new(Db::open(&data_dir.join("db"), OpenMode::ReadWrite).expect("open"));
    let log = LogStore::new(db.clone(), SHARD);
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
