//! The push hook: when a message lands in the inbox of a user with no live device stream, the
//! user's shard leader asks a push sender to wake a device. The default sender POSTs
//! `{"user":U,"message_id":"hex"}` (ids only: never a body, phone number or token) to
//! `push.url` over plain HTTP/1.1; with no URL, push is off.
//!
//! Never in the delivery path: jobs go into a bounded queue (`push.queue-max`; full means the
//! push is dropped and counted), one task sends them with retries and exponential backoff
//! (`push.attempts-max`, each bounded by `push.timeout`), and every outcome is counted for
//! `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// First retry delay; doubled per attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes of the response read (the status line is all we need).
const RESPONSE_BYTES_MAX: usize = 1024;

/// One wake-up to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushJob {
    /// The recipient.
    pub user: u64,
    /// The message that landed (16 bytes).
    pub message_id: Vec<u8>,
}

/// Push outcomes since start.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Accepted by the push endpoint (2xx).
    pub sent: AtomicU64,
    /// Given up after every attempt failed.
    pub failed: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Attempts that failed (and were retried or given up).
    pub attempt_failures: AtomicU64,
}

/// Where pushes go.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// `http://host:port/path`.
    pub url: String,
    /// Queue length.
    pub queue_max: usize,
    /// Attempts per push.
    pub attempts_max: u32,
    /// Deadline of one attempt.
    pub timeout: Duration,
}

/// The front of the push hook: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Pusher {
    queue: Option<mpsc::Sender<PushJob>>,
    /// Outcomes, for metrics.
    pub stats: Arc<PushStats>,
}

impl Pusher {
    /// Push switched off.
    pub fn disabled() -> Self {
        Self {
            queue: None,
            stats: Arc::default(),
        }
    }

    /// A pusher for `config` and the sender task to spawn (it runs until `shutdown`).
    pub fn new(config: PushConfig) -> (Self, PushTask) {
        let (tx, rx) = mpsc::channel(config.queue_max);
        let stats = Arc::new(PushStats::default());
        (
            Self {
                queue: Some(tx),
                stats: stats.clone(),
            },
            PushTask { config, rx, stats },
        )
    }

    /// Queues a push; drops (and counts) it when the queue is full.
    pub fn push(&self, job: PushJob) {
        let Some(queue) = &self.queue else {
            return;
        };
        if queue.try_send(job).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The sender task of a [`Pusher`].
#[derive(Debug)]
pub struct PushTask {
    config: PushConfig,
    rx: mpsc::Receiver<PushJob>,
    stats: Arc<PushStats>,
}

impl PushTask {
    /// Sends queued pushes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        run(self.config, self.rx, self.stats, shutdown).await;
    }
}

async fn run(
    config: PushConfig,
    mut jobs: mpsc::Receiver<PushJob>,
    stats: Arc<PushStats>,
    shutdown: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            () = shutdown.cancelled() => return,
            job = jobs.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 1;
        loop {
            match tokio::time::timeout(config.timeout, post(&config.url, &job)).await {
                Ok(Ok(())) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    debug!(user = job.user, "push sent");
                    break;
                }
                Ok(Err(error)) => warn!(user = job.user, attempt, %error, "push attempt failed"),
                Err(_) => warn!(user = job.user, attempt, "push attempt timed out"),
            }
            stats.attempt_failures.fetch_add(1, Ordering::Relaxed);
            if attempt >= config.attempts_max {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            attempt += 1;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Splits `http://host:port/path` into the address and the path.
///
/// # Errors
/// Anything but a plain `http://` URL with a host.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// push URLs are supported"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    // A port is what follows the last colon, when that colon is not inside `[v6 address]`.
    let has_port = authority.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && (!host.starts_with('[') || host.ends_with(']'))
    });
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, format!("/{path}")))
}

/// One POST; succeeds on a 2xx status.
async fn post(url: &str, job: &PushJob) -> std::io::Result<()> {
    let (authority, path) = parse_url(url).map_err(std::io::Error::other)?;
    let body = serde_json::json!({
        "user": job.user,
        "message_id": courier_proto::hex(&job.message_id),
    })
    .to_string();
    // Without the port: `host:port`, or `[v6 address]:port`.
    let host = authority
        .rsplit_once(':')
        .map_or(authority.as_str(), |(host, _)| host);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(&authority).await?;
    stream.write_all(request.as_bytes()).await?;
    let head = status_line(&mut stream).await?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "push endpoint answered {status:?}"
        )))
    }
}

/// Reads the response's status line: up to its line end, the end of the stream or
/// [`RESPONSE_BYTES_MAX`] bytes, however many reads the peer's segments take.
async fn status_line(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<String> {
    let mut response = vec![0_u8; RESPONSE_BYTES_MAX];
    let mut read = 0;
    while read < response.len() && !response[..read].windows(2).any(|w| w == b"\r\n") {
        let more = stream.read(&mut response[read..]).await?;
        if more == 0 {
            break;
        }
        read += more;
    }
    let head = String::from_utf8_lossy(&response[..read]);
    Ok(head.lines().next().unwrap_or("").to_owned())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::{parse_url, status_line};

    /// A status line that arrives in pieces is read whole.
    #[tokio::test]
    async fn a_status_line_in_pieces_is_read_whole() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in [
                &b"HTTP/1.1 2"[..],
                b"04 No Content\r",
                b"\nServer: x\r\n\r\n",
            ] {
                server.write_all(piece).await.expect("write");
                server.flush().await.expect("flush");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let line = status_line(&mut client).await.expect("read");
        assert_eq!(line, "HTTP/1.1 204 No Content");
        writer.await.expect("writer");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/push"),
            Ok(("127.0.0.1:9000".to_owned(), "/push".to_owned()))
        );
        assert_eq!(
            parse_url("http://push.example"),
            Ok(("push.example:80".to_owned(), "/".to_owned()))
        );
        assert_eq!(
            parse_url("http://[::1]/push"),
            Ok(("[::1]:80".to_owned(), "/push".to_owned()))
        );
        assert_eq!(
            parse_url("http://[::1]:9000/"),
            Ok(("[::1]:9000".to_owned(), "/".to_owned()))
        );
        assert!(parse_url("https://push.example/x").is_err());
        assert!(parse_url("http:///x").is_err());
    }
}
