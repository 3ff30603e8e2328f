//! The bytes of a raft snapshot: in a spool file on a real disk, so that neither building nor
//! sending nor receiving one holds the whole shard in memory; in memory on the simulation's disk,
//! which has no files and must stay deterministic.
//!
//! ```text
//!   build:   RocksDB snapshot ──export_to, chunk by chunk──▶ SnapshotData::File (unnamed, in db/)
//!   send:    openraft reads it in `snapshot-chunk` pieces ──▶ InstallSnapshot RPCs
//!   receive: each piece written ──▶ SnapshotData::File ──▶ install reads it back
//! ```
//!
//! A spool file is created unnamed (`O_TMPFILE`, or unlinked at once where that is missing): it
//! disappears when openraft drops the snapshot or the process dies, and no backup or directory
//! listing ever sees it.

use std::io::{Cursor, SeekFrom};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// A snapshot's bytes, for openraft (`TypeConfig::SnapshotData`).
#[derive(Debug)]
pub enum SnapshotData {
    /// In memory (the simulation's disk).
    Memory(Cursor<Vec<u8>>),
    /// In an unnamed spool file.
    File(tokio::fs::File),
}

impl SnapshotData {
    /// An empty spool file in `dir` (the database's directory), or an empty buffer when `dir` is
    /// `None` (the simulation's disk).
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn spool(dir: Option<&Path>) -> std::io::Result<Self> {
        Ok(match dir {
            Some(dir) => Self::File(whole_writes(tokio::fs::File::from_std(
                tempfile::tempfile_in(dir)?,
            ))),
            None => Self::Memory(Cursor::new(Vec::new())),
        })
    }

    /// Wraps a spool file written synchronously (by an export thread), rewound.
    ///
    /// # Errors
    /// The rewind fails.
    pub fn from_written(mut file: std::fs::File) -> std::io::Result<Self> {
        use std::io::Seek as _;
        file.rewind()?;
        Ok(Self::File(whole_writes(tokio::fs::File::from_std(file))))
    }
}

/// Lets one `poll_write` take a whole received piece, however large `snapshot-chunk` is. tokio
/// takes at most 2 MiB per call by default, so a larger piece would need a second call; a
/// receive cancelled between the two (its RPC deadline) would leave the first part written while
/// openraft's offset has not moved, and the retried piece would land after it, shifting every
/// later byte. The piece is in memory already; tokio's copy of it is the same size.
fn whole_writes(mut file: tokio::fs::File) -> tokio::fs::File {
    file.set_max_buf_size(usize::MAX);
    file
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Memory(cursor) => Pin::new(cursor).poll_read(cx, buf),
            Self::File(file) => Pin::new(file).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Memory(cursor) => Pin::new(cursor).poll_write(cx, buf),
            Self::File(file) => Pin::new(file).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Memory(cursor) => Pin::new(cursor).poll_flush(cx),
            Self::File(file) => Pin::new(file).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Memory(cursor) => Pin::new(cursor).poll_shutdown(cx),
            Self::File(file) => Pin::new(file).poll_shutdown(cx),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        match self.get_mut() {
            Self::Memory(cursor) => Pin::new(cursor).start_seek(position),
            Self::File(file) => Pin::new(file).start_seek(position),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match self.get_mut() {
            Self::Memory(cursor) => Pin::new(cursor).poll_complete(cx),
            Self::File(file) => Pin::new(file).poll_complete(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

    use super::*;

    /// A received piece larger than tokio's default 2 MiB is taken by one write call (so a
    /// cancelled receive never leaves half a piece behind), and reads back whole.
    #[tokio::test]
    async fn a_spool_file_takes_a_large_piece_in_one_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = SnapshotData::spool(Some(dir.path())).expect("spool");
        let piece: Vec<u8> = (0..5_u32 << 20)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();
        let taken = data.write(&piece).await.expect("write");
        assert_eq!(taken, piece.len(), "one call takes the whole piece");
        data.flush().await.expect("flush");
        data.seek(SeekFrom::Start(0)).await.expect("seek");
        let mut back = Vec::new();
        data.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, piece);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            0,
            "the spool file has no name"
        );
    }
}
