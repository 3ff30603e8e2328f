//! The TLS settings of a peer-listener party (a node, or an operator's tool): the cluster CA and
//! the party's own certificate and key, read from PEM files once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{NODE_SERVER_NAME, TlsError};

/// Reads a PEM file.
///
/// # Errors
/// [`TlsError::Read`] when the file cannot be read.
pub fn load_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The cluster CA and one party's certificate and key (PEM), for mutual TLS on the peer
/// listener.
#[derive(Clone)]
pub struct PeerTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Reads the CA certificate, the party's certificate and its key.
    ///
    /// # Errors
    /// [`TlsError::Read`] naming the file that cannot be read.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca: load_pem(ca)?,
            cert: load_pem(cert)?,
            key: load_pem(key)?,
        })
    }

    /// The files of a development PKI's party `name` in `dir` (see [`crate::dev`]).
    ///
    /// # Errors
    /// As [`PeerTls::load`].
    pub fn load_dev(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let (cert, key) = crate::dev::files(dir, name);
        Self::load(&dir.join(crate::dev::CA_FILE), &cert, &key)
    }

    /// The role this party's certificate names.
    ///
    /// # Errors
    /// [`TlsError::Parse`] when the file holds no PEM certificate, [`TlsError::Roles`] when it
    /// names no role or several.
    pub fn role(&self) -> Result<crate::Role, TlsError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(&self.cert)
            .map_err(|error| TlsError::Parse(error.to_string()))?;
        crate::role_of(&pem.contents)
    }

    /// The peer listener's server side: this party's certificate, and every caller must present
    /// a certificate from the CA; a handshake not done within `handshake_timeout` is dropped (a
    /// connection that never finishes one would hold its slot under the connection cap).
    pub fn server(&self, handshake_timeout: Duration) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .timeout(handshake_timeout)
    }

    /// The dialing side: trusts only the CA, verifies the node server name, presents this
    /// party's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(NODE_SERVER_NAME)
    }
}

/// The client listener's server side: the listener certificate phones verify (no client
/// certificate; phones authenticate with their device token); handshakes bounded by
/// `handshake_timeout`.
///
/// # Errors
/// [`TlsError::Read`] naming the file that cannot be read.
pub fn client_listener(
    cert: &Path,
    key: &Path,
    handshake_timeout: Duration,
) -> Result<ServerTlsConfig, TlsError> {
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(load_pem(cert)?, load_pem(key)?))
        .timeout(handshake_timeout))
}

/// A phone's (or the demo's) side of the client listener: trusts `ca`, verifies `host`.
///
/// # Errors
/// [`TlsError::Read`] when the CA file cannot be read.
pub fn phone(ca: &Path, host: &str) -> Result<ClientTlsConfig, TlsError> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(load_pem(ca)?))
        .domain_name(host))
}

/// Where the files of one [`PeerTls`] are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTlsPaths {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This party's certificate.
    pub cert: PathBuf,
    /// This party's key.
    pub key: PathBuf,
}
