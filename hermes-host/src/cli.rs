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

/// `eprintln!` that does not panic when stderr cannot be written (a closed
/// pipe, a full disk): losing a line is no reason to end the process, or to
/// end it with a panic instead of its exit code.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
    /// Stop after this long (e.g. `10s`, `2m`; Ctrl-C or SIGTERM stops it
    /// sooner, with the summary as well); default: until Ctrl-C.
    #[arg(long, value_parser = positive_duration)]
    pub duration: Option<std::time::Duration>,
    /// Connections sending valid SMS webhooks as fast as the host answers
    /// (1 to 10000).
    #[arg(
        long,
        default_value_t = 32,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_DEMO_CONNECTIONS)
    )]
    pub connections: usize,
}

/// The most connections `hermes demo` opens: each is a task with its own
/// connection and buffers, so far more only exhausts memory or file
/// descriptors (99999999999 aborted on an allocation failure).
const MAX_DEMO_CONNECTIONS: u64 = 10_000;

/// A duration as humantime reads it (`10s`, `2m`), more than zero: a zero
/// `--duration` would start everything only to stop at once.
fn positive_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration.is_zero() {
        return Err("the duration must be more than 0".to_owned());
    }
    Ok(duration)
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
    let format = cli.log_format;
    telemetry::init_tracing(format);
    match cli.command {
        Command::Serve(args) => serve(args, format).await,
        Command::Migrate(args) => migrate(args, format).await,
        Command::Demo(args) => {
            let config = Config::load(args.config.config.as_deref())?;
            let options = DemoOptions {
                duration: args.duration,
                connections: args.connections,
            };
            demo::run(config, options).await
        }
    }
}

/// Reports the error [`run`] returned, on stderr: `hermes: error: …` in text
/// mode; in json mode an `ERROR` event in the JSON log format, so that every
/// line on stderr is JSON. That event is written whatever `RUST_LOG` lets
/// through: an error that ends the process (a configuration error, say) is
/// never filtered out.
pub fn report_error(format: LogFormat, error: &anyhow::Error) {
    let message = error_message(error);
    match format {
        LogFormat::Text => say!("hermes: error: {message}"),
        LogFormat::Json => {
            let unfiltered = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr)
                .log_internal_errors(false)
                .finish();
            tracing::subscriber::with_default(unfiltered, || {
                tracing::error!(error = %message, "hermes failed");
            });
        }
    }
}

/// `error` and its causes, `: `-separated, each once. Many errors, ours and
/// our dependencies' (sqlx's I/O error, say), print their source at the end
/// of their own message and also return it as their source: a cause the
/// message already ends with is not printed again.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.ends_with(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// The command's own messages on stderr are plain lines for a person in text
/// mode. In json mode every stderr line must be JSON: they are `tracing`
/// events instead, or nothing where the server already logs the same (its
/// "hermes is listening" and "using Postgres" events, the drain deadline's
/// warning).
async fn serve(args: ConfigArgs, format: LogFormat) -> anyhow::Result<()> {
    let text = format == LogFormat::Text;
    let mut signals = Signals::listen().context("cannot listen for SIGTERM and SIGINT")?;
    let config = Config::load(args.config.as_deref())?;
    let no_sources = config.webhooks.sources.is_empty();
    let Some(server) = signals.unless(Server::start(config)).await else {
        if text {
            say!("hermes: stopped during startup");
        } else {
            tracing::info!("stopped during startup");
        }
        return Ok(());
    };
    let server = server?;
    // Once the configuration proved valid: not beside the error that ends it.
    if no_sources {
        tracing::warn!("no [[webhooks.sources]] configured: every POST /webhooks/... answers 404");
    }
    if text {
        say!(
            "hermes: listening on {} (Postgres: {})",
            server.url(),
            server.database().url()
        );
    }
    let report = server.run_until_signal(signals).await;
    if report.forced && text {
        say!("hermes: stopped; the drain deadline passed before everything was committed");
    }
    Ok(())
}

/// Messages as for [`serve`].
async fn migrate(args: ConfigArgs, format: LogFormat) -> anyhow::Result<()> {
    let text = format == LogFormat::Text;
    let config = Config::load(args.config.as_deref())?;
    let database = Database::connect(&config.database).await?;
    if text {
        say!("hermes: migrating Postgres at {}", database.url());
    }
    database.migrate().await?;
    let known = MIGRATOR.iter().count();
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    if text {
        say!("hermes: {known} migrations known, schema at version {latest}");
    } else {
        tracing::info!(known, version = latest, "migrations applied");
    }
    database.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anyhow::Context as _;

    use super::*;

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        let error = anyhow::Error::new(
            Config::from_file(Path::new("/nonexistent/hermes.toml")).unwrap_err(),
        );
        let message = error_message(&error);
        assert_eq!(message.matches("No such file").count(), 1, "{message}");
        assert!(message.contains("/nonexistent/hermes.toml"), "{message}");
        // A context's cause that it does not hold is kept.
        let error = Err::<(), _>(std::io::Error::other("disk on fire"))
            .context("cannot write")
            .unwrap_err();
        assert_eq!(error_message(&error), "cannot write: disk on fire");
    }
}
