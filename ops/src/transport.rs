//! How courier-ops reaches a node: plaintext, or TLS with the cluster CA and (for the peer
//! listener, which requires one) an operator certificate. Set once from the command line
//! (`--ca/--cert/--key`, or `COURIER_CA/COURIER_CERT/COURIER_KEY`) before any command runs.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use courier_tls::{Certificate, ClientTlsConfig, Identity};
use tonic::transport::Endpoint;

/// TLS settings for every connection this process makes (`None`: plaintext).
#[derive(Clone, Debug)]
pub(crate) struct Transport {
    tls: Option<Tls>,
}

#[derive(Clone, Debug)]
struct Tls {
    ca: Certificate,
    identity: Option<Identity>,
    server_name: String,
}

static TRANSPORT: OnceLock<Transport> = OnceLock::new();

/// The command-line TLS options.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct TlsArgs {
    /// The cluster CA certificate (PEM). Without it, connections are plaintext (a node started
    /// with `tls.insecure-plaintext`).
    #[arg(long, env = "COURIER_CA", global = true)]
    ca: Option<PathBuf>,
    /// This operator's certificate (PEM; URI `spiffe://courier/operator/<name>`), which the peer
    /// listener requires.
    #[arg(long, env = "COURIER_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "COURIER_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The name the node's certificate must carry: `courier-node` (every node certificate) for
    /// peer addresses, a client listener host name for client addresses.
    #[arg(long, env = "COURIER_SERVER_NAME", global = true, default_value = courier_tls::NODE_SERVER_NAME)]
    server_name: String,
}

/// Reads the files named by `args` and makes them this process's transport.
///
/// # Errors
/// A file that cannot be read.
pub(crate) fn install(args: &TlsArgs) -> anyhow::Result<()> {
    let tls = match &args.ca {
        None => None,
        Some(ca) => {
            let identity = match (&args.cert, &args.key) {
                (Some(cert), Some(key)) => Some(Identity::from_pem(
                    courier_tls::load_pem(cert)?,
                    courier_tls::load_pem(key)?,
                )),
                _ => None,
            };
            Some(Tls {
                ca: Certificate::from_pem(courier_tls::load_pem(ca)?),
                identity,
                server_name: args.server_name.clone(),
            })
        }
    };
    let _ = TRANSPORT.set(Transport { tls });
    Ok(())
}

/// An endpoint for `addr` (`host:port`) with this process's transport; `server_name` replaces
/// the configured name the node's certificate must carry (the demo dials client listeners).
///
/// # Errors
/// A malformed address.
pub(crate) fn endpoint(
    addr: &str,
    server_name: Option<&str>,
    connect_timeout: Duration,
) -> anyhow::Result<Endpoint> {
    let tls = TRANSPORT.get().and_then(|transport| transport.tls.as_ref());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("{addr:?} is not host:port"))?
        .connect_timeout(connect_timeout);
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(tls.ca.clone())
            .domain_name(server_name.unwrap_or(&tls.server_name));
        if let Some(identity) = &tls.identity {
            config = config.identity(identity.clone());
        }
        endpoint = endpoint.tls_config(config)?;
    }
    Ok(endpoint)
}
