//! Groups projection: each group's record (name, creator, membership epoch, member count), its
//! members (with their shard, where their copies of group messages go), and per user the groups
//! they belong to.
//!
//! Whether a group event may apply is decided at apply time by [`check`] against the state at
//! that log position (so every replica decides the same); a refused event changes nothing and
//! answers `Rejected`. Invariants (asserted, after `check`): a group is created once; every
//! membership change raises the epoch by one; members are added once and removed only when
//! present; the count matches the members.

use courier_proto::pb::events;
use courier_proto::pb::store::{GroupMessage, GroupRecord, MemberRecord};
use courier_proto::{GroupId, LogIndex, UserId};

use super::decode::{Membership, Sent};
pub use super::refusal::GroupRefusal;
use super::{Decoded, Projection, Target, View};
use crate::error::Result;
use crate::keys;

fn load(view: &View<'_, '_>, group: GroupId) -> Result<GroupRecord> {
    Ok(view
        .get(Projection::Groups, &keys::group(view.shard(), group))?
        .expect("membership changes name an existing group"))
}

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
pub fn message_at(view: &View<'_, '_>, at: LogIndex) -> Result<Option<GroupMessage>> {
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
        .filter_map(|(key, record)| Some((keys::group_member_user(&key)?, record)))
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
        .filter_map(|(key, _)| keys::user_group_group(&key))
        .collect())
}

/// Up to `limit` groups of `user` with a membership on this shard whose ids follow `after`, in
/// id order.
///
/// # Errors
/// A storage fault or a record that does not decode.
pub fn groups_of_after(
    view: &View<'_, '_>,
    user: UserId,
    after: Option<GroupId>,
    limit: usize,
) -> Result<Vec<GroupId>> {
    let prefix = keys::user_group_prefix(view.shard(), user);
    let end = keys::prefix_end(&prefix).expect("membership prefixes end below 0xff..");
    let from = match after {
        Some(group) => keys::after(keys::user_group(view.shard(), user, group)),
        None => prefix,
    };
    Ok(view
        .scan::<MemberRecord>(Projection::Groups, &from, &end, limit)?
        .into_iter()
        .filter_map(|(key, _)| keys::user_group_group(&key))
        .collect())
}

fn is_admin(view: &View<'_, '_>, group: GroupId, user: Option<UserId>) -> Result<bool> {
    let Some(user) = user else {
        return Ok(false);
    };
    Ok(member(view, group, user)?.is_some_and(|m| m.admin))
}

/// Whether `event` may apply at this position: `None`, or the refusal.
///
/// # Errors
/// A storage fault.
pub fn check(view: &View<'_, '_>, event: &Decoded<'_>) -> Result<Option<GroupRefusal>> {
    let refusal = match event {
        Decoded::GroupCreated(created) => check_create(view, created.group)?,
        Decoded::MemberAdded(added) => check_add(view, added)?,
        Decoded::MemberRemoved(removed) => check_remove(view, removed)?,
        Decoded::MessageSent(sent) => check_send(view, sent)?,
        Decoded::MessageDelivered(_)
        | Decoded::DeliveryAcked(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::UserRegistered(_)
        | Decoded::DeviceRegistered(_)
        | Decoded::DeviceRevoked(_)
        | Decoded::MessageExpired(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. }
        | Decoded::Code(_)
        | Decoded::Keys(_)
        | Decoded::AccountDeleted { .. } => None,
    };
    Ok(refusal)
}

fn check_create(view: &View<'_, '_>, group: GroupId) -> Result<Option<GroupRefusal>> {
    Ok(record(view, group)?
        .is_some()
        .then_some(GroupRefusal::Exists { group }))
}

fn check_add(
    view: &View<'_, '_>,
    added: &Membership<'_, events::MemberAdded>,
) -> Result<Option<GroupRefusal>> {
    let group = added.group;
    let Some(record) = record(view, group)? else {
        return Ok(Some(GroupRefusal::NotFound { group }));
    };
    if let Some(replaced) = replaced(added) {
        // A change of number: only the member itself hands its place on.
        if added.by != Some(replaced) {
            return Ok(Some(GroupRefusal::NotAdminToAdd));
        }
        if member(view, group, replaced)?.is_none() {
            return Ok(Some(GroupRefusal::NotMember { user: replaced }));
        }
        if member(view, group, added.user)?.is_some() {
            return Ok(Some(GroupRefusal::AlreadyMember { user: added.user }));
        }
        return Ok(None);
    }
    if !is_admin(view, group, added.by)? {
        return Ok(Some(GroupRefusal::NotAdminToAdd));
    }
    if member(view, group, added.user)?.is_some() {
        return Ok(Some(GroupRefusal::AlreadyMember { user: added.user }));
    }
    if record.members >= courier_proto::limits::GROUP_MEMBERS_MAX {
        return Ok(Some(GroupRefusal::Full { group }));
    }
    Ok(None)
}

/// The member a `MemberAdded` replaces (a change of number), if any.
fn replaced(added: &Membership<'_, events::MemberAdded>) -> Option<UserId> {
    UserId::new(added.event.replaces)
}

fn check_remove(
    view: &View<'_, '_>,
    removed: &Membership<'_, events::MemberRemoved>,
) -> Result<Option<GroupRefusal>> {
    let group = removed.group;
    if record(view, group)?.is_none() {
        return Ok(Some(GroupRefusal::NotFound { group }));
    }
    if member(view, group, removed.user)?.is_none() {
        return Ok(Some(GroupRefusal::NotMember { user: removed.user }));
    }
    if removed.by != Some(removed.user) && !is_admin(view, group, removed.by)? {
        return Ok(Some(GroupRefusal::NotAdminToRemove));
    }
    Ok(None)
}

fn check_send(view: &View<'_, '_>, sent: &Sent<'_>) -> Result<Option<GroupRefusal>> {
    let Some(Target::Group(group)) = sent.to else {
        return Ok(None);
    };
    let Some(record) = record(view, group)? else {
        return Ok(Some(GroupRefusal::NotFound { group }));
    };
    if member(view, group, sent.sender)?.is_none() {
        return Ok(Some(GroupRefusal::SenderNotMember));
    }
    if sent.event.group_epoch != record.epoch {
        return Ok(Some(GroupRefusal::EpochChanged {
            sent: sent.event.group_epoch,
            current: record.epoch,
        }));
    }
    Ok(None)
}

/// Removes `user`'s membership of `group`: under the group and under the user.
fn forget_member(view: &mut View<'_, '_>, group: GroupId, user: UserId) -> Result<()> {
    let shard = view.shard();
    view.delete(keys::group_member(shard, group, user))?;
    view.delete(keys::user_group(shard, user, group))
}

/// `MemberAdded`: a new member, or (`replaces`, a change of number) the new user in the place of
/// a member, with its admin flag.
fn add_member(
    view: &mut View<'_, '_>,
    decoded: &Membership<'_, events::MemberAdded>,
) -> Result<()> {
    let shard = view.shard();
    let (group, user, added) = (decoded.group, decoded.user, decoded.event);
    let mut record = load(view, group)?;
    let member_key = keys::group_member(shard, group, user);
    assert!(
        view.get::<MemberRecord>(Projection::Groups, &member_key)?
            .is_none(),
        "a member is added once"
    );
    record.epoch = record.epoch.checked_add(1).expect("group epoch overflow");
    let admin = match replaced(decoded) {
        // The new number takes the old one's place: the count stays.
        Some(replaced) => {
            let replaced_key = keys::group_member(shard, group, replaced);
            let old = view
                .get::<MemberRecord>(Projection::Groups, &replaced_key)?
                .expect("only members are replaced");
            forget_member(view, group, replaced)?;
            old.admin
        }
        None => {
            record.members = record
                .members
                .checked_add(1)
                .expect("member count overflow");
            added.admin
        }
    };
    let member = MemberRecord {
        admin,
        joined_epoch: record.epoch,
        shard: added.user_shard,
    };
    view.put(keys::user_group(shard, user, group), &member)?;
    view.put(member_key, &member)?;
    view.put(keys::group(shard, group), &record)
}

/// Folds one event into the groups projection.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        Decoded::GroupCreated(decoded) => {
            let (group, creator, created) = (decoded.group, decoded.creator, decoded.event);
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
            let record = MemberRecord {
                admin: true,
                joined_epoch: 1,
                shard: created.creator_shard,
            };
            view.put(keys::user_group(shard, creator, group), &record)?;
            view.put(keys::group_member(shard, group, creator), &record)
        }
        Decoded::MemberAdded(decoded) => add_member(view, decoded),
        Decoded::MemberRemoved(removed) => {
            let (group, user) = (removed.group, removed.user);
            let mut record = load(view, group)?;
            let member_key = keys::group_member(shard, group, user);
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
            forget_member(view, group, user)?;
            view.put(keys::group(shard, group), &record)
        }
        Decoded::MessageSent(sent) => {
            let Some(Target::Group(group)) = sent.to else {
                return Ok(());
            };
            view.put(
                keys::group_message(shard, view.at()),
                &GroupMessage {
                    message_id: sent.event.message_id.clone(),
                    group: group.get(),
                    content: sent.event.content.clone(),
                    sent_at_ms: sent.event.sent_at_ms,
                },
            )
        }
        Decoded::GroupMessagesForgotten { up_to } => forget_messages(view, *up_to),
        Decoded::MessageDelivered(_)
        | Decoded::DeliveryAcked(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::UserRegistered(_)
        | Decoded::DeviceRegistered(_)
        | Decoded::DeviceRevoked(_)
        | Decoded::MessageExpired(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::Code(_)
        | Decoded::Keys(_)
        | Decoded::AccountDeleted { .. } => Ok(()),
    }
}

/// The log index up to which this shard's stored group message copies were forgotten (0: none).
///
/// # Errors
/// A storage fault.
pub fn messages_forgotten_up_to(view: &View<'_, '_>) -> Result<LogIndex> {
    Ok(LogIndex::new(
        view.get_u64(
            Projection::Groups,
            &keys::group_messages_forgotten(view.shard()),
        )?
        .unwrap_or(0),
    ))
}

/// Stored group message copies one `GroupMessagesForgotten` removes at most (the oldest up to
/// its index): a bound on one apply's work whatever the event names. Part of the event's
/// meaning: every replica and every replay applies the same bound.
pub const COPIES_PER_FORGET_MAX: usize = 1024;

/// The index up to which the stored group message copies are due to be forgotten at
/// `before_ms`, looking at the oldest `limit` (`None`: none due). Copies are read in index order
/// up to the first one sent at or after `before_ms`; the last one sent before it is the answer. A
/// copy with no send time (stored before the field existed, oldest by index) counts as due only
/// when a later timed copy is: index order follows send order on one shard's log.
///
/// # Errors
/// A storage fault.
pub fn messages_sent_before(
    view: &View<'_, '_>,
    before_ms: u64,
    limit: usize,
) -> Result<Option<LogIndex>> {
    let prefix = keys::group_message_prefix(view.shard());
    let end = keys::prefix_end(&prefix).expect("group message prefixes end below 0xff..");
    let mut last = None;
    for (key, message) in view.scan::<GroupMessage>(Projection::Groups, &prefix, &end, limit)? {
        match message.sent_at_ms {
            0 => {}
            sent_at_ms if sent_at_ms < before_ms => {
                last = keys::group_message_index(&key).or(last);
            }
            _ => break,
        }
    }
    Ok(last)
}

/// Removes the stored copies at indexes up to `up_to`, oldest first, at most
/// [`COPIES_PER_FORGET_MAX`]; the watermark moves to the last index removed. Which copies were
/// due is the leader's decision (its clock); apply depends on the log alone.
fn forget_messages(view: &mut View<'_, '_>, up_to: LogIndex) -> Result<()> {
    let shard = view.shard();
    let prefix = keys::group_message_prefix(shard);
    let Some(end) = up_to.get().checked_add(1) else {
        return Ok(());
    };
    let end = keys::group_message(shard, LogIndex::new(end));
    let doomed =
        view.scan::<GroupMessage>(Projection::Groups, &prefix, &end, COPIES_PER_FORGET_MAX)?;
    let mut last = None;
    for (key, _) in doomed {
        last = keys::group_message_index(&key).or(last);
        view.delete(key)?;
    }
    if let Some(last) = last {
        let watermark = messages_forgotten_up_to(view)?.max(last);
        view.put_u64(keys::group_messages_forgotten(shard), watermark.get())?;
    }
    Ok(())
}
