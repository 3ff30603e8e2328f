//! Device authentication. Every client RPC but `RequestCode` and `Register` carries
//! `authorization: Bearer <user>.<device>.<token as 64 hex digits>`. Only the SHA-256 of a token
//! is stored (in the log, via `DeviceRegistered`); it is compared in constant time.
//!
//! A successful check is remembered ([`DeviceCache`]) with the node's devices epoch
//! (`ApplyWatch::devices_epoch`), which moves whenever this node applies a change to any device
//! record: a remembered check is used only while the epoch has not moved, so a revocation takes
//! effect on a node as soon as that node applied it, exactly as without the cache. A node that
//! holds no replica of the user's shard applies none of its changes: it keeps nothing and asks a
//! replica every time.

use std::collections::HashMap;
use std::sync::Mutex;

use courier_proto::{DeviceId, UserId};
use sha2::{Digest as _, Sha256};

use super::ClientApi;
use crate::status::ApiError;

/// An authenticated device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The SHA-256 of the token it authenticated with: a device record with the same ids but
    /// another token (the number deleted and registered again, whose device ids start over) is
    /// not this device.
    pub token_hash: [u8; 32],
}

impl Caller {
    /// Whether `record` is this caller's device and still active: not revoked, and holding the
    /// token the caller authenticated with.
    pub fn holds(&self, record: &courier_proto::pb::store::DeviceRecord) -> bool {
        !record.revoked && constant_time_eq(&record.token_hash, &self.token_hash)
    }
}

/// SHA-256 of a device token.
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

pub use courier_proto::hex;

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The bearer credential for a device, as clients send it.
pub fn bearer(user: u64, device: u32, token: &[u8]) -> String {
    format!("Bearer {user}.{device}.{}", hex(token))
}

/// A token's hash found valid, and the devices epoch read before the check.
type KnownToken = ([u8; 32], u64);

/// Device tokens (as their hashes) and recipients found valid on this node's replicas, each with
/// the devices epoch read before the check. Bounded: when full it starts over.
#[derive(Debug)]
pub struct DeviceCache {
    max: usize,
    tokens: Mutex<HashMap<(UserId, DeviceId), KnownToken>>,
    recipients: Mutex<HashMap<UserId, u64>>,
}

impl DeviceCache {
    /// A cache of at most `max` devices and `max` recipients (`limits.device-cache-entries`).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            tokens: Mutex::default(),
            recipients: Mutex::default(),
        }
    }

    /// Whether `hash` was found to be `user`'s `device`'s token at `epoch`.
    fn token_known(&self, user: UserId, device: DeviceId, hash: &[u8], epoch: u64) -> bool {
        self.tokens
            .lock()
            .expect("device cache lock is never poisoned")
            .get(&(user, device))
            .is_some_and(|(known, at)| *at == epoch && constant_time_eq(known, hash))
    }

    fn remember_token(&self, user: UserId, device: DeviceId, hash: [u8; 32], epoch: u64) {
        insert_bounded(&self.tokens, self.max, (user, device), (hash, epoch));
    }

    /// Whether `user` was found registered at `epoch`.
    pub(crate) fn recipient_known(&self, user: UserId, epoch: u64) -> bool {
        self.recipients
            .lock()
            .expect("device cache lock is never poisoned")
            .get(&user)
            .is_some_and(|at| *at == epoch)
    }

    /// Remembers that `user` was found registered at `epoch`.
    pub(crate) fn remember_recipient(&self, user: UserId, epoch: u64) {
        insert_bounded(&self.recipients, self.max, user, epoch);
    }
}

/// Inserts into a map of at most `max` entries, which starts over when full.
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    map: &Mutex<HashMap<K, V>>,
    max: usize,
    key: K,
    value: V,
) {
    let mut map = map.lock().expect("device cache lock is never poisoned");
    if map.len() >= max {
        map.clear();
    }
    map.insert(key, value);
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::Unauthenticated {
        code: "COURIER:Auth:Unauthenticated",
        message: message.to_owned(),
    }
}

impl ClientApi {
    /// Authenticates the device presenting `metadata`'s bearer token.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for a missing or malformed token, an unknown device, a revoked device
    /// or a wrong token (one message for all, so probing learns nothing).
    pub async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, ApiError> {
        let value = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                unauthenticated("missing authorization: Bearer <user>.<device>.<token>")
            })?;
        let credential = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthenticated("malformed credential"))?;
        let mut parts = credential.splitn(3, '.');
        let (Some(user), Some(device), Some(token)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(unauthenticated("malformed credential"));
        };
        let user = user
            .parse()
            .ok()
            .and_then(UserId::new)
            .ok_or_else(|| unauthenticated("malformed credential"))?;
        let device = device
            .parse()
            .ok()
            .and_then(DeviceId::new)
            .ok_or_else(|| unauthenticated("malformed credential"))?;
        let token = unhex(token)
            .filter(|t| t.len() == courier_proto::limits::DEVICE_TOKEN_BYTES)
            .ok_or_else(|| unauthenticated("malformed credential"))?;
        let hash = token_hash(&token);
        let caller = Caller {
            user,
            device,
            token_hash: hash,
        };
        // Read before the replica, so a device change applied after it voids what we remember.
        let epoch = self.cluster.groups().watch().devices_epoch();
        let shard = self.shard_of(user)?;
        // The epoch moves only with what this node applies: a revocation applied on the replicas
        // of a shard held elsewhere would never void a remembered token here, so none is kept.
        let cacheable = self.cluster.holds(shard);
        if cacheable && self.device_cache.token_known(user, device, &hash, epoch) {
            return Ok(caller);
        }
        let record = self
            .read(shard, |view| {
                let devices = courier_storage::projection::devices::devices_of(view, user)?;
                Ok(devices
                    .into_iter()
                    .find(|(id, _)| *id == device.get())
                    .map(|(_, record)| record))
            })
            .await?;
        let valid = record.is_some_and(|r| caller.holds(&r));
        if !valid {
            return Err(unauthenticated("unknown, revoked or wrong device token"));
        }
        if cacheable {
            self.device_cache.remember_token(user, device, hash, epoch);
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(user: u64, device: u32) -> (UserId, DeviceId) {
        (
            UserId::new(user).expect("nonzero"),
            DeviceId::new(device).expect("nonzero"),
        )
    }

    #[test]
    fn a_remembered_token_holds_only_at_its_epoch_and_for_its_hash() {
        let cache = DeviceCache::new(16);
        let (user, device) = ids(1, 1);
        let hash = token_hash(b"right");
        cache.remember_token(user, device, hash, 7);
        assert!(cache.token_known(user, device, &hash, 7));
        assert!(
            !cache.token_known(user, device, &token_hash(b"wrong"), 7),
            "another token is never taken for the remembered one"
        );
        assert!(
            !cache.token_known(user, device, &hash, 8),
            "a device change applied since (a revocation) voids it"
        );
        let (_, other_device) = ids(1, 2);
        assert!(!cache.token_known(user, other_device, &hash, 7));
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let cache = DeviceCache::new(2);
        for raw in 1..=5 {
            let (user, device) = ids(raw, 1);
            cache.remember_token(user, device, token_hash(b"t"), 0);
            cache.remember_recipient(user, 0);
        }
        assert!(cache.tokens.lock().expect("lock").len() <= 2);
        assert!(cache.recipients.lock().expect("lock").len() <= 2);
        let (last, _) = ids(5, 1);
        assert!(cache.recipient_known(last, 0));
        assert!(!cache.recipient_known(last, 1));
    }
}
