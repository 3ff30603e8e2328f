//! The stable mapping of users and groups to shards.
//!
//! The hash is **xxh3-64 with seed [`SHARD_HASH_SEED`]** over the id's 8 big-endian bytes,
//! reduced modulo the shard count. It is fixed forever for a cluster: changing it would move
//! every user. `std`'s `DefaultHasher` is banned for this (its algorithm may change between
//! Rust releases); the test vectors below pin the function.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::types::{GroupId, ShardId, UserId};

/// The seed of the shard hash: the ASCII bytes of "courier" as a big-endian integer.
pub const SHARD_HASH_SEED: u64 = 0x0063_6f75_7269_6572;

/// The storage prefix of the cluster metadata group, which every node stores beside its shards
/// (shard ids are below `SHARD_COUNT_MAX`).
pub const METADATA_PREFIX: ShardId = ShardId::new(u16::MAX);

/// Seed of the phone number → user id hash.
pub const USER_OF_PHONE_SEED: u64 = 0x7573_6572_6964_0001;
/// Seed of the 128-bit phone hash stored in the log.
pub const PHONE_HASH_SEED: u64 = 0x7068_6f6e_6568_0001;

/// The user a phone number registers as: xxh3-64 of the E.164 text with
/// [`USER_OF_PHONE_SEED`] (zero is mapped to 1). Stable forever, so every node and tool agrees
/// without a lookup.
pub fn user_of_phone(phone: &str) -> UserId {
    UserId::new(xxh3_64_with_seed(phone.as_bytes(), USER_OF_PHONE_SEED))
        .unwrap_or(UserId::new(1).expect("1 is nonzero"))
}

/// The 16-byte hash of a phone number that the log stores instead of the number.
pub fn phone_hash(phone: &str) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128_with_seed(phone.as_bytes(), PHONE_HASH_SEED).to_be_bytes()
}

/// Domain separation so that a user id and a group id with the same value may land apart.
const GROUP_DOMAIN: u64 = 0x9e37_79b9_7f4a_7c15;

fn reduce(hash: u64, shard_count: u16) -> ShardId {
    assert!(shard_count > 0, "a cluster has at least one shard");
    let shard = hash % u64::from(shard_count);
    // The remainder is below `shard_count`, which fits in u16.
    ShardId::new(u16::try_from(shard).expect("remainder below a u16 modulus"))
}

/// Returns the shard that owns `user` in a cluster of `shard_count` shards.
///
/// # Panics
/// Panics if `shard_count` is zero (a validated cluster config never has zero shards).
pub fn shard_of(user: UserId, shard_count: u16) -> ShardId {
    reduce(
        xxh3_64_with_seed(&user.get().to_be_bytes(), SHARD_HASH_SEED),
        shard_count,
    )
}

/// Returns the shard that owns `group` in a cluster of `shard_count` shards.
///
/// # Panics
/// Panics if `shard_count` is zero.
pub fn shard_of_group(group: GroupId, shard_count: u16) -> ShardId {
    let seed = SHARD_HASH_SEED ^ GROUP_DOMAIN;
    reduce(
        xxh3_64_with_seed(&group.get().to_be_bytes(), seed),
        shard_count,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the hash: if any of these change, existing clusters would route users to the wrong
    /// shard. Never update them for a running format.
    #[test]
    fn shard_of_test_vectors() {
        let vectors: [(u64, u16, u16); 8] = [
            (1, 64, VECTORS[0]),
            (2, 64, VECTORS[1]),
            (3, 64, VECTORS[2]),
            (42, 64, VECTORS[3]),
            (1_000_000, 64, VECTORS[4]),
            (u64::MAX, 64, VECTORS[5]),
            (7, 3, VECTORS[6]),
            (123_456_789, 16, VECTORS[7]),
        ];
        for (user, count, want) in vectors {
            assert_eq!(
                shard_of(UserId::new(user).expect("nonzero"), count).get(),
                want,
                "shard_of({user}, {count})"
            );
        }
    }

    /// Computed independently with the reference xxh3 (Python `xxhash` 3.x:
    /// `xxh3_64_intdigest(user.to_bytes(8, "big"), seed=SHARD_HASH_SEED) % count`).
    const VECTORS: [u16; 8] = [32, 36, 11, 53, 22, 57, 0, 10];

    /// 1M sequential users over 64 shards: every shard within 5 % of the mean.
    #[test]
    fn shard_of_spreads_evenly() {
        let shards = 64_u16;
        let users = 1_000_000_u64;
        let mut counts = vec![0_u64; usize::from(shards)];
        for user in 1..=users {
            let shard = shard_of(UserId::new(user).expect("nonzero"), shards);
            counts[usize::from(shard.get())] += 1;
        }
        let mean = users / u64::from(shards);
        for (shard, count) in counts.iter().enumerate() {
            let deviation = count.abs_diff(mean) * 100 / mean;
            assert!(deviation < 5, "shard {shard} holds {count}, mean {mean}");
        }
    }

    #[test]
    fn groups_spread_too() {
        let mut seen = std::collections::BTreeSet::new();
        for group in 1..=1000_u64 {
            seen.insert(shard_of_group(GroupId::new(group).expect("nonzero"), 8).get());
        }
        assert_eq!(seen.len(), 8, "1000 groups reach all 8 shards");
    }
}
