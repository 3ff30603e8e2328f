//! Shard snapshots: a shard's projections and applied state at one index, as a stream of
//! chunks, for raft snapshots and for seeding a new replica. After a snapshot is durable, the
//! log below it can be purged.
//!
//! Installing verifies the data against the digests the snapshot carries before anything is
//! written, then replaces the shard's projections and applied state in one atomic batch.

use courier_proto::pb::store::{AppliedState, SnapshotChunk, SnapshotRecord};
use courier_proto::{LogIndex, ShardId};
use prost::Message;

use crate::cf::Cf;
use crate::error::{Result, StorageError};
use crate::keys;
use crate::kv::{Change, Digest, ReadKv};
use crate::projection::Projection;
use crate::shard::ShardState;

/// Records per chunk when exporting.
pub const SNAPSHOT_CHUNK_RECORDS: usize = 4096;

/// Calls `emit` with each chunk of the shard `state` describes, in order, none marked last: the
/// applied state, then each projection's records in pages of [`SNAPSHOT_CHUNK_RECORDS`].
fn for_each_chunk(
    kv: &dyn ReadKv,
    state: &ShardState,
    emit: &mut dyn FnMut(SnapshotChunk) -> Result<()>,
) -> Result<()> {
    let shard = state.shard.expect("state names its shard");
    emit(SnapshotChunk {
        applied: Some(state.to_applied_state()),
        records: Vec::new(),
        last: false,
    })?;
    for projection in Projection::ALL {
        let cf = Cf::Projection(projection);
        let (mut from, to) = keys::shard_range(shard);
        loop {
            let page = kv.scan(cf, &from, &to, SNAPSHOT_CHUNK_RECORDS)?;
            let Some((last_key, _)) = page.last() else {
                break;
            };
            let mut next = last_key.clone();
            next.push(0);
            let full = page.len() == SNAPSHOT_CHUNK_RECORDS;
            emit(SnapshotChunk {
                applied: None,
                records: page
                    .into_iter()
                    .map(|(key, value)| SnapshotRecord {
                        cf: cf.name().to_owned(),
                        key,
                        value,
                    })
                    .collect(),
                last: false,
            })?;
            if !full {
                break;
            }
            from = next;
        }
    }
    Ok(())
}

/// Exports the projections of `state`'s shard, read from `kv` at `state.applied`.
///
/// # Errors
/// A storage fault.
pub fn export(kv: &dyn ReadKv, state: &ShardState) -> Result<Vec<SnapshotChunk>> {
    let mut chunks = Vec::new();
    for_each_chunk(kv, state, &mut |chunk| {
        chunks.push(chunk);
        Ok(())
    })?;
    if let Some(last) = chunks.last_mut() {
        last.last = true;
    }
    Ok(chunks)
}

/// Exports like [`export`], writing each chunk to `out` as soon as it is read (the bytes
/// [`encode`] would make of [`export`]'s chunks): at most two chunks are in memory, whatever the
/// shard's size. Returns the bytes written.
///
/// # Errors
/// A storage fault, or [`StorageError::Disk`] when `out` fails.
pub fn export_to(kv: &dyn ReadKv, state: &ShardState, out: &mut dyn std::io::Write) -> Result<u64> {
    let mut written = 0_u64;
    let mut write = |chunk: &SnapshotChunk| -> Result<()> {
        let bytes = chunk.encode_length_delimited_to_vec();
        out.write_all(&bytes).map_err(|error| StorageError::Disk {
            op: "write snapshot",
            reason: error.to_string(),
        })?;
        written = written.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        Ok(())
    };
    // Held back one chunk: only the end of the scan tells which chunk is the last.
    let mut pending: Option<SnapshotChunk> = None;
    for_each_chunk(kv, state, &mut |chunk| match pending.replace(chunk) {
        Some(previous) => write(&previous),
        None => Ok(()),
    })?;
    let mut last = pending.expect("the applied state's chunk is always emitted");
    last.last = true;
    write(&last)?;
    Ok(written)
}

/// Encodes chunks as one byte stream (length-delimited), for transports that want one blob.
pub fn encode(chunks: &[SnapshotChunk]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in chunks {
        chunk
            .encode_length_delimited(&mut out)
            .expect("a Vec grows as needed");
    }
    out
}

/// Decodes a byte stream written by [`encode`].
///
/// # Errors
/// [`StorageError::Snapshot`] on malformed input.
pub fn decode(shard: ShardId, mut bytes: &[u8]) -> Result<Vec<SnapshotChunk>> {
    let mut chunks = Vec::new();
    while !bytes.is_empty() {
        let chunk = SnapshotChunk::decode_length_delimited(&mut bytes).map_err(|error| {
            StorageError::Snapshot {
                shard,
                reason: error.to_string(),
            }
        })?;
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// A verified snapshot, ready to replace a shard's projections.
#[derive(Debug)]
pub struct Install {
    /// Key ranges to clear first: each projection's range of the shard.
    pub clear: Vec<(Cf, Vec<u8>, Vec<u8>)>,
    /// Records and the applied state to write.
    pub changes: Vec<Change>,
    /// The shard's state once installed.
    pub state: ShardState,
}

/// Checks a snapshot's chunks one at a time, in order, holding only the running digests: the
/// first carries the applied state, every record names a projection and a key of the shard,
/// nothing follows the last chunk, and at the end each projection matches its digest.
#[derive(Debug)]
pub struct Verifier {
    shard: ShardId,
    range: (Vec<u8>, Vec<u8>),
    state: Option<(ShardState, AppliedState)>,
    digests: std::collections::BTreeMap<Projection, Digest>,
    saw_last: bool,
}

impl Verifier {
    /// A verifier of a snapshot of `shard`.
    pub fn new(shard: ShardId) -> Self {
        Self {
            shard,
            range: keys::shard_range(shard),
            state: None,
            digests: std::collections::BTreeMap::new(),
            saw_last: false,
        }
    }

    fn bad(&self, reason: String) -> StorageError {
        StorageError::Snapshot {
            shard: self.shard,
            reason,
        }
    }

    /// Checks the next chunk and returns the family of each of its records, in order.
    ///
    /// # Errors
    /// [`StorageError::Snapshot`] when the chunk is out of shape, names an unknown family or
    /// holds a key outside the shard.
    pub fn check(&mut self, chunk: &SnapshotChunk) -> Result<Vec<Projection>> {
        match (&self.state, &chunk.applied) {
            (None, Some(applied)) => {
                let mut kv = crate::kv::MemKv::default();
                kv.write([(
                    Cf::Meta,
                    keys::applied_state(self.shard),
                    Some(applied.encode_to_vec()),
                )]);
                self.state = Some((ShardState::load(&kv, self.shard)?, applied.clone()));
            }
            (None, None) => return Err(self.bad("first chunk carries no applied state".to_owned())),
            (Some(_), Some(_)) => return Err(self.bad("a second applied state".to_owned())),
            (Some(_), None) => {}
        }
        if self.saw_last && !chunk.records.is_empty() {
            return Err(self.bad("records after the last chunk".to_owned()));
        }
        self.saw_last |= chunk.last;
        let mut families = Vec::with_capacity(chunk.records.len());
        for record in &chunk.records {
            let projection = Projection::from_name(&record.cf)
                .ok_or_else(|| self.bad(format!("unknown column family {:?}", record.cf)))?;
            if record.key < self.range.0 || record.key >= self.range.1 {
                return Err(self.bad(format!(
                    "key {} outside the shard",
                    courier_proto::hex(&record.key)
                )));
            }
            self.digests
                .entry(projection)
                .or_default()
                .add(&record.key, &record.value);
            families.push(projection);
        }
        Ok(families)
    }

    /// The applied index the snapshot installs, once the first chunk was checked.
    pub fn applied(&self) -> Option<LogIndex> {
        self.state.as_ref().map(|(state, _)| state.applied)
    }

    /// Checks the next chunk ([`Verifier::check`]) and returns its records as the writes that
    /// install them.
    ///
    /// # Errors
    /// As [`Verifier::check`].
    pub fn changes(&mut self, chunk: SnapshotChunk) -> Result<Vec<Change>> {
        let families = self.check(&chunk)?;
        Ok(families
            .into_iter()
            .zip(chunk.records)
            .map(|(projection, record)| {
                (Cf::Projection(projection), record.key, Some(record.value))
            })
            .collect())
    }

    /// Ends the check: returns the shard's state once the snapshot is installed, and the
    /// applied state as the snapshot carries it (to be stored as it is).
    ///
    /// # Errors
    /// [`StorageError::Snapshot`] when there were no chunks, no last chunk, or a projection does
    /// not match its digest.
    pub fn finish(self) -> Result<(ShardState, AppliedState)> {
        let Some((state, _)) = &self.state else {
            return Err(self.bad("no chunks".to_owned()));
        };
        if !self.saw_last {
            return Err(self.bad("stream ended before the last chunk".to_owned()));
        }
        for projection in Projection::ALL {
            let got = self.digests.get(&projection).copied().unwrap_or_default();
            if got != state.digest(projection) {
                return Err(self.bad(format!(
                    "projection {} does not match its digest",
                    projection.name()
                )));
            }
        }
        Ok(self.state.expect("checked above"))
    }
}

/// The key ranges an install clears first: each projection's range of `shard`.
pub(crate) fn projection_ranges(shard: ShardId) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
    let (start, end) = keys::shard_range(shard);
    Projection::ALL
        .into_iter()
        .map(|projection| (Cf::Projection(projection), start.clone(), end.clone()))
        .collect()
}

/// Verifies `chunks` for `shard` and prepares their installation in one batch (the whole shard
/// in memory; [`crate::install`] installs from a file in bounded memory).
///
/// # Errors
/// [`StorageError::Snapshot`] when the chunks are out of shape, name an unknown family, hold a
/// key outside the shard, or do not match their own digests.
pub fn prepare_install(shard: ShardId, chunks: Vec<SnapshotChunk>) -> Result<Install> {
    let mut verifier = Verifier::new(shard);
    let mut changes = Vec::new();
    for chunk in chunks {
        changes.extend(verifier.changes(chunk)?);
    }
    let (state, applied) = verifier.finish()?;
    changes.push((
        Cf::Meta,
        keys::applied_state(shard),
        Some(applied.encode_to_vec()),
    ));
    Ok(Install {
        clear: projection_ranges(shard),
        changes,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    /// A shard of several chunks streams the bytes of the whole export, chunk boundaries and
    /// the last-chunk mark included.
    #[test]
    fn streaming_export_of_many_chunks_equals_the_whole_export() {
        let shard = ShardId::new(3);
        let (start, _) = keys::shard_range(shard);
        let mut kv = MemKv::default();
        let records = SNAPSHOT_CHUNK_RECORDS * 2 + 7;
        kv.write((0..records).map(|i| {
            let mut key = start.clone();
            key.extend_from_slice(&u64::try_from(i).expect("small").to_be_bytes());
            (Cf::Projection(Projection::Inbox), key, Some(vec![1; 8]))
        }));
        let state = ShardState::empty(shard);
        let whole = export(&kv, &state).expect("memory");
        assert_eq!(whole.len(), 4, "the applied state, then three pages");
        let mut streamed = Vec::new();
        export_to(&kv, &state, &mut streamed).expect("memory");
        assert_eq!(streamed, encode(&whole));
        let decoded = decode(shard, &streamed).expect("decodes");
        assert!(decoded.last().is_some_and(|c| c.last));
        assert_eq!(decoded.iter().filter(|c| c.last).count(), 1);
    }
}
