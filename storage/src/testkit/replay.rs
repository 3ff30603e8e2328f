//! Doing what a replica does with generated payloads: log records, append, apply and commit.

#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use courier_proto::LogIndex;
use courier_proto::pb::events::EntryPayload;

use crate::shard::{Committed, ShardState};

/// Stored log records for `payloads` at consecutive indexes from `first` (term 1, no raft part).
pub fn records(first: LogIndex, payloads: &[EntryPayload]) -> Vec<crate::LogRecord> {
    use prost::Message as _;
    payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| crate::LogRecord {
            index: LogIndex::new(first.get() + i as u64),
            term: 1,
            payload: courier_proto::pb::store::LogEntry {
                raft: Vec::new(),
                events: Some(payload.clone()),
            }
            .encode_to_vec(),
        })
        .collect()
}

/// Stored log records `from..=to` with opaque payloads (each its index's bytes), for tests of
/// what moves log records around without reading them (archive, segments, readers).
pub fn opaque_records(from: u64, to: u64) -> Vec<crate::LogRecord> {
    (from..=to)
        .map(|i| crate::LogRecord {
            index: LogIndex::new(i),
            term: 1,
            payload: i.to_be_bytes().to_vec(),
        })
        .collect()
}

/// Does what a replica does with `payloads`: appends them to `log` (synced) after `state`'s
/// applied index, then applies them in one batch and commits it. Returns the appended records.
///
/// # Panics
/// On a storage fault (tests and benchmarks only).
pub fn append_and_apply(
    db: &crate::Db,
    log: &crate::LogStore,
    state: &mut ShardState,
    payloads: &[EntryPayload],
) -> Vec<crate::LogRecord> {
    let records = records(state.applied.next(), payloads);
    log.append(&records).expect("append");
    apply(db, state, &records, payloads);
    records
}

/// Applies already appended `records` (with their `payloads`) and commits the batch.
///
/// # Panics
/// On a storage fault (tests and benchmarks only).
pub fn apply(
    db: &crate::Db,
    state: &mut ShardState,
    records: &[crate::LogRecord],
    payloads: &[EntryPayload],
) {
    let committed: Vec<Committed<'_>> = records
        .iter()
        .zip(payloads)
        .map(|(record, payload)| Committed {
            index: record.index,
            payload: Some(payload),
        })
        .collect();
    let batch = state
        .apply_batch(db, &committed, Vec::new())
        .expect("apply");
    db.commit(batch.changes, false).expect("commit");
    *state = batch.next;
}
