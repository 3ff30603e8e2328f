//! Device authentication. Every client RPC but `RequestCode` and `Register` carries
//! `authorization: Bearer <user>.<device>.<token as 64 hex digits>`. Only the SHA-256 of a token
//! is stored (in the log, via `DeviceRegistered`); it is compared in constant time.

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
}

/// SHA-256 of a device token.
pub fn token_hash(token: &[u8]) -> Vec<u8> {
    Sha256::digest(token).to_vec()
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
    pub fn authenticate(
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
        let shard = self.shard_of(user)?;
        let record = self.read(shard, |view| {
            let devices = courier_storage::projection::devices::devices_of(view, user)?;
            Ok(devices
                .into_iter()
                .find(|(id, _)| *id == device.get())
                .map(|(_, record)| record))
        })?;
        let valid = record
            .is_some_and(|r| !r.revoked && constant_time_eq(&r.token_hash, &token_hash(&token)));
        if !valid {
            return Err(unauthenticated("unknown, revoked or wrong device token"));
        }
        Ok(Caller { user, device })
    }
}
