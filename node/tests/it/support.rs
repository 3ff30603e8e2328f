//! Helpers shared by the integration tests: configs on port 0, and real node processes that are
//! killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// The node config template (docs/node-config.template.toml) and its filler are shared with
// courier-jepsen and the simulation. node's tests may not depend on courier-jepsen (nothing
// depends on the harnesses: STYLE.md section 1, enforced by scripts/check-deps), so they compile
// the filler's source file, which uses std only, instead of linking the crate: one template, one
// filler, no dependency edge up the crate graph.
#[allow(
    dead_code,
    unreachable_pub,
    reason = "the filler is courier-jepsen's public API; these tests use part of it"
)]
#[path = "../../../jepsen-tests/src/node_config.rs"]
mod node_config;

/// Nodes the test PKI has certificates for (ids 1..=PKI_NODES).
pub(crate) const PKI_NODES: u64 = 9;

/// Prefix of the test PKI directories; the creating process's id follows it.
const PKI_DIR_PREFIX: &str = "courier-test-pki-";

/// The development PKI every test node and client of this test process uses (made once, kept
/// until the process exits): `courier_tls::dev` files for nodes 1..=[`PKI_NODES`], an operator
/// and the client listener (localhost, 127.0.0.1).
///
/// A `static` is never dropped, so the directory outlives its process (nextest runs every test
/// in a process of its own). Its name carries the process id, and each new PKI first removes the
/// directories of processes that have exited: a run leaves at most the few of its last
/// processes, which the next run removes.
pub(crate) fn pki() -> &'static Path {
    static PKI: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        remove_pkis_of_exited_processes();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PKI_DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("a directory for the test PKI");
        let nodes: Vec<u64> = (1..=PKI_NODES).collect();
        courier_tls::dev::generate(dir.path(), &courier_tls::dev::DevPki::local(&nodes))
            .expect("test PKI");
        dir
    })
    .path()
}

/// Removes the PKI directories whose creating process no longer runs (Linux: no `/proc/<pid>`;
/// elsewhere nothing is removed). A process id reused since keeps its directory, harmlessly.
fn remove_pkis_of_exited_processes() {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(PKI_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !proc.join(pid.to_string()).exists() {
            // Another process may be removing it at the same time.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The TLS of a caller of the peer listener holding the certificate `name` of the test PKI
/// (`operator`, `node-<id>`).
pub(crate) fn peer_tls(name: &str) -> courier_tls::ClientTlsConfig {
    courier_tls::PeerTls::load_dev(pki(), name)
        .expect("test PKI files")
        .client()
}

/// A config for node `id` listening on port 0 under `dir`.
pub(crate) fn config_text(id: u64, dir: &Path) -> String {
    config_on_ports(id, dir, 0, 0)
}

/// A port that was free a moment ago (bind port 0, read it, release it), for nodes that must
/// keep their address across restarts.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A config for node `id` on fixed ports (0: any free port), with JSON logs; no `[raft]` or
/// `[limits]` table, so that tests can append their own.
pub(crate) fn config_on_ports(id: u64, dir: &Path, client: u16, peer: u16) -> String {
    node_config::NodeConfig::new(id, dir)
        .set("client", format!("127.0.0.1:{client}"))
        .set("peer", format!("127.0.0.1:{peer}"))
        .set("metrics", "127.0.0.1:0")
        .set("log_format", "json")
        .set("log_level", "info")
        .dev_tls(id, pki())
        // Tests keep backups beside the data directories (`root/node3-backup`).
        .set("backup_root", dir.parent().unwrap_or(dir).display())
        .text()
}

/// The addresses a node wrote to `<data-dir>/node.addr`.
#[derive(Debug, Clone)]
pub(crate) struct Addrs {
    pub(crate) client: String,
    pub(crate) peer: String,
}

/// Waits for `<data-dir>/node.addr` to appear and reads it.
pub(crate) fn wait_addrs(data_dir: &Path, timeout: Duration) -> Addrs {
    let path = data_dir.join("node.addr");
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let value: serde_json::Value = serde_json::from_str(&text).expect("node.addr is JSON");
            return Addrs {
                client: value["client"].as_str().expect("client").to_owned(),
                peer: value["peer"].as_str().expect("peer").to_owned(),
            };
        }
        assert!(
            started.elapsed() < timeout,
            "node did not write {} in {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Environment variables every node process this test starts gets (a test process runs one
/// test, so a test sets them before it starts its nodes): credentials of a test bucket.
static NODE_ENV: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Gives every node process started from now on `key = value` in its environment.
pub(crate) fn set_node_env(key: &str, value: &str) {
    NODE_ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((key.to_owned(), value.to_owned()));
}

fn node_env() -> Vec<(String, String)> {
    NODE_ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// A `courier-node` process, SIGKILLed on drop if still running.
pub(crate) struct NodeProcess {
    pub(crate) child: Child,
    pub(crate) data_dir: PathBuf,
}

impl NodeProcess {
    /// Starts node `id` with its data in `root/node<id>`.
    pub(crate) fn start(id: u64, root: &Path) -> Self {
        Self::start_with(id, root, &|id, dir| config_text(id, dir))
    }

    /// Starts node `id` with the config `make_config(id, data_dir)`.
    pub(crate) fn start_with(
        id: u64,
        root: &Path,
        make_config: &dyn Fn(u64, &Path) -> String,
    ) -> Self {
        let data_dir = root.join(format!("node{id}"));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let config = root.join(format!("node{id}.toml"));
        std::fs::write(&config, make_config(id, &data_dir)).expect("config");
        let _ = std::fs::remove_file(data_dir.join("node.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join(format!("node{id}.log")))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_courier-node"))
            .envs(node_env())
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn courier-node");
        Self { child, data_dir }
    }

    /// Waits up to `timeout` for this node's `node.addr`; `None` when the process exited first
    /// (it could not bind: a fixed port from [`free_port`] was taken by another process in
    /// between, which the caller answers by choosing new ports).
    pub(crate) fn addrs_or_exit(&mut self, timeout: Duration) -> Option<Addrs> {
        let started = Instant::now();
        loop {
            if self.data_dir.join("node.addr").exists() {
                return Some(wait_addrs(&self.data_dir, timeout));
            }
            if self.child.try_wait().expect("try_wait").is_some() {
                return None;
            }
            assert!(
                started.elapsed() < timeout,
                "node did not write {} in {timeout:?}",
                self.data_dir.join("node.addr").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "node did not stop within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A phone's channel to a client listener at `addr` (host:port): TLS, trusting the test CA.
pub(crate) async fn channel(addr: &str) -> tonic::transport::Channel {
    let tls =
        courier_tls::phone(&pki().join(courier_tls::dev::CA_FILE), "localhost").expect("test CA");
    connect(addr, tls).await
}

/// A phone's channel to a client listener at `addr`, or the connection error.
pub(crate) async fn try_connect(
    addr: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls =
        courier_tls::phone(&pki().join(courier_tls::dev::CA_FILE), "localhost").expect("test CA");
    tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .expect("a valid uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// Waits until the client listener at `addr` serves a health check (a client refused meanwhile
/// tries again, as any client would); fails with `why` after `within`.
pub(crate) async fn wait_served(addr: &str, within: Duration, why: &str) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let started = Instant::now();
    loop {
        let served = match try_connect(addr).await {
            Ok(channel) => HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .is_ok(),
            Err(_) => false,
        };
        if served {
            return;
        }
        assert!(started.elapsed() < within, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An operator's channel to a peer listener at `addr` (host:port).
pub(crate) async fn peer_channel(addr: &str) -> tonic::transport::Channel {
    connect(addr, peer_tls(courier_tls::dev::OPERATOR)).await
}

/// A shard's whole log as the node at `peer` stores it, read page by page as `ReadLog` returns
/// it (a page ends early on large entries).
pub(crate) async fn log_events(peer: &str, shard: u32) -> Vec<courier_proto::pb::events::Event> {
    let mut admin =
        courier_proto::pb::peer::admin_client::AdminClient::new(peer_channel(peer).await);
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let page = admin
            .read_log(courier_proto::pb::peer::ReadLogRequest {
                shard,
                from,
                to: 0,
                limit: 0,
            })
            .await
            .expect("read log")
            .into_inner();
        let Some(last) = page.entries.last().map(|e| e.index) else {
            return events;
        };
        events.extend(
            page.entries
                .into_iter()
                .filter_map(|e| e.events)
                .flat_map(|p| p.events),
        );
        if last >= page.last {
            return events;
        }
        from = last + 1;
    }
}

/// A channel to `addr` with `tls`.
pub(crate) async fn connect(
    addr: &str,
    tls: courier_tls::ClientTlsConfig,
) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .expect("a valid uri")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect")
}

/// The `courier-ops` binary the workspace test run builds beside `courier-node`.
fn ops_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_courier-node")).with_file_name("courier-ops");
    assert!(
        path.exists(),
        "{} is missing: run the workspace tests (`make test`), which build courier-ops too",
        path.display()
    );
    path
}

/// Runs courier-ops with `args` as the test PKI's operator.
pub(crate) fn ops(args: &[&str]) -> (i32, String, String) {
    let (cert, key) = courier_tls::dev::files(pki(), courier_tls::dev::OPERATOR);
    let output = Command::new(ops_binary())
        .args(args)
        // The operator's environment is the nodes' (an S3 archive's credentials).
        .envs(node_env())
        .env("COURIER_CA", pki().join(courier_tls::dev::CA_FILE))
        .env("COURIER_CERT", cert)
        .env("COURIER_KEY", key)
        .output()
        .expect("run courier-ops");
    (
        output.status.code().expect("exited"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The text of one `GET /metrics` from a node's metrics address.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("response");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}
