//! The key directory (issue #24): one-time prekeys are handed out once even when fetches race
//! on different nodes; a device is told on its stream when its stock runs low; a new primary
//! device replaces the old one's keys.

use std::collections::BTreeSet;
use std::time::Duration;

use courier_proto::pb::client::keys_client::KeysClient;
use courier_proto::pb::client::{
    GetKeyCountRequest, GetPreKeyBundleRequest, OneTimePreKey, ServerFrame, SignedPreKey,
    UploadKeysRequest, server_frame,
};
use tonic::transport::Channel;

use crate::messaging::{
    Device, authed, cluster_appending, cluster_configured, code_of, collect, open_stream, register,
};
use crate::support::channel;

async fn keys(addr: &str) -> KeysClient<Channel> {
    KeysClient::new(channel(addr).await)
}

pub(crate) fn upload(ids: std::ops::Range<u32>) -> UploadKeysRequest {
    UploadKeysRequest {
        identity_key: vec![1; 33],
        signed_prekey: Some(SignedPreKey {
            key_id: 1,
            public_key: vec![2; 33],
            signature: vec![3; 64],
        }),
        one_time_prekeys: ids
            .map(|id| OneTimePreKey {
                key_id: id,
                public_key: id.to_be_bytes().repeat(8),
            })
            .collect(),
    }
}

/// The one-time prekey ids one fetch of `user`'s bundle got (one per device).
pub(crate) async fn fetch(
    addr: &str,
    by: &Device,
    user: u64,
) -> Result<Vec<Option<u32>>, tonic::Status> {
    let response = keys(addr)
        .await
        .get_pre_key_bundle(authed(by, GetPreKeyBundleRequest { user }))
        .await?
        .into_inner();
    Ok(response
        .devices
        .into_iter()
        .map(|d| {
            assert_eq!(d.identity_key, vec![1; 33], "the device's identity key");
            d.one_time_prekey.map(|k| k.key_id)
        })
        .collect())
}

pub(crate) fn keys_low(frames: &[ServerFrame]) -> Vec<u32> {
    frames
        .iter()
        .filter_map(|f| match &f.frame {
            Some(server_frame::Frame::KeysLow(low)) => Some(low.one_time_prekeys),
            _ => None,
        })
        .collect()
}

/// Bob publishes 30 one-time prekeys on node 1; alice fetches his bundle 24 times, 12 fetches at
/// once on node 2 and 12 on node 3: every fetch gets a different key, all of them bob's. Bob's
/// stream (node 1) is told when his stock falls below 10, and again as it falls further. A new
/// primary for bob's number takes his keys with the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_fetches_on_two_nodes_never_share_a_one_time_prekey() {
    // 24 fetches by one user of another: past the default per-pair limit (5 at once), which is
    // tested below.
    let c = cluster_appending(
        "[limits]\nprekey-fetches-per-hour-per-pair = 1000\nprekey-fetch-burst-per-pair = 100\n",
    )
    .await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.client_addr.to_string()).collect();
    let alice = register(&addrs[1], &c.dirs[1], "+15558880001").await;
    let bob = register(&addrs[0], &c.dirs[0], "+15558880002").await;
    let none = fetch(&addrs[0], &alice, bob.user)
        .await
        .expect_err("bob published nothing yet");
    assert_eq!(none.code(), tonic::Code::NotFound);
    assert_eq!(code_of(&none), "COURIER:Keys:NoKeys");
    let stored = keys(&addrs[0])
        .await
        .upload_keys(authed(&bob, upload(100..130)))
        .await
        .expect("upload")
        .into_inner();
    assert_eq!(stored.one_time_prekeys, 30);
    c.wait_converged().await;
    let mut bob_stream = open_stream(&addrs[0], &bob, 0).await;

    let mut fetches = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (addr, alice, user) = (addrs[1 + i % 2].clone(), alice.clone(), bob.user);
        fetches.spawn(async move { fetch(&addr, &alice, user).await });
    }
    let mut got = Vec::new();
    while let Some(result) = fetches.join_next().await {
        let bundle = result.expect("task").expect("a fetch");
        assert_eq!(bundle.len(), 1, "bob has one device with keys");
        got.push(bundle[0].expect("a one-time prekey while the stock lasts"));
    }
    let distinct: BTreeSet<u32> = got.iter().copied().collect();
    assert_eq!(distinct.len(), 24, "no key handed out twice: {got:?}");
    assert!(distinct.iter().all(|id| (100..130).contains(id)), "{got:?}");

    c.wait_converged().await;
    let count = keys(&addrs[2])
        .await
        .get_key_count(authed(&bob, GetKeyCountRequest {}))
        .await
        .expect("count")
        .into_inner();
    assert_eq!(count.one_time_prekeys, 6);
    let frames = collect(&mut bob_stream, Duration::from_secs(10), |frames| {
        keys_low(frames).contains(&6)
    })
    .await;
    let told = keys_low(&frames);
    assert!(told.contains(&6), "bob is told his stock is 6: {told:?}");
    assert!(
        told.iter().all(|stock| *stock < 10) && told.windows(2).all(|w| w[0] > w[1]),
        "told only below 10, each time lower: {told:?}"
    );

    // Bob's number registers a new primary: the old device and its keys leave.
    let _new_bob = register(&addrs[2], &c.dirs[2], "+15558880002").await;
    c.wait_converged().await;
    let gone = fetch(&addrs[1], &alice, bob.user)
        .await
        .expect_err("the new primary published nothing");
    assert_eq!(code_of(&gone), "COURIER:Keys:NoKeys");
    for node in c.nodes {
        node.stop().await;
    }
}

/// An upload past the stock limit, or with a key too large, is refused and changes nothing; one
/// user fetching another's bundle more than the per-pair burst (5) is refused with a retry hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_and_draining_fetches_are_refused() {
    let c = cluster_configured(&|text| text).await;
    let addr = c.nodes[0].client_addr.to_string();
    let bob = register(&addr, &c.dirs[0], "+15558880003").await;
    let mut client = keys(&addr).await;
    let mut too_big = upload(0..1);
    too_big.identity_key = vec![0; courier_proto::limits::PREKEY_BYTES_MAX + 1];
    let refused = client
        .upload_keys(authed(&bob, too_big))
        .await
        .expect_err("an oversized identity key");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(code_of(&refused), "COURIER:Wire:TooLong");
    for start in [0, 100] {
        client
            .upload_keys(authed(&bob, upload(start..start + 100)))
            .await
            .expect("within the stock of 200");
    }
    let full = client
        .upload_keys(authed(&bob, upload(500..501)))
        .await
        .expect_err("a 201st key");
    assert_eq!(full.code(), tonic::Code::ResourceExhausted);
    assert_eq!(code_of(&full), "COURIER:Keys:StockFull");
    let count = client
        .get_key_count(authed(&bob, GetKeyCountRequest {}))
        .await
        .expect("count")
        .into_inner();
    assert_eq!(count.one_time_prekeys, 200);
    let mallory = register(&addr, &c.dirs[0], "+15558880004").await;
    for _ in 0..5 {
        fetch(&addr, &mallory, bob.user)
            .await
            .expect("within the per-pair burst");
    }
    let drained = fetch(&addr, &mallory, bob.user)
        .await
        .expect_err("a sixth fetch of the same user");
    assert_eq!(drained.code(), tonic::Code::ResourceExhausted);
    assert_eq!(code_of(&drained), "COURIER:Limits:RateLimited");
    assert!(drained.metadata().get("retry-after-ms").is_some());
    c.wait_converged().await;
    let count = client
        .get_key_count(authed(&bob, GetKeyCountRequest {}))
        .await
        .expect("count")
        .into_inner();
    assert_eq!(
        count.one_time_prekeys, 195,
        "the refused fetch took nothing"
    );
    for node in c.nodes {
        node.stop().await;
    }
}
