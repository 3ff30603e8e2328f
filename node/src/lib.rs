//! The courier server.
//!
//! Layout:
//! - [`cli`]: the `courier-node --config FILE` entry point, shared with `courier-node-bugs`.
//! - [`config`]: the TOML config (its sections as parsed in `config::raw`), validated once
//!   (`config::validate`); [`units`]: its sizes and durations.
//! - [`server`]: startup and shutdown as a story: storage, then gRPC services and tasks; the
//!   routers and listeners in `server::routers`, the simulation's connections in `server::io`.
//! - [`services`]: the client and peer gRPC services.
//! - [`client`]: the client API behind them: [`client::auth`] (bearer tokens),
//!   [`client::registration`], [`client::messaging`] (1:1 sends, receipts, conversations,
//!   presence lookups), [`client::groups`], [`client::send`] (the one send path both share),
//!   [`client::stream`] (device streams, typing), [`client::live`] (this node's open streams)
//!   and [`client::rate`] (token buckets).
//! - [`cluster`]: this node's view of the cluster, one file per concern: `propose` (routing to a
//!   shard's leader, held through a failover), `forward` (forwarded batches), `bootstrap`,
//!   `membership`, `edge` (presence, typing, push), `read` (read barriers), `status`, `wire`
//!   (outcomes on the peer wire) and `peer` (the one client of every node-to-node call).
//! - [`sends`]: retried sends answered from the dedup projection before anything is proposed.
//! - [`forwarder`]: the outbox forwarders of the shards this node leads.
//! - [`retention`]: expiry of undelivered messages on the shards this node leads.
//! - [`presence`]: online and last seen, in memory on the users' shard leaders.
//! - [`push`]: the push hook for users with no open device stream.
//! - [`sms`]: how registration codes reach phones (the SMS senders).
//! - [`maintenance`]: the admin API's online verify, rebuild and log reads.
//! - [`listener`]: the client listener's connection cap.
//! - [`status`]: the one mapping from errors to gRPC statuses.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`telemetry`]: structured logs, tracing and the panic hook.
//! - [`env`](mod@env): the wall clock and randomness, a seam for the deterministic simulation.
//! - [`bugs`]: deliberate bugs for the checkers, active only in builds with the `bugs` feature.
//!
//! `main.rs` only parses flags, loads the config and calls [`server::start`]; tests start whole
//! nodes in-process on port 0 the same way.

#![warn(clippy::too_many_lines)]

pub mod archive;
pub mod bugs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod env;
pub mod forwarder;
pub mod listener;
pub mod maintenance;
pub mod metrics;
pub mod peer_auth;
pub mod presence;
pub mod push;
pub mod retention;
pub mod sends;
pub mod server;
pub mod services;
pub mod sms;
pub mod status;
pub mod telemetry;
pub mod units;

pub use config::Config;
pub use server::{NodeHandle, start};
