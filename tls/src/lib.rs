//! courier's TLS: who a certificate says its holder is, the tonic TLS settings every listener and
//! dialer uses, and a development PKI.
//!
//! One cluster CA signs three kinds of certificate, told apart by a URI subject alternative name
//! (the SPIFFE form, so standard tooling reads it):
//!
//! ```text
//!   node      spiffe://courier/node/<id>        + DNS courier-node   peer listener, both ways
//!   operator  spiffe://courier/operator/<name>                       courier-ops → Admin
//!   listener  DNS <host names phones dial>                           the client listener
//! ```
//!
//! The peer listener asks every caller for a certificate from the CA (mutual TLS); what the
//! caller may do is decided from its [`Role`] by the node (`node/src/server/peer_auth.rs`). Phones
//! see the listener certificate and present none. Nodes dial each other with the server name
//! [`NODE_SERVER_NAME`], which every node certificate carries, so a dialer knows it reached a
//! node of this cluster.

pub mod dev;
mod settings;

pub use settings::{PeerTls, PeerTlsPaths, client_listener, load_pem, phone};
pub use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use x509_parser::extensions::GeneralName;

/// The DNS name in every node certificate, which nodes and operators verify when they dial a
/// node's peer listener.
pub const NODE_SERVER_NAME: &str = "courier-node";

/// The prefix of a node certificate's URI name.
const NODE_URI: &str = "spiffe://courier/node/";
/// The prefix of an operator certificate's URI name.
const OPERATOR_URI: &str = "spiffe://courier/operator/";

/// What a certificate from the cluster CA lets its holder be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A node of the cluster, by id.
    Node(u64),
    /// An operator (courier-ops), by name.
    Operator(String),
}

impl Role {
    /// The URI subject alternative name that carries this role.
    pub fn uri(&self) -> String {
        match self {
            Self::Node(id) => format!("{NODE_URI}{id}"),
            Self::Operator(name) => format!("{OPERATOR_URI}{name}"),
        }
    }

    /// Reads a role from a URI name; `None` for any other URI.
    pub fn from_uri(uri: &str) -> Option<Self> {
        if let Some(id) = uri.strip_prefix(NODE_URI) {
            // Canonical decimal only ("03" or "+3" would name node 3 twice).
            return id
                .parse::<u64>()
                .ok()
                .filter(|parsed| *parsed > 0 && parsed.to_string() == id)
                .map(Self::Node);
        }
        let name = uri.strip_prefix(OPERATOR_URI)?;
        valid_operator_name(name).then(|| Self::Operator(name.to_owned()))
    }
}

/// Operator names: 1–64 of `[a-z0-9._-]`.
fn valid_operator_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Why a certificate names no role.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The bytes are not an X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    /// The certificate has no courier role URI, or more than one.
    #[error("the certificate names {0} courier roles (want exactly one)")]
    Roles(usize),
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate names another role than the one it is configured for.
    #[error("the certificate names {found:?}, not {expected:?}")]
    WrongRole {
        /// The role it should name.
        expected: Role,
        /// The role it names.
        found: Role,
    },
    /// Generating a development certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The role a DER certificate names (its one courier URI subject alternative name). The chain
/// was verified against the CA by the TLS handshake before this runs.
///
/// # Errors
/// [`TlsError::Parse`] for bytes that are not a certificate, [`TlsError::Roles`] for a
/// certificate that names no role or several.
pub fn role_of(der: &[u8]) -> Result<Role, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| TlsError::Parse(error.to_string()))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|error| TlsError::Parse(error.to_string()))?;
    let roles: Vec<Role> = names
        .map(|names| {
            names
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Role::from_uri(uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match <[Role; 1]>::try_from(roles) {
        Ok([role]) => Ok(role),
        Err(roles) => Err(TlsError::Roles(roles.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Role URIs round-trip; anything else is no role.
    #[test]
    fn role_uris() {
        for role in [Role::Node(3), Role::Operator("ops-1".to_owned())] {
            assert_eq!(Role::from_uri(&role.uri()), Some(role));
        }
        for uri in [
            "spiffe://courier/node/0",
            "spiffe://courier/node/03",
            "spiffe://courier/node/x",
            "spiffe://courier/node/",
            "spiffe://courier/operator/",
            "spiffe://courier/operator/Root",
            "spiffe://other/node/1",
        ] {
            assert_eq!(Role::from_uri(uri), None, "{uri}");
        }
    }
}
