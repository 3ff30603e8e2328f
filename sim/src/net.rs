//! The simulated network under tonic: a connector that dials `turmoil::net::TcpStream`s, and
//! `turmoil::net::TcpListener`s as the node's listeners.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use courier_consensus::network::Connector;
use courier_node::server::{Connection, Incoming};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Port of every simulated node's peer API (raft, forwarding, admin).
pub const PEER_PORT: u16 = 7101;
/// Port of every simulated node's client API.
pub const CLIENT_PORT: u16 = 7100;

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

/// A client's channel to `host:port`, set up as courier-jepsen's clients set theirs up
/// (`courier_jepsen::admin::endpoint`), over the simulated network.
pub fn channel(host: &str, port: u16) -> Channel {
    let endpoint = courier_jepsen::admin::endpoint(&format!("{host}:{port}"))
        .expect("simulated host names are valid authorities");
    connector()(endpoint)
}

/// Binds `port` of the current simulated host and yields its connections.
///
/// # Errors
/// The port is taken.
pub async fn listen(port: u16) -> io::Result<Incoming> {
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await?;
    Ok(Box::pin(futures_util::stream::unfold(
        listener,
        |listener| async move {
            let accepted = listener
                .accept()
                .await
                .map(|(stream, _)| Connection(Box::new(stream)));
            Some((accepted, listener))
        },
    )))
}
