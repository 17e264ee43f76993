//! [`Secret`]: signing-key bytes that never reach a log.

use std::ffi::OsString;
use std::fmt;

use super::ConfigError;

/// The prefix that makes a configured secret a reference to an environment
/// variable instead of a literal: `env:WEBHOOK_SECRET`.
pub const ENV_PREFIX: &str = "env:";

/// The bytes of a webhook signing secret.
///
/// Its `Debug` output is `Secret(***)` whatever it holds, and it has no
/// `Display`, so a secret cannot end up in a log line or an error message by
/// accident. It deliberately has no `PartialEq` either: comparing secrets or
/// signatures must go through a constant-time comparison.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Wraps secret bytes taken as they are.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into().into_boxed_slice())
    }

    /// Reads a secret from a configuration value: `"env:NAME"` takes the
    /// value of the environment variable `NAME`, anything else is the secret
    /// itself.
    ///
    /// A missing variable is a [`ConfigError::MissingEnvVar`] that names it.
    /// Emptiness is checked later, by [`Verifier::new`](super::Verifier::new),
    /// which knows the secret's position in the list.
    pub fn from_config(value: &str) -> Result<Self, ConfigError> {
        Self::from_config_with(value, |name| std::env::var_os(name))
    }

    /// Like [`Secret::from_config`], resolving `env:NAME` with `lookup`
    /// instead of the process environment (for tests, or a secrets store).
    pub fn from_config_with(
        value: &str,
        lookup: impl FnOnce(&str) -> Option<OsString>,
    ) -> Result<Self, ConfigError> {
        let Some(name) = value.strip_prefix(ENV_PREFIX) else {
            return Ok(Self::new(value));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(ConfigError::EmptyEnvVarName);
        }
        let resolved = lookup(name).ok_or_else(|| ConfigError::MissingEnvVar {
            name: name.to_owned(),
        })?;
        let resolved = resolved
            .into_string()
            .map_err(|_| ConfigError::EnvVarNotUnicode {
                name: name.to_owned(),
            })?;
        Ok(Self::new(resolved))
    }

    /// The secret bytes. Crate-private: only signing code may see them.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Whether the secret has no bytes but ASCII whitespace, if any: a
    /// variable set to spaces by mistake, say.
    pub fn is_blank(&self) -> bool {
        self.0.iter().all(u8::is_ascii_whitespace)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<Vec<u8>> for Secret {
    fn from(value: Vec<u8>) -> Self {
        Self::new(value)
    }
}

impl From<&[u8]> for Secret {
    fn from(value: &[u8]) -> Self {
        Self::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value() {
        let secret = Secret::from("hunter2-very-secret");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(format!("{secret:#?}"), "Secret(***)");
        assert!(!format!("{:?}", vec![secret.clone()]).contains("hunter2"));
        assert!(!format!("{:?}", Some(secret)).contains("hunter2"));
    }

    #[test]
    fn literal_is_taken_as_is() {
        let secret = Secret::from_config("s3cr3t").unwrap();
        assert_eq!(secret.expose(), b"s3cr3t");
    }

    #[test]
    fn env_reference_is_resolved() {
        let secret = Secret::from_config_with("env:HOOK_SECRET", |name| {
            assert_eq!(name, "HOOK_SECRET");
            Some("from-env".into())
        })
        .unwrap();
        assert_eq!(secret.expose(), b"from-env");
    }

    #[test]
    fn env_reference_uses_the_process_environment() {
        // PATH is set in every environment cargo test runs in.
        let secret = Secret::from_config("env:PATH").unwrap();
        assert!(!secret.is_blank());
    }

    #[test]
    fn missing_env_var_names_the_variable() {
        let err = Secret::from_config("env:HERMES_SURELY_UNSET_7F3A91").unwrap_err();
        assert!(
            matches!(&err, ConfigError::MissingEnvVar { name } if name == "HERMES_SURELY_UNSET_7F3A91")
        );
        assert!(
            err.to_string().contains("HERMES_SURELY_UNSET_7F3A91"),
            "{err}"
        );
    }

    #[test]
    fn env_without_a_name_is_an_error() {
        let err = Secret::from_config_with("env:  ", |_| None).unwrap_err();
        assert!(matches!(err, ConfigError::EmptyEnvVarName));
    }
}
