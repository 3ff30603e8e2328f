//! How registration codes reach phones: the [`SmsSender`] the node was configured with.
//!
//! - [`NoSms`]: nothing configured; every code request fails.
//! - [`DevFileSms`] (`sms.dev-outbox`): development only, numbers and codes in a plain file.
//!
//! Phone numbers and codes never reach logs or errors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::convert::registration::PhoneNumber;
use tracing::{info, warn};

use crate::config::Config;

/// Deadline of one `[sms.http]` attempt unless configured (`sms.http.timeout-ms`), in ms.
pub const TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// The shortest attempt deadline `sms.http.timeout-ms` accepts.
pub const TIMEOUT_MS_MIN: u64 = 100;
/// The longest attempt deadline `sms.http.timeout-ms` accepts.
pub const TIMEOUT_MS_MAX: u64 = 60_000;
/// Retries after a retryable failure unless configured (`sms.http.retries`).
pub const RETRIES_DEFAULT: u32 = 2;
/// The most retries `sms.http.retries` accepts.
pub const RETRIES_MAX: u32 = 5;
/// First delay before a retry; doubled per retry.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// Longest delay before a retry.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Delivers registration codes.
#[tonic::async_trait]
pub trait SmsSender: Send + Sync {
    /// Sends `code` to `phone`.
    ///
    /// # Errors
    /// When the code could not be handed over. The error's text reaches the client: it never
    /// holds the number or the code.
    async fn send(&self, phone: &PhoneNumber, code: &str) -> std::io::Result<()>;
}

/// No SMS sender configured: every code request fails (`UNAVAILABLE SmsFailed`) and leaves no
/// code behind.
#[derive(Debug)]
pub struct NoSms;

#[tonic::async_trait]
impl SmsSender for NoSms {
    async fn send(&self, _phone: &PhoneNumber, _code: &str) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "no SMS sender is configured on this node (sms.dev-outbox is for development)",
        ))
    }
}

/// Development only (`sms.dev-outbox`): appends `phone code` lines to a file, in plain text
/// (never to the logs).
#[derive(Debug)]
pub struct DevFileSms {
    path: PathBuf,
}

impl DevFileSms {
    /// Writes into `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

#[tonic::async_trait]
impl SmsSender for DevFileSms {
    async fn send(&self, phone: &PhoneNumber, code: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        let path = self.path.clone();
        // One write per line: concurrent requests append whole lines, never interleaved parts.
        let line = format!("{} {code}\n", phone.expose());
        tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(line.as_bytes())
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// The SMS sender of `config`: the development outbox file when `sms.dev-outbox` is set (with a
/// warning), otherwise none (every code request fails).
pub fn sender(config: &Config) -> Arc<dyn SmsSender> {
    match &config.sms_dev_outbox {
        Some(path) => {
            warn!(
                path = %path.display(),
                "sms.dev-outbox: registration codes and phone numbers are written to this file \
                 in plain text; development only"
            );
            Arc::new(DevFileSms::new(path.clone()))
        }
        None => {
            info!("no SMS sender configured: RequestCode answers UNAVAILABLE");
            Arc::new(NoSms)
        }
    }
}
