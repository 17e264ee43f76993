//! Request metrics middleware: a counter and a latency histogram per method,
//! route template (e.g. `/webhooks/{source}`) and status.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};

/// Counter of HTTP requests, labelled `method`, `route`, `status`.
pub const REQUESTS: &str = "hermes_http_requests_total";
/// Histogram of HTTP request durations in seconds, labelled like [`REQUESTS`].
pub const REQUEST_DURATION: &str = "hermes_http_request_duration_seconds";

/// The `route` label of requests no route matched.
const UNMATCHED: &str = "unmatched";

/// Records [`REQUESTS`] and [`REQUEST_DURATION`] for every request. Requests
/// no route matched are labelled `route="unmatched"` and methods outside
/// HTTP's standard ones `method="OTHER"`, so arbitrary requests do not create
/// new series.
pub async fn track(State(series): State<RequestSeries>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = method_label(request.method());
    let response = next.run(request).await;
    series.record(
        route.as_ref().map_or(UNMATCHED, MatchedPath::as_str),
        method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The request series, registered with the `metrics` recorder on first use
/// and then recorded through their handles: a request costs a read lock and
/// a short scan, not the labels' allocation and the registry's lookup.
#[derive(Clone, Default)]
pub struct RequestSeries {
    by_route: Arc<RwLock<HashMap<Box<str>, Vec<Series>>>>,
}

/// One route's series for a method and a status.
struct Series {
    method: &'static str,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

impl RequestSeries {
    /// Counts a request to `route` with the method labelled `method` (see
    /// [`method_label`]), answered with `status` after `secs`.
    pub fn record(&self, route: &str, method: &'static str, status: u16, secs: f64) {
        let find = |series: &[Series]| {
            series
                .iter()
                .position(|s| s.status == status && s.method == method)
        };
        {
            let by_route = self.by_route.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(series) = by_route.get(route)
                && let Some(i) = find(series)
            {
                series[i].record(secs);
                return;
            }
        }
        let mut by_route = self
            .by_route
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let series = by_route.entry(route.into()).or_default();
        let i = find(series).unwrap_or_else(|| {
            series.push(Series::register(route, method, status));
            series.len() - 1
        });
        series[i].record(secs);
    }
}

impl Series {
    fn register(route: &str, method: &'static str, status: u16) -> Self {
        let labels = [
            ("method", method.to_owned()),
            ("route", route.to_owned()),
            ("status", status.to_string()),
        ];
        Self {
            requests: metrics::counter!(REQUESTS, &labels),
            duration: metrics::histogram!(REQUEST_DURATION, &labels),
            method,
            status,
        }
    }

    fn record(&self, secs: f64) {
        self.requests.increment(1);
        self.duration.record(secs);
    }
}

/// The method's label: its name when standard, else `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::PATCH, "PATCH"),
        (Method::TRACE, "TRACE"),
    ];
    STANDARD
        .iter()
        .find(|(standard, _)| standard == method)
        .map_or("OTHER", |(_, label)| label)
}
