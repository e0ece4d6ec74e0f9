//! Secrets as a type that cannot leak: no `Display`, a `Debug` that prints a placeholder, and a
//! single explicit accessor. [`ApiKey`] builds the `Authorization` header; [`DatabasePassword`]
//! is handed to the PostgreSQL connection and nowhere else.

use std::fmt;
use std::marker::PhantomData;

/// What a [`Secret`] is, for its redacted `Debug` (`ApiKey(<redacted>)`).
pub trait SecretKind {
    const NAME: &'static str;
}

/// Marks a ChartHero API key.
#[derive(Debug)]
pub enum ApiKeyKind {}

impl SecretKind for ApiKeyKind {
    const NAME: &'static str = "ApiKey";
}

/// Marks the PostgreSQL warehouse's password.
#[derive(Debug)]
pub enum DatabasePasswordKind {}

impl SecretKind for DatabasePasswordKind {
    const NAME: &'static str = "DatabasePassword";
}

/// A secret read from a file or the environment. Only [`Secret::expose`] reveals it.
pub struct Secret<K: SecretKind> {
    text: String,
    kind: PhantomData<K>,
}

/// A ChartHero API key.
pub type ApiKey = Secret<ApiKeyKind>;

/// The PostgreSQL warehouse's password.
pub type DatabasePassword = Secret<DatabasePasswordKind>;

impl<K: SecretKind> Secret<K> {
    /// Wraps a secret read from a file or the environment, trimming surrounding whitespace
    /// (such files usually end with a newline). `None` when nothing is left.
    pub fn new(text: &str) -> Option<Secret<K>> {
        let trimmed = text.trim();
        (!trimmed.is_empty()).then(|| Secret {
            text: trimmed.to_owned(),
            kind: PhantomData,
        })
    }

    /// The secret itself, for the one place that sends it (the `Authorization` header, the
    /// database connection) and nothing else.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl<K: SecretKind> Clone for Secret<K> {
    fn clone(&self) -> Self {
        Secret {
            text: self.text.clone(),
            kind: PhantomData,
        }
    }
}

impl<K: SecretKind> PartialEq for Secret<K> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<K: SecretKind> Eq for Secret<K> {}

impl<K: SecretKind> fmt::Debug for Secret<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(<redacted>)", K::NAME)
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
        assert!(shown.contains("ApiKey(<redacted>)"), "{shown}");
    }

    #[test]
    fn debug_never_shows_the_database_password() {
        let password = DatabasePassword::new("pw_canary\n").unwrap();
        assert_eq!(password.expose(), "pw_canary");
        let shown = format!("{password:?} {:#?}", Some(&password));
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("DatabasePassword(<redacted>)"), "{shown}");
    }

    #[test]
    fn blank_keys_are_rejected() {
        assert!(ApiKey::new(" \n").is_none());
    }
}
