//! The node starts for real: gRPC health answers SERVING, reflection lists every courier service,
//! unimplemented RPCs say UNIMPLEMENTED, a data directory in use is refused, and SIGTERM stops
//! the process cleanly.

use std::time::Duration;

use courier_proto::pb::client::groups_client::GroupsClient;
use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{CreateGroupRequest, SendRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::{NodeProcess, channel, config_text, peer_channel, pki, wait_addrs};

const CLIENT_SERVICES: [&str; 3] = [
    "courier.client.v1.Registration",
    "courier.client.v1.Messaging",
    "courier.client.v1.Groups",
];
const PEER_SERVICES: [&str; 3] = [
    "courier.peer.v1.Raft",
    "courier.peer.v1.Forward",
    "courier.peer.v1.Admin",
];

/// A phone's channel to a client address, an operator's to a peer address.
async fn channel_to(addr: &str, peer: bool) -> tonic::transport::Channel {
    if peer {
        peer_channel(addr).await
    } else {
        channel(addr).await
    }
}

async fn list_services(addr: &str, peer: bool) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel_to(addr, peer).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("a response")
        .expect("one message");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn health(addr: &str, peer: bool, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel_to(addr, peer).await);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner();
    response.status()
}

async fn assert_serves(client: &str, peer: &str) {
    for (addr, services) in [(client, CLIENT_SERVICES), (peer, PEER_SERVICES)] {
        let is_peer = addr == peer;
        assert_eq!(
            health(addr, is_peer, "").await,
            ServingStatus::Serving,
            "{addr} overall"
        );
        let listed = list_services(addr, is_peer).await;
        for service in services {
            assert!(
                listed.iter().any(|s| s == service),
                "{addr} lists {service}: {listed:?}"
            );
            assert_eq!(
                health(addr, is_peer, service).await,
                ServingStatus::Serving,
                "{service}"
            );
        }
        assert!(
            listed.iter().any(|s| s == "grpc.health.v1.Health"),
            "{listed:?}"
        );
        let other = if services == CLIENT_SERVICES {
            PEER_SERVICES
        } else {
            CLIENT_SERVICES
        };
        for service in other {
            assert!(
                !listed.iter().any(|s| s == service),
                "{addr} does not list {service}"
            );
        }
    }
}

/// In-process node on port 0: health, reflection, UNIMPLEMENTED, and a second open of the same
/// data directory refused.
#[tokio::test]
async fn node_serves_health_and_reflection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = courier_node::Config::parse(&config_text(1, dir.path())).expect("config");
    let node = courier_node::start(config.clone())
        .await
        .expect("node starts");
    let (client, peer) = (node.client_addr.to_string(), node.peer_addr.to_string());
    assert_serves(&client, &peer).await;

    {
        tracing::info!("group calls without a token are refused before anything else");
        let mut groups = GroupsClient::new(channel(&client).await);
        let status = groups
            .create_group(CreateGroupRequest::default())
            .await
            .expect_err("no token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        tracing::info!("a send without a token is refused before anything else");
        let mut messaging = MessagingClient::new(channel(&client).await);
        let status = messaging
            .send(SendRequest::default())
            .await
            .expect_err("no token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    {
        tracing::info!("a second node on the same data directory is refused with a clear error");
        let err = courier_node::start(config)
            .await
            .expect_err("data dir in use");
        assert!(err.to_string().to_lowercase().contains("lock"), "{err}");
    }
    node.stop().await;
}

/// Three real `courier-node` processes answer health and reflection, and each stops cleanly on
/// SIGTERM.
#[tokio::test]
async fn three_node_processes_serve_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<NodeProcess> = (1..=3)
        .map(|id| NodeProcess::start(id, dir.path()))
        .collect();
    for node in &nodes {
        let addrs = wait_addrs(&node.data_dir, Duration::from_secs(20));
        assert_serves(&addrs.client, &addrs.peer).await;
    }
    for node in &mut nodes {
        let status = node.terminate(Duration::from_secs(15));
        assert!(status.success(), "clean exit on SIGTERM: {status}");
    }
    let log = std::fs::read_to_string(dir.path().join("node1.log")).expect("log");
    let first = log.lines().next().expect("a log line");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("structured (JSON) logs");
    assert!(parsed.get("level").is_some(), "{first}");
}

/// One node in a fresh directory (returned, to live as long as the node) with `limits` (lines
/// of the `[limits]` table) added to its configuration.
async fn start_with_limits(limits: &str) -> (tempfile::TempDir, courier_node::NodeHandle) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!("{}\n[limits]\n{limits}\n", config_text(1, dir.path()));
    let node = courier_node::start(courier_node::Config::parse(&text).expect("config"))
        .await
        .expect("start");
    (dir, node)
}

/// A new connection with `tls` to `node`'s `listener` ("client" or "peer") is refused at once,
/// not served or left waiting, and the refusal is counted.
async fn assert_refused_at_once(
    node: &courier_node::NodeHandle,
    listener: &str,
    tls: tonic::transport::ClientTlsConfig,
) {
    let addr = match listener {
        "client" => node.client_addr,
        _ => node.peer_addr,
    };
    let extra = tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy();
    let waited = tokio::time::timeout(
        Duration::from_secs(5),
        HealthClient::new(extra).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await;
    assert!(
        waited.as_ref().is_ok_and(Result::is_err),
        "the {listener} connection was refused at once, not served or left waiting: {waited:?}"
    );
    let metrics = crate::support::scrape(node.metrics_addr.expect("metrics")).await;
    let counter = format!("courier_connections_refused_total{{listener=\"{listener}\"}}");
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with(&counter) && !line.ends_with(" 0")),
        "the refusal is counted: {metrics}"
    );
}

/// The peer listener holds at most `limits.peer-connections-max` connections: with one open, a
/// second operator connection is refused at once, and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_connections_are_capped() {
    let (_dir, node) =
        start_with_limits("peer-connections-max = 1\npeer-streams-per-connection-max = 8").await;
    let peer = node.peer_addr.to_string();
    let health_check = || HealthCheckRequest {
        service: String::new(),
    };
    let mut held = HealthClient::new(peer_channel(&peer).await);
    held.check(health_check()).await.expect("served");
    assert_refused_at_once(
        &node,
        "peer",
        crate::support::peer_tls(courier_tls::dev::OPERATOR),
    )
    .await;
    held.check(health_check())
        .await
        .expect("the first is still served");
    node.stop().await;
}

/// The client listener holds at most `limits.connections-max` connections: a third client is
/// refused at once (not left waiting) while two are open, and is served once one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_capped() {
    let (_dir, node) = start_with_limits("connections-max = 2").await;
    let client = node.client_addr.to_string();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut health = HealthClient::new(channel(&client).await);
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("served");
        held.push(health);
    }
    tracing::info!("a third connection is refused at once while two are open");
    assert_refused_at_once(
        &node,
        "client",
        courier_tls::phone(&pki().join(courier_tls::dev::CA_FILE), "localhost").expect("test CA"),
    )
    .await;
    {
        tracing::info!("once the two close, a new connection is served");
        drop(held);
        // The server frees a connection's slot when it sees the close, a moment after the
        // client's: a client refused meanwhile tries again, as any client would.
        crate::support::wait_served(
            &client,
            Duration::from_secs(10),
            "served after connections closed",
        )
        .await;
    }
    node.stop().await;
}
