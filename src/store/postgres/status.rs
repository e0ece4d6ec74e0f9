//! The reads of `charthero-sync status` on PostgreSQL (mirrors `store::sqlite::status` rule for
//! rule: the same rows, counts and order). Timestamps come back as `timestamptz` and are shown
//! in the text SQLite stores ([`format_stored`]), so the report reads the same on both backends.
//! Statements that SQLite runs one by one are folded into fewer round trips where that changes
//! nothing but the number of trips.

use postgres::{GenericClient, Row};
use time::OffsetDateTime;

use crate::status::{
    Audit, Backfill, Database, DeadLetter, LastError, OrganizationStatus, Queue, Rows, Run, RunningCycle,
    Status,
};
use crate::timefmt::{format_stored, from_unix_nanos};

/// How many completed backfills `status` lists (newest), besides every unfinished one.
const COMPLETED_BACKFILLS_SHOWN: i64 = 5;

const RUN_COLUMNS: &str = "run_id, trigger, started_at, finished_at, outcome, list_requests, encounters_new,
    encounters_changed, encounters_removed, documents_fetched, transcripts_fetched, recordings_fetched,
    retries, dead_letters, organization";

/// A [`Run`] from the first columns of `r` ([`RUN_COLUMNS`]).
fn run_row(r: &Row) -> Result<Run, postgres::Error> {
    Ok(Run {
        run_id: r.try_get(0)?,
        trigger: r.try_get(1)?,
        started_at: format_stored(r.try_get(2)?),
        finished_at: r.try_get::<_, Option<OffsetDateTime>>(3)?.map(format_stored),
        outcome: r.try_get(4)?,
        list_requests: r.try_get(5)?,
        encounters_new: r.try_get(6)?,
        encounters_changed: r.try_get(7)?,
        encounters_removed: r.try_get(8)?,
        documents_fetched: r.try_get(9)?,
        transcripts_fetched: r.try_get(10)?,
        recordings_fetched: r.try_get(11)?,
        retries: r.try_get(12)?,
        dead_letters: r.try_get(13)?,
        organization: r.try_get(14)?,
    })
}

/// The error of a finished run (`None` when it succeeded) and the routes it disabled, from
/// `run_id, outcome, error, reason_code, disabled_routes` at `at..at + 5` of `r`.
fn run_end(r: &Row, at: usize) -> Result<(Option<LastError>, Vec<String>), postgres::Error> {
    let error = LastError {
        run_id: r.try_get(at)?,
        outcome: r.try_get(at + 1)?,
        error: r.try_get(at + 2)?,
        reason_code: r.try_get(at + 3)?,
    };
    let routes = super::super::split_routes(r.try_get(at + 4)?);
    Ok(((error.outcome != "succeeded").then_some(error), routes))
}

/// The content queue, from `crate::store::queue_sql!`.
fn queue(
    db: &mut impl GenericClient,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> anyhow::Result<Queue> {
    let row = db.query_one(sql, params)?;
    Ok(Queue::from_counts([
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
    ]))
}

/// One organization's entry.
fn read_organization(db: &mut impl GenericClient, name: &str) -> anyhow::Result<OrganizationStatus> {
    let complete_through = super::ledger::complete_through(db, name)?;
    let organization_id = super::ledger::known_organization_id(db, name)?;
    let last = db.query_opt(
        &format!(
            "SELECT {RUN_COLUMNS}, run_id, outcome, error, reason_code, disabled_routes FROM sync_runs
             WHERE organization = $1 AND outcome <> 'running'
             ORDER BY run_id DESC LIMIT 1"
        ),
        &[&name],
    )?;
    let (last_run, last_error, disabled_routes) = match &last {
        Some(r) => {
            // The run's end follows its RUN_COLUMNS.
            let (error, routes) = run_end(r, RUN_COLUMNS.split(',').count())?;
            (Some(run_row(r)?), error, routes)
        }
        None => (None, None, Vec::new()),
    };
    let reason_code = last_error.as_ref().and_then(|e| e.reason_code.clone());
    let counts = db.query_one(
        "SELECT (SELECT count(*) FROM encounters WHERE organization_id = $1 AND removed_at IS NULL),
                (SELECT count(*) FROM encounters WHERE organization_id = $1 AND removed_at IS NOT NULL),
                (SELECT count(*) FROM documents WHERE organization_id = $1 AND removed_at IS NULL),
                (SELECT count(*) FROM transcripts WHERE organization_id = $1),
                (SELECT count(*) FROM dead_letters WHERE organization = $2),
                (SELECT count(*) FROM backfills WHERE organization = $2 AND status IN ('queued', 'running'))",
        &[&organization_id, &name],
    )?;
    let queue = queue(
        db,
        crate::store::queue_sql!(" AND d.organization_id = $1"),
        &[&organization_id],
    )?;
    let running_cycle = db
        .query_opt(
            "SELECT run_id, trigger, started_at FROM sync_runs WHERE organization = $1 AND outcome = 'running'
             ORDER BY run_id DESC LIMIT 1",
            &[&name],
        )?
        .map(|r| {
            Ok::<_, postgres::Error>(RunningCycle {
                run_id: r.try_get(0)?,
                trigger: r.try_get(1)?,
                started_at: format_stored(r.try_get(2)?),
                // Decided with the heartbeat by `status::read`.
                progress_at: None,
                stalled: false,
            })
        })
        .transpose()?;
    Ok(OrganizationStatus {
        name: name.to_owned(),
        // Rendered, with its lag, by `status::read`.
        complete_through: complete_through.map(format_stored),
        lag_seconds: None,
        // Decided from the facts above by `status::read`.
        state: String::new(),
        reason_code,
        last_run,
        last_error,
        disabled_routes,
        // Read by `status::read`, as the same instant kept on every backend.
        paused_until: None,
        encounters: counts.try_get(0)?,
        encounters_removed: counts.try_get(1)?,
        documents: counts.try_get(2)?,
        transcripts: counts.try_get(3)?,
        dead_letters: counts.try_get(4)?,
        backfills_pending: counts.try_get(5)?,
        running_cycle,
        queue,
        // Filled in by `Status::estimate`, which knows the configuration.
        content_requests_pending: 0,
        encounters_unlisted_estimate: 0,
        eta_seconds: None,
        webhooks: super::webhook::webhook_summary(db, name)?,
        organization_id,
    })
}

/// Reads the status from the warehouse: the whole warehouse, and one entry per organization —
/// those named in `configured` first (in that order), then any other the warehouse holds
/// bookkeeping for (in byte order, as SQLite sorts them, whatever the database's collation).
/// Whatever depends on the time (watermarks, lags) is `status::read`'s. `location` is what the
/// report names as the database: the URL without its password (the one parameter SQLite's does
/// not take; it reads its file's path from the connection).
pub fn read_status(
    db: &mut impl GenericClient,
    _now: OffsetDateTime,
    configured: &[String],
    location: &str,
) -> anyhow::Result<Status> {
    let mut names: Vec<String> = configured.to_vec();
    for r in db.query(
        "SELECT organization FROM (SELECT organization FROM organizations
                                   UNION SELECT organization FROM sync_runs) AS o
         ORDER BY organization COLLATE \"C\"",
        &[],
    )? {
        let n: String = r.try_get(0)?;
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let organizations = names
        .iter()
        .map(|n| read_organization(db, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let c = db.query_one(
        "SELECT (SELECT count(*) FROM encounters WHERE removed_at IS NULL),
                (SELECT count(*) FROM encounters WHERE removed_at IS NOT NULL),
                (SELECT count(*) FROM patients),
                (SELECT count(*) FROM documents WHERE removed_at IS NULL),
                (SELECT count(*) FROM documents WHERE content_text IS NOT NULL),
                (SELECT count(*) FROM transcripts),
                (SELECT count(*) FROM transcript_turns),
                (SELECT count(*) FROM recordings),
                (SELECT count(*) FROM dead_letters)",
        &[],
    )?;
    let rows = Rows {
        encounters: c.try_get(0)?,
        encounters_removed: c.try_get(1)?,
        encounters_staged: 0,
        patients: c.try_get(2)?,
        documents: c.try_get(3)?,
        notes_with_text: c.try_get(4)?,
        transcripts: c.try_get(5)?,
        transcript_turns: c.try_get(6)?,
        recordings: c.try_get(7)?,
    };
    let queue = queue(db, crate::store::queue_sql!(""), &[])?;
    let runs = db
        .query(
            &format!("SELECT {RUN_COLUMNS} FROM sync_runs ORDER BY run_id DESC LIMIT 10"),
            &[],
        )?
        .iter()
        .map(run_row)
        .collect::<Result<Vec<_>, _>>()?;
    let backfills = db
        .query(
            "SELECT backfill_id, range_start, range_end, cursor, status, windows, encounters_seen,
                    encounters_removed, error, requested_by, requested_at, finished_at, organization
             FROM backfills
             WHERE status <> 'completed'
                OR backfill_id IN (SELECT backfill_id FROM backfills WHERE status = 'completed'
                                   ORDER BY backfill_id DESC LIMIT $1)
             ORDER BY backfill_id",
            &[&COMPLETED_BACKFILLS_SHOWN],
        )?
        .iter()
        .map(|r| {
            Ok(Backfill {
                backfill_id: r.try_get(0)?,
                organization: r.try_get(12)?,
                range_start: format_stored(r.try_get(1)?),
                range_end: format_stored(r.try_get(2)?),
                cursor: r.try_get::<_, Option<OffsetDateTime>>(3)?.map(format_stored),
                status: r.try_get(4)?,
                requested_by: r.try_get(9)?,
                requested_at: format_stored(r.try_get(10)?),
                finished_at: r.try_get::<_, Option<OffsetDateTime>>(11)?.map(format_stored),
                // Derived from the range and cursor by `status::read`.
                progress: 0.0,
                eta_seconds: None,
                windows: r.try_get(5)?,
                encounters_seen: r.try_get(6)?,
                encounters_removed: r.try_get(7)?,
                error: r.try_get(8)?,
            })
        })
        .collect::<Result<Vec<_>, postgres::Error>>()?;
    // A schema before V5 (read before `migrate`) has no waits: every dead letter is asked by
    // the next cycle.
    let waits: bool = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                             WHERE table_schema = current_schema() AND table_name = 'dead_letters'
                               AND column_name = 'next_attempt_at_ns')",
            &[],
        )?
        .try_get(0)?;
    let dead_letters = db
        .query(
            &format!(
                "SELECT work, encounter_id, document_id, attempts, last_failed_at, reason_code, last_error,
                        organization, {}
                 FROM dead_letters ORDER BY first_failed_at LIMIT 20",
                if waits {
                    "next_attempt_at_ns"
                } else {
                    "NULL::bigint"
                }
            ),
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(DeadLetter {
                organization: r.try_get(7)?,
                work: r.try_get(0)?,
                encounter_id: r.try_get(1)?,
                document_id: r.try_get(2)?,
                attempts: r.try_get(3)?,
                last_failed_at: format_stored(r.try_get(4)?),
                reason_code: r.try_get(5)?,
                last_error: r.try_get(6)?,
                next_attempt_at: r
                    .try_get::<_, Option<i64>>(8)?
                    .map(|ns| format_stored(from_unix_nanos(ns))),
            })
        })
        .collect::<Result<Vec<_>, postgres::Error>>()?;
    let (last_error, disabled_routes) = match db.query_opt(
        "SELECT run_id, outcome, error, reason_code, disabled_routes FROM sync_runs
         WHERE outcome <> 'running' ORDER BY run_id DESC LIMIT 1",
        &[],
    )? {
        Some(r) => run_end(&r, 0)?,
        None => (None, Vec::new()),
    };
    let audit = db
        .query_opt(
            "SELECT audit_id, status, range_start, range_end, cursor, started_at, finished_at, ranges,
                 probes, differing, rescanned, list_requests, error, organization
             FROM audits ORDER BY audit_id DESC LIMIT 1",
            &[],
        )?
        .map(|r| {
            Ok::<_, postgres::Error>(Audit {
                audit_id: r.try_get(0)?,
                organization: r.try_get(13)?,
                status: r.try_get(1)?,
                range_start: format_stored(r.try_get(2)?),
                range_end: format_stored(r.try_get(3)?),
                cursor: format_stored(r.try_get(4)?),
                started_at: format_stored(r.try_get(5)?),
                finished_at: r.try_get::<_, Option<OffsetDateTime>>(6)?.map(format_stored),
                ranges: r.try_get(7)?,
                probes: r.try_get(8)?,
                differing: r.try_get(9)?,
                rescanned: r.try_get(10)?,
                list_requests: r.try_get(11)?,
                error: r.try_get(12)?,
            })
        })
        .transpose()?;
    Ok(Status {
        database: Database {
            backend: "postgresql",
            location: location.to_owned(),
        },
        // The organization furthest behind: decided by `status::read`.
        complete_through: None,
        lag_seconds: None,
        organizations,
        rows,
        queue,
        runs,
        backfills,
        audit,
        dead_letter_count: c.try_get(8)?,
        dead_letters,
        disabled_routes,
        last_error,
    })
}

/// Live encounters, and the live documents that are notes, finished transcripts and anything
/// else: the content mix `status` estimates a backfill's requests with.
pub fn live_content_counts(db: &mut impl GenericClient) -> anyhow::Result<[i64; 4]> {
    let r = db.query_one(
        concat!(
            "SELECT (SELECT count(*) FROM encounters WHERE removed_at IS NULL),
                count(*) FILTER (WHERE schema_type = 'document'),
                count(*) FILTER (WHERE schema_type = 'ambient_transcript' AND ",
            crate::store::may_be_final_sql!("status"),
            "),
                count(*) FILTER (WHERE schema_type NOT IN ('document', 'ambient_transcript'))
         FROM documents WHERE removed_at IS NULL"
        ),
        &[],
    )?;
    Ok([r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?])
}

/// Test fixtures shared with `audit`'s tests: the same warehouse on both backends, filled through
/// the seam, so every read can be compared with what the SQLite backend answers.
#[cfg(test)]
pub(super) mod tests {
    use std::fmt::Debug;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use charthero_sim::pgcluster;
    use postgres::NoTls;
    use time::macros::datetime;

    use super::*;
    use crate::config::Config;
    use crate::store::postgres::{PgBackend, open_writer};
    use crate::store::{
        Backend, DocumentRecord, EncounterRecord, GroupEnd, PageCounts, Removal, RunCounts, RunEnd,
        RunOutcome, WindowCompletion,
    };

    /// One warehouse per backend, given the same calls.
    pub(in crate::store::postgres) struct Pair {
        pub sqlite: Box<dyn Backend>,
        /// The SQLite warehouse's file, for statements outside the seam (on a connection of
        /// their own).
        pub sqlite_path: PathBuf,
        pub pg: PgBackend,
        _dir: tempfile::TempDir,
    }

    /// A migrated SQLite warehouse and a migrated PostgreSQL one in a new database `name` of the
    /// shared test cluster; None (the reason printed) where no server can run.
    pub(in crate::store::postgres) fn pair(name: &str) -> Option<Pair> {
        let db = pgcluster::shared()?
            .create_database(name)
            .expect("a test database");
        let mut config: postgres::Config = db.url.parse().expect("the test database's URL");
        config.password(&db.password).options("-c search_path=charthero");
        let client = config.connect(NoTls).expect("a connection to the test database");
        let pg = open_writer(client, db.url.clone()).expect("migrations apply");
        let dir = tempfile::tempdir().unwrap();
        let sqlite_path = dir.path().join("w.db");
        let sqlite = crate::store::sqlite::open_writer(&sqlite_path, Duration::from_secs(5)).unwrap();
        Some(Pair {
            sqlite: Box::new(sqlite),
            sqlite_path,
            pg,
            _dir: dir,
        })
    }

    impl Pair {
        /// Calls `f` on both backends and returns its answer, which must be the same on both.
        pub fn both<T: Debug + PartialEq>(&mut self, f: impl Fn(&mut dyn Backend) -> anyhow::Result<T>) -> T {
            let sqlite = f(&mut *self.sqlite).expect("the SQLite backend answers");
            let pg = f(&mut self.pg).expect("the PostgreSQL backend answers");
            assert_eq!(pg, sqlite, "PostgreSQL (left) and SQLite (right) differ");
            sqlite
        }

        /// Runs the same SQL on both warehouses (for the tables the seam's content calls fill).
        pub fn sql(&mut self, sql: &str) {
            crate::store::sqlite::open_writer(&self.sqlite_path, Duration::from_secs(5))
                .unwrap()
                .execute_batch(sql)
                .unwrap();
            self.pg.db().unwrap().batch_execute(sql).unwrap();
        }

        /// The one value `sql` answers, as text, the same on both warehouses.
        pub fn value(&mut self, sql: &str) -> String {
            let sqlite =
                crate::store::sqlite::open_reader(&self.sqlite_path, Duration::from_secs(5)).unwrap();
            let sqlite = crate::store::sqlite::rows_as_text(&sqlite, sql).unwrap();
            let pg: Option<String> = self
                .pg
                .db()
                .unwrap()
                .query_one(sql, &[])
                .unwrap()
                .try_get(0)
                .unwrap();
            assert_eq!(sqlite, [[pg.clone()]], "{sql}");
            pg.expect("a value")
        }

        /// Commits one page in its own write group on both backends.
        pub fn commit(
            &mut self,
            records: &[EncounterRecord],
            removals: &[Removal],
            completion: Option<&WindowCompletion>,
            now: OffsetDateTime,
        ) -> PageCounts {
            self.both(|b| {
                let mut counts = None;
                let end = b.write_group(&mut |tx| {
                    let result = tx.commit_page(records, removals, completion, now);
                    let ok = result.is_ok();
                    counts = Some(result);
                    ok
                });
                assert!(matches!(end, GroupEnd::Committed), "{end:?}");
                counts.expect("the body ran")
            })
        }
    }

    /// An encounter of `organization_id` created at `created_ns` (unix nanoseconds).
    pub(in crate::store::postgres) fn encounter(
        id: &str,
        organization_id: &str,
        created_ns: i64,
        documents: Vec<DocumentRecord>,
    ) -> EncounterRecord {
        let created = crate::timefmt::from_unix_nanos(created_ns);
        EncounterRecord {
            encounter_id: id.to_owned(),
            organization_id: organization_id.to_owned(),
            encounter_type: Some("visit".to_owned()),
            status: Some("open".to_owned()),
            created_at: created,
            updated_at: created,
            date_of_service: None,
            patient: None,
            documents,
            content_hash: format!("hash of {id}"),
            raw_json: format!(r#"{{"id":"{id}"}}"#),
        }
    }

    fn document(id: &str, schema_type: &str, status: Option<&str>) -> DocumentRecord {
        DocumentRecord {
            document_id: id.to_owned(),
            schema_type: schema_type.to_owned(),
            title: Some("Visit".to_owned()),
            status: status.map(str::to_owned),
            workflow_variant: None,
            audio_duration_seconds: (schema_type == "ambient_transcript").then_some(61.5),
        }
    }

    /// A window of `organization` ending at `end`, advancing its watermark unless it belongs to
    /// a backfill.
    pub(in crate::store::postgres) fn window(
        organization: &str,
        run_id: i64,
        backfill_id: Option<i64>,
        start: OffsetDateTime,
        end: OffsetDateTime,
    ) -> WindowCompletion {
        WindowCompletion {
            organization: organization.into(),
            run_id,
            kind: if backfill_id.is_some() { "backfill" } else { "live" },
            backfill_id,
            start_at: start,
            end_at: end,
            records_seen: 2,
            total: 2,
            pages: 1,
            passes: 1,
            removed: 0,
            id_set_hash: "ids".to_owned(),
            advances_watermark: backfill_id.is_none(),
        }
    }

    fn run_end(
        outcome: RunOutcome,
        error: Option<&str>,
        reason_code: Option<&str>,
        routes: Option<&str>,
    ) -> RunEnd {
        RunEnd {
            outcome,
            counts: RunCounts {
                list_requests: 3,
                encounters_new: 2,
                documents_fetched: 1,
                retries: 1,
                ..RunCounts::default()
            },
            disabled_routes: routes.map(str::to_owned),
            error: error.map(str::to_owned),
            reason_code: reason_code.map(str::to_owned),
        }
    }

    /// `status --json` as `charthero-sync status` computes it, backfill estimates included,
    /// and, taken out of it, its `database` (the one part that differs between the backends).
    fn status_json(
        reader: &dyn crate::store::Reader,
        now: OffsetDateTime,
        configured: &[String],
    ) -> (serde_json::Value, serde_json::Value) {
        let config = Config::parse("", Path::new("test.toml")).unwrap();
        let mut status = crate::status::read(reader, now, configured).unwrap();
        status.estimate(reader, &config, now).unwrap();
        let mut json = serde_json::to_value(&status).unwrap();
        let database = json
            .as_object_mut()
            .and_then(|o| o.remove("database"))
            .expect("status names its database");
        (json, database)
    }

    #[test]
    fn an_empty_warehouse_reads_the_same_as_on_sqlite() {
        let Some(mut w) = pair("status_empty") else {
            return;
        };
        let now = datetime!(2026-05-25 12:00:00 UTC);
        for configured in [vec![], vec!["default".to_owned()]] {
            assert_eq!(
                status_json(&w.pg, now, &configured).0,
                status_json(&*w.sqlite, now, &configured).0
            );
        }
        // Each names its backend and where it is: the URL (no password in it), the file.
        let (_, pg) = status_json(&w.pg, now, &[]);
        assert_eq!(pg["backend"], "postgresql");
        assert_eq!(pg["location"], w.pg.location.as_str());
        assert!(w.pg.location.starts_with("postgresql://"), "{pg}");
        let (_, sqlite) = status_json(&*w.sqlite, now, &[]);
        assert_eq!(sqlite["backend"], "sqlite");
        assert_eq!(sqlite["location"], w.sqlite_path.to_str().unwrap());
        w.both(|b| b.live_content_counts());
        w.both(|b| b.table_counts().map(|c| format!("{c:?}")));
    }

    /// Organizations in every state (ok, failing, stopped, incomplete, never synced, not
    /// configured, not known), backfills (running with a cursor, queued, failed, more completed
    /// ones than are shown), audits, dead letters, removals, every kind of content and the
    /// content queue: `status --json` is the same document on both backends.
    #[test]
    fn a_busy_warehouse_reads_the_same_as_on_sqlite() {
        let Some(mut w) = pair("status_busy") else {
            return;
        };
        let t0 = datetime!(2026-05-25 14:00:00 UTC);
        let minutes = |n: i64| t0 + time::Duration::minutes(n);
        let ns = |n: i64| crate::timefmt::unix_nanos(minutes(n)) + 7;

        // "default" (org_1): two finished runs, the last partial with routes disabled.
        assert_eq!(
            w.both(|b| b.claim_organization_id("default", "org_1", minutes(0))),
            Ok(())
        );
        assert_eq!(w.both(|b| b.start_run("default", "sync", minutes(1))), 1);
        let page = vec![
            encounter(
                "enc_1",
                "org_1",
                ns(-50),
                vec![
                    document("doc_n1", "document", None),
                    document("doc_t1", "ambient_transcript", Some("completed")),
                ],
            ),
            encounter(
                "enc_2",
                "org_1",
                ns(-40),
                vec![
                    document("doc_t2", "ambient_transcript", Some("processing")),
                    document("doc_x", "intake_form", None),
                ],
            ),
            // Removed below: its note's detail is never claimed, so no queue counts it.
            encounter(
                "enc_3",
                "org_1",
                ns(-30),
                vec![document("doc_gone", "document", None)],
            ),
        ];
        w.commit(
            &page,
            &[],
            Some(&window("default", 1, None, minutes(-60), minutes(-5))),
            minutes(2),
        );
        w.commit(
            &[],
            &[Removal {
                encounter_id: "enc_3".to_owned(),
                reason: "encounter_not_found".to_owned(),
            }],
            None,
            minutes(3),
        );
        w.both(|b| b.finish_run(1, &run_end(RunOutcome::Succeeded, None, None, None), minutes(4)));
        assert_eq!(w.both(|b| b.start_run("default", "run", minutes(5))), 2);
        w.both(|b| {
            b.finish_run(
                2,
                &run_end(
                    RunOutcome::Partial,
                    Some("2 dead letters"),
                    Some("dead_letters"),
                    Some("transcripts:forbidden, audio:not_found,"),
                ),
                minutes(6),
            )
        });
        // "Zeta" (org_2), not configured: its key was refused. Stored names list in byte order.
        assert_eq!(
            w.both(|b| b.claim_organization_id("Zeta", "org_2", minutes(7))),
            Ok(())
        );
        assert_eq!(w.both(|b| b.start_run("Zeta", "run", minutes(8))), 3);
        w.commit(
            &[encounter("enc_z", "org_2", ns(-20), vec![])],
            &[],
            Some(&window("Zeta", 3, None, minutes(-60), minutes(-10))),
            minutes(8),
        );
        w.both(|b| {
            b.finish_run(
                3,
                &run_end(
                    RunOutcome::Failed,
                    Some("refused"),
                    Some("api_keys_disabled"),
                    None,
                ),
                minutes(9),
            )
        });
        // "alpha": failing, then a run still going (not its last finished one).
        assert_eq!(w.both(|b| b.start_run("alpha", "run", minutes(10))), 4);
        w.both(|b| {
            b.finish_run(
                4,
                &run_end(RunOutcome::Failed, Some("boom"), None, None),
                minutes(11),
            )
        });
        assert_eq!(w.both(|b| b.start_run("alpha", "run", minutes(12))), 5);
        // "beta": only a run in progress.
        assert_eq!(w.both(|b| b.start_run("beta", "run", minutes(13))), 6);

        // Backfills of "default": six completed (five shown), one failed, one running with a
        // cursor, one queued.
        for i in 0..6 {
            let b = w.both(|b| {
                b.open_backfill(
                    "default",
                    minutes(-600 - i),
                    minutes(-500),
                    "cli",
                    minutes(20 + i),
                )
                .map(|f| f.backfill_id)
            });
            w.both(|c| c.finish_backfill(b, None, minutes(30 + i)));
        }
        let failed =
            w.both(|b| b.queue_backfill("default", minutes(-900), minutes(-800), "cli", minutes(40)));
        w.both(|b| b.finish_backfill(failed, Some("the server said 500"), minutes(41)));
        let running = w.both(|b| {
            b.open_backfill("default", minutes(-400), minutes(-100), "daemon", minutes(42))
                .map(|f| f.backfill_id)
        });
        w.commit(
            &[encounter("enc_old", "org_1", ns(-350), vec![])],
            &[],
            Some(&window("default", 2, Some(running), minutes(-400), minutes(-300))),
            minutes(43),
        );
        w.both(|b| b.queue_backfill("default", minutes(-1000), minutes(-950), "cli", minutes(44)));

        // Two audits of "default": the first completed, the last interrupted.
        let tally = crate::store::AuditTally {
            ranges: 2,
            probes: 5,
            differing: 1,
            rescanned: 1,
            list_requests: 6,
        };
        let first = w.both(|b| b.open_audit("default", minutes(-600), minutes(-5), "daemon", minutes(50)));
        w.both(|b| b.advance_audit(first.audit_id, minutes(-5), &tally));
        w.both(|b| b.finish_audit(first.audit_id, minutes(51)));
        let last = w.both(|b| b.open_audit("default", minutes(-600), minutes(-5), "daemon", minutes(52)));
        w.both(|b| b.advance_audit(last.audit_id, minutes(-300), &tally));
        w.both(|b| b.audit_failed(last.audit_id, "the list route timed out"));

        // Content the content calls would have stored, and dead letters.
        w.sql(
            "UPDATE documents SET content_text = 'note text', detail_state = 'done' WHERE document_id = 'doc_n1';
             UPDATE documents SET transcript_state = 'not_ready' WHERE document_id = 'doc_t2';
             UPDATE documents SET audio_state = 'pending' WHERE document_id = 'doc_t2';
             INSERT INTO transcripts (document_id, encounter_id, provider, audio_duration_seconds, turn_count,
                                      fetched_at, organization_id)
             VALUES ('doc_t1', 'enc_1', 'p', 61.5, 2, '2026-05-25T14:20:00.000000000Z', 'org_1');
             UPDATE documents SET transcript_state = 'done' WHERE document_id = 'doc_t1';
             INSERT INTO transcript_turns (document_id, turn_index, speaker, start_seconds, end_seconds, text,
                                           organization_id)
             VALUES ('doc_t1', 0, 'a', 0.0, 1.0, 'hello', 'org_1'), ('doc_t1', 1, 'b', 1.0, 2.0, 'hi', 'org_1');
             INSERT INTO recordings (document_id, encounter_id, path, size_bytes, sha256, duration_seconds,
                                     fetched_at, organization_id)
             VALUES ('doc_t1', 'enc_1', 'abc.mp3', 10, 'abc', 61.5, '2026-05-25T14:21:00.000000000Z', 'org_1');
             INSERT INTO dead_letters (work, document_id, encounter_id, attempts, first_failed_at, last_failed_at,
                                       last_run_id, reason_code, last_error, organization)
             VALUES ('transcript', 'doc_t2', 'enc_2', 3, '2026-05-25T14:06:00.000000000Z',
                     '2026-05-25T14:06:30.250000000Z', 2, 'forbidden', 'HTTP 403', 'default'),
                    ('document', 'doc_x', 'enc_2', 1, '2026-05-25T14:05:00.000000000Z',
                     '2026-05-25T14:05:00.000000000Z', 2, NULL, 'HTTP 500', 'default');",
        );

        let now = minutes(60);
        for configured in [
            vec!["default".to_owned(), "missing".to_owned()],
            vec!["beta".to_owned()],
            vec![],
        ] {
            let (pg, _) = status_json(&w.pg, now, &configured);
            let (sqlite, _) = status_json(&*w.sqlite, now, &configured);
            assert_eq!(pg, sqlite, "status with {configured:?} configured");
        }
        // What the comparison covers, read from one of them.
        let (status, _) = status_json(&w.pg, now, &["default".to_owned()]);
        let names: Vec<&str> = status["organizations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["default", "Zeta", "alpha", "beta"]);
        let states: Vec<&str> = status["organizations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["state"].as_str().unwrap())
            .collect();
        // "beta"'s only run started 47 minutes before `now` and never wrote its progress.
        assert_eq!(states, ["incomplete", "stopped", "failing", "interrupted"]);
        assert_eq!(status["backfills"].as_array().unwrap().len(), 8);
        assert_eq!(status["audit"]["error"], "the list route timed out");
        assert_eq!(
            status["dead_letters"][0]["last_failed_at"],
            "2026-05-25T14:05:00.000000000Z"
        );
        assert_eq!(status["rows"]["encounters_removed"], 1);
        assert_eq!(status["queue"]["transcripts_not_ready"], 1);
        // doc_x's detail; not doc_n1's (done) nor doc_gone's (its encounter was removed).
        assert_eq!(status["queue"]["documents_pending"], 1);
        assert_eq!(status["organizations"][0]["queue"]["documents_pending"], 1);
        assert!(
            status["backfills"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["eta_seconds"].is_number() && b["progress"].as_f64().unwrap() > 0.0),
            "{status:#}"
        );
        w.both(|b| b.live_content_counts());
        w.both(|b| b.table_counts().map(|c| format!("{c:?}")));
    }
}
