//! Operations endpoints: `/health`, `/ready`, `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use hermes_adapters::postgres::GuardedConnection;
use serde_json::{Value, json};

use super::error::ApiError;
use super::state::AppState;

/// How long `/ready` waits for the database.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health`: 200 while the process is up.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 when the database answers and every pipeline runs;
/// otherwise 503 saying which is not.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    // Guarded: a check cut off by the timeout must not park its connection
    // in the pool's ping of a server that stopped answering.
    let ping = async {
        let mut conn = GuardedConnection::acquire(&state.pool).await?;
        let answer = sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut *conn)
            .await;
        // The statement ended, even with an error: back to the pool, whose
        // release ping drops a broken connection.
        conn.finish();
        answer.map(drop)
    };
    match tokio::time::timeout(READY_DB_TIMEOUT, ping).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            return Err(ApiError::unavailable(
                format!("database unreachable: {error}"),
                state.retry_after_secs,
            ));
        }
        Err(_) => {
            return Err(ApiError::unavailable(
                // A refused TCP connection ends here too: the pool retries
                // it until its acquire timeout, past this one.
                format!(
                    "database not reached within {} s (down, refusing connections or stalled)",
                    READY_DB_TIMEOUT.as_secs()
                ),
                state.retry_after_secs,
            ));
        }
    }
    if let Some(why) = state.ingest.not_running() {
        return Err(ApiError::unavailable(
            format!("the webhooks pipeline is not running ({why})"),
            state.retry_after_secs,
        ));
    }
    Ok(Json(
        json!({"status": "ready", "pipelines": {"webhooks": "running"}}),
    ))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
