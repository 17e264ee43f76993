//! A form-encoded webhook body (`application/x-www-form-urlencoded`, as
//! Twilio and GitHub's "form" content type send) as the JSON stored for it.

use std::borrow::Cow;

use percent_encoding::percent_decode;
use serde_json::{Map, Value};

/// The fields of a form body as a JSON object: `{"Body": "hi", "From":
/// "+1555…"}`. A field given more than once becomes an array of its values,
/// in order. Names and values are form decoded (`+` is a space, `%XX` a
/// byte) and must then be UTF-8: the error says which field is not.
///
/// Split here rather than by `form_urlencoded::parse`, which replaces an
/// invalid sequence with U+FFFD: that would store a value the sender did
/// not send.
pub fn form_body_json(body: &[u8]) -> Result<Value, String> {
    let mut fields = Map::new();
    for pair in body.split(|&b| b == b'&').filter(|pair| !pair.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name).ok_or("a form field's name is not UTF-8 once decoded")?;
        let value = decode(value)
            .ok_or_else(|| format!("form field {name:?} is not UTF-8 once decoded"))?;
        let value = Value::String(value);
        match fields.get_mut(&name) {
            None => {
                fields.insert(name, value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    Ok(Value::Object(fields))
}

/// A form-encoded name or value decoded, if it is UTF-8.
fn decode(encoded: &[u8]) -> Option<String> {
    let spaced: Cow<[u8]> = if encoded.contains(&b'+') {
        Cow::Owned(
            encoded
                .iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(encoded)
    };
    percent_decode(&spaced)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::form_body_json;

    #[test]
    fn fields_become_an_object_and_repeats_an_array() {
        let json = form_body_json(b"To=%2B15550100&From=%2B15550101&Body=hi+there&MediaUrl=a&MediaUrl=b&MediaUrl=c&Empty=&Flag&&x=%E2%82%AC")
            .expect("a valid form")
            .to_string();
        assert_eq!(
            json,
            r#"{"Body":"hi there","Empty":"","Flag":"","From":"+15550101","MediaUrl":["a","b","c"],"To":"+15550100","x":"€"}"#
        );
        assert_eq!(form_body_json(b"").expect("empty").to_string(), "{}");
    }

    #[test]
    fn a_field_that_is_not_utf8_is_named() {
        for body in [
            &b"ok=1&Body=caf%E9"[..],
            b"ok=1&Body=caf\xe9",
            b"Body=%ED%A0%80",
        ] {
            let error = form_body_json(body).expect_err("not UTF-8");
            assert!(error.contains("\"Body\""), "{error}");
        }
        let error = form_body_json(b"%FF=1").expect_err("not UTF-8");
        assert!(error.contains("name"), "{error}");
    }
}
