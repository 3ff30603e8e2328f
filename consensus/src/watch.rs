//! Targeted wake-ups after apply: a device stream waits for its own user, the outbox forwarders
//! for outbox changes, and nobody else is woken.
//!
//! ```text
//!  StateMachine::apply ──Touched{users, outbox}──▶ ApplyWatch ──▶ the streams of those users
//!                                                             └─▶ the forwarders (outbox changed)
//!  snapshot install, projection swap ───────────────────────▶ everyone (anything may have changed)
//! ```
//!
//! A waiter registers (`Notified::enable`) before it reads, then waits: an apply between its read
//! and its wait still wakes it. The watch holds one entry per user with a stream open on this
//! node; the last [`UserWatch`] of a user removes it, so memory follows the open streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use courier_proto::{ShardId, UserId};
use courier_storage::Touched;
use tokio::sync::Notify;

/// The node-wide registry of apply waiters (every raft group of the node reports to it).
#[derive(Debug, Default)]
pub struct ApplyWatch {
    users: Mutex<HashMap<UserId, Arc<Notify>>>,
    outbox: Notify,
    outbox_epochs: Mutex<HashMap<ShardId, u64>>,
    outbox_resets: AtomicU64,
    wakeups: AtomicU64,
    devices_epoch: AtomicU64,
    keys_epoch: AtomicU64,
    event_format: AtomicU32,
}

impl ApplyWatch {
    /// Watches `user`'s inbox and receipts on every group of this node.
    pub fn user(self: &Arc<Self>, user: UserId) -> UserWatch {
        let notify = self
            .users
            .lock()
            .expect("apply watch lock is never poisoned")
            .entry(user)
            .or_default()
            .clone();
        UserWatch {
            watch: self.clone(),
            user,
            notify,
        }
    }

    /// Notified after a batch that changed an outbox (an entry queued or trimmed), and after a
    /// snapshot install or projection swap.
    pub fn outbox(&self) -> &Notify {
        &self.outbox
    }

    /// Where `shard`'s outbox stands: moves after every applied batch that changed it (after the
    /// batch is written) and at every snapshot install or projection swap, so outbox states read
    /// at an epoch (taken before the read) are still current while the epoch has not moved.
    pub fn outbox_epoch(&self, shard: ShardId) -> OutboxEpoch {
        let changes = self
            .outbox_epochs
            .lock()
            .expect("apply watch lock is never poisoned")
            .get(&shard)
            .copied()
            .unwrap_or(0);
        OutboxEpoch {
            resets: self.outbox_resets.load(Ordering::Acquire),
            changes,
        }
    }

    /// Waiters woken since start (user watches woken, each counted once per batch; the outbox
    /// watch once per batch).
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// Moves on each time a batch that changed a device record is applied on this node (and at a
    /// snapshot install or projection swap): a device check made at an earlier epoch may be stale.
    pub fn devices_epoch(&self) -> u64 {
        self.devices_epoch.load(Ordering::Acquire)
    }

    /// Moves on each time a batch that changed a device's published keys or prekey stock is
    /// applied on this node (and at a snapshot install or projection swap): a stream's check of
    /// its device's stock made at an earlier epoch may be stale.
    pub fn keys_epoch(&self) -> u64 {
        self.keys_epoch.load(Ordering::Acquire)
    }

    /// The event format this node's leaders write (`EntryPayload.format_version`): the metadata
    /// group's, as applied here, and never above what this build writes; 1 until the metadata
    /// group applied a raise (always safe: every build reads it).
    pub fn event_format(&self) -> u32 {
        self.event_format
            .load(Ordering::Acquire)
            .clamp(1, courier_proto::FORMAT_VERSION)
    }

    /// Records the metadata group's applied event format (never lowers it).
    pub(crate) fn note_event_format(&self, format: u32) {
        self.event_format.fetch_max(format, Ordering::AcqRel);
    }

    /// Wakes the waiters of what one applied batch of `shard` (`None`: the metadata group)
    /// touched.
    pub(crate) fn applied(&self, shard: Option<ShardId>, touched: &Touched) {
        if touched.devices {
            self.devices_epoch.fetch_add(1, Ordering::AcqRel);
        }
        if touched.keys {
            self.keys_epoch.fetch_add(1, Ordering::AcqRel);
        }
        if !touched.users.is_empty() {
            let users = self
                .users
                .lock()
                .expect("apply watch lock is never poisoned");
            for user in &touched.users {
                if let Some(notify) = users.get(user) {
                    notify.notify_waiters();
                    self.wakeups.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if touched.outbox {
            if let Some(shard) = shard {
                let mut epochs = self
                    .outbox_epochs
                    .lock()
                    .expect("apply watch lock is never poisoned");
                let changes = epochs.entry(shard).or_default();
                *changes = changes.wrapping_add(1);
            }
            self.outbox.notify_waiters();
            self.wakeups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wakes every waiter: a snapshot install or a projection swap may have changed anything.
    pub(crate) fn everything(&self) {
        self.devices_epoch.fetch_add(1, Ordering::AcqRel);
        self.keys_epoch.fetch_add(1, Ordering::AcqRel);
        for notify in self
            .users
            .lock()
            .expect("apply watch lock is never poisoned")
            .values()
        {
            notify.notify_waiters();
        }
        self.outbox_resets.fetch_add(1, Ordering::AcqRel);
        self.outbox.notify_waiters();
    }

    /// Users with a watch open (for tests and status).
    pub fn watched_users(&self) -> usize {
        self.users
            .lock()
            .expect("apply watch lock is never poisoned")
            .len()
    }
}

/// A point in one shard's outbox history ([`ApplyWatch::outbox_epoch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxEpoch {
    resets: u64,
    changes: u64,
}

/// One waiter's registration for a user; dropping the last one of a user forgets the user.
#[derive(Debug)]
pub struct UserWatch {
    watch: Arc<ApplyWatch>,
    user: UserId,
    notify: Arc<Notify>,
}

impl UserWatch {
    /// A wake-up for the next batch that touches this user (enable it before reading).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for UserWatch {
    fn drop(&mut self) {
        let mut users = self
            .watch
            .users
            .lock()
            .expect("apply watch lock is never poisoned");
        // Ours is released under the lock, so of two last watches dropped at once one sees the
        // other's gone and forgets the user.
        drop(std::mem::take(&mut self.notify));
        if users
            .get(&self.user)
            .is_some_and(|notify| Arc::strong_count(notify) == 1)
        {
            users.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).expect("nonzero")
    }

    fn touched(users: &[u64], outbox: bool) -> Touched {
        Touched {
            users: users.iter().map(|u| user(*u)).collect(),
            outbox,
            devices: false,
            keys: false,
        }
    }

    #[test]
    fn a_device_change_moves_the_devices_epoch() {
        let watch = ApplyWatch::default();
        let before = watch.devices_epoch();
        watch.applied(Some(ShardId::new(0)), &touched(&[1], true));
        assert_eq!(watch.devices_epoch(), before, "no device record changed");
        watch.applied(
            None,
            &Touched {
                devices: true,
                ..Touched::default()
            },
        );
        assert_eq!(watch.devices_epoch(), before + 1);
        watch.everything();
        assert_eq!(watch.devices_epoch(), before + 2);
    }

    #[tokio::test]
    async fn a_batch_wakes_only_the_users_it_touched() {
        let watch = Arc::new(ApplyWatch::default());
        let alice = watch.user(user(1));
        let bob = watch.user(user(2));
        let alice_woken = alice.notified();
        let bob_woken = bob.notified();
        tokio::pin!(alice_woken, bob_woken);
        alice_woken.as_mut().enable();
        bob_woken.as_mut().enable();
        watch.applied(Some(ShardId::new(0)), &touched(&[1, 3], false));
        tokio::time::timeout(Duration::from_secs(1), alice_woken)
            .await
            .expect("alice's watch is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), bob_woken)
                .await
                .is_err(),
            "bob's watch is not woken by a batch that did not touch him"
        );
        assert_eq!(watch.wakeups(), 1);
    }

    #[tokio::test]
    async fn the_last_watch_of_a_user_forgets_the_user() {
        let watch = Arc::new(ApplyWatch::default());
        let first = watch.user(user(7));
        let second = watch.user(user(7));
        assert_eq!(watch.watched_users(), 1);
        drop(first);
        assert_eq!(
            watch.watched_users(),
            1,
            "one stream of the user is still open"
        );
        drop(second);
        assert_eq!(watch.watched_users(), 0);
    }

    #[test]
    fn a_shards_outbox_epoch_moves_with_its_own_changes_and_with_everything() {
        let watch = ApplyWatch::default();
        let (zero, one) = (ShardId::new(0), ShardId::new(1));
        let before = (watch.outbox_epoch(zero), watch.outbox_epoch(one));
        watch.applied(Some(zero), &touched(&[1], false));
        assert_eq!(
            watch.outbox_epoch(zero),
            before.0,
            "the batch did not change the outbox"
        );
        watch.applied(Some(zero), &touched(&[], true));
        assert_ne!(watch.outbox_epoch(zero), before.0);
        assert_eq!(watch.outbox_epoch(one), before.1, "shard 1 did not change");
        let after_zero = watch.outbox_epoch(zero);
        watch.everything();
        assert_ne!(watch.outbox_epoch(zero), after_zero);
        assert_ne!(
            watch.outbox_epoch(one),
            before.1,
            "an install may change any outbox"
        );
    }

    #[tokio::test]
    async fn everything_wakes_every_user_and_the_outbox() {
        let watch = Arc::new(ApplyWatch::default());
        let alice = watch.user(user(1));
        let alice_woken = alice.notified();
        let outbox_woken = watch.outbox().notified();
        tokio::pin!(alice_woken, outbox_woken);
        alice_woken.as_mut().enable();
        outbox_woken.as_mut().enable();
        watch.everything();
        tokio::time::timeout(Duration::from_secs(1), async {
            alice_woken.await;
            outbox_woken.await;
        })
        .await
        .expect("both woken");
    }
}
