//! Groups: create (the creator is admin), add and remove members (admins), leave, list, and
//! send. A group lives on `shard_of_group(group)`; every change is an event there, checked at
//! apply against the state at that log position (so a race between two admins resolves the same
//! way on every replica). A group message is stored once on the group's shard, stamped with the
//! membership epoch it was accepted under, and reaches each member's inbox as a pointer.

use courier_consensus::types::EventOutcome;
use courier_proto::convert::messaging::{
    CreateGroupCommand, GroupSendCommand, GroupsPage, MembershipCommand,
};
use courier_proto::pb::client::{
    CreateGroupRequest, GroupInfo, GroupMember, LeaveGroupRequest, ListGroupsRequest,
    ListGroupsResponse, SendResponse, SendToGroupRequest,
};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::{ConversationId, GroupId, ShardId, UserId, shard_of_group};
use courier_storage::projection::{devices, groups};

use super::send::Proposed;
use super::{CATCH_UP_WAIT, ClientApi, auth::Caller, now_ms};
use crate::status::ApiError;

/// Attempts of a group send whose membership changed between reading the epoch and applying.
pub const EPOCH_RETRIES_MAX: u32 = 5;
/// Pause before re-reading the epoch.
const EPOCH_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(30);

/// Maps a refusal at apply to the API.
fn refused(code: &str, message: String) -> ApiError {
    match code {
        "COURIER:Group:NotFound" => ApiError::NotFound {
            code: "COURIER:Group:NotFound",
            message,
        },
        "COURIER:Group:NotAdmin" => ApiError::PermissionDenied {
            code: "COURIER:Group:NotAdmin",
            message,
        },
        "COURIER:Group:NotMember" => ApiError::PermissionDenied {
            code: "COURIER:Group:NotMember",
            message,
        },
        "COURIER:Group:AlreadyMember" => ApiError::FailedPrecondition {
            code: "COURIER:Group:AlreadyMember",
            message,
        },
        "COURIER:Group:Full" => ApiError::ResourceExhausted {
            code: "COURIER:Group:Full",
            message,
        },
        "COURIER:Group:Exists" => ApiError::FailedPrecondition {
            code: "COURIER:Group:Exists",
            message,
        },
        "COURIER:Group:EpochChanged" => ApiError::Unavailable {
            code: "COURIER:Group:EpochChanged",
            message,
            retry_after_ms: 50,
            leader: None,
        },
        other => ApiError::Internal {
            code: "COURIER:Node:Outcome",
            message: format!("unknown refusal {other}: {message}"),
        },
    }
}

/// The first refusal among `outcomes`, as an error.
fn first_refusal(outcomes: &[EventOutcome]) -> Result<(), ApiError> {
    match outcomes.iter().find_map(|o| match o {
        EventOutcome::Rejected { code, message } => Some((code, message)),
        _ => None,
    }) {
        Some((code, message)) => Err(ApiError::group_refusal(code, message.clone())),
        None => Ok(()),
    }
}

impl ClientApi {
    pub(super) fn group_shard(&self, group: GroupId) -> Result<ShardId, ApiError> {
        Ok(shard_of_group(group, self.shard_count()?))
    }

    /// A token of `limits.group-changes-per-hour-per-device`, taken once a change is valid and
    /// before it is proposed: every group change is a log entry on the group's shard, refused
    /// ones (`NotAdmin`, `AlreadyMember`) included.
    fn take_group_change(&self, caller: Caller) -> Result<(), ApiError> {
        self.limiters
            .group_change
            .take(&(caller.user.get(), caller.device.get()))?;
        Ok(())
    }

    /// `NOT_FOUND` `UnknownRecipient` when `user` never registered. Each such answer costs the
    /// caller a token of `limits.unknown-recipients-per-hour-per-device`, as a send to an unknown
    /// user does, so putting users in groups is no faster oracle of who is registered.
    async fn require_registered(&self, caller: Caller, user: UserId) -> Result<(), ApiError> {
        let shard = self.shard_of(user)?;
        if self
            .read(shard, |view| devices::devices_registered(view, user))
            .await?
            == 0
        {
            self.limiters
                .unknown_recipient
                .take(&(caller.user.get(), caller.device.get()))?;
            return Err(ApiError::NotFound {
                code: "COURIER:Messaging:UnknownRecipient",
                message: format!("{user} is not registered"),
            });
        }
        Ok(())
    }

    /// The group as this replica sees it, once it reached at least `min_epoch` (or the wait
    /// ended).
    async fn group_info(&self, group: GroupId, min_epoch: u64) -> Result<GroupInfo, ApiError> {
        let shard = self.group_shard(group)?;
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        loop {
            let info = self
                .read(shard, |view| {
                    let Some(record) = groups::record(view, group)? else {
                        return Ok(None);
                    };
                    let members = groups::members(view, group)?
                        .into_iter()
                        .map(|(user, m)| GroupMember {
                            user_id: user.get(),
                            admin: m.admin,
                        })
                        .collect();
                    Ok(Some(GroupInfo {
                        group_id: group.get(),
                        name: record.name,
                        epoch: record.epoch,
                        members,
                    }))
                })
                .await?;
            match info {
                Some(info) if info.epoch >= min_epoch => return Ok(info),
                None if min_epoch == 0 => {
                    return Err(ApiError::NotFound {
                        code: "COURIER:Group:NotFound",
                        message: format!("no group {}", group.get()),
                    });
                }
                other if tokio::time::Instant::now() >= deadline => {
                    return other.ok_or_else(|| {
                        ApiError::lagging(format!("group {} is not here yet", group.get()))
                    });
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    /// `CreateGroup`: the caller is its admin; `members` join at once.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` (name, member list), `RESOURCE_EXHAUSTED` past `group-members-max`,
    /// `NOT_FOUND` for an unregistered member, `UNAVAILABLE` without a leader.
    pub async fn create_group(
        &self,
        caller: Caller,
        request: CreateGroupRequest,
    ) -> Result<GroupInfo, ApiError> {
        let command = CreateGroupCommand::try_from(request)?;
        let members: Vec<UserId> = command
            .members
            .into_iter()
            .filter(|m| *m != caller.user)
            .collect();
        let max = usize::try_from(self.limits.group_members_max).unwrap_or(usize::MAX);
        if members.len().saturating_add(1) > max {
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Group:Full",
                message: format!("a group has at most {max} members"),
            });
        }
        for member in &members {
            self.require_registered(caller, *member).await?;
        }
        self.take_group_change(caller)?;
        let group = GroupId::new(crate::env::random_range(1..=u64::MAX)).expect("nonzero");
        let shard = self.group_shard(group)?;
        let at_ms = now_ms();
        let mut batch = vec![Event {
            kind: Some(Kind::GroupCreated(events::GroupCreated {
                group: group.get(),
                creator: caller.user.get(),
                name: command.name,
                at_ms,
                creator_shard: u32::from(self.shard_of(caller.user)?.get()),
            })),
        }];
        for member in &members {
            batch.push(Event {
                kind: Some(Kind::MemberAdded(events::MemberAdded {
                    group: group.get(),
                    user: member.get(),
                    by: caller.user.get(),
                    admin: false,
                    at_ms,
                    user_shard: u32::from(self.shard_of(*member)?.get()),
                    replaces: 0,
                })),
            });
        }
        let outcomes = self.cluster.propose(shard, batch).await?;
        first_refusal(&outcomes)?;
        tracing::info!(
            group = group.get(),
            members = members.len() + 1,
            "group created"
        );
        let epoch = 1 + u64::try_from(members.len()).unwrap_or(u64::MAX);
        self.group_info(group, epoch).await
    }

    async fn change_membership(
        &self,
        caller: Caller,
        group: GroupId,
        event: Kind,
    ) -> Result<GroupInfo, ApiError> {
        let before = self.group_info(group, 0).await?.epoch;
        self.take_group_change(caller)?;
        let outcomes = self
            .cluster
            .propose(self.group_shard(group)?, vec![Event { kind: Some(event) }])
            .await?;
        first_refusal(&outcomes)?;
        self.group_info(group, before.saturating_add(1)).await
    }

    /// `AddMember` (admins only).
    ///
    /// # Errors
    /// `NOT_FOUND` (group, user), `PERMISSION_DENIED` (not an admin), `FAILED_PRECONDITION`
    /// (already a member), `RESOURCE_EXHAUSTED` (full).
    pub async fn add_member(
        &self,
        caller: Caller,
        command: MembershipCommand,
    ) -> Result<GroupInfo, ApiError> {
        // The group first: an unknown group answers the same whoever the user is.
        let current = self.group_info(command.group, 0).await?;
        self.require_registered(caller, command.user).await?;
        let max = usize::try_from(self.limits.group_members_max).unwrap_or(usize::MAX);
        if current.members.len() >= max {
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Group:Full",
                message: format!("a group has at most {max} members"),
            });
        }
        self.change_membership(
            caller,
            command.group,
            Kind::MemberAdded(events::MemberAdded {
                group: command.group.get(),
                user: command.user.get(),
                by: caller.user.get(),
                admin: false,
                at_ms: now_ms(),
                user_shard: u32::from(self.shard_of(command.user)?.get()),
                replaces: 0,
            }),
        )
        .await
    }

    /// `RemoveMember` (admins only; anyone may remove themselves).
    ///
    /// # Errors
    /// `NOT_FOUND`, `PERMISSION_DENIED` (not an admin, or the user is not a member).
    pub async fn remove_member(
        &self,
        caller: Caller,
        command: MembershipCommand,
    ) -> Result<GroupInfo, ApiError> {
        self.change_membership(
            caller,
            command.group,
            Kind::MemberRemoved(events::MemberRemoved {
                group: command.group.get(),
                user: command.user.get(),
                by: caller.user.get(),
                at_ms: now_ms(),
            }),
        )
        .await
    }

    /// `LeaveGroup`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` (zero id), `NOT_FOUND`, `PERMISSION_DENIED` (not a member).
    pub async fn leave_group(
        &self,
        caller: Caller,
        request: LeaveGroupRequest,
    ) -> Result<(), ApiError> {
        let group = GroupId::from_wire(request.group_id, "group_id")?;
        self.remove_member(
            caller,
            MembershipCommand {
                group,
                user: caller.user,
            },
        )
        .await
        .map(|_| ())
    }

    /// `ListGroups`: one page of the caller's groups by id, as the replicas read see them.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a page limit above 200; storage faults.
    pub async fn list_groups(
        &self,
        caller: Caller,
        request: ListGroupsRequest,
    ) -> Result<ListGroupsResponse, ApiError> {
        let page = GroupsPage::try_from(request)?;
        // Each shard holds the memberships of its own groups: the page is the smallest ids of
        // every shard's next `limit + 1`, the one past the page telling whether more follow.
        let mut ids = Vec::new();
        for shard in 0..self.shard_count()? {
            ids.extend(
                self.read(ShardId::new(shard), |view| {
                    groups::groups_of_after(
                        view,
                        caller.user,
                        page.after,
                        page.limit.saturating_add(1),
                    )
                })
                .await?,
            );
        }
        ids.sort_unstable();
        let more = ids.len() > page.limit;
        ids.truncate(page.limit);
        let mut list = Vec::with_capacity(ids.len());
        for group in ids {
            list.push(self.group_info(group, 0).await?);
        }
        Ok(ListGroupsResponse { groups: list, more })
    }

    /// `SendToGroup`: stored once on the group's shard under the current membership epoch.
    ///
    /// # Errors
    /// As `Send`, plus `NOT_FOUND` (group) and `PERMISSION_DENIED` (not a member).
    pub async fn send_to_group(
        &self,
        caller: Caller,
        request: SendToGroupRequest,
    ) -> Result<SendResponse, ApiError> {
        let command = GroupSendCommand::try_from(request)?;
        let content = self.admit_send(caller, command.content)?;
        let shard = self.group_shard(command.group)?;
        let message_id = crate::env::uuid_v7().as_bytes().to_vec();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let epoch = self.group_info(command.group, 0).await?.epoch;
            let sent = events::MessageSent {
                message_id: message_id.clone(),
                sender_user: caller.user.get(),
                sender_device: caller.device.get(),
                client_msg_id: command.client_msg_id.as_str().to_owned(),
                to: Some(ConversationId::Group(command.group).into()),
                content: Some(content.clone()),
                sent_at_ms: now_ms(),
                recipient_shard: u32::from(shard.get()),
                group_epoch: epoch,
                trace_parent: crate::telemetry::current_traceparent(),
                own_copies: true,
            };
            match self.propose_send(shard, sent).await? {
                Proposed::Sent(response) => return Ok(response),
                Proposed::Rejected { code, .. }
                    if code == "COURIER:Group:EpochChanged" && attempt < EPOCH_RETRIES_MAX =>
                {
                    // This replica read an older epoch than the leader applied: read again.
                    tokio::time::sleep(EPOCH_RETRY_PAUSE).await;
                }
                Proposed::Rejected { code, message } => return Err(refused(&code, message)),
            }
        }
    }
}
