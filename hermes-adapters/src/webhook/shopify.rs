//! Shopify, as "Verify webhook deliveries" (shopify.dev) documents it: every
//! HTTPS delivery carries `X-Shopify-Hmac-Sha256`, the base64 HMAC-SHA256 of
//! the raw body keyed with the app's client secret, compared in constant
//! time. The delivery id `X-Shopify-Webhook-Id` is the idempotency key (the
//! body's SHA-256 when absent).
//!
//! Shopify signs no timestamp: `X-Shopify-Triggered-At` is informational and
//! not covered by the HMAC, so there is no replay window. After a client
//! secret rotation Shopify may keep signing with the old secret for up to an
//! hour, which is what configuring both secrets covers.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;

use super::common::{
    base64_mac_header, check_signature, delivery_id_or_body_hash, header_value, hmac_sha256,
};
use super::{Secret, SignatureError, SignedRequest, Verified};

const HMAC: &str = "X-Shopify-Hmac-Sha256";
const WEBHOOK_ID: &str = "X-Shopify-Webhook-Id";

pub(super) fn verify(
    keys: &[Secret],
    request: &SignedRequest<'_>,
) -> Result<Verified, SignatureError> {
    let presented = base64_mac_header(request.headers, HMAC, "HMAC-SHA256")?;
    check_signature(keys, &[presented], |key| hmac_sha256(key, &[request.body]))?;
    Ok(Verified {
        idempotency_key: delivery_id_or_body_hash(request, WEBHOOK_ID),
    })
}

pub(super) fn sign(key: &Secret, body: &[u8], id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        HMAC,
        header_value(&STANDARD.encode(hmac_sha256(key, &[body]))),
    );
    headers.insert(WEBHOOK_ID, header_value(id));
    headers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::Scheme;
    use super::super::test_support::*;
    use super::*;

    const URL: &str = "https://hooks.example.com/webhooks/shopify";
    const BODY: &[u8] =
        br#"{"id":820982911946154508,"email":"jon@example.com","total_price":"199.00"}"#;
    const TAMPERED: &[u8] =
        br#"{"id":820982911946154508,"email":"jon@example.com","total_price":"1.00"}"#;

    fn hmac_header(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-shopify-hmac-sha256", HeaderValue::from_static(value));
        headers
    }

    /// Shopify publishes no vector; RFC 4231 test case 2 in base64 checks
    /// the documented construction (base64 of HMAC-SHA256 of the raw body).
    #[test]
    fn rfc_4231_vector_in_shopify_shape() {
        let verifier = verifier(Scheme::Shopify, &["Jefe"]);
        let mut headers = hmac_header("W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM=");
        headers.insert(
            "x-shopify-webhook-id",
            HeaderValue::from_static("b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"),
        );
        let body = b"what do ya want for nothing?";
        let verified = check(&verifier, &headers, body, URL, now()).unwrap();
        assert_eq!(
            verified.idempotency_key,
            "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"
        );
        assert_eq!(
            verifier.sign(body, URL, "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043", now()),
            headers
        );
    }

    #[test]
    fn common_behaviour() {
        let verified = super::super::test_support::common_behaviour(
            Scheme::Shopify,
            "shpss_client_secret_one",
            "shpss_client_secret_two",
            BODY,
            TAMPERED,
            URL,
        );
        assert_eq!(verified.idempotency_key, "evt_123");
    }

    #[test]
    fn missing_hmac_header() {
        missing_header(Scheme::Shopify, "shpss", BODY, URL, "X-Shopify-Hmac-Sha256");
    }

    #[test]
    fn no_replay_window() {
        // Signed "a day ago": Shopify has no signed timestamp to refuse.
        let verifier = verifier(Scheme::Shopify, &["shpss"]);
        let headers = verifier.sign(BODY, URL, "w1", at(NOW_SECS - 86_400));
        assert!(check(&verifier, &headers, BODY, URL, now()).is_ok());
    }

    #[test]
    fn hex_instead_of_base64_is_malformed() {
        let verifier = verifier(Scheme::Shopify, &["shpss"]);
        let headers = hmac_header("sha256=5bdcc146");
        assert_eq!(
            check(&verifier, &headers, BODY, URL, now())
                .unwrap_err()
                .to_string(),
            "X-Shopify-Hmac-Sha256 header must be a base64 HMAC-SHA256"
        );
    }

    #[test]
    fn without_webhook_id_the_body_hash_is_the_key() {
        body_hash_without_delivery_id(Scheme::Shopify, "shpss", BODY, URL, WEBHOOK_ID);
    }
}
