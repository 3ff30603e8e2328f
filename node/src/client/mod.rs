//! The client (phone) API: registration, authentication, sends, device streams, receipts.
//!
//! Every node serves it. Writes are events decided here (ids, timestamps) and proposed to the
//! owning shard's leader through [`Cluster::propose`]; reads come from this node's replica,
//! which holds every shard (every shard is replicated on every member in this version).

pub mod account;
pub mod auth;
pub mod groups;
pub mod keys;
pub mod live;
pub mod messaging;
pub mod pairing;
pub mod rate;
pub mod registration;
pub mod send;
pub mod stream;

use std::sync::Arc;

use courier_proto::{PhoneHasher, ShardId, UserId, shard_of};
use courier_storage::projection::View;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::Limits;
use crate::status::ApiError;

/// Shared state of the client services.
#[derive(Clone)]
pub struct ClientApi {
    pub(crate) cluster: Cluster,
    pub(crate) limits: Limits,
    pub(crate) sms: Arc<dyn crate::sms::SmsSender>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) live: Arc<live::LiveStreams>,
    /// Typing broadcasts in flight (`limits.typing-broadcasts-max`). Each is a task calling every
    /// other node (up to one RPC timeout each, when a node does not answer); past the limit an
    /// update is dropped, as typing is best effort, instead of tasks piling up behind a dead peer.
    pub(crate) typing_broadcasts: Arc<tokio::sync::Semaphore>,
    /// Companion pairings started on this node.
    pub(crate) pairings: Arc<pairing::PairingStore>,
    /// The token buckets of the node's in-memory rate limits.
    pub(crate) limiters: Arc<rate::Limiters>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// What an ack trims (`retention.keep-delivered`, `retention.companion-history`).
    pub(crate) trimming: Trimming,
    /// Device tokens and recipients checked against this node's replicas.
    pub(crate) device_cache: Arc<auth::DeviceCache>,
}

/// What a device's ack asks the inbox to trim, from the node's `[retention]` config: carried
/// in the `DeliveryAcked` so every replica and rebuild trims the same.
#[derive(Clone, Copy, Debug)]
pub struct Trimming {
    /// `keep-delivered`: bodies stay after every device acked them.
    pub keep_delivered: bool,
    /// `companion-history`: the user's last this many messages keep their bodies.
    pub companion_history: u32,
}

impl std::fmt::Debug for ClientApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientApi").finish_non_exhaustive()
    }
}

impl ClientApi {
    /// The live streams on this node (for the peer `Typing` RPC).
    pub fn live(&self) -> Arc<live::LiveStreams> {
        self.live.clone()
    }

    /// The client services of one node.
    pub fn new(
        cluster: Cluster,
        limits: Limits,
        sms: Arc<dyn crate::sms::SmsSender>,
        shutdown: CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
        trimming: Trimming,
    ) -> Self {
        let device_cache = Arc::new(auth::DeviceCache::new(
            usize::try_from(limits.device_cache_entries).unwrap_or(usize::MAX),
        ));
        let pairings = Arc::new(pairing::PairingStore::new(
            usize::try_from(limits.pairings_max).unwrap_or(usize::MAX),
            limits.pairing_ttl,
        ));
        let limiters = Arc::new(rate::Limiters::new(&limits));
        let typing_broadcasts = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(limits.typing_broadcasts_max).unwrap_or(usize::MAX),
        ));
        Self {
            cluster,
            limits,
            device_cache,
            sms,
            shutdown,
            live: Arc::default(),
            typing_broadcasts,
            pairings,
            limiters,
            metrics,
            trimming,
        }
    }

    /// The cluster's shard count.
    pub(crate) fn shard_count(&self) -> Result<u16, ApiError> {
        self.cluster
            .groups()
            .shard_count()
            .ok_or_else(ApiError::not_initialized)
    }

    /// How the cluster hashes phone numbers (keyed by its secret, `courier_proto::PhoneHasher`).
    pub(crate) fn phone_hasher(&self) -> Result<PhoneHasher, ApiError> {
        self.cluster
            .groups()
            .phone_hasher()
            .ok_or_else(ApiError::not_initialized)
    }

    /// The shard that owns `user`.
    pub(crate) fn shard_of(&self, user: UserId) -> Result<ShardId, ApiError> {
        Ok(shard_of(user, self.shard_count()?))
    }

    /// Proposes one event on `shard` and answers its outcome once applied.
    ///
    /// # Errors
    /// Any proposal failure (`UNAVAILABLE` without a leader); `INTERNAL COURIER:Node:Outcome`
    /// when no outcome came back.
    pub(crate) async fn propose_one(
        &self,
        shard: ShardId,
        kind: courier_proto::pb::events::event::Kind,
    ) -> Result<courier_consensus::types::EventOutcome, ApiError> {
        let event = courier_proto::pb::events::Event { kind: Some(kind) };
        self.cluster
            .propose(shard, vec![event])
            .await?
            .pop()
            .ok_or_else(|| ApiError::Internal {
                code: "COURIER:Node:Outcome",
                message: "a proposal of one event answered no outcome".to_owned(),
            })
    }

    /// Reads `shard`'s state through a projection view: this node's replica when it holds one,
    /// otherwise a replica on another node (`Cluster::read`). `UNAVAILABLE`
    /// `COURIER:Shard:Installing` when a snapshot install was writing the shard's projections
    /// meanwhile (what was read may be half of it).
    pub(crate) async fn read<R>(
        &self,
        shard: ShardId,
        f: impl Fn(&View<'_, '_>) -> courier_storage::Result<R>,
    ) -> Result<R, ApiError> {
        self.cluster.read(shard, f).await
    }

    /// [`ClientApi::read`]s `f` every `poll` until it answers `Some`, for at most `wait`: `None`
    /// when it did not in time (this replica has not shown a change that committed).
    pub(crate) async fn read_until<R>(
        &self,
        shard: ShardId,
        (wait, poll): (std::time::Duration, std::time::Duration),
        f: impl Fn(&View<'_, '_>) -> courier_storage::Result<Option<R>>,
    ) -> Result<Option<R>, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(found) = self.read(shard, &f).await? {
                return Ok(Some(found));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// How long a response waits for this node's replica to show what committed (a group just
/// created, the message an `Ack` or `Read` names) before it answers `UNAVAILABLE`
/// `COURIER:Shard:Lagging`.
pub const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The current time, unix ms: decided here, carried in events (projections never read a clock).
pub(crate) use crate::env::now_ms;
