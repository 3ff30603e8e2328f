//! How registration codes reach phones: the [`SmsSender`] the node was configured with.
//!
//! - [`NoSms`]: nothing configured; every code request fails.
//! - [`DevFileSms`] (`sms.dev-outbox`): development only, numbers and codes in a plain file.
//! - [`HttpSms`] (`[sms.http]`): a provider's HTTP API, one request per code, its body a template
//!   filled with the number and the code; retried on connection errors, timeouts, 5xx and 429.
//!
//! Phone numbers, codes, request bodies and the provider's credential never reach logs or errors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::convert::registration::PhoneNumber;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use tracing::{error, info, warn};

use crate::config::{Config, SmsHttpConfig};

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

    /// Whether codes can be sent at all (`false`: `RequestCode` is refused before any code is
    /// recorded).
    fn configured(&self) -> bool {
        true
    }
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
            NO_SMS_SENDER,
        ))
    }

    fn configured(&self) -> bool {
        false
    }
}

/// Why a node without an SMS sender refuses `RequestCode`.
pub const NO_SMS_SENDER: &str =
    "no SMS sender is configured on this node (see sms.http; sms.dev-outbox is for development)";

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
        // Written inline, not on a blocking thread: one short append in development, and the
        // deterministic simulation replays a run only if no real thread decides when it ends.
        // One write per line: concurrent requests append whole lines, never interleaved parts.
        let line = format!("{} {code}\n", phone.expose());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(line.as_bytes())
    }
}

/// The HTTP provider of `[sms.http]`.
pub struct HttpSms {
    client: reqwest::Client,
    url: reqwest::Url,
    method: reqwest::Method,
    auth: Option<(HeaderName, HeaderValue)>,
    content_type: HeaderValue,
    template: String,
    encoding: Encoding,
    timeout: Duration,
    retries: u32,
}

impl std::fmt::Debug for HttpSms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The host only: no path or query (a provider may take a key there), no credential.
        f.debug_struct("HttpSms")
            .field("host", &self.url.host_str())
            .field("method", &self.method)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl HttpSms {
    /// A sender for `config`: its own connection pool, rustls with the system's root
    /// certificates, each attempt bounded by `timeout-ms`, no redirects followed and no proxy.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (the system's root certificates are unusable).
    pub fn new(config: &SmsHttpConfig) -> std::io::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("courier-node/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            client,
            url: config.url.clone(),
            method: config.method.clone(),
            auth: config
                .auth_value
                .as_ref()
                .map(|secret| (config.auth_header.clone(), secret.header_value().clone())),
            content_type: config.content_type.clone(),
            template: config.body_template.clone(),
            encoding: Encoding::of(&config.content_type),
            timeout: config.timeout,
            retries: config.retries,
        })
    }

    /// One attempt: the provider's status, or why none came.
    async fn attempt(&self, body: &str) -> Result<StatusCode, Failure> {
        let mut request = self
            .client
            .request(self.method.clone(), self.url.clone())
            .header(CONTENT_TYPE, self.content_type.clone())
            .body(body.to_owned());
        if let Some((name, value)) = &self.auth {
            request = request.header(name.clone(), value.clone());
        }
        match request.send().await {
            // The body is not read: the status is the answer.
            Ok(response) => Ok(response.status()),
            Err(error) if error.is_timeout() => Err(Failure::Timeout),
            Err(error) => Err(Failure::Unreachable(error.without_url())),
        }
    }
}

#[tonic::async_trait]
impl SmsSender for HttpSms {
    async fn send(&self, phone: &PhoneNumber, code: &str) -> std::io::Result<()> {
        let body = render(&self.template, self.encoding, phone.expose(), code);
        let mut backoff = BACKOFF_FIRST;
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(&body).await {
                Ok(status) if status.is_success() => {
                    info!(
                        status = status.as_u16(),
                        attempt, "SMS handed to the provider"
                    );
                    return Ok(());
                }
                Ok(status) => Failure::Status(status),
                Err(failure) => failure,
            };
            let retry = failure.retryable() && attempt <= self.retries;
            failure.log(attempt, retry);
            if !retry {
                return Err(failure.into_error(attempt, self.timeout));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            attempt += 1;
        }
    }
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// The provider answered, with something other than 2xx.
    Status(StatusCode),
    /// No answer within `timeout-ms`.
    Timeout,
    /// No answer: the connection could not be made or broke (the error holds no URL).
    Unreachable(reqwest::Error),
}

impl Failure {
    /// Whether another attempt may succeed: connection errors, timeouts, 5xx and 429; never
    /// another 4xx (the request itself is refused) or a 3xx (no redirect is followed).
    fn retryable(&self) -> bool {
        match self {
            Failure::Status(status) => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Failure::Timeout => true,
            Failure::Unreachable(error) => !error.is_builder(),
        }
    }

    fn log(&self, attempt: u32, retry: bool) {
        match self {
            Failure::Status(status) => {
                warn!(
                    status = status.as_u16(),
                    attempt, retry, "the SMS provider refused a code"
                );
            }
            Failure::Timeout => warn!(attempt, retry, "the SMS provider did not answer in time"),
            Failure::Unreachable(error) => {
                warn!(error = %causes(error), attempt, retry, "the SMS provider is unreachable");
            }
        }
    }

    /// The error `RequestCode` answers with (its text reaches the client: no number, no code, no
    /// provider detail beyond the status).
    fn into_error(self, attempts: u32, timeout: Duration) -> std::io::Error {
        match self {
            Failure::Status(status) => std::io::Error::other(format!(
                "the SMS provider answered HTTP {status} (attempts: {attempts})"
            )),
            Failure::Timeout => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the SMS provider did not answer within {} ms (attempts: {attempts})",
                    timeout.as_millis()
                ),
            ),
            Failure::Unreachable(_) => std::io::Error::other(format!(
                "the SMS provider could not be reached (attempts: {attempts})"
            )),
        }
    }
}

/// An error and its sources, for the log (reqwest's own text is "error sending request").
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How a placeholder's value is written into the body, by its content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// `application/json` or `*/*+json`: the inside of a JSON string.
    Json,
    /// `application/x-www-form-urlencoded`: form-url-encoded (`+` is `%2B`).
    Form,
    /// Anything else: as is.
    Raw,
}

impl Encoding {
    fn of(content_type: &HeaderValue) -> Self {
        let essence = content_type
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json" || essence.ends_with("+json") {
            Encoding::Json
        } else if essence == "application/x-www-form-urlencoded" {
            Encoding::Form
        } else {
            Encoding::Raw
        }
    }

    fn escape(self, value: &str) -> String {
        match self {
            Encoding::Json => {
                let quoted = serde_json::Value::from(value).to_string();
                quoted
                    .strip_prefix('"')
                    .and_then(|inner| inner.strip_suffix('"'))
                    .unwrap_or(&quoted)
                    .to_owned()
            }
            Encoding::Form => form_urlencoded::byte_serialize(value.as_bytes()).collect(),
            Encoding::Raw => value.to_owned(),
        }
    }
}

/// `template` with every `{phone}` and `{code}` replaced by its escaped value, in one pass: an
/// inserted value is never searched for placeholders.
fn render(template: &str, encoding: Encoding, phone: &str, code: &str) -> String {
    let (phone, code) = (encoding.escape(phone), encoding.escape(code));
    template
        .split("{phone}")
        .map(|part| part.replace("{code}", &code))
        .collect::<Vec<_>>()
        .join(&phone)
}

/// The SMS sender of `config`: the development outbox file when `sms.dev-outbox` is set (with a
/// warning), the HTTP provider when `[sms.http]` is, otherwise none (every code request fails;
/// so too when the provider's HTTP client cannot be built, with an error logged).
pub fn sender(config: &Config) -> Arc<dyn SmsSender> {
    if let Some(path) = &config.sms_dev_outbox {
        warn!(
            path = %path.display(),
            "sms.dev-outbox: registration codes and phone numbers are written to this file \
             in plain text; development only"
        );
        return Arc::new(DevFileSms::new(path.clone()));
    }
    if let Some(http) = &config.sms_http {
        match HttpSms::new(http) {
            Ok(sms) => {
                info!(
                    host = http.url.host_str().unwrap_or_default(),
                    method = %http.method,
                    timeout_ms = http.timeout.as_millis(),
                    retries = http.retries,
                    "SMS provider over HTTP"
                );
                return Arc::new(sms);
            }
            Err(error) => error!(
                %error,
                "sms.http: the HTTP client cannot be built; RequestCode answers UNAVAILABLE"
            ),
        }
    } else {
        info!("no SMS sender configured: RequestCode answers UNAVAILABLE");
    }
    Arc::new(NoSms)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Instant;

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const PHONE: &str = "+15557654321";
    const CODE: &str = "987123";
    const TOKEN: &str = "Bearer t0ken-xyz";

    /// One request as the test provider read it.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// An HTTP/1.1 provider on 127.0.0.1:0 that answers every request with `status` (`None`:
    /// reads it and never answers), one connection at a time. Stops when dropped.
    struct Provider {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Provider {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Provider {
        async fn start(status: Option<u16>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let seen = Arc::default();
            let task = tokio::spawn(serve(listener, status, Arc::clone(&seen)));
            Self { addr, seen, task }
        }

        fn url(&self, target: &str) -> String {
            format!("http://{}{target}", self.addr)
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("seen").clone()
        }
    }

    async fn serve(listener: TcpListener, status: Option<u16>, seen: Arc<Mutex<Vec<Seen>>>) {
        // Unanswered connections stay open until the task is aborted.
        let mut silent = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            let mut stream = BufReader::new(stream);
            let Some(request) = read_request(&mut stream).await else {
                continue;
            };
            seen.lock().expect("seen").push(request);
            match status {
                Some(status) => {
                    let answer = format!(
                        "HTTP/1.1 {status} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.get_mut().write_all(answer.as_bytes()).await;
                }
                None => silent.push(stream),
            }
        }
    }

    async fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Seen> {
        let mut line = String::new();
        stream.read_line(&mut line).await.ok()?;
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
        let mut headers = Vec::new();
        loop {
            line.clear();
            stream.read_line(&mut line).await.ok()?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut seen = Seen {
            method,
            target,
            headers,
            body: String::new(),
        };
        let length: usize = seen.header("content-length").unwrap_or("0").parse().ok()?;
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.ok()?;
        seen.body = String::from_utf8(body).ok()?;
        Some(seen)
    }

    fn config(sms: &str) -> Config {
        Config::parse(&format!(
            "node-id = 1\ndata-dir = \"/tmp/courier-sms-test\"\n\
             [listen]\nclient = \"127.0.0.1:7001\"\npeer = \"127.0.0.1:7101\"\n\
             [tls]\ninsecure-plaintext = true\n{sms}"
        ))
        .expect("config")
    }

    /// `[sms.http]` at `url` (plain http allowed) with `keys`.
    fn http(url: &str, keys: &str) -> HttpSms {
        let config = config(&format!(
            "[sms.http]\nurl = \"{url}\"\nallow-http = true\n{keys}"
        ));
        HttpSms::new(config.sms_http.as_ref().expect("[sms.http]")).expect("client")
    }

    fn phone() -> PhoneNumber {
        PhoneNumber::try_from(PHONE.to_owned()).expect("phone")
    }

    /// The error a client would see names what happened and never the number or the code.
    fn assert_redacted(error: &std::io::Error) {
        let text = error.to_string();
        assert!(!text.contains(PHONE), "{text}");
        assert!(!text.contains(&PHONE[1..]), "{text}");
        assert!(!text.contains(CODE), "{text}");
    }

    /// The default POST carries the credential from its file, the JSON content type and the
    /// template with the number and the code inside JSON strings, to the configured path.
    #[tokio::test]
    async fn a_json_provider_gets_the_templated_request() {
        let provider = Provider::start(Some(200)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("sms-auth");
        std::fs::write(&secret, format!("{TOKEN}\n")).expect("credential");
        let sms = http(
            &provider.url("/v1/messages?account=a1"),
            &format!(
                "auth-value-file = \"{}\"\n\
                 body-template = '{{\"to\":\"{{phone}}\",\"text\":\"Your code: {{code}}\"}}'",
                secret.display()
            ),
        );
        assert!(!format!("{sms:?}").contains("t0ken"), "{sms:?}");

        sms.send(&phone(), CODE).await.expect("sent");

        let seen = provider.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let request = &seen[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.target, "/v1/messages?account=a1");
        assert_eq!(request.header("authorization"), Some(TOKEN));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(
            request.body,
            r#"{"to":"+15557654321","text":"Your code: 987123"}"#
        );
        let body: serde_json::Value = serde_json::from_str(&request.body).expect("JSON body");
        assert_eq!(body["to"], PHONE);
    }

    /// A Twilio-style form PUT under a custom header: the number's `+` is form-encoded.
    #[tokio::test]
    async fn a_form_provider_gets_form_encoded_values() {
        let provider = Provider::start(Some(201)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("sms-key");
        std::fs::write(&secret, "key-123").expect("credential");
        let sms = http(
            &provider.url("/send"),
            &format!(
                "method = \"PUT\"\nauth-header = \"X-Api-Key\"\nauth-value-file = \"{}\"\n\
                 content-type = \"application/x-www-form-urlencoded; charset=utf-8\"\n\
                 body-template = \"To={{phone}}&Body=Your+code+{{code}}\"",
                secret.display()
            ),
        );

        sms.send(&phone(), CODE).await.expect("sent");

        let seen = provider.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let request = &seen[0];
        assert_eq!(request.method, "PUT");
        assert_eq!(request.target, "/send");
        assert_eq!(request.header("x-api-key"), Some("key-123"));
        assert_eq!(request.header("authorization"), None);
        assert_eq!(
            request.header("content-type"),
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        assert_eq!(request.body, "To=%2B15557654321&Body=Your+code+987123");
    }

    /// Values are escaped for the content type, and inserted in one pass.
    #[test]
    fn values_are_escaped_for_the_content_type() {
        let json = Encoding::of(&HeaderValue::from_static("Application/JSON; charset=utf-8"));
        assert_eq!(json, Encoding::Json);
        assert_eq!(
            Encoding::of(&HeaderValue::from_static("application/vnd.api+json")),
            Encoding::Json
        );
        let form = Encoding::of(&HeaderValue::from_static(
            "application/x-www-form-urlencoded",
        ));
        assert_eq!(form, Encoding::Form);
        let raw = Encoding::of(&HeaderValue::from_static("text/plain"));
        assert_eq!(raw, Encoding::Raw);
        let value = "a\"b\\c\nd é&=+ ";
        assert_eq!(
            render("{\"v\":\"{phone}\"}", json, value, ""),
            "{\"v\":\"a\\\"b\\\\c\\nd é&=+ \"}"
        );
        assert_eq!(
            render("v={phone}", form, value, ""),
            "v=a%22b%5Cc%0Ad+%C3%A9%26%3D%2B+"
        );
        assert_eq!(render("v={phone}", raw, value, ""), format!("v={value}"));
        assert_eq!(
            render("{code}/{phone}/{code}", raw, "{code}", "1"),
            "1/{code}/1",
            "an inserted value is not searched for placeholders"
        );
    }

    /// A 500 or a 429 is retried `retries` times, then fails naming the status; the logs name the
    /// status and the attempt, never the number, the code, the body or the credential.
    #[tokio::test]
    async fn a_5xx_or_429_is_retried_then_fails() {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Captured(Arc::clone(&writer)))
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("sms-auth");
        std::fs::write(&secret, TOKEN).expect("credential");
        for (status, retries) in [(500, 2), (429, 1)] {
            let provider = Provider::start(Some(status)).await;
            let sms = http(
                &provider.url("/send"),
                &format!(
                    "retries = {retries}\nauth-value-file = \"{}\"\n\
                     body-template = '{{\"to\":\"{{phone}}\",\"code\":\"{{code}}\"}}'",
                    secret.display()
                ),
            );

            let error = sms.send(&phone(), CODE).await.expect_err("refused");

            assert_eq!(provider.seen().len(), retries + 1, "status {status}");
            let text = error.to_string();
            assert!(text.contains(&format!("HTTP {status} ")), "{text}");
            assert!(
                text.contains(&format!("(attempts: {})", retries + 1)),
                "{text}"
            );
            assert_redacted(&error);
        }
        let logs = String::from_utf8(logs.lock().expect("logs").clone()).expect("utf-8");
        assert!(logs.contains("status=500"), "{logs}");
        assert!(logs.contains("attempt=3"), "{logs}");
        for secret in [&PHONE[1..], CODE, "t0ken", "\"to\""] {
            assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
        }
    }

    /// Any other 4xx is the request refused: no retry.
    #[tokio::test]
    async fn a_4xx_is_not_retried() {
        let provider = Provider::start(Some(400)).await;
        let sms = http(
            &provider.url("/send"),
            "retries = 3\nbody-template = \"{phone} {code}\"\ncontent-type = \"text/plain\"",
        );

        let error = sms.send(&phone(), CODE).await.expect_err("refused");

        assert_eq!(provider.seen().len(), 1);
        assert_eq!(
            error.to_string(),
            "the SMS provider answered HTTP 400 Bad Request (attempts: 1)"
        );
        assert_eq!(provider.seen()[0].body, format!("{PHONE} {CODE}"));
    }

    /// A provider that never answers fails each attempt after `timeout-ms` (retried).
    #[tokio::test]
    async fn a_silent_provider_times_out() {
        let provider = Provider::start(None).await;
        let sms = http(
            &provider.url("/send"),
            "timeout-ms = 300\nretries = 1\nbody-template = '{\"to\":\"{phone}\",\"code\":\"{code}\"}'",
        );
        let started = Instant::now();

        let error = sms.send(&phone(), CODE).await.expect_err("timed out");

        let elapsed = started.elapsed();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert_eq!(
            error.to_string(),
            "the SMS provider did not answer within 300 ms (attempts: 2)"
        );
        assert!(
            elapsed >= 2 * Duration::from_millis(300) + BACKOFF_FIRST,
            "{elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        assert_eq!(provider.seen().len(), 2, "both attempts reached it");
    }

    /// A port nobody listens on is a connection error, retried.
    #[tokio::test]
    async fn an_unreachable_provider_is_retried() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let sms = http(
            &format!("http://{addr}/send"),
            "retries = 1\nbody-template = \"{phone} {code}\"",
        );

        let error = sms.send(&phone(), CODE).await.expect_err("unreachable");

        assert_eq!(
            error.to_string(),
            "the SMS provider could not be reached (attempts: 2)"
        );
    }

    /// `sender` picks the outbox, the provider or none, as configured.
    #[tokio::test]
    async fn the_configured_sender_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = dir.path().join("outbox.log");
        let dev = sender(&config(&format!(
            "[sms]\ndev-outbox = \"{}\"",
            outbox.display()
        )));
        dev.send(&phone(), CODE).await.expect("written");
        dev.send(&phone(), "000111").await.expect("appended");
        assert_eq!(
            std::fs::read_to_string(&outbox).expect("outbox"),
            format!("{PHONE} {CODE}\n{PHONE} 000111\n")
        );

        let provider = Provider::start(Some(204)).await;
        let http = sender(&config(&format!(
            "[sms.http]\nurl = \"{}\"\nallow-http = true\nbody-template = \"{{phone}}{{code}}\"",
            provider.url("/")
        )));
        http.send(&phone(), CODE).await.expect("sent");
        assert_eq!(provider.seen().len(), 1);

        let none = sender(&config(""));
        let error = none.send(&phone(), CODE).await.expect_err("no sender");
        assert_eq!(error.kind(), std::io::ErrorKind::Unsupported);
    }

    /// A log writer into memory.
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("logs").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
