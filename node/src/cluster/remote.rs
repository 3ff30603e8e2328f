//! Reads of any shard from any node: over this node's replica when it holds one, otherwise over
//! a replica on another node, round by round (`courier_storage::remote`), with the peer
//! `ReadShard` RPC.
//!
//! ```text
//!   read(shard, f) ─▶ a voter of shard here? ─yes─▶ f over the local projections
//!                         │ no
//!                         └─▶ rounds: ReadShard(reads so far) to a replica ─▶ f over its answers
//! ```
//!
//! A remote read has the meaning of a local one on the replica that answered: the replica's
//! state as it is (not a linearizable read). The replica that answered last is asked first next
//! time, so one node's reads of a shard keep going to one replica while it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use courier_consensus::types::{EventOutcome, GroupId, NodeId};
use courier_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use courier_proto::pb::events::Event;
use courier_proto::pb::peer;
use courier_proto::{LogIndex, ShardId};
use courier_storage::Cf;
use courier_storage::projection::{Projection, View};
use courier_storage::remote::{READ_OPS_MAX, ReadAnswer, ReadOp, RemoteRead};

use super::{Cluster, internal, invalid};
use crate::status::ApiError;

/// Bytes of keys and values one `ReadShard` answer may carry: half the gRPC message limit, so the
/// answer's framing always fits.
pub const READ_ANSWER_BYTES_MAX: usize = GRPC_MESSAGE_BYTES_MAX / 2;

/// How long a leader a replica named is trusted for routing before a replica is asked again:
/// a leader that changed is found within this, without waiting for a failure.
pub const LEADER_HINT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Retry hint when no replica of a shard answered a read, ms.
const NO_REPLICA_RETRY_MS: u64 = 500;

/// What this node learned of shards it holds no replica of: the replica that answered last, and
/// the leader as the replicas know it.
#[derive(Debug, Default)]
pub(super) struct Elsewhere {
    answered: HashMap<ShardId, NodeId>,
    /// The leader a replica named, and when.
    leaders: HashMap<ShardId, (NodeId, std::time::Instant)>,
}

/// [`Elsewhere`], shared by the node's tasks.
pub(super) type SharedElsewhere = Arc<Mutex<Elsewhere>>;

impl Cluster {
    /// What this node learned of shards it does not hold.
    fn elsewhere(&self) -> std::sync::MutexGuard<'_, Elsewhere> {
        self.elsewhere
            .lock()
            .expect("elsewhere lock is never poisoned")
    }

    /// Whether this node holds `shard`: a voter of its group, and placed there when the cluster
    /// places shards (a replica moved away that never learned of its removal is not one). Reads
    /// of the shard are then served here.
    pub fn holds(&self, shard: ShardId) -> bool {
        let me = self.groups.node_id();
        self.groups
            .get(GroupId::Shard(shard))
            .is_some_and(|handle| handle.has_voter(me))
            && self
                .groups
                .placement()
                .is_none_or(|placement| placement.holds(me, shard))
    }

    /// Runs the projection read `f` over `shard` as a replica has it: this node's when it holds
    /// the shard, otherwise one on another node (see the module docs).
    ///
    /// # Errors
    /// `UNAVAILABLE` `COURIER:Shard:Installing` when a snapshot install raced the read,
    /// `UNAVAILABLE` `COURIER:Shard:NoReplica` when no replica answered, `INTERNAL` for a read
    /// deeper than `courier_storage::remote::READ_ROUNDS_MAX` or a storage fault.
    pub async fn read<R>(
        &self,
        shard: ShardId,
        f: impl Fn(&View<'_, '_>) -> courier_storage::Result<R>,
    ) -> Result<R, ApiError> {
        if self.holds(shard) {
            let read = self
                .db
                .read_whole(shard, |reader| f(&reader.view(Projection::Inbox)))
                .ok_or_else(|| ApiError::installing(shard))?;
            return Ok(read?);
        }
        let mut read = RemoteRead::new();
        let mut answers = Vec::new();
        loop {
            let attempt = read
                .attempt(shard, answers, &f)
                .map_err(|error| internal(format!("{shard}: {error}")))?;
            if let Some(result) = attempt {
                return Ok(result?);
            }
            answers = self.read_elsewhere(shard, read.ops()).await?.0;
        }
    }

    /// The members that may hold a replica of `shard`, other than this node (its placed replicas,
    /// or every member of a cluster that holds every shard everywhere): its leader as last heard,
    /// then the replica that answered last, then the others.
    fn replicas_elsewhere(&self, shard: ShardId) -> Vec<(NodeId, String)> {
        let me = self.groups.node_id();
        let mut replicas: Vec<(NodeId, String)> = self
            .groups
            .get(GroupId::Metadata)
            .map(|metadata| metadata.state().members.into_iter().collect())
            .unwrap_or_default();
        let placement = self.groups.placement();
        // The placed replicas when the cluster places shards; otherwise every member may hold it.
        replicas.retain(|(id, _)| {
            *id != me
                && placement
                    .as_ref()
                    .is_none_or(|placed| placed.holds(*id, shard))
        });
        let (leader, answered) = {
            let elsewhere = self
                .elsewhere
                .lock()
                .expect("elsewhere lock is never poisoned");
            (
                elsewhere.leaders.get(&shard).map(|(leader, _)| *leader),
                elsewhere.answered.get(&shard).copied(),
            )
        };
        replicas.sort_by_key(|(id, _)| (Some(*id) != leader, Some(*id) != answered));
        replicas
    }

    /// Notes that `replica` answered for `shard`, and the leader it named (if any).
    fn note_elsewhere(&self, shard: ShardId, replica: NodeId, leader: Option<NodeId>) {
        let mut elsewhere = self
            .elsewhere
            .lock()
            .expect("elsewhere lock is never poisoned");
        elsewhere.answered.insert(shard, replica);
        if let Some(leader) = leader {
            elsewhere
                .leaders
                .insert(shard, (leader, std::time::Instant::now()));
        }
    }

    /// The leader of a shard this node holds no replica of, with its address: as heard within
    /// [`LEADER_HINT_TTL`], or else as a replica names it when asked (a `ReadShard` of no reads);
    /// `None` when no replica knows one.
    pub(super) async fn leader_elsewhere(&self, shard: ShardId) -> Option<(NodeId, String)> {
        let known = |cluster: &Self| {
            cluster
                .elsewhere()
                .leaders
                .get(&shard)
                .filter(|(_, heard)| heard.elapsed() < LEADER_HINT_TTL)
                .map(|(leader, _)| *leader)
        };
        let leader = match known(self) {
            Some(leader) => leader,
            None => {
                self.read_elsewhere(shard, &[]).await.ok()?;
                known(self)?
            }
        };
        let addr = self
            .groups
            .get(GroupId::Metadata)?
            .state()
            .members
            .remove(&leader)?;
        Some((leader, addr))
    }

    /// The index `shard` is applied up to on this node's replica, or on a replica elsewhere when
    /// this node holds none.
    ///
    /// # Errors
    /// `UNAVAILABLE` `COURIER:Shard:NoReplica` when no replica elsewhere answered.
    pub async fn applied_index(&self, shard: ShardId) -> Result<LogIndex, ApiError> {
        if self.holds(shard)
            && let Some(handle) = self.groups.get(GroupId::Shard(shard))
        {
            return Ok(handle.applied_index());
        }
        Ok(self.read_elsewhere(shard, &[]).await?.1)
    }

    /// Answers to `ops` and the applied index of the replica that gave them.
    async fn read_elsewhere(
        &self,
        shard: ShardId,
        ops: &[ReadOp],
    ) -> Result<(Vec<ReadAnswer>, LogIndex), ApiError> {
        let request = peer::ReadShardRequest {
            shard: u32::from(shard.get()),
            ops: ops.iter().map(op_to_wire).collect(),
            ..peer::ReadShardRequest::default()
        };
        let mut refusals = Vec::new();
        for (id, addr) in self.replicas_elsewhere(shard) {
            let Some(mut client) = self.peers.forward(&addr) else {
                continue;
            };
            match client.read_shard(self.peers.request(request.clone())).await {
                Ok(response) => {
                    let response = response.into_inner();
                    self.note_elsewhere(
                        shard,
                        id,
                        (response.leader != 0).then_some(response.leader),
                    );
                    // A short answer list stays short: `RemoteRead::attempt` refuses it.
                    let answers = response.answers.into_iter().zip(ops);
                    return Ok((
                        answers
                            .map(|(answer, op)| answer_from_wire(answer, op))
                            .collect(),
                        LogIndex::new(response.applied),
                    ));
                }
                // The same reads get the same refusal from every replica: no use asking on.
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    return Err(ApiError::ResourceExhausted {
                        code: "COURIER:Cluster:ReadTooLarge",
                        message: status.message().to_owned(),
                    });
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    return Err(internal(format!(
                        "node {id} refused a read of {shard}: {}",
                        status.message()
                    )));
                }
                Err(status) => refusals.push(format!("node {id}: {}", status.message())),
            }
        }
        Err(no_replica(shard, "read", &refusals))
    }

    /// Proposes `events` on `shard`, which this node holds no replica of, through a replica on
    /// another node: that replica routes them as its own client's (to its leader, holding them
    /// through a failover). Another replica is tried when one holds no replica or cannot be
    /// reached, but after an attempt whose fate is unknown only when sending again is safe.
    ///
    /// # Errors
    /// The replica's answers that a client acts on (`NoLeader`, `InFlight`, `Overloaded`,
    /// `Installing`, the proposal's own refusals); `UNAVAILABLE` `COURIER:Shard:NoReplica` when
    /// no replica took the proposal.
    pub(super) async fn propose_elsewhere(
        &self,
        shard: ShardId,
        events: Vec<Event>,
        resend_safe: bool,
    ) -> Result<Vec<EventOutcome>, ApiError> {
        let request = peer::ProposeRequest {
            shard: u32::from(shard.get()),
            events,
        };
        // The replica may hold the proposal through a failover before it answers.
        // With a margin, so that this call does not give up just as the replica answers.
        let within = self
            .leader_wait()
            .saturating_add(self.rpc_timeout)
            .saturating_add(self.rpc_timeout / 2);
        let mut refusals = Vec::new();
        for (id, addr) in self.replicas_elsewhere(shard) {
            let Some(mut client) = self.peers.forward(&addr) else {
                continue;
            };
            let status = match client
                .propose(self.peers.request_within(request.clone(), within))
                .await
            {
                Ok(response) => {
                    self.note_elsewhere(shard, id, None);
                    return response
                        .into_inner()
                        .outcomes
                        .into_iter()
                        .map(super::wire::outcome_from_wire)
                        .collect();
                }
                Err(status) => status,
            };
            if let Some(answer) = ApiError::passed_on_from_replica(&status) {
                if let ApiError::Unavailable { leader, .. } = &answer {
                    self.note_elsewhere(shard, id, *leader);
                }
                return Err(answer);
            }
            // Refused before anything was proposed: another replica may take it.
            let not_held = status.code() == tonic::Code::NotFound
                && status
                    .metadata()
                    .get(courier_proto::CODE_KEY)
                    .is_some_and(|code| code == crate::status::UNKNOWN_SHARD);
            if !not_held && !resend_safe {
                return Err(ApiError::Unavailable {
                    code: "COURIER:Shard:NoLeader",
                    message: format!(
                        "node {id} did not answer a proposal to {shard} ({}); retry with the same ids",
                        status.message()
                    ),
                    retry_after_ms: NO_REPLICA_RETRY_MS,
                    leader: None,
                });
            }
            refusals.push(format!("node {id}: {}", status.message()));
        }
        Err(no_replica(shard, "proposal", &refusals))
    }

    /// Serves the peer `ReadShard` RPC: [`Cluster::read_shard_here`], and, when asked
    /// (`log_from`, `log_to`: a move's old node, before it deletes its replica), whether this
    /// node gives back every committed entry of that range (`log_held`).
    ///
    /// # Errors
    /// As [`Cluster::read_shard_here`]; `INVALID_ARGUMENT` `COURIER:Cluster:BadLogRange` for a
    /// range that starts at 0 or after its end; `INTERNAL` when the log or archive failed.
    pub async fn read_shard(
        &self,
        request: peer::ReadShardRequest,
    ) -> Result<peer::ReadShardResponse, ApiError> {
        let (shard, from, to) = (request.shard, request.log_from, request.log_to);
        let mut response = self.read_shard_here(request)?;
        if from == 0 && to == 0 {
            return Ok(response);
        }
        if from == 0 || from > to {
            return Err(invalid(
                "COURIER:Cluster:BadLogRange",
                format!(
                    "log range {from}..={to}: it starts at 1 or later and ends at or after its start"
                ),
            ));
        }
        let shard = ShardId::from_wire(shard, self.groups.shard_count().unwrap_or(0))?;
        let (groups, archive) = (self.groups.clone(), self.archive.clone());
        response.log_held = tokio::task::spawn_blocking(move || {
            crate::archive::gives_back(
                &groups,
                archive.as_deref(),
                shard,
                (LogIndex::new(from), LogIndex::new(to)),
            )
        })
        .await
        .map_err(|e| ApiError::task_ended("log check", &e))?
        .map_err(|e| internal(e.to_string()))?;
        Ok(response)
    }

    /// Answers the reads of a peer `ReadShard` over this node's replica of the shard.
    ///
    /// # Errors
    /// `NOT_FOUND` `COURIER:Cluster:UnknownShard` when this node holds no replica of it;
    /// `INVALID_ARGUMENT` for a read outside the shard or too many; `RESOURCE_EXHAUSTED`
    /// `COURIER:Cluster:ReadTooLarge` for answers above [`READ_ANSWER_BYTES_MAX`];
    /// `UNAVAILABLE` while a snapshot installs.
    pub fn read_shard_here(
        &self,
        request: peer::ReadShardRequest,
    ) -> Result<peer::ReadShardResponse, ApiError> {
        let shard_count = self.groups.shard_count().unwrap_or(0);
        let shard = ShardId::from_wire(request.shard, shard_count)?;
        if !self.holds(shard) {
            return Err(ApiError::unknown_shard(shard));
        }
        if request.ops.len() > READ_OPS_MAX {
            return Err(invalid(
                "COURIER:Cluster:ReadTooMany",
                format!(
                    "{} reads in one call (at most {READ_OPS_MAX})",
                    request.ops.len()
                ),
            ));
        }
        let ops = request
            .ops
            .into_iter()
            .map(|op| op_from_wire(op, shard))
            .collect::<Result<Vec<_>, _>>()?;
        let answers = self
            .db
            .read_whole(shard, |_| {
                courier_storage::remote::answer(self.db.as_ref(), &ops)
            })
            .ok_or_else(|| ApiError::installing(shard))??;
        let bytes = answers
            .iter()
            .map(ReadAnswer::bytes)
            .fold(0, usize::saturating_add);
        if bytes > READ_ANSWER_BYTES_MAX {
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Cluster:ReadTooLarge",
                message: format!(
                    "the answers to {} reads of {shard} are {bytes} bytes (at most {READ_ANSWER_BYTES_MAX})",
                    ops.len()
                ),
            });
        }
        let handle = self.groups.get(GroupId::Shard(shard));
        let leader = handle
            .as_ref()
            .and_then(|handle| handle.leader_view().leader)
            .unwrap_or(0);
        let applied = handle.map_or(0, |handle| handle.applied_index().get());
        let voters = self
            .groups
            .get(GroupId::Shard(shard))
            .map(|handle| handle.state().voters.into_iter().collect())
            .unwrap_or_default();
        Ok(peer::ReadShardResponse {
            answers: answers.into_iter().map(answer_to_wire).collect(),
            leader,
            applied,
            voters,
            log_held: false,
        })
    }
}

/// `UNAVAILABLE` `COURIER:Shard:NoReplica`: no node took a read or proposal of `shard`.
fn no_replica(shard: ShardId, what: &str, refusals: &[String]) -> ApiError {
    ApiError::Unavailable {
        code: "COURIER:Shard:NoReplica",
        message: format!(
            "no replica of {shard} took the {what} ({})",
            refusals.join("; ")
        ),
        retry_after_ms: NO_REPLICA_RETRY_MS,
        leader: None,
    }
}

fn op_to_wire(op: &ReadOp) -> peer::ReadShardOp {
    match op {
        ReadOp::Get { cf, key } => peer::ReadShardOp {
            cf: cf.name().to_owned(),
            key: key.clone(),
            scan: false,
            to: Vec::new(),
            limit: 0,
        },
        ReadOp::Scan {
            cf,
            from,
            to,
            limit,
        } => peer::ReadShardOp {
            cf: cf.name().to_owned(),
            key: from.clone(),
            scan: true,
            to: to.clone(),
            limit: u64::try_from(*limit).unwrap_or(u64::MAX),
        },
    }
}

fn op_from_wire(op: peer::ReadShardOp, shard: ShardId) -> Result<ReadOp, ApiError> {
    let cf = Cf::from_name(&op.cf).ok_or_else(|| {
        invalid(
            "COURIER:Cluster:ReadOutsideShard",
            format!("no column family `{}`", op.cf),
        )
    })?;
    let op = if op.scan {
        ReadOp::Scan {
            cf,
            from: op.key,
            to: op.to,
            limit: usize::try_from(op.limit).unwrap_or(usize::MAX),
        }
    } else {
        ReadOp::Get { cf, key: op.key }
    };
    if !op.within(shard) {
        return Err(invalid(
            "COURIER:Cluster:ReadOutsideShard",
            format!("a read outside {shard}'s keys"),
        ));
    }
    Ok(op)
}

fn answer_to_wire(answer: ReadAnswer) -> peer::ReadShardAnswer {
    match answer {
        ReadAnswer::Value(value) => peer::ReadShardAnswer {
            found: value.is_some(),
            value: value.unwrap_or_default(),
            pairs: Vec::new(),
        },
        ReadAnswer::Pairs(pairs) => peer::ReadShardAnswer {
            found: false,
            value: Vec::new(),
            pairs: pairs
                .into_iter()
                .map(|(key, value)| peer::ReadShardPair { key, value })
                .collect(),
        },
    }
}

/// An answer in the shape its read asked for (a scan's answer is pairs even when empty).
fn answer_from_wire(answer: peer::ReadShardAnswer, op: &ReadOp) -> ReadAnswer {
    match op {
        ReadOp::Get { .. } => ReadAnswer::Value(answer.found.then_some(answer.value)),
        ReadOp::Scan { .. } => ReadAnswer::Pairs(
            answer
                .pairs
                .into_iter()
                .map(|pair| (pair.key, pair.value))
                .collect(),
        ),
    }
}
