//! A courier phone client, as much as the benchmarks need: dev-mode registration (the code is
//! read from the node's `<data-dir>/sms-outbox.log`, as `courier-ops demo` does), bearer
//! authentication, sends and device streams.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    ClientFrame, Open, RegisterRequest, RequestCodeRequest, ServerFrame, client_frame,
};
use courier_proto::{PhoneHasher, ShardId, shard_of};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// How long registration looks for the code in the outbox file before giving up.
const CODE_WAIT: Duration = Duration::from_secs(5);
/// Deadline of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A registered device.
#[derive(Clone, Debug)]
pub(crate) struct Device {
    /// The user id.
    pub(crate) user: u64,
    /// The `authorization` header value.
    pub(crate) bearer: MetadataValue<tonic::metadata::Ascii>,
}

/// Opens one HTTP/2 connection to `addr` (`host:port`).
///
/// # Errors
/// Connection failures, with the address.
pub(crate) async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// Wraps `message` in a request carrying `device`'s bearer token.
pub(crate) fn authed<T>(device: &Device, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", device.bearer.clone());
    request
}

/// A phone number of this run: `+1` and 10 digits, unique per `(run, index)`.
pub(crate) fn phone(run: u32, index: u32) -> String {
    format!("+1{:04}{:06}", run % 10_000, index % 1_000_000)
}

/// A run tag that makes this run's phone numbers differ from earlier runs' on the same cluster.
pub(crate) fn run_tag() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(16)) % 10_000
}

/// A node's dev SMS outbox, with the lock that keeps this process to one code request at a
/// time on that node.
///
/// The node's dev sender appends each `phone code` line with several `write(2)` calls, so two
/// concurrent `RequestCode`s on one node can interleave their lines; asking for one code at a
/// time per node (and reading it before the next) keeps every line whole. The `Register` calls,
/// which commit through raft and take the time, still run in parallel.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    dir: PathBuf,
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Outbox {
    /// The outbox of the node whose data directory is `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            lock: std::sync::Arc::default(),
        }
    }
}

/// Registers `phone` as a new primary device through the node at `channel`, whose dev SMS
/// outbox is `outbox`.
///
/// # Errors
/// RPC failures, or no code in the outbox.
pub(crate) async fn register(
    channel: Channel,
    outbox: &Outbox,
    phone: &str,
) -> anyhow::Result<Device> {
    let mut client = RegistrationClient::new(channel);
    let code = {
        let _one_at_a_time = outbox.lock.lock().await;
        client
            .request_code(RequestCodeRequest {
                phone_number: phone.to_owned(),
            })
            .await
            .context("RequestCode")?;
        read_code(&outbox.dir, phone).await?
    };
    let response = client
        .register(RegisterRequest {
            phone_number: phone.to_owned(),
            code,
            device_name: "bench".to_owned(),
        })
        .await
        .context("Register")?
        .into_inner();
    let token: String = response
        .device_token
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let bearer = format!("Bearer {}.{}.{token}", response.user_id, response.device_id)
        .parse()
        .context("bearer header")?;
    Ok(Device {
        user: response.user_id,
        bearer,
    })
}

/// The newest code for `phone` in the node's dev SMS outbox.
async fn read_code(data_dir: &Path, phone: &str) -> anyhow::Result<String> {
    let path = data_dir.join("sms-outbox.log");
    let prefix = format!("{phone} ");
    let deadline = tokio::time::Instant::now() + CODE_WAIT;
    loop {
        let outbox = tokio::fs::read_to_string(&path)
            .await
            .with_context(|| format!("reading the dev SMS outbox {}", path.display()))?;
        if let Some(code) = outbox.lines().rev().find_map(|l| l.strip_prefix(&prefix)) {
            return Ok(code.to_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no code for a bench number in {}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The nodes a workload talks to: client addresses and, in the same order, data directories
/// (dev-mode registration codes are read from `<dir>/sms-outbox.log`).
#[derive(Debug, clap::Args)]
pub(crate) struct Nodes {
    /// Client API addresses of the nodes (`host:port`, comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) addrs: Vec<String>,
    /// Data directories of the same nodes, in the same order.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) data_dirs: Vec<PathBuf>,
}

impl Nodes {
    /// Checks that both lists name the same nodes.
    ///
    /// # Errors
    /// Lists of different lengths, or empty.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.addrs.len() != self.data_dirs.len() || self.addrs.is_empty() {
            bail!("--addrs and --data-dirs must name the same nodes, in the same order");
        }
        Ok(())
    }

    /// The nodes' dev SMS outboxes, in order.
    pub(crate) fn outboxes(&self) -> Vec<Outbox> {
        self.data_dirs.iter().map(|d| Outbox::new(d)).collect()
    }
}

/// An open device stream: frames from the server, and the sender that keeps the client half
/// open (dropping it ends the stream).
pub(crate) struct DeviceStream {
    /// Frames from the server.
    pub(crate) frames: tonic::Streaming<ServerFrame>,
    /// The client half (acks and reads, where a workload sends them).
    pub(crate) out: mpsc::Sender<ClientFrame>,
}

/// Opens `device`'s stream over `channel`, from the start of its inbox.
///
/// # Errors
/// RPC failures.
pub(crate) async fn open_stream(channel: Channel, device: &Device) -> anyhow::Result<DeviceStream> {
    // Capacity 1: the bench sends only `Open`; a small buffer keeps 100k idle streams cheap.
    let (tx, rx) = mpsc::channel(1);
    tx.send(ClientFrame {
        frame: Some(client_frame::Frame::Open(Open {
            resume_after_seq: 0,
            ..Open::default()
        })),
    })
    .await
    .context("queueing Open")?;
    let frames = MessagingClient::new(channel)
        .stream(authed(device, ReceiverStream::new(rx)))
        .await
        .context("Stream")?
        .into_inner();
    Ok(DeviceStream { frames, out: tx })
}

/// Hands out this run's phone numbers by shard: candidates are hashed in order and those on
/// other shards are kept for later requests, so no number is wasted.
#[derive(Debug)]
pub(crate) struct PhoneBook {
    run: u32,
    shards: u16,
    hasher: PhoneHasher,
    next: u32,
    spare: std::collections::BTreeMap<u16, Vec<String>>,
}

impl PhoneBook {
    /// A phone book for run `run` on a cluster of `shards` shards that hashes numbers with
    /// `hasher` (the benchmark creates its clusters with a key it knows).
    pub(crate) fn new(run: u32, shards: u16, hasher: PhoneHasher) -> Self {
        Self {
            run,
            shards,
            hasher,
            next: 0,
            spare: std::collections::BTreeMap::new(),
        }
    }

    /// A fresh number whose user lives on `shard`.
    ///
    /// # Errors
    /// When the run's million numbers are used up.
    pub(crate) fn on_shard(&mut self, shard: ShardId) -> anyhow::Result<String> {
        if let Some(phone) = self.spare.get_mut(&shard.get()).and_then(Vec::pop) {
            return Ok(phone);
        }
        loop {
            if self.next >= 1_000_000 {
                bail!("ran out of phone numbers for shard {shard}");
            }
            let candidate = phone(self.run, self.next);
            self.next += 1;
            let at = shard_of(self.hasher.user_of_phone(&candidate), self.shards);
            if at == shard {
                return Ok(candidate);
            }
            self.spare.entry(at.get()).or_default().push(candidate);
        }
    }

    /// A fresh number on any shard.
    pub(crate) fn any(&mut self) -> String {
        let candidate = phone(self.run, self.next);
        self.next += 1;
        candidate
    }
}
