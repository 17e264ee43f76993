//! Which Postgres the host uses, and its migrations.
//!
//! `DATABASE_URL` (or `[database] url`) selects a server. When it is unset,
//! the host creates (the first time) and reuses a private cluster under
//! `[database] local_dir` (default `./.hermes/pg`) from the machine's
//! PostgreSQL server binaries, and says which URL it uses.

use std::time::Duration;

use hermes_adapters::postgres::{LocalPostgres, LocalPostgresError};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::{DatabaseConfig, redact_url};

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The database of the private cluster.
pub const LOCAL_DATABASE: &str = "hermes";

/// The `application_name` of the host's connections, unless the URL sets one.
pub const APPLICATION_NAME: &str = "hermes";

/// How long closing the pool waits for connections in use.
pub const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the attempt that finds why the pool could not connect may take.
const CAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A pooled connection idle this long is pinged before it is handed out.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Why the database could not be reached or migrated.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The private cluster could not be started.
    #[error("cannot start the private PostgreSQL cluster (DATABASE_URL is unset): {0}")]
    Local(#[from] LocalPostgresError),
    /// No connection could be made.
    #[error("cannot connect to Postgres at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] MigrateError),
}

/// A connection pool to the host's database, and the private cluster behind
/// it when there is one.
#[derive(Debug, Clone)]
pub struct Database {
    pool: PgPool,
    url: String,
    local: Option<LocalPostgres>,
}

impl Database {
    /// Connects to `config.url`, or starts (or reuses) the private cluster.
    /// Logs the URL it uses (password redacted).
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, DatabaseError> {
        let (url, local) = match &config.url {
            Some(url) => (url.clone(), None),
            None => {
                let local = LocalPostgres::start(&config.local_dir, LOCAL_DATABASE).await?;
                tracing::info!(
                    data_dir = %local.data_dir().display(),
                    reused = local.reused(),
                    "DATABASE_URL is unset: using the private PostgreSQL cluster"
                );
                (local.url(), Some(local))
            }
        };
        let shown = redact_url(&url);
        tracing::info!(url = %shown, "using Postgres");
        let connect_error = |source| DatabaseError::Connect {
            url: shown.clone(),
            source,
        };
        let options = url
            .parse::<PgConnectOptions>()
            .map_err(connect_error)?
            .options([("statement_timeout", config.statement_timeout_ms.to_string())]);
        // Named in pg_stat_activity, unless the URL names it.
        let options = match options.get_application_name() {
            Some(_) => options,
            None => options.application_name(APPLICATION_NAME),
        };
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
            // No ping round trip before each batch on a busy pool (a third
            // more webhook events/s): only a connection idle for a while is
            // pinged first; a broken busy one fails its statement with an
            // I/O error, which the writers retry on another connection.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            // The pool retried until its acquire timeout and kept no cause:
            // one more attempt tells it (refused, a bad password, no such
            // database…).
            Err(sqlx::Error::PoolTimedOut) => {
                let cause =
                    match tokio::time::timeout(CAUSE_TIMEOUT, PgConnection::connect_with(&options))
                        .await
                    {
                        Ok(Err(cause)) => cause,
                        _ => sqlx::Error::PoolTimedOut,
                    };
                return Err(connect_error(cause));
            }
            Err(error) => return Err(connect_error(error)),
        };
        Ok(Self {
            pool,
            url: shown,
            local,
        })
    }

    /// Applies the pending migrations.
    pub async fn migrate(&self) -> Result<(), DatabaseError> {
        // A migration may take longer than the pool's statement timeout
        // allows: it runs on a connection of its own, without one, which is
        // closed afterwards rather than returned to the pool.
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(MigrateError::Execute)?
            .detach();
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut conn)
            .await
            .map_err(MigrateError::Execute)?;
        let migrated = MIGRATOR.run(&mut conn).await;
        let _ = conn.close().await;
        Ok(migrated?)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The URL in use, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The private cluster, when `DATABASE_URL` was unset.
    pub fn local(&self) -> Option<&LocalPostgres> {
        self.local.as_ref()
    }

    /// Closes the pool, waiting for connections in use to be returned, at
    /// most [`POOL_CLOSE_TIMEOUT`]: a connection stuck on a server that
    /// stopped answering is left behind rather than waited for.
    pub async fn close(&self) {
        if tokio::time::timeout(POOL_CLOSE_TIMEOUT, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                "database connections still in use {} s after the pool closed; not waiting for them",
                POOL_CLOSE_TIMEOUT.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_says_so_not_that_the_pool_timed_out() {
        // Nothing listens on port 1 of loopback.
        let config = DatabaseConfig {
            url: Some("postgres://nobody@127.0.0.1:1/none".into()),
            acquire_timeout_ms: 200,
            ..DatabaseConfig::default()
        };
        let message = Database::connect(&config)
            .await
            .expect_err("nothing listens there")
            .to_string();
        assert!(message.contains("refused"), "{message}");
        assert!(!message.contains("timed out"), "{message}");
    }
}
