//! Identifiers that end up in SQL text.

use saga_core::{Error, Result};

/// Checks that `name` is a plain SQL identifier we may put in SQL text:
/// 1 to 48 characters (so derived names such as the notification channel
/// `<schema>_saga_outbox` stay within PostgreSQL's 63), lowercase ASCII
/// letters, digits and `_`, not starting with a digit. Everything else is
/// bound as a value, never formatted in.
pub fn validate_identifier(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "`{name}` is not a valid schema name: use 1 to 48 lowercase letters, digits and `_`, not starting with a digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_identifier;

    #[test]
    fn only_plain_identifiers_pass() {
        for good in ["saga", "orders_saga", "t_0193abc", "_x"] {
            assert!(validate_identifier(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Saga",
            "1abc",
            "a-b",
            "a.b",
            "x; DROP TABLE y",
            "a\"b",
            &"a".repeat(49),
        ] {
            let error = validate_identifier(bad).unwrap_err();
            assert!(
                error.to_string().contains("not a valid schema name"),
                "{bad}: {error}"
            );
        }
    }
}
