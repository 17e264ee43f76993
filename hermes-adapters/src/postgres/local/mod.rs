//! A private PostgreSQL cluster in a directory, started from the machine's
//! PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`).
//!
//! The host uses it when `DATABASE_URL` is unset (data under `./.hermes/pg`),
//! and the test suites use it through [`test_database`], so that nothing
//! depends on a Postgres service that happens to run on the machine.
//!
//! What [`LocalPostgres::start`] does:
//!
//! - finds the server binaries: `$HERMES_PG_BINDIR`, then, for an existing
//!   cluster, the install of its major version (its `PG_VERSION`) under
//!   `/usr/lib/postgresql/<major>/bin` (Debian/Ubuntu) or
//!   `/usr/pgsql-<major>/bin` (RHEL), then `PATH`, then the newest of those
//!   installs; none found is an error that names the package to install, and
//!   binaries of another major version than the cluster's are an error that
//!   says what to do;
//! - the first time, runs `initdb` (superuser `postgres`, UTF8, C locale)
//!   into a fresh sibling directory and renames it into place,
//!   so two processes initialising the same directory cannot trip over a
//!   half-written cluster. A directory that exists and is empty (a mounted
//!   volume, which no rename can replace) is initialised in place instead,
//!   under the lock on it described below (a crash during that `initdb`
//!   leaves a partial cluster, to be removed by hand); one that is not empty
//!   and holds no cluster is an error;
//! - if a server for that directory already runs (its `postmaster.pid` names
//!   a `postgres` process working in that directory), reuses it and its port;
//!   a `postmaster.pid` naming any other process (left by a server that was
//!   not shut down cleanly, its pid maybe reused after a restart) is removed.
//!   Otherwise starts one with `pg_ctl` on the loopback port it last used
//!   while that is free (its URL then stays the same across restarts), else
//!   on any free one, listening on 127.0.0.1 only, and on a Unix socket in
//!   the data directory when that path fits in a socket address and can be
//!   written in `unix_socket_directories` as is. The socket
//!   needs no password (only the directory's owner reaches it); TCP needs the
//!   superuser's password, kept in [`TCP_PASSWORD_FILE`] (without a socket,
//!   TCP is trusted, with a warning: every local user can connect). Starts of
//!   the same directory take turns, holding an exclusive `flock` on it: a
//!   start that waited reuses the server the one before it started;
//! - waits until the server accepts connections, creates the database if it is
//!   missing, and hands back its `postgres://` URL: through the Unix socket
//!   where the server has one (a round trip through it costs both sides less
//!   CPU than through loopback TCP), else through TCP.
//!
//! PostgreSQL refuses to run as root. When the current user is root (CI
//! containers), the binaries run as the unprivileged `postgres` system user
//! through `runuser` (or `setpriv`), the data directory is owned by that user,
//! and every parent directory is made traversable (search permission only) for
//! it. That user controls the data directory, so what it holds is not trusted:
//! files read from it must be regular files with a single link (a symlink or a
//! hard link could name a file only root may read), the password file must
//! hold exactly a generated password, and files are written to it as new
//! files renamed into place.

mod binaries;
mod files;
mod init;
mod lock;
mod runner;
mod server;
mod settings;
mod start;
mod test_cluster;

use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use files::log_tail;
#[cfg(test)]
use files::unique_suffix;
use runner::{Runner, run};
use server::{Running, ServerState};
use settings::tcp_password;
use start::start_blocking;

pub use test_cluster::{cargo_target_dir, test_database, try_test_database};

/// Name of the superuser role created by `initdb` in every local cluster.
pub const SUPERUSER: &str = "postgres";

/// Environment variable naming a directory that holds `initdb`, `pg_ctl` and
/// `postgres`; it takes precedence over `PATH` and the well-known locations.
pub const BINDIR_ENV: &str = "HERMES_PG_BINDIR";

/// Environment variable that overrides where [`test_database`] keeps its
/// shared cluster (default: `<cargo target dir>/tmp/hermes-pg-test`).
pub const TEST_DIR_ENV: &str = "HERMES_TEST_PG_DIR";

/// How long to wait for a server to start and accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How many times to try starting a server before giving up (a start can fail
/// because another process took the chosen port, or started the same cluster).
const START_ATTEMPTS: u32 = 5;

/// The server log, inside the data directory.
const SERVER_LOG: &str = "server.log";

/// The file, inside the data directory, holding the superuser's password
/// for TCP connections (the Unix socket needs none). Generated the first time.
pub const TCP_PASSWORD_FILE: &str = "hermes-tcp-password";

/// What a socket directory keeps unencoded in a URL's query string.
const SOCKET_DIR_IN_URL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'.')
    .remove(b'_')
    .remove(b'-');

/// How hard the cluster works to keep committed data across a machine crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `fsync`, `synchronous_commit` and `full_page_writes` on (PostgreSQL's
    /// defaults): a committed transaction survives a power loss. Use this for
    /// anything that holds data someone relies on.
    #[default]
    Durable,
    /// `fsync`, `synchronous_commit` and `full_page_writes` off. Much faster,
    /// and a crash of the machine (not of the server process) can lose or
    /// corrupt data. For throwaway test clusters only.
    Relaxed,
}

/// Options for [`LocalPostgres::start_with`].
#[derive(Debug, Clone)]
pub struct LocalPostgresConfig {
    /// Directory of the cluster (created if missing). Relative paths are
    /// resolved against the current directory.
    pub data_dir: PathBuf,
    /// Database to create if missing; the returned URL points at it.
    pub database: String,
    /// Durability settings of the server (see [`Durability`]).
    pub durability: Durability,
    /// `max_connections` of the server.
    pub max_connections: u32,
}

impl LocalPostgresConfig {
    /// A durable cluster in `data_dir` with one database `database` and
    /// `max_connections = 100`.
    pub fn new(data_dir: impl Into<PathBuf>, database: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database: database.into(),
            durability: Durability::Durable,
            max_connections: 100,
        }
    }

    /// Sets the durability settings (see [`Durability`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets `max_connections`.
    pub fn max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections;
        self
    }
}

/// Why a local cluster could not be started, stopped or used.
#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    /// No directory holds all of `initdb`, `pg_ctl` and `postgres`.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH, \
         under /usr/lib/postgresql/*/bin or /usr/pgsql-*/bin: install the 'postgresql' package \
         (e.g. `apt-get install postgresql`), or set {BINDIR_ENV} to the directory that holds them"
    )]
    BinariesNotFound,
    /// Running as root, and there is no `postgres` user to run the server as.
    #[error(
        "PostgreSQL refuses to run as root, and this machine has no 'postgres' system user to run \
         it as: create one (`useradd --system --user-group --home-dir /var/lib/postgresql \
         --shell /bin/sh postgres`), or run as an unprivileged user"
    )]
    NoUnprivilegedUser,
    /// Running as root, and neither `runuser` nor `setpriv` is available.
    #[error(
        "PostgreSQL refuses to run as root, and neither `runuser` nor `setpriv` (util-linux) was \
         found to run it as the 'postgres' user: install the 'util-linux' package, or run as an \
         unprivileged user"
    )]
    NoPrivilegeDropTool,
    /// The data directory exists, is not empty, and is not a PostgreSQL cluster.
    #[error(
        "{} is not empty and is not a PostgreSQL data directory (no PG_VERSION; it holds \
         {contents}): point the data directory at a missing or empty directory instead (on a \
         mounted volume, which may hold lost+found, a subdirectory such as {}), or move what it \
         holds away",
        path.display(),
        path.join("pgdata").display()
    )]
    NotADataDirectory {
        /// The directory.
        path: PathBuf,
        /// What it holds: the first names, in order.
        contents: String,
    },
    /// Running as root, the data directory belongs to another user than
    /// root and the one the server would run as: taking it over would lock
    /// that user (and a server of theirs still running) out of it.
    #[error(
        "{} belongs to the user with uid {owner}, not to root or '{run_as}': run hermes as          that user, or choose another data directory (or, if it is no longer theirs, `chown -R          {run_as} {}` it yourself)",
        path.display(),
        path.display()
    )]
    OwnedByAnotherUser {
        /// The data directory.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// The user the server runs as.
        run_as: String,
    },
    /// The cluster was made by another major version of PostgreSQL than the
    /// server binaries found.
    #[error(
        "{} holds a PostgreSQL {cluster} cluster, but the server binaries found in {} are \
         PostgreSQL {binaries}: install the PostgreSQL {cluster} server package \
         (e.g. `apt-get install postgresql-{cluster}`) or set {BINDIR_ENV} to its bin directory, \
         or remove {} to start a new cluster (its data is lost)",
        data_dir.display(),
        bindir.display(),
        data_dir.display()
    )]
    VersionMismatch {
        /// The cluster's directory.
        data_dir: PathBuf,
        /// The major version in its `PG_VERSION`.
        cluster: String,
        /// The directory of the binaries found.
        bindir: PathBuf,
        /// Their major version.
        binaries: String,
    },
    /// The database name contains characters other than ASCII letters, digits and `_`.
    #[error("invalid database name {0:?}: use ASCII letters, digits and '_' only")]
    InvalidDatabaseName(String),
    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A command exited unsuccessfully (or could not be run).
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status, or why it could not run.
        status: String,
        /// Its standard error and output.
        output: String,
    },
    /// The server did not start or did not accept connections in time.
    #[error("PostgreSQL in {} did not become ready: {reason}; server log {}:\n{log_tail}", data_dir.display(), data_dir.join(SERVER_LOG).display())]
    NotReady {
        /// The cluster's directory.
        data_dir: PathBuf,
        /// The last error seen.
        reason: String,
        /// The end of the server log.
        log_tail: String,
    },
    /// A SQL statement against the cluster failed.
    #[error("PostgreSQL on port {port}: {source}")]
    Sql {
        /// The server's port.
        port: u16,
        /// The underlying error.
        source: sqlx::Error,
    },
    /// A blocking helper task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LocalPostgresError {
    let path = path.to_path_buf();
    move |source| LocalPostgresError::Io {
        action,
        path,
        source,
    }
}

/// A running private PostgreSQL cluster (see the [module docs](self)).
///
/// Dropping the value leaves the server running, so the next start reuses it;
/// call [`LocalPostgres::stop`] to shut it down.
#[derive(Clone)]
pub struct LocalPostgres {
    /// `config.data_dir`, absolute.
    data_dir: PathBuf,
    server: Running,
    /// What it was started with: [`LocalPostgres::start_again`] starts it
    /// the same way.
    config: LocalPostgresConfig,
    reused: bool,
    runner: Runner,
}

impl fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("data_dir", &self.data_dir)
            .field("server", &self.server)
            .field("database", &self.config.database)
            .field("reused", &self.reused)
            .field("bindir", &self.runner.bindir)
            .field("run_as", &self.runner.run_as.as_ref().map(|r| &r.user))
            .finish()
    }
}

impl LocalPostgres {
    /// Starts (or reuses) a durable cluster in `data_dir` and creates
    /// `database` in it if missing. See [`LocalPostgres::start_with`].
    pub async fn start(
        data_dir: impl Into<PathBuf>,
        database: &str,
    ) -> Result<Self, LocalPostgresError> {
        Self::start_with(LocalPostgresConfig::new(data_dir, database)).await
    }

    /// Starts (or reuses) the cluster described by `config`, waits until it
    /// accepts connections and creates `config.database` if missing.
    pub async fn start_with(config: LocalPostgresConfig) -> Result<Self, LocalPostgresError> {
        validate_database_name(&config.database)?;
        let pg = blocking(move || start_blocking(&config)).await?;
        pg.wait_ready().await?;
        pg.set_tcp_password().await?;
        pg.create_database(&pg.config.database).await?;
        Ok(pg)
    }

    /// The URL of the database given at start (see [`LocalPostgres::url_for`]).
    pub fn url(&self) -> String {
        self.url_for(&self.config.database)
    }

    /// The URL of a database of this cluster: through its Unix socket,
    /// `postgres://postgres@localhost/<database>?host=<socket dir>&port=<port>`,
    /// or, when it has none, `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url_for(&self, database: &str) -> String {
        match &self.server.socket_dir {
            Some(dir) => format!(
                "postgres://{SUPERUSER}@localhost/{database}?host={}&port={}",
                percent_encode(dir.as_os_str().as_bytes(), SOCKET_DIR_IN_URL),
                self.server.port
            ),
            None => format!(
                "postgres://{SUPERUSER}@127.0.0.1:{}/{database}",
                self.server.port
            ),
        }
    }

    /// Connection options for `database` of this cluster, through the same
    /// transport as [`LocalPostgres::url_for`].
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        let options = PgConnectOptions::new()
            .port(self.server.port)
            .username(SUPERUSER)
            .database(database);
        match &self.server.socket_dir {
            Some(dir) => options.socket(dir),
            None => options.host("127.0.0.1"),
        }
    }

    /// The process id of the server (the postmaster; its backends are its
    /// children).
    pub fn pid(&self) -> u32 {
        self.server.pid
    }

    /// Starts this cluster again as [`LocalPostgres::start_with`] started
    /// it (reusing its server if that runs), say after its server died.
    pub async fn start_again(&self) -> Result<Self, LocalPostgresError> {
        Self::start_with(LocalPostgresConfig {
            data_dir: self.data_dir.clone(),
            ..self.config.clone()
        })
        .await
    }

    /// Whether this server still runs: its data directory's
    /// `postmaster.pid` names it, and its process is a `postgres` working
    /// there. Reads a few small files (blocking, briefly).
    pub fn is_running(&self) -> bool {
        matches!(
            self.runner.server_state(&self.data_dir),
            Ok(server::ServerState::Running(running)) if running.pid == self.server.pid
        )
    }

    /// The loopback TCP port the server listens on (also the number in its
    /// Unix socket's name).
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The directory of the server's Unix socket, if it has one.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.server.socket_dir.as_deref()
    }

    /// The cluster's data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The database given at start.
    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// Whether the server was already running and was reused rather than started.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Creates `name` in this cluster unless it exists. Safe to call
    /// concurrently from several processes.
    pub async fn create_database(&self, name: &str) -> Result<(), LocalPostgresError> {
        validate_database_name(name)?;
        let mut conn = self.admin_connection().await?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_optional(&mut conn)
                .await
                .map_err(|e| self.sql_err(e))?;
        if exists.is_none() {
            let created = sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut conn)
                .await;
            match created {
                Ok(_) => {}
                // Created concurrently by someone else: duplicate_database, or
                // unique_violation on pg_database when both raced the catalog.
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
                Err(e) => return Err(self.sql_err(e)),
            }
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Drops `name` from this cluster if it exists, disconnecting its sessions.
    pub async fn drop_database(&self, name: &str) -> Result<(), LocalPostgresError> {
        validate_database_name(name)?;
        let mut conn = self.admin_connection().await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .map_err(|e| self.sql_err(e))?;
        let _ = conn.close().await;
        Ok(())
    }

    /// Shuts the server down (fast mode: open sessions are disconnected,
    /// committed data is kept). Stopping a server that does not run is not an
    /// error.
    pub async fn stop(&self) -> Result<(), LocalPostgresError> {
        let runner = self.runner.clone();
        let data_dir = self.data_dir.clone();
        blocking(move || {
            if !matches!(runner.server_state(&data_dir)?, ServerState::Running(_)) {
                return Ok(());
            }
            let mut cmd = runner.command("pg_ctl");
            cmd.arg("stop")
                .arg("-D")
                .arg(&data_dir)
                .args(["-m", "fast", "-w", "-t", "60", "-s"]);
            run(cmd)?;
            Ok(())
        })
        .await
    }

    /// Gives the superuser the password of [`TCP_PASSWORD_FILE`], through the
    /// socket (a cluster without one trusts TCP: nothing to set).
    async fn set_tcp_password(&self) -> Result<(), LocalPostgresError> {
        if self.server.socket_dir.is_none() {
            return Ok(());
        }
        let (data_dir, runner) = (self.data_dir.clone(), self.runner.clone());
        let password = blocking(move || tcp_password(&data_dir, &runner)).await?;
        // Letters and digits only (checked by `tcp_password`): safe as a
        // literal (ALTER ROLE takes no parameters). Neither sqlx nor the server
        // logs the statement, and it is one statement (extended protocol).
        let statement = format!("ALTER ROLE {SUPERUSER} PASSWORD '{password}'");
        let options = self
            .connect_options("postgres")
            .options([
                ("log_statement", "none"),
                ("log_min_duration_statement", "-1"),
                ("log_min_error_statement", "panic"),
            ])
            .disable_statement_logging();
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(|e| self.sql_err(e))?;
        // Processes starting on one cluster at once (test binaries run in
        // parallel) update the role's row together; the loser gets "tuple
        // concurrently updated" and sets the same password again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match sqlx::query(&statement)
                .persistent(false)
                .execute(&mut conn)
                .await
            {
                Ok(_) => break,
                Err(sqlx::Error::Database(error))
                    if attempts < 5 && error.message() == "tuple concurrently updated" =>
                {
                    tokio::time::sleep(Duration::from_millis(20 * attempts)).await;
                }
                Err(error) => return Err(self.sql_err(error)),
            }
        }
        let _ = conn.close().await;
        Ok(())
    }

    async fn admin_connection(&self) -> Result<PgConnection, LocalPostgresError> {
        PgConnection::connect_with(&self.connect_options("postgres"))
            .await
            .map_err(|e| self.sql_err(e))
    }

    fn sql_err(&self, source: sqlx::Error) -> LocalPostgresError {
        LocalPostgresError::Sql {
            port: self.server.port,
            source,
        }
    }

    async fn wait_ready(&self) -> Result<(), LocalPostgresError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match PgConnection::connect_with(&self.connect_options("postgres")).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(port = self.server.port, error = %e, "waiting for PostgreSQL");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(LocalPostgresError::NotReady {
                        data_dir: self.data_dir.clone(),
                        reason: e.to_string(),
                        log_tail: log_tail(&self.data_dir),
                    });
                }
            }
        }
    }
}

/// Runs blocking work (processes, file system) off the async executor.
async fn blocking<T, F>(f: F) -> Result<T, LocalPostgresError>
where
    F: FnOnce() -> Result<T, LocalPostgresError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LocalPostgresError::Task(e.to_string()))?
}

fn validate_database_name(name: &str) -> Result<(), LocalPostgresError> {
    let valid = !name.is_empty()
        && name.len() < 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(LocalPostgresError::InvalidDatabaseName(name.to_owned()))
    }
}

/// A fresh empty directory for one test.
#[cfg(test)]
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hermes-local-unit-{}", unique_suffix()));
    std::fs::create_dir(&dir).expect("create scratch dir");
    dir
}

/// A runner that runs the binaries as the current user.
#[cfg(test)]
fn unprivileged_runner() -> Runner {
    Runner {
        bindir: PathBuf::new(),
        run_as: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_mismatch_names_both_versions_and_the_way_out() {
        let message = LocalPostgresError::VersionMismatch {
            data_dir: "/data/pg".into(),
            cluster: "15".into(),
            bindir: "/usr/lib/postgresql/17/bin".into(),
            binaries: "17".into(),
        }
        .to_string();
        for part in [
            "PostgreSQL 15 cluster",
            "are PostgreSQL 17",
            "postgresql-15",
            "remove /data/pg",
        ] {
            assert!(message.contains(part), "{part:?} not in {message}");
        }
    }
}
