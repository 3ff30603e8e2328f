//! Installing a received raft snapshot in bounded memory, crash-safe, on a real disk.
//!
//! A snapshot is the whole shard, so it cannot go into one atomic write batch without holding
//! the whole shard in memory twice (the decoded chunks and the batch). Instead:
//!
//! ```text
//!   stage:    received bytes ──verify chunk by chunk──▶ install file (named, fsynced) ──▶ marker "staged" (synced)
//!   complete: verify the file again ──▶ clear the shard's projections, marker "writing" ──▶ log truncation (synced)
//!             ──▶ each chunk, one batch ──▶ applied state + marker gone (synced)
//!   resume:   at open, a marker left by a stop ─▶ complete again, from the install file
//! ```
//!
//! Nothing of the shard is written before the whole snapshot verified against its digests, so a
//! bad snapshot changes nothing: a staged install whose file no longer verifies is abandoned
//! (marker and file removed) and the shard stays as it was. Once the marker says "writing" the
//! shard's projections are half written until the install ends: [`crate::ShardState::load`]
//! refuses the shard, readers are told to retry ([`crate::Db::read_stamp`]), and opening the node
//! finishes the install from the file (clearing again first, so completing is idempotent). The
//! applied state moves in the last write only, together with the marker's removal. Completing
//! verifies the file as it writes it, so a disk that corrupted the file after it was checked
//! stops the replica instead of installing bad data.
//!
//! At most one chunk ([`crate::snapshot::SNAPSHOT_CHUNK_RECORDS`] records) is in memory, with
//! its encoded bytes.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use courier_proto::pb::store::SnapshotChunk;
use courier_proto::{LogIndex, ShardId};
use prost::Message;

use crate::cf::Cf;
use crate::db::Db;
use crate::error::{Result, StorageError};
use crate::keys;
use crate::kv::{Change, ReadKv};
use crate::log::LogStore;
use crate::shard::ShardState;
use crate::snapshot::{Verifier, projection_ranges};

/// The largest encoded chunk an install reads (a length above it is corruption, not a chunk:
/// an export page is [`crate::snapshot::SNAPSHOT_CHUNK_RECORDS`] records of bounded size).
pub const INSTALL_CHUNK_BYTES_MAX: u64 = 512 << 20;

/// The marker's phase: the install file is whole and verified, nothing of the shard written.
const STAGED: u8 = 0;
/// The marker's phase: the shard's projections were cleared; only finishing makes them whole.
const WRITING: u8 = 1;

fn disk_error(op: &'static str) -> impl Fn(std::io::Error) -> StorageError {
    move |error| StorageError::Disk {
        op,
        reason: error.to_string(),
    }
}

/// Reads length-delimited [`SnapshotChunk`]s one at a time.
struct ChunkReader<R> {
    input: R,
    shard: ShardId,
}

impl<R: Read> ChunkReader<R> {
    /// The next chunk and its encoded bytes (length prefix included), or `None` at the end.
    fn next(&mut self) -> Result<Option<(SnapshotChunk, Vec<u8>)>> {
        let bad = |reason: String| StorageError::Snapshot {
            shard: self.shard,
            reason,
        };
        let mut raw = Vec::with_capacity(10);
        let mut length = 0_u64;
        loop {
            let mut byte = [0_u8; 1];
            let read = self
                .input
                .read(&mut byte)
                .map_err(disk_error("read snapshot"))?;
            if read == 0 {
                return if raw.is_empty() {
                    Ok(None)
                } else {
                    Err(bad("stream ends inside a length".to_owned()))
                };
            }
            // A varint's tenth byte holds the top bit of a u64 and nothing else.
            if raw.len() == 9 && byte[0] > 1 {
                return Err(bad("a length longer than 64 bits".to_owned()));
            }
            let shift = u32::try_from(raw.len().saturating_mul(7)).unwrap_or(u32::MAX);
            raw.push(byte[0]);
            length |= u64::from(byte[0] & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        if length > INSTALL_CHUNK_BYTES_MAX {
            return Err(bad(format!("a chunk of {length} bytes")));
        }
        let header = raw.len();
        // Grows as bytes arrive: a corrupt length allocates no more than the stream holds.
        (&mut self.input)
            .take(length)
            .read_to_end(&mut raw)
            .map_err(disk_error("read snapshot"))?;
        if u64::try_from(raw.len().saturating_sub(header)).unwrap_or(u64::MAX) < length {
            return Err(bad("stream ends inside a chunk".to_owned()));
        }
        let chunk =
            SnapshotChunk::decode(&raw[header..]).map_err(|error| bad(error.to_string()))?;
        Ok(Some((chunk, raw)))
    }
}

/// Where `shard`'s install file lives: in the database's directory.
fn install_file(db: &Db, shard: ShardId) -> Result<PathBuf> {
    let dir = db.spool_dir().ok_or_else(|| StorageError::Disk {
        op: "install snapshot",
        reason: "this disk has no files (install in one batch instead)".to_owned(),
    })?;
    Ok(dir.join(format!("snapshot-install-{:05}.chunks", shard.get())))
}

fn open_chunks(db: &Db, shard: ShardId) -> Result<ChunkReader<BufReader<File>>> {
    let path = install_file(db, shard)?;
    Ok(ChunkReader {
        input: BufReader::new(File::open(&path).map_err(disk_error("open install file"))?),
        shard,
    })
}

/// The marker of an install of `shard` at `index` in `phase`.
fn marker(shard: ShardId, index: LogIndex, phase: u8) -> Change {
    let mut value = index.get().to_be_bytes().to_vec();
    value.push(phase);
    (Cf::Meta, keys::snapshot_install(shard), Some(value))
}

/// The index and phase of `shard`'s unfinished install, if there is one.
fn read_marker(kv: &dyn ReadKv, shard: ShardId) -> Result<Option<(LogIndex, u8)>> {
    let Some(value) = kv.get(Cf::Meta, &keys::snapshot_install(shard))? else {
        return Ok(None);
    };
    match value.as_slice() {
        [index @ .., phase] if index.len() == 8 => {
            let index = <[u8; 8]>::try_from(index).expect("length checked");
            Ok(Some((LogIndex::new(u64::from_be_bytes(index)), *phase)))
        }
        _ => Err(StorageError::Decode {
            cf: Cf::Meta.name(),
            shard,
            what: "snapshot install marker".to_owned(),
            reason: format!("{} bytes", value.len()),
        }),
    }
}

/// The shards of `kv` (a node's database or a checkpoint of one) with an unfinished install.
///
/// # Errors
/// A storage fault.
pub fn pending(kv: &dyn ReadKv) -> Result<Vec<ShardId>> {
    let pairs = kv.scan(Cf::Meta, &[], &[0xff; 4], usize::MAX)?;
    Ok(pairs
        .into_iter()
        .filter_map(|(key, _)| {
            let shard = keys::key_shard(&key)?;
            (keys::snapshot_install(shard) == key).then_some(shard)
        })
        .collect())
}

/// Installs the snapshot of `shard` that `input` holds (the bytes `snapshot::export_to` wrote):
/// [`stage`], then [`complete`]. Returns the shard's state once installed.
///
/// # Errors
/// [`StorageError::Snapshot`] when the snapshot is bad (nothing was written), or a storage
/// fault (the install is then resumed when the database is next opened).
pub fn install(db: &Arc<Db>, shard: ShardId, input: impl Read) -> Result<ShardState> {
    stage(db, shard, input)?;
    complete(db, shard)
}

/// Verifies the whole snapshot in `input`, copies it to the shard's install file (fsynced), and
/// marks the install as staged (a synced write). From here on the install will finish, now or
/// when the database is next opened, unless the file no longer verifies then.
///
/// # Errors
/// [`StorageError::Snapshot`] when the snapshot is bad: the file is removed and nothing was
/// written to the database. [`StorageError::Disk`] or [`StorageError::Db`] on a fault, and when
/// an earlier install of the shard is unfinished.
pub fn stage(db: &Arc<Db>, shard: ShardId, input: impl Read) -> Result<ShardState> {
    if read_marker(db.as_ref(), shard)?.is_some() {
        return Err(StorageError::Disk {
            op: "stage snapshot install",
            reason: format!("an earlier install of {shard} is unfinished"),
        });
    }
    let path = install_file(db, shard)?;
    let copied = (|| {
        let mut out =
            BufWriter::new(File::create(&path).map_err(disk_error("create install file"))?);
        let mut verifier = Verifier::new(shard);
        let mut reader = ChunkReader {
            input: BufReader::new(input),
            shard,
        };
        while let Some((chunk, raw)) = reader.next()? {
            verifier.check(&chunk)?;
            out.write_all(&raw)
                .map_err(disk_error("write install file"))?;
        }
        let (state, _) = verifier.finish()?;
        let file = out
            .into_inner()
            .map_err(|error| disk_error("write install file")(error.into_error()))?;
        file.sync_all().map_err(disk_error("sync install file"))?;
        Ok(state)
    })();
    let state = match copied {
        Ok(state) => state,
        Err(error) => {
            // Nothing refers to the file yet; a failure to remove it leaves only a stray file
            // (removed when the shard next opens).
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
    };
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(disk_error("sync database directory"))?;
    }
    db.commit([marker(shard, state.applied, STAGED)], true)?;
    Ok(state)
}

/// Reads `shard`'s install file through and checks it, writing nothing.
fn verify_file(db: &Db, shard: ShardId) -> Result<()> {
    let mut reader = open_chunks(db, shard)?;
    let mut verifier = Verifier::new(shard);
    while let Some((chunk, _)) = reader.next()? {
        verifier.check(&chunk)?;
    }
    verifier.finish().map(|_| ())
}

/// Drops a staged install: the marker goes (synced), then the file. The shard was not touched.
fn abandon(db: &Db, shard: ShardId) -> Result<()> {
    db.commit([(Cf::Meta, keys::snapshot_install(shard), None)], true)?;
    let _ = std::fs::remove_file(install_file(db, shard)?);
    Ok(())
}

/// Writes the staged install of `shard` into the database (see the module docs) and removes
/// its file. Returns the shard's state once installed.
///
/// # Errors
/// [`StorageError::Snapshot`] when the install file no longer matches its digests (a staged
/// install is then abandoned, leaving the shard as it was), or a fault.
pub fn complete(db: &Arc<Db>, shard: ShardId) -> Result<ShardState> {
    complete_batches(db, shard, usize::MAX)?.ok_or_else(|| StorageError::Disk {
        op: "install snapshot",
        reason: "stopped before the end".to_owned(),
    })
}

/// [`complete`], stopping after `batches` chunk writes (`None`: stopped; a crash in tests).
fn complete_batches(db: &Arc<Db>, shard: ShardId, batches: usize) -> Result<Option<ShardState>> {
    let Some((index, phase)) = read_marker(db.as_ref(), shard)? else {
        return Err(StorageError::Disk {
            op: "install snapshot",
            reason: format!("no install of {shard} is pending"),
        });
    };
    if phase == STAGED
        && let Err(error) = verify_file(db, shard)
    {
        abandon(db, shard)?;
        return Err(error);
    }
    db.begin_install(shard);
    let before = ShardState::load_applied(db.as_ref(), shard)?;
    let mut reader = open_chunks(db, shard)?;
    let mut verifier = Verifier::new(shard);
    let (first, _) = reader.next()?.ok_or_else(|| StorageError::Snapshot {
        shard,
        reason: "the install file is empty".to_owned(),
    })?;
    verifier.check(&first)?;
    db.replace_ranges(
        &projection_ranges(shard),
        vec![marker(shard, index, WRITING)],
        false,
    )?;
    // Entries above what this replica applied and up to the snapshot may be an old leader's,
    // never committed: delete them before the archiver (which archives what is at or below the
    // applied index) could take them for committed ones. Synced: the clear above is durable too.
    LogStore::new(db.clone(), shard).delete_between(before.applied.next(), index.next())?;
    let mut written = 0_usize;
    while let Some((chunk, _)) = reader.next()? {
        if written == batches {
            return Ok(None);
        }
        db.commit(verifier.changes(chunk)?, false)?;
        written = written.saturating_add(1);
    }
    let (state, applied) = verifier.finish()?;
    db.commit(
        [
            (
                Cf::Meta,
                keys::applied_state(shard),
                Some(applied.encode_to_vec()),
            ),
            (Cf::Meta, keys::snapshot_install(shard), None),
        ],
        true,
    )?;
    db.end_install(shard);
    // The install is durable: a file left behind is removed when the shard next opens.
    let _ = std::fs::remove_file(install_file(db, shard)?);
    Ok(Some(state))
}

/// What [`resume`] did with an install a stop interrupted.
#[derive(Debug)]
pub enum Resumed {
    /// Finished it: the shard's state now.
    Finished(ShardState),
    /// Dropped it, before anything of the shard was written, because its file no longer
    /// verified: the shard is as it was before the install (raft sends a snapshot again).
    Abandoned(StorageError),
}

/// Finishes an install of `shard` that a stop interrupted, if there is one, and removes a stray
/// install file otherwise.
///
/// # Errors
/// As [`complete`] once the shard's projections were cleared (the replica cannot open: reseed
/// it, RUNBOOK "Backups"); [`StorageError::Disk`] when the install file is then missing.
pub fn resume(db: &Arc<Db>, shard: ShardId) -> Result<Option<Resumed>> {
    let Some((_, phase)) = read_marker(db.as_ref(), shard)? else {
        if let Ok(path) = install_file(db, shard) {
            let _ = std::fs::remove_file(path);
        }
        return Ok(None);
    };
    match complete(db, shard) {
        Ok(state) => Ok(Some(Resumed::Finished(state))),
        Err(error) if phase == STAGED && read_marker(db.as_ref(), shard)?.is_none() => {
            Ok(Some(Resumed::Abandoned(error)))
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::OpenMode;
    use crate::kv::MemKv;
    use crate::projection::Projection;
    use crate::snapshot;
    use courier_proto::LogIndex;

    const SHARD: ShardId = ShardId::new(4);

    /// A shard of a few pages in memory and the bytes of its snapshot at index 40.
    fn snapshot_bytes(records: usize, fill: u8) -> (MemKv, Vec<u8>) {
        let (start, _) = keys::shard_range(SHARD);
        let mut kv = MemKv::default();
        let mut state = ShardState::empty(SHARD);
        let mut digest = crate::kv::Digest::default();
        kv.write((0..records).map(|i| {
            let mut key = start.clone();
            key.extend_from_slice(&u64::try_from(i).expect("small").to_be_bytes());
            digest.add(&key, &[fill; 16]);
            (Cf::Projection(Projection::Inbox), key, Some(vec![fill; 16]))
        }));
        state.digests.insert(Projection::Inbox, digest);
        state.applied = LogIndex::new(40);
        let mut bytes = Vec::new();
        snapshot::export_to(&kv, &state, &mut bytes).expect("memory");
        (kv, bytes)
    }

    fn projection_pairs(db: &Db) -> Vec<(Vec<u8>, Vec<u8>)> {
        let (start, end) = keys::shard_range(SHARD);
        db.scan(Cf::Projection(Projection::Inbox), &start, &end, usize::MAX)
            .expect("scan")
    }

    /// Goal: an install interrupted after any number of chunk writes is finished at the next open
    /// and ends exactly as an uninterrupted one, with no marker and no file left. Method: a
    /// shard already holding other records gets a three-page snapshot, stopped after 0, 1 and 2
    /// chunk writes, then the database is reopened and resumed.
    #[test]
    fn an_interrupted_install_is_finished_at_the_next_open() {
        let records = snapshot::SNAPSHOT_CHUNK_RECORDS * 2 + 9;
        let (expected_kv, bytes) = snapshot_bytes(records, 7);
        let (start, end) = keys::shard_range(SHARD);
        let expected = expected_kv
            .scan(Cf::Projection(Projection::Inbox), &start, &end, usize::MAX)
            .expect("memory");
        for stop_after in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            {
                let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("open"));
                // Records the snapshot does not hold: they must be gone afterwards.
                let (_, old) = snapshot_bytes(records + 100, 3);
                install(&db, SHARD, old.as_slice()).expect("first install");
                stage(&db, SHARD, bytes.as_slice()).expect("stage");
                assert!(
                    complete_batches(&db, SHARD, stop_after)
                        .expect("writes")
                        .is_none()
                );
                assert!(db.read_stamp(SHARD).is_none(), "readers are held off");
                assert!(matches!(
                    ShardState::load(db.as_ref(), SHARD),
                    Err(StorageError::InstallPending { .. })
                ));
            }
            let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("reopen"));
            let Some(Resumed::Finished(state)) = resume(&db, SHARD).expect("resumes") else {
                panic!("the install was pending");
            };
            assert_eq!(state.applied, LogIndex::new(40));
            assert_eq!(ShardState::load(db.as_ref(), SHARD).expect("loads"), state);
            assert_eq!(
                projection_pairs(&db),
                expected,
                "stopped after {stop_after}"
            );
            assert!(db.read_stamp(SHARD).is_some());
            assert!(resume(&db, SHARD).expect("nothing pending").is_none());
            assert!(!install_file(&db, SHARD).expect("a real disk").exists());
        }
    }

    /// Goal: a staged install whose file no longer verifies when the node opens is abandoned,
    /// leaving the shard exactly as it was, and a stray install file with no marker is removed.
    /// Method: stage a snapshot over an installed one, flip a byte of the install file, reopen;
    /// then leave a file with no marker and reopen.
    #[test]
    fn a_staged_install_whose_file_went_bad_is_abandoned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, old) = snapshot_bytes(300, 3);
        let (_, new) = snapshot_bytes(500, 7);
        let (state, before) = {
            let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("open"));
            let state = install(&db, SHARD, old.as_slice()).expect("first install");
            stage(&db, SHARD, new.as_slice()).expect("stage");
            assert_eq!(pending(db.as_ref()).expect("scan"), vec![SHARD]);
            (state, projection_pairs(&db))
        };
        let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("reopen"));
        let path = install_file(&db, SHARD).expect("a real disk");
        let mut bytes = std::fs::read(&path).expect("the install file");
        let at = bytes.len() - 4;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).expect("corrupt it");
        let resumed = resume(&db, SHARD).expect("opens");
        assert!(
            matches!(
                resumed,
                Some(Resumed::Abandoned(StorageError::Snapshot { .. }))
            ),
            "{resumed:?}"
        );
        assert_eq!(ShardState::load(db.as_ref(), SHARD).expect("loads"), state);
        assert_eq!(projection_pairs(&db), before);
        assert!(pending(db.as_ref()).expect("scan").is_empty());
        assert!(!path.exists());
        std::fs::write(&path, b"left by a stop before the marker").expect("stray file");
        assert!(resume(&db, SHARD).expect("opens").is_none());
        assert!(!path.exists(), "the stray file is removed");
    }

    /// Goal: a bad snapshot changes nothing and leaves no file. Method: install a good one,
    /// then one whose records do not match its digests, and one cut short.
    #[test]
    fn a_bad_snapshot_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(dir.path(), OpenMode::ReadWrite).expect("open"));
        let (_, good) = snapshot_bytes(50, 1);
        let state = install(&db, SHARD, good.as_slice()).expect("installs");
        let before = projection_pairs(&db);
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last - 3] ^= 0x01;
        let cut = &good[..good.len() / 2];
        for bad in [flipped.as_slice(), cut] {
            let error = install(&db, SHARD, bad).expect_err("refused");
            assert!(matches!(error, StorageError::Snapshot { .. }), "{error}");
            assert_eq!(projection_pairs(&db), before);
            assert_eq!(ShardState::load(db.as_ref(), SHARD).expect("loads"), state);
            assert!(!install_file(&db, SHARD).expect("a real disk").exists());
            assert!(db.read_stamp(SHARD).is_some());
        }
    }
}
