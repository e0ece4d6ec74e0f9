//! The API key as a type that cannot leak: no `Display`, a `Debug` that prints a placeholder,
//! and a single explicit accessor used to build the `Authorization` header.

use std::fmt;

/// A ChartHero API key. Only [`ApiKey::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key read from a file or the environment, trimming surrounding whitespace
    /// (key files usually end with a newline). `None` when nothing is left.
    pub fn new(text: &str) -> Option<ApiKey> {
        let trimmed = text.trim();
        (!trimmed.is_empty()).then(|| ApiKey(trimmed.to_owned()))
    }

    /// The key itself, for the `Authorization` header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::new(" ch_sk_canary_123\n").unwrap();
        assert_eq!(key.expose(), "ch_sk_canary_123");
        let shown = format!("{key:?} {:#?} {:?}", key, Some(&key));
        assert!(!shown.contains("canary"), "{shown}");
    }

    #[test]
    fn blank_keys_are_rejected() {
        assert!(ApiKey::new(" \n").is_none());
    }
}
