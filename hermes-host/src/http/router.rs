//! The HTTP routes.

use axum::Router;
use axum::middleware;
use axum::routing::{get, post};

use super::error;
use super::metrics::{RequestSeries, track};
use super::ops;
use super::state::AppState;
use crate::webhooks::{endpoint, subscription};

/// Every route of the host, with JSON errors and request metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route(
            "/webhooks/{source}",
            post(endpoint::receive)
                .get(subscription::answer)
                .fallback(subscription::other_method),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            RequestSeries::default(),
            track,
        ))
        .with_state(state)
}
