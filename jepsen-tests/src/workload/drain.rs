//! The final drain: after the heal, every device of every user on every node reads its inbox
//! from seq 0, and its sessions are the evidence the checker judges lost messages by.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::stream::{frame_record, open_stream};
use super::{ClientNode, Device, Shared};
use crate::admin::describe;
use crate::history::{Record, SessionStart};

/// A drain session ends after this long without a frame (once it has what was seen before).
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// A drain session that has fewer messages than were seen before waits this long for more.
const DRAIN_SHORT_IDLE: Duration = Duration::from_secs(10);
/// A drain session ends after this long in any case.
const DRAIN_SESSION_MAX: Duration = Duration::from_secs(30);
/// Drain sessions open at once.
const DRAIN_CONCURRENCY: usize = 6;
/// Attempts per drain session (device, node) before its failure is recorded as it is.
const DRAIN_ATTEMPTS: u32 = 3;

/// One drain session: `device` on `node` from seq 0, reading until [`DRAIN_IDLE`] passes
/// without a frame once at least as many messages arrived as the user's inbox holds above what
/// the nodes may have trimmed ([`Shared::drain_expects`]), or [`DRAIN_SESSION_MAX`]. Never acks or reads (the drain must not change state).
///
/// The session's records are returned, not written: a session cut short by a transport error
/// is retried, and only the retry's records belong in the history (see [`drain_all`]).
async fn drain_session(
    shared: &Shared,
    node: &ClientNode,
    device: &Device,
) -> (Vec<Record>, Result<(), String>) {
    let expect = shared.drain_expects(device.user);
    let mut records = Vec::new();
    let mut stream = match open_stream(node, device, 0, Vec::new()).await {
        Ok(stream) => stream,
        Err(error) => return (records, Err(format!("{error:#}"))),
    };
    let session = shared.recorder.next_session_id();
    records.push(Record::SessionStart(SessionStart {
        session,
        user: device.user,
        device: device.device,
        node: node.id,
        resume_after_seq: 0,
        time_ms: shared.recorder.now_ms(),
        drain: true,
    }));
    let end = Instant::now() + DRAIN_SESSION_MAX;
    let mut received: u64 = 0;
    let result = loop {
        let idle = if received >= expect {
            DRAIN_IDLE
        } else {
            DRAIN_SHORT_IDLE
        };
        let frame = tokio::select! {
            () = tokio::time::sleep_until(end) => break Ok(()),
            frame = tokio::time::timeout(idle, stream.frames.message()) => frame,
        };
        match frame {
            Err(_) | Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(frame))) => {
                let frame = frame_record(shared, device, session, frame);
                if frame.message.is_some() {
                    received = received.saturating_add(1);
                }
                records.extend(frame.record);
            }
            Ok(Err(status)) => {
                break Err(format!("drain session {session}: {}", describe(&status)));
            }
        }
    };
    drop(stream.out);
    (records, result)
}

/// Drains every device of every user on every node of `members` (the cluster's voters after
/// the heal), a few sessions at a time. Returns the number of sessions that ended in an error
/// (their records stay in the history; a failed drain session shows up as lost messages, never
/// as a pass).
pub async fn drain_all(shared: Arc<Shared>, members: &BTreeSet<u32>) -> usize {
    let mut jobs: Vec<(ClientNode, Device)> = Vec::new();
    for user in &shared.users {
        for device in &user.devices {
            for node in shared.nodes.iter().filter(|n| members.contains(&n.id)) {
                jobs.push((node.clone(), device.clone()));
            }
        }
    }
    let semaphore = Arc::new(tokio::sync::Semaphore::new(DRAIN_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (node, device) in jobs {
        let shared = shared.clone();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            // The semaphore is never closed, so acquire only fails if it were; count that as a
            // failed session.
            let Ok(_permit) = semaphore.acquire().await else {
                return false;
            };
            for attempt in 1..=DRAIN_ATTEMPTS {
                let (records, result) = drain_session(&shared, &node, &device).await;
                // The last attempt is recorded even when it failed: a missing drain from one
                // node would otherwise go unnoticed by the checker.
                if result.is_ok() || attempt == DRAIN_ATTEMPTS {
                    for record in &records {
                        shared.recorder.record(record);
                    }
                }
                match result {
                    Ok(()) => return true,
                    Err(error) => {
                        tracing::warn!(%error, attempt, node = node.id, user = device.user, "drain session failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            false
        });
    }
    let mut failed = 0usize;
    while let Some(result) = tasks.join_next().await {
        if !matches!(result, Ok(true)) {
            failed = failed.saturating_add(1);
        }
    }
    failed
}
