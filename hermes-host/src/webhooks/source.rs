//! The webhook sources of the configuration, ready to verify requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hermes_adapters::webhook::{
    Encoding, Scheme, Secret, SignatureError, SignedRequest, Verified, Verifier,
};
use http::HeaderMap;

use crate::config::{
    ConfigError, DAY_SECS, Normalize, SourceConfig, WebhooksConfig, is_http_url, redact_url,
};

/// One configured webhook source: its route name, verifier and rules.
#[derive(Debug)]
pub struct Source {
    name: Arc<str>,
    provider: Arc<str>,
    normalize: Normalize,
    max_body_bytes: usize,
    url: Option<String>,
    verifier: Verifier,
    verify_token: Option<Secret>,
}

/// The longest source name: it is stored with every event, part of its
/// unique key.
const MAX_NAME_BYTES: usize = 64;

/// The largest `max_body_bytes`: 64 MiB, far above any provider's webhooks.
const MAX_BODY_BYTES: usize = 64 << 20;

impl Source {
    /// Builds a source from its configuration, resolving `env:NAME` secrets.
    pub fn from_config(
        config: &SourceConfig,
        public_url: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError::Source {
            source_name: config.name.clone(),
            message,
        };
        let name = config.name.trim();
        if name.is_empty()
            || name.len() > MAX_NAME_BYTES
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(error(format!(
                "the name must be 1 to {MAX_NAME_BYTES} ASCII letters, digits, '-' or '_' (it is a URL path segment)"
            )));
        }
        let scheme = parse_scheme(config).map_err(&error)?;
        if config.secrets.is_empty() {
            return Err(error(
                "no secrets: set secrets = [\"env:NAME\"] (or a literal)".into(),
            ));
        }
        let secrets = config
            .secrets
            .iter()
            .map(|setting| Secret::from_config(&setting.0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(e.to_string()))?;
        let mut verifier = Verifier::new(scheme, secrets).map_err(|e| error(e.to_string()))?;
        if let Some(tolerance) = config.tolerance_secs {
            if !verifier.scheme().has_timestamp() {
                return Err(error(format!(
                    "`tolerance_secs` applies to schemes that sign a timestamp; scheme {:?} signs none",
                    verifier.scheme().name()
                )));
            }
            // 0 would refuse nearly every delivery; over a day is no protection.
            if !(1..=DAY_SECS).contains(&tolerance) {
                return Err(error(format!(
                    "tolerance_secs must be between 1 and {DAY_SECS}"
                )));
            }
            verifier = verifier.with_tolerance(Duration::from_secs(tolerance));
        }
        if !(1..=MAX_BODY_BYTES).contains(&config.max_body_bytes) {
            return Err(error(format!(
                "max_body_bytes must be between 1 and {MAX_BODY_BYTES}"
            )));
        }
        if let Some(url) = &config.url {
            if !verifier.scheme().signs_url() {
                return Err(error(format!(
                    "`url` applies to schemes that sign the request URL (twilio); scheme {:?} does not",
                    verifier.scheme().name()
                )));
            }
            if !is_http_url(url) {
                return Err(error(format!(
                    "url {:?} must start with http:// or https://",
                    redact_url(url)
                )));
            }
        }
        let verify_token = match &config.verify_token {
            None => None,
            Some(_) if !matches!(verifier.scheme(), Scheme::Meta) => {
                return Err(error(format!(
                    "`verify_token` applies to scheme \"meta\" (its subscription handshake); scheme {:?} has none",
                    verifier.scheme().name()
                )));
            }
            Some(setting) => {
                let token = Secret::from_config(&setting.0).map_err(|e| error(e.to_string()))?;
                if token.is_blank() {
                    return Err(error("verify_token is empty or only whitespace".into()));
                }
                Some(token)
            }
        };
        let url = config.url.clone().or_else(|| {
            public_url.map(|base| format!("{}/webhooks/{name}", base.trim_end_matches('/')))
        });
        let provider = config
            .provider
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .unwrap_or(name);
        Ok(Self {
            name: name.into(),
            provider: provider.into(),
            normalize: config.normalize,
            max_body_bytes: config.max_body_bytes,
            url,
            verifier,
            verify_token,
        })
    }

    /// The route name: `/webhooks/{name}`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as a shared string (stored with each event).
    pub fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The provider stored with normalized messages.
    pub fn provider(&self) -> &Arc<str> {
        &self.provider
    }

    /// What payloads are normalized into.
    pub fn normalize(&self) -> Normalize {
        self.normalize
    }

    /// The largest accepted body.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The external URL of the source, when configured.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// The verifier, which can also sign (for the demo, benches and tests).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The verify token of Meta's subscription handshake, when configured.
    pub fn verify_token(&self) -> Option<&Secret> {
        self.verify_token.as_ref()
    }

    /// Verifies a request's signature at time `now`.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        url: &str,
        now: SystemTime,
    ) -> Result<Verified, SignatureError> {
        self.verifier
            .verify(&SignedRequest { headers, body, url }, now)
    }
}

fn parse_scheme(config: &SourceConfig) -> Result<Scheme, String> {
    let name = config.scheme.trim().to_ascii_lowercase();
    if name == "hmac-sha256" {
        let encoding = match &config.encoding {
            Some(encoding) => encoding.parse::<Encoding>().map_err(|e| e.to_string())?,
            None => Encoding::Hex,
        };
        let header = config
            .header
            .as_deref()
            .unwrap_or(Scheme::DEFAULT_HMAC_HEADER);
        return Scheme::hmac_sha256(header, config.prefix.as_deref(), encoding)
            .map_err(|e| e.to_string());
    }
    let scheme: Scheme = name
        .parse()
        .map_err(|e: hermes_adapters::webhook::ConfigError| e.to_string())?;
    for (option, set) in [
        ("header", config.header.is_some()),
        ("prefix", config.prefix.is_some()),
        ("encoding", config.encoding.is_some()),
    ] {
        if set {
            return Err(format!(
                "`{option}` applies to scheme \"hmac-sha256\" only; scheme {:?} defines its own",
                scheme.name()
            ));
        }
    }
    Ok(scheme)
}

/// The configured sources by name.
#[derive(Debug, Default)]
pub struct SourceRegistry {
    sources: HashMap<String, Arc<Source>>,
}

impl SourceRegistry {
    /// Builds every source of `config`, failing on the first bad one or on
    /// two sources with one name.
    pub fn from_config(
        config: &WebhooksConfig,
        public_url: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let mut sources = HashMap::new();
        for source_config in &config.sources {
            let source = Source::from_config(source_config, public_url)?;
            let name = source.name().to_owned();
            if sources.insert(name.clone(), Arc::new(source)).is_some() {
                return Err(ConfigError::Source {
                    source_name: name,
                    message: "two sources have this name".into(),
                });
            }
        }
        Ok(Self { sources })
    }

    /// The source named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.get(name)
    }

    /// The source names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.sources.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verify_token_is_for_meta_sources_only() {
        let mut config = SourceConfig::new("wa", "meta", &["app-secret"]);
        config.verify_token = Some("token".into());
        let source = Source::from_config(&config, None).expect("a meta source takes one");
        assert!(source.verify_token().is_some());
        config.verify_token = Some("".into());
        let error = Source::from_config(&config, None).unwrap_err();
        assert!(
            error.to_string().contains("verify_token is empty"),
            "{error}"
        );
        let mut config = SourceConfig::new("gh", "github", &["secret"]);
        config.verify_token = Some("token".into());
        let error = Source::from_config(&config, None).unwrap_err();
        assert!(
            error.to_string().contains("applies to scheme \"meta\""),
            "{error}"
        );
    }

    #[test]
    fn builds_and_verifies() {
        let mut config = SourceConfig::new("sms", "hmac-sha256", &["s3cret"]);
        config.header = Some("x-provider-signature-256".into());
        config.prefix = Some("sha256=".into());
        let source = Source::from_config(&config, None).unwrap();
        let now = SystemTime::now();
        let headers = source.verifier().sign(b"{}", "", "id", now);
        assert!(headers.contains_key("x-provider-signature-256"));
        assert!(source.verify(&headers, b"{}", "", now).is_ok());
        assert!(source.verify(&headers, b"{ }", "", now).is_err());
        assert_eq!(&**source.provider(), "sms");
    }

    #[test]
    fn bad_names_and_duplicates_are_rejected() {
        let config = SourceConfig::new("a/b", "github", &["s"]);
        assert!(Source::from_config(&config, None).is_err());
        let webhooks = WebhooksConfig {
            sources: vec![
                SourceConfig::new("gh", "github", &["s"]),
                SourceConfig::new("gh", "github", &["t"]),
            ],
            ..WebhooksConfig::default()
        };
        let error = SourceRegistry::from_config(&webhooks, None).unwrap_err();
        assert!(error.to_string().contains("two sources"), "{error}");
    }

    #[test]
    fn a_replay_window_needs_a_signed_timestamp() {
        let mut config = SourceConfig::new("gh", "github", &["s"]);
        config.tolerance_secs = Some(60);
        let error = Source::from_config(&config, None).unwrap_err();
        assert!(error.to_string().contains("tolerance_secs"), "{error}");
        let mut config = SourceConfig::new("st", "stripe", &["whsec_s"]);
        config.tolerance_secs = Some(60);
        assert!(Source::from_config(&config, None).is_ok());
    }

    #[test]
    fn nonsense_settings_are_rejected_naming_the_key() {
        let refused = |edit: fn(&mut SourceConfig), scheme: &str, key: &str| {
            let mut config = SourceConfig::new("src", scheme, &["s"]);
            edit(&mut config);
            let error = Source::from_config(&config, None).unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        };
        refused(|c| c.tolerance_secs = Some(0), "stripe", "tolerance_secs");
        refused(|c| c.max_body_bytes = 0, "github", "max_body_bytes");
        refused(
            |c| c.max_body_bytes = usize::MAX,
            "github",
            "max_body_bytes",
        );
        refused(
            |c| c.url = Some("https://h.example/x".into()),
            "github",
            "url",
        );
        refused(|c| c.url = Some("h.example/x".into()), "twilio", "http://");
        refused(|c| c.name = "n".repeat(65), "github", "name");
        let mut config = SourceConfig::new("tw", "twilio", &["s"]);
        config.url = Some("https://h.example/x?tenant=1".into());
        assert!(Source::from_config(&config, None).is_ok());
    }

    #[test]
    fn public_url_gives_the_source_url() {
        let config = SourceConfig::new("tw", "twilio", &["token"]);
        let source = Source::from_config(&config, Some("https://hooks.example.com/")).unwrap();
        assert_eq!(source.url(), Some("https://hooks.example.com/webhooks/tw"));
    }
}
