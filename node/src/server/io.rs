//! The connections a node serves on when an [`Environment`] provides its listeners (the
//! simulation's network), and the environment itself.

use std::sync::Arc;

use courier_consensus::network::ChannelPool;
use courier_storage::Db;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite};

/// A stream of accepted connections, boxed (the simulation's listeners).
pub type Incoming =
    std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Connection>> + Send + 'static>>;

/// Any byte stream a gRPC server can serve.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// One accepted connection of an [`Incoming`] stream.
pub struct Connection(pub Box<dyn Io>);

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// What a node runs on when it is not the defaults: each `None` is what `courier-node` uses.
#[derive(Default)]
pub struct Environment {
    /// Storage; `None` opens RocksDB in `data-dir/db`.
    pub db: Option<Arc<Db>>,
    /// Channels to peers (raft and forwarding); `None` dials TCP.
    pub pool: Option<Arc<ChannelPool>>,
    /// The client and peer listeners; `None` binds `listen.client` and `listen.peer` (and
    /// applies `limits.connections-max`, which a provided listener must apply itself).
    pub listeners: Option<(Incoming, Incoming)>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("db", &self.db)
            .field("pool", &self.pool.is_some())
            .field("listeners", &self.listeners.is_some())
            .finish()
    }
}
