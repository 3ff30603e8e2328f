//! The key directory: devices publish their end-to-end encryption keys (`UploadKeys`), senders
//! fetch a user's bundle (`GetPreKeyBundle`), a device reads its stock (`GetKeyCount`) and is
//! told on its stream when the stock runs low (`KeysLow`, `stream.rs`).
//!
//! Uploads and fetches are log events on the owner's shard (`KeysUploaded`, `PreKeysClaimed`):
//! the one-time prekey a fetch gets is decided at apply, so no two fetches get the same one,
//! whichever nodes they reached. Validation is the log's own (`projection::decode`), so a
//! request the node accepts is one every replica applies.

use courier_consensus::types::EventOutcome;
use courier_proto::limits::PREKEYS_LOW;
use courier_proto::pb::client::{
    DeviceKeyBundle, GetKeyCountResponse, GetPreKeyBundleRequest, GetPreKeyBundleResponse,
    OneTimePreKey, SignedPreKey, UploadKeysRequest, UploadKeysResponse,
};
use courier_proto::pb::events::{self, PreKey, event::Kind};
use courier_proto::pb::store::KeyBundle;
use courier_proto::{ShardId, UserId};
use courier_storage::projection::{decode, prekeys};
use prost::Message as _;

use super::auth::Caller;
use super::{ClientApi, now_ms};
use crate::status::ApiError;

/// The answer to a fetch of a user with no device that published keys.
pub const NO_KEYS: &str = "COURIER:Keys:NoKeys";

fn unexpected(outcome: Option<&EventOutcome>) -> ApiError {
    ApiError::Internal {
        code: "COURIER:Node:Outcome",
        message: format!("unexpected outcome {outcome:?}"),
    }
}

/// A refusal at apply as the client's status.
fn refused(code: &str, message: String) -> ApiError {
    match code {
        prekeys::STOCK_FULL => ApiError::ResourceExhausted {
            code: prekeys::STOCK_FULL,
            message,
        },
        // The device was revoked between authentication and apply.
        prekeys::UNKNOWN_DEVICE => ApiError::Unauthenticated {
            code: "COURIER:Auth:Revoked",
            message,
        },
        _ => ApiError::Internal {
            code: "COURIER:Node:Outcome",
            message: format!("a key event was refused at apply ({code}): {message}"),
        },
    }
}

impl ClientApi {
    async fn propose_keys(&self, shard: ShardId, kind: Kind) -> Result<EventOutcome, ApiError> {
        match self.propose_one(shard, kind).await? {
            EventOutcome::Rejected { code, message } => Err(refused(&code, message)),
            outcome => Ok(outcome),
        }
    }

    /// `UploadKeys`: the caller's identity key and signed prekey replace its own; the one-time
    /// prekeys join its stock.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a missing or oversized key or too many in one upload;
    /// `RESOURCE_EXHAUSTED COURIER:Keys:StockFull` past `PREKEYS_STOCK_MAX`, and past
    /// `key-uploads-per-hour-per-device`.
    pub async fn upload_keys(
        &self,
        caller: Caller,
        request: UploadKeysRequest,
    ) -> Result<UploadKeysResponse, ApiError> {
        let kind = Kind::KeysUploaded(events::KeysUploaded {
            user: caller.user.get(),
            device: caller.device.get(),
            identity_key: request.identity_key,
            signed_prekey: request.signed_prekey.map(|k| PreKey {
                key_id: k.key_id,
                public_key: k.public_key,
                signature: k.signature,
            }),
            one_time_prekeys: request
                .one_time_prekeys
                .into_iter()
                .map(|k| PreKey {
                    key_id: k.key_id,
                    public_key: k.public_key,
                    signature: Vec::new(),
                })
                .collect(),
            at_ms: now_ms(),
        });
        decode::decode(&kind).map_err(|error| ApiError::Wire(error.source))?;
        // After the decode check: a malformed upload costs no token.
        self.limiters
            .key_upload
            .take(&(caller.user.get(), caller.device.get()))?;
        match self.propose_keys(self.shard_of(caller.user)?, kind).await? {
            EventOutcome::KeyStock(stock) => {
                tracing::info!(
                    user = caller.user.get(),
                    device = caller.device.get(),
                    stock,
                    "keys uploaded"
                );
                Ok(UploadKeysResponse {
                    one_time_prekeys: stock,
                })
            }
            other => Err(unexpected(Some(&other))),
        }
    }

    /// `GetPreKeyBundle`: for each active device of the user with keys, its identity key,
    /// signed prekey and one one-time prekey, taken from its stock through the log.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for user 0; `NOT_FOUND COURIER:Keys:NoKeys` when no device of the
    /// user published keys; `RESOURCE_EXHAUSTED` past `prekey-fetches-per-hour-per-device` or
    /// `prekey-fetches-per-hour-per-pair`.
    pub async fn get_prekey_bundle(
        &self,
        caller: Caller,
        request: GetPreKeyBundleRequest,
    ) -> Result<GetPreKeyBundleResponse, ApiError> {
        let user = UserId::from_wire(request.user, "user")?;
        self.limiters
            .prekey_fetch
            .take(&(caller.user.get(), caller.device.get()))?;
        self.limiters
            .prekey_pair
            .take(&(caller.user.get(), user.get()))?;
        let shard = self.shard_of(user)?;
        // Nothing published here: answered without a log entry (a key uploaded a moment ago on
        // another node may not have reached this replica yet; the client asks again).
        let published = self
            .read(shard, |view| {
                Ok(!prekeys::bundle(view, user)?.devices.is_empty())
            })
            .await?;
        if !published {
            return Err(no_keys(user));
        }
        let claim = Kind::PrekeysClaimed(events::PreKeysClaimed {
            user: user.get(),
            by_user: caller.user.get(),
            at_ms: now_ms(),
        });
        let bytes = match self.propose_keys(shard, claim).await? {
            EventOutcome::Bundle(bytes) => bytes,
            other => return Err(unexpected(Some(&other))),
        };
        let bundle = KeyBundle::decode(bytes.as_slice()).map_err(|error| ApiError::Internal {
            code: "COURIER:Node:Outcome",
            message: format!("a bundle that does not decode: {error}"),
        })?;
        if bundle.devices.is_empty() {
            return Err(no_keys(user));
        }
        let low = bundle
            .devices
            .iter()
            .filter(|d| d.one_time_prekeys_left < PREKEYS_LOW)
            .count();
        tracing::info!(
            user = user.get(),
            by_user = caller.user.get(),
            devices = bundle.devices.len(),
            low,
            "prekey bundle fetched"
        );
        Ok(GetPreKeyBundleResponse {
            devices: bundle
                .devices
                .into_iter()
                .map(|d| DeviceKeyBundle {
                    device_id: d.device,
                    identity_key: d.identity_key,
                    signed_prekey: d.signed_prekey.map(|k| SignedPreKey {
                        key_id: k.key_id,
                        public_key: k.public_key,
                        signature: k.signature,
                    }),
                    one_time_prekey: d.one_time_prekey.map(|k| OneTimePreKey {
                        key_id: k.key_id,
                        public_key: k.public_key,
                    }),
                })
                .collect(),
        })
    }

    /// `GetKeyCount`: the caller's stock of one-time prekeys on this replica.
    ///
    /// # Errors
    /// Storage faults.
    pub async fn get_key_count(&self, caller: Caller) -> Result<GetKeyCountResponse, ApiError> {
        Ok(GetKeyCountResponse {
            one_time_prekeys: self.key_stock(caller).await?.unwrap_or(0),
        })
    }

    /// The caller's stock of one-time prekeys (`None`: it never published keys).
    pub(crate) async fn key_stock(&self, caller: Caller) -> Result<Option<u32>, ApiError> {
        self.read(self.shard_of(caller.user)?, |view| {
            Ok(prekeys::device_keys(view, caller.user, caller.device)?.map(|k| k.one_time_prekeys))
        })
        .await
    }
}

fn no_keys(user: UserId) -> ApiError {
    ApiError::NotFound {
        code: NO_KEYS,
        message: format!("no device of user {user} published keys"),
    }
}
