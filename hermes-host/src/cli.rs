//! The command line: `hermes serve`, `hermes migrate` and `hermes demo`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::database::{Database, MIGRATOR};
use crate::demo::{self, DemoOptions};
use crate::server::Server;
use crate::shutdown::Signals;
use crate::telemetry::{self, LogFormat};

/// Hermes: webhook ingestion (and more workloads to come) on hermes-pipeline
/// and Postgres.
#[derive(Debug, Parser)]
#[command(name = "hermes", version, about)]
pub struct Cli {
    /// Log line format (stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HERMES_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve HTTP and run every configured pipeline
    /// until SIGTERM/SIGINT.
    Serve(ConfigArgs),
    /// Apply pending migrations and exit.
    Migrate(ConfigArgs),
    /// Serve on the embedded defaults and drive signed webhook traffic at
    /// the host, printing live progress and a summary.
    Demo(DemoArgs),
}

/// Options of `hermes demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The configuration, as for `serve`.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Stop after this long (e.g. `10s`, `2m`); default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Connections sending valid SMS webhooks as fast as the host answers.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
}

/// Where the configuration comes from.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (default: ./hermes.toml if it exists, else
    /// built-in defaults). HERMES_LISTEN and DATABASE_URL override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init_tracing(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Demo(args) => {
            let config = Config::load(args.config.config.as_deref())?;
            let options = DemoOptions {
                duration: args.duration,
                connections: args.connections.max(1),
            };
            demo::run(config, options).await
        }
    }
}

async fn serve(args: ConfigArgs) -> anyhow::Result<()> {
    let mut signals = Signals::listen().context("cannot listen for SIGTERM and SIGINT")?;
    let config = Config::load(args.config.as_deref())?;
    if config.webhooks.sources.is_empty() {
        tracing::warn!("no [[webhooks.sources]] configured: every POST /webhooks/... answers 404");
    }
    let server = tokio::select! {
        server = Server::start(config) => server?,
        () = signals.received() => {
            eprintln!("hermes: stopped during startup");
            return Ok(());
        }
    };
    eprintln!(
        "hermes: listening on {} (Postgres: {})",
        server.url(),
        server.database().url()
    );
    let report = server.run_until_signal(&mut signals).await;
    if report.forced {
        eprintln!("hermes: stopped; the drain deadline passed before everything was committed");
    }
    Ok(())
}

async fn migrate(args: ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let database = Database::connect(&config.database).await?;
    eprintln!("hermes: migrating Postgres at {}", database.url());
    database.migrate().await?;
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    eprintln!(
        "hermes: {} migrations known, schema at version {latest}",
        MIGRATOR.iter().count()
    );
    database.close().await;
    Ok(())
}
