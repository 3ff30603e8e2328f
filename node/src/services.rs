//! The gRPC services. Until the messaging and consensus issues fill them in, every RPC answers
//! `UNIMPLEMENTED` through the generated default stubs: never a fake success.

use courier_proto::pb::client::groups_server::Groups;
use courier_proto::pb::client::messaging_server::Messaging;
use courier_proto::pb::client::registration_server::Registration;
use courier_proto::pb::peer::admin_server::Admin;
use courier_proto::pb::peer::forward_server::Forward;
use courier_proto::pb::peer::raft_server::Raft;

/// The client-facing services of one node.
#[derive(Clone, Debug, Default)]
pub struct ClientApi;

impl Registration for ClientApi {}
impl Messaging for ClientApi {}
impl Groups for ClientApi {}

/// The peer-facing services of one node.
#[derive(Clone, Debug, Default)]
pub struct PeerApi;

impl Raft for PeerApi {}
impl Forward for PeerApi {}
impl Admin for PeerApi {}
