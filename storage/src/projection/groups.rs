//! Groups projection: each group's record (name, creator, membership epoch, member count) and
//! its members.
//!
//! Invariants (asserted): a group is created once; every membership change raises the epoch by
//! one; members are added once and removed only when present; the count matches the members.

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::store::{GroupRecord, MemberRecord};
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
            view.put(
                keys::group_member(shard, group, user_id(created.creator)),
                &MemberRecord {
                    admin: true,
                    joined_epoch: 1,
                },
            )
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
            view.put(
                member_key,
                &MemberRecord {
                    admin: added.admin,
                    joined_epoch: record.epoch,
                },
            )?;
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
            view.put(keys::group(shard, group), &record)
        }
        Kind::MessageSent(_)
        | Kind::MessageDelivered(_)
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
