//! Verify checkpoints: a shard's projections and applied state at one log index, attested by a
//! verify whose replay (from index 1, or from an earlier checkpoint) matched the live replica at
//! that index digest for digest. A later verify starts from the newest checkpoint at or below its
//! applied index and replays only the entries after it; `--from-genesis` replays everything.
//!
//! Stored in the archive beside the shard's segments (`shard-SSSSS/I.ckpt`,
//! [`crate::segment::checkpoint_name`]), in the snapshot
//! encoding ([`crate::snapshot`]) followed by a crc32c of those bytes. Reading one checks the
//! crc, then every projection against the digests its applied state carries (the attestation),
//! and that it is the state at the index its name says.

use courier_proto::{LogIndex, ShardId};

use crate::archive::SegmentStore;
use crate::error::{Result, StorageError};
use crate::kv::MemKv;
use crate::shard::ShardState;
use crate::snapshot;

/// The newest of `shard`'s checkpoints at or below `up_to`, checked; `None` when there is none.
///
/// # Errors
/// The store failed, or the checkpoint is damaged (a verify `--from-genesis` does not read it),
/// or it is larger than `memory_max` ([`StorageError::ReplayTooLarge`], before decoding it).
pub fn latest(
    archive: &dyn SegmentStore,
    shard: ShardId,
    up_to: LogIndex,
    memory_max: usize,
) -> Result<Option<(MemKv, ShardState)>> {
    let Some(index) = archive
        .checkpoints(shard)?
        .into_iter()
        .filter(|index| *index <= up_to)
        .max()
    else {
        return Ok(None);
    };
    let bytes = archive.read_checkpoint(shard, index)?;
    // Its pairs take at least their encoded bytes once decoded: refused before the copies.
    crate::error::within_memory(shard, index, bytes.len(), memory_max)?;
    decode(shard, index, &bytes).map(Some)
}

/// The checkpoint bytes of a verified replay's projections `kv` at `state`.
///
/// # Errors
/// A storage fault while exporting.
pub fn encode(kv: &MemKv, state: &ShardState) -> Result<Vec<u8>> {
    let mut bytes = snapshot::encode(&snapshot::export(kv, state)?);
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_be_bytes());
    Ok(bytes)
}

/// The state `bytes` hold, checked: crc, digests, and that it is `shard`'s state at `index`.
///
/// # Errors
/// [`StorageError::Snapshot`] naming what does not hold.
pub fn decode(shard: ShardId, index: LogIndex, bytes: &[u8]) -> Result<(MemKv, ShardState)> {
    let bad = |reason: String| StorageError::Snapshot {
        shard,
        reason: format!("checkpoint at {index}: {reason}"),
    };
    let split = bytes
        .len()
        .checked_sub(4)
        .ok_or_else(|| bad("shorter than its checksum".to_owned()))?;
    let (body, crc) = bytes.split_at(split);
    let crc = u32::from_be_bytes(crc.try_into().map_err(|_| bad("checksum".to_owned()))?);
    if crc32c::crc32c(body) != crc {
        return Err(bad("checksum mismatch".to_owned()));
    }
    let install = snapshot::prepare_install(shard, snapshot::decode(shard, body)?)?;
    if install.state.applied != index {
        return Err(bad(format!(
            "holds the state at {}, not {index}",
            install.state.applied
        )));
    }
    let mut kv = MemKv::default();
    kv.write(install.changes);
    Ok((kv, install.state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_only_whole_and_at_its_index() {
        let shard = ShardId::new(3);
        let bytes = encode(&MemKv::default(), &ShardState::empty(shard)).expect("encode");
        let (_, state) = decode(shard, LogIndex::new(0), &bytes).expect("reads back");
        assert_eq!(state.applied, LogIndex::new(0));
        let wrong_index = decode(shard, LogIndex::new(1), &bytes).expect_err("another index");
        assert!(wrong_index.to_string().contains("not 1"), "{wrong_index}");
        let mut damaged = bytes.clone();
        damaged[0] ^= 1;
        let damaged = decode(shard, LogIndex::new(0), &damaged).expect_err("damaged");
        assert!(damaged.to_string().contains("checksum"), "{damaged}");
        assert!(decode(shard, LogIndex::new(0), &bytes[..3]).is_err());
    }

    /// A checkpoint larger than the memory a replay may take is refused before it is decoded.
    #[test]
    fn a_checkpoint_past_the_memory_bound_is_not_decoded() {
        let shard = ShardId::new(3);
        let at = LogIndex::new(0);
        let bytes = encode(&MemKv::default(), &ShardState::empty(shard)).expect("encode");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(crate::segment::checkpoint_name(shard, at));
        std::fs::create_dir_all(path.parent().expect("in a shard directory")).expect("mkdir");
        std::fs::write(&path, &bytes).expect("write");
        let archive = crate::archive::DirArchive::new(dir.path());
        match latest(&archive, shard, at, bytes.len() - 1) {
            Err(StorageError::ReplayTooLarge {
                bytes: got, max, ..
            }) => {
                assert_eq!((got, max), (bytes.len(), bytes.len() - 1));
            }
            other => panic!(
                "expected ReplayTooLarge, got {:?}",
                other.map(|c| c.map(|c| c.1))
            ),
        }
        let (_, state) = latest(&archive, shard, at, bytes.len())
            .expect("within the bound")
            .expect("found");
        assert_eq!(state.applied, at);
    }
}
