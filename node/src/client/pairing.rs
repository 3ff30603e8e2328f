//! Linking a companion device: a pairing the user's primary device approves.
//!
//! ```text
//!   companion  StartPairing(name)      → pairing id (its secret) + code (shown, e.g. as a QR)
//!   primary    ApprovePairing(code)    → the companion is registered (DeviceRegistered)
//!   companion  FinishPairing(id)       → its credential, once; NotApproved until the approval
//! ```
//!
//! Nothing about the user reaches the companion before the primary approves, and only a primary
//! device approves: a token of a companion cannot link further devices, and a token read off
//! one device links nothing by itself. Pairings live in the memory of the node that started
//! them for `limits.pairing-ttl` (default [`PAIRING_TTL`]), at most `limits.pairings-max` of them
//! (default [`PAIRINGS_MAX`]); both devices talk to that node (as for registration codes).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use courier_proto::convert::registration::device_name;
use courier_proto::pb::client::{
    ApprovePairingRequest, ApprovePairingResponse, FinishPairingRequest, RegisterResponse,
    StartPairingRequest, StartPairingResponse,
};
use tokio::time::Instant;

use super::ClientApi;
use crate::client::auth::Caller;
use crate::status::ApiError;

/// How long a pairing waits for its approval and then for the companion to finish, by default
/// (`limits.pairing-ttl`).
pub const PAIRING_TTL: Duration = Duration::from_secs(120);
/// Pairings outstanding per node at most, by default (`limits.pairings-max`).
pub const PAIRINGS_MAX: usize = 10_000;
/// Characters of a pairing code, from an alphabet of 32 letters and digits a person cannot
/// confuse: 32^8 = 2^40 codes.
pub const PAIRING_CODE_CHARS: usize = 8;
/// Letters and digits a person cannot confuse (no 0/O, 1/I).
const CODE_ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// No `Debug`: it holds the pairing code and, once approved, the companion's device token.
struct Pairing {
    code: String,
    expires: Instant,
    /// The credential, once a primary approved.
    approved: Option<RegisterResponse>,
    /// An approval is registering the companion now: a second approval of the same code is
    /// refused instead of registering a second device (whose credential nobody would collect).
    approving: bool,
}

/// Outstanding pairings by pairing id.
pub struct PairingStore {
    pairings: Mutex<BTreeMap<Vec<u8>, Pairing>>,
    /// Pairings outstanding at most.
    max: usize,
    /// How long a pairing lives.
    ttl: Duration,
}

impl Default for PairingStore {
    fn default() -> Self {
        Self::new(PAIRINGS_MAX, PAIRING_TTL)
    }
}

impl std::fmt::Debug for PairingStore {
    /// How many pairings are outstanding, never their codes or credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: formatting never waits for (or deadlocks on) a caller holding the lock.
        let mut shown = f.debug_struct("PairingStore");
        if let Ok(pairings) = self.pairings.try_lock() {
            shown.field("outstanding", &pairings.len());
        }
        shown.finish_non_exhaustive()
    }
}

fn unknown() -> ApiError {
    ApiError::NotFound {
        code: "COURIER:Pairing:Unknown",
        message: "no such pairing on this node, or it expired".to_owned(),
    }
}

impl PairingStore {
    /// A store of at most `max` pairings, each living `ttl`.
    pub fn new(max: usize, ttl: Duration) -> Self {
        Self {
            pairings: Mutex::default(),
            max,
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Pairing>> {
        let mut pairings = self
            .pairings
            .lock()
            .expect("pairing store lock is never poisoned");
        let now = Instant::now();
        pairings.retain(|_, pairing| pairing.expires > now);
        pairings
    }

    fn start(&self) -> Result<(Vec<u8>, String), ApiError> {
        let mut pairings = self.lock();
        if pairings.len() >= self.max {
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Pairing:TooMany",
                message: format!(
                    "{} pairings are outstanding on this node; retry later",
                    self.max
                ),
            });
        }
        let id: [u8; 16] = crate::env::random_bytes();
        let code: String = crate::env::random_bytes::<PAIRING_CODE_CHARS>()
            .iter()
            .map(|byte| char::from(CODE_ALPHABET[usize::from(byte % 32)]))
            .collect();
        pairings.insert(
            id.to_vec(),
            Pairing {
                code: code.clone(),
                expires: Instant::now() + self.ttl,
                approved: None,
                approving: false,
            },
        );
        Ok((id.to_vec(), code))
    }

    /// Claims the pending pairing showing `code` for one approval: its id. Until it is
    /// [approved](Self::approve) or [released](Self::release), the code is not pending.
    fn claim(&self, code: &str) -> Result<Vec<u8>, ApiError> {
        let mut pairings = self.lock();
        let (id, pairing) = pairings
            .iter_mut()
            .find(|(_, pairing)| {
                pairing.approved.is_none() && !pairing.approving && pairing.code == code
            })
            .ok_or_else(unknown)?;
        pairing.approving = true;
        Ok(id.clone())
    }

    /// An approval refused before it proposed anything: the code is pending again.
    fn release(&self, id: &[u8]) {
        if let Some(pairing) = self.lock().get_mut(id) {
            pairing.approving = false;
        }
    }

    fn approve(&self, id: &[u8], credential: RegisterResponse) {
        if let Some(pairing) = self.lock().get_mut(id) {
            pairing.approved = Some(credential);
            pairing.approving = false;
        }
    }

    fn finish(&self, id: &[u8]) -> Result<RegisterResponse, ApiError> {
        let mut pairings = self.lock();
        let pairing = pairings.get(id).ok_or_else(unknown)?;
        if pairing.approved.is_none() {
            return Err(ApiError::FailedPrecondition {
                code: "COURIER:Pairing:NotApproved",
                message: "the primary device has not approved this pairing yet".to_owned(),
            });
        }
        pairings
            .remove(id)
            .and_then(|pairing| pairing.approved)
            .ok_or_else(unknown)
    }
}

impl ClientApi {
    /// `StartPairing`: a companion asks to be linked; nothing is registered yet.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad device name; `RESOURCE_EXHAUSTED` at `limits.pairings-max`, and
    /// `COURIER:Limits:RateLimited` past `limits.pairings-per-hour-per-address`.
    pub fn start_pairing(
        &self,
        request: StartPairingRequest,
        address: Option<std::net::IpAddr>,
    ) -> Result<StartPairingResponse, ApiError> {
        device_name(request.device_name)?;
        // Per address: a pairing needs no login, so one client could otherwise hold every slot.
        if let Some(address) = address {
            self.limiters.pairing.take(&address)?;
        }
        let (pairing_id, code) = self.pairings.start()?;
        Ok(StartPairingResponse {
            pairing_id,
            code,
            expires_in_s: u32::try_from(self.pairings.ttl.as_secs()).unwrap_or(u32::MAX),
        })
    }

    /// `ApprovePairing`: the caller's primary device approves the pairing showing `code`; the
    /// companion is registered now (within the companion limit).
    ///
    /// # Errors
    /// `PERMISSION_DENIED` `COURIER:Pairing:NotPrimary` from a companion device; `NOT_FOUND`
    /// for an unknown or expired code; `RESOURCE_EXHAUSTED` past the companion limit.
    pub async fn approve_pairing(
        &self,
        caller: Caller,
        request: ApprovePairingRequest,
    ) -> Result<ApprovePairingResponse, ApiError> {
        let primary = self
            .devices(caller.user)
            .await?
            .iter()
            .any(|device| device.device_id == caller.device.get() && device.primary);
        if !primary {
            return Err(ApiError::PermissionDenied {
                code: "COURIER:Pairing:NotPrimary",
                message: "only the primary device approves a pairing".to_owned(),
            });
        }
        let id = self.pairings.claim(&request.code)?;
        let credential = match self.link_companion(caller).await {
            Ok(credential) => credential,
            // Refused before anything was proposed (the companion limit, a full proposal queue):
            // the code is pending again. After any other error the registration may have
            // committed, so the claim stays until the pairing expires: an approval retried with
            // the same code must not register a second companion. A caller that goes away
            // mid-call leaves it claimed too.
            Err(error @ ApiError::ResourceExhausted { .. }) => {
                self.pairings.release(&id);
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let device_id = credential.device_id;
        tracing::info!(
            user = caller.user.get(),
            device = device_id,
            "pairing approved: companion registered"
        );
        self.pairings.approve(&id, credential);
        Ok(ApprovePairingResponse { device_id })
    }

    /// `FinishPairing`: the companion collects its credential, once.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `COURIER:Pairing:NotApproved` before the approval (ask again);
    /// `NOT_FOUND` for an unknown, expired or already finished pairing.
    pub fn finish_pairing(
        &self,
        request: &FinishPairingRequest,
    ) -> Result<RegisterResponse, ApiError> {
        self.pairings.finish(&request.pairing_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pairing finishes once, only after its approval; codes are 8 characters of the alphabet.
    #[test]
    fn a_pairing_finishes_once_after_approval() {
        let store = PairingStore::default();
        let (id, code) = store.start().expect("start");
        assert_eq!(code.len(), PAIRING_CODE_CHARS);
        assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)), "{code}");
        assert!(matches!(
            store.finish(&id),
            Err(ApiError::FailedPrecondition { .. })
        ));
        assert_eq!(store.claim(&code).expect("pending"), id);
        store.approve(
            &id,
            RegisterResponse {
                user_id: 1,
                device_id: 2,
                device_token: vec![3],
            },
        );
        assert!(
            store.claim(&code).is_err(),
            "an approved code is not pending"
        );
        assert_eq!(store.finish(&id).expect("finished").device_id, 2);
        assert!(matches!(store.finish(&id), Err(ApiError::NotFound { .. })));
        assert!(matches!(
            store.claim("AAAAAAAA"),
            Err(ApiError::NotFound { .. })
        ));
    }

    /// The store's Debug tells how many pairings are outstanding, never a code or credential.
    #[test]
    fn the_store_debug_shows_no_code() {
        let store = PairingStore::default();
        let (_, code) = store.start().expect("start");
        let shown = format!("{store:?}");
        assert!(!shown.contains(&code), "{shown}");
        assert!(shown.contains("outstanding: 1"), "{shown}");
    }

    /// Two approvals of one code at once register one companion: the second finds the code
    /// claimed; an approval refused before it proposed hands the code back.
    #[test]
    fn a_code_is_claimed_by_one_approval_at_a_time() {
        let store = PairingStore::default();
        let (id, code) = store.start().expect("start");
        assert_eq!(store.claim(&code).expect("first approval"), id);
        assert!(
            matches!(store.claim(&code), Err(ApiError::NotFound { .. })),
            "a second approval of a claimed code is refused"
        );
        store.release(&id);
        assert_eq!(
            store
                .claim(&code)
                .expect("pending again after a failed approval"),
            id
        );
    }
}
