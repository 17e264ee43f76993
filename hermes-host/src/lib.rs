//! The Hermes host as a library: configuration, database, HTTP server,
//! webhook ingestion, telemetry and shutdown. The `hermes` binary is a thin
//! command line over it; the demo, the benchmarks and the tests start the
//! same [`Server`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use hermes_host::{Config, Server};
//!
//! let config = Config::load(None)?;
//! let server = Server::start(config).await?;
//! println!("listening on {}", server.url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod cli;
pub mod cluster_keeper;
pub mod config;
pub mod database;
pub mod demo;
pub mod http;
pub mod quote;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod webhooks;

pub use config::{Config, ConfigError};
pub use database::Database;
pub use server::{RunningServer, Server, ShutdownReport, StartError};
