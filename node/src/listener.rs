//! The client listener with a cap on concurrent connections (`limits.connections-max`).
//!
//! Each accepted connection holds a semaphore permit until it closes; at the cap the node stops
//! accepting, and further connections wait in the kernel's (bounded) backlog, as mini-redis does.

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

/// Accepts connections from `listener`, at most `max` open at once.
pub fn limited(
    listener: TcpListener,
    max: u32,
) -> impl Stream<Item = std::io::Result<PermittedStream>> {
    let permits = Arc::new(Semaphore::new(usize::try_from(max).unwrap_or(usize::MAX)));
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        // We never close the semaphore, so acquiring cannot fail.
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let accepted = listener.accept().await.map(|(inner, _)| {
            let _ = inner.set_nodelay(true);
            PermittedStream {
                inner,
                _permit: permit,
            }
        });
        Some((accepted, (listener, permits)))
    })
}
