//! Authentication and authorization: API keys with scopes and lifecycle states, per-route
//! enablement, the organization-wide "API keys disabled" switch and production mode.
//!
//! `Access::authorize` runs the documented order — authentication, then partner route enablement,
//! then scopes — and answers with the reason code of the first failing check. Query validation
//! and resource lookup come after it and are not this module's concern.

use std::collections::HashMap;

use crate::model::{KeyState, Route};

/// Every scope the API knows, in bit order (a key granted all of them may call every route).
pub const ALL_SCOPES: [&str; 4] = [
    "encounters:read",
    "patients:read",
    "documents:read",
    "recordings:read",
];
const ENCOUNTERS: u8 = 1;
const PATIENTS: u8 = 2;
const DOCUMENTS: u8 = 4;
const RECORDINGS: u8 = 8;

fn required(route: Route) -> u8 {
    match route {
        Route::List | Route::Encounter => ENCOUNTERS | PATIENTS | DOCUMENTS,
        Route::Document | Route::Transcript => ENCOUNTERS | DOCUMENTS,
        Route::Audio => ENCOUNTERS | DOCUMENTS | RECORDINGS,
    }
}

/// Scope strings as a bit set; names the API does not know grant nothing and are ignored.
fn scope_bits(scopes: &[&str]) -> u8 {
    scopes
        .iter()
        .filter_map(|s| ALL_SCOPES.iter().position(|known| known == s))
        .fold(0, |bits, at| bits | (1 << at))
}

struct Key {
    scopes: u8,
    state: KeyState,
    org_scoped: bool,
}

/// A failed check: status and reason code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Denied {
    pub(crate) status: u16,
    pub(crate) reason_code: String,
    pub(crate) message: String,
}

fn denied(status: u16, reason_code: &str, message: impl Into<String>) -> Denied {
    Denied {
        status,
        reason_code: reason_code.to_owned(),
        message: message.into(),
    }
}

#[derive(Default)]
pub(crate) struct Access {
    keys: HashMap<String, Key>,
    disabled_routes: HashMap<Route, String>,
    pub(crate) production: bool,
    pub(crate) api_keys_disabled: bool,
}

impl Access {
    pub(crate) fn add_key(&mut self, key: &str, scopes: &[&str]) {
        self.keys.insert(
            key.to_owned(),
            Key {
                scopes: scope_bits(scopes),
                state: KeyState::Active,
                org_scoped: true,
            },
        );
    }

    /// Returns `false` when the key is unknown.
    /// Whether `token` is one of this organization's keys (whatever its state).
    pub(crate) fn knows(&self, token: &str) -> bool {
        self.keys.contains_key(token)
    }

    pub(crate) fn set_state(&mut self, key: &str, state: KeyState) -> bool {
        self.keys.get_mut(key).map(|k| k.state = state).is_some()
    }

    /// Returns `false` when the key is unknown.
    pub(crate) fn set_org_scoped(&mut self, key: &str, org_scoped: bool) -> bool {
        self.keys
            .get_mut(key)
            .map(|k| k.org_scoped = org_scoped)
            .is_some()
    }

    pub(crate) fn disable_route(&mut self, route: Route, reason: &str) {
        self.disabled_routes.insert(route, reason.to_owned());
    }

    pub(crate) fn enable_route(&mut self, route: Route) {
        self.disabled_routes.remove(&route);
    }

    /// Runs authentication, route enablement and scope checks for `route`.
    ///
    /// Authentication order: missing header → `missing_bearer`; not `Bearer ch_sk_…` →
    /// `malformed_token`; a `ch_sk_test_` key in production → `test_prefix_not_allowed`; unknown
    /// key → `invalid_key`; organization API keys disabled → `api_keys_disabled`; key state →
    /// `disabled_key`/`revoked_key`/`expired_key`. Then a key that is not organization-scoped →
    /// 403 `org_scope_only_required`, then route enablement, then scopes.
    pub(crate) fn authorize(&self, authorization: Option<&[u8]>, route: Route) -> Result<(), Denied> {
        let Some(header) = authorization else {
            return Err(denied(
                401,
                "missing_bearer",
                "Authorization: Bearer <api key> is required.",
            ));
        };
        let malformed = || denied(401, "malformed_token", "The bearer token is malformed.");
        let header = std::str::from_utf8(header).map_err(|_| malformed())?;
        let (scheme, token) = header.split_once(' ').ok_or_else(malformed)?;
        // The auth scheme is case-insensitive (RFC 9110); the token itself is not.
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(malformed());
        }
        let token = token.trim_start_matches(' ');
        let well_formed = token.len() > "ch_sk_".len()
            && token.starts_with("ch_sk_")
            && token.bytes().all(|b| b.is_ascii_graphic());
        if !well_formed {
            return Err(malformed());
        }
        if self.production && token.starts_with("ch_sk_test_") {
            return Err(denied(
                401,
                "test_prefix_not_allowed",
                "Test keys cannot be used against this environment.",
            ));
        }
        let Some(key) = self.keys.get(token) else {
            return Err(denied(401, "invalid_key", "The API key is not valid."));
        };
        if self.api_keys_disabled {
            return Err(denied(
                401,
                "api_keys_disabled",
                "API keys are disabled for this organization.",
            ));
        }
        match key.state {
            KeyState::Active => {}
            KeyState::Disabled => return Err(denied(401, "disabled_key", "The API key is disabled.")),
            KeyState::Revoked => return Err(denied(401, "revoked_key", "The API key was revoked.")),
            KeyState::Expired => return Err(denied(401, "expired_key", "The API key has expired.")),
        }
        if !key.org_scoped {
            return Err(denied(
                403,
                "org_scope_only_required",
                "Organization-scoped API keys are required.",
            ));
        }
        if let Some(reason) = self.disabled_routes.get(&route) {
            return Err(denied(
                403,
                reason,
                format!("The {route} route is not enabled for this organization."),
            ));
        }
        let missing = required(route) & !key.scopes;
        if missing != 0 {
            let names: Vec<&str> = (0..ALL_SCOPES.len())
                .filter(|bit| missing & (1 << bit) != 0)
                .map(|bit| ALL_SCOPES[bit])
                .collect();
            return Err(denied(
                403,
                "missing_scope",
                format!("The API key lacks required scope(s): {}.", names.join(", ")),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        let mut access = Access::default();
        access.add_key("ch_sk_full", &ALL_SCOPES);
        access.add_key("ch_sk_test_docs", &["encounters:read", "documents:read"]);
        access
    }

    fn reason(access: &Access, header: Option<&str>, route: Route) -> String {
        access
            .authorize(header.map(str::as_bytes), route)
            .map_or_else(|d| d.reason_code, |()| "ok".to_owned())
    }

    #[test]
    fn authentication_failures_have_distinct_reason_codes() {
        let mut a = access();
        assert_eq!(reason(&a, None, Route::List), "missing_bearer");
        assert_eq!(reason(&a, Some("Basic abc"), Route::List), "malformed_token");
        assert_eq!(reason(&a, Some("Bearer sk_live"), Route::List), "malformed_token");
        assert_eq!(reason(&a, Some("Bearer ch_sk_"), Route::List), "malformed_token");
        assert_eq!(reason(&a, Some("Bearer ch_sk_other"), Route::List), "invalid_key");
        assert_eq!(reason(&a, Some("bearer ch_sk_full"), Route::List), "ok");
        a.set_state("ch_sk_full", KeyState::Revoked);
        assert_eq!(reason(&a, Some("Bearer ch_sk_full"), Route::List), "revoked_key");
        a.api_keys_disabled = true;
        assert_eq!(
            reason(&a, Some("Bearer ch_sk_full"), Route::List),
            "api_keys_disabled"
        );
        a.production = true;
        assert_eq!(
            reason(&a, Some("Bearer ch_sk_test_docs"), Route::Document),
            "test_prefix_not_allowed"
        );
    }

    #[test]
    fn authorization_checks_org_scope_then_route_then_scopes() {
        let mut a = access();
        let docs = Some("Bearer ch_sk_test_docs");
        assert_eq!(reason(&a, docs, Route::Document), "ok");
        assert_eq!(reason(&a, docs, Route::List), "missing_scope");
        assert_eq!(reason(&a, docs, Route::Audio), "missing_scope");
        a.disable_route(Route::List, "organization_not_allowlisted");
        assert_eq!(reason(&a, docs, Route::List), "organization_not_allowlisted");
        a.set_org_scoped("ch_sk_test_docs", false);
        assert_eq!(reason(&a, docs, Route::List), "org_scope_only_required");
    }
}
