//! Storage throughput: append + apply events/s and rebuild events/s, with ratios against a
//! baseline measured in the same run (raw synced RocksDB batches of the same log bytes, with no
//! projections).
//!
//! Run: `cargo bench -p courier-storage --features testkit --bench storage`
//! (`BENCH_ENTRIES` sets the log length, default 20000 entries of 1..=4 events; `BENCH_RUNS` how
//! many times every row is measured, default 3, each row printing its median and spread.)

#![allow(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::disallowed_methods
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_proto::pb::events::EntryPayload;
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

/// Runs of the whole measurement by default (`BENCH_RUNS`): one run on this machine can be 2×
/// slower than the next with nothing changed (docs/BENCHMARKS.md, session 27), so each row reports
/// the median and the spread.
const RUNS_DEFAULT: usize = 3;

/// Picks one timing out of a run.
type Pick = fn(&Run) -> Duration;

/// The four timings of one run.
struct Run {
    baseline: Duration,
    append_apply: Duration,
    apply_only: Duration,
    rebuild: Duration,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let entries = env_usize("BENCH_ENTRIES", 20_000);
    let runs = env_usize("BENCH_RUNS", RUNS_DEFAULT).max(1);
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
        "{entries} entries, {events} events, {} MiB of log payload; measured {runs} times",
        log_bytes >> 20
    );
    let timings: Vec<Run> = (1..=runs)
        .map(|run| {
            let timing = measure(&records, &payloads);
            eprintln!(
                "run {run} of {runs}: baseline {:.2} s, append + apply {:.2} s, apply only {:.2} s, rebuild {:.2} s",
                timing.baseline.as_secs_f64(),
                timing.append_apply.as_secs_f64(),
                timing.apply_only.as_secs_f64(),
                timing.rebuild.as_secs_f64()
            );
            timing
        })
        .collect();

    let rates = |pick: Pick| -> Vec<f64> {
        let mut rates: Vec<f64> = timings
            .iter()
            .map(|run| events as f64 / pick(run).as_secs_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        rates
    };
    let median = |sorted: &[f64]| {
        let mid = sorted.len() / 2;
        if sorted.len().is_multiple_of(2) {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        } else {
            sorted[mid]
        }
    };
    let baseline = rates(|run| run.baseline);
    let fsyncs = records.len().div_ceil(BATCH_ENTRIES);
    println!(
        "| measurement | events/s, median of {runs} | slowest – fastest run | ratio to baseline (medians) |"
    );
    println!("| --- | ---: | ---: | ---: |");
    let rows: [(String, Pick); 4] = [
        (
            "baseline: raw synced RocksDB batches, same bytes".to_owned(),
            |run| run.baseline,
        ),
        (
            "append (crc32c, synced) + apply (9 projections, digests)".to_owned(),
            |run| run.append_apply,
        ),
        (
            format!("apply only: {APPLY_BATCH_ENTRIES} entries per batch, unsynced commits"),
            |run| run.apply_only,
        ),
        (
            "rebuild: replay log into memory (1 core)".to_owned(),
            |run| run.rebuild,
        ),
    ];
    for (name, pick) in rows {
        let row = rates(pick);
        println!(
            "| {name} | {:.0} | {:.0} – {:.0} | {:.2} |",
            median(&row),
            row[0],
            row[row.len() - 1],
            median(&row) / median(&baseline)
        );
    }
    println!();
    println!(
        "{entries} entries, {events} events, {fsyncs} fsyncs ({BATCH_ENTRIES} entries per fsync), {} MiB, measured {runs} times",
        log_bytes >> 20
    );
}

/// One run of every measurement, each on a fresh database.
fn measure(records: &[LogRecord], payloads: &[EntryPayload]) -> Run {
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
    let rebuild = started.elapsed();
    assert_eq!(rebuilt.state, state, "the rebuild matches the live state");
    Run {
        baseline,
        append_apply,
        apply_only,
        rebuild,
    }
}
