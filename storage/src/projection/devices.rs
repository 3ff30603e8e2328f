//! Devices projection: phone hash → user, users, and devices with token hashes and revocations.
//!
//! Invariants (asserted):
//! - A phone hash maps to one user, set once.
//! - A user's device ids are 1, 2, 3, … in registration order.
//! - Only a registered device can be revoked.

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::store::{DeviceRecord, UserRecord};
use courier_proto::{DeviceId, UserId};

use super::{Projection, View};
use crate::error::Result;
use crate::keys;

fn user_id(raw: u64) -> UserId {
    UserId::new(raw).expect("leader validated the user id")
}

fn device_id(raw: u32) -> DeviceId {
    DeviceId::new(raw).expect("leader validated the device id")
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

/// Folds one event into the devices projection.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Kind) -> Result<()> {
    let shard = view.shard();
    match event {
        Kind::UserRegistered(registered) => {
            let user = user_id(registered.user);
            assert!(
                user_by_phone(view, &registered.phone_hash)?.is_none(),
                "a phone hash registers one user"
            );
            let key = keys::user_record(shard, user);
            assert!(
                view.get::<UserRecord>(Projection::Devices, &key)?.is_none(),
                "user ids are registered once"
            );
            view.put_u64(keys::phone(shard, &registered.phone_hash), user.get())?;
            view.put(
                key,
                &UserRecord {
                    phone_hash: registered.phone_hash.clone(),
                    devices_registered: 0,
                },
            )
        }
        Kind::DeviceRegistered(registered) => {
            let user = user_id(registered.user);
            let key = keys::user_record(shard, user);
            let mut record: UserRecord = view
                .get(Projection::Devices, &key)?
                .expect("devices are registered for registered users");
            let next = record
                .devices_registered
                .checked_add(1)
                .expect("device id overflow");
            assert_eq!(registered.device, next, "device ids are assigned in order");
            record.devices_registered = next;
            view.put(key, &record)?;
            view.put(
                keys::device_record(shard, user, device_id(registered.device)),
                &DeviceRecord {
                    token_hash: registered.token_hash.clone(),
                    primary: registered.primary,
                    revoked: false,
                    registered_at_ms: registered.at_ms,
                    revoked_at_ms: 0,
                },
            )
        }
        Kind::DeviceRevoked(revoked) => {
            let key = keys::device_record(shard, user_id(revoked.user), device_id(revoked.device));
            let mut record: DeviceRecord = view
                .get(Projection::Devices, &key)?
                .expect("only registered devices are revoked");
            if record.revoked {
                return Ok(());
            }
            record.revoked = true;
            record.revoked_at_ms = revoked.at_ms;
            view.put(key, &record)
        }
        Kind::MessageSent(_)
        | Kind::MessageDelivered(_)
        | Kind::DeliveryAcked(_)
        | Kind::ReadUpTo(_)
        | Kind::ReceiptRecorded(_)
        | Kind::OutboxTrimmed(_)
        | Kind::GroupCreated(_)
        | Kind::MemberAdded(_)
        | Kind::MemberRemoved(_)
        | Kind::MessageExpired(_) => Ok(()),
    }
}
