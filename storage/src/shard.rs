//! One shard replica's state machine over storage: folds batches of committed entries into the
//! projections and stages them, with the applied index and digests, as one atomic write.
//!
//! ```text
//!   committed entries ──▶ ShardState::apply_batch ──▶ Batch { changes, next, results }
//!                                                          │ Db::commit (one WriteBatch)
//!                                                          ▼ then: state = next
//! ```
//!
//! Invariants (asserted): entries apply once, in strictly increasing log order (raft blank and
//! membership entries take indexes too and are passed with no payload); the applied index and
//! the digests are written in the same batch as the projections they describe.

use std::collections::BTreeMap;

use courier_proto::pb::events::EntryPayload;
use courier_proto::pb::store::{AppliedState, ProjectionDigest};
use courier_proto::{FORMAT_VERSION, LogIndex, ShardId, UserId};
use prost::Message;

use crate::cf::Cf;
use crate::error::{Result, StorageError};
use crate::keys;
use crate::kv::{Change, Digest, MemKv, ReadKv, Staged};
use crate::projection::{self, Applied, Projection};

/// One committed entry to apply: its index and, unless it is a raft blank or membership entry,
/// its events.
#[derive(Clone, Debug)]
pub struct Committed<'p> {
    /// The entry's log index.
    pub index: LogIndex,
    /// The events, or `None` for an entry without application payload.
    pub payload: Option<&'p EntryPayload>,
}

/// Every projection with an empty digest, so that states compare equal however they were made.
fn all_zero() -> BTreeMap<Projection, Digest> {
    Projection::ALL
        .into_iter()
        .map(|projection| (projection, Digest::default()))
        .collect()
}

/// What a shard replica has applied: the index, the digests, and the consensus layer's opaque
/// state (last applied log id and membership).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardState {
    /// The shard.
    pub shard: Option<ShardId>,
    /// The last applied log index.
    pub applied: LogIndex,
    /// Each projection's digest at `applied`.
    pub digests: BTreeMap<Projection, Digest>,
    /// Opaque bytes owned by the consensus layer.
    pub consensus_state: Vec<u8>,
}

/// The staged result of applying a batch: commit `changes`, then adopt `next`.
#[derive(Debug)]
pub struct Batch {
    /// Everything to write, including the new applied state.
    pub changes: Vec<Change>,
    /// The state after the batch.
    pub next: ShardState,
    /// Per entry, per event, what applying produced.
    pub results: Vec<Vec<Applied>>,
    /// Reads the fold made of the database (point reads that missed the batch's cache, and
    /// scans), and puts and deletes it staged: the cost counters of `make bench`.
    pub io: (u64, u64),
    /// What the batch changed that someone may be waiting for.
    pub touched: Touched,
}

/// What an applied batch changed that device streams and forwarders wait for: the users whose
/// inbox or receipt feed changed, and whether the outbox changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Users whose inbox (messages, state), receipts (status, feed) or devices changed, in
    /// order, once each.
    pub users: Vec<UserId>,
    /// The outbox changed (an entry queued or trimmed).
    pub outbox: bool,
    /// A device record changed (registration, revocation, link): cached device checks are void.
    pub devices: bool,
    /// A device's published keys or its stock of one-time prekeys changed (its user is in
    /// `users`): a stream's check of its stock may be stale.
    pub keys: bool,
}

/// Whether `key` of family `cf` is one of the time indexes the leader scans for what to forget
/// ([`keys::inbox_stub_by_time`], [`keys::receipt_by_time`]), which carry no user after their tag.
fn is_time_index(cf: Cf, key: &[u8]) -> bool {
    let tag = key.get(2).copied();
    match cf {
        Cf::Projection(Projection::Inbox) => tag == Some(keys::tag::QUATERNARY),
        Cf::Projection(Projection::Receipts) => tag == Some(keys::tag::TERTIARY),
        _ => false,
    }
}

impl Touched {
    /// Reads what `changes` (one batch's writes) touched.
    pub fn of(changes: &[Change]) -> Self {
        let mut touched = Self::default();
        for (cf, key, _) in changes {
            match cf {
                // The time indexes change only beside the records they name.
                Cf::Projection(Projection::Inbox | Projection::Receipts)
                    if is_time_index(*cf, key) => {}
                Cf::Projection(Projection::Inbox | Projection::Receipts) => {
                    if let Some(user) = keys::user_after_tag(key) {
                        touched.users.push(user);
                    }
                }
                Cf::Projection(Projection::Outbox) => touched.outbox = true,
                Cf::Projection(Projection::Devices) if keys::is_prekey_key(key) => {
                    touched.keys = true;
                    if let Some(user) = keys::user_after_tag(key) {
                        touched.users.push(user);
                    }
                }
                // Registration records (codes and limits) are no device's business.
                Cf::Projection(Projection::Devices) if !keys::is_device_key(key) => {}
                Cf::Projection(Projection::Devices) => {
                    touched.devices = true;
                    // The device's own streams wake and see it revoked.
                    if let Some(user) = keys::device_record_user(key) {
                        touched.users.push(user);
                    }
                }
                _ => {}
            }
        }
        touched.users.sort_unstable();
        touched.users.dedup();
        touched
    }
}

impl ShardState {
    /// A shard with nothing applied.
    pub fn empty(shard: ShardId) -> Self {
        Self {
            shard: Some(shard),
            digests: all_zero(),
            ..Self::default()
        }
    }

    fn shard_id(&self) -> ShardId {
        self.shard.expect("shard state belongs to a shard")
    }

    /// Loads the applied state of `shard` from `kv`.
    ///
    /// # Errors
    /// A storage fault, an undecodable applied state, or [`StorageError::InstallPending`] while
    /// a snapshot install of the shard is unfinished (its projections are then half written;
    /// [`crate::install::resume`] finishes it).
    pub fn load(kv: &dyn ReadKv, shard: ShardId) -> Result<Self> {
        if kv.get(Cf::Meta, &keys::snapshot_install(shard))?.is_some() {
            return Err(StorageError::InstallPending { shard });
        }
        Self::load_applied(kv, shard)
    }

    /// Loads the applied state of `shard` as stored, whether or not an install is unfinished.
    pub(crate) fn load_applied(kv: &dyn ReadKv, shard: ShardId) -> Result<Self> {
        let Some(value) = kv.get(Cf::Meta, &keys::applied_state(shard))? else {
            return Ok(Self::empty(shard));
        };
        let decode_err = |reason: String| StorageError::Decode {
            cf: Cf::Meta.name(),
            shard,
            what: "applied state".to_owned(),
            reason,
        };
        let stored =
            AppliedState::decode(value.as_slice()).map_err(|e| decode_err(e.to_string()))?;
        let mut digests = all_zero();
        for digest in stored.digests {
            let projection = Projection::from_name(&digest.projection)
                .ok_or_else(|| decode_err(format!("unknown projection {}", digest.projection)))?;
            let value = Digest::from_parts(&digest.digest, digest.entries)
                .ok_or_else(|| decode_err("digest is not 16 bytes".to_owned()))?;
            digests.insert(projection, value);
        }
        Ok(Self {
            shard: Some(shard),
            applied: LogIndex::new(stored.applied_index),
            digests,
            consensus_state: stored.consensus_state,
        })
    }

    /// The write that stores this state (its `meta` record).
    pub fn applied_state_record(&self) -> Change {
        (
            Cf::Meta,
            keys::applied_state(self.shard_id()),
            Some(self.to_applied_state().encode_to_vec()),
        )
    }

    /// The stored form of this state.
    pub fn to_applied_state(&self) -> AppliedState {
        AppliedState {
            applied_index: self.applied.get(),
            digests: Projection::ALL
                .into_iter()
                .map(|projection| {
                    let digest = self.digests.get(&projection).copied().unwrap_or_default();
                    ProjectionDigest {
                        projection: projection.name().to_owned(),
                        digest: digest.to_bytes(),
                        entries: digest.entries,
                    }
                })
                .collect(),
            consensus_state: self.consensus_state.clone(),
        }
    }

    /// Returns the digest of one projection.
    pub fn digest(&self, projection: Projection) -> Digest {
        self.digests.get(&projection).copied().unwrap_or_default()
    }

    /// Folds `entries` (in increasing index order, after `applied`) into a staged batch.
    /// `consensus_state` is stored as the consensus layer's state after the last entry.
    ///
    /// # Errors
    /// A storage fault, or [`StorageError::UnknownEvent`] for an event or format version this
    /// build does not know: the replica stops.
    ///
    /// # Panics
    /// On a repeated or decreasing index, or an event breaking a projection invariant.
    pub fn apply_batch(
        &self,
        kv: &dyn ReadKv,
        entries: &[Committed<'_>],
        consensus_state: Vec<u8>,
    ) -> Result<Batch> {
        let shard = self.shard_id();
        let mut staged = Staged::new(kv, self.digests.clone());
        let (applied, results) = self.fold(&mut staged, entries)?;
        let io = staged.io();
        let (mut changes, digests) = staged.finish();
        let touched = Touched::of(&changes);
        let next = ShardState {
            shard: Some(shard),
            applied,
            digests,
            consensus_state,
        };
        changes.push(next.applied_state_record());
        Ok(Batch {
            changes,
            next,
            results,
            io,
            touched,
        })
    }

    /// Folds `entries` as [`ShardState::apply_batch`] does, writing straight into `kv` (scratch
    /// memory: a replay), and adopts the state after them. Returns, per entry, what each event
    /// produced. The data (the applied-state record included) and the state equal those of
    /// `apply_batch` followed by `MemKv::write`.
    ///
    /// # Errors
    /// As `apply_batch`; `kv` then holds part of the batch and must be discarded.
    ///
    /// # Panics
    /// As `apply_batch`.
    pub fn apply_in_place(
        &mut self,
        kv: &mut MemKv,
        entries: &[Committed<'_>],
        consensus_state: Vec<u8>,
    ) -> Result<Vec<Vec<Applied>>> {
        let mut staged = Staged::direct(kv, self.digests.clone());
        let (applied, results) = self.fold(&mut staged, entries)?;
        let (changes, digests) = staged.finish();
        debug_assert!(changes.is_empty(), "a direct batch writes as it goes");
        self.applied = applied;
        self.digests = digests;
        self.consensus_state = consensus_state;
        kv.write([self.applied_state_record()]);
        Ok(results)
    }

    /// Applies `entries` through `staged`: the last index applied and, per entry, per event,
    /// what applying produced.
    fn fold(
        &self,
        staged: &mut Staged<'_>,
        entries: &[Committed<'_>],
    ) -> Result<(LogIndex, Vec<Vec<Applied>>)> {
        let shard = self.shard_id();
        let mut applied = self.applied;
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            // Strictly increasing; contiguity is raft's guarantee (openraft's storage suite feeds
            // gaps on purpose), and replays from the log check it when reading.
            assert!(
                entry.index > applied,
                "log entries apply once, in order: {} after {applied}",
                entry.index
            );
            applied = entry.index;
            let Some(payload) = entry.payload else {
                results.push(Vec::new());
                continue;
            };
            if payload.format_version > FORMAT_VERSION || payload.format_version == 0 {
                return Err(StorageError::UnknownEvent {
                    shard,
                    index: entry.index,
                    reason: format!(
                        "format version {} (this build reads 1..={FORMAT_VERSION})",
                        payload.format_version
                    ),
                });
            }
            let mut entry_results = Vec::with_capacity(payload.events.len());
            for event in &payload.events {
                let event = projection::as_written_in(payload.format_version, event);
                entry_results.push(projection::apply_event(staged, shard, entry.index, &event)?);
            }
            results.push(entry_results);
        }
        Ok((applied, results))
    }
}
