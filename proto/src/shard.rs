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

/// Seed of the unkeyed phone number → user id hash ([`PhoneHasher::Unkeyed`]).
pub const USER_OF_PHONE_SEED: u64 = 0x7573_6572_6964_0001;
/// Seed of the unkeyed 128-bit phone hash ([`PhoneHasher::Unkeyed`]).
pub const PHONE_HASH_SEED: u64 = 0x7068_6f6e_6568_0001;

/// Bytes of a cluster's phone-hash key.
pub const PHONE_KEY_BYTES: usize = 32;

/// Domain labels of the keyed hashes: one key, two unrelated outputs.
const USER_OF_PHONE_LABEL: &[u8] = b"courier/user-of-phone\0";
const PHONE_HASH_LABEL: &[u8] = b"courier/phone-hash\0";
const CODE_HASH_LABEL: &[u8] = b"courier/registration-code\0";

/// A cluster's secret for hashing phone numbers: generated (or supplied by the operator) at
/// `cluster init`, kept in the metadata group, never returned by any RPC. Its `Debug` prints
/// no byte of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PhoneKey([u8; PHONE_KEY_BYTES]);

impl PhoneKey {
    /// Wraps key bytes.
    pub const fn new(bytes: [u8; PHONE_KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The key bytes (for storing them in the metadata group).
    pub const fn expose(&self) -> &[u8; PHONE_KEY_BYTES] {
        &self.0
    }

    /// Parses the form key files hold: 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let digits = text.trim().as_bytes();
        if digits.len() != PHONE_KEY_BYTES * 2 {
            return None;
        }
        let mut key = [0_u8; PHONE_KEY_BYTES];
        for (byte, pair) in key.iter_mut().zip(digits.chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(key))
    }
}

impl std::fmt::Debug for PhoneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhoneKey(redacted)")
    }
}

/// How a cluster turns a phone number into its user id and into the hash the log stores.
///
/// A cluster created with a key (every cluster since the key existed) uses HMAC-SHA256 under
/// it, so neither output can be reversed by enumerating numbers without the key. A cluster
/// whose metadata group holds no key (created before) keeps the unkeyed xxh3 it started with:
/// user ids are forever, so a cluster can never switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhoneHasher {
    /// HMAC-SHA256 under the cluster's key.
    Keyed(PhoneKey),
    /// xxh3 with the public seeds above (clusters created without a key).
    Unkeyed,
}

impl PhoneHasher {
    /// The user a phone number registers as (an id of zero is mapped to 1). Stable for the
    /// cluster's life, so every node agrees without a lookup.
    pub fn user_of_phone(&self, phone: &str) -> UserId {
        let raw = match self {
            PhoneHasher::Keyed(key) => {
                let mac = keyed(key, USER_OF_PHONE_LABEL, phone);
                u64::from_be_bytes(mac[..8].try_into().expect("8 of 32 bytes"))
            }
            PhoneHasher::Unkeyed => xxh3_64_with_seed(phone.as_bytes(), USER_OF_PHONE_SEED),
        };
        UserId::new(raw).unwrap_or(UserId::new(1).expect("1 is nonzero"))
    }

    /// The 16-byte hash of a phone number that the log stores instead of the number.
    pub fn phone_hash(&self, phone: &str) -> [u8; 16] {
        match self {
            PhoneHasher::Keyed(key) => keyed(key, PHONE_HASH_LABEL, phone)[..16]
                .try_into()
                .expect("16 of 32 bytes"),
            PhoneHasher::Unkeyed => {
                xxhash_rust::xxh3::xxh3_128_with_seed(phone.as_bytes(), PHONE_HASH_SEED)
                    .to_be_bytes()
            }
        }
    }
}

impl PhoneHasher {
    /// The hash of a registration code for a number (by its [`PhoneHasher::phone_hash`]) that
    /// the log stores instead of the code: HMAC-SHA256 under the cluster's key, so the log does
    /// not give the code away to whoever reads it (SHA-256, which it would, on a cluster without
    /// a key).
    pub fn code_hash(&self, phone_hash: &[u8], code: &str) -> [u8; 32] {
        let mut input = Vec::with_capacity(phone_hash.len() + code.len());
        input.extend_from_slice(phone_hash);
        input.extend_from_slice(code.as_bytes());
        match self {
            PhoneHasher::Keyed(key) => keyed_bytes(key, CODE_HASH_LABEL, &input),
            PhoneHasher::Unkeyed => {
                use sha2::Digest as _;
                let mut hash = sha2::Sha256::new();
                hash.update(CODE_HASH_LABEL);
                hash.update(&input);
                hash.finalize().into()
            }
        }
    }
}

/// HMAC-SHA256(key, label ‖ phone).
fn keyed(key: &PhoneKey, label: &[u8], phone: &str) -> [u8; 32] {
    keyed_bytes(key, label, phone.as_bytes())
}

/// HMAC-SHA256(key, label ‖ input).
fn keyed_bytes(key: &PhoneKey, label: &[u8], input: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key.expose()).expect("HMAC takes any key");
    mac.update(label);
    mac.update(input);
    mac.finalize().into_bytes().into()
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

    /// Pins the keyed hashes. Computed independently with Python's `hmac`:
    /// `hmac.new(bytes(range(32)), b"courier/user-of-phone\\0" + phone, sha256)`, the first 8
    /// bytes big-endian for the user, the first 16 of the `courier/phone-hash\\0` MAC for the
    /// hash.
    #[test]
    fn keyed_phone_hash_test_vectors() {
        let key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).expect("below 32"));
        let hasher = PhoneHasher::Keyed(PhoneKey::new(key));
        let vectors = [
            (
                "+15550001234",
                7_665_396_358_959_583_736_u64,
                "568e5a3c424aecbf6f89aa850812d7ab",
            ),
            (
                "+491701234567",
                2_727_086_121_839_279_838,
                "625f62d8ea0c0acc45264dd76451663f",
            ),
        ];
        for (phone, user, hash) in vectors {
            assert_eq!(hasher.user_of_phone(phone).get(), user, "{phone}");
            let hex: String = hasher
                .phone_hash(phone)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, hash, "{phone}");
        }
    }

    /// Another key gives other ids and hashes, and neither is the unkeyed one: the number
    /// cannot be found by enumerating it through the public function.
    #[test]
    fn the_key_changes_every_output_and_stays_out_of_debug() {
        let a = PhoneHasher::Keyed(PhoneKey::new([1; 32]));
        let b = PhoneHasher::Keyed(PhoneKey::new([2; 32]));
        let phone = "+15550001234";
        for (x, y) in [(a, b), (a, PhoneHasher::Unkeyed), (b, PhoneHasher::Unkeyed)] {
            assert_ne!(x.user_of_phone(phone), y.user_of_phone(phone));
            assert_ne!(x.phone_hash(phone), y.phone_hash(phone));
        }
        assert_eq!(format!("{a:?}"), "Keyed(PhoneKey(redacted))");
        let hex = "01".repeat(32);
        assert_eq!(
            PhoneKey::from_hex(&format!(" {hex}\n")),
            Some(PhoneKey::new([1; 32]))
        );
        for bad in ["01", &"zz".repeat(32), &"0".repeat(63), &"01".repeat(33)] {
            assert_eq!(PhoneKey::from_hex(bad), None, "{bad:?}");
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
