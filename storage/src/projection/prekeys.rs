//! The key directory (part of the devices projection): per device, its published identity key
//! and signed prekey, and its stock of one-time prekeys, one record each.
//!
//! A fetch is a `PreKeysClaimed` in the log: at apply, each active device of the user with keys
//! gives up its lowest one-time prekey, and the outcome carries the bundle back to the fetcher.
//! Two fetches are two log positions, so they never get the same one-time prekey, whichever
//! nodes they reached. A revoked device's keys leave with it.
//!
//! Invariants (asserted by the tests): a one-time prekey is handed out at most once; a device's
//! stock count equals its one-time prekey records; a stock never passes `PREKEYS_STOCK_MAX`.

use courier_proto::limits::PREKEYS_STOCK_MAX;
use courier_proto::pb::events::{self, PreKey};
use courier_proto::pb::store::{DeviceBundle, DeviceKeys, KeyBundle};
use courier_proto::{DeviceId, UserId};
use prost::Message as _;

use super::Decoded;
use super::decode::KeysEvent;
use super::{Projection, View, devices};
use crate::error::Result;
use crate::keys;

/// The refusal of an upload to a device that is not registered, or revoked.
pub const UNKNOWN_DEVICE: &str = "COURIER:Keys:UnknownDevice";
/// The refusal of an upload that would take the stock past `PREKEYS_STOCK_MAX`.
pub const STOCK_FULL: &str = "COURIER:Keys:StockFull";

/// A device's published keys, if any.
///
/// # Errors
/// A storage fault.
pub fn device_keys(
    view: &View<'_, '_>,
    user: UserId,
    device: DeviceId,
) -> Result<Option<DeviceKeys>> {
    view.get(
        Projection::Devices,
        &keys::device_keys(view.shard(), user, device),
    )
}

/// A device's one-time prekeys, by id, up to `limit`.
fn one_time_prekeys(
    view: &View<'_, '_>,
    user: UserId,
    device: DeviceId,
    limit: usize,
) -> Result<Vec<(Vec<u8>, PreKey)>> {
    let prefix = keys::one_time_prekey_prefix(view.shard(), user, device);
    let end = keys::prefix_end(&prefix).expect("prekey prefixes end below 0xff..");
    view.scan(Projection::Devices, &prefix, &end, limit)
}

fn device_id(raw: u32) -> DeviceId {
    DeviceId::new(raw).expect("stored device ids start at 1")
}

/// Why an upload changes nothing (`code`, message), checked before any projection runs.
///
/// # Errors
/// A storage fault.
pub fn refusal(
    view: &View<'_, '_>,
    event: KeysEvent<'_>,
) -> Result<Option<(&'static str, String)>> {
    let KeysEvent::Uploaded {
        event,
        user,
        device,
    } = event
    else {
        return Ok(None);
    };
    let active = devices::devices_of(view, user)?
        .iter()
        .any(|(id, record)| *id == device.get() && !record.revoked);
    if !active {
        return Ok(Some((
            UNKNOWN_DEVICE,
            format!("{device} of user {user} is not an active device"),
        )));
    }
    let stock = after_upload(view, user, device, event)?;
    if stock > PREKEYS_STOCK_MAX {
        return Ok(Some((
            STOCK_FULL,
            format!("the upload would hold {stock} one-time prekeys, at most {PREKEYS_STOCK_MAX}"),
        )));
    }
    Ok(None)
}

/// The stock after `event`: the stock now plus the uploaded ids not in it (an id in both is
/// replaced; an id twice in the upload counts once).
fn after_upload(
    view: &View<'_, '_>,
    user: UserId,
    device: DeviceId,
    event: &events::KeysUploaded,
) -> Result<u32> {
    let shard = view.shard();
    let mut ids: Vec<u32> = event.one_time_prekeys.iter().map(|k| k.key_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let published = device_keys(view, user, device)?;
    let kept = match &published {
        Some(keys) if keys.identity_key == event.identity_key => keys.one_time_prekeys,
        // A new identity key: the one-time prekeys made under the old one leave.
        Some(_) | None => return Ok(u32::try_from(ids.len()).unwrap_or(u32::MAX)),
    };
    let mut stock = kept;
    for id in ids {
        let key = keys::one_time_prekey(shard, user, device, id);
        if view.get::<PreKey>(Projection::Devices, &key)?.is_none() {
            stock = stock.saturating_add(1);
        }
    }
    Ok(stock)
}

/// The stock an upload leaves, for the uploader's answer.
///
/// # Errors
/// A storage fault.
pub fn stock_after(view: &View<'_, '_>, event: KeysEvent<'_>) -> Result<u32> {
    match event {
        KeysEvent::Uploaded {
            event,
            user,
            device,
        } => after_upload(view, user, device, event),
        KeysEvent::Claimed { .. } => Ok(0),
    }
}

/// The bundle a claim hands out: per active device with keys, its keys and its lowest
/// one-time prekey (the one apply removes).
///
/// # Errors
/// A storage fault.
pub fn bundle(view: &View<'_, '_>, user: UserId) -> Result<KeyBundle> {
    let mut bundle = KeyBundle::default();
    for (id, record) in devices::devices_of(view, user)? {
        if record.revoked {
            continue;
        }
        let device = device_id(id);
        let Some(published) = device_keys(view, user, device)? else {
            continue;
        };
        let one_time = one_time_prekeys(view, user, device, 1)?
            .into_iter()
            .next()
            .map(|(_, key)| key);
        let left = published
            .one_time_prekeys
            .saturating_sub(u32::from(one_time.is_some()));
        bundle.devices.push(DeviceBundle {
            device: id,
            identity_key: published.identity_key,
            signed_prekey: published.signed_prekey,
            one_time_prekey: one_time,
            one_time_prekeys_left: left,
        });
    }
    Ok(bundle)
}

/// The encoded bundle, the outcome the fetcher gets back.
///
/// # Errors
/// A storage fault.
pub fn bundle_bytes(view: &View<'_, '_>, user: UserId) -> Result<Vec<u8>> {
    Ok(bundle(view, user)?.encode_to_vec())
}

/// Removes a device's one-time prekeys (not its count: the caller rewrites `DeviceKeys`).
fn remove_one_time_prekeys(view: &mut View<'_, '_>, user: UserId, device: DeviceId) -> Result<()> {
    let all = usize::try_from(PREKEYS_STOCK_MAX).unwrap_or(usize::MAX);
    for (key, _) in one_time_prekeys(view, user, device, all)? {
        view.delete(key)?;
    }
    Ok(())
}

/// Removes every key of a revoked device.
fn remove_device(view: &mut View<'_, '_>, user: UserId, device: DeviceId) -> Result<()> {
    if device_keys(view, user, device)?.is_none() {
        return Ok(());
    }
    remove_one_time_prekeys(view, user, device)?;
    view.delete(keys::device_keys(view.shard(), user, device))
}

/// Folds one event into the key directory, after the devices projection folded it: a key event
/// (after [`refusal`] passed), or a device event, after which every revoked device of the user
/// loses its keys (a revocation, or a new primary replacing the old one).
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: &Decoded<'_>) -> Result<()> {
    match event {
        Decoded::Keys(keys_event) => apply_keys(view, *keys_event),
        Decoded::DeviceRevoked(revoked) => remove_revoked(view, revoked.user),
        Decoded::DeviceRegistered(registered) if registered.event.primary => {
            remove_revoked(view, registered.user)
        }
        Decoded::AccountDeleted { user, .. } => {
            // The device records already left (devices folds first): by key prefix.
            let shard = view.shard();
            view.delete_prefix(&keys::user_records(shard, keys::tag::SENARY, *user))?;
            view.delete_prefix(&keys::user_records(shard, keys::tag::SEPTENARY, *user))
        }
        _ => Ok(()),
    }
}

/// Removes the keys of every revoked device of `user`.
fn remove_revoked(view: &mut View<'_, '_>, user: UserId) -> Result<()> {
    for (id, record) in devices::devices_of(view, user)? {
        if record.revoked {
            remove_device(view, user, device_id(id))?;
        }
    }
    Ok(())
}

fn apply_keys(view: &mut View<'_, '_>, event: KeysEvent<'_>) -> Result<()> {
    let shard = view.shard();
    match event {
        KeysEvent::Uploaded {
            event,
            user,
            device,
        } => {
            let stock = after_upload(view, user, device, event)?;
            if device_keys(view, user, device)?
                .is_some_and(|published| published.identity_key != event.identity_key)
            {
                remove_one_time_prekeys(view, user, device)?;
            }
            for key in &event.one_time_prekeys {
                view.put(
                    keys::one_time_prekey(shard, user, device, key.key_id),
                    &PreKey {
                        key_id: key.key_id,
                        public_key: key.public_key.clone(),
                        signature: Vec::new(),
                    },
                )?;
            }
            view.put(
                keys::device_keys(shard, user, device),
                &DeviceKeys {
                    identity_key: event.identity_key.clone(),
                    signed_prekey: event.signed_prekey.clone(),
                    one_time_prekeys: stock,
                    uploaded_at_ms: event.at_ms,
                },
            )
        }
        KeysEvent::Claimed { user, .. } => {
            for (id, record) in devices::devices_of(view, user)? {
                if record.revoked {
                    continue;
                }
                let device = device_id(id);
                let Some(mut published) = device_keys(view, user, device)? else {
                    continue;
                };
                let Some((key, _)) = one_time_prekeys(view, user, device, 1)?.into_iter().next()
                else {
                    continue;
                };
                view.delete(key)?;
                published.one_time_prekeys = published.one_time_prekeys.saturating_sub(1);
                view.put(keys::device_keys(shard, user, device), &published)?;
            }
            Ok(())
        }
    }
}
