//! `hermes demo`, the README's run command, end to end: the binary serves,
//! drives signed webhooks at itself, prints its summary and exits 0, and what
//! it says Postgres holds is what Postgres holds.

mod child;

use std::time::Duration;

use sqlx::PgPool;

/// The number right before `label` in `text` (`"… 42 events"` → 42).
fn number_before(text: &str, label: &str) -> i64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|word| word.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no number before {label:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_drives_itself_and_reports_what_postgres_holds() {
    let database_url = hermes_adapters::postgres::local::test_database().await;
    // No hermes.toml where it runs: the embedded defaults.
    let output = child::run_to_end(
        &["demo", "--duration", "2s"],
        &[
            ("DATABASE_URL", &database_url),
            ("HERMES_LISTEN", "127.0.0.1:0"),
            ("RUST_LOG", "warn"),
        ],
        Duration::from_secs(120),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("summary after"), "{stdout}");

    let events = number_before(&stdout, "events,");
    let accepted = number_before(&stdout, "accepted this run");
    let redeliveries = number_before(&stdout, "of them redeliveries");
    assert!(events > 0, "{stdout}");
    assert_eq!(events, accepted - redeliveries, "{stdout}");
    assert!(number_before(&stdout, "refused (401)") > 0, "{stdout}");
    assert!(
        number_before(&stdout, "refused as invalid (422)") > 0,
        "{stdout}"
    );

    let pool = PgPool::connect(&database_url).await.expect("pool");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, events);
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(messages, events, "every demo event is a normalized message");
}
