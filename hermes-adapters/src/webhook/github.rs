//! GitHub, as "Validating webhook deliveries" (docs.github.com) documents it:
//! `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`, keyed
//! with the webhook's secret, compared in constant time. GitHub signs no
//! timestamp, so there is no replay window; `X-GitHub-Delivery` (a GUID per
//! delivery, kept on redelivery) is the idempotency key, or the body's
//! SHA-256 when absent. The legacy SHA-1 `X-Hub-Signature` is not accepted.

use http::HeaderMap;

use super::common::{
    HUB_SIGNATURE_256, delivery_id_or_body_hash, header_value, hub_signature, verify_hub_signature,
};
use super::{Secret, SignatureError, SignedRequest, Verified};

const DELIVERY: &str = "X-GitHub-Delivery";

pub(super) fn verify(
    keys: &[Secret],
    request: &SignedRequest<'_>,
) -> Result<Verified, SignatureError> {
    verify_hub_signature(keys, request.headers, request.body)?;
    Ok(Verified {
        idempotency_key: delivery_id_or_body_hash(request, DELIVERY),
    })
}

pub(super) fn sign(key: &Secret, body: &[u8], id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HUB_SIGNATURE_256, hub_signature(key, body));
    headers.insert(DELIVERY, header_value(id));
    headers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::Scheme;
    use super::super::test_support::*;
    use super::*;

    const URL: &str = "https://hooks.example.com/webhooks/github";
    const BODY: &[u8] = br#"{"action":"opened","number":1}"#;
    const TAMPERED: &[u8] = br#"{"action":"closed","number":1}"#;

    /// The test values published in GitHub's "Validating webhook
    /// deliveries": secret "It's a Secret to Everybody", payload
    /// "Hello, World!".
    #[test]
    fn published_vector() {
        let verifier = verifier(Scheme::GitHub, &[HUB_VECTOR_SECRET]);
        let mut headers = hub_vector_headers();
        headers.insert(
            "x-github-delivery",
            HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        );
        let verified = check(&verifier, &headers, HUB_VECTOR_BODY, URL, now()).unwrap();
        assert_eq!(
            verified.idempotency_key,
            "72d3162e-cc78-11e3-81ab-4c9367dc0958"
        );

        let signed = verifier.sign(
            HUB_VECTOR_BODY,
            URL,
            "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            now(),
        );
        assert_eq!(signed, headers);

        assert_eq!(
            check(&verifier, &headers, b"Hello, World?", URL, now()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn common_behaviour() {
        let verified = super::super::test_support::common_behaviour(
            Scheme::GitHub,
            "gh-secret-one",
            "gh-secret-two",
            BODY,
            TAMPERED,
            URL,
        );
        assert_eq!(verified.idempotency_key, "evt_123");
    }

    #[test]
    fn missing_signature_header() {
        missing_header(Scheme::GitHub, "gh", BODY, URL, "X-Hub-Signature-256");
    }

    #[test]
    fn without_delivery_id_the_body_hash_is_the_key() {
        body_hash_without_delivery_id(Scheme::GitHub, "gh", BODY, URL, DELIVERY);
    }

    #[test]
    fn sha1_or_bare_hex_is_malformed() {
        let verifier = verifier(Scheme::GitHub, &["gh"]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-hub-signature-256",
            HeaderValue::from_static("sha1=0123456789abcdef0123456789abcdef01234567"),
        );
        assert_eq!(
            check(&verifier, &headers, BODY, URL, now())
                .unwrap_err()
                .to_string(),
            "X-Hub-Signature-256 header must start with \"sha256=\""
        );
        headers.insert("x-hub-signature-256", HeaderValue::from_static("sha256=zz"));
        assert!(matches!(
            check(&verifier, &headers, BODY, URL, now()),
            Err(SignatureError::Malformed(_))
        ));
    }
}
