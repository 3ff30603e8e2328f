//! Online maintenance through `courier-ops` against real node processes: verify passes after a
//! workload; a projection value corrupted behind the log's back on one replica is named (shard,
//! divergent index, key) by an online verify of that running replica; an online rebuild repairs
//! it while the node keeps serving; and the log reads back online.

use std::sync::Arc;
use std::time::Duration;

use courier_proto::{ShardId, UserId};
use courier_storage::projection::{hex, unframe};
use courier_storage::{Cf, Db, OpenMode, Projection, ReadKv, keys};

use crate::cluster::{
    Processes, SHARDS, forward, forward_for, forwarded_id, status, wait_converged,
};
use crate::support::ops;

/// Waits up to 30 s until `replica` purged shard 1's log past `above`; returns its purge point.
async fn wait_purged(replica: &str, above: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let purged = status(replica)
            .await
            .shards
            .iter()
            .find(|s| s.shard == 1)
            .map_or(0, |s| s.purged_index);
        if purged > above {
            return purged;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1's live log is purged only up to {purged}, not past {above}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts the `MessageDelivered` events of a shard's log, read online from a replica.
fn delivered_in_log(peer: &str, shard: u32) -> usize {
    let (code, out, err) = ops(&[
        "log",
        "dump",
        "--addr",
        peer,
        "--shard",
        &shard.to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON lines"))
        .filter(|v| v["event"] == "MessageDelivered")
        .count()
}

/// Flips the last byte of the first inbox value of `shard` in a stopped node's database; returns
/// the key and the log index that set the value.
fn corrupt_first_inbox_value(data_dir: &std::path::Path, shard: ShardId) -> (Vec<u8>, u64) {
    let db = Arc::new(Db::open(&data_dir.join("db"), OpenMode::ReadWrite).expect("open"));
    let (start, end) = keys::shard_range(shard);
    let cf = Cf::Projection(Projection::Inbox);
    let (key, mut value) = db
        .scan(cf, &start, &end, 1)
        .expect("scan")
        .into_iter()
        .next()
        .expect("the workload stored inbox values");
    let set_at = unframe(&value).expect("framed").0.get();
    let last = value.last_mut().expect("non-empty");
    *last ^= 0x5a;
    db.commit([(cf, key.clone(), Some(value))], true)
        .expect("write");
    (key, set_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_names_a_corruption_and_online_rebuild_repairs_it() {
    let (mut cluster, _) = Processes::start_initialized(3).await;
    let peers = cluster.peers.clone();
    for round in 0..4_u64 {
        for shard in 0..SHARDS {
            forward(&peers[0], shard, 1 + round * 10, 10)
                .await
                .expect("forward");
        }
    }
    wait_converged(&peers, Duration::from_secs(30)).await;
    let replica = peers[2].clone();

    let (code, out, err) = ops(&["verify", "--addr", &replica]);
    assert_eq!(code, 0, "a healthy replica verifies: {out}{err}");
    for shard in 0..SHARDS {
        assert!(out.contains(&format!("shard {shard} applied=")), "{out}");
    }
    assert!(!out.contains("MISMATCH"), "{out}");

    tracing::info!("corrupt one inbox value on node 3 while it is down");
    let shard = ShardId::new(1);
    cluster.kill(2);
    let (key, set_at) = corrupt_first_inbox_value(&cluster.procs[2].data_dir, shard);
    cluster.restart(2);
    wait_converged(&peers, Duration::from_secs(30)).await;

    let (code, out, _) = ops(&["verify", "--addr", &replica, "--shard", "1", "--json"]);
    assert_eq!(code, 1, "a corrupted replica fails verify: {out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["shard"], 1);
    assert_eq!(report["ok"], false);
    let inbox = report["projections"]
        .as_array()
        .expect("projections")
        .iter()
        .find(|p| p["projection"] == "inbox")
        .expect("inbox reported");
    assert_eq!(inbox["ok"], false);
    let first = &inbox["mismatches"][0];
    assert_eq!(first["key"], hex(&key), "{report}");
    assert_eq!(first["first_divergent_index"], set_at, "{report}");
    let others_ok = report["projections"]
        .as_array()
        .expect("projections")
        .iter()
        .filter(|p| p["projection"] != "inbox")
        .all(|p| p["ok"] == true);
    assert!(others_ok, "only the inbox differs: {report}");

    let (code, _, err) = ops(&[
        "rebuild",
        "--addr",
        &replica,
        "--shard",
        "1",
        "--projection",
        "inbox",
    ]);
    assert_eq!(code, 2, "rebuild without --yes is refused");
    assert!(err.contains("--yes"), "{err}");

    tracing::info!("rebuild online while writes go on");
    let writer = {
        let peer = peers[0].clone();
        tokio::spawn(async move {
            for round in 4..8_u64 {
                for shard in 0..SHARDS {
                    let _ = forward(&peer, shard, 1 + round * 10, 10).await;
                }
            }
        })
    };
    let (code, out, err) = ops(&[
        "rebuild",
        "--addr",
        &replica,
        "--shard",
        "1",
        "--projection",
        "inbox",
        "--yes",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("shard 1 inbox: rebuilt"), "{out}");
    writer.await.expect("writer");
    wait_converged(&peers, Duration::from_secs(30)).await;
    let (code, out, err) = ops(&["verify", "--addr", &replica, "--shard", "1"]);
    assert_eq!(code, 0, "verify passes after the rebuild: {out}{err}");

    assert_eq!(
        delivered_in_log(&replica, 1),
        80,
        "every forwarded message reads back online"
    );

    let (code, _, err) = ops(&["verify", "--addr", &replica, "--shard", "99"]);
    assert_eq!(code, 2);
    assert!(err.contains("COURIER:Shard:Unknown"), "{err}");
    let (code, _, err) = ops(&["verify", "--addr", "127.0.0.1:1", "--shard", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot connect"), "{err}");
}

/// The log archive (#21): a shard whose log raft purged many times over (a snapshot every 50
/// entries, 10 kept) still verifies and rebuilds online from index 1 on a replica, reading the
/// purged entries from the archive (aligned, checksummed segments the replicas wrote to the
/// directory beside their data directories). Before the archive, verify refused with
/// `COURIER:Log:Purged` here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_rebuild_read_purged_entries_from_the_archive() {
    const ENTRIES: u64 = 300;
    let (mut cluster, _) = Processes::start_initialized_with(
        3,
        "[archive]\nsegment-entries = 16\ninterval = \"100ms\"\n",
    )
    .await;
    let peers = cluster.peers.clone();
    // A user whose home is shard 1, so `inspect user` finds the inbox the forwards fill.
    let user = (1000..)
        .find(|u| {
            let shards = u16::try_from(SHARDS).expect("few shards");
            courier_proto::shard_of(UserId::new(*u).expect("non-zero"), shards) == ShardId::new(1)
        })
        .expect("some user lives on shard 1");
    for pos in 1..=ENTRIES {
        forward_for(&peers[0], 1, user, pos, 1)
            .await
            .expect("forward");
    }
    wait_converged(&peers, Duration::from_secs(30)).await;
    let replica = peers[2].clone();
    let purged = wait_purged(&replica, ENTRIES / 2).await;
    tracing::info!(purged, "shard 1's live log was purged below the archive");
    let segments = std::fs::read_dir(cluster.root().join("archive").join("shard-00001"))
        .expect("the archive holds shard 1")
        .count();
    assert!(segments >= 10, "{segments} segments archived");

    // The log reads back whole, online, the purged part from the archive.
    let dump = log_events(&["--addr", &replica]);
    let delivered: Vec<&serde_json::Value> = dump
        .iter()
        .filter(|v| v["event"] == "MessageDelivered")
        .collect();
    assert_eq!(delivered.len(), usize::try_from(ENTRIES).expect("small"));
    let fifth_at = delivered[4]["index"].as_u64().expect("an index");
    assert!(fifth_at <= purged, "entry {fifth_at} is an archived one");

    // A user as they were at an archived index, replayed on the running replica.
    let users = user.to_string();
    let at = fifth_at.to_string();
    let online = ["inspect", "user", "--addr", &replica, "--user", &users];
    let (code, online_inspect, err) = ops(&[&online[..], &["--at", &at]].concat());
    assert_eq!(
        code, 0,
        "online inspect at an archived index: {online_inspect}{err}"
    );
    assert!(
        online_inspect.contains(&format!("at log index {fifth_at}"))
            && online_inspect.contains("inbox: tail 5 "),
        "the inbox as it was after the fifth message: {online_inspect}"
    );
    let (code, out, err) = ops(&[&online[..], &["--at", "999999999"]].concat());
    assert_eq!(code, 2, "an index in the future: {out}{err}");
    assert!(err.contains("COURIER:Inspect:Future"), "{err}");

    let (code, out, err) = ops(&["verify", "--addr", &replica, "--shard", "1"]);
    assert_eq!(code, 0, "verify from index 1 reads the archive: {out}{err}");
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(
        out.contains("from=genesis") && out.contains("checkpoint written"),
        "the first verify replays everything and leaves a checkpoint: {out}"
    );
    // An online rebuild of shard 1's inbox, with `extra` flags: the events it replayed.
    let rebuilt = |extra: &[&str]| {
        let rebuild = [
            "rebuild",
            "--addr",
            &replica,
            "--shard",
            "1",
            "--projection",
            "inbox",
            "--yes",
        ];
        let (code, out, err) = ops(&[&rebuild[..], extra].concat());
        assert_eq!(code, 0, "rebuild reads the archive: {out}{err}");
        let replayed: u64 = out
            .split(" from ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("events replayed in {out}"));
        (replayed, out)
    };
    let (replayed, out) = rebuilt(&[]);
    assert!(
        replayed < ENTRIES,
        "the rebuild starts from the verify checkpoint, not index 1: {out}"
    );
    let (replayed, out) = rebuilt(&["--from-genesis"]);
    assert!(
        replayed >= ENTRIES,
        "--from-genesis replays every event from index 1, the archived ones too: {out}"
    );
    let (code, out, err) = ops(&["verify", "--addr", &replica, "--shard", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("from=checkpoint@"),
        "the next verify starts from the checkpoint: {out}"
    );
    let (code, out, err) = ops(&[
        "verify",
        "--addr",
        &replica,
        "--shard",
        "1",
        "--from-genesis",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("from=genesis"), "{out}");

    let backup = cluster.data_dir_of(3).with_file_name("node3-backup");
    let backup = backup.to_str().expect("utf-8").to_owned();
    let (code, out, err) = ops(&["backup", "--addr", &replica, "--dir", &backup]);
    assert_eq!(code, 0, "{out}{err}");

    tracing::info!("offline, on the stopped node: with the archive, and without it");
    cluster.kill(2);
    let data_dir = cluster.data_dir_of(3);
    let archive = cluster.root().join("archive");
    let data_dir = data_dir.to_str().expect("utf-8");
    let archive = archive.to_str().expect("utf-8");
    let with_archive = |command: &[&str]| ops(&[command, &["--archive", archive]].concat());
    let offline = ["verify", "--data-dir", data_dir, "--shard", "1"];
    let (code, out, err) = with_archive(&offline);
    assert_eq!(code, 0, "offline verify reads the archive: {out}{err}");
    assert!(out.contains("from=checkpoint@"), "{out}");
    let (code, out, err) = ops(&offline);
    assert_ne!(
        code, 0,
        "without the archive the purged log cannot be replayed: {out}{err}"
    );
    let checkpoints: Vec<std::path::PathBuf> =
        std::fs::read_dir(std::path::Path::new(archive).join("shard-00001"))
            .expect("the archive holds shard 1")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
            .collect();
    assert!(!checkpoints.is_empty(), "verify checkpoints in the archive");
    for checkpoint in &checkpoints {
        let mut bytes = std::fs::read(checkpoint).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(checkpoint, bytes).expect("write");
    }
    let (code, out, err) = with_archive(&offline);
    assert_eq!(code, 2, "a damaged checkpoint is an error: {out}{err}");
    assert!(err.contains("checkpoint"), "{err}");
    let (code, out, err) = with_archive(&[&offline[..], &["--from-genesis"]].concat());
    assert_eq!(code, 0, "--from-genesis does not read it: {out}{err}");
    let offline_rebuild = [
        "rebuild",
        "--data-dir",
        data_dir,
        "--shard",
        "1",
        "--projection",
        "inbox",
        "--yes",
    ];
    let (code, out, err) = with_archive(&offline_rebuild);
    assert_eq!(
        code, 2,
        "a rebuild starts from the damaged checkpoint: {out}{err}"
    );
    let (code, out, err) = with_archive(&[&offline_rebuild[..], &["--from-genesis"]].concat());
    assert_eq!(
        code, 0,
        "a rebuild --from-genesis does not read it: {out}{err}"
    );

    let offline_dump = log_events(&["--data-dir", data_dir, "--archive", archive]);
    assert_eq!(
        offline_dump, dump,
        "offline and online dumps read the same log"
    );
    let (code, out, err) = ops(&[
        "log",
        "dump",
        "--data-dir",
        data_dir,
        "--shard",
        "1",
        "--to",
        &fifth_at.to_string(),
    ]);
    assert_eq!(code, 2, "a purged range without the archive: {out}{err}");
    assert!(
        err.contains("--archive"),
        "the error says what to give: {err}"
    );

    let inspect = [
        "inspect",
        "user",
        "--data-dir",
        data_dir,
        "--user",
        &users,
        "--shards",
        "4",
        "--at",
        &at,
    ];
    let (code, out, err) = with_archive(&inspect);
    assert_eq!(code, 0, "inspect at an archived index: {out}{err}");
    assert_eq!(
        out, online_inspect,
        "offline and online inspect print the same state"
    );
    let (code, _, err) = ops(&inspect);
    assert_eq!(code, 2, "inspect needs the archive here: {err}");

    tracing::info!("restore of a purged checkpoint: refused without the archive, verified with it");
    let node4 = cluster.data_dir_of(4);
    let node4_arg = node4.to_str().expect("utf-8");
    let restore = ["restore", "--from", &backup, "--data-dir", node4_arg];
    let (code, out, err) = ops(&restore);
    assert_eq!(
        code, 1,
        "an unverifiable shard fails the restore: {out}{err}"
    );
    assert!(
        out.contains("NOT VERIFIED") && out.contains("--archive"),
        "{out}"
    );
    assert!(
        !node4.join("db").exists(),
        "a failed restore leaves nothing behind"
    );
    let (code, out, err) = with_archive(&restore);
    assert_eq!(code, 0, "with the archive every shard verifies: {out}{err}");
    assert!(
        !out.contains("NOT VERIFIED") && out.contains("restored into"),
        "{out}"
    );

    let first_id = hex(&forwarded_id(1, 1));
    let inspect_first = [
        "inspect",
        "message",
        "--data-dir",
        data_dir,
        "--id",
        &first_id,
    ];
    let (code, out, err) = ops(&inspect_first);
    assert_eq!(
        code, 2,
        "without the archive a purged log is an error, not \"not found\": {out}{err}"
    );
    assert!(err.contains("--archive"), "{err}");
    let (code, out, err) = with_archive(&inspect_first);
    assert_eq!(code, 0, "{out}{err}");
    let first_at = delivered[0]["index"].as_u64().expect("an index");
    assert!(
        out.contains(&format!("delivered  shard:1 index {first_at}")),
        "the first message, delivered in an archived entry: {out}"
    );
}

/// Every event of shard 1's log as JSON, from `log dump` with `source` (`--addr …` or
/// `--data-dir … --archive …`).
fn log_events(source: &[&str]) -> Vec<serde_json::Value> {
    let (code, out, err) = ops(&[&["log", "dump", "--shard", "1", "--json"], source].concat());
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect()
}

/// Backup → restore round trip: a checkpoint of node 3 taken during writes is restored into a
/// new node 4 after node 3 is lost; node 4 joins by `node add` (then node 3 is removed), catches
/// up from the restored log, and ends with the same applied index and digests as the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_a_new_node_catches_up_and_matches() {
    let (mut cluster, _) = Processes::start_initialized(3).await;
    let peers = cluster.peers.clone();
    for shard in 0..SHARDS {
        forward(&peers[0], shard, 1, 20).await.expect("forward");
    }
    let backup = cluster.data_dir_of(3).with_file_name("node3-backup");
    let backup_arg = backup.display().to_string();
    let (code, out, err) = ops(&["backup", "--addr", &peers[2], "--dir", &backup_arg]);
    assert_eq!(code, 0, "{out}{err}");
    for shard in 0..SHARDS {
        forward(&peers[0], shard, 21, 20).await.expect("forward");
    }

    tracing::info!("node 3 is lost; restore its backup as node 4, add node 4, remove node 3");
    cluster.kill(2);
    let node4_dir = cluster.data_dir_of(4);
    let node4_arg = node4_dir.display().to_string();
    let (code, out, err) = ops(&["restore", "--from", &backup_arg, "--data-dir", &node4_arg]);
    assert_eq!(code, 0, "the checkpoint verifies: {out}{err}");
    assert!(out.contains("verified"), "{out}");
    let (code, _, err) = ops(&["restore", "--from", &backup_arg, "--data-dir", &node4_arg]);
    assert_eq!(code, 2, "restoring over an existing database is refused");
    assert!(err.contains("exists"), "{err}");

    let index = cluster.start_new(4);
    let peer4 = cluster.peers[index].clone();
    let (code, out, err) = ops(&[
        "node", "add", "--addr", &peers[0], "--id", "4", "--peer", &peer4,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ops(&["node", "remove", "--addr", &peers[0], "--id", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    for shard in 0..SHARDS {
        forward(&peers[1], shard, 41, 20).await.expect("forward");
    }
    let members = vec![peers[0].clone(), peers[1].clone(), peer4.clone()];
    wait_converged(&members, Duration::from_secs(60)).await;
    for shard in 0..SHARDS {
        assert_eq!(
            delivered_in_log(&peer4, shard),
            60,
            "node 4 holds every write of shard {shard}"
        );
    }
    let (code, out, err) = ops(&["verify", "--addr", &peer4]);
    assert_eq!(code, 0, "the restored node verifies: {out}{err}");
}

/// A local S3-compatible server (moto, installed by `scripts/setup` into the cache), killed on
/// drop.
struct S3Server {
    child: std::process::Child,
    port: u16,
}

impl S3Server {
    fn start() -> Self {
        let cache = std::env::var_os("COURIER_CACHE").map_or_else(
            || {
                std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/courier")
            },
            std::path::PathBuf::from,
        );
        let binary = cache.join("moto/bin/moto_server");
        assert!(
            binary.exists(),
            "{} is missing: run scripts/setup (it installs the S3 test server)",
            binary.display()
        );
        let port = crate::support::free_port();
        let child = std::process::Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let server = Self { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the S3 server did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request; returns the status code and the body.
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        let code = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, answer)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log archive in an S3-compatible bucket (`[archive.s3]`, credentials from the node's
/// environment): the replicas write their segments under the configured prefix of the bucket
/// (no local archive directory appears), purge past them, and a replica verifies shard 1 online
/// from index 1 reading the purged entries back from the bucket; then, the replica stopped,
/// `courier-ops` verifies it from index 1 and dumps purged entries offline with
/// `--archive s3://bucket/prefix`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_can_live_in_an_s3_bucket() {
    const ENTRIES: u64 = 200;
    let s3 = S3Server::start();
    let (code, answer) = s3.request("PUT", "/courier-archive");
    assert_eq!(code, 200, "create the bucket: {answer}");
    crate::support::set_node_env("AWS_ACCESS_KEY_ID", "courier-test");
    crate::support::set_node_env("AWS_SECRET_ACCESS_KEY", "courier-test-secret");
    let config = format!(
        "[archive]\nsegment-entries = 16\ninterval = \"100ms\"\n[archive.s3]\nbucket = \"courier-archive\"\nprefix = \"cluster-a\"\nendpoint = \"{}\"\nallow-http = true\n",
        s3.endpoint()
    );
    let (mut cluster, _) = Processes::start_initialized_with(3, &config).await;
    let peers = cluster.peers.clone();
    for pos in 1..=ENTRIES {
        forward(&peers[0], 1, pos, 1).await.expect("forward");
    }
    wait_converged(&peers, Duration::from_secs(30)).await;
    let replica = peers[2].clone();
    wait_purged(&replica, ENTRIES / 2).await;
    let (code, listing) = s3.request(
        "GET",
        "/courier-archive?list-type=2&prefix=cluster-a/shard-00001/",
    );
    assert_eq!(code, 200, "{listing}");
    let segments = listing.matches("<Key>cluster-a/shard-00001/").count();
    assert!(
        segments >= 6,
        "{segments} segments in the bucket: {listing}"
    );
    assert!(
        !cluster.root().join("archive").exists(),
        "no local archive directory with a bucket configured"
    );

    let (code, out, err) = ops(&[
        "verify",
        "--addr",
        &replica,
        "--shard",
        "1",
        "--from-genesis",
    ]);
    assert_eq!(code, 0, "verify from index 1 reads the bucket: {out}{err}");
    assert!(
        out.contains("from=genesis") && !out.contains("MISMATCH"),
        "{out}"
    );

    tracing::info!("offline, on the stopped replica: the bucket as the archive");
    cluster.kill(2);
    let data_dir = cluster.data_dir_of(3);
    let data_dir = data_dir.to_str().expect("utf-8");
    let endpoint = s3.endpoint();
    let bucket = [
        "--archive",
        "s3://courier-archive/cluster-a",
        "--s3-endpoint",
        &endpoint,
        "--s3-allow-http",
    ];
    let offline = [
        "verify",
        "--data-dir",
        data_dir,
        "--shard",
        "1",
        "--from-genesis",
    ];
    let (code, out, err) = ops(&offline);
    assert_ne!(
        code, 0,
        "the purged log cannot be replayed alone: {out}{err}"
    );
    let (code, out, err) = ops(&[&offline[..], &bucket[..]].concat());
    assert_eq!(
        code, 0,
        "offline verify from index 1 reads the bucket: {out}{err}"
    );
    assert!(
        out.contains("from=genesis") && !out.contains("MISMATCH"),
        "{out}"
    );
    // Entries raft purged come from the bucket.
    let range = ["--data-dir", data_dir, "--from", "1", "--to", "3"];
    let events = log_events(&[&range[..], &bucket[..]].concat());
    let indexes: std::collections::BTreeSet<u64> =
        events.iter().filter_map(|e| e["index"].as_u64()).collect();
    assert_eq!(indexes, (1..=3).collect(), "{events:?}");
    let (code, out, err) = ops(&[&offline[..], &bucket[..4]].concat());
    assert_eq!(code, 2, "plain http refused unless allowed: {out}{err}");
    assert!(err.contains("allow-http"), "{err}");
}

/// A committed entry of the live log that fails its checksum, met by an operator's online job
/// (`log dump --addr`), stops the replica, as raft's own reads and the archiver do: it answers
/// the fault and no longer serves or votes over a log it knows is corrupt. (Three in-process
/// nodes: the entry is corrupted under the running node, which has no reason to read it again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_job_that_meets_a_corrupt_log_entry_stops_the_replica() {
    let c = crate::messaging::cluster_appending("").await;
    c.wait_converged().await;
    let node = &c.nodes[2];
    let shard = ShardId::new(1);
    let db = node.groups().db().clone();
    let key = keys::log_entry(shard, courier_proto::LogIndex::new(1));
    let mut value = db.get(Cf::Log, &key).expect("get").expect("stored");
    let last = value.len().saturating_sub(1);
    value[last] ^= 0x01;
    db.commit([(Cf::Log, key, Some(value))], true)
        .expect("write");

    let peer = node.peer_addr.to_string();
    let (code, out, err) = ops(&[
        "log", "dump", "--addr", &peer, "--shard", "1", "--from", "1", "--to", "1",
    ]);
    assert_ne!(code, 0, "the corrupt entry is not dumped: {out}");
    assert!(err.contains("checksum"), "{err}");
    let handle = node
        .groups()
        .get(courier_consensus::types::GroupId::Shard(shard))
        .expect("the group is still listed");
    let started = std::time::Instant::now();
    while handle.state().role != courier_consensus::leadership::Role::Shutdown {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "node 3's replica of shard 1 still runs: {:?}",
            handle.state().role
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other = c.nodes[0]
        .groups()
        .get(courier_consensus::types::GroupId::Shard(ShardId::new(2)))
        .expect("shard 2");
    assert_ne!(
        other.state().role,
        courier_consensus::leadership::Role::Shutdown,
        "only the corrupt replica stops"
    );
}
