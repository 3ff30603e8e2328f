//! Registration of the workload's users: dev-mode codes read back from the nodes' SMS outbox,
//! a primary and a linked second device per user.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use courier_proto::pb::client::registration_client::RegistrationClient;
use courier_proto::pb::client::{
    ApprovePairingRequest, FinishPairingRequest, RegisterRequest, RegisterResponse,
    RequestCodeRequest, StartPairingRequest,
};
use tonic::transport::Channel;

use super::{Device, User, authed};
use crate::admin::{channel, describe};
use crate::nodes::NodeSpec;

fn device_of(response: &RegisterResponse, primary: bool) -> Device {
    Device {
        user: response.user_id,
        device: response.device_id,
        bearer: format!(
            "Bearer {}.{}.{}",
            response.user_id,
            response.device_id,
            crate::hex(&response.device_token)
        ),
        primary,
    }
}

/// [`register_one`] links a second device for every user (the history records it: the checker
/// then expects each send in its sender's inbox too).
pub const LINKS_A_SECOND_DEVICE: bool = true;

/// Registers `count` users (dev mode: codes are read from the issuing node's
/// `sms-outbox.log`), each with a primary and a linked second device, spread over the nodes:
/// user `i` asks node `i` for its code and registers through the next node (codes live in the
/// log, so any node takes them).
///
/// # Errors
///
/// A user could not be registered within a few attempts.
pub async fn register_users(specs: &[NodeSpec], count: u32) -> anyhow::Result<Vec<User>> {
    let mut users = Vec::new();
    for i in 0..count {
        let index = usize::try_from(i).unwrap_or(0) % specs.len().max(1);
        let spec = specs.get(index).context("no nodes")?;
        let registrar = specs.get((index + 1) % specs.len()).context("no nodes")?;
        let phone = format!("+155501{i:05}");
        let mut last_error = None;
        let mut registered = None;
        let sms = spec.data_dir().join("sms-outbox.log");
        for _attempt in 0..5 {
            let (issuer, taker) = (
                channel(&spec.client_addr())?,
                channel(&registrar.client_addr())?,
            );
            match register_one(issuer, taker, &sms, &phone).await {
                Ok(user) => {
                    registered = Some(user);
                    break;
                }
                Err(error) => {
                    tracing::debug!(%error, phone_index = i, "registration attempt failed");
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        match registered {
            Some(user) => users.push(user),
            None => bail!(
                "cannot register user {i} on node {}: {}",
                spec.id,
                last_error.map_or_else(String::new, |e| format!("{e:#}"))
            ),
        }
    }
    Ok(users)
}

/// Registers one user with a primary and a linked second device: the code is asked of the node
/// behind `issuer` (dev mode: read back from its SMS outbox file `sms`), and the registration
/// and pairing go through `registrar`, which may be another node.
///
/// # Errors
///
/// An RPC failed or timed out, or no code for `phone` is in the outbox.
pub async fn register_one(
    issuer: Channel,
    registrar: Channel,
    sms: &Path,
    phone: &str,
) -> anyhow::Result<User> {
    let timeout = Duration::from_secs(10);
    let request = RequestCodeRequest {
        phone_number: phone.to_owned(),
    };
    tokio::time::timeout(
        timeout,
        RegistrationClient::new(issuer).request_code(request),
    )
    .await
    .context("RequestCode timed out")?
    .map_err(|s| anyhow::anyhow!("RequestCode: {}", describe(&s)))?;
    let outbox = std::fs::read_to_string(sms).context("reading the dev SMS outbox")?;
    let code = outbox
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(&format!("{phone} ")))
        .context("no code for the number in the SMS outbox")?
        .trim()
        .to_owned();
    let mut client = RegistrationClient::new(registrar);
    let request = RegisterRequest {
        phone_number: phone.to_owned(),
        code,
        device_name: "primary".to_owned(),
    };
    let response = tokio::time::timeout(timeout, client.register(request))
        .await
        .context("Register timed out")?
        .map_err(|s| anyhow::anyhow!("Register: {}", describe(&s)))?
        .into_inner();
    let primary = device_of(&response, true);
    // The second device pairs: it starts, the primary approves its code, it collects its
    // credential.
    let pairing = tokio::time::timeout(
        timeout,
        client.start_pairing(StartPairingRequest {
            device_name: "second".to_owned(),
        }),
    )
    .await
    .context("StartPairing timed out")?
    .map_err(|s| anyhow::anyhow!("StartPairing: {}", describe(&s)))?
    .into_inner();
    let request = authed(&primary, ApprovePairingRequest { code: pairing.code })?;
    tokio::time::timeout(timeout, client.approve_pairing(request))
        .await
        .context("ApprovePairing timed out")?
        .map_err(|s| anyhow::anyhow!("ApprovePairing: {}", describe(&s)))?;
    let linked = tokio::time::timeout(
        timeout,
        client.finish_pairing(FinishPairingRequest {
            pairing_id: pairing.pairing_id,
        }),
    )
    .await
    .context("FinishPairing timed out")?
    .map_err(|s| anyhow::anyhow!("FinishPairing: {}", describe(&s)))?
    .into_inner();
    let second = device_of(&linked, false);
    Ok(User {
        id: primary.user,
        devices: vec![primary, second],
    })
}

/// Registers users on `specs` and writes their ids to `path` (for reading a history later).
///
/// # Errors
///
/// As [`register_users`], or the file cannot be written.
pub async fn register_and_save(
    specs: &[NodeSpec],
    count: u32,
    path: &Path,
) -> anyhow::Result<Vec<User>> {
    let users = register_users(specs, count).await?;
    let ids: Vec<serde_json::Value> = users
        .iter()
        .map(|u| {
            serde_json::json!({
                "user": u.id,
                "devices": u.devices.iter().map(|d| d.device).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&ids)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(users)
}
