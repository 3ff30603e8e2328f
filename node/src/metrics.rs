//! Prometheus metrics over HTTP (`GET /metrics`, text exposition format 0.0.4) on
//! `listen.metrics`. Values are read at scrape time from the cluster status, so nothing is kept
//! twice: per shard the primary health gauges (apply lag, outbox length) plus role, term,
//! applied index and log fsyncs.
//!
//! The endpoint is deliberately small: one request per connection, at most
//! [`METRICS_CONNECTIONS_MAX`] at once, requests up to [`REQUEST_BYTES_MAX`], a read deadline.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;

/// Scrapes served at once.
pub const METRICS_CONNECTIONS_MAX: usize = 16;
/// Largest request read, bytes.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Deadline to read a request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders the metrics text.
pub fn render(cluster: &Cluster) -> String {
    let status = cluster.status();
    let mut out = String::new();
    let gauges: [(&str, &str, &str); 7] = [
        (
            "courier_shard_apply_lag_entries",
            "gauge",
            "log entries stored but not yet applied on this replica",
        ),
        (
            "courier_shard_outbox_len_entries",
            "gauge",
            "outbox entries not yet forwarded and trimmed",
        ),
        (
            "courier_shard_applied_index",
            "gauge",
            "last applied log index",
        ),
        ("courier_shard_term", "gauge", "current raft term"),
        (
            "courier_shard_is_leader",
            "gauge",
            "1 when this node leads the shard",
        ),
        (
            "courier_log_fsyncs_total",
            "counter",
            "log appends (one fsync each) since start",
        ),
        (
            "courier_log_entries_appended_total",
            "counter",
            "log entries appended since start",
        ),
    ];
    for (name, kind, help) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for shard in &status.shards {
            let value = match name {
                "courier_shard_apply_lag_entries" => shard.apply_lag,
                "courier_shard_outbox_len_entries" => shard.outbox_len_entries,
                "courier_shard_applied_index" => shard.applied,
                "courier_shard_term" => shard.term,
                "courier_shard_is_leader" => u64::from(shard.role == "leader"),
                "courier_log_fsyncs_total" => shard.fsyncs,
                _ => shard.entries_appended,
            };
            let _ = writeln!(
                out,
                "{name}{{node=\"{}\",shard=\"{}\"}} {value}",
                status.node_id, shard.shard
            );
        }
    }
    out
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, cluster: Cluster, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(METRICS_CONNECTIONS_MAX));
    loop {
        // We never close the semaphore, so acquiring cannot fail.
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut request = vec![0_u8; REQUEST_BYTES_MAX];
            let Ok(Ok(read)) = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut request)).await
            else {
                return;
            };
            let head = String::from_utf8_lossy(&request[..read]);
            let response = if head.starts_with("GET /metrics ") {
                let body = render(&cluster);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
