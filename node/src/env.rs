//! The node's wall clock and randomness, behind one seam the deterministic simulation can drive.
//!
//! ```text
//!   production:  now_ms() = SystemTime          random_*() = rand::rng() (OS-seeded, per thread)
//!                                               uuid_v7() = Uuid::now_v7()
//!   simulation:  now_ms() = the simulator's     random_*() = one StdRng seeded from the run's seed
//!                clock (installed once)         (installed per run, removed after it)
//!                                               uuid_v7() = from now_ms() and that StdRng
//! ```
//!
//! Everything the node stamps into events (sent, acked, read, registered, expired) reads
//! [`now_ms`]; projections never read a clock. Timers and deadlines use `tokio::time`, which the
//! simulator drives already.

use std::sync::{Mutex, OnceLock, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

static CLOCK: OnceLock<fn() -> u64> = OnceLock::new();
static SEEDED: Mutex<Option<StdRng>> = Mutex::new(None);

/// The current time, unix ms: decided here, carried in events.
pub fn now_ms() -> u64 {
    match CLOCK.get() {
        Some(clock) => clock(),
        None => system_now_ms(),
    }
}

fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Simulation only: every later [`now_ms`] in this process reads `clock`. Set once; a second
/// call is ignored (returns false).
pub fn install_clock(clock: fn() -> u64) -> bool {
    CLOCK.set(clock).is_ok()
}

/// Simulation only: with `Some(seed)` every later random draw of this process comes from one
/// generator seeded with it; `None` goes back to the OS-seeded generator.
pub fn seed_randomness(seed: Option<u64>) {
    *SEEDED.lock().unwrap_or_else(PoisonError::into_inner) = seed.map(StdRng::seed_from_u64);
}

/// Runs `draw` on the process's generator: the seeded one when installed, else `rand::rng()`.
pub fn with_rng<T>(draw: impl FnOnce(&mut dyn rand::RngCore) -> T) -> T {
    let mut seeded = SEEDED.lock().unwrap_or_else(PoisonError::into_inner);
    match seeded.as_mut() {
        Some(rng) => draw(rng),
        None => {
            drop(seeded);
            draw(&mut rand::rng())
        }
    }
}

/// A fresh UUIDv7 (message ids): `Uuid::now_v7()`, or, once the simulation seeded the
/// randomness, one made from [`now_ms`] and the seeded generator.
pub fn uuid_v7() -> uuid::Uuid {
    let simulated = SEEDED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some();
    if simulated {
        let random: [u8; 10] = random_bytes();
        uuid::Builder::from_unix_timestamp_millis(now_ms(), &random).into_uuid()
    } else {
        uuid::Uuid::now_v7()
    }
}

/// A uniformly random `u64` in `range`.
pub fn random_range(range: std::ops::RangeInclusive<u64>) -> u64 {
    with_rng(|rng| rng.random_range(range))
}

/// Random bytes (device tokens).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    with_rng(|rng| {
        let mut bytes = [0_u8; N];
        rng.fill_bytes(&mut bytes);
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_repeats_its_draws_and_none_goes_back_to_the_os() {
        seed_randomness(Some(7));
        let first: Vec<u64> = (0..4).map(|_| random_range(0..=u64::MAX)).collect();
        seed_randomness(Some(7));
        let second: Vec<u64> = (0..4).map(|_| random_range(0..=u64::MAX)).collect();
        assert_eq!(first, second);
        seed_randomness(None);
        let os: [u8; 32] = random_bytes();
        let again: [u8; 32] = random_bytes();
        assert_ne!(os, again, "OS-seeded draws differ");
    }
}
