//! Registration codes in the log (issue #24): a code asked of one node registers on another and
//! survives the first node's restart; wrong tries spread over every node use up one code's
//! attempts; the per-number limit holds across nodes; the per-address limit is each node's own.

use std::path::Path;
use std::time::Duration;

use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{RegisterRequest, RequestCodeRequest};
use tonic::transport::Channel;

use crate::cluster::Processes;
use crate::messaging::{cluster_configured, code_of};
use crate::support::channel;

async fn client(addr: &str) -> RegistrationClient<Channel> {
    RegistrationClient::new(channel(addr).await)
}

async fn ask(client: &mut RegistrationClient<Channel>, phone: &str) -> Result<(), tonic::Status> {
    client
        .request_code(RequestCodeRequest {
            phone_number: phone.to_owned(),
        })
        .await
        .map(drop)
}

async fn try_code(
    client: &mut RegistrationClient<Channel>,
    phone: &str,
    code: &str,
) -> Result<u64, tonic::Status> {
    client
        .register(RegisterRequest {
            phone_number: phone.to_owned(),
            code: code.to_owned(),
            device_name: "phone".to_owned(),
        })
        .await
        .map(|r| r.into_inner().user_id)
}

/// The last code the node with data directory `dir` sent to `phone` (dev SMS outbox).
fn last_code(dir: &Path, phone: &str) -> String {
    let outbox = std::fs::read_to_string(dir.join("sms-outbox.log")).expect("dev sms file");
    outbox
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{phone} ")))
        .expect("a code for the phone")
        .to_owned()
}

/// A code requested on node 1 registers on node 3 after node 1 was killed and restarted (the
/// code is in the log, not in node 1's memory), and only once: the same code on node 2 after
/// that is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_from_one_node_registers_on_another_after_a_restart() {
    let (mut cluster, _) = Processes::start_initialized(3).await;
    let phone = "+15556660001";
    let client_addr = |cluster: &Processes, i: usize| cluster.addrs[i].client.clone();
    ask(&mut client(&client_addr(&cluster, 0)).await, phone)
        .await
        .expect("a code from node 1");
    let code = last_code(&cluster.data_dir_of(1), phone);
    cluster.kill(0);
    cluster.restart(0);
    let user = try_code(&mut client(&client_addr(&cluster, 2)).await, phone, &code)
        .await
        .expect("node 3 takes the code node 1 issued");
    assert_eq!(user, crate::messaging::user_of(phone).get());
    crate::support::wait_served(
        &client_addr(&cluster, 0),
        Duration::from_secs(20),
        "node 1 back",
    )
    .await;
    let again = try_code(&mut client(&client_addr(&cluster, 1)).await, phone, &code)
        .await
        .expect_err("a code is used once");
    assert_eq!(code_of(&again), "COURIER:Registration:BadCode", "{again:?}");
    let on_restarted = try_code(&mut client(&client_addr(&cluster, 0)).await, phone, &code)
        .await
        .expect_err("also on the restarted node");
    assert_eq!(code_of(&on_restarted), "COURIER:Registration:BadCode");
}

/// Five wrong codes, tried on nodes 1, 2, 3, 1, 2, use up the code: the right one, on node 3,
/// is refused after that; a new code then registers (on node 2). The attempt bucket is raised
/// for this test so that the refusals come from the code, not from the rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_codes_over_three_nodes_void_the_code() {
    let c = cluster_configured(&|text| {
        format!(
            "{text}\n[limits]\nregister-attempts-per-hour-per-phone = 100\nregister-attempt-burst-per-phone = 20\n"
        )
    })
    .await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let phone = "+15556660002";
    ask(&mut client(&addrs[0]).await, phone)
        .await
        .expect("a code from node 1");
    let code = last_code(&c.dirs[0], phone);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let mut messages = Vec::new();
    for node in [0, 1, 2, 0, 1] {
        let refused = try_code(&mut client(&addrs[node]).await, phone, wrong)
            .await
            .expect_err("a wrong code");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(code_of(&refused), "COURIER:Registration:BadCode");
        messages.push(refused.message().to_owned());
    }
    assert!(
        messages[..4].iter().all(|m| m == "wrong code"),
        "{messages:?}"
    );
    assert!(messages[4].contains("no attempts left"), "{messages:?}");
    let late = try_code(&mut client(&addrs[2]).await, phone, &code)
        .await
        .expect_err("the right code, after five wrong ones anywhere");
    assert_eq!(code_of(&late), "COURIER:Registration:BadCode");
    ask(&mut client(&addrs[1]).await, phone)
        .await
        .expect("a new code from node 2");
    let fresh = last_code(&c.dirs[1], phone);
    try_code(&mut client(&addrs[1]).await, phone, &fresh)
        .await
        .expect("the new code registers");
    for node in c.nodes {
        node.stop().await;
    }
}

/// The per-address limit is each node's own (its memory), refuses with `TooManyCodes` and a
/// retry hint, and does not lock out other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_code_limit_refuses_on_its_node() {
    let c = cluster_configured(&|text| {
        format!(
            "{text}\n[limits]\ncode-requests-per-hour-per-address = 2\ncode-request-burst-per-address = 2\n"
        )
    })
    .await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let mut node1 = client(&addrs[0]).await;
    ask(&mut node1, "+15556660011").await.expect("first");
    ask(&mut node1, "+15556660012").await.expect("second");
    let refused = ask(&mut node1, "+15556660013")
        .await
        .expect_err("a third number from the same address");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(code_of(&refused), "COURIER:Registration:TooManyCodes");
    assert!(refused.message().contains("address"), "{refused:?}");
    assert!(
        refused.metadata().get("retry-after-ms").is_some(),
        "a retry hint"
    );
    ask(&mut client(&addrs[1]).await, "+15556660013")
        .await
        .expect("another node keeps its own count");
    for node in c.nodes {
        node.stop().await;
    }
}
