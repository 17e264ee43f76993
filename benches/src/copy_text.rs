//! Fields of Postgres's `COPY … FROM STDIN` text format, for the benchmarks'
//! raw `COPY`s.

/// Appends `value` to `buf` as one field, with backslash, tab, newline and
/// carriage return escaped.
pub(crate) fn push_field(buf: &mut Vec<u8>, value: &[u8]) {
    for &byte in value {
        match byte {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            other => buf.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_specials() {
        let mut buf = Vec::new();
        push_field(&mut buf, b"a\\b\tc\nd\re");
        assert_eq!(buf, b"a\\\\b\\tc\\nd\\re");
    }
}
