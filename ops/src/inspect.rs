//! `courier-ops inspect user`: a user's state as it was at a log index of the user's shard, each
//! value with the index of the event that last set it. Offline, the log is replayed into memory
//! here; online, on the node (`Admin.InspectUser`), which answers the user's stored pairs.
//! `courier-ops inspect message`: one message's life across the sender's and recipient's shards.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use courier_proto::pb::events::conversation::With;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::store::{DeviceRecord, InboxEntry, InboxState, ReadState, Receipt};
use courier_proto::{LogIndex, ShardId, UserId, shard_of};
use courier_storage::archive::{SegmentStore, for_each_entry, log_source};
use courier_storage::inspect::SHOWN_MAX;
use courier_storage::kv::MemKv;
use courier_storage::projection::{Projection, hex, unframe};
use courier_storage::{Cf, Db, LogStore, keys};
use prost::Message;

fn decoded<M: Message + Default>(value: &[u8]) -> Option<(LogIndex, M)> {
    let (at, body) = unframe(value)?;
    Some((at, M::decode(body).ok()?))
}

fn user_range(kv: &MemKv, projection: Projection, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let end = keys::prefix_end(prefix).unwrap_or_else(|| vec![0xff; 16]);
    kv.range(Cf::Projection(projection), prefix, &end)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Prints `user`'s state at `at` (default: the applied index) from a stopped node's data
/// directory.
///
/// # Errors
/// Storage faults, a purged log, or an index past the log.
pub(crate) fn user(
    data_dir: &Path,
    archive: Option<&dyn SegmentStore>,
    user: u64,
    shards: u16,
    at: Option<u64>,
) -> anyhow::Result<()> {
    let user = UserId::new(user).context("user ids start at 1")?;
    let shard: ShardId = shard_of(user, shards);
    let db = crate::offline::open(data_dir)?;
    // A wrong `--shards`, or a user on a shard this node holds no replica of, would otherwise
    // print an empty user.
    crate::offline::require_held(&db, shard)?;
    let (live, state, _) = crate::offline::replay_to(
        &db,
        (archive, courier_storage::rebuild::ReplayFrom::Checkpoint),
        shard,
        at.map(LogIndex::new),
    )?;
    print_user(
        &courier_storage::inspect::user_pairs(&state.kv, shard, user),
        (shard, user),
        state.state.applied,
        live.applied,
    );
    Ok(())
}

/// Prints a user's state at `at` from the user's stored pairs (as
/// [`courier_storage::inspect::user_pairs`] selects them, offline or on a node).
pub(crate) fn print_user(
    pairs: &[(Projection, Vec<u8>, Vec<u8>)],
    (shard, user): (ShardId, UserId),
    at: LogIndex,
    applied: LogIndex,
) {
    let kv = &courier_storage::inspect::state_of(pairs.iter().cloned());
    println!("{user} on {shard} at log index {at} (applied: {applied})");
    print_inbox(kv, shard, user);
    print_cursors(kv, shard, user);
    print_read_states(kv, shard, user);
    print_receipt_feed(kv, shard, user);
    print_devices(kv, shard, user);
}

/// Prints the inbox's tail and its last [`SHOWN_MAX`] messages.
fn print_inbox(kv: &MemKv, shard: ShardId, user: UserId) {
    let inbox: Option<(LogIndex, InboxState)> = kv
        .range(
            Cf::Projection(Projection::Inbox),
            &keys::inbox_state(shard, user),
            &keys::prefix_end(&keys::inbox_state(shard, user)).unwrap_or_default(),
        )
        .next()
        .and_then(|(_, v)| decoded(v));
    match inbox {
        None => println!("inbox: empty"),
        Some((set_at, s)) => println!(
            "inbox: tail {} delivered_up_to {} (set at {set_at})",
            s.tail_seq, s.delivered_up_to
        ),
    }
    let messages = user_range(kv, Projection::Inbox, &keys::inbox_user_prefix(shard, user));
    for (key, value) in messages.iter().rev().take(SHOWN_MAX).rev() {
        let seq = key
            .get(key.len().saturating_sub(8)..)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes);
        if let Some((set_at, entry)) = decoded::<InboxEntry>(value) {
            println!(
                "  seq {seq:>6} message {} from {} body {} bytes (set at {set_at})",
                hex(&entry.message_id),
                entry.sender_user,
                entry.content.map_or(0, |c| c.body.len())
            );
        }
    }
}

/// Prints each device's acked position.
fn print_cursors(kv: &MemKv, shard: ShardId, user: UserId) {
    let cursors = user_range(
        kv,
        Projection::Cursors,
        &keys::KeyBuf::shard(shard)
            .u8(keys::tag::PRIMARY)
            .u64(user.get())
            .done(),
    );
    for (key, value) in cursors {
        let device = key
            .get(key.len().saturating_sub(4)..)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes);
        if let Some((set_at, body)) = unframe(&value) {
            let acked = body.try_into().map_or(0, u64::from_be_bytes);
            println!("cursor: device {device} acked up to {acked} (set at {set_at})");
        }
    }
}

/// Prints each conversation's counts and read position.
fn print_read_states(kv: &MemKv, shard: ShardId, user: UserId) {
    for (key, value) in user_range(
        kv,
        Projection::ReadState,
        &keys::read_state_user_prefix(shard, user),
    ) {
        let with = key
            .get(key.len().saturating_sub(8)..)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes);
        if let Some((set_at, s)) = decoded::<ReadState>(&value) {
            let unread = s
                .count
                .saturating_sub(s.read_pos)
                .saturating_sub(s.expired_unread);
            println!(
                "conversation with {with}: {} messages, {unread} unread, read up to seq {} (set at {set_at})",
                s.count, s.read_seq
            );
        }
    }
}

/// Prints the last [`SHOWN_MAX`] receipts of the user's feed.
fn print_receipt_feed(kv: &MemKv, shard: ShardId, user: UserId) {
    let feed = user_range(
        kv,
        Projection::Receipts,
        &keys::receipt_feed_prefix(shard, user),
    );
    for (key, value) in feed.iter().rev().take(SHOWN_MAX).rev() {
        let message = key
            .get(key.len().saturating_sub(24)..key.len().saturating_sub(8))
            .map(hex)
            .unwrap_or_default();
        if let Some((set_at, r)) = decoded::<Receipt>(value) {
            println!(
                "receipt: message {message} {:?} (set at {set_at})",
                r.state()
            );
        }
    }
}

/// Prints each device's record.
fn print_devices(kv: &MemKv, shard: ShardId, user: UserId) {
    for (key, value) in user_range(
        kv,
        Projection::Devices,
        &keys::device_user_prefix(shard, user),
    ) {
        let device = key
            .get(key.len().saturating_sub(4)..)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes);
        if let Some((set_at, d)) = decoded::<DeviceRecord>(&value) {
            println!(
                "device {device}: primary {} revoked {} (set at {set_at})",
                d.primary, d.revoked
            );
        }
    }
}

/// Calls `f` with every event of `shard`'s log (the archive's entries first, when given), in
/// order, with its log index; stops early when `f` returns false. Returns whether the log read
/// from index 1: a log purged below a snapshot (without an archive that holds the rest) is
/// scanned from its first entry, and says so on stderr.
fn scan_log(
    db: &Arc<Db>,
    archive: Option<&dyn SegmentStore>,
    shard: ShardId,
    f: &mut dyn FnMut(LogIndex, &Kind) -> bool,
) -> anyhow::Result<bool> {
    let log = log_source(LogStore::new(db.clone(), shard), archive)?;
    let Some((first, last)) = log.bounds()? else {
        return Ok(true);
    };
    let complete = log.require_full().is_ok();
    if !complete {
        eprintln!(
            "{shard}: entries below {first} are not here ({}); searched from {first}",
            crate::offline::purged_hint(archive.is_some())
        );
    }
    let bar = crate::progress::replay_bar(last.get(), &format!("scan shard {}", shard.get()));
    for_each_entry(log.as_ref(), first, last, &mut |record| {
        let entry = courier_storage::rebuild::decode_entry(shard, record)?;
        bar.set_position(record.index.get());
        for event in entry.events.iter().flat_map(|p| &p.events) {
            if let Some(kind) = &event.kind
                && !f(record.index, kind)
            {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .with_context(|| crate::offline::purged_hint(archive.is_some()))?;
    bar.finish_and_clear();
    Ok(complete)
}

/// Prints the life of one message across the sender's and the recipient's shards. Returns
/// false when no shard of this node has sent it.
///
/// # Errors
/// A malformed id, storage faults.
pub(crate) fn message(
    data_dir: &Path,
    archive: Option<&dyn SegmentStore>,
    id: &str,
) -> anyhow::Result<bool> {
    let wanted = parse_hex16(id).with_context(|| format!("{id:?} is not 32 hex digits"))?;
    let db = crate::offline::open(data_dir)?;
    let mut sent = None;
    for shard in crate::offline::shards(&db)? {
        scan_log(&db, archive, shard, &mut |index, kind| match kind {
            Kind::MessageSent(e) if e.message_id == wanted => {
                sent = Some((shard, index, e.clone()));
                false
            }
            _ => true,
        })?;
        if sent.is_some() {
            break;
        }
    }
    let Some((source, sent_at, sent)) = sent else {
        return delivered_only(&db, archive, id, &wanted);
    };
    let recipient = match sent.to.as_ref().and_then(|c| c.with) {
        Some(With::User(user)) => user,
        Some(With::Group(group)) => {
            println!(
                "message {id}: a group message (group {group}); group fan-out is not traced yet"
            );
            return Ok(true);
        }
        None => 0,
    };
    let dest = ShardId::new(u16::try_from(sent.recipient_shard).unwrap_or(u16::MAX));
    println!(
        "sent       {source} index {sent_at}: user {} device {} -> user {recipient} on {dest}",
        sent.sender_user, sent.sender_device
    );
    let seq = trace_recipient(&db, archive, dest, &wanted, recipient, sent.sender_user)?;
    trace_sender(&db, archive, source, dest, &wanted, seq.map(|(_, pos)| pos))?;
    Ok(true)
}

/// A message whose `MessageSent` is on no shard of this node (the sender's shard lives
/// elsewhere): where it was delivered, if here. Returns false when it is nowhere.
fn delivered_only(
    db: &Arc<Db>,
    archive: Option<&dyn SegmentStore>,
    id: &str,
    wanted: &[u8],
) -> anyhow::Result<bool> {
    let mut found = false;
    let mut purged = Vec::new();
    for shard in crate::offline::shards(db)? {
        let complete = scan_log(db, archive, shard, &mut |index, kind| match kind {
            Kind::MessageDelivered(e) if e.message_id == wanted => {
                println!(
                    "delivered  {shard} index {index}: to user {} (forwarded from shard {} outbox position {}; the sender's shard is not on this node)",
                    e.recipient_user, e.source_shard, e.source_pos
                );
                found = true;
                false
            }
            _ => true,
        })?;
        if found {
            return Ok(true);
        }
        if !complete {
            purged.push(shard.to_string());
        }
    }
    // Not found in what this node holds; below a purge it may still be: say so, as an error,
    // rather than "not here".
    if !purged.is_empty() {
        anyhow::bail!(
            "message {id} is in none of the entries this node's logs hold, but {} are purged below a snapshot: {}",
            purged.join(", "),
            crate::offline::purged_hint(archive.is_some())
        );
    }
    println!("message {id}: not in any shard log of this node");
    Ok(false)
}

/// The recipient's side: stored in the inbox, acked by devices, read. Returns the inbox seq and
/// the outbox position it was forwarded at.
fn trace_recipient(
    db: &Arc<Db>,
    archive: Option<&dyn SegmentStore>,
    dest: ShardId,
    id: &[u8],
    recipient: u64,
    sender: u64,
) -> anyhow::Result<Option<(u64, u64)>> {
    let Some(user) = UserId::new(recipient) else {
        return Ok(None);
    };
    let seq = courier_storage::ReadKv::get(
        db.as_ref(),
        Cf::Projection(Projection::Inbox),
        &keys::inbox_message_id(
            dest,
            user,
            courier_proto::MessageId::from_bytes(id.try_into().unwrap_or([0; 16])),
        ),
    )?
    .and_then(|v| unframe(&v).and_then(|(_, body)| body.try_into().ok().map(u64::from_be_bytes)));
    let mut found = None;
    let mut acked = std::collections::BTreeSet::new();
    let mut read = false;
    scan_log(db, archive, dest, &mut |index, kind| {
        match kind {
            Kind::MessageDelivered(e) if e.message_id == id => {
                let how = if e.source_pos == 0 {
                    "same shard, no forward".to_owned()
                } else {
                    format!(
                        "forwarded from shard {} outbox position {}",
                        e.source_shard, e.source_pos
                    )
                };
                println!(
                    "delivered  {dest} index {index}: inbox seq {} of user {recipient} ({how})",
                    seq.map_or_else(|| "?".to_owned(), |s| s.to_string())
                );
                found = Some(e.source_pos);
            }
            Kind::DeliveryAcked(e)
                if found.is_some()
                    && e.user == recipient
                    && seq.is_some_and(|s| e.up_to_seq >= s)
                    && acked.insert(e.device) =>
            {
                println!(
                    "acked      {dest} index {index}: device {} up to seq {}",
                    e.device, e.up_to_seq
                );
            }
            Kind::ReadUpTo(e)
                if found.is_some()
                    && !read
                    && e.user == recipient
                    && seq.is_some_and(|s| e.up_to_seq >= s)
                    && matches!(e.conversation.as_ref().and_then(|c| c.with), Some(With::User(u)) if u == sender) =>
            {
                read = true;
                println!("read       {dest} index {index}: up to seq {}", e.up_to_seq);
            }
            _ => {}
        }
        true
    })?;
    if found.is_none() {
        println!("delivered  not yet in {dest}'s log");
    }
    Ok(seq.zip(found))
}

/// The sender's side: the forward acknowledged (outbox trimmed) and the receipts recorded.
fn trace_sender(
    db: &Arc<Db>,
    archive: Option<&dyn SegmentStore>,
    source: ShardId,
    dest: ShardId,
    id: &[u8],
    position: Option<u64>,
) -> anyhow::Result<()> {
    let mut trimmed = false;
    scan_log(db, archive, source, &mut |index, kind| {
        match kind {
            Kind::OutboxTrimmed(e)
                if !trimmed
                    && u32::from(dest.get()) == e.dest_shard
                    && position.is_some_and(|p| p > 0 && e.up_to >= p) =>
            {
                trimmed = true;
                println!(
                    "forwarded  {source} index {index}: {dest} confirmed outbox up to {}",
                    e.up_to
                );
            }
            Kind::ReceiptRecorded(e) if e.message_id == id => println!(
                "receipt    {source} index {index}: {:?} for user {} (outbox position {} of shard {})",
                e.state(),
                e.recipient_user,
                e.source_pos,
                e.source_shard
            ),
            _ => {}
        }
        true
    })
    .map(|_complete| ())
}

fn parse_hex16(text: &str) -> Option<Vec<u8>> {
    if text.len() != 32 {
        return None;
    }
    (0..16)
        .map(|i| {
            text.get(i * 2..i * 2 + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}
