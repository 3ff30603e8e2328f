//! Presence: who has a device stream open, and when each user was last seen. Ephemeral by
//! design: never logged, held in memory by each user's shard leader.
//!
//! * Every node reports the device streams it holds to the users' shard leaders: when a stream
//!   opens or closes, and all open streams again every [`REFRESH_INTERVAL`]. A leader counts a
//!   stream as open until [`STALE_AFTER`] without a refresh, so a crashed node's streams fade
//!   out and a new leader learns every open stream within one refresh.
//! * Last seen is the time the user's last stream closed (or went stale), kept for
//!   `presence.last-seen-ttl`; a stream opened with `hide_last_seen` hides it from others.
//! * Bounded: at most `presence.users-max` users per node, the least recently touched dropped
//!   first; the report queue holds `presence.report-queue-max` reports and drops (a refresh repairs).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use courier_proto::pb::client::PresenceUpdate;
use courier_proto::pb::peer::PresenceReport;
use tokio::sync::mpsc;

use crate::env::now_ms;

/// How often a node re-reports every open stream to the users' shard leaders.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// A stream not refreshed for this long counts as closed.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// The share of `presence.users-max` one eviction pass frees when the table is full (the
/// least recently touched offline users): the pass reads every user, so it frees room for many
/// new ones at once rather than one.
pub const EVICT_SHARE_PERCENT: usize = 1;
/// How often a full table is swept at most: while every tracked user is online, a new user's
/// report is dropped (a refresh repairs) instead of scanning the table again for each one.
pub const EVICT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Clone)]
struct UserPresence {
    /// Open streams by (reporting node, device): when each goes stale, unix ms.
    streams: BTreeMap<(u64, u32), u64>,
    /// When the last stream closed, unix ms (0: never seen here).
    last_seen_ms: u64,
    /// The user asked to hide last seen.
    hide_last_seen: bool,
    /// Last change, for eviction.
    touched_ms: u64,
}

/// The presence this node holds as a shard leader.
#[derive(Debug)]
pub struct PresenceTable {
    users: Mutex<Users>,
    users_max: usize,
    last_seen_ttl_ms: u64,
}

/// The users of a [`PresenceTable`], and when a full table was last swept (unix ms).
#[derive(Debug, Default)]
struct Users {
    by_id: BTreeMap<u64, UserPresence>,
    evicted_ms: Option<u64>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PresenceTable {
    /// A table of at most `users_max` users keeping last seen for `last_seen_ttl`.
    pub fn new(users_max: usize, last_seen_ttl: Duration) -> Self {
        Self {
            users: Mutex::default(),
            users_max,
            last_seen_ttl_ms: millis(last_seen_ttl),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Users> {
        self.users.lock().expect("presence lock is never poisoned")
    }

    /// Applies reports from node `node`.
    pub fn report(&self, node: u64, reports: &[PresenceReport]) {
        let now = now_ms();
        let mut guard = self.lock();
        let table = &mut *guard;
        for r in reports {
            if !table.by_id.contains_key(&r.user) && table.by_id.len() >= self.users_max {
                if table
                    .evicted_ms
                    .is_none_or(|at| now.saturating_sub(at) >= millis(EVICT_EVERY))
                {
                    self.evict(&mut table.by_id, now);
                    table.evicted_ms = Some(now);
                }
                if table.by_id.len() >= self.users_max {
                    continue;
                }
            }
            let user = table.by_id.entry(r.user).or_default();
            user.touched_ms = now;
            user.hide_last_seen = r.hide_last_seen;
            if r.online {
                user.streams
                    .insert((node, r.device), now.saturating_add(millis(STALE_AFTER)));
            } else if user.streams.remove(&(node, r.device)).is_some() && user.streams.is_empty() {
                user.last_seen_ms = r.at_ms.max(user.last_seen_ms);
            }
        }
    }

    /// Drops stale streams and forgotten users; when that leaves the table nearly full, the
    /// least recently touched offline users go too, [`EVICT_SHARE_PERCENT`] of the table at once.
    fn evict(&self, users: &mut BTreeMap<u64, UserPresence>, now: u64) {
        let ttl_ms = self.last_seen_ttl_ms;
        users.retain(|_, user| {
            expire_streams(user, now);
            !user.streams.is_empty() || now.saturating_sub(user.last_seen_ms) < ttl_ms
        });
        let room = (self.users_max / 100)
            .saturating_mul(EVICT_SHARE_PERCENT)
            .max(1);
        let target = self.users_max.saturating_sub(room);
        let excess = users.len().saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut offline: Vec<(u64, u64)> = users
            .iter()
            .filter(|(_, u)| u.streams.is_empty())
            .map(|(id, u)| (u.touched_ms, *id))
            .collect();
        let oldest = excess.min(offline.len());
        if oldest == 0 {
            return;
        }
        if oldest < offline.len() {
            offline.select_nth_unstable(oldest);
        }
        for (_, id) in offline.iter().take(oldest) {
            users.remove(id);
        }
    }

    /// What others may see of `user` now.
    pub fn query(&self, user: u64) -> PresenceUpdate {
        let now = now_ms();
        let mut users = self.lock();
        let Some(entry) = users.by_id.get_mut(&user) else {
            return PresenceUpdate {
                user,
                online: false,
                last_seen_ms: 0,
            };
        };
        expire_streams(entry, now);
        let online = !entry.streams.is_empty();
        let last_seen_ms = if entry.hide_last_seen || online {
            0
        } else if now.saturating_sub(entry.last_seen_ms) < self.last_seen_ttl_ms {
            entry.last_seen_ms
        } else {
            0
        };
        PresenceUpdate {
            user,
            online,
            last_seen_ms,
        }
    }

    /// Whether `user` has a device stream open anywhere (as far as this leader knows).
    pub fn is_online(&self, user: u64) -> bool {
        self.query(user).online
    }
}

/// Closes streams past their refresh deadline; the last one's deadline becomes last seen.
fn expire_streams(user: &mut UserPresence, now: u64) {
    let before = user.streams.len();
    let mut latest = 0;
    user.streams.retain(|_, stale_at| {
        latest = latest.max(*stale_at);
        *stale_at > now
    });
    if before > 0 && user.streams.is_empty() {
        user.last_seen_ms = user
            .last_seen_ms
            .max(latest.saturating_sub(millis(STALE_AFTER)));
    }
}

/// The streams open on this node, and the queue of reports to send to leaders.
#[derive(Debug)]
pub struct Reporter {
    open: Mutex<BTreeMap<(u64, u32), (u32, bool)>>,
    queue: mpsc::Sender<PresenceReport>,
}

/// Reports its stream closed when dropped.
#[derive(Debug)]
pub struct OpenStream<'a> {
    reporter: &'a Reporter,
    user: u64,
    device: u32,
    hide_last_seen: bool,
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        let mut open = self
            .reporter
            .open
            .lock()
            .expect("presence lock is never poisoned");
        let key = (self.user, self.device);
        let last = match open.get_mut(&key) {
            Some((count, _)) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                open.remove(&key);
                true
            }
        };
        drop(open);
        if last {
            // Best effort: a full queue drops it, and the leader's staleness deadline closes it.
            let _ = self.reporter.queue.try_send(PresenceReport {
                user: self.user,
                device: self.device,
                online: false,
                hide_last_seen: self.hide_last_seen,
                at_ms: now_ms(),
            });
        }
    }
}

impl Reporter {
    /// A reporter and the receiving end of its queue of `queue_max` reports (at least 1;
    /// drained by `cluster::run_reporter`).
    pub fn new(queue_max: usize) -> (Self, mpsc::Receiver<PresenceReport>) {
        let (queue, reports) = mpsc::channel(queue_max.max(1));
        (
            Self {
                open: Mutex::default(),
                queue,
            },
            reports,
        )
    }

    /// Registers an open stream until the guard drops.
    pub fn opened(&self, user: u64, device: u32, hide_last_seen: bool) -> OpenStream<'_> {
        let mut open = self.open.lock().expect("presence lock is never poisoned");
        let entry = open.entry((user, device)).or_insert((0, hide_last_seen));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = hide_last_seen;
        drop(open);
        let _ = self.queue.try_send(PresenceReport {
            user,
            device,
            online: true,
            hide_last_seen,
            at_ms: now_ms(),
        });
        OpenStream {
            reporter: self,
            user,
            device,
            hide_last_seen,
        }
    }

    /// Every open stream, as "online" reports (the periodic refresh).
    pub fn snapshot(&self) -> Vec<PresenceReport> {
        let now = now_ms();
        self.open
            .lock()
            .expect("presence lock is never poisoned")
            .iter()
            .map(|(&(user, device), &(_, hide_last_seen))| PresenceReport {
                user,
                device,
                online: true,
                hide_last_seen,
                at_ms: now,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(user: u64, device: u32, online: bool, hide: bool, at_ms: u64) -> PresenceReport {
        PresenceReport {
            user,
            device,
            online,
            hide_last_seen: hide,
            at_ms,
        }
    }

    #[test]
    fn online_while_any_stream_is_open_then_last_seen() {
        let table = PresenceTable::new(10, Duration::from_secs(60));
        table.report(1, &[report(7, 1, true, false, 0)]);
        table.report(2, &[report(7, 2, true, false, 0)]);
        assert!(table.query(7).online);
        let now = now_ms();
        table.report(1, &[report(7, 1, false, false, now - 2_000)]);
        assert!(table.query(7).online, "device 2 is still connected");
        table.report(2, &[report(7, 2, false, false, now - 1_000)]);
        let seen = table.query(7);
        assert!(!seen.online);
        assert_eq!(seen.last_seen_ms, now - 1_000, "the last stream's close");
        let forgotten = PresenceTable::new(10, Duration::from_secs(60));
        forgotten.report(1, &[report(7, 1, true, false, 0)]);
        forgotten.report(1, &[report(7, 1, false, false, now - 61_000)]);
        assert_eq!(forgotten.query(7).last_seen_ms, 0, "past the TTL");
        assert_eq!(table.query(8).last_seen_ms, 0, "unknown users are offline");
    }

    #[test]
    fn hidden_last_seen_and_bounded_users() {
        let table = PresenceTable::new(2, Duration::from_secs(60));
        table.report(
            1,
            &[report(1, 1, true, true, 0), report(1, 1, false, true, 5)],
        );
        assert_eq!(table.query(1).last_seen_ms, 0, "hidden");
        table.report(1, &[report(2, 1, true, false, 0)]);
        table.report(1, &[report(3, 1, true, false, 0)]);
        assert!(
            table.query(3).online,
            "an offline user was evicted to make room"
        );
        assert!(table.query(2).online, "online users are kept");
    }

    /// A full table frees a share of itself at once (the least recently touched offline users),
    /// so the next new users find room without another pass over the table.
    #[test]
    fn a_full_table_frees_the_oldest_share_at_once() {
        let table = PresenceTable::new(200, Duration::from_secs(3600));
        let now = now_ms();
        for user in 1..=200 {
            table.report(
                1,
                &[
                    report(user, 1, true, false, 0),
                    report(user, 1, false, false, now),
                ],
            );
        }
        assert_eq!(table.lock().by_id.len(), 200, "full of offline users");
        // User n was last touched at n ms past `now`: users 1 and 2 are the oldest.
        for (id, user) in &mut table.lock().by_id {
            user.touched_ms = now.saturating_add(*id);
        }
        table.report(1, &[report(1000, 1, true, false, 0)]);
        let users = table.lock().by_id.len();
        assert_eq!(users, 199, "1 % (2 users) freed, then the new one added");
        {
            let left = table.lock();
            assert!(
                !left.by_id.contains_key(&1) && !left.by_id.contains_key(&2),
                "the two least recently touched users go"
            );
            assert!(left.by_id.contains_key(&3), "the next one stays");
        }
        table.report(1, &[report(1001, 1, true, false, 0)]);
        assert!(table.query(1001).online, "room without a second pass");
        assert!(table.query(1000).online, "new users stay");
    }
}
