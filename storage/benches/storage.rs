//! Storage throughput: append + apply events/s and rebuild events/s, with ratios against a
//! baseline measured in the same run (raw synced RocksDB batches of the same log bytes, with no
//! projections).
//!
//! Run: `cargo bench -p courier-storage --features testkit --bench storage`
//! (`BENCH_ENTRIES` sets the log length; default 20000 entries of 1..=4 events.)

#![allow(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::disallowed_methods
)]

use std::sync::Arc;
use std::time::Instant;

use courier_proto::pb::store::LogEntry;
use courier_proto::{LogIndex, ShardId};
use courier_storage::rebuild;
use courier_storage::testkit::{self, EventGen};
use courier_storage::{Cf, Db, LogRecord, LogStore, OpenMode, ShardState};
use prost::Message;

const SHARD: ShardId = ShardId::new(0);
/// Entries per raft batch (one fsync each), as a leader under load would write them.
const BATCH_ENTRIES: usize = 64;
/// Entries per apply batch in the apply-only rows, as a replica under load applies them.
const APPLY_BATCH_ENTRIES: usize = 8;

/// The allocator of the binaries that append, apply and rebuild (`courier-node`, `courier-ops`),
/// so that the figures are theirs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let entries: usize = std::env::var("BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    eprintln!("generating {entries} entries...");
    let mut generator = EventGen::new(SHARD, 42);
    generator.body_bytes = 200;
    let payloads = generator.payloads(entries, 4);
    let events: usize = payloads.iter().map(|p| p.events.len()).sum();
    let records: Vec<LogRecord> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| LogRecord {
            index: LogIndex::new(i as u64 + 1),
            term: 1,
            payload: LogEntry {
                raft: Vec::new(),
                events: Some(p.clone()),
            }
            .encode_to_vec(),
        })
        .collect();
    let log_bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    eprintln!(
        "{entries} entries, {events} events, {} MiB of log payload",
        log_bytes >> 20
    );

    // Baseline: the same bytes as raw synced batches, no checksums, no projections.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path(), OpenMode::ReadWrite).expect("open");
    let started = Instant::now();
    for chunk in records.chunks(BATCH_ENTRIES) {
        let changes = chunk.iter().map(|r| {
            (
                Cf::Log,
                r.index.get().to_be_bytes().to_vec(),
                Some(r.payload.clone()),
            )
        });
        db.commit(changes, true).expect("write");
    }
    let baseline = started.elapsed();
    drop(db);

    // courier: checksummed synced log appends, then the apply batch (projections + digests).
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("open"));
    let log = LogStore::new(db.clone(), SHARD);
    let mut state = ShardState::empty(SHARD);
    let started = Instant::now();
    for (chunk, chunk_payloads) in records
        .chunks(BATCH_ENTRIES)
        .zip(payloads.chunks(BATCH_ENTRIES))
    {
        log.append(chunk).expect("append");
        testkit::apply(db.as_ref(), &mut state, chunk, chunk_payloads);
    }
    let append_apply = started.elapsed();

    // Apply alone (no log, unsynced commits, as a replica applies), in batches of a loaded
    // replica's size: the fold's own cost, without the log's fsyncs.
    let apply_only = {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path(), OpenMode::ReadWrite).expect("open");
        let mut state = ShardState::empty(SHARD);
        let started = Instant::now();
        for (chunk, chunk_payloads) in records
            .chunks(APPLY_BATCH_ENTRIES)
            .zip(payloads.chunks(APPLY_BATCH_ENTRIES))
        {
            testkit::apply(&db, &mut state, chunk, chunk_payloads);
        }
        started.elapsed()
    };

    // Rebuild: replay the whole log from RocksDB into memory, one core.
    let started = Instant::now();
    let rebuilt = rebuild::replay_from_start(&log, state.applied).expect("replay");
    let rebuild_time = started.elapsed();
    assert_eq!(rebuilt.state, state, "the rebuild matches the live state");

    let rate = |d: std::time::Duration| events as f64 / d.as_secs_f64();
    let fsyncs = records.len().div_ceil(BATCH_ENTRIES);
    println!("| measurement | time (s) | events/s | ratio to baseline |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| baseline: raw synced RocksDB batches, same bytes | {:.2} | {:.0} | 1.00 |",
        baseline.as_secs_f64(),
        rate(baseline)
    );
    println!(
        "| append (crc32c, synced) + apply (9 projections, digests) | {:.2} | {:.0} | {:.2} |",
        append_apply.as_secs_f64(),
        rate(append_apply),
        rate(append_apply) / rate(baseline)
    );
    println!(
        "| apply only: {APPLY_BATCH_ENTRIES} entries per batch, unsynced commits | {:.2} | {:.0} | {:.2} |",
        apply_only.as_secs_f64(),
        rate(apply_only),
        rate(apply_only) / rate(baseline)
    );
    println!(
        "| rebuild: replay log into memory (1 core) | {:.2} | {:.0} | {:.2} |",
        rebuild_time.as_secs_f64(),
        rate(rebuild_time),
        rate(rebuild_time) / rate(baseline)
    );
    println!();
    println!(
        "{entries} entries, {events} events, {fsyncs} fsyncs ({BATCH_ENTRIES} entries per fsync), {} MiB",
        log_bytes >> 20
    );
}
