//! Devices projection: phone hash → user, users, and devices with token hashes and revocations;
//! and per number, its registration record (codes and limits, `registration.rs`). The key
//! directory (`prekeys.rs`) shares the family and folds after this.
//!
//! Invariants (asserted):
//! - A phone hash maps to one user, set once.
//! - A user's device ids are 1, 2, 3, … in registration order.
//! - Only a registered device can be revoked.

use courier_proto::pb::store::{DeviceRecord, UserRecord};
use courier_proto::{DeviceId, UserId};

use courier_proto::pb::events;

use super::decode::Registered;
use super::{Applied, Decoded, Projection, View, registration};
use crate::error::Result;
use crate::keys;

/// A device id read from a key or counted at apply: ids start at 1, so never zero.
fn device_id(raw: u32) -> DeviceId {
    DeviceId::new(raw).expect("stored and assigned device ids start at 1")
}

/// Returns the user registered for a phone hash.
///
/// # Errors
/// A storage fault.
pub fn user_by_phone(view: &View<'_, '_>, phone_hash: &[u8]) -> Result<Option<UserId>> {
    Ok(view
        .get_u64(Projection::Devices, &keys::phone(view.shard(), phone_hash))?
        .and_then(UserId::new))
}

/// Returns how many devices `user` registered (the id of the last one).
///
/// # Errors
/// A storage fault.
pub fn devices_registered(view: &View<'_, '_>, user: UserId) -> Result<u32> {
    let record: Option<UserRecord> =
        view.get(Projection::Devices, &keys::user_record(view.shard(), user))?;
    Ok(record.map_or(0, |r| r.devices_registered))
}

/// Whether `user` has more than one active (not revoked) device: then the messages they send
/// are also stored for them, for their other devices (multi-device history). One read for a user
/// who never linked a companion.
///
/// # Errors
/// A storage fault.
pub fn has_companions(view: &View<'_, '_>, user: UserId) -> Result<bool> {
    if devices_registered(view, user)? < 2 {
        return Ok(false);
    }
    let active = devices_of(view, user)?
        .into_iter()
        .filter(|(_, device)| !device.revoked)
        .take(2)
        .count();
    Ok(active >= 2)
}

/// Returns the hash of the number `user` registered with (`None` for a user not registered).
///
/// # Errors
/// A storage fault.
pub fn phone_of(view: &View<'_, '_>, user: UserId) -> Result<Option<Vec<u8>>> {
    let record: Option<UserRecord> =
        view.get(Projection::Devices, &keys::user_record(view.shard(), user))?;
    Ok(record.map(|r| r.phone_hash))
}

/// Returns a user's devices, by id.
///
/// # Errors
/// A storage fault.
pub fn devices_of(view: &View<'_, '_>, user: UserId) -> Result<Vec<(u32, DeviceRecord)>> {
    let prefix = keys::device_user_prefix(view.shard(), user);
    let end = keys::prefix_end(&prefix).expect("device prefixes end below 0xff..");
    Ok(view
        .scan::<DeviceRecord>(Projection::Devices, &prefix, &end, usize::MAX)?
        .into_iter()
        .filter_map(|(key, record)| Some((keys::device_record_device(&key)?, record)))
        .collect())
}

/// The refusal of a companion's `DeviceRegistered` that would pass its `companions_max`.
pub const TOO_MANY_COMPANIONS: &str = "COURIER:Registration:TooManyCompanions";

/// The refusal of a companion's `DeviceRegistered` whose approving primary is no longer the
/// user's active primary.
pub const APPROVER_REVOKED: &str = "COURIER:Registration:ApproverRevoked";

/// Whether `registered` may apply: `None`, or its refusal when it links a companion
/// (`approver_token_hash` set: format 3) that a device other than the user's active primary
/// approved (a primary that a new registration of the number replaced meanwhile).
///
/// # Errors
/// A storage fault.
pub fn approver_refusal(
    view: &View<'_, '_>,
    registered: &Registered<'_, events::DeviceRegistered>,
) -> Result<Option<Applied>> {
    let approver = &registered.event.approver_token_hash;
    if registered.event.primary || approver.is_empty() {
        return Ok(None);
    }
    let approved = devices_of(view, registered.user)?
        .iter()
        .any(|(_, record)| record.primary && !record.revoked && record.token_hash == *approver);
    if approved {
        return Ok(None);
    }
    Ok(Some(Applied::Rejected {
        code: APPROVER_REVOKED,
        message: "the device that approved this pairing is no longer the user's primary".to_owned(),
    }))
}

/// Whether `registered` may apply: `None`, or its refusal when it links a companion to a user who
/// already has `companions_max` linked, unrevoked companions.
///
/// # Errors
/// A storage fault.
pub fn companion_refusal(
    view: &View<'_, '_>,
    registered: &Registered<'_, events::DeviceRegistered>,
) -> Result<Option<Applied>> {
    let max = registered.event.companions_max;
    if registered.event.primary || max == 0 {
        return Ok(None);
    }
    let companions = devices_of(view, registered.user)?
        .iter()
        .filter(|(_, record)| !record.primary && !record.revoked)
        .count();
    if companions < usize::try_from(max).unwrap_or(usize::MAX) {
        return Ok(None);
    }
    Ok(Some(Applied::Rejected {
        code: TOO_MANY_COMPANIONS,
        message: format!("a user links at most {max} companion devices"),
    }))
}

/// Folds one event into the devices projection.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        Decoded::UserRegistered(decoded) => {
            let (user, registered) = (decoded.user, decoded.event);
            if let Some(existing) = user_by_phone(view, &registered.phone_hash)? {
                // Two registrations of a new number raced: the first one created the user.
                assert_eq!(existing, user, "a phone hash registers one user");
                return Ok(());
            }
            let key = keys::user_record(shard, user);
            if view.get::<UserRecord>(Projection::Devices, &key)?.is_some() {
                return Ok(()); // the same user id from another phone hash: a 64-bit collision
            }
            view.put_u64(keys::phone(shard, &registered.phone_hash), user.get())?;
            view.put(
                key,
                &UserRecord {
                    phone_hash: registered.phone_hash.clone(),
                    devices_registered: 0,
                },
            )
        }
        Decoded::DeviceRegistered(decoded) => {
            let (user, registered) = (decoded.user, decoded.event);
            let key = keys::user_record(shard, user);
            let mut record: UserRecord = view
                .get(Projection::Devices, &key)?
                .expect("devices are registered for registered users");
            // The id is assigned here, at apply, so concurrent registrations never collide; an
            // event that names its id must name this one.
            let next = record
                .devices_registered
                .checked_add(1)
                .expect("device id overflow");
            assert!(
                registered.device == 0 || registered.device == next,
                "device ids are assigned in order"
            );
            if registered.primary {
                // A new primary device revokes the previous primary (as WhatsApp does), and with
                // `revokes_companions` (format 3) every companion too, even one linked while
                // this registration was in flight: a new owner inherits no linked device.
                let all = registered.revokes_companions;
                for (id, mut device) in devices_of(view, user)? {
                    if (device.primary || all) && !device.revoked {
                        device.revoked = true;
                        device.revoked_at_ms = registered.at_ms;
                        view.put(keys::device_record(shard, user, device_id(id)), &device)?;
                    }
                }
            }
            record.devices_registered = next;
            view.put(key, &record)?;
            view.put(
                keys::device_record(shard, user, device_id(next)),
                &DeviceRecord {
                    token_hash: registered.token_hash.clone(),
                    primary: registered.primary,
                    revoked: false,
                    registered_at_ms: registered.at_ms,
                    revoked_at_ms: 0,
                },
            )
        }
        Decoded::DeviceRevoked(revoked) => {
            let key = keys::device_record(shard, revoked.user, revoked.device);
            let mut record: DeviceRecord = view
                .get(Projection::Devices, &key)?
                .expect("only registered devices are revoked");
            if record.revoked {
                return Ok(());
            }
            record.revoked = true;
            record.revoked_at_ms = revoked.event.at_ms;
            view.put(key, &record)
        }
        Decoded::Code(code) => registration::apply(view, *code),
        Decoded::AccountDeleted { user, .. } => {
            let key = keys::user_record(shard, *user);
            let record: UserRecord = view
                .get(Projection::Devices, &key)?
                .expect("only registered users are deleted (checked)");
            let phone = record.phone_hash;
            if user_by_phone(view, &phone)? == Some(*user) {
                view.delete(keys::phone(shard, &phone))?;
            }
            registration::forget_number(view, &phone)?;
            view.delete(key)?;
            view.delete_prefix(&keys::device_user_prefix(shard, *user))
        }
        // The key directory folds after this (`prekeys::apply`).
        Decoded::Keys(_) => Ok(()),
        Decoded::MessageSent(_)
        | Decoded::MessageDelivered(_)
        | Decoded::DeliveryAcked(_)
        | Decoded::ReadUpTo(_)
        | Decoded::ReceiptRecorded(_)
        | Decoded::OutboxTrimmed(_)
        | Decoded::GroupCreated(_)
        | Decoded::MemberAdded(_)
        | Decoded::MemberRemoved(_)
        | Decoded::MessageExpired(_)
        | Decoded::SendsForgotten(_)
        | Decoded::InboxForgotten(_)
        | Decoded::ReceiptsForgotten(_)
        | Decoded::GroupMessagesForgotten { .. } => Ok(()),
    }
}
