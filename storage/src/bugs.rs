//! Deliberate bugs of the storage layer, for proving that the deterministic simulation (`sim/`)
//! catches them. Compiled only with the cargo feature `bugs`; without it
//! [`unsynced_log_appends`] is a constant `false` and the branch on it folds away.
//!
//! * unsynced-log-appends: [`LogStore::append`](crate::LogStore::append) writes without an
//!   fsync, so raft counts entries as durable that a power loss can take back (found only with
//!   a disk that loses unsynced writes: [`MemDisk`](crate::MemDisk)).

#[cfg(feature = "bugs")]
static UNSYNCED_LOG_APPENDS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Switches unsynced-log-appends on or off for this process.
#[cfg(feature = "bugs")]
pub fn set_unsynced_log_appends(on: bool) {
    UNSYNCED_LOG_APPENDS.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Whether unsynced-log-appends is on.
#[cfg(feature = "bugs")]
pub fn unsynced_log_appends() -> bool {
    UNSYNCED_LOG_APPENDS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Whether unsynced-log-appends is on: never, without the `bugs` feature.
#[cfg(not(feature = "bugs"))]
pub const fn unsynced_log_appends() -> bool {
    false
}
