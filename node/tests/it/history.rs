//! Multi-device history on three in-process nodes: what a user sends from one device reaches
//! their other devices, in the conversation and in order with the other side; a companion linked
//! later gets the recent history the server still holds.

use std::time::Duration;

use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{
    Ack, ClientFrame, InboxMessage, SendRequest, SendToGroupRequest, ServerFrame, client_frame,
    server_frame,
};
use courier_proto::pb::events;

use crate::messaging::{
    Cluster, Device, Stream, authed, body, cluster_appending, collect, create_group,
    delivered_up_to, link_tablet, open_stream, phones_on_different_shards, register,
};
use crate::support::channel;

/// The inbox messages among `frames`.
fn inbox(frames: &[ServerFrame]) -> Vec<InboxMessage> {
    frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Message(m)) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// (sender user, sender device, conversation, body) of each message.
fn seen(messages: &[InboxMessage]) -> Vec<(u64, u32, events::Conversation, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m.sender_user,
                m.sender_device,
                m.conversation.expect("stored with one"),
                String::from_utf8(m.content.clone().expect("a body").body).expect("utf-8"),
            )
        })
        .collect()
}

fn with_user(user: u64) -> events::Conversation {
    events::Conversation {
        with: Some(events::conversation::With::User(user)),
    }
}

async fn send(addr: &str, from: &Device, to: &Device, text: &str) {
    MessagingClient::new(channel(addr).await)
        .send(authed(
            from,
            SendRequest {
                client_msg_id: text.to_owned(),
                to_user: to.user,
                content: body(text),
            },
        ))
        .await
        .expect("send");
}

async fn next_messages(stream: &mut Stream, count: usize) -> Vec<InboxMessage> {
    let frames = collect(stream, Duration::from_secs(15), |f| inbox(f).len() >= count).await;
    inbox(&frames)
}

async fn cluster() -> Cluster {
    cluster_appending(
        "[limits]\nsends-per-second-per-device = 10000\nsend-burst-per-device = 10000\n",
    )
    .await
}

/// Alice's phone sends to Bob, Bob answers, the phone sends again and to a group: Alice's
/// tablet (linked on another node) gets all four in that order, her own ones from her phone in
/// their conversations; the phone gets its own copies too (one order on every device); Bob gets
/// each of Alice's messages once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_message_appears_on_the_senders_other_device() {
    let c = cluster().await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    let tablet = link_tablet(&addr(2), &alice).await;
    c.wait_converged().await;
    let mut tablet_stream = open_stream(&addr(2), &tablet, 0).await;
    let mut bob_stream = open_stream(&addr(1), &bob, 0).await;

    send(&addr(0), &alice, &bob, "a1").await;
    assert_eq!(next_messages(&mut bob_stream, 1).await.len(), 1);
    send(&addr(1), &bob, &alice, "b1").await;
    let first = next_messages(&mut tablet_stream, 2).await;
    send(&addr(0), &alice, &bob, "a2").await;
    let group = create_group(&addr(0), &alice, vec![bob.user]).await;
    MessagingClient::new(channel(&addr(0)).await)
        .send_to_group(authed(
            &alice,
            SendToGroupRequest {
                client_msg_id: "g1".to_owned(),
                group_id: group,
                content: body("g1"),
            },
        ))
        .await
        .expect("group send");
    let rest = next_messages(&mut tablet_stream, 2).await;
    let group_conversation = events::Conversation {
        with: Some(events::conversation::With::Group(group)),
    };
    let expected = vec![
        (
            alice.user,
            alice.device,
            with_user(bob.user),
            "a1".to_owned(),
        ),
        (bob.user, bob.device, with_user(bob.user), "b1".to_owned()),
        (
            alice.user,
            alice.device,
            with_user(bob.user),
            "a2".to_owned(),
        ),
        (
            alice.user,
            alice.device,
            group_conversation,
            "g1".to_owned(),
        ),
    ];
    let on_tablet = [first, rest].concat();
    assert_eq!(
        seen(&on_tablet),
        expected,
        "the tablet sees the whole conversation"
    );
    let seqs: Vec<u64> = on_tablet.iter().map(|m| m.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let mut phone_stream = open_stream(&addr(0), &alice, 0).await;
    let on_phone = next_messages(&mut phone_stream, 4).await;
    assert_eq!(
        seen(&on_phone),
        expected,
        "the phone gets the same inbox, in the same order"
    );
    let to_bob = next_messages(&mut bob_stream, 2).await;
    let texts: Vec<String> = seen(&to_bob).into_iter().map(|m| m.3).collect();
    assert_eq!(
        texts,
        ["a2", "g1"],
        "Bob gets each of Alice's messages once"
    );
}

/// Bob writes to Alice, who has only her phone, and the phone acks everything (bodies would
/// leave): a tablet linked afterwards still fetches those messages, the recent history kept for
/// companions (`retention.companion-history`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_companion_fetches_recent_history() {
    let c = cluster().await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    c.wait_converged().await;
    for text in ["h1", "h2", "h3"] {
        send(&addr(1), &bob, &alice, text).await;
    }
    let mut phone_stream = open_stream(&addr(0), &alice, 0).await;
    let got = next_messages(&mut phone_stream, 3).await;
    let acked = got.last().expect("three messages").seq;
    phone_stream
        .out
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Ack(Ack { up_to_seq: acked })),
        })
        .await
        .expect("ack");
    let started = std::time::Instant::now();
    while delivered_up_to(&c.nodes[0], alice.user) < acked {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the ack applies"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tablet = link_tablet(&addr(2), &alice).await;
    let mut tablet_stream = open_stream(&addr(2), &tablet, 0).await;
    let history = next_messages(&mut tablet_stream, 3).await;
    let texts: Vec<String> = seen(&history).into_iter().map(|m| m.3).collect();
    assert_eq!(texts, ["h1", "h2", "h3"], "the companion gets the history");
}
