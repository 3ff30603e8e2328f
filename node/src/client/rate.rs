//! Rate limits as token buckets, one per key: per device for sends (`sends-per-second-per-device`
//! up to `send-burst-per-device`) and typing updates; per client address for code requests and
//! register attempts (the per-number limits are in the log: `courier_storage`'s registration
//! records). An empty bucket answers `RESOURCE_EXHAUSTED` with
//! `retry-after-ms`; other keys are unaffected (each has its own bucket, and a refusal costs one
//! map lookup).
//!
//! The map is bounded: past [`BUCKETS_MAX`] keys, buckets that refilled completely (idle keys)
//! are dropped, which forgets nothing a full bucket would not grant anyway; if none did, the one
//! idle longest is dropped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::time::Instant;

use crate::status::ApiError;

/// The code of a refusal by a token bucket, unless a limiter names its own.
pub const RATE_LIMITED: &str = "COURIER:Limits:RateLimited";

/// Keys tracked at most before idle buckets are dropped.
pub const BUCKETS_MAX: usize = 100_000;

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
            buckets: Mutex::default(),
        }
    }

    /// The same limiter, refusing with `code` instead of [`RATE_LIMITED`].
    #[must_use]
    pub fn refusing_with(self, code: &'static str) -> Self {
        Self { code, ..self }
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
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(key) {
            let (rate, burst) = (self.rate_per_s, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            // Still full of keys that spent tokens (many callers at once): the one idle longest
            // goes, so memory stays bounded (it gets a fresh bucket if it comes back).
            if buckets.len() >= BUCKETS_MAX
                && let Some(idle) = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(k, _)| k.clone())
            {
                buckets.remove(&idle);
            }
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
