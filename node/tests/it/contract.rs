//! The client contract where a client developer found it broken (issue 17): receipt pushes past
//! one page of a log entry, retried sends that must append nothing, and the failover time a
//! client sees when it follows the server's retry advice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{
    ClientFrame, Open, ReceiptUpdate, SendRequest, ServerFrame, client_frame, server_frame,
};
use courier_proto::pb::events::{self, ReceiptState, event::Kind};
use courier_proto::pb::peer::ProposeRequest;
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::forward_client::ForwardClient;
use courier_proto::{UserId, shard_of};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{Processes, status, wait_converged, wait_leaders, with_limits};
use crate::messaging::{
    Device, Stream, authed, body, cluster_configured, code_of, open_stream_from,
    phones_on_different_shards, register,
};
use crate::support::{channel, connect, log_events, peer_channel, peer_tls};

/// Opens `device`'s stream at `addr` with the receipt feed resuming as given.
async fn open_receipts(
    addr: &str,
    device: &Device,
    receipts_after_index: u64,
    receipts_after_position: Vec<u8>,
) -> Stream {
    open_stream_from(
        addr,
        device,
        Open {
            receipts_after_index,
            receipts_after_position,
            ..Open::default()
        },
    )
    .await
}

/// Reads receipt updates until `count` arrived or `timeout` passed.
async fn receipts(stream: &mut Stream, count: usize, timeout: Duration) -> Vec<ReceiptUpdate> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.frames.message()).await {
            Ok(Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::Receipt(update)),
            }))) => got.push(update),
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    got
}

/// No snapshots, so the whole log stays readable.
fn keep_the_log(text: String) -> String {
    with_limits(text, 10_000).replace(
        "snapshot-logs-since-last = 50",
        "snapshot-logs-since-last = 1000000",
    )
}

/// Goal: every receipt change reaches the sender's stream, however many one log entry carries,
/// and a device resumes from any change. Method: one raft entry on Alice's shard records 2,500
/// DELIVERED receipts of her messages (the events an ack of 2,500 messages forwards); her live
/// stream must receive all 2,500 once, each with its own feed position; a stream opened on
/// another node after the 1,000th change's position gets exactly the other 1,500; one opened
/// after the entry before gets all 2,500. Before the fix the live stream stopped at 256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_receipt_change_of_a_large_entry_is_pushed_and_resumable() {
    const CHANGES: u64 = 2_500;
    let c = cluster_configured(&keep_the_log).await;
    let (alice_phone, _) = phones_on_different_shards();
    let alice = register(
        &c.nodes[0].client_addr.to_string(),
        &c.dirs[0],
        &alice_phone,
    )
    .await;
    let alice_shard = shard_of(UserId::new(alice.user).expect("id"), 4).get();
    let mut live = open_receipts(&c.nodes[0].client_addr.to_string(), &alice, 0, Vec::new()).await;
    // Let the stream register before the entry lands (it pushes changes after its open).
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        tracing::info!("one entry with 2,500 receipt changes of Alice's messages");
        let source = u32::from((alice_shard + 1) % 4);
        let events = (1..=CHANGES)
            .map(|n| {
                let mut message_id = vec![0x42; 16];
                message_id[8..].copy_from_slice(&n.to_be_bytes());
                events::Event {
                    kind: Some(Kind::ReceiptRecorded(events::ReceiptRecorded {
                        message_id,
                        sender_user: alice.user,
                        recipient_user: 1_000 + n % 7,
                        state: ReceiptState::Delivered.into(),
                        at_ms: 1,
                        source_shard: source,
                        source_pos: n,
                    })),
                }
            })
            .collect();
        // Proposing is node to node: the caller holds node 1's certificate.
        ForwardClient::new(connect(&c.nodes[1].peer_addr.to_string(), peer_tls("node-1")).await)
            .propose(ProposeRequest {
                shard: u32::from(alice_shard),
                events,
            })
            .await
            .expect("proposed");
    }
    let count = usize::try_from(CHANGES).expect("small");
    let pushed = receipts(&mut live, count, Duration::from_secs(30)).await;
    let extra = receipts(&mut live, 1, Duration::from_millis(500)).await;
    assert_eq!(
        (pushed.len(), extra.len()),
        (count, 0),
        "the live stream gets every change of the entry, once"
    );
    let ids: BTreeSet<&Vec<u8>> = pushed.iter().map(|u| &u.message_id).collect();
    assert_eq!(ids.len(), count, "each message's change once");
    let index = pushed[0].feed_index;
    assert!(
        pushed.iter().all(|u| u.feed_index == index),
        "one entry set them all"
    );
    assert!(
        pushed
            .windows(2)
            .all(|w| w[0].feed_position < w[1].feed_position),
        "each change has its own position, increasing"
    );
    {
        tracing::info!("resume after the 1,000th change, on another node");
        let mut resumed = open_receipts(
            &c.nodes[2].client_addr.to_string(),
            &alice,
            0,
            pushed[999].feed_position.clone(),
        )
        .await;
        let rest = receipts(&mut resumed, 1_500, Duration::from_secs(10)).await;
        let extra = receipts(&mut resumed, 1, Duration::from_millis(500)).await;
        assert!(extra.is_empty(), "nothing after the entry: {extra:?}");
        let positions = |updates: &[ReceiptUpdate]| -> Vec<Vec<u8>> {
            updates.iter().map(|u| u.feed_position.clone()).collect()
        };
        assert_eq!(
            positions(&rest),
            positions(&pushed[1_000..]),
            "exactly the 1,500 changes after the position, in order"
        );
    }
    {
        tracing::info!("resume after the entry before, by index (the older form)");
        let mut resumed = open_receipts(
            &c.nodes[1].client_addr.to_string(),
            &alice,
            index - 1,
            Vec::new(),
        )
        .await;
        let all = receipts(&mut resumed, count, Duration::from_secs(10)).await;
        let extra = receipts(&mut resumed, 1, Duration::from_millis(500)).await;
        assert_eq!(
            (all.len(), extra.len()),
            (count, 0),
            "the whole entry, nothing else"
        );
    }
    {
        tracing::info!("a position that is not 32 bytes is refused");
        let (out, rx) = mpsc::channel(1);
        out.send(ClientFrame {
            frame: Some(client_frame::Frame::Open(Open {
                receipts_after_position: vec![1; 5],
                ..Open::default()
            })),
        })
        .await
        .expect("open");
        let status = MessagingClient::new(channel(&c.nodes[0].client_addr.to_string()).await)
            .stream(authed(&alice, ReceiverStream::new(rx)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(code_of(&status), "COURIER:Wire:Malformed");
    }
    for node in c.nodes {
        node.stop().await;
    }
}

/// Goal: a retried send appends nothing to the log, through the leader or a follower, and a
/// burst of concurrent first attempts with one client id appends it once. Method: Alice sends
/// 100 messages, retries them 1,000 times round-robin over the three nodes, then sends 10 new
/// ids 12 times each at once; every answer for an id carries the first message id, and the
/// sender shard's log holds exactly one `MessageSent` per client id (before the fix it held one
/// per attempt that reached the leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_sends_append_nothing() {
    let c = cluster_configured(&keep_the_log).await;
    let clients: Vec<String> = c.nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&clients[0], &c.dirs[0], &alice_phone).await;
    let bob = register(&clients[0], &c.dirs[0], &bob_phone).await;
    let alice_shard = u32::from(shard_of(UserId::new(alice.user).expect("id"), 4).get());
    // Every replica knows both users before sends go through every node (a node checks the
    // recipient on its own replica).
    c.wait_converged().await;
    // As API.md asks of a client: an UNAVAILABLE answer is retried with the same client id after
    // its retry-after hint (a loaded CI machine once let a forwarded propose's deadline expire
    // during the burst of 120 concurrent attempts below); any other answer is returned.
    let send = |via: String, id: String| {
        let (alice, to) = (alice.clone(), bob.user);
        async move {
            let mut client = MessagingClient::new(channel(&via).await);
            let mut attempts_left = 20;
            loop {
                let answer = client
                    .send(authed(
                        &alice,
                        SendRequest {
                            client_msg_id: id.clone(),
                            to_user: to,
                            content: body("hello"),
                        },
                    ))
                    .await
                    .map(tonic::Response::into_inner);
                match answer {
                    Err(status)
                        if status.code() == tonic::Code::Unavailable && attempts_left > 0 =>
                    {
                        attempts_left -= 1;
                        let after_ms = status
                            .metadata()
                            .get("retry-after-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(100);
                        tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    }
                    other => return other,
                }
            }
        }
    };
    let mut first: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    {
        tracing::info!("100 first sends");
        for i in 0..100 {
            let id = format!("r-{i}");
            let answer = send(clients[0].clone(), id.clone()).await.expect("sent");
            assert!(!answer.duplicate);
            first.insert(id, answer.message_id);
        }
    }
    {
        tracing::info!("1,000 retries round-robin over the leader and the followers");
        for round in 0..1_000 {
            let id = format!("r-{}", round % 100);
            let answer = send(clients[round % 3].clone(), id.clone())
                .await
                .expect("answered");
            assert!(answer.duplicate, "retry {round} of {id} is a duplicate");
            assert_eq!(answer.message_id, first[&id], "the first result");
        }
    }
    {
        tracing::info!("10 new ids, each sent 12 times at once through all nodes");
        let mut attempts = Vec::new();
        for i in 0..10 {
            for k in 0..12 {
                let id = format!("b-{i}");
                attempts.push(tokio::spawn(send(clients[k % 3].clone(), id.clone())));
            }
        }
        let mut answers: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
        for (n, attempt) in attempts.into_iter().enumerate() {
            let answer = attempt.await.expect("joined").expect("answered");
            answers
                .entry(format!("b-{}", n / 12))
                .or_default()
                .insert(answer.message_id);
        }
        for (id, ids) in &answers {
            assert_eq!(ids.len(), 1, "every attempt of {id} got one message id");
            first.insert(id.clone(), ids.first().expect("one").clone());
        }
    }
    let leader_peer = {
        let any = status(&c.nodes[0].peer_addr.to_string()).await;
        let leader = any
            .shards
            .iter()
            .find(|s| s.shard == alice_shard)
            .expect("alice's shard")
            .leader;
        c.nodes[usize::try_from(leader - 1).expect("small")]
            .peer_addr
            .to_string()
    };
    let mut sent: BTreeMap<String, usize> = BTreeMap::new();
    for event in log_events(&leader_peer, alice_shard).await {
        if let Some(Kind::MessageSent(m)) = event.kind {
            *sent.entry(m.client_msg_id).or_default() += 1;
        }
    }
    let appended_twice: Vec<_> = sent.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        appended_twice.is_empty(),
        "one MessageSent per client id: {appended_twice:?}"
    );
    assert_eq!(
        sent.keys().collect::<BTreeSet<_>>(),
        first.keys().collect::<BTreeSet<_>>(),
        "exactly the 110 ids"
    );
    for node in c.nodes {
        node.stop().await;
    }
}

/// The retry hint of an UNAVAILABLE answer, ms.
fn retry_after_ms(status: &tonic::Status) -> Option<u64> {
    status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Goal: a client that follows the server's advice exactly gets through a leader failover within
/// about the election time plus 250 ms. Method: three `courier-node` processes (election timeout
/// 300-600 ms); three times, SIGKILL the leader of Alice's shard, watch a survivor's status for
/// the new leader, and have a client on a survivor send, sleeping exactly `retry-after-ms` after
/// each UNAVAILABLE; the client's success may come at most 250 ms after the survivor knew the
/// new leader. Then restart the killed node and wait for every shard's leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_following_the_advice_gets_through_a_failover_in_election_time() {
    const SLACK: Duration = Duration::from_millis(250);
    let (mut cluster, mut leaders) = Processes::start_initialized(3).await;
    let addrs = cluster.addrs.clone();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let data_dir = cluster.procs[0].data_dir.clone();
    let alice = register(&addrs[0].client, &data_dir, &alice_phone).await;
    let bob = register(&addrs[0].client, &data_dir, &bob_phone).await;
    let alice_shard = u32::from(shard_of(UserId::new(alice.user).expect("id"), 4).get());
    let mut worst = Duration::ZERO;
    // Every replica knows both users before a survivor takes sends.
    wait_converged(&cluster.peers, Duration::from_secs(30)).await;
    for round in 0..3 {
        let victim = usize::try_from(leaders[&alice_shard] - 1).expect("small");
        let via = (victim + 1) % 3;
        let watcher = addrs[(victim + 2) % 3].peer.clone();
        let mut client = MessagingClient::new(channel(&addrs[via].client).await);
        let send = |id: String| {
            let mut request = authed(
                &alice,
                SendRequest {
                    client_msg_id: id,
                    to_user: bob.user,
                    content: body("failover"),
                },
            );
            request.set_timeout(Duration::from_secs(10));
            request
        };
        client
            .send(send(format!("warm-{round}")))
            .await
            .expect("a send before the kill (the node's connection to the leader is open)");
        let killed_at = Instant::now();
        cluster.kill(victim);
        let old_leader = leaders[&alice_shard];
        let watch = tokio::spawn(async move {
            loop {
                if let Ok(Ok(now)) = tokio::time::timeout(Duration::from_millis(500), async {
                    Ok::<_, tonic::Status>(
                        AdminClient::new(peer_channel(&watcher).await)
                            .status(courier_proto::pb::peer::StatusRequest {})
                            .await?
                            .into_inner(),
                    )
                })
                .await
                    && now
                        .shards
                        .iter()
                        .any(|s| s.shard == alice_shard && s.leader != 0 && s.leader != old_leader)
                {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let mut attempts = 0;
        let through_at = loop {
            attempts += 1;
            match client.send(send(format!("failover-{round}"))).await {
                Ok(_) => break Instant::now(),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                    let wait = retry_after_ms(&status).expect("UNAVAILABLE advises a retry");
                    assert!(
                        killed_at.elapsed() < Duration::from_secs(20),
                        "no send got through in 20 s"
                    );
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        };
        let elected_at = watch.await.expect("watcher");
        let client_failover = through_at - killed_at;
        let election = elected_at.saturating_duration_since(killed_at);
        eprintln!(
            "round {round}: new leader known after {election:?}, client through after \
             {client_failover:?} ({attempts} attempts)"
        );
        worst = worst.max(through_at.saturating_duration_since(elected_at));
        cluster.restart(victim);
        leaders = wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
        wait_converged(&cluster.peers, Duration::from_secs(60)).await;
    }
    assert!(
        worst <= SLACK,
        "a client following the advice got through {worst:?} after the new leader was known"
    );
}

/// Goal: an `Ack` a device sends again after reconnecting to a replica that has not caught up
/// yet is never refused as misuse (`AckPastTail`, which would end the stream for good); at worst
/// it is answered `UNAVAILABLE` and takes effect when sent again. Method: three `courier-node`
/// processes; node 3 is SIGKILLed, Alice sends Bob 30 messages, Bob's device receives them on
/// node 1 without acking, node 3 restarts, and at once Bob's device opens a stream on node 3 and
/// acks all 30, following `retry-after-ms` on `UNAVAILABLE`; Alice's receipts must then show all
/// 30 delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_sent_again_to_a_replica_behind_is_not_refused() {
    const MESSAGES: u64 = 30;
    let (mut cluster, _) = Processes::start_initialized(3).await;
    let addrs = cluster.addrs.clone();
    let data_dir = cluster.procs[0].data_dir.clone();
    let alice = register(&addrs[0].client, &data_dir, "+15550004401").await;
    let bob = register(&addrs[0].client, &data_dir, "+15550004402").await;
    wait_converged(&cluster.peers, Duration::from_secs(30)).await;
    cluster.kill(2);
    let mut client = MessagingClient::new(channel(&addrs[0].client).await);
    let all = usize::try_from(MESSAGES).expect("small");
    let (first, seqs) =
        crate::messaging::sent_and_received(&addrs[0].client, &mut client, (&alice, &bob), all)
            .await;
    assert_eq!(
        seqs,
        (1..=MESSAGES).collect::<Vec<u64>>(),
        "Bob's device got the messages on node 1"
    );
    drop(first);
    // Alice's stream, open before the ack, is pushed the receipt changes from then on.
    let mut feed = crate::messaging::open_stream(&addrs[0].client, &alice, 0).await;
    cluster.restart(2);
    let ack = ClientFrame {
        frame: Some(client_frame::Frame::Ack(courier_proto::pb::client::Ack {
            up_to_seq: MESSAGES,
        })),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    // Kept open: the ack may still be in hand when the loop ends.
    let _open = loop {
        assert!(Instant::now() < deadline, "the ack never went through");
        let mut stream = crate::messaging::open_stream(&addrs[2].client, &bob, MESSAGES).await;
        stream.out.send(ack.clone()).await.expect("ack sent");
        // A stream the ack ended answers within the wait; one still open took the ack.
        match tokio::time::timeout(Duration::from_secs(3), stream.frames.message()).await {
            Err(_) | Ok(Ok(Some(_))) => break stream,
            Ok(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(
                    retry_after_ms(&status).expect("UNAVAILABLE advises a retry"),
                ))
                .await;
            }
            Ok(Ok(None)) => panic!("the stream ended without a status"),
        }
    };
    let delivered = receipts(&mut feed, all, Duration::from_secs(20)).await;
    assert!(
        delivered
            .iter()
            .filter(|r| r.state == ReceiptState::Delivered as i32)
            .count()
            >= all,
        "every message is delivered: {delivered:?}"
    );
}
