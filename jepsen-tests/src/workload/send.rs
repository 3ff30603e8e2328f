//! Send workers: logical sends with client ids, their attempts recorded as `ok | fail | info`,
//! and retries of an `info` with the same client id on another node.

use std::sync::Arc;
use std::time::Duration;

use courier_proto::pb::client::SendRequest;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::events::{self};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio_util::sync::CancellationToken;

use super::{ClientNode, Device, Shared, User, authed};
use crate::admin::describe;
use crate::history::{Complete, Invoke, Outcome, Record, SendOp};

/// Deadline of one Send attempt; past it the attempt is `info`.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per logical send (the first plus retries of an `info`).
pub const SEND_ATTEMPTS_MAX: u32 = 4;
/// Probability that an acknowledged send is sent once more with the same client id.
const RESEND_ACKED_PROBABILITY: f64 = 0.05;

/// Classifies a failed Send: `Fail` only for statuses that prove nothing was proposed.
pub fn classify(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let error = describe(status);
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::ResourceExhausted
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => Outcome::Fail { error },
        _ => Outcome::Info { error },
    }
}

/// The `retry-after-ms` hint of a status, capped at one second.
fn retry_after(status: &tonic::Status) -> Option<Duration> {
    let ms: u64 = status
        .metadata()
        .get("retry-after-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(1_000)))
}

/// One send worker: sends until `stop`, at about `1 / pause_mean` sends per second.
pub async fn send_worker(
    shared: Arc<Shared>,
    process: u32,
    seed: u64,
    pause_mean: Duration,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counter: u64 = 0;
    while !stop.is_cancelled() {
        counter = counter.saturating_add(1);
        let client_id = format!("{process}-{counter}");
        let (Some(sender), Some(recipient)) = pick_pair(&shared.users, &mut rng) else {
            return;
        };
        let Some(device) = sender.devices.choose(&mut rng).cloned() else {
            return;
        };
        let op = SendOp {
            from_user: sender.id,
            to_user: recipient.id,
            client_id: client_id.clone(),
        };
        let body = super::body::body(&client_id, &mut rng);
        for attempt in 1..=SEND_ATTEMPTS_MAX {
            let Some(node) = shared.nodes.choose(&mut rng).cloned() else {
                return;
            };
            let (outcome, pause) = send_once(&shared, process, &device, &op, &body, &node).await;
            if matches!(outcome, Outcome::Ok { .. }) && rng.random_bool(RESEND_ACKED_PROBABILITY) {
                // A client that lost the answer resends: the server must answer with the same
                // message id and store nothing new. Timeouts that hide a committed send are
                // rare on this machine, so without this the dedup path would seldom run.
                let Some(node) = shared.nodes.choose(&mut rng).cloned() else {
                    return;
                };
                send_once(&shared, process, &device, &op, &body, &node).await;
            }
            if !matches!(outcome, Outcome::Info { .. }) || attempt == SEND_ATTEMPTS_MAX {
                break;
            }
            // Retry an unknown outcome with the same client id (the server deduplicates), after
            // the server's hint or a short backoff, unless the workload is over.
            let backoff = pause.unwrap_or(Duration::from_millis(
                200u64.saturating_mul(u64::from(attempt)),
            ));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
        }
        let jitter = rng.random_range(0.5..1.5);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause_mean.mul_f64(jitter)) => {}
        }
    }
}

fn pick_pair<'u>(users: &'u [User], rng: &mut StdRng) -> (Option<&'u User>, Option<&'u User>) {
    let sender = users.choose(rng);
    let others: Vec<&User> = users
        .iter()
        .filter(|u| Some(u.id) != sender.map(|s| s.id))
        .collect();
    (sender, others.choose(rng).copied())
}

/// One attempt: Invoke, the RPC, Complete. Returns the outcome and the server's retry hint.
async fn send_once(
    shared: &Shared,
    process: u32,
    device: &Device,
    op: &SendOp,
    body: &[u8],
    node: &ClientNode,
) -> (Outcome, Option<Duration>) {
    let recorder = &shared.recorder;
    let op_id = recorder.next_op_id();
    recorder.record(&Record::Invoke(Invoke {
        process,
        op_id,
        time_ms: recorder.now_ms(),
        op: op.clone(),
    }));
    let request = SendRequest {
        client_msg_id: op.client_id.clone(),
        to_user: op.to_user,
        content: Some(events::Content {
            body: body.to_vec(),
            media: None,
        }),
    };
    let (outcome, hint) = match authed(device, request) {
        Err(error) => (
            Outcome::Fail {
                error: format!("harness could not build the request: {error}"),
            },
            None,
        ),
        Ok(request) => {
            let mut client = MessagingClient::new(node.channel.clone());
            match tokio::time::timeout(SEND_TIMEOUT, client.send(request)).await {
                Err(_) => (
                    Outcome::Info {
                        error: format!("timeout after {SEND_TIMEOUT:?} on node {}", node.id),
                    },
                    None,
                ),
                Ok(Ok(response)) => (
                    Outcome::Ok {
                        message_id: crate::hex(&response.into_inner().message_id),
                    },
                    None,
                ),
                Ok(Err(status)) => (classify(&status), retry_after(&status)),
            }
        }
    };
    recorder.record(&Record::Complete(Complete {
        process,
        op_id,
        time_ms: recorder.now_ms(),
        outcome: outcome.clone(),
    }));
    (outcome, hint)
}

/// After the final drain: `entries` sends, one at a time, from a user of each of `shards` to
/// another user, through the first node of `members` (a node the membership nemesis removed, or
/// wiped into a spare, takes no sends), not recorded in the history (the drain is over, so no
/// session can see them). Each is one more entry on its sender's shard, so every shard's log
/// passes the end of the archive segment its last entry was in: a replica that installed a
/// snapshot reads the entries below it from the archive, and the archive holds only whole
/// segments. Returns the sends that failed.
pub async fn fill_archive_segments(
    shared: &Shared,
    members: &std::collections::BTreeSet<u32>,
    shards: u32,
    entries: u64,
) -> u64 {
    let Ok(shard_count) = u16::try_from(shards) else {
        return entries;
    };
    let mut failed = 0_u64;
    for shard in 0..shard_count {
        let home = |user: &&User| {
            courier_proto::UserId::new(user.id)
                .is_some_and(|id| courier_proto::shard_of(id, shard_count).get() == shard)
        };
        let Some(from) = shared.users.iter().find(home) else {
            continue;
        };
        let Some(to) = shared.users.iter().find(|u| u.id != from.id) else {
            continue;
        };
        // A member: a node the membership nemesis removed takes no sends.
        let node = shared.nodes.iter().find(|n| members.contains(&n.id));
        let (Some(device), Some(node)) = (from.devices.first(), node) else {
            continue;
        };
        let mut client = MessagingClient::new(node.channel.clone());
        for n in 0..entries {
            let request = SendRequest {
                client_msg_id: format!("fill-{shard}-{n}"),
                to_user: to.id,
                content: Some(events::Content {
                    body: b"fill".to_vec(),
                    media: None,
                }),
            };
            let mut sent = false;
            for _ in 0..5 {
                let Ok(request) = authed(device, request.clone()) else {
                    break;
                };
                match tokio::time::timeout(SEND_TIMEOUT, client.send(request)).await {
                    Ok(Ok(_)) => {
                        sent = true;
                        break;
                    }
                    Ok(Err(status)) => {
                        tracing::debug!(error = %describe(&status), shard, "fill send failed");
                    }
                    Err(_) => tracing::debug!(shard, "fill send timed out"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !sent {
                failed = failed.saturating_add(1);
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rejections_before_a_proposal_are_fail() {
        let fail = [
            tonic::Status::invalid_argument("bad"),
            tonic::Status::not_found("no such user"),
            tonic::Status::resource_exhausted("rate"),
        ];
        for status in &fail {
            assert!(
                matches!(classify(status), Outcome::Fail { .. }),
                "{status:?} is definite"
            );
        }
        let info = [
            tonic::Status::unavailable("no leader"),
            tonic::Status::deadline_exceeded("slow"),
            tonic::Status::internal("outcome"),
            tonic::Status::unknown("transport"),
            tonic::Status::cancelled("reset"),
        ];
        for status in &info {
            assert!(
                matches!(classify(status), Outcome::Info { .. }),
                "{status:?} is unknown"
            );
        }
    }

    #[test]
    fn retry_hint_is_read_and_capped() {
        let mut status = tonic::Status::unavailable("no leader");
        status
            .metadata_mut()
            .insert("retry-after-ms", "50000".parse().expect("ascii"));
        assert_eq!(retry_after(&status), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(&tonic::Status::unavailable("x")), None);
    }
}
