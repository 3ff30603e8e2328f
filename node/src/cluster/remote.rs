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

use courier_consensus::types::{GroupId, NodeId};
use courier_proto::ShardId;
use courier_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use courier_proto::pb::peer;
use courier_storage::Cf;
use courier_storage::projection::{Projection, View};
use courier_storage::remote::{READ_OPS_MAX, ReadAnswer, ReadOp, RemoteRead};

use super::{Cluster, internal, invalid};
use crate::status::ApiError;

/// Bytes of keys and values one `ReadShard` answer may carry: half the gRPC message limit, so the
/// answer's framing always fits.
pub const READ_ANSWER_BYTES_MAX: usize = GRPC_MESSAGE_BYTES_MAX / 2;

/// Retry hint when no replica of a shard answered a read, ms.
const NO_REPLICA_RETRY_MS: u64 = 500;

/// The replica each shard's last remote read was answered by.
pub(super) type Answered = Arc<Mutex<HashMap<ShardId, NodeId>>>;

impl Cluster {
    /// Whether this node is a voter of `shard`'s group: then reads of the shard are served here.
    pub fn holds(&self, shard: ShardId) -> bool {
        self.groups
            .get(GroupId::Shard(shard))
            .is_some_and(|handle| handle.has_voter(self.groups.node_id()))
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
            answers = self.read_elsewhere(shard, read.ops()).await?;
        }
    }

    /// Asks a replica of `shard` on another node to answer `ops`: the one that answered last,
    /// then every other member in turn.
    async fn read_elsewhere(
        &self,
        shard: ShardId,
        ops: &[ReadOp],
    ) -> Result<Vec<ReadAnswer>, ApiError> {
        let me = self.groups.node_id();
        let mut replicas: Vec<(NodeId, String)> = self
            .groups
            .get(GroupId::Metadata)
            .map(|metadata| metadata.state().members.into_iter().collect())
            .unwrap_or_default();
        replicas.retain(|(id, _)| *id != me);
        let last = self
            .answered
            .lock()
            .expect("answered lock is never poisoned")
            .get(&shard)
            .copied();
        replicas.sort_by_key(|(id, _)| Some(*id) != last);
        let request = peer::ReadShardRequest {
            shard: u32::from(shard.get()),
            ops: ops.iter().map(op_to_wire).collect(),
        };
        let mut refusals = Vec::new();
        for (id, addr) in replicas {
            let Some(mut client) = self.peers.forward(&addr) else {
                continue;
            };
            match client.read_shard(self.peers.request(request.clone())).await {
                Ok(response) => {
                    self.answered
                        .lock()
                        .expect("answered lock is never poisoned")
                        .insert(shard, id);
                    // A short answer list stays short: `RemoteRead::attempt` refuses it.
                    let answers = response.into_inner().answers.into_iter().zip(ops);
                    return Ok(answers
                        .map(|(answer, op)| answer_from_wire(answer, op))
                        .collect());
                }
                Err(status) => refusals.push(format!("node {id}: {}", status.message())),
            }
        }
        Err(ApiError::Unavailable {
            code: "COURIER:Shard:NoReplica",
            message: format!(
                "no replica of {shard} answered a read ({})",
                refusals.join("; ")
            ),
            retry_after_ms: NO_REPLICA_RETRY_MS,
            leader: None,
        })
    }

    /// Serves the peer `ReadShard` RPC: answers the reads over this node's replica of the shard.
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
            return Err(ApiError::NotFound {
                code: "COURIER:Cluster:UnknownShard",
                message: format!("{shard} is not replicated on this node"),
            });
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
        Ok(peer::ReadShardResponse {
            answers: answers.into_iter().map(answer_to_wire).collect(),
        })
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
