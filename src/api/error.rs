//! The one error type of the API client. It carries what the caller branches on (HTTP status,
//! `reason_code`, `field`, `Retry-After`) and classifies itself; it never carries the API key,
//! a signed URL, or text from a response body other than the documented error fields.

use std::fmt;
use std::time::Duration;

use super::Route;

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: 429, 5xx, timeouts, resets, truncated or invalid bodies. Try again later.
    Retryable,
    /// The key, its scopes or the partner's enablement must be fixed by a person.
    OperatorMustAct,
    /// This one record or document is gone or not available to this key; keep syncing others.
    ResourceUnavailable,
    /// The request we sent was wrong (unsupported filter, invalid parameter): a bug in this program.
    OurBug,
}

/// A failed API request.
#[derive(Debug, thiserror::Error)]
#[error("{route}: {kind}")]
pub struct ApiError {
    pub route: Route,
    pub kind: ApiErrorKind,
}

#[derive(Debug)]
pub enum ApiErrorKind {
    /// The server answered with a non-success status.
    Status {
        status: u16,
        /// `reason_code` of a JSON error body; `None` when the body was not the documented shape.
        reason_code: Option<String>,
        field: Option<String>,
        /// A parsed `Retry-After`, already converted to a delay from now.
        retry_after: Option<Duration>,
    },
    /// No answer within the connect, read or total timeout.
    Timeout,
    /// Connecting failed, or the connection broke before the whole body arrived.
    Transport(String),
    /// The body exceeded `api.max_response_bytes`.
    BodyTooLarge { limit: usize },
    /// A success status whose body is not the documented JSON (truncated, malformed, wrong shape).
    Decode(String),
    /// A signed URL reached its `expires_at` before it could be used; ask for a new one.
    LinkExpired,
    /// Writing a download to disk failed (full disk, permissions).
    LocalIo(String),
    /// The server asked for no requests until `until` (`Retry-After` longer than the longest
    /// wait a request is held for): nothing is sent to it with this key before then.
    Paused { until: time::OffsetDateTime },
}

impl fmt::Display for ApiErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiErrorKind::Status {
                status,
                reason_code,
                field,
                retry_after,
            } => {
                write!(f, "HTTP {status}")?;
                match reason_code {
                    Some(code) => write!(f, " {code}")?,
                    None => f.write_str(" (no reason_code)")?,
                }
                if let Some(field) = field {
                    write!(f, " (field `{field}`)")?;
                }
                if let Some(d) = retry_after {
                    write!(f, ", retry after {}s", d.as_secs_f64())?;
                }
                Ok(())
            }
            ApiErrorKind::Timeout => f.write_str("timed out"),
            ApiErrorKind::Transport(msg) => write!(f, "connection failed: {msg}"),
            ApiErrorKind::BodyTooLarge { limit } => {
                write!(
                    f,
                    "response body larger than api.max_response_bytes ({limit} bytes)"
                )
            }
            ApiErrorKind::Decode(msg) => write!(f, "malformed response body: {msg}"),
            ApiErrorKind::LinkExpired => f.write_str("the signed URL expired before it could be used"),
            ApiErrorKind::LocalIo(msg) => write!(f, "cannot write the download: {msg}"),
            ApiErrorKind::Paused { until } => write!(
                f,
                "ChartHero asked for no requests until {} (Retry-After); none is sent before then",
                crate::timefmt::format_utc(*until)
            ),
        }
    }
}

impl ApiError {
    /// The upstream `reason_code`, if the server sent one.
    pub fn reason_code(&self) -> Option<&str> {
        match &self.kind {
            ApiErrorKind::Status { reason_code, .. } => reason_code.as_deref(),
            _ => None,
        }
    }

    /// Whether the server refused a list range's bounds (422 `invalid_query` naming `start_at`
    /// or `end_at`): a server that reads them coarser than they were written refuses a range
    /// that collapses to nothing at its precision.
    pub fn refuses_a_bound(&self) -> bool {
        matches!(
            &self.kind,
            ApiErrorKind::Status { status: 422, reason_code: Some(code), field: Some(field), .. }
                if code == "invalid_query" && matches!(field.as_str(), "start_at" | "end_at")
        )
    }

    /// The HTTP status, if the server answered at all.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            ApiErrorKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match &self.kind {
            ApiErrorKind::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// 401: the key was refused. Never retried with the same key.
    pub fn is_auth(&self) -> bool {
        self.status() == Some(401)
    }

    /// No answer came (connect failed, reset, timed out): the host cannot be reached, as far as
    /// this request could tell.
    pub fn is_unreachable(&self) -> bool {
        matches!(self.kind, ApiErrorKind::Timeout | ApiErrorKind::Transport(_))
    }

    /// The server asked for a pause longer than a request is held for: no request is sent
    /// before it ends, and nothing is retried meanwhile.
    pub fn is_paused(&self) -> bool {
        matches!(self.kind, ApiErrorKind::Paused { .. })
    }

    pub fn class(&self) -> ErrorClass {
        let (status, reason) = match &self.kind {
            ApiErrorKind::Status {
                status, reason_code, ..
            } => (*status, reason_code.as_deref()),
            ApiErrorKind::Timeout
            | ApiErrorKind::Transport(_)
            | ApiErrorKind::Decode(_)
            | ApiErrorKind::Paused { .. } => {
                return ErrorClass::Retryable;
            }
            // Retrying cannot make the body smaller or the disk emptier: a person must act.
            ApiErrorKind::BodyTooLarge { .. } | ApiErrorKind::LocalIo(_) => {
                return ErrorClass::OperatorMustAct;
            }
            ApiErrorKind::LinkExpired => return ErrorClass::ResourceUnavailable,
        };
        match (status, reason) {
            (408 | 425 | 429, _) | (500..=599, _) => ErrorClass::Retryable,
            (401, _) => ErrorClass::OperatorMustAct,
            (403, Some("cross_organization_denied" | "demo_training_denied")) => {
                ErrorClass::ResourceUnavailable
            }
            // org_scope_only_required, missing_scope, route_not_allowed,
            // organization_not_allowlisted, and any 403 the vendor adds later.
            (403, _) => ErrorClass::OperatorMustAct,
            (404 | 409 | 410, _) => ErrorClass::ResourceUnavailable,
            (400, Some("unsupported_document_type")) => ErrorClass::ResourceUnavailable,
            // The vendor's 400 and 422 always carry a reason_code: one without is not its
            // documented answer (a proxy's page, a body cut short), so it is asked again.
            (400 | 422, None) => ErrorClass::Retryable,
            _ => ErrorClass::OurBug,
        }
    }
}

/// Removes quoted values from a serde_json error message: they could be patient data.
pub(crate) fn scrub_json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let mut out = String::with_capacity(msg.len());
    let mut in_quotes = false;
    for c in msg.chars() {
        if c == '"' {
            if in_quotes {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            in_quotes = !in_quotes;
        } else if !in_quotes {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, reason: &str) -> ApiError {
        ApiError {
            route: Route::ListEncounters,
            kind: ApiErrorKind::Status {
                status,
                reason_code: Some(reason.into()),
                field: None,
                retry_after: None,
            },
        }
    }

    #[test]
    fn every_documented_reason_code_has_its_class() {
        use ErrorClass::*;
        let table = [
            (400, "unsupported_filter", OurBug),
            (400, "unsupported_document_type", ResourceUnavailable),
            (401, "missing_bearer", OperatorMustAct),
            (401, "revoked_key", OperatorMustAct),
            (403, "org_scope_only_required", OperatorMustAct),
            (403, "missing_scope", OperatorMustAct),
            (403, "route_not_allowed", OperatorMustAct),
            (403, "organization_not_allowlisted", OperatorMustAct),
            (403, "cross_organization_denied", ResourceUnavailable),
            (403, "demo_training_denied", ResourceUnavailable),
            (404, "encounter_not_found", ResourceUnavailable),
            (422, "invalid_limit", OurBug),
            (422, "invalid_query", OurBug),
            (503, "digest_key_unavailable", Retryable),
            (429, "rate_limited", Retryable),
        ];
        for (code, reason, class) in table {
            assert_eq!(status(code, reason).class(), class, "{code} {reason}");
        }
    }

    #[test]
    fn a_400_without_the_documented_error_body_is_asked_again() {
        for code in [400, 422] {
            let e = ApiError {
                route: Route::Document,
                kind: ApiErrorKind::Status {
                    status: code,
                    reason_code: None,
                    field: None,
                    retry_after: None,
                },
            };
            assert_eq!(e.class(), ErrorClass::Retryable, "{code}");
        }
    }

    #[test]
    fn json_error_messages_lose_their_quoted_values() {
        let err = serde_json::from_str::<u32>("\"Jane Doe\"").unwrap_err();
        let scrubbed = scrub_json_error(&err);
        assert!(!scrubbed.contains("Jane"), "{scrubbed}");
        assert!(scrubbed.contains("invalid type"), "{scrubbed}");
    }
}
