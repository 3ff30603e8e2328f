//! The attacker of issue #20, on the same network as a three-node cluster: each door that was
//! open is tried and must be shut. Goal: without the right certificate no peer RPC is served,
//! a certificate cannot act beyond its role or as another node, and what a member node's
//! certificate can still propose stops no replica. Method: real TLS listeners (in-process
//! nodes); callers holding no certificate, another CA's, the client listener's, an operator's,
//! a member node's and a stranger node's.

use std::time::Duration;

use courier_consensus::types::NodeId;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::forward_client::ForwardClient;
use courier_proto::pb::peer::raft_client::RaftClient;
use courier_proto::pb::peer::{
    BackupRequest, PresenceRequest, ProposeRequest, RaftRequest, ReadLogRequest, StatusRequest,
    TransferLeaderRequest, TypingRequest, VerifyProjectionRequest, projection_job_update,
};
use courier_proto::{PhoneHasher, PhoneKey, UserId, shard_of};
use courier_storage::testkit::Adversary;
use courier_tls::{Certificate, ClientTlsConfig, Identity};
use tonic::transport::Channel;

use crate::cluster::{PHONE_KEY, SHARDS, init_request, status, wait_converged, wait_leaders};
use crate::messaging::{cluster_configured, code_of, register, user_of};
use crate::support::{connect, log_events, peer_channel, peer_tls, pki};

/// A channel to `addr` with `tls` (`None`: plaintext), or why it could not be made.
async fn try_channel(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).expect("tls config");
    }
    endpoint
        .connect()
        .await
        .map_err(|error| format!("connect: {error:?}"))
}

/// `Admin.Status` with `tls`: `Ok` only when it was served.
async fn status_with(peer: &str, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let channel = try_channel(peer, tls).await?;
    AdminClient::new(channel)
        .status(StatusRequest {})
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

/// Trusts the test CA (so the node's certificate verifies) and presents `cert`/`key`.
fn presenting(cert: &std::path::Path, key: &std::path::Path) -> ClientTlsConfig {
    let read = |path: &std::path::Path| std::fs::read(path).expect("PEM file");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(
            &pki().join(courier_tls::dev::CA_FILE),
        )))
        .identity(Identity::from_pem(read(cert), read(key)))
        .domain_name(courier_tls::NODE_SERVER_NAME)
}

fn assert_denied(result: Result<impl std::fmt::Debug, tonic::Status>, code: &str, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(code_of(&status), code, "{what}: {status:?}");
    assert!(
        matches!(
            status.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{what}: {status:?}"
    );
}

/// A vote request from `candidate` for group `group` (wire form).
fn vote_from(candidate: NodeId) -> RaftRequest {
    let vote: openraft::raft::VoteRequest<NodeId> = openraft::raft::VoteRequest::new(
        openraft::Vote::new(99, candidate),
        Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, candidate),
            1_000,
        )),
    );
    RaftRequest {
        group: Some(courier_consensus::network::group_to_wire(
            courier_consensus::types::GroupId::Metadata,
        )),
        payload: postcard::to_stdvec(&vote).expect("encode"),
    }
}

/// Unauthenticated, foreign-CA and role-less callers are refused before any RPC runs; plaintext
/// reaches neither listener; the operator's certificate is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_from_the_cluster_ca_with_a_role_reach_the_peer_listener() {
    let c = cluster_configured(&|text| text).await;
    let peer = c.nodes[0].peer_addr.to_string();
    let client = c.nodes[0].client_addr.to_string();
    let ca = pki().join(courier_tls::dev::CA_FILE);

    status_with(&peer, Some(peer_tls(courier_tls::dev::OPERATOR)))
        .await
        .expect("the operator's certificate is served");

    let plaintext = status_with(&peer, None).await;
    assert!(plaintext.is_err(), "plaintext peer call: {plaintext:?}");

    let no_certificate = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).expect("CA")))
        .domain_name(courier_tls::NODE_SERVER_NAME);
    let anonymous = status_with(&peer, Some(no_certificate)).await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");

    let other = tempfile::tempdir().expect("tempdir");
    courier_tls::dev::generate(other.path(), &courier_tls::dev::DevPki::local(&[1]))
        .expect("another CA");
    let (cert, key) = courier_tls::dev::files(other.path(), "node-1");
    let foreign = status_with(&peer, Some(presenting(&cert, &key))).await;
    assert!(foreign.is_err(), "another CA's node 1: {foreign:?}");

    // Signed by the cluster CA, but naming no role: the client listener's own certificate.
    let (cert, key) = courier_tls::dev::files(pki(), courier_tls::dev::LISTENER);
    let listener = try_channel(&peer, Some(presenting(&cert, &key)))
        .await
        .expect("the handshake succeeds: the CA signed it");
    assert_denied(
        ForwardClient::new(listener.clone())
            .typing(TypingRequest::default())
            .await,
        "COURIER:Peer:NoCertificate",
        "a certificate without a role calls Forward",
    );
    assert_denied(
        AdminClient::new(listener).status(StatusRequest {}).await,
        "COURIER:Peer:NoCertificate",
        "a certificate without a role calls Admin",
    );

    let plaintext_client = try_channel(&client, None).await;
    let refused = match plaintext_client {
        Err(_) => true,
        Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client connection is refused");
    for node in c.nodes {
        node.stop().await;
    }
}

/// Each role does only its own part: an operator cannot forward or propose, a node cannot call
/// the operator's Admin RPCs, a node cannot speak for another node, and a node that is not a
/// member cannot call raft or forwarding at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_act_only_within_their_role() {
    let c = cluster_configured(&|text| text).await;
    let peer = c.nodes[0].peer_addr.to_string();
    let backup = c.dirs[0].with_file_name("stolen");

    let operator = peer_channel(&peer).await;
    assert_denied(
        ForwardClient::new(operator.clone())
            .propose(ProposeRequest {
                shard: 0,
                events: Vec::new(),
            })
            .await,
        "COURIER:Peer:NodeOnly",
        "an operator proposes",
    );
    assert_denied(
        RaftClient::new(operator.clone()).vote(vote_from(1)).await,
        "COURIER:Peer:NodeOnly",
        "an operator votes",
    );
    assert_denied(
        ForwardClient::new(operator)
            .build_info(courier_proto::pb::peer::BuildInfoRequest {})
            .await,
        "COURIER:Peer:NodeOnly",
        "an operator asks a member's build as a member would",
    );

    let node1 = connect(&peer, peer_tls("node-1")).await;
    let mut admin = AdminClient::new(node1.clone());
    assert_denied(
        admin.status(StatusRequest {}).await,
        "COURIER:Peer:OperatorOnly",
        "a node reads status",
    );
    assert_denied(
        admin.read_log(ReadLogRequest::default()).await,
        "COURIER:Peer:OperatorOnly",
        "a node reads the log",
    );
    assert_denied(
        admin
            .backup(BackupRequest {
                dir: backup.display().to_string(),
            })
            .await,
        "COURIER:Peer:OperatorOnly",
        "a node writes a checkpoint",
    );
    assert!(!backup.exists(), "no checkpoint was written");
    assert_denied(
        admin
            .transfer_leader(TransferLeaderRequest {
                shard: 0,
                to_node: 1,
            })
            .await,
        "COURIER:Peer:OperatorOnly",
        "a node moves a leader",
    );
    assert_denied(
        admin
            .verify_projection(VerifyProjectionRequest::default())
            .await,
        "COURIER:Peer:OperatorOnly",
        "a node starts a verify",
    );

    let mut forward = ForwardClient::new(node1.clone());
    assert_denied(
        forward
            .presence(PresenceRequest {
                node_id: 2,
                reports: Vec::new(),
                query: Vec::new(),
            })
            .await,
        "COURIER:Peer:WrongNode",
        "node 1 reports presence as node 2",
    );
    forward
        .presence(PresenceRequest {
            node_id: 1,
            reports: Vec::new(),
            query: Vec::new(),
        })
        .await
        .expect("node 1 reports as itself");
    assert_denied(
        RaftClient::new(node1).vote(vote_from(2)).await,
        "COURIER:Peer:WrongNode",
        "node 1 asks for votes as node 2",
    );

    // Node 9 has a certificate from the cluster CA but is not a member.
    let stranger = connect(&peer, peer_tls("node-9")).await;
    assert_denied(
        RaftClient::new(stranger.clone()).vote(vote_from(9)).await,
        "COURIER:Peer:NotAMember",
        "a stranger node votes",
    );
    assert_denied(
        ForwardClient::new(stranger)
            .typing(TypingRequest::default())
            .await,
        "COURIER:Peer:NotAMember",
        "a stranger node forwards",
    );
    for node in c.nodes {
        node.stop().await;
    }
}

/// A member node's certificate can still propose anything; arbitrary and adversarial events
/// (unknown users and devices, acks past the tail, reads of other conversations, receipts going
/// backwards, forwarded gaps, zero and malformed ids) are refused or applied the same way on
/// every replica: no replica stops, every digest agrees, every projection verifies against a
/// replay of its log, and each replica counts what it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_event_batch_stops_no_replica() {
    let panics = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let panics = panics.clone();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panics.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            default(info);
        }));
    }
    let c = cluster_configured(&|text| text).await;
    let peers: Vec<String> = c.nodes.iter().map(|n| n.peer_addr.to_string()).collect();
    let mut forward = ForwardClient::new(connect(&peers[0], peer_tls("node-1")).await);
    for shard in 0..SHARDS {
        let shard16 = courier_proto::ShardId::new(u16::try_from(shard).expect("small"));
        let mut adversary = Adversary::new(shard16, u64::from(shard) + 7);
        for payload in adversary.payloads(40, 6) {
            forward
                .propose(ProposeRequest {
                    shard,
                    events: payload.events,
                })
                .await
                .expect("proposed: the node does not validate a peer's events, apply does");
        }
    }
    wait_converged(&peers, Duration::from_secs(30)).await;
    for peer in &peers {
        let status = status(peer).await;
        let invalid = status
            .counters
            .map_or(0, |counters| counters.invalid_events);
        assert!(invalid > 0, "{peer} refused forged events: {invalid}");
        let mut admin = AdminClient::new(peer_channel(peer).await);
        for shard in 0..SHARDS {
            let mut updates = admin
                .verify_projection(VerifyProjectionRequest {
                    shard,
                    projection: String::new(),
                    from_genesis: true,
                })
                .await
                .expect("verify")
                .into_inner();
            let mut verified = None;
            while let Some(update) = updates.message().await.expect("stream") {
                if let Some(projection_job_update::Update::Verified(result)) = update.update {
                    verified = Some(result);
                }
            }
            let verified = verified.expect("a result");
            assert!(
                verified.mismatches.is_empty(),
                "{peer} shard {shard}: {:?}",
                verified.mismatches
            );
        }
    }
    assert_eq!(
        panics.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no task panicked (a release build would have aborted)"
    );
    for node in c.nodes {
        node.stop().await;
    }
}

/// A device revoked by a re-registration of its number (done through node 1) loses its open
/// stream on node 2 within a second, with `COURIER:Auth:Revoked`; its companion, linked before,
/// is revoked by the same registration: a new owner of the number inherits no linked device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registration_closes_streams_and_revokes_companions() {
    use crate::messaging::{authed, link_tablet, open_stream, register};
    use courier_proto::pb::client::ListDevicesRequest;
    use courier_proto::pb::client::messaging_client::MessagingClient;
    use courier_proto::pb::client::registration_client::RegistrationClient;

    let c = cluster_configured(&|text| text).await;
    let node1 = c.nodes[0].client_addr.to_string();
    let node2 = c.nodes[1].client_addr.to_string();
    let phone = "+15550001234";
    let phone_owner = register(&node1, &c.dirs[0], phone).await;
    let tablet = link_tablet(&node1, &phone_owner).await;
    c.wait_converged().await;
    let mut stream = open_stream(&node2, &phone_owner, 0).await;
    let mut tablet_stream = open_stream(&node2, &tablet, 0).await;

    let new_owner = register(&node1, &c.dirs[0], phone).await;
    assert_eq!(new_owner.user, phone_owner.user);
    for (name, stream) in [("primary", &mut stream), ("companion", &mut tablet_stream)] {
        let closed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match stream.frames.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the revoked {name}'s stream was still open after 1 s"));
        let status = closed.unwrap_or_else(|| panic!("the {name}'s stream ended without a status"));
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert_eq!(code_of(&status), "COURIER:Auth:Revoked", "{status:?}");
    }
    let devices = RegistrationClient::new(crate::support::channel(&node1).await)
        .list_devices(authed(&new_owner, ListDevicesRequest {}))
        .await
        .expect("the new owner lists devices")
        .into_inner()
        .devices;
    let active: Vec<u32> = devices
        .iter()
        .filter(|device| !device.revoked)
        .map(|device| device.device_id)
        .collect();
    assert_eq!(active, vec![new_owner.device], "{devices:?}");
    let refused = MessagingClient::new(crate::support::channel(&node2).await)
        .list_conversations(authed(
            &tablet,
            courier_proto::pb::client::ListConversationsRequest::default(),
        ))
        .await
        .expect_err("the old companion's token is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    for node in c.nodes {
        node.stop().await;
    }
}

/// Bad input changes nothing, not even the caller's rate bucket: sends over the configured body
/// limit (`limits.message-body-max`, checked after the wire's protocol maximum) are refused as
/// `TooLong` however many come, and a device's valid send after them still has its whole burst.
/// Likewise presence lookups naming a zero user id are refused as `Zero` and cost no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sends_cost_no_rate_token() {
    use crate::messaging::{authed, body, register};
    use courier_proto::pb::client::messaging_client::MessagingClient;
    use courier_proto::pb::client::{GetPresenceRequest, SendRequest};
    use courier_proto::pb::events;

    let c = cluster_configured(&|text| {
        format!(
            "{text}\n[limits]\nsends-per-second-per-device = 1\nsend-burst-per-device = 2\nmessage-body-max = 1024\npresence-lookups-per-second-per-device = 1\npresence-lookup-burst-per-device = 2\n"
        )
    })
    .await;
    let node1 = c.nodes[0].client_addr.to_string();
    let alice = register(&node1, &c.dirs[0], "+15550003201").await;
    let bob = register(&node1, &c.dirs[0], "+15550003202").await;
    let mut messaging = MessagingClient::new(crate::support::channel(&node1).await);
    let send = |n: u64, content: Option<events::Content>| {
        authed(
            &alice,
            SendRequest {
                client_msg_id: format!("m-{n}"),
                to_user: bob.user,
                content,
            },
        )
    };
    for n in 0..5_u64 {
        let oversize = Some(events::Content {
            body: vec![0; 2048],
            media: None,
        });
        let status = messaging
            .send(send(n, oversize))
            .await
            .expect_err("oversize");
        assert_eq!(
            code_of(&status),
            "COURIER:Wire:TooLong",
            "send {n}: {status:?}"
        );
    }
    for n in 10..12_u64 {
        messaging
            .send(send(n, body("hi")))
            .await
            .expect("the burst is whole after refused sends");
    }
    let lookup = |users: Vec<u64>| authed(&alice, GetPresenceRequest { users });
    for n in 0..5 {
        let status = messaging
            .get_presence(lookup(vec![alice.user, 0]))
            .await
            .expect_err("a zero user id");
        assert_eq!(
            code_of(&status),
            "COURIER:Wire:Zero",
            "lookup {n}: {status:?}"
        );
    }
    for n in 0..2 {
        messaging
            .get_presence(lookup(vec![alice.user]))
            .await
            .unwrap_or_else(|status| panic!("lookup {n}: the burst is whole: {status:?}"));
    }
    for node in c.nodes {
        node.stop().await;
    }
}

/// Group changes and pairings are rate-limited like sends: past `group-change-burst-per-device`
/// a device's group changes are refused as `RateLimited` (a change is a log entry on the group's
/// shard), and past `pairing-burst-per-address` so are `StartPairing` calls from one address (a
/// pairing needs no login and holds one of the node's pairing slots). Past `pairings-max`
/// outstanding pairings a node refuses more (`Pairing:TooMany`); each lives `pairing-ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_changes_and_pairings_are_rate_limited() {
    use crate::messaging::{authed, register};
    use courier_proto::pb::client::groups_client::GroupsClient;
    use courier_proto::pb::client::registration_client::RegistrationClient;
    use courier_proto::pb::client::{
        AddMemberRequest, CreateGroupRequest, LeaveGroupRequest, StartPairingRequest,
    };

    let c = cluster_configured(&|text| {
        format!(
            "{text}\n[limits]\ngroup-changes-per-hour-per-device = 1\ngroup-change-burst-per-device = 2\npairings-per-hour-per-address = 1\npairing-burst-per-address = 3\npairings-max = 2\npairing-ttl = \"45s\"\n"
        )
    })
    .await;
    let node1 = c.nodes[0].client_addr.to_string();
    let alice = register(&node1, &c.dirs[0], "+15550003301").await;
    let bob = register(&node1, &c.dirs[0], "+15550003302").await;
    let carol = register(&node1, &c.dirs[0], "+15550003303").await;
    let mut groups = GroupsClient::new(crate::support::channel(&node1).await);
    let group = groups
        .create_group(authed(
            &alice,
            CreateGroupRequest {
                name: "g".to_owned(),
                members: vec![bob.user],
            },
        ))
        .await
        .expect("first change")
        .into_inner()
        .group_id;
    groups
        .add_member(authed(
            &alice,
            AddMemberRequest {
                group_id: group,
                user_id: carol.user,
            },
        ))
        .await
        .expect("second change");
    let limited = groups
        .leave_group(authed(&alice, LeaveGroupRequest { group_id: group }))
        .await
        .expect_err("the third change is past the burst");
    assert_eq!(
        code_of(&limited),
        "COURIER:Limits:RateLimited",
        "{limited:?}"
    );
    groups
        .leave_group(authed(&bob, LeaveGroupRequest { group_id: group }))
        .await
        .expect("another device has its own bucket");

    let mut registration = RegistrationClient::new(crate::support::channel(&node1).await);
    let start = || StartPairingRequest {
        device_name: "tablet".to_owned(),
    };
    for n in 0..2 {
        let started = registration
            .start_pairing(start())
            .await
            .unwrap_or_else(|status| panic!("pairing {n}: {status:?}"))
            .into_inner();
        assert_eq!(started.expires_in_s, 45, "pairing-ttl");
    }
    let full = registration
        .start_pairing(start())
        .await
        .expect_err("two pairings are outstanding: the node holds no more");
    assert_eq!(code_of(&full), "COURIER:Pairing:TooMany", "{full:?}");
    let limited = registration
        .start_pairing(start())
        .await
        .expect_err("the fourth pairing from one address is past the burst");
    assert_eq!(
        code_of(&limited),
        "COURIER:Limits:RateLimited",
        "{limited:?}"
    );
    for node in c.nodes {
        node.stop().await;
    }
}

/// `GetPresence` tells nothing about a stranger (no shared conversation or group), and is
/// rate-limited per device (defaults: 2 a second, bursts of 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_told_only_to_contacts_and_is_rate_limited() {
    use crate::messaging::{authed, register};
    use courier_proto::pb::client::GetPresenceRequest;
    use courier_proto::pb::client::messaging_client::MessagingClient;

    let c = cluster_configured(&|text| text).await;
    let node1 = c.nodes[0].client_addr.to_string();
    let alice = register(&node1, &c.dirs[0], "+15550002001").await;
    let stranger = register(&node1, &c.dirs[0], "+15550002002").await;
    let mut messaging = MessagingClient::new(crate::support::channel(&node1).await);
    let lookup = || {
        authed(
            &alice,
            GetPresenceRequest {
                users: vec![stranger.user, alice.user],
            },
        )
    };
    let answer = messaging
        .get_presence(lookup())
        .await
        .expect("answered")
        .into_inner();
    let told: Vec<u64> = answer.presence.iter().map(|p| p.user).collect();
    assert_eq!(told, vec![alice.user], "only the caller herself is told");
    let mut limited = None;
    for _ in 0..20 {
        if let Err(status) = messaging.get_presence(lookup()).await {
            limited = Some(status);
            break;
        }
    }
    let limited = limited.expect("a burst of lookups is limited");
    assert_eq!(
        limited.code(),
        tonic::Code::ResourceExhausted,
        "{limited:?}"
    );
    assert_eq!(code_of(&limited), "COURIER:Limits:RateLimited");
    for node in c.nodes {
        node.stop().await;
    }
}

/// "No such user" is no fast oracle: past the burst of sends to unknown users (default 10), a
/// device's sends to unknown users are refused as rate-limited, while sends to a real user go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_unknown_users_are_rate_limited() {
    use crate::messaging::{authed, body, register};
    use courier_proto::pb::client::SendRequest;
    use courier_proto::pb::client::messaging_client::MessagingClient;

    let c = cluster_configured(&|text| text).await;
    let node1 = c.nodes[0].client_addr.to_string();
    let alice = register(&node1, &c.dirs[0], "+15550003001").await;
    let mut messaging = MessagingClient::new(crate::support::channel(&node1).await);
    let send = |n: u64, to: u64| {
        authed(
            &alice,
            SendRequest {
                client_msg_id: format!("probe-{n}"),
                to_user: to,
                content: body("anyone?"),
            },
        )
    };
    let mut answers = Vec::new();
    for n in 0..12_u64 {
        let status = messaging
            .send(send(n, 0x7777_0000 + n))
            .await
            .expect_err("no such user");
        answers.push(code_of(&status));
    }
    assert!(
        answers[..10]
            .iter()
            .all(|code| code == "COURIER:Messaging:UnknownRecipient"),
        "{answers:?}"
    );
    assert_eq!(answers[11], "COURIER:Limits:RateLimited", "{answers:?}");
    messaging
        .send(send(100, alice.user))
        .await
        .expect("a send to a registered user is not limited by it");
    for node in c.nodes {
        node.stop().await;
    }
}

/// Putting users in groups is no faster oracle of who is registered than sending to them: an
/// unknown user named in `CreateGroup` or `AddMember` costs the same per-device token as a send
/// to one, and `AddMember` on a group that does not exist answers `Group:NotFound` whoever the
/// user is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_changes_naming_unknown_users_are_rate_limited_like_sends() {
    use crate::messaging::{authed, create_group, register};
    use courier_proto::pb::client::groups_client::GroupsClient;
    use courier_proto::pb::client::{AddMemberRequest, CreateGroupRequest};

    let c = cluster_configured(&|text| text).await;
    let node1 = c.nodes[0].client_addr.to_string();
    let alice = register(&node1, &c.dirs[0], "+15550003101").await;
    let bob = register(&node1, &c.dirs[0], "+15550003102").await;
    let mut groups = GroupsClient::new(crate::support::channel(&node1).await);
    let status = groups
        .add_member(authed(
            &alice,
            AddMemberRequest {
                group_id: 0x5eed_0001,
                user_id: 0x7777_1000,
            },
        ))
        .await
        .expect_err("no such group");
    assert_eq!(code_of(&status), "COURIER:Group:NotFound", "{status:?}");
    let group = create_group(&node1, &alice, vec![bob.user]).await;
    let mut answers = Vec::new();
    for n in 0..12_u64 {
        let status = if n % 2 == 0 {
            groups
                .create_group(authed(
                    &alice,
                    CreateGroupRequest {
                        name: format!("probe-{n}"),
                        members: vec![0x7777_2000 + n],
                    },
                ))
                .await
                .expect_err("no such user")
        } else {
            groups
                .add_member(authed(
                    &alice,
                    AddMemberRequest {
                        group_id: group,
                        user_id: 0x7777_3000 + n,
                    },
                ))
                .await
                .expect_err("no such user")
        };
        answers.push(code_of(&status));
    }
    assert!(
        answers[..10]
            .iter()
            .all(|code| code == "COURIER:Messaging:UnknownRecipient"),
        "{answers:?}"
    );
    assert_eq!(answers[11], "COURIER:Limits:RateLimited", "{answers:?}");
    for node in c.nodes {
        node.stop().await;
    }
}

/// A companion cannot link itself: a pairing gives nothing until the user's primary device
/// approves its code; a companion's token cannot approve; a wrong code approves nothing; the
/// credential is handed out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_companion_links_only_with_the_primarys_approval() {
    use crate::messaging::{authed, link_tablet, register};
    use courier_proto::pb::client::registration_client::RegistrationClient;
    use courier_proto::pb::client::{
        ApprovePairingRequest, FinishPairingRequest, ListDevicesRequest, StartPairingRequest,
    };

    let c = cluster_configured(&|text| text).await;
    let node1 = c.nodes[0].client_addr.to_string();
    let owner = register(&node1, &c.dirs[0], "+15550004001").await;
    let tablet = link_tablet(&node1, &owner).await;
    let mut registration = RegistrationClient::new(crate::support::channel(&node1).await);
    let pairing = registration
        .start_pairing(StartPairingRequest {
            device_name: "intruder".to_owned(),
        })
        .await
        .expect("anyone may start a pairing")
        .into_inner();
    let finish = || FinishPairingRequest {
        pairing_id: pairing.pairing_id.clone(),
    };
    let early = registration
        .finish_pairing(finish())
        .await
        .expect_err("nothing before the approval");
    assert_eq!(code_of(&early), "COURIER:Pairing:NotApproved", "{early:?}");
    let by_companion = registration
        .approve_pairing(authed(
            &tablet,
            ApprovePairingRequest {
                code: pairing.code.clone(),
            },
        ))
        .await
        .expect_err("a companion cannot approve");
    assert_eq!(code_of(&by_companion), "COURIER:Pairing:NotPrimary");
    let wrong = registration
        .approve_pairing(authed(
            &owner,
            ApprovePairingRequest {
                code: "AAAAAAAA".to_owned(),
            },
        ))
        .await
        .expect_err("a wrong code approves nothing");
    assert_eq!(code_of(&wrong), "COURIER:Pairing:Unknown");
    let devices = |registration: &mut RegistrationClient<Channel>| {
        let request = authed(&owner, ListDevicesRequest {});
        let mut registration = registration.clone();
        async move {
            registration
                .list_devices(request)
                .await
                .expect("devices")
                .into_inner()
                .devices
                .len()
        }
    };
    assert_eq!(
        devices(&mut registration).await,
        2,
        "nothing registered without approval"
    );
    registration
        .approve_pairing(authed(
            &owner,
            ApprovePairingRequest {
                code: pairing.code.clone(),
            },
        ))
        .await
        .expect("the primary approves");
    let credential = registration
        .finish_pairing(finish())
        .await
        .expect("collected after the approval")
        .into_inner();
    assert_eq!(credential.user_id, owner.user);
    let again = registration
        .finish_pairing(finish())
        .await
        .expect_err("handed out once");
    assert_eq!(code_of(&again), "COURIER:Pairing:Unknown");
    assert_eq!(devices(&mut registration).await, 3);
    for node in c.nodes {
        node.stop().await;
    }
}

/// Without `sms.dev-outbox` a node writes no number or code anywhere: `RequestCode` answers
/// `UNAVAILABLE COURIER:Registration:SmsFailed`, no file appears, and no usable code is left
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sms_outbox_unless_configured() {
    use courier_proto::pb::client::registration_client::RegistrationClient;
    use courier_proto::pb::client::{RegisterRequest, RequestCodeRequest};

    let c = cluster_configured(&|text| {
        text.lines()
            .filter(|line| !line.starts_with("dev-outbox"))
            .collect::<Vec<_>>()
            .join("\n")
    })
    .await;
    let node1 = c.nodes[0].client_addr.to_string();
    let mut registration = RegistrationClient::new(crate::support::channel(&node1).await);
    let failed = registration
        .request_code(RequestCodeRequest {
            phone_number: "+15550005001".to_owned(),
        })
        .await
        .expect_err("no SMS sender");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert_eq!(code_of(&failed), "COURIER:Registration:SmsFailed");
    assert!(
        !c.dirs[0].join("sms-outbox.log").exists(),
        "no outbox file is written"
    );
    for code in ["000000", "123456"] {
        let refused = registration
            .register(RegisterRequest {
                phone_number: "+15550005001".to_owned(),
                code: code.to_owned(),
                device_name: "phone".to_owned(),
            })
            .await
            .expect_err("no usable code was left behind");
        assert_eq!(code_of(&refused), "COURIER:Registration:BadCode");
    }
    for node in c.nodes {
        node.stop().await;
    }
}

/// A device holds at most `limits.streams-per-device-max` (default 4) streams on a node; one
/// more is refused with `COURIER:Limits:StreamsPerDevice`, and a slot frees when a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_device_are_capped() {
    use crate::messaging::{authed, open_stream, register};
    use courier_proto::pb::client::messaging_client::MessagingClient;
    use courier_proto::pb::client::{ClientFrame, Open, client_frame};

    let c = cluster_configured(&|text| text).await;
    let node1 = c.nodes[0].client_addr.to_string();
    let phone = register(&node1, &c.dirs[0], "+15550006001").await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(open_stream(&node1, &phone, 0).await);
    }
    let fifth = || async {
        let (out, rx) = tokio::sync::mpsc::channel(1);
        out.send(ClientFrame {
            frame: Some(client_frame::Frame::Open(Open::default())),
        })
        .await
        .expect("open frame");
        let result = MessagingClient::new(crate::support::channel(&node1).await)
            .stream(authed(
                &phone,
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await;
        (result, out)
    };
    let (refused, _out) = fifth().await;
    let refused = refused.expect_err("a fifth stream of one device is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(code_of(&refused), "COURIER:Limits:StreamsPerDevice");
    drop(open.pop());
    let started = std::time::Instant::now();
    loop {
        let (result, out) = fifth().await;
        if result.is_ok() {
            drop(out);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a slot frees once a stream ends"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in c.nodes {
        node.stop().await;
    }
}

/// A connection that never finishes its TLS handshake does not hold a slot under the connection
/// cap: it is dropped after `limits.tls-handshake-timeout`, and a real client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_handshake_does_not_hold_a_connection_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{}\n[limits]\nconnections-max = 1\ntls-handshake-timeout = \"300ms\"\n",
        crate::support::config_text(1, dir.path())
    );
    let node = courier_node::start(courier_node::Config::parse(&text).expect("config"))
        .await
        .expect("start");
    let client = node.client_addr.to_string();
    let silent = tokio::net::TcpStream::connect(&client)
        .await
        .expect("a TCP connection that says nothing");
    let started = std::time::Instant::now();
    crate::support::wait_served(
        &client,
        Duration::from_secs(5),
        "the silent connection still holds the only slot",
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "the slot was held until the handshake deadline ({:?})",
        started.elapsed()
    );
    drop(silent);
    node.stop().await;
}

/// Phone numbers are hashed under a key only the cluster holds: a cluster that generated its
/// own key registers a number as neither the public (unkeyed) hash's user nor another key's,
/// and stores neither's phone hash in its log; a malformed key is refused before anything is
/// created; a cluster never takes another key, and a retried init without one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_numbers_hash_under_a_key_only_the_cluster_holds() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("n1");
    let config =
        courier_node::Config::parse(&crate::support::config_text(1, &dir)).expect("config");
    let node = courier_node::start(config).await.expect("start");
    let peers = vec![node.peer_addr.to_string()];
    let mut admin = AdminClient::new(peer_channel(&peers[0]).await);

    let short = admin
        .init_cluster(init_request(&peers, vec![1; 5]))
        .await
        .expect_err("a 5-byte key");
    assert_eq!(short.code(), tonic::Code::InvalidArgument);
    assert_eq!(code_of(&short), "COURIER:Cluster:PhoneKey");
    assert!(
        status(&peers[0]).await.shards.is_empty(),
        "a refused init creates nothing"
    );

    admin
        .init_cluster(init_request(&peers, Vec::new()))
        .await
        .expect("init with a generated key");
    wait_leaders(&peers, Duration::from_secs(20)).await;
    let phone = "+15550009999";
    let device = register(&node.client_addr.to_string(), &dir, phone).await;
    assert_ne!(device.user, user_of(phone).get(), "another cluster's key");
    assert_ne!(
        device.user,
        PhoneHasher::Unkeyed.user_of_phone(phone).get(),
        "the public hash"
    );
    let shard = shard_of(
        UserId::new(device.user).expect("id"),
        u16::try_from(SHARDS).expect("small"),
    );
    let stored: Vec<Vec<u8>> = log_events(&peers[0], u32::from(shard.get()))
        .await
        .into_iter()
        .filter_map(|event| match event.kind {
            Some(Kind::UserRegistered(registered)) => Some(registered.phone_hash),
            _ => None,
        })
        .collect();
    assert_eq!(stored.len(), 1, "one registration in the log");
    for (hasher, name) in [
        (PhoneHasher::Unkeyed, "public"),
        (PhoneHasher::Keyed(PhoneKey::new(PHONE_KEY)), "other key's"),
    ] {
        assert_ne!(
            stored[0],
            hasher.phone_hash(phone).to_vec(),
            "the {name} hash"
        );
    }

    let other = admin
        .init_cluster(init_request(&peers, PHONE_KEY.to_vec()))
        .await
        .expect_err("another key");
    assert_eq!(other.code(), tonic::Code::FailedPrecondition);
    assert_eq!(code_of(&other), "COURIER:Cluster:AlreadyInitialized");
    let again = admin
        .init_cluster(init_request(&peers, Vec::new()))
        .await
        .expect("a retry without a key")
        .into_inner();
    assert!(again.already_initialized);
    let same = register(&node.client_addr.to_string(), &dir, phone).await;
    assert_eq!(same.user, device.user, "the key did not change");
}

/// Two approvals racing on two nodes cannot pass `companion-devices-max` together: each node
/// checks before proposing, and the registration is checked again when it applies, so of two
/// approvals for the last slot one links a companion and the other answers
/// `RESOURCE_EXHAUSTED COURIER:Registration:TooManyCompanions`, round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_racing_on_two_nodes_link_one_companion_past_the_limit() {
    use crate::messaging::{authed, register};
    use courier_proto::pb::client::registration_client::RegistrationClient;
    use courier_proto::pb::client::{
        ApprovePairingRequest, ListDevicesRequest, RevokeDeviceRequest, StartPairingRequest,
    };

    let c =
        cluster_configured(&|text| format!("{text}\n[limits]\ncompanion-devices-max = 1\n")).await;
    let addrs: Vec<String> = c.nodes[..2]
        .iter()
        .map(|node| node.client_addr.to_string())
        .collect();
    let owner = register(&addrs[0], &c.dirs[0], "+15550004501").await;
    let mut clients = Vec::new();
    for addr in &addrs {
        clients.push(RegistrationClient::new(crate::support::channel(addr).await));
    }
    for round in 0..4 {
        let mut codes = Vec::new();
        for client in &mut clients {
            codes.push(
                client
                    .start_pairing(StartPairingRequest {
                        device_name: "tablet".to_owned(),
                    })
                    .await
                    .expect("start")
                    .into_inner()
                    .code,
            );
        }
        let approve = |i: usize| {
            let mut client = clients[i].clone();
            let request = authed(
                &owner,
                ApprovePairingRequest {
                    code: codes[i].clone(),
                },
            );
            async move { client.approve_pairing(request).await }
        };
        let (first, second) = tokio::join!(approve(0), approve(1));
        // The node that linked shows the companion at once (it waits for its replica).
        let (on, linked, refused) = match (first, second) {
            (Ok(linked), Err(refused)) => (0, linked, refused),
            (Err(refused), Ok(linked)) => (1, linked, refused),
            other => panic!("round {round}: one approval links, one is refused: {other:?}"),
        };
        assert_eq!(
            code_of(&refused),
            "COURIER:Registration:TooManyCompanions",
            "round {round}: {refused:?}"
        );
        let companions = |client: &RegistrationClient<Channel>| {
            let mut client = client.clone();
            let request = authed(&owner, ListDevicesRequest {});
            async move {
                let devices = client
                    .list_devices(request)
                    .await
                    .expect("devices")
                    .into_inner()
                    .devices;
                devices.iter().filter(|d| !d.primary && !d.revoked).count()
            }
        };
        assert_eq!(companions(&clients[on]).await, 1, "round {round}");
        clients[on]
            .revoke_device(authed(
                &owner,
                RevokeDeviceRequest {
                    device_id: linked.into_inner().device_id,
                },
            ))
            .await
            .expect("the slot is freed for the next round");
        // Both nodes' checks before proposing must see the slot free again.
        let started = std::time::Instant::now();
        for client in &clients {
            while companions(client).await != 0 {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "round {round}: the revocation reaches both nodes"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    for node in c.nodes {
        node.stop().await;
    }
}
