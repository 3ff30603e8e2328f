//! Deleting an account: the primary device confirms with the account's number; the account
//! leaves every group (a `MemberRemoved` on each group's shard), then one `AccountDeleted` on the
//! user's shard removes its devices, inbox, keys and the number's hash (storage
//! `projection/*`, each projection's `AccountDeleted` arm).

use courier_consensus::types::EventOutcome;
use courier_proto::convert::registration::PhoneNumber;
use courier_proto::pb::client::{DeleteAccountRequest, DeleteAccountResponse};
use courier_proto::pb::events::{self, event::Kind};
use courier_proto::{GroupId, ShardId};
use courier_storage::projection::{devices, groups};

use super::{ClientApi, now_ms};
use crate::client::auth::Caller;
use crate::status::ApiError;

/// `PERMISSION_DENIED`: a companion asked to delete the account.
pub const NOT_PRIMARY: &str = "COURIER:Account:NotPrimary";
/// `INVALID_ARGUMENT`: the confirming number is not the account's.
pub const WRONG_NUMBER: &str = "COURIER:Account:WrongNumber";

fn not_primary() -> ApiError {
    ApiError::PermissionDenied {
        code: NOT_PRIMARY,
        message: "only the account's primary device deletes it".to_owned(),
    }
}

impl ClientApi {
    /// `DeleteAccount`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed number or `WrongNumber`; `PERMISSION_DENIED
    /// NotPrimary` from a companion; `UNAVAILABLE` when a shard has no leader (retry: leaving a
    /// group twice changes nothing).
    pub async fn delete_account(
        &self,
        caller: Caller,
        request: DeleteAccountRequest,
    ) -> Result<DeleteAccountResponse, ApiError> {
        let phone = PhoneNumber::try_from(request.phone_number)?;
        let shard = self.shard_of(caller.user)?;
        let (primary_token, phone_hash) = self.read(shard, |view| {
            let primary_token = devices::devices_of(view, caller.user)?
                .into_iter()
                .find(|(id, d)| *id == caller.device.get() && d.primary && !d.revoked)
                .map(|(_, d)| d.token_hash);
            Ok((primary_token, devices::phone_of(view, caller.user)?))
        })?;
        let Some(token_hash) = primary_token else {
            return Err(not_primary());
        };
        if phone_hash.as_deref() != Some(self.phone_hasher()?.phone_hash(phone.expose()).as_slice())
        {
            return Err(ApiError::Invalid {
                code: WRONG_NUMBER,
                message: "that is not this account's number".to_owned(),
            });
        }
        let groups_left = self.leave_every_group(caller).await?;
        // Applies only if this device is still the active primary with this token at its
        // position (a re-registration of the number may have replaced it meanwhile).
        let deleted = Kind::AccountDeleted(events::AccountDeleted {
            user: caller.user.get(),
            at_ms: now_ms(),
            device: caller.device.get(),
            token_hash,
        });
        if let EventOutcome::Rejected { message, .. } = self.propose_one(shard, deleted).await? {
            let gone = self
                .read(shard, |view| devices::phone_of(view, caller.user))?
                .is_none();
            if !gone {
                tracing::info!(
                    user = caller.user.get(),
                    message,
                    "deletion refused at apply"
                );
                return Err(not_primary());
            }
            // Deleted by a request that raced this one: the account is gone all the same.
            tracing::info!(user = caller.user.get(), "account already deleted");
        }
        tracing::info!(user = caller.user.get(), groups_left, "account deleted");
        Ok(DeleteAccountResponse { groups_left })
    }

    /// Removes the caller from every group this node's replicas show it in; returns how many.
    async fn leave_every_group(&self, caller: Caller) -> Result<u32, ApiError> {
        let mut memberships: Vec<GroupId> = Vec::new();
        for shard in 0..self.shard_count()? {
            memberships.extend(self.read(ShardId::new(shard), |view| {
                groups::groups_of(view, caller.user)
            })?);
        }
        let mut left = 0_u32;
        for group in memberships {
            let removed = Kind::MemberRemoved(events::MemberRemoved {
                group: group.get(),
                user: caller.user.get(),
                by: caller.user.get(),
                at_ms: now_ms(),
            });
            let outcome = self.propose_one(self.group_shard(group)?, removed).await?;
            // Refused: it had already left (a retried deletion, or a removal that raced).
            if !matches!(outcome, EventOutcome::Rejected { .. }) {
                left = left.saturating_add(1);
            }
        }
        Ok(left)
    }
}
