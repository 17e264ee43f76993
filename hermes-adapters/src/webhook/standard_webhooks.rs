//! [Standard Webhooks](https://www.standardwebhooks.com/) 1.0.0, symmetric
//! signatures, as `spec/standard-webhooks.md` defines them:
//!
//! - headers `webhook-id`, `webhook-timestamp` (integer Unix seconds) and
//!   `webhook-signature`, a space-delimited list of `<version>,<signature>`;
//!   symmetric signatures are `v1,<base64 HMAC-SHA256>`, other versions
//!   (`v1a` asymmetric, future ones) are skipped;
//! - signed content `{webhook-id}.{webhook-timestamp}.{raw body}`;
//! - the secret is presented as `whsec_` followed by the base64 key; the key
//!   is the decoded bytes (the prefix is optional, as in the reference
//!   libraries);
//! - the timestamp must lie within the tolerance (five minutes) of now, in
//!   both directions;
//! - `webhook-id` is the idempotency key.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;

use super::common::{
    check_signature, check_window, header_safe, header_value, hmac_sha256, parse_timestamp,
    required_header, unix_seconds,
};
use super::{Secret, SignatureError, SignedRequest, Verified};

const ID: &str = "webhook-id";
const TIMESTAMP: &str = "webhook-timestamp";
const SIGNATURE: &str = "webhook-signature";
const SECRET_PREFIX: &str = "whsec_";
const VERSION: &str = "v1";

/// The HMAC key of a `whsec_<base64>` secret, or of its bare base64 key
/// (as the official libraries accept it). Errors say what is wrong without
/// repeating the secret.
pub(super) fn decode_secret(secret: &Secret) -> Result<Secret, &'static str> {
    let text = std::str::from_utf8(secret.expose()).map_err(|_| "it is not UTF-8 text")?;
    let encoded = text.trim();
    let (encoded, not_base64) = match encoded.strip_prefix(SECRET_PREFIX) {
        Some(encoded) => (encoded, "the part after \"whsec_\" is not valid base64"),
        None => (encoded, "it is neither \"whsec_\" and base64 nor base64"),
    };
    let key = STANDARD.decode(encoded).map_err(|_| not_base64)?;
    if key.is_empty() {
        return Err("the decoded key is empty");
    }
    Ok(Secret::new(key))
}

pub(super) fn verify(
    keys: &[Secret],
    request: &SignedRequest<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    let headers = request.headers;
    let id = required_header(headers, ID)?;
    let timestamp_text = required_header(headers, TIMESTAMP)?;
    let signatures = required_header(headers, SIGNATURE)?;
    let timestamp = parse_timestamp(timestamp_text, TIMESTAMP)?;

    let mut v1_entries = 0;
    let presented: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, encoded)| {
            v1_entries += 1;
            STANDARD.decode(encoded).ok()
        })
        .collect();
    if presented.is_empty() {
        return Err(SignatureError::Malformed(if v1_entries == 0 {
            format!("{SIGNATURE} header has no \"{VERSION},<base64>\" signature")
        } else {
            format!("{SIGNATURE} header's {VERSION} signatures are not valid base64")
        }));
    }

    let body = request.body;
    let signed = |key: &Secret| {
        hmac_sha256(
            key,
            &[id.as_bytes(), b".", timestamp_text.as_bytes(), b".", body],
        )
    };
    check_signature(keys, &presented, signed)?;
    check_window(timestamp, now, tolerance)?;
    Ok(Verified {
        idempotency_key: id.to_owned(),
    })
}

pub(super) fn sign(key: &Secret, body: &[u8], id: &str, now: SystemTime) -> HeaderMap {
    let id = header_safe(id);
    let timestamp = unix_seconds(now).to_string();
    let mac = hmac_sha256(
        key,
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    );
    let mut headers = HeaderMap::new();
    headers.insert(ID, header_value(&id));
    headers.insert(TIMESTAMP, header_value(&timestamp));
    headers.insert(
        SIGNATURE,
        header_value(&format!("{VERSION},{}", STANDARD.encode(mac))),
    );
    headers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::test_support::*;
    use super::super::{ConfigError, Scheme, Verifier};
    use super::*;

    const URL: &str = "https://hooks.example.com/webhooks/svix";
    const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SECRET_B: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const BODY: &[u8] = br#"{"type":"contact.created","data":{"id":"1f81eb52"}}"#;
    const TAMPERED: &[u8] = br#"{"type":"contact.created","data":{"id":"1f81eb53"}}"#;

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ID, HeaderValue::from_str(id).unwrap());
        headers.insert(TIMESTAMP, HeaderValue::from_str(timestamp).unwrap());
        headers.insert(SIGNATURE, HeaderValue::from_str(signature).unwrap());
        headers
    }

    /// `libraries/rust/src/lib.rs` (`test_sign`) of
    /// github.com/standard-webhooks/standard-webhooks.
    #[test]
    fn reference_vector_rust_library() {
        let verifier = verifier(Scheme::StandardWebhooks, &[SECRET_B]);
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let headers = headers(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            "1649367553",
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        );
        let verified = check(&verifier, &headers, body, URL, at(1_649_367_553)).unwrap();
        assert_eq!(verified.idempotency_key, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk");

        let signed = verifier.sign(
            body,
            URL,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            at(1_649_367_553),
        );
        assert_eq!(signed, headers);
    }

    /// `libraries/go/webhook_test.go` (`TestWebhookSign`) of the same
    /// repository.
    #[test]
    fn reference_vector_go_library() {
        let verifier = verifier(Scheme::StandardWebhooks, &[SECRET_A]);
        let body = br#"{"test": 2432232314}"#;
        let headers = headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        );
        assert!(check(&verifier, &headers, body, URL, at(1_614_265_330)).is_ok());
        // Go's TestWebhookPrefix: the secret works without "whsec_" too.
        let unprefixed = verifier_from(&SECRET_A["whsec_".len()..]);
        assert!(check(&unprefixed, &headers, body, URL, at(1_614_265_330)).is_ok());
    }

    fn verifier_from(secret: &str) -> Verifier {
        Verifier::new(Scheme::StandardWebhooks, vec![Secret::from(secret)]).unwrap()
    }

    /// The multi-signature lists of the reference tests: any valid `v1`
    /// entry is enough; `v2` and `v1a` entries are skipped.
    #[test]
    fn signature_list_accepts_any_valid_v1() {
        let verifier = verifier(Scheme::StandardWebhooks, &[SECRET_B]);
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let list = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= \
                    v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= \
                    v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg== \
                    v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw= \
                    v1,not*base64";
        let good = headers("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", list);
        assert!(check(&verifier, &good, body, URL, at(1_649_367_553)).is_ok());

        let none_valid = headers(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            "1649367553",
            "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= \
             v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= \
             v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
        );
        assert_eq!(
            check(&verifier, &none_valid, body, URL, at(1_649_367_553)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn common_behaviour() {
        let verified = super::super::test_support::common_behaviour(
            Scheme::StandardWebhooks,
            SECRET_A,
            SECRET_B,
            BODY,
            TAMPERED,
            URL,
        );
        assert_eq!(verified.idempotency_key, "evt_123");
    }

    #[test]
    fn signed_id_and_timestamp_cannot_be_swapped() {
        let verifier = verifier(Scheme::StandardWebhooks, &[SECRET_A]);
        let mut signed = verifier.sign(BODY, URL, "evt_1", now());
        signed.insert(ID, HeaderValue::from_static("evt_2"));
        assert_eq!(
            check(&verifier, &signed, BODY, URL, now()),
            Err(SignatureError::Mismatch)
        );
        let mut signed = verifier.sign(BODY, URL, "evt_1", now());
        signed.insert(TIMESTAMP, HeaderValue::from_static("1700000001"));
        assert_eq!(
            check(&verifier, &signed, BODY, URL, now()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_headers() {
        for header in [ID, TIMESTAMP, SIGNATURE] {
            missing_header(Scheme::StandardWebhooks, SECRET_A, BODY, URL, header);
        }
    }

    #[test]
    fn stale_timestamps() {
        stale_both_sides(Scheme::StandardWebhooks, SECRET_A, BODY, URL);
    }

    #[test]
    fn malformed_headers() {
        let verifier = verifier(Scheme::StandardWebhooks, &[SECRET_A]);
        for (timestamp, signature, message) in [
            (
                "yesterday",
                "v1,AAAA",
                "webhook-timestamp must be an integer number of seconds since the Unix epoch",
            ),
            (
                "1700000000",
                "v1a,AAAA",
                "webhook-signature header has no \"v1,<base64>\" signature",
            ),
        ] {
            let malformed = headers("evt", timestamp, signature);
            assert_eq!(
                check(&verifier, &malformed, BODY, URL, now())
                    .unwrap_err()
                    .to_string(),
                message
            );
        }
        let bad_b64 = headers("evt", "1700000000", "v1,***");
        assert!(matches!(
            check(&verifier, &bad_b64, BODY, URL, now()),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn sign_sanitizes_the_id_consistently() {
        let verifier = verifier(Scheme::StandardWebhooks, &[SECRET_A]);
        let signed = verifier.sign(BODY, URL, "evt\n1", now());
        assert_eq!(signed[ID], "evt_1");
        assert_eq!(
            check(&verifier, &signed, BODY, URL, now())
                .unwrap()
                .idempotency_key,
            "evt_1"
        );
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        let err = Verifier::new(
            Scheme::StandardWebhooks,
            vec![Secret::from(SECRET_A), Secret::from("whsec_not base64!")],
        )
        .unwrap_err();
        assert_eq!(
            err,
            ConfigError::InvalidStandardWebhooksSecret {
                position: 2,
                reason: "the part after \"whsec_\" is not valid base64"
            }
        );
        assert!(!err.to_string().contains("not base64!"), "{err}");
        assert!(matches!(
            Verifier::new(Scheme::StandardWebhooks, vec![Secret::from("whsec_")]),
            Err(ConfigError::InvalidStandardWebhooksSecret { position: 1, .. })
        ));
        // Without the prefix, the error names no prefix the user did not write.
        let err =
            Verifier::new(Scheme::StandardWebhooks, vec![Secret::from("not base64!")]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::InvalidStandardWebhooksSecret {
                position: 1,
                reason: "it is neither \"whsec_\" and base64 nor base64"
            }
        );
    }
}
