//! One user's state as the projections store it: the keys of each projection that belong to one
//! user, read out of a replayed state. `courier-ops inspect user` prints them, offline from a
//! replay on the operator's machine and online from a replay on the node.

use courier_proto::{ShardId, UserId};

use crate::kv::MemKv;
use crate::{Cf, Projection, keys};

/// Inbox messages and receipts of a user shown: the newest ones.
pub const SHOWN_MAX: usize = 10;
/// Pairs of any other range of a user's state shown (cursors, read states, devices): the last
/// ones in key order. Bounds the answer of an online inspect.
pub const RANGE_PAIRS_MAX: usize = 1000;

/// The key prefixes under which the projections store `user`'s state (the inbox state and
/// messages, device cursors, read states, the receipt feed and the devices), each with how many
/// of its last pairs are shown.
#[must_use]
pub fn user_prefixes(shard: ShardId, user: UserId) -> [(Projection, Vec<u8>, usize); 6] {
    [
        (Projection::Inbox, keys::inbox_state(shard, user), 1),
        (
            Projection::Inbox,
            keys::inbox_user_prefix(shard, user),
            SHOWN_MAX,
        ),
        (
            Projection::Cursors,
            keys::KeyBuf::shard(shard)
                .u8(keys::tag::PRIMARY)
                .u64(user.get())
                .done(),
            RANGE_PAIRS_MAX,
        ),
        (
            Projection::ReadState,
            keys::read_state_user_prefix(shard, user),
            RANGE_PAIRS_MAX,
        ),
        (
            Projection::Receipts,
            keys::receipt_feed_prefix(shard, user),
            SHOWN_MAX,
        ),
        (
            Projection::Devices,
            keys::device_user_prefix(shard, user),
            RANGE_PAIRS_MAX,
        ),
    ]
}

/// `user`'s pairs in `kv` (stored form: framed values), per projection in key order: the last
/// pairs of each of [`user_prefixes`], as many as it shows.
#[must_use]
pub fn user_pairs(kv: &MemKv, shard: ShardId, user: UserId) -> Vec<(Projection, Vec<u8>, Vec<u8>)> {
    user_prefixes(shard, user)
        .into_iter()
        .flat_map(|(projection, prefix, shown)| {
            let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![u8::MAX; 16]);
            let mut pairs: Vec<_> = kv
                .range(Cf::Projection(projection), &prefix, &end)
                .rev()
                .take(shown)
                .map(|(key, value)| (projection, key.clone(), value.clone()))
                .collect();
            pairs.reverse();
            pairs
        })
        .collect()
}

/// A state holding only `pairs` (as [`user_pairs`] returns them): what an online inspect
/// brought back, to be read like a replay's state.
#[must_use]
pub fn state_of(pairs: impl IntoIterator<Item = (Projection, Vec<u8>, Vec<u8>)>) -> MemKv {
    let mut kv = MemKv::default();
    kv.write(
        pairs
            .into_iter()
            .map(|(projection, key, value)| (Cf::Projection(projection), key, Some(value))),
    );
    kv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_pairs_are_exactly_theirs_and_read_back_the_same() {
        let shard = ShardId::new(3);
        let (alice, bob) = (UserId::new(7).expect("id"), UserId::new(8).expect("id"));
        let mut kv = MemKv::default();
        let mut changes = Vec::new();
        for user in [alice, bob] {
            for (projection, prefix, _) in user_prefixes(shard, user) {
                for n in 0..20_u8 {
                    let mut key = prefix.clone();
                    key.push(n);
                    changes.push((Cf::Projection(projection), key, Some(vec![n])));
                }
            }
        }
        kv.write(changes);
        let pairs = user_pairs(&kv, shard, alice);
        assert!(
            pairs
                .iter()
                .all(|(_, key, _)| key.windows(8).any(|w| w == alice.get().to_be_bytes())),
            "only alice's keys"
        );
        let inbox: Vec<u8> = pairs
            .iter()
            .filter(|(p, key, _)| {
                *p == Projection::Inbox && key.starts_with(&keys::inbox_user_prefix(shard, alice))
            })
            .map(|(_, _, value)| value[0])
            .collect();
        assert_eq!(
            inbox,
            (10..20).collect::<Vec<u8>>(),
            "the newest 10 messages"
        );
        let devices = pairs
            .iter()
            .filter(|(p, _, _)| *p == Projection::Devices)
            .count();
        assert_eq!(devices, 20, "every device");
        assert_eq!(
            user_pairs(&state_of(pairs.clone()), shard, alice),
            pairs,
            "a state of alice's pairs holds the same pairs"
        );
    }
}
