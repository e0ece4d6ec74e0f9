//! Secrets as a type that cannot leak: no `Display`, a `Debug` that prints a placeholder, and a
//! single explicit accessor. [`ApiKey`] builds the `Authorization` header; [`DatabasePassword`]
//! is handed to the PostgreSQL connection and nowhere else. [`Secret::parse`] refuses text that
//! cannot be the secret (two lines, a control character; for a key, anything an HTTP header
//! cannot carry) and says what is wrong without ever quoting the text.

use std::fmt;
use std::marker::PhantomData;

/// What a [`Secret`] is, for its redacted `Debug` (`ApiKey(<redacted>)`).
pub trait SecretKind {
    const NAME: &'static str;
    /// Whether the secret must be visible ASCII without any whitespace: an API key goes into an
    /// HTTP header as `Bearer <key>` and is one token; a password may hold spaces or non-ASCII.
    const ONE_VISIBLE_ASCII_TOKEN: bool;
}

/// Marks a ChartHero API key.
#[derive(Debug)]
pub enum ApiKeyKind {}

impl SecretKind for ApiKeyKind {
    const NAME: &'static str = "ApiKey";
    const ONE_VISIBLE_ASCII_TOKEN: bool = true;
}

/// Marks the PostgreSQL warehouse's password.
#[derive(Debug)]
pub enum DatabasePasswordKind {}

impl SecretKind for DatabasePasswordKind {
    const NAME: &'static str = "DatabasePassword";
    const ONE_VISIBLE_ASCII_TOKEN: bool = false;
}

/// Marks the signing secret of ChartHero's webhook deliveries (`[webhook]`), which keys the
/// HMAC that `ChartHero-Signature` carries.
#[derive(Debug)]
pub enum WebhookSecretKind {}

impl SecretKind for WebhookSecretKind {
    const NAME: &'static str = "WebhookSecret";
    const ONE_VISIBLE_ASCII_TOKEN: bool = true;
}

/// Why a text cannot be a secret. The `Display` says what is wrong in words and never shows the
/// text: it completes "<source> …" (`api_key_file /etc/… holds more than one line`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretProblem {
    /// Nothing but whitespace.
    Empty,
    /// A line break between non-blank text: two lines, or a key and a comment.
    SeveralLines,
    /// A control character other than a line break (a tab, NUL, escape...).
    ControlCharacter,
    /// A key with a space inside it.
    InteriorWhitespace,
    /// A key with a character outside visible ASCII, which an HTTP header cannot carry as is.
    NotVisibleAscii,
}

impl fmt::Display for SecretProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretProblem::Empty => "is empty",
            SecretProblem::SeveralLines => {
                "holds more than one line; it must hold the secret alone, on one line"
            }
            SecretProblem::ControlCharacter => "contains a control character (such as a tab)",
            SecretProblem::InteriorWhitespace => {
                "contains whitespace inside the key; it must hold the key alone, on one line"
            }
            SecretProblem::NotVisibleAscii => {
                "contains characters other than visible ASCII, which an HTTP header cannot carry"
            }
        })
    }
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

/// The signing secret of one organization's webhook endpoint.
pub type WebhookSecret = Secret<WebhookSecretKind>;

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

    /// [`Secret::new`] for text an operator supplied (a file, a variable, a credential): after
    /// trimming surrounding whitespace, refuses text that cannot be the secret, so that a second
    /// line or a pasted comment is a configuration error naming the source, not a request or a
    /// login that fails later without saying where the secret came from.
    pub fn parse(text: &str) -> Result<Secret<K>, SecretProblem> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(SecretProblem::Empty);
        }
        if trimmed.contains(['\n', '\r']) {
            return Err(SecretProblem::SeveralLines);
        }
        // `char::is_control` covers C0, DEL and C1; a password's other Unicode is its own affair.
        if trimmed.chars().any(char::is_control) {
            return Err(SecretProblem::ControlCharacter);
        }
        if K::ONE_VISIBLE_ASCII_TOKEN {
            if trimmed.chars().any(char::is_whitespace) {
                return Err(SecretProblem::InteriorWhitespace);
            }
            if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(SecretProblem::NotVisibleAscii);
            }
        }
        Ok(Secret {
            text: trimmed.to_owned(),
            kind: PhantomData,
        })
    }

    /// The secret itself, for the one place that uses it (the `Authorization` header, the
    /// database connection, the webhook signature's HMAC) and nothing else.
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
    fn debug_never_shows_the_webhook_secret() {
        let secret = WebhookSecret::parse("whsec_canary\n").unwrap();
        let shown = format!("{secret:?} {:#?}", Some(&secret));
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("WebhookSecret(<redacted>)"), "{shown}");
    }

    #[test]
    fn blank_keys_are_rejected() {
        assert!(ApiKey::new(" \n").is_none());
        assert_eq!(ApiKey::parse(" \n\t").unwrap_err(), SecretProblem::Empty);
    }

    #[test]
    fn a_key_of_more_than_one_line_or_with_characters_a_header_cannot_carry_is_refused() {
        let cases = [
            ("ch_sk_canary\nextra\n", SecretProblem::SeveralLines),
            ("ch_sk_canary\r\nextra", SecretProblem::SeveralLines),
            (
                "ch_sk_canary # the clinic's key\n",
                SecretProblem::InteriorWhitespace,
            ),
            ("ch_sk_can\tary", SecretProblem::ControlCharacter),
            ("ch_sk_can\u{0}ary", SecretProblem::ControlCharacter),
            ("ch_sk_canäry", SecretProblem::NotVisibleAscii),
            ("ch_sk_can\u{a0}ary", SecretProblem::InteriorWhitespace),
        ];
        for (text, problem) in cases {
            let err = ApiKey::parse(text).unwrap_err();
            assert_eq!(err, problem, "{text:?}");
            assert!(!err.to_string().contains("canary"), "{err}");
        }
        assert_eq!(
            ApiKey::parse("  ch_sk_ok-1.2_3~\n").unwrap().expose(),
            "ch_sk_ok-1.2_3~"
        );
    }

    #[test]
    fn a_password_may_hold_spaces_and_unicode_but_not_two_lines() {
        assert_eq!(
            DatabasePassword::parse("correct horse bätterie\n")
                .unwrap()
                .expose(),
            "correct horse bätterie"
        );
        assert_eq!(
            DatabasePassword::parse("pw_canary\nextra\n").unwrap_err(),
            SecretProblem::SeveralLines
        );
        assert_eq!(
            DatabasePassword::parse("pw\u{1b}[0m").unwrap_err(),
            SecretProblem::ControlCharacter
        );
    }
}
