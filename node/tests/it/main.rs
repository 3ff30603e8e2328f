//! Node integration tests: one binary, one module per area. Nodes run in-process on port 0, or
//! as real `courier-node` processes with configs and data directories in a temp dir.

mod account;
mod cluster;
mod contract;
mod foundation;
mod history;
mod keys;
mod maintenance;
mod messaging;
mod placement;
mod registration;
mod remote;
mod security;
mod support;
mod traces;
