//! The history of one Jepsen run: what the clients asked, what the cluster answered, what every
//! device stream showed, and the replica status collected after the final heal.
//!
//! A history is stored as JSON lines, one [`Record`] per line, tagged by `"type"`:
//!
//! ```text
//! {"type":"invoke","process":3,"op_id":17,"time_ms":1200,"op":{"from_user":1,"to_user":2,"client_id":"3-17"}}
//! {"type":"complete","process":3,"op_id":17,"time_ms":1213,"outcome":{"status":"ok","message_id":"0a1b"}}
//! ```
//!
//! The harness appends records while the run is in progress ([`HistoryWriter`]) and the checker
//! reads them back afterwards ([`read_jsonl`]). Records are plain data: every field is public, so
//! tests build histories by hand.
//!
//! Invariants the harness keeps (the checker reports a `malformed` history otherwise):
//! - `op_id` is unique per invoke, and each op completes at most once, after its invoke.
//! - `session` is unique per [`SessionStart`], written before that session's [`Delivered`]
//!   records; deliveries of one session are written in the order the stream produced them.
//! - Retries of a send reuse its `client_id` and keep its `from_user` and `to_user`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// A client process starts a send.
    Invoke(Invoke),
    /// The send started by the invoke with the same `op_id` has an outcome.
    Complete(Complete),
    /// A device opens a stream on one node.
    SessionStart(SessionStart),
    /// A stream session received one message of its user's inbox.
    Delivered(Delivered),
    /// A sender observed a receipt for one of its messages.
    Receipt(Receipt),
    /// After the heal: one node's status for one shard replica.
    Replica(Replica),
    /// After the heal: one node's "projection == rebuild from log" verification of one shard.
    Verify(Verify),
    /// The nemesis did something (started or healed a fault).
    Fault(Fault),
    /// A stream session handed an `Ack` to the server.
    Acked(Acked),
    /// What the nodes of the run keep (written once, before the workload).
    Retention(Retention),
}

/// The send a client asked for. `client_id` is unique per logical send and is carried in the
/// message body, so a received message can be matched to its send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOp {
    /// The sending user.
    pub from_user: u64,
    /// The receiving user.
    pub to_user: u64,
    /// `"{process}-{counter}"`; retries of the same send reuse it.
    pub client_id: String,
}

/// A client process starts one attempt of a send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoke {
    /// The client worker (Jepsen "process") that runs the attempt.
    pub process: u32,
    /// Pairs this invoke with its [`Complete`]; unique per attempt.
    pub op_id: u64,
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
    /// What is sent.
    pub op: SendOp,
}

/// The outcome of one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// The client worker that ran the attempt.
    pub process: u32,
    /// The `op_id` of the matching [`Invoke`].
    pub op_id: u64,
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
    /// What the cluster answered.
    pub outcome: Outcome,
}

/// Jepsen's three outcomes of an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged: the server promises the message is durable.
    Ok {
        /// The server's message id, hex encoded.
        message_id: String,
    },
    /// Definitely not applied.
    Fail {
        /// Why, as the client saw it.
        error: String,
    },
    /// Unknown (timeout, connection lost): the message may appear once, or never.
    Info {
        /// Why the outcome is unknown.
        error: String,
    },
}

/// A device opens a stream of its user's inbox on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    /// Unique per stream session; [`Delivered`] records refer to it.
    pub session: u64,
    /// Whose inbox is streamed.
    pub user: u64,
    /// The device of `user` that holds the stream.
    pub device: u32,
    /// The node the stream is connected to.
    pub node: u32,
    /// The stream starts after this seq: the first message it delivers has seq
    /// `resume_after_seq + 1`.
    pub resume_after_seq: u64,
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
    /// True for the final drain after the heal (one per device and node, from seq 0).
    pub drain: bool,
}

/// One message received by a stream session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// The [`SessionStart::session`] that received it.
    pub session: u64,
    /// Position in the session user's inbox (dense, from 1).
    pub seq: u64,
    /// The server's message id, hex encoded.
    pub message_id: String,
    /// The sender, as the server reports it.
    pub from_user: u64,
    /// The client id read back from the message body.
    pub client_id: String,
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
}

/// The state of one message at one recipient, as its sender sees it. Ordered: states only move
/// forward (`Sent < Delivered < Read`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptState {
    /// Accepted by the sender's shard.
    Sent,
    /// Written into the recipient's inbox.
    Delivered,
    /// The recipient marked it read.
    Read,
}

/// A sender observed the receipt state of one of its messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The user whose client observed the receipt (the message's sender).
    pub observer_user: u64,
    /// The message, hex encoded.
    pub message_id: String,
    /// The recipient the state is about.
    pub recipient_user: u64,
    /// The observed state.
    pub state: ReceiptState,
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
}

/// One node's status of one shard replica, collected after the final heal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The reporting node.
    pub node: u32,
    /// The shard.
    pub shard: u32,
    /// The last raft log index applied to the state machine.
    pub applied_index: u64,
    /// Projection name → digest of its contents.
    pub digests: BTreeMap<String, String>,
}

/// The result of one node's "projection == rebuild from log" verification of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verify {
    /// The verifying node.
    pub node: u32,
    /// The shard.
    pub shard: u32,
    /// True if every live projection matched its rebuild.
    pub ok: bool,
    /// What differed, or a short summary when `ok`.
    pub detail: String,
}

/// A device acked its inbox up to a seq: the `Ack` frame left the client on that session (the
/// server may not have taken it: acks are cumulative, a later one covers it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    /// The stream session.
    pub session: u64,
    /// The user.
    pub user: u64,
    /// The device.
    pub device: u32,
    /// Every seq up to this one.
    pub up_to_seq: u64,
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
}

/// What the run's nodes keep of delivered messages (`retention.keep-delivered`). A history
/// without this record is checked as if bodies were kept: every drain must return every message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// False: a message leaves the inbox once every device of its recipient acked it, so a drain
    /// does not return it (API.md, "Resuming a stream").
    pub keep_delivered: bool,
    /// Every user of the run has a second active device, so the nodes store each send for its
    /// sender too (multi-device history, API.md "Your own messages on every device"): the checker
    /// expects every acked send in its sender's inbox as well as its recipient's. Absent in older
    /// histories: no own copies expected.
    #[serde(default)]
    pub own_copies: bool,
}

/// A nemesis event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Harness clock, milliseconds since the run started.
    pub time_ms: u64,
    /// What was done, e.g. "partition isolate node 2" or "heal".
    pub description: String,
}

/// A whole history, in the order the records were written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The records, in file order.
    pub records: Vec<Record>,
}

impl History {
    /// Appends one record.
    pub fn push(&mut self, record: Record) {
        self.records.push(record);
    }
}

impl From<Vec<Record>> for History {
    fn from(records: Vec<Record>) -> Self {
        Self { records }
    }
}

impl FromIterator<Record> for History {
    fn from_iter<I: IntoIterator<Item = Record>>(iter: I) -> Self {
        Self {
            records: iter.into_iter().collect(),
        }
    }
}

/// Why a history could not be read.
#[derive(Debug)]
pub enum HistoryError {
    /// The file could not be opened.
    Open {
        /// The path given to [`read_jsonl`].
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// Reading failed at a line (1-based).
    Read {
        /// The line being read.
        line: usize,
        /// The cause.
        source: io::Error,
    },
    /// A line (1-based) is not a valid [`Record`]; a truncated last line (the harness died
    /// mid-write) shows up here too.
    Parse {
        /// The offending line.
        line: usize,
        /// The cause.
        source: serde_json::Error,
    },
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, source } => write!(f, "cannot open history {path}: {source}"),
            Self::Read { line, source } => write!(f, "cannot read history line {line}: {source}"),
            Self::Parse { line, source } => {
                write!(f, "bad history record on line {line}: {source}")
            }
        }
    }
}

impl std::error::Error for HistoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Open { source, .. } | Self::Read { source, .. } => Some(source),
            Self::Parse { source, .. } => Some(source),
        }
    }
}

/// Reads a JSON-lines history file.
///
/// # Errors
///
/// [`HistoryError::Open`] if the file cannot be opened, otherwise as [`parse_jsonl`].
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<History, HistoryError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| HistoryError::Open {
        path: path.display().to_string(),
        source,
    })?;
    parse_jsonl(BufReader::new(file))
}

/// Parses JSON lines, one [`Record`] per line. Blank lines are skipped; anything else that is
/// not a record is an error rather than skipped, because a checker that silently drops records
/// could pass a broken run.
///
/// # Errors
///
/// [`HistoryError::Read`] on an I/O error, [`HistoryError::Parse`] on a line that is not a
/// record; both carry the 1-based line number.
pub fn parse_jsonl(reader: impl BufRead) -> Result<History, HistoryError> {
    let mut history = History::default();
    for (index, line) in reader.lines().enumerate() {
        let line_no = index.saturating_add(1);
        let line = line.map_err(|source| HistoryError::Read {
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
            line: line_no,
            source,
        })?;
        history.push(record);
    }
    Ok(history)
}

/// Appends records to a JSON-lines history, one line per record.
///
/// Each record is written with one `write_all` and then flushed, so a harness that dies leaves
/// at most a truncated last line, and everything before it is already with the OS.
#[derive(Debug)]
pub struct HistoryWriter<W: Write> {
    out: W,
}

impl HistoryWriter<File> {
    /// Creates (or truncates) a history file.
    ///
    /// # Errors
    ///
    /// The error of [`File::create`].
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        File::create(path).map(Self::new)
    }
}

impl<W: Write> HistoryWriter<W> {
    /// Wraps a writer.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Writes one record as one line and flushes.
    ///
    /// # Errors
    ///
    /// Serialisation errors (not expected for these types) and the writer's I/O errors.
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.out.flush()
    }

    /// Returns the wrapped writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::{HistoryError, HistoryWriter, parse_jsonl, read_jsonl};
    use crate::checker::fixture::clean;

    /// Goal: every record type survives a JSON-lines round trip, in the documented shape.
    #[test]
    fn history_round_trips_through_json_lines() {
        let history = clean().history();
        let mut writer = HistoryWriter::new(Vec::new());
        for record in &history.records {
            writer.append(record).unwrap();
        }
        let bytes = writer.into_inner();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text.lines().count(),
            history.records.len(),
            "one line per record"
        );
        assert!(text.contains(r#""type":"invoke""#), "{text}");
        assert!(
            text.contains(r#""outcome":{"status":"ok","message_id":"m01"}"#),
            "{text}"
        );
        assert!(text.contains(r#""state":"read""#), "{text}");
        assert_eq!(parse_jsonl(bytes.as_slice()).unwrap(), history);

        let path =
            std::env::temp_dir().join(format!("courier-history-{}.jsonl", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let read = read_jsonl(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read.unwrap(), history);
    }

    /// Goal: a bad line is an error naming the line, not a silently shorter history.
    #[test]
    fn bad_line_is_a_parse_error_with_its_number() {
        let text = "{\"type\":\"fault\",\"time_ms\":1,\"description\":\"heal\"}\n\n{\"type\":\"inv";
        let error = parse_jsonl(text.as_bytes()).unwrap_err();
        assert!(
            matches!(error, HistoryError::Parse { line: 3, .. }),
            "{error}"
        );
    }
}
