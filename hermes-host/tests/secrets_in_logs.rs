//! Database passwords never reach the log, whatever `RUST_LOG` says: not in
//! a parameter sqlx does not know (which sqlx's own warning would print with
//! its value), not in libpq's keyword form (which sqlx refuses, and the
//! error prints).

mod child;

use std::time::Duration;

/// Runs `hermes migrate` on `database_url` with every log line on; its
/// exit success and its stderr.
async fn migrate(database_url: &str, format: &str) -> (bool, String) {
    let output = child::run_to_end(
        &["migrate", "--log-format", format],
        &[("DATABASE_URL", database_url), ("RUST_LOG", "trace")],
        Duration::from_secs(60),
    )
    .await;
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
