//! How error messages quote a value the client sent.

/// The most characters of a client's value an error message repeats.
const MAX_QUOTED_CHARS: usize = 64;

/// `value` as an error message quotes it: whole if short, else its first
/// [`MAX_QUOTED_CHARS`] characters and `…`, so a huge value does not come
/// back as a huge answer (or log line).
pub fn shortened(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => value.to_owned(),
        Some((end, _)) => format!("{}…", &value[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        assert_eq!(shortened("short"), "short");
        let exact = "é".repeat(MAX_QUOTED_CHARS);
        assert_eq!(shortened(&exact), exact);
        let long = "é".repeat(MAX_QUOTED_CHARS + 1);
        assert_eq!(shortened(&long), format!("{exact}…"));
    }
}
