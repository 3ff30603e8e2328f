//! Archive segments: a run of consecutive log entries of one shard as one immutable,
//! checksummed file, written to the log archive before raft purges them.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! header   "CSEG" | version u8 = 1 | shard u16 | first index u64 | count u32
//! entries  count × (length u32 | stored record)        the record as the log stores it:
//!                                                       crc32c | term | payload
//! index    count × offset u64                           of each entry's length field
//! trailer  index offset u64 | crc32c u32 | "CEND"       crc over every byte before it
//! ```
//!
//! Every entry keeps its own crc32c (over index, term and payload, as in the live log), and the
//! segment has one over everything, so a segment either decodes whole and verified or is a
//! fault. A segment's content is a pure function of the committed entries it holds: every
//! replica that writes the segment for the same range writes the same bytes.

use courier_proto::{LogIndex, ShardId};

use crate::error::{Result, StorageError};
use crate::log::{LogRecord, decode_record, encode_record};

const MAGIC: &[u8; 4] = b"CSEG";
const END: &[u8; 4] = b"CEND";
const VERSION: u8 = 1;
const HEADER_BYTES: usize = 4 + 1 + 2 + 8 + 4;
const TRAILER_BYTES: usize = 8 + 4 + 4;

/// The directory (object prefix) of `shard`'s segments in an archive.
pub fn shard_dir(shard: ShardId) -> String {
    format!("shard-{:05}", shard.get())
}

/// The archive name of `shard`'s segment `first..=last`: zero-padded, so names sort by index.
pub fn object_name(shard: ShardId, first: LogIndex, last: LogIndex) -> String {
    format!("{}/{}", shard_dir(shard), file_name(first, last))
}

fn file_name(first: LogIndex, last: LogIndex) -> String {
    format!("{:020}-{:020}.seg", first.get(), last.get())
}

/// The range a segment's file name states (`FIRST-LAST.seg`).
pub fn parse_file_name(name: &str) -> Option<(LogIndex, LogIndex)> {
    let (first, last) = name.strip_suffix(".seg")?.split_once('-')?;
    let range = (
        LogIndex::new(first.parse().ok()?),
        LogIndex::new(last.parse().ok()?),
    );
    (file_name(range.0, range.1) == name).then_some(range)
}

/// The archive name of `shard`'s verify checkpoint at `index` (`crate::checkpoint`), beside
/// its segments: zero-padded, so names sort by index.
pub fn checkpoint_name(shard: ShardId, index: LogIndex) -> String {
    format!("{}/{}", shard_dir(shard), checkpoint_file_name(index))
}

fn checkpoint_file_name(index: LogIndex) -> String {
    format!("{:020}.ckpt", index.get())
}

/// The index a checkpoint's file name states (`INDEX.ckpt`).
pub fn parse_checkpoint_name(name: &str) -> Option<LogIndex> {
    let index = LogIndex::new(name.strip_suffix(".ckpt")?.parse().ok()?);
    (checkpoint_file_name(index) == name).then_some(index)
}

/// Encodes `records` (consecutive indexes of `shard`, at least one) as a segment.
///
/// # Panics
/// When `records` is empty or not consecutive: the archiver cuts segments from a contiguous
/// log, so either is a bug.
pub fn encode(shard: ShardId, records: &[LogRecord]) -> Vec<u8> {
    let first = records.first().expect("a segment holds at least one entry");
    let mut expected = first.index;
    for record in records {
        assert_eq!(record.index, expected, "segment entries are consecutive");
        expected = expected.next();
    }
    let count = u32::try_from(records.len()).expect("a segment holds fewer than 2^32 entries");
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&shard.get().to_be_bytes());
    out.extend_from_slice(&first.index.get().to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    let mut offsets = Vec::with_capacity(records.len());
    for record in records {
        offsets.push(u64::try_from(out.len()).expect("usize fits u64"));
        let stored = encode_record(record);
        let len = u32::try_from(stored.len()).expect("an entry is smaller than 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&stored);
    }
    let index_offset = u64::try_from(out.len()).expect("usize fits u64");
    for offset in offsets {
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out.extend_from_slice(&index_offset.to_be_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(END);
    out
}

/// What a segment's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The shard whose log it holds.
    pub shard: ShardId,
    /// Its first entry's index.
    pub first: LogIndex,
    /// How many entries it holds (at least one).
    pub count: u32,
}

impl SegmentHeader {
    /// The index of its last entry.
    pub fn last(&self) -> LogIndex {
        LogIndex::new(
            self.first
                .get()
                .saturating_add(u64::from(self.count))
                .saturating_sub(1),
        )
    }
}

/// Reads big-endian integers off the front of a byte slice; `None` when it runs out.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Decodes and verifies a whole segment of `shard`: the segment checksum, the header, the
/// index, and every entry's own checksum.
///
/// # Errors
/// [`StorageError::Decode`] (malformed) or [`StorageError::Checksum`] (a flipped bit): a
/// segment that fails either is never trusted.
pub fn decode(shard: ShardId, bytes: &[u8]) -> Result<(SegmentHeader, Vec<LogRecord>)> {
    let malformed = |reason: &str| StorageError::Decode {
        cf: "archive",
        shard,
        what: "segment".to_owned(),
        reason: reason.to_owned(),
    };
    let body_len = bytes
        .len()
        .checked_sub(TRAILER_BYTES)
        .filter(|len| *len >= HEADER_BYTES)
        .ok_or_else(|| malformed("too short"))?;
    let (body, trailer) = bytes.split_at(body_len);
    let mut tail = Cursor(trailer);
    let index_offset = tail.u64().ok_or_else(|| malformed("trailer"))?;
    let stored = tail.u32().ok_or_else(|| malformed("trailer"))?;
    if tail.0 != END {
        return Err(malformed("not a segment (end magic)"));
    }
    // The checksum covers the body and the index offset before it in the trailer.
    let computed = crc32c::crc32c_append(crc32c::crc32c(body), &index_offset.to_be_bytes());
    if stored != computed {
        return Err(StorageError::Checksum {
            cf: "archive",
            shard,
            what: "segment".to_owned(),
            stored,
            computed,
        });
    }
    let mut head = Cursor(body);
    if head.take(4) != Some(&MAGIC[..]) {
        return Err(malformed("not a segment (magic)"));
    }
    if head.array::<1>() != Some([VERSION]) {
        return Err(malformed("unknown segment version"));
    }
    let header = SegmentHeader {
        shard: ShardId::new(head.u16().ok_or_else(|| malformed("header"))?),
        first: LogIndex::new(head.u64().ok_or_else(|| malformed("header"))?),
        count: head.u32().ok_or_else(|| malformed("header"))?,
    };
    if header.shard != shard || header.count == 0 || header.first.get() == 0 {
        return Err(malformed(
            "header names another shard, no entries or index 0",
        ));
    }
    let index_at = usize::try_from(index_offset).map_err(|_| malformed("index offset"))?;
    let (entries, index) = body
        .split_at_checked(index_at)
        .filter(|(entries, _)| entries.len() >= HEADER_BYTES)
        .ok_or_else(|| malformed("index offset"))?;
    let count = usize::try_from(header.count).map_err(|_| malformed("count"))?;
    if index.len() != count.saturating_mul(8) {
        return Err(malformed("index does not end where the trailer starts"));
    }
    let mut records = Vec::with_capacity(count);
    let mut entry_bytes = Cursor(&entries[HEADER_BYTES..]);
    let mut offsets = Cursor(index);
    let mut at_index = header.first;
    while let Some(offset) = offsets.u64() {
        let at = entries.len().saturating_sub(entry_bytes.0.len());
        if u64::try_from(at).ok() != Some(offset) {
            return Err(malformed("an entry is not where the index says"));
        }
        let len = entry_bytes.u32().ok_or_else(|| malformed("entry length"))?;
        let value = usize::try_from(len)
            .ok()
            .and_then(|len| entry_bytes.take(len))
            .ok_or_else(|| malformed("an entry runs past the entries"))?;
        records.push(decode_record(shard, at_index, value)?);
        at_index = at_index.next();
    }
    if !entry_bytes.0.is_empty() {
        return Err(malformed("bytes between the entries and the index"));
    }
    Ok((header, records))
}

/// Decodes a segment read back under the name `first..=last` of `shard`, checking it holds that
/// range.
///
/// # Errors
/// As [`decode`], and [`StorageError::Decode`] when the segment holds another range.
pub fn checked(
    shard: ShardId,
    first: LogIndex,
    last: LogIndex,
    bytes: &[u8],
) -> Result<Vec<LogRecord>> {
    let (header, records) = decode(shard, bytes)?;
    if header.first != first || header.last() != last {
        return Err(StorageError::Decode {
            cf: "archive",
            shard,
            what: object_name(shard, first, last),
            reason: format!("holds {}..={}", header.first, header.last()),
        });
    }
    Ok(records)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const SHARD: ShardId = ShardId::new(3);

    #[test]
    fn checkpoint_names_sort_by_index_and_parse_back() {
        let name = checkpoint_name(SHARD, LogIndex::new(42));
        assert_eq!(name, "shard-00003/00000000000000000042.ckpt");
        let file = name.rsplit('/').next().expect("a file name");
        assert_eq!(parse_checkpoint_name(file), Some(LogIndex::new(42)));
        assert_eq!(
            parse_checkpoint_name("42.ckpt"),
            None,
            "only the canonical form"
        );
        assert_eq!(
            parse_checkpoint_name("00000000000000000001-00000000000000000016.seg"),
            None
        );
        assert_eq!(parse_file_name(file), None, "not a segment");
    }

    fn records(first: u64, count: u64) -> Vec<LogRecord> {
        (first..first + count)
            .map(|i| LogRecord {
                index: LogIndex::new(i),
                term: 2,
                payload: vec![
                    u8::try_from(i % 251).expect("small");
                    usize::try_from(i % 40).expect("small")
                ],
            })
            .collect()
    }

    #[test]
    fn names_sort_by_index_and_parse_back() {
        let name = object_name(SHARD, LogIndex::new(4097), LogIndex::new(8192));
        assert_eq!(
            name,
            "shard-00003/00000000000000004097-00000000000000008192.seg"
        );
        let file = name.rsplit('/').next().expect("file");
        assert_eq!(
            parse_file_name(file),
            Some((LogIndex::new(4097), LogIndex::new(8192)))
        );
        for bad in [
            "1-2.seg",
            "x-y.seg",
            "00000000000000000001-00000000000000000002.tmp",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_segment_round_trips_and_is_the_same_bytes_every_time() {
        let entries = records(4097, 300);
        let bytes = encode(SHARD, &entries);
        assert_eq!(bytes, encode(SHARD, &entries.clone()), "deterministic");
        let (header, decoded) = decode(SHARD, &bytes).expect("decodes");
        assert_eq!(decoded, entries);
        assert_eq!(header.first, LogIndex::new(4097));
        assert_eq!(header.last(), LogIndex::new(4396));
    }

    /// Every single flipped bit is caught (by the segment crc or an entry crc), and so is a
    /// segment of another shard or a cut-off one.
    #[test]
    fn any_damage_is_a_fault() {
        let bytes = encode(SHARD, &records(1, 20));
        for at in 0..bytes.len() {
            for bit in [0x01_u8, 0x80] {
                let mut damaged = bytes.clone();
                damaged[at] ^= bit;
                assert!(
                    decode(SHARD, &damaged).is_err(),
                    "bit {bit:#x} at byte {at}"
                );
            }
        }
        assert!(decode(ShardId::new(4), &bytes).is_err(), "another shard's");
        for len in [0, 10, bytes.len() - 1] {
            assert!(decode(SHARD, &bytes[..len]).is_err(), "cut at {len}");
        }
    }
}
