//! Webhook signature schemes: verify that an inbound webhook was sent by the
//! provider that claims to have sent it, before it is enqueued.
//!
//! One [`Verifier`] per webhook source holds a [`Scheme`], one or more
//! [`Secret`]s (any of them may match, so secrets can be rotated without
//! downtime) and, for schemes that sign a timestamp, a replay window
//! (five minutes by default, in both directions).
//!
//! | scheme | signature header | signed content | replay window | idempotency key |
//! |---|---|---|---|---|
//! | `hmac-sha256` | configurable, optional prefix, hex or base64 | body | — | SHA-256 of the body |
//! | `standard-webhooks` | `webhook-signature: v1,<base64> …` | `{id}.{timestamp}.{body}` | `webhook-timestamp` | `webhook-id` |
//! | `github` | `X-Hub-Signature-256: sha256=<hex>` | body | — | `X-GitHub-Delivery` |
//! | `stripe` | `Stripe-Signature: t=…,v1=<hex>` | `{t}.{body}` | `t` | event `id` in the body |
//! | `shopify` | `X-Shopify-Hmac-Sha256: <base64>` | body | — | `X-Shopify-Webhook-Id` |
//! | `meta` | `X-Hub-Signature-256: sha256=<hex>` | body | — | SHA-256 of the body |
//! | `twilio` | `X-Twilio-Signature: <base64 HMAC-SHA1>` | URL + sorted form params, or URL with `bodySHA256` | — | SHA-256 of the body |
//!
//! Where a scheme has no delivery id (or a request lacks it) the idempotency
//! key is the lower-case hex SHA-256 of the body.
//!
//! ```
//! use std::time::SystemTime;
//! use hermes_adapters::webhook::{Scheme, Secret, SignedRequest, Verifier};
//!
//! let verifier = Verifier::new(Scheme::GitHub, vec![Secret::from("It's a Secret to Everybody")])?;
//! let now = SystemTime::now();
//! let body = br#"{"zen":"Keep it logically awesome."}"#;
//! let headers = verifier.sign(body, "https://hooks.example.com/webhooks/github", "d1", now);
//!
//! let verified = verifier.verify(
//!     &SignedRequest { headers: &headers, body, url: "https://hooks.example.com/webhooks/github" },
//!     now,
//! )?;
//! assert_eq!(verified.idempotency_key, "d1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod common;
mod error;
mod github;
mod hmac_sha256;
mod meta;
mod secret;
mod shopify;
mod standard_webhooks;
mod stripe;
#[cfg(test)]
mod test_support;
mod twilio;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};

pub use common::{FORM_URLENCODED, body_sha256_hex};
pub use error::{ConfigError, SignatureError};
pub use meta::{SubscriptionError, subscription_challenge as meta_subscription_challenge};
pub use secret::{ENV_PREFIX, Secret};
pub use twilio::url_with_body_sha256 as twilio_url_with_body_sha256;

/// The replay window used unless [`Verifier::with_tolerance`] sets another:
/// five minutes, as Standard Webhooks and Stripe recommend.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// How the generic `hmac-sha256` scheme encodes the MAC in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// Hexadecimal (either case is accepted; signing writes lower case).
    #[default]
    Hex,
    /// Standard base64 with padding (RFC 4648 §4).
    Base64,
}

impl Encoding {
    /// The configuration name: `"hex"` or `"base64"`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Hex => "hex",
            Encoding::Base64 => "base64",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Encoding {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hex" => Ok(Encoding::Hex),
            "base64" => Ok(Encoding::Base64),
            _ => Err(ConfigError::UnknownEncoding(s.to_owned())),
        }
    }
}

/// A webhook signature scheme, each implemented as its provider documents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// Generic HMAC-SHA256 over the raw body, sent in `header` as
    /// `{prefix}{encoded MAC}`.
    HmacSha256 {
        /// The header carrying the signature.
        header: HeaderName,
        /// A literal the header value starts with, such as `"sha256="`.
        prefix: Option<String>,
        /// How the MAC is encoded after the prefix.
        encoding: Encoding,
    },
    /// [Standard Webhooks](https://www.standardwebhooks.com/) (also what Svix
    /// sends under the `webhook-` header names), symmetric `v1` signatures.
    /// Secrets are `whsec_<base64>` (or the bare base64 key).
    StandardWebhooks,
    /// GitHub: `X-Hub-Signature-256`, delivery id in `X-GitHub-Delivery`.
    GitHub,
    /// Stripe: `Stripe-Signature` with a signed timestamp.
    Stripe,
    /// Shopify: `X-Shopify-Hmac-Sha256`, delivery id in
    /// `X-Shopify-Webhook-Id`.
    Shopify,
    /// Meta (WhatsApp Cloud API, Messenger, Instagram): `X-Hub-Signature-256`
    /// keyed with the app secret.
    Meta,
    /// Twilio: `X-Twilio-Signature`, HMAC-SHA1 keyed with the auth token over
    /// the request URL (and form parameters). Needs
    /// [`SignedRequest::url`].
    Twilio,
}

impl Scheme {
    /// Header of the generic scheme when it is parsed from its bare name.
    pub const DEFAULT_HMAC_HEADER: &'static str = "x-signature";

    /// Every scheme name accepted by [`Scheme::from_str`].
    pub const NAMES: [&'static str; 7] = [
        "hmac-sha256",
        "standard-webhooks",
        "github",
        "stripe",
        "shopify",
        "meta",
        "twilio",
    ];

    /// The generic HMAC-SHA256 scheme, with its header name checked.
    pub fn hmac_sha256(
        header: &str,
        prefix: Option<&str>,
        encoding: Encoding,
    ) -> Result<Self, ConfigError> {
        let header = HeaderName::from_bytes(header.trim().as_bytes())
            .map_err(|_| ConfigError::InvalidHeaderName(header.to_owned()))?;
        Ok(Scheme::HmacSha256 {
            header,
            prefix: prefix.filter(|p| !p.is_empty()).map(str::to_owned),
            encoding,
        })
    }

    /// The configuration name of the scheme.
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::HmacSha256 { .. } => "hmac-sha256",
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::GitHub => "github",
            Scheme::Stripe => "stripe",
            Scheme::Shopify => "shopify",
            Scheme::Meta => "meta",
            Scheme::Twilio => "twilio",
        }
    }

    /// Whether the scheme signs a timestamp, and so has a replay window.
    pub fn has_timestamp(&self) -> bool {
        matches!(self, Scheme::StandardWebhooks | Scheme::Stripe)
    }

    /// Whether the scheme signs the request URL (Twilio), so that
    /// [`SignedRequest::url`] must be the URL the provider called; the others
    /// ignore it.
    pub fn signs_url(&self) -> bool {
        matches!(self, Scheme::Twilio)
    }

    /// Whether a request's body is a form (`application/x-www-form-urlencoded`),
    /// as this scheme reads it: the `Content-Type` says; without one, a
    /// Twilio webhook is a form post unless its `url` carries `bodySHA256`
    /// (Twilio's mark of a JSON body, which its signature then covers by
    /// hash); for the others the header must say so.
    pub fn body_is_form(&self, headers: &HeaderMap, url: &str) -> bool {
        common::is_form_urlencoded(headers)
            .unwrap_or_else(|| matches!(self, Scheme::Twilio) && !twilio::has_body_sha256(url))
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheme {
    type Err = ConfigError;

    /// Parses a configuration name (case-insensitive). `"hmac-sha256"` gives
    /// the generic scheme with header [`Scheme::DEFAULT_HMAC_HEADER`], no
    /// prefix and hex encoding; use [`Scheme::hmac_sha256`] to set those.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hmac-sha256" => Scheme::hmac_sha256(Scheme::DEFAULT_HMAC_HEADER, None, Encoding::Hex),
            "standard-webhooks" => Ok(Scheme::StandardWebhooks),
            "github" => Ok(Scheme::GitHub),
            "stripe" => Ok(Scheme::Stripe),
            "shopify" => Ok(Scheme::Shopify),
            "meta" => Ok(Scheme::Meta),
            "twilio" => Ok(Scheme::Twilio),
            _ => Err(ConfigError::UnknownScheme(s.to_owned())),
        }
    }
}

/// An inbound webhook request, as the HTTP layer received it.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The raw body, exactly as received (never re-serialized).
    pub body: &'a [u8],
    /// The full external URL the provider called, scheme through query
    /// string (Twilio signs it; other schemes ignore it).
    pub url: &'a str,
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Verified {
    /// Identifies the event across redeliveries: `webhook-id`,
    /// `X-GitHub-Delivery`, the Stripe event's `id`, `X-Shopify-Webhook-Id`,
    /// or else the lower-case hex SHA-256 of the body.
    pub idempotency_key: String,
}

/// Verifies (and, for demos and tests, produces) the signatures of one
/// webhook source.
///
/// Its `Debug` output shows the scheme and tolerance but never a secret.
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: Scheme,
    /// Keys as the scheme uses them (Standard Webhooks secrets decoded).
    keys: Vec<Secret>,
    tolerance: Duration,
}

impl Verifier {
    /// A verifier for `scheme` accepting a signature made with any of
    /// `secrets`; [`Verifier::sign`] uses the first.
    ///
    /// Fails without secrets, with an empty or blank secret, or (Standard Webhooks)
    /// with a secret that is neither `whsec_<base64>` nor base64.
    pub fn new(scheme: Scheme, secrets: Vec<Secret>) -> Result<Self, ConfigError> {
        if secrets.is_empty() {
            return Err(ConfigError::NoSecrets);
        }
        let keys = secrets
            .into_iter()
            .enumerate()
            .map(|(index, secret)| {
                let position = index + 1;
                if secret.is_blank() {
                    return Err(ConfigError::EmptySecret { position });
                }
                match scheme {
                    Scheme::StandardWebhooks => {
                        standard_webhooks::decode_secret(&secret).map_err(|reason| {
                            ConfigError::InvalidStandardWebhooksSecret { position, reason }
                        })
                    }
                    _ => Ok(secret),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            scheme,
            keys,
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// Sets the replay window: how far a signed timestamp may lie from `now`,
    /// in either direction (whole seconds). Only schemes with a timestamp use
    /// it.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The scheme.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The replay window.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// Checks the request's signature against every configured secret (in
    /// constant time) and, for schemes with a timestamp, that the timestamp
    /// lies within the replay window around `now`. The signature is checked
    /// first, so [`SignatureError::Stale`] is only reported for genuinely
    /// signed requests.
    pub fn verify(
        &self,
        request: &SignedRequest<'_>,
        now: SystemTime,
    ) -> Result<Verified, SignatureError> {
        let keys = &self.keys;
        match &self.scheme {
            Scheme::HmacSha256 {
                header,
                prefix,
                encoding,
            } => hmac_sha256::verify(keys, header, prefix.as_deref(), *encoding, request),
            Scheme::StandardWebhooks => {
                standard_webhooks::verify(keys, request, now, self.tolerance)
            }
            Scheme::GitHub => github::verify(keys, request),
            Scheme::Stripe => stripe::verify(keys, request, now, self.tolerance),
            Scheme::Shopify => shopify::verify(keys, request),
            Scheme::Meta => meta::verify(keys, request),
            Scheme::Twilio => twilio::verify(keys, request),
        }
    }

    /// The headers a provider would send for `body`, signed with the first
    /// secret at time `now`: for the demo, the load generator and tests.
    ///
    /// `id` becomes the delivery id where the scheme has one (`webhook-id`,
    /// `X-GitHub-Delivery`, `X-Shopify-Webhook-Id`; characters outside
    /// visible ASCII are replaced by `_`). `url` matters for Twilio only: a
    /// URL carrying `bodySHA256` (see [`twilio_url_with_body_sha256`]) signs a
    /// JSON body, any other URL signs `body` as form parameters; the matching
    /// `Content-Type` is included.
    pub fn sign(&self, body: &[u8], url: &str, id: &str, now: SystemTime) -> HeaderMap {
        let key = &self.keys[0];
        match &self.scheme {
            Scheme::HmacSha256 {
                header,
                prefix,
                encoding,
            } => hmac_sha256::sign(key, header, prefix.as_deref(), *encoding, body),
            Scheme::StandardWebhooks => standard_webhooks::sign(key, body, id, now),
            Scheme::GitHub => github::sign(key, body, id),
            Scheme::Stripe => stripe::sign(key, body, now),
            Scheme::Shopify => shopify::sign(key, body, id),
            Scheme::Meta => meta::sign(key, body),
            Scheme::Twilio => twilio::sign(key, body, url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_names_round_trip() {
        for name in Scheme::NAMES {
            let scheme: Scheme = name.parse().unwrap();
            assert_eq!(scheme.name(), name);
            assert_eq!(scheme.to_string(), name);
        }
        assert_eq!("GitHub".parse::<Scheme>(), Ok(Scheme::GitHub));
        assert_eq!(" stripe ".parse::<Scheme>(), Ok(Scheme::Stripe));
    }

    #[test]
    fn bare_hmac_sha256_has_documented_defaults() {
        assert_eq!(
            "hmac-sha256".parse::<Scheme>(),
            Ok(Scheme::HmacSha256 {
                header: HeaderName::from_static("x-signature"),
                prefix: None,
                encoding: Encoding::Hex,
            })
        );
    }

    #[test]
    fn unknown_scheme_lists_the_known_ones() {
        let err = "paypal".parse::<Scheme>().unwrap_err();
        assert_eq!(err, ConfigError::UnknownScheme("paypal".into()));
        for name in Scheme::NAMES {
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn encodings_parse() {
        assert_eq!("hex".parse::<Encoding>(), Ok(Encoding::Hex));
        assert_eq!("Base64".parse::<Encoding>(), Ok(Encoding::Base64));
        assert_eq!(
            "base32".parse::<Encoding>(),
            Err(ConfigError::UnknownEncoding("base32".into()))
        );
    }

    #[test]
    fn invalid_header_name_is_a_config_error() {
        assert_eq!(
            Scheme::hmac_sha256("bad header", None, Encoding::Hex),
            Err(ConfigError::InvalidHeaderName("bad header".into()))
        );
        let scheme = Scheme::hmac_sha256("X-Acme-Signature", Some(""), Encoding::Hex).unwrap();
        assert_eq!(
            scheme,
            Scheme::HmacSha256 {
                header: HeaderName::from_static("x-acme-signature"),
                prefix: None,
                encoding: Encoding::Hex,
            }
        );
    }

    #[test]
    fn verifier_needs_secrets() {
        assert_eq!(
            Verifier::new(Scheme::GitHub, vec![]).unwrap_err(),
            ConfigError::NoSecrets
        );
        assert_eq!(
            Verifier::new(Scheme::GitHub, vec![Secret::from("a"), Secret::from("")]).unwrap_err(),
            ConfigError::EmptySecret { position: 2 }
        );
        assert_eq!(
            Verifier::new(Scheme::GitHub, vec![Secret::from(" \t\n")]).unwrap_err(),
            ConfigError::EmptySecret { position: 1 }
        );
    }

    #[test]
    fn verifier_debug_hides_secrets() {
        let verifier =
            Verifier::new(Scheme::Stripe, vec![Secret::from("whsec_topsecret")]).unwrap();
        let debug = format!("{verifier:?}");
        assert!(!debug.contains("topsecret"), "{debug}");
        assert!(debug.contains("Stripe"), "{debug}");
    }

    #[test]
    fn default_tolerance_is_five_minutes() {
        let verifier = Verifier::new(Scheme::Stripe, vec![Secret::from("whsec_x")]).unwrap();
        assert_eq!(verifier.tolerance(), Duration::from_secs(300));
        let verifier = verifier.with_tolerance(Duration::from_secs(60));
        assert_eq!(verifier.tolerance(), Duration::from_secs(60));
        assert!(verifier.scheme().has_timestamp());
        assert!(!Scheme::GitHub.has_timestamp());
    }
}
