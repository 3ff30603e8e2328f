//! The `courier-node` processes of a run: config files, start (inside the node's namespace),
//! SIGKILL, SIGSTOP/SIGCONT, and noticing a node that died on its own.
//!
//! A node is started as `ip netns exec <ns> <courier-node> --config <file>`; `ip netns exec`
//! execs the binary after entering the namespace, so the child's pid is the node's pid and
//! signals reach the node itself. A node keeps its data directory and addresses across
//! restarts. Its stdout and stderr are appended to `node.log` next to its config.
//!
//! Layout of one node under the run directory:
//!
//! ```text
//! nodes/n<id>/config.toml   nodes/n<id>/node.log   nodes/n<id>/data/   (RocksDB, node.addr,
//!                                                                         sms-outbox.log)
//! ```

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

use crate::net::{Network, sh};
use crate::node_config::NodeConfig;

/// Client API port inside every node's namespace.
pub const CLIENT_PORT: u16 = 7001;
/// Peer API port (raft, forward, admin) inside every node's namespace.
pub const PEER_PORT: u16 = 7101;
/// Metrics port inside every node's namespace.
pub const METRICS_PORT: u16 = 7201;

/// Log entries between a node's snapshots in a run: a few per shard in a minute's workload,
/// each purging the live log below it (`logs-to-keep` 50).
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 200;

/// Entries per archive segment in a run: small, so that the purge (which waits for the archive)
/// follows the snapshots closely and the last partial segment is short.
pub const ARCHIVE_SEGMENT_ENTRIES: u64 = 64;

/// What the run's nodes keep of delivered messages: the production default, bodies trimmed
/// once every device of the recipient acked them (`retention.keep-delivered = false`). The
/// history records it, so the checker excuses a drain for exactly those.
pub const KEEP_DELIVERED: bool = false;

/// libfaketime, multithreaded build (Debian package `libfaketime`): preloaded into every node of
/// a run with clock faults, reading its offset from the node's `faketime.rc`.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Where and how one node runs.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The node id (1-based).
    pub id: u32,
    /// Its network namespace.
    pub netns: String,
    /// Its address inside the namespace.
    pub ip: Ipv4Addr,
    /// `nodes/n<id>` under the run directory.
    pub dir: PathBuf,
}

impl NodeSpec {
    /// The RocksDB data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The clock offset file libfaketime reads (`+0`, `-37`: seconds added to the wall clock).
    pub fn faketime_path(&self) -> PathBuf {
        self.dir.join("faketime.rc")
    }

    /// The run's development PKI: `root/pki` beside `root/nodes`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| self.dir.join("pki"), |root| root.join("pki"))
    }

    /// The run's log archive, shared by every node: `root/archive` beside `root/nodes`.
    pub fn archive_dir(&self) -> PathBuf {
        self.dir
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| self.dir.join("archive"), |root| root.join("archive"))
    }

    /// The log file (stdout and stderr of every incarnation).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// `ip:7001`.
    pub fn client_addr(&self) -> String {
        format!("{}:{CLIENT_PORT}", self.ip)
    }

    /// `ip:7101`.
    pub fn peer_addr(&self) -> String {
        format!("{}:{PEER_PORT}", self.ip)
    }

    /// The node's config (`docs/node-config.template.toml`): fixed addresses, fast raft timing
    /// (as the node's own multi-process tests use), out of the workload's way
    /// ([`NodeConfig::for_workload`]: limits raised), and the production paths: snapshots every
    /// [`SNAPSHOT_LOGS_SINCE_LAST`] entries with the run's log archive, delivered bodies trimmed
    /// ([`KEEP_DELIVERED`]).
    pub fn config_text(&self) -> String {
        let text = NodeConfig::new(self.id, &self.data_dir())
            .set("client", self.client_addr())
            .set("peer", self.peer_addr())
            .set("metrics", format!("{}:{METRICS_PORT}", self.ip))
            .set("heartbeat", "50ms")
            .set("election_timeout_min", "300ms")
            .set("election_timeout_max", "600ms")
            .set("rpc_timeout", "1s")
            .set("logs_to_keep", 50)
            .for_workload()
            // The production path under faults: snapshots every few hundred entries purge the
            // live log, which the replicas first copy into one archive shared by the run (64
            // entries a segment, looked for 4 times a second), so the checker still verifies
            // every replica from index 1.
            .set("snapshot_logs_since_last", SNAPSHOT_LOGS_SINCE_LAST)
            .set("archive_dir", self.archive_dir().display())
            .set("archive_segment_entries", ARCHIVE_SEGMENT_ENTRIES)
            .set("archive_interval", "250ms")
            .set("keep_delivered", KEEP_DELIVERED)
            .set("log_format", "json")
            .set("log_level", "info")
            // TLS with the run's development PKI (`Nodes::prepare` writes it to `root/pki`).
            .dev_tls(self.id, &self.pki_dir())
            .text();
        format!("# Written by courier-jepsen.\n{text}")
    }
}

/// One node's process state.
#[derive(Debug)]
struct Node {
    spec: NodeSpec,
    child: Option<Child>,
    paused: bool,
}

/// Every node of the run. Shared as `Arc<Mutex<Nodes>>`; every method is quick (a fork, a
/// signal, a `try_wait`), so the lock is never held across an `.await`.
#[derive(Debug)]
pub struct Nodes {
    binary: PathBuf,
    /// `COURIER_BUG` for the nodes (the `courier-node-bugs` binary), if any.
    bug: Option<String>,
    /// Nodes run under libfaketime (clock faults).
    faketime: bool,
    nodes: BTreeMap<u32, Node>,
}

/// A node that exited although the harness did not kill it.
#[derive(Clone, Debug)]
pub struct Crash {
    /// The node.
    pub node: u32,
    /// Its exit status, as text.
    pub status: String,
}

impl Nodes {
    /// Describes `count` nodes (ids 1..=count) in `network`, under `root/nodes/n<id>`, and
    /// writes their config files (and, with `faketime`, a zero clock offset). Nothing is started.
    ///
    /// # Errors
    ///
    /// The directories or config files cannot be written, or `faketime` is asked for and
    /// libfaketime is not installed.
    pub fn prepare(
        binary: &Path,
        bug: Option<String>,
        faketime: bool,
        network: &Network,
        root: &Path,
        count: u32,
    ) -> anyhow::Result<Self> {
        if faketime && !Path::new(LIBFAKETIME).exists() {
            bail!(
                "clock faults need {LIBFAKETIME} (Debian package libfaketime; scripts/setup installs it)"
            );
        }
        // Every node and client of the run uses TLS with one fresh development PKI.
        let pki = root.join("pki");
        let ids: Vec<u64> = (1..=u64::from(count)).collect();
        courier_tls::dev::generate(&pki, &courier_tls::dev::DevPki::local(&ids))
            .with_context(|| format!("writing the run's PKI to {}", pki.display()))?;
        crate::tls::use_dev_tls(&pki)?;
        let mut nodes = BTreeMap::new();
        for id in 1..=count {
            let spec = NodeSpec {
                id,
                netns: network.netns(id),
                ip: network.node_ip(id),
                dir: root.join("nodes").join(format!("n{id}")),
            };
            std::fs::create_dir_all(spec.data_dir())
                .with_context(|| format!("creating {}", spec.data_dir().display()))?;
            std::fs::write(spec.config_path(), spec.config_text())
                .with_context(|| format!("writing {}", spec.config_path().display()))?;
            if faketime {
                write_offset(&spec, 0)?;
            }
            let node = Node {
                spec,
                child: None,
                paused: false,
            };
            nodes.insert(id, node);
        }
        Ok(Self {
            binary: binary.to_owned(),
            bug,
            faketime,
            nodes,
        })
    }

    /// The node ids.
    pub fn ids(&self) -> Vec<u32> {
        self.nodes.keys().copied().collect()
    }

    /// The spec of `id`.
    ///
    /// # Errors
    ///
    /// No such node.
    pub fn spec(&self, id: u32) -> anyhow::Result<&NodeSpec> {
        self.nodes
            .get(&id)
            .map(|node| &node.spec)
            .with_context(|| format!("no node {id}"))
    }

    /// Every spec, by id.
    pub fn specs(&self) -> Vec<NodeSpec> {
        self.nodes.values().map(|node| node.spec.clone()).collect()
    }

    fn node_mut(&mut self, id: u32) -> anyhow::Result<&mut Node> {
        self.nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id}"))
    }

    /// Starts node `id` (a no-op if it runs).
    ///
    /// # Errors
    ///
    /// The process cannot be spawned or its log opened.
    pub fn start(&mut self, id: u32) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        let bug = self.bug.clone();
        let faketime = self.faketime;
        let node = self.node_mut(id)?;
        if node.child.is_some() {
            return Ok(());
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.spec.log_path())
            .with_context(|| format!("opening {}", node.spec.log_path().display()))?;
        writeln!(log, "=== courier-jepsen: starting node {id} ===")?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.spec.netns])
            .arg(&binary)
            .arg("--config")
            .arg(node.spec.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(bug) = bug {
            command.env("COURIER_BUG", bug);
        }
        if faketime {
            // Only the wall clock moves: raft timers and rate limiters run on the monotonic
            // clock, which a real clock step never touches either. The file is re-read every
            // second, so an offset changes under a running node.
            command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", node.spec.faketime_path())
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} for node {id}", binary.display()))?;
        tracing::info!(node = id, pid = child.id(), "node started");
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// SIGKILLs node `id` and reaps it. Returns false if it was not running.
    ///
    /// # Errors
    ///
    /// No such node, or the kill fails.
    pub fn kill(&mut self, id: u32) -> anyhow::Result<bool> {
        let node = self.node_mut(id)?;
        let Some(mut child) = node.child.take() else {
            return Ok(false);
        };
        node.paused = false;
        // SIGKILL works on a stopped process too.
        if let Err(error) = child.kill()
            && child.try_wait().ok().flatten().is_none()
        {
            bail!("cannot kill node {id}: {error}");
        }
        child.wait().with_context(|| format!("reaping node {id}"))?;
        tracing::info!(node = id, "node killed");
        Ok(true)
    }

    /// Sets node `id`'s wall clock `seconds` away from the real one (0 heals); a running node
    /// sees it within a second.
    ///
    /// # Errors
    ///
    /// No such node, the run has no clock faults, or the file cannot be written.
    pub fn set_clock_offset(&mut self, id: u32, seconds: i64) -> anyhow::Result<()> {
        if !self.faketime {
            bail!("node {id}: this run does not preload libfaketime");
        }
        write_offset(self.spec(id)?, seconds)
    }

    /// Kills node `id`, deletes its data directory and starts it again empty: a node that left
    /// the cluster comes back as a fresh machine with the same id and addresses.
    ///
    /// # Errors
    ///
    /// No such node, or the kill, removal or start fails.
    pub fn wipe_and_start(&mut self, id: u32) -> anyhow::Result<()> {
        self.kill(id)?;
        let data = self.spec(id)?.data_dir();
        std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        self.start(id)
    }

    /// SIGSTOPs node `id`. Returns false if it was not running or already paused.
    ///
    /// # Errors
    ///
    /// No such node, or `kill -STOP` fails.
    pub fn pause(&mut self, id: u32) -> anyhow::Result<bool> {
        self.signal(id, true)
    }

    /// SIGCONTs node `id`. Returns false if it was not paused.
    ///
    /// # Errors
    ///
    /// No such node, or `kill -CONT` fails.
    pub fn resume(&mut self, id: u32) -> anyhow::Result<bool> {
        self.signal(id, false)
    }

    fn signal(&mut self, id: u32, stop: bool) -> anyhow::Result<bool> {
        let node = self.node_mut(id)?;
        let Some(child) = &node.child else {
            return Ok(false);
        };
        if node.paused == stop {
            return Ok(false);
        }
        let pid = child.id().to_string();
        let signal = if stop { "-STOP" } else { "-CONT" };
        sh("kill", &[signal, &pid])?;
        node.paused = stop;
        tracing::info!(node = id, signal, "node signalled");
        Ok(true)
    }

    /// True if `id` runs and is not paused: it can answer requests.
    pub fn is_live(&self, id: u32) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|node| node.child.is_some() && !node.paused)
    }

    /// Nodes that exited without being killed by the harness since the last call; they are
    /// marked stopped, so a later [`Nodes::start`] restarts them.
    pub fn reap_crashes(&mut self) -> Vec<Crash> {
        let mut crashes = Vec::new();
        for (id, node) in &mut self.nodes {
            let Some(child) = &mut node.child else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                // A kill takes the child out first, so any exit seen here is the node's own.
                node.child = None;
                node.paused = false;
                crashes.push(Crash {
                    node: *id,
                    status: status.to_string(),
                });
            }
        }
        crashes
    }

    /// Resumes paused nodes and starts stopped ones. Returns the ids it touched.
    ///
    /// # Errors
    ///
    /// A start or resume fails.
    pub fn heal_all(&mut self) -> anyhow::Result<Vec<u32>> {
        let mut touched = Vec::new();
        for id in self.ids() {
            if self.resume(id)? {
                touched.push(id);
            }
            let stopped = self.nodes.get(&id).is_some_and(|node| node.child.is_none());
            if stopped {
                self.start(id)?;
                touched.push(id);
            }
        }
        Ok(touched)
    }

    /// SIGKILLs every node (used on teardown; errors are logged).
    pub fn kill_all(&mut self) {
        for id in self.ids() {
            if let Err(error) = self.kill(id) {
                tracing::warn!(%error, node = id, "cannot kill node on teardown");
            }
        }
    }

    /// True once every node has written `node.addr` (it is listening).
    ///
    /// # Errors
    ///
    /// A node exited before it was listening.
    pub fn all_listening(&mut self) -> anyhow::Result<bool> {
        if let Some(crash) = self.reap_crashes().first() {
            let log = self.spec(crash.node)?.log_path();
            bail!(
                "node {} exited during startup ({}); see {}",
                crash.node,
                crash.status,
                log.display()
            );
        }
        Ok(self
            .nodes
            .values()
            .all(|node| node.spec.data_dir().join("node.addr").exists()))
    }
}

/// Writes a clock offset in libfaketime's relative format (`+37`, `-12`: seconds).
fn write_offset(spec: &NodeSpec, seconds: i64) -> anyhow::Result<()> {
    let path = spec.faketime_path();
    std::fs::write(&path, format!("{seconds:+}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.kill_all();
    }
}
