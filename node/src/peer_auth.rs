//! Who may call what on the peer listener.
//!
//! With TLS on (the default), the handshake already refused any caller without a certificate
//! from the cluster CA. Each RPC then checks the [`Role`] that certificate names against the
//! callers it allows:
//!
//! ```text
//!   Raft.*                                   nodes that are members
//!   Forward.*                                nodes that are members (Presence: as itself)
//!   Admin.InitCluster, AddNode, RemoveNode,  operators, and members delegating an operator's call
//!     MarkDraining, RaiseEventFormat
//!   every other Admin RPC                    operators
//! ```
//!
//! "Members" are the metadata group's voters and learners as this node knows them, so a removed
//! node's certificate stops working as soon as its removal is applied here; a node that is not
//! yet part of a cluster (no membership) accepts any node of the CA, which is how it is first
//! reached. A raft request must come from the node it names (candidate, leader): the caller is
//! handed to the raft service as [`CallerNode`], which compares.
//!
//! With `tls.insecure-plaintext` nothing is checked (the node warned at start).

use std::sync::Arc;

use courier_consensus::groups::Groups;
use courier_consensus::network::CallerNode;
use courier_consensus::network::GroupRouter as _;
use courier_tls::Role;
use tonic::Request;

use crate::status::ApiError;

/// The callers one RPC allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Member nodes.
    Nodes,
    /// Operators.
    Operators,
    /// Operators, and member nodes delegating an operator's call to a group leader.
    NodesAndOperators,
}

/// Checks peer-listener callers.
#[derive(Clone)]
pub struct PeerAuth {
    groups: Arc<Groups>,
    enforced: bool,
}

impl std::fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAuth")
            .field("enforced", &self.enforced)
            .finish_non_exhaustive()
    }
}

impl PeerAuth {
    /// Checks callers against the membership of `groups` when `enforced` (TLS on).
    pub fn new(groups: Arc<Groups>, enforced: bool) -> Self {
        Self { groups, enforced }
    }

    /// The caller's role, when `allowed` admits it; `None` without TLS.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` `COURIER:Peer:NoCertificate` without a certificate naming a role;
    /// `PERMISSION_DENIED` `COURIER:Peer:OperatorOnly` / `NodeOnly` for the wrong role,
    /// `COURIER:Peer:NotAMember` for a node that is not a member.
    pub fn check<T>(
        &self,
        request: &Request<T>,
        allowed: Allowed,
    ) -> Result<Option<Role>, ApiError> {
        if !self.enforced {
            return Ok(None);
        }
        let certs = request.peer_certs().ok_or_else(no_certificate)?;
        let leaf = certs.first().ok_or_else(no_certificate)?;
        let role = courier_tls::role_of(leaf).map_err(|error| ApiError::Unauthenticated {
            code: "COURIER:Peer:NoCertificate",
            message: format!("the client certificate names no courier role: {error}"),
        })?;
        match (&role, allowed) {
            (Role::Node(id), Allowed::Nodes | Allowed::NodesAndOperators) => {
                self.require_member(*id)?;
            }
            (Role::Operator(_), Allowed::Operators | Allowed::NodesAndOperators) => {}
            (Role::Node(id), Allowed::Operators) => {
                return Err(ApiError::PermissionDenied {
                    code: "COURIER:Peer:OperatorOnly",
                    message: format!(
                        "node {id}'s certificate cannot call this; it needs an operator certificate"
                    ),
                });
            }
            (Role::Operator(name), Allowed::Nodes) => {
                return Err(ApiError::PermissionDenied {
                    code: "COURIER:Peer:NodeOnly",
                    message: format!(
                        "operator {name}'s certificate cannot call this; only nodes do"
                    ),
                });
            }
        }
        Ok(Some(role))
    }

    /// A node's request naming `claimed` as its sender: the certificate must be that node's.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` `COURIER:Peer:WrongNode`.
    pub fn require_claim(role: Option<&Role>, claimed: u64) -> Result<(), ApiError> {
        match role {
            Some(Role::Node(id)) if *id != claimed => Err(ApiError::PermissionDenied {
                code: "COURIER:Peer:WrongNode",
                message: format!("node {id} sent a request as node {claimed}"),
            }),
            _ => Ok(()),
        }
    }

    /// The raft service's interceptor: member nodes only, the caller handed on as
    /// [`CallerNode`].
    ///
    /// # Errors
    /// As [`PeerAuth::check`], as a status.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub fn raft(&self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(Role::Node(id)) = self.check(&request, Allowed::Nodes)? {
            request.extensions_mut().insert(CallerNode(id));
        }
        Ok(request)
    }

    fn require_member(&self, node: u64) -> Result<(), ApiError> {
        // A member, or this node has no membership yet: the raft pipes' per-frame rule too.
        if self.groups.admits(node) {
            return Ok(());
        }
        Err(ApiError::PermissionDenied {
            code: "COURIER:Peer:NotAMember",
            message: format!("node {node} is not a member of this cluster"),
        })
    }
}

fn no_certificate() -> ApiError {
    ApiError::Unauthenticated {
        code: "COURIER:Peer:NoCertificate",
        message: "the peer listener requires a certificate from the cluster CA".to_owned(),
    }
}
