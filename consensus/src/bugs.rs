//! Deliberate bugs, for proving that the deterministic simulation (`sim/`) catches the class of
//! bug it exists for. Compiled only with the cargo feature `bugs`; without it [`ack_before_commit`]
//! is a constant `false` and the branch on it folds away.
//!
//! * ack-before-commit: on the leader, the proposer answers every caller as soon as raft took the
//!   batch, before it commits (lost when that leader is partitioned away or crashes before the
//!   entry reached a quorum).

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
