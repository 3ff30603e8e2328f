//! The courier server.
//!
//! Layout:
//! - [`config`]: the TOML config, validated once.
//! - [`server`]: startup and shutdown as a story: storage, then gRPC services.
//! - [`services`]: the client and peer gRPC services.
//! - [`telemetry`]: structured logs and the panic hook.
//!
//! `main.rs` only parses flags, loads the config and calls [`server::start`]; tests start whole
//! nodes in-process on port 0 the same way.

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
pub mod presence;
pub mod push;
pub mod retention;
pub mod server;
pub mod services;
pub mod status;
pub mod telemetry;
pub mod units;

pub use config::Config;
pub use server::{NodeHandle, start};
