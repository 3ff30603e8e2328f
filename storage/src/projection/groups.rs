//! Groups projection: each group's record (name, creator, membership epoch, member count), its
//! members (with their shard, where their copies of group messages go), and per user the groups
//! they belong to.
//!
//! Whether a group event may apply is decided at apply time by [`check`] against the state at
//! that log position (so every replica decides the same); a refused event changes nothing and
//! answers `Rejected`. Invariants (asserted, after `check`): a group is created once; every
//! membership change raises the epoch by one; members are added once and removed only when
//! present; the count matches the members.

use courier_proto::pb::events::conversation::With;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::store::{GroupMessage, GroupRecord, MemberRecord};
use courier_proto::{GroupId, UserId};

use super::{Projection, View};
use crate::error::Result;
use crate::keys;

fn group_id(raw: u64) -> GroupId {
    GroupId::new(raw).expect("leader validated the group id")
}

fn user_id(raw: u64) -> UserId {
    UserId::new(raw).expect("leader validated the user id")
}

fn load(view: &View<'_, '_>, group: GroupId) -> Result<GroupRecord> {
    Ok(view
        .get(Projection::Groups, &keys::group(view.shard(), group))?
        .expect("membership changes name an existing group"))
}

/// A group event refused at apply: a stable code and why.
pub type Refusal = (&'static str, String);

/// Returns a group's record, if the group exists on this shard.
///
/// # Errors
/// A storage fault.
pub fn record(view: &View<'_, '_>, group: GroupId) -> Result<Option<GroupRecord>> {
    view.get(Projection::Groups, &keys::group(view.shard(), group))
}

/// Returns a member's record, if `user` is a member.
///
/// # Errors
/// A storage fault.
pub fn member(view: &View<'_, '_>, group: GroupId, user: UserId) -> Result<Option<MemberRecord>> {
    view.get(
        Projection::Groups,
        &keys::group_member(view.shard(), group, user),
    )
}

/// Returns the stored copy of the group message sent at log index `at` of this shard.
///
/// # Errors
/// A storage fault.
pub fn message_at(
    view: &View<'_, '_>,
    at: courier_proto::LogIndex,
) -> Result<Option<GroupMessage>> {
    view.get(Projection::Groups, &keys::group_message(view.shard(), at))
}

/// Returns every member of a group, in user id order.
///
/// # Errors
/// A storage fault.
pub fn members(view: &View<'_, '_>, group: GroupId) -> Result<Vec<(UserId, MemberRecord)>> {
    let prefix = keys::group_member_prefix(view.shard(), group);
    let end = keys::prefix_end(&prefix).expect("member prefixes end below 0xff..");
    Ok(view
        .scan::<MemberRecord>(Projection::Groups, &prefix, &end, usize::MAX)?
        .into_iter()
        .filter_map(|(key, record)| {
            let raw = u64::from_be_bytes(key.get(prefix.len()..)?.try_into().ok()?);
            Some((UserId::new(raw)?, record))
        })
        .collect())
}

/// Returns the groups of this shard `user` belongs to.
///
/// # Errors
/// A storage fault.
pub fn groups_of(view: &View<'_, '_>, user: UserId) -> Result<Vec<GroupId>> {
    let prefix = keys::user_group_prefix(view.shard(), user);
    let end = keys::prefix_end(&prefix).expect("membership prefixes end below 0xff..");
    Ok(view
        .scan::<MemberRecord>(Projection::Groups, &prefix, &end, usize::MAX)?
        .into_iter()
        .filter_map(|(key, _)| {
            GroupId::new(u64::from_be_bytes(
                key.get(prefix.len()..)?.try_into().ok()?,
            ))
        })
        .collect())
}

fn is_admin(view: &View<'_, '_>, group: GroupId, user: u64) -> Result<bool> {
    let Some(user) = UserId::new(user) else {
        return Ok(false);
    };
    Ok(member(view, group, user)?.is_some_and(|m| m.admin))
}

/// Whether `event` may apply at this position: `None`, or the refusal.
///
/// # Errors
/// A storage fault.
pub fn check(view: &View<'_, '_>, event: &Kind) -> Result<Option<Refusal>> {
    let refuse = |code: &'static str, message: String| Ok(Some((code, message)));
    match event {
        Kind::GroupCreated(created) if record(view, group_id(created.group))?.is_some() => {
            return refuse(
                "COURIER:Group:Exists",
                format!("group {} exists", created.group),
            );
        }
        Kind::MemberAdded(added) => {
            let group = group_id(added.group);
            let Some(record) = record(view, group)? else {
                return refuse(
                    "COURIER:Group:NotFound",
                    format!("no group {}", added.group),
                );
            };
            if !is_admin(view, group, added.by)? {
                return refuse(
                    "COURIER:Group:NotAdmin",
                    "only admins add members".to_owned(),
                );
            }
            if member(view, group, user_id(added.user))?.is_some() {
                return refuse(
                    "COURIER:Group:AlreadyMember",
                    format!("user {} is a member", added.user),
                );
            }
            if record.members >= courier_proto::limits::GROUP_MEMBERS_MAX {
                return refuse(
                    "COURIER:Group:Full",
                    format!("group {} is full", added.group),
                );
            }
        }
        Kind::MemberRemoved(removed) => {
            let group = group_id(removed.group);
            if record(view, group)?.is_none() {
                return refuse(
                    "COURIER:Group:NotFound",
                    format!("no group {}", removed.group),
                );
            }
            if member(view, group, user_id(removed.user))?.is_none() {
                return refuse(
                    "COURIER:Group:NotMember",
                    format!("user {} is not a member", removed.user),
                );
            }
            if removed.by != removed.user && !is_admin(view, group, removed.by)? {
                return refuse(
                    "COURIER:Group:NotAdmin",
                    "only admins remove others".to_owned(),
                );
            }
        }
        Kind::MessageSent(sent) => {
            let Some(With::Group(raw)) = sent.to.as_ref().and_then(|to| to.with) else {
                return Ok(None);
            };
            let group = group_id(raw);
            let Some(record) = record(view, group)? else {
                return refuse("COURIER:Group:NotFound", format!("no group {raw}"));
            };
            if member(view, group, user_id(sent.sender_user))?.is_none() {
                return refuse(
                    "COURIER:Group:NotMember",
                    "only members send to a group".to_owned(),
                );
            }
            if sent.group_epoch != record.epoch {
                return refuse(
                    "COURIER:Group:EpochChanged",
                    format!(
                        "the membership changed (epoch {} → {}) while sending; retry",
                        sent.group_epoch, record.epoch
                    ),
                );
            }
        }
        _ => {}
    }
    Ok(None)
}

/// Folds one event into the groups projection.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Kind) -> Result<()> {
    let shard = view.shard();
    match event {
        Kind::GroupCreated(created) => {
            let group = group_id(created.group);
            let key = keys::group(shard, group);
            assert!(
                view.get::<GroupRecord>(Projection::Groups, &key)?.is_none(),
                "a group is created once"
            );
            view.put(
                key,
                &GroupRecord {
                    creator: created.creator,
                    name: created.name.clone(),
                    epoch: 1,
                    members: 1,
                },
            )?;
            let creator = user_id(created.creator);
            let record = MemberRecord {
                admin: true,
                joined_epoch: 1,
                shard: created.creator_shard,
            };
            view.put(keys::user_group(shard, creator, group), &record)?;
            view.put(keys::group_member(shard, group, creator), &record)
        }
        Kind::MemberAdded(added) => {
            let group = group_id(added.group);
            let mut record = load(view, group)?;
            let member_key = keys::group_member(shard, group, user_id(added.user));
            assert!(
                view.get::<MemberRecord>(Projection::Groups, &member_key)?
                    .is_none(),
                "a member is added once"
            );
            record.epoch = record.epoch.checked_add(1).expect("group epoch overflow");
            record.members = record
                .members
                .checked_add(1)
                .expect("member count overflow");
            let member = MemberRecord {
                admin: added.admin,
                joined_epoch: record.epoch,
                shard: added.user_shard,
            };
            view.put(keys::user_group(shard, user_id(added.user), group), &member)?;
            view.put(member_key, &member)?;
            view.put(keys::group(shard, group), &record)
        }
        Kind::MemberRemoved(removed) => {
            let group = group_id(removed.group);
            let mut record = load(view, group)?;
            let member_key = keys::group_member(shard, group, user_id(removed.user));
            assert!(
                view.get::<MemberRecord>(Projection::Groups, &member_key)?
                    .is_some(),
                "only members are removed"
            );
            record.epoch = record.epoch.checked_add(1).expect("group epoch overflow");
            record.members = record
                .members
                .checked_sub(1)
                .expect("member count matches members");
            view.delete(member_key)?;
            view.delete(keys::user_group(shard, user_id(removed.user), group))?;
            view.put(keys::group(shard, group), &record)
        }
        Kind::MessageSent(sent) => {
            let Some(With::Group(group)) = sent.to.as_ref().and_then(|to| to.with) else {
                return Ok(());
            };
            view.put(
                keys::group_message(shard, view.at()),
                &GroupMessage {
                    message_id: sent.message_id.clone(),
                    group,
                    content: sent.content.clone(),
                },
            )
        }
        Kind::MessageDelivered(_)
        | Kind::DeliveryAcked(_)
        | Kind::ReadUpTo(_)
        | Kind::ReceiptRecorded(_)
        | Kind::OutboxTrimmed(_)
        | Kind::UserRegistered(_)
        | Kind::DeviceRegistered(_)
        | Kind::DeviceRevoked(_)
        | Kind::MessageExpired(_) => Ok(()),
    }
}
