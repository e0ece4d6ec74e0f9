//! `charthero-sync check`: can this configuration work? Reaches the API (DNS, TCP, TLS),
//! authenticates, and probes every route with harmless requests to learn which scopes and
//! enablements the key has — ChartHero has no "which scopes do I have" route. The API checks
//! authentication, enablement and scopes before it looks anything up, so a 404 for an ID that
//! does not exist proves a route is open to the key without touching real records.

use time::OffsetDateTime;

use crate::api::{ApiError, Client, ErrorClass, ListQuery, Route, SortOrder};
use crate::config::{Config, Organization};
use crate::timefmt::Micros;

/// An ID no record has: probing with it mints nothing (no signed URL) and reads nothing.
const PROBE_ID: &str = "charthero_sync_probe";

/// What one route answered.
#[derive(Debug)]
pub struct Probe {
    pub route: Route,
    /// The configuration uses this route.
    pub needed: bool,
    /// `Ok(note)` when the route is open to the key.
    pub result: Result<String, ApiError>,
}

impl Probe {
    pub fn works(&self) -> bool {
        self.result.is_ok()
    }

    /// A line of the report.
    pub fn describe(&self) -> String {
        let name = self.route.as_str();
        let needed = if self.needed {
            ""
        } else {
            " (not used by this configuration)"
        };
        match &self.result {
            Ok(note) => format!("{name:<16} ok      {note}{needed}"),
            Err(e) => format!("{name:<16} FAILED  {}{needed}", explain(e)),
        }
    }
}

fn explain(e: &ApiError) -> String {
    let hint = match e.reason_code() {
        Some("missing_scope") => match e.route {
            Route::Audio => " — the key lacks recordings:read",
            Route::ListEncounters | Route::Encounter => {
                " — the key needs encounters:read, patients:read and documents:read"
            }
            _ => " — the key needs encounters:read and documents:read",
        },
        Some("route_not_allowed" | "organization_not_allowlisted") => {
            " — ChartHero has not enabled this route for your organization"
        }
        Some(code) if e.is_auth() => match code {
            "revoked_key" | "expired_key" | "disabled_key" => " — issue a new key",
            _ => " — check the key and that it belongs to this host",
        },
        _ => "",
    };
    format!("{}{hint}", e.kind)
}

/// Whether an answer proves the route is open to this key.
fn open(result: Result<String, ApiError>) -> Result<String, ApiError> {
    match result {
        Err(e) if e.class() == ErrorClass::ResourceUnavailable => Ok(format!(
            "(probe answered {})",
            e.reason_code().unwrap_or("not found")
        )),
        other => other,
    }
}

/// Probes every route; stops after the first 401 (the key is refused everywhere).
pub async fn probe_routes(config: &Config, client: &Client) -> Vec<Probe> {
    let now = OffsetDateTime::now_utc();
    let list = client
        .list_encounters(&ListQuery {
            start_at: Some(Micros::floor(now - time::Duration::days(30))),
            end_at: Some(Micros::ceil(now)),
            offset: 0,
            limit: 1,
            sort: SortOrder::Desc,
        })
        .await;
    let refused = list.as_ref().err().is_some_and(ApiError::is_auth);
    let sample = list
        .as_ref()
        .ok()
        .and_then(|p| p.items.first())
        .map(|e| e.encounter_id.clone());
    let mut probes = vec![Probe {
        route: Route::ListEncounters,
        needed: true,
        result: list.map(|p| format!("({} encounters created in the last 30 days)", p.total)),
    }];
    if refused {
        return probes;
    }
    let encounter_id = sample.as_deref().unwrap_or(PROBE_ID);
    let checks = [
        (Route::Encounter, true),
        (Route::Document, config.content.details),
        (Route::Transcript, config.content.transcripts),
        (Route::Audio, config.audio.enabled),
    ];
    for (route, needed) in checks {
        let result = match route {
            Route::Encounter => client.encounter(encounter_id).await.map(|_| String::new()),
            Route::Document => client
                .document(encounter_id, PROBE_ID)
                .await
                .map(|_| String::new()),
            Route::Transcript => client
                .transcript(encounter_id, PROBE_ID)
                .await
                .map(|_| String::new()),
            _ => client.audio(encounter_id, PROBE_ID).await.map(|_| String::new()),
        };
        probes.push(Probe {
            route,
            needed,
            result: open(result),
        });
    }
    probes
}

/// Lists one encounter to see which clinic the key reads: `Err` (a line to print) when
/// `organization_id` is configured and the key reads another, so `check` refuses the key before
/// any sync writes a row of the wrong clinic.
pub async fn probe_organization(org: &Organization, client: &Client) -> Result<String, String> {
    let page = client
        .list_encounters(&ListQuery {
            start_at: None,
            end_at: None,
            offset: 0,
            limit: 1,
            sort: SortOrder::Desc,
        })
        .await;
    let found = match page {
        Ok(p) => p.items.into_iter().next().map(|e| e.organization_id),
        Err(e) => {
            return Ok(format!(
                "{:<16} ?       not known: {}",
                "organization_id",
                explain(&e)
            ));
        }
    };
    match (&org.organization_id, found) {
        (_, None) => Ok(format!(
            "{:<16} ?       not known: the key lists no encounter yet",
            "organization_id"
        )),
        (Some(expected), Some(found)) if *expected != found => Err(format!(
            "{:<16} FAILED  the key lists encounters of {found}, but organization_id = {expected:?} is \
             configured for {}: refused",
            "organization_id", org.name
        )),
        (Some(_), Some(found)) => Ok(format!(
            "{:<16} ok      {found} (as configured)",
            "organization_id"
        )),
        (None, Some(found)) => Ok(format!(
            "{:<16} ok      {found} (not configured; the first sync records it and holds the key to it)",
            "organization_id"
        )),
    }
}
