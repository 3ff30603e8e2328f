//! Rate limits as token buckets, one per key: per device for sends (`sends-per-second-per-device`
//! up to `send-burst-per-device`) and typing updates; per client address for code requests and
//! register attempts (the per-number limits are in the log: `courier_storage`'s registration
//! records). An empty bucket answers `RESOURCE_EXHAUSTED` with
//! `retry-after-ms`; other keys are unaffected (each has its own bucket, and a refusal costs one
//! map lookup).
//!
//! The map is bounded (`limits.rate-limit-keys-max`, default [`KEYS_MAX`]): when a new key finds
//! it full, buckets that refilled completely (idle keys) are dropped, which forgets nothing a full
//! bucket would not grant anyway; if that leaves the map nearly full, the keys idle longest go
//! too, [`EVICT_SHARE_PERCENT`] of the map at once. A pass is one walk of the map, and the next
//! one comes only after that many new keys: a caller cycling through new keys costs the node a
//! few map operations per request, not a walk of the whole map per request.

use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::time::Instant;

use crate::status::ApiError;

/// The code of a refusal by a token bucket, unless a limiter names its own.
pub const RATE_LIMITED: &str = "COURIER:Limits:RateLimited";

/// Keys one limiter tracks at most by default (`limits.rate-limit-keys-max`).
pub const KEYS_MAX: usize = 100_000;
/// The share of a full map an eviction pass frees, in percent.
pub const EVICT_SHARE_PERCENT: usize = 1;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by `K`, all with one rate and burst.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate_per_s: f64,
    burst: f64,
    /// What is limited, for the refusal message ("sends from this device").
    what: &'static str,
    /// The refusal's stable code.
    code: &'static str,
    /// Keys tracked at most.
    keys_max: usize,
    buckets: Mutex<BTreeMap<K, Bucket>>,
}

/// Sends (and typing updates) per (user, device).
pub type SendLimiter = RateLimiter<(u64, u32)>;
/// Code requests or register attempts per client address (see [`address_key`]).
pub type AddressLimiter = RateLimiter<std::net::IpAddr>;

/// The key a client address is limited by: an IPv4 address (an IPv4-mapped IPv6 one too), or
/// the /64 network of an IPv6 address (one host usually holds a whole /64, so limiting single
/// IPv6 addresses would limit nothing).
pub fn address_key(address: std::net::IpAddr) -> std::net::IpAddr {
    match address {
        std::net::IpAddr::V4(v4) => v4.into(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => {
                let bits = u128::from(v6) & !u128::from(u64::MAX);
                std::net::Ipv6Addr::from(bits).into()
            }
        },
    }
}

impl<K: Ord + Clone> RateLimiter<K> {
    /// A limiter granting `rate_per_s` tokens a second with bursts of `burst`.
    pub fn new(rate_per_s: u32, burst: u32, what: &'static str) -> Self {
        Self::per_second(f64::from(rate_per_s), burst, what)
    }

    /// A limiter granting `per_hour` tokens an hour with bursts of `burst`.
    pub fn per_hour(per_hour: u32, burst: u32, what: &'static str) -> Self {
        Self::per_second(f64::from(per_hour) / 3600.0, burst, what)
    }

    fn per_second(rate_per_s: f64, burst: u32, what: &'static str) -> Self {
        Self {
            rate_per_s,
            burst: f64::from(burst),
            what,
            code: RATE_LIMITED,
            keys_max: KEYS_MAX,
            buckets: Mutex::default(),
        }
    }

    /// The same limiter, refusing with `code` instead of [`RATE_LIMITED`].
    #[must_use]
    pub fn refusing_with(self, code: &'static str) -> Self {
        Self { code, ..self }
    }

    /// The same limiter, tracking at most `keys_max` keys (at least 1).
    #[must_use]
    pub fn holding(self, keys_max: usize) -> Self {
        Self {
            keys_max: keys_max.max(1),
            ..self
        }
    }

    /// Drops the buckets that refilled completely; if that leaves the map within
    /// [`EVICT_SHARE_PERCENT`] of full, the keys touched longest ago go too, down to that mark.
    fn evict(&self, buckets: &mut BTreeMap<K, Bucket>, now: Instant) {
        let (rate, burst) = (self.rate_per_s, self.burst);
        buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        let room = (self.keys_max / 100)
            .saturating_mul(EVICT_SHARE_PERCENT)
            .max(1);
        let excess = buckets
            .len()
            .saturating_sub(self.keys_max.saturating_sub(room));
        if excess == 0 {
            return;
        }
        // Still nearly full of keys that spent tokens (many callers at once): memory stays
        // bounded, and a key that comes back gets a fresh bucket.
        let mut idle: Vec<(Instant, K)> = buckets.iter().map(|(k, b)| (b.at, k.clone())).collect();
        if excess < idle.len() {
            idle.select_nth_unstable(excess);
        }
        for (_, key) in idle.iter().take(excess) {
            buckets.remove(key);
        }
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets.lock().expect("rate limiter lock").len()
    }

    /// Takes one token for `key`.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` (`COURIER:Limits:RateLimited`) with the wait until the next token.
    pub fn take(&self, key: &K) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .expect("rate limiter lock is never poisoned");
        if buckets.len() >= self.keys_max && !buckets.contains_key(key) {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = (bucket.tokens
            + now.duration_since(bucket.at).as_secs_f64() * self.rate_per_s)
            .min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = ((1.0 - bucket.tokens) / self.rate_per_s * 1000.0).ceil();
        Err(ApiError::RateLimited {
            code: self.code,
            message: format!("too many {}; retry later", self.what),
            retry_after_ms: if wait_ms.is_finite() && wait_ms > 0.0 {
                wait_ms as u64
            } else {
                1
            },
        })
    }
}

/// The node's in-memory token buckets, one limiter per limit of `[limits]`, each tracking at most
/// `limits.rate-limit-keys-max` keys.
#[derive(Debug)]
pub struct Limiters {
    /// Sends per device.
    pub send: SendLimiter,
    /// Typing updates per device (past them, frames are dropped).
    pub typing: SendLimiter,
    /// Presence lookups per device.
    pub presence: SendLimiter,
    /// "Unknown recipient" answers per device.
    pub unknown_recipient: SendLimiter,
    /// Prekey bundle fetches per device (each takes a one-time prekey from every device of the
    /// user fetched: unbounded fetches would drain stocks).
    pub prekey_fetch: SendLimiter,
    /// Fetches of one user's bundle by one other user (fetcher, fetched).
    pub prekey_pair: RateLimiter<(u64, u64)>,
    /// Key uploads per device (each is a log entry of up to ~170 KB).
    pub key_upload: SendLimiter,
    /// Code requests per client address (the per-number limits are in the log).
    pub code: AddressLimiter,
    /// Register attempts per client address.
    pub register: AddressLimiter,
    /// Group changes per device (each is a log entry on the group's shard).
    pub group_change: SendLimiter,
    /// `StartPairing` calls per client address (a pairing needs no login and holds a slot of
    /// the node's `limits.pairings-max`).
    pub pairing: AddressLimiter,
}

impl Limiters {
    /// Every limiter, as `limits` configures it.
    pub fn new(limits: &crate::config::Limits) -> Self {
        let keys = usize::try_from(limits.rate_limit_keys_max).unwrap_or(usize::MAX);
        let l = limits;
        Self {
            send: SendLimiter::new(
                l.sends_per_second_per_device,
                l.send_burst_per_device,
                "sends from this device",
            )
            .holding(keys),
            typing: SendLimiter::new(
                l.typing_per_second_per_device,
                l.typing_burst_per_device,
                "typing updates from this device",
            )
            .holding(keys),
            presence: SendLimiter::new(
                l.presence_lookups_per_second_per_device,
                l.presence_lookup_burst_per_device,
                "presence lookups from this device",
            )
            .holding(keys),
            unknown_recipient: SendLimiter::per_hour(
                l.unknown_recipients_per_hour_per_device,
                l.unknown_recipient_burst_per_device,
                "sends to unknown users from this device",
            )
            .holding(keys),
            prekey_fetch: SendLimiter::per_hour(
                l.prekey_fetches_per_hour_per_device,
                l.prekey_fetch_burst_per_device,
                "prekey bundle fetches from this device",
            )
            .holding(keys),
            prekey_pair: RateLimiter::per_hour(
                l.prekey_fetches_per_hour_per_pair,
                l.prekey_fetch_burst_per_pair,
                "fetches of this user's prekeys",
            )
            .holding(keys),
            key_upload: SendLimiter::per_hour(
                l.key_uploads_per_hour_per_device,
                l.key_upload_burst_per_device,
                "key uploads from this device",
            )
            .holding(keys),
            code: AddressLimiter::per_hour(
                l.code_requests_per_hour_per_address,
                l.code_request_burst_per_address,
                "code requests from this address",
            )
            .refusing_with(super::registration::TOO_MANY_CODES)
            .holding(keys),
            register: AddressLimiter::per_hour(
                l.register_attempts_per_hour_per_address,
                l.register_attempt_burst_per_address,
                "register attempts from this address",
            )
            .holding(keys),
            group_change: SendLimiter::per_hour(
                l.group_changes_per_hour_per_device,
                l.group_change_burst_per_device,
                "group changes from this device",
            )
            .holding(keys),
            pairing: AddressLimiter::per_hour(
                l.pairings_per_hour_per_address,
                l.pairing_burst_per_address,
                "pairings started from this address",
            )
            .holding(keys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusal_per_device() {
        let limiter = SendLimiter::new(10, 3, "sends");
        for _ in 0..3 {
            limiter.take(&(1, 1)).expect("within the burst");
        }
        match limiter.take(&(1, 1)) {
            Err(ApiError::RateLimited { retry_after_ms, .. }) => {
                assert!((1..=100).contains(&retry_after_ms), "{retry_after_ms}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        limiter
            .take(&(1, 2))
            .expect("another device has its own bucket");
        limiter
            .take(&(2, 1))
            .expect("another user has its own bucket");
    }

    #[test]
    fn an_ipv6_host_is_limited_by_its_64() {
        let one: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("v6");
        let same: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("v6");
        let other: std::net::IpAddr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(address_key(one), address_key(same));
        assert_ne!(address_key(one), address_key(other));
        let mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().expect("v6");
        assert_eq!(
            address_key(mapped),
            "192.0.2.7".parse::<std::net::IpAddr>().expect("v4")
        );
    }

    /// Puts `key` in the map with `tokens` left, last touched `ago`.
    fn spent(limiter: &SendLimiter, key: (u64, u32), tokens: f64, ago: std::time::Duration) {
        let at = Instant::now()
            .checked_sub(ago)
            .expect("the clock is past `ago`");
        limiter
            .buckets
            .lock()
            .expect("lock")
            .insert(key, Bucket { tokens, at });
    }

    #[test]
    fn a_full_map_frees_its_oldest_share_at_once() {
        let limiter = SendLimiter::new(1, 5, "sends").holding(200);
        // 200 keys that spent every token, user u touched (300 - u) ms ago.
        for user in 0..200 {
            spent(
                &limiter,
                (user, 1),
                0.0,
                std::time::Duration::from_millis(300 - user),
            );
        }
        limiter.take(&(200, 1)).expect("a new key past the bound");
        assert_eq!(
            limiter.keys(),
            199,
            "1 % (2 keys) freed, then the new one added"
        );
        for user in 0..2 {
            assert!(
                !limiter
                    .buckets
                    .lock()
                    .expect("lock")
                    .contains_key(&(user, 1)),
                "the keys touched longest ago go first: {user}"
            );
        }
        assert!(limiter.buckets.lock().expect("lock").contains_key(&(2, 1)));
        limiter.take(&(201, 1)).expect("room left: no pass");
        assert_eq!(limiter.keys(), 200);
        assert!(
            limiter.take(&(2, 1)).is_err(),
            "a key that stayed keeps its empty bucket"
        );
        // Every bucket refilled (5 tokens at 1/s, 10 s ago): the next pass drops them all, well
        // past the 1 %, since a full bucket grants what a fresh one would.
        for user in 0..200 {
            spent(&limiter, (user, 1), 0.0, std::time::Duration::from_secs(10));
        }
        limiter.take(&(202, 1)).expect("another new key");
        assert_eq!(
            limiter.keys(),
            3,
            "refilled buckets dropped; 200..=202 stay"
        );
    }

    #[test]
    fn an_hourly_limit_refuses_for_minutes() {
        let limiter = AddressLimiter::per_hour(6, 2, "code requests from this address");
        let (one, two) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
        limiter.take(&one).expect("first");
        limiter.take(&one).expect("second, within the burst");
        match limiter.take(&one) {
            Err(ApiError::RateLimited {
                retry_after_ms,
                message,
                ..
            }) => {
                assert!(
                    (500_000..=600_000).contains(&retry_after_ms),
                    "one token per 10 minutes: {retry_after_ms}"
                );
                assert!(message.contains("code requests"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        limiter.take(&two).expect("another address");
    }
}
