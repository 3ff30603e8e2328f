//! A development PKI: one CA, a certificate per node, one for an operator and one for the client
//! listener, written as PEM files into one directory. `make run` and the test harnesses use it;
//! production certificates come from the operator's own CA (docs/SECURITY.md).
//!
//! ```text
//!   dir/ca.pem                       the cluster CA (trusted by nodes, operators, phones)
//!   dir/node-<id>.pem, .key          node certificates (URI spiffe://courier/node/<id>)
//!   dir/operator.pem, .key           an operator certificate (URI …/operator/<name>)
//!   dir/listener.pem, .key           the client listener's certificate (DNS names phones dial)
//! ```
//!
//! The CA key is not written: a development PKI is generated whole, once.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{NODE_SERVER_NAME, Role, TlsError};

/// The CA certificate's file name.
pub const CA_FILE: &str = "ca.pem";
/// The client listener certificate's name (files `listener.pem`, `listener.key`).
pub const LISTENER: &str = "listener";
/// The operator certificate's name (files `operator.pem`, `operator.key`).
pub const OPERATOR: &str = "operator";

/// The certificate and key files of party `name` in `dir`.
pub fn files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// The file name of node `id`'s certificate (without extension).
pub fn node_name(id: u64) -> String {
    format!("node-{id}")
}

/// What [`generate`] makes.
#[derive(Clone, Debug)]
pub struct DevPki<'a> {
    /// Node ids to certify.
    pub nodes: &'a [u64],
    /// The operator's name.
    pub operator: &'a str,
    /// DNS names on the client listener certificate (phones dial one of them).
    pub listener_hosts: &'a [&'a str],
    /// IP addresses on the client listener certificate.
    pub listener_ips: &'a [IpAddr],
}

impl DevPki<'_> {
    /// Nodes 1..=`nodes`, operator `dev`, listener `localhost` and 127.0.0.1.
    pub fn local(nodes: &[u64]) -> DevPki<'_> {
        DevPki {
            nodes,
            operator: "dev",
            listener_hosts: &["localhost"],
            listener_ips: &[IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
        }
    }
}

fn leaf(sans: Vec<SanType>, common_name: &str, server: bool) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params
}

fn uri(role: &Role) -> Result<SanType, TlsError> {
    Ok(SanType::URI(role.uri().try_into()?))
}

fn dns(name: &str) -> Result<SanType, TlsError> {
    Ok(SanType::DnsName(name.try_into()?))
}

fn write(dir: &Path, name: &str, cert: &str, key: &KeyPair) -> Result<(), TlsError> {
    let (cert_path, key_path) = files(dir, name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Read { path, source }
    };
    std::fs::write(&cert_path, cert).map_err(io(&cert_path))?;
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))
}

/// Writes a key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Generates a development PKI into `dir` (created if missing; existing files are replaced).
///
/// # Errors
/// [`TlsError`] when a certificate cannot be made or a file cannot be written.
pub fn generate(dir: &Path, pki: &DevPki<'_>) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "courier development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_path = dir.join(CA_FILE);
    std::fs::write(&ca_path, ca_cert.pem()).map_err(|source| TlsError::Read {
        path: ca_path,
        source,
    })?;
    let issuer = Issuer::new(ca, ca_key);
    let sign = |name: &str, params: CertificateParams| -> Result<(), TlsError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(dir, name, &cert.pem(), &key)
    };
    for id in pki.nodes {
        let role = Role::Node(*id);
        let sans = vec![uri(&role)?, dns(NODE_SERVER_NAME)?];
        sign(&node_name(*id), leaf(sans, &node_name(*id), true))?;
    }
    let operator = Role::Operator(pki.operator.to_owned());
    sign(
        OPERATOR,
        leaf(
            vec![uri(&operator)?],
            &format!("operator {}", pki.operator),
            false,
        ),
    )?;
    let mut listener = Vec::new();
    for host in pki.listener_hosts {
        listener.push(dns(host)?);
    }
    listener.extend(pki.listener_ips.iter().map(|ip| SanType::IpAddress(*ip)));
    sign(LISTENER, leaf(listener, "courier client listener", true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every generated certificate names the role it was made for; the listener names none.
    #[test]
    fn generated_certificates_name_their_roles() {
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), &DevPki::local(&[1, 2])).expect("generate");
        let der = |name: &str| {
            let pem = std::fs::read(files(dir.path(), name).0).expect("read");
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
            pem.contents
        };
        assert_eq!(crate::role_of(&der("node-2")).expect("role"), Role::Node(2));
        assert_eq!(
            crate::role_of(&der(OPERATOR)).expect("role"),
            Role::Operator("dev".to_owned())
        );
        assert!(matches!(
            crate::role_of(&der(LISTENER)),
            Err(TlsError::Roles(0))
        ));
    }
}
