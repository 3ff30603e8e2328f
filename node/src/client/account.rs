//! Deleting an account, and moving it to a new number.
//!
//! Deleting: the primary device confirms with the account's number; the account leaves every
//! group (a `MemberRemoved` on each group's shard) and forgets its group sends there (a
//! `SendsForgotten`), then one `AccountDeleted` on the user's shard removes its devices, inbox,
//! keys and the number's hash (storage `projection/*`, each projection's `AccountDeleted` arm).
//!
//! Changing number: the user id is the new number's (`PhoneHasher::user_of_phone`), so the
//! account moves. The primary device registers the new number with a code sent to it (as
//! `Register` does), the new user takes the old one's place in every group (a `MemberAdded` with
//! `replaces`, admin flag kept), then `AccountDeleted` with `moved_to` closes the old account: what
//! the asking device had not acked, and every delivery that reaches the old inbox later, is
//! re-queued to the new user through the outbox (storage `outbox::requeue`). Every step can be
//! asked again: a retry with a fresh code re-registers the new number and carries on.

use std::net::IpAddr;

use courier_consensus::types::EventOutcome;
use courier_proto::convert::registration::PhoneNumber;
use courier_proto::pb::client::{
    ChangeNumberRequest, ChangeNumberResponse, DeleteAccountRequest, DeleteAccountResponse,
    RegisterRequest,
};
use courier_proto::pb::events::{self, event::Kind};
use courier_proto::{GroupId, ShardId, UserId};
use courier_storage::projection::{dedup, devices, groups};

use super::{ClientApi, now_ms};
use crate::client::auth::Caller;
use crate::status::ApiError;

/// Sends named by one `SendsForgotten` when an account closes (as retention's batches).
pub const SENDS_FORGOTTEN_PER_PROPOSAL: usize = 256;

/// `PERMISSION_DENIED`: a companion asked to delete the account or change its number.
pub const NOT_PRIMARY: &str = "COURIER:Account:NotPrimary";
/// `INVALID_ARGUMENT`: the confirming number is not the account's.
pub const WRONG_NUMBER: &str = "COURIER:Account:WrongNumber";
/// `INVALID_ARGUMENT`: a change of number to the account's own number.
pub const SAME_NUMBER: &str = "COURIER:Account:SameNumber";

fn not_primary() -> ApiError {
    ApiError::PermissionDenied {
        code: NOT_PRIMARY,
        message: "only the account's primary device deletes it or changes its number".to_owned(),
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
        let (token_hash, phone_hash) = self.primary_token(caller, shard).await?;
        if phone_hash.as_deref() != Some(self.phone_hasher()?.phone_hash(phone.expose()).as_slice())
        {
            return Err(ApiError::Invalid {
                code: WRONG_NUMBER,
                message: "that is not this account's number".to_owned(),
            });
        }
        let groups_left = self.leave_every_group(caller).await?;
        self.forget_sends_elsewhere(caller.user).await?;
        self.close_account(caller, token_hash, None).await?;
        tracing::info!(user = caller.user.get(), groups_left, "account deleted");
        Ok(DeleteAccountResponse { groups_left })
    }

    /// `ChangeNumber`.
    ///
    /// # Errors
    /// As `Register` for the new number and its code (`UNAUTHENTICATED` for a wrong code, …);
    /// `INVALID_ARGUMENT SameNumber`; `PERMISSION_DENIED NotPrimary` from a companion;
    /// `UNAVAILABLE` when a shard has no leader (ask again with a fresh code: each step is
    /// idempotent, and once the old account is gone its credentials fail and the new number
    /// registers as usual, with what moved).
    pub async fn change_number(
        &self,
        caller: Caller,
        request: ChangeNumberRequest,
        address: Option<IpAddr>,
    ) -> Result<ChangeNumberResponse, ApiError> {
        let new_phone = PhoneNumber::try_from(request.new_phone_number.clone())?;
        let shard = self.shard_of(caller.user)?;
        let (token_hash, _) = self.primary_token(caller, shard).await?;
        let new_user = self.phone_hasher()?.user_of_phone(new_phone.expose());
        if new_user == caller.user {
            return Err(ApiError::Invalid {
                code: SAME_NUMBER,
                message: "that is already this account's number".to_owned(),
            });
        }
        let registered = self
            .register(
                RegisterRequest {
                    phone_number: request.new_phone_number,
                    code: request.code,
                    device_name: request.device_name,
                },
                address,
            )
            .await?;
        let groups_moved = self.move_every_group(caller, new_user).await?;
        self.forget_sends_elsewhere(caller.user).await?;
        self.close_account(caller, token_hash, Some(new_user))
            .await?;
        tracing::info!(
            user = caller.user.get(),
            moved_to = new_user.get(),
            groups_moved,
            "number changed"
        );
        Ok(ChangeNumberResponse {
            registered: Some(registered),
            groups_moved,
        })
    }

    /// The token hash of `caller` if it is the user's active primary device (with the token it
    /// authenticated with: not a device of a new registration of the number), and the user's
    /// number hash.
    async fn primary_token(
        &self,
        caller: Caller,
        shard: ShardId,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), ApiError> {
        let (primary_token, phone_hash) = self
            .read(shard, |view| {
                let primary_token = devices::devices_of(view, caller.user)?
                    .into_iter()
                    .find(|(id, d)| *id == caller.device.get() && d.primary && caller.holds(d))
                    .map(|(_, d)| d.token_hash);
                Ok((primary_token, devices::phone_of(view, caller.user)?))
            })
            .await?;
        Ok((primary_token.ok_or_else(not_primary)?, phone_hash))
    }

    /// Proposes the `AccountDeleted` that closes `caller`'s account (moved to `moved_to` for a
    /// change of number). It applies only if this device is still the active primary with this
    /// token at its position (a re-registration of the number may have replaced it meanwhile).
    async fn close_account(
        &self,
        caller: Caller,
        token_hash: Vec<u8>,
        moved_to: Option<UserId>,
    ) -> Result<(), ApiError> {
        let shard = self.shard_of(caller.user)?;
        let moved_to_shard = match moved_to {
            Some(user) => u32::from(self.shard_of(user)?.get()),
            None => 0,
        };
        let deleted = Kind::AccountDeleted(events::AccountDeleted {
            user: caller.user.get(),
            at_ms: now_ms(),
            device: caller.device.get(),
            token_hash,
            moved_to: moved_to.map_or(0, UserId::get),
            moved_to_shard,
        });
        if let EventOutcome::Rejected { message, .. } = self.propose_one(shard, deleted).await? {
            let gone = self
                .read(shard, |view| devices::phone_of(view, caller.user))
                .await?
                .is_none();
            if !gone {
                tracing::info!(
                    user = caller.user.get(),
                    message,
                    "deletion refused at apply"
                );
                return Err(not_primary());
            }
            // Closed by a request that raced this one: the account is gone all the same.
            tracing::info!(user = caller.user.get(), "account already deleted");
        }
        Ok(())
    }

    /// Forgets `user`'s sends recorded on every shard but its own (its group sends, deduplicated
    /// on their groups' shards; the records on its own shard leave with `AccountDeleted`). A later
    /// registration of the number counts its devices from 1 again, and a client id it reused
    /// within the dedup window would otherwise be answered an old send's result (`duplicate`),
    /// its message never stored. Run after the account left its groups (no new group send can
    /// be recorded then) and before it closes (a failure here leaves it open to ask again).
    /// Each batch is read on this node's replica, which waits to show the batch gone before the
    /// next is read.
    ///
    /// # Errors
    /// `UNAVAILABLE` when a shard has no leader, or this node's replica did not show a batch
    /// gone within `READ_WAIT` (`COURIER:Shard:Lagging`; ask again).
    async fn forget_sends_elsewhere(&self, user: UserId) -> Result<(), ApiError> {
        let own = self.shard_of(user)?;
        let sends_of = |view: &courier_storage::projection::View<'_, '_>| {
            dedup::sends_of(view, user, SENDS_FORGOTTEN_PER_PROPOSAL)
        };
        for shard in (0..self.shard_count()?).map(ShardId::new) {
            if shard == own {
                continue;
            }
            let mut sends = self.read(shard, sends_of).await?;
            while !sends.is_empty() {
                let forget = Kind::SendsForgotten(events::SendsForgotten {
                    sends: sends.clone(),
                    at_ms: now_ms(),
                });
                self.propose_one(shard, forget).await?;
                let gone = |view: &courier_storage::projection::View<'_, '_>| {
                    let next = sends_of(view)?;
                    Ok((!next.iter().any(|send| sends.contains(send))).then_some(next))
                };
                let poll = std::time::Duration::from_millis(10);
                sends = self
                    .read_until(shard, (crate::cluster::READ_WAIT, poll), gone)
                    .await?
                    .ok_or_else(|| {
                        ApiError::lagging(format!("{shard} still shows sends it forgot"))
                    })?;
            }
        }
        Ok(())
    }

    /// The groups this node's replicas show `user` in.
    async fn groups_of_user(&self, user: UserId) -> Result<Vec<GroupId>, ApiError> {
        let mut memberships: Vec<GroupId> = Vec::new();
        for shard in 0..self.shard_count()? {
            memberships.extend(
                self.read(ShardId::new(shard), |view| groups::groups_of(view, user))
                    .await?,
            );
        }
        Ok(memberships)
    }

    /// Puts `new_user` in the caller's place in every group this node's replicas show it in (a
    /// group the new number is already in just loses the old one); returns how many it took.
    async fn move_every_group(&self, caller: Caller, new_user: UserId) -> Result<u32, ApiError> {
        let new_shard = u32::from(self.shard_of(new_user)?.get());
        let mut moved = 0_u32;
        for group in self.groups_of_user(caller.user).await? {
            let replaced = Kind::MemberAdded(events::MemberAdded {
                group: group.get(),
                user: new_user.get(),
                by: caller.user.get(),
                admin: false, // the replaced member's flag is kept at apply
                at_ms: now_ms(),
                user_shard: new_shard,
                replaces: caller.user.get(),
            });
            let group_shard = self.group_shard(group)?;
            if matches!(
                self.propose_one(group_shard, replaced).await?,
                EventOutcome::Rejected { .. }
            ) {
                // Moved by an earlier try, or the new number is a member already: the old one
                // leaves (refused in turn if it had).
                self.quit_group(caller, group).await?;
            } else {
                moved = moved.saturating_add(1);
            }
        }
        Ok(moved)
    }

    /// Removes the caller from every group this node's replicas show it in; returns how many.
    async fn leave_every_group(&self, caller: Caller) -> Result<u32, ApiError> {
        let mut left = 0_u32;
        for group in self.groups_of_user(caller.user).await? {
            if self.quit_group(caller, group).await? {
                left = left.saturating_add(1);
            }
        }
        Ok(left)
    }

    /// Proposes the caller's leaving `group`; false if it was not a member (a retried request,
    /// or a removal that raced).
    async fn quit_group(&self, caller: Caller, group: GroupId) -> Result<bool, ApiError> {
        let removed = Kind::MemberRemoved(events::MemberRemoved {
            group: group.get(),
            user: caller.user.get(),
            by: caller.user.get(),
            at_ms: now_ms(),
        });
        let outcome = self.propose_one(self.group_shard(group)?, removed).await?;
        Ok(!matches!(outcome, EventOutcome::Rejected { .. }))
    }
}
