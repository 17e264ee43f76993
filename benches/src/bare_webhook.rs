//! The bare webhook server of `webhook_e2e_bare`: the least a server can do
//! that answers 202 only once a signed webhook is committed, to set beside
//! the host under the same load.
//!
//! It verifies the signature and checks the body is JSON, exactly as the host
//! does for a raw source, then queues the event for one writer task, which
//! takes everything queued (group commit) and stores it with one `COPY`
//! (the standalone limit's own statement and rows) before answering each
//! request. No pipeline, no configuration, no metrics, no idempotency: a
//! redelivery fails its batch (503). It exists only as a floor for the
//! benchmark, run by `hermes-bare-webhook` with `DATABASE_URL` and
//! `HERMES_LISTEN` set, on a database the host has migrated.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use hermes_adapters::webhook::{SignedRequest, Verifier};
use serde::de::IgnoredAny;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Notify, oneshot};

use crate::webhook::{RAW_SOURCE, copy_events, copy_row, verifier};

/// The most events one `COPY` takes (the host's default `batch_size`).
const MAX_BATCH: usize = 200;

/// An event waiting for its commit.
struct Queued {
    key: String,
    body: Bytes,
    received_at: SystemTime,
    committed: oneshot::Sender<bool>,
}

/// What the request handlers and the writer share.
struct Shared {
    verifier: Verifier,
    queue: Mutex<Vec<Queued>>,
    /// Signalled when the queue gains an event (a permit is kept when the
    /// writer is busy, so none is lost).
    queued: Notify,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Vec<Queued>> {
        // A panicking holder cannot leave the Vec inconsistent.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves until the process is stopped.
pub async fn serve(database_url: &str, listen: &str) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .context("cannot connect to Postgres")?;
    let shared = Arc::new(Shared {
        verifier: verifier()?,
        queue: Mutex::new(Vec::new()),
        queued: Notify::new(),
    });
    tokio::spawn(write_batches(pool, shared.clone()));
    let app = Router::new()
        .route("/webhooks/{source}", post(receive))
        .route("/ready", get(|| async { StatusCode::OK }))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// `POST /webhooks/{source}`: 202 once committed; 404, 401, 400 or 503 as
/// the host answers them.
async fn receive(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let received_at = SystemTime::now();
    if source != RAW_SOURCE {
        return (StatusCode::NOT_FOUND, r#"{"error":"unknown source"}"#);
    }
    let request = SignedRequest {
        headers: &headers,
        body: &body,
        url: "",
    };
    let Ok(verified) = shared.verifier.verify(&request, received_at) else {
        return (StatusCode::UNAUTHORIZED, r#"{"error":"bad signature"}"#);
    };
    let is_json = std::str::from_utf8(&body)
        .is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok());
    if !is_json {
        return (StatusCode::BAD_REQUEST, r#"{"error":"not JSON"}"#);
    }
    let (committed, outcome) = oneshot::channel();
    shared.queue().push(Queued {
        key: verified.idempotency_key,
        body,
        received_at,
        committed,
    });
    shared.queued.notify_one();
    match outcome.await {
        // The id is not known: a COPY returns none.
        Ok(true) => (StatusCode::ACCEPTED, r#"{"id":0,"duplicate":false}"#),
        _ => (StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"not stored"}"#),
    }
}

/// The writer: whatever is queued, up to [`MAX_BATCH`], in one `COPY`.
async fn write_batches(pool: PgPool, shared: Arc<Shared>) {
    let mut rows = Vec::new();
    loop {
        let batch: Vec<Queued> = {
            let mut queue = shared.queue();
            let n = queue.len().min(MAX_BATCH);
            queue.drain(..n).collect()
        };
        if batch.is_empty() {
            shared.queued.notified().await;
            continue;
        }
        rows.clear();
        for event in &batch {
            copy_row(
                &mut rows,
                RAW_SOURCE,
                &event.key,
                &event.body,
                event.received_at,
            );
        }
        let stored = async { copy_events(&mut *pool.acquire().await?, &rows).await }.await;
        if let Err(error) = &stored {
            eprintln!("batch of {} not stored: {error}", batch.len());
        }
        for event in batch {
            let _ = event.committed.send(stored.is_ok());
        }
    }
}
