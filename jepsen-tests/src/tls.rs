//! The TLS of this process's clients when the run's nodes use TLS: set per run by
//! [`use_dev_tls`] (a run's nodes get a fresh PKI), read by the channel builders in
//! [`crate::admin`]; never set in the simulation, whose network is plaintext.

use std::path::Path;
use std::sync::{Arc, Mutex};

use courier_tls::ClientTlsConfig;

/// A phone's TLS (the CA, the client listener's name) and the operator's (the CA, the operator
/// certificate).
#[derive(Debug)]
pub struct Tls {
    /// For client listeners.
    pub phone: ClientTlsConfig,
    /// For peer listeners.
    pub operator: ClientTlsConfig,
}

static TLS: Mutex<Option<Arc<Tls>>> = Mutex::new(None);

/// From now on, channels of this process use TLS with the development PKI in `pki`
/// (`courier_tls::dev`): the nodes' client listeners are verified as `localhost`, their peer
/// listeners as nodes, and peer calls present the operator certificate.
///
/// # Errors
///
/// A PKI file cannot be read.
pub fn use_dev_tls(pki: &Path) -> anyhow::Result<()> {
    let ca = pki.join(courier_tls::dev::CA_FILE);
    let tls = Tls {
        phone: courier_tls::phone(&ca, "localhost")?,
        operator: courier_tls::PeerTls::load_dev(pki, courier_tls::dev::OPERATOR)?.client(),
    };
    *TLS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(tls));
    Ok(())
}

/// The current TLS settings, if any.
pub fn current() -> Option<Arc<Tls>> {
    TLS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}
