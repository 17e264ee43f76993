//! Errors of webhook configuration and verification.

use std::borrow::Cow;

/// A webhook source is misconfigured. Raised when the host builds its
/// verifiers at startup, never per request. Messages name what is wrong
/// (a scheme, an encoding, an environment variable, a secret's position in the
/// list) but never a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The scheme name is not one this crate implements.
    #[error(
        "unknown webhook signature scheme {0:?}; expected one of: {known}",
        known = super::Scheme::NAMES.join(", ")
    )]
    UnknownScheme(String),
    /// The encoding name of the generic `hmac-sha256` scheme is unknown.
    #[error("unknown signature encoding {0:?}; expected \"hex\" or \"base64\"")]
    UnknownEncoding(String),
    /// The signature header name of the generic `hmac-sha256` scheme is not a
    /// valid HTTP header name.
    #[error("{0:?} is not a valid HTTP header name")]
    InvalidHeaderName(String),
    /// `env:NAME` names a variable that is not set.
    #[error("environment variable {name} (referenced as \"env:{name}\") is not set")]
    MissingEnvVar {
        /// The variable's name.
        name: String,
    },
    /// `env:NAME` names a variable whose value is not UTF-8.
    #[error("environment variable {name} (referenced as \"env:{name}\") is not valid UTF-8")]
    EnvVarNotUnicode {
        /// The variable's name.
        name: String,
    },
    /// `env:` without a variable name.
    #[error("\"env:\" must be followed by the name of an environment variable")]
    EmptyEnvVarName,
    /// No secret was configured.
    #[error("a webhook source needs at least one secret")]
    NoSecrets,
    /// A configured secret is empty or only whitespace (a literal, or the
    /// variable it names).
    #[error("webhook secret #{position} is empty or only whitespace")]
    EmptySecret {
        /// 1-based position of the secret in the configured list.
        position: usize,
    },
    /// A Standard Webhooks secret is not `whsec_` followed by base64.
    #[error(
        "webhook secret #{position} is not a Standard Webhooks secret (\"whsec_\" followed by base64): {reason}"
    )]
    InvalidStandardWebhooksSecret {
        /// 1-based position of the secret in the configured list.
        position: usize,
        /// What is wrong with it (never its value).
        reason: &'static str,
    },
}

/// Why a webhook request failed verification.
///
/// The `Display` text says exactly what was wrong and is meant for the body
/// of the HTTP 401 answer: it never contains a secret or an expected
/// signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A header the scheme requires is absent or empty. Holds the header name.
    #[error("missing {0} header")]
    Missing(Cow<'static, str>),
    /// A header is present but not in the form the scheme defines.
    #[error("{0}")]
    Malformed(String),
    /// The signature is well formed but matches no configured secret: the
    /// request was signed with another secret, or its body (or a signed
    /// header) was altered on the way.
    #[error(
        "signature mismatch: no configured secret produces this signature for this request body"
    )]
    Mismatch,
    /// The signature is valid but its timestamp lies outside the replay
    /// window.
    #[error("{}", stale_message(.age_secs, .tolerance_secs))]
    Stale {
        /// How old the signed timestamp is, in seconds; negative when it lies
        /// in the future.
        age_secs: i64,
        /// The accepted difference, in seconds, in either direction.
        tolerance_secs: u64,
    },
}

fn stale_message(age_secs: &i64, tolerance_secs: &u64) -> String {
    if *age_secs >= 0 {
        format!(
            "stale signature: its timestamp is {age_secs} s old, more than the {tolerance_secs} s replay window allows"
        )
    } else {
        format!(
            "stale signature: its timestamp is {} s in the future, more than the {tolerance_secs} s replay window allows",
            age_secs.unsigned_abs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_says_which_side() {
        let old = SignatureError::Stale {
            age_secs: 301,
            tolerance_secs: 300,
        };
        assert_eq!(
            old.to_string(),
            "stale signature: its timestamp is 301 s old, more than the 300 s replay window allows"
        );
        let future = SignatureError::Stale {
            age_secs: -400,
            tolerance_secs: 300,
        };
        assert!(
            future.to_string().contains("400 s in the future"),
            "{future}"
        );
    }

    #[test]
    fn missing_names_the_header() {
        let err = SignatureError::Missing("webhook-id".into());
        assert_eq!(err.to_string(), "missing webhook-id header");
    }
}
