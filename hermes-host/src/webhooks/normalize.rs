//! Normalization of sms and email payloads into a [`NormalizedMessage`].
//!
//! The payload is a JSON object:
//!
//! ```json
//! {"from": "+14155550100", "to": "+14155550199", "body": "hi",
//!  "attachments": ["https://example.com/a.jpg"], "timestamp": "2024-05-01T12:00:00Z",
//!  "provider_message_id": "SM123"}
//! ```
//!
//! `body`, `attachments` and `provider_message_id` are optional; other keys
//! are ignored (and kept in the stored raw event). `timestamp` is RFC 3339 or
//! seconds since the Unix epoch. sms needs E.164 numbers and at most 10
//! attachments; email needs addresses (lower-cased) and at most 25. A
//! `provider_message_id`, when given, must not be empty (or white space
//! only) nor longer than [`MAX_PROVIDER_MESSAGE_ID_LEN`] bytes.

use std::cell::Cell;
use std::fmt;

use chrono::{DateTime, Datelike, Utc};
use serde::Deserializer;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::config::Normalize;
use crate::quote::shortened;

/// Most attachments an sms may carry.
pub const MAX_SMS_ATTACHMENTS: usize = 10;
/// Most attachments an email may carry.
pub const MAX_EMAIL_ATTACHMENTS: usize = 25;
/// Longest accepted attachment URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;
/// Longest accepted `provider_message_id`, in bytes.
pub const MAX_PROVIDER_MESSAGE_ID_LEN: usize = 255;

/// A message's channel kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Text message between phone numbers.
    Sms,
    /// Email between addresses.
    Email,
}

impl Channel {
    /// The channel kind as stored: `sms` or `email`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Email => "email",
        }
    }

    /// The kind of party addresses on this channel: `phone` or `email`.
    pub fn party_kind(self) -> &'static str {
        match self {
            Channel::Sms => "phone",
            Channel::Email => "email",
        }
    }
}

/// A valid sms or email, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedMessage {
    /// The channel kind.
    pub channel: Channel,
    /// Sender: E.164 number, or lower-cased email address.
    pub from: String,
    /// Recipient, in the same form.
    pub to: String,
    /// The text, if any.
    pub body: Option<String>,
    /// Attachment URLs, in order.
    pub attachments: Vec<String>,
    /// When the provider says the message was sent.
    pub sent_at: DateTime<Utc>,
    /// The provider's id of the message, if given.
    pub provider_message_id: Option<String>,
}

/// Why a payload is invalid: the field and the reason (answered 422).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizeError {
    /// The offending field (`""` for the payload as a whole).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl NormalizeError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for NormalizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "field `{}`: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for NormalizeError {}

/// The fields normalization reads.
const FIELDS: [&str; 6] = [
    "from",
    "to",
    "body",
    "attachments",
    "timestamp",
    "provider_message_id",
];

/// Reads a payload object's [`FIELDS`] (the last of a repeated key wins, as
/// in `jsonb`) and skips the rest without decoding it: a number beyond `f64`
/// elsewhere in the payload (valid JSON, and storable) is no reason to
/// refuse it. Remembers which field could not be read.
struct FieldsVisitor<'a> {
    unreadable: &'a Cell<&'static str>,
}

impl<'de> Visitor<'de> for FieldsVisitor<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match FIELDS.iter().find(|name| **name == key) {
                Some(name) => {
                    self.unreadable.set(name);
                    let value = map.next_value()?;
                    self.unreadable.set("");
                    fields.insert(key, value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// Normalizes the JSON `text` of a payload per `rule`, decoding only the
/// fields it needs (see [`normalize`]). For [`Normalize::None`], `Ok(None)`
/// without reading `text`; otherwise it reads all of `text`, so `Ok` means
/// that `text` is a valid JSON object (an error may be malformed JSON, at
/// any point).
pub fn normalize_text(
    rule: Normalize,
    text: &str,
) -> Result<Option<NormalizedMessage>, NormalizeError> {
    if rule == Normalize::None {
        return Ok(None);
    }
    let first = text.trim_start().as_bytes().first();
    if first != Some(&b'{') {
        let kind = match first {
            Some(b'[') => "an array",
            Some(b'"') => "a string",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            _ => "a number",
        };
        return Err(not_an_object(kind));
    }
    let unreadable = Cell::new("");
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let object = deserializer
        .deserialize_map(FieldsVisitor {
            unreadable: &unreadable,
        })
        // Nothing but white space after the object.
        .and_then(|object| deserializer.end().map(|()| object))
        .map_err(|error| {
            NormalizeError::new(unreadable.get(), format!("cannot be read: {error}"))
        })?;
    normalize(rule, &Value::Object(object))
}

/// Normalizes `payload` per `rule`: `Ok(None)` for [`Normalize::None`].
pub fn normalize(
    rule: Normalize,
    payload: &Value,
) -> Result<Option<NormalizedMessage>, NormalizeError> {
    let channel = match rule {
        Normalize::None => return Ok(None),
        Normalize::Sms => Channel::Sms,
        Normalize::Email => Channel::Email,
    };
    let Some(object) = payload.as_object() else {
        return Err(not_an_object(type_name(payload)));
    };
    let from = address(channel, object, "from")?;
    let to = address(channel, object, "to")?;
    let body = optional_string(object, "body")?;
    let provider_message_id = provider_message_id(object)?;
    let attachments = attachments(channel, object)?;
    let sent_at = timestamp(object)?;
    Ok(Some(NormalizedMessage {
        channel,
        from,
        to,
        body,
        attachments,
        sent_at,
        provider_message_id,
    }))
}

fn not_an_object(kind: &str) -> NormalizeError {
    NormalizeError::new("", format!("the payload must be a JSON object, not {kind}"))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required_string<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, NormalizeError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(NormalizeError::new(field, "is required")),
        Some(Value::String(value)) => Ok(value),
        Some(other) => Err(NormalizeError::new(
            field,
            format!("must be a string, not {}", type_name(other)),
        )),
    }
}

fn optional_string(
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, NormalizeError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(other) => Err(NormalizeError::new(
            field,
            format!("must be a string, not {}", type_name(other)),
        )),
    }
}

/// The optional `provider_message_id`: not blank, and at most
/// [`MAX_PROVIDER_MESSAGE_ID_LEN`] bytes.
fn provider_message_id(object: &Map<String, Value>) -> Result<Option<String>, NormalizeError> {
    const FIELD: &str = "provider_message_id";
    let Some(id) = optional_string(object, FIELD)? else {
        return Ok(None);
    };
    if id.trim().is_empty() {
        return Err(NormalizeError::new(FIELD, "must not be empty"));
    }
    if id.len() > MAX_PROVIDER_MESSAGE_ID_LEN {
        return Err(NormalizeError::new(
            FIELD,
            format!(
                "is {} bytes long, longer than the {MAX_PROVIDER_MESSAGE_ID_LEN} accepted",
                id.len()
            ),
        ));
    }
    Ok(Some(id))
}

fn address(
    channel: Channel,
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<String, NormalizeError> {
    let value = required_string(object, field)?;
    match channel {
        Channel::Sms if is_e164(value) => Ok(value.to_owned()),
        Channel::Sms => Err(NormalizeError::new(
            field,
            format!(
                "{:?} is not an E.164 phone number ('+', then 2 to 15 digits, the first not 0)",
                shortened(value)
            ),
        )),
        Channel::Email => email(value)
            .map_err(|why| NormalizeError::new(field, format!("{:?} {why}", shortened(value)))),
    }
}

/// Whether `value` is an E.164 number: `+`, then 2 to 15 digits, the first not 0.
pub fn is_e164(value: &str) -> bool {
    let Some(digits) = value.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// The longest email address, in bytes (RFC 5321's path limit).
const MAX_EMAIL_LEN: usize = 254;
/// The longest local part of an email address, in bytes.
const MAX_LOCAL_PART_LEN: usize = 64;

/// The lower-cased address if `value` looks like `local@domain.tld`, else
/// why not.
pub fn email(value: &str) -> Result<String, String> {
    if value.len() > MAX_EMAIL_LEN {
        return Err(format!(
            "is {} bytes long, longer than the {MAX_EMAIL_LEN} an email address may be",
            value.len()
        ));
    }
    let not_an_address = || "is not an email address (local@domain.tld)".to_owned();
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(not_an_address());
    }
    let (local, domain) = value.rsplit_once('@').ok_or_else(not_an_address)?;
    if local.len() > MAX_LOCAL_PART_LEN {
        return Err(format!(
            "has a local part (before the @) of {} bytes, longer than the \
             {MAX_LOCAL_PART_LEN} an email address may have",
            local.len()
        ));
    }
    let domain_ok = !domain.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    let local_ok = !local.is_empty() && !local.contains('@');
    if domain_ok && local_ok {
        Ok(value.to_lowercase())
    } else {
        Err(not_an_address())
    }
}

fn attachments(
    channel: Channel,
    object: &Map<String, Value>,
) -> Result<Vec<String>, NormalizeError> {
    const FIELD: &str = "attachments";
    let items = match object.get(FIELD) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(NormalizeError::new(
                FIELD,
                format!("must be an array of URLs, not {}", type_name(other)),
            ));
        }
    };
    let max = match channel {
        Channel::Sms => MAX_SMS_ATTACHMENTS,
        Channel::Email => MAX_EMAIL_ATTACHMENTS,
    };
    if items.len() > max {
        return Err(NormalizeError::new(
            FIELD,
            format!(
                "{} attachments, more than the {max} an {} may carry",
                items.len(),
                channel.as_str()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::String(url) if url.len() > MAX_URL_LEN => Err(NormalizeError::new(
                FIELD,
                format!(
                    "item {index}: a URL of {} bytes, longer than the {MAX_URL_LEN} accepted",
                    url.len()
                ),
            )),
            Value::String(url) if is_url(url) => Ok(url.clone()),
            Value::String(url) => Err(NormalizeError::new(
                FIELD,
                format!(
                    "item {index}: {:?} is not an absolute http(s) URL",
                    shortened(url)
                ),
            )),
            other => Err(NormalizeError::new(
                FIELD,
                format!(
                    "item {index} must be a URL string, not {}",
                    type_name(other)
                ),
            )),
        })
        .collect()
}

fn is_url(value: &str) -> bool {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(rest) => {
            !rest.is_empty()
                && !rest.starts_with('/')
                && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

fn timestamp(object: &Map<String, Value>) -> Result<DateTime<Utc>, NormalizeError> {
    const FIELD: &str = "timestamp";
    let time = timestamp_of(object.get(FIELD))?;
    // Chrono reaches further back than Postgres's `timestamptz` (4713 BC).
    if !(1..=9999).contains(&time.year()) {
        return Err(NormalizeError::new(
            FIELD,
            format!("{time} is out of range (years 1 to 9999)"),
        ));
    }
    Ok(time)
}

/// The timestamp as given, in any range chrono takes.
fn timestamp_of(value: Option<&Value>) -> Result<DateTime<Utc>, NormalizeError> {
    const FIELD: &str = "timestamp";
    const FORMS: &str = "an RFC 3339 date-time or seconds since the Unix epoch";
    match value {
        None | Some(Value::Null) => Err(NormalizeError::new(FIELD, "is required")),
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                NormalizeError::new(FIELD, format!("{:?} is not {FORMS}: {e}", shortened(text)))
            }),
        Some(Value::Number(number)) => {
            let parsed = if let Some(seconds) = number.as_i64() {
                DateTime::from_timestamp(seconds, 0)
            } else {
                number.as_f64().and_then(|seconds| {
                    let whole = seconds.floor();
                    let nanos = ((seconds - whole) * 1e9) as u32;
                    (whole.is_finite() && whole.abs() < 1e15)
                        .then(|| DateTime::from_timestamp(whole as i64, nanos))
                        .flatten()
                })
            };
            parsed.ok_or_else(|| NormalizeError::new(FIELD, format!("{number} is out of range")))
        }
        Some(other) => Err(NormalizeError::new(
            FIELD,
            format!("must be {FORMS}, not {}", type_name(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sms(payload: Value) -> Result<Option<NormalizedMessage>, NormalizeError> {
        normalize(Normalize::Sms, &payload)
    }

    #[test]
    fn text_is_read_for_its_fields_only() {
        let valid = r#"{"from":"+14155550100","to":"+14155550101","body":"hi",
            "timestamp":"2026-01-01T00:00:00Z","extra":1e400,"nested":{"n":-1e999}}"#;
        let message = normalize_text(Normalize::Sms, valid).unwrap().unwrap();
        assert_eq!(message.from, "+14155550100");
        assert_eq!(message.body.as_deref(), Some("hi"));

        let error =
            normalize_text(Normalize::Sms, r#"{"from":"+14155550100","body":1e400}"#).unwrap_err();
        assert_eq!(error.field, "body");
        assert!(error.to_string().contains("cannot be read"), "{error}");
        // A repeated key: the last wins, as jsonb stores it.
        let repeated = r#"{"from":"+14155550100","to":"+14155550101","body":"a","body":"b",
            "timestamp":"2026-01-01T00:00:00Z"}"#;
        let message = normalize_text(Normalize::Sms, repeated).unwrap().unwrap();
        assert_eq!(message.body.as_deref(), Some("b"));
        for (text, kind) in [
            ("[1e400]", "an array"),
            ("1e400", "a number"),
            ("null", "null"),
        ] {
            let error = normalize_text(Normalize::Sms, text).unwrap_err();
            assert!(error.to_string().contains(kind), "{text}: {error}");
        }
        assert_eq!(normalize_text(Normalize::None, "[1e400]").unwrap(), None);
        // All of the text is read: what follows the object too.
        let trailing = r#"{"from":"+14155550100","to":"+14155550101",
            "timestamp":"2026-01-01T00:00:00Z"} {"#;
        let error = normalize_text(Normalize::Sms, trailing).unwrap_err();
        assert!(error.to_string().contains("cannot be read"), "{error}");
    }

    #[test]
    fn valid_sms() {
        let message = sms(json!({
            "from": "+14155550100", "to": "+442071838750", "body": "hi",
            "attachments": ["https://example.com/a.jpg"],
            "timestamp": "2024-05-01T12:00:00+02:00", "provider_message_id": "SM1"
        }))
        .unwrap()
        .unwrap();
        assert_eq!(message.channel, Channel::Sms);
        assert_eq!(message.from, "+14155550100");
        assert_eq!(message.attachments.len(), 1);
        assert_eq!(message.sent_at.to_rfc3339(), "2024-05-01T10:00:00+00:00");
        assert_eq!(message.provider_message_id.as_deref(), Some("SM1"));
    }

    #[test]
    fn sms_rules() {
        let base = json!({"from": "+14155550100", "to": "+14155550101", "timestamp": 1714564800});
        assert!(sms(base.clone()).is_ok());
        for (field, value) in [
            ("from", json!("4155550100")),
            ("from", json!("+0155550100")),
            ("to", json!("+1")),
            ("to", json!("+1234567890123456")),
            ("to", json!(14155550101u64)),
            ("timestamp", json!("yesterday")),
            ("timestamp", json!(-200_000_000_000i64)),
            ("timestamp", json!(1e15)),
            ("body", json!(3)),
            ("attachments", json!("https://x.y/z")),
            ("attachments", json!(["ftp://x.y/z"])),
        ] {
            let mut payload = base.clone();
            payload[field] = value;
            let error = sms(payload).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
        let mut payload = base.clone();
        payload["attachments"] = json!(vec!["https://e.com/a"; 11]);
        let error = sms(payload).unwrap_err();
        assert_eq!(error.field, "attachments");
        assert!(error.reason.contains("10"), "{error}");
        let mut payload = base;
        payload.as_object_mut().unwrap().remove("to");
        assert_eq!(
            sms(payload).unwrap_err().to_string(),
            "field `to`: is required"
        );
        assert_eq!(sms(json!([1])).unwrap_err().field, "");
    }

    #[test]
    fn email_rules() {
        let message = normalize(
            Normalize::Email,
            &json!({"from": "Alice@Example.COM", "to": "bob@example.org",
                    "attachments": vec!["https://e.com/a"; 25], "timestamp": 0}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(message.from, "alice@example.com");
        assert_eq!(message.attachments.len(), 25);
        for bad in [
            "alice",
            "alice@",
            "@example.com",
            "a b@example.com",
            "a@example",
        ] {
            let error = normalize(
                Normalize::Email,
                &json!({"from": bad, "to": "bob@example.org", "timestamp": 0}),
            )
            .unwrap_err();
            assert_eq!(error.field, "from", "{bad}");
        }
        let error = normalize(
            Normalize::Email,
            &json!({"from": "a@b.co", "to": "bob@example.org",
                    "attachments": vec!["https://e.com/a"; 26], "timestamp": 0}),
        )
        .unwrap_err();
        assert!(error.reason.contains("25"), "{error}");
    }

    #[test]
    fn too_long_values_are_refused_for_their_length() {
        let email = |from: &str| {
            normalize(
                Normalize::Email,
                &json!({"from": from, "to": "bob@example.org", "timestamp": 0}),
            )
            .unwrap_err()
        };
        let error = email(&format!("a@{}.com", "b".repeat(250)));
        assert!(error.reason.contains("longer than the 254"), "{error}");
        assert!(error.reason.contains('…'), "quoted whole: {error}");
        let error = email(&format!("{}@example.com", "a".repeat(65)));
        assert!(error.reason.contains("local part"), "{error}");
        assert!(error.reason.contains("64"), "{error}");

        let long_url = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        let error = sms(
            json!({"from": "+14155550100", "to": "+14155550101", "timestamp": 0,
                               "attachments": ["https://example.com/ok", long_url]}),
        )
        .unwrap_err();
        assert_eq!(error.field, "attachments");
        assert!(error.reason.contains("item 1"), "{error}");
        assert!(error.reason.contains("longer than the 2048"), "{error}");

        let base = json!({"from": "+14155550100", "to": "+14155550101", "timestamp": 0});
        let with_id = |id: String| {
            let mut payload = base.clone();
            payload["provider_message_id"] = json!(id);
            sms(payload)
        };
        let longest = "a".repeat(MAX_PROVIDER_MESSAGE_ID_LEN);
        let message = with_id(longest.clone()).unwrap().unwrap();
        assert_eq!(message.provider_message_id, Some(longest));
        let error = with_id("a".repeat(10_000)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "field `provider_message_id`: is 10000 bytes long, longer than the 255 accepted"
        );
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        let error = with_id("é".repeat(128)).unwrap_err();
        assert!(error.reason.contains("256 bytes"), "{error}");
    }

    #[test]
    fn an_empty_provider_message_id_is_refused() {
        for id in ["", " ", "\t\n"] {
            let error = sms(json!({"from": "+14155550100", "to": "+14155550101",
                                   "timestamp": 0, "provider_message_id": id}))
            .unwrap_err();
            assert_eq!(
                error.to_string(),
                "field `provider_message_id`: must not be empty",
                "{id:?}"
            );
        }
        let email = normalize(
            Normalize::Email,
            &json!({"from": "a@b.co", "to": "c@d.co", "timestamp": 0, "provider_message_id": ""}),
        )
        .unwrap_err();
        assert_eq!(email.field, "provider_message_id");
    }

    #[test]
    fn none_stores_raw_only() {
        assert_eq!(normalize(Normalize::None, &json!([1, 2])), Ok(None));
    }
}
