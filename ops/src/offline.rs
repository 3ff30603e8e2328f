//! Commands on a stopped node's data directory (opened read-only).

use std::path::Path;

use anyhow::{Context as _, bail};
use courier_proto::{LogIndex, ShardId};
use courier_storage::archive::{SegmentStore, for_each_entry, log_source};
use courier_storage::rebuild;
use courier_storage::{Db, LogStore, OpenMode, Projection, ShardState};

use crate::db_path;

pub(crate) fn open(data_dir: &Path) -> anyhow::Result<std::sync::Arc<Db>> {
    let db = db_path(data_dir)?;
    Ok(std::sync::Arc::new(
        Db::open(&db, OpenMode::ReadOnly)
            .with_context(|| format!("opening {} read-only", db.display()))?,
    ))
}

/// Prints entries `from..=to` of a shard's log (the archive's entries too, when given).
///
/// # Errors
/// Storage faults (including checksum mismatches, reported with the index), a range neither the
/// log nor the archive holds.
pub(crate) fn log_dump(
    data_dir: &Path,
    archive: Option<&dyn SegmentStore>,
    shard: u16,
    range: (Option<u64>, Option<u64>),
    json: bool,
) -> anyhow::Result<()> {
    let db = open(data_dir)?;
    let shard = ShardId::new(shard);
    let log = log_source(LogStore::new(db, shard), archive)?;
    let Some((first, last)) = log.bounds()? else {
        // Not on stdout with --json: a reader of JSON lines would choke on it.
        if json {
            eprintln!("{shard}: empty log");
        } else {
            println!("{shard}: empty log");
        }
        return Ok(());
    };
    let asked_below = range
        .0
        .into_iter()
        .chain(range.1)
        .any(|i| (1..first.get()).contains(&i));
    if asked_below {
        bail!(
            "{shard}: entries below {first} are not here: {}",
            purged_hint(archive.is_some())
        );
    }
    let from = range.0.map_or(first, LogIndex::new);
    let to = range.1.map_or(last, LogIndex::new).min(last);
    for_each_entry(log.as_ref(), from, to, &mut |record| {
        let entry = rebuild::decode_entry(shard, record)?;
        print_entry(record.index, record.term, entry.events.as_ref(), json);
        Ok(true)
    })
    .with_context(|| purged_hint(archive.is_some()))?;
    Ok(())
}

/// What to say when a replay or a dump met a purged entry.
pub(crate) fn purged_hint(with_archive: bool) -> &'static str {
    if with_archive {
        "the archive does not hold every entry the live log purged"
    } else {
        "the log was purged below a snapshot: give --archive (the node's archive.dir)"
    }
}

/// One event as its kind and fields: ids, positions and sizes, never bodies or phone hashes.
#[allow(
    clippy::too_many_lines,
    reason = "a table: one short arm per event kind, which grows with the protocol"
)]
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
                // Set on a copy re-queued after a change of number.
                ("origin_shard", json!(e.origin_shard)),
                ("addressed_to", json!(e.addressed_to)),
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
            vec![
                ("group", json!(e.group)),
                ("user", json!(e.user)),
                ("replaces", json!(e.replaces)),
            ],
        ),
        Some(Kind::MemberRemoved(e)) => (
            "MemberRemoved",
            vec![("group", json!(e.group)), ("user", json!(e.user))],
        ),
        Some(Kind::MessageExpired(e)) => (
            "MessageExpired",
            vec![("user", json!(e.user)), ("seq", json!(e.seq))],
        ),
        Some(Kind::SendsForgotten(e)) => forgetting(
            "SendsForgotten",
            ("sends", e.sends.len()),
            (
                "latest_sent_at_ms",
                e.sends.iter().map(|s| s.sent_at_ms).max(),
            ),
        ),
        Some(Kind::InboxForgotten(e)) => forgetting(
            "InboxForgotten",
            ("messages", e.messages.len()),
            (
                "latest_stored_at_ms",
                e.messages.iter().map(|m| m.stored_at_ms).max(),
            ),
        ),
        Some(Kind::ReceiptsForgotten(e)) => forgetting(
            "ReceiptsForgotten",
            ("receipts", e.receipts.len()),
            (
                "latest_set_at_ms",
                e.receipts.iter().map(|r| r.set_at_ms).max(),
            ),
        ),
        Some(Kind::GroupMessagesForgotten(e)) => (
            "GroupMessagesForgotten",
            vec![
                ("up_to_index", json!(e.up_to_index)),
                ("before_ms", json!(e.before_ms)),
            ],
        ),
        // Registration codes: no phone or code hash, only times (a hash is still a secret's
        // fingerprint).
        Some(Kind::CodeIssued(e)) => (
            "CodeIssued",
            vec![
                ("expires_at_ms", json!(e.expires_at_ms)),
                ("attempts", json!(e.attempts)),
                ("at_ms", json!(e.at_ms)),
            ],
        ),
        Some(Kind::CodeAttempted(e)) => ("CodeAttempted", vec![("at_ms", json!(e.at_ms))]),
        Some(Kind::CodeWithdrawn(e)) => ("CodeWithdrawn", vec![("at_ms", json!(e.at_ms))]),
        Some(Kind::KeysUploaded(e)) => (
            "KeysUploaded",
            vec![
                ("user", json!(e.user)),
                ("device", json!(e.device)),
                ("one_time_prekeys", json!(e.one_time_prekeys.len())),
            ],
        ),
        Some(Kind::PrekeysClaimed(e)) => (
            "PreKeysClaimed",
            vec![("user", json!(e.user)), ("by_user", json!(e.by_user))],
        ),
        Some(Kind::RegistrationsForgotten(e)) => (
            "RegistrationsForgotten",
            vec![("before_ms", json!(e.before_ms))],
        ),
        Some(Kind::AccountDeleted(e)) => (
            "AccountDeleted",
            vec![
                ("user", json!(e.user)),
                ("at_ms", json!(e.at_ms)),
                ("moved_to", json!(e.moved_to)),
            ],
        ),
        None => (
            "Unknown",
            vec![("note", json!("an event kind this build does not know"))],
        ),
    }
}

/// A retention event (`SendsForgotten`, `InboxForgotten`, `ReceiptsForgotten`) as its count and
/// its latest time.
fn forgetting(
    kind: &'static str,
    (count_name, count): (&'static str, usize),
    (latest_name, latest): (&'static str, Option<u64>),
) -> (&'static str, Vec<(&'static str, serde_json::Value)>) {
    (
        kind,
        vec![
            (count_name, serde_json::json!(count)),
            (latest_name, serde_json::json!(latest)),
        ],
    )
}

/// Prints one log entry: a line per event, or one `RaftEntry` line for a raft-internal entry.
pub(crate) fn print_entry(
    index: LogIndex,
    term: u64,
    events: Option<&courier_proto::pb::events::EntryPayload>,
    json: bool,
) {
    match events {
        None => print_event(index, term, None, json),
        Some(payload) => {
            for event in &payload.events {
                print_event(index, term, Some(event), json);
            }
        }
    }
}

/// Prints one log line, as text or as one JSON object.
fn print_event(
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

/// Replays `shard`'s log (the archive's entries too, when given) into memory up to `at`
/// (default: the live applied index), with a progress bar: from the archive's newest verify
/// checkpoint at or below `at` when there is one, else from index 1. Returns the live state, the
/// replay and how long it took.
///
/// # Errors
/// An index past the applied one, a log purged below a snapshot that the archive does not
/// cover, storage faults.
pub(crate) fn replay_to(
    db: &std::sync::Arc<Db>,
    (archive, from): (Option<&dyn SegmentStore>, rebuild::ReplayFrom),
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
    let segments = archive;
    let log = log_source(LogStore::new(db.clone(), shard), segments)?;
    let base = rebuild::replay_base(log.as_ref(), (segments, from), at, usize::MAX)
        .with_context(|| format!("{shard}: {}", purged_hint(archive.is_some())))?;
    if base.1.applied > LogIndex::new(0) {
        eprintln!(
            "{shard}: replaying from the verify checkpoint at {}",
            base.1.applied
        );
    }
    let bar = crate::progress::replay_bar(at.get(), "replay");
    let started = std::time::Instant::now();
    // Offline the replay has the tool's process to itself: no bound but the machine's.
    let rebuilt = rebuild::replay(log.as_ref(), base, at, usize::MAX, &mut |index, _| {
        bar.set_position(index.get());
    })?;
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

/// Refuses a shard this data directory holds no replica of: verifying it would compare an
/// empty replay with nothing and report "ok", and a rebuild would write state for it.
///
/// # Errors
/// The shard is not one of the directory's replicas (a usage error, exit 2); storage faults.
pub(crate) fn require_held(db: &Db, shard: ShardId) -> anyhow::Result<()> {
    let held = shards(db)?;
    if !held.contains(&shard) {
        let list: Vec<String> = held.iter().map(|s| s.get().to_string()).collect();
        bail!(
            "{shard} is not a replica in this data directory (it holds shards {})",
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.join(", ")
            }
        );
    }
    Ok(())
}

/// Rebuilds one projection of a stopped node's shard from its log and swaps it in atomically.
/// Returns the applied index, the rebuilt pairs and the events replayed.
///
/// # Errors
/// A data directory in use; storage faults.
pub(crate) fn rebuild(
    data_dir: &Path,
    (archive, from): (Option<&dyn SegmentStore>, rebuild::ReplayFrom),
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
    require_held(&db, shard)?;
    let (live, rebuilt, _) = replay_to(&db, (archive, from), shard, None)?;
    let swap = rebuild::swap(&live, &rebuilt, projection);
    // One atomic batch: the old projection is cleared and the rebuilt one written together.
    db.replace_ranges(&[swap.clear], swap.changes, true)?;
    Ok((
        live.applied.get(),
        rebuilt.state.digest(projection).entries,
        rebuilt.events,
    ))
}

/// Hard-links (or copies) the checkpoint's files into `db_dir` and fsyncs them and their
/// directories.
fn copy_checkpoint(from: &Path, data_dir: &Path, db_dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = db_dir.join(entry.file_name());
        // Checkpoint files are immutable (SST) or rewritten whole (MANIFEST, OPTIONS): a hard link
        // is as good as a copy, and instant.
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
        // A copy's bytes, or a link's new inode count, are durable before the node counts on
        // them; then the directory entries, below.
        fsync(&target)?;
    }
    fsync(db_dir)?;
    fsync(data_dir)
}

/// Verifies every shard of the restored database against its own log (and the archive): true
/// when each one matched. A shard that cannot be verified (purged below its snapshot and not in
/// the archive, or a storage fault such as a checksum mismatch in its log) is reported and makes
/// the answer false.
fn verify_restored(data_dir: &Path, archive: Option<&dyn SegmentStore>) -> anyhow::Result<bool> {
    let db = open(data_dir)?;
    let mut ok = true;
    for shard in shards(&db)? {
        let total = ShardState::load(db.as_ref(), shard)?.applied;
        let bar =
            crate::progress::replay_bar(total.get(), &format!("verify shard {}", shard.get()));
        let result = rebuild::verify(
            &db,
            shard,
            (archive, rebuild::ReplayFrom::Genesis),
            &Projection::ALL,
            usize::MAX,
            &mut |done, _| {
                bar.set_position(done.get());
            },
        );
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
            Err(courier_storage::StorageError::MissingEntry { index, .. }) => {
                ok = false;
                println!(
                    "{shard}: NOT VERIFIED: log entry {index} is purged from the checkpoint{}",
                    if archive.is_some() {
                        " and not in the archive"
                    } else {
                        "; give --archive (the cluster's archive.dir)"
                    }
                );
            }
            Err(other) => {
                ok = false;
                println!("{shard}: NOT VERIFIED: {other}");
            }
        }
    }
    Ok(ok)
}

/// fsyncs one restored file or directory.
fn fsync(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("fsync of {}", path.display()))
}

/// Copies a checkpoint into `data_dir/db` of a node that has never run (hard links where the
/// filesystem allows) and fsyncs the files and their directories, then verifies every shard of
/// the copy against its own log (and the archive's entries, when given). Returns whether every
/// shard was verified and matched: a shard whose log was purged below a snapshot and that the
/// archive does not cover, or whose verify met a storage fault, is a failure, not a skip. A
/// restore that fails after the copy began removes `data_dir/db` again.
///
/// # Errors
/// A checkpoint that is not a database, an existing `data_dir/db`, copy faults (the copy is
/// removed).
pub(crate) fn restore(
    from: &Path,
    data_dir: &Path,
    archive: Option<&dyn SegmentStore>,
) -> anyhow::Result<bool> {
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
    // Whatever goes wrong from here (a copy that fails halfway, a shard that does not verify, a
    // storage fault met while verifying), the restore leaves nothing behind, so it can be
    // retried (with --archive, or from another checkpoint) into the same directory.
    let verified =
        copy_checkpoint(from, data_dir, &db_dir).and_then(|()| verify_restored(data_dir, archive));
    if !matches!(verified, Ok(true)) {
        if let Err(remove) = std::fs::remove_dir_all(&db_dir) {
            // Both said: why the restore failed, and that its copy is still there.
            let why = verified.err().map_or_else(
                || "not every shard verified".to_owned(),
                |error| format!("{error:#}"),
            );
            bail!(
                "restore FAILED ({why}), and removing the unverified {} failed too: {remove}; remove it before a retry",
                db_dir.display()
            );
        }
        let removed = format!("{} removed, nothing restored", db_dir.display());
        return match verified {
            Err(error) => Err(error.context(format!("restore FAILED; {removed}"))),
            Ok(_) => {
                println!("restore FAILED: not every shard verified; {removed}");
                Ok(false)
            }
        };
    }
    println!(
        "restored into {}; start the node with a NEW node id, then `courier-ops node add` it",
        db_dir.display()
    );
    Ok(true)
}
