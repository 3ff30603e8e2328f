//! Bootstrap: the metadata group with every member, and one group per shard on the members
//! its placement names (every member when the replication factor is the member count), their
//! first leaders spread over the members. Safe to retry with the same members.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_consensus::groups::GroupHandle;
use courier_consensus::placement::Placement;
use courier_consensus::types::{ClusterSettings, GroupId, NodeId};
use courier_proto::limits::{REPLICATION_FACTOR_MAX, SHARD_COUNT_MAX};
use courier_proto::pb::peer::{self, InitClusterRequest, InitClusterResponse};
use courier_proto::{PHONE_KEY_BYTES, PhoneKey, ShardId};
use tracing::{info, warn};

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

/// Replicas per shard when `InitCluster` names none: three, or every member of a smaller cluster.
pub const REPLICATION_FACTOR_DEFAULT: usize = 3;

/// The replication factor `request` asks for, with `members` members: its own, or
/// [`REPLICATION_FACTOR_DEFAULT`] (every member below that).
fn replication_factor(request: &InitClusterRequest, members: usize) -> usize {
    match usize::try_from(request.replication_factor) {
        Ok(0) | Err(_) => REPLICATION_FACTOR_DEFAULT.min(members),
        Ok(asked) => asked,
    }
}

/// Where the shards of the cluster `request` creates go: a pure function of the members, the
/// shard count and the replication factor, so the node that bootstraps and the members it
/// delegates shard starts to compute the same table.
fn placement_of(request: &InitClusterRequest, members: &BTreeMap<NodeId, String>) -> Placement {
    let nodes: BTreeSet<NodeId> = members.keys().copied().collect();
    let shard_count = u16::try_from(request.shard_count).expect("validated");
    Placement::spread(
        &nodes,
        shard_count,
        replication_factor(request, members.len()),
    )
}

/// The members `placement` puts `shard` on, with their addresses.
fn replicas_of(
    placement: &Placement,
    shard: ShardId,
    members: &BTreeMap<NodeId, String>,
) -> BTreeMap<NodeId, String> {
    placement
        .replicas(shard)
        .iter()
        .filter_map(|id| Some((*id, members.get(id)?.clone())))
        .collect()
}

impl Cluster {
    /// Bootstraps a new cluster from this node: the metadata group with every member, the
    /// settings and placement, and one raft group per shard on its placed members, each started
    /// by its first placed member (which so becomes its first leader). Safe to retry with the
    /// same members.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed member list or settings, `FAILED_PRECONDITION` when the
    /// cluster exists with other members, `UNAVAILABLE` when no leader emerges in time.
    pub async fn init(&self, request: InitClusterRequest) -> Result<InitClusterResponse, ApiError> {
        let members = self.validate_init(&request)?;
        let phone_key = phone_key(&request)?;
        let format = super::format::wanted_format(request.event_format)?;
        let shard_count = u16::try_from(request.shard_count).expect("validated");
        // The table the cluster holds once it exists (shards may have moved since it was
        // created: a repeated init must not start a group where its shard no longer is).
        let placement = self.groups.placement().map_or_else(
            || placement_of(&request, &members),
            |held| held.as_ref().clone(),
        );
        if !request.init_shards.is_empty() {
            return self
                .init_delegated(&request.init_shards, shard_count, &placement, &members)
                .await;
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
        let replication_factor = replication_factor(&request, members.len());
        let settings = ClusterSettings {
            shard_count,
            replication_factor: u16::try_from(replication_factor).expect("validated"),
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
            // A retry of an init that named a format it did not get to record (the settings
            // written, the format not) raises it now, with the same checks.
            Some(_) if request.event_format != 0 && format > self.groups.event_format() => {
                self.raise_event_format(peer::RaiseEventFormatRequest {
                    event_format: format,
                    leader_only: false,
                })
                .await?;
            }
            Some(_) => {}
            None => {
                // Checked before anything is written, so that a refusal leaves no cluster.
                let format = self
                    .first_event_format(request.event_format, format, &members)
                    .await?;
                // A cluster with every shard on every member is written as before placement
                // existed (nothing to place), so that such clusters keep one stored form.
                let placed = (replication_factor < members.len()).then(|| placement.clone());
                metadata
                    .write_settings(settings, phone_key, placed)
                    .await
                    .map_err(|e| unavailable(e.to_string(), None))?;
                if format > 1 {
                    metadata
                        .write_event_format(format)
                        .await
                        .map_err(|e| unavailable(e.to_string(), e.leader))?;
                }
            }
        }
        let placement = self
            .groups
            .placement()
            .map_or(placement, |held| held.as_ref().clone());
        self.init_shards(&request, &placement, &members).await?;
        Ok(InitClusterResponse {
            already_initialized: already,
            event_format: self.groups.event_format(),
        })
    }

    /// A bootstrapping peer asks this node to start `shards` as their first leader.
    async fn init_delegated(
        &self,
        shards: &[u32],
        shard_count: u16,
        placement: &Placement,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<InitClusterResponse, ApiError> {
        for shard in shards {
            let shard = ShardId::from_wire(*shard, shard_count)?;
            let replicas = replicas_of(placement, shard, members);
            if !replicas.contains_key(&self.groups.node_id()) {
                return Err(invalid(
                    "COURIER:Cluster:NotAMember",
                    format!("{shard} is not placed on this node"),
                ));
            }
            self.init_group(GroupId::Shard(shard), &replicas).await?;
        }
        Ok(InitClusterResponse {
            already_initialized: false,
            event_format: self.groups.event_format(),
        })
    }

    /// A new cluster's event format: `format` when every member reads it. Asked for the newest
    /// (`requested` 0), a member of an older build or one that does not answer leaves the
    /// cluster at format 1 (raised later with `Admin.RaiseEventFormat`); asked for `format` by
    /// name, the init is refused.
    ///
    /// # Errors
    /// As [`Cluster::members_read`], for a format asked for by name.
    async fn first_event_format(
        &self,
        requested: u32,
        format: u32,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<u32, ApiError> {
        if format == 1 {
            return Ok(1);
        }
        match self.members_read(members.clone(), format).await {
            Ok(()) => Ok(format),
            Err(error) if requested == 0 => {
                warn!(
                    %error,
                    "the new cluster starts at event format 1: raise it once every member \
                     reads a newer one (courier-ops cluster raise-format)"
                );
                Ok(1)
            }
            Err(error) => Err(error),
        }
    }

    /// Starts each shard on its first placed member, which becomes its first leader: leaders
    /// spread over the nodes from the start.
    async fn init_shards(
        &self,
        request: &InitClusterRequest,
        placement: &Placement,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), ApiError> {
        let mut per_node: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for shard in 0..request.shard_count {
            let id = u16::try_from(shard).map(ShardId::new).expect("validated");
            let first = *placement.replicas(id).first().expect("R >= 1");
            per_node.entry(first).or_default().push(shard);
        }
        let me = self.groups.node_id();
        for (id, shards) in per_node {
            let local = id == me;
            let delegated = !local
                && self
                    .delegate_init(request, &members[&id], &shards)
                    .await
                    .is_ok();
            if !delegated {
                // This node, or a member that did not answer: start the shards here, where
                // this node is one of their replicas.
                for shard in shards {
                    let shard = ShardId::new(u16::try_from(shard).expect("below shard_count"));
                    let replicas = replicas_of(placement, shard, members);
                    if !replicas.contains_key(&me) {
                        return Err(unavailable(
                            format!(
                                "node {id} did not start {shard}, which is not placed here; retry"
                            ),
                            None,
                        ));
                    }
                    self.init_group(GroupId::Shard(shard), &replicas).await?;
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
        let replicas = replication_factor(request, members.len());
        let allowed = replicas == members.len()
            || (replicas % 2 == 1
                && replicas <= members.len()
                && u32::try_from(replicas).is_ok_and(|r| r <= REPLICATION_FACTOR_MAX));
        if !allowed {
            return Err(invalid(
                "COURIER:Cluster:ReplicationFactor",
                format!(
                    "replication_factor must be odd, at most {REPLICATION_FACTOR_MAX} and at most the {} members (or exactly the member count; 0: {REPLICATION_FACTOR_DEFAULT} or every member), got {replicas}",
                    members.len()
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
