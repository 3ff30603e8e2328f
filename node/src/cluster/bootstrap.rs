//! Bootstrap: the metadata group and one group per shard, started with every member, their
//! first leaders spread over the members. Safe to retry with the same members.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_consensus::groups::GroupHandle;
use courier_consensus::types::{ClusterSettings, GroupId, NodeId};
use courier_proto::limits::SHARD_COUNT_MAX;
use courier_proto::pb::peer::{InitClusterRequest, InitClusterResponse};
use courier_proto::{PHONE_KEY_BYTES, PhoneKey, ShardId};
use tracing::info;

use super::{Cluster, internal, invalid, unavailable};
use crate::status::ApiError;

/// How long bootstrap waits for the metadata group to elect this node.
const INIT_LEADER_WAIT: Duration = Duration::from_secs(10);

/// The phone-hash key of a new cluster: the operator's (exactly [`PHONE_KEY_BYTES`] bytes), or
/// fresh random bytes when the request brings none.
fn phone_key(request: &InitClusterRequest) -> Result<PhoneKey, ApiError> {
    if request.phone_hash_key.is_empty() {
        return Ok(PhoneKey::new(crate::env::random_bytes()));
    }
    let bytes: [u8; PHONE_KEY_BYTES] =
        request.phone_hash_key.as_slice().try_into().map_err(|_| {
            invalid(
                "COURIER:Cluster:PhoneKey",
                format!(
                    "phone_hash_key must be {PHONE_KEY_BYTES} bytes or empty, got {}",
                    request.phone_hash_key.len()
                ),
            )
        })?;
    Ok(PhoneKey::new(bytes))
}

impl Cluster {
    /// Bootstraps a new cluster from this node: the metadata group with every member, the
    /// settings, and one raft group per shard with every member; then spreads shard leadership
    /// over the members. Safe to retry with the same members.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed member list or settings, `FAILED_PRECONDITION` when the
    /// cluster exists with other members, `UNAVAILABLE` when no leader emerges in time.
    pub async fn init(&self, request: InitClusterRequest) -> Result<InitClusterResponse, ApiError> {
        let members = self.validate_init(&request)?;
        let phone_key = phone_key(&request)?;
        let shard_count = u16::try_from(request.shard_count).expect("validated");
        if !request.init_shards.is_empty() {
            // A bootstrapping peer asks this node to start some shards as their first leader.
            for shard in &request.init_shards {
                let shard = ShardId::from_wire(*shard, shard_count)?;
                self.init_group(GroupId::Shard(shard), &members).await?;
            }
            return Ok(InitClusterResponse {
                already_initialized: false,
            });
        }
        let metadata = self.group(GroupId::Metadata).await?;
        let already = metadata
            .is_initialized()
            .await
            .map_err(|e| internal(e.to_string()))?;
        if already {
            let existing: BTreeSet<NodeId> = metadata.state().voters;
            let wanted: BTreeSet<NodeId> = members.keys().copied().collect();
            if existing != wanted {
                return Err(ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:AlreadyInitialized",
                    message: format!("the cluster exists with members {existing:?}"),
                });
            }
        } else {
            info!(members = ?members.keys().collect::<Vec<_>>(), shard_count, "initializing cluster");
            self.init_group(GroupId::Metadata, &members).await?;
        }
        self.wait_leader(&metadata).await?;
        let settings = ClusterSettings {
            shard_count,
            replication_factor: u16::try_from(members.len()).expect("validated"),
        };
        let (known, known_key) = {
            let view = metadata.applied.read().expect("applied view lock");
            (view.raft.settings, view.raft.phone_key)
        };
        let supplied_key = !request.phone_hash_key.is_empty();
        match known {
            Some(existing) if existing != settings => {
                return Err(ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:AlreadyInitialized",
                    message: format!("the cluster exists with {existing:?}"),
                });
            }
            Some(_) if supplied_key && known_key != Some(phone_key) => {
                // The key itself is never echoed, not even in part.
                return Err(ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:AlreadyInitialized",
                    message: "the cluster exists with another phone-hash key (a cluster never \
                              changes its key)"
                        .to_owned(),
                });
            }
            Some(_) => {}
            None => {
                metadata
                    .write_settings(settings, phone_key)
                    .await
                    .map_err(|e| unavailable(e.to_string(), None))?;
            }
        }
        self.init_shards(&request, shard_count, &members).await?;
        Ok(InitClusterResponse {
            already_initialized: already,
        })
    }

    /// Starts shard `i` on member `i mod N`, which becomes its first leader: leaders spread over
    /// the nodes from the start (the raft library has no leader transfer).
    async fn init_shards(
        &self,
        request: &InitClusterRequest,
        shard_count: u16,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), ApiError> {
        let nodes: Vec<(&NodeId, &String)> = members.iter().collect();
        let mut per_node: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for shard in 0..shard_count {
            let (id, _) = nodes[usize::from(shard) % nodes.len()];
            per_node.entry(*id).or_default().push(u32::from(shard));
        }
        for (id, shards) in per_node {
            let local = id == self.groups.node_id();
            let delegated = !local
                && self
                    .delegate_init(request, &members[&id], &shards)
                    .await
                    .is_ok();
            if !delegated {
                // This node, or a member that did not answer: start the shards here.
                for shard in shards {
                    let shard = ShardId::new(u16::try_from(shard).expect("below shard_count"));
                    self.init_group(GroupId::Shard(shard), members).await?;
                }
            }
        }
        Ok(())
    }

    async fn delegate_init(
        &self,
        request: &InitClusterRequest,
        addr: &str,
        shards: &[u32],
    ) -> Result<(), ApiError> {
        let mut client = self
            .peers
            .admin(addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let delegated = self.peers.request(InitClusterRequest {
            init_shards: shards.to_vec(),
            // Starting shards needs no key: it stays with the metadata group.
            phone_hash_key: Vec::new(),
            ..request.clone()
        });
        client.init_cluster(delegated).await.map_err(|status| {
            tracing::warn!(%addr, %status, "could not delegate shard start; starting here");
            unavailable(status.message().to_owned(), None)
        })?;
        Ok(())
    }

    async fn init_group(
        &self,
        group: GroupId,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), ApiError> {
        let handle = self.group(group).await?;
        if handle
            .is_initialized()
            .await
            .map_err(|e| internal(e.to_string()))?
        {
            return Ok(());
        }
        handle
            .initialize(members)
            .await
            .map_err(|e| internal(e.to_string()))
    }

    fn validate_init(
        &self,
        request: &InitClusterRequest,
    ) -> Result<BTreeMap<NodeId, String>, ApiError> {
        if request.members.is_empty() {
            return Err(invalid(
                "COURIER:Cluster:NoMembers",
                "members must not be empty".to_owned(),
            ));
        }
        let mut members = BTreeMap::new();
        for member in &request.members {
            if member.node_id == 0 || member.peer_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "COURIER:Cluster:BadMember",
                    format!(
                        "member {} needs a node id >= 1 and a host:port peer address",
                        member.node_id
                    ),
                ));
            }
            if members
                .insert(member.node_id, member.peer_addr.clone())
                .is_some()
            {
                return Err(invalid(
                    "COURIER:Cluster:BadMember",
                    format!("node id {} appears twice", member.node_id),
                ));
            }
        }
        if !members.contains_key(&self.groups.node_id()) {
            return Err(invalid(
                "COURIER:Cluster:NotAMember",
                format!(
                    "this node ({}) must be one of the members",
                    self.groups.node_id()
                ),
            ));
        }
        if request.shard_count == 0 || request.shard_count > SHARD_COUNT_MAX {
            return Err(invalid(
                "COURIER:Cluster:ShardCount",
                format!(
                    "shard_count must be 1..={SHARD_COUNT_MAX}, got {}",
                    request.shard_count
                ),
            ));
        }
        let members_len = u32::try_from(members.len()).unwrap_or(u32::MAX);
        if request.replication_factor != 0 && request.replication_factor != members_len {
            return Err(invalid(
                "COURIER:Cluster:ReplicationFactor",
                format!(
                    "this version places every shard on every member: replication_factor must be 0 or {members_len}"
                ),
            ));
        }
        Ok(members)
    }

    async fn wait_leader(&self, handle: &GroupHandle) -> Result<NodeId, ApiError> {
        handle
            .wait_for_leader(INIT_LEADER_WAIT)
            .await
            .ok_or_else(|| unavailable("no leader elected in time".to_owned(), None))
    }
}
