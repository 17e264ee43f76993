//! The schema on a database whose default collation is not C: the two paths
//! that insert webhook events (the host's raw `COPY`, sorted bytewise, and
//! `ingest_webhook_batch`) must lock a batch's keys in one order, or two
//! batches sharing keys could deadlock.

use std::sync::Arc;

use chrono::Utc;
use hermes_adapters::postgres::Written;
use hermes_adapters::postgres::local::test_database;
use hermes_host::database::MIGRATOR;
use hermes_host::webhooks::WebhookEvent;
use hermes_host::webhooks::raw_store::RawEventStore;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn both_paths_insert_events_in_bytewise_order_whatever_the_collation() {
    let url = test_database().await;
    let mut admin = PgConnection::connect(&url).await.unwrap();
    let (base, version): (String, i32) = sqlx::query_as(
        "SELECT current_database()::text, current_setting('server_version_num')::int",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        version >= 150_000,
        "an ICU default collation needs PostgreSQL 15 or later; the test cluster runs {version}: \
         remove it (target/tmp/hermes-pg-test), with HERMES_PG_BINDIR naming a newer server's bin directory if an older one is found first"
    );
    let name = format!("{base}_icu");
    sqlx::query(&format!(
        "CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    ))
    .execute(&mut admin)
    .await
    .unwrap();

    let options: PgConnectOptions = url.parse().unwrap();
    let mut conn = PgConnection::connect_with(&options.database(&name))
        .await
        .unwrap();
    // The premise: this database sorts "a" before "B"; bytewise, "B" comes first.
    let icu_first: bool = sqlx::query_scalar("SELECT 'a' < 'B'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(icu_first, "the database does not collate by en-US");
    MIGRATOR.run(&mut conn).await.unwrap();

    // Ids come from a sequence as rows are inserted: they show the order.
    let ids: Vec<(String, i64)> = sqlx::query_as(
        "SELECT k.key, r.id
         FROM ingest_webhook_batch(
             ARRAY['raw', 'raw'], ARRAY['a', 'B'], ARRAY['{}', '{}'], ARRAY[now(), now()],
             ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[],
             ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[],
             ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::timestamptz[], ARRAY[NULL, NULL]::text[],
             '{}'::int[], '{}'::int[], '{}'::text[]) AS r
         JOIN unnest(ARRAY['a', 'B']) WITH ORDINALITY AS k(key, i) ON k.i = r.idx
         ORDER BY r.id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let keys: Vec<&str> = ids.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["B", "a"]);

    // The raw COPY, given the events in the collation's order.
    let event = |key: &str| {
        Arc::new(WebhookEvent::new(
            "raw".into(),
            "raw".into(),
            key.to_owned(),
            "{}".to_owned(),
            Utc::now(),
            None,
        ))
    };
    let (c, d) = (event("c"), event("D"));
    let written = RawEventStore::default()
        .write(&mut conn, &[&c, &d])
        .await
        .unwrap();
    assert_eq!(written, [Written::Inserted, Written::Inserted]);
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM webhook_events WHERE idempotency_key IN ('c', 'D') ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(keys, ["D", "c"]);

    conn.close().await.unwrap();
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
