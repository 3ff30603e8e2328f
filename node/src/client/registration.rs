//! Registration: one-time codes by SMS, registering a primary device, linking companions,
//! listing and revoking devices.
//!
//! Codes live in the log on the number's shard (`CodeIssued`, 10 minutes, 5 attempts; only the
//! code's keyed hash is logged), so a phone asks any node for a code and registers on any node,
//! and a code survives restarts. The per-number limits are token buckets in the same record, so
//! they hold cluster-wide; the per-address limits are in each node's memory. Phone numbers never
//! reach logs or errors: the log holds a 128-bit hash.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use courier_proto::convert::registration::{PhoneNumber, RegisterCommand};
use courier_proto::pb::client::{
    DeviceInfo, ListDevicesResponse, RegisterRequest, RegisterResponse, RequestCodeRequest,
    RequestCodeResponse, RevokeDeviceRequest,
};
use courier_proto::pb::events::{self, Event, RateLimit, event::Kind};
use courier_proto::{DeviceId, PhoneHasher, ShardId, UserId, limits};

use super::rate::RATE_LIMITED;
use super::{ClientApi, auth, now_ms};
use crate::client::auth::Caller;
use crate::status::ApiError;
use courier_consensus::types::{CodeResult, EventOutcome};
use courier_storage::projection::devices;

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn sms_failed(why: &str) -> ApiError {
    ApiError::Unavailable {
        code: "COURIER:Registration:SmsFailed",
        message: format!("the SMS sender failed: {why}"),
        retry_after_ms: 1000,
        leader: None,
    }
}

/// The answer to a registration from its code attempt's outcome (`Ok` when the code was used).
fn code_verdict(outcome: Option<&EventOutcome>) -> Result<(), ApiError> {
    let result = match outcome {
        Some(EventOutcome::Code(result)) => *result,
        other => {
            return Err(ApiError::Internal {
                code: "COURIER:Node:Outcome",
                message: format!("unexpected outcome {other:?}"),
            });
        }
    };
    match result {
        CodeResult::Accepted => Ok(()),
        CodeResult::Wrong { attempts_left: 0 } => {
            Err(bad_code("wrong code; no attempts left, request a new one"))
        }
        CodeResult::Wrong { .. } => Err(bad_code("wrong code")),
        CodeResult::NoCode => Err(bad_code(
            "no live code for this number: none was requested, or it expired, was used or ran \
             out of attempts",
        )),
        CodeResult::RateLimited { retry_after_ms } => Err(ApiError::RateLimited {
            code: RATE_LIMITED,
            message: "too many register attempts for this number; retry later".to_owned(),
            retry_after_ms,
        }),
        other => Err(unexpected_code(other)),
    }
}

fn unexpected_code(result: CodeResult) -> ApiError {
    ApiError::Internal {
        code: "COURIER:Node:Outcome",
        message: format!("unexpected code outcome {result:?}"),
    }
}

/// How long a code is valid.
pub const CODE_TTL: Duration = Duration::from_secs(600);
/// Wrong codes allowed before the code is void.
pub const CODE_ATTEMPTS_MAX: u32 = 5;
/// How long a registration answer waits for this node's replica to show the new device.
pub const REGISTERED_VISIBLE_WAIT: Duration = Duration::from_secs(2);

/// The stable code of a refused code request (per number, cluster-wide; or per client address
/// on this node).
pub const TOO_MANY_CODES: &str = "COURIER:Registration:TooManyCodes";
/// The stable code of a wrong, expired or absent code.
pub const BAD_CODE: &str = "COURIER:Registration:BadCode";

fn bad_code(message: &str) -> ApiError {
    ApiError::Unauthenticated {
        code: BAD_CODE,
        message: message.to_owned(),
    }
}

/// A fresh code of `limits::REGISTRATION_CODE_DIGITS` decimal digits.
fn new_code() -> String {
    (0..limits::REGISTRATION_CODE_DIGITS)
        .map(|_| {
            let digit = u8::try_from(crate::env::random_range(0..=9)).unwrap_or(0);
            char::from(b'0' + digit)
        })
        .collect()
}

impl ClientApi {
    /// Proposes one registration-code event on `shard` and returns what apply decided.
    async fn propose_code(&self, shard: ShardId, kind: Kind) -> Result<CodeResult, ApiError> {
        match self.propose_one(shard, kind).await? {
            EventOutcome::Code(result) => Ok(result),
            other => Err(ApiError::Internal {
                code: "COURIER:Node:Outcome",
                message: format!("unexpected outcome {other:?}"),
            }),
        }
    }

    /// `RequestCode`: any node takes it. The code's hash, expiry and attempts go into the log on
    /// the number's shard (taking a token from the number's cluster-wide bucket), then the SMS
    /// goes out; when it cannot, the code is withdrawn so that none is left usable.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed number; `RESOURCE_EXHAUSTED TooManyCodes` when the
    /// number (`code-requests-per-hour-per-phone`, cluster-wide) or the client address
    /// (`code-requests-per-hour-per-address`, this node) asked too often; `UNAVAILABLE
    /// SmsFailed` when the SMS could not be sent.
    pub async fn request_code(
        &self,
        request: RequestCodeRequest,
        address: Option<IpAddr>,
    ) -> Result<RequestCodeResponse, ApiError> {
        let phone = PhoneNumber::try_from(request.phone_number)?;
        if !self.sms.configured() {
            // Refused before anything is recorded: no code, no token of the number's bucket.
            return Err(sms_failed(crate::sms::NO_SMS_SENDER));
        }
        if let Some(address) = address {
            self.limiters.code.take(&address)?;
        }
        let hasher = self.phone_hasher()?;
        let phone_hash = hasher.phone_hash(phone.expose());
        let shard = self.shard_of(hasher.user_of_phone(phone.expose()))?;
        let code = new_code();
        let code_hash = hasher.code_hash(&phone_hash, &code).to_vec();
        let now = now_ms();
        let issued = events::CodeIssued {
            phone_hash: phone_hash.to_vec(),
            code_hash: code_hash.clone(),
            expires_at_ms: now.saturating_add(duration_ms(CODE_TTL)),
            attempts: CODE_ATTEMPTS_MAX,
            limit: Some(RateLimit {
                per_hour: self.limits.code_requests_per_hour_per_phone,
                burst: self.limits.code_request_burst_per_phone,
            }),
            at_ms: now,
        };
        match self.propose_code(shard, Kind::CodeIssued(issued)).await? {
            CodeResult::Issued => {}
            CodeResult::RateLimited { retry_after_ms } => {
                return Err(ApiError::RateLimited {
                    code: TOO_MANY_CODES,
                    message: "too many code requests for this number; retry later".to_owned(),
                    retry_after_ms,
                });
            }
            other => return Err(unexpected_code(other)),
        }
        if let Err(error) = self.sms.send(&phone, &code).await {
            let withdrawn = events::CodeWithdrawn {
                phone_hash: phone_hash.to_vec(),
                code_hash,
                at_ms: now_ms(),
            };
            // Best effort: a code whose withdrawal fails was still never handed to anyone here,
            // and it expires with `CODE_TTL`.
            if let Err(withdraw_error) = self
                .propose_code(shard, Kind::CodeWithdrawn(withdrawn))
                .await
            {
                tracing::warn!(
                    phone_hash = %auth::hex(&phone_hash[..4]),
                    error = %withdraw_error,
                    "a code whose SMS failed could not be withdrawn; it expires unused"
                );
            }
            return Err(sms_failed(&error.to_string()));
        }
        tracing::info!(phone_hash = %auth::hex(&phone_hash[..4]), "registration code issued");
        Ok(RequestCodeResponse {
            expires_in_s: u32::try_from(CODE_TTL.as_secs()).unwrap_or(u32::MAX),
        })
    }

    /// The attempt of `code` for the number, proposed in the registration's own entry: the right,
    /// live code is used up there (once, whichever node asks), and the entry's registration
    /// events apply only if it was; a wrong one costs one of the code's attempts.
    fn code_attempt(&self, hasher: PhoneHasher, phone_hash: &[u8; 16], code: &str) -> Event {
        Event {
            kind: Some(Kind::CodeAttempted(events::CodeAttempted {
                phone_hash: phone_hash.to_vec(),
                code_hash: hasher.code_hash(phone_hash, code).to_vec(),
                limit: Some(RateLimit {
                    per_hour: self.limits.register_attempts_per_hour_per_phone,
                    burst: self.limits.register_attempt_burst_per_phone,
                }),
                at_ms: now_ms(),
            })),
        }
    }

    /// Registers a device of `user` (a primary with the number's hash `phone`, or a companion
    /// that the primary `approver` approved), revoking `revoke` in the same log entry. With
    /// `attempt` (a primary registering with a code), the code attempt leads the entry and every
    /// other event of it depends on the code being used up there, so a wrong code changes
    /// nothing but the attempt count, and a right one is never used without the registration.
    ///
    /// From event format 3 on, a primary's registration revokes every device of the user at
    /// apply (`revokes_companions`), and a companion's applies only while `approver` is still
    /// the user's active primary (`approver_token_hash`): neither can race the other.
    async fn register_device(
        &self,
        user: UserId,
        (phone, approver): (Option<Vec<u8>>, Option<Caller>),
        primary: bool,
        revoke: &[u32],
        attempt: Option<Event>,
    ) -> Result<RegisterResponse, ApiError> {
        let token: [u8; limits::DEVICE_TOKEN_BYTES] = crate::env::random_bytes();
        let redeemed = if attempt.is_some() {
            phone.clone().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut events: Vec<Event> = attempt.into_iter().collect();
        for device in revoke {
            events.push(Event {
                kind: Some(Kind::DeviceRevoked(events::DeviceRevoked {
                    user: user.get(),
                    device: *device,
                    at_ms: now_ms(),
                    redeemed_phone_hash: redeemed.clone(),
                })),
            });
        }
        if let Some(phone_hash) = phone {
            events.push(Event {
                kind: Some(Kind::UserRegistered(events::UserRegistered {
                    user: user.get(),
                    phone_hash,
                    at_ms: now_ms(),
                    redeemed_phone_hash: redeemed.clone(),
                })),
            });
        }
        events.push(Event {
            kind: Some(Kind::DeviceRegistered(events::DeviceRegistered {
                user: user.get(),
                device: 0, // assigned at apply
                token_hash: auth::token_hash(&token).to_vec(),
                primary,
                at_ms: now_ms(),
                redeemed_phone_hash: redeemed.clone(),
                companions_max: if primary {
                    0
                } else {
                    self.limits.companion_devices_max
                },
                approver_token_hash: approver
                    .map(|approver| approver.token_hash.to_vec())
                    .unwrap_or_default(),
                revokes_companions: primary,
            })),
        });
        let outcomes = self.cluster.propose(self.shard_of(user)?, events).await?;
        if !redeemed.is_empty() {
            code_verdict(outcomes.first())?;
        }
        match outcomes.last() {
            // Another approval linked a companion between this one's check and its commit.
            Some(EventOutcome::Rejected { code, message })
                if *code == devices::TOO_MANY_COMPANIONS =>
            {
                Err(ApiError::ResourceExhausted {
                    code: devices::TOO_MANY_COMPANIONS,
                    message: message.clone(),
                })
            }
            // A new registration of the number replaced the approving primary before the
            // companion committed: the companion is not linked.
            Some(EventOutcome::Rejected { code, message })
                if *code == devices::APPROVER_REVOKED =>
            {
                Err(ApiError::Unauthenticated {
                    code: "COURIER:Auth:Revoked",
                    message: message.clone(),
                })
            }
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
                .await
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
    /// linked while this registration is in flight is not in that list; from event format 3 on
    /// the registration revokes it at apply all the same (`revokes_companions`), and an approval
    /// by the replaced primary that commits after it is refused (`approver_token_hash`).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for malformed input, `UNAUTHENTICATED` for a wrong or expired code,
    /// `RESOURCE_EXHAUSTED` past `register-attempts-per-hour-per-phone`.
    pub async fn register(
        &self,
        request: RegisterRequest,
        address: Option<IpAddr>,
    ) -> Result<RegisterResponse, ApiError> {
        let command = RegisterCommand::try_from(request)?;
        if let Some(address) = address {
            self.limiters.register.take(&address)?;
        }
        let hasher = self.phone_hasher()?;
        let phone_hash = hasher.phone_hash(command.phone.expose());
        let user = hasher.user_of_phone(command.phone.expose());
        let attempt = self.code_attempt(hasher, &phone_hash, &command.code);
        let phone = phone_hash.to_vec();
        let companions: Vec<u32> = self
            .devices(user)
            .await?
            .iter()
            .filter(|device| !device.primary && !device.revoked)
            .map(|device| device.device_id)
            .collect();
        self.register_device(user, (Some(phone), None), true, &companions, Some(attempt))
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
            .devices(caller.user)
            .await?
            .iter()
            .filter(|d| !d.primary && !d.revoked)
            .count();
        let max = usize::try_from(self.limits.companion_devices_max).unwrap_or(usize::MAX);
        if companions >= max {
            return Err(ApiError::ResourceExhausted {
                code: devices::TOO_MANY_COMPANIONS,
                message: format!("a user links at most {max} companion devices"),
            });
        }
        self.register_device(caller.user, (None, Some(caller)), false, &[], None)
            .await
    }

    pub(crate) async fn devices(&self, user: UserId) -> Result<Vec<DeviceInfo>, ApiError> {
        let shard = self.shard_of(user)?;
        self.read(shard, |view| devices::devices_of(view, user))
            .await
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
    pub async fn list_devices(&self, caller: Caller) -> Result<ListDevicesResponse, ApiError> {
        Ok(ListDevicesResponse {
            devices: self.devices(caller.user).await?,
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
        let devices = self.devices(caller.user).await?;
        let Some(found) = devices.iter().find(|d| d.device_id == device.get()) else {
            return Err(ApiError::NotFound {
                code: "COURIER:Registration:UnknownDevice",
                message: format!("{device} is not one of your devices"),
            });
        };
        if found.revoked {
            // Revoked already: done, and nothing to log (a repeated call writes no entry).
            return Ok(());
        }
        let revoked = Kind::DeviceRevoked(events::DeviceRevoked {
            user: caller.user.get(),
            device: device.get(),
            at_ms: now_ms(),
            redeemed_phone_hash: Vec::new(),
        });
        self.propose_one(self.shard_of(caller.user)?, revoked)
            .await?;
        Ok(())
    }
}
