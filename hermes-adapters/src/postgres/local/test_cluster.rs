//! The test suites' shared cluster and their per-test databases.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::{Durability, LocalPostgres, LocalPostgresConfig, LocalPostgresError, TEST_DIR_ENV};

/// Returns the URL of a fresh, empty, uniquely named database for one test.
///
/// The first call in a process starts (or reuses) one cluster shared by every
/// test binary of the cargo target directory, in
/// `<target dir>/tmp/hermes-pg-test` (override with `$HERMES_TEST_PG_DIR`),
/// with [`Durability::Relaxed`]. Test binaries running at the same time share
/// it safely: no start sees another's cluster half-made (see the
/// [module docs](super)) and every
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
