//! Deliberate bugs, for proving that the deterministic simulation (`sim/`) catches the class of
//! bug it exists for. Compiled only with the cargo feature `bugs`; without it each switch is a
//! constant `false` and the branch on it folds away.
//!
//! * ack-before-commit: on the leader, the proposer answers every caller as soon as raft took the
//!   batch, before it commits (lost when that leader is partitioned away or crashes before the
//!   entry reached a quorum).
//! * purge-before-install: the log store purges up to a received snapshot at once, without
//!   waiting for the state machine to hold it (courier before a158a99; openraft 0.9 purges right
//!   after it hands the install over). A crash inside the install leaves a log purged past what
//!   the state machine applied, and openraft refuses to start on that.

#[cfg(feature = "bugs")]
static ACK_BEFORE_COMMIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Switches ack-before-commit on or off for this process.
#[cfg(feature = "bugs")]
pub fn set_ack_before_commit(on: bool) {
    ACK_BEFORE_COMMIT.store(on, std::sync::atomic::Ordering::SeqCst);
    if on {
        tracing::warn!("DELIBERATE BUG ACTIVE: ack-before-commit (test builds only)");
    }
}

/// Whether ack-before-commit is on.
#[cfg(feature = "bugs")]
pub fn ack_before_commit() -> bool {
    ACK_BEFORE_COMMIT.load(std::sync::atomic::Ordering::SeqCst)
}

/// Whether ack-before-commit is on: never, without the `bugs` feature.
#[cfg(not(feature = "bugs"))]
pub const fn ack_before_commit() -> bool {
    false
}

#[cfg(feature = "bugs")]
static PURGE_BEFORE_INSTALL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Switches purge-before-install on or off for this process.
#[cfg(feature = "bugs")]
pub fn set_purge_before_install(on: bool) {
    PURGE_BEFORE_INSTALL.store(on, std::sync::atomic::Ordering::SeqCst);
    if on {
        tracing::warn!("DELIBERATE BUG ACTIVE: purge-before-install (test builds only)");
    }
}

/// Whether purge-before-install is on.
#[cfg(feature = "bugs")]
pub fn purge_before_install() -> bool {
    PURGE_BEFORE_INSTALL.load(std::sync::atomic::Ordering::SeqCst)
}

/// Whether purge-before-install is on: never, without the `bugs` feature.
#[cfg(not(feature = "bugs"))]
pub const fn purge_before_install() -> bool {
    false
}
