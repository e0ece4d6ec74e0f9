//! `charthero-sync check`: can this configuration work? Reaches the API (DNS, TCP, TLS),
//! authenticates, and probes every route with harmless requests to learn which scopes and
//! enablements the key has — ChartHero has no "which scopes do I have" route. The API checks
//! authentication, enablement and scopes before it looks anything up, so a 404 for an ID that
//! does not exist proves a route is open to the key without touching real records. Also reports
//! the warehouse: a SQLite file's location, or a PostgreSQL server's transport, version, schema
//! and readers' role ([`check_database`]).

use std::collections::HashMap;
use std::path::Path;

use time::OffsetDateTime;

use crate::api::{ApiError, Client, ErrorClass, ListQuery, Route, SortOrder};
use crate::config::{AudioConfig, Config, DatabaseConfig, DatabaseTarget, Organization};
use crate::store::{self, LocationError, StateTime};
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

/// Probes every route; stops after the list probe when it was refused (401: the key is refused
/// everywhere) or ChartHero could not be reached (every other probe would wait out the same
/// retries to say the same).
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
    let refused = list
        .as_ref()
        .err()
        .is_some_and(|e| e.is_auth() || e.is_unreachable());
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

/// What an earlier sync kept in the warehouse that `check` and `plan` must honour before they
/// send anything with a key, read in one reading of the warehouse (none when it is not created
/// yet).
#[derive(Debug, Default)]
pub struct Kept {
    /// The pauses ChartHero asked of these organizations' keys (`Retry-After`), by organization
    /// name: each organization's client is held to its pause (`Client::pause_until`), as a sync
    /// cycle's start does, and sends nothing with that key before it is over.
    pub pauses: HashMap<String, OffsetDateTime>,
    /// ChartHero's `organization_id` recorded for each configured name (of any configuration):
    /// a sync refuses a key that reads another clinic than its name's, or one another name holds.
    pub clinics: HashMap<String, String>,
}

/// Reads [`Kept`] for `organizations`.
pub async fn kept(database: &DatabaseConfig, organizations: &[Organization]) -> anyhow::Result<Kept> {
    let database = database.clone();
    let names: Vec<String> = organizations.iter().map(|o| o.name.clone()).collect();
    store::blocking(move || {
        let mut kept = Kept::default();
        if store::applied_version(&database)? > 0 {
            let warehouse = store::open_reader(&database)?;
            for name in names {
                if let Some(until) = warehouse.state_time(&name, StateTime::PausedUntil)? {
                    kept.pauses.insert(name, until);
                }
            }
            kept.clinics = warehouse.recorded_clinics()?.into_iter().collect();
        }
        Ok(kept)
    })
    .await
}

/// Lists one encounter to see which clinic the key reads: `Err` (a line to print) when a sync
/// would refuse the key — it reads another clinic than the configured `organization_id`, than
/// the warehouse records for this name, or one another name holds (in the warehouse, or among
/// the organizations this `check` probed before: `claimed`, which this probe adds to) — so
/// `check` refuses the key before any sync writes a row of the wrong clinic.
pub async fn probe_organization(
    org: &Organization,
    client: &Client,
    clinics: &HashMap<String, String>,
    claimed: &mut HashMap<String, String>,
) -> Result<String, String> {
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
    let Some(found) = found else {
        return Ok(format!(
            "{:<16} ?       not known: the key lists no encounter yet",
            "organization_id"
        ));
    };
    let recorded = clinics.get(&org.name);
    let holder = clinics
        .iter()
        .find(|(name, id)| **id == found && **name != org.name)
        .map(|(name, _)| format!("organization {name} of this warehouse"))
        .or_else(|| {
            claimed
                .get(&found)
                .filter(|name| **name != org.name)
                .map(|name| format!("organization {name} (above)"))
        });
    let refused = |why: String| {
        Err(format!(
            "{:<16} FAILED  the key lists encounters of {found}, but {why}: refused",
            "organization_id"
        ))
    };
    match (&org.organization_id, recorded, holder) {
        (Some(expected), _, _) if *expected != found => refused(format!(
            "organization_id = {expected:?} is configured for {}",
            org.name
        )),
        (_, Some(recorded), _) if *recorded != found => refused(format!(
            "this warehouse holds organization_id {recorded:?} for {}",
            org.name
        )),
        (_, _, Some(holder)) => refused(format!("{holder} reads that clinic")),
        (configured, recorded, None) => {
            claimed.insert(found.clone(), org.name.clone());
            let how = match (configured, recorded) {
                (Some(_), _) => "as configured",
                (None, Some(_)) => "as this warehouse records",
                (None, None) => "not configured; the first sync records it and holds the key to it",
            };
            Ok(format!("{:<16} ok      {found} ({how})", "organization_id"))
        }
    }
}

/// Checks, without creating anything, that a sync can keep recordings in `audio.directory` when
/// `[audio]` is enabled: it is a directory this user may create files in, or, when it does not
/// exist yet, its nearest existing ancestor is one (the sync creates it). `Err` says why not;
/// `check` reports it, and `run` and `sync` refuse to start (exit 2) rather than fail every cycle.
pub fn audio_directory(audio: &AudioConfig) -> Result<(), String> {
    use rustix::fs::{Access, access};
    if !audio.enabled {
        return Ok(());
    }
    let mut dir = audio.directory.as_path();
    loop {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
                // A relative path: it is created in the working directory.
                Some(_) => dir = Path::new("."),
                None => return Err(format!("{} cannot be created", audio.directory.display())),
            },
            Err(e) => return Err(format!("cannot reach {}: {e}", dir.display())),
        }
    }
    access(dir, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
        if dir == audio.directory {
            format!("this user cannot create files in {} ({e})", dir.display())
        } else {
            format!(
                "{} does not exist and this user cannot create it in {} ({e})",
                audio.directory.display(),
                dir.display()
            )
        }
    })
}

/// Why `check` found the warehouse unusable.
#[derive(Debug)]
pub enum DatabaseProblem {
    /// A location this host's configuration gets wrong (exit 2).
    Location(LocationError),
    /// The PostgreSQL server cannot be reached, refuses the role, or fails TLS; or the
    /// warehouse's schema is newer than this release's.
    Server(anyhow::Error),
    /// The SQLite file is there but cannot be read as a warehouse (damaged, not a database).
    File(store::StoreError),
}

/// The database's lines of `check`'s table, and whether a writer can use it. SQLite: the
/// location check and, when the file exists, its schema version read (nothing is created).
/// PostgreSQL: connects without creating anything and
/// reports the transport (TLS state), the server's version, the schema version applied (and
/// whether it is this release's) and whether the role `charthero_readers` exists.
pub async fn check_database(database: &DatabaseConfig) -> (Vec<String>, Result<(), DatabaseProblem>) {
    let pg = match &database.target {
        DatabaseTarget::Sqlite { path } => {
            if let Err(e) = store::check_location(&database.target) {
                return (
                    vec![format!("database.path    FAILED  {}", e.reason())],
                    Err(DatabaseProblem::Location(e)),
                );
            }
            let db = database.clone();
            let release = store::release_version(&database.target);
            return match store::blocking(move || store::applied_version(&db)).await {
                Ok(0) => (
                    vec![format!(
                        "database.path    ok      {} (not created yet; `migrate` or the first sync creates it)",
                        path.display()
                    )],
                    Ok(()),
                ),
                Ok(v) if v > release => {
                    let why = format!(
                        "{} has schema version {v}, newer than this release knows ({release}): use the release that wrote it",
                        path.display(),
                    );
                    (
                        vec![format!("database.path    FAILED  {why}")],
                        Err(DatabaseProblem::Server(anyhow::anyhow!(why))),
                    )
                }
                Ok(v) => (
                    vec![format!(
                        "database.path    ok      {} (schema version {v}{})",
                        path.display(),
                        if v == release {
                            ", this release's"
                        } else {
                            "; `migrate` or the next sync brings it to this release's"
                        }
                    )],
                    Ok(()),
                ),
                Err(e) => {
                    let e = store::StoreError::new(path.display(), e);
                    (
                        vec![format!("database.path    FAILED  {e}")],
                        Err(DatabaseProblem::File(e)),
                    )
                }
            };
        }
        DatabaseTarget::Postgres(pg) => pg.clone(),
    };
    if let Err(e) = store::check_location(&database.target) {
        return (
            vec![format!("{:<16} FAILED  {}", e.key(), e.reason())],
            Err(DatabaseProblem::Location(e)),
        );
    }
    let shown = pg.to_string();
    let db = database.clone();
    let report = store::blocking(move || {
        let report = store::describe_postgres(&pg)?;
        // Whether the schema is exactly this release's: what `backfill` requires, and what a
        // writer reaches by migrating.
        let current = match report.schema_version {
            Some(_) => store::open_current(&db).map(drop).map_err(|e| format!("{e:#}")),
            None => Err("not created yet; `migrate` (or the first `run`/`sync`) creates it".to_owned()),
        };
        Ok((report, current))
    })
    .await;
    let (report, current) = match report {
        Ok(r) => r,
        Err(e) => {
            return (
                vec![format!("database.url     FAILED  {e:#}")],
                Err(DatabaseProblem::Server(e)),
            );
        }
    };
    let mut lines = vec![
        format!("database.url     ok      {shown}"),
        format!("database.tls     ok      {}", report.transport),
        format!("database.server  ok      PostgreSQL {}", report.server_version),
    ];
    lines.push(match (report.schema_version, current) {
        (Some(v), Ok(())) => format!("database.schema  ok      version {v}, this release's"),
        (Some(v), Err(why)) => format!("database.schema  note    version {v}: {why}"),
        (None, Err(why)) => format!("database.schema  note    {why}"),
        (None, Ok(())) => "database.schema  ok      this release's".to_owned(),
    });
    lines.push(if report.readers_role {
        "database.readers ok      role charthero_readers exists".to_owned()
    } else {
        "database.readers note    role charthero_readers does not exist yet; the first migration creates it"
            .to_owned()
    });
    lines.push(if report.rewrites_statistics {
        format!(
            "database.owner   ok      role {} may rewrite pg_statistic in database {}: a purge leaves no purged ID in the planner's statistics",
            report.role, report.database
        )
    } else {
        format!(
            "database.owner   note    role {} neither owns database {} nor is a superuser (nor, on \
             PostgreSQL 17, in pg_maintain): a purge cannot rewrite pg_statistic, where the statistics \
             it replaced may keep purged encounter, document and patient IDs (docs/postgres.md, \
             \"Privacy, purges and PHI on the server\")",
            report.role, report.database
        )
    });
    (lines, Ok(()))
}
