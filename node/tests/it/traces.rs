//! Distributed tracing: three node processes export spans over OTLP to a collector this test
//! runs; one cross-shard send is one trace, from the client RPC on the node that took it to the
//! push on the recipient's stream on another node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_proto::pb::client::messaging_client::MessagingClient;
use courier_proto::pb::client::{ClientFrame, Open, SendRequest, client_frame, server_frame};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{init, wait_leaders, with_fast_raft};
use crate::messaging::{authed, body, phones_on_different_shards, register};
use crate::support::{NodeProcess, channel, config_on_ports, free_port, wait_addrs};

/// One exported span: (trace id, span name, the exporting node).
type Seen = (Vec<u8>, String, String);

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let node = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((span.trace_id, span.name, node.clone()));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_is_one_trace_across_nodes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = listener.local_addr().expect("addr");
    {
        let collector = collector.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
    }
    let root = tempfile::tempdir().expect("tempdir");
    let ports: BTreeMap<u64, (u16, u16)> =
        (1..=3).map(|id| (id, (free_port(), free_port()))).collect();
    let make_config = |id: u64, dir: &std::path::Path| {
        let (client, peer) = ports[&id];
        format!(
            "{}\n[tracing]\notlp-endpoint = \"http://{otlp}\"\n",
            with_fast_raft(config_on_ports(id, dir, client, peer))
        )
    };
    let procs: Vec<NodeProcess> = (1..=3)
        .map(|id| NodeProcess::start_with(id, root.path(), &make_config))
        .collect();
    let addrs: Vec<_> = procs
        .iter()
        .map(|p| wait_addrs(&p.data_dir, Duration::from_secs(20)))
        .collect();
    let peers: Vec<String> = addrs.iter().map(|a| a.peer.clone()).collect();
    init(&peers).await;
    wait_leaders(&peers, Duration::from_secs(30)).await;

    let (alice_phone, bob_phone) = phones_on_different_shards();
    let alice = register(&addrs[0].client, &procs[0].data_dir, &alice_phone).await;
    let bob = register(&addrs[2].client, &procs[2].data_dir, &bob_phone).await;
    // Node 3's replica may apply Bob's registration a moment after the leader answered it.
    let started = Instant::now();
    let mut frames = loop {
        let (out, rx) = tokio::sync::mpsc::channel(4);
        out.send(ClientFrame {
            frame: Some(client_frame::Frame::Open(Open {
                resume_after_seq: 0,
                hide_last_seen: false,
                receipts_after_index: 0,
                receipts_after_position: Vec::new(),
            })),
        })
        .await
        .expect("open");
        match MessagingClient::new(channel(&addrs[2].client).await)
            .stream(authed(&bob, ReceiverStream::new(rx)))
            .await
        {
            Ok(stream) => break (stream.into_inner(), out),
            Err(status) if started.elapsed() < Duration::from_secs(5) => {
                tracing::info!(%status, "retrying the stream");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("stream: {status}"),
        }
    };
    MessagingClient::new(channel(&addrs[0].client).await)
        .send(authed(
            &alice,
            SendRequest {
                client_msg_id: "traced".to_owned(),
                to_user: bob.user,
                content: body("traced"),
            },
        ))
        .await
        .expect("send");
    let arrived = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = frames.0.message().await.expect("stream") {
            if matches!(frame.frame, Some(server_frame::Frame::Message(_))) {
                return;
            }
        }
    })
    .await;
    assert!(arrived.is_ok(), "Bob receives the message");

    let want = ["client.Send", "raft.commit", "forward.batch", "stream.push"];
    let started = Instant::now();
    loop {
        let spans = collector.spans.lock().expect("lock").clone();
        let send_traces: BTreeSet<Vec<u8>> = spans
            .iter()
            .filter(|(_, name, _)| name == "client.Send")
            .map(|(trace, _, _)| trace.clone())
            .collect();
        let complete = send_traces.iter().find_map(|trace| {
            let in_trace: Vec<&Seen> = spans.iter().filter(|(t, _, _)| t == trace).collect();
            let names: BTreeSet<&str> = in_trace.iter().map(|(_, n, _)| n.as_str()).collect();
            let nodes: BTreeSet<&str> = in_trace.iter().map(|(_, _, n)| n.as_str()).collect();
            (want.iter().all(|w| names.contains(w)) && nodes.len() >= 2).then_some((names, nodes))
        });
        if let Some((names, nodes)) = complete {
            tracing::info!(?names, ?nodes, "one trace");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no trace holds {want:?} from two nodes; exported: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
