//! `courier-bench nats`: the courier workload's counterpart on NATS JetStream: C closed-loop
//! workers, each with its own connection to one server (spread round-robin), each publishing the
//! message bytes to a file-backed stream with 3 replicas and awaiting its `PubAck`.
//!
//! The client is a minimal wire client for the NATS text protocol over tokio TCP, enough for
//! request/reply (no async-nats crate):
//!
//! ```text
//!  server: INFO {..}                     client: CONNECT {..}  PING
//!  server: PONG                          client: SUB _INBOX.<id>.* 1
//!  client: PUB bench.7 _INBOX.<id>.42 256\r\n<payload>\r\n
//!  server: MSG _INBOX.<id>.42 1 <n>\r\n{"stream":"BENCH","seq":1234}\r\n     (the PubAck)
//!      or: MSG ... {"error":{"code":..,"description":..}}                  (a failure)
//!      or: HMSG ... NATS/1.0 503                                          (no responders)
//! ```
//!
//! It answers `PING` with `PONG`, skips `INFO`, `+OK` and replies to earlier (timed out)
//! requests, and fails on `-ERR`. The stream is created with `$JS.API.STREAM.CREATE.<name>`
//! (file storage, replicas 3). Whether a `PubAck` means fsynced depends on the server's
//! `jetstream { sync_interval }`, which the caller states with `--label`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinSet;

use crate::LoadArgs;
use crate::stats::{self, Latency, RunResult, Tally, Window};

/// Deadline of one publish (and of one API request).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stream creation is retried while the JetStream cluster elects its meta leader.
const CREATE_WAIT: Duration = Duration::from_secs(60);
/// Pause after a failed publish.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);
/// Longest protocol line accepted from the server, bytes.
const LINE_BYTES_MAX: usize = 64 * 1024;
/// Largest message accepted from the server, bytes.
const PAYLOAD_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Options of `courier-bench nats`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Client `host:port` of the servers (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// The servers' `jetstream.sync_interval`: `sync` (always: fsync before the ack) or
    /// `default` (NATS's default: flushed to disk periodically, acked before fsync). Only a
    /// label: the servers' config decides.
    #[arg(long, value_parser = ["sync", "default"])]
    label: String,
    /// The JetStream stream to (re)create.
    #[arg(long, default_value = "BENCH")]
    stream: String,
    #[command(flatten)]
    load: LoadArgs,
}

/// A message from the server.
#[derive(Debug)]
enum Incoming {
    /// `MSG` or `HMSG`.
    Msg {
        subject: String,
        headers: Option<Vec<u8>>,
        payload: Vec<u8>,
    },
    /// `PING`.
    Ping,
    /// `-ERR`.
    Err(String),
    /// `INFO`, `PONG`, `+OK`.
    Other,
}

/// One NATS connection doing request/reply, one request at a time.
pub(crate) struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    inbox: String,
    next: u64,
    line: Vec<u8>,
}

impl Conn {
    /// Connects, sends `CONNECT`, waits for the `PONG` that confirms it, and subscribes to this
    /// connection's reply inbox.
    ///
    /// # Errors
    /// Connection or protocol failures.
    pub(crate) async fn connect(addr: &str, id: usize) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to NATS at {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut conn = Self {
            reader: BufReader::new(read),
            writer,
            inbox: format!("_INBOX.bench{}x{nonce}x{id}", std::process::id()),
            next: 0,
            line: Vec::new(),
        };
        let connect = json!({
            "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
            "echo": false, "lang": "rust", "version": "courier-bench", "protocol": 1,
        });
        conn.writer
            .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await?;
        loop {
            let line = conn.read_line().await?;
            if line.starts_with("PONG") {
                break;
            }
            if let Some(error) = line.strip_prefix("-ERR") {
                bail!("NATS refused CONNECT: {}", error.trim());
            }
        }
        let subscribe = format!("SUB {}.* 1\r\n", conn.inbox);
        conn.writer.write_all(subscribe.as_bytes()).await?;
        Ok(conn)
    }

    async fn read_line(&mut self) -> anyhow::Result<String> {
        self.line.clear();
        let read = (&mut self.reader)
            .take(u64::try_from(LINE_BYTES_MAX).unwrap_or(u64::MAX))
            .read_until(b'\n', &mut self.line)
            .await?;
        if read == 0 {
            bail!("NATS closed the connection");
        }
        if !self.line.ends_with(b"\n") {
            bail!("NATS protocol line longer than {LINE_BYTES_MAX} bytes");
        }
        Ok(String::from_utf8_lossy(&self.line).trim_end().to_owned())
    }

    async fn read_body(&mut self, len: usize) -> anyhow::Result<Vec<u8>> {
        if len > PAYLOAD_BYTES_MAX {
            bail!("NATS message of {len} bytes");
        }
        let mut body = vec![0; len + 2];
        self.reader.read_exact(&mut body).await?;
        body.truncate(len);
        Ok(body)
    }

    async fn read(&mut self) -> anyhow::Result<Incoming> {
        let line = self.read_line().await?;
        let mut parts = line.split_ascii_whitespace();
        let op = parts.next().unwrap_or_default().to_ascii_uppercase();
        let args: Vec<&str> = parts.collect();
        let number = |s: Option<&&str>| -> anyhow::Result<usize> {
            s.and_then(|s| s.parse().ok())
                .with_context(|| format!("bad NATS line {line:?}"))
        };
        match op.as_str() {
            // MSG <subject> <sid> [reply-to] <#bytes>
            "MSG" => {
                let subject = args.first().copied().unwrap_or_default().to_owned();
                let len = number(args.last())?;
                let payload = self.read_body(len).await?;
                Ok(Incoming::Msg {
                    subject,
                    headers: None,
                    payload,
                })
            }
            // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
            "HMSG" => {
                let subject = args.first().copied().unwrap_or_default().to_owned();
                let total = number(args.last())?;
                let header_len = number(args.get(args.len().saturating_sub(2)))?;
                let mut payload = self.read_body(total).await?;
                let headers = payload.drain(..header_len.min(total)).collect();
                Ok(Incoming::Msg {
                    subject,
                    headers: Some(headers),
                    payload,
                })
            }
            "PING" => Ok(Incoming::Ping),
            "-ERR" => Ok(Incoming::Err(args.join(" "))),
            _ => Ok(Incoming::Other),
        }
    }

    /// Publishes `payload` to `subject` with a fresh reply subject and returns the reply's
    /// payload.
    ///
    /// # Errors
    /// A timeout, `-ERR`, a "no responders" (503) status, or a closed connection.
    pub(crate) async fn request(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<Value> {
        self.next += 1;
        let reply = format!("{}.{}", self.inbox, self.next);
        let mut frame = format!("PUB {subject} {reply} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.writer.write_all(&frame).await?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            loop {
                match self.read().await? {
                    Incoming::Msg {
                        subject,
                        headers,
                        payload,
                    } if subject == reply => break anyhow::Ok((headers, payload)),
                    // A reply to an earlier request that timed out.
                    Incoming::Msg { .. } | Incoming::Other => {}
                    Incoming::Ping => self.writer.write_all(b"PONG\r\n").await?,
                    Incoming::Err(error) => bail!("NATS -ERR {error}"),
                }
            }
        })
        .await
        .with_context(|| format!("no reply on {subject} within {REQUEST_TIMEOUT:?}"))??;
        let (headers, payload) = answer;
        if let Some(headers) = headers {
            let status = String::from_utf8_lossy(&headers);
            let first = status.lines().next().unwrap_or_default();
            if first.split_ascii_whitespace().nth(1).is_some() {
                bail!("NATS status {first:?} on {subject}");
            }
        }
        serde_json::from_slice(&payload).with_context(|| format!("a non-JSON reply on {subject}"))
    }
}

/// A JetStream API or publish reply's error, if it carries one.
fn js_error(reply: &Value) -> Option<String> {
    reply.get("error").map(|e| {
        format!(
            "JetStream error {}: {}",
            e.get("code").unwrap_or(&Value::Null),
            e.get("description").and_then(Value::as_str).unwrap_or("?")
        )
    })
}

/// Deletes (if present) and creates the stream: file storage, 3 replicas, subjects `bench.>`.
async fn create_stream(conn: &mut Conn, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + CREATE_WAIT;
    let config = json!({
        "name": name, "subjects": ["bench.>"], "retention": "limits", "storage": "file",
        "num_replicas": 3, "discard": "old",
    });
    let mut last_error = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            // A stream from an earlier run would keep its messages: start empty.
            let deleted = conn
                .request(&format!("$JS.API.STREAM.DELETE.{name}"), b"")
                .await?;
            if let Some(error) = js_error(&deleted)
                && !error.contains("not found")
            {
                bail!("{error}");
            }
            let created = conn
                .request(
                    &format!("$JS.API.STREAM.CREATE.{name}"),
                    config.to_string().as_bytes(),
                )
                .await?;
            match js_error(&created) {
                Some(error) => bail!("{error}"),
                None => anyhow::Ok(()),
            }
        }
        .await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(error) => last_error = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("could not create JetStream stream {name} in {CREATE_WAIT:?}: {last_error}")
}

/// Runs the workload and writes its result.
///
/// # Errors
/// Connection or stream creation failures; the run's own failure (too many errors).
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let base = Instant::now();
    {
        let mut admin = Conn::connect(&args.servers[0], usize::MAX).await?;
        create_stream(&mut admin, &args.stream).await?;
    }
    let mut conns = Vec::with_capacity(args.load.workers());
    for index in 0..args.load.workers() {
        conns.push(Conn::connect(&args.servers[index % args.servers.len()], index).await?);
    }
    let window = Window::start(base, args.load.warmup(), args.load.seconds());
    let size = args.load.size_bytes();
    let mut workers = JoinSet::new();
    for (index, mut conn) in conns.into_iter().enumerate() {
        workers.spawn(async move {
            let mut tally = Tally::new();
            let payload = vec![b'x'; size];
            let subject = format!("bench.{index}");
            while window.running() {
                let started = Instant::now();
                let outcome = match conn.request(&subject, &payload).await {
                    Ok(ack) => match js_error(&ack) {
                        Some(error) => Err(error),
                        None if ack.get("seq").is_some() => Ok(()),
                        None => Err(format!("not a PubAck: {ack}")),
                    },
                    Err(error) => Err(format!("{error:#}")),
                };
                let failed = outcome.is_err();
                tally.finish(&window, started, outcome);
                if failed {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
            tally
        });
    }
    let (tally, (processes, machine)) =
        stats::measure_workers(&window, &args.load.pids, workers, "a NATS worker").await?;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let throughput = tally.ok as f64 / window.measured().as_secs_f64();
    let result = RunResult {
        kind: "throughput".to_owned(),
        system: format!("nats-{}", args.label),
        concurrency: args.load.concurrency,
        size_bytes: args.load.size,
        warmup_s: args.load.warmup,
        seconds: window.measured().as_secs_f64(),
        acked: tally.ok,
        errors: tally.errors,
        first_error: tally.first_error.clone(),
        throughput,
        ack: Latency::of(&tally.latency),
        processes,
        machine,
        command: stats::command_line(),
        ..RunResult::default()
    };
    crate::finish_run(&args.load, &result)
}
