//! Test helpers shared by the scheme tests: the checks every scheme must
//! pass.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

use super::common::body_sha256_hex;
use super::{Scheme, Secret, SignatureError, SignedRequest, Verified, Verifier};

/// A fixed "now" for the tests: 2023-11-14T22:13:20Z.
pub(super) const NOW_SECS: u64 = 1_700_000_000;

/// [`NOW_SECS`] as a `SystemTime`.
pub(super) fn now() -> SystemTime {
    at(NOW_SECS)
}

/// The time `secs` after the Unix epoch.
pub(super) fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A verifier for `scheme` with literal secrets.
pub(super) fn verifier(scheme: Scheme, secrets: &[&str]) -> Verifier {
    Verifier::new(scheme, secrets.iter().map(|s| Secret::from(*s)).collect())
        .expect("test verifier")
}

/// The secret of the test values GitHub publishes in "Validating webhook
/// deliveries"; Meta signs with the same algorithm, so they check it too.
pub(super) const HUB_VECTOR_SECRET: &str = "It's a Secret to Everybody";
/// The payload of GitHub's published test values.
pub(super) const HUB_VECTOR_BODY: &[u8] = b"Hello, World!";

/// The `X-Hub-Signature-256` header of GitHub's published test values.
pub(super) fn hub_vector_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-hub-signature-256",
        HeaderValue::from_static(
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ),
    );
    headers
}

/// Verifies `body` with `headers` at `url` and time `when`.
pub(super) fn check(
    verifier: &Verifier,
    headers: &HeaderMap,
    body: &[u8],
    url: &str,
    when: SystemTime,
) -> Result<Verified, SignatureError> {
    verifier.verify(&SignedRequest { headers, body, url }, when)
}

/// What every scheme must do, given two distinct secrets, a body and a
/// tampered copy of it:
/// sign → verify round trip, wrong secret → Mismatch, tampered body →
/// Mismatch, rotation (the second configured secret matches), and no secret
/// in any error message or `Debug` output.
pub(super) fn common_behaviour(
    scheme: Scheme,
    secret: &str,
    other_secret: &str,
    body: &[u8],
    tampered: &[u8],
    url: &str,
) -> Verified {
    let signer = verifier(scheme.clone(), &[secret]);
    let headers = signer.sign(body, url, "evt_123", now());

    let verified = check(&signer, &headers, body, url, now())
        .unwrap_or_else(|e| panic!("{scheme}: round trip failed: {e}"));

    let wrong = verifier(scheme.clone(), &[other_secret]);
    let err = check(&wrong, &headers, body, url, now()).unwrap_err();
    assert_eq!(err, SignatureError::Mismatch, "{scheme}: wrong secret");
    assert_no_secret(&err.to_string(), &[secret, other_secret]);

    let err = check(&signer, &headers, tampered, url, now()).unwrap_err();
    assert_eq!(err, SignatureError::Mismatch, "{scheme}: tampered body");

    let rotated = verifier(scheme.clone(), &[other_secret, secret]);
    let rotated_verified = check(&rotated, &headers, body, url, now())
        .unwrap_or_else(|e| panic!("{scheme}: second secret should match: {e}"));
    assert_eq!(rotated_verified, verified);

    assert_no_secret(&format!("{rotated:?}"), &[secret, other_secret]);
    verified
}

/// Removes `header` from freshly signed headers and expects
/// `SignatureError::Missing(header)`.
pub(super) fn missing_header(scheme: Scheme, secret: &str, body: &[u8], url: &str, header: &str) {
    let signer = verifier(scheme.clone(), &[secret]);
    let mut headers = signer.sign(body, url, "evt_123", now());
    assert!(
        headers.remove(header).is_some(),
        "{scheme}: sign() did not set {header}"
    );
    let err = check(&signer, &headers, body, url, now()).unwrap_err();
    assert!(
        matches!(&err, SignatureError::Missing(name) if name.eq_ignore_ascii_case(header)),
        "{scheme}: expected Missing({header}), got {err:?}"
    );
    assert!(
        err.to_string()
            .to_ascii_lowercase()
            .contains(&header.to_ascii_lowercase()),
        "{err}"
    );
}

/// Removes the delivery-id `header` from freshly signed headers and expects
/// the body's SHA-256 as the idempotency key.
pub(super) fn body_hash_without_delivery_id(
    scheme: Scheme,
    secret: &str,
    body: &[u8],
    url: &str,
    header: &str,
) {
    let signer = verifier(scheme, &[secret]);
    let mut headers = signer.sign(body, url, "d1", now());
    headers.remove(header);
    assert_eq!(
        check(&signer, &headers, body, url, now())
            .unwrap()
            .idempotency_key,
        body_sha256_hex(body)
    );
}

/// Signs at `NOW ± (tolerance + 1 s)` and expects `Stale` on both sides, and
/// success exactly at the edges of the window.
pub(super) fn stale_both_sides(scheme: Scheme, secret: &str, body: &[u8], url: &str) {
    let signer = verifier(scheme.clone(), &[secret]);
    let tolerance = signer.tolerance().as_secs();
    assert_eq!(tolerance, 300);

    let old = signer.sign(body, url, "evt_old", at(NOW_SECS - tolerance - 1));
    assert_eq!(
        check(&signer, &old, body, url, now()),
        Err(SignatureError::Stale {
            age_secs: 301,
            tolerance_secs: 300
        }),
        "{scheme}: too old"
    );
    let future = signer.sign(body, url, "evt_future", at(NOW_SECS + tolerance + 1));
    assert_eq!(
        check(&signer, &future, body, url, now()),
        Err(SignatureError::Stale {
            age_secs: -301,
            tolerance_secs: 300
        }),
        "{scheme}: too far in the future"
    );
    for edge in [NOW_SECS - tolerance, NOW_SECS + tolerance] {
        let headers = signer.sign(body, url, "evt_edge", at(edge));
        assert!(
            check(&signer, &headers, body, url, now()).is_ok(),
            "{scheme}: {edge} is inside the window"
        );
    }
}

/// Panics if `text` contains any of `secrets`.
pub(super) fn assert_no_secret(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "secret leaked into {text:?}");
    }
}
