//! Retried sends decided before proposing: a `Send` repeated with a client message id the shard
//! already stored is answered from the dedup projection and appends nothing to the log.
//!
//! ```text
//!  MessageSent(user, device, client_msg_id)
//!    ├─ this replica applied it already ───────────────▶ first result, duplicate (any node)
//!    └─ on the shard leader:
//!         ├─ an attempt with that id is in flight here ─▶ wait for it, then look again
//!         ├─ leader applied an entry of its own term,
//!         │  and the dedup projection has the id ───────▶ first result, duplicate
//!         └─ otherwise ─────────────────────────────────▶ propose (once per id in flight)
//! ```
//!
//! The lookup is an optimisation of the log, not the guarantee: apply-time dedup
//! (`courier_storage::projection::apply_event`) still turns any retry this cannot see (one that
//! raced an election, or arrived at a leader that could not confirm it had caught up) into a
//! no-op with the first result. A hit is always safe to answer: dedup records come from applied,
//! hence committed, entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_consensus::groups::GroupHandle;
use courier_consensus::types::EventOutcome;
use courier_proto::pb::events::{Event, MessageSent, event::Kind};
use courier_proto::{DeviceId, ShardId, UserId};
use courier_storage::Db;
use courier_storage::projection::{Projection, dedup};

use crate::status::ApiError;

/// The idempotency key of a send: who sent it and their client message id.
type SendKey = (u64, u32, String);

/// Sends this node is proposing as a shard leader, by idempotency key. An entry lives from just
/// before its proposal until that proposal answered (its guard drops), even when the request that
/// made it is gone: a forwarding node whose deadline expired cancels its call, but the proposal
/// it started is still queued and may still commit, and a retry must wait for it rather than
/// propose the send again. The table holds at most one entry per proposal in progress: bounded by
/// the connection and stream limits in front of it and by the proposer's queue behind it.
#[derive(Debug, Default)]
pub struct SendsInFlight {
    keys: Mutex<HashMap<SendKey, tokio::sync::watch::Sender<()>>>,
}

/// Removes its key when the attempt it guards answered (or was dropped), waking the retries that
/// wait for it.
#[derive(Debug)]
struct InFlight {
    table: Arc<SendsInFlight>,
    key: SendKey,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Dropping the sender ends every waiter's `changed()`.
        self.table.lock().remove(&self.key);
    }
}

impl SendsInFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SendKey, tokio::sync::watch::Sender<()>>> {
        // A panic while holding this short lock aborts the process (panic = "abort"), so the
        // lock is never poisoned in production; tests unwind and may see it poisoned.
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims `key` for one attempt, or returns a receiver that wakes when the attempt holding it
    /// answered.
    fn claim(self: &Arc<Self>, key: SendKey) -> Result<InFlight, tokio::sync::watch::Receiver<()>> {
        let mut keys = self.lock();
        if let Some(holder) = keys.get(&key) {
            return Err(holder.subscribe());
        }
        keys.insert(key.clone(), tokio::sync::watch::channel(()).0);
        Ok(InFlight {
            table: Arc::clone(self),
            key,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The one `MessageSent` of a proposal, when it is a client send.
pub(crate) fn single_send(events: &[Event]) -> Option<&MessageSent> {
    match events {
        [
            Event {
                kind: Some(Kind::MessageSent(sent)),
            },
        ] => Some(sent),
        _ => None,
    }
}

/// Looks the send up in this replica's dedup projection of `shard`.
///
/// # Errors
/// `INTERNAL` for a storage fault.
pub(crate) fn applied_result(
    db: &Db,
    shard: ShardId,
    sent: &MessageSent,
) -> Result<Option<EventOutcome>, ApiError> {
    let (Some(user), Some(device)) = (
        UserId::new(sent.sender_user),
        DeviceId::new(sent.sender_device),
    ) else {
        return Ok(None); // not a client send this node decided; apply-time checks decide it
    };
    let mut reader = db.read(shard);
    let view = reader.view(Projection::Dedup);
    let found = dedup::lookup(&view, user, device, &sent.client_msg_id)?;
    Ok(found.map(|first| EventOutcome::Sent {
        message_id: first.message_id,
        sent_at_ms: first.sent_at_ms,
        log_index: first.log_index,
        duplicate: true,
    }))
}

/// Proposes one client send on the shard leader `handle`, unless its client message id is known
/// or in flight here.
///
/// `caught_up_wait` bounds how long a new leader may take to apply its first entry before the
/// lookup is skipped (apply-time dedup then decides); `in_flight_wait` bounds how long a retry
/// waits for the attempt in flight before it is told to retry.
///
/// # Errors
/// `UNAVAILABLE` (`COURIER:Send:InFlight`) when an earlier attempt with the same id is still
/// replicating after `in_flight_wait`; what `propose` answers otherwise.
pub(crate) async fn propose_send_on_leader<F, Fut>(
    table: &Arc<SendsInFlight>,
    db: &Db,
    shard: ShardId,
    handle: &GroupHandle,
    events: Vec<Event>,
    waits: (Duration, Duration),
    propose: F,
) -> Result<Vec<EventOutcome>, ApiError>
where
    F: FnOnce(Vec<Event>) -> Fut,
    Fut: Future<Output = Result<Vec<EventOutcome>, ApiError>> + Send + 'static,
{
    let (caught_up_wait, in_flight_wait) = waits;
    let sent = single_send(&events).expect("callers pass one MessageSent");
    let key = (
        sent.sender_user,
        sent.sender_device,
        sent.client_msg_id.clone(),
    );
    let claim = loop {
        match table.claim(key.clone()) {
            Ok(claim) => break claim,
            Err(mut first) => {
                // The first attempt answers after its entry applied (or failed): look again then.
                if tokio::time::timeout(in_flight_wait, first.changed())
                    .await
                    .is_err()
                {
                    return Err(ApiError::Unavailable {
                        code: "COURIER:Send:InFlight",
                        message: "an earlier attempt of this send is still in flight; retry with \
                                  the same client message id"
                            .to_owned(),
                        retry_after_ms: u64::try_from(in_flight_wait.as_millis())
                            .unwrap_or(u64::MAX),
                        leader: None,
                    });
                }
            }
        }
    };
    if handle.leader_caught_up(caught_up_wait).await
        && let Some(first) = applied_result(db, shard, sent)?
    {
        return Ok(vec![first]);
    }
    answered_holding(claim, propose(events)).await
}

/// Runs `proposal` to its answer on a task of its own that holds `claim` until then, so the key
/// stays claimed for as long as the proposal may still commit even if the caller is dropped.
async fn answered_holding<T: Send + 'static>(
    claim: InFlight,
    proposal: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    let task = tokio::spawn(async move {
        let answer = proposal.await;
        drop(claim);
        answer
    });
    task.await
        .unwrap_or_else(|error| Err(ApiError::task_ended("proposal", &error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_attempt_per_key_and_waiters_wake_when_it_ends() {
        let table = Arc::new(SendsInFlight::default());
        let key = (1, 1, "m-1".to_owned());
        let first = table.claim(key.clone()).expect("the first claim wins");
        let mut waiter = table
            .claim(key.clone())
            .expect_err("a second attempt waits");
        assert!(
            table.claim((1, 2, "m-1".to_owned())).is_ok(),
            "another device's id is another key"
        );
        assert_eq!(table.len(), 1, "the other claim ended when dropped");
        drop(first);
        assert_eq!(table.len(), 0, "the key is released with its attempt");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            assert!(
                waiter.changed().await.is_err(),
                "the waiter wakes: its sender is gone"
            );
        });
        assert!(table.claim(key).is_ok(), "the key can be claimed again");
    }

    #[test]
    fn a_dropped_caller_leaves_its_proposal_claimed_until_it_answers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let table = Arc::new(SendsInFlight::default());
            let key = (1, 1, "m-1".to_owned());
            let (commit, committed) = tokio::sync::oneshot::channel::<()>();
            let claim = table.claim(key.clone()).expect("the first claim wins");
            let caller = answered_holding(claim, async move {
                committed.await.expect("told");
                Ok(())
            });
            // The caller's deadline expires (a forwarding node cancelled its call).
            assert!(
                tokio::time::timeout(Duration::from_millis(10), caller)
                    .await
                    .is_err()
            );
            let mut retry = table
                .claim(key.clone())
                .expect_err("a retry still waits: the proposal may yet commit");
            commit.send(()).expect("the proposal waits");
            assert!(
                retry.changed().await.is_err(),
                "the retry wakes when the proposal answered"
            );
            assert_eq!(table.len(), 0, "and the key is free again");
        });
    }
}
