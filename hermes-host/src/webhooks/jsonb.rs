//! What Postgres's `jsonb` refuses of JSON that `serde_json` accepts: checked
//! before an event is queued, so its sender gets a 400 rather than its batch
//! a failed write (and a search for the row that failed it).

/// Arrays and objects nested deeper than this are refused. Postgres's JSON
/// parser recurses once per level and fails the whole statement past its
/// stack limit (about 10,000 levels with the default `max_stack_depth`, fewer
/// with a smaller one); no webhook comes near a thousand.
pub const MAX_DEPTH: usize = 1000;

/// Why valid JSON `text` cannot be stored as `jsonb`, if it cannot: a
/// `\u0000` escape, a `\u` escape of half a surrogate pair (`serde_json`
/// does not decode escapes it only skips), a number outside `numeric`'s
/// range (131072 digits before the point, 16383 after), or nesting deeper
/// than [`MAX_DEPTH`].
pub fn refusal(text: &str) -> Option<&'static str> {
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut in_string = false;
    let mut depth = 0usize;
    while let Some(&byte) = bytes.get(at) {
        match (in_string, byte) {
            (true, b'"') => in_string = false,
            (true, b'\\') => {
                if bytes.get(at + 1) == Some(&b'u') {
                    let (length, problem) = unicode_escape(bytes, at);
                    if problem.is_some() {
                        return problem;
                    }
                    at += length;
                    continue;
                }
                // Any other escape is two bytes long.
                at += 2;
                continue;
            }
            (true, _) => {
                // Inside a string only its end and escapes matter: skip to
                // the next of them (a body is mostly strings).
                match memchr::memchr2(b'"', b'\\', &bytes[at..]) {
                    Some(offset) => at += offset,
                    None => return None,
                }
                continue;
            }
            (false, b'"') => in_string = true,
            (false, b'[' | b'{') => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(TOO_DEEP);
                }
            }
            (false, b']' | b'}') => depth = depth.saturating_sub(1),
            (false, b'-' | b'0'..=b'9') => {
                let (length, fits) = number(bytes, at);
                if !fits {
                    return Some(
                        "a number is beyond what Postgres stores (131072 digits before the point, 16383 after)",
                    );
                }
                at += length;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    None
}

/// The `\uXXXX` escape at `at` (with the low half that must follow a high
/// surrogate): its length, and what Postgres would refuse in it.
fn unicode_escape(bytes: &[u8], at: usize) -> (usize, Option<&'static str>) {
    let Some(code) = hex4(bytes, at + 2) else {
        // Not JSON; the JSON check has refused it already.
        return (2, None);
    };
    match code {
        0 => (6, Some("\\u0000 (NUL) cannot be stored in Postgres")),
        0xD800..=0xDBFF => {
            let low = (bytes.get(at + 6) == Some(&b'\\') && bytes.get(at + 7) == Some(&b'u'))
                .then(|| hex4(bytes, at + 8))
                .flatten();
            match low {
                Some(0xDC00..=0xDFFF) => (12, None),
                _ => (6, Some(LONE_SURROGATE)),
            }
        }
        0xDC00..=0xDFFF => (6, Some(LONE_SURROGATE)),
        _ => (6, None),
    }
}

const TOO_DEEP: &str = "arrays and objects are nested deeper than 1000 levels";

const LONE_SURROGATE: &str = "a \\u escape names half of a UTF-16 surrogate pair";

/// The four hex digits at `at`, as a number.
fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = std::str::from_utf8(bytes.get(at..at + 4)?).ok()?;
    u32::from_str_radix(digits, 16).ok()
}

/// The JSON number at `at`: its length, and whether `numeric` holds it.
///
/// As Postgres reads it: an exponent of `INT_MAX / 2` or more either way
/// overflows, whatever the digits; otherwise a nonzero value may have 131072
/// digits before the point, counted from its first nonzero digit, and any
/// value 16383 after, counted as written (trailing zeros too) less the
/// exponent.
fn number(bytes: &[u8], at: usize) -> (usize, bool) {
    let mut end = at + usize::from(bytes.get(at) == Some(&b'-'));
    let integer = Digits::at(bytes, end);
    end += integer.length;
    // JSON allows a leading zero only as the whole integer part.
    let integer_is_zero = integer.leading_zeros > 0;
    let (mut fraction, mut fraction_leading_zeros) = (0, 0);
    if bytes.get(end) == Some(&b'.') {
        let digits = Digits::at(bytes, end + 1);
        (fraction, fraction_leading_zeros) = (digits.length, digits.leading_zeros);
        end += 1 + digits.length;
    }
    let mut exponent: i64 = 0;
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        end += 1;
        let negative = bytes.get(end) == Some(&b'-');
        if matches!(bytes.get(end), Some(b'+' | b'-')) {
            end += 1;
        }
        let length = Digits::at(bytes, end).length;
        let value = bytes
            .iter()
            .skip(end)
            .take(length)
            .try_fold(0i64, |value, &b| {
                value.checked_mul(10)?.checked_add(i64::from(b - b'0'))
            });
        end += length;
        match value {
            Some(value) if value < EXPONENT_LIMIT => {
                exponent = if negative { -value } else { value };
            }
            _ => return (end - at, false),
        }
    }
    let zero = integer_is_zero && fraction_leading_zeros == fraction;
    let before_point = if zero {
        0
    } else if integer_is_zero {
        exponent - fraction_leading_zeros as i64
    } else {
        integer.length as i64 + exponent
    };
    let after_point = fraction as i64 - exponent;
    (end - at, before_point <= 131_072 && after_point <= 16_383)
}

/// A run of ASCII digits, read in one pass (the exponent's value is read
/// where it is needed).
struct Digits {
    /// How many digits.
    length: usize,
    /// How many of them are zeros before the first other digit.
    leading_zeros: usize,
}

impl Digits {
    /// The digits from `from` on (none past the end of `bytes`).
    fn at(bytes: &[u8], from: usize) -> Self {
        let mut digits = Self {
            length: 0,
            leading_zeros: 0,
        };
        let run = bytes.get(from..).unwrap_or_default();
        for &byte in run.iter().take_while(|b| b.is_ascii_digit()) {
            if byte == b'0' && digits.leading_zeros == digits.length {
                digits.leading_zeros += 1;
            }
            digits.length += 1;
        }
        digits
    }
}

/// The smallest exponent's magnitude Postgres refuses outright (`INT_MAX / 2`).
const EXPONENT_LIMIT: i64 = 1_073_741_823;

#[cfg(test)]
mod tests {
    use super::{MAX_DEPTH, refusal};

    /// Each case as Postgres 15 answered `SELECT (case)::jsonb`.
    #[test]
    fn refuses_what_postgres_refuses() {
        for storable in [
            r#"{"a":"x","b":[1,-2.5,3e10,true,false,null]}"#,
            r#""\ud83d\ude00""#,
            r#""\\u0000""#,
            r#"{"long":"a text of some length, then an escaped \\u0000 and a quote \" in it"}"#,
            r#""\u0041 and e5 and 1e999999 in a string""#,
            "1e-16383",
            "1e131071",
            "1e100000",
            "1.5e-16000",
            "-0.0E+0",
            "1e-0000000000001",
            "0e131072",
            "0e999999",
            "0e1073741822",
            "0.0000e131075",
            "0.5e131072",
            "0.001e131074",
            "1.5e-16382",
            "[0,{\"a\":[\"[[[[\"]}]",
        ] {
            assert_eq!(refusal(storable), None, "{storable}");
        }
        for refused in [
            r#"{"a":"\u0000"}"#,
            r#"["\\\u0000"]"#,
            r#"{"long":"a text of some length, then \" and \\ and \u0000 in it"}"#,
            r#""\ud800""#,
            r#""\ud800x""#,
            r#""\udc00""#,
            "1e-20000",
            "1e-16384",
            "1e131072",
            "[1,2e99999999999999999999]",
            "0e9999999999",
            "0e1073741823",
            "0e-1073741822",
            "1e-2147483648",
            "0.5e131073",
            "0.001e131075",
            "10e131071",
            "0.0e-16383",
            "1.50e-16382",
        ] {
            assert!(refusal(refused).is_some(), "{refused}");
        }
    }

    #[test]
    fn refuses_nesting_deeper_than_the_limit() {
        let nested = |depth: usize, open: &str, close: &str| {
            format!("{}0{}", open.repeat(depth), close.repeat(depth))
        };
        assert_eq!(refusal(&nested(MAX_DEPTH, "[", "]")), None);
        assert_eq!(refusal(&nested(MAX_DEPTH, "{\"a\":", "}")), None);
        // Siblings do not add up: only the open ones count.
        assert_eq!(refusal(&format!("[{}0]", "[[]],".repeat(MAX_DEPTH))), None);
        assert!(refusal(&nested(MAX_DEPTH + 1, "[", "]")).is_some());
        assert!(refusal(&nested(MAX_DEPTH + 1, "{\"a\":", "}")).is_some());
        assert!(
            refusal(&format!(
                "{{\"a\":\"x\",\"b\":{}}}",
                nested(100_000, "[", "]")
            ))
            .is_some()
        );
    }
}
