//! Meta (WhatsApp Cloud API, Messenger, Instagram) webhooks: Meta signs
//! every event notification with `X-Hub-Signature-256: sha256=<hex>`, the
//! HMAC-SHA256 of the payload keyed with the app secret. The signature is
//! computed over the payload exactly as sent (Meta escapes non-ASCII
//! characters as `\uXXXX`), so the raw body must be verified, never a
//! re-serialized one. Meta signs no timestamp and sends no delivery id: the
//! idempotency key is the body's SHA-256. The `hub.challenge` GET handshake
//! is not a signature and is left to the HTTP layer.

use http::HeaderMap;

use super::common::{HUB_SIGNATURE_256, body_sha256_hex, hub_signature, verify_hub_signature};
use super::{Secret, SignatureError, SignedRequest, Verified};

pub(super) fn verify(
    keys: &[Secret],
    request: &SignedRequest<'_>,
) -> Result<Verified, SignatureError> {
    verify_hub_signature(keys, request.headers, request.body)?;
    Ok(Verified {
        idempotency_key: body_sha256_hex(request.body),
    })
}

pub(super) fn sign(key: &Secret, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HUB_SIGNATURE_256, hub_signature(key, body));
    headers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::Scheme;
    use super::super::test_support::*;
    use super::*;

    const URL: &str = "https://hooks.example.com/webhooks/whatsapp";
    const BODY: &[u8] = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"messages","value":{"messages":[{"from":"16315551181","id":"wamid.ABGG","text":{"body":"caf\u00e9"}}]}}]}]}"#;
    const TAMPERED: &[u8] = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"messages","value":{"messages":[{"from":"16315551181","id":"wamid.ABGG","text":{"body":"cafe"}}]}}]}]}"#;

    /// Meta publishes no test vector; its algorithm is the one GitHub
    /// publishes a vector for, so that vector must verify here too.
    #[test]
    fn same_algorithm_as_githubs_published_vector() {
        let verifier = verifier(Scheme::Meta, &["It's a Secret to Everybody"]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-hub-signature-256",
            HeaderValue::from_static(
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            ),
        );
        let verified = check(&verifier, &headers, b"Hello, World!", URL, now()).unwrap();
        assert_eq!(verified.idempotency_key, body_sha256_hex(b"Hello, World!"));
    }

    #[test]
    fn common_behaviour() {
        let verified = super::super::test_support::common_behaviour(
            Scheme::Meta,
            "meta-app-secret-one",
            "meta-app-secret-two",
            BODY,
            TAMPERED,
            URL,
        );
        assert_eq!(verified.idempotency_key, body_sha256_hex(BODY));
    }

    #[test]
    fn missing_signature_header() {
        missing_header(Scheme::Meta, "app-secret", BODY, URL, "X-Hub-Signature-256");
    }

    #[test]
    fn signs_only_the_signature_header() {
        let headers = verifier(Scheme::Meta, &["app-secret"]).sign(BODY, URL, "ignored", now());
        assert_eq!(headers.len(), 1);
        assert!(
            headers["x-hub-signature-256"]
                .to_str()
                .unwrap()
                .starts_with("sha256=")
        );
    }
}
