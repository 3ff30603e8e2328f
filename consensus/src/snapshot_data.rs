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
            Some(dir) => Self::File(tokio::fs::File::from_std(tempfile::tempfile_in(dir)?)),
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
        Ok(Self::File(tokio::fs::File::from_std(file)))
    }
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
