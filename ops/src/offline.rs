//! Commands on a stopped node's data directory (opened read-only).

use std::path::Path;

use anyhow::{Context as _, bail};
use courier_proto::{LogIndex, ShardId};
use courier_storage::rebuild;
use courier_storage::{Db, LogStore, MemKv, OpenMode, Projection, ShardState};

use crate::db_path;

pub(crate) fn open(data_dir: &Path) -> anyhow::Result<std::sync::Arc<Db>> {
    let db = db_path(data_dir)?;
    Ok(std::sync::Arc::new(
        Db::open(&db, OpenMode::ReadOnly)
            .with_context(|| format!("opening {} read-only", db.display()))?,
    ))
}

/// Prints entries `from..=to` of a shard's log.
///
/// # Errors
/// Storage faults (including checksum mismatches, reported with the index).
pub(crate) fn log_dump(
    data_dir: &Path,
    shard: u16,
    from: Option<u64>,
    to: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let db = open(data_dir)?;
    let shard = ShardId::new(shard);
    let log = LogStore::new(db, shard);
    let Some(first) = log.first_index()? else {
        println!("{shard}: empty log");
        return Ok(());
    };
    let last = log.last()?.map_or(first, |r| r.index);
    let from = from.map_or(first, LogIndex::new).max(first);
    let to = to.map_or(last, LogIndex::new).min(last);
    let mut at = from;
    while at <= to {
        let until = at
            .checked_add(rebuild::REPLAY_BATCH_ENTRIES)
            .map_or(to.next(), |u| u.min(to.next()));
        for record in log.read_range(at, until)? {
            let entry = rebuild::decode_entry(shard, &record)?;
            match entry.events {
                None => print_event(record.index, record.term, None, json),
                Some(payload) => {
                    for event in &payload.events {
                        print_event(record.index, record.term, Some(event), json);
                    }
                }
            }
        }
        at = until;
    }
    Ok(())
}

/// One event as its kind and fields: ids, positions and sizes, never bodies or phone hashes.
fn describe(
    event: &courier_proto::pb::events::Event,
) -> (&'static str, Vec<(&'static str, serde_json::Value)>) {
    use courier_proto::pb::events::event::Kind;
    use serde_json::json;
    let hex = courier_storage::projection::hex;
    match &event.kind {
        Some(Kind::MessageSent(e)) => (
            "MessageSent",
            vec![
                ("id", json!(hex(&e.message_id))),
                ("sender", json!(e.sender_user)),
                ("device", json!(e.sender_device)),
                ("client_msg_id", json!(e.client_msg_id)),
                (
                    "body_bytes",
                    json!(e.content.as_ref().map_or(0, |c| c.body.len())),
                ),
                ("to_shard", json!(e.recipient_shard)),
            ],
        ),
        Some(Kind::MessageDelivered(e)) => (
            "MessageDelivered",
            vec![
                ("id", json!(hex(&e.message_id))),
                ("to", json!(e.recipient_user)),
                ("from", json!(e.sender_user)),
                ("source_shard", json!(e.source_shard)),
                ("source_pos", json!(e.source_pos)),
            ],
        ),
        Some(Kind::DeliveryAcked(e)) => (
            "DeliveryAcked",
            vec![
                ("user", json!(e.user)),
                ("device", json!(e.device)),
                ("up_to", json!(e.up_to_seq)),
            ],
        ),
        Some(Kind::ReadUpTo(e)) => (
            "ReadUpTo",
            vec![("user", json!(e.user)), ("up_to", json!(e.up_to_seq))],
        ),
        Some(Kind::ReceiptRecorded(e)) => (
            "ReceiptRecorded",
            vec![
                ("id", json!(hex(&e.message_id))),
                ("recipient", json!(e.recipient_user)),
                ("state", json!(format!("{:?}", e.state()))),
                ("source_shard", json!(e.source_shard)),
                ("source_pos", json!(e.source_pos)),
            ],
        ),
        Some(Kind::OutboxTrimmed(e)) => (
            "OutboxTrimmed",
            vec![("dest", json!(e.dest_shard)), ("up_to", json!(e.up_to))],
        ),
        Some(Kind::UserRegistered(e)) => ("UserRegistered", vec![("user", json!(e.user))]),
        Some(Kind::DeviceRegistered(e)) => (
            "DeviceRegistered",
            vec![
                ("user", json!(e.user)),
                ("device", json!(e.device)),
                ("primary", json!(e.primary)),
            ],
        ),
        Some(Kind::DeviceRevoked(e)) => (
            "DeviceRevoked",
            vec![("user", json!(e.user)), ("device", json!(e.device))],
        ),
        Some(Kind::GroupCreated(e)) => (
            "GroupCreated",
            vec![("group", json!(e.group)), ("creator", json!(e.creator))],
        ),
        Some(Kind::MemberAdded(e)) => (
            "MemberAdded",
            vec![("group", json!(e.group)), ("user", json!(e.user))],
        ),
        Some(Kind::MemberRemoved(e)) => (
            "MemberRemoved",
            vec![("group", json!(e.group)), ("user", json!(e.user))],
        ),
        Some(Kind::MessageExpired(e)) => (
            "MessageExpired",
            vec![("user", json!(e.user)), ("seq", json!(e.seq))],
        ),
        None => (
            "Unknown",
            vec![("note", json!("an event kind this build does not know"))],
        ),
    }
}

/// Prints one log line, as text or as one JSON object.
pub(crate) fn print_event(
    index: LogIndex,
    term: u64,
    event: Option<&courier_proto::pb::events::Event>,
    json: bool,
) {
    let (kind, fields) = event.map_or(("RaftEntry", Vec::new()), describe);
    if json {
        let mut object = serde_json::Map::new();
        object.insert("index".to_owned(), index.get().into());
        object.insert("term".to_owned(), term.into());
        object.insert("event".to_owned(), kind.into());
        for (name, value) in fields {
            object.insert(name.to_owned(), value);
        }
        println!("{}", serde_json::Value::Object(object));
    } else {
        let text: Vec<String> = fields
            .into_iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(s) => format!("{name}={s}"),
                other => format!("{name}={other}"),
            })
            .collect();
        println!("{index} term={term} {kind} {}", text.join(" "));
    }
}

pub(crate) fn projection_named(name: &str) -> anyhow::Result<Projection> {
    Projection::from_name(name).with_context(|| {
        let known: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
        format!("unknown projection {name:?}; known: {}", known.join(", "))
    })
}

/// Replays `shard`'s log from index 1 into memory up to `at` (default: the live applied index),
/// with a progress bar. Returns the live state, the replay and how long it took.
///
/// # Errors
/// An index past the applied one, a log purged below a snapshot, storage faults.
pub(crate) fn replay_to(
    db: &std::sync::Arc<Db>,
    shard: ShardId,
    at: Option<LogIndex>,
) -> anyhow::Result<(ShardState, rebuild::Rebuilt, std::time::Duration)> {
    let live = ShardState::load(db.as_ref(), shard)?;
    let at = at.unwrap_or(live.applied);
    if at > live.applied {
        bail!(
            "{shard} applied up to {}; index {at} is in the future",
            live.applied
        );
    }
    let log = LogStore::new(db.clone(), shard);
    rebuild::require_full_log(&log).with_context(|| {
        format!("{shard}: the log was purged below a snapshot; a replay starts at index 1")
    })?;
    let bar = crate::progress::replay_bar(at.get(), "replay");
    let started = std::time::Instant::now();
    let rebuilt = rebuild::replay(
        &log,
        (MemKv::default(), ShardState::empty(shard)),
        at,
        &mut |index, _| {
            bar.set_position(index.get());
        },
    )?;
    bar.finish_and_clear();
    Ok((live, rebuilt, started.elapsed()))
}

/// The shards stored in a data directory (not the metadata group).
///
/// # Errors
/// Storage faults.
pub(crate) fn shards(db: &Db) -> anyhow::Result<Vec<ShardId>> {
    Ok(LogStore::stored_shards(db)?
        .into_iter()
        .filter(|s| *s != courier_proto::shard::METADATA_PREFIX)
        .collect())
}

/// Rebuilds one projection of a stopped node's shard from its log and swaps it in atomically.
/// Returns the applied index, the rebuilt pairs and the events replayed.
///
/// # Errors
/// A data directory in use; storage faults.
pub(crate) fn rebuild(
    data_dir: &Path,
    shard: ShardId,
    projection: Projection,
) -> anyhow::Result<(u64, u64, u64)> {
    let path = db_path(data_dir)?;
    let db = std::sync::Arc::new(Db::open(&path, OpenMode::ReadWrite).with_context(|| {
        format!(
            "opening {} (is the node still running? stop it first)",
            path.display()
        )
    })?);
    let (live, rebuilt, _) = replay_to(&db, shard, None)?;
    let swap = rebuild::swap(&live, &rebuilt, projection);
    // One atomic batch: the old projection is cleared and the rebuilt one written together.
    db.replace_ranges(&[swap.clear], swap.changes, true)?;
    Ok((
        live.applied.get(),
        rebuilt.state.digest(projection).entries,
        rebuilt.events,
    ))
}

/// Copies a checkpoint into `data_dir/db` of a node that has never run (hard links where the
/// filesystem allows), then verifies every shard of the copy against its own log. Returns
/// whether every shard that could be replayed matched.
///
/// # Errors
/// A checkpoint that is not a database, an existing `data_dir/db`, copy or storage faults.
pub(crate) fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<bool> {
    if !from.join("CURRENT").exists() {
        bail!(
            "{} is not a checkpoint (no CURRENT file); give the directory `courier-ops backup` wrote",
            from.display()
        );
    }
    let db_dir = data_dir.join("db");
    if db_dir.exists() {
        bail!(
            "{} exists: restore only into the data directory of a node that has never run",
            db_dir.display()
        );
    }
    std::fs::create_dir_all(&db_dir).with_context(|| format!("creating {}", db_dir.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = db_dir.join(entry.file_name());
        // Checkpoint files are immutable (SST) or rewritten whole (MANIFEST, OPTIONS): a hard link
        // is as good as a copy, and instant.
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    let db = open(data_dir)?;
    let mut ok = true;
    for shard in shards(&db)? {
        let total = ShardState::load(db.as_ref(), shard)?.applied;
        let bar =
            crate::progress::replay_bar(total.get(), &format!("verify shard {}", shard.get()));
        let result = rebuild::verify(&db, shard, None, &Projection::ALL, &mut |done, _| {
            bar.set_position(done.get());
        });
        bar.finish_and_clear();
        match result {
            Ok(verified) => {
                let equal = verified
                    .comparisons
                    .iter()
                    .all(rebuild::Comparison::is_equal);
                ok &= equal;
                println!(
                    "{shard}: applied {} {}",
                    verified.live.applied,
                    if equal {
                        "verified"
                    } else {
                        "MISMATCH: run verify on the checkpoint"
                    }
                );
            }
            Err(courier_storage::StorageError::MissingEntry { .. }) => {
                println!(
                    "{shard}: log purged below a snapshot; projections not replayable, not verified"
                );
            }
            Err(other) => return Err(other.into()),
        }
    }
    println!(
        "restored into {}; start the node with a NEW node id, then `courier-ops node add` it",
        db_dir.display()
    );
    Ok(ok)
}
