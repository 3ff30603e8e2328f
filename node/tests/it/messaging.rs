//! Messaging end to end on three in-process nodes (real gRPC, RocksDB, raft): registration,
//! sends across shards to an offline recipient, device streams with backlog and live delivery,
//! acks and reads, receipts pushed to the sender, dedup of retries, auth and validation errors
//! that change nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    Ack, ApprovePairingRequest, ClientFrame, FinishPairingRequest, ListConversationsRequest, Open,
    Read, RegisterRequest, RegisterResponse, RequestCodeRequest, SendRequest, ServerFrame,
    StartPairingRequest, client_frame, server_frame,
};
use courier_proto::pb::events::{self, ReceiptState};
use courier_proto::{PhoneHasher, PhoneKey, ShardId, UserId, shard_of};
use courier_storage::projection::Projection;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{
    SHARDS, delivered, forward_retrying, init, status, wait_converged, wait_leaders, with_limits,
    with_slow_heartbeat,
};
use crate::support::{channel, log_events, peer_channel};

/// A registered device.
#[derive(Clone, Debug)]
pub(crate) struct Device {
    pub(crate) user: u64,
    pub(crate) device: u32,
    bearer: String,
}

/// The user `phone` registers as in a test cluster (created with [`crate::cluster::PHONE_KEY`]).
pub(crate) fn user_of(phone: &str) -> UserId {
    PhoneHasher::Keyed(PhoneKey::new(crate::cluster::PHONE_KEY)).user_of_phone(phone)
}

pub(crate) async fn register(client_addr: &str, data_dir: &std::path::Path, phone: &str) -> Device {
    let code = code_for(client_addr, data_dir, phone).await;
    let response = RegistrationClient::new(channel(client_addr).await)
        .register(RegisterRequest {
            phone_number: phone.to_owned(),
            code,
            device_name: "phone".to_owned(),
        })
        .await
        .expect("register")
        .into_inner();
    Device::registered(&response)
}

/// A code for `phone` from the node at `client_addr`, read from that node's development SMS
/// file in `data_dir`.
pub(crate) async fn code_for(client_addr: &str, data_dir: &std::path::Path, phone: &str) -> String {
    RegistrationClient::new(channel(client_addr).await)
        .request_code(RequestCodeRequest {
            phone_number: phone.to_owned(),
        })
        .await
        .expect("code");
    let outbox = std::fs::read_to_string(data_dir.join("sms-outbox.log")).expect("dev sms file");
    outbox
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{phone} ")))
        .expect("a code for the phone")
        .to_owned()
}

impl Device {
    /// The device a registration answered with.
    pub(crate) fn registered(response: &RegisterResponse) -> Self {
        Device {
            user: response.user_id,
            device: response.device_id,
            bearer: courier_node::client::auth::bearer(
                response.user_id,
                response.device_id,
                &response.device_token,
            ),
        }
    }
}

/// Acks `device`'s inbox up to `up_to_seq` on an open stream.
pub(crate) async fn ack(stream: &Stream, up_to_seq: u64) {
    stream
        .out
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Ack(Ack { up_to_seq })),
        })
        .await
        .expect("ack");
}

/// A `Read` frame of the 1:1 conversation with `with_user` up to `up_to_seq`.
pub(crate) fn read_frame(with_user: u64, up_to_seq: u64) -> ClientFrame {
    ClientFrame {
        frame: Some(client_frame::Frame::Read(Read {
            conversation: Some(events::Conversation {
                with: Some(events::conversation::With::User(with_user)),
            }),
            up_to_seq,
        })),
    }
}

/// Links a companion device ("tablet") for `primary`'s user through the node at `addr`: the
/// tablet starts a pairing, the primary approves its code, the tablet collects its credential.
pub(crate) async fn link_tablet(addr: &str, primary: &Device) -> Device {
    let mut registration = RegistrationClient::new(channel(addr).await);
    let pairing = registration
        .start_pairing(StartPairingRequest {
            device_name: "tablet".to_owned(),
        })
        .await
        .expect("start pairing")
        .into_inner();
    registration
        .approve_pairing(authed(
            primary,
            ApprovePairingRequest { code: pairing.code },
        ))
        .await
        .expect("the primary approves");
    let response = registration
        .finish_pairing(FinishPairingRequest {
            pairing_id: pairing.pairing_id,
        })
        .await
        .expect("the tablet collects its credential")
        .into_inner();
    Device {
        user: primary.user,
        device: response.device_id,
        bearer: courier_node::client::auth::bearer(
            primary.user,
            response.device_id,
            &response.device_token,
        ),
    }
}

pub(crate) fn authed<T>(device: &Device, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", device.bearer.parse().expect("ascii"));
    request
}

pub(crate) fn body(text: &str) -> Option<events::Content> {
    Some(events::Content {
        body: text.as_bytes().to_vec(),
        media: None,
    })
}

/// An open device stream: frames arrive on `frames`, acks and reads go out on `out`.
pub(crate) struct Stream {
    pub(crate) frames: tonic::Streaming<ServerFrame>,
    pub(crate) out: mpsc::Sender<ClientFrame>,
}

pub(crate) async fn open_stream(addr: &str, device: &Device, resume_after: u64) -> Stream {
    open_stream_with(addr, device, resume_after, false).await
}

async fn open_stream_with(
    addr: &str,
    device: &Device,
    resume_after: u64,
    hide_last_seen: bool,
) -> Stream {
    open_stream_from(
        addr,
        device,
        Open {
            resume_after_seq: resume_after,
            hide_last_seen,
            ..Open::default()
        },
    )
    .await
}

/// Opens `device`'s stream at `addr` with `open` as its first frame.
pub(crate) async fn open_stream_from(addr: &str, device: &Device, open: Open) -> Stream {
    let (out, rx) = mpsc::channel(16);
    out.send(ClientFrame {
        frame: Some(client_frame::Frame::Open(open)),
    })
    .await
    .expect("open");
    let frames = MessagingClient::new(channel(addr).await)
        .stream(authed(device, ReceiverStream::new(rx)))
        .await
        .expect("stream")
        .into_inner();
    Stream { frames, out }
}

/// Reads frames until `want` returns true or `timeout` passes; returns everything read.
pub(crate) async fn collect(
    stream: &mut Stream,
    timeout: Duration,
    mut done: impl FnMut(&[ServerFrame]) -> bool,
) -> Vec<ServerFrame> {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    while !done(&frames) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.frames.message()).await {
            Ok(Ok(Some(frame))) => frames.push(frame),
            _ => break,
        }
    }
    frames
}

fn messages(frames: &[ServerFrame]) -> Vec<(u64, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Message(m)) => Some((m.seq, m.message_id.clone())),
            _ => None,
        })
        .collect()
}

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<courier_node::NodeHandle>,
    pub(crate) dirs: Vec<std::path::PathBuf>,
    _root: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    cluster_with(10_000).await
}

async fn cluster_with(sends_per_second: u32) -> Cluster {
    cluster_configured(&|text| with_limits(text, sends_per_second)).await
}

impl Cluster {
    /// Waits until every replica applied the same log (registrations made through one node are
    /// then visible on all: each node reads its own replica).
    pub(crate) async fn wait_converged(&self) {
        let peers: Vec<String> = self.nodes.iter().map(|n| n.peer_addr.to_string()).collect();
        wait_converged(&peers, Duration::from_secs(30)).await;
    }
}

/// Three in-process nodes whose config text `edit` adjusts.
pub(crate) async fn cluster_configured(edit: &dyn Fn(String) -> String) -> Cluster {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=3 {
        let dir = root.path().join(format!("n{id}"));
        let text = edit(crate::support::config_text(id, &dir));
        let config = courier_node::Config::parse(&text).expect("config");
        nodes.push(courier_node::start(config).await.expect("start"));
        dirs.push(dir);
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    init(&peers).await;
    wait_leaders(&peers, Duration::from_secs(20)).await;
    Cluster {
        nodes,
        dirs,
        _root: root,
    }
}

/// Three in-process nodes with `extra` (whole TOML tables) appended to their config.
pub(crate) async fn cluster_appending(extra: &str) -> Cluster {
    cluster_configured(&|text| format!("{text}\n{extra}")).await
}

/// The shard of `group` in the tests' four-shard clusters.
pub(crate) fn group_shard_of(group: u64) -> ShardId {
    courier_proto::shard_of_group(
        courier_proto::GroupId::new(group).expect("nonzero group id"),
        4,
    )
}

/// Creates a group named "two" by `by` with `members` through the node at `addr`; its id.
pub(crate) async fn create_group(addr: &str, by: &Device, members: Vec<u64>) -> u64 {
    use courier_proto::pb::client::CreateGroupRequest;
    use courier_proto::pb::client::groups_client::GroupsClient;
    GroupsClient::new(channel(addr).await)
        .create_group(authed(
            by,
            CreateGroupRequest {
                name: "two".to_owned(),
                members,
            },
        ))
        .await
        .expect("create")
        .into_inner()
        .group_id
}

/// Two phone numbers whose users live on different shards.
pub(crate) fn phones_on_different_shards() -> (String, String) {
    let count = u16::try_from(SHARDS).expect("small");
    let alice = "+15550000001".to_owned();
    let alice_shard = shard_of(user_of(&alice), count);
    let bob = (2..100)
        .map(|i| format!("+155500000{i:02}"))
        .find(|p| shard_of(user_of(p), count) != alice_shard)
        .expect("a number elsewhere");
    (alice, bob)
}

/// Alice and Bob on different shards; Bob is offline while Alice sends 200; Bob's two devices
/// each receive exactly those 200, in order; acks and a read reach Alice's stream as SENT,
/// DELIVERED, READ for every message, never backwards; a retried send is answered with the first
/// result and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_everything_in_order_and_receipts_flow_back() {
    let c = cluster().await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    assert_eq!(
        alice.user,
        user_of(&alice_phone).get(),
        "hashed under the test key"
    );
    assert_ne!(
        shard_of(UserId::new(alice.user).expect("id"), 4),
        shard_of(UserId::new(bob.user).expect("id"), 4)
    );

    let mut alice_stream = open_stream(&addr(0), &alice, 0).await;
    let mut sent = Vec::new();
    {
        tracing::info!("Alice sends 200 through node 2 while Bob is offline");
        let mut messaging = MessagingClient::new(channel(&addr(1)).await);
        for i in 0..200 {
            let request = SendRequest {
                client_msg_id: format!("a-{i}"),
                to_user: bob.user,
                content: body(&format!("hello {i}")),
            };
            let response = messaging
                .send(authed(&alice, request))
                .await
                .expect("send")
                .into_inner();
            assert!(!response.duplicate);
            sent.push(response.message_id);
        }
        let retry = SendRequest {
            client_msg_id: "a-0".to_owned(),
            to_user: bob.user,
            content: body("hello 0"),
        };
        let again = messaging
            .send(authed(&alice, retry))
            .await
            .expect("retry")
            .into_inner();
        assert!(again.duplicate, "a retry is recognised");
        assert_eq!(again.message_id, sent[0], "a retry gets the first result");
    }
    let want: Vec<(u64, Vec<u8>)> = sent
        .iter()
        .enumerate()
        .map(|(i, id)| (i as u64 + 1, id.clone()))
        .collect();
    tracing::info!("Bob links a second device");
    let bob2 = link_tablet(&addr(2), &bob).await;
    {
        tracing::info!("each of Bob's devices receives exactly the 200, in order, on any node");
        for (node, device) in [(2, &bob), (0, &bob2)] {
            let mut stream = open_stream(&addr(node), device, 0).await;
            let frames = collect(&mut stream, Duration::from_secs(30), |f| {
                messages(f).len() >= 200
            })
            .await;
            assert_eq!(messages(&frames), want, "device {} of Bob", device.device);
            let extra = collect(&mut stream, Duration::from_millis(300), |f| !f.is_empty()).await;
            assert!(
                messages(&extra).is_empty(),
                "nothing beyond the 200, no duplicate of the retry"
            );
        }
    }
    let count_state = |frames: &[ServerFrame], state: ReceiptState| {
        frames.iter().filter(|x| matches!(&x.frame, Some(server_frame::Frame::Receipt(r)) if r.state == i32::from(state))).count()
    };
    let mut alice_frames = Vec::new();
    {
        tracing::info!("Bob's first device acks everything: Alice sees DELIVERED for each");
        let stream = open_stream(&addr(2), &bob, 200).await;
        ack(&stream, 200).await;
        alice_frames.extend(
            collect(&mut alice_stream, Duration::from_secs(30), |f| {
                count_state(f, ReceiptState::Delivered) >= 200
            })
            .await,
        );
        assert_eq!(count_state(&alice_frames, ReceiptState::Delivered), 200);
        let db = c.nodes[2].groups().db().clone();
        let shard = shard_of(UserId::new(bob.user).expect("id"), 4);
        assert_eq!(
            read_cursor(&db, shard, bob.user, bob.device),
            200,
            "the acking device's cursor moved"
        );
        assert_eq!(
            read_cursor(&db, shard, bob.user, bob2.device),
            0,
            "the other device's cursor did not"
        );
        tracing::info!("then Bob reads the conversation: Alice sees READ for each");
        let conversation = Some(events::Conversation {
            with: Some(events::conversation::With::User(alice.user)),
        });
        stream
            .out
            .send(ClientFrame {
                frame: Some(client_frame::Frame::Read(Read {
                    conversation,
                    up_to_seq: 200,
                })),
            })
            .await
            .expect("read");
        let more = collect(&mut alice_stream, Duration::from_secs(30), |f| {
            count_state(f, ReceiptState::Read) >= 200
        })
        .await;
        alice_frames.extend(more);
    }
    {
        tracing::info!(
            "per message, Alice saw SENT, DELIVERED, READ in that order, never backwards"
        );
        let mut states: BTreeMap<Vec<u8>, Vec<i32>> = BTreeMap::new();
        for frame in alice_frames {
            if let Some(server_frame::Frame::Receipt(r)) = frame.frame {
                states.entry(r.message_id).or_default().push(r.state);
            }
        }
        assert_eq!(states.len(), 200, "a receipt for every message");
        let (s, d, r) = (
            i32::from(ReceiptState::Sent),
            i32::from(ReceiptState::Delivered),
            i32::from(ReceiptState::Read),
        );
        for (id, seen) in states {
            assert_eq!(
                seen,
                vec![s, d, r],
                "message {id:?}: sent, delivered, read, once each and in order"
            );
        }
    }
    {
        tracing::info!("Bob's conversation list shows nothing unread");
        let list = MessagingClient::new(channel(&addr(0)).await)
            .list_conversations(authed(&bob, ListConversationsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.conversations.len(), 1);
        assert_eq!(list.conversations[0].unread, 0);
        assert_eq!(
            list.conversations[0].last_seq, 200,
            "the conversation's latest message"
        );
    }
    {
        tracing::info!("node 2's metrics count the sends it answered and their commit times");
        let text = crate::support::scrape(c.nodes[1].metrics_addr.expect("metrics")).await;
        for line in [
            "courier_sends_total{outcome=\"accepted\"} 200",
            "courier_sends_total{outcome=\"duplicate\"} 1",
            "courier_send_commit_seconds_count 201",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        let alice_shard = shard_of(UserId::new(alice.user).expect("id"), 4);
        let bob_shard = shard_of(UserId::new(bob.user).expect("id"), 4);
        assert!(
            text.contains(&format!(
                "courier_shard_outbox_dest_entries{{shard=\"{}\",dest=\"{}\"}}",
                alice_shard.get(),
                bob_shard.get()
            )),
            "Alice's shard has an outbox towards Bob's:\n{text}"
        );
        let text = crate::support::scrape(c.nodes[0].metrics_addr.expect("metrics")).await;
        assert!(
            text.contains("courier_live_streams 1"),
            "Alice's stream is open on node 1:\n{text}"
        );
    }
    drop(alice_stream);
    for node in c.nodes {
        node.stop().await;
    }
    {
        tracing::info!("courier-ops follows the last message across both shards");
        let id = courier_storage::projection::hex(&sent[199]);
        let dir = c.dirs[0].display().to_string();
        let (code, out, err) =
            crate::support::ops(&["inspect", "message", "--data-dir", &dir, "--id", &id]);
        assert_eq!(code, 0, "{out}{err}");
        for step in [
            "sent ",
            "delivered ",
            "acked ",
            "read ",
            "forwarded ",
            "receipt ",
        ] {
            assert!(out.contains(step), "{step:?} missing from:\n{out}");
        }
        assert!(out.contains("inbox seq 200 of user"), "{out}");
        assert!(out.contains("Read for user"), "{out}");
        let (code, out, _) = crate::support::ops(&[
            "inspect",
            "message",
            "--data-dir",
            &dir,
            "--id",
            "00000000000000000000000000000001",
        ]);
        assert_eq!(code, 1, "an unknown message: {out}");
    }
}

/// `delivered_up_to` of `user`'s inbox on `node`.
pub(crate) fn delivered_up_to(node: &courier_node::NodeHandle, user: u64) -> u64 {
    let user = UserId::new(user).expect("id");
    on_replica(node, shard_of(user, 4), Projection::Inbox, |view| {
        Ok(courier_storage::projection::inbox::state(view, user)?.delivered_up_to)
    })
}

fn read_cursor(
    db: &std::sync::Arc<courier_storage::Db>,
    shard: ShardId,
    user: u64,
    device: u32,
) -> u64 {
    use courier_storage::kv::Staged;
    use courier_storage::projection::{Projection, View, cursors};
    let mut staged = Staged::new(db.as_ref(), BTreeMap::new());
    let view = View::new(
        &mut staged,
        shard,
        courier_proto::LogIndex::ZERO,
        Projection::Cursors,
    );
    let user = UserId::new(user).expect("id");
    let device = courier_proto::DeviceId::new(device).expect("id");
    cursors::acked(&view, user, device).expect("read").get()
}

/// A forwarded batch cut at a whole proposal's size (as a node did before
/// `FORWARD_STAMP_BYTES_MAX`, so during a rolling upgrade) outgrows one proposal once its
/// destination stamps `stored_at_ms`: the destination stores the prefix that fits and answers up
/// to it, and the rest follows. Before, the destination refused the whole batch as too large
/// (`COURIER:Shard:ProposalTooLarge`) on every retry and the pair never moved again. The 1 MiB
/// entry needs the slow heartbeat ([`with_slow_heartbeat`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_once_stamped_is_stored_up_to_the_prefix_that_fits() {
    use courier_proto::limits::{
        FORWARD_BATCH_EVENTS_MAX, MESSAGE_BODY_BYTES_MAX, PROPOSAL_BYTES_MAX,
    };
    use courier_proto::pb::events::{Event, event::Kind};
    let c = cluster_configured(&with_slow_heartbeat).await;
    let peer = c.nodes[0].peer_addr.to_string();
    let (dest, user, first) = (0, 100, 1);
    let mut events: Vec<Event> = Vec::new();
    let mut bytes = 0;
    for pos in first.. {
        // 15 maximal messages, then small ones up to the proposal's size.
        let body = if pos < first + 15 {
            MESSAGE_BODY_BYTES_MAX
        } else {
            200
        };
        let mut event = delivered(user, dest, pos);
        if let Some(Kind::MessageDelivered(d)) = event.kind.as_mut() {
            d.content = Some(events::Content {
                body: vec![b'x'; body],
                media: None,
            });
        }
        let len = prost::Message::encoded_len(&event);
        if bytes + len > PROPOSAL_BYTES_MAX || events.len() == FORWARD_BATCH_EVENTS_MAX {
            break;
        }
        bytes += len;
        events.push(event);
    }
    let last = first + u64::try_from(events.len()).expect("small") - 1;
    let stamped: usize = events
        .iter()
        .map(|event| {
            let mut event = event.clone();
            if let Some(Kind::MessageDelivered(d)) = event.kind.as_mut() {
                d.stored_at_ms = 1_800_000_000_000;
            }
            prost::Message::encoded_len(&event)
        })
        .sum();
    assert!(
        stamped > PROPOSAL_BYTES_MAX,
        "the batch outgrows a proposal once stamped: {bytes} -> {stamped}"
    );
    let (stored, retried) = forward_retrying(&peer, dest, first, &events).await;
    // After a retry the first attempt's prefix may already be stored, and the retry then
    // stores the rest: only an answer at the first attempt must stop short of the last.
    assert!(
        stored > first && (stored < last || retried && stored == last),
        "stored up to {stored} of {first}..={last} (retried: {retried})"
    );
    if stored < last {
        let rest = usize::try_from(stored + 1 - first).expect("small");
        let (stored, _) = forward_retrying(&peer, dest, stored + 1, &events[rest..]).await;
        assert_eq!(stored, last);
    }
}

/// Messages of the largest body, sent at once, queue in the sender's outbox beyond what one
/// proposal may hold (`PROPOSAL_BYTES_MAX`): the forwarder sends them in batches that fit, and
/// the recipient gets every one exactly once. (A batch of all of them was refused by the
/// destination's proposer as too large, again on every retry: the pair never moved again, and
/// acknowledged messages were never delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_queued_beyond_one_proposal_are_all_forwarded() {
    use courier_proto::limits::{MESSAGE_BODY_BYTES_MAX, PROPOSAL_BYTES_MAX};
    let c = cluster_configured(&with_slow_heartbeat).await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    // Five proposals' worth: more than one gRPC message (4 MiB) holds, for the log read below.
    let count = 5 * PROPOSAL_BYTES_MAX / MESSAGE_BODY_BYTES_MAX;
    let messaging = MessagingClient::new(channel(&addr(0)).await);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..count {
        let (mut messaging, alice) = (messaging.clone(), alice.clone());
        sends.spawn(async move {
            let request = SendRequest {
                client_msg_id: format!("big-{i}"),
                to_user: bob.user,
                content: Some(events::Content {
                    body: vec![b'x'; MESSAGE_BODY_BYTES_MAX],
                    media: None,
                }),
            };
            // As a phone does: an UNAVAILABLE send (a leader change under the burst) is sent
            // again with the same id.
            for _ in 0..50 {
                match messaging.send(authed(&alice, request.clone())).await {
                    Ok(response) => return response.into_inner().message_id,
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(status) => panic!("send: {status:?}"),
                }
            }
            panic!("send {i}: still unavailable after 50 tries")
        });
    }
    let mut sent: Vec<Vec<u8>> = sends.join_all().await;
    sent.sort();
    let mut stream = open_stream(&addr(1), &bob, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(30), |f| {
        messages(f).len() >= count
    })
    .await;
    let got = messages(&frames);
    let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
    let want_seqs: Vec<u64> = (1..=u64::try_from(count).expect("small")).collect();
    assert_eq!(seqs, want_seqs, "{count} messages, in inbox order");
    let mut ids: Vec<Vec<u8>> = got.into_iter().map(|(_, id)| id).collect();
    ids.sort();
    assert_eq!(ids, sent, "each acknowledged message exactly once");
    // The sender's log holds more than one gRPC message's worth (a reader decodes at most
    // 4 MiB): read back in pages that fit.
    c.wait_converged().await;
    let alice_shard = shard_of(UserId::new(alice.user).expect("id"), 4);
    let logged = logged_events(&c.nodes[2], alice_shard).await;
    let sends = logged
        .iter()
        .filter(|kind| matches!(kind, events::event::Kind::MessageSent(_)))
        .count();
    assert_eq!(sends, count, "every send is in the log, read page by page");
}

async fn last_log_indexes(peer: &str) -> Vec<u64> {
    status(peer)
        .await
        .shards
        .iter()
        .map(|s| s.last_log_index)
        .collect()
}

pub(crate) fn code_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("courier-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Missing, malformed and revoked tokens get UNAUTHENTICATED; oversize bodies, empty client ids
/// and unknown recipients get INVALID_ARGUMENT / NOT_FOUND; none of them appends to any log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_change_nothing() {
    let c = cluster().await;
    let addr = c.nodes[0].client_addr.to_string();
    let peer = c.nodes[0].peer_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr, &c.dirs[0], &alice_phone).await;
    let bob = register(&addr, &c.dirs[0], &bob_phone).await;
    let again = register(&addr, &c.dirs[0], &alice_phone).await;
    assert_eq!(again.user, alice.user, "the same number is the same user");
    assert_eq!(again.device, alice.device + 1, "a new primary device");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = last_log_indexes(&peer).await;
    let mut messaging = MessagingClient::new(channel(&addr).await);
    let send = |id: &str, to: u64, content| SendRequest {
        client_msg_id: id.to_owned(),
        to_user: to,
        content,
    };

    let status = messaging
        .send(tonic::Request::new(send("x", bob.user, body("hi"))))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let garbage = Device {
        bearer: "Bearer 1.1.00".to_owned(),
        ..alice.clone()
    };
    let status = messaging
        .send(authed(&garbage, send("x", bob.user, body("hi"))))
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let status = messaging
        .send(authed(&alice, send("x", bob.user, body("hi"))))
        .await
        .expect_err("revoked by re-registration");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        !status.message().contains(&again.bearer[7..]),
        "errors never echo tokens"
    );

    let oversize = Some(events::Content {
        body: vec![0; 64 * 1024 + 1],
        media: None,
    });
    let status = messaging
        .send(authed(&again, send("x", bob.user, oversize)))
        .await
        .expect_err("oversize");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(code_of(&status), "COURIER:Wire:TooLong");
    let status = messaging
        .send(authed(&again, send("", bob.user, body("hi"))))
        .await
        .expect_err("empty id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = messaging
        .send(authed(&again, send("x", 12345, body("hi"))))
        .await
        .expect_err("unknown recipient");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(code_of(&status), "COURIER:Messaging:UnknownRecipient");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        last_log_indexes(&peer).await,
        before,
        "no rejected request appended anything"
    );
    let ok = messaging
        .send(authed(&again, send("x", bob.user, body("hi"))))
        .await
        .expect("the new device sends");
    assert!(!ok.into_inner().duplicate);
    for node in c.nodes {
        node.stop().await;
    }
}

/// A cluster whose shard leaders look for retention work every 200 ms, with the `[retention]`
/// settings `windows` (TOML lines).
async fn retention_cluster(windows: &str) -> Cluster {
    retention_cluster_scanning(windows, "200ms").await
}

/// A cluster whose `[retention]` section holds `windows` and scans every `interval`.
async fn retention_cluster_scanning(windows: &str, interval: &str) -> Cluster {
    cluster_configured(&|text| {
        format!(
            "{}\n[retention]\n{windows}scan-interval = \"{interval}\"\n",
            with_limits(text, 10_000)
        )
    })
    .await
}

/// Alice and Bob registered on shards of their own through node 0: node 0's client address,
/// Alice's phone, both devices, and a messaging client on node 0.
async fn alice_and_bob_on_node0(
    c: &Cluster,
) -> (
    String,
    String,
    Device,
    Device,
    MessagingClient<tonic::transport::Channel>,
) {
    let addr = c.nodes[0].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr, &c.dirs[0], &alice_phone).await;
    let bob = register(&addr, &c.dirs[0], &bob_phone).await;
    let messaging = MessagingClient::new(channel(&addr).await);
    (addr, alice_phone, alice, bob, messaging)
}

/// Revoking a device that is revoked already answers OK and writes nothing: a repeated call
/// (a retry after a lost answer) cannot append to the user's shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_revoked_device_writes_no_log_entry() {
    use courier_proto::pb::client::RevokeDeviceRequest;
    let c = cluster().await;
    let (addr, _, alice, _, _) = alice_and_bob_on_node0(&c).await;
    let tablet = link_tablet(&addr, &alice).await;
    let revoke = || {
        authed(
            &alice,
            RevokeDeviceRequest {
                device_id: tablet.device,
            },
        )
    };
    let mut registration = RegistrationClient::new(channel(&addr).await);
    registration.revoke_device(revoke()).await.expect("revoke");
    c.wait_converged().await;
    registration
        .revoke_device(revoke())
        .await
        .expect("a revoked device revoked again is no error");
    c.wait_converged().await;
    let alice_shard = shard_of(UserId::new(alice.user).expect("id"), 4);
    let revocations = logged_events(&c.nodes[0], alice_shard)
        .await
        .iter()
        .filter(|kind| {
            matches!(kind, events::event::Kind::DeviceRevoked(revoked)
                if revoked.user == alice.user && revoked.device == tablet.device)
        })
        .count();
    assert_eq!(revocations, 1, "the second revocation is not logged");
}

/// An ack at or below the device's cursor and a read at or below the conversation's read
/// position change nothing, so the node writes no log entry for them: a client repeating its last
/// ack or read (after a reconnect, or in a loop) cannot fill the shard's log or its proposal
/// queue. The next real ack is logged as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_or_read_that_moves_nothing_writes_no_log_entry() {
    let c = cluster().await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let bob_id = UserId::new(bob.user).expect("id");
    let bob_shard = shard_of(bob_id, 4);
    let send = |id: &str| SendRequest {
        client_msg_id: id.to_owned(),
        to_user: bob.user,
        content: body("hi"),
    };
    let read = |up_to_seq: u64| read_frame(alice.user, up_to_seq);
    // Every replica applied bob's cursor at `seq` and his read of the conversation up to `read`.
    let applied_everywhere = |seq: u64, read_seq: u64| {
        c.nodes.iter().all(|node| {
            let cursor = on_replica(node, bob_shard, Projection::Cursors, |view| {
                courier_storage::projection::cursors::acked(
                    view,
                    bob_id,
                    courier_proto::DeviceId::new(bob.device).expect("id"),
                )
            });
            let state = on_replica(node, bob_shard, Projection::ReadState, |view| {
                courier_storage::projection::readstate::get(
                    view,
                    bob_id,
                    courier_proto::ConversationId::Direct(UserId::new(alice.user).expect("id")),
                )
            });
            cursor.get() == seq && state.read_seq == read_seq
        })
    };
    let wait_applied = |seq: u64, read_seq: u64| async move {
        let started = Instant::now();
        while !applied_everywhere(seq, read_seq) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "ack {seq} and read {read_seq} not applied on every replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    messaging
        .send(authed(&alice, send("m1")))
        .await
        .expect("send");
    let mut stream = open_stream(&addr, &bob, 0).await;
    collect(&mut stream, Duration::from_secs(10), |f| {
        !messages(f).is_empty()
    })
    .await;
    ack(&stream, 1).await;
    stream.out.send(read(1)).await.expect("read");
    wait_applied(1, 1).await;

    // The same ack and read again: nothing to move.
    ack(&stream, 1).await;
    stream.out.send(read(1)).await.expect("read");
    // Then a message and an ack that do move; frames of one stream are handled in order.
    messaging
        .send(authed(&alice, send("m2")))
        .await
        .expect("send");
    collect(&mut stream, Duration::from_secs(10), |f| {
        !messages(f).is_empty()
    })
    .await;
    ack(&stream, 2).await;
    wait_applied(2, 1).await;

    let logged = logged_events(&c.nodes[0], bob_shard).await;
    let acks: Vec<u64> = logged
        .iter()
        .filter_map(|kind| match kind {
            events::event::Kind::DeliveryAcked(acked) if acked.user == bob.user => {
                Some(acked.up_to_seq)
            }
            _ => None,
        })
        .collect();
    let reads: Vec<u64> = logged
        .iter()
        .filter_map(|kind| match kind {
            events::event::Kind::ReadUpTo(read) if read.user == bob.user => Some(read.up_to_seq),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![1, 2], "the repeated ack is not logged");
    assert_eq!(reads, vec![1], "the repeated read is not logged");
}

/// A device that authenticated (so this node remembers its token) and is then revoked by a new
/// primary registration is refused once the node applied the revocation: the device cache never
/// outlives a device change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_voids_a_remembered_token() {
    let c = cluster().await;
    let (addr, alice_phone, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let send = |id: &str| SendRequest {
        client_msg_id: id.to_owned(),
        to_user: bob.user,
        content: body("hi"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Until this node applied both registrations, a send may be refused; then it is accepted and
    // the node remembers Alice's token.
    loop {
        match messaging.send(authed(&alice, send("first"))).await {
            Ok(_) => break,
            Err(status) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%status, "not yet applied here");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("alice's first send: {status}"),
        }
    }
    messaging
        .send(authed(&alice, send("second")))
        .await
        .expect("a remembered token is accepted");
    let again = register(&addr, &c.dirs[0], &alice_phone).await;
    assert_eq!(again.user, alice.user);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match messaging.send(authed(&alice, send("after"))).await {
            Err(status) => break status,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => panic!("the revoked device was still accepted after 10 s"),
        }
    };
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    messaging
        .send(authed(&again, send("new device")))
        .await
        .expect("the new device sends");
    for node in c.nodes {
        node.stop().await;
    }
}

/// Three node processes; Alice sends 100 messages to Bob through a node that does not lead her
/// shard, retrying each send with the same client id until it is acknowledged; after 30 sends the
/// leader of Alice's shard is SIGKILLed. Afterwards Bob's inbox holds every acknowledged message
/// exactly once, in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_senders_leader_loses_and_duplicates_nothing() {
    let (mut cluster, leaders) = crate::cluster::Processes::start_initialized(3).await;
    let addrs = cluster.addrs.clone();

    let (alice_phone, bob_phone) = phones_on_different_shards();
    let data_dir = cluster.procs[0].data_dir.clone();
    let alice = register(&addrs[0].client, &data_dir, &alice_phone).await;
    let bob = register(&addrs[0].client, &data_dir, &bob_phone).await;
    let alice_shard = u32::from(shard_of(UserId::new(alice.user).expect("id"), 4).get());
    let victim = usize::try_from(leaders[&alice_shard] - 1).expect("small");
    let via = (victim + 1) % 3;
    let client_addr = addrs[via].client.clone();

    let mut acked = Vec::new();
    let mut retries = 0;
    for i in 0..100 {
        if i == 30 {
            tracing::info!("SIGKILL the leader of Alice's shard mid-stream");
            cluster.kill(victim);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let request = SendRequest {
                client_msg_id: format!("k-{i}"),
                to_user: bob.user,
                content: body(&format!("m{i}")),
            };
            let attempt = async {
                MessagingClient::new(channel(&client_addr).await)
                    .send(authed(&alice, request))
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(response)) => {
                    acked.push(response.into_inner().message_id);
                    break;
                }
                _ => {
                    retries += 1;
                    assert!(
                        Instant::now() < deadline,
                        "send {i} not acknowledged within 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    eprintln!("100 sends acknowledged, {retries} retries across the failover");
    let mut stream = open_stream(&client_addr, &bob, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(30), |f| {
        messages(f).len() >= 100
    })
    .await;
    let extra = collect(&mut stream, Duration::from_millis(500), |f| !f.is_empty()).await;
    let got: Vec<Vec<u8>> = messages(&frames)
        .into_iter()
        .chain(messages(&extra))
        .map(|(_, id)| id)
        .collect();
    assert_eq!(
        got, acked,
        "every acknowledged message once, in order, nothing else"
    );
    drop(cluster);
}

/// With a 2 s retention, an undelivered message expires on every replica (a `MessageExpired`
/// in the log), an acked one stays, a device opening its stream later gets only the survivor,
/// and every replica's projections still equal a rebuild from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_messages_expire_on_every_replica() {
    let c = retention_cluster("undelivered = \"2s\"\nkeep-delivered = true\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let send = |id: &str| SendRequest {
        client_msg_id: id.to_owned(),
        to_user: bob.user,
        content: body(id),
    };
    let kept = messaging
        .send(authed(&alice, send("kept")))
        .await
        .expect("send")
        .into_inner();
    {
        let mut stream = open_stream(&addr, &bob, 0).await;
        collect(&mut stream, Duration::from_secs(10), |f| {
            messages(f).len() == 1
        })
        .await;
        ack(&stream, 1).await;
        let acked = Instant::now();
        while delivered_up_to(&c.nodes[0], bob.user) < 1 {
            assert!(acked.elapsed() < Duration::from_secs(10), "the ack commits");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let expiring = messaging
        .send(authed(&alice, send("expiring")))
        .await
        .expect("send")
        .into_inner();
    let bob_shard = shard_of(UserId::new(bob.user).expect("id"), 4);
    let inbox_of = |node: &courier_node::NodeHandle| {
        on_replica(node, bob_shard, Projection::Inbox, |view| {
            let user = UserId::new(bob.user).expect("id");
            let entry = |seq| {
                courier_storage::projection::inbox::entry(
                    view,
                    user,
                    courier_proto::InboxSeq::new(seq),
                )
            };
            Ok([
                entry(1)?.map(|e| e.message_id),
                entry(2)?.map(|e| e.message_id),
            ])
        })
    };
    let stored = Instant::now();
    while !c.nodes.iter().map(inbox_of).all(|inbox| inbox[1].is_some()) {
        assert!(
            stored.elapsed() < Duration::from_secs(10),
            "the message reaches Bob's inbox on every replica first"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    loop {
        let all: Vec<_> = c.nodes.iter().map(inbox_of).collect();
        if all.iter().all(|inbox| inbox[1].is_none()) {
            for inbox in &all {
                assert_eq!(
                    inbox[0].as_ref(),
                    Some(&kept.message_id),
                    "the acked one stays"
                );
            }
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the undelivered message did not expire everywhere: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        stored.elapsed() >= Duration::from_millis(1500),
        "not before the retention passed"
    );
    let _ = expiring;
    {
        let mut stream = open_stream(&addr, &bob, 0).await;
        let frames = collect(&mut stream, Duration::from_secs(1), |f| {
            messages(f).len() > 1
        })
        .await;
        assert_eq!(
            messages(&frames),
            vec![(1, kept.message_id.clone())],
            "a stream opened later gets only the message that did not expire"
        );
    }
    for node in &c.nodes {
        assert_verified_from_genesis(node, bob_shard).await;
        let expired: Vec<_> = logged_events(node, bob_shard)
            .await
            .into_iter()
            .filter_map(|kind| match kind {
                events::event::Kind::MessageExpired(x) => Some(x.message_id),
                _ => None,
            })
            .collect();
        assert!(
            !expired.is_empty() && expired.iter().all(|id| *id == expiring.message_id),
            "the log holds the expiry of exactly that message: {expired:?}"
        );
    }
}

/// With a 2 s dedup window, a retry inside the window gets the first send's result; once the
/// window passed the sender's shard leader forgets the send (a `SendsForgotten` in the log), the
/// record leaves every replica, a retry of the same client id is a new message, and every
/// replica's projections still equal a rebuild from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_forgotten_after_the_dedup_window() {
    let c = retention_cluster("dedup = \"2s\"\n").await;
    let (_, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let send = || SendRequest {
        client_msg_id: "once".to_owned(),
        to_user: bob.user,
        content: body("once"),
    };
    let first = messaging
        .send(authed(&alice, send()))
        .await
        .expect("send")
        .into_inner();
    let sent = Instant::now();
    let retry = messaging
        .send(authed(&alice, send()))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        retry.message_id, first.message_id,
        "inside the window a retry is the first send"
    );
    let alice_shard = shard_of(UserId::new(alice.user).expect("id"), 4);
    let known_on = |node: &courier_node::NodeHandle| {
        on_replica(node, alice_shard, Projection::Dedup, |view| {
            courier_storage::projection::dedup::lookup(
                view,
                UserId::new(alice.user).expect("id"),
                courier_proto::DeviceId::new(alice.device).expect("id"),
                "once",
            )
            .map(|known| known.is_some())
        })
    };
    while c.nodes.iter().any(known_on) {
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "the send was not forgotten everywhere"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(1500),
        "not before the window passed"
    );
    let after = messaging
        .send(authed(&alice, send()))
        .await
        .expect("send after the window")
        .into_inner();
    assert_ne!(
        after.message_id, first.message_id,
        "after the window the same client id is a new message"
    );
    for node in &c.nodes {
        assert_verified_from_genesis(node, alice_shard).await;
        let forgotten: Vec<String> = logged_events(node, alice_shard)
            .await
            .into_iter()
            .filter_map(|kind| match kind {
                events::event::Kind::SendsForgotten(f) => Some(f.sends),
                _ => None,
            })
            .flatten()
            .map(|send| send.client_msg_id)
            .collect();
        assert!(
            forgotten.contains(&"once".to_owned()),
            "the log holds the forget of that send: {forgotten:?}"
        );
    }
}

/// A backlog larger than one retention proposal drains within one scan: with `batch-max = 2`
/// and a scan every 5 s, seven sends past a 1 s dedup window are all forgotten by the first scan
/// after it (one proposal per scan would take four scans, 15 s more), in proposals of at most two
/// sends, and every replica still equals a rebuild from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_backlog_drains_within_one_scan() {
    const SENDS: usize = 7;
    let c = retention_cluster_scanning("dedup = \"1s\"\nbatch-max = 2\n", "5s").await;
    let (_, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let ids: Vec<String> = (1..=SENDS).map(|i| format!("backlog-{i}")).collect();
    for id in &ids {
        messaging
            .send(authed(
                &alice,
                SendRequest {
                    client_msg_id: id.clone(),
                    to_user: bob.user,
                    content: body(id),
                },
            ))
            .await
            .expect("send");
    }
    let sent = Instant::now();
    let alice_shard = shard_of(UserId::new(alice.user).expect("id"), 4);
    let known_on = |node: &courier_node::NodeHandle| {
        on_replica(node, alice_shard, Projection::Dedup, |view| {
            let mut known = 0;
            for id in &ids {
                if courier_storage::projection::dedup::lookup(
                    view,
                    UserId::new(alice.user).expect("id"),
                    courier_proto::DeviceId::new(alice.device).expect("id"),
                    id,
                )?
                .is_some()
                {
                    known += 1;
                }
            }
            Ok(known)
        })
    };
    // The window ends 1 s after the sends and the next scan starts within 5 s of that.
    until_within(
        (sent, Duration::from_secs(12)),
        "sends still remembered per node after one scan past the window",
        || c.nodes.iter().map(known_on).collect::<Vec<usize>>(),
        |known| known.iter().all(|&n| n == 0),
    )
    .await;
    for node in &c.nodes {
        assert_verified_from_genesis(node, alice_shard).await;
        let batches: Vec<Vec<String>> = logged_events(node, alice_shard)
            .await
            .into_iter()
            .filter_map(|kind| match kind {
                events::event::Kind::SendsForgotten(f) => {
                    Some(f.sends.into_iter().map(|send| send.client_msg_id).collect())
                }
                _ => None,
            })
            .collect();
        assert!(
            batches.iter().all(|batch| batch.len() <= 2),
            "each proposal forgets at most batch-max sends: {batches:?}"
        );
        let mut forgotten: Vec<String> = batches.concat();
        forgotten.sort();
        assert_eq!(forgotten, ids, "every send forgotten once");
    }
}

/// With a 2 s window, the stubs of delivered messages (bodies gone once every device acked) leave
/// the inbox on every replica (an `InboxForgotten` in the log): a read one with its position, an
/// unread one keeping where its READ receipt goes. A read of a forgotten message is a no-op, a
/// later read still sends the READ receipt; the receipts leave the sender's shard a window after
/// they were set (`ReceiptsForgotten`), and every replica equals a rebuild from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_stubs_and_receipts_are_forgotten_after_the_window() {
    // No companion history (it would keep the bodies this test wants trimmed and forgotten).
    let c = retention_cluster("dedup = \"2s\"\ncompanion-history = 0\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let mut ids = Vec::new();
    for i in 1..=2 {
        let sent = messaging
            .send(authed(
                &alice,
                SendRequest {
                    client_msg_id: format!("s{i}"),
                    to_user: bob.user,
                    content: body(&format!("s{i}")),
                },
            ))
            .await
            .expect("send")
            .into_inner();
        ids.push(sent.message_id);
    }
    let started = Instant::now();
    let mut stream = open_stream(&addr, &bob, 0).await;
    collect(&mut stream, Duration::from_secs(10), |f| {
        messages(f).len() >= 2
    })
    .await;
    let read = |up_to_seq: u64| read_frame(alice.user, up_to_seq);
    for frame in [
        read(1),
        ClientFrame {
            frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: 2 })),
        },
    ] {
        stream.out.send(frame).await.expect("send frame");
    }
    let (bob_id, bob_shard) = {
        let id = UserId::new(bob.user).expect("id");
        (id, shard_of(id, 4))
    };
    let stub_on = |node: &courier_node::NodeHandle, seq: u64| {
        on_replica(node, bob_shard, Projection::Inbox, |view| {
            courier_storage::projection::inbox::entry(
                view,
                bob_id,
                courier_proto::InboxSeq::new(seq),
            )
        })
    };
    while c
        .nodes
        .iter()
        .any(|node| stub_on(node, 1).is_some() || stub_on(node, 2).is_some())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stubs were not forgotten everywhere"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before the window passed"
    );
    tracing::info!("a read of forgotten seq 1 is a no-op; a read of seq 2 still sends READ");
    for frame in [read(1), read(2)] {
        stream.out.send(frame).await.expect("send frame");
    }
    let alice_id = UserId::new(alice.user).expect("id");
    let alice_shard = shard_of(alice_id, 4);
    // The receipts themselves are forgotten a window after they were set: the log tells.
    // The log tells what happened (the projections forget): each READ receipt recorded, and
    // then a `ReceiptsForgotten` naming that READ (its set time), which nothing follows.
    let read_forgotten = |kinds: &[events::event::Kind]| {
        ids.iter().all(|id| {
            let read_at = kinds.iter().find_map(|kind| match kind {
                events::event::Kind::ReceiptRecorded(r)
                    if &r.message_id == id
                        && r.recipient_user == bob.user
                        && r.state() == ReceiptState::Read =>
                {
                    Some(r.at_ms)
                }
                _ => None,
            });
            read_at.is_some_and(|at| {
                kinds.iter().any(|kind| {
                    matches!(kind, events::event::Kind::ReceiptsForgotten(f)
                    if f.receipts.iter().any(|r| {
                        &r.message_id == id && r.recipient_user == bob.user && r.set_at_ms == at
                    }))
                })
            })
        })
    };
    let receipts_on = |node: &courier_node::NodeHandle| {
        on_replica(node, alice_shard, Projection::Receipts, |view| {
            let mut count = 0;
            for id in &ids {
                let message = courier_proto::MessageId::from_wire(id, "id").expect("id");
                count +=
                    courier_storage::projection::receipts::of_message(view, alice_id, message)?
                        .len();
            }
            Ok(count)
        })
    };
    let waiting = Instant::now();
    loop {
        let forgotten_everywhere = c.nodes.iter().all(|node| receipts_on(node) == 0);
        if forgotten_everywhere && read_forgotten(&logged_events(&c.nodes[0], alice_shard).await) {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(20),
            "both messages read (the second after its stub left), then their receipts forgotten \
             on every replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered = MessagingClient::new(channel(&addr).await)
        .get_receipts(authed(
            &alice,
            courier_proto::pb::client::GetReceiptsRequest {
                message_ids: ids.clone(),
                group_id: 0,
            },
        ))
        .await
        .expect("receipts")
        .into_inner()
        .receipts;
    assert!(
        answered.iter().all(|m| m.recipients.is_empty()),
        "a forgotten receipt is not answered: {answered:?}"
    );
    for node in &c.nodes {
        assert_verified_from_genesis(node, alice_shard).await;
    }
    let unread = MessagingClient::new(channel(&addr).await)
        .list_conversations(authed(&bob, ListConversationsRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(unread.conversations.first().map(|c| c.unread), Some(0));
    for node in &c.nodes {
        assert_verified_from_genesis(node, bob_shard).await;
        let forgotten: std::collections::BTreeSet<u64> = logged_events(node, bob_shard)
            .await
            .into_iter()
            .filter_map(|kind| match kind {
                events::event::Kind::InboxForgotten(f) => Some(f.messages),
                _ => None,
            })
            .flatten()
            .filter(|m| m.user == bob.user)
            .map(|m| m.seq)
            .collect();
        assert_eq!(
            forgotten,
            [1, 2].into(),
            "both stubs named by a forget in the log"
        );
    }
}

/// A projection job whose replay would hold more than `limits.projection-job-memory-max` stops
/// with `FAILED_PRECONDITION` `COURIER:Maintenance:TooLarge` instead of growing the serving
/// node's memory; the node goes on serving and a later send is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_job_past_its_memory_is_refused() {
    let c = cluster_appending("[limits]\nprojection-job-memory-max = \"1KiB\"\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    for i in 0..5 {
        messaging
            .send(authed(
                &alice,
                SendRequest {
                    client_msg_id: format!("m{i}"),
                    to_user: bob.user,
                    content: body(&"x".repeat(300)),
                },
            ))
            .await
            .expect("send");
    }
    let bob_shard = shard_of(UserId::new(bob.user).expect("id"), 4);
    let mut updates = verify_from_genesis(&c.nodes[0], bob_shard).await;
    let refused = loop {
        match updates.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the verify finished within 1 KiB"),
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(code_of(&refused), "COURIER:Maintenance:TooLarge");
    assert!(
        refused.message().contains("projection-job-memory-max"),
        "{}",
        refused.message()
    );
    messaging
        .send(authed(
            &alice,
            SendRequest {
                client_msg_id: "after".to_owned(),
                to_user: bob.user,
                content: body("after"),
            },
        ))
        .await
        .expect("the node still serves");
    let mut stream = open_stream(&addr, &bob, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(10), |f| {
        messages(f).len() >= 6
    })
    .await;
    assert_eq!(messages(&frames).len(), 6);
}

/// Starts a verify of every projection of `shard` on `node` from index 1: its stream of updates.
async fn verify_from_genesis(
    node: &courier_node::NodeHandle,
    shard: ShardId,
) -> tonic::Streaming<courier_proto::pb::peer::ProjectionJobUpdate> {
    courier_proto::pb::peer::admin_client::AdminClient::new(
        peer_channel(&node.peer_addr.to_string()).await,
    )
    .verify_projection(courier_proto::pb::peer::VerifyProjectionRequest {
        shard: u32::from(shard.get()),
        projection: String::new(),
        from_genesis: true,
    })
    .await
    .expect("the verify starts")
    .into_inner()
}

/// Asserts that `node`'s projections of `shard` equal a replay of its log from index 1.
pub(crate) async fn assert_verified_from_genesis(node: &courier_node::NodeHandle, shard: ShardId) {
    let mut updates = verify_from_genesis(node, shard).await;
    let mut result = None;
    while let Some(update) = updates.message().await.expect("stream") {
        if let Some(courier_proto::pb::peer::projection_job_update::Update::Verified(v)) =
            update.update
        {
            result = Some(v);
        }
    }
    let result = result.expect("a result");
    assert!(
        result.mismatches.is_empty(),
        "projections equal a rebuild from the log: {:?}",
        result.mismatches
    );
}

/// With delivered messages not kept, the one stored copy of a group message leaves every
/// replica of the group's shard once it is older than the undelivered and exactly-once windows
/// together (a `GroupMessagesForgotten` in the log), not before; a member who was online got its
/// content first; the group goes on (a later message arrives on a stream opened from the start,
/// past the forgotten one), and verify from genesis passes on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_copies_are_forgotten_after_the_windows() {
    use courier_proto::pb::client::SendToGroupRequest;
    let c =
        retention_cluster("undelivered = \"1s\"\ndedup = \"1s\"\nkeep-delivered = false\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    c.wait_converged().await;
    let group = create_group(&addr, &alice, vec![bob.user]).await;
    let group_shard = group_shard_of(group);
    let mut stream = open_stream(&addr, &bob, 0).await;
    let send = |text: &str| SendToGroupRequest {
        client_msg_id: text.to_owned(),
        group_id: group,
        content: body(text),
    };
    messaging
        .send_to_group(authed(&alice, send("g1")))
        .await
        .expect("g1");
    let sent = Instant::now();
    let got = collect(&mut stream, Duration::from_secs(10), |f| {
        !messages(f).is_empty()
    })
    .await;
    assert_eq!(bodies(&got), ["g1"], "an online member gets the content");
    let copies_on = |node: &courier_node::NodeHandle| {
        on_replica(node, group_shard, Projection::Groups, |view| {
            Ok((
                courier_storage::projection::groups::messages_sent_before(view, u64::MAX, 10)?,
                courier_storage::projection::groups::messages_forgotten_up_to(view)?,
            ))
        })
    };
    loop {
        let states: Vec<_> = c.nodes.iter().map(copies_on).collect();
        if states
            .iter()
            .all(|(left, forgotten)| left.is_none() && forgotten.get() > 0)
        {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "the group copy was not forgotten everywhere: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(1800),
        "not before both windows passed"
    );
    drop(stream);
    messaging
        .send_to_group(authed(&alice, send("g2")))
        .await
        .expect("g2");
    let mut again = open_stream(&addr, &bob, 0).await;
    let got = collect(&mut again, Duration::from_secs(10), |f| {
        bodies(f).iter().any(|b| b == "g2")
    })
    .await;
    assert_eq!(
        bodies(&got),
        ["g2"],
        "the forgotten message is not sent again"
    );
    for node in &c.nodes {
        assert_verified_from_genesis(node, group_shard).await;
        let logged = logged_events(node, group_shard).await;
        assert!(
            logged
                .iter()
                .any(|kind| matches!(kind, events::event::Kind::GroupMessagesForgotten(_))),
            "the log says the copies left"
        );
    }
}

/// A backlog of group copies drains within one scan too: with `batch-max = 1` and a scan every
/// 5 s, the copies of three group messages all leave by the first scan after both windows, one
/// per `GroupMessagesForgotten`. (The group's shard also remembers the three sends, a full batch
/// each round, so this does not isolate the group copies' own "more may be due": the retention
/// unit test does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_group_copies_drains_within_one_scan() {
    use courier_proto::pb::client::SendToGroupRequest;
    let c = retention_cluster_scanning(
        "undelivered = \"1s\"\ndedup = \"1s\"\nkeep-delivered = false\nbatch-max = 1\n",
        "5s",
    )
    .await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let group = create_group(&addr, &alice, vec![bob.user]).await;
    let group_shard = group_shard_of(group);
    for text in ["c1", "c2", "c3"] {
        messaging
            .send_to_group(authed(
                &alice,
                SendToGroupRequest {
                    client_msg_id: text.to_owned(),
                    group_id: group,
                    content: body(text),
                },
            ))
            .await
            .expect("group send");
    }
    let sent = Instant::now();
    let left_on = |node: &courier_node::NodeHandle| {
        on_replica(node, group_shard, Projection::Groups, |view| {
            courier_storage::projection::groups::messages_sent_before(view, u64::MAX, 10)
        })
    };
    // Both windows end 2 s after the sends and the next scan starts within 5 s of that.
    until_within(
        (sent, Duration::from_secs(13)),
        "group copies still stored after one scan past the windows",
        || c.nodes.iter().map(left_on).collect::<Vec<_>>(),
        |left| left.iter().all(Option::is_none),
    )
    .await;
    for node in &c.nodes {
        assert_verified_from_genesis(node, group_shard).await;
        let forgets = logged_events(node, group_shard)
            .await
            .into_iter()
            .filter(|kind| matches!(kind, events::event::Kind::GroupMessagesForgotten(_)))
            .count();
        assert!(
            forgets >= 3,
            "one copy per proposal, so at least three: {forgets}"
        );
    }
}

/// Every event in `node`'s log of `shard`, in order, read page by page as `ReadLog` returns it.
async fn logged_events(
    node: &courier_node::NodeHandle,
    shard: ShardId,
) -> Vec<events::event::Kind> {
    log_events(&node.peer_addr.to_string(), u32::from(shard.get()))
        .await
        .into_iter()
        .filter_map(|event| event.kind)
        .collect()
}

/// Reads `projection` of `shard` on `node`'s replica as it is now; a storage fault fails the
/// test.
pub(crate) fn on_replica<T>(
    node: &courier_node::NodeHandle,
    shard: ShardId,
    projection: Projection,
    read: impl FnOnce(&courier_storage::projection::View<'_, '_>) -> courier_storage::Result<T>,
) -> T {
    let db = node.groups().db().clone();
    let mut staged = courier_storage::kv::Staged::new(db.as_ref(), BTreeMap::new());
    let view = courier_storage::projection::View::new(
        &mut staged,
        shard,
        courier_proto::LogIndex::ZERO,
        projection,
    );
    read(&view).expect("read the replica")
}

/// A push endpoint that records each POST body and answers 200.
async fn push_endpoint() -> (std::net::SocketAddr, mpsc::Receiver<String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = vec![0_u8; 4096];
            let read = stream.read(&mut buf).await.unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..read]).into_owned();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
            if tx.send(body).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

async fn presence_of(
    addr: &str,
    asker: &Device,
    user: u64,
) -> courier_proto::pb::client::PresenceUpdate {
    presence_answers(addr, asker, user)
        .await
        .pop()
        .expect("one answer")
}

/// `GetPresence` for `user` asked by `asker`: what the node tells (empty for a stranger).
async fn presence_answers(
    addr: &str,
    asker: &Device,
    user: u64,
) -> Vec<courier_proto::pb::client::PresenceUpdate> {
    MessagingClient::new(channel(addr).await)
        .get_presence(authed(
            asker,
            courier_proto::pb::client::GetPresenceRequest { users: vec![user] },
        ))
        .await
        .expect("presence")
        .into_inner()
        .presence
}

/// Presence follows Bob's device stream (online while open, then last seen, hidden on request);
/// a message landing while Bob has no stream triggers one push with ids only, a message landing
/// while he is connected none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_streams_and_offline_recipients_get_a_push() {
    let (push_addr, mut pushes) = push_endpoint().await;
    let c = cluster_configured(&|text| {
        format!(
            "{}\n[push]\nurl = \"http://{push_addr}/push\"\n",
            with_limits(text, 10_000)
        )
    })
    .await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(0), &c.dirs[0], &bob_phone).await;
    let stranger = presence_answers(&addr(0), &alice, bob.user).await;
    assert!(
        stranger.is_empty(),
        "a stranger's presence is not told: {stranger:?}"
    );

    let mut messaging = MessagingClient::new(channel(&addr(0)).await);
    let send = |id: &str| SendRequest {
        client_msg_id: id.to_owned(),
        to_user: bob.user,
        content: body(&format!("secret text {id}")),
    };
    let first = messaging
        .send(authed(&alice, send("p1")))
        .await
        .expect("send")
        .into_inner();
    tracing::info!("now they share a conversation: Bob's presence is told (offline, never seen)");
    let started = Instant::now();
    let offline = loop {
        let mut answer = presence_answers(&addr(0), &alice, bob.user).await;
        if let Some(presence) = answer.pop() {
            break presence;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "presence told once the message is stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!offline.online && offline.last_seen_ms == 0, "{offline:?}");
    let pushed = tokio::time::timeout(Duration::from_secs(10), pushes.recv())
        .await
        .expect("a push within 10 s")
        .expect("endpoint alive");
    let json: serde_json::Value = serde_json::from_str(&pushed).expect("JSON body");
    assert_eq!(json["user"], bob.user);
    assert_eq!(
        json["message_id"],
        courier_storage::projection::hex(&first.message_id)
    );
    assert!(
        !pushed.contains("secret"),
        "ids only, never the body: {pushed}"
    );

    tracing::info!("Bob connects on node 3: online; a message now is streamed, not pushed");
    let mut stream = open_stream_with(&addr(2), &bob, 1, false).await;
    let started = Instant::now();
    while !presence_of(&addr(1), &alice, bob.user).await.online {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Bob shows online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    messaging
        .send(authed(&alice, send("p2")))
        .await
        .expect("send");
    let frames = collect(&mut stream, Duration::from_secs(10), |f| {
        !messages(f).is_empty()
    })
    .await;
    assert_eq!(messages(&frames).len(), 1, "delivered live");
    assert!(
        tokio::time::timeout(Duration::from_millis(700), pushes.recv())
            .await
            .is_err(),
        "no push while a device is connected"
    );

    tracing::info!("Bob disconnects: offline with a last-seen time; hidden when he asks");
    drop(stream);
    let started = Instant::now();
    let seen = loop {
        let p = presence_of(&addr(0), &alice, bob.user).await;
        if !p.online {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Bob goes offline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(seen.last_seen_ms > 0, "{seen:?}");
    let hidden = open_stream_with(&addr(1), &bob, 2, true).await;
    let started = Instant::now();
    while !presence_of(&addr(0), &alice, bob.user).await.online {
        assert!(started.elapsed() < Duration::from_secs(10), "online again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(hidden);
    let started = Instant::now();
    loop {
        let p = presence_of(&addr(0), &alice, bob.user).await;
        if !p.online {
            assert_eq!(p.last_seen_ms, 0, "last seen is hidden");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "offline again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = MessagingClient::new(channel(&addr(0)).await)
        .get_presence(authed(
            &alice,
            courier_proto::pb::client::GetPresenceRequest { users: vec![] },
        ))
        .await
        .expect_err("no users");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let metrics = crate::support::scrape(c.nodes[0].metrics_addr.expect("metrics")).await
        + &crate::support::scrape(c.nodes[1].metrics_addr.expect("metrics")).await
        + &crate::support::scrape(c.nodes[2].metrics_addr.expect("metrics")).await;
    assert!(
        metrics.contains("courier_push_total{outcome=\"sent\"} 1"),
        "one node sent the one push:\n{metrics}"
    );
}

/// A phone number asking for codes (or trying codes) past its hourly budget gets
/// RESOURCE_EXHAUSTED with a retry hint, whichever node it asks (the buckets are in the log on
/// the number's shard); another number is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_requests_and_register_attempts_are_limited_per_number() {
    let c = cluster().await;
    let mut registration =
        RegistrationClient::new(channel(&c.nodes[0].client_addr.to_string()).await);
    let mut on_node2 = RegistrationClient::new(channel(&c.nodes[1].client_addr.to_string()).await);
    let ask = |phone: &str| RequestCodeRequest {
        phone_number: phone.to_owned(),
    };
    for _ in 0..3 {
        registration
            .request_code(ask("+15557770001"))
            .await
            .expect("within the burst of 3");
    }
    let refused = on_node2
        .request_code(ask("+15557770001"))
        .await
        .expect_err("a fourth request within the hour, on another node");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(code_of(&refused), "COURIER:Registration:TooManyCodes");
    let retry_ms: u64 = refused
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms");
    assert!(
        (300_000..=360_000).contains(&retry_ms),
        "10 an hour: one every 6 minutes, got {retry_ms} ms"
    );
    registration
        .request_code(ask("+15557770002"))
        .await
        .expect("another number is unaffected");

    let attempt = || RegisterRequest {
        phone_number: "+15557770002".to_owned(),
        code: "000000".to_owned(),
        device_name: "guess".to_owned(),
    };
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(
            registration
                .register(attempt())
                .await
                .expect_err("a guessed code")
                .code(),
        );
    }
    assert_eq!(
        outcomes[..5],
        [tonic::Code::Unauthenticated; 5],
        "five attempts are checked"
    );
    assert_eq!(
        outcomes[5],
        tonic::Code::ResourceExhausted,
        "the sixth is refused before the code is looked at"
    );
}

/// A device over its send rate gets RESOURCE_EXHAUSTED with a retry hint; another user's sends
/// are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_rate_limited_alone() {
    let c = cluster_with(5).await;
    let addr = c.nodes[0].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr, &c.dirs[0], &alice_phone).await;
    let bob = register(&addr, &c.dirs[0], &bob_phone).await;
    let mut messaging = MessagingClient::new(channel(&addr).await);
    let send = |id: String, to: u64| SendRequest {
        client_msg_id: id,
        to_user: to,
        content: body("x"),
    };
    let mut refused = None;
    for i in 0..20 {
        match messaging
            .send(authed(&alice, send(format!("f-{i}"), bob.user)))
            .await
        {
            Ok(_) => {}
            Err(status) => {
                refused = Some((i, status));
                break;
            }
        }
    }
    let (at, status) = refused.expect("the flood is refused");
    assert!(at >= 5, "the burst of 5 passes first (refused at {at})");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(code_of(&status), "COURIER:Limits:RateLimited");
    let retry: u64 = status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a retry hint");
    assert!((1..=1000).contains(&retry), "{retry}");
    messaging
        .send(authed(&bob, send("b-1".to_owned(), alice.user)))
        .await
        .expect("Bob is not limited by Alice's flood");
    for node in c.nodes {
        node.stop().await;
    }
}

/// Typing is ephemeral: Alice's typing frame on node 1 reaches Bob's live stream on node 2 and
/// appends nothing to any log. It needs a conversation between the two (here, a message Alice
/// sent Bob first): a stranger's typing frame reaches nobody, as a stranger's presence is not told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_live_streams_and_is_not_logged() {
    let c = cluster().await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(0), &c.dirs[0], &bob_phone).await;
    let stranger = register(&addr(0), &c.dirs[0], "+15550000999").await;
    // Bob's stream opens on node 1, which authenticates him on its own replica.
    c.wait_converged().await;
    let alice_stream = open_stream(&addr(0), &alice, 0).await;
    let stranger_stream = open_stream(&addr(0), &stranger, 0).await;
    let mut bob_stream = open_stream(&addr(1), &bob, 0).await;
    MessagingClient::new(channel(&addr(0)).await)
        .send(authed(
            &alice,
            SendRequest {
                client_msg_id: "hello".to_owned(),
                to_user: bob.user,
                content: body("hello"),
            },
        ))
        .await
        .expect("send");
    collect(&mut bob_stream, Duration::from_secs(5), |f| {
        !messages(f).is_empty()
    })
    .await;
    c.wait_converged().await;
    let peer = c.nodes[0].peer_addr.to_string();
    let before = last_log_indexes(&peer).await;
    let typing_to_bob = || ClientFrame {
        frame: Some(client_frame::Frame::Typing(
            courier_proto::pb::client::Typing {
                conversation: Some(events::Conversation {
                    with: Some(events::conversation::With::User(bob.user)),
                }),
                typing: true,
            },
        )),
    };
    stranger_stream
        .out
        .send(typing_to_bob())
        .await
        .expect("typing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice_stream
        .out
        .send(typing_to_bob())
        .await
        .expect("typing");
    let frames = collect(&mut bob_stream, Duration::from_secs(5), |f| {
        f.iter().any(
            |x| matches!(&x.frame, Some(server_frame::Frame::Typing(t)) if t.user == alice.user),
        )
    })
    .await;
    let typing: Vec<(u64, bool)> = frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Typing(t)) => Some((t.user, t.typing)),
            _ => None,
        })
        .collect();
    assert_eq!(
        typing,
        vec![(alice.user, true)],
        "Bob's stream on another node saw Alice typing, and not the stranger"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        last_log_indexes(&peer).await,
        before,
        "typing is never logged"
    );
    for node in c.nodes {
        node.stop().await;
    }
}

/// Group typing: a member's typing frame reaches the other members' live streams on every node
/// (shown under the group's conversation), never a non-member's; a non-member's typing frame for
/// the group reaches nobody; nothing is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_typing_reaches_other_members_only() {
    use courier_proto::pb::client::CreateGroupRequest;
    use courier_proto::pb::client::groups_client::GroupsClient;
    let c = cluster().await;
    let addr = |i: usize| c.nodes[i % 3].client_addr.to_string();
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(register(&addr(i), &c.dirs[i % 3], &format!("+1555100{:04}", 200 + i)).await);
    }
    // users[0..3] are the group; users[3] is outside it.
    let info = GroupsClient::new(channel(&addr(0)).await)
        .create_group(authed(
            &users[0],
            CreateGroupRequest {
                name: "typists".to_owned(),
                members: vec![users[1].user, users[2].user],
            },
        ))
        .await
        .expect("create")
        .into_inner();
    let group = info.group_id;
    let mut streams = Vec::new();
    for (i, user) in users.iter().enumerate() {
        streams.push(open_stream(&addr(i), user, 0).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peer = c.nodes[0].peer_addr.to_string();
    let before = last_log_indexes(&peer).await;
    let typing_in_group = |typing: bool| ClientFrame {
        frame: Some(client_frame::Frame::Typing(
            courier_proto::pb::client::Typing {
                conversation: Some(events::Conversation {
                    with: Some(events::conversation::With::Group(group)),
                }),
                typing,
            },
        )),
    };
    // The outsider first: nobody may see it.
    streams[3]
        .out
        .send(typing_in_group(false))
        .await
        .expect("outsider typing");
    streams[0]
        .out
        .send(typing_in_group(true))
        .await
        .expect("member typing");
    let is_typing = |x: &ServerFrame| matches!(x.frame, Some(server_frame::Frame::Typing(_)));
    for receiver in [1, 2] {
        // A fixed window, so that a stray frame arriving after the member's is seen too.
        let frames = collect(&mut streams[receiver], Duration::from_secs(2), |_| false).await;
        let seen: Vec<_> = frames
            .iter()
            .filter_map(|f| match &f.frame {
                Some(server_frame::Frame::Typing(t)) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(
            seen.len(),
            1,
            "member {receiver} saw only the member's typing: {seen:?}"
        );
        assert_eq!((seen[0].user, seen[0].typing), (users[0].user, true));
        assert_eq!(
            seen[0].conversation.and_then(|c| c.with),
            Some(events::conversation::With::Group(group)),
            "shown under the group"
        );
    }
    for outsider_or_sender in [0, 3] {
        let frames = collect(
            &mut streams[outsider_or_sender],
            Duration::from_millis(500),
            |_| false,
        )
        .await;
        assert!(
            !frames.iter().any(is_typing),
            "user {outsider_or_sender} saw a typing frame it should not"
        );
    }
    assert_eq!(
        last_log_indexes(&peer).await,
        before,
        "typing is never logged"
    );
    for node in c.nodes {
        node.stop().await;
    }
}

fn bodies(frames: &[ServerFrame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Message(m)) => Some(
                String::from_utf8_lossy(
                    &m.content
                        .as_ref()
                        .map(|c| c.body.clone())
                        .unwrap_or_default(),
                )
                .into_owned(),
            ),
            _ => None,
        })
        .collect()
}

pub(crate) fn code_is(status: &tonic::Status, code: tonic::Code, courier: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(code_of(status), courier, "{status:?}");
}

/// Five members across shards: a member removed before a send never gets it, each current
/// member gets every group message once, in order, with its content (stored once, pointed at);
/// receipts are kept per member and aggregate to the least advanced one; only members send and
/// only admins add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_reach_current_members_once_in_order() {
    use courier_proto::pb::client::groups_client::GroupsClient;
    use courier_proto::pb::client::{
        AddMemberRequest, CreateGroupRequest, GetReceiptsRequest, ListGroupsRequest,
        RemoveMemberRequest, SendToGroupRequest,
    };
    let c = cluster().await;
    let addr = |i: usize| c.nodes[i % 3].client_addr.to_string();
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(register(&addr(i), &c.dirs[i % 3], &format!("+1555000{:04}", 100 + i)).await);
    }
    // Registered through three nodes; the group is created on node 0, which checks the members
    // on its own replica.
    c.wait_converged().await;
    let shards: std::collections::BTreeSet<u16> = users
        .iter()
        .map(|u| shard_of(UserId::new(u.user).expect("id"), 4).get())
        .collect();
    assert!(shards.len() >= 2, "members on several shards: {shards:?}");
    let mut groups = GroupsClient::new(channel(&addr(0)).await);
    let info = groups
        .create_group(authed(
            &users[0],
            CreateGroupRequest {
                name: "five".to_owned(),
                members: users[1..].iter().map(|u| u.user).collect(),
            },
        ))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(info.members.len(), 5);
    assert_eq!(info.epoch, 5, "created, then four members added");
    assert!(
        info.members
            .iter()
            .any(|m| m.user_id == users[0].user && m.admin)
    );
    let group = info.group_id;
    let send = |i: usize, text: &str| {
        let (device, text, addr) = (users[i].clone(), text.to_owned(), addr(i));
        async move {
            MessagingClient::new(channel(&addr).await)
                .send_to_group(authed(
                    &device,
                    SendToGroupRequest {
                        client_msg_id: text.clone(),
                        group_id: group,
                        content: body(&text),
                    },
                ))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let g1 = send(0, "g1").await.expect("g1");
    send(0, "g2").await.expect("g2");
    let refused = groups
        .add_member(authed(
            &users[0],
            AddMemberRequest {
                group_id: group,
                user_id: users[4].user,
            },
        ))
        .await
        .expect_err("already a member");
    code_is(
        &refused,
        tonic::Code::FailedPrecondition,
        "COURIER:Group:AlreadyMember",
    );
    let after_remove = groups
        .remove_member(authed(
            &users[0],
            RemoveMemberRequest {
                group_id: group,
                user_id: users[4].user,
            },
        ))
        .await
        .expect("remove")
        .into_inner();
    assert_eq!(after_remove.members.len(), 4);
    assert_eq!(after_remove.epoch, 6);
    let refused = groups
        .add_member(authed(
            &users[1],
            AddMemberRequest {
                group_id: group,
                user_id: users[4].user,
            },
        ))
        .await
        .expect_err("only admins add");
    code_is(
        &refused,
        tonic::Code::PermissionDenied,
        "COURIER:Group:NotAdmin",
    );
    let g3 = send(0, "g3").await.expect("g3");
    send(0, "g4").await.expect("g4");
    send(1, "g5").await.expect("g5");
    let again = send(0, "g3").await.expect("a retry");
    assert!(
        again.duplicate && again.message_id == g3.message_id,
        "retries are deduplicated"
    );
    let refused = send(4, "g6")
        .await
        .expect_err("a removed member cannot send");
    code_is(
        &refused,
        tonic::Code::PermissionDenied,
        "COURIER:Group:NotMember",
    );

    let want: [&[&str]; 5] = [
        &["g5"],
        &["g1", "g2", "g3", "g4"],
        &["g1", "g2", "g3", "g4", "g5"],
        &["g1", "g2", "g3", "g4", "g5"],
        &["g1", "g2"],
    ];
    for (i, want) in want.iter().enumerate() {
        let mut stream = open_stream(&addr(i + 1), &users[i], 0).await;
        let frames = collect(&mut stream, Duration::from_secs(20), |f| {
            messages(f).len() >= want.len()
        })
        .await;
        let extra = collect(&mut stream, Duration::from_millis(500), |f| {
            !messages(f).is_empty()
        })
        .await;
        let mut all = frames.clone();
        all.extend(extra);
        assert_eq!(bodies(&all), *want, "user {i} sees exactly this, in order");
        let seqs: Vec<u64> = messages(&all).iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=want.len() as u64).collect::<Vec<_>>(),
            "dense seqs"
        );
    }

    let overall = |state: ReceiptState| i32::from(state);
    let receipts_of_g3 = || {
        let (device, addr) = (users[0].clone(), addr(0));
        let id = g3.message_id.clone();
        async move {
            MessagingClient::new(channel(&addr).await)
                .get_receipts(authed(
                    &device,
                    GetReceiptsRequest {
                        message_ids: vec![id],
                        group_id: group,
                    },
                ))
                .await
                .expect("receipts")
                .into_inner()
                .receipts
                .pop()
                .expect("one message")
        }
    };
    let r = receipts_of_g3().await;
    let recipients: Vec<u64> = r.recipients.iter().map(|x| x.recipient_user).collect();
    assert_eq!(
        recipients.len(),
        3,
        "the members at g3's epoch but the sender: {recipients:?}"
    );
    assert!(
        !recipients.contains(&users[4].user),
        "not the removed member"
    );
    assert_eq!(r.overall, overall(ReceiptState::Sent));
    let conversation = Some(
        courier_proto::ConversationId::Group(courier_proto::GroupId::new(group).expect("id"))
            .into(),
    );
    for (n, i) in [1_usize, 2, 3].into_iter().enumerate() {
        let stream = open_stream(&addr(i), &users[i], 100).await;
        let up_to = if i == 1 { 4 } else { 5 };
        stream
            .out
            .send(ClientFrame {
                frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: up_to })),
            })
            .await
            .expect("ack");
        let want = if n < 2 {
            ReceiptState::Sent
        } else {
            ReceiptState::Delivered
        };
        let started = Instant::now();
        loop {
            let r = receipts_of_g3().await;
            if r.overall == overall(want) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "after {n}: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stream
            .out
            .send(ClientFrame {
                frame: Some(client_frame::Frame::Read(Read {
                    conversation,
                    up_to_seq: up_to,
                })),
            })
            .await
            .expect("read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    while receipts_of_g3().await.overall != overall(ReceiptState::Read) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "read by everyone: READ for the group"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = g1;
    let list = |i: usize| {
        let (device, addr) = (users[i].clone(), addr(0));
        async move {
            GroupsClient::new(channel(&addr).await)
                .list_groups(authed(&device, ListGroupsRequest::default()))
                .await
                .expect("list")
                .into_inner()
                .groups
        }
    };
    assert_eq!(list(2).await.len(), 1);
    assert!(list(4).await.is_empty(), "the removed member has no groups");
}

/// Server-centric storage: a message's body leaves the inbox once every device of the recipient
/// acked it (a stub stays, so read receipts still flow); a device that did not ack keeps it
/// available until it does; the user's last `companion-history` (here 1) messages keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_leave_the_inbox_once_every_device_acked() {
    let c = cluster_configured(&|text| {
        format!(
            "{}\n[retention]\ncompanion-history = 1\n",
            with_limits(text, 10_000)
        )
    })
    .await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    let bob2 = link_tablet(&addr(1), &bob).await;
    let mut messaging = MessagingClient::new(channel(&addr(0)).await);
    for i in 1..=3 {
        messaging
            .send(authed(
                &alice,
                SendRequest {
                    client_msg_id: format!("t{i}"),
                    to_user: bob.user,
                    content: body(&format!("t{i}")),
                },
            ))
            .await
            .expect("send");
    }
    let bob_shard = shard_of(UserId::new(bob.user).expect("id"), 4);
    let entry = |seq: u64| {
        on_replica(&c.nodes[1], bob_shard, Projection::Inbox, |view| {
            courier_storage::projection::inbox::entry(
                view,
                UserId::new(bob.user).expect("id"),
                courier_proto::InboxSeq::new(seq),
            )
        })
    };
    let ack = |device: Device, up_to: u64| {
        let addr = addr(1);
        async move {
            let mut stream = open_stream(&addr, &device, 0).await;
            collect(&mut stream, Duration::from_secs(10), |f| {
                messages(f).len() >= usize::try_from(up_to).expect("small")
            })
            .await;
            stream
                .out
                .send(ClientFrame {
                    frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: up_to })),
                })
                .await
                .expect("ack");
            stream
        }
    };
    let wait_for = |what: &str, check: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !check() {
            assert!(started.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let _s1 = ack(bob.clone(), 3).await;
    wait_for("device 1's ack applies", &|| {
        delivered_up_to(&c.nodes[1], bob.user) >= 3
    });
    assert!(
        entry(1).expect("stored").content.is_some(),
        "the tablet has not acked: the body stays"
    );
    let s2 = ack(bob2.clone(), 2).await;
    wait_for("both devices acked 1 and 2: their bodies leave", &|| {
        entry(2).is_some_and(|e| e.trimmed && e.content.is_none())
    });
    assert!(entry(1).expect("stub").trimmed);
    assert!(
        entry(3).expect("stored").content.is_some(),
        "3 is not acked by the tablet yet"
    );
    tracing::info!("reading trimmed messages still sends READ receipts");
    s2.out
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Read(Read {
                conversation: Some(events::Conversation {
                    with: Some(events::conversation::With::User(alice.user)),
                }),
                up_to_seq: 2,
            })),
        })
        .await
        .expect("read");
    let started = Instant::now();
    loop {
        let receipts = MessagingClient::new(channel(&addr(0)).await)
            .list_conversations(authed(&bob, ListConversationsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        if receipts
            .conversations
            .first()
            .is_some_and(|c| c.unread == 1)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{receipts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("the tablet acks 3 too: the last message keeps its body (companion history)");
    s2.out
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: 3 })),
        })
        .await
        .expect("ack");
    let db = c.nodes[1].groups().db().clone();
    wait_for("the tablet's ack applies", &|| {
        read_cursor(&db, bob_shard, bob.user, bob2.device) == 3
    });
    assert!(
        entry(3).expect("stored").content.is_some(),
        "every device acked 3, but it is the last message: it stays for a companion"
    );
}

/// Sends `n` messages from `from` to `to` through `messaging`, then opens `to`'s stream on
/// `addr` and reads until all `n` arrived: their inbox seqs, in the order they came.
pub(crate) async fn sent_and_received(
    addr: &str,
    messaging: &mut MessagingClient<tonic::transport::Channel>,
    (from, to): (&Device, &Device),
    n: usize,
) -> (Stream, Vec<u64>) {
    for i in 0..n {
        messaging
            .send(authed(
                from,
                SendRequest {
                    client_msg_id: format!("m{i}"),
                    to_user: to.user,
                    content: body("hi"),
                },
            ))
            .await
            .expect("send");
    }
    let mut stream = open_stream(addr, to, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(10), |frames| {
        frames
            .iter()
            .filter(|f| matches!(f.frame, Some(server_frame::Frame::Message(_))))
            .count()
            >= n
    })
    .await;
    let seqs = frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Message(m)) => Some(m.seq),
            _ => None,
        })
        .collect();
    (stream, seqs)
}

/// Probes every 100 ms until `done` holds of what `probe` returns; fails naming `what` and the
/// last probe once `within` has passed since `since`.
async fn until_within<T: std::fmt::Debug>(
    (since, within): (Instant, Duration),
    what: &str,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) {
    loop {
        let found = probe();
        if done(&found) {
            return;
        }
        assert!(since.elapsed() < within, "{what}: {found:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (polling every 20 ms) until `done` holds; fails naming `what` after 10 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With a stream buffer of 1 KiB, a backlog of 300-byte messages is read in pages that end
/// early (a few messages each, so that the pusher holds no more than the buffer while it waits):
/// every message still arrives once, in order, and each body whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_stream_buffer_arrives_in_order() {
    let c = cluster_appending("[limits]\nstream-buffer-bytes = \"1KiB\"\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let sent: Vec<String> = (0..12).map(|i| format!("{i:03}").repeat(100)).collect();
    for (i, text) in sent.iter().enumerate() {
        messaging
            .send(authed(
                &alice,
                SendRequest {
                    client_msg_id: format!("big{i}"),
                    to_user: bob.user,
                    content: body(text),
                },
            ))
            .await
            .expect("send");
    }
    let mut stream = open_stream(&addr, &bob, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(10), |frames| {
        messages(frames).len() >= sent.len()
    })
    .await;
    let seqs: Vec<u64> = messages(&frames).iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=12).collect::<Vec<u64>>(),
        "each message once, in order"
    );
    assert_eq!(bodies(&frames), sent, "every body whole");
}

/// A device's ack of many messages at once (a phone back after a long time away) is proposed
/// as several `DeliveryAcked` entries, each moving its cursor by at most `limits.ack-span-max`
/// messages and in order, so that no single entry's apply grows with the inbox; the cursor
/// ends where the ack asked, every message delivered once, the replicas equal a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_ack_is_logged_in_bounded_steps() {
    let c = cluster_appending("[limits]\nack-span-max = 3\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let bob_shard = shard_of(UserId::new(bob.user).expect("id"), 4);
    let (mut stream, seqs) = sent_and_received(&addr, &mut messaging, (&alice, &bob), 10).await;
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "each message once, in order"
    );
    ack(&stream, 10).await;
    eventually("the ack reached 10 on every replica", || {
        c.nodes
            .iter()
            .all(|node| delivered_up_to(node, bob.user) == 10)
    })
    .await;
    let steps: Vec<u64> = logged_events(&c.nodes[0], bob_shard)
        .await
        .into_iter()
        .filter_map(|kind| match kind {
            events::event::Kind::DeliveryAcked(acked) if acked.user == bob.user => {
                Some(acked.up_to_seq)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        vec![3, 6, 9, 10],
        "steps of at most 3 messages, in order"
    );

    // A read of the whole conversation is logged in steps of at most 3 messages too, each at a
    // message of the conversation.
    stream
        .out
        .send(read_frame(alice.user, 10))
        .await
        .expect("read");
    let bob_id = UserId::new(bob.user).expect("id");
    let read_everywhere = || {
        c.nodes.iter().all(|node| {
            on_replica(node, bob_shard, Projection::ReadState, |view| {
                courier_storage::projection::readstate::get(
                    view,
                    bob_id,
                    courier_proto::ConversationId::Direct(UserId::new(alice.user).expect("id")),
                )
            })
            .read_seq
                == 10
        })
    };
    eventually("the read reached 10 on every replica", read_everywhere).await;
    let reads: Vec<u64> = logged_events(&c.nodes[0], bob_shard)
        .await
        .into_iter()
        .filter_map(|kind| match kind {
            events::event::Kind::ReadUpTo(read) if read.user == bob.user => Some(read.up_to_seq),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads,
        vec![3, 6, 9, 10],
        "read steps of at most 3 messages, in order"
    );
    // A read naming no message (the largest seq there is) is refused, and the node serves on.
    stream
        .out
        .send(read_frame(alice.user, u64::MAX))
        .await
        .expect("read");
    let refused = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.frames.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Err(status)) => break status,
            other => panic!("expected the read refused, got {other:?}"),
        }
    };
    code_is(
        &refused,
        tonic::Code::InvalidArgument,
        "COURIER:Stream:ReadUnknown",
    );
    messaging
        .list_conversations(authed(&bob, ListConversationsRequest::default()))
        .await
        .expect("the node serves on");
    for node in &c.nodes {
        assert_verified_from_genesis(node, bob_shard).await;
    }
    for node in c.nodes {
        node.stop().await;
    }
}

/// A backlog of bodies held back by another device (a tablet that never acked) is cleared in
/// steps too once that device is revoked: the phone's repeated ack is logged as several
/// `DeliveryAcked` entries, each clearing at most `limits.ack-span-max` bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_backlog_is_cleared_in_bounded_steps() {
    use courier_proto::pb::client::RevokeDeviceRequest;
    // No companion history: every acked body may go.
    let c =
        cluster_appending("[limits]\nack-span-max = 3\n[retention]\ncompanion-history = 0\n").await;
    let (addr, _, alice, bob, mut messaging) = alice_and_bob_on_node0(&c).await;
    let bob_id = UserId::new(bob.user).expect("id");
    let bob_shard = shard_of(bob_id, 4);
    let tablet = link_tablet(&addr, &bob).await;
    let (stream, seqs) = sent_and_received(&addr, &mut messaging, (&alice, &bob), 7).await;
    assert_eq!(
        seqs,
        (1..=7).collect::<Vec<u64>>(),
        "the seven messages arrive"
    );
    ack(&stream, 7).await;
    let trimmed = |node: &courier_node::NodeHandle| {
        on_replica(node, bob_shard, Projection::Inbox, |view| {
            Ok(courier_storage::projection::inbox::state(view, bob_id)?.trimmed_up_to)
        })
    };
    eventually("the phone's ack applied everywhere", || {
        c.nodes
            .iter()
            .all(|node| delivered_up_to(node, bob.user) == 7)
    })
    .await;
    assert!(
        c.nodes.iter().all(|node| trimmed(node) == 0),
        "the tablet has not acked: nothing is trimmed"
    );
    let acks_before = logged_events(&c.nodes[0], bob_shard).await.len();
    RegistrationClient::new(channel(&addr).await)
        .revoke_device(authed(
            &bob,
            RevokeDeviceRequest {
                device_id: tablet.device,
            },
        ))
        .await
        .expect("revoke the tablet");
    // The revocation reaches node 0's replica before the phone's repeated ack is checked there.
    let tablet_revoked = || {
        on_replica(&c.nodes[0], bob_shard, Projection::Devices, |view| {
            courier_storage::projection::devices::devices_of(view, bob_id)
        })
        .iter()
        .any(|(device, record)| *device == tablet.device && record.revoked)
    };
    eventually("the revocation applied on node 0", tablet_revoked).await;
    ack(&stream, 7).await;
    eventually("the backlog cleared everywhere", || {
        c.nodes.iter().all(|node| trimmed(node) == 7)
    })
    .await;
    let trims: Vec<(u64, u32)> = logged_events(&c.nodes[0], bob_shard)
        .await
        .into_iter()
        .skip(acks_before)
        .filter_map(|kind| match kind {
            events::event::Kind::DeliveryAcked(acked) => Some((acked.up_to_seq, acked.trim_max)),
            _ => None,
        })
        .collect();
    assert_eq!(
        trims,
        vec![(7, 3), (7, 3), (7, 3)],
        "seven bodies: three entries of at most 3"
    );
    for node in &c.nodes {
        assert_verified_from_genesis(node, bob_shard).await;
    }
    for node in c.nodes {
        node.stop().await;
    }
}
