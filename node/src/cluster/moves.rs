//! Shard moves: one replica of a shard goes from one node to another, never below `R` voters.
//!
//! ```text
//!   on `from`:  to joins (learner, catches up, voter) ─▶ `from` leaves (a leader removes
//!               itself and steps down) ─▶ placement table records the move (metadata leader)
//!               ─▶ another voter gives back what only `from`'s log holds (archived or in
//!               its log) ─▶ the shard's data on `from` is deleted and checked gone
//! ```
//!
//! Every step is skipped when already done, so a move interrupted anywhere finishes when it is
//! sent again; until the table records it, the shard's replicas are still found through the
//! old entry (reads and writes try the placed replicas in turn).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use courier_consensus::types::{GroupId, NodeId};
use courier_proto::pb::peer;
use courier_proto::{LogIndex, ShardId};
use tracing::{info, warn};

use super::membership::Change;
use super::{Cluster, internal, invalid, unavailable};
use crate::status::ApiError;

/// An Admin client to a group's leader on another node, and the leader's id.
type LeaderHop = (
    peer::admin_client::AdminClient<tonic::transport::Channel>,
    Option<NodeId>,
);

/// How long a move tries to record itself in the placement table while the metadata group has
/// no reachable leader (it elects one within an election timeout when a member died).
const RECORD_WAIT: Duration = Duration::from_secs(30);

/// How long a move's old node waits for another voter to give back the committed entries only
/// its replica's log holds (its archiver archives whole segments meanwhile) before it gives up,
/// keeping its replica (`COURIER:Cluster:NotArchived`).
const KEPT_WAIT: Duration = Duration::from_secs(60);

/// How often it asks again while it waits.
const KEPT_POLL: Duration = Duration::from_millis(500);

/// The shard moves this node runs, by shard, with the step each is at (`Admin.Status`, the
/// metrics), and how many ended each way. One move of a shard at a time per node: a second
/// `MoveShard` for it while one runs is refused, so two never interleave their steps.
#[derive(Debug, Default)]
pub(super) struct Moves {
    running: Mutex<BTreeMap<ShardId, Running>>,
    done: AtomicU64,
    failed: AtomicU64,
}

/// One move in progress.
#[derive(Debug, Clone)]
struct Running {
    from: NodeId,
    to: NodeId,
    step: &'static str,
    started: std::time::Instant,
}

impl Moves {
    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, Running>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a move of `shard`.
    ///
    /// # Errors
    /// `UNAVAILABLE` `COURIER:Cluster:MoveInProgress` while another move of `shard` runs here.
    fn start(&self, shard: ShardId, from: NodeId, to: NodeId) -> Result<MoveGuard<'_>, ApiError> {
        let mut running = self.running();
        if let Some(other) = running.get(&shard) {
            return Err(in_progress(shard, other));
        }
        running.insert(
            shard,
            Running {
                from,
                to,
                step: "joining",
                started: std::time::Instant::now(),
            },
        );
        Ok(MoveGuard {
            moves: self,
            shard,
            done: false,
        })
    }

    /// Checks that no move of `shard` runs here.
    ///
    /// # Errors
    /// `UNAVAILABLE` `COURIER:Cluster:MoveInProgress` while one does.
    fn idle(&self, shard: ShardId) -> Result<(), ApiError> {
        match self.running().get(&shard) {
            Some(other) => Err(in_progress(shard, other)),
            None => Ok(()),
        }
    }

    /// The moves running now, for `Admin.Status`.
    pub(super) fn list(&self) -> Vec<peer::ShardMove> {
        self.running()
            .iter()
            .map(|(shard, running)| peer::ShardMove {
                shard: u32::from(shard.get()),
                from_node: running.from,
                to_node: running.to,
                step: running.step.to_owned(),
                elapsed_ms: u64::try_from(running.started.elapsed().as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect()
    }

    /// Moves run to the end, and moves that stopped on an error, since the node started.
    pub(super) fn ended(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// `UNAVAILABLE` `COURIER:Cluster:MoveInProgress`: `other` runs here.
fn in_progress(shard: ShardId, other: &Running) -> ApiError {
    ApiError::Unavailable {
        code: "COURIER:Cluster:MoveInProgress",
        message: format!(
            "a move of {shard} from node {} to node {} runs on this node (step {}); send this \
             one again when it ends",
            other.from, other.to, other.step
        ),
        retry_after_ms: 1000,
        leader: None,
    }
}

/// A move registered in [`Moves`]; dropping it ends the move, as failed unless
/// [`MoveGuard::finished`] was called.
#[derive(Debug)]
struct MoveGuard<'a> {
    moves: &'a Moves,
    shard: ShardId,
    done: bool,
}

impl MoveGuard<'_> {
    /// The step the move is at now.
    fn step(&self, step: &'static str) {
        if let Some(running) = self.moves.running().get_mut(&self.shard) {
            running.step = step;
        }
    }

    /// The move ran to the end.
    fn finished(mut self) {
        self.done = true;
    }
}

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        self.moves.running().remove(&self.shard);
        let ended = if self.done {
            &self.moves.done
        } else {
            &self.moves.failed
        };
        ended.fetch_add(1, Ordering::Relaxed);
    }
}

impl Cluster {
    /// Serves `Admin.MoveShard` (see the module docs): on the node the replica leaves, or on
    /// another voter of the shard when that node is down (then its data is not deleted).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `COURIER:Cluster:NotPlaced` for a cluster with every shard on every
    /// member, `COURIER:Cluster:BadMove` when the table shows no such move to make;
    /// `INVALID_ARGUMENT` `COURIER:Cluster:WrongNode` when sent to neither `from` nor a voter,
    /// `COURIER:Cluster:BadMember` for a `to` outside the cluster; `UNAVAILABLE` when a step
    /// did not finish in time (send the move again: it resumes).
    pub async fn move_shard(
        &self,
        request: peer::MoveShardRequest,
    ) -> Result<peer::MoveShardResponse, ApiError> {
        let shard_count = self.groups.shard_count().unwrap_or(0);
        let shard = ShardId::from_wire(request.shard, shard_count)?;
        let (from, to) = (request.from_node, request.to_node);
        if request.readmit {
            // Sent by the node running a move to this node, just before this node joins. Not
            // while this node still runs a move of the shard away (its replica would be dropped
            // under the move back).
            self.moves.idle(shard)?;
            self.groups
                .readmit(shard, request.readmit_term)
                .await
                .map_err(|e| internal(e.to_string()))?;
            return Ok(peer::MoveShardResponse::default());
        }
        if request.placement_only {
            // One hop: only the metadata leader records; anyone else answers so, and the
            // sender tries again with its newer view of the leader.
            self.record_move_here(shard, from, to).await?;
            return Ok(peer::MoveShardResponse::default());
        }
        let placement = self
            .groups
            .placement()
            .ok_or(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:NotPlaced",
                message: "every shard is on every member of this cluster: there is nothing to move"
                    .to_owned(),
            })?;
        let on_from = from == self.groups.node_id();
        if !on_from && !self.holds(shard) {
            return Err(invalid(
                "COURIER:Cluster:WrongNode",
                format!(
                    "send the move to node {from} or another voter of {shard}; node {} is neither",
                    self.groups.node_id()
                ),
            ));
        }
        let to_addr = self
            .groups
            .get(GroupId::Metadata)
            .and_then(|metadata| metadata.state().members.remove(&to))
            .ok_or_else(|| {
                invalid(
                    "COURIER:Cluster:BadMember",
                    format!("node {to} is not a member of the cluster"),
                )
            })?;
        let already = placement.holds(to, shard) && !placement.holds(from, shard);
        if !already && self.groups.draining().contains(&to) {
            return Err(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:Draining",
                message: format!(
                    "node {to} is marked draining: no move puts a replica on it (mark it \
                     undraining first: `courier-ops node undrain --id {to}`)"
                ),
            });
        }
        if !already && placement.moved(shard, from, to).is_none() {
            return Err(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:BadMove",
                message: format!(
                    "{shard} is on nodes {:?}: it cannot move from node {from} to node {to}",
                    placement.replicas(shard)
                ),
            });
        }
        let moving = self.moves.start(shard, from, to)?;
        if !already && on_from {
            // Before anything changes: if what only this node holds is kept nowhere else, the
            // move is refused here, with the shard as it was, not stuck after the swap.
            moving.step("checking");
            let voters: Vec<NodeId> = self
                .group(GroupId::Shard(shard))
                .await?
                .state()
                .voters
                .into_iter()
                .filter(|voter| *voter != from)
                .collect();
            self.wait_kept_elsewhere(shard, &voters).await?;
            moving.step("joining");
        }
        if !already {
            self.swap_replicas(shard, (from, to), to_addr, &moving)
                .await?;
        }
        if !on_from {
            // `from` is down: its copy stays on its disk, outside every group.
            info!(%shard, from, to, "shard move done; node {from} keeps its data");
            moving.finished();
            return Ok(peer::MoveShardResponse {
                families_left: 0,
                already_moved: already,
                deleted: false,
            });
        }
        let families_left = self.delete_moved(shard, (from, to), &moving).await?;
        moving.finished();
        Ok(peer::MoveShardResponse {
            families_left,
            already_moved: already,
            deleted: true,
        })
    }

    /// The last steps of a move, on `from`: checks `to` sees `from` out of the group, that no
    /// committed entry is on this node only, then deletes the replica. Returns the column
    /// families still holding its keys (0: verified empty).
    async fn delete_moved(
        &self,
        shard: ShardId,
        (from, to): (NodeId, NodeId),
        moving: &MoveGuard<'_>,
    ) -> Result<u32, ApiError> {
        moving.step("confirming");
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        let voters = loop {
            // `to` may not have applied the removal yet, or be unreachable for a moment: it
            // answers once it has.
            match self.confirm_removed(shard, from, to).await {
                Err(
                    ApiError::Unavailable { .. }
                    | ApiError::FailedPrecondition {
                        code: "COURIER:Cluster:StillAVoter",
                        ..
                    },
                ) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        moving.step("archiving");
        self.wait_kept_elsewhere(shard, &voters).await?;
        moving.step("deleting");
        // In a task of its own: the caller giving up must not stop a delete half way.
        let groups = self.groups.clone();
        let families_left = tokio::spawn(async move { groups.drop_shard(shard).await })
            .await
            .map_err(|e| ApiError::task_ended("shard drop", &e))?
            .map_err(|e| internal(e.to_string()))?;
        info!(%shard, from, to, families_left, "shard move done");
        Ok(families_left)
    }

    /// Serves `Admin.MarkDraining`: records the mark in the metadata group, on its leader (here
    /// or one hop away; `leader_only` is that hop, which goes no further), tried again while
    /// the metadata group elects (up to 30 s).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `COURIER:Cluster:NotPlaced` on a cluster that holds every shard on
    /// every member; `INVALID_ARGUMENT` `COURIER:Cluster:BadMember` marking a node that is not a
    /// member; `UNAVAILABLE` when the metadata group had no reachable leader in time.
    pub async fn mark_draining(&self, request: peer::MarkDrainingRequest) -> Result<(), ApiError> {
        let (node, on) = (request.node_id, request.draining);
        if self.groups.placement().is_none() {
            return Err(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:NotPlaced",
                message:
                    "every shard is on every member of this cluster: there is nothing to drain"
                        .to_owned(),
            });
        }
        let metadata = self.group(GroupId::Metadata).await?;
        if on && !metadata.state().members.contains_key(&node) {
            return Err(invalid(
                "COURIER:Cluster:BadMember",
                format!("node {node} is not a member of the cluster"),
            ));
        }
        if request.leader_only {
            return self.mark_draining_here(node, on).await;
        }
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        loop {
            match self.mark_draining_once(node, on).await {
                Err(ApiError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn mark_draining_once(&self, node: NodeId, on: bool) -> Result<(), ApiError> {
        let Some((mut client, leader)) = self.metadata_leader_elsewhere().await? else {
            return self.mark_draining_here(node, on).await;
        };
        let request = self.peers.request(peer::MarkDrainingRequest {
            node_id: node,
            draining: on,
            leader_only: true,
        });
        client
            .mark_draining(request)
            .await
            .map_err(|status| match status.code() {
                // The leader's refusal stands (not retried as if it had not answered).
                tonic::Code::FailedPrecondition => ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:NotPlaced",
                    message: status.message().to_owned(),
                },
                tonic::Code::InvalidArgument => {
                    invalid("COURIER:Cluster:BadMember", status.message().to_owned())
                }
                _ => unavailable(status.message().to_owned(), leader),
            })?;
        Ok(())
    }

    /// The metadata group's leader, when another node leads it: an Admin client to it and its
    /// id, for a one-hop call (`leader_only`); `None` when this node leads.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the group has no leader now.
    pub(super) async fn metadata_leader_elsewhere(&self) -> Result<Option<LeaderHop>, ApiError> {
        let state = self.group(GroupId::Metadata).await?.state();
        if state.current_leader == Some(self.groups.node_id()) {
            return Ok(None);
        }
        let addr = state
            .leader_addr()
            .ok_or_else(|| unavailable("the metadata group has no leader".to_owned(), None))?;
        let client = self
            .peers
            .admin(&addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        Ok(Some((client, state.current_leader)))
    }

    /// The metadata group's replica here, when it leads.
    ///
    /// # Errors
    /// `UNAVAILABLE` (with the leader it knows) when it does not.
    pub(super) async fn leading_metadata(
        &self,
    ) -> Result<courier_consensus::groups::GroupHandle, ApiError> {
        let metadata = self.group(GroupId::Metadata).await?;
        let state = metadata.state();
        if state.current_leader != Some(self.groups.node_id()) {
            return Err(unavailable(
                "this node does not lead the metadata group".to_owned(),
                state.current_leader,
            ));
        }
        Ok(metadata)
    }

    /// On the metadata group's leader: writes the mark and waits until applied.
    async fn mark_draining_here(&self, node: NodeId, on: bool) -> Result<(), ApiError> {
        self.leading_metadata()
            .await?
            .write_draining(node, on)
            .await
            .map_err(|e| unavailable(e.to_string(), e.leader))?;
        info!(node, draining = on, "draining mark written");
        Ok(())
    }

    /// The membership steps of a move: `to` joins (a learner until it caught up, then a voter),
    /// `from` leaves, the placement table records it.
    async fn swap_replicas(
        &self,
        shard: ShardId,
        (from, to): (NodeId, NodeId),
        to_addr: String,
        moving: &MoveGuard<'_>,
    ) -> Result<(), ApiError> {
        let group = GroupId::Shard(shard);
        info!(%shard, from, to, "shard move: the new replica joins");
        self.readmit_on(shard, (to, &to_addr)).await?;
        self.change_group(group, &Change::Add(to, to_addr), false)
            .await?;
        // When this node leads the shard it removes itself: raft commits the membership
        // without it (the other voters are a quorum of it) and the leader then steps down,
        // so the others elect a new one (raft's leader removal). No transfer is needed.
        moving.step("leaving");
        info!(%shard, from, to, "shard move: the old replica leaves");
        self.change_group(group, &Change::Remove(from), false)
            .await?;
        moving.step("recording");
        match self.record_move(shard, from, to).await {
            Err(
                refused @ ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:BadMove",
                    ..
                },
            ) => {
                // Another move of the shard away from `from` (run on another voter while
                // `from` was down) removed it and recorded its own: this one's `to` joined a
                // group the table does not place it in. It leaves again (not below the
                // table's replicas), so the group stays as the table says.
                if self
                    .groups
                    .placement()
                    .is_some_and(|placement| !placement.holds(to, shard))
                {
                    warn!(%shard, from, to, "another move of the shard was recorded first: the new replica leaves again");
                    self.change_group(group, &Change::Remove(to), false).await?;
                }
                Err(refused)
            }
            recorded => recorded,
        }
    }

    /// Has `to` readmit its replica of `shard` if it dropped one when the shard moved away from
    /// it earlier (`Groups::readmit`), for a leader of the shard's term as this node (a voter)
    /// knows it: until then it answers no raft message of the shard.
    async fn readmit_on(&self, shard: ShardId, (to, addr): (NodeId, &str)) -> Result<(), ApiError> {
        let term = self.group(GroupId::Shard(shard)).await?.state().term;
        if to == self.groups.node_id() {
            return self
                .groups
                .readmit(shard, term)
                .await
                .map_err(|e| internal(e.to_string()));
        }
        let mut client = self
            .peers
            .admin(addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let request = self.peers.request(peer::MoveShardRequest {
            shard: u32::from(shard.get()),
            from_node: self.groups.node_id(),
            to_node: to,
            placement_only: false,
            readmit: true,
            readmit_term: term,
        });
        client
            .move_shard(request)
            .await
            .map_err(|status| unavailable(format!("node {to}: {}", status.message()), None))?;
        Ok(())
    }

    /// Waits until what only this node's replica of `shard` holds (committed entries of its log
    /// its archive lacks) is given back by one of the shard's `voters` (from its archive or its
    /// log), up to [`KEPT_WAIT`]: deleting the replica must not take the last copy of any entry,
    /// or verify and rebuild from the first entry would fail. This node's archiver goes on
    /// archiving while it waits.
    ///
    /// # Errors
    /// `UNAVAILABLE` `COURIER:Cluster:NotArchived` when no voter gave the entries back in time
    /// (the replica stays; send the move again); `INTERNAL` when the log or archive failed.
    async fn wait_kept_elsewhere(&self, shard: ShardId, voters: &[NodeId]) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + KEPT_WAIT;
        loop {
            let (groups, archive) = (self.groups.clone(), self.archive.clone());
            let only_here = tokio::task::spawn_blocking(move || {
                crate::archive::only_in_log(&groups, archive.as_deref(), shard)
            })
            .await
            .map_err(|e| ApiError::task_ended("log check", &e))?
            .map_err(|e| internal(e.to_string()))?;
            let Some((first, last)) = only_here else {
                return Ok(());
            };
            let mut answers = Vec::new();
            for &voter in voters {
                if voter == self.groups.node_id() {
                    continue;
                }
                match self.gives_back(shard, voter, (first, last)).await {
                    Ok(true) => {
                        info!(%shard, voter, first = first.get(), last = last.get(), "entries kept by another voter");
                        return Ok(());
                    }
                    Ok(false) => answers.push(format!("node {voter}: does not hold them all")),
                    Err(why) => answers.push(format!("node {voter}: {why}")),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let answers = if answers.is_empty() {
                    "no other voter".to_owned()
                } else {
                    answers.join("; ")
                };
                return Err(ApiError::Unavailable {
                    code: "COURIER:Cluster:NotArchived",
                    message: format!(
                        "entries {first}..={last} of {shard} are on this node only (not in its \
                         archive, not given back by voters {voters:?}: {answers}): its replica \
                         stays until they are; send the move again"
                    ),
                    retry_after_ms: 1000,
                    leader: None,
                });
            }
            tokio::time::sleep(KEPT_POLL).await;
        }
    }

    /// Whether `voter` gives back every committed entry of `shard` in `range`; why not, when
    /// it cannot be asked or its answer is an error (named in the move's refusal).
    async fn gives_back(
        &self,
        shard: ShardId,
        voter: NodeId,
        range: (LogIndex, LogIndex),
    ) -> Result<bool, String> {
        let Some(mut client) = self.peer_forward(voter) else {
            return Err("not a member with a peer address".to_owned());
        };
        let request = self.peers.request(peer::ReadShardRequest {
            shard: u32::from(shard.get()),
            ops: Vec::new(),
            log_from: range.0.get(),
            log_to: range.1.get(),
        });
        match client.read_shard(request).await {
            Ok(response) => Ok(response.into_inner().log_held),
            Err(status) => {
                warn!(%shard, voter, code = ?status.code(), message = status.message(), "a voter did not answer whether it holds the entries");
                Err(format!("{:?}: {}", status.code(), status.message()))
            }
        }
    }

    /// A client of `node`'s peer `Forward` service, at the address the metadata group has for
    /// it; `None` for a node that is not a member (or a bad address).
    pub(super) fn peer_forward(
        &self,
        node: NodeId,
    ) -> Option<peer::forward_client::ForwardClient<tonic::transport::Channel>> {
        let addr = self
            .groups
            .get(GroupId::Metadata)?
            .state()
            .members
            .remove(&node)?;
        self.peers.forward(&addr)
    }

    /// Checks with `to`, now a voter, that `from` (this node) is out of the shard's group before
    /// its data is deleted: this node's own view may never learn of its removal, and a voter
    /// that lost its log and vote could vote twice in one term. Returns the voters `to` sees.
    async fn confirm_removed(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<Vec<NodeId>, ApiError> {
        let mut client = self
            .peer_forward(to)
            .ok_or_else(|| internal(format!("node {to} has no usable address")))?;
        let request = self.peers.request(peer::ReadShardRequest {
            shard: u32::from(shard.get()),
            ..peer::ReadShardRequest::default()
        });
        let voters = client
            .read_shard(request)
            .await
            .map_err(|status| unavailable(format!("node {to}: {}", status.message()), None))?
            .into_inner()
            .voters;
        if voters.contains(&to) && !voters.contains(&from) {
            return Ok(voters);
        }
        Err(ApiError::FailedPrecondition {
            code: "COURIER:Cluster:StillAVoter",
            message: format!(
                "node {to} sees {shard}'s voters as {voters:?}: node {from} keeps its data"
            ),
        })
    }

    /// Records in the placement table that `shard` moved from `from` to `to`: on the metadata
    /// group's leader, here or one hop away; tried again while the metadata group elects (up to
    /// [`RECORD_WAIT`]).
    async fn record_move(&self, shard: ShardId, from: NodeId, to: NodeId) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        loop {
            let attempt = self.record_move_once(shard, from, to).await;
            match attempt {
                Err(ApiError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn record_move_once(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), ApiError> {
        let metadata = self.group(GroupId::Metadata).await?;
        let state = metadata.state();
        if state.current_leader == Some(self.groups.node_id()) {
            return self.record_move_here(shard, from, to).await;
        }
        let addr = state.leader_addr().ok_or_else(|| {
            unavailable(
                "the metadata group has no leader; send the move again".to_owned(),
                None,
            )
        })?;
        let mut client = self
            .peers
            .admin(&addr)
            .ok_or_else(|| internal(format!("bad address {addr}")))?;
        let request = self.peers.request(peer::MoveShardRequest {
            shard: u32::from(shard.get()),
            from_node: from,
            to_node: to,
            placement_only: true,
            readmit: false,
            readmit_term: 0,
        });
        client.move_shard(request).await.map_err(|status| {
            if status.code() == tonic::Code::FailedPrecondition {
                ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:BadMove",
                    message: status.message().to_owned(),
                }
            } else {
                unavailable(status.message().to_owned(), state.current_leader)
            }
        })?;
        Ok(())
    }

    /// On the metadata group's leader: records the move and checks the table shows it (a move
    /// that does not fit the table, such as one racing another move of the shard, changes
    /// nothing and is refused).
    async fn record_move_here(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), ApiError> {
        self.leading_metadata()
            .await?
            .write_placement_move(shard, from, to)
            .await
            .map_err(|e| unavailable(e.to_string(), e.leader))?;
        let recorded = self
            .groups
            .placement()
            .is_some_and(|placement| placement.holds(to, shard) && !placement.holds(from, shard));
        if recorded {
            Ok(())
        } else {
            Err(ApiError::FailedPrecondition {
                code: "COURIER:Cluster:BadMove",
                message: format!(
                    "the placement table does not show {shard} moved from node {from} to node {to}"
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use courier_proto::ShardId;

    use super::Moves;
    use crate::status::ApiError;

    #[test]
    fn one_move_of_a_shard_at_a_time_with_its_step_and_how_it_ended() {
        let moves = Moves::default();
        let shard = ShardId::new(3);
        let first = moves.start(shard, 1, 4).expect("the first move starts");
        let refused = moves
            .start(shard, 2, 4)
            .expect_err("a second move of the shard waits");
        assert!(
            matches!(
                refused,
                ApiError::Unavailable {
                    code: "COURIER:Cluster:MoveInProgress",
                    ..
                }
            ),
            "{refused:?}"
        );
        let other = moves
            .start(ShardId::new(5), 1, 4)
            .expect("another shard moves at once");
        first.step("leaving");
        let listed: Vec<(u32, u64, u64, String)> = moves
            .list()
            .into_iter()
            .map(|m| (m.shard, m.from_node, m.to_node, m.step))
            .collect();
        assert_eq!(
            listed,
            vec![
                (3, 1, 4, "leaving".to_owned()),
                (5, 1, 4, "joining".to_owned())
            ]
        );
        first.finished();
        drop(other);
        assert_eq!(moves.ended(), (1, 1), "one done, one failed");
        assert!(moves.list().is_empty());
        moves
            .start(shard, 2, 4)
            .expect("the shard moves again once the first ended");
    }
}
