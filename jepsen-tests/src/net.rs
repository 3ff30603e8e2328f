//! The run's network: a bridge in the root namespace, one network namespace per node joined to it
//! by a veth pair, and nftables drop rules inside the nodes' namespaces for partitions.
//!
//! ```text
//!  root ns (harness, clients) ── cjbr<tag> 10.S.0.1/24
//!        ├── cjv<tag>n1 ══ eth0 10.S.0.11  [ns cj-<tag>-n1: courier-node 1, table inet courier_jepsen]
//!        ├── cjv<tag>n2 ══ eth0 10.S.0.12  [ns cj-<tag>-n2: courier-node 2, ...]
//!        └── cjv<tag>n3 ══ eth0 10.S.0.13  [ns cj-<tag>-n3: courier-node 3, ...]
//! ```
//!
//! `<tag>` is the harness's pid, so concurrent runs never share a name, and `cleanup` can tell a
//! leftover of a dead harness from a live run. Interface names stay within the kernel's 15 bytes
//! (`cjv4194304n12` is 13). The subnet byte `S` is picked among those no local address or route
//! uses.
//!
//! Partitions only ever drop traffic between node addresses: the harness (10.S.0.1) reaches every
//! node at all times, so clients can keep talking to an isolated minority, as phones would.
//!
//! Everything here shells out to `ip` and `nft`. The calls are short (milliseconds) and happen a
//! few times per fault, so they run synchronously, also from async code; `Drop` needs the
//! synchronous form anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

/// Prefix of every network namespace the harness creates.
pub const NETNS_PREFIX: &str = "cj-";
/// Prefix of the bridge.
pub const BRIDGE_PREFIX: &str = "cjbr";
/// Prefix of the root-side veth ends.
pub const VETH_PREFIX: &str = "cjv";
/// The nftables table the partition rules live in (inside each node's namespace).
pub const NFT_TABLE: &str = "courier_jepsen";

/// Who cannot talk to whom: node → the nodes whose packets it drops (both directions are
/// written into the grudge, so a partition is symmetric).
pub type Grudge = BTreeMap<u32, BTreeSet<u32>>;

/// Runs a command, returning its stdout; a non-zero exit is an error carrying stderr.
///
/// # Errors
///
/// The command cannot be started, or exits non-zero.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    sh_input(program, args, None)
}

/// As [`sh`], writing `input` to the command's stdin.
///
/// # Errors
///
/// The command cannot be started, or exits non-zero.
pub fn sh_input(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}'s stdin"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Checks what a faulty run needs before anything is created: root, `ip` and `nft`.
///
/// # Errors
///
/// Names what is missing; the harness never falls back to a run without faults.
pub fn preflight() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        bail!(
            "courier-jepsen needs root (effective uid is {uid}): it creates network namespaces, \
             a bridge and nftables rules; it never runs without injecting faults"
        );
    }
    sh("ip", &["-V"]).context("`ip` (iproute2) is required")?;
    sh("nft", &["--version"])
        .context("`nft` is required for partitions: apt-get install -y nftables")?;
    Ok(())
}

/// The bridge, namespaces and veth pairs of one run. [`Network::destroy`] (also on drop) removes
/// them; it is idempotent.
#[derive(Debug)]
pub struct Network {
    tag: u32,
    subnet: u8,
    nodes: Vec<u32>,
    destroyed: AtomicBool,
}

impl Network {
    /// Creates the bridge and one namespace per node, tagged `tag` (the harness pid).
    ///
    /// # Errors
    ///
    /// Any `ip` step failing (whatever was created is removed again); a failing
    /// `ip netns add` says that namespaces are unavailable.
    pub fn create(tag: u32, nodes: &[u32]) -> anyhow::Result<Self> {
        let subnet = free_subnet(tag)?;
        let network = Self {
            tag,
            subnet,
            nodes: nodes.to_vec(),
            destroyed: AtomicBool::new(false),
        };
        // On error `network` is dropped here, which removes what exists so far.
        network.build()?;
        Ok(network)
    }

    fn build(&self) -> anyhow::Result<()> {
        let bridge = self.bridge();
        let bridge_cidr = format!("{}/24", self.bridge_ip());
        sh("ip", &["link", "add", &bridge, "type", "bridge"])
            .context("cannot create the bridge (root and CAP_NET_ADMIN needed)")?;
        sh("ip", &["addr", "add", &bridge_cidr, "dev", &bridge])?;
        sh("ip", &["link", "set", &bridge, "up"])?;
        for &node in &self.nodes {
            let ns = self.netns(node);
            let veth = self.veth(node);
            let cidr = format!("{}/24", self.node_ip(node));
            let gateway = self.bridge_ip().to_string();
            sh("ip", &["netns", "add", &ns]).context(
                "cannot create a network namespace: courier-jepsen needs root and netns support, \
                 and refuses to run without faults",
            )?;
            sh(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            sh("ip", &["link", "set", &veth, "master", &bridge])?;
            sh("ip", &["link", "set", &veth, "up"])?;
            sh("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            sh(
                "ip",
                &["-n", &ns, "route", "add", "default", "via", &gateway],
            )?;
        }
        // An empty rule set in every namespace proves nft works there before any fault needs it.
        self.heal()
            .context("nftables does not work inside the node namespaces")
    }

    /// The run's tag (the harness pid).
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        format!("{BRIDGE_PREFIX}{}", self.tag)
    }

    /// The root-side veth end of `node`.
    pub fn veth(&self, node: u32) -> String {
        format!("{VETH_PREFIX}{}n{node}", self.tag)
    }

    /// The network namespace of `node`.
    pub fn netns(&self, node: u32) -> String {
        format!("{NETNS_PREFIX}{}-n{node}", self.tag)
    }

    /// The bridge's address: the harness's address as the nodes see it.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 1)
    }

    /// The address of `node` inside its namespace.
    pub fn node_ip(&self, node: u32) -> Ipv4Addr {
        let host = u8::try_from(node.saturating_add(10)).unwrap_or(u8::MAX);
        Ipv4Addr::new(10, self.subnet, 0, host)
    }

    /// Installs `grudge`: in each node's namespace, packets from and to the addresses of the
    /// nodes it holds a grudge against are dropped. Nodes missing from `grudge` talk freely.
    /// Each namespace's table is replaced in one nft transaction.
    ///
    /// # Errors
    ///
    /// An `nft` failure.
    pub fn apply_grudge(&self, grudge: &Grudge) -> anyhow::Result<()> {
        for &node in &self.nodes {
            let blocked: Vec<String> = grudge
                .get(&node)
                .map(|peers| peers.iter().map(|p| self.node_ip(*p).to_string()).collect())
                .unwrap_or_default();
            let (input_rule, output_rule) = if blocked.is_empty() {
                (String::new(), String::new())
            } else {
                let set = blocked.join(", ");
                (
                    format!("ip saddr {{ {set} }} drop"),
                    format!("ip daddr {{ {set} }} drop"),
                )
            };
            // "table; delete table; table {..}" replaces the table whether or not it existed.
            // Rules sit on lines of their own: nft needs a newline or ';' before a '}'.
            let rules = format!(
                "table inet {NFT_TABLE}\n\
                 delete table inet {NFT_TABLE}\n\
                 table inet {NFT_TABLE} {{\n\
                 chain input {{\n\
                 type filter hook input priority 0; policy accept;\n\
                 {input_rule}\n\
                 }}\n\
                 chain output {{\n\
                 type filter hook output priority 0; policy accept;\n\
                 {output_rule}\n\
                 }}\n\
                 }}\n"
            );
            let ns = self.netns(node);
            sh_input(
                "ip",
                &["netns", "exec", &ns, "nft", "-f", "-"],
                Some(&rules),
            )
            .with_context(|| format!("installing partition rules for node {node}"))?;
        }
        Ok(())
    }

    /// Removes every partition rule.
    ///
    /// # Errors
    ///
    /// An `nft` failure.
    pub fn heal(&self) -> anyhow::Result<()> {
        self.apply_grudge(&Grudge::new())
    }

    /// Kills whatever still runs in the namespaces, then deletes namespaces (with their veth
    /// ends and nft tables) and the bridge. Errors are logged, not returned: this runs from
    /// `Drop` and from signal and panic paths.
    pub fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        for &node in &self.nodes {
            remove_netns(&self.netns(node));
            remove_link(&self.veth(node));
        }
        remove_link(&self.bridge());
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Picks the second address byte of a 10.S.0.0/24 no local address or route uses, starting from
/// one derived from `tag` so that concurrent runs rarely probe the same bytes.
fn free_subnet(tag: u32) -> anyhow::Result<u8> {
    let addrs = sh("ip", &["-o", "-4", "addr", "show"])?;
    let routes = sh("ip", &["-4", "route", "show", "table", "all"])?;
    let used = |s: u8| {
        let prefix = format!("10.{s}.");
        addrs.contains(&prefix) || routes.contains(&prefix)
    };
    let first = tag % 150;
    (0..150)
        .map(|i| (first + i) % 150 + 100)
        .filter_map(|s| u8::try_from(s).ok())
        .find(|s| !used(*s))
        .context("no free 10.S.0.0/24 subnet (S in 100..250)")
}

fn remove_netns(ns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = sh("kill", &["-KILL", pid]);
        }
        // A SIGKILLed process leaves the namespace once the kernel reaps its resources; the
        // namespace itself goes away with its last process even if the delete below is early.
        for _ in 0..20 {
            let left = sh("ip", &["netns", "pids", ns]).unwrap_or_default();
            if left.trim().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    if let Err(error) = sh("ip", &["netns", "del", ns])
        && !error.to_string().contains("No such file")
    {
        tracing::warn!(%error, ns, "cannot delete network namespace");
    }
}

fn remove_link(link: &str) {
    // Deleting a namespace removes its veth pair asynchronously, so the link may vanish
    // between the two commands.
    if sh("ip", &["link", "show", link]).is_ok()
        && let Err(error) = sh("ip", &["link", "del", link])
        && !error.to_string().contains("Cannot find device")
    {
        tracing::warn!(%error, link, "cannot delete link");
    }
}

/// The tag (harness pid) in a name the harness created, if `name` is one.
fn tag_of(name: &str) -> Option<u32> {
    let digits = |rest: &str| -> Option<u32> {
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest.get(..end)?.parse().ok()
    };
    if let Some(rest) = name.strip_prefix(NETNS_PREFIX) {
        return digits(rest);
    }
    if let Some(rest) = name.strip_prefix(BRIDGE_PREFIX) {
        return digits(rest);
    }
    name.strip_prefix(VETH_PREFIX).and_then(digits)
}

/// Removes leftovers of earlier runs: processes inside their namespaces, the namespaces, veth
/// ends and bridges. `select(tag)` says which runs to clean (by harness pid). Returns what was
/// removed.
///
/// # Errors
///
/// Listing namespaces or links fails.
pub fn cleanup(select: &dyn Fn(u32) -> bool) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let netns = sh("ip", &["netns", "list"])?;
    for name in netns.lines().filter_map(|l| l.split_whitespace().next()) {
        if tag_of(name).is_some_and(select) {
            remove_netns(name);
            removed.push(format!("netns {name}"));
        }
    }
    let links = sh("ip", &["-o", "link", "show"])?;
    let names: Vec<String> = links
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect();
    // Veth ends first: deleting a namespace usually took them along already.
    for name in names.iter().filter(|n| n.starts_with(VETH_PREFIX)) {
        if tag_of(name).is_some_and(select) {
            remove_link(name);
            removed.push(format!("link {name}"));
        }
    }
    for name in names.iter().filter(|n| n.starts_with(BRIDGE_PREFIX)) {
        if tag_of(name).is_some_and(select) {
            remove_link(name);
            removed.push(format!("bridge {name}"));
        }
    }
    Ok(removed)
}

/// True if `pid` is a live (not zombie) `courier-jepsen` process: the owner of a run tagged
/// `pid` is still running. A reused pid running something else counts as dead.
pub fn harness_alive(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let zombie = status
        .lines()
        .find_map(|line| line.strip_prefix("State:"))
        .is_some_and(|state| state.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("courier-jepsen")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_read_back_from_names() {
        assert_eq!(tag_of("cj-1234-n1"), Some(1234));
        assert_eq!(tag_of("cjbr99"), Some(99));
        assert_eq!(tag_of("cjv4194304n12"), Some(4_194_304));
        assert_eq!(tag_of("eth0"), None);
        assert_eq!(tag_of("cj-x"), None);
        assert!("cjv4194304n12".len() <= 15, "interface names fit IFNAMSIZ");
    }
}
