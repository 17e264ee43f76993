//! Generic `hmac-sha256`: HMAC-SHA256 of the raw body, in a configurable
//! header, after an optional literal prefix, hex or base64 encoded.
//!
//! There is no timestamp, so no replay window; the idempotency key is the
//! SHA-256 of the body.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderName};

use super::common::{
    body_sha256_hex, check_signature, header_value, hmac_sha256, required_dynamic_header,
};
use super::{Encoding, Secret, SignatureError, SignedRequest, Verified};

pub(super) fn verify(
    keys: &[Secret],
    header: &HeaderName,
    prefix: Option<&str>,
    encoding: Encoding,
    request: &SignedRequest<'_>,
) -> Result<Verified, SignatureError> {
    let value = required_dynamic_header(request.headers, header)?;
    let encoded = match prefix {
        Some(prefix) => value.strip_prefix(prefix).ok_or_else(|| {
            SignatureError::Malformed(format!("{header} header must start with \"{prefix}\""))
        })?,
        None => value,
    };
    let presented = match encoding {
        Encoding::Hex => hex::decode(encoded).ok(),
        Encoding::Base64 => STANDARD.decode(encoded).ok(),
    }
    .ok_or_else(|| {
        SignatureError::Malformed(format!(
            "{header} header must hold a {encoding}-encoded HMAC-SHA256{}",
            prefix.map_or(String::new(), |p| format!(" after \"{p}\""))
        ))
    })?;
    check_signature(keys, &[presented], |key| hmac_sha256(key, &[request.body]))?;
    Ok(Verified {
        idempotency_key: body_sha256_hex(request.body),
    })
}

pub(super) fn sign(
    key: &Secret,
    header: &HeaderName,
    prefix: Option<&str>,
    encoding: Encoding,
    body: &[u8],
) -> HeaderMap {
    let mac = hmac_sha256(key, &[body]);
    let encoded = match encoding {
        Encoding::Hex => hex::encode(mac),
        Encoding::Base64 => STANDARD.encode(mac),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header.clone(),
        header_value(&format!("{}{encoded}", prefix.unwrap_or(""))),
    );
    headers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::Scheme;
    use super::super::common::body_sha256_hex;
    use super::super::test_support::*;
    use super::*;

    const URL: &str = "https://hooks.example.com/webhooks/acme";
    const BODY: &[u8] = br#"{"event":"order.paid","id":42}"#;
    const TAMPERED: &[u8] = br#"{"event":"order.paid","id":43}"#;

    fn scheme(prefix: Option<&str>, encoding: Encoding) -> Scheme {
        Scheme::hmac_sha256("X-Acme-Signature", prefix, encoding).unwrap()
    }

    fn headers_with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-acme-signature", HeaderValue::from_str(value).unwrap());
        headers
    }

    // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    const RFC_KEY: &str = "Jefe";
    const RFC_DATA: &[u8] = b"what do ya want for nothing?";
    const RFC_MAC_HEX: &str = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";

    #[test]
    fn rfc_4231_vector_hex_with_prefix() {
        let verifier = verifier(scheme(Some("sha256="), Encoding::Hex), &[RFC_KEY]);
        let headers = headers_with(&format!("sha256={RFC_MAC_HEX}"));
        let verified = check(&verifier, &headers, RFC_DATA, URL, now()).unwrap();
        assert_eq!(verified.idempotency_key, body_sha256_hex(RFC_DATA));
        // Upper-case hex is accepted too.
        let upper = headers_with(&format!("sha256={}", RFC_MAC_HEX.to_ascii_uppercase()));
        assert!(check(&verifier, &upper, RFC_DATA, URL, now()).is_ok());
    }

    #[test]
    fn rfc_4231_vector_base64() {
        let verifier = verifier(scheme(None, Encoding::Base64), &[RFC_KEY]);
        let headers = headers_with("W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM=");
        assert!(check(&verifier, &headers, RFC_DATA, URL, now()).is_ok());
    }

    #[test]
    fn common_behaviour_every_variant() {
        for (prefix, encoding) in [
            (None, Encoding::Hex),
            (Some("sha256="), Encoding::Hex),
            (None, Encoding::Base64),
            (Some("v1="), Encoding::Base64),
        ] {
            let verified = common_behaviour(
                scheme(prefix, encoding),
                "acme-secret-one",
                "acme-secret-two",
                BODY,
                TAMPERED,
                URL,
            );
            assert_eq!(verified.idempotency_key, body_sha256_hex(BODY));
        }
    }

    #[test]
    fn signs_with_prefix_and_encoding() {
        let verifier = verifier(scheme(Some("sha256="), Encoding::Hex), &[RFC_KEY]);
        let headers = verifier.sign(RFC_DATA, URL, "ignored", now());
        assert_eq!(headers["x-acme-signature"], format!("sha256={RFC_MAC_HEX}"));
    }

    #[test]
    fn missing_signature_header() {
        missing_header(
            scheme(None, Encoding::Hex),
            "acme",
            BODY,
            URL,
            "x-acme-signature",
        );
    }

    #[test]
    fn wrong_prefix_is_malformed() {
        let verifier = verifier(scheme(Some("sha256="), Encoding::Hex), &[RFC_KEY]);
        let headers = headers_with(&format!("sha1={RFC_MAC_HEX}"));
        let err = check(&verifier, &headers, RFC_DATA, URL, now()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x-acme-signature header must start with \"sha256=\""
        );
    }

    #[test]
    fn bad_encoding_is_malformed() {
        let verifier = verifier(scheme(None, Encoding::Hex), &[RFC_KEY]);
        let err = check(&verifier, &headers_with("not-hex!"), RFC_DATA, URL, now()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x-acme-signature header must hold a hex-encoded HMAC-SHA256"
        );
        let verifier = verifier_b64();
        let err = check(&verifier, &headers_with("***"), RFC_DATA, URL, now()).unwrap_err();
        assert!(matches!(err, SignatureError::Malformed(_)));
    }

    fn verifier_b64() -> super::super::Verifier {
        verifier(scheme(Some("v1="), Encoding::Base64), &[RFC_KEY])
    }

    #[test]
    fn truncated_signature_is_a_mismatch() {
        let verifier = verifier(scheme(None, Encoding::Hex), &[RFC_KEY]);
        let headers = headers_with("5bdcc146bf60754e6a042426089575c7");
        assert_eq!(
            check(&verifier, &headers, RFC_DATA, URL, now()),
            Err(SignatureError::Mismatch)
        );
    }
}
