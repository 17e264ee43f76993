//! Database passwords never reach the log, whatever `RUST_LOG` says: not in
//! a parameter sqlx does not know (which sqlx's own warning would print with
//! its value), not in libpq's keyword form (which sqlx refuses, and the
//! error prints).

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Runs `hermes migrate` on `database_url` with every log line on; its
/// exit success and its stderr.
async fn migrate(database_url: &str, format: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_hermes"))
        .args(["migrate", "--log-format", format])
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("migrate ends")
        .expect("run hermes migrate");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn database_passwords_never_reach_the_log() {
    let database_url = hermes_adapters::postgres::local::test_database().await;
    let separator = if database_url.contains('?') { '&' } else { '?' };
    let with_unknown = format!("{database_url}{separator}sslpassword=hunter2-unknown");
    for format in ["text", "json"] {
        let (ok, log) = migrate(&with_unknown, format).await;
        assert!(ok, "{log}");
        assert!(!log.contains("hunter2"), "{log}");

        let (ok, log) = migrate("host=db.invalid user=app password=hunter3 dbname=x", format).await;
        assert!(!ok, "{log}");
        assert!(!log.contains("hunter3"), "{log}");
        assert!(log.contains("password=***"), "{log}");
    }
}
