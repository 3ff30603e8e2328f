//! Commands against a running node over gRPC.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Connect deadline for one attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts while waiting for health.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))
        .with_context(|| format!("{addr:?} is not host:port"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

async fn check(addr: &str) -> anyhow::Result<ServingStatus> {
    let mut client = HealthClient::new(channel(addr).await?);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Prints and returns whether `addr` is SERVING, retrying for up to `wait`.
///
/// # Errors
/// A connection error once `wait` has passed.
pub(crate) async fn health(addr: &str, wait: Duration) -> anyhow::Result<bool> {
    let started = Instant::now();
    loop {
        match check(addr).await {
            Ok(ServingStatus::Serving) => {
                println!("{addr} SERVING");
                return Ok(true);
            }
            Ok(status) if started.elapsed() >= wait => {
                println!("{addr} {}", status.as_str_name());
                return Ok(false);
            }
            Err(error) if started.elapsed() >= wait => return Err(error),
            _ => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

/// Returns the services `addr` lists by reflection.
///
/// # Errors
/// Connection or protocol errors.
pub(crate) async fn services(addr: &str) -> anyhow::Result<Vec<String>> {
    let mut client = ServerReflectionClient::new(channel(addr).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    match stream.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => bail!("unexpected reflection answer: {other:?}"),
    }
}
