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

/// Typing updates a device may broadcast per second; more are dropped (they are ephemeral).
pub const TYPING_PER_SECOND: u32 = 5;
/// Typing burst per device.
pub const TYPING_BURST: u32 = 10;
/// Typing updates being handed to the other nodes at once, node-wide. Each is a task calling
/// every other node (up to one RPC timeout each, when a node does not answer); past this many an
/// update is dropped, as typing is best effort, instead of tasks piling up behind a dead peer.
pub const TYPING_BROADCASTS_MAX: usize = 1024;

/// Shared state of the client services.
#[derive(Clone)]
pub struct ClientApi {
    pub(crate) cluster: Cluster,
    pub(crate) limits: Limits,
    pub(crate) sms: Arc<dyn crate::sms::SmsSender>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) send_limiter: Arc<rate::SendLimiter>,
    pub(crate) live: Arc<live::LiveStreams>,
    pub(crate) typing_limiter: Arc<rate::SendLimiter>,
    /// Typing broadcasts in flight ([`TYPING_BROADCASTS_MAX`]).
    pub(crate) typing_broadcasts: Arc<tokio::sync::Semaphore>,
    /// Companion pairings started on this node.
    pub(crate) pairings: Arc<pairing::PairingStore>,
    /// Presence lookups per device.
    pub(crate) presence_limiter: Arc<rate::SendLimiter>,
    /// "Unknown recipient" answers per device.
    pub(crate) unknown_recipient_limiter: Arc<rate::SendLimiter>,
    /// Prekey bundle fetches per device (each takes a one-time prekey from every device of the
    /// user fetched: unbounded fetches would drain stocks).
    pub(crate) prekey_fetch_limiter: Arc<rate::SendLimiter>,
    /// Fetches of one user's bundle by one other user (fetcher, fetched).
    pub(crate) prekey_pair_limiter: Arc<rate::RateLimiter<(u64, u64)>>,
    /// Key uploads per device (each is a log entry of up to ~170 KB).
    pub(crate) key_upload_limiter: Arc<rate::SendLimiter>,
    /// Code requests per client address (the per-number limits are in the log).
    pub(crate) code_limiter: Arc<rate::AddressLimiter>,
    /// Register attempts per client address.
    pub(crate) register_limiter: Arc<rate::AddressLimiter>,
    /// Group changes per device (each is a log entry on the group's shard).
    pub(crate) group_change_limiter: Arc<rate::SendLimiter>,
    /// `StartPairing` calls per client address (a pairing needs no login and holds a slot of
    /// the node's [`pairing::PAIRINGS_MAX`]).
    pub(crate) pairing_limiter: Arc<rate::AddressLimiter>,
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
        let send_limiter = Arc::new(rate::SendLimiter::new(
            limits.sends_per_second_per_device,
            limits.send_burst_per_device,
            "sends from this device",
        ));
        let code_limiter = Arc::new(
            rate::AddressLimiter::per_hour(
                limits.code_requests_per_hour_per_address,
                limits.code_request_burst_per_address,
                "code requests from this address",
            )
            .refusing_with(registration::TOO_MANY_CODES),
        );
        let register_limiter = Arc::new(rate::AddressLimiter::per_hour(
            limits.register_attempts_per_hour_per_address,
            limits.register_attempt_burst_per_address,
            "register attempts from this address",
        ));
        let presence_limiter = Arc::new(rate::SendLimiter::new(
            limits.presence_lookups_per_second_per_device,
            limits.presence_lookup_burst_per_device,
            "presence lookups from this device",
        ));
        let unknown_recipient_limiter = Arc::new(rate::SendLimiter::per_hour(
            limits.unknown_recipients_per_hour_per_device,
            limits.unknown_recipient_burst_per_device,
            "sends to unknown users from this device",
        ));
        let prekey_fetch_limiter = Arc::new(rate::SendLimiter::per_hour(
            limits.prekey_fetches_per_hour_per_device,
            limits.prekey_fetch_burst_per_device,
            "prekey bundle fetches from this device",
        ));
        let prekey_pair_limiter = Arc::new(rate::RateLimiter::per_hour(
            limits.prekey_fetches_per_hour_per_pair,
            limits.prekey_fetch_burst_per_pair,
            "fetches of this user's prekeys",
        ));
        let key_upload_limiter = Arc::new(rate::SendLimiter::per_hour(
            limits.key_uploads_per_hour_per_device,
            limits.key_upload_burst_per_device,
            "key uploads from this device",
        ));
        let group_change_limiter = Arc::new(rate::SendLimiter::per_hour(
            limits.group_changes_per_hour_per_device,
            limits.group_change_burst_per_device,
            "group changes from this device",
        ));
        let pairing_limiter = Arc::new(rate::AddressLimiter::per_hour(
            limits.pairings_per_hour_per_address,
            limits.pairing_burst_per_address,
            "pairings started from this address",
        ));
        let device_cache = Arc::new(auth::DeviceCache::new(
            usize::try_from(limits.device_cache_entries).unwrap_or(usize::MAX),
        ));
        Self {
            cluster,
            limits,
            device_cache,
            sms,
            shutdown,
            send_limiter,
            live: Arc::default(),
            typing_limiter: Arc::new(rate::SendLimiter::new(
                TYPING_PER_SECOND,
                TYPING_BURST,
                "typing updates from this device",
            )),
            typing_broadcasts: Arc::new(tokio::sync::Semaphore::new(TYPING_BROADCASTS_MAX)),
            presence_limiter,
            unknown_recipient_limiter,
            prekey_fetch_limiter,
            prekey_pair_limiter,
            key_upload_limiter,
            pairings: Arc::default(),
            code_limiter,
            register_limiter,
            group_change_limiter,
            pairing_limiter,
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
}

/// The current time, unix ms: decided here, carried in events (projections never read a clock).
pub(crate) use crate::env::now_ms;
