//! Twilio, as "Secure webhooks" (twilio.com/docs/usage/webhooks/webhooks-security)
//! documents it, with the details its official helper libraries settle:
//!
//! - `X-Twilio-Signature` is the base64 HMAC-SHA1, keyed with the account's
//!   auth token, of a string that starts with the full URL Twilio requested
//!   (scheme through query string);
//! - for an `application/x-www-form-urlencoded` POST, every body parameter
//!   is appended as name followed by value, no delimiters, sorted by name
//!   (case-sensitive byte order; repeated names by value, an identical
//!   name and value once, as the helpers' `sorted(set(values))` does) after
//!   form decoding;
//! - for a JSON (or any other non-form) body, Twilio adds a `bodySHA256`
//!   query parameter to the URL, the lower-case hex SHA-256 of the body; the
//!   signature then covers the URL alone and the body is bound to it by that
//!   hash. A non-form body without `bodySHA256` is refused, since nothing
//!   would vouch for it;
//! - because Twilio is inconsistent about explicit default ports, the URL is
//!   also tried with its port removed (or the default port added), as the
//!   helper libraries do.
//!
//! Twilio signs no timestamp and the idempotency key is the body's SHA-256.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use subtle::ConstantTimeEq;

use super::common::{
    FORM_URLENCODED, any_matches, base64_mac_header, body_sha256_hex, header_value, hmac_sha1,
    is_form_urlencoded,
};
use super::{Secret, SignatureError, SignedRequest, Verified};

const SIGNATURE: &str = "X-Twilio-Signature";
const BODY_SHA256: &str = "bodySHA256";
const JSON: &str = "application/json";

/// `url` with the `bodySHA256` query parameter Twilio adds for a JSON
/// `body`, placed before any fragment. Sign a JSON Twilio request with this
/// URL (the demo and tests do; Twilio itself builds it).
pub fn url_with_body_sha256(url: &str, body: &[u8]) -> String {
    let (base, fragment) = match url.find('#') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let separator = match base.find('?') {
        None => "?",
        Some(at) if at + 1 == base.len() || base.ends_with('&') => "",
        Some(_) => "&",
    };
    format!(
        "{base}{separator}{BODY_SHA256}={}{fragment}",
        body_sha256_hex(body)
    )
}

pub(super) fn verify(
    keys: &[Secret],
    request: &SignedRequest<'_>,
) -> Result<Verified, SignatureError> {
    let presented = base64_mac_header(request.headers, SIGNATURE, "HMAC-SHA1")?;
    let url = request.url;
    let body = request.body;
    if url.is_empty() {
        return Err(SignatureError::Malformed(
            "Twilio signatures cover the request URL, and none was given".to_owned(),
        ));
    }

    let body_hash = query_param(url, BODY_SHA256);
    let params = if body_hash.is_some() || body.is_empty() {
        Vec::new()
    } else if is_form_urlencoded(request.headers).unwrap_or(true) {
        // Without bodySHA256, a Twilio body is a form unless its type says otherwise.
        form_params(body)
    } else {
        return Err(SignatureError::Malformed(format!(
            "a Twilio request with a non-form body must carry {BODY_SHA256} in its URL; \
             without it X-Twilio-Signature does not cover the body"
        )));
    };

    let mut candidates = vec![url.to_owned()];
    candidates.extend(port_variant(url));
    let presented = [presented];
    // `|`, not `||`: every URL variant is checked, matched or not.
    let matched = candidates.iter().fold(false, |matched, candidate| {
        matched | any_matches(keys, &presented, |key| mac(key, candidate, &params))
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if let Some(expected) = body_hash {
        let actual = body_sha256_hex(body);
        let expected = expected.to_ascii_lowercase();
        if !bool::from(actual.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(SignatureError::Mismatch);
        }
    }
    Ok(Verified {
        idempotency_key: body_sha256_hex(body),
    })
}

pub(super) fn sign(key: &Secret, body: &[u8], url: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let (params, content_type) = if query_param(url, BODY_SHA256).is_some() {
        (Vec::new(), JSON)
    } else {
        (form_params(body), FORM_URLENCODED)
    };
    headers.insert(
        SIGNATURE,
        header_value(&STANDARD.encode(mac(key, url, &params))),
    );
    headers.insert(CONTENT_TYPE, header_value(content_type));
    headers
}

fn mac(key: &Secret, url: &str, params: &[(String, String)]) -> [u8; 20] {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + 2 * params.len());
    parts.push(url.as_bytes());
    for (name, value) in params {
        parts.push(name.as_bytes());
        parts.push(value.as_bytes());
    }
    hmac_sha1(key, &parts)
}

/// Form-decoded `name=value` pairs of a body, sorted by name, then value,
/// each distinct pair once.
fn form_params(body: &[u8]) -> Vec<(String, String)> {
    let mut params: Vec<_> = form_urlencoded::parse(body)
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    params.sort();
    params.dedup();
    params
}

/// Whether `url` carries the `bodySHA256` query parameter.
pub(super) fn has_body_sha256(url: &str) -> bool {
    query_param(url, BODY_SHA256).is_some()
}

/// The value of query parameter `name` in `url`, form-decoded.
fn query_param(url: &str, name: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    let query = query.split('#').next().unwrap_or_default();
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// `url` with its explicit port removed, or the scheme's default port added
/// when it has none; `None` for schemes other than http(s).
fn port_variant(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let (userinfo, host_port) = authority.split_at(host_start);
    // The port separator is the last ':' outside an IPv6 literal.
    let port_separator = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].find(':').map(|at| bracket + at),
        None => host_port.rfind(':'),
    };
    Some(match port_separator {
        Some(at) => format!("{scheme}://{userinfo}{}{tail}", &host_port[..at]),
        None => format!("{scheme}://{userinfo}{host_port}:{default_port}{tail}"),
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::Scheme;
    use super::super::test_support::*;
    use super::*;

    const TOKEN: &str = "12345";
    const DOC_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn form_request(signature: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-twilio-signature", HeaderValue::from_static(signature));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(FORM_URLENCODED));
        headers
    }

    /// The worked example of Twilio's webhook security page: auth token
    /// 12345, that URL, CallSid/Caller/Digits/From/To. The body is written
    /// out of order on purpose: the signature sorts the parameters.
    #[test]
    fn twilio_docs_example() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let body = b"To=%2B18005551212&CallSid=CA1234567890ABCDE&Digits=1234\
                     &From=%2B12349013030&Caller=%2B12349013030";
        let headers = form_request("0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        let verified = check(&verifier, &headers, body, DOC_URL, now()).unwrap();
        assert_eq!(verified.idempotency_key, body_sha256_hex(body));
        assert_eq!(verifier.sign(body, DOC_URL, "ignored", now()), headers);
    }

    const PY_BODY: &[u8] = b"CallSid=CA1234567890ABCDE&Digits=1234&From=%2B14158675309\
                             &To=%2B18005551212&Caller=%2B14158675309";

    /// tests/unit/test_request_validator.py of twilio/twilio-python.
    #[test]
    fn twilio_python_vectors() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let ok = |signature: &'static str, url: &str| {
            check(&verifier, &form_request(signature), PY_BODY, url, now())
        };
        // test_compute_signature / test_validation
        assert!(ok("RSOYDt4T1cUTdK1PDd93/VVr8B8=", DOC_URL).is_ok());
        // test_validation_removes_port_on_https
        assert!(
            ok(
                "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
                "https://mycompany.com:1234/myapp.php?foo=1&bar=2"
            )
            .is_ok()
        );
        // test_validation_removes_port_on_http
        assert!(
            ok(
                "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2"
            )
            .is_ok()
        );
        // test_validation_adds_port_on_https
        assert!(ok("kvajT1Ptam85bY51eRf/AJRuM3w=", DOC_URL).is_ok());
        // test_validation_adds_port_on_http
        assert!(
            ok(
                "0ZXoZLH/DfblKGATFgpif+LLRf4=",
                "http://mycompany.com/myapp.php?foo=1&bar=2"
            )
            .is_ok()
        );
        // Another path is another URL.
        assert_eq!(
            ok(
                "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
                "https://mycompany.com/other.php?foo=1&bar=2"
            ),
            Err(SignatureError::Mismatch)
        );
    }

    /// test_compute_signature_duplicate_multi_dict of twilio-python: a
    /// repeated name contributes each value, sorted.
    #[test]
    fn twilio_python_repeated_parameter_vector() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let body = b"Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234";
        let headers = form_request("IK+Dwps556ElfBT0I3Rgjkr1wJU=");
        assert!(check(&verifier, &headers, body, DOC_URL, now()).is_ok());
    }

    /// The helpers sign each distinct value of a name once
    /// (`sorted(set(values))`): a repeated identical pair counts once.
    #[test]
    fn an_identical_repeated_parameter_counts_once() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let once = b"CallSid=CA1&Digits=1234";
        let headers = verifier.sign(once, DOC_URL, "ignored", now());
        let twice = b"CallSid=CA1&Digits=1234&Digits=1234";
        assert!(check(&verifier, &headers, twice, DOC_URL, now()).is_ok());
    }

    /// test_validation_of_body_succeeds of twilio-python: a JSON body bound
    /// by bodySHA256.
    #[test]
    fn twilio_python_json_body_vector() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let body = br#"{"property": "value", "boolean": true}"#;
        let url = url_with_body_sha256(DOC_URL, body);
        assert_eq!(
            url,
            "https://mycompany.com/myapp.php?foo=1&bar=2\
             &bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-twilio-signature",
            HeaderValue::from_static("a9nBmqA0ju/hNViExpshrM61xv4="),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
        assert!(check(&verifier, &headers, body, &url, now()).is_ok());
        assert_eq!(verifier.sign(body, &url, "ignored", now()), headers);

        // Same URL and signature, another body: the hash no longer matches.
        let other = br#"{"property": "value", "boolean": false}"#;
        assert_eq!(
            check(&verifier, &headers, other, &url, now()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn common_behaviour_form() {
        let verified = super::super::test_support::common_behaviour(
            Scheme::Twilio,
            "auth-token-primary",
            "auth-token-secondary",
            b"MessageSid=SM1&MessageStatus=delivered&To=%2B15558675310",
            b"MessageSid=SM1&MessageStatus=failed&To=%2B15558675310",
            "https://hooks.example.com/webhooks/twilio?tenant=7",
        );
        assert_eq!(
            verified.idempotency_key,
            body_sha256_hex(b"MessageSid=SM1&MessageStatus=delivered&To=%2B15558675310")
        );
    }

    #[test]
    fn common_behaviour_json() {
        let body = br#"{"message_sid":"SM1","status":"delivered"}"#;
        super::super::test_support::common_behaviour(
            Scheme::Twilio,
            "auth-token-primary",
            "auth-token-secondary",
            body,
            br#"{"message_sid":"SM1","status":"failed"}"#,
            &url_with_body_sha256("https://hooks.example.com/webhooks/twilio", body),
        );
    }

    #[test]
    fn missing_signature_header() {
        missing_header(
            Scheme::Twilio,
            TOKEN,
            PY_BODY,
            DOC_URL,
            "X-Twilio-Signature",
        );
    }

    #[test]
    fn json_without_body_hash_is_refused() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let body = br#"{"a":1}"#;
        let mut headers = verifier.sign(b"", DOC_URL, "ignored", now());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
        let err = check(&verifier, &headers, body, DOC_URL, now()).unwrap_err();
        assert!(matches!(err, SignatureError::Malformed(_)));
        assert!(err.to_string().contains("bodySHA256"), "{err}");
    }

    #[test]
    fn empty_body_signs_the_url_alone() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let headers = verifier.sign(b"", DOC_URL, "ignored", now());
        assert!(check(&verifier, &headers, b"", DOC_URL, now()).is_ok());
        assert_eq!(
            check(
                &verifier,
                &headers,
                b"",
                "https://mycompany.com/myapp.php?foo=1&bar=3",
                now()
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn bad_signature_encoding_and_missing_url() {
        let verifier = verifier(Scheme::Twilio, &[TOKEN]);
        let err = check(&verifier, &form_request("%%%"), PY_BODY, DOC_URL, now()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "X-Twilio-Signature header must be a base64 HMAC-SHA1"
        );
        let err = check(
            &verifier,
            &form_request("RSOYDt4T1cUTdK1PDd93/VVr8B8="),
            PY_BODY,
            "",
            now(),
        )
        .unwrap_err();
        assert!(matches!(err, SignatureError::Malformed(_)));
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_params(b"b=2&&a=1&a=0&flag&c=a+b%2Bc%20d&d=caf%C3%A9"),
            vec![
                ("a".to_owned(), "0".to_owned()),
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), "2".to_owned()),
                ("c".to_owned(), "a b+c d".to_owned()),
                ("d".to_owned(), "caf\u{e9}".to_owned()),
                ("flag".to_owned(), String::new()),
            ]
        );
        // Case-sensitive ("Unix-style") order: upper case sorts first.
        let sorted = form_params(b"body=x&Body=y&To=z");
        let names: Vec<_> = sorted.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Body", "To", "body"]);
    }

    #[test]
    fn query_parameters() {
        assert_eq!(
            query_param("https://a.example/x?bodySHA256=ab&c=d#frag", BODY_SHA256).as_deref(),
            Some("ab")
        );
        assert_eq!(query_param("https://a.example/x?c=d", BODY_SHA256), None);
        assert_eq!(query_param("https://a.example/x", BODY_SHA256), None);
    }

    #[test]
    fn port_variants() {
        for (url, variant) in [
            (
                "https://example.com/a?b=1",
                Some("https://example.com:443/a?b=1"),
            ),
            ("http://example.com", Some("http://example.com:80")),
            (
                "https://user:pw@example.com:8443/a",
                Some("https://user:pw@example.com/a"),
            ),
            ("https://[::1]/a", Some("https://[::1]:443/a")),
            ("https://[::1]:9/a", Some("https://[::1]/a")),
            ("ftp://example.com/a", None),
            ("not a url", None),
        ] {
            assert_eq!(port_variant(url).as_deref(), variant, "{url}");
        }
    }

    #[test]
    fn body_sha256_url_building() {
        let hash = body_sha256_hex(b"{}");
        assert_eq!(
            url_with_body_sha256("https://a.example/x", b"{}"),
            format!("https://a.example/x?bodySHA256={hash}")
        );
        assert_eq!(
            url_with_body_sha256("https://a.example/x?", b"{}"),
            format!("https://a.example/x?bodySHA256={hash}")
        );
        assert_eq!(
            url_with_body_sha256("https://a.example/x?y=1#rc=2", b"{}"),
            format!("https://a.example/x?y=1&bodySHA256={hash}#rc=2")
        );
    }
}
