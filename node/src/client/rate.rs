//! Per-device send rate limits: a token bucket per (user, device), `sends-per-second-per-device`
//! tokens a second up to `send-burst-per-device`. An empty bucket answers `RESOURCE_EXHAUSTED`
//! with `retry-after-ms`; other devices are unaffected (each has its own bucket, and a refused
//! send costs one map lookup).
//!
//! The map is bounded: past [`BUCKETS_MAX`] devices, buckets that refilled completely (idle
//! devices) are dropped, which forgets nothing a full bucket would not grant anyway.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::status::ApiError;

/// Devices tracked at most before idle buckets are dropped.
pub const BUCKETS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets of every device sending through this node.
#[derive(Debug)]
pub struct SendLimiter {
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<BTreeMap<(u64, u32), Bucket>>,
}

impl SendLimiter {
    /// A limiter granting `rate_per_s` sends a second with bursts of `burst`.
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        Self {
            rate_per_s: f64::from(rate_per_s),
            burst: f64::from(burst),
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `(user, device)`.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` (`COURIER:Limits:RateLimited`) with the wait until the next token.
    pub fn take(&self, user: u64, device: u32) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .expect("rate limiter lock is never poisoned");
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(&(user, device)) {
            let (rate, burst) = (self.rate_per_s, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry((user, device)).or_insert(Bucket {
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
            message: format!(
                "more than {} sends a second from this device",
                self.rate_per_s
            ),
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
        let limiter = SendLimiter::new(10, 3);
        for _ in 0..3 {
            limiter.take(1, 1).expect("within the burst");
        }
        match limiter.take(1, 1) {
            Err(ApiError::RateLimited { retry_after_ms, .. }) => {
                assert!((1..=100).contains(&retry_after_ms), "{retry_after_ms}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        limiter
            .take(1, 2)
            .expect("another device has its own bucket");
        limiter.take(2, 1).expect("another user has its own bucket");
    }
}
