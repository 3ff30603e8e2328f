//! Registration: one-time codes by SMS, registering a primary device, linking companions,
//! listing and revoking devices.
//!
//! Codes live in memory on the node that issued them (10 minutes, 5 attempts, bounded), so a
//! phone registers against the node it asked for the code; a node restart forgets them (the user
//! asks again). Phone numbers never reach logs or errors: the log holds a 128-bit hash.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use courier_proto::convert::registration::{PhoneNumber, RegisterCommand};
use courier_proto::pb::client::{
    DeviceInfo, ListDevicesResponse, RegisterRequest, RegisterResponse, RequestCodeRequest,
    RequestCodeResponse, RevokeDeviceRequest,
};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::{DeviceId, UserId, limits};

use super::{ClientApi, auth, now_ms};
use crate::client::auth::Caller;
use crate::status::ApiError;
use courier_consensus::types::EventOutcome;

/// How long a code is valid.
pub const CODE_TTL: Duration = Duration::from_secs(600);
/// Wrong codes allowed before the code is void.
pub const CODE_ATTEMPTS_MAX: u32 = 5;
/// How long a registration answer waits for this node's replica to show the new device.
pub const REGISTERED_VISIBLE_WAIT: Duration = Duration::from_secs(2);
/// Codes outstanding per node at most.
pub const CODES_MAX: usize = 100_000;

#[derive(Debug)]
struct Code {
    code: String,
    expires: Instant,
    attempts_left: u32,
}

/// Outstanding codes by phone hash.
#[derive(Debug, Default)]
pub struct CodeStore {
    codes: Mutex<BTreeMap<Vec<u8>, Code>>,
}

impl CodeStore {
    fn issue(&self, phone: &[u8]) -> Result<String, ApiError> {
        let mut codes = self
            .codes
            .lock()
            .expect("code store lock is never poisoned");
        let now = Instant::now();
        codes.retain(|_, c| c.expires > now);
        if codes.len() >= CODES_MAX && !codes.contains_key(phone) {
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Registration:TooManyCodes",
                message: format!("{CODES_MAX} codes are outstanding on this node; retry later"),
            });
        }
        let code: String = (0..limits::REGISTRATION_CODE_DIGITS)
            .map(|_| {
                let digit = u8::try_from(crate::env::random_range(0..=9)).unwrap_or(0);
                char::from(b'0' + digit)
            })
            .collect();
        codes.insert(
            phone.to_vec(),
            Code {
                code: code.clone(),
                expires: now + CODE_TTL,
                attempts_left: CODE_ATTEMPTS_MAX,
            },
        );
        Ok(code)
    }

    /// Forgets the code of `phone` (its SMS could not be sent: no usable code stays behind).
    fn withdraw(&self, phone: &[u8]) {
        self.codes
            .lock()
            .expect("code store lock is never poisoned")
            .remove(phone);
    }

    fn check(&self, phone: &[u8], code: &str) -> Result<(), ApiError> {
        let mut codes = self
            .codes
            .lock()
            .expect("code store lock is never poisoned");
        let bad = |message: &str| ApiError::Unauthenticated {
            code: "COURIER:Registration:BadCode",
            message: message.to_owned(),
        };
        let Some(entry) = codes.get_mut(phone) else {
            return Err(bad(
                "no code was requested for this number on this node, or it expired",
            ));
        };
        if entry.expires <= Instant::now() {
            codes.remove(phone);
            return Err(bad("the code expired; request a new one"));
        }
        if !auth::constant_time_eq(entry.code.as_bytes(), code.as_bytes()) {
            entry.attempts_left = entry.attempts_left.saturating_sub(1);
            if entry.attempts_left == 0 {
                codes.remove(phone);
                return Err(bad("wrong code; no attempts left, request a new one"));
            }
            return Err(bad("wrong code"));
        }
        codes.remove(phone);
        Ok(())
    }
}

impl ClientApi {
    /// `RequestCode`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed number; `RESOURCE_EXHAUSTED` when too many codes wait
    /// or the number asked too often (`code-requests-per-hour-per-phone`).
    pub async fn request_code(
        &self,
        request: RequestCodeRequest,
    ) -> Result<RequestCodeResponse, ApiError> {
        let phone = PhoneNumber::try_from(request.phone_number)?;
        let hash = self.phone_hasher()?.phone_hash(phone.expose()).to_vec();
        self.code_limiter.take(&hash)?;
        let code = self.codes.issue(&hash)?;
        self.sms
            .send(&phone, &code)
            .await
            .inspect_err(|_| self.codes.withdraw(&hash))
            .map_err(|error| ApiError::Unavailable {
                code: "COURIER:Registration:SmsFailed",
                message: format!("the SMS sender failed: {error}"),
                retry_after_ms: 1000,
                leader: None,
            })?;
        tracing::info!(phone_hash = %auth::hex(&hash[..4]), "registration code issued");
        Ok(RequestCodeResponse {
            expires_in_s: u32::try_from(CODE_TTL.as_secs()).unwrap_or(u32::MAX),
        })
    }

    /// Registers a device of `user` (a primary with the number's hash `phone`, or a companion),
    /// revoking `revoke` in the same log entry.
    async fn register_device(
        &self,
        user: UserId,
        phone: Option<Vec<u8>>,
        primary: bool,
        revoke: &[u32],
    ) -> Result<RegisterResponse, ApiError> {
        let token: [u8; limits::DEVICE_TOKEN_BYTES] = crate::env::random_bytes();
        let mut events = Vec::new();
        for device in revoke {
            events.push(Event {
                kind: Some(Kind::DeviceRevoked(events::DeviceRevoked {
                    user: user.get(),
                    device: *device,
                    at_ms: now_ms(),
                })),
            });
        }
        if let Some(phone_hash) = phone {
            events.push(Event {
                kind: Some(Kind::UserRegistered(events::UserRegistered {
                    user: user.get(),
                    phone_hash,
                    at_ms: now_ms(),
                })),
            });
        }
        events.push(Event {
            kind: Some(Kind::DeviceRegistered(events::DeviceRegistered {
                user: user.get(),
                device: 0, // assigned at apply
                token_hash: auth::token_hash(&token),
                primary,
                at_ms: now_ms(),
            })),
        });
        let outcomes = self.cluster.propose(self.shard_of(user)?, events).await?;
        match outcomes.last() {
            Some(EventOutcome::DeviceRegistered { device, .. }) => {
                tracing::info!(user = user.get(), device, primary, "device registered");
                self.wait_device_visible(user, *device).await;
                Ok(RegisterResponse {
                    user_id: user.get(),
                    device_id: *device,
                    device_token: token.to_vec(),
                })
            }
            other => Err(ApiError::Internal {
                code: "COURIER:Node:Outcome",
                message: format!("unexpected outcome {other:?}"),
            }),
        }
    }

    /// Waits (bounded) until this node's replica shows `device`, so the token just handed out
    /// works on this node at once (the commit happened on the leader, which may be elsewhere).
    async fn wait_device_visible(&self, user: UserId, device: u32) {
        let deadline = Instant::now() + REGISTERED_VISIBLE_WAIT;
        while Instant::now() < deadline {
            let visible = self
                .devices(user)
                .map(|devices| devices.iter().any(|d| d.device_id == device))
                .unwrap_or(false);
            if visible {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `Register`: a new primary device for the number; the previous primary is revoked (by the
    /// devices projection) and so is every companion linked to it (revocations proposed in the
    /// same entry), so that a new owner of a number inherits no one's linked devices. A companion
    /// linked while this registration is in flight is not in that list: the primary that linked
    /// it can revoke it.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for malformed input, `UNAUTHENTICATED` for a wrong or expired code,
    /// `RESOURCE_EXHAUSTED` past `register-attempts-per-hour-per-phone`.
    pub async fn register(&self, request: RegisterRequest) -> Result<RegisterResponse, ApiError> {
        let command = RegisterCommand::try_from(request)?;
        let hasher = self.phone_hasher()?;
        let phone = hasher.phone_hash(command.phone.expose()).to_vec();
        self.register_limiter.take(&phone)?;
        self.codes.check(&phone, &command.code)?;
        let user = hasher.user_of_phone(command.phone.expose());
        let companions: Vec<u32> = self
            .devices(user)?
            .iter()
            .filter(|device| !device.primary && !device.revoked)
            .map(|device| device.device_id)
            .collect();
        self.register_device(user, Some(phone), true, &companions)
            .await
    }

    /// Registers a companion device of `caller`'s user (a pairing the primary approved,
    /// `pairing.rs`).
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` past the companion limit.
    pub(crate) async fn link_companion(
        &self,
        caller: Caller,
    ) -> Result<RegisterResponse, ApiError> {
        let companions = self
            .devices(caller.user)?
            .iter()
            .filter(|d| !d.primary && !d.revoked)
            .count();
        let max = usize::try_from(self.limits.companion_devices_max).unwrap_or(usize::MAX);
        if companions >= max {
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Registration:TooManyCompanions",
                message: format!("a user links at most {max} companion devices"),
            });
        }
        self.register_device(caller.user, None, false, &[]).await
    }

    pub(crate) fn devices(&self, user: UserId) -> Result<Vec<DeviceInfo>, ApiError> {
        let shard = self.shard_of(user)?;
        self.read(shard, |view| {
            courier_storage::projection::devices::devices_of(view, user)
        })
        .map(|devices| {
            devices
                .into_iter()
                .map(|(id, r)| DeviceInfo {
                    device_id: id,
                    primary: r.primary,
                    revoked: r.revoked,
                    registered_at_ms: r.registered_at_ms,
                })
                .collect()
        })
    }

    /// `ListDevices`.
    ///
    /// # Errors
    /// Storage faults.
    pub fn list_devices(&self, caller: Caller) -> Result<ListDevicesResponse, ApiError> {
        Ok(ListDevicesResponse {
            devices: self.devices(caller.user)?,
        })
    }

    /// `RevokeDevice`: one of the caller's own devices.
    ///
    /// # Errors
    /// `NOT_FOUND` for a device the caller does not have.
    pub async fn revoke_device(
        &self,
        caller: Caller,
        request: RevokeDeviceRequest,
    ) -> Result<(), ApiError> {
        let device = DeviceId::try_from(request)?;
        if !self
            .devices(caller.user)?
            .iter()
            .any(|d| d.device_id == device.get())
        {
            return Err(ApiError::NotFound {
                code: "COURIER:Registration:UnknownDevice",
                message: format!("{device} is not one of your devices"),
            });
        }
        let event = Event {
            kind: Some(Kind::DeviceRevoked(events::DeviceRevoked {
                user: caller.user.get(),
                device: device.get(),
                at_ms: now_ms(),
            })),
        };
        self.cluster
            .propose(self.shard_of(caller.user)?, vec![event])
            .await?;
        Ok(())
    }
}
