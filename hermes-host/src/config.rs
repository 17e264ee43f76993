//! The host's configuration: a TOML file, environment overrides, defaults.
//!
//! ```toml
//! [http]
//! listen = "127.0.0.1:8080"          # env HERMES_LISTEN
//!
//! [database]
//! # url = "postgres://..."           # env DATABASE_URL; unset: a private cluster in local_dir
//! local_dir = ".hermes/pg"
//!
//! [webhooks]
//! ingest_capacity = 512
//! batch_size = 200
//! batch_timeout_ms = 10
//!
//! [[webhooks.sources]]
//! name = "sms"                         # the route: /webhooks/sms
//! scheme = "hmac-sha256"               # or standard-webhooks, github, stripe, shopify, meta, twilio
//! header = "x-provider-signature-256"  # hmac-sha256 only
//! prefix = "sha256="                   # hmac-sha256 only, optional
//! encoding = "hex"                     # hmac-sha256 only: hex or base64
//! secrets = ["env:SMS_SECRET"]         # literal or env:NAME; several for rotation
//! normalize = "sms"                    # sms, email or none
//! max_body_bytes = 262144
//! ```
//!
//! [`Config::load`] reads the file and applies the environment;
//! [`Config::validate`] checks everything that can be checked without a
//! database (schemes, secrets and the environment variables they name,
//! pipeline sizes), so a bad configuration fails at startup with a message
//! that says what to fix.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hermes_adapters::postgres::RetryPolicy;
use serde::Deserialize;

use crate::webhooks::SourceRegistry;

/// Environment variable overriding `[http] listen`.
pub const LISTEN_ENV: &str = "HERMES_LISTEN";

/// Environment variable overriding `[database] url`.
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";

/// The configuration file `hermes serve` reads when `--config` is not given
/// and the file exists in the current directory.
pub const DEFAULT_CONFIG_FILE: &str = "hermes.toml";

/// A configuration that cannot be used; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is not valid TOML, or has unknown or mistyped keys.
    #[error("invalid configuration{}: {message}", in_file(.path))]
    Parse {
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// The TOML parser's message (with line and column).
        message: String,
    },
    /// An environment override has an invalid value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// A webhook source is misconfigured.
    #[error("webhook source {source_name:?}: {message}")]
    Source {
        /// The source's `name`.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// Another setting is out of range.
    #[error("invalid configuration{}: {message}", in_file(.path))]
    Invalid {
        /// The file the settings came from, if any.
        path: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
}

/// Whether `url` names Postgres: else why not (its password redacted).
fn check_database_url(url: &str) -> Result<(), String> {
    if ["postgres://", "postgresql://"]
        .iter()
        .any(|scheme| url.trim_start().starts_with(scheme))
    {
        return Ok(());
    }
    Err(format!(
        "{:?} must start with postgres:// or postgresql://",
        redact_url(url)
    ))
}

fn in_file(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!(" in {}", path.display()),
        None => String::new(),
    }
}

/// The whole configuration. Every section and key has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[http]`: the listener.
    pub http: HttpConfig,
    /// `[database]`: which Postgres.
    pub database: DatabaseConfig,
    /// `[webhooks]`: the ingestion pipeline and its sources.
    pub webhooks: WebhooksConfig,
    /// `[shutdown]`: how long a graceful shutdown may take.
    pub shutdown: ShutdownConfig,
    /// The file the settings were read from, if any, to name it in errors.
    #[serde(skip)]
    file: Option<PathBuf>,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on (default `127.0.0.1:8080`; env `HERMES_LISTEN`).
    /// Port 0 picks a free port; [`RunningServer::local_addr`](crate::RunningServer::local_addr)
    /// tells which.
    pub listen: SocketAddr,
    /// The external base URL providers call, such as `https://hooks.example.com`,
    /// for schemes that sign the URL (Twilio). Unset: `http://` plus the
    /// request's `Host` header.
    pub public_url: Option<String>,
    /// How long a request's headers, and then its body, may take to arrive,
    /// in milliseconds (default 75000, at most an hour): a connection whose
    /// first request or headers are late is closed, a body that is late is
    /// answered 408. A connection with no request in progress for as long
    /// after its last one (HTTP/1.1 keep-alive, or HTTP/2 with no open
    /// stream) is closed, so behind a proxy that reuses connections, keep it
    /// above the proxy's idle timeout (60 s for AWS's load balancers and
    /// nginx's upstreams).
    pub read_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            read_timeout_ms: 75_000,
        }
    }
}

impl HttpConfig {
    /// `read_timeout_ms` as a duration.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

/// `[database]`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Postgres URL (env `DATABASE_URL`). Unset: a private cluster under
    /// [`local_dir`](Self::local_dir), started from the machine's PostgreSQL
    /// server binaries.
    pub url: Option<String>,
    /// Data directory of the private cluster (default `.hermes/pg`).
    pub local_dir: PathBuf,
    /// Connections in the pool (default 10).
    pub max_connections: u32,
    /// How long to wait for a pooled connection, in milliseconds (default 5000).
    pub acquire_timeout_ms: u64,
    /// Postgres's `statement_timeout` for the host's statements, in
    /// milliseconds (default 10000): a batch stuck behind a lock fails (and
    /// its events get 503) rather than holding its requests without end (1
    /// to 2147483647; it overrides a `statement_timeout` in the URL's
    /// `options`). A batch on a server that stopped answering is cut off by
    /// the host itself, [`ATTEMPT_MARGIN`] later (see
    /// [`attempt_timeout`](Self::attempt_timeout)). Migrations run without it.
    pub statement_timeout_ms: u64,
}

/// How much longer than `statement_timeout_ms` the host waits for a batch
/// statement before it gives the connection up as hung: room for the
/// commit, which the server's timeout does not cover, and the round trip.
pub const ATTEMPT_MARGIN: Duration = Duration::from_secs(2);

impl DatabaseConfig {
    /// How long one attempt at a batch write may take before the host
    /// abandons it and its connection (a frozen server, a network dropping
    /// packets, which no server-side timeout ends) and retries or answers
    /// 503: `statement_timeout_ms` plus [`ATTEMPT_MARGIN`].
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms) + ATTEMPT_MARGIN
    }

    /// The batch writes' retry policy: [`RetryPolicy::default`] with the
    /// [`attempt_timeout`](Self::attempt_timeout), and time for at least one
    /// retry, on a fresh connection, after an attempt that hung to its end.
    pub fn retry_policy(&self) -> RetryPolicy {
        let defaults = RetryPolicy::default();
        let attempt = self.attempt_timeout();
        defaults
            .attempt_timeout(attempt)
            .give_up_after(defaults.give_up_after.max(attempt + ATTEMPT_MARGIN))
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            local_dir: PathBuf::from(".hermes/pg"),
            max_connections: 10,
            acquire_timeout_ms: 5000,
            statement_timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("local_dir", &self.local_dir)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

/// `message` with the text of every quoted string ("…", which may escape
/// quotes inside: `"hun\"ter2"`) replaced by an ellipsis.
fn hide_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in message.chars() {
        if !quoted {
            out.push(c);
            quoted = c == '"';
            continue;
        }
        match (escaped, c) {
            (false, '\\') => escaped = true,
            (false, '"') => {
                quoted = false;
                out.push_str("…\"");
            }
            _ => escaped = false,
        }
    }
    if quoted {
        out.push('…');
    }
    out
}

/// The TOML parser's message and where it points, without what the parser's
/// own display adds: the offending line, which may hold a literal secret. Values
/// the message quotes ("…") are hidden too; keys and variants (`…`) stay.
fn parse_error_message(text: &str, error: &toml::de::Error) -> String {
    let message = hide_quoted(error.message().trim_end());
    let Some(span) = error.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

/// Whether `url` is an `http://` or `https://` URL (what a provider calls).
pub(crate) fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// `url` with its passwords, if any, replaced by `***`: safe to print. A
/// password may stand in the user info (`user:pw@`) or, as sqlx also reads
/// it, in the query (`?password=pw`, also percent-encoded, `?pass%77ord=`,
/// and any other parameter naming a password, such as `sslpassword`).
/// A string that is not a URL at all, such as libpq's `host=db password=pw`
/// (which sqlx refuses, printed with the error), has the values of its
/// password keywords hidden.
///
/// Query passwords go first, each to the next `&`. Then the user info is
/// taken to end at the last `@`, not at the first `/` or `?` as a URL parser
/// would: a password written unencoded may hold those, and such a URL is
/// exactly the one that fails to connect and gets printed. An `@` further on
/// hides more than the password, never less.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_keywords(url);
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if names_a_password(key) => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => rest.to_owned(),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host_on)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host_on}"),
            None => format!("{scheme}://{rest}"),
        },
        None => format!("{scheme}://{rest}"),
    }
}

/// Whether a connection parameter's name, percent-decoded, names a password
/// (`password`, `sslpassword`, ...).
fn names_a_password(key: &str) -> bool {
    percent_encoding::percent_decode_str(key)
        .decode_utf8_lossy()
        .to_ascii_lowercase()
        .contains("pass")
}

/// libpq's `keyword=value` form with the values of password keywords hidden,
/// a quoted value (`password='a b'`) to its closing quote.
fn redact_keywords(text: &str) -> String {
    let mut out = Vec::new();
    let mut words = text.split(' ');
    while let Some(word) = words.next() {
        match word.split_once('=') {
            Some((key, value)) if names_a_password(key) => {
                out.push(format!("{key}=***"));
                let mut quoted = value.starts_with('\'');
                let mut rest = value.get(1..).unwrap_or_default();
                while quoted && !ends_quote(rest) {
                    match words.next() {
                        Some(next) => rest = next,
                        None => quoted = false,
                    }
                }
            }
            _ => out.push(word.to_owned()),
        }
    }
    out.join(" ")
}

/// Whether a piece of a quoted libpq value ends it: a `'` not escaped by `\`.
fn ends_quote(piece: &str) -> bool {
    piece.ends_with('\'') && !piece.ends_with("\\'")
}

/// The most events any `[webhooks]` size may name: a million requests
/// waiting is far beyond what one host serves, and keeps every bound the
/// pipeline derives from the sizes within its own limits.
const MAX_EVENTS: u64 = 1 << 20;
/// The most processors or batches written concurrently: with every size at
/// its most, the pipeline's default in-flight bound stays within its own
/// limit (`u32::MAX`).
const MAX_TASKS: u64 = 256;
/// The largest connection pool: sqlx reserves room for every connection
/// allowed, up front.
const MAX_CONNECTIONS: u64 = 10_000;
/// An hour, the longest wait (batch timeout, drain) a setting may name.
const HOUR_MS: u64 = 3_600_000;
/// A day, the longest `Retry-After` or replay window a setting may name.
pub(crate) const DAY_SECS: u64 = 86_400;

/// `[webhooks]`: the ingestion pipeline's sizes and the sources.
///
/// Requests wait for their commit in the pipeline (at most `max_in_flight`)
/// or in its ingress buffer (at most `ingest_capacity`); beyond that a request
/// is answered 503 at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Events accepted and waiting for the pipeline (default 512).
    pub ingest_capacity: usize,
    /// Processor concurrency (default 2).
    pub processors: usize,
    /// Events a processor takes at once (default 50).
    pub max_demand: usize,
    /// Events per batch, written in one transaction (default 200).
    pub batch_size: usize,
    /// How long a partial batch waits for more events, in ms (default 10).
    pub batch_timeout_ms: u64,
    /// Batches written concurrently (default 2).
    pub batch_concurrency: usize,
    /// Bound on events in the pipeline; default: what keeps every stage busy.
    pub max_in_flight: Option<usize>,
    /// `Retry-After` of a 503, in whole seconds (default 1).
    pub retry_after_secs: u64,
    /// The sources, one route `/webhooks/{name}` each.
    pub sources: Vec<SourceConfig>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            ingest_capacity: 512,
            processors: 2,
            max_demand: 50,
            batch_size: 200,
            batch_timeout_ms: 10,
            batch_concurrency: 2,
            max_in_flight: None,
            retry_after_secs: 1,
            sources: Vec::new(),
        }
    }
}

impl WebhooksConfig {
    /// `batch_timeout_ms` as a duration.
    pub fn batch_timeout(&self) -> Duration {
        Duration::from_millis(self.batch_timeout_ms)
    }
}

/// What a source's payloads are normalized into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Store the raw event only.
    #[default]
    None,
    /// An SMS: E.164 `from` and `to`, at most 10 attachments.
    Sms,
    /// An email: addresses (stored lower-cased), at most 25 attachments.
    Email,
}

/// A secret as configured: a literal, or `env:NAME`. Its `Debug` output
/// shows `env:NAME` references but never a literal.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretSetting(pub String);

impl fmt::Debug for SecretSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with(hermes_adapters::webhook::ENV_PREFIX) {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("\"***\"")
        }
    }
}

impl From<&str> for SecretSetting {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// One `[[webhooks.sources]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The route segment: `/webhooks/{name}`. ASCII letters, digits, `-`, `_`.
    pub name: String,
    /// The signature scheme: `hmac-sha256`, `standard-webhooks`, `github`,
    /// `stripe`, `shopify`, `meta` or `twilio`.
    pub scheme: String,
    /// Signature header (`hmac-sha256` only; default `x-signature`).
    pub header: Option<String>,
    /// Literal before the encoded signature, e.g. `sha256=` (`hmac-sha256` only).
    pub prefix: Option<String>,
    /// `hex` (default) or `base64` (`hmac-sha256` only).
    pub encoding: Option<String>,
    /// Signing secrets, literal or `env:NAME`; any may match (rotation).
    pub secrets: Vec<SecretSetting>,
    /// `sms`, `email` or `none` (default).
    #[serde(default)]
    pub normalize: Normalize,
    /// Largest accepted body (default 262144).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// The provider name stored with normalized messages (default: `name`).
    pub provider: Option<String>,
    /// The exact external URL of this source, for schemes that sign it
    /// (Twilio); default `[http] public_url` + `/webhooks/{name}`.
    pub url: Option<String>,
    /// Replay window for schemes with a signed timestamp, in seconds (default 300).
    pub tolerance_secs: Option<u64>,
    /// The verify token of Meta's subscription handshake (`meta` only),
    /// literal or `env:NAME`: with it, `GET /webhooks/{name}` answers Meta's
    /// `hub.challenge` when `hub.verify_token` matches.
    pub verify_token: Option<SecretSetting>,
}

fn default_max_body_bytes() -> usize {
    262_144
}

impl SourceConfig {
    /// A source with defaults for every optional key.
    pub fn new(name: &str, scheme: &str, secrets: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            scheme: scheme.to_owned(),
            header: None,
            prefix: None,
            encoding: None,
            secrets: secrets.iter().map(|s| SecretSetting::from(*s)).collect(),
            normalize: Normalize::None,
            max_body_bytes: default_max_body_bytes(),
            provider: None,
            url: None,
            tolerance_secs: None,
            verify_token: None,
        }
    }

    /// Sets `normalize`.
    pub fn normalize(mut self, normalize: Normalize) -> Self {
        self.normalize = normalize;
        self
    }

    /// Sets `max_body_bytes`.
    pub fn max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long pipelines may take to drain on SIGTERM/SIGINT, in ms (default
    /// 10000). What remains then is answered 503, as not known to be stored.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
        }
    }
}

impl ShutdownConfig {
    /// `drain_timeout_ms` as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

impl Config {
    /// Reads `path` (or, when `None`, `hermes.toml` if it exists, else the
    /// defaults), then applies the environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Self::default(),
        };
        config.apply_env()?;
        Ok(config)
    }

    /// Reads a TOML file, without environment overrides.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// Parses TOML text, without environment overrides.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, None)
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.map(Path::to_owned),
            message: parse_error_message(text, &error),
        })?;
        config.file = path.map(Path::to_owned);
        Ok(config)
    }

    /// Applies `HERMES_LISTEN` and `DATABASE_URL` from the process environment.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        self.apply_env_with(|name| std::env::var_os(name))
    }

    /// Like [`apply_env`](Self::apply_env), reading variables with `lookup`.
    pub fn apply_env_with(
        &mut self,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<(), ConfigError> {
        let read = |name: &'static str| -> Result<Option<String>, ConfigError> {
            lookup(name)
                .map(|value| {
                    value.into_string().map_err(|_| ConfigError::Env {
                        name,
                        message: "not valid UTF-8".into(),
                    })
                })
                .transpose()
        };
        if let Some(listen) = read(LISTEN_ENV)? {
            self.http.listen = listen.trim().parse().map_err(|_| ConfigError::Env {
                name: LISTEN_ENV,
                message: format!("{listen:?} is not a socket address such as 127.0.0.1:8080"),
            })?;
        }
        if let Some(url) = read(DATABASE_URL_ENV)?.filter(|url| !url.trim().is_empty()) {
            check_database_url(&url).map_err(|message| ConfigError::Env {
                name: DATABASE_URL_ENV,
                message,
            })?;
            self.database.url = Some(url);
        }
        Ok(())
    }

    /// Checks the whole configuration: every source (scheme, options,
    /// secrets and the environment variables they name) and the pipeline
    /// sizes. [`Server::start`](crate::Server::start) calls it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validated_sources().map(drop)
    }

    /// Validates the configuration, and returns its sources ready to serve.
    pub(crate) fn validated_sources(&self) -> Result<SourceRegistry, ConfigError> {
        self.validate_sizes()?;
        SourceRegistry::from_config(&self.webhooks, self.http.public_url.as_deref())
    }

    fn validate_sizes(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        let (db, to) = (&self.database, |n: usize| n as u64);
        let invalid = |message: String| ConfigError::Invalid {
            path: self.file.clone(),
            message,
        };
        // Each setting from 1 to its bound.
        let ranges = [
            (
                "webhooks.ingest_capacity",
                to(w.ingest_capacity),
                MAX_EVENTS,
            ),
            ("webhooks.max_demand", to(w.max_demand), MAX_EVENTS),
            ("webhooks.batch_size", to(w.batch_size), MAX_EVENTS),
        ]
        .into_iter()
        // `max_in_flight` only when set.
        .chain(
            w.max_in_flight
                .map(|max| ("webhooks.max_in_flight", to(max), MAX_EVENTS)),
        )
        .chain([
            ("webhooks.processors", to(w.processors), MAX_TASKS),
            (
                "webhooks.batch_concurrency",
                to(w.batch_concurrency),
                MAX_TASKS,
            ),
            ("webhooks.batch_timeout_ms", w.batch_timeout_ms, HOUR_MS),
            ("webhooks.retry_after_secs", w.retry_after_secs, DAY_SECS),
            (
                "database.max_connections",
                u64::from(db.max_connections),
                MAX_CONNECTIONS,
            ),
            (
                "database.acquire_timeout_ms",
                db.acquire_timeout_ms,
                HOUR_MS,
            ),
            // Postgres takes an `int` of milliseconds.
            (
                "database.statement_timeout_ms",
                db.statement_timeout_ms,
                i32::MAX as u64,
            ),
            (
                "shutdown.drain_timeout_ms",
                self.shutdown.drain_timeout_ms,
                HOUR_MS,
            ),
            ("http.read_timeout_ms", self.http.read_timeout_ms, HOUR_MS),
        ]);
        for (name, value, max) in ranges {
            if value == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
            if value > max {
                return Err(invalid(format!("{name} must be at most {max}")));
            }
        }
        if let Some(max) = w.max_in_flight
            && max < w.batch_size
        {
            return Err(invalid(format!(
                "webhooks.max_in_flight ({max}) must be at least webhooks.batch_size ({})",
                w.batch_size
            )));
        }
        if let Some(url) = &self.database.url {
            check_database_url(url)
                .map_err(|message| invalid(format!("database.url {message}")))?;
        }
        if let Some(url) = &self.http.public_url
            && !is_http_url(url)
        {
            return Err(invalid(format!(
                "http.public_url {:?} must start with http:// or https://",
                redact_url(url)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
        [[webhooks.sources]]
        name = "sms"
        scheme = "hmac-sha256"
        header = "x-provider-signature-256"
        prefix = "sha256="
        encoding = "hex"
        secrets = ["env:HERMES_TEST_SMS_SECRET_UNSET_1"]
        normalize = "sms"
        max_body_bytes = 262144
    "#;

    #[test]
    fn the_retry_policy_leaves_time_to_retry_after_a_hung_attempt() {
        let db = DatabaseConfig::default();
        let policy = db.retry_policy();
        assert_eq!(policy.attempt_timeout, Some(db.attempt_timeout()));
        // The first retry starts when an attempt hung to its end.
        assert!(policy.give_up_after > db.attempt_timeout() + policy.delay(1));
        let quick = DatabaseConfig {
            statement_timeout_ms: 300,
            ..DatabaseConfig::default()
        };
        assert_eq!(
            quick.retry_policy().give_up_after,
            RetryPolicy::default().give_up_after
        );
    }

    #[test]
    fn defaults() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert!(config.database.url.is_none());
        assert_eq!(config.database.local_dir, PathBuf::from(".hermes/pg"));
        assert!(config.webhooks.sources.is_empty());
        config.validate().unwrap();
    }

    #[test]
    fn parses_the_issue_example() {
        let config = Config::from_toml_str(ISSUE_EXAMPLE).unwrap();
        let source = &config.webhooks.sources[0];
        assert_eq!(source.name, "sms");
        assert_eq!(source.normalize, Normalize::Sms);
        assert_eq!(source.prefix.as_deref(), Some("sha256="));
    }

    #[test]
    fn missing_env_secret_names_the_variable() {
        let config = Config::from_toml_str(ISSUE_EXAMPLE).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("HERMES_TEST_SMS_SECRET_UNSET_1"), "{error}");
        assert!(error.contains("\"sms\""), "{error}");
    }

    #[test]
    fn unknown_scheme_is_rejected_with_the_known_ones() {
        let config = Config::from_toml_str(
            r#"
            [[webhooks.sources]]
            name = "pay"
            scheme = "paypal"
            secrets = ["s"]
            "#,
        )
        .unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("paypal"), "{error}");
        assert!(error.contains("standard-webhooks"), "{error}");
    }

    #[test]
    fn hmac_options_on_other_schemes_are_rejected() {
        let config = Config::from_toml_str(
            r#"
            [[webhooks.sources]]
            name = "gh"
            scheme = "github"
            header = "x-sig"
            secrets = ["s"]
            "#,
        )
        .unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("header"), "{error}");
        assert!(error.contains("hmac-sha256"), "{error}");
    }

    #[test]
    fn unknown_keys_and_normalizers_are_parse_errors() {
        let error = Config::from_toml_str("[http]\nlisten_on = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("listen_on"), "{error}");
        let error = Config::from_toml_str(
            "[[webhooks.sources]]\nname = \"a\"\nscheme = \"github\"\nsecrets = [\"s\"]\nnormalize = \"fax\"",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("fax"), "{error}");
    }

    #[test]
    fn a_mistyped_literal_secret_is_not_in_the_error() {
        let error = Config::from_toml_str(
            "[[webhooks.sources]]\nname = \"a\"\nscheme = \"github\"\nsecrets = \"hunter2\"",
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("line 4, column 11"), "{error}");
        assert!(error.contains("expected a sequence"), "{error}");
        // A quote escaped inside the secret does not end the hiding early.
        let error = Config::from_toml_str(
            "[[webhooks.sources]]\nname = \"a\"\nscheme = \"github\"\nsecrets = \"hun\\\"ter2\\\\\"",
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("hun") && !error.contains("ter2"), "{error}");
        assert!(error.contains("expected a sequence"), "{error}");
    }

    #[test]
    fn env_overrides() {
        let mut config = Config::default();
        config
            .apply_env_with(|name| match name {
                LISTEN_ENV => Some("0.0.0.0:9000".into()),
                DATABASE_URL_ENV => Some("postgres://u:pw@db/hermes".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.http.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(
            config.database.url.as_deref(),
            Some("postgres://u:pw@db/hermes")
        );
        assert!(!format!("{config:?}").contains("pw"));
        let error = Config::default()
            .apply_env_with(|name| (name == LISTEN_ENV).then(|| "nope".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("HERMES_LISTEN"), "{error}");
    }

    #[test]
    fn literal_secrets_are_not_in_debug_output() {
        let source = SourceConfig::new("a", "github", &["hunter2", "env:GH_SECRET"]);
        let debug = format!("{source:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("env:GH_SECRET"), "{debug}");
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://user:secret@host:5432/db?sslmode=disable"),
            "postgres://user:***@host:5432/db?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5433/hermes"),
            "postgres://postgres@127.0.0.1:5433/hermes"
        );
        assert_eq!(
            redact_url("postgres://u@db/x?sslmode=disable&password=s3cret&application_name=h"),
            "postgres://u@db/x?sslmode=disable&password=***&application_name=h"
        );
        // Unencoded, as people paste them: the URL does not parse, and is
        // printed with the error.
        for password in ["Xy/9k+Q", "a?b", "p@ss/w?rd", "x#y"] {
            let url = format!("postgres://app:{password}@db:5432/hermes");
            assert_eq!(redact_url(&url), "postgres://app:***@db:5432/hermes");
        }
        assert_eq!(
            redact_url("https://user:pw@hooks.example.com/webhooks/sms"),
            "https://user:***@hooks.example.com/webhooks/sms"
        );
        // An @ in a query password.
        assert_eq!(
            redact_url("postgres:///hermes?host=/run/postgresql&password=p@ss"),
            "postgres:///hermes?host=/run/postgresql&password=***"
        );
        assert_eq!(
            redact_url("postgres://app@db:5432/x?password=p@ss&sslmode=disable"),
            "postgres://app@db:5432/x?password=***&sslmode=disable"
        );
        // Percent-encoded names, and other passwords.
        assert_eq!(
            redact_url("postgres://app@db/x?pass%77ord=s3cret&sslpassword=k3y"),
            "postgres://app@db/x?pass%77ord=***&sslpassword=***"
        );
        // libpq's keyword form, which sqlx refuses and the error prints.
        assert_eq!(
            redact_url("host=db user=app password=hunter2 dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
        assert_eq!(
            redact_url("host=db password='a b\\' c' sslmode=require"),
            "host=db password=*** sslmode=require"
        );
        assert_eq!(redact_url("hooks.example.com/x"), "hooks.example.com/x");
    }

    #[test]
    fn an_invalid_setting_names_the_file_or_the_variable() {
        let file = Path::new("/etc/hermes/hermes.toml");
        let config = Config::parse("[database]\nmax_connections = 20000", Some(file)).unwrap();
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "invalid configuration in /etc/hermes/hermes.toml: \
             database.max_connections must be at most 10000"
        );
        // Without a file, none is named.
        let error = Config::from_toml_str("[database]\nmax_connections = 0")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "invalid configuration: database.max_connections must be at least 1"
        );

        let bad_url = "[database]\nurl = \"mysql://u:pw@db/x\"";
        let error = Config::parse(bad_url, Some(file))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("invalid configuration in /etc/hermes/hermes.toml: database.url"),
            "{error}"
        );
        // A URL from DATABASE_URL names the variable, not the file.
        let mut config = Config::parse("", Some(file)).unwrap();
        let error = config
            .apply_env_with(|name| (name == DATABASE_URL_ENV).then(|| "mysql://u:pw@db/x".into()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "environment variable DATABASE_URL: \"mysql://u:***@db/x\" must start with \
             postgres:// or postgresql://"
        );
    }

    #[test]
    fn sizes_are_checked() {
        let mut config = Config::default();
        config.webhooks.batch_size = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
        for (edit, key) in [
            (
                (|c: &mut Config| c.webhooks.retry_after_secs = 0) as fn(&mut Config),
                "retry_after_secs",
            ),
            (|c| c.database.acquire_timeout_ms = 0, "acquire_timeout_ms"),
            (
                |c| c.database.acquire_timeout_ms = HOUR_MS + 1,
                "acquire_timeout_ms",
            ),
            (|c| c.database.max_connections = 10_001, "max_connections"),
            (
                |c| c.database.url = Some("mysql://u:pw@db/hermes".into()),
                "postgres://",
            ),
            (|c| c.database.max_connections = u32::MAX, "max_connections"),
            (
                |c| c.database.statement_timeout_ms = 0,
                "statement_timeout_ms",
            ),
            (
                |c| c.database.statement_timeout_ms = 3_000_000_000,
                "statement_timeout_ms",
            ),
            (|c| c.shutdown.drain_timeout_ms = 0, "drain_timeout_ms"),
            (|c| c.http.read_timeout_ms = 0, "read_timeout_ms"),
            (|c| c.http.read_timeout_ms = HOUR_MS + 1, "read_timeout_ms"),
            (
                |c| c.shutdown.drain_timeout_ms = 86_400_000,
                "drain_timeout_ms",
            ),
            (
                |c| c.webhooks.retry_after_secs = u64::MAX,
                "retry_after_secs",
            ),
            (
                |c| c.webhooks.ingest_capacity = usize::MAX,
                "ingest_capacity",
            ),
            (
                |c| c.webhooks.max_in_flight = Some(1 << 40),
                "max_in_flight",
            ),
            (|c| c.webhooks.max_in_flight = Some(0), "max_in_flight"),
            (|c| c.webhooks.batch_size = 1 << 21, "batch_size"),
            (|c| c.webhooks.processors = 257, "processors"),
            (
                |c| c.webhooks.batch_timeout_ms = 1 << 40,
                "batch_timeout_ms",
            ),
        ] {
            let mut config = Config::default();
            edit(&mut config);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
    }
}
