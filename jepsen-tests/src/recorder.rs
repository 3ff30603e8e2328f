//! The shared, append-only history of a run: one [`HistoryWriter`] behind a mutex, the harness
//! clock every record is stamped with, and the counters that make op and session ids unique.
//!
//! Every task that records (send workers, device streams, the nemesis, the final phase) holds an
//! `Arc<Recorder>`. Records of one task are appended in the order that task produced them, which
//! is all the history format asks (an invoke before its complete, a session start before its
//! deliveries).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
// tokio's clock: real time in a jepsen run, simulated time in courier-sim.
use tokio::time::Instant;

use crate::history::{HistoryWriter, Record, Retention};

/// The run's history file, clock and id counters.
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    writer: Mutex<HistoryWriter<File>>,
    next_op: AtomicU64,
    next_session: AtomicU64,
    records: AtomicU64,
    write_errors: AtomicU64,
}

impl Recorder {
    /// Creates (truncates) the history file at `path`, starting with what the run's nodes keep
    /// of delivered messages (`retention.keep-delivered`) and whether its users have a second
    /// device (`own_copies`: each send is then stored for its sender too), which the checker
    /// reads; the harness clock starts now.
    ///
    /// # Errors
    ///
    /// The error of creating the file.
    pub fn create(path: &Path, keep_delivered: bool, own_copies: bool) -> std::io::Result<Self> {
        let recorder = Self {
            started: Instant::now(),
            writer: Mutex::new(HistoryWriter::create(path)?),
            next_op: AtomicU64::new(1),
            next_session: AtomicU64::new(1),
            records: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        };
        recorder.record(&Record::Retention(Retention {
            keep_delivered,
            own_copies,
        }));
        Ok(recorder)
    }

    /// Milliseconds since the recorder was created (the `time_ms` of every record).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A fresh op id, unique in this history.
    pub fn next_op_id(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh session id, unique in this history.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends one record. A write error is counted (see [`Recorder::write_errors`]) rather than
    /// returned: a harness that cannot record must fail the run, which the caller checks once at
    /// the end instead of at every one of thousands of call sites.
    pub fn record(&self, record: &Record) {
        // A panic while holding the lock leaves the writer usable: each record is one write_all.
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        match writer.append(record) {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "cannot append to the history");
            }
        }
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Records that could not be written (any makes the run fail).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}
