//! Group commit: messages per fsync and committed messages/s on a 3-node in-process cluster, as
//! the number of concurrent proposers grows; the ratio is against 1 proposer in the same run.
//!
//! Run: `cargo bench -p courier-node --bench group_commit` (`BENCH_SECONDS`, default 5 per step).
//!
//! Each proposer forwards 1-message batches to shard 0 from its own source shard (positions are
//! per source), through the shard leader's node, and waits for the commit before the next.

#![allow(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::unwrap_used
)]

use std::time::{Duration, Instant};

use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::forward_client::ForwardClient;
use courier_proto::pb::peer::{ForwardBatchRequest, InitClusterRequest, NodeInfo, StatusRequest};
use tonic::transport::Channel;

const SHARDS: u32 = 64;

fn config(id: u64, dir: &std::path::Path) -> String {
    format!(
        "node-id = {id}\ndata-dir = \"{}\"\n[listen]\nclient = \"127.0.0.1:0\"\npeer = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n[raft]\nheartbeat = \"50ms\"\nelection-timeout-min = \"300ms\"\nelection-timeout-max = \"600ms\"\n",
        dir.display()
    )
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn message(source: u32, pos: u64) -> Event {
    let mut id = [0_u8; 16];
    id[..4].copy_from_slice(&source.to_be_bytes());
    id[4..12].copy_from_slice(&pos.to_be_bytes());
    id[15] = 1;
    Event {
        kind: Some(Kind::MessageDelivered(events::MessageDelivered {
            message_id: id.to_vec(),
            recipient_user: 7,
            sender_user: 9,
            sender_device: 1,
            conversation: Some(events::Conversation {
                with: Some(events::conversation::With::User(9)),
            }),
            content: Some(events::Content {
                body: vec![b'x'; 256],
                media: None,
            }),
            sent_at_ms: 1,
            stored_at_ms: 0,
            group_index: 0,
            trace_parent: String::new(),
            source_shard: source,
            source_pos: pos,
            origin_shard: None,
            addressed_to: 0,
            receipts_sent: 0,
        })),
    }
}

async fn shard0(peer: &str) -> (u64, u64, u64) {
    let status = AdminClient::new(channel(peer).await)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let s = status.shards.into_iter().find(|s| s.shard == 0).unwrap();
    (s.fsyncs, s.entries_appended, s.leader)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let config =
            courier_node::Config::parse(&config(id, &dir.path().join(format!("n{id}")))).unwrap();
        nodes.push(courier_node::start(config).await.unwrap());
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    let members = peers
        .iter()
        .enumerate()
        .map(|(i, p)| NodeInfo {
            node_id: i as u64 + 1,
            peer_addr: p.clone(),
            client_addr: String::new(),
        })
        .collect();
    AdminClient::new(channel(&peers[0]).await)
        .init_cluster(InitClusterRequest {
            members,
            shard_count: SHARDS,
            replication_factor: 0,
            init_shards: vec![],
            phone_hash_key: Vec::new(),
            event_format: 0,
        })
        .await
        .unwrap();
    let leader = loop {
        let (_, _, leader) = shard0(&peers[0]).await;
        if leader != 0 {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader_peer = peers[leader as usize - 1].clone();
    println!("| proposers | committed msgs/s | messages per fsync | ratio msgs/s to 1 proposer |");
    println!("| ---: | ---: | ---: | ---: |");
    let mut next_pos = vec![1_u64; SHARDS as usize];
    let mut baseline = 0.0;
    for proposers in [1_u32, 4, 16, 64] {
        let (fsyncs_before, _, _) = shard0(&leader_peer).await;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for source in 0..proposers {
            let peer = leader_peer.clone();
            let mut pos = next_pos[source as usize];
            tasks.push(tokio::spawn(async move {
                let mut client = ForwardClient::new(channel(&peer).await);
                let mut sent = 0_u64;
                while Instant::now() < deadline {
                    let request = ForwardBatchRequest {
                        source_shard: source,
                        dest_shard: 0,
                        first_pos: pos,
                        events: vec![message(source, pos)],
                    };
                    client.forward_batch(request).await.unwrap();
                    pos += 1;
                    sent += 1;
                }
                (source, pos, sent)
            }));
        }
        let mut messages = 0;
        for task in tasks {
            let (source, pos, sent) = task.await.unwrap();
            next_pos[source as usize] = pos;
            messages += sent;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (fsyncs_after, _, _) = shard0(&leader_peer).await;
        let fsyncs = (fsyncs_after - fsyncs_before).max(1);
        let rate = messages as f64 / elapsed;
        if proposers == 1 {
            baseline = rate;
        }
        println!(
            "| {proposers} | {rate:.0} | {:.2} | {:.2} |",
            messages as f64 / fsyncs as f64,
            rate / baseline
        );
    }
    for node in nodes {
        node.stop().await;
    }
}
