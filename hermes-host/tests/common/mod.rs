//! Shared helpers: a host started in-process on 127.0.0.1:0 against a fresh
//! database of the private test cluster, an HTTP client, signing, and
//! queries.

#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use hermes_host::{Config, RunningServer, Server};
use http::HeaderMap;
use serde_json::Value;
use sqlx::PgPool;

/// Sources used by the tests (literal secrets: test-only).
pub const SOURCES: &str = r#"
[[webhooks.sources]]
name = "sms"
scheme = "hmac-sha256"
header = "x-provider-signature-256"
prefix = "sha256="
encoding = "hex"
secrets = ["sms-secret"]
normalize = "sms"
max_body_bytes = 4096

[[webhooks.sources]]
name = "email"
scheme = "standard-webhooks"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
normalize = "email"

[[webhooks.sources]]
name = "raw"
scheme = "github"
secrets = ["gh-secret"]
normalize = "none"
"#;

/// A running host and what a test needs to talk to it.
pub struct Harness {
    pub server: Option<RunningServer>,
    pub url: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
}

/// A response: status, `Retry-After`, JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub json: Value,
}

impl Reply {
    pub fn id(&self) -> i64 {
        self.json["id"].as_i64().expect("a 202 has an id")
    }

    pub fn duplicate(&self) -> bool {
        self.json["duplicate"]
            .as_bool()
            .expect("a 202 has duplicate")
    }

    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }
}

/// Starts a host with `SOURCES` and `extra` TOML prepended (e.g. a
/// `[webhooks]` section), on a fresh database.
pub async fn start(extra: &str) -> Harness {
    let database_url = hermes_adapters::postgres::local::test_database().await;
    let mut config =
        Config::from_toml_str(&format!("{extra}\n{SOURCES}")).expect("test config parses");
    config.database.url = Some(database_url.clone());
    config.http.listen = "127.0.0.1:0".parse().expect("address");
    let server = Server::start(config).await.expect("server starts");
    let pool = PgPool::connect(&database_url).await.expect("test pool");
    Harness {
        url: server.url(),
        server: Some(server),
        pool,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
    }
}

impl Harness {
    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    /// Headers signing `body` for `source` with delivery id `id` at `at`.
    pub fn sign_at(&self, source: &str, body: &[u8], id: &str, at: SystemTime) -> HeaderMap {
        let url = format!("{}/webhooks/{source}", self.url);
        self.server()
            .sources()
            .get(source)
            .expect("source configured")
            .verifier()
            .sign(body, &url, id, at)
    }

    pub fn sign(&self, source: &str, body: &[u8], id: &str) -> HeaderMap {
        self.sign_at(source, body, id, SystemTime::now())
    }

    /// POSTs `body` to `/webhooks/{source}` with `headers`.
    pub async fn post(&self, source: &str, body: Vec<u8>, headers: HeaderMap) -> Reply {
        post(&self.client, &self.url, source, body, headers)
            .await
            .expect("request completes")
    }

    /// POSTs a correctly signed `body`.
    pub async fn deliver(&self, source: &str, body: &Value, id: &str) -> Reply {
        let body = serde_json::to_vec(body).expect("json");
        let headers = self.sign(source, &body, id);
        self.post(source, body, headers).await
    }

    /// Sends a `method` request without a body to `path`.
    pub async fn request(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.client
            .request(method, format!("{}{path}", self.url))
            .send()
            .await
            .expect("request completes")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.request(reqwest::Method::GET, path).await;
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// The stored body of event `id`.
    pub async fn stored_body(&self, id: i64) -> Value {
        sqlx::query_scalar("SELECT body FROM webhook_events WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("the event's row")
    }

    /// Rows in `table`.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Asserts that a 202 means committed: the event `id` is in Postgres now.
    pub async fn assert_committed(&self, reply: &Reply) {
        assert_eq!(reply.status, 202, "{reply:?}");
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM webhook_events WHERE id = $1")
            .bind(reply.id())
            .fetch_optional(&self.pool)
            .await
            .expect("query");
        assert_eq!(found, Some(reply.id()), "202 for an event not in Postgres");
    }

    /// [`lock_events`] on the test's pool.
    pub async fn lock_events(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        lock_events(&self.pool).await
    }

    /// [`lock_waiters`] on the test's pool.
    pub async fn lock_waiters(&self) -> i64 {
        lock_waiters(&self.pool).await
    }
}

/// Takes `LOCK TABLE webhook_events IN SHARE MODE` in a transaction of
/// `pool`: the host's writes of events wait for it until the transaction
/// ends (reads go on).
pub async fn lock_events(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE webhook_events IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock webhook_events");
    lock
}

/// Backends of `pool`'s database waiting for a lock (with [`lock_events`]
/// held: the host's event writes).
pub async fn lock_waiters(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

/// POSTs with any client (for concurrent tasks).
pub async fn post(
    client: &reqwest::Client,
    base: &str,
    source: &str,
    body: Vec<u8>,
    headers: HeaderMap,
) -> Result<Reply, reqwest::Error> {
    let response = client
        .post(format!("{base}/webhooks/{source}"))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Reply {
        status,
        retry_after,
        json,
    })
}

/// A valid sms payload.
pub fn sms(from: &str, to: &str, body: &str) -> Value {
    serde_json::json!({
        "from": from, "to": to, "body": body,
        "timestamp": "2024-05-01T12:00:00Z", "provider_message_id": format!("SM-{body}")
    })
}

/// Waits until `condition` holds, polling every 5 ms; fails after 10 s.
pub async fn wait_until(condition: impl Fn() -> bool) {
    wait_until_async(|| std::future::ready(condition())).await;
}

/// Waits until the future that `condition` returns resolves to `true`, polling
/// every 5 ms; fails after 10 s.
pub async fn wait_until_async<F: Future<Output = bool>>(condition: impl Fn() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
