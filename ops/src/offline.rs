//! Commands on a stopped node's data directory (opened read-only).

use std::path::Path;

use anyhow::{Context as _, bail};
use courier_proto::{LogIndex, ShardId};
use courier_storage::rebuild::{self, Comparison};
use courier_storage::{Db, LogStore, MemKv, OpenMode, Projection, ShardState};
use indicatif::{ProgressBar, ProgressStyle};

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

fn projection_named(name: &str) -> anyhow::Result<Projection> {
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
    if log
        .first_index()?
        .is_some_and(|first| first > LogIndex::new(1))
    {
        bail!("{shard}: the log was purged below a snapshot; offline replay starts at index 1");
    }
    let bar = ProgressBar::new(at.get());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} replay [{bar:30}] {pos}/{len} entries {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
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

/// Rebuilds one projection of a stopped node's shard from its log and swaps it in atomically.
///
/// # Errors
/// Without `yes`; a data directory in use; storage faults.
pub(crate) fn rebuild(
    data_dir: &Path,
    shard: u16,
    projection: &str,
    yes: bool,
) -> anyhow::Result<()> {
    let projection = projection_named(projection)?;
    if !yes {
        bail!(
            "rebuild rewrites the {} projection of shard {shard}; run again with --yes",
            projection.name()
        );
    }
    let path = db_path(data_dir)?;
    let db = std::sync::Arc::new(Db::open(&path, OpenMode::ReadWrite).with_context(|| {
        format!(
            "opening {} (is the node still running? stop it first)",
            path.display()
        )
    })?);
    let shard = ShardId::new(shard);
    let (live, rebuilt, elapsed) = replay_to(&db, shard, None)?;
    let cf = courier_storage::Cf::Projection(projection);
    let (start, end) = courier_storage::keys::shard_range(shard);
    let pairs: Vec<courier_storage::kv::Change> = rebuilt
        .kv
        .range(cf, &start, &end)
        .map(|(k, v)| (cf, k.clone(), Some(v.clone())))
        .collect();
    let mut state = live.clone();
    state
        .digests
        .insert(projection, rebuilt.state.digest(projection));
    let mut changes = pairs;
    changes.push((
        courier_storage::Cf::Meta,
        courier_storage::keys::applied_state(shard),
        Some(prost::Message::encode_to_vec(&state.to_applied_state())),
    ));
    // One atomic batch: the old projection is cleared and the rebuilt one written together.
    db.replace_ranges(&[(cf, start, end)], changes, true)?;
    println!(
        "{shard} {}: rebuilt {} entries at applied index {} from {} events in {:.2}s",
        projection.name(),
        rebuilt.state.digest(projection).entries,
        live.applied,
        rebuilt.events,
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Verifies a shard's projections against a replay of its log. Returns whether all matched.
///
/// # Errors
/// Storage faults, an unknown projection name, or a log that no longer starts at index 1.
pub(crate) fn verify(
    data_dir: &Path,
    shard: u16,
    projection: Option<&str>,
    json: bool,
) -> anyhow::Result<bool> {
    let projections: Vec<Projection> = match projection {
        None => Projection::ALL.to_vec(),
        Some(name) => vec![projection_named(name)?],
    };
    let db = open(data_dir)?;
    let shard = ShardId::new(shard);
    let (live, rebuilt, elapsed) = replay_to(&db, shard, None)?;
    let comparisons = rebuild::compare(db.as_ref(), &live, &rebuilt, &projections, 5)?;
    let ok = comparisons.iter().all(Comparison::is_equal);
    if json {
        print_json(shard, &live, &rebuilt, &comparisons, elapsed);
    } else {
        print_table(shard, &live, &rebuilt, &comparisons, elapsed);
    }
    Ok(ok)
}

fn print_table(
    shard: ShardId,
    live: &ShardState,
    rebuilt: &rebuild::Rebuilt,
    comparisons: &[Comparison],
    elapsed: std::time::Duration,
) {
    let rate = rebuilt.events as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "{shard} applied={} events_replayed={} replay={:.2}s ({rate:.0} events/s)",
        live.applied,
        rebuilt.events,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<10} {:>8} {:<34} result",
        "projection", "entries", "digest"
    );
    for c in comparisons {
        let result = if c.is_equal() {
            "ok".to_owned()
        } else {
            "MISMATCH".to_owned()
        };
        println!(
            "{:<10} {:>8} {:032x} {}",
            c.projection.name(),
            c.live.entries,
            c.live.sum,
            result
        );
        for m in &c.mismatches {
            println!(
                "  first divergent index {} key {} expected {} actual {}",
                m.first_divergent_index,
                courier_storage::projection::hex(&m.key),
                m.expected
                    .as_deref()
                    .map_or("<absent>".to_owned(), courier_storage::projection::hex),
                m.actual
                    .as_deref()
                    .map_or("<absent>".to_owned(), courier_storage::projection::hex),
            );
        }
    }
}

fn print_json(
    shard: ShardId,
    live: &ShardState,
    rebuilt: &rebuild::Rebuilt,
    comparisons: &[Comparison],
    elapsed: std::time::Duration,
) {
    let hex = courier_storage::projection::hex;
    let projections: Vec<serde_json::Value> = comparisons
        .iter()
        .map(|c| {
            serde_json::json!({
                "projection": c.projection.name(),
                "ok": c.is_equal(),
                "entries": c.live.entries,
                "live_digest": format!("{:032x}", c.live.sum),
                "stored_digest": format!("{:032x}", c.stored.sum),
                "rebuilt_digest": format!("{:032x}", c.rebuilt.sum),
                "mismatches": c.mismatches.iter().map(|m| serde_json::json!({
                    "first_divergent_index": m.first_divergent_index.get(),
                    "key": hex(&m.key),
                    "expected": m.expected.as_deref().map(hex),
                    "actual": m.actual.as_deref().map(hex),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let out = serde_json::json!({
        "shard": shard.get(),
        "applied": live.applied.get(),
        "events_replayed": rebuilt.events,
        "replay_s": elapsed.as_secs_f64(),
        "projections": projections,
    });
    println!("{out}");
}
