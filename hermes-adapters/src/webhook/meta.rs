//! Meta (WhatsApp Cloud API, Messenger, Instagram) webhooks: Meta signs
//! every event notification with `X-Hub-Signature-256: sha256=<hex>`, the
//! HMAC-SHA256 of the payload keyed with the app secret. The signature is
//! computed over the payload exactly as sent (Meta escapes non-ASCII
//! characters as `\uXXXX`), so the raw body must be verified, never a
//! re-serialized one. Meta signs no timestamp and sends no delivery id: the
//! idempotency key is the body's SHA-256.
//!
//! Before it sends events, Meta verifies the callback URL with a `GET`
//! whose query holds `hub.mode=subscribe`, `hub.verify_token` (the token the
//! app's dashboard was given) and `hub.challenge`; the endpoint proves it
//! knows the token by answering 200 with the challenge.
//! [`subscription_challenge`] makes that decision; answering is the HTTP
//! layer's.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::common::{HUB_SIGNATURE_256, body_sha256_hex, hub_signature, verify_hub_signature};
use super::{Secret, SignatureError, SignedRequest, Verified};

/// The longest `hub.challenge` echoed (Meta sends an integer).
const MAX_CHALLENGE_BYTES: usize = 128;

/// Why a subscription handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// A parameter is missing or not what Meta sends.
    #[error("{0}")]
    Malformed(String),
    /// `hub.verify_token` is not the source's verify token.
    #[error("hub.verify_token does not match this source's verify_token")]
    Mismatch,
}

/// Meta's subscription handshake: the `hub.challenge` to answer with, when
/// `query` (the request's query string, undecoded) holds
/// `hub.mode=subscribe`, a `hub.verify_token` equal to `verify_token`
/// (compared in constant time) and a challenge of 1 to 128 ASCII letters,
/// digits, `-`, `_` or `.` (Meta sends an integer; nothing else is echoed).
pub fn subscription_challenge(
    query: &str,
    verify_token: &Secret,
) -> Result<String, SubscriptionError> {
    let (mut mode, mut token, mut challenge) = (None, None, None);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "hub.mode" => mode = Some(value),
            "hub.verify_token" => token = Some(value),
            "hub.challenge" => challenge = Some(value),
            _ => {}
        }
    }
    let missing = |name: &str| SubscriptionError::Malformed(format!("{name} is missing"));
    let mode = mode.ok_or_else(|| missing("hub.mode"))?;
    if mode != "subscribe" {
        return Err(SubscriptionError::Malformed(format!(
            "hub.mode must be \"subscribe\", not {mode:?}"
        )));
    }
    let token = token.ok_or_else(|| missing("hub.verify_token"))?;
    let challenge = challenge.ok_or_else(|| missing("hub.challenge"))?;
    if challenge.is_empty()
        || challenge.len() > MAX_CHALLENGE_BYTES
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(SubscriptionError::Malformed(format!(
            "hub.challenge must be 1 to {MAX_CHALLENGE_BYTES} ASCII letters, digits, '-', '_' or '.'"
        )));
    }
    // Digests of equal length: a byte compare of the tokens themselves would
    // end early on a length mismatch, telling the token's length.
    let (expected, given) = (
        Sha256::digest(verify_token.expose()),
        Sha256::digest(token.as_bytes()),
    );
    if !bool::from(expected.ct_eq(&given)) {
        return Err(SubscriptionError::Mismatch);
    }
    Ok(challenge.into_owned())
}

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
        let verifier = verifier(Scheme::Meta, &[HUB_VECTOR_SECRET]);
        let verified = check(
            &verifier,
            &hub_vector_headers(),
            HUB_VECTOR_BODY,
            URL,
            now(),
        )
        .unwrap();
        assert_eq!(verified.idempotency_key, body_sha256_hex(HUB_VECTOR_BODY));
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
    fn the_subscription_handshake_echoes_the_challenge_for_the_right_token() {
        use super::{SubscriptionError, subscription_challenge};
        let token = Secret::from("my token");
        assert_eq!(
            subscription_challenge(
                "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=my+token",
                &token
            ),
            Ok("1158201444".to_owned())
        );
        assert_eq!(
            subscription_challenge(
                "hub.mode=subscribe&hub.challenge=1&hub.verify_token=my%20toke",
                &token
            ),
            Err(SubscriptionError::Mismatch)
        );
        for (query, says) in [
            (
                "hub.challenge=1&hub.verify_token=my+token",
                "hub.mode is missing",
            ),
            (
                "hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=my+token",
                "hub.mode must be",
            ),
            (
                "hub.mode=subscribe&hub.challenge=1",
                "hub.verify_token is missing",
            ),
            (
                "hub.mode=subscribe&hub.verify_token=my+token",
                "hub.challenge is missing",
            ),
            (
                "hub.mode=subscribe&hub.challenge=%3Cscript%3E&hub.verify_token=my+token",
                "hub.challenge must be",
            ),
        ] {
            let error = subscription_challenge(query, &token).unwrap_err();
            assert!(
                matches!(&error, SubscriptionError::Malformed(m) if m.contains(says)),
                "{query}: {error}"
            );
        }
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
