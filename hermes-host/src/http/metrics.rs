//! Request metrics middleware: a counter and a latency histogram per method,
//! route template (e.g. `/webhooks/{source}`) and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Counter of HTTP requests, labelled `method`, `route`, `status`.
pub const REQUESTS: &str = "hermes_http_requests_total";
/// Histogram of HTTP request durations in seconds, labelled like [`REQUESTS`].
pub const REQUEST_DURATION: &str = "hermes_http_request_duration_seconds";

/// Records [`REQUESTS`] and [`REQUEST_DURATION`] for every request. Requests
/// no route matched are labelled `route="unmatched"`, so arbitrary paths do
/// not create new series.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(REQUEST_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}
