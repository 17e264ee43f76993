//! The private local cluster: start, reuse, stop, and the per-test databases.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use hermes_adapters::postgres::local::{self, Durability, LocalPostgres, LocalPostgresConfig};
use sqlx::{Connection, PgConnection};

fn cluster_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A cluster in `dir` serving `database`, without fsync: test clusters are
/// disposable.
fn relaxed(dir: &std::path::Path, database: &str) -> LocalPostgresConfig {
    LocalPostgresConfig::new(dir, database).durability(Durability::Relaxed)
}

/// Asserts that `pg` serves `database`, then stops it.
async fn assert_serves_then_stop(pg: LocalPostgres, database: &str) {
    assert_eq!(
        text_of(&pg.url(), "SELECT current_database()::text").await,
        database
    );
    pg.stop().await.expect("stop");
}

/// The text `sql` selects, on a connection of its own to `url`.
async fn text_of(url: &str, sql: &str) -> String {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let text = sqlx::query_scalar(sql)
        .fetch_one(&mut conn)
        .await
        .expect("query");
    conn.close().await.expect("close");
    text
}

#[tokio::test]
async fn starts_reuses_and_stops_a_private_cluster() {
    let dir = cluster_dir("hermes-pg-local-test");
    let config = relaxed(&dir, "hermes_local");

    let first = LocalPostgres::start_with(config.clone())
        .await
        .expect("start the cluster");
    assert!(dir.join("PG_VERSION").is_file());
    // A data directory whose path fits in a socket address (with the
    // socket's own name, `/.s.PGSQL.65535`, in 107 bytes) gets a Unix socket,
    // and the URL goes through it; a longer one (a deep checkout) goes
    // through TCP, as `a_data_directory_too_long_for_a_socket_…` checks.
    if dir.as_os_str().len() <= 107 - "/.s.PGSQL.65535".len() {
        assert_eq!(first.socket_dir(), Some(dir.as_path()));
        let socket = dir.join(format!(".s.PGSQL.{}", first.port()));
        assert!(socket.exists(), "no socket at {}", socket.display());
        assert!(
            first
                .url()
                .starts_with("postgres://postgres@localhost/hermes_local?host=/"),
            "{}",
            first.url()
        );
    } else {
        assert_eq!(first.socket_dir(), None);
    }
    // TCP reaches the server from any local user: it takes the password.
    let tcp = format!(
        "postgres://postgres@127.0.0.1:{}/hermes_local",
        first.port()
    );
    assert!(PgConnection::connect(&tcp).await.is_err());
    let password = std::fs::read_to_string(dir.join(local::TCP_PASSWORD_FILE)).expect("password");
    let with_password = tcp.replace("postgres@", &format!("postgres:{}@", password.trim()));
    PgConnection::connect(&with_password)
        .await
        .expect("connect through TCP with the password")
        .close()
        .await
        .expect("close");

    let mut conn = PgConnection::connect(&first.url()).await.expect("connect");
    let (db, port): (String, i32) =
        sqlx::query_as("SELECT current_database()::text, current_setting('port')::int")
            .fetch_one(&mut conn)
            .await
            .expect("query");
    assert_eq!(db, "hermes_local");
    assert_eq!(port, i32::from(first.port()));
    let listen: String = sqlx::query_scalar("SELECT current_setting('listen_addresses')")
        .fetch_one(&mut conn)
        .await
        .expect("query");
    assert_eq!(listen, "127.0.0.1");
    // pid() is the postmaster: the parent of this session's backend.
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("query");
    let stat = std::fs::read_to_string(format!("/proc/{backend}/stat")).expect("backend stat");
    let parent = stat[stat.rfind(')').expect("comm") + 1..]
        .split_whitespace()
        .nth(1)
        .expect("ppid");
    assert_eq!(parent, first.pid().to_string());
    conn.close().await.expect("close");

    // A second start of the same directory reuses the running server.
    let second = LocalPostgres::start_with(config.clone())
        .await
        .expect("reuse the cluster");
    assert!(second.reused());
    assert_eq!(second.port(), first.port());
    assert_eq!(second.pid(), first.pid());

    // After a stop, the next start brings it back with the data intact.
    first.stop().await.expect("stop");
    assert!(PgConnection::connect(&first.url()).await.is_err());
    first.stop().await.expect("stopping twice is fine");
    let third = LocalPostgres::start_with(config).await.expect("restart");
    assert!(!third.reused());
    assert_ne!(third.pid(), first.pid());
    let mut conn = PgConnection::connect(&third.url()).await.expect("connect");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .expect("query");
    assert_eq!(one, 1);
    conn.close().await.expect("close");
    third.stop().await.expect("stop");
}

#[tokio::test]
async fn durable_clusters_keep_fsync_on() {
    let dir = cluster_dir("hermes-pg-durable-test");
    let pg = LocalPostgres::start(&dir, "hermes").await.expect("start");
    assert_eq!(
        text_of(&pg.url(), "SELECT current_setting('fsync')").await,
        "on"
    );
    pg.stop().await.expect("stop");
}

#[tokio::test]
async fn every_test_database_is_fresh_and_distinct() {
    let (a, b) = tokio::join!(local::test_database(), local::test_database());
    assert_ne!(a, b);
    let mut conn = PgConnection::connect(&a).await.expect("connect a");
    sqlx::query("CREATE TABLE t (id int)")
        .execute(&mut conn)
        .await
        .expect("create");
    conn.close().await.expect("close");
    let mut conn = PgConnection::connect(&b).await.expect("connect b");
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&mut conn)
            .await
            .expect("query");
    assert_eq!(tables, 0);
    conn.close().await.expect("close");
}

#[tokio::test]
async fn rejects_unsafe_database_names() {
    let err = LocalPostgres::start(cluster_dir("unused"), "bad\"name")
        .await
        .expect_err("invalid name");
    assert!(err.to_string().contains("invalid database name"));
}

#[tokio::test]
async fn a_data_directory_too_long_for_a_socket_is_reached_through_tcp() {
    let dir = cluster_dir(&format!("hermes-pg-long-path-{}", "x".repeat(100)));
    let config = relaxed(&dir, "hermes_long");
    let pg = LocalPostgres::start_with(config)
        .await
        .expect("start the cluster");
    assert_eq!(pg.socket_dir(), None);
    assert!(
        pg.url().starts_with("postgres://postgres@127.0.0.1:"),
        "{}",
        pg.url()
    );
    assert_serves_then_stop(pg, "hermes_long").await;
}

/// A `postmaster.pid` left by a server that is gone, whose pid now belongs to
/// another live process of the cluster's owner (as after a restart of the
/// machine or container without a clean shutdown), is not taken for a running
/// server: it is removed and the server started.
#[tokio::test]
async fn a_stale_postmaster_pid_naming_a_live_process_is_cleared() {
    let dir = cluster_dir("hermes-pg-stale-pid-test");
    let config = relaxed(&dir, "hermes_stale");
    let first = LocalPostgres::start_with(config.clone())
        .await
        .expect("start the cluster");
    let pid_file = dir.join("postmaster.pid");
    let written = std::fs::read_to_string(&pid_file).expect("read postmaster.pid");
    first.stop().await.expect("stop");
    assert!(!pid_file.exists());

    // A live process that is no PostgreSQL server, of the cluster's owner (as
    // root, the `postgres` user the server runs as), so that `kill(pid, 0)`
    // from the server's user succeeds.
    let owner = std::fs::metadata(&dir).expect("stat the data directory");
    let mut sleep = std::process::Command::new("sleep");
    sleep.arg("60");
    if owner.uid()
        != std::fs::metadata("/proc/self")
            .expect("stat /proc/self")
            .uid()
    {
        sleep.uid(owner.uid()).gid(owner.gid());
    }
    let mut sleeper = sleep.spawn().expect("spawn sleep");
    let (_, rest) = written.split_once('\n').expect("a pid line");
    std::fs::write(&pid_file, format!("{}\n{rest}", sleeper.id())).expect("write postmaster.pid");
    std::os::unix::fs::chown(&pid_file, Some(owner.uid()), Some(owner.gid())).expect("chown");

    let started =
        tokio::time::timeout(Duration::from_secs(30), LocalPostgres::start_with(config)).await;
    let untouched = sleeper.try_wait().expect("poll sleep").is_none();
    sleeper.kill().expect("kill sleep");
    sleeper.wait().expect("reap sleep");
    let second = started
        .expect("the start took the stale pid for a server and waited for it")
        .expect("start over a stale postmaster.pid");
    assert!(
        untouched,
        "the process named by the stale postmaster.pid exited"
    );
    assert!(!second.reused());
    assert_ne!(second.pid(), sleeper.id());
    assert_eq!(text_of(&second.url(), "SELECT 'up'::text").await, "up");
    second.stop().await.expect("stop");
}

/// An existing empty data directory (as a mounted volume, which no rename can
/// replace) is initialised in place.
#[tokio::test]
async fn an_existing_empty_data_directory_is_initialised_in_place() {
    let dir = cluster_dir(&format!("hermes-pg-in-place-{}", std::process::id()));
    std::fs::create_dir(&dir).expect("create the data directory");
    // Held open, so that the inode of a replaced directory is not reused.
    let opened = std::fs::File::open(&dir).expect("open the data directory");
    let inode = opened.metadata().expect("stat").ino();
    let config = relaxed(&dir, "hermes_in_place");
    let pg = LocalPostgres::start_with(config)
        .await
        .expect("start in the empty directory");
    let meta = std::fs::metadata(&dir).expect("stat");
    assert_eq!(meta.ino(), inode, "the data directory was replaced");
    assert_eq!(opened.metadata().expect("stat").nlink(), meta.nlink());
    assert_eq!(meta.mode() & 0o777, 0o700);
    assert!(dir.join("PG_VERSION").is_file());
    assert_serves_then_stop(pg, "hermes_in_place").await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// A directory that is not empty and holds no cluster (as a fresh volume's
/// `lost+found`) is refused, with what it holds and what to do, and left alone.
#[tokio::test]
async fn a_non_empty_directory_without_a_cluster_is_refused() {
    let dir = cluster_dir("hermes-pg-lost-found-test");
    std::fs::create_dir_all(dir.join("lost+found")).expect("create lost+found");
    let message = LocalPostgres::start(&dir, "hermes")
        .await
        .expect_err("a directory holding lost+found")
        .to_string();
    for part in [
        "is not empty and is not a PostgreSQL data directory",
        "it holds lost+found",
        "a subdirectory",
        &format!("{}/pgdata", dir.display()),
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("read")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(entries, ["lost+found"]);
}

/// Run as root, a cluster directory belonging to another user (not root,
/// not the server's user) is refused, not taken over: its owner keeps it.
#[tokio::test]
async fn as_root_another_users_cluster_is_refused_and_left_alone() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return; // Only root could take it over.
    }
    let dir = cluster_dir("hermes-pg-other-owner-test");
    std::fs::create_dir_all(&dir).expect("create");
    std::fs::write(dir.join("PG_VERSION"), "15\n").expect("write PG_VERSION");
    // nobody's uid and group on Debian.
    let nobody = 65534;
    std::os::unix::fs::chown(&dir, Some(nobody), Some(nobody)).expect("chown");
    let message = LocalPostgres::start(&dir, "hermes")
        .await
        .expect_err("another user's directory")
        .to_string();
    assert!(
        message.contains("belongs to the user with uid 65534") && message.contains("chown -R"),
        "{message}"
    );
    assert_eq!(std::fs::metadata(&dir).expect("stat").uid(), nobody);
    std::fs::remove_dir_all(&dir).expect("clean up");
}
