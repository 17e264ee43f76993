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
//!   Otherwise starts one with `pg_ctl` on a
//!   free loopback port, listening on 127.0.0.1 only, and on a Unix socket in
//!   the data directory when that path fits in a socket address and can be
//!   written in `unix_socket_directories` as is. The socket
//!   needs no password (only the directory's owner reaches it); TCP needs the
//!   superuser's password, kept in [`TCP_PASSWORD_FILE`] (without a socket,
//!   TCP is trusted, with a warning: every local user can connect). Starts of
//!   the same directory take turns, holding an exclusive `flock` on it until
//!   the superuser's password is set: a start that waited reuses the server
//!   the one before it started;
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

use std::ffi::OsStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use rand::Rng;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

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

/// The configuration file, inside the data directory, that Hermes rewrites on
/// every start and that `postgresql.conf` includes.
const HERMES_CONF: &str = "hermes.conf";

/// The server log, inside the data directory.
const SERVER_LOG: &str = "server.log";

/// The file, inside the data directory, holding the superuser's password
/// for TCP connections (the Unix socket needs none). Generated the first time.
pub const TCP_PASSWORD_FILE: &str = "hermes-tcp-password";

/// How many letters and digits a generated TCP password has.
const TCP_PASSWORD_LEN: usize = 32;

/// How much of the end of the server log error messages quote at most.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The largest small file (`PG_VERSION`, `postmaster.pid`, `postgresql.conf`)
/// read from the data directory.
const SMALL_FILE_LIMIT: u64 = 1024 * 1024;

/// The longest socket directory the server can use: a socket address holds
/// 107 bytes of path, and the server adds `/.s.PGSQL.<port>` to it.
const MAX_SOCKET_DIR_LEN: usize = 107 - "/.s.PGSQL.65535".len();

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
    data_dir: PathBuf,
    server: Running,
    database: String,
    reused: bool,
    runner: Runner,
}

impl fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("data_dir", &self.data_dir)
            .field("server", &self.server)
            .field("database", &self.database)
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
        let database = config.database.clone();
        let Started {
            data_dir,
            server,
            reused,
            runner,
            lock,
        } = blocking(move || start_blocking(&config)).await?;
        let pg = LocalPostgres {
            data_dir,
            server,
            database,
            reused,
            runner,
        };
        pg.wait_ready().await?;
        pg.set_tcp_password().await?;
        // The next start of this cluster may go on: its `ALTER ROLE` no longer
        // meets this one's. (On an early return the lock goes with `lock`.)
        drop(lock);
        pg.create_database(&pg.database).await?;
        Ok(pg)
    }

    /// The URL of the database given at start (see [`LocalPostgres::url_for`]).
    pub fn url(&self) -> String {
        self.url_for(&self.database)
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
        &self.database
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
        // parallel) would update the role's row together, the loser failing
        // with "tuple concurrently updated"; they take turns instead, since a
        // start holds the data directory's lock until this is done.
        sqlx::query(&statement)
            .persistent(false)
            .execute(&mut conn)
            .await
            .map_err(|e| self.sql_err(e))?;
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

/// What the blocking part of a start hands on to the rest of it.
struct Started {
    /// The data directory, absolute.
    data_dir: PathBuf,
    /// The server started or reused.
    server: Running,
    /// Whether the server was already running.
    reused: bool,
    /// How the server binaries are run.
    runner: Runner,
    /// The lock on the data directory (see [`lock_dir`]), held until the
    /// start has set the superuser's password.
    lock: Option<File>,
}

/// The blocking part of a start: binaries, user, init, start or reuse.
fn start_blocking(config: &LocalPostgresConfig) -> Result<Started, LocalPostgresError> {
    let data_dir = absolute(&config.data_dir)?;
    let runner = Runner::detect(&data_dir)?;
    let parent = data_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    std::fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
    if let Some(run_as) = &runner.run_as {
        make_traversable(&parent, run_as)?;
    }

    if !data_dir.exists() {
        init_staged(&runner, &data_dir, &parent)?;
    }
    // Held until this start has set the superuser's password: no other start
    // of this directory looks at it meanwhile, so it sees no cluster half-made
    // in place, a stale postmaster.pid is removed only while it is the one
    // found stale, and no two starts alter the role at once.
    let lock = lock_dir(&data_dir)?;
    if !data_dir.join("PG_VERSION").exists() {
        init_in_place(&runner, &data_dir)?;
    } else if let Some(run_as) = &runner.run_as {
        let meta = std::fs::metadata(&data_dir).map_err(io_err("reading", &data_dir))?;
        if meta.uid() != run_as.uid {
            let mut cmd = Command::new("chown");
            cmd.arg("-R")
                .arg(format!("{}:{}", run_as.uid, run_as.gid))
                .arg(&data_dir);
            run(cmd)?;
        }
    }

    let mut last_error = String::new();
    for attempt in 1..=START_ATTEMPTS {
        match runner.server_state(&data_dir)? {
            ServerState::Running(running) => {
                tracing::info!(data_dir = %data_dir.display(), port = running.port, "reusing the running private PostgreSQL");
                return Ok(Started {
                    data_dir,
                    server: running,
                    reused: true,
                    runner,
                    lock,
                });
            }
            ServerState::Stale { pid, port } => remove_stale_pid_file(&data_dir, pid, port)?,
            ServerState::NotRunning => {}
        }
        let port = free_port().map_err(io_err("choosing a free port for", &data_dir))?;
        write_hermes_conf(&data_dir, port, config, &runner)?;
        tracing::info!(data_dir = %data_dir.display(), port, "starting a private PostgreSQL");
        let mut cmd = runner.command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&data_dir)
            .arg("-l")
            .arg(data_dir.join(SERVER_LOG))
            .args(["-w", "-t", "60", "-s"]);
        match run(cmd) {
            Ok(_) => {
                // Read the port back from postmaster.pid: if another process
                // rewrote hermes.conf meanwhile, the server listens on its port.
                if let ServerState::Running(running) = runner.server_state(&data_dir)? {
                    return Ok(Started {
                        data_dir,
                        server: running,
                        reused: false,
                        runner,
                        lock,
                    });
                }
                last_error = "pg_ctl start succeeded but the server is not running".into();
            }
            Err(e) => {
                tracing::debug!(attempt, error = %e, "pg_ctl start failed; retrying");
                last_error = e.to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
    }
    Err(LocalPostgresError::NotReady {
        log_tail: log_tail(&data_dir),
        data_dir,
        reason: last_error,
    })
}

/// Runs initdb into a fresh sibling directory of `data_dir` (which does not
/// exist), then renames it to `data_dir`. If another process got there first,
/// its cluster is kept and ours discarded.
fn init_staged(runner: &Runner, data_dir: &Path, parent: &Path) -> Result<(), LocalPostgresError> {
    let name = data_dir
        .file_name()
        .unwrap_or_else(|| OsStr::new("pg"))
        .to_string_lossy()
        .into_owned();
    let staging = parent.join(format!(".{name}.init-{}", unique_suffix()));
    std::fs::create_dir(&staging).map_err(io_err("creating", &staging))?;
    tracing::info!(data_dir = %data_dir.display(), bindir = %runner.bindir.display(), "initialising a private PostgreSQL cluster");
    if let Err(e) = initdb(runner, &staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&staging, data_dir) {
        let _ = std::fs::remove_dir_all(&staging);
        if data_dir.join("PG_VERSION").exists() {
            // Lost the race to a concurrent initialisation: use theirs.
            return Ok(());
        }
        return Err(io_err("moving the new cluster to", data_dir)(e));
    }
    Ok(())
}

/// Runs initdb in `data_dir`, an existing directory, which must be empty (a
/// mount point cannot be replaced by a rename). The caller holds the
/// directory's lock ([`lock_dir`]), so no other start sees the cluster
/// half-made; when the initialisation fails, what it wrote is removed.
fn init_in_place(runner: &Runner, data_dir: &Path) -> Result<(), LocalPostgresError> {
    let mut names = std::fs::read_dir(data_dir)
        .and_then(|entries| {
            entries
                .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(io_err("reading", data_dir))?;
    if !names.is_empty() {
        names.sort();
        return Err(LocalPostgresError::NotADataDirectory {
            path: data_dir.to_path_buf(),
            contents: list_names(&names, 5),
        });
    }
    tracing::info!(data_dir = %data_dir.display(), bindir = %runner.bindir.display(), "initialising a private PostgreSQL cluster in the existing empty directory");
    let result = initdb(runner, data_dir);
    if result.is_err()
        && let Ok(entries) = std::fs::read_dir(data_dir)
    {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
        }
    }
    result
}

/// The first `count` of `names`, and how many more there are.
fn list_names(names: &[String], count: usize) -> String {
    let shown = names[..names.len().min(count)].join(", ");
    match names.len().saturating_sub(count) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// Makes `dir` (existing and empty) private to the user the server runs as,
/// runs initdb into it, and has its `postgresql.conf` include [`HERMES_CONF`].
fn initdb(runner: &Runner, dir: &Path) -> Result<(), LocalPostgresError> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions of", dir))?;
    if let Some(run_as) = &runner.run_as {
        std::os::unix::fs::chown(dir, Some(run_as.uid), Some(run_as.gid))
            .map_err(io_err("changing the owner of", dir))?;
    }
    let mut cmd = runner.command("initdb");
    cmd.arg("-D")
        .arg(dir)
        .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-locale"]);
    run(cmd)?;
    let conf = dir.join("postgresql.conf");
    let text = read_regular_file(&conf, SMALL_FILE_LIMIT).map_err(io_err("reading", &conf))?;
    let mut text = String::from_utf8_lossy(&text).into_owned();
    text.push_str(&format!(
        "\n# Settings managed by Hermes (rewritten on every start).\ninclude_if_exists = '{HERMES_CONF}'\n"
    ));
    write_owned(dir, "postgresql.conf", &text, runner)
}

/// Writes `hermes.conf` and `pg_hba.conf`.
fn write_hermes_conf(
    data_dir: &Path,
    port: u16,
    config: &LocalPostgresConfig,
    runner: &Runner,
) -> Result<(), LocalPostgresError> {
    let durability = match config.durability {
        Durability::Durable => "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n",
        Durability::Relaxed => "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
    };
    let socket_dir = socket_dir_setting(data_dir);
    let text = format!(
        "# Written by Hermes on every start; edit the Hermes configuration instead.\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{socket_dir}'\n\
         max_connections = {}\n\
         {durability}",
        config.max_connections
    );
    write_owned(data_dir, HERMES_CONF, &text, runner)?;
    write_owned(
        data_dir,
        "pg_hba.conf",
        &hba_conf(data_dir, socket_dir),
        runner,
    )
}

/// Who may connect: through the socket, whoever can enter the data directory
/// (mode 0700: its owner), without a password; over TCP, every local user can
/// reach the server, so only with the password of [`TCP_PASSWORD_FILE`]. A
/// cluster without a socket has only TCP, so it must trust it.
fn hba_conf(data_dir: &Path, socket_dir: &str) -> String {
    let tcp = if socket_dir.is_empty() {
        tracing::warn!(
            data_dir = %data_dir.display(),
            "the data directory's path is too long for a Unix socket, or holds a character \
             unix_socket_directories cannot take (' \\ , or trailing whitespace): the private \
             cluster trusts every connection on 127.0.0.1, from any local user"
        );
        "trust"
    } else {
        "scram-sha-256"
    };
    format!(
        "# Written by Hermes on every start.\n\
         local all all trust\n\
         host all all 127.0.0.1/32 {tcp}\n"
    )
}

/// Writes `name` in `data_dir` atomically, readable by its owner only and
/// owned by the user the server runs as: into a new file (never through an
/// existing one), renamed over `name` (which replaces a symlink, not its target).
fn write_owned(
    data_dir: &Path,
    name: &str,
    text: &str,
    runner: &Runner,
) -> Result<(), LocalPostgresError> {
    let tmp = data_dir.join(format!(".{name}.{}", unique_suffix()));
    let dest = data_dir.join(name);
    let written = write_new_file(&tmp, text, runner.run_as.as_ref())
        .map_err(io_err("writing", &tmp))
        .and_then(|()| std::fs::rename(&tmp, &dest).map_err(io_err("writing", &dest)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Creates `path` (which must not exist, not even as a symlink) with mode
/// 0600, writes `text` into it and gives the open file to `run_as`.
fn write_new_file(path: &Path, text: &str, run_as: Option<&RunAs>) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    if let Some(run_as) = run_as {
        std::os::unix::fs::fchown(&file, Some(run_as.uid), Some(run_as.gid))?;
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file with a single link, not
/// following a symlink: the user the server runs as controls the data
/// directory, and could point a name in it at a file only we may read. Anything
/// else is an [`io::ErrorKind::InvalidData`] error.
fn open_regular_file(path: &Path) -> io::Result<File> {
    // Not through a symlink (ELOOP), nor blocking on a FIFO; what was opened
    // is then checked, so no earlier look can be raced.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP) => not_a_regular_file(),
            _ => error,
        })?;
    let opened = file.metadata()?;
    if !opened.file_type().is_file() || opened.nlink() != 1 {
        return Err(not_a_regular_file());
    }
    Ok(file)
}

fn not_a_regular_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "not a regular file with a single link",
    )
}

/// At most `limit` bytes from the start of `path` (see [`open_regular_file`]).
fn read_regular_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular_file(path)?
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The superuser's TCP password: read from [`TCP_PASSWORD_FILE`] if that holds
/// exactly a generated password, else made (random letters and digits) and
/// written there, readable by its owner only.
fn tcp_password(data_dir: &Path, runner: &Runner) -> Result<String, LocalPostgresError> {
    let path = data_dir.join(TCP_PASSWORD_FILE);
    match read_regular_file(&path, TCP_PASSWORD_LEN as u64 + 1) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(password) if is_generated_password(&password) => return Ok(password),
            _ => tracing::warn!(path = %path.display(), "not a generated password; replacing it"),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "replacing the password file"),
    }
    let password = generate_password();
    write_owned(data_dir, TCP_PASSWORD_FILE, &password, runner)?;
    Ok(password)
}

/// [`TCP_PASSWORD_LEN`] random ASCII letters and digits.
fn generate_password() -> String {
    rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(TCP_PASSWORD_LEN)
        .map(char::from)
        .collect()
}

/// Whether `text` has the shape of [`generate_password`]'s passwords (which
/// makes it safe inside a quoted SQL literal).
fn is_generated_password(text: &str) -> bool {
    text.len() == TCP_PASSWORD_LEN && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `unix_socket_directories` for a cluster in `data_dir`: the data directory
/// itself, or none (empty) when its path is too long for a socket address,
/// would need quoting in the configuration file, or would not be read back as
/// one directory by the server (which splits the setting at commas and trims
/// whitespace around each directory).
fn socket_dir_setting(data_dir: &Path) -> &str {
    match data_dir.to_str() {
        Some(dir)
            if dir.len() <= MAX_SOCKET_DIR_LEN
                && !dir.contains(['\'', '\\', ','])
                && !dir.ends_with(char::is_whitespace) =>
        {
            dir
        }
        _ => "",
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn absolute(path: &Path) -> Result<PathBuf, LocalPostgresError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(io_err("resolving", path))?;
    Ok(cwd.join(path))
}

/// Grants search (`x`) permission to `run_as` on `dir` and each of its
/// ancestors that lacks it, so the server can reach its data directory.
fn make_traversable(dir: &Path, run_as: &RunAs) -> Result<(), LocalPostgresError> {
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor).map_err(io_err("reading", ancestor))?;
        let mode = meta.mode() & 0o7777;
        let (bit, class) = search_bit(meta.uid(), meta.gid(), run_as);
        if mode & bit == 0 {
            tracing::warn!(
                dir = %ancestor.display(),
                "granting search permission ({class}+x) so the 'postgres' user can reach the data directory"
            );
            std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | bit))
                .map_err(io_err("granting search permission on", ancestor))?;
        }
    }
    Ok(())
}

/// The permission bit that lets `run_as` search a directory owned by `uid`
/// and group `gid`, and its class as `chmod` names it: the owner's if it is
/// the owner, else the group's if it is in the group, else the others' (the
/// kernel checks the first class that applies, and that class's bit only).
fn search_bit(uid: u32, gid: u32, run_as: &RunAs) -> (u32, char) {
    if uid == run_as.uid {
        (0o100, 'u')
    } else if run_as.groups.contains(&gid) {
        (0o010, 'g')
    } else {
        (0o001, 'o')
    }
}

/// The last lines of the server log, for error messages (none when it is not
/// a regular file: see [`open_regular_file`]).
fn log_tail(data_dir: &Path) -> String {
    read_log_end(&data_dir.join(SERVER_LOG))
        .map(|text| last_lines(&text, 20))
        .unwrap_or_default()
}

/// The last [`LOG_TAIL_BYTES`] of the log at `path`, from a line start.
fn read_log_end(path: &Path) -> io::Result<String> {
    let mut file = open_regular_file(path)?;
    let start = file.metadata()?.len().saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = match text.split_once('\n') {
        Some((_, rest)) if start > 0 => rest, // skip a partial first line
        _ => &text,
    };
    Ok(text.to_owned())
}

/// The last `count` lines of `text`.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Runs a command, turning a failure into [`LocalPostgresError::Command`].
fn run(mut cmd: Command) -> Result<Output, LocalPostgresError> {
    let command = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(out),
        Ok(out) => Err(LocalPostgresError::Command {
            command,
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        }),
        Err(e) => Err(LocalPostgresError::Command {
            command,
            status: "could not run".into(),
            output: e.to_string(),
        }),
    }
}

/// Output of a command that must succeed, trimmed.
fn run_stdout(cmd: Command) -> Result<String, LocalPostgresError> {
    let out = run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone)]
struct RunAs {
    user: String,
    uid: u32,
    /// Its primary group.
    gid: u32,
    /// All its groups, the primary one first.
    groups: Vec<u32>,
    tool: DropTool,
}

#[derive(Debug, Clone)]
enum DropTool {
    Runuser(PathBuf),
    Setpriv(PathBuf),
}

/// Runs the server binaries, as the `postgres` user when we are root.
#[derive(Debug, Clone)]
struct Runner {
    bindir: PathBuf,
    run_as: Option<RunAs>,
}

impl Runner {
    /// The binaries for the cluster in `data_dir` (see [`find_bindir`]), run
    /// as the `postgres` user when we are root. Binaries of another major
    /// version than an existing cluster's are an error: asked of those not
    /// found as the install of its version.
    fn detect(data_dir: &Path) -> Result<Self, LocalPostgresError> {
        let cluster = cluster_version(data_dir);
        let Bindir {
            dir: bindir,
            of_cluster_version,
        } = find_bindir(cluster.as_deref()).ok_or(LocalPostgresError::BinariesNotFound)?;
        let mut id = Command::new("id");
        id.arg("-u");
        let uid = run_stdout(id)?;
        let run_as = if uid == "0" {
            Some(postgres_user()?)
        } else {
            None
        };
        let runner = Runner { bindir, run_as };
        if let Some(cluster) = cluster
            && !of_cluster_version
        {
            runner.check_version(data_dir, &cluster)?;
        }
        Ok(runner)
    }

    /// Fails with [`LocalPostgresError::VersionMismatch`] when the binaries'
    /// major version is not `cluster`'s (an unknown version passes: the
    /// server itself will say what is wrong).
    fn check_version(&self, data_dir: &Path, cluster: &[u32]) -> Result<(), LocalPostgresError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("--version");
        let Some(binaries) = version_in_output(&run_stdout(cmd)?).map(major_version) else {
            return Ok(());
        };
        if binaries == cluster {
            return Ok(());
        }
        Err(LocalPostgresError::VersionMismatch {
            data_dir: data_dir.to_path_buf(),
            cluster: version_text(cluster),
            bindir: self.bindir.clone(),
            binaries: version_text(&binaries),
        })
    }

    /// A command running `program` from the binaries directory.
    fn command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            None => Command::new(exe),
            Some(RunAs {
                user,
                tool: DropTool::Runuser(tool),
                ..
            }) => {
                let mut cmd = Command::new(tool);
                cmd.args(["-u", user, "--"]).arg(exe);
                cmd
            }
            Some(RunAs {
                user,
                tool: DropTool::Setpriv(tool),
                ..
            }) => {
                let mut cmd = Command::new(tool);
                cmd.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .args(["--init-groups", "--"])
                    .arg(exe);
                cmd
            }
        };
        // The unprivileged user may not be able to enter our working directory.
        cmd.current_dir("/");
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// What the `postmaster.pid` of `data_dir` says about its server.
    fn server_state(&self, data_dir: &Path) -> Result<ServerState, LocalPostgresError> {
        let pid_file = data_dir.join("postmaster.pid");
        // postmaster.pid: pid, data dir, start time, port, socket dir, listen address, ...
        let text = match read_regular_file(&pid_file, SMALL_FILE_LIMIT) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ServerState::NotRunning),
            Err(e) => return Err(io_err("reading", &pid_file)(e)),
        };
        // The pid is whole once the line after it has begun.
        let Some((pid, rest)) = text.split_once('\n') else {
            return Ok(ServerState::NotRunning);
        };
        let Ok(pid) = pid.trim().parse() else {
            return Ok(ServerState::NotRunning);
        };
        let lines: Vec<&str> = rest.lines().map(str::trim).collect();
        let port = lines.get(2).and_then(|line| line.parse().ok());
        if !self.is_server_of(pid, data_dir) {
            return Ok(ServerState::Stale { pid, port });
        }
        let Some(port) = port else {
            return Ok(ServerState::NotRunning);
        };
        // The first socket directory; empty when the server has no socket.
        let socket_dir = lines
            .get(3)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from);
        Ok(ServerState::Running(Running {
            pid,
            port,
            socket_dir,
        }))
    }

    /// Whether process `pid` is a PostgreSQL server of `data_dir`. Where
    /// `/proc` shows processes, it must run the `postgres` executable in
    /// `data_dir` (a server works in its data directory); when where it
    /// works cannot be seen (another user's process, to a root without
    /// `CAP_SYS_PTRACE`), its `-D` argument must name `data_dir`, if it has an
    /// absolute one. Without `/proc`, any live process will do, as for
    /// `pg_ctl status`.
    fn is_server_of(&self, pid: u32, data_dir: &Path) -> bool {
        if !Path::new("/proc/self").exists() {
            let mut status = self.command("pg_ctl");
            status.arg("status").arg("-D").arg(data_dir);
            return status.output().is_ok_and(|out| out.status.success());
        }
        let process = PathBuf::from(format!("/proc/{pid}"));
        // Empty for a zombie; a thread id shows its process's command line.
        let Ok(cmdline) = std::fs::read(process.join("cmdline")) else {
            return false;
        };
        let args: Vec<&OsStr> = cmdline
            .split(|&byte| byte == 0)
            .map(OsStr::from_bytes)
            .collect();
        let runs_postgres = args
            .first()
            .and_then(|program| Path::new(program).file_name())
            .is_some_and(|name| name == "postgres" || name == "postmaster");
        if !runs_postgres {
            return false;
        }
        let Ok(dir) = std::fs::metadata(data_dir) else {
            return false;
        };
        let is_data_dir = |path: &Path| {
            std::fs::metadata(path).is_ok_and(|m| m.dev() == dir.dev() && m.ino() == dir.ino())
        };
        // Its working directory is its data directory; without the right to
        // read it (root without CAP_SYS_PTRACE), its `-D`.
        match std::fs::metadata(process.join("cwd")) {
            Ok(_) => is_data_dir(&process.join("cwd")),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                match data_dir_argument(&args) {
                    Some(arg) if arg.is_absolute() => is_data_dir(arg),
                    _ => true,
                }
            }
            Err(_) => false,
        }
    }
}

/// The data directory in a `postgres` command line (`-D <dir>` or `-D<dir>`).
fn data_dir_argument<'a>(args: &[&'a OsStr]) -> Option<&'a Path> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg.as_bytes() == b"-D" {
            return args.next().map(|arg| Path::new(*arg));
        }
        if let Some(dir) = arg.as_bytes().strip_prefix(b"-D") {
            return Some(Path::new(OsStr::from_bytes(dir)));
        }
    }
    None
}

/// What the `postmaster.pid` of a data directory says about its server.
#[derive(Debug)]
enum ServerState {
    /// None runs: there is no `postmaster.pid`, or one still being written by
    /// a server that is starting.
    NotRunning,
    /// A server of the directory runs.
    Running(Running),
    /// The `postmaster.pid` of a server that is gone: its process has exited,
    /// or its pid now names another process (after a restart of the machine
    /// or container without a clean shutdown).
    Stale {
        /// The pid it names.
        pid: u32,
        /// The port it names, if it got that far.
        port: Option<u16>,
    },
}

/// Removes the stale `postmaster.pid` of `data_dir` (see
/// [`ServerState::Stale`]), and the lock file of the gone server's socket in
/// the data directory if it names the same pid: a server finding a live pid in
/// either takes it for another server of the directory and refuses to start.
fn remove_stale_pid_file(
    data_dir: &Path,
    pid: u32,
    port: Option<u16>,
) -> Result<(), LocalPostgresError> {
    tracing::warn!(
        data_dir = %data_dir.display(),
        pid,
        "postmaster.pid names a process that is not a PostgreSQL server of this directory \
         (the server was not shut down cleanly): removing it and starting the server"
    );
    remove_if_present(&data_dir.join("postmaster.pid"))?;
    let Some(port) = port else {
        return Ok(());
    };
    let socket_lock = data_dir.join(format!(".s.PGSQL.{port}.lock"));
    let names_pid = read_regular_file(&socket_lock, SMALL_FILE_LIMIT).is_ok_and(|bytes| {
        String::from_utf8_lossy(&bytes)
            .lines()
            .next()
            .map(str::trim)
            == Some(&pid.to_string())
    });
    if names_pid {
        remove_if_present(&socket_lock)?;
        remove_if_present(&data_dir.join(format!(".s.PGSQL.{port}")))?;
    }
    Ok(())
}

/// Removes the file at `path`, if there is one.
fn remove_if_present(path: &Path) -> Result<(), LocalPostgresError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// Takes an exclusive `flock` on the directory `dir`, held until the returned
/// file is dropped (and not passed on to the commands run meanwhile: the file
/// is close-on-exec). Another start of the same cluster holds it for as long
/// as its start takes: waiting for it is logged, and given up after
/// [`LOCK_WAIT`]. On a file system without `flock`, goes on without it.
fn lock_dir(dir: &Path) -> Result<Option<File>, LocalPostgresError> {
    let file = File::open(dir).map_err(io_err("opening", dir))?;
    let started = Instant::now();
    let mut logged = false;
    loop {
        // SAFETY: flock only takes a descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(file));
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if started.elapsed() < LOCK_WAIT => {
                if !logged {
                    tracing::info!(dir = %dir.display(), "another process is starting this cluster; waiting for it");
                    logged = true;
                }
                std::thread::sleep(LOCK_POLL);
            }
            io::ErrorKind::WouldBlock => {
                return Err(io_err("locking", dir)(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "another process has been starting this cluster for {} s",
                        LOCK_WAIT.as_secs()
                    ),
                )));
            }
            _ => {
                tracing::warn!(dir = %dir.display(), %error, "cannot lock the data directory; starting without the lock");
                return Ok(None);
            }
        }
    }
}

/// How long a start waits for another start of the same cluster: longer
/// than every attempt of one start ([`START_ATTEMPTS`] × [`READY_TIMEOUT`]).
const LOCK_WAIT: Duration =
    Duration::from_secs(READY_TIMEOUT.as_secs() * (START_ATTEMPTS as u64 + 1));

/// How often a start waiting for the lock tries it again.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// A running server, from its `postmaster.pid`.
#[derive(Debug, Clone)]
struct Running {
    /// The postmaster's process id.
    pid: u32,
    /// Its loopback TCP port.
    port: u16,
    /// The directory of its Unix socket, if it has one.
    socket_dir: Option<PathBuf>,
}

fn postgres_user() -> Result<RunAs, LocalPostgresError> {
    let user = "postgres".to_owned();
    let ids = |flag: &str| -> Option<Vec<u32>> {
        let out = Command::new("id").arg(flag).arg(&user).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|id| id.parse().ok())
            .collect()
    };
    // `id -G`: the primary group, then the supplementary ones.
    let (Some(&[uid]), Some(groups)) = (ids("-u").as_deref(), ids("-G")) else {
        return Err(LocalPostgresError::NoUnprivilegedUser);
    };
    let Some(&gid) = groups.first() else {
        return Err(LocalPostgresError::NoUnprivilegedUser);
    };
    let tool = if let Some(path) = find_on_path("runuser") {
        DropTool::Runuser(path)
    } else if let Some(path) = find_on_path("setpriv") {
        DropTool::Setpriv(path)
    } else {
        return Err(LocalPostgresError::NoPrivilegeDropTool);
    };
    Ok(RunAs {
        user,
        uid,
        gid,
        groups,
        tool,
    })
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// A directory of server binaries, and whether it was found as the install
/// of the cluster's major version (so of that version, by its name).
#[derive(Debug, PartialEq, Eq)]
struct Bindir {
    dir: PathBuf,
    of_cluster_version: bool,
}

/// `$HERMES_PG_BINDIR`, else the choice of [`choose_bindir`] among the
/// versioned installs and `PATH`, for a cluster of major version `cluster`
/// (`None`: a new cluster).
fn find_bindir(cluster: Option<&[u32]>) -> Option<Bindir> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Some(Bindir {
                dir,
                of_cluster_version: false,
            });
        }
        tracing::warn!(dir = %dir.display(), "{BINDIR_ENV} does not hold initdb, pg_ctl and postgres; ignoring it");
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| has_server_binaries(d)));
    choose_bindir(cluster, versioned_installs(), on_path)
}

/// The bin directory of the install of the cluster's major version `cluster`
/// among `installs` (version, bin directory), else `on_path` (the first
/// directory of `PATH` with the binaries), else the newest install.
fn choose_bindir(
    cluster: Option<&[u32]>,
    mut installs: Vec<(Vec<u32>, PathBuf)>,
    on_path: Option<PathBuf>,
) -> Option<Bindir> {
    if let Some(i) = cluster.and_then(|major| installs.iter().position(|(v, _)| v == major)) {
        return Some(Bindir {
            dir: installs.swap_remove(i).1,
            of_cluster_version: true,
        });
    }
    let dir = on_path.or_else(|| {
        installs.sort();
        installs.pop().map(|(_, dir)| dir)
    })?;
    Some(Bindir {
        dir,
        of_cluster_version: false,
    })
}

/// The installs under `/usr/lib/postgresql/<version>/bin` and
/// `/usr/pgsql-<version>/bin` that hold the server binaries, with the version
/// in their name (empty when it is not one).
fn versioned_installs() -> Vec<(Vec<u32>, PathBuf)> {
    let mut installs = Vec::new();
    for (root, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix(prefix) else {
                continue;
            };
            let dir = entry.path().join("bin");
            if has_server_binaries(&dir) {
                installs.push((parse_version(version).unwrap_or_default(), dir));
            }
        }
    }
    installs
}

/// The major version in the cluster's `PG_VERSION`, if it has a readable one.
fn cluster_version(data_dir: &Path) -> Option<Vec<u32>> {
    let bytes = read_regular_file(&data_dir.join("PG_VERSION"), 64).ok()?;
    parse_version(String::from_utf8_lossy(&bytes).trim())
}

/// The numbers of a version that starts `text` (`16`, `9.6`, `17beta1`, `15.2`).
fn parse_version(text: &str) -> Option<Vec<u32>> {
    let end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let parts: Vec<u32> = text[..end]
        .split('.')
        .map_while(|part| part.parse().ok())
        .collect();
    (!parts.is_empty()).then_some(parts)
}

/// The version in `pg_ctl --version`'s output (`pg_ctl (PostgreSQL) 15.4 ...`).
fn version_in_output(output: &str) -> Option<Vec<u32>> {
    let (_, rest) = output.split_once("(PostgreSQL)")?;
    parse_version(rest.trim_start())
}

/// The major version of a full one: `15` of `15.4`, `9.6` of `9.6.24`.
fn major_version(mut version: Vec<u32>) -> Vec<u32> {
    let parts = if version.first() >= Some(&10) { 1 } else { 2 };
    version.truncate(parts);
    version
}

/// `15`, `9.6`.
fn version_text(version: &[u32]) -> String {
    let parts: Vec<String> = version.iter().map(u32::to_string).collect();
    parts.join(".")
}

/// Returns the URL of a fresh, empty, uniquely named database for one test.
///
/// The first call in a process starts (or reuses) one cluster shared by every
/// test binary of the cargo target directory, in
/// `<target dir>/tmp/hermes-pg-test` (override with `$HERMES_TEST_PG_DIR`),
/// with [`Durability::Relaxed`]. Test binaries running at the same time share
/// it safely: no start sees another's cluster half-made (see the
/// [module docs](self)) and every
/// call creates its own database named `hermes_test_<pid>_<n>`, so tests never
/// see each other's rows. Databases left by test processes that have exited
/// are dropped in the background when a new process first uses the cluster.
/// The cluster is left running for the next test run.
///
/// # Panics
///
/// When the cluster cannot be started or the database cannot be created, with
/// the reason (for instance, which package to install). Use
/// [`try_test_database`] to get the error instead.
///
/// ```no_run
/// # async fn example() {
/// let url = hermes_adapters::postgres::local::test_database().await;
/// let pool = sqlx::PgPool::connect(&url).await.expect("connect");
/// # }
/// ```
pub async fn test_database() -> String {
    match try_test_database().await {
        Ok(url) => url,
        Err(e) => panic!("cannot provide a test database: {e}"),
    }
}

/// Like [`test_database`], returning the error instead of panicking.
pub async fn try_test_database() -> Result<String, LocalPostgresError> {
    static CLUSTER: tokio::sync::OnceCell<LocalPostgres> = tokio::sync::OnceCell::const_new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pg = CLUSTER
        .get_or_try_init(|| async {
            let config = LocalPostgresConfig::new(test_cluster_dir(), "postgres")
                .durability(Durability::Relaxed)
                .max_connections(300);
            let pg = LocalPostgres::start_with(config).await?;
            // Each DROP DATABASE waits for a checkpoint: clean up on the side
            // rather than delaying the first test.
            let cleaner = pg.clone();
            let _ = std::thread::Builder::new()
                .name("hermes-test-db-cleanup".into())
                .spawn(move || {
                    if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        runtime.block_on(drop_abandoned_test_databases(&cleaner));
                    }
                });
            Ok::<_, LocalPostgresError>(pg)
        })
        .await?;
    let name = format!(
        "hermes_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // A database of that name can only be left over from an earlier process
    // with the same pid; start from an empty one.
    pg.drop_database(&name).await?;
    pg.create_database(&name).await?;
    Ok(pg.url_for(&name))
}

/// Where [`test_database`] keeps its cluster.
fn test_cluster_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(TEST_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let target = cargo_target_dir()
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    target.join("tmp").join("hermes-pg-test")
}

/// Cargo's target directory above the running executable (test and bench
/// executables live in `<target>/<profile>[/deps]`; cargo marks `<target>`
/// with `CACHEDIR.TAG`), if it runs from one.
pub fn cargo_target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

/// Drops `hermes_test_<pid>_<n>` databases whose process has exited.
async fn drop_abandoned_test_databases(pg: &LocalPostgres) {
    if !Path::new("/proc/self").exists() {
        return; // no cheap way to tell live processes apart
    }
    let Ok(mut conn) = PgConnection::connect_with(&pg.connect_options("postgres")).await else {
        return;
    };
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'hermes\\_test\\_%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    let _ = conn.close().await;
    for name in names {
        let pid = name
            .strip_prefix("hermes_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = pg.drop_database(&name).await {
            tracing::debug!(database = %name, error = %e, "could not drop an abandoned test database");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// A fresh empty directory for one test.
    fn scratch_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hermes-local-unit-{}", unique_suffix()));
        std::fs::create_dir(&dir).expect("create scratch dir");
        dir
    }

    fn unprivileged_runner() -> Runner {
        Runner {
            bindir: PathBuf::new(),
            run_as: None,
        }
    }

    #[test]
    fn only_the_generated_password_shape_is_accepted() {
        let generated = generate_password();
        assert!(is_generated_password(&generated), "{generated}");
        assert!(is_generated_password(&format!(
            "{}Zz9",
            "a".repeat(TCP_PASSWORD_LEN - 3)
        )));
        for bad in [
            String::new(),
            "a".repeat(TCP_PASSWORD_LEN - 1),
            "a".repeat(TCP_PASSWORD_LEN + 1),
            format!("{}\n", "a".repeat(TCP_PASSWORD_LEN - 1)),
            format!("{}'", "a".repeat(TCP_PASSWORD_LEN - 1)),
            format!("{};", "a".repeat(TCP_PASSWORD_LEN - 1)),
            format!("{}é", "a".repeat(TCP_PASSWORD_LEN - 2)),
        ] {
            assert!(!is_generated_password(&bad), "{bad:?}");
        }
    }

    #[test]
    fn password_file_is_kept_only_when_it_holds_a_generated_password() {
        let dir = scratch_dir();
        let runner = unprivileged_runner();
        let path = dir.join(TCP_PASSWORD_FILE);

        let first = tcp_password(&dir, &runner).expect("make a password");
        assert!(is_generated_password(&first));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
        let mode = std::fs::metadata(&path).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(tcp_password(&dir, &runner).expect("reuse"), first);

        let injected = format!("x'; DROP ROLE x; --{}", "a".repeat(20));
        std::fs::write(&path, &injected).expect("write");
        let replaced = tcp_password(&dir, &runner).expect("replace");
        assert!(is_generated_password(&replaced));
        assert_ne!(replaced, first);

        // A symlink is replaced, and what it points at left alone.
        let target = dir.join("target");
        std::fs::write(&target, &first).expect("write target");
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let fresh = tcp_password(&dir, &runner).expect("replace the symlink");
        assert_ne!(fresh, first, "read through a symlink");
        assert!(std::fs::symlink_metadata(&path).expect("stat").is_file());
        assert_eq!(std::fs::read_to_string(&target).expect("read"), first);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn only_regular_files_with_one_link_are_read() {
        let dir = scratch_dir();
        let file = dir.join("file");
        std::fs::write(&file, "content").expect("write");
        assert_eq!(read_regular_file(&file, 100).expect("read"), b"content");
        assert_eq!(read_regular_file(&file, 3).expect("read"), b"con");

        let missing = read_regular_file(&dir.join("missing"), 100).expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let hard = dir.join("hard");
        std::fs::hard_link(&file, &hard).expect("hard link");
        for refused in [link.as_path(), hard.as_path(), dir.as_path()] {
            let err = read_regular_file(refused, 100).expect_err("refused");
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "{}",
                refused.display()
            );
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn log_tail_is_the_end_of_a_regular_log_only() {
        let dir = scratch_dir();
        let lines: Vec<String> = (0..30_000).map(|i| format!("line {i}")).collect();
        std::fs::write(dir.join("real.log"), lines.join("\n")).expect("write");
        std::os::unix::fs::symlink(dir.join("real.log"), dir.join(SERVER_LOG)).expect("symlink");
        assert_eq!(log_tail(&dir), "");

        std::fs::rename(dir.join("real.log"), dir.join(SERVER_LOG)).expect("rename");
        assert_eq!(log_tail(&dir), lines[lines.len() - 20..].join("\n"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn write_owned_replaces_a_symlink_instead_of_writing_through_it() {
        let dir = scratch_dir();
        let target = dir.join("target");
        std::fs::write(&target, "untouched").expect("write");
        std::os::unix::fs::symlink(&target, dir.join(HERMES_CONF)).expect("symlink");
        write_owned(&dir, HERMES_CONF, "port = 1\n", &unprivileged_runner()).expect("write");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "untouched");
        let written = dir.join(HERMES_CONF);
        assert!(std::fs::symlink_metadata(&written).expect("stat").is_file());
        assert_eq!(
            std::fs::read_to_string(&written).expect("read"),
            "port = 1\n"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn only_a_postgres_process_working_in_the_data_directory_is_its_server() {
        let dir = scratch_dir();
        let other = scratch_dir();
        let runner = unprivileged_runner();
        // This process (and each of its threads) runs no `postgres`.
        assert!(!runner.is_server_of(std::process::id(), &dir));
        assert!(!runner.is_server_of(u32::MAX, &dir), "no such process");

        // A process of the `postgres` program (as its command line names it)
        // counts, in the data directory only.
        let sleep = find_on_path("sleep").expect("sleep");
        let spawn = |program: &str, cwd: &Path| {
            std::process::Command::new(&sleep)
                .arg0(program)
                .arg("30")
                .current_dir(cwd)
                .spawn()
                .expect("spawn sleep")
        };
        let postgres = "/usr/lib/postgresql/15/bin/postgres";
        let mut children = [
            (spawn(postgres, &dir), true),
            (spawn(postgres, &other), false),
            (spawn("sleep", &dir), false),
        ];
        for (child, expected) in &children {
            assert_eq!(runner.is_server_of(child.id(), &dir), *expected);
        }
        for (child, _) in &mut children {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
        // A zombie runs nothing (its command line is empty).
        let mut exited = spawn(postgres, &dir);
        exited.kill().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(format!("/proc/{}/cmdline", exited.id())).is_ok_and(|c| !c.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!runner.is_server_of(exited.id(), &dir));
        exited.wait().expect("reap");

        fn args(args: &[&'static str]) -> Vec<&'static OsStr> {
            args.iter().map(|arg| OsStr::new(*arg)).collect()
        }
        let pg = "/usr/lib/postgresql/15/bin/postgres";
        assert_eq!(
            data_dir_argument(&args(&[pg, "-D", "/srv/pg"])),
            Some(Path::new("/srv/pg"))
        );
        assert_eq!(
            data_dir_argument(&args(&[pg, "-c", "x=y", "-D/srv/pg"])),
            Some(Path::new("/srv/pg"))
        );
        assert_eq!(data_dir_argument(&args(&[pg])), None);
        assert_eq!(data_dir_argument(&args(&[pg, "-D"])), None);
        std::fs::remove_dir_all(&dir).expect("clean up");
        std::fs::remove_dir_all(&other).expect("clean up");
    }

    #[test]
    fn a_directory_without_a_cluster_is_described_by_its_first_names() {
        let names =
            |count: usize| -> Vec<String> { (1..=count).map(|i| format!("f{i}")).collect() };
        assert_eq!(list_names(&names(1), 5), "f1");
        assert_eq!(list_names(&names(5), 5), "f1, f2, f3, f4, f5");
        assert_eq!(list_names(&names(7), 5), "f1, f2, f3, f4, f5 and 2 more");
        let message = LocalPostgresError::NotADataDirectory {
            path: "/data/pg".into(),
            contents: "lost+found".into(),
        }
        .to_string();
        assert_eq!(
            message,
            "/data/pg is not empty and is not a PostgreSQL data directory (no PG_VERSION; it \
             holds lost+found): point the data directory at a missing or empty directory \
             instead (on a mounted volume, which may hold lost+found, a subdirectory such as \
             /data/pg/pgdata), or move what it holds away"
        );
    }

    #[test]
    fn search_permission_is_granted_to_the_class_the_server_user_is_in() {
        let dir = scratch_dir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let owner = std::fs::metadata(&dir).expect("stat");
        let run_as = |uid: u32, groups: &[u32]| RunAs {
            user: "postgres".into(),
            uid,
            gid: groups[0],
            groups: groups.to_vec(),
            tool: DropTool::Runuser(PathBuf::from("/sbin/runuser")),
        };
        make_traversable(&dir, &run_as(owner.uid(), &[owner.gid()])).expect("make traversable");
        let mode = std::fs::metadata(&dir).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).expect("clean up");

        // The owner's bit for the owner, whatever its groups; the group's for
        // a member (primary or supplementary); else the others'.
        let (uid, gid) = (1000, 2000);
        assert_eq!(search_bit(uid, gid, &run_as(1000, &[2000])), (0o100, 'u'));
        assert_eq!(search_bit(uid, gid, &run_as(1001, &[2000])), (0o010, 'g'));
        assert_eq!(
            search_bit(uid, gid, &run_as(1001, &[3000, 2000])),
            (0o010, 'g')
        );
        assert_eq!(search_bit(uid, gid, &run_as(1001, &[3000])), (0o001, 'o'));
    }

    #[test]
    fn binaries_of_the_clusters_major_version_are_preferred() {
        let installs = || {
            vec![
                (vec![16], PathBuf::from("/usr/lib/postgresql/16/bin")),
                (vec![15], PathBuf::from("/usr/lib/postgresql/15/bin")),
                (vec![9, 6], PathBuf::from("/usr/pgsql-9.6/bin")),
            ]
        };
        let on_path = || Some(PathBuf::from("/usr/local/bin"));
        let chosen = |cluster: Option<&[u32]>, on_path| {
            choose_bindir(cluster, installs(), on_path).map(|bindir| bindir.dir)
        };

        assert_eq!(
            chosen(Some(&[15]), on_path()),
            Some("/usr/lib/postgresql/15/bin".into())
        );
        // Only an install named for the cluster's version is known to be of it.
        let of_version = |cluster: Option<&[u32]>| {
            choose_bindir(cluster, installs(), on_path()).map(|bindir| bindir.of_cluster_version)
        };
        assert_eq!(of_version(Some(&[15])), Some(true));
        assert_eq!(of_version(Some(&[14])), Some(false));
        assert_eq!(of_version(None), Some(false));
        assert_eq!(
            chosen(Some(&[9, 6]), None),
            Some("/usr/pgsql-9.6/bin".into())
        );
        // No install of the cluster's version, or a new cluster: as before.
        assert_eq!(chosen(Some(&[14]), on_path()), on_path());
        assert_eq!(chosen(None, on_path()), on_path());
        assert_eq!(
            chosen(Some(&[14]), None),
            Some("/usr/lib/postgresql/16/bin".into())
        );
        assert_eq!(
            chosen(None, None),
            Some("/usr/lib/postgresql/16/bin".into())
        );
        assert_eq!(choose_bindir(Some(&[15]), Vec::new(), None), None);
    }

    #[test]
    fn versions_are_read_from_pg_version_and_pg_ctl() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("17beta1"), Some(vec![17]));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
        let major = |output: &str| version_in_output(output).map(major_version);
        assert_eq!(
            major("pg_ctl (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)\n"),
            Some(vec![15])
        );
        assert_eq!(major("pg_ctl (PostgreSQL) 9.6.24"), Some(vec![9, 6]));
        assert_eq!(major("pg_ctl (PostgreSQL) 18devel"), Some(vec![18]));
        assert_eq!(major("something else"), None);
        assert_eq!(version_text(&[9, 6]), "9.6");

        let dir = scratch_dir();
        assert_eq!(cluster_version(&dir), None);
        std::fs::write(dir.join("PG_VERSION"), "15\n").expect("write");
        assert_eq!(cluster_version(&dir), Some(vec![15]));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

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

    #[test]
    fn socket_dir_is_refused_for_paths_the_setting_cannot_hold() {
        assert_eq!(
            socket_dir_setting(Path::new("/srv/hermes/pg")),
            "/srv/hermes/pg"
        );
        assert_eq!(socket_dir_setting(Path::new("/srv/a b/pg")), "/srv/a b/pg");
        for refused in [
            "/srv/a,b/pg",
            "/srv/it's/pg",
            "/srv/a\\b/pg",
            "/srv/pg ",
            "/srv/pg\t",
        ] {
            assert_eq!(socket_dir_setting(Path::new(refused)), "", "{refused:?}");
        }
        let long = format!("/{}", "d".repeat(MAX_SOCKET_DIR_LEN));
        assert_eq!(socket_dir_setting(Path::new(&long)), "");
        let tcp = hba_conf(
            Path::new("/srv/a,b/pg"),
            socket_dir_setting(Path::new("/srv/a,b/pg")),
        );
        assert!(tcp.contains("127.0.0.1/32 trust"), "{tcp}");
    }
}
