//! A form-encoded webhook body (`application/x-www-form-urlencoded`, as
//! Twilio and GitHub's "form" content type send) as the JSON stored for it.

use serde_json::{Map, Value};

/// The fields of a form body as a JSON object: `{"Body": "hi", "From":
/// "+1555…"}`. A field given more than once becomes an array of its values,
/// in order. Names and values are form
/// decoded (`+` is a space, `%XX` a byte) as UTF-8; an invalid sequence
/// becomes U+FFFD, as the URL standard decodes forms.
pub fn form_body_json(body: &[u8]) -> Value {
    let mut fields = Map::new();
    for (name, value) in form_urlencoded::parse(body) {
        let value = Value::String(value.into_owned());
        match fields.get_mut(name.as_ref()) {
            None => {
                fields.insert(name.into_owned(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    Value::Object(fields)
}

#[cfg(test)]
mod tests {
    use super::form_body_json;

    #[test]
    fn fields_become_an_object_and_repeats_an_array() {
        let json = form_body_json(b"To=%2B15550100&From=%2B15550101&Body=hi+there&MediaUrl=a&MediaUrl=b&MediaUrl=c&Empty=&Flag")
            .to_string();
        assert_eq!(
            json,
            r#"{"Body":"hi there","Empty":"","Flag":"","From":"+15550101","MediaUrl":["a","b","c"],"To":"+15550100"}"#
        );
        assert_eq!(form_body_json(b"").to_string(), "{}");
    }
}
