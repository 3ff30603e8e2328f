//! Registration codes in the log (issue #24): a code asked of one node registers on another and
//! survives the first node's restart; wrong tries spread over every node use up one code's
//! attempts; the per-number limit holds across nodes; the per-address limit is each node's own.

use std::path::Path;
use std::time::Duration;

use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{RegisterRequest, RequestCodeRequest};
use tonic::transport::Channel;

use crate::cluster::Processes;
use crate::messaging::{cluster_appending, cluster_configured, code_of};
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

/// A code requested on node 1 registers on node 3 after node 1, and then every node, was killed
/// and restarted (the code is in the log, not in any node's memory), and only once: the same
/// code on node 2 after that is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_from_one_node_registers_on_another_after_a_restart() {
    let (mut cluster, _) = Processes::start_initialized(3).await;
    let phone = "+15556660001";
    let client_addr = |cluster: &Processes, i: usize| cluster.addrs[i].client.clone();
    ask(&mut client(&client_addr(&cluster, 0)).await, phone)
        .await
        .expect("a code from node 1");
    let code = last_code(&cluster.data_dir_of(1), phone);
    // Node 1 first, then the whole cluster: the code is on disk in the log, nowhere else.
    cluster.kill(0);
    cluster.restart(0);
    for index in 0..3 {
        cluster.kill(index);
    }
    for index in 0..3 {
        cluster.restart(index);
    }
    crate::cluster::wait_leaders(&cluster.peers, Duration::from_secs(30)).await;
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
    let c = cluster_appending("[limits]\nregister-attempts-per-hour-per-phone = 100\nregister-attempt-burst-per-phone = 20\n")
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
    let c = cluster_appending(
        "[limits]\ncode-requests-per-hour-per-address = 2\ncode-request-burst-per-address = 2\n",
    )
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

/// A stand-in SMS provider on 127.0.0.1: records each request's body and answers `status`.
struct Provider {
    addr: std::net::SocketAddr,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start(status: u16) -> Self {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut stream = tokio::io::BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if stream.read_exact(&mut body).await.is_err() {
                    continue;
                }
                seen.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&body).into_owned());
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.get_mut().write_all(answer.as_bytes()).await;
            }
        });
        Self { addr, bodies, task }
    }

    /// The code in the last request (the template is `code={code}&to={phone}`).
    fn last_code(&self) -> String {
        let bodies = self.bodies.lock().expect("lock");
        let body = bodies.last().expect("a request reached the provider");
        body.split('&')
            .find_map(|pair| pair.strip_prefix("code="))
            .expect("the templated code")
            .to_owned()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Nodes configured with an HTTP SMS provider (`[sms.http]`, no dev outbox) at `provider`.
async fn with_provider(provider: std::net::SocketAddr) -> crate::messaging::Cluster {
    let url = format!("http://{provider}/send");
    cluster_configured(&move |text| {
        let text: String = text
            .lines()
            .filter(|line| !line.starts_with("dev-outbox"))
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "{text}\n[sms.http]\nurl = \"{url}\"\nallow-http = true\ncontent-type = \"application/x-www-form-urlencoded\"\nbody-template = \"code={{code}}&to={{phone}}\"\nretries = 1\ntimeout-ms = 2000\n"
        )
    })
    .await
}

/// The HTTP provider gets the templated request on node 1; the code it carried registers on
/// node 2. When the provider fails (500, after its retry), `RequestCode` answers `SmsFailed`
/// and the code the provider saw is no longer usable anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_provider_carries_the_code_and_its_failure_leaves_none() {
    let ok = Provider::start(200).await;
    let c = with_provider(ok.addr).await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let phone = "+15556660021";
    ask(&mut client(&addrs[0]).await, phone)
        .await
        .expect("the provider took it");
    {
        let bodies = ok.bodies.lock().expect("lock");
        assert_eq!(bodies.len(), 1);
        assert!(
            bodies[0].ends_with("&to=%2B15556660021"),
            "the number, form-encoded: {}",
            bodies[0]
        );
    }
    try_code(&mut client(&addrs[1]).await, phone, &ok.last_code())
        .await
        .expect("the code the provider carried registers on node 2");
    for node in c.nodes {
        node.stop().await;
    }

    let failing = Provider::start(500).await;
    let c = with_provider(failing.addr).await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let failed = ask(&mut client(&addrs[0]).await, phone)
        .await
        .expect_err("the provider fails");
    assert_eq!(failed.code(), tonic::Code::Unavailable);
    assert_eq!(code_of(&failed), "COURIER:Registration:SmsFailed");
    assert!(failed.message().contains("500"), "{failed:?}");
    assert!(
        !failed.message().contains("5556660021"),
        "no number in the error: {failed:?}"
    );
    assert_eq!(
        failing.bodies.lock().expect("lock").len(),
        2,
        "one retry on a 500"
    );
    let leaked = failing.last_code();
    for addr in &addrs {
        let refused = try_code(&mut client(addr).await, phone, &leaked)
            .await
            .expect_err("a withdrawn code registers nowhere");
        assert_eq!(code_of(&refused), "COURIER:Registration:BadCode");
    }
    for node in c.nodes {
        node.stop().await;
    }
}

/// A used code's record leaves the log's state once nothing in it matters: with buckets that
/// refill within a millisecond, the shard leader's retention pass proposes
/// `RegistrationsForgotten` soon after the registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_registration_record_is_forgotten() {
    let c = cluster_appending("[limits]\ncode-requests-per-hour-per-phone = 3600000\nregister-attempts-per-hour-per-phone = 3600000\n[retention]\nscan-interval = \"200ms\"\n")
    .await;
    let addr = c.nodes[0].client_addr.to_string();
    let phone = "+15556660031";
    ask(&mut client(&addr).await, phone).await.expect("a code");
    try_code(
        &mut client(&addr).await,
        phone,
        &last_code(&c.dirs[0], phone),
    )
    .await
    .expect("registered");
    let shards = u16::try_from(crate::cluster::SHARDS).expect("small");
    let shard = courier_proto::shard_of(crate::messaging::user_of(phone), shards);
    let peer = c.nodes[0].peer_addr.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = crate::support::ops(&[
            "log",
            "dump",
            "--addr",
            &peer,
            "--shard",
            &shard.get().to_string(),
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let kinds: Vec<String> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON lines"))
            .filter_map(|v| v["event"].as_str().map(str::to_owned))
            .collect();
        if kinds.iter().any(|k| k == "RegistrationsForgotten") {
            assert!(kinds.iter().any(|k| k == "CodeIssued"), "{kinds:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no RegistrationsForgotten within 20 s: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for node in c.nodes {
        node.stop().await;
    }
}
