//! Reads of shards a node holds no replica of: a node in the metadata group only (what every node
//! is for most shards once shards are placed on fewer nodes than the cluster has) answers clients
//! from replicas on other nodes, the same as a replica answers them.

use std::time::Duration;

use courier_proto::pb::client::keys_client::KeysClient;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    GetKeyCountRequest, GetReceiptsRequest, ListConversationsRequest, ListDevicesRequest,
    RevokeDeviceRequest, SendRequest, ServerFrame, server_frame,
};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::forward_client::ForwardClient;
use courier_proto::pb::peer::{
    AddNodeRequest, GroupId, NodeInfo, ReadShardOp, ReadShardRequest, group_id,
};

use crate::cluster::{SHARDS, init, status, wait_converged, wait_leaders, with_limits};
use crate::messaging::{
    Device, authed, body, code_is, collect, link_tablet, open_stream, phones_on_different_shards,
    register,
};
use crate::support::{channel, connect, peer_channel, peer_tls};

/// The message ids among `frames`, in order.
pub(crate) fn message_ids(frames: &[ServerFrame]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter_map(|frame| match &frame.frame {
            Some(server_frame::Frame::Message(message)) => Some(message.message_id.clone()),
            _ => None,
        })
        .collect()
}

/// Send `i` of `from` to `to` (client id `remote-{i}`, body `hello {i}`) through the node at
/// `addr`, once.
async fn send_nth(
    addr: &str,
    from: &Device,
    to: &Device,
    i: u32,
) -> Result<courier_proto::pb::client::SendResponse, tonic::Status> {
    let request = SendRequest {
        client_msg_id: format!("remote-{i}"),
        to_user: to.user,
        content: body(&format!("hello {i}")),
    };
    let response = MessagingClient::new(channel(addr).await)
        .send(authed(from, request))
        .await?;
    Ok(response.into_inner())
}

/// What `device` sees through the node at `addr`: its devices, the receipts of `sent` (if any), its
/// conversations and its prekey count.
async fn seen_from(addr: &str, device: &Device, sent: &[Vec<u8>]) -> String {
    let devices = RegistrationClient::new(channel(addr).await)
        .list_devices(authed(device, ListDevicesRequest {}))
        .await
        .expect("list devices")
        .into_inner();
    let mut messaging = MessagingClient::new(channel(addr).await);
    let receipts = if sent.is_empty() {
        None
    } else {
        let request = GetReceiptsRequest {
            message_ids: sent.to_vec(),
            group_id: 0,
        };
        let receipts = messaging.get_receipts(authed(device, request)).await;
        Some(receipts.expect("receipts").into_inner())
    };
    let conversations = messaging
        .list_conversations(authed(device, ListConversationsRequest::default()))
        .await
        .expect("conversations")
        .into_inner();
    let keys = KeysClient::new(channel(addr).await)
        .get_key_count(authed(device, GetKeyCountRequest {}))
        .await
        .expect("key count")
        .into_inner();
    format!("{devices:?}\n{receipts:?}\n{conversations:?}\n{keys:?}")
}

/// Node 4 joins the metadata group only and holds no shard; Alice and Bob (on two shards) sign
/// up and talk through node 1. Through node 4 each sees exactly what node 1 shows; Carol
/// registers and Alice sends (and retries a send) through node 4, handed to the replicas, exactly
/// once; Bob's stream through node 4 gets the backlog and then a later message live. Node 4's own store of every shard stays empty; node 4 refuses to answer reads of shards it does not
/// hold, and a replica refuses reads outside the shard asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_answers_clients_from_the_replicas() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=4 {
        let dir = root.path().join(format!("n{id}"));
        let text = with_limits(crate::support::config_text(id, &dir), 1000);
        let config = courier_node::Config::parse(&text).expect("config");
        nodes.push(courier_node::start(config).await.expect("start"));
        dirs.push(dir);
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    init(&peers[..3]).await;
    wait_leaders(&peers[..3], Duration::from_secs(20)).await;
    AdminClient::new(peer_channel(&peers[0]).await)
        .add_node(AddNodeRequest {
            node: Some(NodeInfo {
                node_id: 4,
                peer_addr: peers[3].clone(),
                client_addr: String::new(),
            }),
            group: Some(GroupId {
                kind: Some(group_id::Kind::Metadata(true)),
            }),
        })
        .await
        .expect("node 4 joins the metadata group");

    let addr = |i: usize| nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &dirs[0], &alice_phone).await;
    let bob = register(&addr(0), &dirs[0], &bob_phone).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let response = send_nth(&addr(0), &alice, &bob, i).await.expect("send");
        sent.push(response.message_id);
    }
    let started = std::time::Instant::now();
    while !seen_from(&addr(0), &bob, &[]).await.contains("unread: 3") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "Bob's conversation with Alice shows three unread on node 1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_converged(&peers[..3], Duration::from_secs(30)).await;

    for (device, sent) in [(&alice, sent.clone()), (&bob, Vec::new())] {
        let here = seen_from(&addr(0), device, &sent).await;
        assert_eq!(
            here.matches("state: Sent").count(),
            if device.user == alice.user { 3 } else { 0 },
            "Alice's three messages have receipts, Bob's none: {here}"
        );
        assert_eq!(
            seen_from(&addr(3), device, &sent).await,
            here,
            "user {} sees the same through node 4 as through node 1",
            device.user
        );
    }

    {
        tracing::info!("writes through node 4: a registration and two more sends");
        let carol = register(&addr(3), &dirs[3], "+15550009999").await;
        for i in 3..5 {
            let response = send_nth(&addr(3), &alice, &bob, i)
                .await
                .expect("a send through node 4");
            sent.push(response.message_id);
        }
        let again = send_nth(&addr(3), &alice, &bob, 4)
            .await
            .expect("a retry through node 4");
        assert_eq!(
            Some(&again.message_id),
            sent.last(),
            "a retry through node 4 answers the first attempt's message"
        );
        let started = std::time::Instant::now();
        while !seen_from(&addr(3), &bob, &[]).await.contains("unread: 5") {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "Bob's conversation shows five unread through node 4"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_converged(&peers[..3], Duration::from_secs(30)).await;
        for (device, sent) in [(&alice, sent.clone()), (&carol, Vec::new())] {
            assert_eq!(
                seen_from(&addr(3), device, &sent).await,
                seen_from(&addr(1), device, &sent).await,
                "user {} sees the same through node 4 as through node 2",
                device.user
            );
        }
    }

    {
        tracing::info!("Bob's stream through node 4: the backlog, then a message sent later");
        let mut stream = open_stream(&addr(3), &bob, 0).await;
        let backlog = collect(&mut stream, Duration::from_secs(20), |frames| {
            message_ids(frames).len() >= 5
        })
        .await;
        assert_eq!(message_ids(&backlog), sent, "the backlog, in order, once");
        let later = MessagingClient::new(channel(&addr(0)).await)
            .send(authed(
                &alice,
                SendRequest {
                    client_msg_id: "remote-later".to_owned(),
                    to_user: bob.user,
                    content: body("later"),
                },
            ))
            .await
            .expect("a send while Bob is connected to node 4")
            .into_inner();
        let live = collect(&mut stream, Duration::from_secs(20), |frames| {
            !message_ids(frames).is_empty()
        })
        .await;
        assert_eq!(
            message_ids(&live),
            vec![later.message_id],
            "the later message arrives live, once"
        );
    }

    {
        tracing::info!(
            "Bob's stream through node 4 is told when fetches through node 1 lower his keys"
        );
        let stored = KeysClient::new(channel(&addr(0)).await)
            .upload_keys(authed(&bob, crate::keys::upload(100..111)))
            .await
            .expect("upload")
            .into_inner();
        assert_eq!(stored.one_time_prekeys, 11, "not low yet");
        wait_converged(&peers[..3], Duration::from_secs(30)).await;
        let mut stream = open_stream(&addr(3), &bob, 0).await;
        for _ in 0..2 {
            crate::keys::fetch(&addr(0), &alice, bob.user)
                .await
                .expect("a fetch through node 1");
        }
        let frames = collect(&mut stream, Duration::from_secs(10), |frames| {
            crate::keys::keys_low(frames).contains(&9)
        })
        .await;
        assert_eq!(
            crate::keys::keys_low(&frames),
            vec![9],
            "told once, when the stock fell below 10"
        );
    }

    {
        tracing::info!("a backlog of messages at the content limits reaches node 4's stream whole");
        let mut messaging = MessagingClient::new(channel(&addr(0)).await);
        let mut large = Vec::new();
        for i in 0..16 {
            let content = courier_proto::pb::events::Content {
                body: vec![7; 64 * 1024],
                media: Some(courier_proto::pb::events::MediaRef {
                    url: "https://media.example/x".to_owned(),
                    thumbnail: vec![8; 32 * 1024],
                    mime_type: "image/jpeg".to_owned(),
                    size_bytes: 1,
                }),
            };
            let response = messaging
                .send(authed(
                    &alice,
                    SendRequest {
                        client_msg_id: format!("large-{i}"),
                        to_user: bob.user,
                        content: Some(content),
                    },
                ))
                .await
                .expect("a send at the content limits")
                .into_inner();
            large.push(response.message_id);
        }
        wait_converged(&peers[..3], Duration::from_secs(30)).await;
        let mut stream = open_stream(&addr(3), &bob, 6).await;
        let frames = collect(&mut stream, Duration::from_secs(20), |frames| {
            message_ids(frames).len() >= 16
        })
        .await;
        assert_eq!(message_ids(&frames), large, "all 16, in order, once");
    }

    {
        tracing::info!("a device revoked through node 1 is refused through node 4");
        let tablet = link_tablet(&addr(0), &alice).await;
        wait_converged(&peers[..3], Duration::from_secs(30)).await;
        let list = |addr: String, device: Device| async move {
            RegistrationClient::new(channel(&addr).await)
                .list_devices(authed(&device, ListDevicesRequest {}))
                .await
        };
        list(addr(3), tablet.clone())
            .await
            .expect("the tablet is served through node 4");
        RegistrationClient::new(channel(&addr(0)).await)
            .revoke_device(authed(
                &alice,
                RevokeDeviceRequest {
                    device_id: tablet.device,
                },
            ))
            .await
            .expect("Alice revokes her tablet");
        wait_converged(&peers[..3], Duration::from_secs(30)).await;
        let refused = list(addr(3), tablet.clone())
            .await
            .expect_err("node 4 applies no revocation, yet refuses the revoked tablet");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }

    let node4 = status(&peers[3]).await;
    assert!(
        node4.shards.iter().all(|shard| shard.applied == 0),
        "node 4 applied nothing of any shard: {:?}",
        node4.shards
    );
    let read = |shard: u32, key: Vec<u8>| ReadShardRequest {
        shard,
        ops: vec![ReadShardOp {
            cf: "devices".to_owned(),
            key,
            scan: false,
            to: Vec::new(),
            limit: 0,
        }],
        ..ReadShardRequest::default()
    };
    let refused = ForwardClient::new(connect(&peers[0], peer_tls("node-2")).await)
        .read_shard(read(0, vec![0, 1, 9]))
        .await
        .expect_err("a key of shard 1 asked as shard 0");
    code_is(
        &refused,
        tonic::Code::InvalidArgument,
        "COURIER:Cluster:ReadOutsideShard",
    );
    for shard in 0..SHARDS {
        let refused = ForwardClient::new(connect(&peers[3], peer_tls("node-2")).await)
            .read_shard(read(shard, vec![0, u8::try_from(shard).expect("small"), 9]))
            .await
            .expect_err("node 4 holds no shard");
        code_is(
            &refused,
            tonic::Code::NotFound,
            "COURIER:Cluster:UnknownShard",
        );
    }
    for node in nodes {
        node.stop().await;
    }
}
