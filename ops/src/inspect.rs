//! `courier-ops inspect user`: a user's state as it was at a log index of the user's shard, each
//! value with the index of the event that last set it. Offline: replays the log into memory.

use std::path::Path;

use anyhow::Context as _;
use courier_proto::pb::store::{DeviceRecord, InboxEntry, InboxState, ReadState, Receipt};
use courier_proto::{LogIndex, ShardId, UserId, shard_of};
use courier_storage::kv::MemKv;
use courier_storage::projection::{Projection, hex, unframe};
use courier_storage::{Cf, keys};
use prost::Message;

/// Messages and receipts shown at most.
const SHOWN_MAX: usize = 10;

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

/// Prints `user`'s state at `at` (default: the applied index).
///
/// # Errors
/// Storage faults, a purged log, or an index past the log.
pub(crate) fn user(data_dir: &Path, user: u64, shards: u16, at: Option<u64>) -> anyhow::Result<()> {
    let user = UserId::new(user).context("user ids start at 1")?;
    let shard: ShardId = shard_of(user, shards);
    let db = crate::offline::open(data_dir)?;
    let (live, state, _) = crate::offline::replay_to(&db, shard, at.map(LogIndex::new))?;
    let at = state.state.applied;
    let kv = &state.kv;
    println!(
        "{user} on {shard} at log index {at} (applied: {})",
        live.applied
    );

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
    Ok(())
}
