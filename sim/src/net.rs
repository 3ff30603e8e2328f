//! The simulated network under tonic: a connector that dials `turmoil::net::TcpStream`s, and the
//! accepted streams of a `turmoil::net::TcpListener` as tonic's server input.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_consensus::network::Connector;
use futures_util::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Endpoint, Uri};

/// Port of every simulated node's raft service.
pub const RAFT_PORT: u16 = 7101;

/// Channels over the simulated network: `host:port` resolves through turmoil's DNS.
pub fn connector() -> Connector {
    Arc::new(|endpoint: Endpoint| {
        endpoint.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no authority"))?;
            let stream = turmoil::net::TcpStream::connect(authority).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }))
    })
}

/// One accepted simulated connection, as tonic's server wants it.
#[derive(Debug)]
pub struct Accepted(turmoil::net::TcpStream);

impl Connected for Accepted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Binds the node's raft port on the simulated network and yields its connections.
///
/// # Errors
/// The port is taken.
pub async fn incoming() -> io::Result<impl Stream<Item = io::Result<Accepted>>> {
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), RAFT_PORT)).await?;
    Ok(futures_util::stream::unfold(
        listener,
        |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| Accepted(stream));
            Some((accepted, listener))
        },
    ))
}
