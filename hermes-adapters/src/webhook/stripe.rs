//! Stripe, as "Verify webhook signatures manually" (docs.stripe.com) lays it
//! out:
//!
//! 1. split `Stripe-Signature` on `,` into `prefix=value` elements; `t` is
//!    the timestamp, each `v1` a signature (several during a secret
//!    rotation); other schemes, such as the test-mode `v0`, are ignored;
//! 2. the signed payload is `{t}.{raw body}`;
//! 3. the expected signature is the hex HMAC-SHA256 of it, keyed with the
//!    endpoint's signing secret — the whole `whsec_…` string as bytes, not
//!    base64-decoded (unlike Standard Webhooks);
//! 4. compare in constant time, then refuse a timestamp outside the
//!    tolerance (five minutes; refused on both sides here).
//!
//! The idempotency key is the event's `id` field from the JSON body (the
//! same across retries), or the body's SHA-256 if the body has none.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use serde::Deserialize;

use super::common::{
    body_sha256_hex, check_signature, check_window, header_value, hmac_sha256, parse_timestamp,
    required_header, unix_seconds,
};
use super::{Secret, SignatureError, SignedRequest, Verified};

const HEADER: &str = "Stripe-Signature";
const SCHEME: &str = "v1";

pub(super) fn verify(
    keys: &[Secret],
    request: &SignedRequest<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    let header = required_header(request.headers, HEADER)?;

    let mut timestamp_text = None;
    let mut v1_entries = 0;
    let mut presented = Vec::new();
    for (prefix, value) in header
        .split(',')
        .filter_map(|element| element.split_once('='))
        .map(|(prefix, value)| (prefix.trim(), value.trim()))
    {
        match prefix {
            "t" if timestamp_text.is_none() => timestamp_text = Some(value),
            SCHEME => {
                v1_entries += 1;
                if let Ok(signature) = hex::decode(value) {
                    presented.push(signature);
                }
            }
            _ => {}
        }
    }
    let timestamp_text = timestamp_text.ok_or_else(|| {
        SignatureError::Malformed(format!("{HEADER} header has no t=<timestamp> element"))
    })?;
    let timestamp = parse_timestamp(timestamp_text, &format!("{HEADER} t="))?;
    if presented.is_empty() {
        return Err(SignatureError::Malformed(if v1_entries == 0 {
            format!("{HEADER} header has no {SCHEME}=<signature> element")
        } else {
            format!("{HEADER} header's {SCHEME} signatures are not hex")
        }));
    }

    let body = request.body;
    let signed = |key: &Secret| hmac_sha256(key, &[timestamp_text.as_bytes(), b".", body]);
    check_signature(keys, &presented, signed)?;
    check_window(timestamp, now, tolerance)?;
    Ok(Verified {
        idempotency_key: event_id(body).unwrap_or_else(|| body_sha256_hex(body)),
    })
}

/// The top-level `"id"` of a Stripe event body, if it has a string one.
fn event_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
    }
    serde_json::from_slice::<Event<'_>>(body)
        .ok()?
        .id
        .filter(|id| !id.is_empty())
        .map(Cow::into_owned)
}

pub(super) fn sign(key: &Secret, body: &[u8], now: SystemTime) -> HeaderMap {
    let timestamp = unix_seconds(now).to_string();
    let mac = hmac_sha256(key, &[timestamp.as_bytes(), b".", body]);
    let mut headers = HeaderMap::new();
    headers.insert(
        HEADER,
        header_value(&format!("t={timestamp},{SCHEME}={}", hex::encode(mac))),
    );
    headers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::Scheme;
    use super::super::test_support::*;
    use super::*;

    const URL: &str = "https://hooks.example.com/webhooks/stripe";
    const SECRET_A: &str = "whsec_test_secret_a";
    const SECRET_B: &str = "whsec_test_secret_b";
    const BODY: &[u8] = br#"{
  "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
  "object": "event",
  "type": "payment_intent.succeeded",
  "data": {"object": {"id": "pi_1", "amount": 2000}}
}"#;
    const TAMPERED: &[u8] = br#"{
  "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
  "object": "event",
  "type": "payment_intent.succeeded",
  "data": {"object": {"id": "pi_1", "amount": 200000}}
}"#;

    fn header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("stripe-signature", HeaderValue::from_str(value).unwrap());
        headers
    }

    fn expected_v1(secret: &str, timestamp: &str, body: &[u8]) -> String {
        hex::encode(hmac_sha256(
            &Secret::from(secret),
            &[timestamp.as_bytes(), b".", body],
        ))
    }

    /// Stripe publishes no fixed vector; this pins the documented
    /// construction (`t=…,v1=hex(HMAC-SHA256(secret, "{t}.{body}"))`, the
    /// secret used as the literal `whsec_…` string) to a value computed
    /// independently of this crate (Python's hmac module).
    #[test]
    fn documented_construction() {
        let verifier = verifier(Scheme::Stripe, &["whsec_test_secret"]);
        let body = br#"{"id":"evt_test_webhook","object":"event"}"#;
        let headers = header(
            "t=1700000000,v1=d95c6b7477fbd7e9f90b1b0ef5f9c7ac25abca5382460e0d988c2b2a5b71b990",
        );
        let verified = check(&verifier, &headers, body, URL, now()).unwrap();
        assert_eq!(verified.idempotency_key, "evt_test_webhook");
    }

    #[test]
    fn common_behaviour() {
        let verified = super::super::test_support::common_behaviour(
            Scheme::Stripe,
            SECRET_A,
            SECRET_B,
            BODY,
            TAMPERED,
            URL,
        );
        assert_eq!(verified.idempotency_key, "evt_1NG8Du2eZvKYlo2CUI79vXWy");
    }

    #[test]
    fn missing_header() {
        super::super::test_support::missing_header(
            Scheme::Stripe,
            SECRET_A,
            BODY,
            URL,
            "Stripe-Signature",
        );
    }

    #[test]
    fn stale_timestamps() {
        stale_both_sides(Scheme::Stripe, SECRET_A, BODY, URL);
    }

    #[test]
    fn any_v1_matches_and_v0_is_ignored() {
        let verifier = verifier(Scheme::Stripe, &[SECRET_A]);
        let good = expected_v1(SECRET_A, "1700000000", BODY);
        let other = expected_v1(SECRET_B, "1700000000", BODY);
        let headers = header(&format!(
            "t=1700000000,v1={other},v1={good},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"
        ));
        assert!(check(&verifier, &headers, BODY, URL, now()).is_ok());

        // A valid signature under v0 alone does not count.
        let headers = header(&format!("t=1700000000,v0={good}"));
        assert_eq!(
            check(&verifier, &headers, BODY, URL, now())
                .unwrap_err()
                .to_string(),
            "Stripe-Signature header has no v1=<signature> element"
        );
    }

    #[test]
    fn timestamp_is_signed() {
        let verifier = verifier(Scheme::Stripe, &[SECRET_A]);
        let good = expected_v1(SECRET_A, "1700000000", BODY);
        let headers = header(&format!("t=1700000001,v1={good}"));
        assert_eq!(
            check(&verifier, &headers, BODY, URL, now()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_headers() {
        let verifier = verifier(Scheme::Stripe, &[SECRET_A]);
        let cases = [
            (
                "v1=00",
                "Stripe-Signature header has no t=<timestamp> element",
            ),
            (
                "t=soon,v1=00",
                "Stripe-Signature t= must be an integer number of seconds since the Unix epoch",
            ),
            (
                "t=1700000000,v1=xyz",
                "Stripe-Signature header's v1 signatures are not hex",
            ),
            (
                "garbage",
                "Stripe-Signature header has no t=<timestamp> element",
            ),
        ];
        for (value, message) in cases {
            let err = check(&verifier, &header(value), BODY, URL, now()).unwrap_err();
            assert!(matches!(err, SignatureError::Malformed(_)), "{value}");
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn body_without_id_falls_back_to_its_hash() {
        let verifier = verifier(Scheme::Stripe, &[SECRET_A]);
        for body in [&b"not json"[..], br#"{"id": 5}"#, br#"{"object":"event"}"#] {
            let headers = verifier.sign(body, URL, "ignored", now());
            assert_eq!(
                check(&verifier, &headers, body, URL, now())
                    .unwrap()
                    .idempotency_key,
                body_sha256_hex(body)
            );
        }
    }

    #[test]
    fn sign_writes_documented_header_shape() {
        let verifier = verifier(Scheme::Stripe, &[SECRET_A]);
        let headers = verifier.sign(BODY, URL, "ignored", now());
        assert_eq!(
            headers["stripe-signature"].to_str().unwrap(),
            format!(
                "t=1700000000,v1={}",
                expected_v1(SECRET_A, "1700000000", BODY)
            )
        );
    }
}
