//! The client listener with a cap on concurrent connections (`limits.connections-max`).
//!
//! Each accepted connection holds a semaphore permit until it closes. At the cap a new
//! connection is accepted and closed at once, so its client fails fast and can try another node
//! (waiting in the kernel's backlog instead, it would hang until its own timeout). Refusals are
//! counted (`courier_connections_refused_total`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection that returns its permit when dropped.
#[derive(Debug)]
pub struct PermittedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for PermittedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for PermittedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PermittedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections from `listener`, at most `max` open at once; one more is closed at
/// once and counted in `refused`.
pub fn limited(
    listener: TcpListener,
    max: u32,
    refused: prometheus_client::metrics::counter::Counter,
) -> impl Stream<Item = std::io::Result<PermittedStream>> {
    let permits = Arc::new(Semaphore::new(usize::try_from(max).unwrap_or(usize::MAX)));
    futures_util::stream::unfold(
        (listener, permits, refused),
        |(listener, permits, refused)| async move {
            let accepted = loop {
                let (inner, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => break Err(error),
                };
                // Never closed, so `try_acquire` fails only at the cap.
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    refused.inc();
                    tracing::debug!(%peer, "connection refused: at the connection cap");
                    drop(inner);
                    continue;
                };
                let _ = inner.set_nodelay(true);
                break Ok(PermittedStream {
                    inner,
                    _permit: permit,
                });
            };
            Some((accepted, (listener, permits, refused)))
        },
    )
}
