//! Helpers shared by the schemes: header access, HMAC, constant-time
//! matching, the replay window and the fallback idempotency key.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::{Secret, SignatureError, SignedRequest};

/// The media type of an HTML form post, as Twilio sends its webhooks.
pub const FORM_URLENCODED: &str = "application/x-www-form-urlencoded";

/// Whether the request's `Content-Type` is [`FORM_URLENCODED`] (parameters
/// aside); `None` when it has no `Content-Type`.
pub(super) fn is_form_urlencoded(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(http::header::CONTENT_TYPE)?;
    Some(value.to_str().ok().is_some_and(|value| {
        value
            .split(';')
            .next()
            .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case(FORM_URLENCODED))
    }))
}

/// `X-Hub-Signature-256`, shared by GitHub and Meta.
pub(super) const HUB_SIGNATURE_256: &str = "X-Hub-Signature-256";
const HUB_PREFIX: &str = "sha256=";

/// The value of a required header as text. Absent and empty (or blank)
/// headers are [`SignatureError::Missing`]; values that are not visible ASCII
/// are [`SignatureError::Malformed`].
pub(super) fn required_header<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<&'a str, SignatureError> {
    required(headers.get(name), Cow::Borrowed(name))
}

/// Like [`required_header`] for a header name known only at run time.
pub(super) fn required_dynamic_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<&'a str, SignatureError> {
    required(headers.get(name), Cow::Owned(name.as_str().to_owned()))
}

fn required<'a>(
    value: Option<&'a HeaderValue>,
    name: Cow<'static, str>,
) -> Result<&'a str, SignatureError> {
    let Some(value) = value else {
        return Err(SignatureError::Missing(name));
    };
    let text = value
        .to_str()
        .map_err(|_| SignatureError::Malformed(format!("{name} header is not visible ASCII")))?
        .trim();
    if text.is_empty() {
        return Err(SignatureError::Missing(name));
    }
    Ok(text)
}

/// The value of an optional header, if present, non-blank and visible ASCII.
pub(super) fn optional_header<'a>(headers: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    let text = headers.get(name)?.to_str().ok()?.trim();
    (!text.is_empty()).then_some(text)
}

/// HMAC-SHA256 of the concatenation of `parts`.
pub(super) fn hmac_sha256(key: &Secret, parts: &[&[u8]]) -> [u8; 32] {
    keyed_mac::<Hmac<Sha256>>(key, parts)
        .finalize()
        .into_bytes()
        .into()
}

/// HMAC-SHA1 of the concatenation of `parts` (Twilio).
pub(super) fn hmac_sha1(key: &Secret, parts: &[&[u8]]) -> [u8; 20] {
    keyed_mac::<Hmac<Sha1>>(key, parts)
        .finalize()
        .into_bytes()
        .into()
}

/// MAC `M` keyed with `key`, fed `parts`.
fn keyed_mac<M: Mac + KeyInit>(key: &Secret, parts: &[&[u8]]) -> M {
    let mut mac =
        <M as Mac>::new_from_slice(key.expose()).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether any key's expected MAC equals any of the presented signatures.
///
/// Every comparison runs in constant time and none is skipped once one
/// matched, so timing reveals neither the expected signature nor which key
/// matched.
pub(super) fn any_matches<M: AsRef<[u8]>>(
    keys: &[Secret],
    presented: &[Vec<u8>],
    mut expected: impl FnMut(&Secret) -> M,
) -> bool {
    let mut matched = Choice::from(0);
    for key in keys {
        let expected = expected(key);
        for candidate in presented {
            matched |= expected.as_ref().ct_eq(candidate.as_slice());
        }
    }
    matched.into()
}

/// [`any_matches`] as a verification step: [`SignatureError::Mismatch`]
/// unless some key's expected MAC is among the presented signatures.
pub(super) fn check_signature<M: AsRef<[u8]>>(
    keys: &[Secret],
    presented: &[Vec<u8>],
    expected: impl FnMut(&Secret) -> M,
) -> Result<(), SignatureError> {
    if any_matches(keys, presented, expected) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The bytes of a required header holding a single standard-base64 MAC
/// (Shopify's HMAC-SHA256, Twilio's HMAC-SHA1); `mac` names the MAC in the
/// error.
pub(super) fn base64_mac_header(
    headers: &HeaderMap,
    name: &'static str,
    mac: &str,
) -> Result<Vec<u8>, SignatureError> {
    let value = required_header(headers, name)?;
    STANDARD
        .decode(value)
        .map_err(|_| SignatureError::Malformed(format!("{name} header must be a base64 {mac}")))
}

/// Seconds since the Unix epoch, negative before it.
pub(super) fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Parses a signed Unix timestamp: ASCII digits only, as sent.
pub(super) fn parse_timestamp(text: &str, what: &str) -> Result<i64, SignatureError> {
    let malformed = || {
        SignatureError::Malformed(format!(
            "{what} must be an integer number of seconds since the Unix epoch"
        ))
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    text.parse().map_err(|_| malformed())
}

/// Refuses a timestamp further than `tolerance` from `now`, in either
/// direction (the window is inclusive).
pub(super) fn check_window(
    timestamp: i64,
    now: SystemTime,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let age = i128::from(unix_seconds(now)) - i128::from(timestamp);
    if age.unsigned_abs() <= u128::from(tolerance.as_secs()) {
        return Ok(());
    }
    let age_secs = i64::try_from(age).unwrap_or(if age > 0 { i64::MAX } else { i64::MIN });
    Err(SignatureError::Stale {
        age_secs,
        tolerance_secs: tolerance.as_secs(),
    })
}

/// Lower-case hex SHA-256 of `body`: the idempotency key of schemes without
/// a delivery id.
pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The idempotency key of a scheme with a delivery-id header: its value,
/// else the body's SHA-256.
pub(super) fn delivery_id_or_body_hash(
    request: &SignedRequest<'_>,
    header: &'static str,
) -> String {
    optional_header(request.headers, header)
        .map_or_else(|| body_sha256_hex(request.body), str::to_owned)
}

/// Text that can be sent as a header value and reads back unchanged with
/// [`HeaderValue::to_str`]: characters outside visible ASCII become `_`.
pub(super) fn header_safe(text: &str) -> Cow<'_, str> {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(
            text.chars()
                .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
                .collect(),
        )
    }
}

/// A header value from text; characters outside visible ASCII become `_`.
pub(super) fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(&header_safe(text)).unwrap_or_else(|_| HeaderValue::from_static("_"))
}

/// Verifies `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`
/// (GitHub and Meta).
pub(super) fn verify_hub_signature(
    keys: &[Secret],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), SignatureError> {
    let value = required_header(headers, HUB_SIGNATURE_256)?;
    let hex_digest = value.strip_prefix(HUB_PREFIX).ok_or_else(|| {
        SignatureError::Malformed(format!(
            "{HUB_SIGNATURE_256} header must start with \"{HUB_PREFIX}\""
        ))
    })?;
    let presented = hex::decode(hex_digest).map_err(|_| {
        SignatureError::Malformed(format!(
            "{HUB_SIGNATURE_256} header must be \"{HUB_PREFIX}\" followed by a hex digest"
        ))
    })?;
    check_signature(keys, &[presented], |key| hmac_sha256(key, &[body]))
}

/// The `X-Hub-Signature-256` value for `body` (GitHub and Meta).
pub(super) fn hub_signature(key: &Secret, body: &[u8]) -> HeaderValue {
    header_value(&format!(
        "{HUB_PREFIX}{}",
        hex::encode(hmac_sha256(key, &[body]))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_inclusive_and_two_sided() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let tolerance = Duration::from_secs(300);
        assert!(check_window(10_000 - 300, now, tolerance).is_ok());
        assert!(check_window(10_000 + 300, now, tolerance).is_ok());
        assert_eq!(
            check_window(10_000 - 301, now, tolerance),
            Err(SignatureError::Stale {
                age_secs: 301,
                tolerance_secs: 300
            })
        );
        assert_eq!(
            check_window(10_000 + 301, now, tolerance),
            Err(SignatureError::Stale {
                age_secs: -301,
                tolerance_secs: 300
            })
        );
    }

    #[test]
    fn window_does_not_overflow() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let tolerance = Duration::from_secs(300);
        assert!(check_window(i64::MIN, now, tolerance).is_err());
        assert!(check_window(i64::MAX, now, tolerance).is_err());
    }

    #[test]
    fn timestamps_are_digits_only() {
        assert_eq!(parse_timestamp("1674087231", "t"), Ok(1_674_087_231));
        for bad in ["", "-5", "+5", "1.5", "12a", "99999999999999999999999"] {
            assert!(
                matches!(parse_timestamp(bad, "t"), Err(SignatureError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn blank_header_counts_as_missing() {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_static("  "));
        assert_eq!(
            required_header(&headers, "webhook-id"),
            Err(SignatureError::Missing("webhook-id".into()))
        );
    }

    #[test]
    fn header_lookup_ignores_case() {
        let mut headers = HeaderMap::new();
        headers.insert("x-hub-signature-256", HeaderValue::from_static("sha256=00"));
        assert_eq!(
            required_header(&headers, HUB_SIGNATURE_256),
            Ok("sha256=00")
        );
    }

    #[test]
    fn non_ascii_header_is_malformed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "webhook-id",
            HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap(),
        );
        assert!(matches!(
            required_header(&headers, "webhook-id"),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn header_safe_replaces_controls_and_non_ascii() {
        assert_eq!(header_safe("evt_1"), "evt_1");
        assert_eq!(header_safe("a\nb\u{e9}"), "a_b_");
        assert_eq!(header_value("x\r\ny").to_str().unwrap(), "x__y");
    }

    #[test]
    fn rfc_4231_test_case_2() {
        // RFC 4231, 4.3: key "Jefe", data "what do ya want for nothing?".
        let mac = hmac_sha256(
            &Secret::from("Jefe"),
            &[b"what do ya ", b"want for nothing?"],
        );
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn any_matches_checks_every_key_and_candidate() {
        let keys = [Secret::from("a"), Secret::from("b")];
        let expected_b = hmac_sha256(&keys[1], &[b"x"]).to_vec();
        assert!(any_matches(&keys, &[vec![0; 32], expected_b], |k| {
            hmac_sha256(k, &[b"x"])
        }));
        assert!(!any_matches(
            &keys,
            &[vec![0; 32], vec![]],
            |k| hmac_sha256(k, &[b"x"])
        ));
    }

    #[test]
    fn body_hash_is_lower_hex_sha256() {
        assert_eq!(
            body_sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
