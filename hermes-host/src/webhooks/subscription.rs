//! `GET /webhooks/{source}`: Meta's subscription handshake. Before it sends
//! events, Meta verifies the callback URL with
//! `?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`; a `meta` source
//! with a `verify_token` answers 200 with the challenge as plain text when
//! the token matches.
//!
//! | status | when |
//! |---|---|
//! | 200 | the token matches: the challenge, `text/plain` |
//! | 400 | a `hub.*` parameter is missing or not what Meta sends |
//! | 403 | the token does not match |
//! | 404 | no source of that name |
//! | 405 | the source has no handshake: not `meta`, or no `verify_token` |
//!
//! Any method other than `GET`, `HEAD` and `POST` is a 405 whose `Allow`
//! lists what that source takes (see [`other_method`]).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hermes_adapters::webhook::{SubscriptionError, meta_subscription_challenge};

use super::endpoint::find_source;
use super::source::Source;
use crate::http::{ApiError, AppState};

/// Handles `GET /webhooks/{source}`.
pub async fn answer(
    State(state): State<AppState>,
    source_name: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let source = find_source(&state, source_name)?;
    let Some(token) = source.verify_token() else {
        return Ok(not_allowed(
            allow(&source),
            format!(
                "GET is Meta's subscription handshake; source {:?} has none (it needs scheme \
                 \"meta\" and a verify_token): webhooks are POSTed",
                source.name()
            ),
        ));
    };
    let challenge = meta_subscription_challenge(query.as_deref().unwrap_or_default(), token)
        .map_err(|error| match error {
            SubscriptionError::Malformed(_) => ApiError::bad_request(error.to_string()),
            SubscriptionError::Mismatch => ApiError::new(StatusCode::FORBIDDEN, error.to_string()),
        })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        challenge,
    )
        .into_response())
}

/// Handles any other method on `/webhooks/{source}`: 405 with the methods
/// the source takes in `Allow`, or 404 for no such source.
pub async fn other_method(
    State(state): State<AppState>,
    method: Method,
    source_name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let source = find_source(&state, source_name)?;
    let allow = allow(&source);
    Ok(not_allowed(
        allow,
        format!("{method} is not allowed on a webhook source; it takes {allow}"),
    ))
}

/// The methods `source` takes: `POST`, and `GET` and `HEAD` with a
/// handshake.
fn allow(source: &Source) -> &'static str {
    match source.verify_token() {
        Some(_) => "GET, HEAD, POST",
        None => "POST",
    }
}

/// 405 with `allow` in its `Allow` header.
fn not_allowed(allow: &'static str, message: String) -> Response {
    let error = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, message);
    ([(header::ALLOW, allow)], error).into_response()
}
