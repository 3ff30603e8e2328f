//! Reads of a shard whose replica is on another node: the projection read functions run here,
//! unchanged, over answers a replica gave to the key-value reads they make.
//!
//! A read function is a pure function of the reads it makes, but which keys it reads depends on
//! what it read before (a user's record names its devices, …). So a [`RemoteRead`] runs it in
//! rounds. Each run answers the reads it has answers for and notes every other one as a miss,
//! answered as if absent so that the run goes on and finds the independent reads too. A run with
//! a miss is thrown away; the next round asks the replica for every read of every run so far, in
//! one call, and runs again. A run without a miss read only answers of that one call, which the
//! replica made over its state at one moment: the result is the one the function would have
//! given on that replica. Most reads finish in two rounds; chains of dependent reads take one
//! more per link, up to [`READ_ROUNDS_MAX`].
//!
//! ```text
//!   run f over {} ──misses A,B──▶ replica answers A,B ──run f──misses C──▶ answers A,B,C ──run f──▶ result
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use courier_proto::ShardId;

use crate::cf::{Cf, Projection};
use crate::error::Result;
use crate::kv::{Pair, ReadKv};
use crate::projection::View;
use crate::reader::Reader;

/// Calls to the replica one remote read may make: one per step of a chain of dependent reads.
pub const READ_ROUNDS_MAX: usize = 8;
/// Key-value reads one remote read may ask for in its last round.
pub const READ_OPS_MAX: usize = 1024;

/// One key-value read a read function made.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReadOp {
    /// [`ReadKv::get`].
    Get {
        /// The family.
        cf: Cf,
        /// The key.
        key: Vec<u8>,
    },
    /// [`ReadKv::scan`].
    Scan {
        /// The family.
        cf: Cf,
        /// The first key (included).
        from: Vec<u8>,
        /// The end (excluded).
        to: Vec<u8>,
        /// At most this many pairs.
        limit: usize,
    },
}

impl ReadOp {
    /// Whether this read stays inside `shard`'s key range (a replica answers only those).
    pub fn within(&self, shard: ShardId) -> bool {
        let (start, end) = crate::keys::shard_range(shard);
        match self {
            ReadOp::Get { key, .. } => key >= &start && key < &end,
            ReadOp::Scan { from, to, .. } => from >= &start && to <= &end && from <= to,
        }
    }
}

/// A replica's answer to one [`ReadOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The value of a get (`None`: absent).
    Value(Option<Vec<u8>>),
    /// The pairs of a scan.
    Pairs(Vec<Pair>),
}

impl ReadAnswer {
    /// Key and value bytes this answer carries.
    pub fn bytes(&self) -> usize {
        match self {
            ReadAnswer::Value(value) => value.as_ref().map_or(0, Vec::len),
            ReadAnswer::Pairs(pairs) => pairs
                .iter()
                .map(|(key, value)| key.len().saturating_add(value.len()))
                .fold(0, usize::saturating_add),
        }
    }
}

/// Answers `ops` from `base`, in order: what a replica does for a remote read.
///
/// # Errors
/// A storage fault.
pub fn answer(base: &dyn ReadKv, ops: &[ReadOp]) -> Result<Vec<ReadAnswer>> {
    ops.iter()
        .map(|op| match op {
            ReadOp::Get { cf, key } => base.get(*cf, key).map(ReadAnswer::Value),
            ReadOp::Scan {
                cf,
                from,
                to,
                limit,
            } => base.scan(*cf, from, to, *limit).map(ReadAnswer::Pairs),
        })
        .collect()
}

/// Why a remote read stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteReadError {
    /// The read function kept finding new reads after [`READ_ROUNDS_MAX`] rounds, or asked for
    /// more than [`READ_OPS_MAX`].
    #[error("a remote read needed more than {READ_ROUNDS_MAX} rounds or {READ_OPS_MAX} reads")]
    TooDeep,
    /// The replica answered a different number of reads than were asked.
    #[error("the replica answered {got} reads, {asked} were asked")]
    Mismatch {
        /// Reads asked.
        asked: usize,
        /// Answers received.
        got: usize,
    },
}

/// One read function run remotely, round by round (see the module docs).
#[derive(Debug, Default)]
pub struct RemoteRead {
    ops: Vec<ReadOp>,
    rounds: usize,
}

impl RemoteRead {
    /// A read with no round yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The reads the next call to the replica must answer, in this order.
    pub fn ops(&self) -> &[ReadOp] {
        &self.ops
    }

    /// Runs `f` over a view of `shard` whose reads are `answers` (the replica's answers to
    /// [`RemoteRead::ops`], empty before the first call). `Some` is `f`'s result, final; `None`
    /// means `f` read something not answered yet: call the replica with the new `ops` and run
    /// again.
    ///
    /// # Errors
    /// [`RemoteReadError`] when the read goes too deep or the answers do not match the reads.
    pub fn attempt<R>(
        &mut self,
        shard: ShardId,
        answers: Vec<ReadAnswer>,
        f: &impl Fn(&View<'_, '_>) -> Result<R>,
    ) -> std::result::Result<Option<Result<R>>, RemoteReadError> {
        if answers.len() != self.ops.len() {
            return Err(RemoteReadError::Mismatch {
                asked: self.ops.len(),
                got: answers.len(),
            });
        }
        let answered = Answered {
            answers: self.ops.iter().cloned().zip(answers).collect(),
            misses: RefCell::new(Vec::new()),
        };
        let result = f(&Reader::new(&answered, shard).view(Projection::Inbox));
        let misses = answered.misses.into_inner();
        if misses.is_empty() {
            return Ok(Some(result));
        }
        self.rounds = self.rounds.saturating_add(1);
        for op in misses {
            if !self.ops.contains(&op) {
                self.ops.push(op);
            }
        }
        if self.rounds > READ_ROUNDS_MAX || self.ops.len() > READ_OPS_MAX {
            return Err(RemoteReadError::TooDeep);
        }
        Ok(None)
    }
}

/// A replica's answers, seen as a store: reads without an answer are noted and read as absent.
struct Answered {
    answers: HashMap<ReadOp, ReadAnswer>,
    misses: RefCell<Vec<ReadOp>>,
}

impl Answered {
    fn answer(&self, op: ReadOp) -> Option<&ReadAnswer> {
        let found = self.answers.get(&op);
        if found.is_none() {
            self.misses.borrow_mut().push(op);
        }
        found
    }
}

impl ReadKv for Answered {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let op = ReadOp::Get {
            cf,
            key: key.to_vec(),
        };
        Ok(match self.answer(op) {
            Some(ReadAnswer::Value(value)) => value.clone(),
            _ => None,
        })
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let op = ReadOp::Scan {
            cf,
            from: from.to_vec(),
            to: to.to_vec(),
            limit,
        };
        Ok(match self.answer(op) {
            Some(ReadAnswer::Pairs(pairs)) => pairs.clone(),
            _ => Vec::new(),
        })
    }
}

// Tests: `projection/remote_test.rs` (they build shards with the projection tests' helpers).
