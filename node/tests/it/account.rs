//! Deleting an account on three in-process nodes: only the primary, only with the account's own
//! number; afterwards no device works on any node, nobody can write to the account, it is in no
//! group, its keys are gone, no replica holds its number's hash, every replica equals a rebuild
//! of its log, and the number registers again as a new, empty account. Changing number: the
//! account moves to the new number's user with its groups and what its phone had not acked.

use std::time::{Duration, Instant};

use courier_proto::pb::client::groups_client::GroupsClient;
use courier_proto::pb::client::keys_client::KeysClient;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    AddMemberRequest, ChangeNumberRequest, DeleteAccountRequest, GetPreKeyBundleRequest,
    GetReceiptsRequest, ListDevicesRequest, ListGroupsRequest, SendRequest, SendToGroupRequest,
    ServerFrame, server_frame,
};
use courier_proto::pb::events::ReceiptState;
use courier_proto::{GroupId, PhoneHasher, PhoneKey, shard_of, shard_of_group};
use courier_storage::{Cf, Projection, ReadKv};

use crate::messaging::{
    Device, ack, assert_verified_from_genesis, authed, body, cluster_appending, code_for, code_is,
    collect, create_group, delivered_up_to, group_shard_of, link_tablet, open_stream,
    phones_on_different_shards, register, user_of,
};
use crate::support::channel;

/// A group send by `from` with client id `client_msg_id`: whether it was answered as a
/// duplicate, and its message id.
async fn send_to_group(
    addr: &str,
    from: &Device,
    group: u64,
    client_msg_id: &str,
) -> (bool, Vec<u8>) {
    let answer = MessagingClient::new(channel(addr).await)
        .send_to_group(authed(
            from,
            SendToGroupRequest {
                client_msg_id: client_msg_id.to_owned(),
                group_id: group,
                content: body("to the group"),
            },
        ))
        .await
        .expect("group send")
        .into_inner();
    (answer.duplicate, answer.message_id)
}

/// Config for tests that send more than the default rate allows.
const UNLIMITED_SENDS: &str =
    "[limits]\nsends-per-second-per-device = 10000\nsend-burst-per-device = 10000\n";

async fn send(addr: &str, from: &Device, to: u64, text: &str) -> Result<(), tonic::Status> {
    send_as(addr, from, to, (text, text)).await
}

/// A send of `text` with client id `id`.
async fn send_as(
    addr: &str,
    from: &Device,
    to: u64,
    (id, text): (&str, &str),
) -> Result<(), tonic::Status> {
    MessagingClient::new(channel(addr).await)
        .send(authed(
            from,
            SendRequest {
                client_msg_id: id.to_owned(),
                to_user: to,
                content: body(text),
            },
        ))
        .await
        .map(|_| ())
}

async fn delete(addr: &str, device: &Device, phone: &str) -> Result<u32, tonic::Status> {
    RegistrationClient::new(channel(addr).await)
        .delete_account(authed(
            device,
            DeleteAccountRequest {
                phone_number: phone.to_owned(),
            },
        ))
        .await
        .map(|r| r.into_inner().groups_left)
}

fn bodies(frames: &[ServerFrame]) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Message(m)) => Some((
                m.seq,
                String::from_utf8(m.content.clone().unwrap_or_default().body).expect("utf-8"),
            )),
            _ => None,
        })
        .collect()
}

/// Sends `text` from `from` to the number registered again as `to` until a send goes through
/// (every replica the send touches has applied the new registration), within 10 s.
async fn writable_again(addr: &str, from: &Device, to: u64, text: &str) {
    eventually("the number can be written to again", async || {
        send(addr, from, to, text).await.is_ok()
    })
    .await;
}

/// Retries `check` until it holds or 10 s pass (replicas apply at their own pace).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::too_many_lines,
    reason = "one account's story in linear phases: each phase reads the state the previous one left"
)]
async fn a_deleted_account_leaves_nothing_and_the_number_registers_again() {
    let c = cluster_appending(UNLIMITED_SENDS).await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    let tablet = link_tablet(&addr(2), &alice).await;
    c.wait_converged().await;
    KeysClient::new(channel(&addr(0)).await)
        .upload_keys(authed(&alice, crate::keys::upload(1..6)))
        .await
        .expect("upload");
    let group = create_group(&addr(0), &alice, vec![bob.user]).await;
    send(&addr(1), &bob, alice.user, "before")
        .await
        .expect("send");
    send(&addr(0), &alice, bob.user, "from alice")
        .await
        .expect("send");

    tracing::info!("a companion, or another number, deletes nothing");
    let refused = delete(&addr(2), &tablet, &alice_phone).await.unwrap_err();
    code_is(
        &refused,
        tonic::Code::PermissionDenied,
        "COURIER:Account:NotPrimary",
    );
    let refused = delete(&addr(0), &alice, &bob_phone).await.unwrap_err();
    code_is(
        &refused,
        tonic::Code::InvalidArgument,
        "COURIER:Account:WrongNumber",
    );
    send(&addr(1), &bob, alice.user, "still here")
        .await
        .expect("the account still exists");

    tracing::info!("the primary deletes the account with its own number");
    let left = delete(&addr(0), &alice, &alice_phone)
        .await
        .expect("delete");
    assert_eq!(left, 1, "it left its one group first");
    c.wait_converged().await;
    for i in 0..3 {
        for device in [&alice, &tablet] {
            let status = RegistrationClient::new(channel(&addr(i)).await)
                .list_devices(authed(device, ListDevicesRequest {}))
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "node {i}: {status:?}"
            );
        }
    }
    let refused = send(&addr(1), &bob, alice.user, "after").await.unwrap_err();
    code_is(
        &refused,
        tonic::Code::NotFound,
        "COURIER:Messaging:UnknownRecipient",
    );
    let groups = GroupsClient::new(channel(&addr(1)).await)
        .list_groups(authed(&bob, ListGroupsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .groups;
    let members: Vec<u64> = groups
        .iter()
        .find(|g| g.group_id == group)
        .expect("bob's group")
        .members
        .iter()
        .map(|m| m.user_id)
        .collect();
    assert_eq!(members, vec![bob.user], "alice left the group");
    let bundle = KeysClient::new(channel(&addr(1)).await)
        .get_pre_key_bundle(authed(&bob, GetPreKeyBundleRequest { user: alice.user }))
        .await;
    assert!(
        bundle
            .as_ref()
            .map_or(true, |b| b.get_ref().devices.is_empty()),
        "no keys are handed out: {bundle:?}"
    );

    tracing::info!("no replica holds the number's hash; every replica equals a rebuild");
    let phone_hash =
        PhoneHasher::Keyed(PhoneKey::new(crate::cluster::PHONE_KEY)).phone_hash(&alice_phone);
    let alice_shard = shard_of(
        user_of(&alice_phone),
        u16::try_from(crate::cluster::SHARDS).expect("small"),
    );
    for node in &c.nodes {
        let db = node.groups().db().clone();
        let (from, to) = courier_storage::keys::shard_range(alice_shard);
        for projection in Projection::ALL {
            let records = db
                .scan(Cf::Projection(projection), &from, &to, usize::MAX)
                .expect("scan");
            for (key, value) in records {
                let holds = |bytes: &[u8]| bytes.windows(phone_hash.len()).any(|w| w == phone_hash);
                assert!(
                    !holds(&key) && !holds(&value),
                    "{} holds the number's hash",
                    projection.name()
                );
            }
        }
        assert_verified_from_genesis(node, alice_shard).await;
    }

    tracing::info!("the number registers again: a new account with an empty inbox");
    let again = register(&addr(1), &c.dirs[1], &alice_phone).await;
    assert_eq!(again.user, alice.user, "user ids follow the number");
    assert_eq!(again.device, 1, "device ids start again");
    c.wait_converged().await;
    writable_again(&addr(1), &bob, alice.user, "welcome back").await;
    let mut stream = open_stream(&addr(2), &again, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(10), |f| {
        !bodies(f).is_empty()
    })
    .await;
    assert_eq!(
        bodies(&frames),
        vec![(1, "welcome back".to_owned())],
        "nothing from before; the new inbox starts at seq 1"
    );
}

async fn change(
    addr: &str,
    device: &Device,
    new_phone: &str,
    code: &str,
) -> Result<(Device, u32), tonic::Status> {
    let response = RegistrationClient::new(channel(addr).await)
        .change_number(authed(
            device,
            ChangeNumberRequest {
                new_phone_number: new_phone.to_owned(),
                code: code.to_owned(),
                device_name: "phone".to_owned(),
            },
        ))
        .await?
        .into_inner();
    let registered = response.registered.expect("credentials");
    Ok((Device::registered(&registered), response.groups_moved))
}

/// Alice (with a tablet, admin of a group with Bob) acked Bob's first message and not the next
/// two, then changes to a number on another shard: a companion, her own number or a wrong code
/// changes nothing; the change (code from node 1, asked on node 2) gives the new number's user,
/// admin in her place in the group; the old credentials and the tablet stop working everywhere,
/// the old user is unknown to senders; the new account's stream gets exactly the two unacked
/// messages, in order, and what Bob sends to the new number; every replica equals a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::too_many_lines,
    reason = "one account's story in linear phases: each phase reads the state the previous one left"
)]
async fn a_changed_number_keeps_the_groups_and_what_the_phone_had_not_received() {
    let c = cluster_appending(UNLIMITED_SENDS).await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let count = u16::try_from(crate::cluster::SHARDS).expect("small");
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let old_shard = shard_of(user_of(&alice_phone), count);
    let new_phone = (100..200)
        .map(|i| format!("+15550000{i:03}"))
        .find(|p| shard_of(user_of(p), count) != old_shard && *p != bob_phone)
        .expect("a number elsewhere");
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    let tablet = link_tablet(&addr(2), &alice).await;
    c.wait_converged().await;
    let group = create_group(&addr(0), &alice, vec![bob.user]).await;
    for text in ["one", "two", "three"] {
        send(&addr(1), &bob, alice.user, text).await.expect("send");
    }
    let mut stream = open_stream(&addr(0), &alice, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(10), |f| {
        bodies(f).len() >= 3
    })
    .await;
    assert_eq!(bodies(&frames).len(), 3, "{frames:?}");
    ack(&stream, 1).await;
    eventually("the ack applied", async || {
        delivered_up_to(&c.nodes[0], alice.user) == 1
    })
    .await;
    drop(stream);
    c.wait_converged().await; // the group is on every replica the change may read

    tracing::info!("a companion, the same number or a wrong code changes nothing");
    let code = code_for(&addr(1), &c.dirs[1], &new_phone).await;
    let refused = change(&addr(2), &tablet, &new_phone, &code)
        .await
        .unwrap_err();
    code_is(
        &refused,
        tonic::Code::PermissionDenied,
        "COURIER:Account:NotPrimary",
    );
    let refused = change(&addr(2), &alice, &alice_phone, &code)
        .await
        .unwrap_err();
    code_is(
        &refused,
        tonic::Code::InvalidArgument,
        "COURIER:Account:SameNumber",
    );
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let refused = change(&addr(2), &alice, &new_phone, wrong)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    send(&addr(1), &bob, alice.user, "still here")
        .await
        .expect("the account still exists");

    tracing::info!("the change, with the code node 1 sent, asked on node 2");
    let (moved, groups_moved) = change(&addr(2), &alice, &new_phone, &code)
        .await
        .expect("change");
    assert_eq!(
        moved.user,
        user_of(&new_phone).get(),
        "the new number's user"
    );
    assert_eq!(groups_moved, 1);
    c.wait_converged().await;
    for i in 0..3 {
        for device in [&alice, &tablet] {
            let status = RegistrationClient::new(channel(&addr(i)).await)
                .list_devices(authed(device, ListDevicesRequest {}))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "node {i}");
        }
    }
    let refused = send(&addr(1), &bob, alice.user, "to the old")
        .await
        .unwrap_err();
    code_is(
        &refused,
        tonic::Code::NotFound,
        "COURIER:Messaging:UnknownRecipient",
    );
    let groups = GroupsClient::new(channel(&addr(1)).await)
        .list_groups(authed(&bob, ListGroupsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .groups;
    let mut members: Vec<(u64, bool)> = groups
        .iter()
        .find(|g| g.group_id == group)
        .expect("bob's group")
        .members
        .iter()
        .map(|m| (m.user_id, m.admin))
        .collect();
    members.sort_unstable();
    let mut expected = vec![(bob.user, false), (moved.user, true)];
    expected.sort_unstable();
    assert_eq!(
        members, expected,
        "the new number holds her place, as admin"
    );

    tracing::info!("the new account gets what the phone had not acked, once, in order");
    send(&addr(1), &bob, moved.user, "to the new")
        .await
        .expect("send to the new number");
    let mut stream = open_stream(&addr(1), &moved, 0).await;
    let frames = collect(&mut stream, Duration::from_secs(15), |f| {
        bodies(f).len() >= 4
    })
    .await;
    let later = collect(&mut stream, Duration::from_secs(1), |_| false).await;
    assert_eq!(bodies(&later), Vec::new(), "nothing arrives twice");
    let got: Vec<String> = bodies(&frames).into_iter().map(|(_, b)| b).collect();
    // The moved messages come in their order; Bob's new one may land before, between or after
    // them (it travels another path).
    let moved_ones: Vec<&String> = got.iter().filter(|b| *b != "to the new").collect();
    assert_eq!(moved_ones, ["two", "three", "still here"], "{got:?}");
    assert_eq!(got.len(), 4, "each once: {got:?}");

    tracing::info!("the new account's ack reaches Bob as DELIVERED, naming the id he wrote to");
    let (three_id, tail) = frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::Message(m)) => Some(m),
            _ => None,
        })
        .fold((Vec::new(), 0), |(id, tail), m| {
            let body = m.content.as_ref().map(|c| c.body.as_slice());
            let id = if body == Some(b"three".as_slice()) {
                m.message_id.clone()
            } else {
                id
            };
            (id, tail.max(m.seq))
        });
    ack(&stream, tail).await;
    eventually("bob sees three delivered to alice", async || {
        MessagingClient::new(channel(&addr(1)).await)
            .get_receipts(authed(
                &bob,
                GetReceiptsRequest {
                    message_ids: vec![three_id.clone()],
                    group_id: 0,
                },
            ))
            .await
            .expect("receipts")
            .into_inner()
            .receipts
            .iter()
            .flat_map(|m| &m.recipients)
            .any(|r| r.recipient_user == alice.user && r.state() == ReceiptState::Delivered)
    })
    .await;
    c.wait_converged().await;
    let new_shard = shard_of(user_of(&new_phone), count);
    let group_shard = shard_of_group(GroupId::new(group).expect("nonzero"), count);
    for node in &c.nodes {
        for shard in [old_shard, new_shard, group_shard] {
            assert_verified_from_genesis(node, shard).await;
        }
    }
}

/// `ListConversations` and `ListGroups` answer in pages: `limit` items at most, `more` while
/// items follow, the next page after the last item of the previous one, every item once and in
/// order; a limit above the page maximum is `INVALID_ARGUMENT COURIER:Wire:OutOfRange`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_and_groups_are_listed_in_pages() {
    use courier_proto::pb::client::ListConversationsRequest;
    use courier_proto::pb::events::Conversation;

    let c = cluster_appending(UNLIMITED_SENDS).await;
    let addr = c.nodes[0].client_addr.to_string();
    let bob = register(&addr, &c.dirs[0], "+15550004400").await;
    let mut senders = Vec::new();
    for i in 0..5 {
        let sender = register(&addr, &c.dirs[0], &format!("+1555000441{i}")).await;
        send(&addr, &sender, bob.user, &format!("hi {i}"))
            .await
            .expect("send");
        senders.push(sender);
    }
    let mut groups = Vec::new();
    for sender in &senders[..3] {
        groups.push(create_group(&addr, sender, vec![bob.user]).await);
    }
    let senders_group = groups[0];
    groups.sort_unstable();

    let mut messaging = MessagingClient::new(channel(&addr).await);
    // A group message makes a sixth conversation, so that the pages cross from the 1:1
    // conversations to the group ones.
    messaging
        .send_to_group(authed(
            &senders[0],
            SendToGroupRequest {
                client_msg_id: "g".to_owned(),
                group_id: senders_group,
                content: body("to the group"),
            },
        ))
        .await
        .expect("group send");
    let started = Instant::now();
    loop {
        let listed = messaging
            .list_conversations(authed(&bob, ListConversationsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        if listed.conversations.len() == 6 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the group message reaches bob: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let everything = messaging
        .list_conversations(authed(&bob, ListConversationsRequest::default()))
        .await
        .expect("one page holds all")
        .into_inner();
    assert!(!everything.more);
    assert_eq!(everything.conversations.len(), 6, "{everything:?}");
    assert!(
        matches!(
            everything.conversations[5].conversation,
            Some(Conversation {
                with: Some(courier_proto::pb::events::conversation::With::Group(_))
            })
        ),
        "1:1 conversations first, then groups: {everything:?}"
    );
    let (mut paged, mut after, mut pages): (Vec<Conversation>, Option<Conversation>, usize) =
        (Vec::new(), None, 0);
    loop {
        let page = messaging
            .list_conversations(authed(&bob, ListConversationsRequest { limit: 2, after }))
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        assert!(page.conversations.len() <= 2, "{page:?}");
        paged.extend(page.conversations.iter().filter_map(|s| s.conversation));
        after = paged.last().copied();
        if !page.more {
            break;
        }
        assert!(pages < 10, "paging ends");
    }
    assert_eq!(pages, 3, "6 conversations in pages of 2");
    let whole: Vec<Conversation> = everything
        .conversations
        .iter()
        .filter_map(|s| s.conversation)
        .collect();
    assert_eq!(paged, whole, "every conversation once, in the same order");

    let mut client = GroupsClient::new(channel(&addr).await);
    let first = client
        .list_groups(authed(
            &bob,
            ListGroupsRequest {
                limit: 2,
                after_group_id: 0,
            },
        ))
        .await
        .expect("first page")
        .into_inner();
    assert!(first.more);
    let second = client
        .list_groups(authed(
            &bob,
            ListGroupsRequest {
                limit: 2,
                after_group_id: first.groups.last().expect("two groups").group_id,
            },
        ))
        .await
        .expect("second page")
        .into_inner();
    assert!(!second.more);
    let listed: Vec<u64> = first
        .groups
        .iter()
        .chain(&second.groups)
        .map(|g| g.group_id)
        .collect();
    assert_eq!(listed, groups, "every group once, by id");

    let too_big = client
        .list_groups(authed(
            &bob,
            ListGroupsRequest {
                limit: courier_proto::limits::GROUPS_PAGE_MAX + 1,
                after_group_id: 0,
            },
        ))
        .await
        .expect_err("above the page maximum");
    code_is(
        &too_big,
        tonic::Code::InvalidArgument,
        "COURIER:Wire:OutOfRange",
    );
    for node in c.nodes {
        node.stop().await;
    }
}

/// A number deleted and registered again starts its devices at 1, and its group sends are
/// deduplicated on the group's shard, which the account's `AccountDeleted` does not reach: the
/// deletion forgets them there first, so a client id the new registration reuses is a new send,
/// not an old send's result with its message never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_registered_again_may_reuse_its_group_client_ids() {
    let c = cluster_appending(UNLIMITED_SENDS).await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    c.wait_converged().await;
    let alice_shard = shard_of(
        user_of(&alice_phone),
        u16::try_from(crate::cluster::SHARDS).expect("small"),
    );
    let mut group = create_group(&addr(1), &bob, vec![alice.user]).await;
    while group_shard_of(group) == alice_shard {
        group = create_group(&addr(1), &bob, vec![alice.user]).await;
    }
    let (duplicate, first) = send_to_group(&addr(0), &alice, group, "reused").await;
    assert!(!duplicate);
    delete(&addr(0), &alice, &alice_phone)
        .await
        .expect("delete");
    let again = register(&addr(0), &c.dirs[0], &alice_phone).await;
    assert_eq!(
        (again.user, again.device),
        (alice.user, alice.device),
        "the same user and device ids"
    );
    c.wait_converged().await;
    GroupsClient::new(channel(&addr(1)).await)
        .add_member(authed(
            &bob,
            AddMemberRequest {
                group_id: group,
                user_id: again.user,
            },
        ))
        .await
        .expect("added again");
    c.wait_converged().await;
    let (duplicate, second) = send_to_group(&addr(0), &again, group, "reused").await;
    assert!(
        !duplicate && second != first,
        "the new registration's send is stored, not answered as the old one"
    );
}

/// A device stream open across its account's deletion and a new registration of the number is
/// not a device of the new account, though the new account's devices get the same ids again:
/// once its pusher runs again it ends with `UNAUTHENTICATED` `COURIER:Auth:Revoked` and pushes
/// nothing of the new account. The old stream is not read while the account changes hands, so
/// its pusher waits with a full buffer (one frame, and more than the transport's window of
/// messages sent before) and sees the change only afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_across_a_new_registration_is_not_the_new_accounts_device() {
    let c = cluster_appending(&format!("{UNLIMITED_SENDS}stream-buffer-frames = 1\n")).await;
    let addr = |i: usize| c.nodes[i].client_addr.to_string();
    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addr(0), &c.dirs[0], &alice_phone).await;
    let bob = register(&addr(1), &c.dirs[1], &bob_phone).await;
    let tablet = link_tablet(&addr(2), &alice).await;
    c.wait_converged().await;
    let mut old = open_stream(&addr(2), &tablet, 0).await;
    let large = "x".repeat(60_000);
    let old_messages = 48;
    for i in 0..old_messages {
        send_as(&addr(1), &bob, alice.user, (&format!("old {i}"), &large))
            .await
            .expect("send");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    tracing::info!("the account is deleted and the number registered again, with a tablet");
    delete(&addr(0), &alice, &alice_phone)
        .await
        .expect("delete");
    c.wait_converged().await;
    let again = register(&addr(1), &c.dirs[1], &alice_phone).await;
    let new_tablet = link_tablet(&addr(2), &again).await;
    assert_eq!(
        (again.user, new_tablet.device),
        (tablet.user, tablet.device),
        "the new tablet has the old one's ids"
    );
    c.wait_converged().await;
    writable_again(&addr(1), &bob, alice.user, "for the new account").await;
    for i in 0..old_messages {
        let id = format!("new {i}");
        send_as(&addr(1), &bob, alice.user, (&id, "for the new account"))
            .await
            .expect("send");
    }

    tracing::info!("the old tablet's stream is read again: it ends, revoked");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ended = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, old.frames.message()).await {
            Ok(Ok(Some(frame))) => {
                let new = bodies(&[frame])
                    .into_iter()
                    .any(|(_, body)| body == "for the new account");
                assert!(!new, "the old tablet got a message of the new account");
            }
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the old tablet's stream is still open"),
        }
    };
    code_is(&ended, tonic::Code::Unauthenticated, "COURIER:Auth:Revoked");
    let mut fresh = open_stream(&addr(2), &new_tablet, 0).await;
    let frames = collect(&mut fresh, Duration::from_secs(10), |f| {
        bodies(f).len() > old_messages
    })
    .await;
    assert_eq!(
        bodies(&frames).len(),
        old_messages + 1,
        "the new tablet gets all of the new account's messages"
    );
}
