//! Addresses as they may be printed: with their secrets masked.
//!
//! Every crate of the workspace formats a server address (in an error, a
//! `Debug` output or a log line) through [`redact_url`], and a client
//! property through [`redact_property`], so a password never reaches a log.

use std::borrow::Cow;

/// What a masked secret reads as.
pub const MASK: &str = "***";

/// Query parameters that carry a secret.
const SECRET_PARAMETERS: [&str; 6] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "sslpassword",
];

/// `url` with its password masked: the one in the user information
/// (`amqp://guest:***@host`, `redis://:***@host`) and the value of any query
/// parameter named like a secret (`?password=***`). A user name stays, so the
/// address still says who connects. Anything else comes back as it is.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut rest = url;
    if let Some(scheme_end) = url.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = url[authority_start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| authority_start + i);
        let authority = &url[authority_start..authority_end];
        // The last `@` ends the user information: a password may hold another.
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some(colon) = userinfo.find(':') {
                out.push_str(&url[..authority_start]);
                out.push_str(&userinfo[..colon]);
                out.push(':');
                out.push_str(MASK);
                out.push_str(&authority[at..]);
                rest = &url[authority_end..];
            }
        }
    }
    if let Some(query_start) = rest.find('?') {
        let (before, query) = rest.split_at(query_start + 1);
        let (query, fragment) = query.split_at(query.find('#').unwrap_or(query.len()));
        let mut changed = false;
        let parameters: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret(key) => {
                    changed = true;
                    format!("{key}={MASK}")
                }
                _ => pair.to_owned(),
            })
            .collect();
        if changed {
            out.push_str(before);
            out.push_str(&parameters.join("&"));
            out.push_str(fragment);
            return Cow::Owned(out);
        }
    }
    if out.is_empty() {
        Cow::Borrowed(url)
    } else {
        out.push_str(rest);
        Cow::Owned(out)
    }
}

/// A client property's value as it may be printed: masked when its key names
/// a secret (`sasl.password`, `ssl.key.password`, `sasl.jaas.config`,
/// `sasl.oauthbearer.client.secret`, ...), unchanged otherwise.
pub fn redact_property<'a>(key: &str, value: &'a str) -> &'a str {
    let key = key.to_ascii_lowercase();
    if [
        "password",
        "secret",
        "jaas",
        "token",
        "ssl.key.pem",
        "credential",
    ]
    .iter()
    .any(|secret| key.contains(secret))
    {
        MASK
    } else {
        value
    }
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_PARAMETERS.contains(&key.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_user_information_are_masked() {
        for (url, printed) in [
            (
                "amqp://guest:s3cret@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "redis://:s3cret@127.0.0.1:6379/15",
                "redis://:***@127.0.0.1:6379/15",
            ),
            (
                "postgres://app:p@ss@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            ("rediss://user:s3cret@host", "rediss://user:***@host"),
        ] {
            assert_eq!(redact_url(url), printed);
        }
    }

    #[test]
    fn secret_query_parameters_are_masked() {
        assert_eq!(
            redact_url("postgres://app@db/shop?sslmode=require&password=s3cret#x"),
            "postgres://app@db/shop?sslmode=require&password=***#x"
        );
        assert_eq!(
            redact_url("postgres://app:a@db/shop?Token=t"),
            "postgres://app:***@db/shop?Token=***"
        );
    }

    #[test]
    fn addresses_without_secrets_are_unchanged() {
        for url in [
            "amqp://guest@127.0.0.1:5672/%2f",
            "redis://127.0.0.1:6379",
            "127.0.0.1:9092,127.0.0.1:9093",
            "sqlite://orders.db?mode=rwc",
            "not a url",
        ] {
            assert!(matches!(redact_url(url), Cow::Borrowed(u) if u == url));
        }
    }

    #[test]
    fn secret_properties_are_masked() {
        assert_eq!(redact_property("sasl.password", "s3cret"), MASK);
        assert_eq!(redact_property("sasl.jaas.config", "x"), MASK);
        assert_eq!(redact_property("ssl.key.password", "x"), MASK);
        assert_eq!(redact_property("sasl.username", "app"), "app");
        assert_eq!(redact_property("linger.ms", "5"), "5");
    }
}
