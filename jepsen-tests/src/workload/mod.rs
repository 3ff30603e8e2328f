//! The clients: users with two devices each, send workers ("processes" in Jepsen terms) and one
//! long-lived stream per device, plus the final drain.
//!
//! ```text
//!  send worker p:  pick sender device, recipient ─ Invoke ─▶ Send(client_msg_id "p-c", body "p-c",
//!                  one in 16 padded to a large body: `body`)
//!                  ◀─ Complete ok(message id) | fail(definite error) | info(unknown; retried with
//!                     the same client id, from the same device, on another node)
//!  device stream:  Open{resume_after_seq = last seq seen} on a random node ─ SessionStart
//!                  ◀─ InboxMessage ─ Delivered (client id read back from the body); Ack / Read sent
//!                  ◀─ ReceiptUpdate ─ Receipt (primary devices only, see `record_receipts`)
//!                  each session lives 5–15 s, then the device reconnects elsewhere and resumes
//!  drain:          after the heal, every device of every user on every node from seq 0
//! ```
//!
//! Outcomes follow Jepsen's rule: `fail` only when the status proves the send was not applied
//! (a rejection before any proposal: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...);
//! everything else — timeouts, UNAVAILABLE (the proposal may have reached a leader that then
//! lost its lease), connection errors — is `info`.
//!
//! Layout: `body` (message bodies), `register` (users and devices), `send` (send workers and
//! outcome classification),
//! `stream` (device streams), `drain` (the final drain); the types they share are here.

pub mod body;
mod drain;
mod register;
mod send;
mod stream;

pub use drain::drain_all;
pub use register::{LINKS_A_SECOND_DEVICE, register_and_save, register_one, register_users};
pub use send::{SEND_ATTEMPTS_MAX, SEND_TIMEOUT, classify, fill_archive_segments, send_worker};
pub use stream::stream_worker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::transport::Channel;

use crate::admin::channel;
use crate::nodes::NodeSpec;
use crate::recorder::Recorder;

/// One registered device.
#[derive(Clone, Debug)]
pub struct Device {
    /// The user.
    pub user: u64,
    /// The device of that user.
    pub device: u32,
    /// The `authorization` value: `Bearer <user>.<device>.<hex token>`.
    pub bearer: String,
    /// True for the primary device (the one that registered).
    pub primary: bool,
}

/// A user and its devices (primary first).
#[derive(Clone, Debug)]
pub struct User {
    /// The user id.
    pub id: u64,
    /// Its devices.
    pub devices: Vec<Device>,
}

/// A node as the clients see it: id and a channel to its client port.
#[derive(Clone, Debug)]
pub struct ClientNode {
    /// The node id.
    pub id: u32,
    /// A lazily connecting channel to the client API.
    pub channel: Channel,
}

impl ClientNode {
    /// Client channels for every node.
    ///
    /// # Errors
    ///
    /// A malformed address.
    pub fn all(specs: &[NodeSpec]) -> anyhow::Result<Vec<ClientNode>> {
        specs
            .iter()
            .map(|spec| {
                Ok(ClientNode {
                    id: spec.id,
                    channel: channel(&spec.client_addr())?,
                })
            })
            .collect()
    }
}

fn authed<T>(device: &Device, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", device.bearer.parse()?);
    Ok(request)
}

/// What the workload shares between its tasks.
#[derive(Debug)]
pub struct Shared {
    /// The history.
    pub recorder: Arc<Recorder>,
    /// Every user.
    pub users: Vec<User>,
    /// Client channels, one per node.
    pub nodes: Vec<ClientNode>,
    /// Highest inbox seq any session saw, per user (the drain waits for what the nodes cannot
    /// have trimmed of it).
    pub highest_seq: Mutex<BTreeMap<u64, u64>>,
    /// Highest seq each (user, device) acked.
    pub acked_seq: Mutex<BTreeMap<(u64, u32), u64>>,
}

impl Shared {
    fn saw_seq(&self, user: u64, seq: u64) {
        let mut highest = self
            .highest_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = highest.entry(user).or_insert(0);
        *entry = (*entry).max(seq);
    }

    fn saw_ack(&self, device: &Device, seq: u64) {
        let mut acked = self
            .acked_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = acked.entry((device.user, device.device)).or_insert(0);
        *entry = (*entry).max(seq);
    }

    fn highest(&self, user: u64) -> u64 {
        self.highest_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&user)
            .copied()
            .unwrap_or(0)
    }

    /// How many messages a drain of `user` must return at least: those above the lowest seq
    /// every device acked (the nodes may have trimmed the ones below, `keep-delivered = false`).
    fn drain_expects(&self, user: u64) -> u64 {
        let acked = self
            .acked_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let floor = self
            .users
            .iter()
            .filter(|u| u.id == user)
            .flat_map(|u| &u.devices)
            .map(|d| acked.get(&(d.user, d.device)).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        self.highest(user).saturating_sub(floor)
    }
}
