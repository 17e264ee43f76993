//! `POST /webhooks/{source}`: verify, parse, normalize, enqueue, and answer
//! 202 once the event is committed. A JSON body is stored as `jsonb`, which
//! keeps its values but not its text (keys reordered, the last of repeated
//! keys, numbers written out: `1e2` as `100`); a form-encoded one
//! (`application/x-www-form-urlencoded`) as the JSON object of its fields
//! (see [`form_body_json`]).
//!
//! | status | when |
//! |---|---|
//! | 202 | committed: `{"id": <event id>, "duplicate": <bool>}` |
//! | 400 | the body is not UTF-8 JSON (nor a form whose fields decode to UTF-8), or JSON Postgres cannot store (see [`jsonb`]), or the delivery id is over 256 bytes |
//! | 401 | bad, missing or stale signature |
//! | 404 | no source of that name (or a name that is not UTF-8) |
//! | 413 | the body is larger than the source's `max_body_bytes` |
//! | 422 | normalization failed: the field and the reason; nothing stored |
//! | 503 | the ingest pipeline is full or shutting down (with `Retry-After`), or the database failed transiently |
//! | 500 | the event could not be stored for another reason |

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use chrono::Utc;
use futures::StreamExt;
use hermes_pipeline::{Outcome, PushError};
use serde::Serialize;
use serde::de::IgnoredAny;

use super::event::{Fate, WebhookEvent};
use super::form_body::form_body_json;
use super::jsonb;
use super::normalize::{NormalizeError, NormalizedMessage, normalize, normalize_text};
use super::source::Source;
use crate::config::Normalize;
use crate::http::{ApiError, AppState};
use crate::quote::shortened;

/// The body of a 202.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// The stored event's id.
    pub id: i64,
    /// Whether the event was already stored: by an earlier delivery, or by an
    /// earlier attempt whose commit went unconfirmed.
    pub duplicate: bool,
}

/// Handles `POST /webhooks/{source}`.
pub async fn receive(
    State(state): State<AppState>,
    source_name: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let received_at = Utc::now();
    let source = find_source(&state, source_name)?;
    // The parts themselves: the `HeaderMap` and `Uri` extractors would clone them.
    let (parts, body) = request.into_parts();
    let read_timeout = state.read_timeout;
    let body = tokio::time::timeout(
        read_timeout,
        read_body(body, &parts.headers, source.max_body_bytes()),
    )
    .await
    .map_err(|_| {
        ApiError::request_timeout(format!(
            "the body did not arrive within {} ms",
            read_timeout.as_millis()
        ))
    })??;

    let url = request_url(&source, &parts.headers, &parts.uri);
    let verified = source
        .verify(&parts.headers, &body, &url, SystemTime::now())
        .map_err(|error| ApiError::unauthorized(error.to_string()))?;

    if verified.idempotency_key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "the delivery id (the event's idempotency key) is longer than {MAX_KEY_BYTES} bytes"
        )));
    }
    let (text, message) = if source
        .verifier()
        .scheme()
        .body_is_form(&parts.headers, &url)
    {
        // JSON by construction, normalized from the tree it is written from.
        let fields = form_body_json(&body)
            .map_err(|why| ApiError::bad_request(format!("malformed body: {why}")))?;
        let text = fields.to_string();
        refuse_unstorable(&text)?;
        let message = normalize(source.normalize(), &fields).map_err(unprocessable)?;
        (text, message)
    } else {
        let text = String::from_utf8(body)
            .map_err(|_| ApiError::bad_request("malformed body: not valid UTF-8"))?;
        let message = check_and_normalize(source.normalize(), &text)?;
        (text, message)
    };

    let event = Arc::new(WebhookEvent::new(
        source.name_arc().clone(),
        source.provider().clone(),
        verified.idempotency_key,
        text,
        received_at,
        message,
    ));
    let retry_after = state.retry_after_secs;
    let completion = match state.ingest.ingress().try_push_tracked(event.clone()) {
        Ok(completion) => completion,
        Err(PushError::Full(_)) => {
            return Err(ApiError::unavailable(
                "the ingest pipeline is full; retry later",
                retry_after,
            ));
        }
        Err(PushError::Closed(_)) => {
            return Err(ApiError::unavailable(
                "the server is shutting down; retry later",
                retry_after,
            ));
        }
    };
    let outcome = completion.await;
    match (outcome, event.fate()) {
        (Outcome::Succeeded, Some(Fate::Stored { id, duplicate })) => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                id: *id,
                duplicate: *duplicate,
            }),
        )),
        (_, Some(Fate::Rejected(reason))) => Err(ApiError::unprocessable("", reason.clone())),
        (_, Some(Fate::Failed { transient, reason })) => {
            // The batch's failure is logged once where it happened.
            tracing::debug!(source = %source.name(), %reason, "webhook event not stored");
            if *transient {
                Err(ApiError::unavailable(reason.clone(), retry_after))
            } else {
                Err(ApiError::internal(reason.clone()))
            }
        }
        (Outcome::Failed(reason), _) => {
            // Failed without a recorded fate: the drain deadline passed, or a
            // handler panicked. A write cut off by the deadline may still have
            // committed: a redelivery then gets its 202 as a duplicate.
            tracing::debug!(source = %source.name(), %reason, "webhook event may not be stored");
            Err(ApiError::unavailable(
                format!("the event may not have been stored: {reason}"),
                retry_after,
            ))
        }
        (Outcome::Succeeded, _) => Err(ApiError::internal(
            "the event was acknowledged without a recorded outcome",
        )),
    }
}

/// Checks that the JSON `text` is JSON that Postgres stores (else 400), then
/// normalizes it per `rule` (else 422). Normalization reads all of the text
/// (decoding only the fields it needs), so a body it accepts is not parsed
/// again to be checked; one it refuses is, to tell malformed JSON from an
/// invalid payload.
fn check_and_normalize(rule: Normalize, text: &str) -> Result<Option<NormalizedMessage>, ApiError> {
    let normalized = normalize_text(rule, text);
    if rule == Normalize::None || normalized.is_err() {
        // Only checked to be JSON, without building its tree.
        serde_json::from_str::<IgnoredAny>(text)
            .map_err(|error| ApiError::bad_request(format!("malformed JSON body: {error}")))?;
    }
    refuse_unstorable(text)?;
    normalized.map_err(unprocessable)
}

/// 400 for valid JSON `text` that Postgres cannot store as `jsonb`.
fn refuse_unstorable(text: &str) -> Result<(), ApiError> {
    match jsonb::refusal(text) {
        Some(reason) => Err(ApiError::bad_request(format!("malformed body: {reason}"))),
        None => Ok(()),
    }
}

/// The 422 of a payload that does not normalize.
fn unprocessable(error: NormalizeError) -> ApiError {
    ApiError::unprocessable(error.field, error.to_string())
}

/// The source the path names, else 404 (also for a segment that does not
/// decode, such as `%FF`: it names no source either).
pub(super) fn find_source(
    state: &AppState,
    source_name: Result<Path<String>, PathRejection>,
) -> Result<Arc<Source>, ApiError> {
    let Ok(Path(source_name)) = source_name else {
        return Err(ApiError::not_found(
            "unknown webhook source: the name is not valid UTF-8",
        ));
    };
    state.sources.get(&source_name).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "unknown webhook source {:?}",
            shortened(&source_name)
        ))
    })
}

/// Reads the body, refusing (413) as soon as it is known to exceed `max`:
/// from `Content-Length` before reading, or while reading.
async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::payload_too_large(format!("the body exceeds {max} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    // The declared length is the client's word: trusted for a start, up to
    // a bound, so idle connections that announce large bodies reserve little.
    let capacity = declared
        .map_or(0, |length| length as usize)
        .min(max)
        .min(INITIAL_BODY_CAPACITY);
    let mut buffer = Vec::with_capacity(capacity);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|error| ApiError::bad_request(format!("could not read the body: {error}")))?;
        if buffer.len() + chunk.len() > max {
            return Err(too_large());
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer)
}

/// The most memory reserved for a body before its bytes arrive.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// The longest idempotency key stored: far above every provider's delivery
/// ids, far below what Postgres's unique index takes (~2.7 kB).
const MAX_KEY_BYTES: usize = 256;

/// The URL the provider called, for schemes that sign it (else empty): the
/// source's configured URL, else `http://` + `Host` + path and query.
fn request_url(source: &Source, headers: &HeaderMap, uri: &Uri) -> String {
    if !source.verifier().scheme().signs_url() {
        return String::new();
    }
    if let Some(url) = source.url() {
        // The request's query is the one signed: the configured URL's own,
        // plus what the provider added (Twilio's `bodySHA256`).
        return match uri.query() {
            Some(query) => {
                let base = url.split_once('?').map_or(url, |(base, _)| base);
                format!("{base}?{query}")
            }
            None => url.to_owned(),
        };
    }
    // HTTP/2 carries the host as the URI's authority, not a `Host` header.
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| uri.authority().map(|authority| authority.as_str()))
        .unwrap_or("localhost");
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("http://{host}{path}")
}
