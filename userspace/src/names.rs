//! Names of configuration objects (VIPs, flows, streams, trenches, conduits,
//! tap services, xDS clusters): one rule for every plugin.

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 253;

/// A name that breaks the rule; says which field and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: bad name {value:?}: {reason}; use 1-253 characters from [A-Za-z0-9-+_.]")]
pub struct NameError {
    pub field: String,
    pub value: String,
    pub reason: &'static str,
}

/// Checks a name: 1..=253 bytes of `[A-Za-z0-9-+_.]`.
pub fn validate_name(field: &str, value: &str) -> Result<(), NameError> {
    let reason = if value.is_empty() {
        "empty"
    } else if value.len() > MAX_NAME_LEN {
        "longer than 253 bytes"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-+_.".contains(&b))
    {
        "invalid character"
    } else {
        return Ok(());
    };
    Err(NameError {
        field: field.to_string(),
        value: value.to_string(),
        reason,
    })
}

/// `text` cut to at most `limit` bytes (at a character boundary) for a log
/// line or an error message: untrusted input may be megabytes long.
pub fn cut(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return text.into();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut, {} bytes in all)", &text[..end], text.len()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_short_text_and_whole_characters() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "abc… (cut, 4 bytes in all)");
        // 'é' is two bytes: a cut inside it backs off to the boundary.
        assert_eq!(cut("aéb", 2), "a… (cut, 4 bytes in all)");
    }

    #[test]
    fn names() {
        assert!(validate_name("x", "a-Z_0.9+b").is_ok());
        assert!(validate_name("x", &"a".repeat(253)).is_ok());
        assert_eq!(
            validate_name("flow name", ""),
            Err(NameError {
                field: "flow name".into(),
                value: "".into(),
                reason: "empty"
            })
        );
        assert!(matches!(
            validate_name("x", &"a".repeat(254)),
            Err(NameError {
                reason: "longer than 253 bytes",
                ..
            })
        ));
        for bad in ["a b", "a/b", "é", "a:b", "a*"] {
            assert!(
                matches!(
                    validate_name("x", bad),
                    Err(NameError {
                        reason: "invalid character",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
